//! Sources of samples: each feed yields timestamped inputs on a bounded channel and never
//! runs a model itself.

pub mod directory;

use crate::engine::Input;

/// One input from a feed.
#[derive(Debug)]
pub struct Sample {
    /// Where it came from, e.g. the file name.
    pub source: String,
    /// When the feed took it, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub input: Result<Input, crate::engine::EngineError>,
    /// What to record once the result is stored, so a restart does not redo the sample.
    pub done: Option<directory::FileDone>,
}
