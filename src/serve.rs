//! The request path: accept, stamp pins, pass the guards, pick an arm, stream the exchange.

pub mod context;
pub mod handle;
pub mod listener;
pub mod pins;
pub mod router;
pub mod upstream;
