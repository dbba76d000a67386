//! The `driftguard` command: parses the CLI and calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use driftguard::config::{BudgetBackend, Config, OnBackendError};
use driftguard::signals::gold;

/// Config file used when neither `--config` nor `DRIFTGUARD_CONFIG` names one.
const DEFAULT_CONFIG: &str = "driftguard.toml";

#[derive(Parser)]
#[command(
    name = "driftguard",
    version,
    about = "Sidecar reverse proxy that guards a RAG / LLM service"
)]
struct Cli {
    /// Config file (TOML) [default: driftguard.toml].
    #[arg(long, short, global = true, env = "DRIFTGUARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config file and print every error with its key path.
    Check,
    /// Replay a gold set through a URL and report ΔS, coverage and λ per item and in total.
    Eval {
        /// JSON Lines: {"question": .., "anchor": .., "body": {..}} (body defaults to {"question": ..}).
        #[arg(long)]
        gold: PathBuf,
        /// Where to POST each item, e.g. http://127.0.0.1:9000/v1/ask (through the sidecar or direct).
        #[arg(long)]
        url: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 1 when the p95 ΔS over the items is above this.
        #[arg(long)]
        max_delta_s: Option<f64>,
        /// Exit 1 when the mean coverage is below this.
        #[arg(long)]
        min_coverage: Option<f64>,
        /// Per-item timeout, e.g. "30s".
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let explicit = cli.config.is_some();
    let config_path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => match driftguard::run(&config_path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("driftguard: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check => check(&config_path),
        Command::Eval {
            gold,
            url,
            json,
            max_delta_s,
            min_coverage,
            timeout,
        } => {
            // The gold audit scores with the configured extractor and embedder when there is a config.
            let signals = if explicit || config_path.exists() {
                match driftguard::app::load(&config_path) {
                    Ok(loaded) => loaded.config.signals,
                    Err(errors) => {
                        eprintln!("driftguard: {}:\n{errors}", config_path.display());
                        return ExitCode::from(2);
                    }
                }
            } else {
                Config::default().signals
            };
            let limits = gold::Limits {
                max_delta_s,
                min_coverage,
            };
            match gold::run(&gold, &url, &signals, &limits, timeout) {
                Ok(report) => {
                    if json {
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
    }
}

fn check(path: &Path) -> ExitCode {
    match driftguard::app::load(path) {
        Ok(loaded) => {
            let c = &loaded.config;
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
