//! Binds a feed to a model and to sinks: the results table, the outbox, D-Bus signals and
//! the capture store.
//!
//! ```text
//!  feed task ─► gate ─► queue (drop oldest | wait) ─► pipeline task ─► window ─► model pool
//!                                                        │   (up to 2×workers+2 in flight;
//!                                                        │    1 for directories)
//!                                                        └─► in order, what finished together
//!                                                            in one transaction: results +
//!                                                            outbox + captures + "file done"
//! ```
//!
//! Fair sharing: a pipeline never has more than [`in_flight`] requests in its model's queue,
//! which leaves room in the queue for every pipeline's at once (as long as the queue is at
//! least as long as the model has pipelines), and the queue is first come,
//! first served, so pipelines sharing a model take turns: a camera that always has a frame
//! ready cannot starve a sensor.
//!
//! Stopping: the feed stops on cancellation and drops its sender; the pipeline finishes the
//! samples already queued and ends, so a SIGTERM drains instead of dropping work.

use crate::config::OnFull;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{FeedConfig, PipelineConfig, Publish};
use crate::engine::{
    Data as ArrayData, EngineError, Input, Latencies, ModelPool, PixelFormat, Prediction,
};
use crate::events::{Events, LocalEvent};
use crate::feeds::camera::{CameraFeed, FrameSpec};
use crate::feeds::directory::{DirectoryFeed, FileDone, Outcome};
use crate::feeds::mqtt::MqttFeed;
use crate::feeds::queue::{self, Gate};
use crate::feeds::serial::SerialFeed;
use crate::feeds::{self, Data, FeedCtx, FeedStats, Sample};
use crate::outbox::{Class, Outbox};
use crate::store::{Keeper, Store};

pub use crate::feeds::State;

/// A pipeline's counters: its feed's and its own.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// The feed's state and counters (queue drops, thinning, garbage, restarts): the
    /// pipeline's state is its feed's.
    pub feed: Arc<FeedStats>,
    pub results: AtomicU64,
    pub errors: AtomicU64,
    pub published: AtomicU64,
    pub captured: AtomicU64,
    /// From the feed taking a sample to its result committed, µs.
    pub e2e: Latencies,
    /// The drift tracker's report, for a pipeline that watches drift.
    pub drift: std::sync::Mutex<Option<Value>>,
}

impl PipelineStats {
    pub fn state(&self) -> State {
        self.feed.state()
    }

    pub fn set_state(&self, s: State) {
        self.feed.set_state(s)
    }

    /// The counters and state as status and telemetry show them.
    pub fn json(&self) -> Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let state = self.state();
        let f = &self.feed;
        json!({
            "state": state.name(),
            "reason": state.reason(),
            "results": n(&self.results),
            "errors": n(&self.errors),
            "dropped": n(&f.dropped),
            "skipped": n(&f.skipped),
            "garbage": n(&f.garbage),
            "restarts": n(&f.restarts),
            "published": n(&self.published),
            "captured": n(&self.captured),
            "e2e_latency_us": self.e2e.quantiles(),
            "drift": self.drift(),
        })
    }

    /// The drift report, or null when drift is not watched.
    pub fn drift(&self) -> Value {
        self.drift
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(Value::Null)
    }
}

/// The sinks a pipeline writes to.
#[derive(Clone)]
pub struct Sinks {
    pub store: Store,
    pub outbox: Option<Outbox>,
    pub local: Option<Events>,
    pub keeper: Arc<Keeper>,
}

type Run = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A pipeline made and ready to run: its two tasks, for whoever supervises them, and the
/// token that stops it (the feed first, then the pipeline drains what is queued).
pub struct Running {
    pub cancel: CancellationToken,
    pub feed: Run,
    pub serve: Run,
}

/// Why a pipeline cannot start: the model cannot take what the feed gives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unfit(pub String);

/// Make a pipeline: its feed and the task that runs the model on each sample, to be run by
/// the caller. Fails, with the reason, if the model cannot take what the feed gives.
#[allow(clippy::too_many_arguments)]
pub fn build(
    cfg: &PipelineConfig,
    feed: &FeedConfig,
    pool: ModelPool,
    stages: Vec<ModelPool>,
    sinks: Sinks,
    stats: Arc<PipelineStats>,
    share: usize,
    cancel: CancellationToken,
) -> Result<Running, Unfit> {
    let manifest = pool.active().manifest.clone();
    let pc = pool.config();
    let chain = if cfg.stages.is_empty() {
        None
    } else {
        let stages = cfg.stages.iter().cloned().zip(stages).collect();
        let c = crate::chain::Chain::new(&manifest, stages, cfg.max_crops, cfg.crop_pad)
            .map_err(Unfit)?;
        Some(Arc::new(c))
    };
    let cap = if matches!(feed, FeedConfig::Directory { .. }) {
        // A file's attempt is counted when it is handed to the engine; one at a time, so a
        // file that crashes the engine never costs the files behind it an attempt.
        1
    } else {
        in_flight(pc.workers.get(), pc.queue.get(), share)
    };
    let mut streams = match feed.pcm() {
        None => None,
        Some((_, rate)) => {
            let w = crate::engine::Windower::for_model(&manifest, cfg.hop.map(|h| h.get()))
                .map_err(Unfit)?;
            if let Some(h) = cfg.hop
                && (h.get() > w.window() || h.get() * 16 < w.window())
            {
                return Err(Unfit(format!(
                    "hop {h} for model `{}`'s window of {} samples: give {} to {}",
                    manifest.name,
                    w.window(),
                    w.window().div_ceil(16),
                    w.window()
                )));
            }
            if let Some(r) = rate.filter(|r| *r != w.rate) {
                return Err(Unfit(format!(
                    "feed `{}` gives {r} samples a second, model `{}` takes {}",
                    feed.name(),
                    manifest.name,
                    w.rate
                )));
            }
            Some(crate::streams::Streams::new(
                crate::streams::Cutter::Pcm(w),
                cfg.stop_after_ms,
            ))
        }
    };
    // A model whose score outputs have a threshold says what matters by their flips: each
    // window of a stream is a result only if one flipped (speech started, stopped).
    let thresholded = manifest.outputs.iter().any(|o| {
        matches!(
            o.postprocess,
            crate::engine::Postprocess::Score {
                threshold: Some(_),
                ..
            }
        )
    });
    let fields = feed.fields().len();
    let mut shaper = None;
    if fields > 0 {
        let shape = manifest.sample_shape();
        let want: usize = shape.iter().product();
        let have = cfg.window.get() * fields;
        if want != have {
            return Err(Unfit(format!(
                "model `{}` takes {want} values ({shape:?}) but a window of {} readings of {fields} fields is {have}",
                manifest.name, cfg.window
            )));
        }
        let readings = crate::streams::Readings::new(cfg.window.get(), cfg.stride.get(), shape);
        if manifest.state.is_empty() && !thresholded {
            shaper = Some(crate::streams::PerSource::new(readings));
        } else {
            // State (or a score's on/off) goes from one window to the next of one source:
            // its readings are streams, never thinned, dropped or mixed with another's.
            if cfg.every_nth.get() > 1 || cfg.max_fps.is_some() || cfg.on_full == OnFull::DropOldest
            {
                return Err(Unfit(format!(
                    "model `{}` carries state from one window to the next: its readings are \
                     never thinned or dropped (every_nth, max_fps, on_full = \"drop_oldest\")",
                    manifest.name
                )));
            }
            streams = Some(crate::streams::Streams::new(
                crate::streams::Cutter::Readings(readings),
                cfg.stop_after_ms,
            ));
        }
    }
    let events_only = streams.is_some() && thresholded;
    // Drift reads top-1 labels and confidences: a model that gives neither (scores, raw
    // values, text) would only ever read `none`, never drift.
    if cfg.drift.is_some()
        && manifest.format >= 2
        && !manifest.outputs.iter().any(|o| {
            matches!(
                o.postprocess,
                crate::engine::Postprocess::Classify { .. }
                    | crate::engine::Postprocess::Detect { .. }
            )
        })
    {
        tracing::warn!(pipeline = %cfg.name, model = %manifest.name, "drift is watched, but the model has no classify or detect output: every answer reads as `none`, and never drifts");
    }
    let gate = Gate {
        every_nth: cfg.every_nth.get(),
        min_gap_ms: cfg.max_fps.map(|f| 1000.0 / f),
    };
    let (tx, rx) = queue::bounded(cfg.queue.get(), cfg.on_full, gate, stats.feed.clone());
    let ctx = FeedCtx {
        pipeline: cfg.name.clone(),
        feed: feed.name().to_string(),
        stats: stats.feed.clone(),
        store: sinks.store.clone(),
        outbox: sinks.outbox.clone(),
        cancel: cancel.clone(),
    };
    stats.set_state(State::Starting);
    let feed_run: Run = match feed {
        FeedConfig::Directory {
            path,
            extensions,
            max_file_bytes,
            on_done,
            ..
        } => {
            let dir = DirectoryFeed {
                pipeline: cfg.name.clone(),
                path: path.clone(),
                extensions: extensions.clone(),
                max_file_bytes: *max_file_bytes,
                on_done: *on_done,
            };
            Box::pin(feeds::run(dir, ctx, tx))
        }
        FeedConfig::Camera(c) => {
            let spec = FrameSpec::for_model(&manifest).map_err(|e| Unfit(e.to_string()))?;
            let cam = CameraFeed {
                cfg: c.clone(),
                spec,
            };
            Box::pin(feeds::run(cam, ctx, tx))
        }
        FeedConfig::Serial(s) => Box::pin(feeds::run(SerialFeed { cfg: s.clone() }, ctx, tx)),
        FeedConfig::Mqtt(m) => Box::pin(feeds::run(MqttFeed { cfg: m.clone() }, ctx, tx)),
        FeedConfig::Audio(a) => {
            let rate = streams.as_ref().and_then(|s| s.rate()).unwrap_or(16_000);
            let feed = crate::feeds::audio::AudioFeed {
                cfg: a.clone(),
                rate,
            };
            Box::pin(feeds::run(feed, ctx, tx))
        }
    };
    let serve = Serve {
        name: cfg.name.clone(),
        cap,
        publish: cfg.publish,
        store_results: cfg.store,
        capture_below: cfg.capture_below,
        pool,
        sinks,
        stats,
        shaper,
        streams,
        chain,
        events_only,
        drift: cfg.drift.map(crate::drift::Drift::new),
        drift_changes: Vec::new(),
        last_label: None,
        // One line per file is what someone watching a folder wants; a camera's ten a
        // second would drown the log, so those results are at debug level.
        log_results: matches!(feed, FeedConfig::Directory { .. }),
    };
    Ok(Running {
        cancel,
        feed: feed_run,
        serve: Box::pin(serve.run(rx)),
    })
}

/// One sample's trip through the model.
struct Done {
    source: String,
    ts_ms: i64,
    /// A window of a stream: seconds from the start of its source's stream.
    start_s: Option<f64>,
    /// A window of a stream: its stream's generation and the stream to carry on with.
    step: Option<(u64, Option<crate::engine::Stream>)>,
    /// A window of a stream that ended while it ran: nothing of it is said.
    ended: bool,
    taken: Instant,
    file: Option<FileDone>,
    /// The input, kept only if the pipeline captures.
    input: Option<Input>,
    result: Result<Prediction, EngineError>,
}

type Flight = Pin<Box<dyn Future<Output = Done> + Send>>;

struct Serve {
    name: String,
    /// Requests this pipeline may have in the model's queue at once.
    cap: usize,
    publish: Publish,
    store_results: bool,
    capture_below: Option<f32>,
    pool: ModelPool,
    sinks: Sinks,
    stats: Arc<PipelineStats>,
    /// Readings windows of a model without state, per source.
    shaper: Option<crate::streams::PerSource>,
    /// Streams per source: sound, or the readings of a model with state (or score events).
    streams: Option<crate::streams::Streams>,
    /// Models run on the crops of the boxes the pipeline's model finds.
    chain: Option<Arc<crate::chain::Chain>>,
    /// Only windows in which a score flipped are results.
    events_only: bool,
    drift: Option<crate::drift::Drift>,
    /// What drift changed since the last commit, committed with the next results.
    drift_changes: Vec<crate::drift::Change>,
    last_label: Option<String>,
    log_results: bool,
}

impl Serve {
    async fn run(mut self, mut rx: queue::Receiver) {
        let cap = self.cap;
        let mut flights: FuturesOrdered<Flight> = FuturesOrdered::new();
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                Some(done) = flights.next(), if !flights.is_empty() => {
                    // Whatever else has finished meanwhile commits in the same transaction:
                    // one fsync for all of them, while the next inferences run.
                    let mut batch = vec![done];
                    while let Some(Some(d)) = flights.next().now_or_never() {
                        batch.push(d);
                    }
                    self.back(&mut batch);
                    self.finish(batch).await;
                    self.launch(&mut flights);
                }
                s = rx.recv(), if open && flights.len() < cap && !self.streams_full() => match s {
                    None => open = false,
                    Some(sample) => {
                        if let Some(f) = self.start(sample).await {
                            flights.push_back(f);
                        }
                        self.launch(&mut flights);
                    }
                },
                else => break,
            }
        }
        // Drained: a score still on ends with its stream.
        if let Some(s) = self.streams.as_mut() {
            let (_, stops) = s.restart();
            self.say_stops(stops).await;
        }
    }

    /// Send a sample on its way to the model (or straight to `finish` if it is unusable).
    async fn start(&mut self, sample: Sample) -> Option<Flight> {
        let Sample {
            source,
            ts_ms,
            taken,
            data,
            done: file,
        } = sample;
        let input = match data {
            Data::Input(i) => i,
            Data::Reading(v) if self.streams.is_some() => {
                let p = self
                    .streams
                    .as_mut()?
                    .push_reading(&source, ts_ms, taken, v);
                self.pushed(&source, p).await;
                return None;
            }
            Data::Reading(v) => Ok(self.shaper.as_mut()?.push(&source, v)?),
            Data::Pcm(samples) => {
                let streams = self.streams.as_mut()?;
                let p = streams.push(&source, ts_ms, taken, &samples);
                self.pushed(&source, p).await;
                return None;
            }
            Data::Restart => {
                if let Some(s) = self.shaper.as_mut() {
                    s.reset();
                }
                if let Some(s) = self.streams.as_mut() {
                    let (dropped, stops) = s.restart();
                    self.stats
                        .feed
                        .dropped
                        .fetch_add(dropped, Ordering::Relaxed);
                    self.say_stops(stops).await;
                }
                return None;
            }
        };
        let mut done = Done {
            source,
            ts_ms,
            start_s: None,
            step: None,
            ended: false,
            taken,
            file,
            input: None,
            result: Err(EngineError::Stopped {
                model: String::new(),
            }),
        };
        let input = match input {
            Ok(i) => i,
            Err(e) => {
                done.result = Err(e);
                return Some(Box::pin(async move { done }));
            }
        };
        if let Some(d) = done.file.clone() {
            let begun = self.sinks.store.call(move |c| Ok(d.begin(c)?)).await;
            if let Err(e) = begun {
                tracing::error!(pipeline = %self.name, source = %done.source, error = %e, "attempt not recorded; sample left for later");
                return None;
            }
        }
        crate::crash_point("infer:begun");
        if self.capture_threshold().is_some() {
            done.input = Some(input.clone());
        }
        let pool = self.pool.clone();
        let chain = self.chain.clone();
        let image = chain.is_some().then(|| input.clone());
        // A sampled input goes to the shadow with the live answer, after it: the shadow never
        // holds the live answer back.
        let shadow = pool
            .shadow()
            .filter(|s| s.pick())
            .map(|s| (s, input.clone()));
        Some(Box::pin(async move {
            done.result = pool.infer_waiting(input).await;
            if let (Some((s, input)), Ok(live)) = (shadow, &done.result) {
                s.offer(input, live.clone());
            }
            if let (Some(chain), Some(image), Ok(pred)) = (chain, image, done.result.as_mut()) {
                chain.run(image, pred).await;
            }
            done
        }))
    }

    /// Count and say what taking a source's samples or reading did besides queueing windows.
    async fn pushed(&self, source: &str, p: crate::streams::Pushed) {
        let stats = &self.stats.feed;
        stats.dropped.fetch_add(p.dropped, Ordering::Relaxed);
        if p.refused {
            stats.garbage.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pipeline = %self.name, %source, "too many stream sources; this one is not heard");
        } else if p.restarted {
            tracing::info!(pipeline = %self.name, %source, dropped = p.dropped, "stream starts over (the sender paused, or too much waited)");
        }
        self.say_stops(p.stops).await;
    }

    /// Say the stops of scores left on when their streams ended (the events only: no window
    /// of the stream said them).
    async fn say_stops(&self, stops: Vec<crate::streams::EndedStop>) {
        for s in stops {
            tracing::info!(pipeline = %self.name, source = %s.source, output = %s.output, at_s = s.start_s, ts_ms = s.ts_ms, "score stop (the stream ended)");
            if let Some(ob) = &self.sinks.outbox {
                let ev = json!({
                    "event": "score.stop", "pipeline": self.name, "source": s.source,
                    "output": s.output, "ts_ms": s.ts_ms, "start_s": s.start_s, "ended": true,
                });
                if let Err(e) = ob.send_event(&self.sinks.store, ev).await {
                    tracing::error!(error = %e, "score event not queued");
                }
            }
        }
    }

    /// Enough windows of streams wait: the feed's queue holds the next samples back.
    fn streams_full(&self) -> bool {
        self.streams
            .as_ref()
            .is_some_and(|s| s.waiting() >= crate::streams::PAUSE_AT)
    }

    /// Start the windows of streams that may run now: one per source at a time (its stream
    /// goes with it), within the pipeline's share of the model's queue.
    fn launch(&mut self, flights: &mut FuturesOrdered<Flight>) {
        let Some(streams) = self.streams.as_mut() else {
            return;
        };
        let room = self.cap.saturating_sub(flights.len());
        for step in streams.ready(room) {
            let pool = self.pool.clone();
            let crate::streams::Step {
                window,
                stream,
                generation,
            } = step;
            let stream = stream.unwrap_or_else(|| pool.active().stream());
            let capture = self
                .capture_threshold()
                .is_some()
                .then(|| window.input.clone());
            flights.push_back(Box::pin(async move {
                let (result, stream) = pool.step_waiting(window.input, Some(stream)).await;
                Done {
                    source: window.source,
                    ts_ms: window.ts_ms,
                    start_s: Some(window.start_s),
                    step: Some((generation, stream)),
                    ended: false,
                    taken: window.taken,
                    file: None,
                    input: capture,
                    result,
                }
            }));
        }
    }

    /// Give each finished window's stream back to its source, for its next window.
    fn back(&mut self, batch: &mut [Done]) {
        let Some(streams) = self.streams.as_mut() else {
            return;
        };
        for d in batch {
            if let Some((generation, stream)) = d.step.take() {
                d.ended = !streams.back(&d.source, generation, stream);
            }
        }
    }

    /// The confidence under which samples are captured now: the pipeline's own, or the
    /// drift watch's while drifting, whichever captures more.
    fn capture_threshold(&self) -> Option<f32> {
        let drifting = self.drift.as_ref().and_then(|d| d.capturing());
        match (self.capture_below, drifting) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Make the drift watch follow the version that answered: its recorded baseline, else
    /// one from its package's evaluation set (run once, and recorded), else one to learn.
    async fn drift_follow(&mut self, batch: &[Done]) {
        let Some(drift) = self.drift.as_ref() else {
            return;
        };
        // The last answer: across a swap, the version that serves from now on.
        let Some(p) = batch.iter().rev().find_map(|d| d.result.as_ref().ok()) else {
            return;
        };
        if drift.watching() == Some((p.model.as_str(), p.version.as_str())) {
            return;
        }
        let (model, version) = (p.model.clone(), p.version.clone());
        let pipeline = self.name.clone();
        let (m, v) = (model.clone(), version.clone());
        let recorded = self
            .sinks
            .store
            .call(move |c| {
                use rusqlite::OptionalExtension as _;
                Ok(c.query_row(
                    "SELECT source, histogram FROM drift_baselines \
                     WHERE pipeline = ?1 AND model = ?2 AND version = ?3",
                    rusqlite::params![pipeline, m, v],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?)
            })
            .await;
        let parse = |(source, histogram): (String, String)| {
            let b = (|| {
                Some(crate::drift::Baseline {
                    model: model.clone(),
                    version: version.clone(),
                    source: serde_json::from_value(Value::String(source)).ok()?,
                    histogram: serde_json::from_str(&histogram).ok()?,
                })
            })();
            if b.is_none() {
                tracing::warn!(pipeline = %self.name, "recorded drift baseline unreadable; making another");
            }
            b
        };
        let mut baseline = match recorded {
            Ok(r) => r.and_then(parse),
            Err(e) => {
                // Not watched yet: tried again with the next batch, rather than replacing a
                // baseline that may be there.
                tracing::error!(pipeline = %self.name, error = %e, "drift baseline not read");
                return;
            }
        };
        let active = self.pool.active();
        if baseline.is_none()
            && active.version().to_string() == version
            && active.manifest.evaluation.is_some()
        {
            match tokio::task::spawn_blocking(move || active.evaluation_answers()).await {
                Ok(Ok(Some(answers))) => {
                    let readings: Vec<_> = answers.iter().map(crate::drift::Reading::of).collect();
                    let b = crate::drift::Baseline {
                        model: model.clone(),
                        version: version.clone(),
                        source: crate::drift::Source::Package,
                        histogram: crate::drift::Histogram::from_readings(&readings),
                    };
                    self.drift_changes
                        .push(crate::drift::Change::Learned(b.clone()));
                    baseline = Some(b);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(pipeline = %self.name, error = %e, "drift baseline from the package's evaluation set not made; learning one from the first results")
                }
                Err(e) => {
                    tracing::error!(pipeline = %self.name, error = %e, "drift baseline task failed")
                }
            }
        }
        let source = baseline.as_ref().map(|b| b.source.as_str());
        tracing::info!(pipeline = %self.name, %model, %version, baseline = source.unwrap_or("learning from the first results"), "drift watched");
        if let Some(ended) = self
            .drift
            .as_mut()
            .and_then(|d| d.watch(&model, &version, baseline))
        {
            self.drift_changes.push(ended);
        }
    }

    /// Decide what happens to one finished sample; `None` if it leaves no trace (the engine
    /// failed: a file stays undone, to be tried again).
    fn judge(&mut self, d: Done) -> Option<Verdict> {
        if d.ended {
            return None;
        }
        let name = &self.name;
        let (mut ts_ms, mut start_s) = (d.ts_ms, d.start_s);
        let pred = match d.result {
            Ok(mut pred) => {
                if let (Some(streams), Some(at)) = (self.streams.as_mut(), d.start_s)
                    && let Some((t, s)) = streams.flips(&d.source, d.ts_ms, at, &mut pred.outputs)
                {
                    (ts_ms, start_s) = (t, Some(s));
                }
                let label = pred.top.first().map(|c| c.label.as_str()).unwrap_or("-");
                let score = pred.top.first().map(|c| c.score).unwrap_or(f32::NAN);
                if self.log_results {
                    tracing::info!(pipeline = %name, source = %d.source, model = %pred.model, version = %pred.version, label, score, latency_us = pred.latency_us, "result");
                } else {
                    tracing::debug!(pipeline = %name, source = %d.source, model = %pred.model, version = %pred.version, label, score, latency_us = pred.latency_us, "result");
                }
                // An answer of another version (in flight across a swap) says nothing of the
                // version watched.
                if let Some(w) = self
                    .drift
                    .as_mut()
                    .filter(|w| w.watching() == Some((pred.model.as_str(), pred.version.as_str())))
                    && let Some(change) = w.observe(crate::drift::Reading::of(&pred))
                {
                    self.drift_changes.push(change);
                }
                let mut flipped = false;
                for (output, o) in &pred.outputs {
                    if let Some(e) = o.get("event").and_then(|e| e.as_str()) {
                        flipped = true;
                        tracing::info!(pipeline = %name, source = %d.source, output, at_s = start_s, ts_ms, "score {e}");
                    }
                }
                if self.events_only && !flipped {
                    // A window in which nothing flipped: its state went on with the stream.
                    return None;
                }
                self.stats.results.fetch_add(1, Ordering::Relaxed);
                Some(pred)
            }
            // The input itself is bad (not an image, wrong shape, too large): it will not get
            // better, so it is recorded as done, but a file is kept on disk for someone to see.
            Err(e @ (EngineError::Input { .. } | EngineError::Shape { .. })) => {
                tracing::warn!(pipeline = %name, source = %d.source, error = %e, "sample refused");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
            // The engine failed or is stopping: leave a file undone so that it is tried again
            // after a restart, never lost.
            Err(e) => {
                tracing::error!(pipeline = %name, source = %d.source, error = %e, "sample not processed");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let top = pred.as_ref().and_then(|p| p.top.first().cloned());
        let publish = pred.is_some()
            && self.sinks.outbox.is_some()
            && publishes(self.publish, top.as_ref(), self.last_label.as_deref());
        if pred.is_some() {
            self.last_label = top.as_ref().map(|c| c.label.clone());
        }
        let capture = match (&pred, self.capture_threshold(), d.input) {
            // A NaN score is as unsure as a model gets: captured too.
            (Some(_), Some(below), Some(input))
                if top
                    .as_ref()
                    .is_none_or(|c| c.score < below || c.score.is_nan()) =>
            {
                Some(input)
            }
            _ => None,
        };
        Some(Verdict {
            pred,
            publish,
            capture,
            source: d.source,
            ts_ms,
            start_s,
            taken: d.taken,
            file: d.file,
        })
    }

    /// Commit finished samples in one transaction (results, outbox messages, captures, done
    /// files), then tell whoever listens.
    async fn finish(&mut self, batch: Vec<Done>) {
        // Before the readings: the version that answered is watched, against its own
        // baseline, from its first reading on.
        self.drift_follow(&batch).await;
        let verdicts: Vec<Verdict> = batch.into_iter().filter_map(|d| self.judge(d)).collect();
        let drift = std::mem::take(&mut self.drift_changes);
        self.refresh_drift_report();
        if verdicts.is_empty() {
            if !drift.is_empty() {
                self.commit_drift(drift).await;
            }
            return;
        }
        // What drift made of these results commits with them, so an event is said and a
        // baseline kept only in a transaction that commits; if it fails, with the next one.
        let drift_back = (!drift.is_empty()).then(|| drift.clone());
        let now_ms = crate::store::now_ms();
        // A score event goes out in the transaction below, published or not.
        let flipped = verdicts.iter().any(|v| {
            v.pred
                .as_ref()
                .is_some_and(|p| p.outputs.values().any(|o| o.get("event").is_some()))
        });
        let signal = self.sinks.local.as_ref().filter(|l| l.listened()).is_some();
        let pname = self.name.clone();
        let ob = self.sinks.outbox.clone();
        let keeper = self.sinks.keeper.clone();
        let store_results = self.store_results;
        let stored = self
            .sinks
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                let mut over = false;
                let mut told = Vec::with_capacity(verdicts.len());
                for v in verdicts {
                    let mut said = None;
                    let mut captured = false;
                    if let Some(pred) = &v.pred {
                        let id = if store_results {
                            let (id, bytes) = insert_result(&tx, &pname, &v.source, v.ts_ms, pred)?;
                            over |= keeper.count_added(&tx, "results", bytes)?;
                            Some(id)
                        } else {
                            None
                        };
                        let mut body = json!({
                            "id": id,
                            "pipeline": pname,
                            "source": v.source,
                            "ts_ms": v.ts_ms,
                            "model": pred.model,
                            "version": pred.version,
                            "top": pred.top,
                            "latency_us": pred.latency_us,
                        });
                        if !pred.outputs.is_empty() {
                            body["outputs"] = Value::Object(pred.outputs.clone());
                        }
                        if let Some(s) = v.start_s {
                            body["start_s"] = json!(s);
                        }
                        // A score that flipped is news of its own, timed by its samples.
                        if let Some(ob) = ob.as_ref() {
                            for (output, o) in &pred.outputs {
                                let Some(flip) = o.get("event").and_then(Value::as_str) else {
                                    continue;
                                };
                                let ev = json!({
                                    "event": format!("score.{flip}"), "pipeline": pname,
                                    "source": v.source, "output": output, "score": o["score"],
                                    "ts_ms": v.ts_ms, "start_s": v.start_s,
                                    "model": pred.model, "version": pred.version,
                                });
                                ob.enqueue(&tx, "events", Class::Event, &ob.topics().events(), ev)?;
                            }
                        }
                        if let Some(input) = &v.capture {
                            let bytes =
                                insert_capture(&tx, &pname, &v.source, v.ts_ms, input, &body)?;
                            over |= keeper.count_added(&tx, "captures", bytes)?;
                            captured = true;
                        }
                        // The result and its upstream message commit together: a result is
                        // never stored without being on its way, nor sent without being stored.
                        if let Some(ob) = ob.as_ref().filter(|_| v.publish) {
                            let topic = ob.topics().results(&pname);
                            ob.enqueue(
                                &tx,
                                &format!("results/{pname}"),
                                Class::Result,
                                &topic,
                                body.clone(),
                            )?;
                        }
                        if signal {
                            said = Some(body.to_string());
                        }
                    }
                    if let Some(f) = &v.file {
                        let outcome = if v.pred.is_some() {
                            Outcome::Result
                        } else {
                            Outcome::Refused
                        };
                        f.record(&tx, outcome)?;
                    }
                    told.push((v, said, captured));
                }
                apply_drift(&tx, &pname, ob.as_ref(), drift, now_ms)?;
                tx.commit()?;
                Ok((told, over))
            })
            .await;
        crate::crash_point("result:committed");
        let (told, over) = match stored {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(pipeline = %self.name, error = %e, "results not stored");
                // Said again with the next results.
                self.drift_changes.extend(drift_back.into_iter().flatten());
                return;
            }
        };
        if let Some(changes) = &drift_back {
            log_drift(&self.name, changes);
        }
        if over {
            self.sinks.keeper.ring();
        }
        let mut woke = false;
        for (v, said, captured) in told {
            self.stats.e2e.record(v.taken.elapsed().as_micros() as u64);
            if captured {
                self.stats.captured.fetch_add(1, Ordering::Relaxed);
            }
            if let (Some(l), Some(json)) = (&self.sinks.local, said) {
                l.send(LocalEvent::Result {
                    pipeline: self.name.clone(),
                    json,
                });
            }
            if v.publish {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                woke = true;
            }
            if let Some(f) = v.file.filter(|_| v.pred.is_some()) {
                f.finish();
            }
        }
        // Drift events went into the outbox in the same transaction.
        if (woke || flipped || drift_back.is_some())
            && let Some(ob) = &self.sinks.outbox
        {
            ob.wake();
        }
    }
}

impl Serve {
    /// Commit drift changes that came without results (a baseline from the package, a drift
    /// ended by a version change); kept to be said again if the store fails.
    async fn commit_drift(&mut self, changes: Vec<crate::drift::Change>) {
        let pipeline = self.name.clone();
        let ob = self.sinks.outbox.clone();
        let back = changes.clone();
        let now = crate::store::now_ms();
        let stored = self
            .sinks
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                apply_drift(&tx, &pipeline, ob.as_ref(), changes, now)?;
                tx.commit()?;
                Ok(())
            })
            .await;
        match stored {
            Ok(()) => {
                log_drift(&self.name, &back);
                if let Some(ob) = &self.sinks.outbox {
                    ob.wake();
                }
            }
            Err(e) => {
                tracing::error!(pipeline = %self.name, error = %e, "drift change not recorded; tried again with the next results");
                self.drift_changes.extend(back);
            }
        }
    }

    /// The drift report status and telemetry read, after every batch (a few microseconds
    /// against about 0.23 ms for one inference of the digits CNN; `benches/drift.rs` measures it).
    fn refresh_drift_report(&mut self) {
        if let Some(d) = &self.drift {
            *self.stats.drift.lock().unwrap_or_else(|e| e.into_inner()) = Some(d.report());
        }
    }
}

/// Record a baseline made, and queue drift events, in the caller's transaction.
fn apply_drift(
    tx: &rusqlite::Transaction<'_>,
    pipeline: &str,
    ob: Option<&Outbox>,
    changes: Vec<crate::drift::Change>,
    now: i64,
) -> rusqlite::Result<()> {
    use crate::drift::Change;
    for change in changes {
        let (event, mut body) = match change {
            Change::Learned(b) => {
                tx.execute(
                    "INSERT OR REPLACE INTO drift_baselines \
                     (pipeline, model, version, source, histogram, ts_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    rusqlite::params![
                        pipeline,
                        b.model,
                        b.version,
                        b.source.as_str(),
                        serde_json::to_string(&b.histogram).expect("a histogram serialises"),
                        now,
                    ],
                )?;
                let body = json!({
                    "model": b.model, "version": b.version,
                    "source": b.source.as_str(), "results": b.histogram.n,
                });
                ("drift.baseline", body)
            }
            Change::Detected(r) => ("drift.detected", r),
            Change::Cleared(r) => ("drift.cleared", r),
        };
        if let Some(ob) = ob {
            body["event"] = event.into();
            body["pipeline"] = pipeline.into();
            body["ts_ms"] = now.into();
            ob.enqueue(tx, "events", Class::Event, &ob.topics().events(), body)?;
        }
    }
    Ok(())
}

/// Log drift changes once they are committed.
fn log_drift(pipeline: &str, changes: &[crate::drift::Change]) {
    use crate::drift::Change;
    for c in changes {
        match c {
            Change::Learned(b) => {
                tracing::info!(%pipeline, model = %b.model, version = %b.version, source = b.source.as_str(), results = b.histogram.n, "drift baseline recorded")
            }
            Change::Detected(r) => {
                tracing::warn!(%pipeline, score = %r["score"], threshold = %r["threshold"], "drift detected")
            }
            Change::Cleared(r) => tracing::info!(%pipeline, score = %r["score"], "drift cleared"),
        }
    }
}

/// Whether a result with this top class goes upstream, after one whose top label was `last`.
fn publishes(policy: Publish, top: Option<&crate::engine::Class>, last: Option<&str>) -> bool {
    match policy {
        Publish::Always => true,
        Publish::OnChange => top.map(|c| c.label.as_str()) != last,
        Publish::Above(min) => top.is_some_and(|c| c.score >= min),
    }
}

/// Requests one of `share` pipelines on a model may have in its queue (of `queue`) at once:
/// enough to keep the workers busy while results commit (`2 × workers + 2`), and no more than
/// its share of the queue, so that every pipeline's requests fit at once and none has to
/// retry against a full queue (where a camera could win every race).
pub fn in_flight(workers: usize, queue: usize, share: usize) -> usize {
    (2 * workers + 2).min(queue / share.max(1)).max(1)
}

/// What becomes of one finished sample.
struct Verdict {
    pred: Option<Prediction>,
    publish: bool,
    capture: Option<Input>,
    source: String,
    ts_ms: i64,
    start_s: Option<f64>,
    taken: Instant,
    file: Option<FileDone>,
}

/// Insert a result row; its id and the bytes it counts against the results budget.
fn insert_result(
    tx: &rusqlite::Transaction<'_>,
    pipeline: &str,
    source: &str,
    ts_ms: i64,
    p: &Prediction,
) -> rusqlite::Result<(i64, i64)> {
    let top = serde_json::to_string(&p.top).expect("classes serialise");
    let outputs = (!p.outputs.is_empty())
        .then(|| serde_json::to_string(&p.outputs).expect("outputs serialise"));
    let first = p.top.first();
    let label = first.map(|c| c.label.clone());
    // The same estimate as the migration that added the column: text lengths plus the fixed
    // columns and row overhead.
    let bytes = (pipeline.len()
        + source.len()
        + p.model.len()
        + p.version.len()
        + label.as_ref().map_or(0, |l| l.len())
        + top.len()
        + outputs.as_ref().map_or(0, |o| o.len())
        + 48) as i64;
    tx.execute(
        "INSERT INTO results (ts_ms, pipeline, source, model, version, label, score, top, latency_us, bytes, outputs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        rusqlite::params![
            ts_ms,
            pipeline,
            source,
            p.model,
            p.version,
            label,
            first.map(|c| c.score as f64),
            top,
            p.latency_us as i64,
            bytes,
            outputs
        ],
    )?;
    Ok((tx.last_insert_rowid(), bytes))
}

/// Keep an input and its result for retraining; the bytes it counts against the budget.
fn insert_capture(
    tx: &rusqlite::Transaction<'_>,
    pipeline: &str,
    source: &str,
    ts_ms: i64,
    input: &Input,
    result: &Value,
) -> rusqlite::Result<i64> {
    let (kind, meta, data): (&str, Value, Vec<u8>) = match input {
        Input::Encoded(b) => ("image", json!({}), b.clone()),
        Input::Frame {
            width,
            height,
            format,
            data,
        } => (
            "frame",
            json!({"width": width, "height": height, "format": match format {
                PixelFormat::Rgb24 => "rgb24",
                PixelFormat::Gray8 => "gray8",
            }}),
            data.clone(),
        ),
        Input::Tensor { shape, data } => (
            "tensor",
            json!({"shape": shape, "dtype": "f32le"}),
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        // Named arrays, one after another, little-endian; `meta` says where each lies.
        Input::Arrays(arrays) => {
            let mut bytes = Vec::new();
            let mut parts = Vec::new();
            for (name, a) in arrays {
                let start = bytes.len();
                match &a.data {
                    ArrayData::F32(v) => bytes.extend(v.iter().flat_map(|x| x.to_le_bytes())),
                    ArrayData::I64(v) => bytes.extend(v.iter().flat_map(|x| x.to_le_bytes())),
                    ArrayData::I32(v) => bytes.extend(v.iter().flat_map(|x| x.to_le_bytes())),
                    ArrayData::U8(v) => bytes.extend_from_slice(v),
                    ArrayData::Bool(v) => bytes.extend(v.iter().map(|b| u8::from(*b))),
                }
                parts.push(
                    json!({"name": name, "shape": a.shape, "dtype": a.data.dtype_name(),
                    "offset": start, "bytes": bytes.len() - start}),
                );
            }
            ("arrays", json!({ "arrays": parts }), bytes)
        }
    };
    let meta = meta.to_string();
    let result = result.to_string();
    let bytes =
        (data.len() + meta.len() + result.len() + source.len() + pipeline.len() + 48) as i64;
    tx.execute(
        "INSERT INTO captures (ts_ms, pipeline, source, kind, meta, data, result, bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        rusqlite::params![ts_ms, pipeline, source, kind, meta, data, result, bytes],
    )?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelines_sharing_a_model_fit_its_queue_together() {
        assert_eq!(in_flight(1, 16, 1), 4);
        assert_eq!(in_flight(1, 16, 5), 3);
        assert_eq!(in_flight(8, 16, 1), 16);
        assert_eq!(in_flight(2, 16, 3), 5);
        // More pipelines than room: one each, the least that still runs.
        assert_eq!(in_flight(1, 2, 5), 1);
        for (w, q, s) in [(1, 16, 4), (2, 16, 3), (4, 64, 7), (1, 8, 8)] {
            assert!(in_flight(w, q, s) * s <= q, "{w} {q} {s}");
        }
    }

    #[test]
    fn publish_policies_pick_results() {
        let c = |label: &str, score: f32| crate::engine::Class {
            index: 0,
            label: label.into(),
            score,
        };
        assert!(publishes(Publish::Always, None, Some("a")));
        // On change: the first result, then only a different top class.
        assert!(publishes(Publish::OnChange, Some(&c("a", 0.9)), None));
        assert!(!publishes(Publish::OnChange, Some(&c("a", 0.2)), Some("a")));
        assert!(publishes(Publish::OnChange, Some(&c("b", 0.9)), Some("a")));
        assert!(publishes(Publish::Above(0.8), Some(&c("a", 0.8)), None));
        assert!(!publishes(Publish::Above(0.8), Some(&c("a", 0.79)), None));
        assert!(!publishes(
            Publish::Above(0.8),
            Some(&c("a", f32::NAN)),
            None
        ));
        assert!(!publishes(Publish::Above(0.8), None, None));
    }
}
