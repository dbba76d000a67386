//! The request path: accept, stamp pins, pass the guards, pick an arm, stream the exchange.

pub mod body;
pub mod context;
pub mod error;
pub mod handle;
pub mod headers;
pub mod listener;
pub mod pins;
pub mod router;
pub mod upload;
pub mod upstream;
