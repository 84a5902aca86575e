//! Sources of samples: each feed yields timestamped inputs into its pipeline's bounded queue
//! and never runs a model itself.
//!
//! ```text
//!  directory ─┐
//!  camera ────┤  Sample ─► gate (every_nth, max_fps) ─► queue (drop oldest | wait) ─► pipeline
//!  serial ────┤
//!  mqtt ──────┤
//!  audio ─────┘
//! ```
//!
//! A feed that fails (ffmpeg died or stalled, a port was unplugged, the broker went away)
//! restarts itself with back-off; the pipeline's state says `restarting` and why, and an
//! event goes upstream. Only cancellation ends a feed.

pub mod audio;
pub mod camera;
pub mod directory;
pub mod mqtt;
pub mod queue;
pub mod serial;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::engine::Input;
use crate::outbox::Outbox;
use crate::store::Store;

/// What a feed is doing, as `pipelines.list` and the status say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Starting,
    Running,
    /// Its source failed and is being restarted; why.
    Restarting(String),
    /// Not running; why (stopped by command, no model, a model it cannot feed).
    Stopped(String),
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Restarting(_) => "restarting",
            State::Stopped(_) => "stopped",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            State::Restarting(r) | State::Stopped(r) => Some(r),
            _ => None,
        }
    }
}

/// A feed's state and counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Samples dropped by a full queue (drop-oldest queues).
    pub dropped: AtomicU64,
    /// Samples let go by `every_nth` or `max_fps`.
    pub skipped: AtomicU64,
    /// Lines or messages the feed could not use.
    pub garbage: AtomicU64,
    /// Times the source failed and was restarted.
    pub restarts: AtomicU64,
    state: Mutex<State>,
}

impl FeedStats {
    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

/// One input from a feed.
#[derive(Debug)]
pub struct Sample {
    /// Where it came from, e.g. the file name, the camera, the topic.
    pub source: String,
    /// When the feed took it, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// When the feed took it, for the end-to-end latency.
    pub taken: Instant,
    pub data: Data,
    /// What to record once the result is stored, so a restart does not redo the sample.
    pub done: Option<directory::FileDone>,
}

#[derive(Debug)]
pub enum Data {
    /// An input for the model as it is (or why the sample cannot be one).
    Input(Result<Input, crate::engine::EngineError>),
    /// One reading: the values of the feed's fields, in their configured order.
    Reading(Vec<f32>),
    /// The next samples of a sound (mono, at the model's rate).
    Pcm(Vec<f32>),
    /// The source was (re)opened: readings before this do not continue into those after,
    /// so a window starts over.
    Restart,
}

impl Sample {
    pub fn new(source: String, data: Data) -> Sample {
        Sample {
            source,
            ts_ms: crate::store::now_ms(),
            taken: Instant::now(),
            data,
            done: None,
        }
    }
}

/// What every feed needs besides its own settings.
#[derive(Clone)]
pub struct FeedCtx {
    /// The name the feed's samples are taken for, in its log lines and events.
    pub pipeline: String,
    pub feed: String,
    pub stats: Arc<FeedStats>,
    pub store: Store,
    pub outbox: Option<Outbox>,
    pub cancel: CancellationToken,
}

pub const RETRY_MIN: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// A source that ran this long before failing was healthy: the back-off starts over.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Why one run of a feed ended.
pub enum Ended {
    /// Cancelled, or the pipeline is gone: stop for good.
    Stop,
    /// The source failed; restart it.
    Failed(String),
}

/// What a feed reads: one run of its source, from opening it to its end (a failure, or a
/// stop); [`run`] starts it again after each failure.
pub trait Source: Send + Sync + 'static {
    fn once(&self, ctx: &FeedCtx, tx: &queue::Sender) -> impl Future<Output = Ended> + Send;
}

/// Run a feed's source under `ctx`'s supervision until the pipeline stops.
pub async fn run<S: Source>(source: S, ctx: FeedCtx, tx: queue::Sender) {
    ctx.supervise(|| source.once(&ctx, &tx)).await
}

impl FeedCtx {
    /// Run `once` until it stops, restarting it with back-off after each failure: the
    /// pipeline says `restarting` with the reason, the log and an event say it too.
    pub async fn supervise<F, Fut>(&self, mut once: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Ended>,
    {
        let mut delay = RETRY_MIN;
        loop {
            let started = Instant::now();
            let why = tokio::select! {
                _ = self.cancel.cancelled() => return,
                e = once() => match e {
                    Ended::Stop => return,
                    Ended::Failed(why) => why,
                },
            };
            if started.elapsed() > HEALTHY_RUN {
                delay = RETRY_MIN;
            }
            self.failed(&why, delay).await;
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    async fn failed(&self, why: &str, retry_in: Duration) {
        use std::sync::atomic::Ordering;
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        let new = State::Restarting(why.to_string());
        // One event per new failure, not per retry: an unplugged camera would otherwise fill
        // the outbox with the same news, at the expense of results.
        let news = self.stats.state() != new;
        self.stats.set_state(new);
        tracing::warn!(pipeline = %self.pipeline, feed = %self.feed, reason = %why, retry_in = ?retry_in, "feed failed; restarting");
        if let Some(ob) = self.outbox.as_ref().filter(|_| news) {
            let body = serde_json::json!({
                "event": "feed.restarting",
                "pipeline": self.pipeline,
                "feed": self.feed,
                "reason": why,
                "retry_in_ms": retry_in.as_millis() as u64,
            });
            if let Err(e) = ob.send_event(&self.store, body).await {
                tracing::error!(error = %e, "event not queued");
            }
        }
    }

    /// The source delivers again.
    pub fn running(&self) {
        if !matches!(self.stats.state(), State::Running) {
            tracing::info!(pipeline = %self.pipeline, feed = %self.feed, "feed running");
            self.stats.set_state(State::Running);
        }
    }

    /// Count a sample the feed could not use; say so in the log now and then, not for every
    /// line a babbling sensor sends.
    pub fn garbage(&self, what: &str) {
        use std::sync::atomic::Ordering;
        let n = self.stats.garbage.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_multiple_of(100) {
            tracing::warn!(pipeline = %self.pipeline, feed = %self.feed, count = n, "skipped unusable input: {what}");
        }
    }
}
