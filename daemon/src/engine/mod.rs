//! Model backends: load, optimise, self-test and run model packages, and serve each model
//! from a bounded worker pool.
//!
//! ```text
//!  Input (PNG/JPEG, tensor, frame) ─► prepare (decode, resize, scale) ─► tract ─► top-k
//! ```
//!
//! tract is used only in `model.rs`. Nothing here touches the database or the network.

mod array;
mod input;
mod manifest;
mod model;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
mod pool;
mod postprocess;
mod rewrite;

use std::path::PathBuf;

pub use array::{Array, Data, read_npy, read_npy_f32, read_npz, write_npz};
#[cfg(test)]
pub(crate) use input::vad_manifest;
pub use input::{
    Geometry, Input, Pcm, PixelFormat, Prepared, Windower, audio_windows, pcm_stream, read_bounded,
};
pub use manifest::{
    Color, DType, Dim, Evaluation, EvaluationSample, InputSpec, MANIFEST_FILE, MODEL_FILE,
    Manifest, OutputSpec, Postprocess, Rule, const_values, is_inside,
};
pub use model::{
    Class, Evaluated, MAX_PLANS_PER_MODEL, Model, OnnxInfo, OnnxTensor, Plan, Prediction,
    RecordedPlan, Stream, describe_onnx,
};
pub use pool::{Latencies, ModelPool, PoolSettings, PoolStats, Pools, Quantiles, panic_message};

/// Point the onnxruntime plan at the configured library. Once per process, before a model
/// loads: a later call (a reload with a new path) changes nothing until a restart.
pub fn use_onnxruntime_library(path: Option<&std::path::Path>) {
    #[cfg(feature = "onnxruntime")]
    if let Some(p) = path {
        onnxruntime::configure(p.to_path_buf());
    }
    #[cfg(not(feature = "onnxruntime"))]
    let _ = path;
}

/// What a plan choice made by `auto` depends on besides the package: this ternd, the CPU,
/// the settings that change a plan's speed (threads, runtime) and the onnxruntime library. A
/// choice recorded under another fingerprint is made again.
pub fn plan_fingerprint(s: &PoolSettings) -> String {
    #[cfg(feature = "onnxruntime")]
    let ort = match onnxruntime::library() {
        Ok(p) => {
            let meta = std::fs::metadata(p).ok();
            let stamp = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            format!(
                "{} ({} bytes, modified {})",
                p.display(),
                meta.map(|m| m.len()).unwrap_or(0),
                stamp.unwrap_or(0)
            )
        }
        Err(_) => "none".to_string(),
    };
    #[cfg(not(feature = "onnxruntime"))]
    let ort = "not built";
    format!(
        "ternd {}; {} {}; {} cpus; threads {}; runtime {:?}; onnxruntime {ort}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        s.threads,
        s.runtime,
    )
}

/// The CPU's name as /proc/cpuinfo gives it: `model name` on x86, implementer, part and
/// features on ARM (which has no name line).
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    match field("model name") {
        Some(name) => name,
        None => ["CPU implementer", "CPU part", "Features"]
            .iter()
            .filter_map(|k| field(k))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Where models run (`engine.runtime`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// tract on the CPU.
    #[default]
    Cpu,
    /// tract-cuda on an NVIDIA GPU; a model fails to load without one.
    Cuda,
    /// The GPU if there is a usable one, else the CPU (and the status says why).
    Auto,
}

/// Which CPU plans a model may run with (`engine.plan`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum PlanChoice {
    /// Every plan here that passes the golden vectors (tract folded, tract, tract made float
    /// for a quantised model, onnxruntime), timed
    /// on them: the fastest serves.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// tract's own plan only: no folded constants held in memory (a box short of RAM with a
    /// large int8 model).
    #[serde(rename = "tract")]
    Tract,
    /// The folded plan only: a model it fails is refused.
    #[serde(rename = "tract+fold")]
    TractFolded,
    /// A quantised model made float at load (int8 on disk, float in the kernel) only: a
    /// model it fails, or one with nothing quantised, is refused.
    #[serde(rename = "tract+float")]
    TractFloat,
    /// ONNX Runtime only (its library must be here): a model it fails is refused.
    #[serde(rename = "onnxruntime")]
    Onnxruntime,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("model package manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("model `{model}` ({path}) {message}")]
    Load {
        model: String,
        path: PathBuf,
        message: String,
    },
    #[error("model `{model}` refused: self-test vector {vector}: {message}")]
    SelfTest {
        model: String,
        vector: usize,
        message: String,
    },
    /// A version that runs but misses its package's evaluation rule: the measured figure is
    /// in the message.
    #[error("model `{model}` refused: evaluation: {message}")]
    Evaluation { model: String, message: String },
    #[error("bad input: {message}")]
    Input { message: String },
    #[error("cannot read input: {message}")]
    Unreadable { message: String },
    #[error("model `{model}` failed to run: {message}")]
    Run { model: String, message: String },
    /// tract could not plan the model for a shape the caller chose (within the manifest's
    /// bounds): the request cannot be served, the model serves other shapes.
    #[error("model `{model}` cannot run this input shape: {message}")]
    Shape { model: String, message: String },
    #[error("model `{model}` is busy: its queue is full")]
    Busy { model: String },
    #[error("model `{model}` is stopped")]
    Stopped { model: String },
}

impl EngineError {
    /// A stable code for replies to other programs.
    pub fn code(&self) -> tern_update::Code {
        use tern_update::Code;
        match self {
            EngineError::Manifest { .. }
            | EngineError::Input { .. }
            | EngineError::Shape { .. } => Code::BadRequest,
            EngineError::Load { .. } | EngineError::SelfTest { .. } => Code::BadModel,
            EngineError::Evaluation { .. } => Code::Evaluation,
            EngineError::Run { .. }
            | EngineError::Stopped { .. }
            | EngineError::Unreadable { .. } => Code::Internal,
            EngineError::Busy { .. } => Code::Busy,
        }
    }
}
