//! The one place that speaks tract: load, optimise, self-test and run a model package.
//!
//! A tract upgrade should touch this file and no other.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{
    RunOptions, Runnable, Runtime as TractRuntime, runtime_for_name,
};

use super::input::{Input, Prepared, read_npy_f32};
use super::manifest::{Dim, MODEL_FILE, Manifest};
use super::{EngineError, PlanChoice, Runtime};

/// ONNX files bigger than this are refused before tract reads them.
pub const MAX_MODEL_BYTES: u64 = 512 * 1024 * 1024;

/// A loaded, optimised, self-tested model, ready to run from any thread.
pub struct Model {
    pub manifest: Manifest,
    pub dir: PathBuf,
    runnable: Arc<dyn Runnable>,
    output_index: usize,
    /// Where it runs: `cpu` or `cuda`.
    pub runtime: &'static str,
    /// How it runs there (see [`Plan`]): `tract+fold`, `tract`, or the runtime's own.
    pub plan: &'static str,
    /// Why it runs on the CPU although `auto` was asked for (no GPU, no cuda in this build).
    pub fallback: Option<String>,
    /// Requests this loaded version answered and failed, wherever it ran: an update's health
    /// window judges the new version by its own outcomes, not its pool's.
    pub outcomes: Outcomes,
}

#[derive(Debug, Default)]
pub struct Outcomes {
    pub ok: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
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

/// What a model said about one input.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Prediction {
    pub model: String,
    pub version: String,
    pub top: Vec<Class>,
    /// Time spent in tern (decode, preprocess, run, postprocess), microseconds.
    pub latency_us: u64,
}

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
        Self::load_planned(dir, threads, runtime, PlanChoice::Auto)
    }

    /// [`Model::load`] with the pool settings a box serves it with: threads, runtime, plans.
    pub fn load_for(dir: &Path, s: &super::PoolSettings) -> Result<Model, EngineError> {
        Self::load_planned(dir, s.threads, s.runtime, s.plan)
    }

    /// [`Model::load`] with one CPU plan only (to compare plans).
    pub fn load_plan(dir: &Path, threads: NonZeroUsize, plan: Plan) -> Result<Model, EngineError> {
        let only = match plan {
            Plan::TractFolded => PlanChoice::TractFolded,
            Plan::Tract | Plan::Runtime => PlanChoice::Tract,
        };
        Self::load_planned(dir, threads, Runtime::Cpu, only)
    }

    fn load_planned(
        dir: &Path,
        threads: NonZeroUsize,
        runtime: Runtime,
        only: PlanChoice,
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
        only: PlanChoice,
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
        only: PlanChoice,
    ) -> Result<Model, EngineError> {
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
        // Quantisers write value_info for intermediate tensors with a fixed batch; honouring
        // it makes tract fail to unify the symbolic batch ("Impossible to unify Sym(N) with
        // Val(..)"), and the graph's own shape inference is enough.
        let model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(&path)
            .map_err(|e| load_err(format!("not a model tract can read: {e:#}")))?;
        let inputs = model
            .input_outlets()
            .map_err(|e| load_err(format!("{e:#}")))?;
        if inputs.len() != 1 {
            return Err(load_err(format!(
                "has {} inputs; tern runs single-input models",
                inputs.len()
            )));
        }
        let input_name = &model.node(inputs[0].node).name;
        if input_name != &manifest.input.name {
            return Err(load_err(format!(
                "input is named `{input_name}`, the manifest says `{}`",
                manifest.input.name
            )));
        }
        let outputs = model
            .output_outlets()
            .map_err(|e| load_err(format!("{e:#}")))?
            .to_vec();
        let names: Vec<String> = outputs
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .unwrap_or(&model.node(o.node).name)
                    .to_string()
            })
            .collect();
        let output_index = names
            .iter()
            .position(|n| *n == manifest.output.name)
            .ok_or_else(|| {
                load_err(format!(
                    "has no output `{}` (outputs: {})",
                    manifest.output.name,
                    names.join(", ")
                ))
            })?;
        // Optimising is the runtime's job: each backend rewrites the graph for itself.
        let typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| load_err(format!("cannot be typed: {e:#}")))?;
        let fact = typed
            .input_fact(0)
            .map_err(|e| load_err(format!("{e:#}")))?;
        if fact.datum_type != f32::datum_type() {
            return Err(load_err(format!(
                "input dtype is {:?}, tern feeds f32",
                fact.datum_type
            )));
        }
        if fact.rank() != manifest.input.shape.len() {
            return Err(load_err(format!(
                "input has rank {} ({:?}), the manifest says {:?}",
                fact.rank(),
                fact.shape,
                manifest.input.shape
            )));
        }
        // Every fixed dimension must agree (batch 1 must be allowed), or every inference would
        // fail later as an internal error instead of now as a refused model.
        for (i, (dim, want)) in fact.shape.iter().zip(&manifest.input.shape).enumerate() {
            let fixed = dim.as_i64().and_then(|d| usize::try_from(d).ok());
            let ok = match (want, fixed) {
                (Dim::Fixed(w), Some(f)) => *w == f,
                (Dim::Symbol(_), Some(f)) => f == 1,
                (_, None) => true,
            };
            if !ok {
                return Err(load_err(format!(
                    "input dimension {i} is {dim} in the model, the manifest says {want:?}"
                )));
            }
        }
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
        // The plans to try, best first; the first whose outputs agree with the golden
        // vectors serves. On the CPU that is tract with its constants folded after
        // optimisation, then tract as it plans by itself.
        let plans: &[Plan] = match (rt.name().as_ref(), only) {
            ("cpu", PlanChoice::Auto) => &[Plan::TractFolded, Plan::Tract],
            ("cpu", PlanChoice::Tract) => &[Plan::Tract],
            ("cpu", PlanChoice::TractFolded) => &[Plan::TractFolded],
            _ => &[Plan::Runtime],
        };
        let mut tried = Vec::new();
        let mut typed = Some(typed);
        for (i, plan) in plans.iter().enumerate() {
            let last = i + 1 == plans.len();
            let model = match last {
                true => typed.take(),
                false => typed.clone(),
            }
            .expect("taken by the last plan only");
            let runnable = match plan.prepare(rt, model, &options) {
                Ok(r) => r,
                Err(e) if !last => {
                    tried.push(format!("{}: {e:#}", plan.name()));
                    continue;
                }
                Err(e) => {
                    return Err(load_err(format!(
                        "cannot be planned on {}: {e:#}",
                        rt.name()
                    )));
                }
            };
            let model = Model {
                manifest: manifest.clone(),
                dir: dir.to_path_buf(),
                runnable,
                output_index,
                runtime: if rt.name() == "cpu" { "cpu" } else { "cuda" },
                plan: plan.name(),
                fallback: fallback.clone(),
                outcomes: Outcomes::default(),
            };
            match model.self_test() {
                Ok(()) => {
                    if !tried.is_empty() {
                        tracing::info!(model = %manifest.name, plan = plan.name(), passed_over = %tried.join("; "), "plan chosen");
                    }
                    return Ok(model);
                }
                Err(e) if !last => tried.push(format!("{}: {e}", plan.name())),
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last plan returns")
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn version(&self) -> &semver::Version {
        &self.manifest.version
    }

    /// Run every golden vector and compare with the reference outputs.
    pub fn self_test(&self) -> Result<(), EngineError> {
        let m = &self.manifest;
        for (i, g) in m.selftest.golden.iter().enumerate() {
            let fail = |message: String| EngineError::SelfTest {
                model: m.name.clone(),
                vector: i,
                message,
            };
            let read = |p: &Path| {
                std::fs::read(self.dir.join(p))
                    .map_err(|e| fail(format!("cannot read {}: {e}", p.display())))
                    .and_then(|b| {
                        read_npy_f32(&b).map_err(|e| fail(format!("{}: {e}", p.display())))
                    })
            };
            let (in_shape, in_data) = read(&g.input)?;
            let (out_shape, want) = read(&g.output)?;
            // Through the same path as requests: the golden input must fit the manifest's
            // declared shape, and the model must take it.
            let golden = Input::Tensor {
                shape: in_shape,
                data: in_data,
            };
            let got = self.run_input(&golden).map_err(|e| fail(e.to_string()))?;
            if got.len() != want.len() {
                return Err(fail(format!(
                    "output `{}` has {} values, the reference {:?} has {}",
                    m.output.name,
                    got.len(),
                    out_shape,
                    want.len()
                )));
            }
            if want.iter().any(|x| !x.is_finite()) {
                return Err(fail(format!(
                    "reference output {} holds NaN or infinite values; it cannot vouch for anything",
                    g.output.display()
                )));
            }
            // A non-finite output counts as infinitely far off (NaN would slip through `max`).
            let max_diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| {
                    if a.is_finite() {
                        (a - b).abs()
                    } else {
                        f32::INFINITY
                    }
                })
                .fold(0f32, f32::max);
            if max_diff > m.selftest.tolerance {
                return Err(fail(format!(
                    "output `{}` differs from the reference by up to {max_diff:.6} \
                     (tolerance {}); the model runs but answers wrongly in tract",
                    m.output.name, m.selftest.tolerance
                )));
            }
        }
        Ok(())
    }

    /// Run a prepared tensor and return the selected output, flattened.
    pub fn run(&self, p: Prepared) -> Result<Vec<f32>, EngineError> {
        let shape = p.shape.clone();
        let tensor = tract_ndarray::ArrayD::from_shape_vec(p.shape, p.data).map_err(|e| {
            EngineError::Run {
                model: self.manifest.name.clone(),
                message: format!("shape {shape:?}: {e}"),
            }
        })?;
        self.run_tensor(tensor.into())
    }

    fn run_tensor(&self, tensor: Tensor) -> Result<Vec<f32>, EngineError> {
        let run_err = |message: String| EngineError::Run {
            model: self.manifest.name.clone(),
            message,
        };
        let out = self
            .runnable
            .run(tvec!(tensor.into()))
            .map_err(|e| run_err(format!("{e:#}")))?;
        let t = out
            .get(self.output_index)
            .ok_or_else(|| run_err("output missing".into()))?;
        let view = t
            .to_plain_array_view::<f32>()
            .map_err(|e| run_err(format!("output is not f32: {e:#}")))?;
        Ok(view.iter().copied().collect())
    }

    /// Decode, preprocess, run and postprocess one input.
    pub fn infer(&self, input: &Input) -> Result<Prediction, EngineError> {
        let start = Instant::now();
        let out = self.run_input(input)?;
        let top = self.postprocess(out);
        Ok(Prediction {
            model: self.manifest.name.clone(),
            version: self.manifest.version.to_string(),
            top,
            latency_us: start.elapsed().as_micros() as u64,
        })
    }

    /// Prepare an input straight into tract's input tensor and run it.
    fn run_input(&self, input: &Input) -> Result<Vec<f32>, EngineError> {
        let mut shape = vec![1];
        shape.extend(self.manifest.sample_shape());
        let run_err = |e: TractError| EngineError::Run {
            model: self.manifest.name.clone(),
            message: format!("{e:#}"),
        };
        let mut tensor = Tensor::zero::<f32>(&shape).map_err(run_err)?;
        {
            let mut view = tensor.to_plain_array_view_mut::<f32>().map_err(run_err)?;
            let out = view.as_slice_mut().expect("a fresh tensor is contiguous");
            input.write_into(&self.manifest, out)?;
        }
        self.run_tensor(tensor)
    }

    /// Softmax if the manifest asks for it, then the top-k classes with their labels.
    pub fn postprocess(&self, mut out: Vec<f32>) -> Vec<Class> {
        let post = &self.manifest.postprocess;
        if post.softmax {
            let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in out.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            for x in out.iter_mut() {
                *x /= sum;
            }
        }
        let k = post.top_k.get().min(out.len());
        let mut idx: Vec<usize> = (0..out.len()).collect();
        // NaN sorts last, so a broken output never wins the top slot.
        idx.sort_by(|a, b| out[*b].total_cmp(&out[*a]).then(a.cmp(b)));
        idx.sort_by(|a, b| out[*a].is_nan().cmp(&out[*b].is_nan()));
        idx.truncate(k);
        idx.into_iter()
            .map(|i| Class {
                index: i,
                label: post.labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
                score: out[i],
            })
            .collect()
    }
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
    /// Whatever the runtime (cuda) does.
    Runtime,
}

impl Plan {
    pub fn name(self) -> &'static str {
        match self {
            Plan::TractFolded => "tract+fold",
            Plan::Tract => "tract",
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
            Plan::Tract | Plan::Runtime => Ok(rt.prepare_with_options(model, options)?.into()),
        }
    }
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
