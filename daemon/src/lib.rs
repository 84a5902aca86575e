//! ternd: the tern edge inference daemon, as a library so that tests, benches and the
//! binaries share one implementation. `main.rs` only parses arguments and wires these up.

pub mod config;
pub mod engine;
pub mod feeds;
pub mod pipeline;
pub mod registry;
pub mod service;
pub mod store;

/// ternd's version, as reported by `ternd version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
