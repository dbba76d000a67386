//! The CLI verbs, one module each; main.rs parses the command line and calls them. They sit on top of
//! the crate and may use any of it.

pub mod check;
pub mod demo;
pub mod eval;
pub mod inject;
pub mod operate;
pub mod run;
