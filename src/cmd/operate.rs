//! The `status`, `trip`, `recover` and `weight` verbs: the client side of the admin API, and how its answers are
//! printed. Called from main.rs; the admin listener itself is `crate::admin`.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};

use crate::app::ADMIN_TOKEN_ENV;
use crate::net;

/// Default admin listener address (SPEC §7), as seen from the same pod.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9901";

/// Largest admin response read.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Where the admin listener of the running driftguard is, and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Admin listener URL, e.g. [`DEFAULT_ADMIN`].
    pub url: String,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    #[error("--admin {0}")]
    Url(#[source] net::Error),
    #[error(transparent)]
    Net(#[from] net::Error),
}

/// `driftguard status [--json]`.
pub fn status(admin: &Admin, json: bool) -> ExitCode {
    print_call(admin, Method::GET, "/status", None, |doc| {
        if json {
            return serde_json::to_string_pretty(doc).unwrap_or_default();
        }
        status_text(doc)
    })
}

/// `driftguard trip --reason R [--arm A]`.
pub fn trip(admin: &Admin, reason: &str, arm: Option<&str>, scope: Option<&str>) -> ExitCode {
    let body = serde_json::json!({"reason": reason, "arm": arm, "scope": scope});
    print_call(admin, Method::POST, "/trip", Some(body), guard_text)
}

/// `driftguard recover`.
pub fn recover(admin: &Admin) -> ExitCode {
    print_call(admin, Method::POST, "/recover", None, guard_text)
}

/// `driftguard weight ARM N`: `POST /arms/<arm>/weight`, e.g. to send a canary traffic again after a
/// trip took its weight to 0 (nothing does that by itself: a person decides to retry).
pub fn weight(admin: &Admin, arm: &str, weight: u32) -> ExitCode {
    // Arm names are letters, digits, '-' and '_' (config/arms.rs); anything else could not be one and
    // would not make a URL path.
    if arm.is_empty()
        || !arm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        eprintln!("driftguard: {arm:?} is not an arm name (letters, digits, '-' and '_')");
        return ExitCode::FAILURE;
    }
    let body = serde_json::json!({ "weight": weight });
    print_call(
        admin,
        Method::POST,
        &format!("/arms/{arm}/weight"),
        Some(body),
        |doc| {
            format!(
                "arm {} weight {}",
                doc["arm"].as_str().unwrap_or(arm),
                doc["weight"]
            )
        },
    )
}

/// Calls `method path` on the admin listener at `admin` with an optional JSON body and the token from
/// `DRIFTGUARD_ADMIN_TOKEN` (if set). Returns the status and the body text.
pub fn call(
    admin: &Admin,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, String), OperateError> {
    let uri = net::url(&format!("{}{path}", admin.url.trim_end_matches('/')))
        .map_err(OperateError::Url)?;
    let mut req = Request::builder().method(method).uri(uri);
    if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV) {
        let token = token.trim();
        if !token.is_empty() {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
    }
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    if !bytes.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(bytes).map_err(net::Error::from)?;
    let client = net::Client::builder(admin.timeout)
        .max_response(MAX_RESPONSE)
        .build();
    let resp = net::Blocking::current_thread(client)?.send(req)?;
    let text = String::from_utf8_lossy(resp.body()).into_owned();
    Ok((resp.status().as_u16(), text))
}

/// Calls the admin API and prints the answer through `render`; exit 1 on a refusal, 2 when unreachable.
fn print_call(
    admin: &Admin,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    render: impl Fn(&serde_json::Value) -> String,
) -> ExitCode {
    match call(admin, method, path, body) {
        Ok((status, text)) => {
            let doc: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            if (200..300).contains(&status) {
                println!("{}", render(&doc));
                ExitCode::SUCCESS
            } else {
                let message = doc["message"].as_str().unwrap_or(text.trim());
                eprintln!("driftguard: {path} refused ({status}): {message}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("driftguard: {e}");
            ExitCode::from(2)
        }
    }
}

/// The guard part of a `/status`, `/trip` or `/recover` answer as a few lines.
fn guard_text(guard: &serde_json::Value) -> String {
    let mut out = format!("guard: {}", guard["state"].as_str().unwrap_or("?"));
    if let Some(trip) = guard["last_trip"].as_object() {
        let s = |k: &str| trip.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let probe = match s("probe") {
            "" => String::new(),
            probe => format!(" (probe {probe})"),
        };
        out.push_str(&format!(
            "\nlast trip: rule {}{probe} on arm {} — lever {} ({})",
            s("rule"),
            s("arm"),
            s("lever"),
            s("action")
        ));
        if let (Some(o), Some(t)) = (
            trip.get("observed").and_then(|v| v.as_f64()),
            trip.get("threshold").and_then(|v| v.as_f64()),
        ) {
            out.push_str(&format!("\n  observed {o:.4}, threshold {t}"));
        }
        if !s("reason").is_empty() {
            out.push_str(&format!("\n  reason: {}", s("reason")));
        }
        if !s("snapshot").is_empty() {
            out.push_str(&format!("\n  snapshot: {}", s("snapshot")));
        }
    }
    if let Some(hint) = guard["hint"].as_str() {
        out.push_str(&format!("\n{hint}"));
    }
    if let Some(targets) = guard["recovery"]["targets"].as_array() {
        for t in targets {
            out.push_str(&format!(
                "\n  target {}:{} {} (limit {}) {}",
                t["arm"].as_str().unwrap_or(""),
                t["name"].as_str().unwrap_or(""),
                t["value"],
                t["limit"],
                if t["ok"] == true { "ok" } else { "not met" }
            ));
        }
    }
    out
}

fn status_text(doc: &serde_json::Value) -> String {
    let mut out = guard_text(&doc["guard"]);
    out.push_str(&format!(
        "\nwrites frozen: {}",
        doc["frozen"].as_bool().unwrap_or(false)
    ));
    for arm in doc["arms"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\narm {} weight {}{} breaker {} — {} requests, error rate {:.4}",
            arm["name"].as_str().unwrap_or(""),
            arm["weight"],
            if arm["baseline"] == true {
                " (baseline)"
            } else {
                ""
            },
            arm["breaker"].as_str().unwrap_or(""),
            arm["window"]["requests"],
            arm["window"]["error_rate"].as_f64().unwrap_or(0.0),
        ));
    }
    out
}
