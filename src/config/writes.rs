//! `[writes]`: which requests are writes (frozen on a trip) and how the idempotency fence keeps their
//! receipts (SPEC §5). Read by `guards::freeze` and `guards::fence`.

use serde::Deserialize;

use super::dur::{secs, Dur};
use super::tls::Trust;
use super::{err, ConfigError};

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
    /// "METHOD /path-prefix" entries classifying requests as writes (the freeze and the fence). A
    /// prefix matches at a segment boundary, on the path as an upstream may route it: percent-decoded,
    /// `;` parameters and trailing whitespace, control characters and dots of a segment dropped.
    pub routes: Vec<String>,
    /// Match `routes` case-sensitively; by default `/INGEST` is `/ingest` (as Express, ASP.NET and IIS
    /// route).
    pub case_sensitive: bool,
    /// A prefix followed by a dot suffix is a write too (`/ingest.json`, as Rails and Spring route).
    pub match_suffix: bool,
    /// Header carrying the idempotency key of a write; a write with it is fenced (executed once).
    pub idempotency_header: String,
    /// A write without the idempotency header gets 400 instead of passing unfenced.
    pub require_key: bool,
    /// How long a receipt replays after the write it records.
    pub ttl: Dur,
    /// Receipt store: "embedded" (default) or "redis". Restart-only.
    pub store: ReceiptStore,
    /// Redis for `store = "redis"` (`rediss://` for TLS). Restart-only.
    pub redis_url: String,
    /// Largest request body of a fenced write (it is read whole to be hashed); above it: 413.
    pub max_body_bytes: usize,
    /// Largest response body a receipt keeps; a longer one still reaches the first client, and its
    /// replays carry status and headers with an empty body (`idempotent-replay-body: omitted`).
    pub receipt_body_max: usize,
    /// What its TLS connections trust (`rediss://`: `[tls] ca_file`); filled in by `Config::parse`.
    #[serde(skip)]
    pub trust: Trust,
}

impl Default for Writes {
    fn default() -> Self {
        Writes {
            routes: Vec::new(),
            case_sensitive: false,
            match_suffix: true,
            idempotency_header: "idempotency-key".into(),
            require_key: false,
            ttl: secs(48 * 3600),
            store: ReceiptStore::Embedded,
            redis_url: "redis://127.0.0.1:6379".into(),
            trust: Trust::default(),
            max_body_bytes: 1 << 20,
            receipt_body_max: 1 << 20,
        }
    }
}

impl Writes {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        for (i, route) in self.routes.iter().enumerate() {
            if parse_write_route(route).is_none() {
                errors.push(err(
                    format!("writes.routes[{i}]"),
                    format!("{route:?} must look like \"POST /path-prefix\""),
                ));
            }
        }
        let w = self;
        if w.idempotency_header.is_empty()
            || http::HeaderName::try_from(&w.idempotency_header).is_err()
        {
            errors.push(err("writes.idempotency_header", "not a valid header name"));
        }
        if w.store == ReceiptStore::Redis {
            if let Err(e) = redis::Client::open(w.redis_url.as_str()) {
                errors.push(err(
                    "writes.redis_url",
                    format!("{:?} is not a redis:// or rediss:// URL: {e}", w.redis_url),
                ));
            }
        }
    }
}

/// Splits "POST /ingest" into its method and path prefix.
pub fn parse_write_route(route: &str) -> Option<(http::Method, String)> {
    let (method, path) = route.trim().split_once(' ')?;
    let method = http::Method::from_bytes(method.as_bytes()).ok()?;
    let path = path.trim();
    path.starts_with('/').then(|| (method, path.to_string()))
}
