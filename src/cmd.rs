//! The CLI verbs.

pub mod demo;
pub mod eval;
pub mod inject;
pub mod operate;
pub mod run;
