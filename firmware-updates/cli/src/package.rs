//! `tern-update package`: bring your own model. `init` writes a manifest skeleton from an ONNX
//! file's inputs and outputs; `golden` records golden vectors from onnxruntime (through
//! Python) and checks that tern's engine agrees with them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use ternd::engine::{
    Array, DType, Input, MANIFEST_FILE, MODEL_FILE, Manifest, describe_onnx, read_npz, write_npz,
};

/// Largest input file `golden` reads.
const MAX_INPUT_BYTES: u64 = 256 * 1024 * 1024;

/// Write `<out>/model.onnx` (a copy) and `<out>/tern-model.toml`, a format 2 skeleton whose
/// comments say what the file leaves open.
pub fn init(model: &Path, out: &Path, name: Option<String>) -> anyhow::Result<()> {
    let info = describe_onnx(model).map_err(anyhow::Error::msg)?;
    if out.join(MANIFEST_FILE).exists() {
        bail!(
            "{} already exists; init does not overwrite",
            out.join(MANIFEST_FILE).display()
        );
    }
    let name = match name {
        Some(n) => n,
        None => model
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into()),
    };
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut t = String::new();
    let w = &mut t;
    let _ = writeln!(
        w,
        "# Written by `tern-update package init` from {}",
        model.display()
    );
    let _ = writeln!(
        w,
        "# ONNX opset {}{}. Check every TODO, then record golden vectors with",
        info.opset,
        if info.producer.is_empty() {
            String::new()
        } else {
            format!(", made by {}", info.producer)
        }
    );
    let _ = writeln!(
        w,
        "#   tern-update package golden {} --input FILE ...",
        out.display()
    );
    if !info.metadata.is_empty() {
        let _ = writeln!(
            w,
            "# The file's metadata keys: {}",
            info.metadata.join(", ")
        );
    }
    let _ = writeln!(
        w,
        "format = 2\nname = {name:?}\nversion = \"1.0.0\"\ndescription = \"\"\nform = \"f32\""
    );
    let mut batch = None;
    for (i, input) in info.inputs.iter().enumerate() {
        let _ = writeln!(w, "\n[[inputs]]\nname = {:?}", input.name);
        match input.dtype {
            Ok(d) => {
                let _ = writeln!(w, "dtype = \"{}\"", d.name());
            }
            Err(n) => {
                let _ = writeln!(
                    w,
                    "dtype = \"f32\"  # TODO: ONNX element type {n} is not one tern feeds"
                );
            }
        }
        let (shape, open) = dims(&input.dims, i, i == 0 || input.dims.len() == 4, &mut batch);
        let _ = write!(w, "shape = [{}]", shape.join(", "));
        if open.is_empty() {
            let _ = writeln!(w);
        } else {
            let _ = writeln!(
                w,
                "  # TODO: open in the model: {}. Fix each to a number, or keep it named and \
                 bound it (\"W<=1280\"): tern plans once per distinct value",
                open.join(", ")
            );
        }
        if input.dims.is_empty() {
            let _ = writeln!(
                w,
                "# TODO: a scalar input is a constant: give its `value` (e.g. a sample rate)"
            );
        }
        if input.dims.len() == 4 && input.dtype == Ok(DType::F32) {
            let _ = writeln!(
                w,
                "# If images feed this input, describe them (see README, package format 2):\n\
                 # [inputs.image]\n# layout = \"nchw\"\n# color = \"rgb\"\n# resize = \"stretch\"\n\
                 # scale = 0.00392156862745098"
            );
        }
    }
    for output in &info.outputs {
        let _ = writeln!(
            w,
            "\n[[outputs]]\nname = {:?}\n# shape in the model: {}\n[outputs.postprocess]\n\
             kind = \"raw\"  # TODO: classify, detect, text_boxes, ctc or score",
            output.name,
            shown(&output.dims)
        );
    }
    let _ = writeln!(
        w,
        "\n# A state output fed back as an input on the next run (recurrent models):\n\
         # [[state]]\n# input = \"state\"\n# output = \"stateN\"\n\n\
         [selftest]\ntolerance = 0.0001\ngolden = []"
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let dest = out.join(MODEL_FILE);
    if dest.exists() {
        // The skeleton describes `model`: another model already there would not match it.
        if std::fs::read(&dest)? != std::fs::read(model)? {
            bail!(
                "{} holds a different model; init does not overwrite",
                dest.display()
            );
        }
    } else {
        std::fs::copy(model, &dest)
            .with_context(|| format!("copying {} to {}", model.display(), dest.display()))?;
    }
    write_atomic(&out.join(MANIFEST_FILE), t.as_bytes())?;
    println!(
        "{}: {} input(s), {} output(s)",
        out.join(MANIFEST_FILE).display(),
        info.inputs.len(),
        info.outputs.len()
    );
    Ok(())
}

/// Dimensions as manifest entries, and a note for each one the model leaves open. The first
/// dimension of the first input (or of an image) left open is the batch, pinned to 1, and so is
/// every dimension the file gives the batch's name. Other open dimensions keep the file's name
/// when it is one a manifest takes (so inputs that share it stay equal), else a positional one.
fn dims(
    d: &[Result<i64, String>],
    input: usize,
    batch_first: bool,
    batch: &mut Option<String>,
) -> (Vec<String>, Vec<String>) {
    let mut shape = Vec::new();
    let mut open = Vec::new();
    let image_names = ["N", "C", "H", "W"];
    for (i, dim) in d.iter().enumerate() {
        match dim {
            Ok(n) => shape.push(n.to_string()),
            Err(p) if (i == 0 && batch_first) || (!p.is_empty() && batch.as_ref() == Some(p)) => {
                if i == 0 && batch.is_none() && !p.is_empty() {
                    *batch = Some(p.clone());
                }
                shape.push("1".into());
                open.push(format!("dimension {i} (`{p}`) is the batch, pinned to 1"));
            }
            Err(p) => {
                let usable = p.starts_with(|c: char| c.is_ascii_alphabetic())
                    && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                // Positional names are the input's own: two inputs' unnamed dimensions are
                // not the same dimension.
                let suffix = match input {
                    0 => String::new(),
                    n => format!("_{n}"),
                };
                let name = match (usable, d.len()) {
                    (true, _) => p.clone(),
                    (false, 4) => format!("{}{suffix}", image_names[i]),
                    (false, _) => format!("D{i}{suffix}"),
                };
                shape.push(format!("\"{name}<=4096\""));
                open.push(format!("dimension {i} (`{p}`)"));
            }
        }
    }
    (shape, open)
}

/// Dimensions as the file declares them, for a comment.
fn shown(d: &[Result<i64, String>]) -> String {
    let parts: Vec<String> = d
        .iter()
        .map(|x| match x {
            Ok(n) => n.to_string(),
            Err(p) if p.is_empty() => "?".into(),
            Err(p) => p.clone(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// The Python that computes reference outputs: onnxruntime, one thread, the named outputs.
const REFERENCE: &str = r#"
import sys
import numpy as np
import onnxruntime as ort
model, given, out = sys.argv[1:4]
names = sys.argv[4:]
o = ort.SessionOptions()
o.intra_op_num_threads = 1
s = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
z = np.load(given)
# tern holds f16 values as f32: give each input the element type the model declares.
types = {"tensor(float16)": np.float16, "tensor(float)": np.float32}
feed = {}
for i in s.get_inputs():
    a = z[i.name]
    feed[i.name] = a.astype(types[i.type]) if i.type in types else a
res = s.run(names, feed)
res = [r.astype(np.float32) if r.dtype == np.float16 else r for r in res]
np.savez(out, **{n: r for n, r in zip(names, res)})
"#;

/// For each input file: tern's preprocessing makes the model's inputs, onnxruntime computes the
/// outputs, and both go into `golden/<n>.npz`, listed in the manifest. Then the package is
/// loaded as a box loads it: tract must agree within the tolerance.
pub fn golden(dir: &Path, inputs: &[PathBuf], python: &str) -> anyhow::Result<bool> {
    let m = Manifest::read_draft(dir).map_err(anyhow::Error::msg)?;
    if m.format < 2 {
        bail!(
            "{}: golden vectors for format 1 packages are .npy pairs; make them as make_models.py does, or move the manifest to format 2",
            dir.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    let golden_dir = dir.join("golden");
    std::fs::create_dir_all(&golden_dir)?;
    let mut next = (0..)
        .find(|i| !golden_dir.join(format!("{i}.npz")).exists())
        .expect("a free index");
    let mut added = Vec::new();
    for file in inputs {
        let input = Input::from_file(file, MAX_INPUT_BYTES)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let prepared = input
            .prepare(&m)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        // The golden case holds what a request feeds, states included (at their start).
        let mut case: Vec<(String, Array)> = prepared
            .arrays
            .iter()
            .map(|(ix, a)| (m.inputs[*ix].name.clone(), a.clone()))
            .collect();
        for s in &m.state {
            if case.iter().any(|(n, _)| n == &s.input) {
                continue;
            }
            let spec = m
                .inputs
                .iter()
                .find(|i| i.name == s.input)
                .expect("checked");
            let shape = spec.concrete_shape(&Default::default());
            let n = shape.iter().product();
            case.push((s.input.clone(), Array::f32(shape, vec![s.init; n])));
        }
        // onnxruntime also needs the constants tern bakes into the graph.
        let mut feed = case.clone();
        for spec in m.inputs.iter().filter(|i| i.value.is_some()) {
            let data = ternd::engine::const_values(spec, spec.value.as_ref().expect("filtered"))
                .map_err(anyhow::Error::msg)?;
            feed.push((
                spec.name.clone(),
                Array {
                    shape: spec.concrete_shape(&Default::default()),
                    data,
                },
            ));
        }
        let given = tmp.path().join("given.npz");
        let got = tmp.path().join("outputs.npz");
        write_npz(&given, &feed)?;
        let names: Vec<&str> = m
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .chain(m.state.iter().map(|s| s.output.as_str()))
            .collect();
        let run = Command::new(python)
            .arg("-c")
            .arg(REFERENCE)
            .arg(dir.join(MODEL_FILE))
            .arg(&given)
            .arg(&got)
            .args(&names)
            .output()
            .with_context(|| format!("running {python} (needs numpy and onnxruntime)"))?;
        if !run.status.success() {
            bail!(
                "onnxruntime (through {python}) failed on {}: {}",
                file.display(),
                String::from_utf8_lossy(&run.stderr).trim()
            );
        }
        let outputs = read_npz(&std::fs::read(&got)?).map_err(anyhow::Error::msg)?;
        for (name, _) in case.iter_mut() {
            *name = format!("in/{name}");
        }
        case.extend(outputs.into_iter().map(|(n, a)| (format!("out/{n}"), a)));
        let rel = format!("golden/{next}.npz");
        write_npz(&dir.join(&rel), &case)?;
        println!("{rel}: from {}", file.display());
        added.push(rel);
        next += 1;
    }
    add_to_manifest(dir, &added)?;
    // tract, not `auto`: onnxruntime agreeing with itself would prove nothing.
    let tract = ternd::engine::Plan::Tract;
    match ternd::engine::Model::load_plan(dir, std::num::NonZeroUsize::MIN, tract) {
        Ok(model) => {
            println!(
                "{}: tract agrees with onnxruntime on all {} golden vector(s) (tolerance {}, plan {})",
                dir.display(),
                model.manifest.selftest.golden.len(),
                model.manifest.selftest.tolerance,
                model.plan
            );
            Ok(true)
        }
        Err(e) => {
            eprintln!(
                "tern-update: the golden vectors are written, but the package does not load: {e}"
            );
            Ok(false)
        }
    }
}

/// Append golden files to `[selftest] golden`, keeping the manifest's comments and layout.
fn add_to_manifest(dir: &Path, added: &[String]) -> anyhow::Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path)?;
    let mut doc: toml_edit::DocumentMut = text.parse().context("tern-model.toml")?;
    let list = doc["selftest"]["golden"]
        .as_array_mut()
        .context("selftest.golden is not an array")?;
    for a in added {
        if !list.iter().any(|v| v.as_str() == Some(a)) {
            list.push(a.as_str());
        }
    }
    write_atomic(&path, doc.to_string().as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
