//! `[cache]`: which pins make up the cache namespace stamped as `x-cache-ns` (SPEC §2); read by
//! `serve::pins`.

use serde::Deserialize;

use super::arms::is_pin_name;
use super::{err, ConfigError};

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

impl Cache {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        for (i, pin) in self.key_pins.iter().enumerate() {
            if !is_pin_name(pin) {
                errors.push(err(
                    format!("cache.key_pins[{i}]"),
                    format!("{pin:?} is not an UPPER_SNAKE pin name"),
                ));
            }
        }
    }
}
