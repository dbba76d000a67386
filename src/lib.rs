//! driftguard: a sidecar reverse proxy that guards a RAG / LLM service and rolls it back on its own when
//! quality or health goes bad.
//!
//! # Layout
//!
//! Folders are stages of the data path; a module uses only what sits below it (`tests/architecture.rs`
//! holds the table of allowed arrows). Top to bottom:
//!
//! - [`cmd`] — the CLI verbs: `run`, `check`, `status`/`trip`/`recover`, `eval --gold`, `inject`, `demo`.
//! - [`admin`] — the admin listener: routes, auth, the `/status` document, the `/metrics` rendering.
//! - [`app`] — the composition root: builds every part from the config, wires the handles, reloads.
//! - [`rollback`] — the engine's state machine, the plan (levers, throttle), `control` (the one writer
//!   of the runtime state and the routing table), snapshots and hooks.
//! - [`serve`] — the request path: listener, context, the stage order, pins, router, upstream pools,
//!   body streaming and tee, headers, proxy-made errors.
//! - [`guards`] — freeze, breaker, token budget (GCRA, Redis, admission), idempotency fence.
//! - [`eval`] — sampling, the bounded queue and the worker threads that turn a teed exchange into signals.
//! - [`signals`] — pure measures: extraction (JSON pointers, SSE), usage, embedders, ΔS, coverage, λ.
//! - [`rules`] — pure judgement: window summaries, hard and soft rules, exit targets, significance tests.
//! - [`telemetry`] — the Prometheus registry, OpenTelemetry tracing, the JSON log writer.
//! - [`windows`] — per-arm rings of slots; the one write API for a request's and an evaluation's outcome.
//! - [`net`] — the one outgoing HTTP client of every non-proxy caller.
//! - [`config`] — the TOML contract, one file per section, defaults and docs beside the fields.
//! - leaves: [`capture`] (capped body copies), [`clock`], [`error`] (error chains), [`shutdown`].

pub mod admin;
pub mod app;
pub mod capture;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod error;
pub mod eval;
pub mod fleet;
pub mod guards;
pub mod net;
pub mod rollback;
pub mod rules;
pub mod serve;
pub mod shutdown;
pub mod signals;
pub mod telemetry;
pub mod windows;
