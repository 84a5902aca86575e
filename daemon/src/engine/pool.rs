//! A bounded worker pool per model, off the async runtime, with an atomically swappable
//! active version.
//!
//! ```text
//!  try_submit ──(bounded queue; full => Busy at once)──► worker threads ──► oneshot reply
//!       │
//!       └─ captures Arc<Model> of the active version at submission
//! ```
//!
//! A request takes the active version when it is submitted, so a swap never disturbs requests
//! already queued or running: they finish on the version they started with, and the old
//! version is freed when its last request is done. Workers publish a heartbeat so the service
//! can stop feeding the systemd watchdog when an inference hangs.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::oneshot;

use super::{EngineError, Input, Model, PlanChoice, Prediction, Runtime, Stream};

/// How one model is served: the settings a pool is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Threads tract may use inside one inference.
    pub threads: NonZeroUsize,
    /// Inferences of this model that may run at once.
    pub workers: NonZeroUsize,
    /// Requests that may wait; one more is answered `busy` at once.
    pub queue: NonZeroUsize,
    /// Where the model runs.
    pub runtime: Runtime,
    /// Which CPU plans it may run with.
    pub plan: PlanChoice,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            threads: NonZeroUsize::MIN,
            workers: NonZeroUsize::MIN,
            queue: NonZeroUsize::new(16).expect("not zero"),
            runtime: Runtime::Cpu,
            plan: PlanChoice::Auto,
        }
    }
}

/// Pool settings by model name, with a default for any other model (one an update brought).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pools {
    pub models: std::collections::HashMap<String, PoolSettings>,
    pub default: PoolSettings,
}

impl Pools {
    pub fn get(&self, name: &str) -> PoolSettings {
        self.models.get(name).copied().unwrap_or(self.default)
    }
}

struct Job {
    model: Arc<Model>,
    work: Work,
    reply: oneshot::Sender<Done>,
}

/// What one job asks of a worker.
enum Work {
    /// One input; with a stream, one step of it (its state goes in and comes back).
    One(Input, Option<Stream>),
    /// Inputs run together where the model batches (the crops of a chain).
    Batch(Vec<Input>),
}

enum Done {
    One(Answer),
    Batch(Vec<Result<Prediction, EngineError>>),
}

type Answer = (Result<Prediction, EngineError>, Option<Stream>);

/// Counters a pool keeps for status and telemetry.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub completed: AtomicU64,
    /// Engine faults: run errors and panics.
    pub failed: AtomicU64,
    /// Inputs refused before they ran (undecodable, the wrong shape).
    pub bad_input: AtomicU64,
    pub rejected_busy: AtomicU64,
    latencies: Latencies,
    /// Every answer's latency since the pool started, by bucket (Prometheus's histogram).
    pub durations: Durations,
    /// Failed requests by wire code (`bad_request`, `internal`, `busy`, …); only errors
    /// take the lock.
    pub errors_by_code: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl PoolStats {
    fn error(&self, e: &EngineError) {
        let mut by = self
            .errors_by_code
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *by.entry(e.code().as_str()).or_default() += 1;
    }

    /// Failed requests by wire code so far.
    pub fn errors_by_code(&self) -> Vec<(&'static str, u64)> {
        let by = self
            .errors_by_code
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        by.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Upper bounds (seconds) of the latency histogram's buckets; one more holds the rest.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Latencies counted by bucket since the pool started: one atomic add each, nothing locked.
#[derive(Debug, Default)]
pub struct Durations {
    counts: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Durations {
    pub fn record(&self, latency_us: u64) {
        let s = latency_us as f64 / 1e6;
        let i = DURATION_BUCKETS.partition_point(|b| *b < s);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(latency_us, Ordering::Relaxed);
    }

    /// (sum in seconds, count, each bucket's upper bound with the answers in it, not under
    /// it: prometheus-client adds them up; the last bound is `f64::MAX`, its +Inf).
    pub fn buckets(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let bound = DURATION_BUCKETS.get(i).copied().unwrap_or(f64::MAX);
                (bound, c.load(Ordering::Relaxed))
            })
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

/// The latest latencies (µs), for quantiles in telemetry; a fixed ring, so memory is flat.
#[derive(Debug, Default)]
pub struct Latencies(std::sync::Mutex<LatencyRing>);

#[derive(Debug, Default)]
struct LatencyRing {
    values: Vec<u64>,
    next: usize,
}

/// How many recent latencies the quantiles are computed over.
const LATENCY_WINDOW: usize = 1024;

/// Latency quantiles over the recent window, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Quantiles {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub samples: usize,
}

impl PoolStats {
    pub fn quantiles(&self) -> Quantiles {
        self.latencies.quantiles()
    }
}

impl Latencies {
    pub fn record(&self, latency_us: u64) {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if r.values.len() < LATENCY_WINDOW {
            r.values.push(latency_us);
        } else {
            let i = r.next;
            r.values[i] = latency_us;
        }
        r.next = (r.next + 1) % LATENCY_WINDOW;
    }

    pub fn quantiles(&self) -> Quantiles {
        let mut v = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values
            .clone();
        if v.is_empty() {
            return Quantiles::default();
        }
        v.sort_unstable();
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Quantiles {
            p50: q(0.50),
            p95: q(0.95),
            p99: q(0.99),
            samples: v.len(),
        }
    }
}

/// A cheap, cloneable handle to one model's pool.
#[derive(Clone)]
pub struct ModelPool {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    active: ArcSwap<Model>,
    tx: crossbeam_channel::Sender<Job>,
    config: PoolSettings,
    /// Per worker: milliseconds since `epoch` when its current job started, 0 when idle.
    busy_since: Vec<AtomicU64>,
    epoch: Instant,
    stats: PoolStats,
    /// A candidate running beside the active version on a sample of this pool's inputs.
    shadow: arc_swap::ArcSwapOption<crate::shadow::Shadow>,
}

impl ModelPool {
    /// Start `config.workers` threads serving `model`. The threads end once the last handle
    /// is dropped; requests still queued then are answered `Stopped`.
    pub fn spawn(model: Arc<Model>, config: PoolSettings) -> ModelPool {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue.get());
        let inner = Arc::new(Inner {
            name: model.name().to_string(),
            active: ArcSwap::new(model),
            tx,
            config,
            busy_since: (0..config.workers.get())
                .map(|_| AtomicU64::new(0))
                .collect(),
            epoch: Instant::now(),
            stats: PoolStats::default(),
            shadow: arc_swap::ArcSwapOption::empty(),
        });
        for w in 0..config.workers.get() {
            let rx = rx.clone();
            // Workers hold a weak reference so dropping every handle ends them.
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name(format!("infer-{}-{w}", inner.name))
                .spawn(move || worker(w, rx, weak))
                .expect("spawning an inference worker thread");
        }
        ModelPool { inner }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn config(&self) -> PoolSettings {
        self.inner.config
    }

    /// The version new requests go to.
    pub fn active(&self) -> Arc<Model> {
        self.inner.active.load_full()
    }

    /// Make `model` the version new requests go to; returns the previous one.
    pub fn swap(&self, model: Arc<Model>) -> Arc<Model> {
        self.inner.active.swap(model)
    }

    /// The shadow the pipelines of this pool feed, if one runs.
    pub fn shadow(&self) -> Option<Arc<crate::shadow::Shadow>> {
        self.inner.shadow.load_full()
    }

    pub fn set_shadow(&self, s: Option<Arc<crate::shadow::Shadow>>) {
        self.inner.shadow.store(s);
    }

    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Requests waiting for a worker.
    pub fn queued(&self) -> usize {
        self.inner.tx.len()
    }

    /// Queue an inference; a full queue is answered with `Busy` at once. The answer comes
    /// when the returned future is awaited.
    pub fn try_submit(
        &self,
        input: Input,
    ) -> Result<
        impl std::future::Future<Output = Result<Prediction, EngineError>> + use<>,
        EngineError,
    > {
        let (reply, rx) = oneshot::channel::<Done>();
        let job = Job {
            model: self.active(),
            work: Work::One(input, None),
            reply,
        };
        match self.inner.tx.try_send(job) {
            Ok(()) => {
                let model = self.inner.name.clone();
                Ok(async move {
                    match rx.await {
                        Ok(Done::One((r, _))) => r,
                        Ok(Done::Batch(_)) | Err(_) => Err(EngineError::Stopped { model }),
                    }
                })
            }
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                self.inner
                    .stats
                    .rejected_busy
                    .fetch_add(1, Ordering::Relaxed);
                let busy = EngineError::Busy {
                    model: self.inner.name.clone(),
                };
                self.inner.stats.error(&busy);
                Err(busy)
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                let stopped = EngineError::Stopped {
                    model: self.inner.name.clone(),
                };
                self.inner.stats.error(&stopped);
                Err(stopped)
            }
        }
    }

    /// Queue an inference and wait for its result; `Busy` if the queue is full.
    pub async fn infer(&self, input: Input) -> Result<Prediction, EngineError> {
        self.try_submit(input)?.await
    }

    /// Like [`infer`](Self::infer), but wait for room in the queue instead of failing: the
    /// back-pressure policy for sources that can wait (files, serial lines).
    pub async fn infer_waiting(&self, input: Input) -> Result<Prediction, EngineError> {
        self.step_waiting(input, None).await.0
    }

    /// One step of a stream, waiting for room in the queue: the answer, and the stream to
    /// carry on with (`None` if the pool stopped with it: start a new one).
    pub async fn step_waiting(&self, input: Input, stream: Option<Stream>) -> Answer {
        match self.submit_waiting(Work::One(input, stream)).await {
            Ok(Done::One(answer)) => answer,
            Ok(Done::Batch(_)) => unreachable!("one input is answered once"),
            Err((e, Work::One(_, stream))) => (Err(e), stream),
            Err((e, Work::Batch(_))) => (Err(e), None),
        }
    }

    /// Several inputs, waiting for room in the queue: one answer per input, in order. They go
    /// as jobs of at most the model's batch ([`Model::infer_batch`] runs each together), or of
    /// one input each for a model without a named batch, so the workers share them and no job
    /// holds a worker for long. Inputs of like size next to each other pad least.
    pub async fn infer_batch_waiting(
        &self,
        inputs: Vec<Input>,
    ) -> Vec<Result<Prediction, EngineError>> {
        let per_job = self
            .active()
            .manifest
            .batch_bound()
            .map_or(1, |(_, n)| n.clamp(1, super::model::MAX_BATCH));
        let mut jobs = Vec::new();
        let mut rest = inputs.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<Input> = rest.by_ref().take(per_job).collect();
            jobs.push(self.batch_job(chunk));
        }
        futures_util::future::join_all(jobs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn batch_job(&self, inputs: Vec<Input>) -> Vec<Result<Prediction, EngineError>> {
        let n = inputs.len();
        match self.submit_waiting(Work::Batch(inputs)).await {
            Ok(Done::Batch(answers)) => answers,
            Ok(Done::One(_)) => unreachable!("a batch is answered as one"),
            Err((e, _)) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }

    /// Queue work, waiting for room; the work back with the error if the pool has stopped.
    async fn submit_waiting(&self, work: Work) -> Result<Done, (EngineError, Work)> {
        let stopped = || EngineError::Stopped {
            model: self.inner.name.clone(),
        };
        let mut delay = Duration::from_millis(1);
        let mut job = Job {
            model: self.active(),
            work,
            reply: oneshot::channel().0,
        };
        loop {
            let (reply, rx) = oneshot::channel();
            job.reply = reply;
            job.model = self.active();
            match self.inner.tx.try_send(job) {
                Ok(()) => {
                    // A worker that died with the job took its stream along.
                    return rx.await.map_err(|_| (stopped(), Work::Batch(Vec::new())));
                }
                Err(crossbeam_channel::TrySendError::Full(back)) => {
                    job = back;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
                Err(crossbeam_channel::TrySendError::Disconnected(back)) => {
                    return Err((stopped(), back.work));
                }
            }
        }
    }

    /// False if any worker has been inside one inference for longer than `limit`.
    pub fn healthy(&self, limit: Duration) -> bool {
        let now = self.inner.epoch.elapsed().as_millis() as u64;
        self.inner.busy_since.iter().all(|b| {
            let since = b.load(Ordering::Relaxed);
            since == 0 || now.saturating_sub(since) < limit.as_millis() as u64
        })
    }
}

fn worker(w: usize, rx: crossbeam_channel::Receiver<Job>, pool: std::sync::Weak<Inner>) {
    loop {
        // Blocks until a job comes or the pool (the only sender) is gone: an idle worker never
        // wakes (a timed wait spun and yielded twice a second in every idle box).
        let Ok(job) = rx.recv() else { return };
        let Some(inner) = pool.upgrade() else { return };
        let started = inner.epoch.elapsed().as_millis() as u64;
        inner.busy_since[w].store(started.max(1), Ordering::Relaxed);
        crate::crash_point("infer");
        let done = match job.work {
            Work::One(input, stream) => {
                let (result, stream) = run_one(&job.model, &input, stream);
                inner.count(&result);
                job.model.outcomes.record(&input, &result);
                Done::One((result, stream))
            }
            Work::Batch(inputs) => {
                // infer_batch guards each input itself; this catches what is left.
                let answers = caught(job.model.name(), || Ok(job.model.infer_batch(&inputs)))
                    .unwrap_or_else(|e| inputs.iter().map(|_| Err(e.clone())).collect());
                for (input, result) in inputs.iter().zip(&answers) {
                    inner.count(result);
                    job.model.outcomes.record(input, result);
                }
                Done::Batch(answers)
            }
        };
        inner.busy_since[w].store(0, Ordering::Relaxed);
        drop(inner);
        // The requester may have given up; that is not an error here.
        let _ = job.reply.send(done);
    }
}

/// One input on `model`, as a step of `stream` if given, a panic turned into an error.
fn run_one(
    model: &Model,
    input: &Input,
    mut stream: Option<Stream>,
) -> (Result<Prediction, EngineError>, Option<Stream>) {
    // tract is large and sees untrusted inputs: a panic in one inference must become an
    // error for that request, not a dead worker or a dead daemon.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &mut stream {
        Some(s) => model.infer_in(input, s),
        None => model.infer(input),
    }))
    .unwrap_or_else(|panic| {
        // A state left half-updated by a panic is not carried on.
        stream = stream.take().map(|_| model.stream());
        Err(EngineError::Run {
            model: model.name().to_string(),
            message: panic_message(&panic),
        })
    });
    (result, stream)
}

impl Inner {
    /// Count one answer in the pool's statistics.
    fn count(&self, result: &Result<Prediction, EngineError>) {
        match result {
            Ok(p) => {
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                self.stats.latencies.record(p.latency_us);
                self.stats.durations.record(p.latency_us);
            }
            Err(
                e @ (EngineError::Input { .. }
                | EngineError::Unreadable { .. }
                | EngineError::Shape { .. }),
            ) => {
                self.stats.bad_input.fetch_add(1, Ordering::Relaxed);
                self.stats.error(e);
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.stats.error(e);
            }
        }
    }
}

/// `f`, a panic in it made a run error of `model`: tract is large and sees untrusted inputs,
/// so a panic in one inference must become an error for that request, not a dead worker or
/// a dead daemon.
pub(crate) fn caught<T>(
    model: &str,
    f: impl FnOnce() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(EngineError::Run {
            model: model.to_string(),
            message: panic_message(&*panic),
        })
    })
}

/// The text of a panic payload, for an error message.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into());
    format!("panicked: {text}")
}
