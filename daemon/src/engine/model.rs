//! The one place that speaks tract: load, optimise, self-test and run a model package.
//!
//! A tract upgrade should touch this file and no other.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{
    RunOptions, Runnable, Runtime as TractRuntime, runtime_for_name,
};
use tract_onnx::tract_hir::infer::Factoid;

use std::sync::Mutex;

use super::array::{Array, Data, read_npy_f32, read_npy_tree, read_npz};
use super::input::{Input, Prepared};
use super::manifest::{
    DType, Golden, InputSpec, MODEL_FILE, Manifest, Postprocess, Rule, const_values,
};
use super::pool::caught;
use super::postprocess::{self, Context, ScoreState};
use super::{EngineError, PlanChoice, Runtime};

/// ONNX files bigger than this are refused before tract reads them.
pub const MAX_MODEL_BYTES: u64 = 512 * 1024 * 1024;
/// Largest file an evaluation sample or reference may be.
const MAX_EVALUATION_INPUT_BYTES: u64 = 64 * 1024 * 1024;

/// A loaded, optimised, self-tested model, ready to run from any thread.
pub struct Model {
    /// Distinct for every loaded version in this process: a stream knows whose state it holds.
    id: u64,
    pub manifest: Manifest,
    pub dir: PathBuf,
    plans: Plans,
    /// ONNX Runtime's session, when that is the plan.
    #[cfg(feature = "onnxruntime")]
    ort: Option<super::onnxruntime::OrtPlan>,
    /// For each input of the typed model, in order: the manifest input it is.
    feeds: Vec<usize>,
    /// Each manifest input's values when it is a constant (baked into the graph) or the
    /// initial state.
    initial: Vec<Option<Tensor>>,
    /// For each output's `ctc` postprocessor: the charset's entries.
    charsets: Vec<Option<Vec<String>>>,
    /// Where it runs: `cpu` or `cuda`.
    pub runtime: &'static str,
    /// How it runs there (see [`Plan`]): `tract+fold`, `tract`, or the runtime's own.
    pub plan: &'static str,
    /// Why it runs on the CPU although `auto` was asked for (no GPU, no cuda in this build).
    pub fallback: Option<String>,
    /// Requests this loaded version answered and failed, wherever it ran: an update's health
    /// window judges the new version by its own outcomes, not its pool's.
    pub outcomes: Outcomes,
    /// Each plan tried at load: its golden-vector time, or why it could not serve. For a
    /// plan taken from a recorded choice, the times recorded when it was made.
    pub timings: Vec<String>,
    /// How the plan was chosen: `timed` (the fastest of those that passed), `recorded` (the
    /// choice made before for this package on this machine, self-tested again) or `only`
    /// (one plan allowed).
    pub chosen: &'static str,
}

/// The runnable plans of one model: one when every dimension is fixed, else one per distinct
/// set of named dimensions, made when first needed and kept (the most recent few).
struct Plans {
    kind: Plan,
    rt: &'static dyn TractRuntime,
    options: RunOptions,
    /// The graph before typing, when a dimension is named: each shape is typed and planned
    /// from it.
    base: Option<InferenceModel>,
    /// The named dimensions, in the order a plan's key lists their values.
    names: Vec<String>,
    cache: Mutex<Vec<Keyed>>,
    /// Shapes tract could not plan, and why: asked again, they fail at once.
    failed: Mutex<Vec<(Vec<usize>, String)>>,
}

/// Failed shapes a model remembers.
const MAX_FAILED_PLANS: usize = 32;

/// A plan and the named dimensions' values it was made for.
type Keyed = (Vec<usize>, Arc<dyn Runnable>);

/// Output values with their shape, as f32.
type Values = Vec<(Vec<usize>, Vec<f32>)>;

/// The plan choice `auto` made for a package: the plan and what each candidate measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPlan {
    pub plan: String,
    pub tried: Vec<String>,
}

/// What a load may choose from: `engine.plan`, the pool's workers (a session each on
/// onnxruntime), and the plan recorded for `auto` if any.
type Choice = (PlanChoice, usize, Option<Plan>);

/// Inputs one run takes at most, whatever a manifest's named batch allows (an unbounded
/// `"N"`): more would only pad more and hold a worker longer.
pub const MAX_BATCH: usize = 16;

/// Distinct shapes a model with named dimensions keeps plans for.
pub const MAX_PLANS_PER_MODEL: usize = 8;

/// What became of the requests one loaded version took. A health window judges the model,
/// not its callers: `failed` holds the version's own faults (a run error, a panic, and an input
/// its predecessor took but it refuses), `refused` the inputs that were the caller's fault
/// (undecodable, the wrong shape for either version), which anyone on the box can send.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub ok: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    /// The manifest of the version this one replaced, while its health window runs: an input
    /// this version refuses counts as its fault only if that manifest prepares it.
    baseline: Mutex<Option<Arc<Manifest>>>,
}

impl Outcomes {
    pub fn set_baseline(&self, manifest: Option<Arc<Manifest>>) {
        *self.baseline.lock().unwrap_or_else(|e| e.into_inner()) = manifest;
    }

    /// Count a request's outcome.
    pub fn record(&self, input: &Input, result: &Result<Prediction, EngineError>) {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = match result {
            Ok(_) => &self.ok,
            // Whoever sent it chose the shape, and the shapes the self-test ran were planned
            // before the version served: not the version's fault.
            Err(EngineError::Shape { .. }) => &self.refused,
            Err(EngineError::Input { .. } | EngineError::Unreadable { .. }) => {
                let baseline = self
                    .baseline
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                // The input is untrusted and the old manifest's preprocessing may take paths
                // the new one never reached: a panic there is the caller's input, not a dead
                // worker.
                let old_takes_it = baseline.is_some_and(|m| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        input.prepare(&m).is_ok()
                    }))
                    .unwrap_or(false)
                });
                if old_takes_it {
                    &self.failed
                } else {
                    &self.refused
                }
            }
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Relaxed);
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version.to_string())
            .field("dir", &self.dir)
            .finish()
    }
}

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Class {
    pub index: usize,
    pub label: String,
    pub score: f32,
}

/// An evaluation set's outcome on one loaded plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    pub rule: Rule,
    pub samples: usize,
    /// The rule's figure: accuracy (0..=1) or the largest difference.
    pub figure: f64,
    pub passed: bool,
    pub plan: &'static str,
}

impl std::fmt::Display for Evaluated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:.4} on {} samples (plan {}); the package requires {}",
            self.rule.name(),
            self.figure,
            self.samples,
            self.plan,
            self.rule
        )
    }
}

/// What a model said about one input.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Prediction {
    pub model: String,
    pub version: String,
    /// The classes of the first output whose postprocessor gives one distribution (`classify`
    /// over one position); empty when none does.
    pub top: Vec<Class>,
    /// Every declared output's postprocessed result, by output name (format 2 packages).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub outputs: serde_json::Map<String, serde_json::Value>,
    /// Time spent in tern (decode, preprocess, run, postprocess), microseconds; for an input
    /// run in a batch, until the batch's answers were ready.
    pub latency_us: u64,
    /// How many inputs ran together with this one (itself included), when more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
}

/// What a stream carries from one run to the next: the model's state tensors and each score
/// output's on/off state, for the one loaded version that made them.
pub struct Stream {
    model: u64,
    state: Vec<Option<Tensor>>,
    scores: Vec<ScoreState>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("model", &self.model)
            .finish()
    }
}

static NEXT_MODEL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Model {
    /// Load the package in `dir`: parse its manifest, load and optimise the ONNX model with
    /// `threads` threads for one inference, then run its golden vectors. A model that loads
    /// but answers differently from its reference outputs is refused here.
    pub fn load(dir: &Path, threads: NonZeroUsize) -> Result<Model, EngineError> {
        Self::load_on(dir, threads, Runtime::Cpu)
    }

    /// [`Model::load`] on a chosen runtime; the golden vectors run there too, so a backend
    /// that computes differently is caught before it serves.
    pub fn load_on(
        dir: &Path,
        threads: NonZeroUsize,
        runtime: Runtime,
    ) -> Result<Model, EngineError> {
        Self::load_planned(dir, threads, runtime, (PlanChoice::Auto, 1, None))
    }

    /// [`Model::load`] with the pool settings a box serves it with: threads, runtime, plans.
    pub fn load_for(dir: &Path, s: &super::PoolSettings) -> Result<Model, EngineError> {
        Self::load_recorded(dir, s, None)
    }

    /// [`Model::load_for`], given the plan `auto` chose for this package before on this
    /// machine with these settings: that plan alone is planned and self-tested, and its
    /// recorded `timings` stand, so a restart does not time every plan again. A recorded
    /// plan that no longer loads or passes is passed over, and every plan is timed as if
    /// nothing had been recorded.
    pub fn load_recorded(
        dir: &Path,
        s: &super::PoolSettings,
        recorded: Option<&RecordedPlan>,
    ) -> Result<Model, EngineError> {
        let choice = |recorded| (s.plan, s.workers.get(), recorded);
        let Some(r) = recorded.filter(|_| s.plan == PlanChoice::Auto) else {
            return Self::load_planned(dir, s.threads, s.runtime, choice(None));
        };
        let Some(plan) = Plan::named(&r.plan) else {
            tracing::warn!(dir = %dir.display(), plan = %r.plan, "recorded plan is unknown to this ternd; timing every plan");
            return Self::load_planned(dir, s.threads, s.runtime, choice(None));
        };
        match Self::load_planned(dir, s.threads, s.runtime, choice(Some(plan))) {
            Ok(mut m) if m.plan == plan.name() => {
                tracing::info!(model = %m.name(), plan = m.plan, "plan taken as recorded (self-tested, not timed)");
                m.timings = r.tried.clone();
                m.chosen = "recorded";
                Ok(m)
            }
            Ok(m) => Ok(m),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), plan = %r.plan, error = %e, "recorded plan no longer serves; timing every plan");
                Self::load_planned(dir, s.threads, s.runtime, choice(None))
            }
        }
    }

    /// [`Model::load`] with one CPU plan only (to compare plans).
    pub fn load_plan(dir: &Path, threads: NonZeroUsize, plan: Plan) -> Result<Model, EngineError> {
        let only = match plan {
            Plan::TractFolded => PlanChoice::TractFolded,
            Plan::TractFloat => PlanChoice::TractFloat,
            Plan::Onnxruntime => PlanChoice::Onnxruntime,
            Plan::Tract | Plan::Runtime => PlanChoice::Tract,
        };
        Self::load_planned(dir, threads, Runtime::Cpu, (only, 1, None))
    }

    fn load_planned(
        dir: &Path,
        threads: NonZeroUsize,
        runtime: Runtime,
        only: Choice,
    ) -> Result<Model, EngineError> {
        let (rt, fallback) = pick(runtime);
        let on_gpu = runtime == Runtime::Auto && fallback.is_none();
        match Self::guarded(dir, threads, rt, fallback, only) {
            // `auto` found a GPU, but the model would not load or pass its self-test there:
            // the CPU serves it, and says why.
            Err(e) if on_gpu => Self::guarded(
                dir,
                threads,
                Ok(cpu()),
                Some(format!("auto: on the CPU, it failed on cuda: {e}")),
                only,
            ),
            r => r,
        }
    }

    fn guarded(
        dir: &Path,
        threads: NonZeroUsize,
        rt: Result<&'static dyn TractRuntime, String>,
        fallback: Option<String>,
        only: Choice,
    ) -> Result<Model, EngineError> {
        // A malformed model must not take the daemon down if tract panics on it. The runtime
        // is tract's static, stateless entry point: a panic leaves nothing of it half-changed.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::load_inner(dir, threads, rt, fallback, only)
        }))
        .unwrap_or_else(|panic| {
            Err(EngineError::Load {
                model: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
                path: dir.join(MODEL_FILE),
                message: super::panic_message(&*panic),
            })
        })
    }

    fn load_inner(
        dir: &Path,
        threads: NonZeroUsize,
        rt: Result<&'static dyn TractRuntime, String>,
        fallback: Option<String>,
        only: Choice,
    ) -> Result<Model, EngineError> {
        let (only, workers, recorded) = only;
        let started = Instant::now();
        // Sessions per worker are onnxruntime's; tract's plans are shared by the workers.
        #[cfg(not(feature = "onnxruntime"))]
        let _ = workers;
        let manifest = Manifest::read(dir)?;
        let path = dir.join(MODEL_FILE);
        let load_err = |message: String| EngineError::Load {
            model: manifest.name.clone(),
            path: path.clone(),
            message,
        };
        let size = std::fs::metadata(&path)
            .map_err(|e| load_err(format!("cannot read: {e}")))?
            .len();
        if size > MAX_MODEL_BYTES {
            return Err(load_err(format!(
                "{size} bytes is over the {MAX_MODEL_BYTES}-byte limit"
            )));
        }
        let charsets = manifest
            .outputs
            .iter()
            .enumerate()
            .map(|(i, o)| match &o.postprocess {
                Postprocess::Ctc { charset, blank } => read_charset(&dir.join(charset))
                    .map_err(|e| load_err(format!("outputs[{i}].postprocess.charset: {e}")))
                    .and_then(|c| match *blank < c.len() {
                        true => Ok(Some(c)),
                        false => Err(load_err(format!(
                            "outputs[{i}].postprocess.blank: {blank} is not a class of the \
                             {}-entry charset",
                            c.len()
                        ))),
                    }),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Graph {
            model,
            initial,
            feeds,
            named,
            quantised,
        } = graph(&manifest, &path, false).map_err(load_err)?;
        let executor = if threads.get() > 1 {
            Executor::multithread_with_name(threads.get(), &format!("tract-{}", manifest.name))
        } else {
            Executor::SingleThread
        };
        let options = RunOptions {
            executor: Some(executor),
            ..RunOptions::default()
        };
        let rt = rt.map_err(load_err)?;
        // With every dimension fixed, the graph is typed once here; with named ones, each
        // shape is typed when first run (the golden vectors run the first ones).
        let typed_of = |model: InferenceModel| {
            if !named.is_empty() {
                return Ok((Some(model), None));
            }
            let typed = model
                .into_typed()
                .and_then(|m| m.into_decluttered())
                .map_err(|e| {
                    load_err(format!(
                        "cannot be typed: {}{}",
                        explain(&e),
                        symbolic_hint(&manifest)
                    ))
                })?;
            Ok::<_, EngineError>((None, Some(typed)))
        };
        // The plans to try. On the CPU with `auto`: tract with its constants folded after
        // optimisation, tract as it plans by itself, and ONNX Runtime when its library is
        // here. Every one whose outputs agree with the golden vectors is timed on them, and the
        // fastest serves; one plan alone is not timed.
        // A plan `auto` could not even try, and why: listed with the ones it timed.
        let mut unavailable = None;
        let plans: Vec<Plan> = match (rt.name().as_ref(), only) {
            ("cpu", PlanChoice::Auto) => {
                let mut p = vec![Plan::TractFolded, Plan::Tract];
                if quantised {
                    p.push(Plan::TractFloat);
                }
                match ort_available() {
                    Ok(()) => p.push(Plan::Onnxruntime),
                    Err(why) => unavailable = Some(format!("onnxruntime: {why}")),
                }
                p
            }
            ("cpu", PlanChoice::Tract) => vec![Plan::Tract],
            ("cpu", PlanChoice::TractFolded) => vec![Plan::TractFolded],
            ("cpu", PlanChoice::TractFloat) if !quantised => {
                return Err(load_err(
                    "plan `tract+float`: the model has nothing quantised to make float".into(),
                ));
            }
            ("cpu", PlanChoice::TractFloat) => vec![Plan::TractFloat],
            ("cpu", PlanChoice::Onnxruntime) => {
                ort_available().map_err(|why| load_err(format!("plan `onnxruntime`: {why}")))?;
                vec![Plan::Onnxruntime]
            }
            // onnxruntime runs on the CPU only: with cuda, the runtime's own plan.
            _ if only == PlanChoice::Onnxruntime => {
                return Err(load_err(format!(
                    "plan `onnxruntime` runs on the CPU; runtime `{}` was asked for",
                    rt.name()
                )));
            }
            _ => vec![Plan::Runtime],
        };
        let plans = match recorded {
            Some(r) if plans.contains(&r) => vec![r],
            _ => plans,
        };
        let timed = plans.len() > 1;
        let mut tried = Vec::new();
        let mut best: Option<(Model, Duration)> = None;
        let mut last_err = None;
        // tract's graph as the file has it, typed only if a plan needs it (a model tract cannot
        // type as int8 may still serve from its float rewrite or onnxruntime).
        let mut plain = plans
            .iter()
            .any(|p| matches!(p, Plan::TractFolded | Plan::Tract | Plan::Runtime))
            .then(|| typed_of(model));
        for (i, plan) in plans.iter().enumerate() {
            let last_tract = !plans[i + 1..]
                .iter()
                .any(|p| matches!(p, Plan::TractFolded | Plan::Tract | Plan::Runtime));
            let mut cache = Vec::new();
            let mut plan_base = None;
            #[cfg(feature = "onnxruntime")]
            let mut ort = None;
            if *plan == Plan::Onnxruntime {
                #[cfg(feature = "onnxruntime")]
                match super::onnxruntime::OrtPlan::load(&path, threads.get(), workers) {
                    Ok(o) => ort = Some(o),
                    Err(e) => {
                        tried.push(format!("onnxruntime: {e}"));
                        last_err = Some(load_err(format!("cannot be planned on onnxruntime: {e}")));
                        continue;
                    }
                }
            } else if let Some(model) = match plan {
                // The float plan types its own, rewritten graph.
                Plan::TractFloat => match graph(&manifest, &path, true)
                    .map_err(load_err)
                    .and_then(|g| typed_of(g.model))
                {
                    Ok((b, t)) => {
                        plan_base = b;
                        t
                    }
                    Err(e) => {
                        tried.push(format!("{}: {e}", plan.name()));
                        last_err = Some(e);
                        continue;
                    }
                },
                _ => match &mut plain {
                    Some(Ok((b, t))) => {
                        plan_base = b.clone();
                        // The last tract plan may take the typed graph; those before copy it.
                        if last_tract { t.take() } else { t.clone() }
                    }
                    Some(Err(e)) => {
                        tried.push(format!("{}: {e}", plan.name()));
                        last_err = Some(e.clone());
                        continue;
                    }
                    None => None,
                },
            } {
                // A plan tract panics on is passed over like one it refuses.
                let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    plan.prepare(rt, model, &options)
                }))
                .unwrap_or_else(|p| Err(TractError::msg(super::panic_message(&*p))));
                match prepared {
                    Ok(r) => cache.push((Vec::new(), r)),
                    Err(e) => {
                        tried.push(format!("{}: {e:#}", plan.name()));
                        last_err = Some(load_err(format!(
                            "cannot be planned on {}: {e:#}",
                            rt.name()
                        )));
                        continue;
                    }
                }
            }
            let model = Model {
                manifest: manifest.clone(),
                dir: dir.to_path_buf(),
                #[cfg(feature = "onnxruntime")]
                ort,
                plans: Plans {
                    kind: *plan,
                    rt,
                    options: options.clone(),
                    base: plan_base,
                    names: named.clone(),
                    cache: Mutex::new(cache),
                    failed: Mutex::new(Vec::new()),
                },
                feeds: feeds.clone(),
                initial: initial.clone(),
                charsets: charsets.clone(),
                runtime: match (plan, rt.name().as_ref()) {
                    (Plan::Onnxruntime, _) | (_, "cpu") => "cpu",
                    _ => "cuda",
                },
                plan: plan.name(),
                fallback: fallback.clone(),
                outcomes: Outcomes::default(),
                id: NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                timings: Vec::new(),
                chosen: if timed { "timed" } else { "only" },
            };
            // Checked on the golden vectors, then (with rivals) timed on their inputs; a panic
            // in either passes the plan over like a refusal.
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let inputs = model.check_golden()?;
                match timed {
                    true => model.time_golden(&inputs).map(Some),
                    false => Ok(None),
                }
            }))
            .unwrap_or_else(|p| Err(load_err(format!("panicked: {}", super::panic_message(&*p)))));
            let took = match verdict {
                Ok(Some(t)) => t,
                Ok(None) => {
                    best = Some((model, Duration::ZERO));
                    break;
                }
                Err(e) => {
                    tried.push(format!("{}: {e}", plan.name()));
                    last_err = Some(e);
                    continue;
                }
            };
            tried.push(format!("{}: {} µs", plan.name(), took.as_micros()));
            if best.as_ref().is_none_or(|(_, b)| took < *b) {
                best = Some((model, took));
            }
        }
        if timed {
            tried.extend(unavailable);
        }
        let Some((mut model, _)) = best else {
            return Err(last_err.expect("a plan that was not chosen says why"));
        };
        if !tried.is_empty() {
            tracing::info!(
                model = %manifest.name,
                plan = model.plan,
                tried = %tried.join("; "),
                took_ms = started.elapsed().as_millis() as u64,
                "plan chosen"
            );
        }
        model.timings = tried;
        Ok(model)
    }

    /// The golden inputs' run time on this plan: the median of rounds over all of them, after
    /// one to warm up, until a third of a second has passed (at least one round, at most 25).
    fn time_golden(&self, inputs: &[Prepared]) -> Result<Duration, EngineError> {
        let round = || -> Result<Duration, EngineError> {
            let start = Instant::now();
            for p in inputs {
                self.run_prepared(p, &mut self.stream())?;
            }
            Ok(start.elapsed())
        };
        round()?;
        let budget = Instant::now();
        let mut rounds = Vec::new();
        while rounds.is_empty()
            || (rounds.len() < 25 && budget.elapsed() < Duration::from_millis(300))
        {
            rounds.push(round()?);
        }
        rounds.sort();
        Ok(rounds[rounds.len() / 2])
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn version(&self) -> &semver::Version {
        &self.manifest.version
    }

    /// Run every golden vector and compare with the reference outputs.
    pub fn self_test(&self) -> Result<(), EngineError> {
        self.check_golden().map(drop)
    }

    /// Run the package's evaluation set (if it has one) on this plan and judge it by its
    /// rule: `Ok(None)` without a set, the figure and verdict otherwise, or why a sample could
    /// not be run (a refusal too).
    pub fn evaluate(&self) -> Result<Option<Evaluated>, EngineError> {
        let m = &self.manifest;
        // A panic on a sample (a decoder, a kernel) refuses the version like a miss, rather
        // than taking the install down with it.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.evaluate_set()))
            .unwrap_or_else(|p| {
                Err(EngineError::Evaluation {
                    model: m.name.clone(),
                    message: format!("panicked: {}", super::panic_message(&*p)),
                })
            })
    }

    /// The answers to the package's evaluation samples (`Ok(None)` without a set): what the
    /// version says on the data it was judged by, a baseline for drift.
    pub fn evaluation_answers(&self) -> Result<Option<Vec<Prediction>>, EngineError> {
        let m = &self.manifest;
        let Some(set) = &m.evaluation else {
            return Ok(None);
        };
        let run = || {
            set.samples
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Input::from_file(&self.dir.join(&s.input), MAX_EVALUATION_INPUT_BYTES)
                        .and_then(|input| self.infer(&input))
                        .map_err(|e| EngineError::Evaluation {
                            model: m.name.clone(),
                            message: format!("sample {i}: {}: {e}", s.input.display()),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .unwrap_or_else(|p| {
                Err(EngineError::Evaluation {
                    model: m.name.clone(),
                    message: format!("panicked: {}", super::panic_message(&*p)),
                })
            })
            .map(Some)
    }

    fn evaluate_set(&self) -> Result<Option<Evaluated>, EngineError> {
        let m = &self.manifest;
        let Some(set) = &m.evaluation else {
            return Ok(None);
        };
        let rule = set.rule();
        let fail = |i: usize, message: String| EngineError::Evaluation {
            model: m.name.clone(),
            message: format!("sample {i}: {message}"),
        };
        let mut right = 0usize;
        let mut worst = 0f32;
        for (i, s) in set.samples.iter().enumerate() {
            // Read as `ternd infer` reads a file: by extension, bounded.
            let input = Input::from_file(&self.dir.join(&s.input), MAX_EVALUATION_INPUT_BYTES)
                .map_err(|e| fail(i, e.to_string()))?;
            match rule {
                Rule::Accuracy(_) => {
                    let p = self
                        .infer(&input)
                        .map_err(|e| fail(i, format!("{}: {e}", s.input.display())))?;
                    let want = s.label.as_deref().expect("checked when read");
                    right += usize::from(p.top.first().is_some_and(|c| c.label == want));
                }
                Rule::MaxDifference(_) => {
                    let reference = s.reference.as_ref().expect("checked when read");
                    let bytes = super::input::read_bounded(
                        &self.dir.join(reference),
                        MAX_EVALUATION_INPUT_BYTES,
                    )
                    .map_err(|e| fail(i, e.to_string()))?;
                    let want = super::array::read_npy(&bytes)
                        .map_err(|e| fail(i, format!("{}: {e}", reference.display())))?;
                    let prepared = input
                        .prepare(m)
                        .map_err(|e| fail(i, format!("{}: {e}", s.input.display())))?;
                    let (outputs, _) = self
                        .run_prepared(&prepared, &mut self.stream())
                        .map_err(|e| fail(i, e.to_string()))?;
                    let got = &outputs[0];
                    // The same values in the same order; leading 1s (a batch) may differ.
                    let trim = |s: &[usize]| -> Vec<usize> {
                        s.iter().copied().skip_while(|d| *d == 1).collect()
                    };
                    if trim(&got.0) != trim(&want.shape) {
                        return Err(fail(
                            i,
                            format!(
                                "output `{}` has shape {:?}, the reference {} {:?}",
                                m.outputs[0].name,
                                got.0,
                                reference.display(),
                                want.shape
                            ),
                        ));
                    }
                    let d =
                        max_difference(&m.outputs[0].name, got, &want).map_err(|e| fail(i, e))?;
                    worst = worst.max(d);
                }
            }
        }
        let n = set.samples.len();
        let figure = match rule {
            Rule::Accuracy(_) => right as f64 / n as f64,
            Rule::MaxDifference(_) => f64::from(worst),
        };
        Ok(Some(Evaluated {
            rule,
            samples: n,
            figure,
            passed: rule.met_by(figure),
            plan: self.plan,
        }))
    }

    /// [`Model::self_test`], returning each case's inputs as prepared, for timing the plan on
    /// them without reading the files again.
    fn check_golden(&self) -> Result<Vec<Prepared>, EngineError> {
        let m = &self.manifest;
        let mut cases = Vec::with_capacity(m.selftest.golden.len());
        for (i, g) in m.selftest.golden.iter().enumerate() {
            let fail = |message: String| EngineError::SelfTest {
                model: m.name.clone(),
                vector: i,
                message,
            };
            let read = |p: &Path| {
                std::fs::read(self.dir.join(p))
                    .map_err(|e| fail(format!("cannot read {}: {e}", p.display())))
            };
            // What the case feeds, the states it starts from, and what must come out.
            let (input, want) = match g {
                Golden::Pair { input, output } => {
                    let (shape, data) = read_npy_f32(&read(input)?)
                        .map_err(|e| fail(format!("{}: {e}", input.display())))?;
                    let (out_shape, out) = read_npy_f32(&read(output)?)
                        .map_err(|e| fail(format!("{}: {e}", output.display())))?;
                    let want = vec![(m.outputs[0].name.clone(), Array::f32(out_shape, out))];
                    (Input::Tensor { shape, data }, want)
                }
                Golden::Npz(p) => {
                    let full = self.dir.join(p);
                    let arrays = if full.is_dir() {
                        read_npy_tree(&full)
                    } else {
                        read_npz(&read(p)?)
                    }
                    .map_err(|e| fail(format!("{}: {e}", p.display())))?;
                    let (want, fed): (Vec<_>, Vec<_>) =
                        arrays.into_iter().partition(|(n, _)| n.starts_with("out/"));
                    let want = want
                        .into_iter()
                        .map(|(n, a)| (n["out/".len()..].to_string(), a))
                        .collect();
                    (Input::Arrays(fed), want)
                }
            };
            if want.is_empty() {
                return Err(fail("holds no reference output (`out/<name>`)".into()));
            }
            let prepared = input.prepare(m).map_err(|e| fail(e.to_string()))?;
            let (outputs, states) = self
                .run_prepared(&prepared, &mut self.stream())
                .map_err(|e| fail(e.to_string()))?;
            for (name, reference) in want {
                let got = if let Some(o) = m.outputs.iter().position(|o| o.name == name) {
                    &outputs[o]
                } else if let Some(s) = m.state.iter().position(|s| s.output == name) {
                    &states[s]
                } else {
                    return Err(fail(format!(
                        "reference `out/{name}` is neither a declared output nor a state output"
                    )));
                };
                compare(&name, got, &reference, m.selftest.tolerance).map_err(fail)?;
            }
            // Each postprocessor must read its output's shape, or every request would fail.
            let ctx_geometry = prepared.geometry;
            for (o, spec) in m.outputs.iter().enumerate() {
                let (shape, values) = &outputs[o];
                let ctx = Context {
                    charset: self.charsets[o].as_deref(),
                    geometry: ctx_geometry,
                };
                postprocess::apply(&spec.postprocess, shape, values.clone(), &ctx, &mut None)
                    .map_err(|e| {
                        let key = match m.format {
                            1 => "postprocess".to_string(),
                            _ => format!("outputs[{o}].postprocess"),
                        };
                        fail(format!("{key}: output `{}`: {}", spec.name, e.0))
                    })?;
            }
            cases.push(prepared);
        }
        Ok(cases)
    }

    /// A fresh stream: states at their initial values.
    pub fn stream(&self) -> Stream {
        Stream {
            model: self.id,
            state: vec![None; self.manifest.state.len()],
            scores: vec![None; self.manifest.outputs.len()],
        }
    }

    fn state_input(&self, pair: usize) -> usize {
        let name = &self.manifest.state[pair].input;
        self.manifest
            .inputs
            .iter()
            .position(|i| &i.name == name)
            .expect("checked when the manifest was read")
    }

    /// Run prepared inputs with a stream's states; returns each declared output and each state
    /// output as (shape, values), and keeps the new states in the stream.
    fn run_prepared(
        &self,
        p: &Prepared,
        stream: &mut Stream,
    ) -> Result<(Values, Values), EngineError> {
        let m = &self.manifest;
        let run_err = |message: String| EngineError::Run {
            model: m.name.clone(),
            message,
        };
        let mut named = std::collections::HashMap::new();
        let mut values: TVec<TValue> = TVec::new();
        for &ix in &self.feeds {
            let spec = &m.inputs[ix];
            let t = if let Some((_, a)) = p.arrays.iter().find(|(i, _)| *i == ix) {
                for (d, n) in spec.shape.iter().zip(&a.shape) {
                    if let super::manifest::Dim::Named { name, .. } = d {
                        named.insert(name.clone(), *n);
                    }
                }
                tensor(spec, a.clone()).map_err(|e| EngineError::Input { message: e })?
            } else if let Some(pair) = m.state.iter().position(|s| s.input == spec.name) {
                match &stream.state[pair] {
                    Some(t) => t.clone(),
                    None => self.initial[ix]
                        .clone()
                        .expect("states have initial values"),
                }
            } else {
                return Err(EngineError::Input {
                    message: format!("no value for input `{}` of model `{}`", spec.name, m.name),
                });
            };
            values.push(t.into());
        }
        let key: Vec<usize> = self
            .plans
            .names
            .iter()
            .map(|n| named.get(n).copied().unwrap_or(0))
            .collect();
        #[cfg(feature = "onnxruntime")]
        let ort = self.ort.as_ref();
        #[cfg(not(feature = "onnxruntime"))]
        let ort: Option<&()> = None;
        let out = match ort {
            #[cfg(feature = "onnxruntime")]
            Some(o) => self.run_ort(o, values).map_err(run_err)?,
            #[cfg(not(feature = "onnxruntime"))]
            Some(_) => unreachable!("no onnxruntime in this build"),
            None => {
                let runnable = self.plans.get(&key, m, &self.feeds, &named)?;
                runnable
                    .run(values)
                    .map_err(|e| run_err(format!("{e:#}")))?
            }
        };
        let n_out = m.outputs.len();
        if out.len() != n_out + m.state.len() {
            return Err(run_err(format!(
                "gave {} outputs, {} were declared",
                out.len(),
                n_out + m.state.len()
            )));
        }
        let flat = |t: &TValue| -> Result<(Vec<usize>, Vec<f32>), EngineError> {
            let c = t
                .cast_to::<f32>()
                .map_err(|e| run_err(format!("output is not numeric: {e:#}")))?;
            let v = c
                .to_plain_array_view::<f32>()
                .map_err(|e| run_err(format!("{e:#}")))?;
            Ok((t.shape().to_vec(), contiguous(&v)))
        };
        let outputs = out[..n_out]
            .iter()
            .map(flat)
            .collect::<Result<Vec<_>, _>>()?;
        // Every state is checked before any is kept: a failed step leaves the stream as it was.
        let mut states = Vec::with_capacity(m.state.len());
        let mut next_states = Vec::with_capacity(m.state.len());
        for (pair, s) in m.state.iter().enumerate() {
            let t = &out[n_out + pair];
            let want = &m.inputs[self.state_input(pair)];
            let want_shape = want.concrete_shape(&named);
            if t.shape() != want_shape.as_slice() {
                return Err(run_err(format!(
                    "state[{pair}]: output `{}` has shape {:?} but input `{}` takes {:?}; \
                     the pair in [[state]] does not match",
                    s.output,
                    t.shape(),
                    s.input,
                    want_shape
                )));
            }
            states.push(flat(t)?);
            let dt = datum(want.dtype);
            let next = t
                .cast_to_dt(dt)
                .map_err(|e| run_err(format!("{e:#}")))?
                .into_owned();
            next_states.push(Some(next));
        }
        stream.state = next_states;
        Ok((outputs, states))
    }

    /// The graph's inputs (constants too: ONNX Runtime has them fed, tract baked them in) by
    /// name to ONNX Runtime; its declared then state outputs as tract values.
    #[cfg(feature = "onnxruntime")]
    fn run_ort(
        &self,
        o: &super::onnxruntime::OrtPlan,
        values: TVec<TValue>,
    ) -> Result<TVec<TValue>, String> {
        let m = &self.manifest;
        let f16 = |ix: usize| m.inputs[ix].dtype == DType::F16;
        let mut inputs: Vec<(String, Array, bool)> = self
            .feeds
            .iter()
            .zip(values.iter())
            .map(|(&ix, v)| Ok((m.inputs[ix].name.clone(), array_of(v)?, f16(ix))))
            .collect::<Result<_, String>>()?;
        for (ix, spec) in m.inputs.iter().enumerate() {
            if spec.value.is_some()
                && let Some(t) = &self.initial[ix]
            {
                inputs.push((spec.name.clone(), array_of(t)?, f16(ix)));
            }
        }
        let names: Vec<&str> = m
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .chain(m.state.iter().map(|s| s.output.as_str()))
            .collect();
        o.run(inputs, &names)?
            .into_iter()
            .map(|a| plain_tensor(a).map(TValue::from))
            .collect()
    }

    /// Run prepared inputs from the initial state; the first declared output's values.
    pub fn run(&self, p: Prepared) -> Result<Vec<f32>, EngineError> {
        let (mut outputs, _) = self.run_prepared(&p, &mut self.stream())?;
        Ok(outputs.swap_remove(0).1)
    }

    /// Decode, preprocess, run and postprocess one input, from the initial state.
    pub fn infer(&self, input: &Input) -> Result<Prediction, EngineError> {
        self.infer_in(input, &mut self.stream())
    }

    /// [`Model::infer`] as one step of a stream: states and score events carry on from the
    /// stream's previous step.
    pub fn infer_in(&self, input: &Input, stream: &mut Stream) -> Result<Prediction, EngineError> {
        let start = Instant::now();
        if stream.model != self.id {
            // Another version's state means nothing to this one (an update or a rollback
            // swapped it in): the stream starts over.
            *stream = self.stream();
        }
        let prepared = input.prepare(&self.manifest)?;
        let (outputs, _) = self.run_prepared(&prepared, stream)?;
        self.predict(outputs, prepared.geometry, stream, start)
    }

    /// Several inputs, each answered as [`Model::infer`] would, run together in batches of the
    /// manifest's named batch (see [`Manifest::batch`]; at most [`MAX_BATCH`]), each padded
    /// with zeros to the largest named sides of its batch (what PaddleOCR does for text
    /// lines); a model without one runs them one by one. An input that cannot be prepared, or
    /// panics, fails alone, and a batch that fails to run is run again one input at a time, so
    /// one bad input never costs the others. An input's latency is its own preparation and its
    /// batch's run and postprocessing.
    pub fn infer_batch(&self, inputs: &[Input]) -> Vec<Result<Prediction, EngineError>> {
        let Some((_, most)) = self.manifest.batch_bound() else {
            return inputs
                .iter()
                .map(|i| caught(self.name(), || self.infer(i)))
                .collect();
        };
        let mut out: Vec<Option<Result<Prediction, EngineError>>> =
            inputs.iter().map(|_| None).collect();
        let mut ready = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let start = Instant::now();
            match caught(self.name(), || input.prepare(&self.manifest)) {
                Ok(p) => ready.push((i, p, start.elapsed())),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        // Inputs of like size together pad least.
        ready.sort_by_key(|(_, p, _)| p.arrays.first().map_or(0, |(_, a)| a.data.len()));
        for group in ready.chunks(most.clamp(1, MAX_BATCH)) {
            let began = Instant::now();
            // When each input's answer began: its preparation before the batch's run.
            let since = |prep: &Duration| began.checked_sub(*prep).unwrap_or(began);
            let together = match group.len() {
                1 => None,
                _ => caught(self.name(), || self.run_together(group, &since))
                    .inspect_err(|e| {
                        tracing::debug!(model = %self.name(), error = %e, "a batch failed; running its inputs one by one");
                    })
                    .ok(),
            };
            match together {
                Some(answers) => {
                    for ((i, _, _), a) in group.iter().zip(answers) {
                        out[*i] = Some(a);
                    }
                }
                None => {
                    for (i, p, prep) in group {
                        let start = Instant::now()
                            .checked_sub(*prep)
                            .unwrap_or_else(Instant::now);
                        out[*i] = Some(caught(self.name(), || {
                            let mut stream = self.stream();
                            let (o, _) = self.run_prepared(p, &mut stream)?;
                            self.predict(o, p.geometry, &mut stream, start)
                        }));
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.expect("every input is answered"))
            .collect()
    }

    /// One run of prepared single-sample inputs stacked along the batch, each padded with
    /// zeros to the largest of every dimension; each sample's answer from its slice of every
    /// output.
    fn run_together(
        &self,
        group: &[(usize, Prepared, Duration)],
        since: &dyn Fn(&Duration) -> Instant,
    ) -> Result<Vec<Result<Prediction, EngineError>>, EngineError> {
        let m = &self.manifest;
        let run_err = |message: String| EngineError::Run {
            model: m.name.clone(),
            message,
        };
        let n = group.len();
        let mut items = Vec::with_capacity(n);
        for (_, p, _) in group {
            match p.arrays.as_slice() {
                [
                    (
                        ix,
                        Array {
                            shape,
                            data: Data::F32(v),
                        },
                    ),
                ] if shape.first() == Some(&1) => items.push((*ix, shape.as_slice(), v.as_slice())),
                _ => return Err(run_err("a batch takes one f32 sample per input".into())),
            }
        }
        let ix = items[0].0;
        let rank = items[0].1.len();
        if items.iter().any(|(i, s, _)| *i != ix || s.len() != rank) {
            return Err(run_err("the samples of a batch differ in kind".into()));
        }
        let mut shape = vec![n; rank];
        for (d, side) in shape.iter_mut().enumerate().skip(1) {
            *side = items.iter().map(|(_, s, _)| s[d]).max().unwrap_or(0);
        }
        let per: usize = shape[1..].iter().product();
        let mut data = vec![0f32; n * per];
        for (k, (_, s, v)) in items.iter().enumerate() {
            pad_into(v, &s[1..], &mut data[k * per..(k + 1) * per], &shape[1..]);
        }
        let batched = Prepared {
            arrays: vec![(ix, Array::f32(shape.clone(), data))],
            geometry: None,
        };
        let (outputs, _) = self.run_prepared(&batched, &mut self.stream())?;
        for (o, (s, _)) in m.outputs.iter().zip(&outputs) {
            if s.first() != Some(&n) {
                return Err(run_err(format!(
                    "output `{}` has shape {s:?}: not one row per sample of a batch of {n}",
                    o.name
                )));
            }
        }
        // The model saw each image at the top left of the batch's larger canvas.
        let (h, w) = match m.inputs[ix].image.as_ref().map(|i| i.layout) {
            Some(super::manifest::Layout::Nchw) => (shape[2], shape[3]),
            Some(super::manifest::Layout::Nhwc) => (shape[1], shape[2]),
            _ => (0, 0),
        };
        Ok(group
            .iter()
            .enumerate()
            .map(|(k, (_, p, prep))| {
                let mine: Values = outputs
                    .iter()
                    .map(|(s, v)| {
                        let row = v.len() / n;
                        let mut one = s.clone();
                        one[0] = 1;
                        (one, v[k * row..(k + 1) * row].to_vec())
                    })
                    .collect();
                let geometry = p.geometry.map(|g| super::input::Geometry {
                    model_width: w as u32,
                    model_height: h as u32,
                    ..g
                });
                self.predict(mine, geometry, &mut self.stream(), since(prep))
                    .map(|p| Prediction {
                        batch: Some(n),
                        ..p
                    })
            })
            .collect())
    }

    /// A prediction from a run's declared outputs: each postprocessed, score events carried
    /// in `stream`.
    fn predict(
        &self,
        outputs: Values,
        geometry: Option<super::input::Geometry>,
        stream: &mut Stream,
        start: Instant,
    ) -> Result<Prediction, EngineError> {
        let m = &self.manifest;
        let mut top = Vec::new();
        let mut results = serde_json::Map::new();
        for (o, ((shape, values), spec)) in outputs.into_iter().zip(&m.outputs).enumerate() {
            let ctx = Context {
                charset: self.charsets[o].as_deref(),
                geometry,
            };
            let v = postprocess::apply(
                &spec.postprocess,
                &shape,
                values,
                &ctx,
                &mut stream.scores[o],
            )
            .map_err(|e| EngineError::Run {
                model: m.name.clone(),
                message: format!("output `{}`: {}", spec.name, e.0),
            })?;
            if top.is_empty()
                && let Some(t) = v.get("top")
            {
                top = serde_json::from_value(t.clone()).unwrap_or_default();
            }
            if m.format > 1 {
                results.insert(spec.name.clone(), v);
            }
        }
        Ok(Prediction {
            model: m.name.clone(),
            version: m.version.to_string(),
            top,
            outputs: results,
            latency_us: start.elapsed().as_micros() as u64,
            batch: None,
        })
    }

    /// Plans made so far (one per distinct shape of the named dimensions).
    pub fn plans_cached(&self) -> usize {
        self.plans.cache.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// Copy a row-major `src` of shape `from` into the start of every dimension of `dst`, of
/// shape `to` (each side at least `from`'s); the rest of `dst` is left as it was.
fn pad_into(src: &[f32], from: &[usize], dst: &mut [f32], to: &[usize]) {
    let Some((&row, outer)) = from.split_last() else {
        if let (Some(d), Some(s)) = (dst.first_mut(), src.first()) {
            *d = *s;
        }
        return;
    };
    let mut strides = vec![1usize; to.len()];
    for d in (0..to.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * to[d + 1];
    }
    let rows: usize = outer.iter().product();
    for r in 0..rows {
        let (mut rest, mut at) = (r, 0);
        for d in (0..outer.len()).rev() {
            at += (rest % outer[d]) * strides[d];
            rest /= outer[d];
        }
        dst[at..at + row].copy_from_slice(&src[r * row..(r + 1) * row]);
    }
}

/// An input's dimensions for tract: fixed ones, named ones with a value in `values`, and the
/// rest as symbols tract resolves from each run's input.
fn dims(
    spec: &InputSpec,
    values: &std::collections::HashMap<String, usize>,
    symbols: &tract_onnx::prelude::SymbolScope,
) -> Vec<TDim> {
    spec.shape
        .iter()
        .map(|d| match d {
            super::manifest::Dim::Fixed(n) => TDim::from(*n),
            super::manifest::Dim::Named { name, .. } => match values.get(name) {
                Some(v) => TDim::from(*v),
                None => TDim::from(symbols.sym(name)),
            },
        })
        .collect()
}

impl Plans {
    /// Type, optimise and plan the base graph for one set of values; outside every lock, so
    /// other shapes keep running.
    fn make(
        &self,
        base: &InferenceModel,
        m: &Manifest,
        feeds: &[usize],
        named: &std::collections::HashMap<String, usize>,
    ) -> Result<Arc<dyn Runnable>, String> {
        let mut model = base.clone();
        for (k, &ix) in feeds.iter().enumerate() {
            let spec = &m.inputs[ix];
            let shape = dims(spec, &self.per_value(named), &model.symbols);
            model
                .set_input_fact(k, InferenceFact::dt_shape(datum(spec.dtype), shape))
                .map_err(|e| format!("{e:#}"))?;
        }
        let typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| {
                format!(
                    "cannot be typed for {named:?}: {}{}",
                    explain(&e),
                    symbolic_hint(m)
                )
            })?;
        self.kind
            .prepare(self.rt, typed, &self.options)
            .map_err(|e| format!("cannot be planned for {named:?}: {e:#}"))
    }

    /// The values of the dimensions planned per value, out of every named one's.
    fn per_value(
        &self,
        named: &std::collections::HashMap<String, usize>,
    ) -> std::collections::HashMap<String, usize> {
        named
            .iter()
            .filter(|(k, _)| self.names.contains(k))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// The plan for one set of named dimensions' values, made now if it is not kept.
    fn get(
        &self,
        key: &[usize],
        m: &Manifest,
        feeds: &[usize],
        named: &std::collections::HashMap<String, usize>,
    ) -> Result<Arc<dyn Runnable>, EngineError> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = cache.iter().position(|(k, _)| k == key) {
                // Most recently used last: the first one is what a full cache drops.
                let hit = cache.remove(i);
                let r = hit.1.clone();
                cache.push(hit);
                return Ok(r);
            }
        }
        let Some(base) = &self.base else {
            return Err(EngineError::Run {
                model: m.name.clone(),
                message: "no plan for a fixed-shape model".into(),
            });
        };
        let load_err = |message: String| EngineError::Shape {
            model: m.name.clone(),
            message,
        };
        {
            let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, why)) = failed.iter().find(|(k, _)| k == key) {
                return Err(load_err(why.clone()));
            }
        }
        let made = self.make(base, m, feeds, named);
        let r = match made {
            Ok(r) => r,
            Err(why) => {
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                if failed.len() >= MAX_FAILED_PLANS {
                    failed.remove(0);
                }
                failed.push((key.to_vec(), why.clone()));
                return Err(load_err(why));
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        // Another worker may have made the same shape meanwhile: keep one.
        if let Some((_, made)) = cache.iter().find(|(k, _)| k == key) {
            return Ok(made.clone());
        }
        if cache.len() >= MAX_PLANS_PER_MODEL {
            cache.remove(0);
        }
        cache.push((key.to_vec(), r.clone()));
        Ok(r)
    }
}

/// One input or output of an ONNX graph as its file declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxTensor {
    pub name: String,
    /// tern's name for the element type, or ONNX's number for one tern does not take.
    pub dtype: Result<DType, i32>,
    /// Each dimension: a number, or the name (possibly empty) the exporter left open.
    pub dims: Vec<Result<i64, String>>,
}

/// What `tern-update package init` reads from a model file.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxInfo {
    pub opset: i64,
    pub producer: String,
    pub inputs: Vec<OnnxTensor>,
    pub outputs: Vec<OnnxTensor>,
    /// The file's metadata keys (values can be long: a charset, say).
    pub metadata: Vec<String>,
}

/// The inputs and outputs an ONNX file declares, without loading the graph into tract.
pub fn describe_onnx(path: &Path) -> Result<OnnxInfo, EngineError> {
    let err = |message: String| EngineError::Load {
        model: path
            .file_stem()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        path: path.to_path_buf(),
        message,
    };
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| err(format!("not an ONNX model: {e:#}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| err("has no graph".into()))?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let tensor = |v: &tract_onnx::pb::ValueInfoProto| {
        use tract_onnx::pb::tensor_shape_proto::dimension::Value as D;
        use tract_onnx::pb::type_proto::Value;
        let (elem, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(Value::TensorType(t)) => (
                t.elem_type,
                t.shape
                    .as_ref()
                    .map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(D::DimValue(n)) if *n > 0 => Ok(*n),
                                Some(D::DimParam(p)) => Err(p.clone()),
                                _ => Err(String::new()),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            _ => (0, Vec::new()),
        };
        // ONNX TensorProto.DataType numbers.
        let dtype = match elem {
            1 => Ok(DType::F32),
            10 => Ok(DType::F16),
            7 => Ok(DType::I64),
            6 => Ok(DType::I32),
            2 => Ok(DType::U8),
            9 => Ok(DType::Bool),
            other => Err(other),
        };
        OnnxTensor {
            name: v.name.clone(),
            dtype,
            dims,
        }
    };
    Ok(OnnxInfo {
        opset: proto
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .unwrap_or(0),
        producer: format!("{} {}", proto.producer_name, proto.producer_version)
            .trim()
            .to_string(),
        inputs: graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(tensor)
            .collect(),
        outputs: graph.output.iter().map(tensor).collect(),
        metadata: proto.metadata_props.iter().map(|p| p.key.clone()).collect(),
    })
}

/// What to try when a model with `symbolic` dimensions cannot be typed.
fn symbolic_hint(m: &Manifest) -> &'static str {
    if m.inputs.iter().any(|i| !i.symbolic.is_empty()) {
        "; or a dimension in inputs[].symbolic cannot stay open in this model: remove it from \
         `symbolic` to plan each value"
    } else {
        ""
    }
}

/// Why tract refused a graph, with what to change when tern knows it.
fn explain(e: &TractError) -> String {
    let text = format!("{e:#}");
    if text.contains("without a determined fact") || text.contains("explicit input facts") {
        format!(
            "{text}; an input's dimensions are left open: give each one in the manifest's \
             inputs[].shape as a number, or as a name (\"W<=1280\") fixed per run"
        )
    } else if text.contains("shape input is variable") || text.contains("Reshape") {
        format!(
            "{text}; the graph computes shapes from an open dimension: fix it in \
             inputs[].shape (the batch is pinned to 1)"
        )
    } else {
        text
    }
}

/// The graph as tern runs it: constants baked in, inputs typed as the manifest declares, only
/// the declared outputs then the state outputs. Returns it, each input's initial value, the
/// manifest input for each graph input, and the named dimensions.
/// With `float`, the quantised parts are rewritten to float first (see [`super::rewrite`]).
fn graph(m: &Manifest, path: &Path, float: bool) -> Result<Graph, String> {
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    // Quantisers write value_info for intermediate tensors with a fixed batch; honouring it
    // makes tract fail to unify the batch, and the graph's own shape inference is enough.
    let mut proto = onnx
        .proto_model_for_path(path)
        .map_err(|e| format!("not a model tract can read: {e:#}"))?;
    let dir = path.parent().and_then(|d| d.to_str());
    let quantised = proto
        .graph
        .as_ref()
        .is_some_and(super::rewrite::is_quantised);
    if float && let Some(g) = proto.graph.as_mut() {
        let done = super::rewrite::to_float(g, dir);
        if !done.any() {
            return Err("has no quantised operator with constant weights to make float".into());
        }
        tracing::debug!(model = %m.name, "tract+float: {done}");
    }
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0);
    let mut model = onnx
        .parse(&proto, dir)
        .map_err(|e| format!("not a model tract can read: {e:#}"))?
        .model;
    for node in model.nodes() {
        let op = node.op.name();
        if let Some(name) = op.strip_prefix("Unimplemented(") {
            return Err(format!(
                "uses operator `{}` (node `{}`, ONNX opset {opset}), which tract 0.23 does not \
                 implement; export the model without it (a quantised model: quantise only Conv \
                 and MatMul)",
                name.trim_end_matches(')'),
                node.name,
            ));
        }
    }
    let input_names: Vec<String> = model
        .input_outlets()
        .map_err(|e| format!("{e:#}"))?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let key = |what: &str, i: usize| match m.format {
        1 => what.trim_end_matches('s').to_string(),
        _ => format!("{what}[{i}]"),
    };
    for (i, spec) in m.inputs.iter().enumerate() {
        if !input_names.contains(&spec.name) {
            return Err(format!(
                "{}.name: the model has no input `{}` (its inputs: {})",
                key("inputs", i),
                spec.name,
                input_names.join(", ")
            ));
        }
    }
    let symbolic: Vec<&String> = m.inputs.iter().flat_map(|i| &i.symbolic).collect();
    let mut initial = vec![None; m.inputs.len()];
    let mut feeds = Vec::new();
    let mut kept = Vec::new();
    for (k, name) in input_names.iter().enumerate() {
        let Some(ix) = m.inputs.iter().position(|i| &i.name == name) else {
            return Err(format!(
                "has an input `{name}` the manifest does not declare; add it to [[inputs]] \
                 (with `value` if it is a constant)"
            ));
        };
        let spec = &m.inputs[ix];
        let outlet = model.input_outlets().map_err(|e| format!("{e:#}"))?[k];
        let fact = model
            .outlet_fact(outlet)
            .map_err(|e| format!("{e:#}"))?
            .clone();
        let ikey = key("inputs", ix);
        if let Some(dt) = fact.datum_type.concretize()
            && dt != datum(spec.dtype)
        {
            return Err(format!(
                "{ikey}.dtype: the model's input `{name}` is {dt:?}, the manifest says {}",
                spec.dtype.name()
            ));
        }
        if let Some(rank) = fact.shape.rank().concretize()
            && rank as usize != spec.shape.len()
        {
            return Err(format!(
                "{ikey}.shape: the model's input `{name}` has {rank} dimensions, the manifest \
                 gives {}",
                spec.shape.len()
            ));
        }
        for (d, (dim, want)) in fact.shape.dims().zip(&spec.shape).enumerate() {
            let Some(have) = dim.concretize().and_then(|t| t.to_i64().ok()) else {
                continue;
            };
            match want {
                super::manifest::Dim::Fixed(w) if have as usize != *w && !(d == 0 && *w == 1) => {
                    return Err(format!(
                        "{ikey}.shape: dimension {d} of the model's input `{name}` is {have}, \
                         the manifest says {w}"
                    ));
                }
                // Every other value would fail on every run: say so now.
                super::manifest::Dim::Named { name: n, .. } if d > 0 => {
                    return Err(format!(
                        "{ikey}.shape: dimension {d} of the model's input `{name}` is fixed at \
                         {have}; write {have} instead of `{n}`"
                    ));
                }
                _ => {}
            }
        }
        if let Some(v) = &spec.value {
            let data = const_values(spec, v).map_err(|e| format!("{ikey}.value: {e}"))?;
            let t = tensor(
                spec,
                Array {
                    shape: spec.concrete_shape(&Default::default()),
                    data,
                },
            )?;
            let node = model.node_mut(outlet.node);
            node.op = Box::new(
                tract_onnx::tract_core::ops::konst::Const::new(t.clone().into_arc_tensor())
                    .map_err(|e| format!("{e:#}"))?,
            );
            model
                .set_outlet_fact(outlet, InferenceFact::from(t.clone()))
                .map_err(|e| format!("{e:#}"))?;
            initial[ix] = Some(t);
            continue;
        }
        if let Some(pair) = m.state.iter().find(|s| s.input == spec.name) {
            let shape = spec.concrete_shape(&Default::default());
            let n = shape.iter().product();
            let t = tensor(spec, Array::f32(shape, vec![pair.init; n]))?;
            initial[ix] = Some(t);
        }
        // Dimensions planned per value are set when a value comes; fixed and symbolic ones
        // now.
        let per_value = spec.shape.iter().any(
            |d| matches!(d, super::manifest::Dim::Named { name, .. } if !symbolic.contains(&name)),
        );
        let fact = match per_value {
            true => InferenceFact::dt(datum(spec.dtype)),
            false => InferenceFact::dt_shape(
                datum(spec.dtype),
                dims(spec, &Default::default(), &model.symbols),
            ),
        };
        model
            .set_outlet_fact(outlet, fact)
            .map_err(|e| format!("{e:#}"))?;
        kept.push(outlet);
        feeds.push(ix);
    }
    model
        .set_input_outlets(&kept)
        .map_err(|e| format!("{e:#}"))?;
    let outlets = model
        .output_outlets()
        .map_err(|e| format!("{e:#}"))?
        .to_vec();
    let label = |o: &OutletId| {
        model
            .outlet_label(*o)
            .unwrap_or(&model.node(o.node).name)
            .to_string()
    };
    let names: Vec<String> = outlets.iter().map(label).collect();
    let mut selected = Vec::new();
    let wanted = m
        .outputs
        .iter()
        .enumerate()
        .map(|(i, o)| (format!("{}.name", key("outputs", i)), &o.name))
        .chain(
            m.state
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("state[{i}].output"), &s.output)),
        );
    for (k, name) in wanted {
        let Some(i) = names.iter().position(|n| n == name) else {
            return Err(format!(
                "{k}: the model has no output `{name}` (its outputs: {})",
                names.join(", ")
            ));
        };
        selected.push(outlets[i]);
    }
    model
        .select_output_outlets(&selected)
        .map_err(|e| format!("{e:#}"))?;
    let mut named = Vec::new();
    for spec in &m.inputs {
        for d in &spec.shape {
            if let super::manifest::Dim::Named { name, .. } = d
                && !named.contains(name)
                && !symbolic.contains(&name)
            {
                named.push(name.clone());
            }
        }
    }
    Ok(Graph {
        model,
        initial,
        feeds,
        named,
        quantised,
    })
}

struct Graph {
    model: InferenceModel,
    /// Whether the file has quantised operators or constants the float rewrite changes.
    quantised: bool,
    initial: Vec<Option<Tensor>>,
    feeds: Vec<usize>,
    named: Vec<String>,
}

fn datum(d: DType) -> DatumType {
    match d {
        DType::F32 => f32::datum_type(),
        DType::F16 => f16::datum_type(),
        DType::I64 => i64::datum_type(),
        DType::I32 => i32::datum_type(),
        DType::U8 => u8::datum_type(),
        DType::Bool => bool::datum_type(),
    }
}

/// A tract value as tern's array (f16 widened to f32).
/// A view's elements in order: one copy of the slice when it is contiguous (a tensor tract or
/// onnxruntime produced always is), not ndarray's element-by-element walk over n dimensions,
/// which cost a detector's request 10% of its time.
fn contiguous<D: Clone>(v: &tract_ndarray::ArrayViewD<'_, D>) -> Vec<D> {
    match v.as_slice() {
        Some(s) => s.to_vec(),
        None => v.iter().cloned().collect(),
    }
}

#[cfg_attr(not(feature = "onnxruntime"), allow(dead_code))]
fn array_of(t: &Tensor) -> Result<Array, String> {
    fn values<D: Datum + Clone>(t: &Tensor) -> Result<Vec<D>, String> {
        Ok(contiguous(
            &t.to_plain_array_view::<D>().map_err(|e| format!("{e:#}"))?,
        ))
    }
    let shape = t.shape().to_vec();
    let data = match t.datum_type() {
        dt if dt == f32::datum_type() => Data::F32(values::<f32>(t)?),
        dt if dt == f16::datum_type() => {
            let wide = t.cast_to::<f32>().map_err(|e| format!("{e:#}"))?;
            Data::F32(values::<f32>(&wide)?)
        }
        dt if dt == i64::datum_type() => Data::I64(values::<i64>(t)?),
        dt if dt == i32::datum_type() => Data::I32(values::<i32>(t)?),
        dt if dt == u8::datum_type() => Data::U8(values::<u8>(t)?),
        dt if dt == bool::datum_type() => Data::Bool(values::<bool>(t)?),
        other => return Err(format!("{other:?} values are not ones tern passes on")),
    };
    Ok(Array { shape, data })
}

/// An array as a tract tensor of its own dtype.
fn plain_tensor(a: Array) -> Result<Tensor, String> {
    fn shaped<D: Datum>(shape: Vec<usize>, v: Vec<D>) -> Result<Tensor, String> {
        let what = format!("shape {shape:?}");
        tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map(Tensor::from)
            .map_err(|e| format!("{what}: {e}"))
    }
    match a.data {
        Data::F32(v) => shaped(a.shape, v),
        Data::I64(v) => shaped(a.shape, v),
        Data::I32(v) => shaped(a.shape, v),
        Data::U8(v) => shaped(a.shape, v),
        Data::Bool(v) => shaped(a.shape, v),
    }
}

/// An array as the tensor an input of this dtype takes.
fn tensor(spec: &InputSpec, a: Array) -> Result<Tensor, String> {
    let t = plain_tensor(a)?;
    let dt = datum(spec.dtype);
    if t.datum_type() == dt {
        return Ok(t);
    }
    t.cast_to_dt(dt)
        .map(|c| c.into_owned())
        .map_err(|e| format!("input `{}`: {e:#}", spec.name))
}

/// Compare one output with its reference: same number of values, every value within the
/// tolerance (exact for integers).
fn compare(
    name: &str,
    got: &(Vec<usize>, Vec<f32>),
    reference: &Array,
    tolerance: f32,
) -> Result<(), String> {
    let max_diff = max_difference(name, got, reference)?;
    let tolerance = if matches!(reference.data, Data::F32(_)) {
        tolerance
    } else {
        0.0
    };
    if max_diff > tolerance {
        return Err(format!(
            "output `{name}` differs from the reference by up to {max_diff:.6} (tolerance \
             {tolerance}); the model runs but answers wrongly in tract"
        ));
    }
    Ok(())
}

/// The largest absolute difference between an output and its reference; a non-finite output
/// value counts as infinitely far off (NaN would slip through `max`).
fn max_difference(
    name: &str,
    got: &(Vec<usize>, Vec<f32>),
    reference: &Array,
) -> Result<f32, String> {
    let want = reference.data.to_f32();
    if got.1.len() != want.len() {
        return Err(format!(
            "output `{name}` has {} values ({:?}), the reference {:?} has {}",
            got.1.len(),
            got.0,
            reference.shape,
            want.len()
        ));
    }
    if want.iter().any(|x| !x.is_finite()) {
        return Err(format!(
            "reference output `{name}` holds NaN or infinite values; it cannot vouch for anything"
        ));
    }
    Ok(got
        .1
        .iter()
        .zip(&want)
        .map(|(a, b)| {
            if a.is_finite() {
                (a - b).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0f32, f32::max))
}

/// A charset file: line i is class i (split on newlines only; spaces are characters).
fn read_charset(path: &Path) -> Result<Vec<String>, String> {
    const MAX: u64 = 4 * 1024 * 1024;
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > MAX {
        return Err(format!("{}: {len} bytes is over {MAX}", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.split('\n').map(str::to_string).collect())
}

/// A way to turn the typed model into something that runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// tract's CPU plan, then every constant computed once: tract's optimiser leaves folds
    /// whose output is over its memory budget (4 MiB) to be recomputed on every run, which
    /// for a quantised matmul is the cast of its int8 weights to i32 and their sums. Faster
    /// (7× on the int8 digits CNN), at the cost of holding those constants (4× the int8
    /// weights).
    TractFolded,
    /// tract's CPU plan as tract makes it.
    Tract,
    /// tract's CPU plan of the graph with its quantised operators made float and its
    /// constant weights dequantised at load (see [`super::rewrite`]); offered for quantised
    /// models only. Near the int8 model's outputs, not equal to them: the golden vectors
    /// decide.
    TractFloat,
    /// ONNX Runtime (its library loaded at run time), on the CPU.
    Onnxruntime,
    /// Whatever the runtime (cuda) does.
    Runtime,
}

impl Plan {
    /// The plan a name from [`Plan::name`] stands for.
    pub fn named(name: &str) -> Option<Plan> {
        [
            Plan::TractFolded,
            Plan::Tract,
            Plan::TractFloat,
            Plan::Onnxruntime,
            Plan::Runtime,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Plan::TractFolded => "tract+fold",
            Plan::Tract => "tract",
            Plan::TractFloat => "tract+float",
            Plan::Onnxruntime => "onnxruntime",
            Plan::Runtime => "runtime",
        }
    }

    fn prepare(
        self,
        rt: &'static dyn TractRuntime,
        model: TypedModel,
        options: &RunOptions,
    ) -> TractResult<Arc<dyn Runnable>> {
        match self {
            Plan::TractFolded => {
                let mut m = model.into_optimized()?;
                m.compute_const_facts()?;
                tract_onnx::tract_core::optim::Optimizer::prop_consts().optimize(&mut m)?;
                Ok(Arc::new(TypedSimplePlan::new_with_options(m, options)?))
            }
            Plan::Tract | Plan::TractFloat | Plan::Runtime => {
                Ok(rt.prepare_with_options(model, options)?.into())
            }
            Plan::Onnxruntime => Err(TractError::msg("onnxruntime is not a tract plan")),
        }
    }
}

/// Whether ONNX Runtime's library is here to plan with (loaded on first ask), or why not.
fn ort_available() -> Result<(), String> {
    #[cfg(feature = "onnxruntime")]
    return super::onnxruntime::library().map(|_| ());
    #[cfg(not(feature = "onnxruntime"))]
    Err("this ternd was built without the `onnxruntime` feature".into())
}

/// The tract runtime for a choice (or why there is none), and why `auto` chose the CPU if it
/// did.
fn pick(choice: Runtime) -> (Result<&'static dyn TractRuntime, String>, Option<String>) {
    // Ok(None): no such runtime linked in; Err: linked in but no usable device.
    let cuda = || match runtime_for_name("cuda") {
        Ok(Some(rt)) => Ok(rt),
        Ok(None) => Err("this ternd was built without the `cuda` feature".to_string()),
        Err(e) => Err(format!("no usable CUDA device: {e:#}")),
    };
    match choice {
        Runtime::Cpu => (Ok(cpu()), None),
        Runtime::Cuda => (
            cuda().map_err(|why| format!("runtime `cuda` was asked for, but {why}")),
            None,
        ),
        Runtime::Auto => match cuda() {
            Ok(rt) => (Ok(rt), None),
            Err(why) => (Ok(cpu()), Some(format!("auto: on the CPU, {why}"))),
        },
    }
}

fn cpu() -> &'static dyn TractRuntime {
    runtime_for_name("cpu")
        .ok()
        .flatten()
        .expect("tract always has its cpu runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_puts_each_sample_at_the_start_of_every_side() {
        // A 2x3 sample in a 3x4 slot: rows keep their place, the rest stays as it was.
        let src = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut dst = [0.0f32; 12];
        pad_into(&src, &[2, 3], &mut dst, &[3, 4]);
        assert_eq!(
            dst,
            [1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        // Rank 3, the middle side padded.
        let src: Vec<f32> = (1..=4).map(|x| x as f32).collect();
        let mut dst = [0.0f32; 8];
        pad_into(&src, &[2, 1, 2], &mut dst, &[2, 2, 2]);
        assert_eq!(dst, [1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0]);
    }

    #[test]
    fn a_health_window_counts_only_the_versions_own_faults() {
        use std::sync::atomic::Ordering::Relaxed;
        let o = Outcomes::default();
        let input = Input::Encoded(b"not an image".to_vec());
        let err = |e: EngineError| -> Result<Prediction, EngineError> { Err(e) };
        let (model, message) = ("m".to_string(), "x".to_string());
        o.record(
            &input,
            &err(EngineError::Shape {
                model: model.clone(),
                message: message.clone(),
            }),
        );
        o.record(
            &input,
            &err(EngineError::Input {
                message: message.clone(),
            }),
        );
        assert_eq!(
            o.refused.load(Relaxed),
            2,
            "a shape it cannot plan, bad input"
        );
        assert_eq!(o.failed.load(Relaxed), 0);
        o.record(&input, &err(EngineError::Run { model, message }));
        assert_eq!(o.failed.load(Relaxed), 1, "a run error is its own");
    }
}
