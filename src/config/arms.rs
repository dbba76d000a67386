//! `[pins]` and `[[arms]]`: the named upstreams and the version pins stamped on their requests (SPEC §2,
//! §6). Read by `serve::pins` and `serve::router`; `is_pin_name` is also the runtime check of
//! `DRIFTGUARD_PIN_*` names and `[rollback.alias]`.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::upstream::parse_upstream;
use super::{err, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    /// Arm name, used in metrics labels, headers and admin paths. Required.
    pub name: String,
    /// Upstream base URL, `http://host:port`. Required.
    pub upstream: String,
    /// Relative share of traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The arm others are compared against (else the first arm).
    #[serde(default)]
    pub baseline: bool,
    /// Pins of this arm, over the global ones (none by default).
    #[serde(default)]
    pub pins: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    1
}

/// Pin names are UPPER_SNAKE: `A-Z`, `0-9`, `_`, starting with a letter.
pub fn is_pin_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Checks a pin table (`pins`, `arms[i].pins`, `rollback.alias`): names and header-safe values.
pub(super) fn check_pins(
    table: &str,
    pins: &BTreeMap<String, String>,
    errors: &mut Vec<ConfigError>,
) {
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

/// The `[[arms]]` list: at least one, unique well-formed names, http upstreams, one baseline at most,
/// some weight somewhere.
pub(super) fn validate_arms(arms: &[ArmConfig], errors: &mut Vec<ConfigError>) {
    if arms.is_empty() {
        errors.push(err("arms", "at least one [[arms]] entry is required"));
    }
    let mut names = HashSet::new();
    for (i, arm) in arms.iter().enumerate() {
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
        check_pins(&at("pins"), &arm.pins, errors);
    }
    if arms.iter().filter(|a| a.baseline).count() > 1 {
        errors.push(err("arms", "only one arm may have baseline = true"));
    }
    if !arms.is_empty() && arms.iter().all(|a| a.weight == 0) {
        errors.push(err("arms", "at least one arm needs a weight above 0"));
    }
}
