//! Guards (SPEC §5): protect the service while it is unhealthy.

pub mod breaker;
pub mod budget;
pub mod fence;
pub mod freeze;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use breaker::{Breaker, BreakerSettings};

/// One breaker per arm name, kept across reloads (a reload changes its settings, not its state).
#[derive(Default)]
pub struct Breakers {
    map: Mutex<HashMap<String, Breaker>>,
}

impl Breakers {
    /// The breaker of an arm, created on first use; an existing one takes `settings`.
    pub fn get(&self, arm: &str, settings: BreakerSettings) -> Breaker {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(arm) {
            Some(b) => {
                b.set_settings(settings);
                b.clone()
            }
            None => {
                let b = Breaker::new(settings, Instant::now());
                map.insert(arm.to_string(), b.clone());
                b
            }
        }
    }
}
