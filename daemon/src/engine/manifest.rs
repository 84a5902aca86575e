//! `tern-model.toml`: what a model package declares about its model.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EngineError;

pub const MANIFEST_FILE: &str = "tern-model.toml";
pub const MODEL_FILE: &str = "model.onnx";

/// Manifests are small; a bigger one is not a manifest.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: semver::Version,
    #[serde(default)]
    pub description: String,
    /// Informational: `f32`, `int8`, ...
    #[serde(default)]
    pub form: String,
    pub input: InputSpec,
    pub preprocess: Option<Preprocess>,
    pub output: OutputSpec,
    #[serde(default)]
    pub postprocess: Postprocess,
    pub selftest: SelfTest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DType,
    /// Dimensions; a string (e.g. `"N"`) is a symbolic batch dimension and may only come first.
    pub shape: Vec<Dim>,
    pub layout: Layout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Symbol(String),
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
pub struct Preprocess {
    pub color: Color,
    /// `[width, height]`; absent means images must already have the input's size.
    pub resize: Option<[u32; 2]>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    Gray,
    Rgb,
}

impl Color {
    pub fn channels(self) -> usize {
        match self {
            Color::Gray => 1,
            Color::Rgb => 3,
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
pub struct OutputSpec {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postprocess {
    /// Apply softmax to the output (for models that end in logits).
    #[serde(default)]
    pub softmax: bool,
    #[serde(default = "default_top_k")]
    pub top_k: NonZeroUsize,
    #[serde(default)]
    pub labels: Vec<String>,
}

impl Default for Postprocess {
    fn default() -> Self {
        Postprocess {
            softmax: false,
            top_k: default_top_k(),
            labels: Vec::new(),
        }
    }
}

fn default_top_k() -> NonZeroUsize {
    NonZeroUsize::new(5).expect("5 is not zero")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTest {
    /// Largest absolute difference allowed between tern's output and the reference output.
    pub tolerance: f32,
    pub golden: Vec<Golden>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// `.npy` file, relative to the package, holding one input tensor (with its batch dim).
    pub input: PathBuf,
    /// `.npy` file holding the output the reference runtime produced for it.
    pub output: PathBuf,
}

impl Manifest {
    /// Read and check `<dir>/tern-model.toml`.
    pub fn read(dir: &Path) -> Result<Manifest, EngineError> {
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
        Self::parse(&text).map_err(bad)
    }

    /// Parse and check a manifest's text; the error names the key and line.
    pub(super) fn parse(text: &str) -> Result<Manifest, String> {
        let de = toml::Deserializer::parse(text).map_err(|e| describe(text, &e, ""))?;
        let m: Manifest = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            describe(text, e.inner(), &key)
        })?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), String> {
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
        let shape = &self.input.shape;
        if shape.is_empty() {
            return Err("input.shape: must have at least one dimension".into());
        }
        if shape.iter().skip(1).any(|d| matches!(d, Dim::Symbol(_))) {
            return Err("input.shape: only the first (batch) dimension may be symbolic".into());
        }
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
        if let Some(pre) = &self.preprocess {
            let c = pre.color.channels();
            for (key, v) in [("mean", &pre.mean), ("std", &pre.std)] {
                if !(v.is_empty() || v.len() == 1 || v.len() == c) {
                    return Err(format!(
                        "preprocess.{key}: {} values for {c} channel(s); give 1 or {c}",
                        v.len()
                    ));
                }
            }
            if pre.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
                return Err("preprocess.std: values must be finite and non-zero".into());
            }
            let (h, w) = self.image_size().ok_or(
                "input.shape: with layout `nc`, give preprocess.resize or a square feature count",
            )?;
            if let Some([rw, rh]) = pre.resize
                && (rw as usize != w || rh as usize != h)
            {
                return Err(format!(
                    "preprocess.resize: [{rw}, {rh}] does not match the input's {w}x{h}"
                ));
            }
            let expected_c = match self.input.layout {
                Layout::Nchw => self.fixed(1),
                Layout::Nhwc => self.fixed(3),
                Layout::Nc => None,
            };
            if let Some(ec) = expected_c
                && ec != c
            {
                return Err(format!(
                    "preprocess.color: `{:?}` gives {c} channel(s) but input.shape has {ec}",
                    pre.color
                ));
            }
        }
        if !(self.selftest.tolerance.is_finite() && self.selftest.tolerance >= 0.0) {
            return Err("selftest.tolerance: must be a finite number >= 0".into());
        }
        if self.selftest.golden.is_empty() {
            return Err(
                "selftest.golden: at least one golden vector is required; a model that \
                        cannot be checked is not loaded"
                    .into(),
            );
        }
        for (i, g) in self.selftest.golden.iter().enumerate() {
            for (key, p) in [("input", &g.input), ("output", &g.output)] {
                if !is_inside(p) {
                    return Err(format!(
                        "selftest.golden[{i}].{key}: `{}` must be a relative path inside the package",
                        p.display()
                    ));
                }
            }
        }
        Ok(())
    }

    fn fixed(&self, i: usize) -> Option<usize> {
        match self.input.shape.get(i) {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        }
    }

    /// The (height, width) images are brought to before they become the input tensor.
    pub fn image_size(&self) -> Option<(usize, usize)> {
        match self.input.layout {
            Layout::Nchw => Some((self.fixed(2)?, self.fixed(3)?)),
            Layout::Nhwc => Some((self.fixed(1)?, self.fixed(2)?)),
            Layout::Nc => {
                let features = self.fixed(1)?;
                let c = self.preprocess.as_ref()?.color.channels();
                match self.preprocess.as_ref()?.resize {
                    Some([w, h]) => Some((h as usize, w as usize)),
                    None => {
                        // A square image is the only shape we can infer from a feature count.
                        let side = ((features / c) as f64).sqrt() as usize;
                        (side * side * c == features).then_some((side, side))
                    }
                }
            }
        }
    }

    /// The input dimensions after the batch dimension.
    pub fn sample_shape(&self) -> Vec<usize> {
        self.input
            .shape
            .iter()
            .skip(1)
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Symbol(_) => 0,
            })
            .collect()
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
    fn good_manifest_parses() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.image_size(), Some((32, 32)));
        assert_eq!(m.sample_shape(), [3, 32, 32]);
        assert_eq!(m.postprocess.top_k.get(), 5);
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
}
