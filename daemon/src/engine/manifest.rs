//! `tern-model.toml`: what a model package declares about its model.
//!
//! Two formats are read. Format 1 (no `format` key) is tern's first: one f32 image or tensor
//! input, one output, top-k. Format 2 (`format = 2`) declares any number of named inputs and
//! outputs with their dtypes and shapes, constant inputs, state pairs, a postprocessor per
//! output and golden vectors as `.npz` files. Both are parsed into the one [`Manifest`] the
//! engine runs, so a format 1 package runs exactly as it did.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EngineError;
use super::array::Data;

pub const MANIFEST_FILE: &str = "tern-model.toml";
pub const MODEL_FILE: &str = "model.onnx";

/// Manifests are small; a bigger one is not a manifest.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// Largest bound a named dimension may declare: a side of an image, a sequence length.
pub const MAX_DIM: usize = 16384;

/// A model package's declarations, whichever format they were written in.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// 1 or 2.
    pub format: u32,
    pub name: String,
    pub version: semver::Version,
    pub description: String,
    /// Informational: `f32`, `int8`, ...
    pub form: String,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    pub state: Vec<StatePair>,
    pub selftest: SelfTest,
    /// A labelled evaluation set and the rule a new version must meet on it before it is
    /// activated (`[evaluation]`, optional in both formats).
    pub evaluation: Option<Evaluation>,
}

/// Most samples an evaluation set may hold: it runs before every activation of an update.
pub const MAX_EVALUATION_SAMPLES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// `accuracy >= 0.95` or `max_difference <= 0.05`.
    pub rule: String,
    pub samples: Vec<EvaluationSample>,
}

/// One input of the evaluation set, fed as a request would be (a PNG or JPEG; a `.npy` for
/// the model's one fed input; an `.npz` of arrays by input name), with what must come out.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSample {
    pub input: PathBuf,
    /// The top-1 label expected (`accuracy` rules).
    pub label: Option<String>,
    /// A `.npy` of the first output expected (`max_difference` rules).
    pub reference: Option<PathBuf>,
}

/// What an evaluation set's figure must reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Share of samples whose top-1 label is the expected one, at least this.
    Accuracy(f64),
    /// Largest absolute difference from the reference outputs, at most this.
    MaxDifference(f64),
}

impl Rule {
    pub fn parse(s: &str) -> Result<Rule, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let value = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("`{v}` is not a number"))
        };
        match words[..] {
            ["accuracy", ">=", v] => {
                let x = value(v)?;
                if !(0.0..=1.0).contains(&x) {
                    return Err(format!("accuracy {x} is outside 0..=1"));
                }
                Ok(Rule::Accuracy(x))
            }
            ["max_difference", "<=", v] => {
                let x = value(v)?;
                if x < 0.0 {
                    return Err(format!("max_difference {x} is below 0"));
                }
                Ok(Rule::MaxDifference(x))
            }
            _ => Err(format!(
                "`{s}` is not a rule: `accuracy >= <0..1>` or `max_difference <= <number>`"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rule::Accuracy(_) => "accuracy",
            Rule::MaxDifference(_) => "max_difference",
        }
    }

    /// Whether `figure` (of this rule's kind) meets it.
    pub fn met_by(self, figure: f64) -> bool {
        match self {
            Rule::Accuracy(x) => figure >= x,
            Rule::MaxDifference(x) => figure <= x,
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Accuracy(x) => write!(f, "accuracy >= {x}"),
            Rule::MaxDifference(x) => write!(f, "max_difference <= {x}"),
        }
    }
}

impl Evaluation {
    fn check(&self, m: &Manifest) -> Result<(), String> {
        let rule = Rule::parse(&self.rule).map_err(|e| format!("evaluation.rule: {e}"))?;
        if self.samples.is_empty() {
            return Err("evaluation.samples: an evaluation set needs at least one sample".into());
        }
        if self.samples.len() > MAX_EVALUATION_SAMPLES {
            return Err(format!(
                "evaluation.samples: {} samples, at most {MAX_EVALUATION_SAMPLES}",
                self.samples.len()
            ));
        }
        if let Rule::Accuracy(_) = rule
            && !matches!(
                m.outputs.first().map(|o| &o.postprocess),
                Some(Postprocess::Classify { .. })
            )
        {
            return Err(
                "evaluation.rule: an accuracy rule needs a first output that classifies (its top-1 \
                 label is what is compared)"
                    .into(),
            );
        }
        for (i, s) in self.samples.iter().enumerate() {
            let key = format!("evaluation.samples[{i}]");
            match (rule, &s.label, &s.reference) {
                (Rule::Accuracy(_), None, _) => {
                    return Err(format!(
                        "{key}.label: an accuracy rule needs every sample's label"
                    ));
                }
                (Rule::MaxDifference(_), _, None) => {
                    return Err(format!(
                        "{key}.reference: a max_difference rule needs every sample's reference output"
                    ));
                }
                _ => {}
            }
            for (k, p) in [
                ("input", Some(&s.input)),
                ("reference", s.reference.as_ref()),
            ] {
                if let Some(p) = p
                    && !is_inside(p)
                {
                    return Err(format!(
                        "{key}.{k}: `{}` must be a relative path inside the package",
                        p.display()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The rule (checked when the manifest was read).
    pub fn rule(&self) -> Rule {
        Rule::parse(&self.rule).expect("checked when read")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DType,
    /// Each dimension: a number, or a name (`"W"`, `"W<=1280"`) fixed per run from the input.
    pub shape: Vec<Dim>,
    /// A constant fed on every run (`sr = 16000`): a number, a bool, or nested arrays.
    pub value: Option<toml::Value>,
    /// Images (PNG, JPEG, camera frames) become this input.
    pub image: Option<ImageSpec>,
    /// Audio (WAV) becomes this input, one window per run.
    pub audio: Option<AudioSpec>,
    /// Named dimensions kept symbolic in one plan for every value (a sequence length), rather
    /// than planned once per value.
    #[serde(default)]
    pub symbolic: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    F16,
    I64,
    I32,
    U8,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawDim")]
pub enum Dim {
    Fixed(usize),
    /// Fixed per run from the input, at most `max`.
    Named {
        name: String,
        max: usize,
    },
}

impl Dim {
    /// A named dimension's name.
    pub fn name(&self) -> Option<&str> {
        match self {
            Dim::Named { name, .. } => Some(name),
            Dim::Fixed(_) => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDim {
    Fixed(usize),
    Named(String),
}

impl TryFrom<RawDim> for Dim {
    type Error = String;

    fn try_from(raw: RawDim) -> Result<Dim, String> {
        let s = match raw {
            RawDim::Fixed(n) => return Ok(Dim::Fixed(n)),
            RawDim::Named(s) => s,
        };
        let (name, max) = match s.split_once("<=") {
            Some((n, m)) => {
                let max: usize = m
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{s}`: the bound after `<=` must be a whole number"))?;
                (n.trim(), max)
            }
            None => (s.trim(), MAX_DIM),
        };
        let ok = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.starts_with(|c: char| c.is_ascii_alphabetic());
        if !ok {
            return Err(format!(
                "`{s}`: a named dimension is a letter then letters, digits or `_`, with an \
                 optional bound (`W<=1280`)"
            ));
        }
        if max == 0 || max > MAX_DIM {
            return Err(format!("`{s}`: the bound must be between 1 and {MAX_DIM}"));
        }
        Ok(Dim::Named {
            name: name.to_string(),
            max,
        })
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Named { name, max } if *max == MAX_DIM => write!(f, "{name}"),
            Dim::Named { name, max } => write!(f, "{name}<={max}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Batch, channels, height, width.
    Nchw,
    /// Batch, height, width, channels.
    Nhwc,
    /// Batch, features: an image is flattened row by row.
    Nc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub layout: Layout,
    pub color: Color,
    #[serde(default)]
    pub resize: Resize,
    /// With `fit`: named sides are rounded to a multiple of this.
    #[serde(default = "one_usize")]
    pub multiple: usize,
    /// With `letterbox`: the pixel value (0-255, before scaling) around the image.
    #[serde(default)]
    pub pad: u8,
    /// Format 1 with layout `nc`: the (height, width) its `preprocess.resize` gave, which the
    /// feature count alone cannot say when the image is not square.
    #[serde(skip)]
    pub nc_size: Option<(usize, usize)>,
    #[serde(default)]
    pub filter: Filter,
    #[serde(default = "one")]
    pub scale: f32,
    /// Per channel (or one value for all), subtracted after scaling.
    #[serde(default)]
    pub mean: Vec<f32>,
    /// Per channel (or one value for all), divided by after the mean.
    #[serde(default)]
    pub std: Vec<f32>,
}

fn one() -> f32 {
    1.0
}

fn one_usize() -> usize {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Images must already have the input's size.
    None,
    /// To the input's fixed height and width, whatever the aspect ratio.
    #[default]
    Stretch,
    /// Keep the aspect ratio within the fixed sides, centred, padded with `pad` (detectors
    /// trained on letterboxed images); boxes are mapped back through it.
    Letterbox,
    /// Keep the aspect ratio: fixed sides are met, named sides follow the image (each rounded
    /// to `multiple`, at most its bound); with both sides named, the image keeps its scale
    /// unless a side is over its bound.
    Fit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    Gray,
    Rgb,
    /// RGB with the channels in the other order (models trained on OpenCV's images).
    Bgr,
}

impl Color {
    pub fn channels(self) -> usize {
        match self {
            Color::Gray => 1,
            Color::Rgb | Color::Bgr => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    Nearest,
    #[default]
    Triangle,
    CatmullRom,
    Lanczos3,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioSpec {
    /// WAV files must have this rate; tern does not resample.
    pub sample_rate: u32,
    /// New samples per run.
    pub window: usize,
    /// Samples of the previous window fed again before the new ones (zeros at the start).
    #[serde(default)]
    pub context: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    pub postprocess: Postprocess,
}

/// What an output's values mean, and what tern reports for them.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Postprocess {
    /// Scores over classes on the last axis: the top k, labelled; per position when the
    /// output holds more than one distribution (a score per class per time step).
    Classify {
        /// Apply softmax first (for models that end in logits).
        #[serde(default)]
        softmax: bool,
        #[serde(default = "default_top_k")]
        top_k: NonZeroUsize,
        #[serde(default)]
        labels: Vec<String>,
        /// The axis the classes lie on (negative: from the end); the others are positions.
        /// `None` (format 1 only): every value is one class, whatever the shape.
        #[serde(default = "last_axis")]
        axis: Option<i64>,
    },
    /// Greedy CTC decoding of a `[1, T, classes]` output into text.
    Ctc {
        /// File in the package: line i is class i's text.
        charset: PathBuf,
        #[serde(default)]
        blank: usize,
    },
    /// A DB-style text probability map `[1, 1, H, W]` into boxes in the original image.
    TextBoxes {
        #[serde(default = "default_map_threshold")]
        threshold: f32,
        /// A region's mean probability must reach this to be a box.
        #[serde(default = "default_box_threshold")]
        box_threshold: f32,
        /// Grows each region by area × ratio / perimeter (the map marks a shrunk text core).
        #[serde(default = "default_unclip")]
        unclip_ratio: f32,
        /// Regions whose shorter side is under this (map pixels) are noise.
        #[serde(default = "default_min_size")]
        min_size: usize,
        #[serde(default = "default_max_boxes")]
        max_boxes: usize,
    },
    /// Object detection rows into boxes: per-class scores over `score_threshold`,
    /// class-aware non-maximum suppression, at most `max_boxes`, in the original image's
    /// pixels (through the resize or letterbox).
    Detect {
        format: DetectFormat,
        #[serde(default = "default_score_threshold")]
        score_threshold: f32,
        #[serde(default = "default_iou")]
        iou_threshold: f32,
        #[serde(default = "default_max_boxes")]
        max_boxes: usize,
        #[serde(default)]
        labels: Vec<String>,
        /// Coordinates are fractions of the model input's width and height.
        #[serde(default)]
        normalized: bool,
        /// A class that means "nothing here" (SSD's background), never reported.
        background: Option<usize>,
    },
    /// One value (a probability, an anomaly score); with a threshold, an on/off state that a
    /// sequence turns into start and stop events, with hysteresis.
    Score {
        threshold: Option<f32>,
        /// Once on, the score must fall below threshold - hysteresis to turn off.
        #[serde(default)]
        hysteresis: f32,
    },
    /// The values themselves, at most `max_values` of them.
    Raw {
        #[serde(default = "default_max_values")]
        max_values: usize,
    },
}

/// How a detector's output rows are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectFormat {
    /// `[1, N, 5 + classes]`: centre x, centre y, width, height, objectness, class scores
    /// (YOLOv5-style, anchors decoded in the graph); a box's score is objectness × class.
    Yolo,
    /// `[1, 4 + classes, N]`: centre x, centre y, width, height, class scores (anchor-free,
    /// YOLOv8-style, one column per box).
    Yolov8,
    /// `[1, N, 4 + classes]`: x0, y0, x1, y1, class scores (SSD-style, decoded in the graph).
    Ssd,
}

fn default_score_threshold() -> f32 {
    0.25
}
fn default_iou() -> f32 {
    0.45
}

fn default_top_k() -> NonZeroUsize {
    NonZeroUsize::new(5).expect("5 is not zero")
}
fn last_axis() -> Option<i64> {
    Some(-1)
}
fn default_map_threshold() -> f32 {
    0.3
}
fn default_box_threshold() -> f32 {
    0.5
}
fn default_unclip() -> f32 {
    1.5
}
fn default_min_size() -> usize {
    3
}
fn default_max_boxes() -> usize {
    100
}
fn default_max_values() -> usize {
    4096
}
/// Boxes one result may hold.
pub const MAX_BOXES: usize = 10_000;
/// A raw output may not ask for more than this many values in one result.
pub const MAX_RAW_VALUES: usize = 1 << 20;

impl Postprocess {
    pub fn kind(&self) -> &'static str {
        match self {
            Postprocess::Classify { .. } => "classify",
            Postprocess::Ctc { .. } => "ctc",
            Postprocess::TextBoxes { .. } => "text_boxes",
            Postprocess::Detect { .. } => "detect",
            Postprocess::Score { .. } => "score",
            Postprocess::Raw { .. } => "raw",
        }
    }
}

/// A recurrent model's state: what `output` returns is fed to `input` on the next run of the
/// same stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatePair {
    pub input: String,
    pub output: String,
    /// Every value of the first run's state.
    #[serde(default)]
    pub init: f32,
}

#[derive(Debug, Clone)]
pub struct SelfTest {
    /// Largest absolute difference allowed between tern's outputs and the reference outputs.
    pub tolerance: f32,
    pub golden: Vec<Golden>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Golden {
    /// Format 1: one `.npy` input and the one output's `.npy`.
    Pair { input: PathBuf, output: PathBuf },
    /// Format 2: one `.npz` with `in/<input>` and `out/<output>` arrays, or a folder with
    /// `in/<input>.npy` and `out/<output>.npy`.
    Npz(PathBuf),
}

impl Manifest {
    /// Read and check `<dir>/tern-model.toml`.
    pub fn read(dir: &Path) -> Result<Manifest, EngineError> {
        Self::read_checked(dir, true)
    }

    /// [`Manifest::read`] for a package whose golden vectors are still to be made: every
    /// check but that there is at least one.
    pub fn read_draft(dir: &Path) -> Result<Manifest, EngineError> {
        Self::read_checked(dir, false)
    }

    fn read_checked(dir: &Path, golden_required: bool) -> Result<Manifest, EngineError> {
        let path = dir.join(MANIFEST_FILE);
        let bad = |message: String| EngineError::Manifest {
            path: path.clone(),
            message,
        };
        let meta = std::fs::metadata(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "{} bytes is too large for a manifest",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
        Self::parse_checked(&text, golden_required).map_err(bad)
    }

    /// Parse and check a manifest's text; the error names the key (and line where toml knows
    /// it).
    #[cfg(test)]
    pub(crate) fn parse(text: &str) -> Result<Manifest, String> {
        Self::parse_checked(text, true)
    }

    fn parse_checked(text: &str, golden_required: bool) -> Result<Manifest, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| describe(text, &e, ""))?;
        let m = match table.get("format") {
            None => typed::<V1>(text)?.into_manifest()?,
            Some(toml::Value::Integer(2)) => typed::<V2>(text)?.into_manifest()?,
            Some(other) => {
                return Err(format!(
                    "format: {other} is not a package format this ternd reads (1, by leaving \
                     `format` out, or 2)"
                ));
            }
        };
        m.check(golden_required)?;
        Ok(m)
    }

    fn check(&self, golden_required: bool) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || self.name.starts_with('.')
        {
            return Err(format!(
                "name: `{}` must be non-empty ASCII letters, digits, `-`, `_` or `.`, not starting with `.`",
                self.name
            ));
        }
        let (i_key, o_key) = match self.format {
            1 => ("input", "output"),
            _ => ("inputs", "outputs"),
        };
        if self.inputs.is_empty() {
            return Err(format!("{i_key}: declare at least one input"));
        }
        if self.outputs.is_empty() {
            return Err(format!("{o_key}: declare at least one output"));
        }
        unique(self.inputs.iter().map(|i| &i.name), i_key)?;
        unique(self.outputs.iter().map(|o| &o.name), o_key)?;
        for (n, input) in self.inputs.iter().enumerate() {
            let key = match self.format {
                1 => "input".to_string(),
                _ => format!("inputs[{n}]"),
            };
            input.check(&key, self.format)?;
        }
        let fed = self.fed().count();
        if fed == 0 {
            return Err(format!(
                "{i_key}: every input is a constant or a state; nothing is left for a request"
            ));
        }
        if self.inputs.iter().filter(|i| i.image.is_some()).count() > 1
            || self.inputs.iter().filter(|i| i.audio.is_some()).count() > 1
        {
            return Err(format!(
                "{i_key}: at most one input takes images and one takes audio"
            ));
        }
        let mut state_inputs = HashSet::new();
        for (n, s) in self.state.iter().enumerate() {
            let key = format!("state[{n}]");
            let Some(input) = self.inputs.iter().find(|i| i.name == s.input) else {
                return Err(format!(
                    "{key}.input: `{}` is not one of the manifest's [[inputs]]",
                    s.input
                ));
            };
            if input.value.is_some() || input.image.is_some() || input.audio.is_some() {
                return Err(format!(
                    "{key}.input: `{}` is a constant, image or audio input, not a state",
                    s.input
                ));
            }
            if !input.dtype.is_float() {
                return Err(format!(
                    "{key}.input: `{}` is {}; states are f32 or f16",
                    s.input,
                    input.dtype.name()
                ));
            }
            if input.shape.iter().any(|d| matches!(d, Dim::Named { .. })) {
                return Err(format!(
                    "{key}.input: `{}` has a named dimension; a state's shape must be fixed \
                     (its first run starts from it)",
                    s.input
                ));
            }
            if !state_inputs.insert(&s.input) {
                return Err(format!("{key}.input: `{}` is in two state pairs", s.input));
            }
            if !s.init.is_finite() {
                return Err(format!("{key}.init: must be a finite number"));
            }
            if self.outputs.iter().any(|o| o.name == s.output) {
                return Err(format!(
                    "{key}.output: `{}` is also in [[outputs]]; a state output is fed back, \
                     not reported",
                    s.output
                ));
            }
        }
        if let Some(batch) = self.batch()
            && (self.fed().count() != 1 || !self.state.is_empty())
        {
            return Err(format!(
                "inputs: the image input's batch `{batch}` is named, but the model also takes \
                 other inputs or state; only a model with one image input and no state runs \
                 samples together (make the batch 1)"
            ));
        }
        for (n, o) in self.outputs.iter().enumerate() {
            let key = match self.format {
                1 => "postprocess".to_string(),
                _ => format!("outputs[{n}].postprocess"),
            };
            o.postprocess.check(&key)?;
        }
        if !(self.selftest.tolerance.is_finite() && self.selftest.tolerance >= 0.0) {
            return Err("selftest.tolerance: must be a finite number >= 0".into());
        }
        if golden_required && self.selftest.golden.is_empty() {
            return Err(
                "selftest.golden: at least one golden vector is required; a model that \
                        cannot be checked is not loaded"
                    .into(),
            );
        }
        for (i, g) in self.selftest.golden.iter().enumerate() {
            let paths: Vec<(String, &PathBuf)> = match g {
                Golden::Pair { input, output } => vec![
                    (format!("selftest.golden[{i}].input"), input),
                    (format!("selftest.golden[{i}].output"), output),
                ],
                Golden::Npz(p) => vec![(format!("selftest.golden[{i}]"), p)],
            };
            for (key, p) in paths {
                if !is_inside(p) {
                    return Err(format!(
                        "{key}: `{}` must be a relative path inside the package",
                        p.display()
                    ));
                }
            }
        }
        if let Some(e) = &self.evaluation {
            e.check(self)?;
        }
        Ok(())
    }

    /// Inputs a request supplies: not constants, not states.
    pub fn fed(&self) -> impl Iterator<Item = &InputSpec> {
        self.inputs
            .iter()
            .filter(|i| i.value.is_none() && !self.state.iter().any(|s| s.input == i.name))
    }

    /// The input a single image, audio clip or tensor goes to: the one with an image (or
    /// audio) declaration, else the only fed input.
    pub fn primary(&self) -> Option<&InputSpec> {
        if let Some(i) = self.inputs.iter().find(|i| i.image.is_some()) {
            return Some(i);
        }
        if let Some(i) = self.inputs.iter().find(|i| i.audio.is_some()) {
            return Some(i);
        }
        let mut fed = self.fed();
        match (fed.next(), fed.next()) {
            (Some(i), None) => Some(i),
            _ => None,
        }
    }

    /// The image declaration of the input images go to.
    pub fn image(&self) -> Option<&ImageSpec> {
        self.inputs.iter().find_map(|i| i.image.as_ref())
    }

    /// The (height, width) every image is brought to, when it is the same for every image.
    pub fn image_size(&self) -> Option<(usize, usize)> {
        let input = self.inputs.iter().find(|i| i.image.is_some())?;
        let image = input.image.as_ref()?;
        let fixed = |i: usize| match input.shape.get(i) {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        };
        match image.layout {
            Layout::Nchw => Some((fixed(2)?, fixed(3)?)),
            Layout::Nhwc => Some((fixed(1)?, fixed(2)?)),
            Layout::Nc => image.nc_side_size(fixed(1)?),
        }
    }

    /// The image input's named batch dimension and its bound, if samples may run together.
    pub fn batch(&self) -> Option<&str> {
        self.batch_bound().map(|(name, _)| name)
    }

    /// [`Manifest::batch`] with how many samples at most one run takes.
    pub fn batch_bound(&self) -> Option<(&str, usize)> {
        let input = self.inputs.iter().find(|i| i.image.is_some())?;
        match input.shape.first()? {
            Dim::Named { name, max } => Some((name, *max)),
            Dim::Fixed(_) => None,
        }
    }

    /// The primary input's dimensions after the batch dimension (a named one is 0).
    pub fn sample_shape(&self) -> Vec<usize> {
        self.primary()
            .map(|i| {
                i.shape
                    .iter()
                    .skip(1)
                    .map(|d| match d {
                        Dim::Fixed(n) => *n,
                        Dim::Named { .. } => 0,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl ImageSpec {
    /// With layout `nc`: the (height, width) `features` values make, when there is one: format
    /// 1's resize, else a square.
    pub fn nc_side_size(&self, features: usize) -> Option<(usize, usize)> {
        if let Some(size) = self.nc_size {
            return Some(size);
        }
        let c = self.color.channels();
        let side = ((features / c) as f64).sqrt() as usize;
        (side > 0 && side * side * c == features).then_some((side, side))
    }
}

impl InputSpec {
    fn check(&self, key: &str, format: u32) -> Result<(), String> {
        let shape = &self.shape;
        if shape.is_empty() && self.value.is_none() {
            return Err(format!(
                "{key}.shape: only a constant input (with `value`) may be a scalar"
            ));
        }
        for n in &self.symbolic {
            if !shape
                .iter()
                .any(|d| matches!(d, Dim::Named { name, .. } if name == n))
            {
                return Err(format!(
                    "{key}.symbolic: `{n}` is not a named dimension of {key}.shape"
                ));
            }
        }
        if shape.contains(&Dim::Fixed(0)) {
            return Err(format!(
                "{key}.shape: a dimension of 0 holds nothing; give its size"
            ));
        }
        let most = shape.iter().try_fold(1usize, |a, d| {
            a.checked_mul(match d {
                Dim::Fixed(n) => *n,
                Dim::Named { max, .. } => *max,
            })
        });
        if most.is_none_or(|n| n > super::array::MAX_TENSOR_ELEMENTS) {
            return Err(format!(
                "{key}.shape: at its largest the input holds more than {} values; lower a \
                 dimension or a bound",
                super::array::MAX_TENSOR_ELEMENTS
            ));
        }
        let mut named = std::collections::HashMap::new();
        for d in shape {
            if let Dim::Named { name, max } = d
                && let Some(other) = named.insert(name.clone(), *max)
                && other != *max
            {
                return Err(format!(
                    "{key}.shape: `{name}` is given two different bounds"
                ));
            }
        }
        if let Some(v) = &self.value {
            if self.image.is_some() || self.audio.is_some() {
                return Err(format!(
                    "{key}.value: a constant input takes no image or audio"
                ));
            }
            const_values(self, v).map_err(|e| format!("{key}.value: {e}"))?;
        }
        if let Some(image) = &self.image {
            let lkey = match format {
                1 => "input.layout",
                _ => &format!("{key}.image.layout"),
            };
            let pkey = match format {
                1 => "preprocess".to_string(),
                _ => format!("{key}.image"),
            };
            if !self.dtype.is_float() {
                return Err(format!(
                    "{key}.dtype: images become f32 or f16 values, not {}",
                    self.dtype.name()
                ));
            }
            let rank = match image.layout {
                Layout::Nchw | Layout::Nhwc => 4,
                Layout::Nc => 2,
            };
            if shape.len() != rank {
                return Err(format!(
                    "{key}.shape: {} dimensions do not fit layout `{:?}` ({lkey})",
                    shape.len(),
                    image.layout
                ));
            }
            let c = image.color.channels();
            let channel_dim = match image.layout {
                Layout::Nchw => Some(&shape[1]),
                Layout::Nhwc => Some(&shape[3]),
                Layout::Nc => None,
            };
            if let Some(d) = channel_dim
                && *d != Dim::Fixed(c)
            {
                return Err(format!(
                    "{pkey}.color: `{:?}` gives {c} channel(s) but {key}.shape has {d}",
                    image.color
                ));
            }
            for (k, v) in [("mean", &image.mean), ("std", &image.std)] {
                if !(v.is_empty() || v.len() == 1 || v.len() == c) {
                    return Err(format!(
                        "{pkey}.{k}: {} values for {c} channel(s); give 1 or {c}",
                        v.len()
                    ));
                }
            }
            if image.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
                return Err(format!("{pkey}.std: values must be finite and non-zero"));
            }
            if image.multiple == 0 {
                return Err(format!("{pkey}.multiple: must be at least 1"));
            }
            let spatial_named = match image.layout {
                Layout::Nchw => shape[2..].iter().any(|d| matches!(d, Dim::Named { .. })),
                Layout::Nhwc => shape[1..3].iter().any(|d| matches!(d, Dim::Named { .. })),
                Layout::Nc => matches!(shape[1], Dim::Named { .. }),
            };
            if spatial_named && (image.layout == Layout::Nc || image.resize != Resize::Fit) {
                return Err(format!(
                    "{pkey}.resize: {key}.shape has named sides, which only `fit` sets (and \
                     not with layout `nc`)"
                ));
            }
            if !spatial_named && image.resize == Resize::Fit {
                return Err(format!(
                    "{pkey}.resize: `fit` needs a named side in {key}.shape (`\"W<=1280\"`); \
                     with fixed sides, use `stretch`"
                ));
            }
            if image.layout == Layout::Nc {
                let features = match shape[1] {
                    Dim::Fixed(n) => n,
                    _ => 0,
                };
                if image.nc_side_size(features).is_none() {
                    return Err(format!(
                        "{key}.shape: with layout `nc`, {features} features are not a square \
                         {c}-channel image"
                    ));
                }
            }
            // A named batch (`"N<=8"`) lets crops of a chain run together; one image is N = 1.
            let batch_ok = match &shape[0] {
                Dim::Fixed(1) => true,
                Dim::Named { name, .. } => {
                    image.layout != Layout::Nc && !shape[1..].iter().any(|d| d.name() == Some(name))
                }
                Dim::Fixed(_) => false,
            };
            if !batch_ok {
                return Err(format!(
                    "{key}.shape: an image input's batch (dimension 0) must be 1, or a name of \
                     its own (`\"N<=8\"`) for crops run together"
                ));
            }
            if image.resize == Resize::Fit {
                // The batch is no side.
                for d in &shape[1..] {
                    if let Dim::Named { name, max } = d
                        && *max < image.multiple
                    {
                        return Err(format!(
                            "{key}.shape: `{name}` is at most {max}, under {pkey}.multiple \
                             ({}): no side could be a multiple",
                            image.multiple
                        ));
                    }
                }
            }
        }
        if let Some(audio) = &self.audio {
            let akey = format!("{key}.audio");
            if self.dtype != DType::F32 {
                return Err(format!(
                    "{key}.dtype: audio becomes f32 samples, not {}",
                    self.dtype.name()
                ));
            }
            if audio.window == 0 || audio.sample_rate == 0 {
                return Err(format!("{akey}: window and sample_rate must be at least 1"));
            }
            let want = audio.window + audio.context;
            let ok = shape.last() == Some(&Dim::Fixed(want))
                && shape[..shape.len() - 1].iter().all(|d| *d == Dim::Fixed(1));
            if !ok {
                return Err(format!(
                    "{key}.shape: audio of window {} + context {} needs a shape like [1, {want}]",
                    audio.window, audio.context
                ));
            }
        }
        Ok(())
    }

    /// The shape for one run, with named dimensions set from `named` (0 where unset).
    pub fn concrete_shape(&self, named: &std::collections::HashMap<String, usize>) -> Vec<usize> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Named { name, .. } => named.get(name).copied().unwrap_or(0),
            })
            .collect()
    }
}

/// A constant input's values, row-major, checked against its shape and dtype. Integers stay
/// integers (an i64 above 2^53 keeps every bit).
pub fn const_values(input: &InputSpec, v: &toml::Value) -> Result<Data, String> {
    let mut shape = Vec::new();
    let mut scalars = Vec::new();
    flatten(v, 0, &mut shape, &mut scalars)?;
    let want: Vec<usize> = input
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Ok(*n),
            Dim::Named { name, .. } => Err(format!(
                "a constant's shape must be fixed, `{name}` is named"
            )),
        })
        .collect::<Result<_, _>>()?;
    if shape != want {
        return Err(format!(
            "holds shape {shape:?}, the input's shape is {want:?}"
        ));
    }
    let dtype = input.dtype;
    let wrong = |x: &toml::Value| format!("{x} is not a {} value", dtype.name());
    let int = |x: &toml::Value| x.as_integer().ok_or_else(|| wrong(x));
    Ok(match dtype {
        DType::F32 | DType::F16 => Data::F32(
            scalars
                .iter()
                .map(|x| match x {
                    toml::Value::Float(f) if f.is_finite() => Ok(*f as f32),
                    toml::Value::Integer(i) => Ok(*i as f32),
                    other => Err(wrong(other)),
                })
                .collect::<Result<_, _>>()?,
        ),
        DType::I64 => Data::I64(scalars.iter().map(|x| int(x)).collect::<Result<_, _>>()?),
        DType::I32 => Data::I32(
            scalars
                .iter()
                .map(|x| {
                    int(x)
                        .and_then(|i| i32::try_from(i).map_err(|_| format!("{i} does not fit i32")))
                })
                .collect::<Result<_, _>>()?,
        ),
        DType::U8 => Data::U8(
            scalars
                .iter()
                .map(|x| {
                    int(x).and_then(|i| u8::try_from(i).map_err(|_| format!("{i} does not fit u8")))
                })
                .collect::<Result<_, _>>()?,
        ),
        DType::Bool => Data::Bool(
            scalars
                .iter()
                .map(|x| x.as_bool().ok_or_else(|| wrong(x)))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn flatten<'a>(
    v: &'a toml::Value,
    depth: usize,
    shape: &mut Vec<usize>,
    out: &mut Vec<&'a toml::Value>,
) -> Result<(), String> {
    match v {
        toml::Value::Array(a) => {
            if shape.len() == depth {
                shape.push(a.len());
            } else if shape.get(depth) != Some(&a.len()) {
                return Err("arrays of different lengths at one depth".into());
            }
            a.iter().try_for_each(|x| flatten(x, depth + 1, shape, out))
        }
        _ if shape.len() > depth => Err("a number where an array was".into()),
        scalar => {
            if out.len() >= MAX_CONST_VALUES {
                return Err(format!("more than {MAX_CONST_VALUES} values"));
            }
            out.push(scalar);
            Ok(())
        }
    }
}

/// A constant in a manifest is a handful of values (a sample rate, a threshold table).
const MAX_CONST_VALUES: usize = 65536;

impl Postprocess {
    fn check(&self, key: &str) -> Result<(), String> {
        match self {
            Postprocess::Ctc { charset, .. } if !is_inside(charset) => Err(format!(
                "{key}.charset: `{}` must be a relative path inside the package",
                charset.display()
            )),
            Postprocess::Detect { max_boxes: n, .. }
            | Postprocess::TextBoxes { max_boxes: n, .. }
                if *n == 0 || *n > MAX_BOXES =>
            {
                Err(format!(
                    "{key}.max_boxes: must be between 1 and {MAX_BOXES}"
                ))
            }
            Postprocess::TextBoxes {
                threshold,
                box_threshold,
                unclip_ratio,
                ..
            } => {
                for (k, v) in [("threshold", threshold), ("box_threshold", box_threshold)] {
                    if !(0.0..=1.0).contains(v) {
                        return Err(format!("{key}.{k}: must be between 0 and 1"));
                    }
                }
                if !(unclip_ratio.is_finite() && *unclip_ratio >= 0.0) {
                    return Err(format!("{key}.unclip_ratio: must be a finite number >= 0"));
                }
                Ok(())
            }
            Postprocess::Detect {
                score_threshold,
                iou_threshold,
                ..
            } => {
                for (k, v) in [
                    ("score_threshold", score_threshold),
                    ("iou_threshold", iou_threshold),
                ] {
                    if !(0.0..=1.0).contains(v) {
                        return Err(format!("{key}.{k}: must be between 0 and 1"));
                    }
                }
                Ok(())
            }
            Postprocess::Score {
                threshold,
                hysteresis,
            } => {
                if threshold.is_some_and(|t| !t.is_finite()) {
                    return Err(format!("{key}.threshold: must be a finite number"));
                }
                if !(hysteresis.is_finite() && *hysteresis >= 0.0) {
                    return Err(format!("{key}.hysteresis: must be a finite number >= 0"));
                }
                Ok(())
            }
            Postprocess::Raw { max_values } if *max_values == 0 || *max_values > MAX_RAW_VALUES => {
                Err(format!(
                    "{key}.max_values: must be between 1 and {MAX_RAW_VALUES}"
                ))
            }
            _ => Ok(()),
        }
    }
}

fn unique<'a>(names: impl Iterator<Item = &'a String>, key: &str) -> Result<(), String> {
    let mut seen = HashSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(format!("{key}: `{n}` is declared twice"));
        }
    }
    Ok(())
}

fn typed<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| describe(text, &e, ""))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        describe(text, e.inner(), &key)
    })
}

/// Format 1, as tern first wrote it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1 {
    name: String,
    version: semver::Version,
    #[serde(default)]
    description: String,
    #[serde(default)]
    form: String,
    input: V1Input,
    preprocess: Option<V1Preprocess>,
    output: V1Output,
    #[serde(default)]
    postprocess: V1Postprocess,
    selftest: V1SelfTest,
    evaluation: Option<Evaluation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1Input {
    name: String,
    dtype: V1DType,
    /// A string (e.g. `"N"`) is a batch dimension, pinned to 1, and may only come first.
    shape: Vec<RawDimV1>,
    layout: Layout,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum V1DType {
    F32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDimV1 {
    Fixed(usize),
    Symbol(#[allow(dead_code)] String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1Preprocess {
    color: Color,
    /// `[width, height]`; absent means images must already have the input's size.
    resize: Option<[u32; 2]>,
    #[serde(default)]
    filter: Filter,
    #[serde(default = "one")]
    scale: f32,
    #[serde(default)]
    mean: Vec<f32>,
    #[serde(default)]
    std: Vec<f32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1Output {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1Postprocess {
    #[serde(default)]
    softmax: bool,
    #[serde(default = "default_top_k")]
    top_k: NonZeroUsize,
    #[serde(default)]
    labels: Vec<String>,
}

impl Default for V1Postprocess {
    fn default() -> Self {
        V1Postprocess {
            softmax: false,
            top_k: default_top_k(),
            labels: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1SelfTest {
    tolerance: f32,
    golden: Vec<V1Golden>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V1Golden {
    input: PathBuf,
    output: PathBuf,
}

impl V1 {
    fn into_manifest(self) -> Result<Manifest, String> {
        let shape = &self.input.shape;
        if shape.is_empty() {
            return Err("input.shape: must have at least one dimension".into());
        }
        if shape
            .iter()
            .skip(1)
            .any(|d| matches!(d, RawDimV1::Symbol(_)))
        {
            return Err("input.shape: only the first (batch) dimension may be symbolic".into());
        }
        // tern runs one sample at a time: a symbolic batch is pinned to 1, which also lets
        // tract plan for a concrete shape.
        let shape: Vec<Dim> = shape
            .iter()
            .map(|d| match d {
                RawDimV1::Fixed(n) => Dim::Fixed(*n),
                RawDimV1::Symbol(_) => Dim::Fixed(1),
            })
            .collect();
        let rank_ok = match self.input.layout {
            Layout::Nchw | Layout::Nhwc => shape.len() == 4,
            Layout::Nc => shape.len() == 2,
        };
        if !rank_ok {
            return Err(format!(
                "input.shape: {} dimensions do not fit layout `{:?}`",
                shape.len(),
                self.input.layout
            ));
        }
        let image = match self.preprocess {
            None => None,
            Some(p) => {
                let fixed = |i: usize| match shape[i] {
                    Dim::Fixed(n) => n,
                    Dim::Named { .. } => 0,
                };
                let (h, w) = match self.input.layout {
                    Layout::Nchw => (fixed(2), fixed(3)),
                    Layout::Nhwc => (fixed(1), fixed(2)),
                    Layout::Nc => match p.resize {
                        Some([w, h]) => (h as usize, w as usize),
                        None => {
                            let c = p.color.channels();
                            let side = ((fixed(1) / c) as f64).sqrt() as usize;
                            if side * side * c != fixed(1) {
                                return Err("input.shape: with layout `nc`, give \
                                            preprocess.resize or a square feature count"
                                    .into());
                            }
                            (side, side)
                        }
                    },
                };
                if let Some([rw, rh]) = p.resize
                    && (rw as usize != w || rh as usize != h)
                {
                    return Err(format!(
                        "preprocess.resize: [{rw}, {rh}] does not match the input's {w}x{h}"
                    ));
                }
                Some(ImageSpec {
                    layout: self.input.layout,
                    color: p.color,
                    resize: if p.resize.is_some() {
                        Resize::Stretch
                    } else {
                        Resize::None
                    },
                    multiple: 1,
                    pad: 0,
                    nc_size: (self.input.layout == Layout::Nc).then_some((h, w)),
                    filter: p.filter,
                    scale: p.scale,
                    mean: p.mean,
                    std: p.std,
                })
            }
        };
        let _ = self.input.dtype;
        Ok(Manifest {
            format: 1,
            name: self.name,
            version: self.version,
            description: self.description,
            form: self.form,
            inputs: vec![InputSpec {
                name: self.input.name,
                dtype: DType::F32,
                shape,
                value: None,
                image,
                audio: None,
                symbolic: Vec::new(),
            }],
            outputs: vec![OutputSpec {
                name: self.output.name,
                postprocess: Postprocess::Classify {
                    softmax: self.postprocess.softmax,
                    top_k: self.postprocess.top_k,
                    labels: self.postprocess.labels,
                    // Format 1 took the top k over every value of its output.
                    axis: None,
                },
            }],
            state: Vec::new(),
            selftest: SelfTest {
                tolerance: self.selftest.tolerance,
                golden: self
                    .selftest
                    .golden
                    .into_iter()
                    .map(|g| Golden::Pair {
                        input: g.input,
                        output: g.output,
                    })
                    .collect(),
            },
            evaluation: self.evaluation,
        })
    }
}

/// Format 2.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2 {
    #[allow(dead_code)]
    format: u32,
    name: String,
    version: semver::Version,
    #[serde(default)]
    description: String,
    #[serde(default)]
    form: String,
    inputs: Vec<InputSpec>,
    outputs: Vec<OutputSpec>,
    #[serde(default)]
    state: Vec<StatePair>,
    selftest: V2SelfTest,
    evaluation: Option<Evaluation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2SelfTest {
    tolerance: f32,
    /// `.npz` files or folders of `.npy`, one per case.
    golden: Vec<PathBuf>,
}

impl V2 {
    fn into_manifest(self) -> Result<Manifest, String> {
        Ok(Manifest {
            format: 2,
            name: self.name,
            version: self.version,
            description: self.description,
            form: self.form,
            inputs: self.inputs,
            outputs: self.outputs,
            state: self.state,
            selftest: SelfTest {
                tolerance: self.selftest.tolerance,
                golden: self.selftest.golden.into_iter().map(Golden::Npz).collect(),
            },
            evaluation: self.evaluation,
        })
    }
}

/// A relative path with no `..`, no root and no prefix: it cannot leave the package.
pub fn is_inside(p: &Path) -> bool {
    use std::path::Component;
    !p.as_os_str().is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

fn describe(text: &str, e: &toml::de::Error, key: &str) -> String {
    let line = e.span().map(|s| {
        text.as_bytes()[..s.start.min(text.len())]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    });
    let mut out = String::new();
    if let Some(l) = line {
        out += &format!("line {l}: ");
    }
    if !key.is_empty() && key != "." {
        out += &format!("{key}: ");
    }
    out += e.message().trim();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Input;

    const GOOD: &str = r#"
name = "m"
version = "1.2.3"
[input]
name = "input"
dtype = "f32"
shape = ["N", 3, 32, 32]
layout = "nchw"
[preprocess]
color = "rgb"
resize = [32, 32]
[output]
name = "probs"
[selftest]
tolerance = 0.01
[[selftest.golden]]
input = "golden/0-input.npy"
output = "golden/0-output.npy"
"#;

    #[test]
    fn an_evaluation_set_is_read_and_its_mistakes_named() {
        let with = |extra: &str| Manifest::parse(&format!("{GOOD}{extra}"));
        let m = with(
            "[evaluation]\nrule = \"accuracy >= 0.9\"\n[[evaluation.samples]]\ninput = \"eval/a.png\"\nlabel = \"3\"\n",
        )
        .unwrap();
        let e = m.evaluation.expect("read");
        assert_eq!(e.rule(), Rule::Accuracy(0.9));
        assert_eq!(e.samples[0].label.as_deref(), Some("3"));
        assert!(Manifest::parse(GOOD).unwrap().evaluation.is_none());
        for (extra, says) in [
            (
                "[evaluation]\nrule = \"accuracy > 0.9\"\n[[evaluation.samples]]\ninput = \"a.png\"\nlabel = \"3\"\n",
                "evaluation.rule: `accuracy > 0.9` is not a rule",
            ),
            (
                "[evaluation]\nrule = \"accuracy >= 1.5\"\n[[evaluation.samples]]\ninput = \"a.png\"\nlabel = \"3\"\n",
                "outside 0..=1",
            ),
            (
                "[evaluation]\nrule = \"accuracy >= 0.9\"\n[[evaluation.samples]]\ninput = \"a.png\"\n",
                "evaluation.samples[0].label",
            ),
            (
                "[evaluation]\nrule = \"max_difference <= 0.1\"\n[[evaluation.samples]]\ninput = \"a.npy\"\n",
                "evaluation.samples[0].reference",
            ),
            (
                "[evaluation]\nrule = \"accuracy >= 0.9\"\n[[evaluation.samples]]\ninput = \"../a.png\"\nlabel = \"3\"\n",
                "evaluation.samples[0].input: `../a.png` must be a relative path",
            ),
            (
                "[evaluation]\nrule = \"accuracy >= 0.9\"\nsamples = []\n",
                "at least one sample",
            ),
        ] {
            let e = with(extra).unwrap_err();
            assert!(e.contains(says), "{extra}: {e}");
        }
        assert!(Rule::Accuracy(0.9).met_by(0.9) && !Rule::Accuracy(0.9).met_by(0.89));
        assert!(Rule::MaxDifference(0.1).met_by(0.1) && !Rule::MaxDifference(0.1).met_by(0.2));
    }

    #[test]
    fn good_manifest_parses() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.format, 1);
        assert_eq!(m.image_size(), Some((32, 32)));
        assert_eq!(m.sample_shape(), [3, 32, 32]);
        assert_eq!(m.inputs[0].shape[0], Dim::Fixed(1), "the batch is pinned");
        match &m.outputs[0].postprocess {
            Postprocess::Classify { top_k, .. } => assert_eq!(top_k.get(), 5),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn typo_names_key_and_line() {
        let bad = GOOD.replace("layout = ", "layuot = ");
        let e = Manifest::parse(&bad).unwrap_err();
        assert!(e.contains("layuot") && e.contains("line 8"), "{e}");
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        for (from, to, want) in [
            ("color = \"rgb\"", "color = \"gray\"", "preprocess.color"),
            (
                "resize = [32, 32]",
                "resize = [16, 32]",
                "preprocess.resize",
            ),
            (
                "\"golden/0-input.npy\"",
                "\"../../etc/passwd\"",
                "golden[0].input",
            ),
            (
                "shape = [\"N\", 3, 32, 32]",
                "shape = [\"N\", 3, \"H\", 32]",
                "input.shape",
            ),
            ("version = \"1.2.3\"", "version = \"one\"", "version"),
            ("name = \"m\"", "name = \"../m\"", "name"),
        ] {
            let e = Manifest::parse(&GOOD.replace(from, to)).unwrap_err();
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    const V2_GOOD: &str = r#"
format = 2
name = "vad"
version = "6.2.3"
[[inputs]]
name = "input"
dtype = "f32"
shape = [1, 576]
[inputs.audio]
sample_rate = 16000
window = 512
context = 64
[[inputs]]
name = "state"
dtype = "f32"
shape = [2, 1, 128]
[[inputs]]
name = "sr"
dtype = "i64"
shape = []
value = 16000
[[outputs]]
name = "output"
[outputs.postprocess]
kind = "score"
threshold = 0.5
hysteresis = 0.15
[[state]]
input = "state"
output = "stateN"
[selftest]
tolerance = 0.0002
golden = ["golden/0.npz"]
"#;

    #[test]
    fn format_2_declares_constants_states_and_postprocessors() {
        let m = Manifest::parse(V2_GOOD).unwrap();
        assert_eq!(m.format, 2);
        assert_eq!(m.inputs.len(), 3);
        let fed: Vec<_> = m.fed().map(|i| i.name.as_str()).collect();
        assert_eq!(fed, ["input"], "constants and states are not fed");
        assert_eq!(m.primary().unwrap().name, "input");
        assert_eq!(
            const_values(&m.inputs[2], m.inputs[2].value.as_ref().unwrap()).unwrap(),
            Data::I64(vec![16000])
        );
        assert!(matches!(
            m.outputs[0].postprocess,
            Postprocess::Score {
                threshold: Some(t),
                ..
            } if t == 0.5
        ));
        assert_eq!(m.selftest.golden, [Golden::Npz("golden/0.npz".into())]);
    }

    #[test]
    fn named_dims_parse_with_bounds() {
        let text = V2_GOOD.replace("shape = [2, 1, 128]", "shape = [2, \"B<=4\", 128]");
        let e = Manifest::parse(&text).unwrap_err();
        assert!(e.contains("state[0].input") && e.contains("fixed"), "{e}");
        for (dim, want) in [
            ("\"W<=1280\"", Ok(("W", 1280))),
            ("\"W\"", Ok(("W", MAX_DIM))),
            ("\"W<=0\"", Err("bound")),
            ("\"1W\"", Err("named dimension")),
            ("\"W<=x\"", Err("whole number")),
        ] {
            let text = V2_GOOD.replace(
                "shape = [2, 1, 128]",
                &format!("shape = [2, 1, 128]\n[[inputs]]\nname = \"extra\"\ndtype = \"f32\"\nshape = [1, {dim}]"),
            );
            match (Manifest::parse(&text), want) {
                (Ok(m), Ok((name, max))) => {
                    assert_eq!(
                        m.inputs[2].shape[1],
                        Dim::Named {
                            name: name.into(),
                            max
                        }
                    )
                }
                (Err(e), Err(w)) => assert!(e.contains(w) && e.contains("inputs[2]"), "{e}"),
                (got, want) => panic!("{dim}: {got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn bad_format_2_manifests_name_the_key() {
        for (from, to, want) in [
            ("format = 2", "format = 3", "format"),
            ("dtype = \"i64\"", "dtype = \"int64\"", "inputs[2].dtype"),
            ("value = 16000", "value = 1.5", "inputs[2].value"),
            ("value = 16000", "value = [1, 2]", "inputs[2].value"),
            ("input = \"state\"", "input = \"states\"", "state[0].input"),
            (
                "output = \"stateN\"",
                "output = \"output\"",
                "state[0].output",
            ),
            (
                "kind = \"score\"",
                "kind = \"scores\"",
                "outputs[0].postprocess",
            ),
            ("hysteresis = 0.15", "hysterisis = 0.15", "hysterisis"),
            ("window = 512", "window = 500", "inputs[0].shape"),
            ("\"golden/0.npz\"", "\"/etc/passwd\"", "selftest.golden[0]"),
        ] {
            assert!(V2_GOOD.contains(from), "{from}");
            let e = Manifest::parse(&V2_GOOD.replace(from, to)).unwrap_err();
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    #[test]
    fn images_with_named_sides_must_fit() {
        let text = r#"
format = 2
name = "rec"
version = "1.0.0"
[[inputs]]
name = "x"
dtype = "f32"
shape = [1, 3, 48, "W<=1280"]
[inputs.image]
layout = "nchw"
color = "bgr"
resize = "fit"
multiple = 8
[[outputs]]
name = "y"
[outputs.postprocess]
kind = "ctc"
charset = "charset.txt"
[selftest]
tolerance = 0.001
golden = ["g.npz"]
"#;
        let m = Manifest::parse(text).unwrap();
        assert_eq!(m.image_size(), None, "the width follows each image");
        let e = Manifest::parse(&text.replace("\"fit\"", "\"stretch\"")).unwrap_err();
        assert!(e.contains("inputs[0].image.resize"), "{e}");
        let e = Manifest::parse(&text.replace("[1, 3, 48", "[1, 1, 48")).unwrap_err();
        assert!(e.contains("inputs[0].image.color"), "{e}");
        let e = Manifest::parse(&text.replace("\"charset.txt\"", "\"../c.txt\"")).unwrap_err();
        assert!(e.contains("outputs[0].postprocess.charset"), "{e}");
        for (from, to, want) in [
            ("[1, 3, 48,", "[2, 3, 48,", "batch (dimension 0) must be 1"),
            (
                "[1, 3, 48, \"W<=1280\"]",
                "[\"W<=8\", 3, 48, \"W<=8\"]",
                "a name of its own",
            ),
            ("[1, 3, 48,", "[1, 3, 0,", "a dimension of 0"),
            ("\"W<=1280\"", "\"W<=4\"", "under inputs[0].image.multiple"),
            ("[1, 3, 48,", "[1, 3, 65536,", "more than"),
            ("charset = \"charset.txt\"", "kind_of = 1", "kind_of"),
        ] {
            assert!(text.contains(from), "{from}");
            let e = Manifest::parse(&text.replace(from, to)).unwrap_err();
            assert!(e.contains(want), "{to}: {e}");
        }
        // A named batch: samples may run together, one image is a batch of one. It is no
        // side: its bound may be under the sides' multiple.
        let batched = text.replace("[1, 3, 48,", "[\"N<=4\", 3, 48,");
        let m = Manifest::parse(&batched).unwrap();
        assert_eq!(m.batch_bound(), Some(("N", 4)));
        let one = Input::Tensor {
            shape: vec![1, 3, 48, 16],
            data: vec![0.0; 3 * 48 * 16],
        };
        one.prepare(&m).expect("a batch of one fits");
        assert_eq!(Manifest::parse(text).unwrap().batch(), None);
        let with_state = batched.replace(
            "[selftest]",
            "[[inputs]]\nname = \"h\"\ndtype = \"f32\"\nshape = [1, 4]\n\n\
             [[state]]\ninput = \"h\"\noutput = \"hn\"\n\n[selftest]",
        );
        let e = Manifest::parse(&with_state).unwrap_err();
        assert!(e.contains("runs samples together"), "{e}");
        let boxes = text.replace(
            "kind = \"ctc\"\ncharset = \"charset.txt\"",
            "kind = \"detect\"\nformat = \"yolo\"\nmax_boxes = 0",
        );
        let e = Manifest::parse(&boxes).unwrap_err();
        assert!(e.contains("outputs[0].postprocess.max_boxes"), "{e}");
    }

    #[test]
    fn format_1_keeps_its_meaning() {
        // Top-k over every value, whatever the output's shape; a flattened image that is not
        // square, sized by its resize.
        let text = GOOD
            .replace("shape = [\"N\", 3, 32, 32]", "shape = [\"N\", 128]")
            .replace("layout = \"nchw\"", "layout = \"nc\"")
            .replace("color = \"rgb\"", "color = \"gray\"")
            .replace("resize = [32, 32]", "resize = [16, 8]");
        let m = Manifest::parse(&text).unwrap();
        assert_eq!(m.image_size(), Some((8, 16)));
        assert!(matches!(
            m.outputs[0].postprocess,
            Postprocess::Classify { axis: None, .. }
        ));
    }
}
