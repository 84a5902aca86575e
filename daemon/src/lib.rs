//! ternd: the tern edge inference daemon, as a library so that tests, benches and the
//! binaries share one implementation. `main.rs` only parses arguments and wires these up.

// Linked in for its runtime, which tract finds by name ("cuda"): nothing calls it directly.
#[cfg(feature = "cuda")]
use tract_cuda as _;

pub mod chain;
pub mod config;
pub mod control;
pub mod ctl;
pub mod drift;
pub mod engine;
pub mod events;
pub mod feeds;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod local;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod registry;
pub mod relay;
pub mod service;
pub mod shadow;
pub mod store;
pub mod streams;
pub mod tasks;
pub mod tls;
pub mod update;

/// ternd's version, as reported by `ternd version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Crash-point injection for the kill -9 tests: when `TERN_CRASH_AT` names this point, the
/// process aborts here, as a power cut at exactly this instant would stop it; when it names
/// `<point>:hang`, the calling thread stops here forever, as a wedged driver or kernel call
/// would; `<point>:panic` panics here, as a bug would (the supervision tests). Unset
/// (always, outside tests) it costs one cached environment lookup.
pub fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(at) = AT
        .get_or_init(|| std::env::var("TERN_CRASH_AT").ok())
        .as_deref()
    else {
        return;
    };
    if at == name {
        eprintln!("ternd: TERN_CRASH_AT={name}: aborting here");
        std::process::abort();
    }
    if at.strip_suffix(":hang") == Some(name) {
        eprintln!("ternd: TERN_CRASH_AT={name}:hang: this thread stops here");
        loop {
            std::thread::park();
        }
    }
    if at.strip_suffix(":panic") == Some(name) {
        panic!("TERN_CRASH_AT={name}:panic");
    }
}
