//! Shadow evaluation: a candidate version runs beside the active one on a sample of the live
//! inputs, and its answers are compared with the active version's.
//!
//! ```text
//!  pipeline ── live answer ──► results (never waits for the shadow)
//!      │
//!      └─ sampled: input + live answer ─(try_send, queue of 2; full => dropped)─► shadow thread
//!                                        (SCHED_IDLE, rests to stay within its CPU share)
//!                                        candidate answer ─► compare ─► tally ─► rule ─► verdict
//! ```
//!
//! The tally is kept in SQLite (`shadows`) by the shadow task every half second, so a restart
//! goes on from where the last flush left it; a verdict is recorded with its event in one
//! transaction before anyone acts on it. A shadow an update started is acted on by the
//! updater (the normal activation path, or the candidate marked failed); one started by
//! `models.shadow` is acted on by the shadow task (activated, or marked failed).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tern_update::bundle::ShadowSpec;

use crate::engine::{EngineError, Input, Model, Prediction};

/// Sampled inputs that may wait for the shadow; more are dropped, so the live path never
/// waits and the shadow never falls far behind.
const QUEUE: usize = 2;
/// Latencies kept for the 90th percentiles.
const LATENCIES: usize = 1024;
/// The longest rest after one input, whatever it cost.
const MAX_REST: Duration = Duration::from_secs(10);
/// How far two detections' boxes must overlap (intersection over union) to be the same box.
pub const BOX_IOU: f64 = 0.5;
/// How close two scores of a score output without a threshold must be to agree.
pub const SCORE_TOLERANCE: f64 = 0.05;

/// Who started a shadow, and so who acts on its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// An update whose manifest asked for a shadow: the updater acts.
    Update,
    /// `models.shadow`: the shadow task acts.
    Command,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Update => "update",
            Origin::Command => "command",
        }
    }
}

/// A shadow's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub promote: bool,
    /// `rule` or `operator`.
    pub by: String,
    pub reason: String,
}

/// What the comparison has counted so far, against one live version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tally {
    /// The live version compared with; a new one starts the count over.
    pub against: Option<String>,
    /// Inputs both ran (the candidate's errors included, as disagreements).
    pub samples: u64,
    pub agreed: u64,
    pub errors: u64,
    /// Sampled inputs dropped because the shadow was still busy (load, or its CPU share).
    pub dropped: u64,
    /// Absolute differences of the top-1 scores, where both had one.
    pub score_diff_sum: f64,
    pub score_diff_max: f64,
    pub scored: u64,
    /// Detections: boxes of each side, and pairs matched (same label, IoU >= 0.5).
    pub boxes_live: u64,
    pub boxes_candidate: u64,
    pub boxes_matched: u64,
    pub last_error: Option<String>,
    /// Recent latencies, microseconds: the candidate's, and the live answers' it was fed.
    pub latency_us: VecDeque<u64>,
    pub live_latency_us: VecDeque<u64>,
}

fn p90_ms(v: &VecDeque<u64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s: Vec<u64> = v.iter().copied().collect();
    s.sort_unstable();
    let i = ((s.len() as f64 * 0.9).ceil() as usize).clamp(1, s.len()) - 1;
    Some(s[i] as f64 / 1000.0)
}

fn keep(v: &mut VecDeque<u64>, x: u64) {
    if v.len() == LATENCIES {
        v.pop_front();
    }
    v.push_back(x);
}

impl Tally {
    pub fn agreement(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.agreed as f64 / self.samples as f64)
    }

    pub fn latency_p90_ms(&self) -> Option<f64> {
        p90_ms(&self.latency_us)
    }

    /// Count one input: the live answer and the candidate's.
    pub fn add(&mut self, live: &Prediction, candidate: &Result<Prediction, EngineError>) {
        if self.against.as_deref() != Some(live.version.as_str()) {
            // Answers of another live version say nothing about this one.
            let dropped = self.dropped;
            *self = Tally {
                against: Some(live.version.clone()),
                dropped,
                ..Tally::default()
            };
        }
        self.samples += 1;
        keep(&mut self.live_latency_us, live.latency_us);
        match candidate {
            Ok(c) => {
                keep(&mut self.latency_us, c.latency_us);
                let k = compare(live, c);
                self.agreed += u64::from(k.agree);
                if let Some(d) = k.score_diff {
                    self.scored += 1;
                    self.score_diff_sum += d;
                    self.score_diff_max = self.score_diff_max.max(d);
                }
                if let Some((l, c, m)) = k.boxes {
                    self.boxes_live += l;
                    self.boxes_candidate += c;
                    self.boxes_matched += m;
                }
            }
            Err(e) => {
                self.errors += 1;
                self.last_error = Some(e.to_string());
            }
        }
    }

    /// The rule's verdict, once it has enough samples.
    pub fn judge(&self, spec: &ShadowSpec) -> Option<Verdict> {
        let want = spec.agreement?;
        if self.samples < spec.samples {
            return None;
        }
        let agreement = self.agreement().unwrap_or(0.0);
        let figures = format!(
            "agreement {agreement:.4} over {} samples (rule >= {want})",
            self.samples
        );
        let latency = self.latency_p90_ms();
        let (promote, reason) = if agreement < want {
            (false, figures)
        } else {
            match (spec.latency_p90_ms, latency) {
                (Some(max), Some(got)) if got > max => (
                    false,
                    format!("latency p90 {got:.2} ms is over {max} ms; {figures}"),
                ),
                (Some(max), None) => (
                    false,
                    format!("no latency measured (every answer failed; rule p90 <= {max} ms)"),
                ),
                (Some(max), Some(got)) => (
                    true,
                    format!("{figures}, latency p90 {got:.2} ms <= {max} ms"),
                ),
                (None, _) => (true, figures),
            }
        };
        Some(Verdict {
            promote,
            by: "rule".into(),
            reason,
        })
    }
}

/// How one input's two answers compare.
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    pub agree: bool,
    pub score_diff: Option<f64>,
    /// Detections: (live boxes, candidate boxes, matched).
    pub boxes: Option<(u64, u64, u64)>,
}

/// Compare the live answer with the candidate's: every output the live one has must agree
/// (classes: the same top-1 label; boxes: each matched one to one by label and overlap; text:
/// the same text; a thresholded score: the same on/off; a bare score: within 0.05). Raw
/// outputs are not compared. A package of format 1 compares its classes.
pub fn compare(live: &Prediction, cand: &Prediction) -> Compared {
    let mut k = Compared {
        agree: true,
        score_diff: None,
        boxes: None,
    };
    if live.outputs.is_empty() {
        let (a, b) = (live.top.first(), cand.top.first());
        k.agree = a.map(|c| &c.label) == b.map(|c| &c.label);
        if let (Some(a), Some(b)) = (a, b) {
            k.score_diff = Some(f64::from((a.score - b.score).abs()));
        }
        return k;
    }
    for (name, l) in &live.outputs {
        let Some(c) = cand.outputs.get(name) else {
            k.agree = false;
            continue;
        };
        let top1 = |v: &Value| -> Option<(String, f64)> {
            let t = v.get("top")?.as_array()?.first()?;
            Some((
                t.get("label")?.as_str()?.to_string(),
                t.get("score")?.as_f64()?,
            ))
        };
        if let Some(lb) = l.get("boxes").and_then(Value::as_array) {
            let cb = c.get("boxes").and_then(Value::as_array);
            let cb: &[Value] = cb.map(Vec::as_slice).unwrap_or(&[]);
            let m = match_boxes(lb, cb);
            let (nl, nc) = (lb.len() as u64, cb.len() as u64);
            k.agree &= m == nl && m == nc;
            let b = k.boxes.get_or_insert((0, 0, 0));
            *b = (b.0 + nl, b.1 + nc, b.2 + m);
        } else if let Some(t) = l.get("text") {
            k.agree &= c.get("text") == Some(t);
        } else if l.get("top").is_some() {
            match (top1(l), top1(c)) {
                (Some((la, sa)), Some((lb, sb))) => {
                    k.agree &= la == lb;
                    k.score_diff = Some((sa - sb).abs());
                }
                (a, b) => k.agree &= a.is_none() && b.is_none(),
            }
        } else if let Some(steps) = l.get("steps").and_then(Value::as_array) {
            let other = c.get("steps").and_then(Value::as_array);
            let labels = |s: &[Value]| -> Vec<Option<Value>> {
                s.iter()
                    .map(|r| r.get(0).and_then(|t| t.get("label")).cloned())
                    .collect()
            };
            k.agree &= other.is_some_and(|o| labels(o) == labels(steps));
        } else if let Some(s) = l.get("score").and_then(Value::as_f64) {
            let o = c.get("score").and_then(Value::as_f64);
            match (l.get("on"), o) {
                (Some(on), Some(_)) => k.agree &= c.get("on") == Some(on),
                (None, Some(o)) => k.agree &= (s - o).abs() <= SCORE_TOLERANCE,
                (_, None) => k.agree = false,
            }
            if let Some(o) = o {
                k.score_diff = Some((s - o).abs());
            }
        }
    }
    k
}

/// Boxes matched one to one, greedily by overlap: same label and IoU >= [`BOX_IOU`].
fn match_boxes(live: &[Value], cand: &[Value]) -> u64 {
    let read = |b: &Value| -> Option<(String, [f64; 4])> {
        let f = |k: &str| b.get(k).and_then(Value::as_f64);
        Some((
            b.get("label")?.as_str()?.to_string(),
            [f("x0")?, f("y0")?, f("x1")?, f("y1")?],
        ))
    };
    let iou = |a: &[f64; 4], b: &[f64; 4]| {
        let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let inter = w * h;
        let area = |r: &[f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
        let union = area(a) + area(b) - inter;
        if union > 0.0 { inter / union } else { 0.0 }
    };
    let l: Vec<_> = live.iter().filter_map(read).collect();
    let c: Vec<_> = cand.iter().filter_map(read).collect();
    let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
    for (i, (la, a)) in l.iter().enumerate() {
        for (j, (lb, b)) in c.iter().enumerate() {
            let o = iou(a, b);
            if la == lb && o >= BOX_IOU {
                pairs.push((o, i, j));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut used_l, mut used_c) = (vec![false; l.len()], vec![false; c.len()]);
    let mut n = 0;
    for (_, i, j) in pairs {
        if !used_l[i] && !used_c[j] {
            used_l[i] = true;
            used_c[j] = true;
            n += 1;
        }
    }
    n
}

struct Job {
    input: Input,
    live: Prediction,
}

struct State {
    tally: Tally,
    verdict: Option<Verdict>,
    /// The verdict is in the database (and its event in the outbox).
    recorded: bool,
}

/// One candidate running as a shadow of its model's active version.
pub struct Shadow {
    pub model: String,
    pub version: String,
    pub origin: Origin,
    pub spec: ShadowSpec,
    pub started_ms: i64,
    candidate: Arc<Model>,
    tx: crossbeam_channel::Sender<Job>,
    offered: AtomicU64,
    /// Kept apart from the tally (and its lock): the live path counts its drops and reads
    /// whether there is a verdict without ever waiting for the shadow's thread.
    dropped: AtomicU64,
    decided: AtomicBool,
    /// Ended: a pool that still holds it (one a reload rebuilt meanwhile) feeds it nothing.
    ended: AtomicBool,
    state: Mutex<State>,
    /// Counted since the last flush.
    dirty: AtomicBool,
}

impl Shadow {
    /// Start `candidate`'s thread, going on from `tally` (and a verdict already recorded).
    pub fn start(
        origin: Origin,
        spec: ShadowSpec,
        candidate: Arc<Model>,
        started_ms: i64,
        tally: Tally,
        verdict: Option<Verdict>,
    ) -> Arc<Shadow> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let recorded = verdict.is_some();
        let dropped = AtomicU64::new(tally.dropped);
        let s = Arc::new(Shadow {
            model: candidate.name().to_string(),
            version: candidate.version().to_string(),
            origin,
            spec,
            started_ms,
            candidate,
            tx,
            offered: AtomicU64::new(0),
            dropped,
            decided: AtomicBool::new(recorded),
            ended: AtomicBool::new(false),
            state: Mutex::new(State {
                tally,
                verdict,
                recorded,
            }),
            dirty: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&s);
        std::thread::Builder::new()
            .name(format!("shadow-{}", s.model))
            .spawn(move || worker(rx, weak))
            .expect("spawning a shadow thread");
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this input (of the live stream) is one the shadow should see: `fraction` of
    /// them, evenly spread; none once there is a verdict.
    pub fn pick(&self) -> bool {
        let f = self.spec.fraction;
        let n = self.offered.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * f).floor() > (n * f).floor()
            && !self.decided.load(Ordering::Relaxed)
            && !self.ended.load(Ordering::Relaxed)
    }

    /// Hand a picked input and its live answer to the shadow; dropped if it is still busy.
    pub fn offer(&self, input: Input, live: Prediction) {
        if let Err(crossbeam_channel::TrySendError::Full(_)) = self.tx.try_send(Job { input, live })
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// The operator's word; false if there is a verdict already.
    pub fn decide(&self, promote: bool, reason: &str) -> bool {
        let mut s = self.lock();
        if s.verdict.is_some() {
            return false;
        }
        s.verdict = Some(Verdict {
            promote,
            by: "operator".into(),
            reason: reason.to_string(),
        });
        self.decided.store(true, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
        true
    }

    /// The verdict once it is recorded.
    pub fn recorded_verdict(&self) -> Option<Verdict> {
        let s = self.lock();
        s.recorded.then(|| s.verdict.clone()).flatten()
    }

    /// What to write: the tally, and a verdict not yet recorded. None if nothing changed.
    fn take_changes(&self) -> Option<(Tally, Option<Verdict>)> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return None;
        }
        let s = self.lock();
        let fresh = (!s.recorded).then(|| s.verdict.clone()).flatten();
        let mut t = s.tally.clone();
        t.dropped = self.dropped.load(Ordering::Relaxed);
        Some((t, fresh))
    }

    fn mark_recorded(&self) {
        self.lock().recorded = true;
    }

    /// For status, telemetry and metrics.
    pub fn report(&self) -> Value {
        let s = self.lock();
        let t = &s.tally;
        json!({
            "model": self.model,
            "version": self.version,
            "origin": self.origin.as_str(),
            "against": t.against,
            "spec": self.spec,
            "samples": t.samples,
            "agreed": t.agreed,
            "agreement": t.agreement(),
            "errors": t.errors,
            "dropped": self.dropped.load(Ordering::Relaxed),
            "score_diff_mean": (t.scored > 0).then(|| t.score_diff_sum / t.scored as f64),
            "score_diff_max": (t.scored > 0).then_some(t.score_diff_max),
            "boxes": (t.boxes_live + t.boxes_candidate > 0).then(|| json!({
                "live": t.boxes_live, "candidate": t.boxes_candidate, "matched": t.boxes_matched,
            })),
            "latency_p90_ms": t.latency_p90_ms(),
            "live_latency_p90_ms": p90_ms(&t.live_latency_us),
            "last_error": t.last_error,
            "verdict": s.verdict,
            "started_ms": self.started_ms,
        })
    }
}

fn worker(rx: crossbeam_channel::Receiver<Job>, shadow: Weak<Shadow>) {
    // SCHED_IDLE: any thread of the live path that wakes takes a core from it at once (at
    // nice 19 it would still wait out the scheduler's wake-up granularity, which showed in the
    // live model's 90th percentile in the shadow bench). Failing that, the lowest nice value.
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let nice = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle)
        .or_else(|_| set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, nice))
    {
        tracing::warn!(error = ?e, "shadow thread keeps its priority");
    }
    while let Ok(job) = rx.recv() {
        let Some(s) = shadow.upgrade() else { return };
        if job.live.version == s.version {
            // The candidate serves already (activated or rolled back to meanwhile): comparing
            // it with itself says nothing.
            continue;
        }
        let started = Instant::now();
        let cpu = thread_cpu();
        let model = s.candidate.clone();
        let mut answer =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.infer(&job.input)))
                .unwrap_or_else(|p| {
                    Err(EngineError::Run {
                        model: s.model.clone(),
                        message: crate::engine::panic_message(&*p),
                    })
                });
        let spent = started.elapsed();
        // Its latency is the CPU time it took: its wall time includes waiting for the cores
        // the live path took from it, which says nothing of the candidate.
        if let (Ok(p), Some(a), Some(b)) = (answer.as_mut(), cpu, thread_cpu()) {
            p.latency_us = b.saturating_sub(a).as_micros() as u64;
        }
        {
            let mut st = s.lock();
            if st.verdict.is_none() {
                st.tally.add(&job.live, &answer);
                st.verdict = st.tally.judge(&s.spec);
                if st.verdict.is_some() {
                    s.decided.store(true, Ordering::Relaxed);
                }
            }
        }
        s.dirty.store(true, Ordering::Relaxed);
        let share = s.spec.cpu_share;
        drop(s);
        // Rest so that the shadow's work stays within its share of one core; inputs picked
        // meanwhile find the queue full and are dropped.
        let rest = Duration::try_from_secs_f64(spent.as_secs_f64() * (1.0 - share) / share)
            .unwrap_or(MAX_REST)
            .min(MAX_REST);
        if !rest.is_zero() {
            std::thread::sleep(rest);
        }
    }
}

/// This thread's CPU time so far.
fn thread_cpu() -> Option<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
}

/// The shadows running, by model: one per model at a time.
#[derive(Clone, Default)]
pub struct Shadows {
    map: Arc<Mutex<BTreeMap<String, Arc<Shadow>>>>,
    /// One flush at a time: a verdict is written (and its event queued) once, and whoever
    /// asked for a flush finds it recorded when theirs returns.
    flushing: Arc<tokio::sync::Mutex<()>>,
    /// One start at a time: the check for a running shadow and the insert stay together.
    pub(crate) starting: Arc<tokio::sync::Mutex<()>>,
}

impl Shadows {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Shadow>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, model: &str) -> Option<Arc<Shadow>> {
        self.lock().get(model).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Shadow>> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn insert(&self, s: Arc<Shadow>) {
        self.lock().insert(s.model.clone(), s);
    }

    /// Take `model`'s shadow of `version` away (the thread ends once the pipelines let go).
    pub(crate) fn remove(&self, model: &str, version: &str) -> Option<Arc<Shadow>> {
        let mut m = self.lock();
        if m.get(model).is_some_and(|s| s.version == version) {
            let s = m.remove(model)?;
            s.ended.store(true, Ordering::Relaxed);
            return Some(s);
        }
        None
    }

    pub fn reports(&self) -> Vec<Value> {
        self.all().iter().map(|s| s.report()).collect()
    }
}

/// A shadow's row: its origin, spec, tally and verdict.
pub struct Row {
    pub origin: Origin,
    pub spec: ShadowSpec,
    pub state: String,
    pub tally: Tally,
    pub verdict: Option<Verdict>,
    pub started_ms: i64,
    pub acted: bool,
}

pub fn read_row(
    c: &rusqlite::Connection,
    model: &str,
    version: &str,
) -> rusqlite::Result<Option<Row>> {
    use rusqlite::OptionalExtension as _;
    c.query_row(
        "SELECT origin, spec, state, tally, verdict, started_ms, acted FROM shadows
         WHERE model = ?1 AND version = ?2",
        [model, version],
        |r| {
            let origin: String = r.get(0)?;
            let spec: String = r.get(1)?;
            let tally: String = r.get(3)?;
            let verdict: Option<String> = r.get(4)?;
            let bad = |e: serde_json::Error| {
                rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
            };
            let origin = match origin.as_str() {
                "update" => Origin::Update,
                "command" => Origin::Command,
                other => {
                    return Err(rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        format!("shadow origin `{other}`").into(),
                    ));
                }
            };
            Ok(Row {
                origin,
                spec: serde_json::from_str(&spec).map_err(bad)?,
                state: r.get(2)?,
                // A tally that cannot be read starts over rather than stopping the shadow.
                tally: serde_json::from_str(&tally).unwrap_or_default(),
                verdict: verdict
                    .map(|v| serde_json::from_str(&v))
                    .transpose()
                    .map_err(bad)?,
                started_ms: r.get(5)?,
                acted: r.get(6)?,
            })
        },
    )
    .optional()
}

/// Record a new shadow (or start a dropped one's count over).
pub fn write_new(c: &rusqlite::Connection, s: &Shadow) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO shadows
         (model, version, origin, spec, state, tally, verdict, started_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, 'running', ?5, NULL, ?6, ?6)",
        rusqlite::params![
            s.model,
            s.version,
            s.origin.as_str(),
            serde_json::to_string(&s.spec).expect("a spec serialises"),
            serde_json::to_string(&Tally::default()).expect("a tally serialises"),
            s.started_ms,
        ],
    )?;
    Ok(())
}

/// The shadows `models.shadow` started whose verdict was not acted on: to take up again.
pub fn open_by_command(c: &rusqlite::Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st =
        c.prepare("SELECT model, version FROM shadows WHERE origin = 'command' AND acted = 0")?;
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
}

/// How often tallies are written, and command shadows' verdicts acted on.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Keep the shadows' records and act on the verdicts of those `models.shadow` started: the
/// candidate activated, or marked failed.
pub async fn task(control: crate::control::Control, cancel: tokio_util::sync::CancellationToken) {
    let reg = control.registry().clone();
    let open = control
        .store()
        .call(|c| Ok(open_by_command(c)?))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "shadows not read; those left running stay stopped");
            Vec::new()
        });
    for (model, version) in open {
        let started = match semver::Version::parse(&version) {
            Ok(v) => reg.shadow_resume(&model, &v).await.map(|_| ()),
            Err(e) => Err(crate::registry::RegistryError::Shadow(e.to_string())),
        };
        if let Err(e) = started {
            if transient(&e) {
                tracing::error!(%model, %version, error = %e, "shadow not taken up again; tried at the next start");
                continue;
            }
            // Its version is gone or active already (promoted just before a power cut), or its
            // model is no longer served: it is not tried again at every start.
            tracing::warn!(%model, %version, error = %e, "shadow not taken up again; dropped");
            let done = control
                .store()
                .call(move |c| {
                    c.execute(
                        "UPDATE shadows SET acted = 1 WHERE model = ?1 AND version = ?2",
                        [model, version],
                    )?;
                    Ok(())
                })
                .await;
            if let Err(e) = done {
                tracing::warn!(error = %e, "shadow not marked as dropped");
            }
        }
    }
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        if let Err(e) = flush(reg.shadows(), control.store(), control.outbox()).await {
            tracing::warn!(error = %e, "shadow tallies not written; trying again");
        }
        if stop {
            return;
        }
        for s in reg.shadows().all() {
            if s.origin == Origin::Command
                && let Some(v) = s.recorded_verdict()
            {
                act(&control, &s, &v).await;
            }
        }
    }
}

/// The box's own trouble (its database, a change racing this one): worth another try.
fn transient(e: &crate::registry::RegistryError) -> bool {
    use crate::registry::RegistryError as E;
    matches!(e, E::Store(_) | E::Stopped | E::Moved { .. })
}

/// Activate a command shadow's candidate, or mark it failed; then stop the shadow.
async fn act(control: &crate::control::Control, s: &Shadow, v: &Verdict) {
    let reg = control.registry();
    let version = s.candidate.version().clone();
    if v.promote {
        let settings = reg
            .pool(&s.model)
            .map(|p| p.config())
            .unwrap_or_else(|| control.state().config.pools().get(&s.model));
        match reg.activate(&s.model, &version, settings).await {
            Ok(()) => {
                control
                    .event(json!({"event": "model.activated", "model": s.model,
                                  "version": s.version, "by": "shadow"}))
                    .await;
                control.local(crate::events::LocalEvent::ModelActivated {
                    model: s.model.clone(),
                    version: s.version.clone(),
                });
            }
            Err(e) if transient(&e) => {
                tracing::error!(model = %s.model, version = %s.version, error = %e, "promoted shadow not activated yet; trying again");
                return;
            }
            // It no longer loads (or is gone): the verdict stands, the version is marked
            // failed by the registry, and the operator sees why in the log and the list.
            Err(e) => {
                tracing::error!(model = %s.model, version = %s.version, error = %e, "promoted shadow cannot be activated")
            }
        }
    } else if v.by == "rule" {
        // The operator's drop only stops it; the rule's refusal keeps it from being served.
        let why = format!("shadow: {}", v.reason);
        if let Err(e) = reg.reject_active(&s.model, &version, &why).await {
            tracing::error!(model = %s.model, version = %s.version, error = %e, "rejected shadow not marked failed; trying again");
            return;
        }
    }
    // Marked as acted on; if that is lost, acting again after a restart changes nothing
    // (activating the active version, marking a failed one failed).
    reg.shadow_end(&s.model, &s.version).await;
}

/// Write what changed of every shadow: tallies, and each new verdict with its event in one
/// transaction. Returns the shadows whose verdict was recorded now.
pub async fn flush(
    shadows: &Shadows,
    store: &crate::store::Store,
    outbox: Option<&crate::outbox::Outbox>,
) -> Result<Vec<Arc<Shadow>>, crate::store::StoreError> {
    let _one = shadows.flushing.lock().await;
    let changed: Vec<(Arc<Shadow>, Tally, Option<Verdict>)> = shadows
        .all()
        .into_iter()
        .filter_map(|s| {
            let (t, v) = s.take_changes()?;
            Some((s, t, v))
        })
        .collect();
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    // Per shadow: model, version, tally (JSON), and a new verdict with the report it says.
    type Write = (String, String, String, Option<(Verdict, Value)>);
    let rows: Vec<Write> = changed
        .iter()
        .map(|(s, t, v)| {
            (
                s.model.clone(),
                s.version.clone(),
                serde_json::to_string(t).expect("a tally serialises"),
                v.clone().map(|v| (v, s.report())),
            )
        })
        .collect();
    let ob = outbox.cloned();
    let now = crate::store::now_ms();
    let written = store
        .call(move |c| {
            let tx = c.transaction()?;
            let mut any_event = false;
            for (model, version, tally, verdict) in &rows {
                tx.execute(
                    "UPDATE shadows SET tally = ?3, updated_ms = ?4 WHERE model = ?1 AND version = ?2",
                    rusqlite::params![model, version, tally, now],
                )?;
                let Some((v, report)) = verdict else { continue };
                // Only the first verdict of a row is written, and said.
                let said = tx.execute(
                    "UPDATE shadows SET state = ?3, verdict = ?4
                     WHERE model = ?1 AND version = ?2 AND verdict IS NULL",
                    rusqlite::params![
                        model,
                        version,
                        if v.promote { "promoted" } else { "rejected" },
                        serde_json::to_string(v).expect("a verdict serialises"),
                    ],
                )?;
                if let Some(ob) = ob.as_ref().filter(|_| said == 1) {
                    let event = if v.promote {
                        "shadow.promoted"
                    } else {
                        "shadow.rejected"
                    };
                    ob.event(
                        &tx,
                        json!({"event": event, "model": model, "version": version,
                               "by": v.by, "reason": v.reason, "shadow": report}),
                    )?;
                    any_event = true;
                }
            }
            tx.commit()?;
            Ok(any_event)
        })
        .await;
    match written {
        Ok(any_event) => {
            if any_event && let Some(ob) = outbox {
                ob.wake();
            }
            let mut decided = Vec::new();
            for (s, _, v) in changed {
                if let Some(v) = v {
                    tracing::info!(model = %s.model, version = %s.version, promote = v.promote, by = %v.by, reason = %v.reason, "shadow verdict");
                    s.mark_recorded();
                    decided.push(s);
                }
            }
            Ok(decided)
        }
        Err(e) => {
            // Written next time.
            for (s, _, _) in &changed {
                s.dirty.store(true, Ordering::Relaxed);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Class;

    fn classes(version: &str, label: &str, score: f32, us: u64) -> Prediction {
        Prediction {
            model: "m".into(),
            version: version.into(),
            top: vec![Class {
                index: 0,
                label: label.into(),
                score,
            }],
            outputs: Default::default(),
            latency_us: us,
            batch: None,
        }
    }

    fn boxes(bs: &[(&str, [f64; 4])]) -> Prediction {
        let v: Vec<Value> = bs
            .iter()
            .map(|(l, b)| json!({"label": l, "score": 0.9, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]}))
            .collect();
        let mut p = classes("1", "x", 0.0, 10);
        p.top.clear();
        p.outputs.insert("dets".into(), json!({"boxes": v}));
        p
    }

    fn spec(agreement: f64, samples: u64, latency: Option<f64>) -> ShadowSpec {
        ShadowSpec::parse_pairs(&format!("agreement={agreement},samples={samples}"))
            .map(|mut s| {
                s.latency_p90_ms = latency;
                s
            })
            .unwrap()
    }

    #[test]
    fn the_rule_waits_for_its_samples_then_judges_agreement_and_latency() {
        let mut t = Tally::default();
        let rule = spec(0.9, 10, Some(5.0));
        for i in 0..9 {
            let cand = classes("2", if i == 0 { "b" } else { "a" }, 0.7, 2000);
            t.add(&classes("1", "a", 0.9, 1000), &Ok(cand));
            assert_eq!(t.judge(&rule), None, "after {} samples", t.samples);
        }
        t.add(
            &classes("1", "a", 0.9, 1000),
            &Ok(classes("2", "a", 0.5, 2000)),
        );
        let v = t.judge(&rule).unwrap();
        assert!(v.promote, "{v:?}");
        assert!(
            v.reason.contains("agreement 0.9000 over 10"),
            "{}",
            v.reason
        );
        assert!((t.score_diff_max - 0.4).abs() < 1e-6);
        // Too slow: refused even though it agrees.
        assert!(!t.judge(&spec(0.9, 10, Some(1.5))).unwrap().promote);
        // One disagreement more is under the rule.
        t.add(
            &classes("1", "a", 0.9, 1000),
            &Err(EngineError::Busy { model: "m".into() }),
        );
        let v = t.judge(&rule).unwrap();
        assert!(!v.promote && v.reason.contains("0.8182 over 11"), "{v:?}");
        assert_eq!((t.errors, t.samples, t.agreed), (1, 11, 9));
        // Without an agreement rule, only the operator decides.
        assert_eq!(
            t.judge(&ShadowSpec::parse_pairs("samples=1").unwrap()),
            None
        );
    }

    #[test]
    fn another_live_version_starts_the_count_over() {
        let mut t = Tally::default();
        t.add(&classes("1", "a", 0.9, 10), &Ok(classes("3", "b", 0.9, 10)));
        t.dropped = 4;
        t.add(&classes("2", "a", 0.9, 10), &Ok(classes("3", "a", 0.9, 10)));
        assert_eq!((t.samples, t.agreed, t.dropped), (1, 1, 4));
        assert_eq!(t.against.as_deref(), Some("2"));
    }

    #[test]
    fn detections_agree_when_every_box_matches_one_to_one() {
        let a = boxes(&[
            ("cat", [0.0, 0.0, 10.0, 10.0]),
            ("dog", [20.0, 20.0, 30.0, 30.0]),
        ]);
        let same = boxes(&[
            ("dog", [21.0, 20.0, 31.0, 30.0]),
            ("cat", [0.0, 1.0, 10.0, 11.0]),
        ]);
        assert_eq!(compare(&a, &same).boxes, Some((2, 2, 2)));
        assert!(compare(&a, &same).agree);
        // A box moved too far, a label changed, a box missing: each disagrees.
        let moved = boxes(&[
            ("cat", [6.0, 6.0, 16.0, 16.0]),
            ("dog", [20.0, 20.0, 30.0, 30.0]),
        ]);
        let relabelled = boxes(&[
            ("cat", [0.0, 0.0, 10.0, 10.0]),
            ("cat", [20.0, 20.0, 30.0, 30.0]),
        ]);
        let fewer = boxes(&[("cat", [0.0, 0.0, 10.0, 10.0])]);
        for (what, c) in [
            ("moved", moved),
            ("relabelled", relabelled),
            ("fewer", fewer),
        ] {
            let k = compare(&a, &c);
            assert!(!k.agree, "{what}: {k:?}");
            assert_eq!(k.boxes.unwrap().2, 1, "{what}");
        }
        // Two candidate boxes over one live box match it once.
        let one = boxes(&[("cat", [0.0, 0.0, 10.0, 10.0])]);
        let twice = boxes(&[
            ("cat", [0.0, 0.0, 10.0, 10.0]),
            ("cat", [0.0, 0.0, 10.0, 9.0]),
        ]);
        assert_eq!(compare(&one, &twice).boxes, Some((1, 2, 1)));
        assert!(!compare(&one, &twice).agree);
        assert!(compare(&boxes(&[]), &boxes(&[])).agree);
    }

    #[test]
    fn outputs_compare_by_kind() {
        let with = |o: Value| {
            let mut p = classes("1", "x", 0.0, 1);
            p.top.clear();
            p.outputs.insert("o".into(), o);
            p
        };
        let top = |l: &str, s: f64| with(json!({"top": [{"index": 0, "label": l, "score": s}]}));
        assert!(compare(&top("7", 0.9), &top("7", 0.6)).agree);
        assert!(!compare(&top("7", 0.9), &top("1", 0.9)).agree);
        let diff = compare(&top("7", 0.9), &top("7", 0.6)).score_diff.unwrap();
        assert!((diff - 0.3).abs() < 1e-9);
        assert!(compare(&with(json!({"text": "ab"})), &with(json!({"text": "ab"}))).agree);
        assert!(!compare(&with(json!({"text": "ab"})), &with(json!({"text": "a"}))).agree);
        let on = |s: f64, on: bool| with(json!({"score": s, "on": on}));
        assert!(compare(&on(0.9, true), &on(0.6, true)).agree);
        assert!(!compare(&on(0.9, true), &on(0.4, false)).agree);
        let bare = |s: f64| with(json!({"score": s}));
        assert!(compare(&bare(0.5), &bare(0.54)).agree);
        assert!(!compare(&bare(0.5), &bare(0.6)).agree);
        // An output the candidate lacks is a disagreement; a raw one is not compared.
        let mut missing = top("7", 0.9);
        missing.outputs.clear();
        missing.outputs.insert("other".into(), json!({}));
        assert!(!compare(&top("7", 0.9), &missing).agree);
        let raw = |v: f64| with(json!({"shape": [1], "values": [v], "truncated": false}));
        assert!(compare(&raw(1.0), &raw(2.0)).agree);
    }

    #[test]
    fn a_fraction_picks_evenly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../firmware-updates/models/digits-mlp-int8");
        let m = Model::load(&dir, std::num::NonZeroUsize::MIN).unwrap();
        let s = Shadow::start(
            Origin::Command,
            ShadowSpec::parse_pairs("fraction=0.25").unwrap(),
            Arc::new(m),
            0,
            Tally::default(),
            None,
        );
        // Its thread runs under SCHED_IDLE (policy 5, field 41 of its stat).
        let policy = || -> Option<String> {
            std::fs::read_dir("/proc/self/task").ok()?.find_map(|t| {
                let t = t.ok()?.path();
                let comm = std::fs::read_to_string(t.join("comm")).ok()?;
                if !comm.starts_with("shadow-digits") {
                    return None;
                }
                let stat = std::fs::read_to_string(t.join("stat")).ok()?;
                let after = stat.rsplit_once(')')?.1;
                after.split_whitespace().nth(38).map(str::to_string)
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while policy().as_deref() != Some("5") {
            assert!(std::time::Instant::now() < deadline, "{:?}", policy());
            std::thread::sleep(Duration::from_millis(10));
        }
        let picked = (0..100).filter(|_| s.pick()).count();
        assert_eq!(picked, 25);
        assert!(s.decide(false, "no"));
        assert!(!s.decide(true, "yes"), "a verdict stands");
        assert_eq!((0..100).filter(|_| s.pick()).count(), 0);
    }
}
