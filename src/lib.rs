//! driftguard: a sidecar reverse proxy that guards a RAG / LLM service (see SPEC.md).

pub mod admin;
pub mod app;
pub mod capture;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod error;
pub mod eval;
pub mod guards;
pub mod net;
pub mod rollback;
pub mod rules;
pub mod serve;
pub mod shutdown;
pub mod signals;
pub mod telemetry;
pub mod windows;
