//! Version pins (SPEC §2): which build, model, prompt and index produced an answer.
//!
//! Pins are resolved once per arm when the routing table is built (config `[pins]`, then `[arms.pins]`,
//! then `DRIFTGUARD_PIN_*` env) into ready-made header values, so stamping a request is a handful of
//! header inserts with no formatting.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::config::is_pin_name;

pub const PIN_HEADER_PREFIX: &str = "x-pin-";
pub const ENV_PREFIX: &str = "DRIFTGUARD_PIN_";

/// `INDEX_HASH` → `x-pin-index-hash`.
pub fn header_name(pin: &str) -> String {
    let mut s = String::with_capacity(PIN_HEADER_PREFIX.len() + pin.len());
    s.push_str(PIN_HEADER_PREFIX);
    s.extend(pin.chars().map(|c| {
        if c == '_' {
            '-'
        } else {
            c.to_ascii_lowercase()
        }
    }));
    s
}

/// `x-pin-index-hash` → `INDEX_HASH`; `None` for a header that is not a pin.
pub fn pin_name(header: &str) -> Option<String> {
    let rest = header.strip_prefix(PIN_HEADER_PREFIX)?;
    (!rest.is_empty()).then(|| {
        rest.chars()
            .map(|c| {
                if c == '-' {
                    '_'
                } else {
                    c.to_ascii_uppercase()
                }
            })
            .collect()
    })
}

/// `DRIFTGUARD_PIN_*` pins from an environment listing, invalid names skipped.
pub fn from_env(vars: impl Iterator<Item = (String, String)>) -> BTreeMap<String, String> {
    vars.filter_map(|(k, v)| {
        let name = k.strip_prefix(ENV_PREFIX)?;
        (is_pin_name(name) && HeaderValue::from_str(&v).is_ok()).then(|| (name.to_string(), v))
    })
    .collect()
}

/// The pins of one arm: global, then arm, then env — later wins.
pub fn resolve(
    global: &BTreeMap<String, String>,
    arm: &BTreeMap<String, String>,
    env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut pins = global.clone();
    pins.extend(arm.iter().map(|(k, v)| (k.clone(), v.clone())));
    pins.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    pins
}

/// Cache namespace: first 16 hex digits of sha256 over `NAME=value\n` for each key pin, in the configured
/// order (an absent pin hashes as an empty value), so any change of those pins rotates the namespace.
pub fn cache_namespace(pins: &BTreeMap<String, String>, key_pins: &[String], epoch: u64) -> String {
    let mut hasher = Sha256::new();
    if epoch > 0 {
        // Epoch 0 leaves the namespace a function of the pins alone, as before any rotation.
        hasher.update(format!("epoch={epoch}\n").as_bytes());
    }
    for name in key_pins {
        hasher.update(name.as_bytes());
        hasher.update(b"=");
        hasher.update(pins.get(name).map(String::as_bytes).unwrap_or_default());
        hasher.update(b"\n");
    }
    hex::encode(&hasher.finalize()[..8])
}

/// One stamped pin with its header form.
#[derive(Debug, Clone)]
pub struct Pin {
    pub name: String,
    pub header: HeaderName,
    pub value: HeaderValue,
}

/// An arm's resolved pins, ready to stamp.
#[derive(Debug, Clone)]
pub struct PinSet {
    pins: Vec<Pin>,
    map: BTreeMap<String, String>,
    /// The pins as a JSON object, for access-log lines.
    json: String,
}

/// A client-sent pin that differs from the stamped one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDiff {
    pub pin: String,
    pub expected: Option<String>,
    pub got: String,
}

impl PinSet {
    pub fn new(map: BTreeMap<String, String>) -> Self {
        let pins = map
            .iter()
            .filter_map(|(name, value)| {
                Some(Pin {
                    name: name.clone(),
                    header: HeaderName::try_from(header_name(name)).ok()?,
                    value: HeaderValue::from_str(value).ok()?,
                })
            })
            .collect();
        let json = serde_json::to_string(&map).unwrap_or_else(|_| "{}".into());
        PinSet { pins, map, json }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pin> {
        self.pins.iter()
    }

    pub fn len(&self) -> usize {
        self.pins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    pub fn map(&self) -> &BTreeMap<String, String> {
        &self.map
    }

    pub fn json(&self) -> &str {
        &self.json
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    /// Sets every pin header, replacing whatever values were there.
    pub fn stamp(&self, headers: &mut HeaderMap) {
        for pin in &self.pins {
            headers.insert(pin.header.clone(), pin.value.clone());
        }
    }

    /// Removes client-sent `x-pin-*` headers, returning those whose value differs from ours.
    /// Fast path: a request without pin headers costs one scan of its header names.
    pub fn strip_client_pins(&self, headers: &mut HeaderMap) -> Vec<PinDiff> {
        let mut diffs = Vec::new();
        let sent: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with(PIN_HEADER_PREFIX))
            .cloned()
            .collect();
        for name in sent {
            let Some(pin) = pin_name(name.as_str()) else {
                continue;
            };
            for got in headers.get_all(&name) {
                let got = String::from_utf8_lossy(got.as_bytes()).into_owned();
                let expected = self.get(&pin);
                if expected != Some(got.as_str()) {
                    diffs.push(PinDiff {
                        pin: pin.clone(),
                        expected: expected.map(String::from),
                        got,
                    });
                }
            }
            headers.remove(&name);
        }
        diffs.sort_by(|a, b| a.pin.cmp(&b.pin));
        diffs
    }

    /// Pins the upstream echoed back with a value that differs from the stamped one.
    pub fn echoed_mismatches<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> impl Iterator<Item = (usize, &'a Pin)> + 'a {
        self.pins
            .iter()
            .enumerate()
            .filter(move |(_, pin)| headers.get(&pin.header).is_some_and(|v| v != pin.value))
    }
}

/// JSON body of a strict-pins 409: `{"error":"pin_mismatch","diff":{"INDEX_HASH":{"expected":..,"got":..}}}`.
pub fn diff_json(diffs: &[PinDiff], request_id: &str) -> serde_json::Value {
    let diff: serde_json::Map<String, serde_json::Value> = diffs
        .iter()
        .map(|d| {
            (
                d.pin.clone(),
                serde_json::json!({"expected": d.expected, "got": d.got}),
            )
        })
        .collect();
    let names: Vec<&str> = diffs.iter().map(|d| d.pin.as_str()).collect();
    serde_json::json!({
        "error": "pin_mismatch",
        "message": format!("client pins differ from the stamped pins: {}", names.join(", ")),
        "request_id": request_id,
        "diff": diff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn header_names_round_trip() {
        assert_eq!(header_name("INDEX_HASH"), "x-pin-index-hash");
        assert_eq!(pin_name("x-pin-index-hash").as_deref(), Some("INDEX_HASH"));
        assert_eq!(pin_name("x-pin-"), None);
        assert_eq!(pin_name("x-other"), None);
    }

    #[test]
    fn later_sources_win() {
        let global = map(&[("BUILD_ID", "g"), ("MODEL_VER", "g")]);
        let arm = map(&[("MODEL_VER", "a"), ("INDEX_HASH", "a")]);
        let env = from_env(
            [
                ("DRIFTGUARD_PIN_INDEX_HASH", "e"),
                ("DRIFTGUARD_PIN_bad", "x"),
                ("OTHER", "y"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let pins = resolve(&global, &arm, &env);
        assert_eq!(
            pins,
            map(&[("BUILD_ID", "g"), ("MODEL_VER", "a"), ("INDEX_HASH", "e")])
        );
    }

    #[test]
    fn cache_namespace_follows_key_pins_only() {
        let keys = vec!["INDEX_HASH".to_string(), "MODEL_VER".to_string()];
        let a = cache_namespace(
            &map(&[("INDEX_HASH", "a1"), ("MODEL_VER", "m1"), ("BUILD_ID", "1")]),
            &keys,
            0,
        );
        let b = cache_namespace(
            &map(&[("INDEX_HASH", "a1"), ("MODEL_VER", "m1"), ("BUILD_ID", "2")]),
            &keys,
            0,
        );
        let c = cache_namespace(&map(&[("INDEX_HASH", "a2"), ("MODEL_VER", "m1")]), &keys, 0);
        assert_eq!(a.len(), 16);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // sha256("INDEX_HASH=a1\nMODEL_VER=m1\n"), first 8 bytes.
        let digest = Sha256::digest(b"INDEX_HASH=a1\nMODEL_VER=m1\n");
        assert_eq!(a, hex::encode(&digest[..8]));
        // A rotation moves every namespace.
        let rotated = cache_namespace(&map(&[("INDEX_HASH", "a1"), ("MODEL_VER", "m1")]), &keys, 1);
        assert_ne!(a, rotated);
    }

    #[test]
    fn client_pins_are_replaced_and_diffed() {
        let set = PinSet::new(map(&[("INDEX_HASH", "a1"), ("MODEL_VER", "m1")]));
        let mut headers = HeaderMap::new();
        headers.insert("x-pin-index-hash", HeaderValue::from_static("zz"));
        headers.insert("x-pin-model-ver", HeaderValue::from_static("m1"));
        headers.insert("x-pin-extra", HeaderValue::from_static("e"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        let diffs = set.strip_client_pins(&mut headers);
        assert_eq!(
            diffs,
            vec![
                PinDiff {
                    pin: "EXTRA".into(),
                    expected: None,
                    got: "e".into()
                },
                PinDiff {
                    pin: "INDEX_HASH".into(),
                    expected: Some("a1".into()),
                    got: "zz".into()
                },
            ]
        );
        assert_eq!(headers.len(), 1);
        set.stamp(&mut headers);
        assert_eq!(headers["x-pin-index-hash"], "a1");
        let body = diff_json(&diffs, "r1");
        assert_eq!(body["diff"]["INDEX_HASH"]["expected"], "a1");
        assert_eq!(body["diff"]["INDEX_HASH"]["got"], "zz");
    }
}
