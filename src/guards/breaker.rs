//! Circuit breaker per arm (SPEC §5).
