//! The `driftguard` command: parses the CLI and calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use driftguard::cmd::eval as gold;
use driftguard::cmd::inject;
use driftguard::cmd::{demo, operate as cli};
use driftguard::config::{BudgetBackend, Config, OnBackendError};

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
    /// Print the guard state, arms, weights and last trip from a running driftguard.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the whole /status JSON.
        #[arg(long)]
        json: bool,
    },
    /// Trip the guard by hand: run the rollback plan now.
    Trip {
        #[command(flatten)]
        admin: AdminArgs,
        /// Why (kept in the snapshot, the log and /status).
        #[arg(long)]
        reason: String,
        /// The arm to roll back [default: the first serving non-baseline arm].
        #[arg(long)]
        arm: Option<String>,
    },
    /// Declare recovery: unfreeze writes, lift the throttle, state healthy (traffic stays rolled back).
    Recover {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Add the driftguard sidecar to every Deployment and StatefulSet of a Kubernetes YAML stream
    /// (printed to stdout; injecting twice changes nothing).
    Inject {
        /// The YAML file, or "-" for stdin.
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// The sidecar image.
        #[arg(long, default_value_t = inject::Options::default().image)]
        image: String,
        /// The ConfigMap holding driftguard.toml (mounted read-only at /etc/driftguard).
        #[arg(long, default_value_t = inject::Options::default().config_map)]
        config_map: String,
        /// The app's Service-facing port name: the app port is renamed app-<name>, the sidecar's
        /// proxy port takes the name.
        #[arg(long, default_value_t = inject::Options::default().port_name)]
        port_name: String,
        /// The sidecar's proxy port (listen.proxy in the config).
        #[arg(long, default_value_t = inject::Options::default().proxy_port)]
        proxy_port: u16,
        /// The sidecar's admin port (listen.admin in the config).
        #[arg(long, default_value_t = inject::Options::default().admin_port)]
        admin_port: u16,
        /// The Secret whose key `token` becomes DRIFTGUARD_ADMIN_TOKEN (optional in the pod).
        #[arg(long, default_value_t = inject::Options::default().admin_secret)]
        admin_secret: String,
    },
    /// The whole loop on this machine: demo RAG arms, load, a canary going bad, the trip, the rollback,
    /// the recovery, with progress each second and a report. Exit 0 when a rule tripped on the bad
    /// canary, 1 when nothing did, 2 when it cannot start (a port taken, …).
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Proxy port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 9000)]
    proxy_port: u16,
    /// Admin port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// The baseline demo arm listens on this port, the canary on the next (0 = any free ports).
    #[arg(long, default_value_t = 0)]
    base_port: u16,
    /// Requests per second sent through the proxy.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=5000))]
    rps: u32,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// When the canary starts going bad, after the load starts.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    degrade_after: Duration,
    /// The longest the demo runs; it ends a few seconds after the trip.
    #[arg(long, default_value = "45s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Leave the proxy, admin API and demo arms running after the report, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Where the generated config, the log, the runtime state and the snapshots go (absent or empty)
    /// [default: a new folder under the temp dir].
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// Where the admin listener of the running driftguard is; the token comes from DRIFTGUARD_ADMIN_TOKEN.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin listener URL.
    #[arg(long, env = "DRIFTGUARD_ADMIN", default_value = cli::DEFAULT_ADMIN)]
    admin: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn main() -> ExitCode {
    // The local embedder's matrix products then run on the (low-priority) evaluation thread that asks
    // for them instead of fanning out over every core; `signals.workers` is the knob for parallelism.
    // Set before any thread exists, as the environment must be.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    let explicit = cli.config.is_some();
    let config_path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => match driftguard::cmd::run::run(&config_path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("driftguard: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check => check(&config_path),
        Command::Demo(args) => demo(args),
        Command::Status { admin, json } => {
            admin_call(&admin, http::Method::GET, "/status", None, |doc| {
                if json {
                    return serde_json::to_string_pretty(doc).unwrap_or_default();
                }
                status_text(doc)
            })
        }
        Command::Trip { admin, reason, arm } => admin_call(
            &admin,
            http::Method::POST,
            "/trip",
            Some(serde_json::json!({"reason": reason, "arm": arm})),
            guard_text,
        ),
        Command::Recover { admin } => {
            admin_call(&admin, http::Method::POST, "/recover", None, guard_text)
        }
        Command::Inject {
            file,
            image,
            config_map,
            port_name,
            proxy_port,
            admin_port,
            admin_secret,
        } => {
            let opts = inject::Options {
                image,
                config_map,
                port_name,
                proxy_port,
                admin_port,
                admin_secret,
            };
            run_inject(&file, &opts)
        }
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

fn demo(args: DemoArgs) -> ExitCode {
    let options = demo::Options {
        proxy_port: args.proxy_port,
        admin_port: args.admin_port,
        base_port: args.base_port,
        rps: args.rps,
        concurrency: args.concurrency,
        degrade_after: args.degrade_after,
        duration: args.duration,
        keep: args.keep,
        state_dir: args.state_dir,
    };
    match demo::run(&options) {
        Ok(demo::Outcome::Tripped) => ExitCode::SUCCESS,
        Ok(demo::Outcome::NotTripped) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("driftguard demo: {e}");
            ExitCode::from(2)
        }
    }
}

/// `driftguard inject`: the injected stream on stdout; exit 2 with the reason on anything it refuses.
fn run_inject(file: &Path, opts: &inject::Options) -> ExitCode {
    use std::io::{Read as _, Write as _};
    let mut input = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut input)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut input))
    };
    if let Err(e) = read {
        eprintln!("driftguard inject: cannot read {}: {e}", file.display());
        return ExitCode::from(2);
    }
    match inject::inject(&input, opts) {
        Ok(out) => match std::io::stdout().lock().write_all(out.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("driftguard inject: cannot write the output: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("driftguard inject: {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

/// Calls the admin API and prints the answer through `render`; exit 1 on a refusal, 2 when unreachable.
fn admin_call(
    admin: &AdminArgs,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
    render: impl Fn(&serde_json::Value) -> String,
) -> ExitCode {
    match cli::call(&admin.admin, method, path, body, admin.timeout) {
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
        out.push_str(&format!(
            "\nlast trip: rule {} on arm {} — lever {} ({})",
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

fn check(path: &Path) -> ExitCode {
    match driftguard::app::load(path) {
        Ok(loaded) => {
            let c = &loaded.config;
            // The embedder is built as `run` would build it: a local model is loaded and run once.
            let embedder = match driftguard::signals::embedder(&c.signals) {
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
