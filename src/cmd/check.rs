//! `driftguard check`: the config check report. It builds what `run` would build from the file (the
//! embedder too, so a missing model fails here and not at start), without listening.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{BudgetBackend, OnBackendError};

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
