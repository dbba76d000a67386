//! `driftguard check`: the config check report. It builds what `run` would build from the file (the
//! embedder too, so a missing model fails here and not at start), without listening.

use std::path::Path;
use std::process::ExitCode;

use std::time::Duration;

use crate::config::{BudgetBackend, Config, HookKind, OnBackendError, ReceiptStore, Trust};
use crate::net::tls::{self, TlsError};
use crate::net::Roots;

/// Longest wait for one target's TLS handshake.
const TLS_TIMEOUT: Duration = Duration::from_secs(3);

/// `driftguard check`: loads the config as `run` would, prints a summary or every error with its key
/// path; exit 1 on an error.
pub fn main(path: &Path) -> ExitCode {
    match crate::app::load(path) {
        Ok(loaded) => {
            let c = &loaded.config;
            // The embedder is built as `run` would build it: a local model is loaded and run once.
            let embedder = match crate::signals::embedder(&c.signals) {
                Ok(embedder) => embedder,
                Err(e) => {
                    eprintln!("{}: 1 error(s)", path.display());
                    eprintln!("  {e}");
                    return ExitCode::FAILURE;
                }
            };
            let tls_errors = verify_tls(c);
            if !tls_errors.is_empty() {
                eprintln!("{}: {} error(s)", path.display(), tls_errors.len());
                for e in &tls_errors {
                    eprintln!("  {e}");
                }
                return ExitCode::FAILURE;
            }
            let arms: Vec<String> = c
                .arms
                .iter()
                .map(|a| format!("{} (weight {})", a.name, a.weight))
                .collect();
            println!(
                "{}: ok — {} arm(s): {}",
                path.display(),
                c.arms.len(),
                arms.join(", ")
            );
            println!("signals: embedder {}", embedder.name());
            if let Some(b) = &c.budget {
                let backend = match b.backend {
                    BudgetBackend::Local => "local".to_string(),
                    BudgetBackend::Redis => format!(
                        "redis {} key {:?}, timeout {:?}, on_backend_error = {}",
                        redacted(&b.redis_url),
                        b.redis_key,
                        b.redis_timeout.0,
                        match b.on_backend_error {
                            OnBackendError::Open => "open",
                            OnBackendError::Closed => "closed",
                        }
                    ),
                };
                println!(
                    "budget: {} tokens/min, burst {}, backend {backend}",
                    b.tokens_per_minute, b.burst
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A URL without the credentials it may carry (`redis://:secret@host` → `redis://***@host`).
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Every TLS target of the config (https arms, webhooks, the openai endpoint; `rediss://` stores),
/// handshaken once with what it trusts. A certificate that does not verify is an error with the host
/// and the reason; a target that cannot be reached is only said, since `check` may run where the
/// targets are not.
fn verify_tls(c: &Config) -> Vec<String> {
    let mut targets: Vec<(String, String, &Trust)> = Vec::new();
    for (i, arm) in c.arms.iter().enumerate() {
        targets.push((
            format!("arms[{i}].upstream"),
            arm.upstream.clone(),
            &c.upstream.trust,
        ));
    }
    for (i, hook) in c.rollback.hooks.iter().enumerate() {
        if hook.kind == HookKind::Webhook {
            targets.push((
                format!("rollback.hooks[{i}].url"),
                hook.url.clone(),
                &hook.trust,
            ));
        }
    }
    if c.signals.embedder == crate::config::EmbedderKind::Openai {
        let o = &c.signals.openai;
        targets.push(("signals.openai.url".into(), o.url.clone(), &o.trust));
    }
    if let Some(b) = c
        .budget
        .as_ref()
        .filter(|b| b.backend == BudgetBackend::Redis)
    {
        targets.push(("budget.redis_url".into(), b.redis_url.clone(), &b.trust));
    }
    if c.writes.store == ReceiptStore::Redis && !c.writes.routes.is_empty() {
        let w = &c.writes;
        targets.push(("writes.redis_url".into(), w.redis_url.clone(), &w.trust));
    }
    if let Some(f) = &c.fleet {
        targets.push(("fleet.redis_url".into(), f.redis_url.clone(), &f.trust));
    }
    let mut errors = Vec::new();
    for (key, url, trust) in targets {
        let Some((host, port)) = tls_host(&url) else {
            continue;
        };
        let result =
            Roots::load(trust).and_then(|roots| tls::verify(&roots, &host, port, TLS_TIMEOUT));
        match result {
            Ok(()) => println!("tls: {key} {host}:{port}: certificate verified"),
            Err(e @ TlsError::Unreachable { .. }) => {
                println!("tls: {key}: not verified now ({e})")
            }
            Err(e) => errors.push(format!("{key}: {e}")),
        }
    }
    errors
}

/// Host and port of an `https://` or `rediss://` URL; `None` for a plain one.
fn tls_host(url: &str) -> Option<(String, u16)> {
    if url.starts_with("rediss://") {
        return tls::redis_host(url);
    }
    let uri: http::Uri = url.parse().ok()?;
    (uri.scheme_str() == Some("https")).then_some(())?;
    let host = uri.host()?.to_string();
    Some((host, uri.port_u16().unwrap_or(443)))
}
