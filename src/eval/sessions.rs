//! Per-session memory for λ and tool loops, bounded in count and age: the workers ask it for the λ state
//! of a response and whether a session keeps making the same tool call.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use super::Scored;
use crate::signals::measure::{self, Lambda, SessionTools, ToolCall};

/// Per-session memory for λ and tool loops: bounded in count and age.
struct Session {
    last_delta_s: Option<f64>,
    tools: SessionTools,
    seen: Instant,
}

/// Sessions are keyed by a keyed hash of their id, so a client's long ids cost no memory here.
pub struct Sessions {
    /// Grows with the sessions seen, up to `capacity`: a large `signals.max_sessions` costs nothing
    /// up front (`LruCache::new` would reserve the whole table at start).
    map: Mutex<LruCache<u64, Session>>,
    capacity: usize,
    ttl: Duration,
    hasher: std::collections::hash_map::RandomState,
}

impl Sessions {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Sessions {
            map: Mutex::new(LruCache::unbounded()),
            capacity: capacity.max(1),
            ttl,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The λ state of this response: against the session's previous ΔS, or — without a session or on
    /// its first evaluated response — from the two-step series [qr, ra].
    pub(super) fn lambda(&self, session: Option<&str>, s: &Scored, now: Instant) -> Lambda {
        let two_step = measure::lambda(s.delta_s_qr, s.delta_s_ra);
        let Some(id) = session else {
            return two_step;
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.entry(&mut map, id, now);
        let lambda = state
            .last_delta_s
            .map_or(two_step, |previous| measure::lambda(previous, s.delta_s));
        state.last_delta_s = Some(s.delta_s);
        lambda
    }

    /// Whether a session has now made the same tool call in 3 consecutive responses.
    pub(super) fn tools(&self, session: Option<&str>, calls: &[ToolCall], now: Instant) -> bool {
        let Some(id) = session else {
            return false;
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        self.entry(&mut map, id, now).tools.observe(calls)
    }

    /// The live state of a session, started afresh when unknown or older than the TTL.
    fn entry<'m>(
        &self,
        map: &'m mut LruCache<u64, Session>,
        id: &str,
        now: Instant,
    ) -> &'m mut Session {
        let key = std::hash::BuildHasher::hash_one(&self.hasher, id);
        let stale = map
            .peek(&key)
            .is_some_and(|s| now.saturating_duration_since(s.seen) > self.ttl);
        if stale {
            map.pop(&key);
        }
        if map.len() >= self.capacity && !map.contains(&key) {
            map.pop_lru();
        }
        let state = map.get_or_insert_mut(key, || Session {
            last_delta_s: None,
            tools: SessionTools::default(),
            seen: now,
        });
        state.seen = now;
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_use_and_evicts_the_least_recent_past_capacity() {
        // A capacity of 10^12 reserves nothing at start.
        let huge = Sessions::new(1_000_000_000_000, Duration::from_secs(60));
        assert_eq!(huge.map.lock().unwrap().cap().get(), usize::MAX);
        let s = Sessions::new(2, Duration::from_secs(60));
        let now = Instant::now();
        for id in ["a", "b", "a", "c"] {
            s.tools(Some(id), &[], now);
        }
        let map = s.map.lock().unwrap();
        assert_eq!(map.len(), 2);
        let key = |id: &str| std::hash::BuildHasher::hash_one(&s.hasher, id);
        assert!(map.contains(&key("a")) && map.contains(&key("c")));
        assert!(!map.contains(&key("b")));
    }
}
