//! `driftguard eval --gold FILE --url URL`: the post-rollback audit. Replays a gold set (JSON Lines of
//! `{"question": .., "anchor": .., "body": {..}}`) against a URL — through the sidecar or direct — and
//! scores every answer with the same extractor and embedder as the live signals.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Signals as SignalsConfig};
use crate::eval::Evaluator;
use crate::net;
use crate::signals::measure;
use crate::signals::retrieval::DocFrequency;
use crate::signals::EvalError;
use crate::windows::LAMBDA_STATES;

/// Largest response body read per item.
const MAX_RESPONSE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GoldError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Item {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Setup(String),
    #[error("--url {0}")]
    Url(#[source] net::Error),
    #[error(transparent)]
    Net(#[from] net::Error),
    #[error(transparent)]
    Eval(#[from] EvalError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldItem {
    question: String,
    #[serde(default)]
    anchor: Option<String>,
    #[serde(default)]
    body: Option<serde_json::Value>,
}

/// One replayed item.
#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    pub line: usize,
    pub question: String,
    pub status: Option<u16>,
    /// Why the item has no signals (HTTP failure or extraction skip).
    pub error: Option<String>,
    pub delta_s: Option<f64>,
    pub delta_s_qr: Option<f64>,
    pub delta_s_ra: Option<f64>,
    pub coverage: Option<f64>,
    pub retrieval_coverage: Option<f64>,
    pub lambda: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub items: usize,
    pub evaluated: usize,
    pub failed: usize,
    pub delta_s_mean: Option<f64>,
    pub delta_s_p50: Option<f64>,
    pub delta_s_p95: Option<f64>,
    /// The retrieval probe ΔS(question, retrieved).
    pub delta_s_qr_p50: Option<f64>,
    pub delta_s_qr_p95: Option<f64>,
    /// The answer probe ΔS(retrieved, answer).
    pub delta_s_ra_p50: Option<f64>,
    pub delta_s_ra_p95: Option<f64>,
    pub coverage_mean: Option<f64>,
    pub retrieval_coverage_mean: Option<f64>,
    pub lambda: std::collections::BTreeMap<&'static str, usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub embedder: &'static str,
    pub items: Vec<ItemResult>,
    pub totals: Totals,
    /// Thresholds breached; non-empty means exit code 1.
    pub breaches: Vec<String>,
}

/// Thresholds of the audit.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Largest acceptable p95 ΔS over the evaluated items.
    pub max_delta_s: Option<f64>,
    /// Smallest acceptable mean coverage.
    pub min_coverage: Option<f64>,
    /// Largest acceptable p95 of the retrieval probe ΔS(question, retrieved).
    pub max_retrieval_drift: Option<f64>,
}

/// Replays the gold file against `url` and scores every item.
pub fn run(
    gold: &Path,
    url: &str,
    signals: &SignalsConfig,
    limits: &Limits,
    timeout: Duration,
) -> Result<Report, GoldError> {
    let display = gold.display().to_string();
    let file = std::fs::File::open(gold).map_err(|source| GoldError::Read {
        path: display.clone(),
        source,
    })?;
    let mut items = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| GoldError::Read {
            path: display.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let item: GoldItem = serde_json::from_str(&line).map_err(|e| GoldError::Item {
            path: display.clone(),
            line: i + 1,
            message: e.to_string(),
        })?;
        items.push((i + 1, item));
    }
    if items.is_empty() {
        return Err(GoldError::Setup(format!("{display}: no items")));
    }
    let uri = net::url(url).map_err(GoldError::Url)?;
    let evaluator = Evaluator::from_config(signals)?;
    let client = net::Client::builder(timeout)
        .max_response(MAX_RESPONSE)
        .build();
    let client = net::Blocking::current_thread(client)?;
    // One document-frequency sketch for the run: the items' chunks are the recent corpus.
    let frequencies = Mutex::new(DocFrequency::new());

    let results: Vec<ItemResult> = items
        .into_iter()
        .map(|(line, item)| {
            let body = item
                .body
                .clone()
                .unwrap_or_else(|| serde_json::json!({"question": item.question}));
            let request_bytes = Bytes::from(body.to_string());
            let fetched = fetch(&client, &uri, request_bytes.clone());
            score_item(
                &evaluator,
                &frequencies,
                line,
                &item,
                &request_bytes,
                fetched,
            )
        })
        .collect();
    let totals = totals(&results);
    let mut breaches = Vec::new();
    if totals.failed > 0 {
        breaches.push(format!(
            "{} of {} items could not be evaluated",
            totals.failed, totals.items
        ));
    }
    if let (Some(max), Some(p95)) = (limits.max_delta_s, totals.delta_s_p95) {
        if p95 > max {
            breaches.push(format!("p95 ΔS {p95:.3} > --max-delta-s {max}"));
        }
    }
    if let (Some(max), Some(p95)) = (limits.max_retrieval_drift, totals.delta_s_qr_p95) {
        if p95 > max {
            breaches.push(format!(
                "p95 retrieval ΔS(question, retrieved) {p95:.3} > --max-retrieval-drift {max}"
            ));
        }
    }
    if let (Some(min), Some(mean)) = (limits.min_coverage, totals.coverage_mean) {
        if mean < min {
            breaches.push(format!("mean coverage {mean:.3} < --min-coverage {min}"));
        }
    }
    Ok(Report {
        url: url.to_string(),
        embedder: evaluator.embedder.name(),
        items: results,
        totals,
        breaches,
    })
}

/// What `driftguard eval` was asked to do.
#[derive(Debug, Clone)]
pub struct Args {
    /// The gold set (JSON Lines).
    pub gold: PathBuf,
    /// Where to POST each item.
    pub url: String,
    /// Print the report as JSON.
    pub json: bool,
    pub limits: Limits,
    /// Per-item timeout.
    pub timeout: Duration,
}

/// `driftguard eval`: scores with the configured extractor and embedder when there is a config (named
/// with `explicit`, or the default file when it exists), the defaults otherwise. Exit 0 on a pass, 1 on
/// a breach, 2 when the audit cannot run.
pub fn main(config: &Path, explicit: bool, args: &Args) -> ExitCode {
    let signals = if explicit || config.exists() {
        match crate::app::load(config) {
            Ok(loaded) => loaded.config.signals,
            Err(errors) => {
                eprintln!("driftguard: {}:\n{errors}", config.display());
                return ExitCode::from(2);
            }
        }
    } else {
        Config::default().signals
    };
    match run(&args.gold, &args.url, &signals, &args.limits, args.timeout) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.render());
            }
            if report.breaches.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("driftguard eval: {e}");
            ExitCode::from(2)
        }
    }
}

/// Status, SSE flag and body of one POST.
fn fetch(
    client: &net::Blocking,
    uri: &http::Uri,
    body: Bytes,
) -> Result<(u16, bool, Bytes), net::Error> {
    let req = Request::post(uri.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream")
        .body(body)?;
    let resp = client.send(req)?;
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    Ok((resp.status().as_u16(), sse, resp.into_body()))
}

/// Why an item has no answer, as its error column says it.
fn fetch_error(e: &net::Error) -> String {
    match e {
        net::Error::Timeout { after, .. } => format!("no complete response within {after:?}"),
        net::Error::Connect { cause, .. } => format!("request failed: {cause}"),
        net::Error::Read { cause, .. } => format!("reading the response: {cause}"),
        other => other.to_string(),
    }
}

fn score_item(
    evaluator: &Evaluator,
    frequencies: &Mutex<DocFrequency>,
    line: usize,
    item: &GoldItem,
    request: &[u8],
    fetched: Result<(u16, bool, Bytes), net::Error>,
) -> ItemResult {
    let mut result = ItemResult {
        line,
        question: item.question.clone(),
        status: None,
        error: None,
        delta_s: None,
        delta_s_qr: None,
        delta_s_ra: None,
        coverage: None,
        retrieval_coverage: None,
        lambda: None,
    };
    let (status, sse, body) = match fetched {
        Ok(f) => f,
        Err(e) => {
            result.error = Some(fetch_error(&e));
            return result;
        }
    };
    result.status = Some(status);
    if !(200..300).contains(&status) {
        result.error = Some(format!("HTTP {status}"));
        return result;
    }
    let (mut extracted, _) = evaluator
        .extractor
        .gather(request, false, &body, false, sse);
    // The gold item knows the question and the anchor; the response supplies chunks and answer.
    extracted.question = Some(item.question.clone());
    if item.anchor.is_some() {
        extracted.anchor = item.anchor.clone();
    }
    if let Some(skip) = extracted.missing() {
        result.error = Some(format!("skipped: {}", skip.as_str()));
        return result;
    }
    match evaluator.score(&extracted, frequencies) {
        Ok(s) => {
            result.retrieval_coverage = s.retrieval_coverage;
            result.delta_s = Some(s.delta_s);
            result.delta_s_qr = Some(s.delta_s_qr);
            result.delta_s_ra = Some(s.delta_s_ra);
            result.coverage = s.coverage;
            result.lambda =
                Some(LAMBDA_STATES[measure::lambda(s.delta_s_qr, s.delta_s_ra).index()]);
        }
        Err(e) => result.error = Some(format!("embedder: {e}")),
    }
    result
}

fn totals(items: &[ItemResult]) -> Totals {
    let mut delta_s: Vec<f64> = items.iter().filter_map(|i| i.delta_s).collect();
    delta_s.sort_by(f64::total_cmp);
    let sorted = |f: fn(&ItemResult) -> Option<f64>| {
        let mut v: Vec<f64> = items.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (qr, ra) = (sorted(|i| i.delta_s_qr), sorted(|i| i.delta_s_ra));
    let coverage: Vec<f64> = items.iter().filter_map(|i| i.coverage).collect();
    let retrieval_coverage: Vec<f64> = items.iter().filter_map(|i| i.retrieval_coverage).collect();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let mut lambda: std::collections::BTreeMap<&'static str, usize> =
        LAMBDA_STATES.iter().map(|&name| (name, 0)).collect();
    for state in items.iter().filter_map(|i| i.lambda) {
        *lambda.entry(state).or_default() += 1;
    }
    Totals {
        items: items.len(),
        evaluated: delta_s.len(),
        failed: items.iter().filter(|i| i.delta_s.is_none()).count(),
        delta_s_mean: mean(&delta_s),
        delta_s_p50: nearest_rank(&delta_s, 0.5),
        delta_s_p95: nearest_rank(&delta_s, 0.95),
        delta_s_qr_p50: nearest_rank(&qr, 0.5),
        delta_s_qr_p95: nearest_rank(&qr, 0.95),
        delta_s_ra_p50: nearest_rank(&ra, 0.5),
        delta_s_ra_p95: nearest_rank(&ra, 0.95),
        coverage_mean: mean(&coverage),
        retrieval_coverage_mean: mean(&retrieval_coverage),
        lambda,
    }
}

/// Nearest-rank quantile of sorted values.
fn nearest_rank(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl Report {
    /// The human-readable table and totals.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "gold set against {} (embedder {})",
            self.url, self.embedder
        );
        let _ = writeln!(
            out,
            "{:>5}  {:>6}  {:>6}  {:>6}  {:>6}  {:>8}  {:>8}  {:<10}  question",
            "line", "status", "ΔS", "ΔS_qr", "ΔS_ra", "coverage", "ret_cov", "λ"
        );
        for i in &self.items {
            let question: String = i.question.chars().take(48).collect();
            let status = i.status.map_or("-".to_string(), |s| s.to_string());
            let lambda = i.lambda.unwrap_or("-");
            let _ = write!(
                out,
                "{:>5}  {:>6}  {:>6}  {:>6}  {:>6}  {:>8}  {:>8}  {:<10}  {}",
                i.line,
                status,
                f(i.delta_s),
                f(i.delta_s_qr),
                f(i.delta_s_ra),
                f(i.coverage),
                f(i.retrieval_coverage),
                lambda,
                question
            );
            if let Some(e) = &i.error {
                let _ = write!(out, "  [{e}]");
            }
            out.push('\n');
        }
        let t = &self.totals;
        let _ = writeln!(
            out,
            "\nitems {}  evaluated {}  failed {}",
            t.items, t.evaluated, t.failed
        );
        let _ = writeln!(
            out,
            "ΔS mean {}  p95 {}  coverage mean {}",
            f(t.delta_s_mean),
            f(t.delta_s_p95),
            f(t.coverage_mean)
        );
        let _ = writeln!(
            out,
            "retrieval ΔS(question, retrieved) p50 {}  p95 {}  retrieval coverage mean {}",
            f(t.delta_s_qr_p50),
            f(t.delta_s_qr_p95),
            f(t.retrieval_coverage_mean)
        );
        let _ = writeln!(
            out,
            "answer ΔS(retrieved, answer) p50 {}  p95 {}",
            f(t.delta_s_ra_p50),
            f(t.delta_s_ra_p95)
        );
        let lambda: Vec<String> = t.lambda.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "λ: {}", lambda.join(", "));
        if self.breaches.is_empty() {
            let _ = writeln!(out, "PASS");
        } else {
            for b in &self.breaches {
                let _ = writeln!(out, "BREACH: {b}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantile() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 0.95), Some(19.0));
        assert_eq!(nearest_rank(&v, 0.5), Some(10.0));
        assert_eq!(nearest_rank(&[0.3], 0.95), Some(0.3));
        assert_eq!(nearest_rank(&[], 0.95), None);
    }
}
