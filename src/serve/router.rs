//! Arm router: the routing table and the weighted, sticky choice of an arm per request (SPEC §6 "Arms").
//!
//! The table is one immutable value behind an `ArcSwap`. Every change — a weight set through the admin
//! API, a config reload — builds a whole new table and stores it with one pointer swap, so a request sees
//! either the old table or the new one, never half of each.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderName, HeaderValue};

use crate::config::{parse_upstream_url, Config};
use crate::eval::rate::EvalRate;
use crate::guards::breaker::{Breaker, BreakerSettings, HasBreaker};
use crate::guards::budget::BudgetPeek;
use crate::guards::fence::FenceSettings;
use crate::guards::freeze::WriteRoutes;
use crate::guards::Breakers;
use crate::serve::pins::{self, PinSet};
use crate::serve::upstream::{Pool, Pools};
use crate::telemetry::metrics::Metrics;
use crate::windows::ArmStats;

/// One upstream arm with everything the request path needs, prepared once.
pub struct Arm {
    pub name: String,
    pub upstream: String,
    pub authority: Authority,
    pub baseline: bool,
    pub pins: PinSet,
    pub cache_ns: String,
    /// `x-driftguard-arm` value.
    pub arm_header: HeaderValue,
    /// `x-cache-ns` value.
    pub cache_ns_header: HeaderValue,
    /// Host header for requests that arrive without one.
    pub host_header: HeaderValue,
    pub pool: Arc<Pool>,
    pub breaker: Breaker,
    pub stats: Arc<ArmStats>,
}

impl HasBreaker for Arm {
    #[inline]
    fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

/// Per-request settings from the config, swapped together with the arms.
#[derive(Debug, Clone)]
pub struct Settings {
    pub strict_pins: bool,
    pub request_timeout: Duration,
    /// Time a client has to send its request body (`listen.body_timeout`); never the arm's.
    pub body_timeout: Duration,
    /// Silence allowed in an upstream's response body (`upstream.body_idle_timeout`).
    pub body_idle_timeout: Duration,
    pub access_log: bool,
    /// Share of responses evaluated (`signals.sample`).
    pub sample: f64,
    /// Cap of each body copy (`signals.max_body_bytes`).
    pub max_body_bytes: usize,
    /// Header naming the session for the λ series.
    pub session_header: Option<HeaderName>,
    /// Which requests are writes (`writes.routes`).
    pub writes: WriteRoutes,
    /// How keyed writes are fenced (`[writes]`).
    pub fence: FenceSettings,
    /// Index of the arm that takes requests whose arm's breaker is open (`breaker.degrade_target`).
    pub degrade_target: Option<usize>,
    /// With a `[budget]`: how many request bytes to read ahead, and the completion tokens to reserve
    /// when the request names none.
    pub budget: Option<BudgetPeek>,
    /// `signals.max_evals_per_sec` above 0: the bucket each sampled request takes a token from.
    pub eval_rate: Option<Arc<EvalRate>>,
}

/// The levers operators and the rollback engine pull at run time. They live in the table so a change is
/// one swap like any other, and survive reloads (the app re-applies them).
#[derive(Debug, Clone, Default)]
pub struct Controls {
    /// Writes (`writes.routes`) get 503 while set.
    pub frozen: bool,
    /// Degrade mode: `x-driftguard-degrade` stamped with these directives while on.
    pub degrade: Option<HeaderValue>,
    /// Named flags, stamped as `x-driftguard-flags: a=on,b=off`.
    pub flags: std::collections::BTreeMap<String, bool>,
    flags_header: Option<HeaderValue>,
}

/// Most named flags kept; the header and the status document stay small.
pub const MAX_FLAGS: usize = 64;

impl Controls {
    pub fn new(
        frozen: bool,
        degrade: Option<HeaderValue>,
        flags: std::collections::BTreeMap<String, bool>,
    ) -> Self {
        let joined: Vec<String> = flags
            .iter()
            .map(|(k, v)| format!("{k}={}", if *v { "on" } else { "off" }))
            .collect();
        let flags_header = (!joined.is_empty())
            .then(|| HeaderValue::try_from(joined.join(",")).ok())
            .flatten();
        Controls {
            frozen,
            degrade,
            flags,
            flags_header,
        }
    }

    pub fn flags_header(&self) -> Option<&HeaderValue> {
        self.flags_header.as_ref()
    }
}

/// Flag names: 1–64 of `[A-Za-z0-9_.-]`, so they fit a header and a label.
pub fn is_flag_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Settings {
    /// Whether this request's exchange is copied for evaluation.
    #[inline]
    pub fn sampled(&self) -> bool {
        let drawn = self.sample >= 1.0 || (self.sample > 0.0 && fastrand::f64() < self.sample);
        drawn && self.eval_rate.as_ref().is_none_or(|rate| rate.admit())
    }
}

/// The routing table: arms, their weights, and the settings the request path reads.
pub struct RoutingTable {
    pub settings: Settings,
    pub controls: Controls,
    arms: Vec<Arc<Arm>>,
    weights: Vec<u32>,
    /// Running sums of `weights`, for the weighted pick.
    cumulative: Vec<u64>,
    sticky_header: Option<HeaderName>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("no arm named {0:?}")]
    UnknownArm(String),
    #[error("arm {arm:?}: {message}")]
    InvalidArm { arm: String, message: String },
}

/// What the rollback engine changed that goes into building arms: pins put back by the `alias` lever,
/// the cache namespace epoch (`rotate_cache`) and the throttle's breaker factor.
#[derive(Debug, Default, Clone, Copy)]
pub struct Overrides<'a> {
    pub pins: Option<&'a BTreeMap<String, BTreeMap<String, String>>>,
    pub cache_epoch: u64,
    /// Breaker thresholds × this factor while the rollback throttle is on.
    pub throttle: Option<f64>,
}

impl RoutingTable {
    /// Builds the table for a validated config. `env` holds the `DRIFTGUARD_PIN_*` pins.
    pub fn from_config(
        config: &Config,
        env: &BTreeMap<String, String>,
        overrides: Overrides<'_>,
        metrics: &Metrics,
        pools: &Pools,
        breakers: &Breakers,
    ) -> Result<RoutingTable, RouterError> {
        let mut arms = Vec::with_capacity(config.arms.len());
        for a in &config.arms {
            let invalid = |message: String| RouterError::InvalidArm {
                arm: a.name.clone(),
                message,
            };
            let target = parse_upstream_url(&a.upstream).map_err(invalid)?;
            let authority = target.authority.clone();
            let mut pin_map = pins::resolve(&config.pins, &a.pins, env);
            if let Some(put_back) = overrides.pins.and_then(|p| p.get(&a.name)) {
                pin_map.extend(put_back.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            let cache_ns =
                pins::cache_namespace(&pin_map, &config.cache.key_pins, overrides.cache_epoch);
            let breaker = BreakerSettings::from(&config.breaker);
            let breaker = overrides
                .throttle
                .map_or(breaker, |factor| breaker.tightened(factor));
            arms.push(Arc::new(Arm {
                arm_header: HeaderValue::from_str(&a.name).map_err(|e| invalid(e.to_string()))?,
                cache_ns_header: HeaderValue::from_str(&cache_ns)
                    .map_err(|e| invalid(e.to_string()))?,
                host_header: HeaderValue::from_str(authority.as_str())
                    .map_err(|e| invalid(e.to_string()))?,
                pool: pools.get(&target),
                breaker: breakers.get(&a.name, breaker),
                name: a.name.clone(),
                // Shown in error bodies, logs and /status: never with credentials.
                upstream: crate::config::redact_userinfo(&a.upstream).into_owned(),
                authority,
                baseline: a.baseline,
                pins: PinSet::new(pin_map),
                cache_ns,
                stats: metrics.arms.arm(&a.name),
            }));
        }
        let sticky_header = match config.routing.sticky_header.as_str() {
            "" => None,
            h => Some(
                HeaderName::try_from(h).map_err(|e| RouterError::InvalidArm {
                    arm: String::new(),
                    message: e.to_string(),
                })?,
            ),
        };
        let settings = Settings {
            strict_pins: config.strict_pins,
            request_timeout: config.upstream.request_timeout.0,
            body_timeout: config.listen.body_timeout.0,
            body_idle_timeout: config.upstream.body_idle_timeout.0,
            access_log: config.log.access,
            sample: config.signals.sample,
            max_body_bytes: config.signals.max_body_bytes,
            session_header: HeaderName::try_from(&config.signals.session_header).ok(),
            writes: WriteRoutes::new(&config.writes),
            degrade_target: config
                .arms
                .iter()
                .position(|a| a.name == config.breaker.degrade_target),
            fence: FenceSettings::from(&config.writes),
            budget: config.budget.as_ref().map(|b| BudgetPeek {
                peek_bytes: b.peek_bytes,
                default_completion_tokens: b.default_completion_tokens,
            }),
            eval_rate: (config.signals.max_evals_per_sec > 0.0).then(|| {
                Arc::new(EvalRate::new(
                    config.signals.max_evals_per_sec,
                    metrics
                        .eval_skipped
                        .with_label_values(&[crate::eval::RATE_LIMITED]),
                ))
            }),
        };
        Ok(RoutingTable::new(
            settings,
            Controls::default(),
            arms,
            config.arms.iter().map(|a| a.weight).collect(),
            sticky_header,
        ))
    }

    fn new(
        settings: Settings,
        controls: Controls,
        arms: Vec<Arc<Arm>>,
        weights: Vec<u32>,
        sticky_header: Option<HeaderName>,
    ) -> RoutingTable {
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, w| {
                *sum += u64::from(*w);
                Some(*sum)
            })
            .collect();
        RoutingTable {
            settings,
            controls,
            arms,
            weights,
            cumulative,
            sticky_header,
        }
    }

    /// A copy of this table with one arm's weight changed.
    pub fn with_weight(&self, arm: &str, weight: u32) -> Result<RoutingTable, RouterError> {
        let i = self
            .index_of(arm)
            .ok_or_else(|| RouterError::UnknownArm(arm.to_string()))?;
        let mut weights = self.weights.clone();
        weights[i] = weight;
        Ok(RoutingTable::new(
            self.settings.clone(),
            self.controls.clone(),
            self.arms.clone(),
            weights,
            self.sticky_header.clone(),
        ))
    }

    /// A copy of this table with other controls.
    pub fn with_controls(&self, controls: Controls) -> RoutingTable {
        RoutingTable::new(
            self.settings.clone(),
            controls,
            self.arms.clone(),
            self.weights.clone(),
            self.sticky_header.clone(),
        )
    }

    pub fn arms(&self) -> &[Arc<Arm>] {
        &self.arms
    }

    pub fn weights(&self) -> &[u32] {
        &self.weights
    }

    /// The baseline arm of the rules: the one marked `baseline = true`, else the first.
    pub fn baseline_index(&self) -> Option<usize> {
        self.arms
            .iter()
            .position(|a| a.baseline)
            .or((!self.arms.is_empty()).then_some(0))
    }

    pub fn index_of(&self, arm: &str) -> Option<usize> {
        self.arms.iter().position(|a| a.name == arm)
    }

    pub fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    pub fn sticky_header(&self) -> Option<&HeaderName> {
        self.sticky_header.as_ref()
    }

    /// Picks an arm: by the hash of the sticky value when there is one (same value, same arm while the
    /// weights stay), else at random by weight. `None` when every weight is 0.
    pub fn pick(&self, sticky: Option<&[u8]>) -> Option<&Arc<Arm>> {
        let total = self.total_weight();
        if total == 0 {
            return None;
        }
        let point = match sticky {
            Some(value) => sticky_hash(value) % total,
            None => fastrand::u64(..total),
        };
        let i = self.cumulative.partition_point(|&c| c <= point);
        self.arms.get(i)
    }
}

/// A fixed, platform-independent hash (FNV-1a 64) so a user maps to the same point in every replica.
fn sticky_hash(value: &[u8]) -> u64 {
    let mut h = Fnv1a(0xcbf2_9ce4_8422_2325);
    h.write(value);
    // FNV's low bits mix poorly for short keys; finish with a murmur3-style avalanche.
    let mut x = h.finish();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

struct Fnv1a(u64);

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(weights: &[u32]) -> RoutingTable {
        let mut text = String::new();
        for (i, w) in weights.iter().enumerate() {
            text.push_str(&format!(
                "[[arms]]\nname = \"a{i}\"\nupstream = \"http://127.0.0.1:{}\"\nweight = {w}\n",
                8000 + i
            ));
        }
        text.push_str("[routing]\nsticky_header = \"x-user-id\"\n");
        let config = Config::parse(&text).expect("valid test config");
        RoutingTable::from_config(
            &config,
            &BTreeMap::new(),
            Overrides::default(),
            &Metrics::new(),
            &Pools::new((&config.upstream).into()),
            &Breakers::default(),
        )
        .expect("table")
    }

    #[test]
    fn random_split_follows_weights() {
        let t = table(&[90, 10]);
        let n = 100_000;
        let canary = (0..n)
            .filter(|_| t.pick(None).map(|a| a.name.as_str()) == Some("a1"))
            .count();
        let share = canary as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.01, "canary share {share}");
    }

    #[test]
    fn zero_weight_arm_gets_nothing() {
        let t = table(&[1, 0]);
        assert!((0..1000).all(|i| t.pick(Some(format!("u{i}").as_bytes())).unwrap().name == "a0"));
        assert!(table(&[1, 0])
            .with_weight("a0", 0)
            .unwrap()
            .pick(None)
            .is_none());
    }

    #[test]
    fn sticky_users_stay_and_spread() {
        let t = table(&[50, 50]);
        let mut on_a1 = 0;
        for i in 0..2000 {
            let user = format!("user-{i}");
            let first = t.pick(Some(user.as_bytes())).unwrap().name.clone();
            for _ in 0..5 {
                assert_eq!(t.pick(Some(user.as_bytes())).unwrap().name, first);
            }
            on_a1 += usize::from(first == "a1");
        }
        assert!((800..1200).contains(&on_a1), "{on_a1} of 2000 users on a1");
    }

    #[test]
    fn with_weight_changes_one_arm() {
        let t = table(&[95, 5]).with_weight("a1", 0).unwrap();
        assert_eq!(t.weights(), &[95, 0]);
        assert!(matches!(
            t.with_weight("nope", 1),
            Err(RouterError::UnknownArm(_))
        ));
    }
}
