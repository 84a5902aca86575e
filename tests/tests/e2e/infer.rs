//! `ternd infer`: one-shot inference on the shipped packages, and refusals of bad ones.

use tern_tests::*;

fn infer_json(pkg: &str, input: &std::path::Path) -> serde_json::Value {
    let (status, out, err) = infer(&package(pkg), input, &["--json"]).unwrap();
    assert!(status.success(), "{pkg} on {}: {err}", input.display());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn inbox() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(root().join("configs/demo/inbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert_eq!(v.len(), 12, "{v:?}");
    v
}

/// The digit a demo image shows, from its name (`digit-7.png`, `digit-3-b.jpg`).
fn truth(p: &std::path::Path) -> String {
    p.file_name().unwrap().to_str().unwrap()[6..7].to_string()
}

#[test]
fn int8_and_float_agree_on_every_shipped_sample() {
    for form in ["digits-cnn", "digits-mlp"] {
        let mut right = 0;
        for img in inbox() {
            let f = infer_json(&format!("{form}-f32"), &img);
            let q = infer_json(&format!("{form}-int8"), &img);
            let (fl, ql) = (&f["top"][0]["label"], &q["top"][0]["label"]);
            assert_eq!(
                fl,
                ql,
                "{form} float and int8 disagree on {}: {f} vs {q}",
                img.display()
            );
            let (fs, qs) = (
                f["top"][0]["score"].as_f64().unwrap(),
                q["top"][0]["score"].as_f64().unwrap(),
            );
            assert!(
                (fs - qs).abs() < 0.1,
                "{form} scores drift on {}: {fs} vs {qs}",
                img.display()
            );
            right += (fl.as_str() == Some(truth(&img).as_str())) as usize;
        }
        assert!(
            right >= 11,
            "{form}: only {right}/12 demo images classified right"
        );
    }
}

#[test]
fn human_output_lists_top_k_labels() {
    let img = root().join("configs/demo/inbox/digit-7.png");
    let (status, out, err) = infer(&package("digits-cnn-int8"), &img, &[]).unwrap();
    assert!(status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("digits-cnn-int8 1.0.0"), "{out}");
    assert_eq!(lines.len(), 2 + 3, "header, column names and top 3: {out}");
    assert!(lines[2].split_whitespace().nth(1) == Some("7"), "{out}");
}

#[test]
fn broken_int8_fixture_is_refused_naming_output_and_difference() {
    for pkg in [
        "digits-cnn-int8-broken",
        "digits-mlp-int8-broken",
        "iris-mlp-int8-broken",
    ] {
        let img = root().join("configs/demo/inbox/digit-1.png");
        let (status, out, err) = infer(&package(pkg), &img, &["--plan", "tract"]).unwrap();
        assert_eq!(status.code(), Some(65), "{pkg} must be refused: {out}{err}");
        assert!(
            err.contains("self-test") && err.contains("output `probs`"),
            "{pkg}: {err}"
        );
        assert!(
            err.contains("differs from the reference by up to"),
            "{pkg}: {err}"
        );
        assert!(out.is_empty(), "{pkg} printed a result: {out}");
    }
    // The same package is right in onnxruntime: its golden vectors pass there, and it reads
    // the digit. `auto` serves a package on whichever plans pass.
    let img = root().join("configs/demo/inbox/digit-1.png");
    let pkg = package("digits-cnn-int8-broken");
    let (status, out, err) = infer(&pkg, &img, &["--plan", "onnxruntime", "--json"]).unwrap();
    if status.success() {
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["top"][0]["label"], "1", "{v}");
        // Bundling it works, and warns that boxes without onnxruntime will refuse it.
        let d = tempfile::tempdir().unwrap();
        let o = std::process::Command::new(bin("tern-update"))
            .args(["bundle", "--package"])
            .arg(&pkg)
            .arg("--out")
            .arg(d.path().join("b.bundle"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("warning") && err.contains("tract: ") && err.contains("will refuse"),
            "{err}"
        );
    } else if std::env::var("TERN_TEST_STRICT").as_deref() == Ok("1") {
        panic!("the onnxruntime plan is required (TERN_TEST_STRICT=1): {err}");
    } else {
        eprintln!("\n*** SKIPPED: the onnxruntime plan: {err} ***\n");
    }
}

#[test]
fn iris_takes_tensors_and_refuses_images() {
    let d = tempfile::tempdir().unwrap();
    let sample = d.path().join("x.json");
    std::fs::write(&sample, "[6.7, 3.0, 5.2, 2.3]").unwrap();
    for form in ["iris-mlp-f32", "iris-mlp-int8"] {
        let v = infer_json(form, &sample);
        assert_eq!(v["top"][0]["label"], "virginica", "{form}: {v}");
    }
    let img = root().join("configs/demo/inbox/digit-1.png");
    let (status, _, err) = infer(&package("iris-mlp-f32"), &img, &[]).unwrap();
    assert_eq!(status.code(), Some(65));
    assert!(err.contains("takes tensors, not images"), "{err}");
    std::fs::write(&sample, "[6.7, 3.0, 5.2]").unwrap();
    let (status, _, err) = infer(&package("iris-mlp-f32"), &sample, &[]).unwrap();
    assert_eq!(status.code(), Some(65));
    assert!(err.contains("[3]") && err.contains("[4]"), "{err}");
}

#[test]
fn truncated_and_foreign_models_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let pkg = d.path().join("pkg");
    copy_dir(&package("digits-mlp-int8"), &pkg).unwrap();
    let onnx = std::fs::read(pkg.join("model.onnx")).unwrap();
    let img = root().join("configs/demo/inbox/digit-1.png");
    for (what, bytes) in [
        ("truncated", onnx[..onnx.len() / 2].to_vec()),
        ("foreign", b"GIF89a not a model".to_vec()),
    ] {
        std::fs::write(pkg.join("model.onnx"), &bytes).unwrap();
        let (status, _, err) = infer(&pkg, &img, &[]).unwrap();
        assert_eq!(status.code(), Some(65), "{what}: {err}");
        assert!(
            err.contains("digits-mlp-int8") && err.contains("model.onnx"),
            "{what}: {err}"
        );
    }
}
