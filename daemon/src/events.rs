//! What happens on the box, for listeners on the box (the D-Bus signals): pipelines, commands
//! and the updater say it here; `local` turns it into signals. Saying something nobody
//! listens to costs nothing, and a listener that falls behind loses the oldest news and is
//! told how much, so no producer ever waits for a listener.
//!
//! Standing state is not news: the active models are the registry's snapshot and the
//! daemon's summary is the service's, each a `watch` that listeners read when it changes.

use tokio::sync::broadcast;

/// News since the last read.
#[derive(Debug, Clone)]
pub enum LocalEvent {
    /// A pipeline stored a result (the same JSON as its MQTT message).
    Result { pipeline: String, json: String },
    /// A version of a model became the active one by a command or an update.
    ModelActivated { model: String, version: String },
    /// An update moved on.
    Update {
        model: String,
        version: String,
        state: String,
        percent: u32,
    },
}

/// News not yet read by this many slow listeners is dropped, oldest first.
const BACKLOG: usize = 256;

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct Events(broadcast::Sender<LocalEvent>);

impl Default for Events {
    fn default() -> Events {
        Events(broadcast::channel(BACKLOG).0)
    }
}

impl Events {
    pub fn send(&self, e: LocalEvent) {
        let _ = self.0.send(e);
    }

    /// Whether anyone listens: a producer may skip building news nobody reads.
    pub fn listened(&self) -> bool {
        self.0.receiver_count() > 0
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LocalEvent> {
        self.0.subscribe()
    }
}
