//! The rollback: the engine's state machine, its plan, the one writer of the runtime state and the
//! routing table (control), the persisted state, snapshots and hooks.

pub mod control;
pub mod engine;
pub mod hooks;
pub mod plan;
pub mod snapshot;
pub mod state;
