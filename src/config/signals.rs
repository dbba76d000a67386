//! `[signals]`, `[signals.openai]`, `[signals.local]`: what the evaluation samples, where it finds the
//! question, passages and answer, and which embedder measures them (SPEC §3). Read by `eval` (sampling,
//! queue, workers) and `signals` (extractor, embedders).

use serde::Deserialize;

use super::dur::{secs, Dur};
use super::tls::Trust;
use super::{err, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    /// Hashed lexical vectors: no model, no network.
    Hashed,
    /// An OpenAI-compatible `/v1/embeddings` endpoint (`[signals.openai]`).
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
    /// Which embedder measures ΔS: "hashed", "openai" or "local".
    pub embedder: EmbedderKind,
    /// JSON pointer to the question in the request; empty means the default of SPEC §3.
    pub question: String,
    /// JSON pointer to the retrieved passages in the response (`*` matches every element); empty means
    /// the default of SPEC §3.
    pub retrieved: String,
    /// JSON pointer to the answer in the response; empty means the default of SPEC §3.
    pub answer: String,
    /// JSON pointer to the anchor text; empty means the default of SPEC §3.
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
    /// The endpoint of `embedder = "openai"`.
    pub openai: OpenAiEmbedder,
    /// The model of `embedder = "local"`.
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

/// `[signals.openai]`: the OpenAI-compatible embeddings endpoint of `embedder = "openai"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiEmbedder {
    /// `/v1/embeddings` endpoint, `http://` or `https://`.
    pub url: String,
    /// The `model` field sent with each request.
    pub model: String,
    /// Longest wait for one embeddings call.
    pub timeout: Dur,
    /// Env var holding an API key sent as `Authorization: Bearer`; empty for none.
    pub api_key_env: String,
    /// Embeddings cached by text hash.
    pub cache_entries: usize,
    /// PEM bundle of CAs the https endpoint may be signed by, on top of `[tls] ca_file`.
    pub ca_file: String,
    /// What its TLS connections trust (`[tls] ca_file` and `ca_file`); filled in by `Config::parse`.
    #[serde(skip)]
    pub trust: Trust,
}

impl Default for OpenAiEmbedder {
    fn default() -> Self {
        OpenAiEmbedder {
            url: "http://127.0.0.1:8081/v1/embeddings".into(),
            model: "bge-small-en-v1.5".into(),
            timeout: secs(2),
            api_key_env: String::new(),
            cache_entries: 10_000,
            ca_file: String::new(),
            trust: Trust::default(),
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

impl Signals {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        let s = self;
        if !(0.0..=1.0).contains(&s.sample) {
            errors.push(err("signals.sample", "must be between 0.0 and 1.0"));
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
            if let Some(problem) = pointer_problem(pointer) {
                errors.push(err(
                    key,
                    format!("{pointer:?} is not a JSON pointer: {problem}"),
                ));
            }
        }
        if s.embedder == EmbedderKind::Openai
            && !(s.openai.url.starts_with("http://") || s.openai.url.starts_with("https://"))
        {
            errors.push(err(
                "signals.openai.url",
                "an http:// or https:// URL is required for embedder = \"openai\"",
            ));
        }
        super::tls::check_ca_file("signals.openai.ca_file", &s.openai.ca_file, errors);
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
    }
}

/// Why `text` is no JSON pointer (RFC 6901 with `*` segments), or `None` when it is one; empty is the
/// whole document. The syntax check only: config sits below `signals`, which parses the same text into
/// `signals::extract::Pointer` with the same rules and the same problem texts.
pub fn pointer_problem(text: &str) -> Option<&'static str> {
    if text.is_empty() {
        return None;
    }
    let Some(rest) = text.strip_prefix('/') else {
        return Some("it must be empty or start with '/'");
    };
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Some("'~' must be followed by 0 or 1");
        }
    }
    None
}
