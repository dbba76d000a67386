//! The rollback: the engine's state machine, its plan, the runtime state, snapshots and hooks.

pub mod engine;
pub mod hooks;
pub mod state;
