//! The observability kit against the real thing: the Prometheus alert rules (`deploy/prometheus`) under
//! `promtool check rules` and `promtool test rules`, the Kubernetes copies of them (`deploy/k8s`), the
//! Grafana dashboard (`dashboards/driftguard.json`), and a real Prometheus server scraping a running
//! driftguard — every metric name the rules and the dashboard use must be one driftguard exposes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::rag::*;
use common::*;
use http::StatusCode;
use serde_json::{json, Value};

// ================================================================================================
// The files under test
// ================================================================================================

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

const RULES: &str = "deploy/prometheus/driftguard-rules.yml";
const RULES_TEST: &str = "deploy/prometheus/driftguard-rules.test.yml";
const PROMETHEUS_RULE: &str = "deploy/k8s/prometheusrule.yaml";
const SERVICE_MONITOR: &str = "deploy/k8s/servicemonitor.yaml";
const SERVICE: &str = "deploy/k8s/service.yaml";
const DASHBOARD: &str = "dashboards/driftguard.json";

/// Every YAML document of a file, as JSON values.
fn yaml_docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path}: bad YAML: {e}"))
        })
        .collect()
}

fn yaml(path: &str) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{path}: one YAML document expected");
    docs.remove(0)
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo(DASHBOARD)).expect("read dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// The alerting rules of the rules file: (alert name, rule).
fn alert_rules() -> Vec<(String, Value)> {
    let rules = yaml(RULES);
    let groups = rules["groups"].as_array().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| {
            let name = r["alert"].as_str().expect("every rule is an alert");
            (name.to_string(), r.clone())
        })
        .collect()
}

/// Every panel of the dashboard, rows' nested panels included (rows themselves excluded).
fn dashboard_panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten().cloned());
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// Every PromQL expression of the dashboard: panel targets and query variables.
fn dashboard_exprs(dash: &Value) -> Vec<String> {
    let mut exprs: Vec<String> = dashboard_panels(dash)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_string()
        })
        .collect();
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if var["type"] == "query" {
            exprs.push(var["definition"].as_str().expect("definition").to_string());
        }
    }
    exprs
}

/// The expression of each alert, and the text of its annotations (they name metrics for humans).
fn rule_texts() -> Vec<String> {
    alert_rules()
        .into_iter()
        .flat_map(|(_, r)| {
            let mut texts = vec![r["expr"].as_str().expect("expr").to_string()];
            if let Some(annotations) = r["annotations"].as_object() {
                texts.extend(
                    annotations
                        .values()
                        .filter_map(|v| v.as_str().map(String::from)),
                );
            }
            texts
        })
        .collect()
}

// ================================================================================================
// PromQL: the metric names an expression uses, with their label matchers
// ================================================================================================

#[derive(Debug)]
struct MetricRef {
    name: String,
    /// (label, operator, value) of the selector's matchers.
    matchers: Vec<(String, String, String)>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Identifiers starting with `driftguard_` and the matchers of the `{...}` right after each.
fn metric_refs(expr: &str) -> Vec<MetricRef> {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i..].iter().take(11).collect::<String>() == "driftguard_"
            && (i == 0 || !is_ident(chars[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let begin = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let name: String = chars[begin..i].iter().collect();
        let mut matchers = Vec::new();
        let mut j = i;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        if j < chars.len() && chars[j] == '{' {
            let close = chars[j..]
                .iter()
                .position(|&c| c == '}')
                .map(|k| j + k)
                .unwrap_or_else(|| panic!("unclosed selector in {expr}"));
            let inner: String = chars[j + 1..close].iter().collect();
            matchers = parse_matchers(&inner, expr);
            i = close + 1;
        }
        refs.push(MetricRef { name, matchers });
    }
    refs
}

/// `a="x", b=~"y|z"` → [(a, =, x), (b, =~, y|z)]. Values here never hold `"` or `,`; an annotation
/// that names a metric as `metric{label}` (no operator) yields the bare label with an empty operator.
fn parse_matchers(inner: &str, expr: &str) -> Vec<(String, String, String)> {
    inner
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| {
            let op_at = m.find(['=', '!']).unwrap_or(m.len());
            let label = m[..op_at].trim().to_string();
            let rest = &m[op_at..];
            let op: String = rest.chars().take_while(|c| "=!~".contains(*c)).collect();
            let value = rest[op.len()..].trim().trim_matches('"').to_string();
            assert!(
                !label.is_empty() && label.chars().all(is_ident),
                "cannot read matcher {m:?} in {expr}"
            );
            (label, op, value)
        })
        .collect()
}

// ================================================================================================
// A driftguard on which every metric family appears
// ================================================================================================

/// Two arms behind RAG services (quality signals on), a token budget, write routes with the idempotency
/// fence, and an exec hook; rules that do not trip on their own in a test's lifetime.
struct Full {
    proxy: Proxy,
    _baseline: Scripted,
    _canary: Scripted,
}

fn start_full() -> Full {
    let baseline = rag_service("baseline", false);
    let canary = rag_service("canary", false);
    let config = format!(
        r#"{LISTEN}
[pins]
BUILD_ID = "b-1"
[budget]
tokens_per_minute = 10000000
burst = 1000000
[writes]
routes = ["POST /ingest"]
[rules]
window = "60s"
eval_interval = "250ms"
min_samples = 100000
[recovery]
hold = "1h"
deadline = "1h"
[[rollback.hooks]]
name = "noop"
kind = "exec"
command = ["/bin/true"]
timeout = "5s"

[[arms]]
name = "baseline"
upstream = "{}"
weight = 50
baseline = true
pins = {{ MODEL_VER = "m-1", INDEX_HASH = "a1b2c3" }}

[[arms]]
name = "canary"
upstream = "{}"
weight = 50
pins = {{ MODEL_VER = "m-2", INDEX_HASH = "d4e5f6" }}
"#,
        baseline.url(),
        canary.url()
    );
    Full {
        proxy: Proxy::start(&config),
        _baseline: baseline,
        _canary: canary,
    }
}

/// Evaluated answers on both arms, a fenced write, and a manual trip (the hooks run): afterwards every
/// family the proxy can expose is in /metrics.
async fn drive_everything(client: &HttpClient, proxy: &Proxy) {
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut i = 0;
    while served.len() < 2 || served.values().any(|&n| n < 5) {
        assert!(
            i < 200,
            "both arms should serve within 200 requests: {served:?}"
        );
        let t = &TOPICS[i % TOPICS.len()];
        let reply = post_json(
            client,
            &proxy.url("/v1/ask"),
            &json!({"question": t.question}),
            &[],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        *served
            .entry(reply.header("x-driftguard-arm").expect("arm header"))
            .or_default() += 1;
        i += 1;
    }
    for (arm, n) in &served {
        wait_metric(
            client,
            proxy,
            "driftguard_evaluations_total",
            &[("arm", arm)],
            WAIT,
            |v| v >= *n as f64,
        )
        .await;
    }
    let write = post_json(
        client,
        &proxy.url("/ingest"),
        &json!({"doc": 1}),
        &[("idempotency-key", "k-1")],
    )
    .await;
    assert!(
        write.status.as_u16() < 500,
        "fenced write: {} {}",
        write.status,
        write.text()
    );

    let trip = admin_post(
        client,
        &proxy.admin_url("/trip"),
        r#"{"reason":"observability test"}"#,
        None,
    )
    .await;
    assert!(
        trip.status.is_success(),
        "POST /trip: {} {}",
        trip.status,
        trip.text()
    );
    wait_metric(
        client,
        proxy,
        "driftguard_hook_runs_total",
        &[("hook", "noop"), ("outcome", "ok")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
}

/// `# TYPE` lines of an exposition: family → type.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, ty)| (name.to_string(), ty.trim().to_string()))
        .collect()
}

/// The exposed family a sample name belongs to: itself, or for `_bucket` a histogram, for `_sum` /
/// `_count` a histogram or summary.
fn family_of<'a>(name: &'a str, families: &BTreeMap<String, String>) -> Option<&'a str> {
    if families.contains_key(name) {
        return Some(name);
    }
    let suffixed = |suffix: &str, types: &[&str]| {
        let stem = name.strip_suffix(suffix)?;
        types
            .contains(&families.get(stem)?.as_str())
            .then_some(stem)
    };
    suffixed("_bucket", &["histogram"])
        .or_else(|| suffixed("_sum", &["histogram", "summary"]))
        .or_else(|| suffixed("_count", &["histogram", "summary"]))
}

// ================================================================================================
// Alert rules
// ================================================================================================

#[test]
#[ignore = "needs promtool (apt-get install prometheus)"]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = promtool();
    let check = Command::new(promtool)
        .args(["check", "rules"])
        .arg(repo(RULES))
        .output()
        .expect("run promtool check rules");
    let report = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "promtool check rules:\n{report}");
    let n = alert_rules().len();
    assert!(
        report.contains(&format!("SUCCESS: {n} rules found")),
        "{report}"
    );

    let test = Command::new(promtool)
        .args(["test", "rules"])
        .arg(repo(RULES_TEST))
        .output()
        .expect("run promtool test rules");
    let report =
        String::from_utf8_lossy(&test.stdout).to_string() + &String::from_utf8_lossy(&test.stderr);
    assert!(
        test.status.success() && report.contains("SUCCESS"),
        "promtool test rules:\n{report}"
    );
}

#[test]
fn every_alert_has_a_firing_and_a_silent_unit_test() {
    let tests = yaml(RULES_TEST);
    let mut firing: BTreeSet<String> = BTreeSet::new();
    let mut silent: BTreeSet<String> = BTreeSet::new();
    for group in tests["tests"].as_array().expect("tests") {
        for case in group["alert_rule_test"]
            .as_array()
            .expect("alert_rule_test")
        {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            match case["exp_alerts"].as_array().map(Vec::len) {
                Some(0) | None => silent.insert(name.clone()),
                Some(_) => firing.insert(name.clone()),
            };
            // An alert that fires for one arm names that arm in its summary and description.
            for alert in case["exp_alerts"].as_array().into_iter().flatten() {
                if let Some(arm) = alert["exp_labels"]["arm"].as_str() {
                    for key in ["summary", "description"] {
                        let text = alert["exp_annotations"][key].as_str().unwrap_or("");
                        assert!(
                            text.contains(arm),
                            "{name}: {key} does not name arm {arm}: {text:?}"
                        );
                    }
                }
            }
        }
    }
    for (name, rule) in alert_rules() {
        assert!(
            firing.contains(&name),
            "{name}: no unit test where it fires"
        );
        assert!(
            silent.contains(&name),
            "{name}: no unit test where it stays silent"
        );
        assert!(rule["for"].is_string(), "{name}: no `for`");
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["warning", "critical"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key].is_string(),
                "{name}: no {key} annotation"
            );
        }
    }
}

#[test]
fn prometheus_rule_carries_the_same_groups_as_the_rules_file() {
    let rules = yaml(RULES);
    let k8s = yaml(PROMETHEUS_RULE);
    assert_eq!(k8s["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(k8s["kind"], "PrometheusRule");
    assert!(k8s["metadata"]["name"].is_string());
    assert!(rules["groups"].as_array().is_some_and(|g| !g.is_empty()));
    assert_eq!(
        k8s["spec"]["groups"], rules["groups"],
        "{PROMETHEUS_RULE} spec.groups differ from {RULES}: copy the rules file's groups into it"
    );
}

#[test]
fn service_monitor_scrapes_the_admin_port() {
    let monitor = yaml_docs(SERVICE_MONITOR)
        .into_iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor");
    // The app's Service (deploy/k8s/service.yaml) carries the sidecar's admin port.
    let service = yaml_docs(SERVICE)
        .into_iter()
        .find(|d| d["kind"] == "Service")
        .expect("a Service");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let port = service["spec"]["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "dg-admin"))
        .expect("the Service exposes a port named dg-admin");
    assert_eq!(
        port["targetPort"], "dg-admin",
        "targets the container port by its name"
    );
    let selected = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    for (k, v) in selected {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the Service ({k})"
        );
    }
    let endpoints = monitor["spec"]["endpoints"].as_array().expect("endpoints");
    assert!(
        endpoints
            .iter()
            .any(|e| e["port"] == "dg-admin" && e["path"] == "/metrics"),
        "an endpoint scrapes port dg-admin at /metrics: {endpoints:?}"
    );
    // The sidecar in the Deployment declares that port.
    let deployment = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/k8s/deployment.yaml"
    ))
    .expect("deployment.yaml");
    assert!(
        deployment.contains("name: dg-admin"),
        "the sidecar names its admin port dg-admin"
    );
}

// ================================================================================================
// Dashboard
// ================================================================================================

#[test]
fn dashboard_is_well_formed() {
    let dash = dashboard();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()), "uid");
    assert!(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "title"
    );
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );

    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let arm = var("arm");
    assert_eq!(arm["type"], "query");
    assert_eq!(
        arm["definition"],
        "label_values(driftguard_requests_total, arm)"
    );
    assert_eq!(
        arm["query"]["query"],
        "label_values(driftguard_requests_total, arm)"
    );
    assert_eq!(arm["multi"], true);
    assert_eq!(arm["includeAll"], true);
    assert_eq!(arm["datasource"]["uid"], "${datasource}");

    let panels = dashboard_panels(&dash);
    let mut ids = BTreeSet::new();
    for row in dash["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(row["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            row["id"]
        );
    }
    for p in &panels {
        let title = p["title"].as_str().expect("panel title");
        assert_eq!(
            p["datasource"]["type"], "prometheus",
            "{title}: datasource type"
        );
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: datasource is the variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title}: target datasource"
            );
        }
        assert!(
            p["gridPos"]["w"]
                .as_u64()
                .is_some_and(|w| (1..=24).contains(&w)),
            "{title}: gridPos"
        );
    }

    let find = |needle: &str| {
        panels
            .iter()
            .find(|p| {
                p["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["expr"].as_str().unwrap_or("").contains(needle))
            })
            .unwrap_or_else(|| panic!("no panel queries {needle}"))
    };
    let guard = find("driftguard_guard_state");
    assert_eq!(guard["type"], "state-timeline");
    let mappings = &guard["fieldConfig"]["defaults"]["mappings"][0]["options"];
    for (value, text) in [
        ("0", "healthy"),
        ("1", "tripped"),
        ("2", "recovering"),
        ("3", "escalated"),
    ] {
        assert_eq!(mappings[value]["text"], text, "guard state mapping {value}");
    }
    let pins = find("driftguard_pins_info");
    assert_eq!(pins["type"], "table");
    assert_eq!(pins["targets"][0]["instant"], true);
    assert_eq!(pins["targets"][0]["format"], "table");
    assert!(find("driftguard_ttfb_seconds_bucket")["targets"][0]["expr"]
        .as_str()
        .unwrap()
        .contains("histogram_quantile"));
    for needle in [
        "driftguard_arm_weight",
        "driftguard_trips_total",
        "driftguard_latency_quantile_seconds",
        "driftguard_semantic_drift_quantile",
        "driftguard_coverage_mean",
        "driftguard_lambda_total",
        "driftguard_lambda_flip_rate",
        "driftguard_tokens_total",
        "driftguard_budget_available_tokens",
        "driftguard_rate_limited_total",
        "driftguard_breaker_state",
        "driftguard_idempotency_total",
        "driftguard_hook_runs_total",
    ] {
        find(needle);
    }
}

// ================================================================================================
// Against a running driftguard
// ================================================================================================

/// Every metric the rules and the dashboard name is in /metrics (sample names resolved to families by
/// the `# TYPE` lines), has samples, and carries the labels (and literal label values) the queries
/// match on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_rules_and_the_dashboard_is_exposed() {
    let full = start_full();
    let client = client();
    drive_everything(&client, &full.proxy).await;
    let (text, samples) = scrape(&client, &full.proxy).await;
    let families = families(&text);

    let mut texts: Vec<(String, String)> = rule_texts()
        .into_iter()
        .map(|t| (RULES.to_string(), t))
        .collect();
    texts.extend(
        dashboard_exprs(&dashboard())
            .into_iter()
            .map(|e| (DASHBOARD.to_string(), e)),
    );
    let mut checked = BTreeSet::new();
    let mut problems = Vec::new();
    for (file, expr) in &texts {
        for r in metric_refs(expr) {
            checked.insert(r.name.clone());
            if family_of(&r.name, &families).is_none() {
                problems.push(format!("{file}: {} is not exposed (in {expr})", r.name));
                continue;
            }
            let of_name: Vec<&Sample> = samples.iter().filter(|s| s.name == r.name).collect();
            if of_name.is_empty() {
                problems.push(format!("{file}: {} has no samples", r.name));
                continue;
            }
            // A dashboard query of a per-arm family honours the arm variable.
            let per_arm = of_name.iter().any(|s| s.labels.contains_key("arm"));
            let honours_arm = r
                .matchers
                .iter()
                .any(|(l, op, v)| l == "arm" && op == "=~" && v == "$arm");
            if file == DASHBOARD && per_arm && !honours_arm && !expr.starts_with("label_values(") {
                problems.push(format!("{file}: {} ignores $arm (in {expr})", r.name));
            }
            for (label, op, value) in &r.matchers {
                if !of_name.iter().any(|s| s.labels.contains_key(label)) {
                    problems.push(format!(
                        "{file}: {} has no label {label} (in {expr})",
                        r.name
                    ));
                    continue;
                }
                // Literal values (not Grafana variables) must be values the proxy uses.
                let literal = !value.contains('$');
                let wanted: Vec<&str> = match op.as_str() {
                    "=" if literal => vec![value.as_str()],
                    "=~" if literal
                        && value.chars().all(|c| is_ident(c) || c == '|' || c == '.') =>
                    {
                        value.split('|').collect()
                    }
                    _ => vec![],
                };
                for w in wanted {
                    if !of_name
                        .iter()
                        .any(|s| s.labels.get(label).map(String::as_str) == Some(w))
                    {
                        problems.push(format!(
                            "{file}: no {}{{{label}=\"{w}\"}} sample (in {expr})",
                            r.name
                        ));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\n/metrics:\n{text}",
        problems.join("\n")
    );
    // The extraction found the families the rules and the dashboard are about.
    for name in [
        "driftguard_guard_state",
        "driftguard_ttfb_seconds_bucket",
        "driftguard_semantic_drift_quantile",
        "driftguard_pins_info",
        "driftguard_eval_dropped_total",
    ] {
        assert!(
            checked.contains(name),
            "{name} not found in the queries: {checked:?}"
        );
    }
    assert!(checked.len() >= 18, "{checked:?}");
}

// ================================================================================================
// A real Prometheus server
// ================================================================================================

/// `/usr/bin/prometheus` (Debian package `prometheus`, installed by `.ci/run`) on a free loopback port,
/// with its storage in a temp dir; killed on drop.
struct PrometheusServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl PrometheusServer {
    /// The test that starts one is `#[ignore]`d with that reason: without the binary it fails.
    fn start(scrape_target: &str) -> PrometheusServer {
        let binary = "/usr/bin/prometheus";
        require(
            binary,
            Path::new(binary).exists(),
            "apt-get install prometheus",
        );
        let dir = unique("prometheus");
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: driftguard\n    static_configs:\n      - targets: ['{scrape_target}']\n",
            rules = repo(RULES).display()
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = free_port();
        // No alertmanagers, no remote write: nothing leaves the loopback interface.
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).expect("stderr log"))
            .spawn()
            .expect("spawn prometheus");
        PrometheusServer { child, port, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// `GET /api/v1/query?query=<expr>`: the response's JSON.
    async fn query(&self, client: &HttpClient, expr: &str) -> Value {
        let reply = get(
            client,
            &self.url(&format!("/api/v1/query?query={}", urlencode(expr))),
            &[],
        )
        .await;
        reply.json()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard's Grafana variables replaced by what Grafana would send.
fn grafana_expr(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$arm", ".*")
}

/// Prometheus scrapes the admin listener, the rules load and evaluate without error on the real series,
/// and every dashboard query is valid PromQL for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus (apt-get install prometheus)"]
async fn prometheus_scrapes_driftguard_and_runs_the_rules_and_dashboard_queries() {
    let full = start_full();
    let proxy = &full.proxy;
    let prom = PrometheusServer::start(&proxy.admin.to_string());
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let waited = |what: &str, prom: &PrometheusServer| {
        assert!(
            Instant::now() < deadline,
            "Prometheus: {what} within 60 s\nprometheus log:\n{}",
            prom.log()
        );
    };
    loop {
        let ready = client
            .request(
                http::Request::get(prom.url("/-/ready"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        waited("ready", &prom);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    drive_everything(&client, proxy).await;

    for expr in ["driftguard_requests_total", "driftguard_guard_state"] {
        loop {
            let answer = prom.query(&client, expr).await;
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            let result = answer["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !result.is_empty() {
                let metric = &result[0]["metric"];
                assert_eq!(metric["job"], "driftguard", "{expr}: {answer}");
                if expr == "driftguard_requests_total" {
                    let arms: BTreeSet<&str> = result
                        .iter()
                        .filter_map(|r| r["metric"]["arm"].as_str())
                        .collect();
                    assert!(
                        arms.contains("baseline") && arms.contains("canary"),
                        "{arms:?}"
                    );
                }
                break;
            }
            waited(&format!("{expr} has results"), &prom);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // The trip of drive_everything is what Prometheus sees.
    loop {
        let answer = prom.query(&client, "driftguard_guard_state").await;
        let state = &answer["data"]["result"][0]["value"][1];
        if state == "1" || state == "2" {
            break;
        }
        waited("driftguard_guard_state 1 or 2 (tripped, recovering)", &prom);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every alert rule loaded and evaluated on the real series without error.
    let n = alert_rules().len();
    loop {
        let answer = get(&client, &prom.url("/api/v1/rules"), &[]).await.json();
        let rules: Vec<Value> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert_eq!(rules.len(), n, "rules loaded: {answer}");
        let bad: Vec<&Value> = rules.iter().filter(|r| r["health"] == "err").collect();
        assert!(bad.is_empty(), "rules failing on real series: {bad:?}");
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        waited("every rule evaluated", &prom);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    for expr in dashboard_exprs(&dashboard()) {
        if expr.starts_with("label_values(") {
            continue;
        }
        let answer = prom.query(&client, &grafana_expr(&expr)).await;
        assert_eq!(
            answer["status"], "success",
            "dashboard query {expr}: {answer}"
        );
    }
    drop(prom);
}
