//! Models tern did not make, served as shipped: PP-OCR's detector, angle classifier and
//! recogniser and Silero VAD, from their wheels (`tests/models/fetch-third-party.sh`), with
//! golden vectors computed by onnxruntime.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tern_tests::*;
use ternd::engine::read_npz;

fn run(pkg: &Path, input: &Path) -> Vec<Value> {
    let (status, out, err) = infer(pkg, input, &["--json"]).unwrap();
    assert!(
        status.success(),
        "{} on {}: {err}",
        pkg.display(),
        input.display()
    );
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn testdata(packages: &Path) -> PathBuf {
    packages.parent().unwrap().join("testdata")
}

/// The reference output `name` of a golden case, as f32.
fn reference(pkg: &Path, case: &str, name: &str) -> (Vec<usize>, Vec<f32>) {
    let arrays = read_npz(&std::fs::read(pkg.join(case)).unwrap()).unwrap();
    let (_, a) = arrays
        .into_iter()
        .find(|(n, _)| n == &format!("out/{name}"))
        .unwrap_or_else(|| panic!("{case} has no out/{name}"));
    (a.shape, a.data.to_f32())
}

/// Loading runs every golden vector against onnxruntime's outputs; what `ternd infer` prints
/// for a golden input must also be onnxruntime's numbers, postprocessed.
#[test]
fn third_party_models_load_as_shipped_and_agree_with_onnxruntime() {
    let Some(dir) = third_party() else { return };
    let tol = 2e-4;

    let cls = dir.join("ppocr-cls");
    for case in ["golden/0.npz", "golden/1.npz"] {
        let out = &run(&cls, &cls.join(case))[0];
        let (_, want) = reference(&cls, case, "save_infer_model/scale_0.tmp_1");
        let top = out["outputs"]["save_infer_model/scale_0.tmp_1"]["top"]
            .as_array()
            .unwrap();
        assert_eq!(top.len(), 2, "{out}");
        for c in top {
            let i = c["index"].as_u64().unwrap() as usize;
            let got = c["score"].as_f64().unwrap() as f32;
            assert!(
                (got - want[i]).abs() <= tol,
                "{case}: class {i}: {got} vs {}",
                want[i]
            );
        }
        assert_eq!(
            out["top"],
            Value::Array(top.clone()),
            "the first classify output is `top`"
        );
    }

    let vad = dir.join("silero-vad");
    for case in ["golden/0.npz", "golden/2.npz"] {
        let out = &run(&vad, &vad.join(case))[0];
        let got = out["outputs"]["output"]["score"].as_f64().unwrap() as f32;
        let (_, want) = reference(&vad, case, "output");
        assert!((got - want[0]).abs() <= tol, "{case}: {got} vs {want:?}");
    }

    // Each character CTC read is the reference's best class at its step, with its score.
    let rec = dir.join("ppocr-rec");
    let charset: Vec<String> = std::fs::read_to_string(rec.join("charset.txt"))
        .unwrap()
        .trim_end_matches('\n')
        .split('\n')
        .map(str::to_string)
        .collect();
    for case in ["golden/0.npz", "golden/1.npz"] {
        let out = &run(&rec, &rec.join(case))[0];
        let (shape, want) = reference(&rec, case, "softmax_11.tmp_0");
        let classes = shape[2];
        let read = &out["outputs"]["softmax_11.tmp_0"];
        let chars = read["chars"].as_array().unwrap();
        assert!(!chars.is_empty(), "{case}: {out}");
        for c in chars {
            let t = c["step"].as_u64().unwrap() as usize;
            let row = &want[t * classes..(t + 1) * classes];
            let best = (0..classes)
                .max_by(|a, b| row[*a].total_cmp(&row[*b]))
                .unwrap();
            assert_eq!(
                c["char"].as_str().unwrap(),
                charset[best],
                "{case} step {t}"
            );
            let got = c["score"].as_f64().unwrap() as f32;
            assert!((got - row[best]).abs() <= tol, "{case} step {t}");
        }
    }

    // The detector runs at each golden's own size (H and W are named): a plan per shape.
    let det = dir.join("ppocr-det");
    for case in ["golden/0.npz", "golden/1.npz"] {
        let out = &run(&det, &det.join(case))[0];
        assert!(
            out["outputs"]["sigmoid_0.tmp_0"]["boxes"].is_array(),
            "{case}: {out}"
        );
    }
}

#[test]
fn ppocr_rec_reads_rendered_words() {
    let Some(dir) = third_party() else { return };
    let words_dir = testdata(&dir).join("words");
    let tsv = std::fs::read_to_string(words_dir.join("words.tsv")).unwrap();
    let words: Vec<(String, String)> = tsv
        .lines()
        .map(|l| {
            let (f, w) = l.split_once('\t').unwrap();
            (f.to_string(), w.to_string())
        })
        .collect();
    assert!(words.len() >= 40, "{} words", words.len());
    // One process reads the folder, in name order.
    let tmp = tempfile::tempdir().unwrap();
    for (f, _) in &words {
        std::fs::copy(words_dir.join(f), tmp.path().join(f)).unwrap();
    }
    let mut sorted = words.clone();
    sorted.sort();
    let rows = run(&dir.join("ppocr-rec"), tmp.path());
    assert_eq!(rows.len(), sorted.len());
    let mut wrong = Vec::new();
    for ((file, word), row) in sorted.iter().zip(&rows) {
        let text = row["outputs"]["softmax_11.tmp_0"]["text"].as_str().unwrap();
        if text != word {
            wrong.push(format!("{file}: {word:?} read as {text:?}"));
        }
    }
    let right = sorted.len() - wrong.len();
    eprintln!("ppocr-rec: {right}/{} words read exactly", sorted.len());
    assert!(
        right * 100 >= sorted.len() * 95,
        "{right}/{} right: {wrong:?}",
        sorted.len()
    );
}

/// The orientation classifier quantised to int8 (QDQ) with onnxruntime's own tools, as people
/// quantise for the edge. tract runs QDQ graphs element by element; the `tract+float` plan
/// (int8 on disk, float in the kernel) passes the same goldens, is among the plans `auto`
/// times, and labels the rendered words as the int8 graph does in tract.
#[test]
fn an_int8_qdq_model_serves_from_its_float_rewrite() {
    let Some(dir) = third_party() else { return };
    let pkg = dir.join("ppocr-cls-int8");
    let (status, out, err) = infer(
        &pkg,
        &pkg.join("golden/0.npz"),
        &["--json", "--repeat", "2"],
    )
    .unwrap();
    assert!(status.success(), "{err}");
    let summary: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let tried: Vec<&str> = summary["plans_tried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for plan in ["tract+fold", "tract", "tract+float"] {
        assert!(
            tried
                .iter()
                .any(|t| t.starts_with(&format!("{plan}: ")) && t.ends_with(" µs")),
            "{plan} did not pass and get timed: {tried:?}"
        );
    }

    let words_dir = testdata(&dir).join("words");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&words_dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    // Every word is upright: the share labelled `0` is each plan's accuracy.
    let upright = |plan: &str| -> (usize, usize) {
        let (status, out, err) = infer(&pkg, tmp.path(), &["--json", "--plan", plan]).unwrap();
        assert!(status.success(), "{plan}: {err}");
        let labels: Vec<String> = out
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["top"][0]["label"].as_str().unwrap().to_string()
            })
            .collect();
        (labels.iter().filter(|l| *l == "0").count(), labels.len())
    };
    let ((int8, n), (float, m)) = (upright("tract"), upright("tract+float"));
    eprintln!(
        "ppocr-cls-int8: upright words labelled upright: int8 graph {int8}/{n}, tract+float {float}/{m}"
    );
    assert!(n >= 40 && n == m, "{n} and {m} words");
    assert!(int8 * 10 >= n * 9, "the int8 graph: {int8}/{n}");
    assert!(
        float + 1 >= int8,
        "tract+float {float}/{n} against the int8 graph's {int8}/{n}"
    );
}

#[test]
fn ppocr_det_finds_each_text_line_in_image_coordinates() {
    let Some(dir) = third_party() else { return };
    let data = testdata(&dir);
    let truth = read_json(&data.join("page.json"));
    let lines: Vec<[f64; 4]> = truth["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let v: Vec<f64> = l
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            [v[0], v[1], v[2], v[3]]
        })
        .collect();
    let out = &run(&dir.join("ppocr-det"), &data.join("page.png"))[0];
    let boxes: Vec<[f64; 4]> = out["outputs"]["sigmoid_0.tmp_0"]["boxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| ["x0", "y0", "x1", "y1"].map(|k| b[k].as_f64().unwrap()))
        .collect();
    assert_eq!(boxes.len(), lines.len(), "{boxes:?} vs {lines:?}");
    let iou = |a: &[f64; 4], b: &[f64; 4]| {
        let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let inter = w * h;
        let area = |r: &[f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
        inter / (area(a) + area(b) - inter)
    };
    // Boxes come in reading order, as the lines do.
    for (i, (b, l)) in boxes.iter().zip(&lines).enumerate() {
        let v = iou(b, l);
        assert!(v >= 0.5, "line {i}: box {b:?} vs ink {l:?}: IoU {v:.2}");
    }
}

#[test]
fn silero_vad_hears_speech_and_not_silence_with_its_state_carried() {
    let Some(dir) = third_party() else { return };
    let data = testdata(&dir);
    let truth = read_json(&data.join("speech.json"));
    let (start, end) = (
        truth["speech"][0][0].as_f64().unwrap(),
        truth["speech"][0][1].as_f64().unwrap(),
    );
    let vad = dir.join("silero-vad");
    let rows = run(&vad, &data.join("speech.wav"));
    let window = 512.0 / 16000.0;
    let (mut inside, mut inside_hi, mut outside, mut outside_lo) = (0, 0, 0, 0);
    let mut events = Vec::new();
    for r in &rows {
        let t = r["start_s"].as_f64().unwrap();
        let out = &r["outputs"]["output"];
        let p = out["score"].as_f64().unwrap();
        if let Some(e) = out["event"].as_str() {
            events.push((e.to_string(), t));
        }
        if t >= start && t + window <= end {
            inside += 1;
            inside_hi += usize::from(p > 0.5);
        } else if t + window < start || t > end + 0.1 {
            outside += 1;
            outside_lo += usize::from(p < 0.5);
        }
    }
    eprintln!(
        "silero-vad: {inside_hi}/{inside} speech windows > 0.5, {outside_lo}/{outside} silent \
         windows < 0.5, events {events:?}"
    );
    assert!(inside > 20 && outside > 20, "{inside} {outside}");
    assert!(inside_hi * 100 >= inside * 80, "{inside_hi}/{inside}");
    assert!(outside_lo * 100 >= outside * 95, "{outside_lo}/{outside}");
    // Without the state carried, every window would start cold and read far lower.
    let (first, last) = (events.first().unwrap(), events.last().unwrap());
    assert_eq!(first.0, "start");
    assert!(
        (first.1 - start).abs() <= 0.3,
        "speech starts at {start}, event {first:?}"
    );
    assert_eq!(last.0, "stop");
    assert!(
        last.1 >= end - 0.1 && last.1 <= end + 0.5,
        "speech ends at {end}, event {last:?}"
    );

    // The same audio as raw s16le PCM, and as a multi-row .npy of the windows (64 samples of
    // context, then 512 new ones) cut here: the same stream, the same scores.
    let wav = std::fs::read(data.join("speech.wav")).unwrap();
    let at = wav.windows(4).position(|w| w == b"data").unwrap();
    let len = u32::from_le_bytes(wav[at + 4..at + 8].try_into().unwrap()) as usize;
    let pcm = &wav[at + 8..at + 8 + len];
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("speech.s16le"), pcm).unwrap();
    let samples: Vec<f32> = pcm
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    let mut windows = Vec::new();
    for start in (0..samples.len()).step_by(512) {
        windows.extend((0..576).map(|i| {
            (start + i)
                .checked_sub(64)
                .and_then(|a| samples.get(a))
                .copied()
                .unwrap_or(0.0)
        }));
    }
    let n = windows.len() / 576;
    std::fs::write(tmp.path().join("windows.npy"), npy_f32(&[n, 576], &windows)).unwrap();
    let scores = |rows: &[Value]| -> Vec<f64> {
        rows.iter()
            .map(|r| r["outputs"]["output"]["score"].as_f64().unwrap())
            .collect()
    };
    // Each run chooses its plan by timing (tract or onnxruntime, which differ in the last
    // bits), so the same stream gives the same scores to within float rounding.
    let want = scores(&rows);
    for input in ["speech.s16le", "windows.npy"] {
        let got = scores(&run(&vad, &tmp.path().join(input)));
        assert_eq!(got.len(), want.len(), "{input}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5, "{input}: window {i}: {g} vs {w}");
        }
    }
}

/// A little-endian float32 `.npy`, as numpy writes it.
fn npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    // Magic (6) + version (2) + length (2) + header, padded with spaces to 64 bytes, "\n".
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    out
}

/// A package someone got wrong is refused with the manifest key to change.
#[test]
fn bad_third_party_packages_name_the_key_to_fix() {
    let Some(dir) = third_party() else { return };
    let edit = |pkg: &str, from: &str, to: &str| -> String {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join(pkg);
        copy_dir(&dir.join(pkg), &d).unwrap();
        let mf = d.join("tern-model.toml");
        let text = std::fs::read_to_string(&mf).unwrap();
        assert!(text.contains(from), "{pkg}: {from}");
        std::fs::write(&mf, text.replacen(from, to, 1)).unwrap();
        let case = d.join("golden/0.npz");
        let (status, _, err) = infer(&d, &case, &[]).unwrap();
        assert!(!status.success(), "{pkg} with {to:?} loaded");
        err
    };
    // A state pair whose output's shape is not its input's.
    let e = edit(
        "silero-vad",
        "name = \"output\"\n[outputs.postprocess]\nkind = \"score\"\nthreshold = 0.5\n\
         hysteresis = 0.15\n\n[[state]]\ninput = \"state\"\noutput = \"stateN\"",
        "name = \"stateN\"\n[outputs.postprocess]\nkind = \"raw\"\n\n[[state]]\n\
         input = \"state\"\noutput = \"output\"",
    );
    assert!(
        e.contains("state[0]") && e.contains("[1, 1]") && e.contains("[2, 1, 128]"),
        "{e}"
    );
    // A dtype the model does not take.
    let e = edit("silero-vad", "dtype = \"i64\"", "dtype = \"i32\"");
    assert!(e.contains("inputs[1].dtype") && e.contains("I64"), "{e}");
    // A state whose declared shape is not the model's.
    let e = edit("silero-vad", "shape = [2, 1, 128]", "shape = [2, 1, 64]");
    assert!(e.contains("inputs[2].shape") && e.contains("128"), "{e}");
    // A state pair naming an output the model does not have.
    let e = edit("silero-vad", "output = \"stateN\"", "output = \"hn\"");
    assert!(e.contains("state[0].output") && e.contains("stateN"), "{e}");
    // A postprocessor on an output of the wrong rank.
    let classify = "kind = \"classify\"\nsoftmax = false\ntop_k = 2\nlabels = [\"0\", \"180\"]";
    let e = edit("ppocr-cls", classify, "kind = \"text_boxes\"");
    assert!(
        e.contains("outputs[0].postprocess") && e.contains("[1, 1, H, W]"),
        "{e}"
    );
    let e = edit("ppocr-cls", classify, "kind = \"score\"");
    assert!(
        e.contains("outputs[0].postprocess") && e.contains("one value"),
        "{e}"
    );

    // A charset shorter than the classes.
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("ppocr-rec");
    copy_dir(&dir.join("ppocr-rec"), &rec).unwrap();
    let cs = std::fs::read_to_string(rec.join("charset.txt")).unwrap();
    let shorter: Vec<&str> = cs.trim_end_matches('\n').split('\n').collect();
    std::fs::write(
        rec.join("charset.txt"),
        shorter[..shorter.len() - 1].join("\n") + "\n",
    )
    .unwrap();
    let (status, _, e) = infer(&rec, &rec.join("golden/0.npz"), &[]).unwrap();
    assert!(!status.success());
    assert!(
        e.contains("outputs[0].postprocess") && e.contains("charset has 6624 entries"),
        "{e}"
    );
}

/// Bring your own model, as the README walks through it: `tern-update package init` on a
/// third-party ONNX file, the TODOs filled in, `package golden` on two images (onnxruntime
/// through the fetch script's Python), then `ternd infer`.
#[test]
fn bring_your_own_model_from_init_to_infer() {
    let Some(dir) = third_party() else { return };
    let python = std::fs::read_to_string(dir.parent().unwrap().join("python")).unwrap();
    let data = testdata(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("my-cls");
    let tool = |args: &[&str]| {
        let o = std::process::Command::new(bin("tern-update"))
            .args(args)
            .output()
            .unwrap();
        (
            o.status,
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let model = dir.join("ppocr-cls/model.onnx");
    let (status, _, err) = tool(&[
        "package",
        "init",
        model.to_str().unwrap(),
        "--out",
        pkg.to_str().unwrap(),
        "--name",
        "my-cls",
    ]);
    assert!(status.success(), "{err}");
    let skeleton = std::fs::read_to_string(pkg.join("tern-model.toml")).unwrap();
    // The open dimensions are flagged; the batch is pinned.
    assert!(
        skeleton.contains(r#"shape = [1, 3, "H<=4096", "W<=4096"]"#),
        "{skeleton}"
    );
    assert!(skeleton.contains("TODO: open in the model"), "{skeleton}");
    assert!(
        skeleton.contains(r#"name = "save_infer_model/scale_0.tmp_1""#),
        "{skeleton}"
    );
    // A second init does not overwrite the work.
    let (status, _, err) = tool(&[
        "package",
        "init",
        model.to_str().unwrap(),
        "--out",
        pkg.to_str().unwrap(),
    ]);
    assert!(
        !status.success() && err.contains("does not overwrite"),
        "{err}"
    );

    // Golden vectors cannot come from images before the manifest says how images feed it.
    let word = |n: &str| data.join("words").join(n).to_str().unwrap().to_string();
    let (status, _, err) = tool(&[
        "package",
        "golden",
        pkg.to_str().unwrap(),
        "--input",
        &word("00.png"),
        "--python",
        python.trim(),
    ]);
    assert!(!status.success() && err.contains("not images"), "{err}");

    let filled = skeleton
        .lines()
        .map(|l| {
            if l.starts_with("shape = [1, 3,") {
                "shape = [1, 3, 48, 192]\n[inputs.image]\nlayout = \"nchw\"\ncolor = \"bgr\"\n\
                 scale = 0.00392156862745098\nmean = [0.5]\nstd = [0.5]"
                    .to_string()
            } else if l.starts_with("kind = \"raw\"") {
                "kind = \"classify\"\nlabels = [\"0\", \"180\"]\ntop_k = 1".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(pkg.join("tern-model.toml"), filled).unwrap();
    let (status, out, err) = tool(&[
        "package",
        "golden",
        pkg.to_str().unwrap(),
        "--input",
        &word("00.png"),
        "--input",
        &word("01.png"),
        "--python",
        python.trim(),
    ]);
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("tract agrees with onnxruntime on all 2 golden vector(s)"),
        "{out}"
    );
    let manifest = std::fs::read_to_string(pkg.join("tern-model.toml")).unwrap();
    assert!(
        manifest.contains(r#"golden = ["golden/0.npz", "golden/1.npz"]"#),
        "{manifest}"
    );
    assert!(
        manifest.contains("# Written by `tern-update package init`"),
        "comments are kept"
    );

    // Upright words read as 0 degrees, a word turned over as 180.
    let img = image::open(word("02.png")).unwrap();
    let turned = tmp.path().join("turned.png");
    img.rotate180().save(&turned).unwrap();
    for (file, want) in [
        (std::path::PathBuf::from(word("02.png")), "0"),
        (turned, "180"),
    ] {
        let out = &run(&pkg, &file)[0];
        assert_eq!(out["top"][0]["label"], want, "{}: {out}", file.display());
    }
}

/// A model with named dimensions gets a plan per distinct shape, and keeps the most recent
/// few: ten widths leave eight plans, and an evicted width runs again as before.
#[test]
fn plans_per_shape_are_kept_within_their_bound() {
    use ternd::engine::{Array, Input, Model};
    let Some(dir) = third_party() else { return };
    // tract's plan: the plans per shape are tract's (onnxruntime plans shapes by itself).
    let tract = ternd::engine::Plan::Tract;
    let m = Model::load_plan(&dir.join("ppocr-rec"), std::num::NonZeroUsize::MIN, tract).unwrap();
    let width = |w: usize| {
        let n = 3 * 48 * w;
        let data = (0..n).map(|i| ((i % 17) as f32 / 8.0) - 1.0).collect();
        Input::Arrays(vec![("x".into(), Array::f32(vec![1, 3, 48, w], data))])
    };
    let first = m.infer(&width(64)).unwrap();
    for k in 1..=10 {
        m.infer(&width(64 + 8 * k)).unwrap();
    }
    assert_eq!(m.plans_cached(), ternd::engine::MAX_PLANS_PER_MODEL);
    // Width 64 was dropped first; made again, it answers the same.
    let again = m.infer(&width(64)).unwrap();
    assert_eq!(again.outputs, first.outputs);
    // Over the bound the manifest gives, no plan is made.
    let e = m.infer(&width(1288)).unwrap_err().to_string();
    assert!(e.contains("outside 1..=1280"), "{e}");
}

/// `symbolic = ["S"]` keeps a dimension open in one plan for every value, where the model
/// allows it (Silero VAD's samples); where it does not (PP-OCR's recogniser computes shapes
/// from its width), the refusal says what to change.
#[test]
fn a_symbolic_dimension_is_one_plan_for_every_value() {
    use ternd::engine::{Array, Input, Model};
    let Some(dir) = third_party() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let vad = tmp.path().join("vad");
    copy_dir(&dir.join("silero-vad"), &vad).unwrap();
    let mf = vad.join("tern-model.toml");
    let text = std::fs::read_to_string(&mf).unwrap();
    let audio =
        "shape = [1, 576]\n[inputs.audio]\nsample_rate = 16000\nwindow = 512\ncontext = 64\n";
    assert!(text.contains(audio));
    std::fs::write(
        &mf,
        text.replace(audio, "shape = [1, \"S<=4096\"]\nsymbolic = [\"S\"]\n"),
    )
    .unwrap();
    // The golden vectors (576 samples) pass on the symbolic plan.
    let tract = ternd::engine::Plan::Tract;
    let m = Model::load_plan(&vad, std::num::NonZeroUsize::MIN, tract).unwrap();
    let samples = |n: usize| {
        let data = (0..n)
            .map(|i| ((i * 7919) % 200) as f32 / 1000.0 - 0.1)
            .collect();
        Input::Arrays(vec![("input".into(), Array::f32(vec![1, n], data))])
    };
    for n in [576, 1088, 576] {
        let p = m.infer(&samples(n)).unwrap();
        assert!(p.outputs["output"]["score"].is_number(), "{n}: {p:?}");
    }
    assert_eq!(m.plans_cached(), 1, "one plan serves every length");

    let rec = tmp.path().join("rec");
    copy_dir(&dir.join("ppocr-rec"), &rec).unwrap();
    let mf = rec.join("tern-model.toml");
    let text = std::fs::read_to_string(&mf).unwrap();
    std::fs::write(
        &mf,
        text.replacen("[inputs.image]", "symbolic = [\"W\"]\n[inputs.image]", 1),
    )
    .unwrap();
    let e = Model::load_plan(&rec, std::num::NonZeroUsize::MIN, tract)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shape input is variable") && e.contains("remove it from `symbolic`"),
        "{e}"
    );
}
