//! Binds a feed to a model and to sinks: the results table, the outbox, D-Bus signals and
//! the capture store.
//!
//! ```text
//!  feed task ─► gate ─► queue (drop oldest | wait) ─► pipeline task ─► window ─► model pool
//!                                                        │   (up to workers+1 in flight)
//!                                                        └─► in order, one transaction each:
//!                                                            result + outbox + capture + "file done"
//! ```
//!
//! Fair sharing: a pipeline never has more than its model's `workers + 1` requests in the
//! model's queue, and the queue is first come, first served, so pipelines sharing a model
//! take turns: a camera that always has a frame ready cannot starve a sensor.
//!
//! Stopping: the feed stops on cancellation and drops its sender; the pipeline finishes the
//! samples already queued and ends, so a SIGTERM drains instead of dropping work.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{FeedConfig, PipelineConfig, Publish};
use crate::control::LocalEvent;
use crate::engine::{EngineError, Input, Latencies, ModelPool, PixelFormat, Prediction};
use crate::feeds::camera::{CameraFeed, FrameSpec};
use crate::feeds::directory::{DirectoryFeed, FileDone, Outcome};
use crate::feeds::mqtt::MqttFeed;
use crate::feeds::queue::{self, Gate};
use crate::feeds::serial::SerialFeed;
use crate::feeds::{Data, FeedCtx, Sample};
use crate::outbox::{Class, Outbox};
use crate::store::{Keeper, Store};

/// What a pipeline is doing, as `pipelines.list` and the status say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Starting,
    Running,
    /// Its feed failed and is being restarted; why.
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

#[derive(Debug, Default)]
pub struct PipelineStats {
    pub results: AtomicU64,
    pub errors: AtomicU64,
    /// Samples dropped by a full queue (drop-oldest pipelines).
    pub dropped: AtomicU64,
    /// Samples let go by `every_nth` or `max_fps`.
    pub skipped: AtomicU64,
    /// Lines or messages the feed could not use.
    pub garbage: AtomicU64,
    /// Times the feed failed and was restarted.
    pub restarts: AtomicU64,
    pub published: AtomicU64,
    pub captured: AtomicU64,
    /// From the feed taking a sample to its result committed, µs.
    pub e2e: Latencies,
    state: Mutex<State>,
}

impl PipelineStats {
    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The counters and state as status and telemetry show them.
    pub fn json(&self) -> Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let state = self.state();
        json!({
            "state": state.name(),
            "reason": state.reason(),
            "results": n(&self.results),
            "errors": n(&self.errors),
            "dropped": n(&self.dropped),
            "skipped": n(&self.skipped),
            "garbage": n(&self.garbage),
            "restarts": n(&self.restarts),
            "published": n(&self.published),
            "captured": n(&self.captured),
            "e2e_latency_us": self.e2e.quantiles(),
        })
    }
}

/// The sinks a pipeline writes to.
#[derive(Clone)]
pub struct Sinks {
    pub store: Store,
    pub outbox: Option<Outbox>,
    pub local: Option<broadcast::Sender<LocalEvent>>,
    pub keeper: Arc<Keeper>,
}

/// A running pipeline's two tasks.
pub struct Running {
    pub cancel: CancellationToken,
    pub feed_task: JoinHandle<()>,
    pub task: JoinHandle<()>,
}

/// Start a pipeline: its feed and the task that runs the model on each sample. Fails, with
/// the reason, if the model cannot take what the feed gives.
pub fn spawn(
    cfg: &PipelineConfig,
    feed: &FeedConfig,
    pool: ModelPool,
    sinks: Sinks,
    stats: Arc<PipelineStats>,
    cancel: CancellationToken,
) -> Result<Running, String> {
    let manifest = pool.active().manifest.clone();
    let fields = feed.fields().len();
    let shaper = if fields > 0 {
        let shape = manifest.sample_shape();
        let want: usize = shape.iter().product();
        let have = cfg.window.get() * fields;
        if want != have {
            return Err(format!(
                "model `{}` takes {want} values ({shape:?}) but a window of {} readings of {fields} fields is {have}",
                manifest.name, cfg.window
            ));
        }
        Some(Shaper {
            window: cfg.window.get(),
            stride: cfg.stride.get(),
            shape,
            readings: VecDeque::new(),
            fresh: 0,
            emitted: false,
        })
    } else {
        None
    };
    let gate = Gate {
        every_nth: cfg.every_nth.get(),
        min_gap_ms: cfg.max_fps.map(|f| 1000.0 / f),
    };
    let (tx, rx) = queue::bounded(cfg.queue.get(), cfg.on_full, gate, stats.clone());
    let ctx = FeedCtx {
        pipeline: cfg.name.clone(),
        feed: feed.name().to_string(),
        stats: stats.clone(),
        store: sinks.store.clone(),
        outbox: sinks.outbox.clone(),
        cancel: cancel.clone(),
    };
    stats.set_state(State::Starting);
    let feed_task = match feed {
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
            tokio::spawn(async move {
                // A failed watch (directory removed, watch limit reached) is retried with
                // back-off; only cancellation or a closed pipeline ends it.
                let store = ctx.store.clone();
                ctx.supervise(|| {
                    let (dir, store, tx, ctx) = (dir.clone(), store.clone(), &tx, ctx.clone());
                    async move {
                        ctx.running();
                        match dir.run(store, tx.clone(), ctx.cancel.clone()).await {
                            Ok(()) => crate::feeds::Ended::Stop,
                            Err(e) => crate::feeds::Ended::Failed(e.to_string()),
                        }
                    }
                })
                .await
            })
        }
        FeedConfig::Camera(c) => {
            let spec = FrameSpec::for_model(&manifest)?;
            let cam = CameraFeed {
                cfg: c.clone(),
                spec,
            };
            tokio::spawn(cam.run(ctx, tx))
        }
        FeedConfig::Serial(s) => tokio::spawn(SerialFeed { cfg: s.clone() }.run(ctx, tx)),
        FeedConfig::Mqtt(m) => tokio::spawn(MqttFeed { cfg: m.clone() }.run(ctx, tx)),
    };
    let serve = Serve {
        name: cfg.name.clone(),
        publish: cfg.publish,
        store_results: cfg.store,
        capture_below: cfg.capture_below,
        pool,
        sinks,
        stats,
        shaper,
        last_label: None,
        // One line per file is what someone watching a folder wants; a camera's ten a
        // second would drown the log, so those results are at debug level.
        log_results: matches!(feed, FeedConfig::Directory { .. }),
    };
    let task = tokio::spawn(serve.run(rx));
    Ok(Running {
        cancel,
        feed_task,
        task,
    })
}

/// Stacks readings into windows: the last `window` readings, every `stride` new ones.
struct Shaper {
    window: usize,
    stride: usize,
    shape: Vec<usize>,
    readings: VecDeque<Vec<f32>>,
    fresh: usize,
    emitted: bool,
}

impl Shaper {
    fn push(&mut self, values: Vec<f32>) -> Option<Input> {
        self.readings.push_back(values);
        if self.readings.len() > self.window {
            self.readings.pop_front();
        }
        self.fresh += 1;
        let due = if self.emitted {
            self.fresh >= self.stride
        } else {
            self.readings.len() == self.window
        };
        if !due || self.readings.len() < self.window {
            return None;
        }
        self.fresh = 0;
        self.emitted = true;
        Some(Input::Tensor {
            shape: self.shape.clone(),
            data: self.readings.iter().flatten().copied().collect(),
        })
    }
}

/// One sample's trip through the model.
struct Done {
    source: String,
    ts_ms: i64,
    taken: Instant,
    file: Option<FileDone>,
    /// The input, kept only if the pipeline captures.
    input: Option<Input>,
    result: Result<Prediction, EngineError>,
}

type Flight = Pin<Box<dyn Future<Output = Done> + Send>>;

struct Serve {
    name: String,
    publish: Publish,
    store_results: bool,
    capture_below: Option<f32>,
    pool: ModelPool,
    sinks: Sinks,
    stats: Arc<PipelineStats>,
    shaper: Option<Shaper>,
    last_label: Option<String>,
    log_results: bool,
}

impl Serve {
    async fn run(mut self, mut rx: queue::Receiver) {
        let cap = self.pool.config().workers.get() + 1;
        let mut flights: FuturesOrdered<Flight> = FuturesOrdered::new();
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                Some(done) = flights.next(), if !flights.is_empty() => self.finish(done).await,
                s = rx.recv(), if open && flights.len() < cap => match s {
                    None => open = false,
                    Some(sample) => {
                        if let Some(f) = self.start(sample).await {
                            flights.push_back(f);
                        }
                    }
                },
                else => break,
            }
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
            Data::Reading(v) => Ok(self.shaper.as_mut()?.push(v)?),
        };
        let mut done = Done {
            source,
            ts_ms,
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
        if self.capture_below.is_some() {
            done.input = Some(input.clone());
        }
        let pool = self.pool.clone();
        Some(Box::pin(async move {
            done.result = pool.infer_waiting(input).await;
            done
        }))
    }

    async fn finish(&mut self, d: Done) {
        let name = &self.name;
        let pred = match d.result {
            Ok(pred) => {
                let label = pred.top.first().map(|c| c.label.as_str()).unwrap_or("-");
                let score = pred.top.first().map(|c| c.score).unwrap_or(f32::NAN);
                if self.log_results {
                    tracing::info!(pipeline = %name, source = %d.source, model = %pred.model, version = %pred.version, label, score, latency_us = pred.latency_us, "result");
                } else {
                    tracing::debug!(pipeline = %name, source = %d.source, model = %pred.model, version = %pred.version, label, score, latency_us = pred.latency_us, "result");
                }
                self.stats.results.fetch_add(1, Ordering::Relaxed);
                Some(pred)
            }
            // The input itself is bad (not an image, wrong shape, too large): it will not get
            // better, so it is recorded as done, but a file is kept on disk for someone to see.
            Err(e @ EngineError::Input { .. }) => {
                tracing::warn!(pipeline = %name, source = %d.source, error = %e, "sample refused");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
            // The engine failed or is stopping: leave a file undone so that it is tried again
            // after a restart, never lost.
            Err(e) => {
                tracing::error!(pipeline = %name, source = %d.source, error = %e, "sample not processed");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let top = pred.as_ref().and_then(|p| p.top.first().cloned());
        let publish = match (&pred, self.publish, &top) {
            (None, ..) => false,
            (_, Publish::Always, _) => true,
            (_, Publish::OnChange, t) => t.as_ref().map(|c| &c.label) != self.last_label.as_ref(),
            (_, Publish::Above(min), t) => t.as_ref().is_some_and(|c| c.score >= min),
        } && self.sinks.outbox.is_some();
        if pred.is_some() {
            self.last_label = top.as_ref().map(|c| c.label.clone());
        }
        let capture = match (&pred, self.capture_below, d.input) {
            (Some(_), Some(below), Some(input))
                // A NaN score is as unsure as a model gets: captured too.
                if top.as_ref().is_none_or(|c| c.score < below || c.score.is_nan()) =>
            {
                Some(input)
            }
            _ => None,
        };
        let signal = self
            .sinks
            .local
            .as_ref()
            .filter(|l| l.receiver_count() > 0)
            .is_some();
        let delete_ok = pred.is_some();
        let (pname, source, ts) = (name.clone(), d.source.clone(), d.ts_ms);
        let record = d.file.clone();
        let ob = self.sinks.outbox.clone();
        let keeper = self.sinks.keeper.clone();
        let store_results = self.store_results;
        let stored = self
            .sinks
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                let mut said = None;
                let mut over = false;
                let mut captured = false;
                if let Some(pred) = &pred {
                    let id = if store_results {
                        let (id, bytes) = insert_result(&tx, &pname, &source, ts, pred)?;
                        over |= keeper.count_added(&tx, "results", bytes)?;
                        Some(id)
                    } else {
                        None
                    };
                    let body = json!({
                        "id": id,
                        "pipeline": pname,
                        "source": source,
                        "ts_ms": ts,
                        "model": pred.model,
                        "version": pred.version,
                        "top": pred.top,
                        "latency_us": pred.latency_us,
                    });
                    if let Some(input) = capture {
                        let bytes = insert_capture(&tx, &pname, &source, ts, &input, &body)?;
                        over |= keeper.count_added(&tx, "captures", bytes)?;
                        captured = true;
                    }
                    // The result and its upstream message commit together: a result is never
                    // stored without being on its way to the fleet, nor sent without being stored.
                    if let Some(ob) = ob.as_ref().filter(|_| publish) {
                        let topic = format!("{}/results/{pname}", ob.base);
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
                if let Some(d) = &record {
                    d.record(
                        &tx,
                        if delete_ok {
                            Outcome::Result
                        } else {
                            Outcome::Refused
                        },
                    )?;
                }
                tx.commit()?;
                Ok((said, over, captured))
            })
            .await;
        crate::crash_point("result:committed");
        match stored {
            Ok((said, over, captured)) => {
                self.stats.e2e.record(d.taken.elapsed().as_micros() as u64);
                if captured {
                    self.stats.captured.fetch_add(1, Ordering::Relaxed);
                }
                if over {
                    self.sinks.keeper.ring();
                }
                if let (Some(l), Some(json)) = (&self.sinks.local, said) {
                    let _ = l.send(LocalEvent::Result {
                        pipeline: name.clone(),
                        json,
                    });
                }
                if publish && let Some(ob) = &self.sinks.outbox {
                    self.stats.published.fetch_add(1, Ordering::Relaxed);
                    ob.wake();
                }
                if let Some(f) = d.file.filter(|_| delete_ok) {
                    f.finish();
                }
            }
            Err(e) => tracing::error!(pipeline = %name, error = %e, "result not stored"),
        }
    }
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
        + 48) as i64;
    tx.execute(
        "INSERT INTO results (ts_ms, pipeline, source, model, version, label, score, top, latency_us, bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
            bytes
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
    fn windows_slide_by_their_stride() {
        let mut s = Shaper {
            window: 3,
            stride: 2,
            shape: vec![6],
            readings: VecDeque::new(),
            fresh: 0,
            emitted: false,
        };
        let mut out = Vec::new();
        for i in 0..8 {
            if let Some(Input::Tensor { shape, data }) = s.push(vec![i as f32, -(i as f32)]) {
                assert_eq!(shape, [6]);
                out.push(
                    data.iter()
                        .step_by(2)
                        .map(|x| *x as i32)
                        .collect::<Vec<_>>(),
                );
            }
        }
        // The first window once three readings are in, then one every two new readings.
        assert_eq!(out, [vec![0, 1, 2], vec![2, 3, 4], vec![4, 5, 6]]);
    }
}
