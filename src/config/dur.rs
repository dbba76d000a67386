//! The duration value every section uses: TOML has no duration type, so SPEC §7 writes them as strings
//! ("250ms", "10s", "15m", "48h"). Only config builds defaults from it (`secs`, `millis`).

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as "250ms", "10s", "15m", "48h".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write it like \"250ms\", \"10s\", \"15m\""
            ))
        })?;
        // Whatever a key's own range, no duration comes near the overflow of `Instant + Duration`.
        if d > super::MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {s:?} is longer than the 365 days any duration may be"
            )));
        }
        Ok(Dur(d))
    }
}

impl From<Dur> for Duration {
    fn from(d: Dur) -> Duration {
        d.0
    }
}

/// A default of whole seconds.
pub(super) const fn secs(s: u64) -> Dur {
    Dur(Duration::from_secs(s))
}

/// A default of milliseconds.
pub(super) const fn millis(ms: u64) -> Dur {
    Dur(Duration::from_millis(ms))
}
