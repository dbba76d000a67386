//! Guards (SPEC §5): protect the service while it is unhealthy.

pub mod breaker;
pub mod freeze;
