//! The `driftguard` command: parses the command line (clap) and calls the verb in `cmd`; nothing else
//! lives here, so every verb is library code the tests can reach.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use driftguard::cmd::{check, demo, eval, inject, operate};

/// jemalloc instead of glibc malloc. Under the soak's traffic the live heap stayed at 10-11 MB
/// (heaptrack) while glibc's RSS climbed by steps of 0.5-1.6 MB: its arenas held more and more freed
/// chunks (malloc_info: 2.3 -> 5.0 MB free inside them over three minutes, in use flat). The steps came
/// when the receipt store grew its file, which drops and refills redb's page cache (hundreds of 4 KiB
/// buffers) from whichever blocking thread runs the transaction. jemalloc purges freed pages to the OS
/// on a ~10 s decay, so the RSS follows the live heap (soak: +1.5 to +4.6 % instead of +12 to +21 %).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Config file used when neither `--config` nor `DRIFTGUARD_CONFIG` names one.
const DEFAULT_CONFIG: &str = "driftguard.toml";
/// Names the config file when `--config` does not.
const CONFIG_ENV: &str = "DRIFTGUARD_CONFIG";

#[derive(Parser)]
#[command(
    name = "driftguard",
    version,
    about = "Sidecar reverse proxy that guards a RAG / LLM service"
)]
struct Cli {
    /// Config file of the default verb `run` (env DRIFTGUARD_CONFIG) [default: driftguard.toml].
    // Not `global`: only `run`, `check` and `eval` read a config, and the other verbs must not accept
    // one silently. The env var is read by hand for a bare `driftguard`, so that it is not an error
    // for the verbs that ignore it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--config` of the verbs that read a config file.
#[derive(clap::Args)]
struct ConfigArg {
    /// Config file (TOML) [default: driftguard.toml].
    #[arg(long, short, env = CONFIG_ENV)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(ConfigArg),
    /// Validate the config file and print every error with its key path.
    Check(ConfigArg),
    /// Replay a gold set through a URL and report ΔS, coverage and λ per item and in total.
    Eval {
        /// The extractor and embedder to score with [default: ./driftguard.toml when present, else
        /// the built-in defaults].
        #[command(flatten)]
        config: ConfigArg,
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
        /// Exit 1 when the p95 of the retrieval probe ΔS(question, retrieved) is above this.
        #[arg(long)]
        max_retrieval_drift: Option<f64>,
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
        /// With `[fleet]`: the scope (e.g. a region) to roll back; the trip is refused unless the
        /// `--admin` replica judges that scope, so one scope is rolled back at a time.
        #[arg(long)]
        scope: Option<String>,
    },
    /// Declare recovery: unfreeze writes, lift the throttle, state healthy (traffic stays rolled back).
    Recover {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set one arm's routing weight, e.g. to send a canary traffic again after a trip took it to 0
    /// (kept over reloads and restarts).
    Weight {
        #[command(flatten)]
        admin: AdminArgs,
        /// The arm, as named in the config.
        arm: String,
        /// The new weight (0 takes the arm out of the split).
        weight: u32,
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
    /// Run N driftguard replicas as one fleet sharing a Redis (the load spreads over them; replica i
    /// listens on the given ports plus i): the fleet trips once and every replica flips together.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=20))]
    replicas: u16,
    /// The fleet's Redis for --replicas [default: a redis-server of the demo's own, from PATH, on a
    /// free port].
    #[arg(long, requires = "replicas")]
    redis_url: Option<String>,
}

/// Where the admin listener of the running driftguard is; the token comes from DRIFTGUARD_ADMIN_TOKEN.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin listener URL.
    #[arg(long, env = "DRIFTGUARD_ADMIN", default_value = operate::DEFAULT_ADMIN)]
    admin: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl AdminArgs {
    fn admin(&self) -> operate::Admin {
        operate::Admin {
            url: self.admin.clone(),
            timeout: self.timeout,
        }
    }
}

fn main() -> ExitCode {
    // The local embedder's matrix products then run on the (low-priority) evaluation thread that asks
    // for them instead of fanning out over every core; `signals.workers` is the knob for parallelism.
    // Set before any thread exists, as the environment must be.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or(Command::Run(ConfigArg { config: None }));
    // `driftguard --config FILE VERB`: the file belongs to the verb, and only some verbs read one.
    let (verb_config, verb) = match &command {
        Command::Run(c) | Command::Check(c) | Command::Eval { config: c, .. } => {
            (Some(c.config.clone()), "")
        }
        Command::Status { .. } => (None, "status"),
        Command::Trip { .. } => (None, "trip"),
        Command::Recover { .. } => (None, "recover"),
        Command::Weight { .. } => (None, "weight"),
        Command::Inject { .. } => (None, "inject"),
        Command::Demo(_) => (None, "demo"),
    };
    let config = match verb_config {
        Some(own) => own.or(cli.config),
        None if cli.config.is_some() => {
            eprintln!(
                "driftguard: `{verb}` reads no config file; --config is for run, check and eval"
            );
            return ExitCode::from(2);
        }
        None => None,
    };
    let config = config.or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
    let explicit = config.is_some();
    let config_path = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match command {
        Command::Run(_) => {
            if !explicit && !config_path.exists() {
                return no_config_here();
            }
            match driftguard::cmd::run::run(&config_path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("driftguard: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(_) => {
            if !explicit && !config_path.exists() {
                return no_config_here();
            }
            check::main(&config_path)
        }
        Command::Demo(args) => demo::main(&demo::Options {
            proxy_port: args.proxy_port,
            admin_port: args.admin_port,
            base_port: args.base_port,
            rps: args.rps,
            concurrency: args.concurrency,
            degrade_after: args.degrade_after,
            duration: args.duration,
            keep: args.keep,
            state_dir: args.state_dir,
            replicas: usize::from(args.replicas),
            redis_url: args.redis_url,
        }),
        Command::Status { admin, json } => operate::status(&admin.admin(), json),
        Command::Trip {
            admin,
            reason,
            arm,
            scope,
        } => operate::trip(&admin.admin(), &reason, arm.as_deref(), scope.as_deref()),
        Command::Recover { admin } => operate::recover(&admin.admin()),
        Command::Weight { admin, arm, weight } => operate::weight(&admin.admin(), &arm, weight),
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
            inject::main(&file, &opts)
        }
        Command::Eval {
            config: _,
            gold,
            url,
            json,
            max_delta_s,
            min_coverage,
            max_retrieval_drift,
            timeout,
        } => {
            let args = eval::Args {
                gold,
                url,
                json,
                limits: eval::Limits {
                    max_delta_s,
                    min_coverage,
                    max_retrieval_drift,
                },
                timeout,
            };
            eval::main(&config_path, explicit, &args)
        }
    }
}

/// A bare `driftguard` (or `check`) in a folder without `driftguard.toml`: where to go instead of a
/// file-not-found error. Exit 2: nothing was started.
fn no_config_here() -> ExitCode {
    eprintln!(
        "driftguard: no {DEFAULT_CONFIG} in this folder, and neither --config nor {CONFIG_ENV} names one.

  driftguard demo                  see it work: demo services, load, a bad canary rolled back
  driftguard run --config FILE     run the proxy with your config (the repository's
                                   deploy/driftguard.toml is an example with every section)
  driftguard check --config FILE   validate a config
  driftguard --help                every verb"
    );
    ExitCode::from(2)
}
