//! Configuration: the TOML file of SPEC §9, parsed into typed structs.
//!
//! Every section and key of the spec's example lives here with its default beside it. Unknown keys are
//! errors. [`Config::parse`] reports *every* error it can find, each with the key path it belongs to, so
//! `driftguard check` can print them all at once instead of one per edit-and-retry cycle.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// One configuration problem, located by its key path (`arms[1].upstream`, `rules.window`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// All problems found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// A duration written as "250ms", "10s", "15m", "48h".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write it like \"250ms\", \"10s\", \"15m\""
            ))
        })
    }
}

impl From<Dur> for Duration {
    fn from(d: Dur) -> Duration {
        d.0
    }
}

const fn secs(s: u64) -> Dur {
    Dur(Duration::from_secs(s))
}

const fn millis(ms: u64) -> Dur {
    Dur(Duration::from_millis(ms))
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for persistent state (baseline, guard state, receipts, snapshots).
    pub state_dir: PathBuf,
    /// A client-sent `x-pin-*` that differs from the stamped pin gets 409 with a JSON diff.
    pub strict_pins: bool,
    pub listen: Listen,
    pub runtime: Runtime,
    pub admin: Admin,
    /// Global pins, stamped for every arm (per-arm pins and `DRIFTGUARD_PIN_*` env override them).
    pub pins: BTreeMap<String, String>,
    pub arms: Vec<ArmConfig>,
    pub routing: Routing,
    pub upstream: Upstream,
    pub cache: Cache,
    pub signals: Signals,
    /// The global token budget; off unless the `[budget]` table is present.
    pub budget: Option<Budget>,
    pub breaker: Breaker,
    pub writes: Writes,
    pub rules: Rules,
    pub rollback: Rollback,
    pub recovery: Recovery,
    pub log: Log,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("./driftguard-state"),
            strict_pins: false,
            listen: Listen::default(),
            runtime: Runtime::default(),
            admin: Admin::default(),
            pins: BTreeMap::new(),
            arms: Vec::new(),
            routing: Routing::default(),
            upstream: Upstream::default(),
            cache: Cache::default(),
            signals: Signals::default(),
            budget: None,
            breaker: Breaker::default(),
            writes: Writes::default(),
            rules: Rules::default(),
            rollback: Rollback::default(),
            recovery: Recovery::default(),
            log: Log::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Address of the proxy listener (HTTP/1.1 and h2c).
    pub proxy: String,
    /// Address of the admin listener (/metrics, /status, mutating endpoints).
    pub admin: String,
    /// On SIGTERM/SIGINT, how long in-flight requests (streams included) may run before exit.
    pub drain_timeout: Dur,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            proxy: "0.0.0.0:9000".into(),
            admin: "0.0.0.0:9901".into(),
            drain_timeout: secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Tokio worker threads. 1 runs a single-threaded runtime, the usual choice for a one-core sidecar.
    pub workers: usize,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime { workers: 1 }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// File holding the bearer token for mutating admin endpoints; env `DRIFTGUARD_ADMIN_TOKEN` wins.
    /// With no token at all, only loopback peers may call them.
    pub token_file: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    /// Arm name, used in metrics labels, headers and admin paths.
    pub name: String,
    /// Upstream base URL, `http://host:port`.
    pub upstream: String,
    /// Relative share of traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The arm others are compared against.
    #[serde(default)]
    pub baseline: bool,
    /// Pins of this arm, over the global ones.
    #[serde(default)]
    pub pins: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    /// Request header whose value pins a user to one arm (empty: random split by weight).
    pub sticky_header: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// Time to establish a TCP connection to an upstream.
    pub connect_timeout: Dur,
    /// Time from sending the request until the upstream's response headers arrive.
    pub request_timeout: Dur,
    /// Idle keep-alive connections kept per upstream.
    pub pool_max_idle: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Dur,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            connect_timeout: secs(1),
            request_timeout: secs(30),
            pool_max_idle: 256,
            // Below the 5 s keep-alive of uvicorn and Node, so a pooled connection is dropped here
            // before the upstream closes it under a request in flight.
            pool_idle_timeout: secs(4),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    /// Pins hashed into the cache namespace stamped as `x-cache-ns`.
    pub key_pins: Vec<String>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            key_pins: ["INDEX_HASH", "PROMPT_VER", "RERANK_CONF", "MODEL_VER"]
                .map(String::from)
                .to_vec(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    Hashed,
    Openai,
    /// A sentence-transformers model folder run in process (`[signals.local]`; cargo feature
    /// `local-embedder`).
    Local,
}

impl EmbedderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EmbedderKind::Hashed => "hashed",
            EmbedderKind::Openai => "openai",
            EmbedderKind::Local => "local",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Signals {
    /// Share of responses evaluated, 0.0 to 1.0.
    pub sample: f64,
    /// Most bytes of each body copied for evaluation.
    pub max_body_bytes: usize,
    /// Bound of the evaluation queue; a full queue drops the sample.
    pub queue: usize,
    /// Evaluation worker threads.
    pub workers: usize,
    pub embedder: EmbedderKind,
    /// JSON pointers; empty means the defaults of SPEC §3.
    pub question: String,
    pub retrieved: String,
    pub answer: String,
    pub anchor: String,
    /// Header that groups requests into a session for the λ series.
    pub session_header: String,
    /// Sessions remembered for λ and tool loops (least recently seen evicted first).
    pub max_sessions: usize,
    /// A session not seen for this long starts over.
    pub session_ttl: Dur,
    /// Most bytes of body copies waiting in the queue; past it samples are dropped (counted).
    pub max_queue_bytes: usize,
    /// Most evaluations started per second (token bucket, one second of burst), applied after
    /// `sample`; 0 = unlimited. Samples over it are not copied and count as
    /// `eval_skipped_total{reason="rate_limited"}`.
    pub max_evals_per_sec: f64,
    pub openai: OpenAiEmbedder,
    pub local: LocalEmbedder,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            sample: 1.0,
            max_body_bytes: 1 << 20,
            queue: 4096,
            workers: 1,
            embedder: EmbedderKind::Hashed,
            question: String::new(),
            retrieved: String::new(),
            answer: String::new(),
            anchor: String::new(),
            session_header: "x-session-id".into(),
            max_sessions: 100_000,
            session_ttl: secs(30 * 60),
            max_queue_bytes: 32 << 20,
            max_evals_per_sec: 0.0,
            openai: OpenAiEmbedder::default(),
            local: LocalEmbedder::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiEmbedder {
    /// `/v1/embeddings` endpoint, plain http.
    pub url: String,
    pub model: String,
    pub timeout: Dur,
    /// Env var holding an API key sent as `Authorization: Bearer`; empty for none.
    pub api_key_env: String,
    /// Embeddings cached by text hash.
    pub cache_entries: usize,
}

impl Default for OpenAiEmbedder {
    fn default() -> Self {
        OpenAiEmbedder {
            url: "http://127.0.0.1:8081/v1/embeddings".into(),
            model: "bge-small-en-v1.5".into(),
            timeout: secs(2),
            api_key_env: String::new(),
            cache_entries: 10_000,
        }
    }
}

/// `[signals.local]`: the in-process sentence-embedding model of `embedder = "local"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalEmbedder {
    /// A sentence-transformers BERT model folder: `config.json`, `model.safetensors`, `tokenizer.json`,
    /// `1_Pooling/config.json`.
    pub model_dir: String,
    /// Tokens of each text fed to the model; longer texts are truncated.
    pub max_tokens: usize,
    /// Embeddings cached by text hash (0 = no cache).
    pub cache_entries: usize,
}

impl Default for LocalEmbedder {
    fn default() -> Self {
        LocalEmbedder {
            model_dir: String::new(),
            max_tokens: 256,
            cache_entries: 10_000,
        }
    }
}

/// Where the budget's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetBackend {
    /// In this process: each replica has a budget of its own.
    Local,
    /// In Redis at `redis_url`: every replica pointing at the same key shares one budget.
    Redis,
}

/// What the Redis budget decides while Redis is unreachable or slower than `redis_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    /// Admit the request unpriced: availability over the budget.
    Open,
    /// Refuse it with 503 `budget_unavailable`: the budget over availability.
    Closed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Steady refill rate of the budget.
    pub tokens_per_minute: u64,
    /// Most tokens admitted at once from a full budget; a request priced above it is refused for good.
    pub burst: u64,
    /// Completion tokens reserved for a request that names no `max_tokens`.
    pub default_completion_tokens: u64,
    /// "local" (per process) or "redis" (shared by every replica using the same `redis_url` and key).
    pub backend: BudgetBackend,
    /// The Redis server of `backend = "redis"`, e.g. "redis://127.0.0.1:6379" or "redis://:pw@host/2".
    pub redis_url: String,
    /// The Redis key holding the shared budget; replicas that share a budget use the same key.
    pub redis_key: String,
    /// Longest wait for one Redis call; slower counts as a backend error.
    pub redis_timeout: Dur,
    /// What `backend = "redis"` does while Redis fails: "open" admits, "closed" refuses with 503.
    pub on_backend_error: OnBackendError,
    /// Most request-body bytes read ahead to find `max_tokens` and estimate the prompt; a longer body
    /// is estimated from its Content-Length and streamed on.
    pub peek_bytes: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            tokens_per_minute: 200_000,
            burst: 20_000,
            default_completion_tokens: 256,
            backend: BudgetBackend::Local,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_key: "driftguard:budget".into(),
            redis_timeout: millis(50),
            on_backend_error: OnBackendError::Open,
            peek_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Breaker {
    pub window: Dur,
    pub failure_rate: f64,
    pub min_calls: u64,
    pub slow_call: Dur,
    pub slow_call_rate: f64,
    pub open_for: Dur,
    pub half_open_probes: u32,
    /// Arm that takes the requests of an arm whose breaker is open (SPEC §5 "route to the degrade
    /// target"); empty = fail fast with 503.
    pub degrade_target: String,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            window: secs(10),
            failure_rate: 0.5,
            min_calls: 20,
            slow_call: secs(5),
            slow_call_rate: 0.8,
            open_for: secs(10),
            half_open_probes: 5,
            degrade_target: String::new(),
        }
    }
}

/// Where idempotency receipts live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptStore {
    /// `state_dir/receipts.redb`, one process: survives restart and kill -9.
    Embedded,
    /// `writes.redis_url`, shared by every replica.
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Writes {
    /// "METHOD /path-prefix" entries classifying requests as writes.
    pub routes: Vec<String>,
    /// Header carrying the idempotency key of a write; a write with it is fenced (executed once).
    pub idempotency_header: String,
    /// A write without the idempotency header gets 400 instead of passing unfenced.
    pub require_key: bool,
    /// How long a receipt replays after the write it records.
    pub ttl: Dur,
    /// Receipt store: "embedded" (default) or "redis". Restart-only.
    pub store: ReceiptStore,
    /// Redis for `store = "redis"`. Restart-only.
    pub redis_url: String,
    /// Largest request body of a fenced write (it is read whole to be hashed); above it: 413.
    pub max_body_bytes: usize,
    /// Largest response body a receipt keeps; a longer one still reaches the first client, and its
    /// replays carry status and headers with an empty body (`idempotent-replay-body: omitted`).
    pub receipt_body_max: usize,
}

impl Default for Writes {
    fn default() -> Self {
        Writes {
            routes: Vec::new(),
            idempotency_header: "idempotency-key".into(),
            require_key: false,
            ttl: secs(48 * 3600),
            store: ReceiptStore::Embedded,
            redis_url: "redis://127.0.0.1:6379".into(),
            max_body_bytes: 1 << 20,
            receipt_body_max: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// Span of the rule window, merged from the newest window slots.
    pub window: Dur,
    pub eval_interval: Dur,
    pub min_samples: u64,
    pub dry_run: bool,
    pub latency_floor: Dur,
    pub confidence: f64,
    pub auto_baseline_after: Dur,
    pub hard: BTreeMap<String, f64>,
    pub soft: BTreeMap<String, f64>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            window: secs(60),
            eval_interval: secs(1),
            min_samples: 50,
            dry_run: false,
            latency_floor: millis(25),
            confidence: 0.999,
            auto_baseline_after: secs(15 * 60),
            hard: BTreeMap::new(),
            soft: BTreeMap::new(),
        }
    }
}

/// Rule keys of SPEC §6 accepted under `[rules.hard]`.
pub const HARD_RULE_KEYS: &[&str] = &[
    "delta_s_p95_drift_over",
    "delta_s_p50_drift_over",
    "coverage_under",
    "lambda_flip_rate_over",
    "error_rate_over",
    "rate_limited_over",
    "p99_latency_ratio_over",
    "pin_mismatch_over",
    "tool_loops_over",
    "duplicate_effects_over",
];

/// Rule keys accepted under `[rules.soft]`.
pub const SOFT_RULE_KEYS: &[&str] = &[
    "p95_latency_uplift_over",
    "p99_latency_uplift_over",
    "delta_s_p50_drift_over",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lever {
    Route,
    Alias,
    Flag,
    Degrade,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackStep {
    Capture,
    FreezeWrites,
    Lever,
    RotateCache,
    Throttle,
    Hooks,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rollback {
    pub steps: Vec<RollbackStep>,
    /// Fallback lever for a rule without an entry in `levers`.
    pub lever: Lever,
    /// Kill-switch flag turned off by lever `flag`.
    pub flag: String,
    /// Directives stamped as `x-driftguard-degrade` by lever `degrade`.
    pub degrade: String,
    pub throttle_factor: f64,
    /// Rule name → lever.
    pub levers: BTreeMap<String, Lever>,
    /// Last good pin values for lever `alias`.
    pub alias: BTreeMap<String, String>,
    pub hooks: Vec<Hook>,
}

impl Default for Rollback {
    fn default() -> Self {
        Rollback {
            steps: vec![
                RollbackStep::Capture,
                RollbackStep::FreezeWrites,
                RollbackStep::Lever,
                RollbackStep::RotateCache,
                RollbackStep::Throttle,
                RollbackStep::Hooks,
            ],
            lever: Lever::Route,
            flag: String::new(),
            degrade: "skip_rerank;k=3;cite_only".into(),
            throttle_factor: 0.5,
            levers: BTreeMap::new(),
            alias: BTreeMap::new(),
            hooks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    Exec,
    Webhook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookEvent {
    Tripped,
    Recovered,
    Escalated,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub name: String,
    pub kind: HookKind,
    /// argv for `exec` (no shell).
    #[serde(default)]
    pub command: Vec<String>,
    /// Target for `webhook`.
    #[serde(default)]
    pub url: String,
    /// Env var holding the HMAC secret for `webhook`.
    #[serde(default)]
    pub secret_env: String,
    #[serde(default = "default_hook_timeout")]
    pub timeout: Dur,
    #[serde(default)]
    pub retries: u32,
    #[serde(default = "default_hook_events")]
    pub on: Vec<HookEvent>,
}

fn default_hook_timeout() -> Dur {
    secs(10)
}

fn default_hook_events() -> Vec<HookEvent> {
    vec![
        HookEvent::Tripped,
        HookEvent::Recovered,
        HookEvent::Escalated,
    ]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recovery {
    pub hold: Dur,
    pub deadline: Dur,
    pub error_rate_under: f64,
    pub p95_latency_uplift_max: f64,
    pub tolerance: f64,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            hold: secs(600),
            deadline: secs(900),
            error_rate_under: 0.005,
            p95_latency_uplift_max: 0.15,
            tolerance: 0.03,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// One JSON line per proxied request on stdout.
    pub access: bool,
    /// Filter for operational logs (tracing `EnvFilter` syntax); env `RUST_LOG` wins.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            access: true,
            level: "info".into(),
        }
    }
}

// === impl Config ===

impl Config {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![err(
                "",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        Config::parse(&text)
    }

    /// Parses configuration text, returning every error found with its key path.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![err(
                "",
                format!("TOML syntax: {}", e.to_string().trim_end()),
            )])
        })?;
        let mut errors = Vec::new();
        // serde stops at the first error; to report all of them, record it, drop the offending key and try
        // again, until the rest deserializes.
        let config = loop {
            match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table.clone())) {
                Ok(config) => break Some(config),
                Err(e) => {
                    let path = e.path().to_string();
                    // toml appends "in `key`" on a second line; the path already says where.
                    let message = e
                        .inner()
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string();
                    let (path, message) = locate_unknown_field(path, message);
                    let repeated = errors.iter().any(|x: &ConfigError| x.path == path);
                    if !repeated {
                        errors.push(err(path.clone(), message));
                    }
                    if repeated || errors.len() > 100 || !remove_path(&mut table, &path) {
                        break None;
                    }
                }
            }
        };
        let Some(config) = config else {
            return Err(ConfigErrors(errors));
        };
        errors.extend(config.validate());
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Semantic checks that types alone cannot express.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        for (key, value) in [
            ("listen.proxy", &self.listen.proxy),
            ("listen.admin", &self.listen.admin),
        ] {
            if value.parse::<SocketAddr>().is_err() {
                errors.push(err(
                    key,
                    format!("{value:?} is not an address like \"0.0.0.0:9000\""),
                ));
            }
        }
        if self.runtime.workers == 0 {
            errors.push(err("runtime.workers", "must be at least 1"));
        }
        check_pins("pins", &self.pins, &mut errors);
        if self.arms.is_empty() {
            errors.push(err("arms", "at least one [[arms]] entry is required"));
        }
        let mut names = HashSet::new();
        for (i, arm) in self.arms.iter().enumerate() {
            let at = |k: &str| format!("arms[{i}].{k}");
            if arm.name.is_empty()
                || !arm
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                errors.push(err(
                    at("name"),
                    format!(
                        "{:?} must be non-empty and use only [A-Za-z0-9_-]",
                        arm.name
                    ),
                ));
            }
            if !names.insert(arm.name.as_str()) {
                errors.push(err(
                    at("name"),
                    format!("duplicate arm name {:?}", arm.name),
                ));
            }
            if let Err(e) = parse_upstream(&arm.upstream) {
                errors.push(err(at("upstream"), e));
            }
            check_pins(&at("pins"), &arm.pins, &mut errors);
        }
        if self.arms.iter().filter(|a| a.baseline).count() > 1 {
            errors.push(err("arms", "only one arm may have baseline = true"));
        }
        if !self.arms.is_empty() && self.arms.iter().all(|a| a.weight == 0) {
            errors.push(err("arms", "at least one arm needs a weight above 0"));
        }
        if !self.routing.sticky_header.is_empty()
            && http::HeaderName::try_from(&self.routing.sticky_header).is_err()
        {
            errors.push(err("routing.sticky_header", "not a valid header name"));
        }
        if self.upstream.connect_timeout.0.is_zero() {
            errors.push(err("upstream.connect_timeout", "must be above 0"));
        }
        if self.upstream.request_timeout.0.is_zero() {
            errors.push(err("upstream.request_timeout", "must be above 0"));
        }
        for (i, pin) in self.cache.key_pins.iter().enumerate() {
            if !is_pin_name(pin) {
                errors.push(err(
                    format!("cache.key_pins[{i}]"),
                    format!("{pin:?} is not an UPPER_SNAKE pin name"),
                ));
            }
        }
        let s = &self.signals;
        if !(0.0..=1.0).contains(&s.sample) {
            errors.push(err("signals.sample", "must be between 0.0 and 1.0"));
        }
        if s.queue == 0 {
            errors.push(err("signals.queue", "must be at least 1"));
        }
        if s.workers == 0 {
            errors.push(err("signals.workers", "must be at least 1"));
        }
        if http::HeaderName::try_from(&s.session_header).is_err() {
            errors.push(err("signals.session_header", "not a valid header name"));
        }
        for (key, pointer) in [
            ("signals.question", &s.question),
            ("signals.retrieved", &s.retrieved),
            ("signals.answer", &s.answer),
            ("signals.anchor", &s.anchor),
        ] {
            if !pointer.is_empty() {
                if let Err(e) = crate::signals::extract::Pointer::parse(pointer) {
                    errors.push(err(key, e.to_string()));
                }
            }
        }
        if s.embedder == EmbedderKind::Openai && !s.openai.url.starts_with("http://") {
            errors.push(err("signals.openai.url", "an http:// URL is required for embedder = \"openai\" (https is not supported; use a local endpoint or a TLS-terminating sidecar)"));
        }
        if !(s.max_evals_per_sec.is_finite() && s.max_evals_per_sec >= 0.0) {
            errors.push(err(
                "signals.max_evals_per_sec",
                "must be 0 (unlimited) or above",
            ));
        }
        if s.embedder == EmbedderKind::Local {
            if !cfg!(feature = "local-embedder") {
                errors.push(err("signals.embedder", "\"local\" needs a driftguard built with the cargo feature local-embedder (this build is the lean one)"));
            }
            if s.local.model_dir.is_empty() {
                errors.push(err(
                    "signals.local.model_dir",
                    "a model folder is required for embedder = \"local\"",
                ));
            }
        }
        if s.local.max_tokens == 0 || s.local.max_tokens > 8192 {
            errors.push(err(
                "signals.local.max_tokens",
                "must be between 1 and 8192 (and at most the model's max_position_embeddings)",
            ));
        }
        if s.max_sessions == 0 {
            errors.push(err("signals.max_sessions", "must be at least 1"));
        }
        if let Some(budget) = &self.budget {
            if budget.tokens_per_minute == 0 {
                errors.push(err("budget.tokens_per_minute", "must be above 0"));
            }
            if budget.burst == 0 {
                errors.push(err("budget.burst", "must be above 0"));
            }
            // Checked whatever the backend, so switching to "redis" later cannot surprise.
            if let Err(e) = redis::Client::open(budget.redis_url.as_str()) {
                errors.push(err(
                    "budget.redis_url",
                    format!("{:?} is not a Redis URL: {e}", budget.redis_url),
                ));
            }
            if budget.redis_key.is_empty() {
                errors.push(err("budget.redis_key", "must not be empty"));
            }
            if budget.redis_timeout.0.is_zero() {
                errors.push(err("budget.redis_timeout", "must be above 0"));
            }
            if budget.peek_bytes == 0 {
                errors.push(err("budget.peek_bytes", "must be above 0"));
            }
        }
        let target = &self.breaker.degrade_target;
        if !target.is_empty() && !self.arms.iter().any(|a| &a.name == target) {
            errors.push(err(
                "breaker.degrade_target",
                format!("no arm named {target:?}"),
            ));
        }
        for (key, v) in [
            ("breaker.failure_rate", self.breaker.failure_rate),
            ("breaker.slow_call_rate", self.breaker.slow_call_rate),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                errors.push(err(key, "must be in (0, 1]"));
            }
        }
        for (i, route) in self.writes.routes.iter().enumerate() {
            if parse_write_route(route).is_none() {
                errors.push(err(
                    format!("writes.routes[{i}]"),
                    format!("{route:?} must look like \"POST /path-prefix\""),
                ));
            }
        }
        let w = &self.writes;
        if w.idempotency_header.is_empty()
            || http::HeaderName::try_from(&w.idempotency_header).is_err()
        {
            errors.push(err("writes.idempotency_header", "not a valid header name"));
        }
        if w.ttl.0.is_zero() {
            errors.push(err("writes.ttl", "must be above 0"));
        }
        if w.max_body_bytes == 0 {
            errors.push(err("writes.max_body_bytes", "must be above 0"));
        }
        if w.store == ReceiptStore::Redis {
            if let Err(e) = redis::Client::open(w.redis_url.as_str()) {
                errors.push(err(
                    "writes.redis_url",
                    format!("{:?} is not a redis:// URL: {e}", w.redis_url),
                ));
            }
        }
        let r = &self.rules;
        if !(r.confidence > 0.0 && r.confidence < 1.0) {
            errors.push(err("rules.confidence", "must be in (0, 1)"));
        }
        if r.window.0 < Duration::from_secs(1) {
            errors.push(err("rules.window", "must be at least 1s"));
        }
        if r.window.0 > crate::windows::MAX_WINDOW {
            errors.push(err(
                "rules.window",
                format!(
                    "must be at most {}s, the span of the window ring",
                    crate::windows::MAX_WINDOW.as_secs()
                ),
            ));
        }
        for (table, keys, map) in [
            ("rules.hard", HARD_RULE_KEYS, &r.hard),
            ("rules.soft", SOFT_RULE_KEYS, &r.soft),
        ] {
            for (k, v) in map {
                if !keys.contains(&k.as_str()) {
                    errors.push(err(
                        format!("{table}.{k}"),
                        format!("unknown rule; known: {}", keys.join(", ")),
                    ));
                } else if !v.is_finite() || *v < 0.0 {
                    errors.push(err(format!("{table}.{k}"), "must be a non-negative number"));
                }
            }
        }
        let rb = &self.rollback;
        if !(rb.throttle_factor > 0.0 && rb.throttle_factor <= 1.0) {
            errors.push(err("rollback.throttle_factor", "must be in (0, 1]"));
        }
        if rb.lever == Lever::Flag && rb.flag.is_empty() {
            errors.push(err(
                "rollback.flag",
                "required when rollback.lever = \"flag\"",
            ));
        }
        let rule_names: Vec<&str> = HARD_RULE_KEYS.iter().map(|k| rule_name(k)).collect();
        for k in rb.levers.keys() {
            if !rule_names.contains(&k.as_str()) {
                errors.push(err(
                    format!("rollback.levers.{k}"),
                    format!("unknown rule; known: {}", rule_names.join(", ")),
                ));
            }
        }
        check_pins("rollback.alias", &rb.alias, &mut errors);
        for (i, hook) in rb.hooks.iter().enumerate() {
            let at = |k: &str| format!("rollback.hooks[{i}].{k}");
            if hook.name.is_empty() {
                errors.push(err(at("name"), "must not be empty"));
            }
            match hook.kind {
                HookKind::Exec if hook.command.is_empty() => {
                    errors.push(err(at("command"), "required for kind = \"exec\""))
                }
                // Hooks call a local agent or an in-cluster service; the client speaks plain HTTP.
                HookKind::Webhook if !hook.url.starts_with("http://") => errors.push(err(
                    at("url"),
                    "an http:// URL is required for kind = \"webhook\" (https is not supported; use an in-cluster http endpoint)",
                )),
                _ => {}
            }
        }
        errors
    }
}

/// A rule's name is its key without the `_over` / `_under` suffix.
pub fn rule_name(key: &str) -> &str {
    key.strip_suffix("_over")
        .or_else(|| key.strip_suffix("_under"))
        .unwrap_or(key)
}

/// Pin names are UPPER_SNAKE: `A-Z`, `0-9`, `_`, starting with a letter.
pub fn is_pin_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn check_pins(table: &str, pins: &BTreeMap<String, String>, errors: &mut Vec<ConfigError>) {
    for (name, value) in pins {
        if !is_pin_name(name) {
            errors.push(err(
                format!("{table}.{name}"),
                "pin names are UPPER_SNAKE (e.g. INDEX_HASH)",
            ));
        }
        if http::HeaderValue::from_str(value).is_err() {
            errors.push(err(
                format!("{table}.{name}"),
                "value must be printable ASCII (it becomes a header)",
            ));
        }
    }
}

/// Parses an upstream base URL into its authority (`host:port`); only plain `http://` is supported.
pub fn parse_upstream(url: &str) -> Result<http::uri::Authority, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// upstreams are supported"));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(format!("{url:?}: give the base URL without a path"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.port_u16().is_none() {
        return format!("{}:80", authority.host())
            .parse()
            .map_err(|e| format!("{url:?}: {e}"));
    }
    Ok(authority)
}

/// Splits "POST /ingest" into its method and path prefix.
pub fn parse_write_route(route: &str) -> Option<(http::Method, String)> {
    let (method, path) = route.trim().split_once(' ')?;
    let method = http::Method::from_bytes(method.as_bytes()).ok()?;
    let path = path.trim();
    path.starts_with('/').then(|| (method, path.to_string()))
}

/// serde_path_to_error locates an unknown key at its parent; move the path onto the key itself.
fn locate_unknown_field(path: String, message: String) -> (String, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, _)) = rest.split_once('`') {
            let full = if path.is_empty() || path == "." {
                field.to_string()
            } else if path.ends_with(field) {
                path
            } else {
                format!("{path}.{field}")
            };
            return (full, format!("unknown key {field:?}"));
        }
    }
    (if path == "." { String::new() } else { path }, message)
}

/// Removes the value at a serde_path_to_error path (`a.b[2].c`) so parsing can go on past it.
fn remove_path(table: &mut toml::Table, path: &str) -> bool {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_string()));
        }
        for idx in rest.split('[') {
            if let Ok(i) = idx.trim_end_matches(']').parse::<usize>() {
                segments.push(Segment::Index(i));
            }
        }
    }
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut value = toml::Value::Table(std::mem::take(table));
    let removed = {
        let mut cursor = Some(&mut value);
        for seg in parents {
            cursor = cursor.and_then(|v| match (seg, v) {
                (Segment::Key(k), toml::Value::Table(t)) => t.get_mut(k),
                (Segment::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
                _ => None,
            });
        }
        match (last, cursor) {
            (Segment::Key(k), Some(toml::Value::Table(t))) => t.remove(k).is_some(),
            (Segment::Index(i), Some(toml::Value::Array(a))) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        }
    };
    if let toml::Value::Table(t) = value {
        *table = t;
    }
    removed
}

enum Segment {
    Key(String),
    Index(usize),
}

#[cfg(test)]
mod tests;
