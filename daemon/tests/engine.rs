//! The engine on the shipped model packages: accuracy against onnxruntime, refusals, bad
//! input, a full queue, and hot swaps under load.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ternd::engine::PoolSettings;
use ternd::engine::{EngineError, Input, Model, ModelPool, PixelFormat, Runtime};
use ternd::registry::Registry;
use ternd::store::Store;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-updates/models")
}

fn load(name: &str) -> Model {
    Model::load(&models().join(name), NonZeroUsize::MIN).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn png() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo/inbox/digit-7.png"))
        .unwrap()
}

fn npy_u8(p: &Path) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(p).unwrap();
    let f = npyz::NpyFile::new(bytes.as_slice()).unwrap();
    let shape = f.shape().iter().map(|d| *d as usize).collect();
    (shape, f.into_vec::<u8>().unwrap())
}

fn npy_i64(p: &Path) -> Vec<i64> {
    npyz::NpyFile::new(std::fs::read(p).unwrap().as_slice())
        .unwrap()
        .into_vec::<i64>()
        .unwrap()
}

/// Accuracy in tern of a digits package on the held-out 8x8 images, fed through tern's own
/// image preprocessing as raw gray frames.
fn digits_accuracy(m: &Model) -> f64 {
    let (shape, pix) = npy_u8(&models().join("testsets/digits-test-pixels.npy"));
    let labels = npy_i64(&models().join("testsets/digits-test-labels.npy"));
    let n = shape[0];
    let right = (0..n)
        .filter(|&i| {
            let frame = Input::Frame {
                width: 8,
                height: 8,
                format: PixelFormat::Gray8,
                data: pix[i * 64..(i + 1) * 64].to_vec(),
            };
            let p = m.infer(&frame).unwrap();
            p.top[0].index as i64 == labels[i]
        })
        .count();
    right as f64 / n as f64
}

fn iris_accuracy(m: &Model) -> f64 {
    let bytes = std::fs::read(models().join("testsets/iris-test-features.npy")).unwrap();
    let (shape, x) = ternd::engine::read_npy_f32(&bytes).unwrap();
    let labels = npy_i64(&models().join("testsets/iris-test-labels.npy"));
    let right = (0..shape[0])
        .filter(|&i| {
            let t = Input::Tensor {
                shape: vec![4],
                data: x[i * 4..(i + 1) * 4].to_vec(),
            };
            m.infer(&t).unwrap().top[0].index as i64 == labels[i]
        })
        .count();
    right as f64 / shape[0] as f64
}

#[test]
fn every_good_form_matches_onnxruntime_accuracy() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("accuracy.json")).unwrap())
            .unwrap();
    for name in [
        "digits-cnn-f32",
        "digits-cnn-int8",
        "digits-mlp-f32",
        "digits-mlp-int8",
        "iris-mlp-f32",
        "iris-mlp-int8",
    ] {
        let m = load(name);
        let (acc, n) = if name.starts_with("iris") {
            (iris_accuracy(&m), 45.0)
        } else {
            (digits_accuracy(&m), 360.0)
        };
        let ort = reference[name].as_f64().unwrap();
        println!("accuracy {name}: onnxruntime {ort:.4} tern {acc:.4}");
        // One sample of slack: tern's resize of an 8-bit image can round one borderline
        // input differently from the float pipeline the script used.
        assert!(
            (acc - ort).abs() <= 1.0 / n + 1e-9,
            "{name}: tern {acc} vs onnxruntime {ort}"
        );
        assert!(acc > 0.9, "{name}: accuracy {acc} is not a trained model");
    }
    // The shadow tests' fixture: the same network trained on shuffled labels, as wrong in
    // tern as in onnxruntime (about one in ten, chance).
    let name = "digits-mlp-shuffled-int8";
    let acc = digits_accuracy(&load(name));
    let ort = reference[name].as_f64().unwrap();
    println!("accuracy {name}: onnxruntime {ort:.4} tern {acc:.4}");
    assert!(
        (acc - ort).abs() <= 1.0 / 360.0 + 1e-9,
        "{name}: tern {acc} vs {ort}"
    );
    assert!(acc < 0.2, "{name}: accuracy {acc} is better than chance");
}

#[test]
fn broken_forms_are_refused_at_load() {
    for name in [
        "digits-cnn-int8-broken",
        "digits-mlp-int8-broken",
        "iris-mlp-int8-broken",
    ] {
        // tract's plan: these fixtures are wrong in tract, right in onnxruntime.
        let tract = ternd::engine::Plan::Tract;
        match Model::load_plan(&models().join(name), NonZeroUsize::MIN, tract) {
            Err(e @ EngineError::SelfTest { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("output `probs`") && msg.contains("differs"),
                    "{msg}"
                );
            }
            other => panic!("{name} must fail its self-test, got {other:?}"),
        }
    }
}

/// A model using an operator tract does not implement is refused with the operator, the
/// node and the opset named, not with tract's typing error.
#[test]
fn an_unimplemented_operator_is_named_with_its_node_and_opset() {
    use prost::Message;
    let d = tempfile::tempdir().unwrap();
    copy(&models().join("digits-mlp-f32"), d.path());
    let path = d.path().join("model.onnx");
    let mut proto =
        tract_onnx::pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let node = graph.node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
    node.op_type = "Frobnicate".into();
    node.name = "the_odd_one".into();
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    let e = Model::load(d.path(), NonZeroUsize::MIN)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("operator `Frobnicate`")
            && e.contains("node `the_odd_one`")
            && e.contains("opset 17"),
        "{e}"
    );
}

#[test]
fn a_golden_vector_that_disagrees_refuses_a_good_model() {
    // The self-test must be able to fail on the good forms too: corrupt one reference value.
    let d = tempfile::tempdir().unwrap();
    copy(&models().join("digits-mlp-f32"), d.path());
    change_last_f32(&d.path().join("golden/2-output.npy"), |_| 0.5);
    let e = Model::load(d.path(), NonZeroUsize::MIN).unwrap_err();
    assert!(matches!(e, EngineError::SelfTest { vector: 2, .. }), "{e}");
}

#[test]
fn bad_inputs_get_errors_that_say_what_is_wrong() {
    let cnn = load("digits-cnn-f32");
    let expect = |input: Input, m: &Model, needle: &str| match m.infer(&input) {
        Err(EngineError::Input { message }) => {
            assert!(message.contains(needle), "want `{needle}`: {message}")
        }
        other => panic!("want an input error with `{needle}`, got {other:?}"),
    };
    expect(
        Input::Encoded(b"\x89PNG\r\n\x1a\ntruncated".to_vec()),
        &cnn,
        "cannot decode image",
    );
    expect(Input::Encoded(b"hello".to_vec()), &cnn, "not a PNG or JPEG");
    let mut png = png();
    png.truncate(png.len() / 2);
    expect(Input::Encoded(png), &cnn, "cannot decode image");
    // Wider than the decode limit: refused from the header, before any pixel is allocated.
    let mut wide = Vec::new();
    image::GrayImage::new(9000, 1)
        .write_to(
            &mut std::io::Cursor::new(&mut wide),
            image::ImageFormat::Png,
        )
        .unwrap();
    expect(Input::Encoded(wide), &cnn, "limit");
    expect(
        Input::Tensor {
            shape: vec![3, 32],
            data: vec![0.0; 96],
        },
        &cnn,
        "does not fit",
    );
    expect(
        Input::Tensor {
            shape: vec![3, 32, 32],
            data: vec![f32::NAN; 3072],
        },
        &cnn,
        "NaN",
    );
    expect(
        Input::Frame {
            width: 8,
            height: 8,
            format: PixelFormat::Rgb24,
            data: vec![0; 10],
        },
        &cnn,
        "needs 192 bytes",
    );
    for (json, needle) in [
        ("[[1,2],[3]]", "ragged"),
        ("[1, \"x\"]", "expected a number"),
        ("{", "not JSON"),
    ] {
        match Input::from_json(json.as_bytes()) {
            Err(EngineError::Input { message }) => {
                assert!(message.contains(needle), "{json}: {message}")
            }
            other => panic!("{json}: {other:?}"),
        }
    }
    let i64_npy = std::fs::read(models().join("testsets/digits-test-labels.npy")).unwrap();
    // Integers go to an input by dtype; a float input refuses them by name.
    let ints = Input::from_npy(&i64_npy).unwrap();
    match ints.prepare(&load("digits-mlp-f32").manifest) {
        Err(EngineError::Input { message }) => {
            assert!(message.contains("takes f32, the array is i64"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // A model whose manifest does not resize takes only images of its own size.
    let d = tempfile::tempdir().unwrap();
    copy(&models().join("digits-cnn-f32"), d.path());
    let mf = d.path().join("tern-model.toml");
    let text = std::fs::read_to_string(&mf)
        .unwrap()
        .replace("resize = [32, 32]\n", "");
    std::fs::write(&mf, text).unwrap();
    let strict = Model::load(d.path(), NonZeroUsize::MIN).unwrap();
    let small = Input::Frame {
        width: 8,
        height: 8,
        format: PixelFormat::Gray8,
        data: vec![0; 64],
    };
    expect(
        small,
        &strict,
        "image is 8x8, model `digits-cnn-f32` takes 32x32",
    );
    assert_eq!(
        strict.infer(&Input::Encoded(self::png())).unwrap().top[0].label,
        "7"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_busy_at_once() {
    let m = Arc::new(load("digits-cnn-f32"));
    let cfg = PoolSettings {
        threads: NonZeroUsize::MIN,
        workers: NonZeroUsize::MIN,
        queue: NonZeroUsize::MIN,
        ..PoolSettings::default()
    };
    let pool = ModelPool::spawn(m, cfg);
    let input = Input::Encoded(png());
    let mut accepted = Vec::new();
    let mut busy = 0;
    for _ in 0..200 {
        match pool.try_submit(input.clone()) {
            Ok(rx) => accepted.push(rx),
            Err(EngineError::Busy { model }) => {
                assert_eq!(model, "digits-cnn-f32");
                busy += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // One running plus one queued can be accepted at a time; the rest must be refused.
    assert!(busy >= 150, "only {busy} of 200 refused with a queue of 1");
    assert_eq!(
        pool.stats().rejected_busy.load(Ordering::Relaxed),
        busy as u64
    );
    for rx in accepted {
        assert_eq!(rx.await.unwrap().top[0].label, "7");
    }
}

/// Rewrite the last value of a float32 `.npy` (a reference output made wrong).
fn change_last_f32(p: &Path, f: impl Fn(f32) -> f32) {
    let mut bytes = std::fs::read(p).unwrap();
    let last = bytes.len() - 4;
    let v = f(f32::from_le_bytes(bytes[last..].try_into().unwrap()));
    bytes[last..].copy_from_slice(&v.to_le_bytes());
    std::fs::write(p, bytes).unwrap();
}

fn copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// A second version of a shipped package: same model, new version number.
fn version_of(src: &str, version: &str, dir: &Path) -> PathBuf {
    let d = dir.join(format!("{src}-{version}"));
    copy(&models().join(src), &d);
    let mf = d.join("tern-model.toml");
    let text = std::fs::read_to_string(&mf)
        .unwrap()
        .replace("version = \"1.0.0\"", &format!("version = \"{version}\""));
    std::fs::write(&mf, text).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_hot_swaps_under_load_fail_no_request() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("tern.db")).unwrap();
    let reg = Registry::spawn(store, d.path());
    let v1 = reg
        .install(
            &version_of("digits-mlp-int8", "1.0.0", d.path()),
            PoolSettings::default(),
        )
        .await
        .unwrap();
    let v2 = reg
        .install(
            &version_of("digits-mlp-int8", "1.1.0", d.path()),
            PoolSettings::default(),
        )
        .await
        .unwrap();
    let cfg = PoolSettings {
        queue: NonZeroUsize::new(64).unwrap(),
        ..PoolSettings::default()
    };
    reg.activate("digits-mlp-int8", &v1.version, cfg)
        .await
        .unwrap();
    let pool = reg.pool("digits-mlp-int8").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, on_v2) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (pool, stop, ok, failed, on_v2) = (
            pool.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            on_v2.clone(),
        );
        clients.push(tokio::spawn(async move {
            let input = Input::Encoded(png());
            while !stop.load(Ordering::Relaxed) {
                match pool.infer(input.clone()).await {
                    Ok(p) => {
                        assert_eq!(p.top[0].label, "7");
                        ok.fetch_add(1, Ordering::Relaxed);
                        if p.version == "1.1.0" {
                            on_v2.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for i in 0..100 {
        let before = ok.load(Ordering::Relaxed);
        if i % 2 == 0 {
            reg.activate("digits-mlp-int8", &v2.version, cfg)
                .await
                .unwrap();
        } else {
            let (from, to) = reg.rollback("digits-mlp-int8").await.unwrap();
            assert_eq!((from.as_str(), to.as_str()), ("1.1.0", "1.0.0"));
        }
        let want = if i % 2 == 0 { "1.1.0" } else { "1.0.0" };
        assert_eq!(pool.active().version().to_string(), want);
        // Let requests flow between swaps: wait (with a deadline) for some to complete.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ok.load(Ordering::Relaxed) < before + 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "requests stalled at swap {i}"
            );
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed, on_v2) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        on_v2.load(Ordering::Relaxed),
    );
    eprintln!("{ok} requests across 100 swaps, {on_v2} answered by 1.1.0, {failed} failed");
    assert_eq!(failed, 0);
    assert!(
        on_v2 > 0 && on_v2 < ok,
        "both versions must have answered: {on_v2}/{ok}"
    );
    let rows = reg.list().await.unwrap();
    let states: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.version.as_str(), r.state.as_str()))
        .collect();
    // Swap 99 was a rollback: 1.0.0 is active again, 1.1.0 one step back.
    assert_eq!(states, [("1.0.0", "active"), ("1.1.0", "previous")]);
}

#[test]
fn threads_give_the_same_answers_and_the_batch_is_one() {
    // One plan for both: `auto` may time them into different plans.
    let dir = models().join("digits-cnn-int8");
    let plan = ternd::engine::Plan::TractFolded;
    let one = Model::load_plan(&dir, NonZeroUsize::MIN, plan).unwrap();
    let two = Model::load_plan(&dir, NonZeroUsize::new(2).unwrap(), plan).unwrap();
    for i in 0..4 {
        let bytes =
            std::fs::read(models().join(format!("digits-cnn-int8/golden/{i}-input.npy"))).unwrap();
        let (shape, data) = ternd::engine::read_npy_f32(&bytes).unwrap();
        assert_eq!(shape, [1, 3, 32, 32]);
        let input = Input::Tensor { shape, data };
        let single = one.run(input.prepare(&one.manifest).unwrap()).unwrap();
        let threaded = two.run(input.prepare(&two.manifest).unwrap()).unwrap();
        assert_eq!(threaded, single, "2 threads changed vector {i}");
        assert_eq!(single.len(), 10);
    }
    // tern runs one sample at a time: the batch of a format 1 package is pinned to 1.
    let four = Input::Tensor {
        shape: vec![4, 3, 32, 32],
        data: vec![0.0; 4 * 3 * 32 * 32],
    };
    let e = four.prepare(&one.manifest).unwrap_err().to_string();
    assert!(e.contains("does not fit input `input`"), "{e}");
}

#[test]
fn a_raw_frame_and_its_png_give_the_same_tensor() {
    // Frames of the model's own size take a shortcut past the image library; it must agree
    // with the general path to the last bit.
    for name in ["digits-cnn-f32", "digits-mlp-f32"] {
        let m = load(name);
        let png = png();
        let rgb = image::load_from_memory(&png).unwrap().into_rgb8();
        let frame = Input::Frame {
            width: 32,
            height: 32,
            format: PixelFormat::Rgb24,
            data: rgb.into_raw(),
        };
        let a = Input::Encoded(png).prepare(&m.manifest).unwrap();
        let b = frame.prepare(&m.manifest).unwrap();
        assert_eq!(a, b, "{name}");
        let ternd::engine::Data::F32(values) = &a.arrays[0].1.data else {
            panic!("images become f32");
        };
        assert!(
            values.iter().any(|x| *x > 0.5),
            "{name}: an all-dark tensor proves nothing"
        );
    }
    let gray = Input::Frame {
        width: 8,
        height: 8,
        format: PixelFormat::Gray8,
        data: (0..64).collect(),
    };
    let t = gray.prepare(&load("digits-mlp-f32").manifest).unwrap();
    let (shape, data) = (&t.arrays[0].1.shape, &t.arrays[0].1.data);
    assert_eq!(shape, &[1, 64]);
    let ternd::engine::Data::F32(values) = data else {
        panic!("images become f32");
    };
    assert!((values[63] - 63.0 / 255.0).abs() < 1e-6, "{}", values[63]);
}

/// `auto` runs on the GPU when `cuda` can, else on the CPU and says why; `cuda` without a
/// usable GPU (or without the feature) refuses the model with the reason, never falls back.
#[test]
fn runtime_auto_falls_back_and_cuda_refuses_clearly() {
    let dir = models().join("digits-cnn-int8");
    let cpu = Model::load_on(&dir, NonZeroUsize::MIN, Runtime::Cpu).unwrap();
    assert_eq!((cpu.runtime, cpu.fallback.as_deref()), ("cpu", None));
    let auto = Model::load_on(&dir, NonZeroUsize::MIN, Runtime::Auto).unwrap();
    match Model::load_on(&dir, NonZeroUsize::MIN, Runtime::Cuda) {
        // A machine with a GPU and the feature: auto must take it too.
        Ok(gpu) => {
            assert_eq!(gpu.runtime, "cuda");
            assert_eq!((auto.runtime, auto.fallback.as_deref()), ("cuda", None));
            // The GPU answers as the CPU does (its self-test already compared the numbers).
            let png = std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo/inbox/digit-3.png"),
            )
            .unwrap();
            let on_gpu = gpu.infer(&Input::Encoded(png.clone())).unwrap();
            let on_cpu = cpu.infer(&Input::Encoded(png)).unwrap();
            assert_eq!(on_gpu.top[0].label, on_cpu.top[0].label);
        }
        // A usable GPU on which this model does not load or pass its self-test (only with
        // the feature): auto must have fallen back to the CPU, saying so.
        Err(EngineError::Load { message, .. })
            if !message.starts_with("runtime `cuda` was asked for, but ") =>
        {
            if !cfg!(feature = "cuda") {
                panic!("without the cuda feature, cuda must be refused as such: {message}");
            }
            assert_eq!(auto.runtime, "cpu");
            let note = auto.fallback.as_deref().unwrap_or_default();
            assert!(
                note.starts_with("auto: on the CPU, it failed on cuda: "),
                "{note}"
            );
        }
        Err(e) => {
            let EngineError::Load { message, .. } = &e else {
                panic!("not a load error: {e}");
            };
            let why = if cfg!(feature = "cuda") {
                "no usable CUDA device"
            } else {
                "built without the `cuda` feature"
            };
            assert!(message.contains(why), "{message}");
            assert_eq!(auto.runtime, "cpu");
            let note = auto.fallback.as_deref().unwrap_or_default();
            assert!(
                note.starts_with("auto: on the CPU, ") && note.contains(why),
                "{note}"
            );
        }
    }
}

/// Folding tract's constants after optimisation changes no answer: on every shipped package
/// the folded plan and tract's own plan give the same outputs on the held-out test sets, to
/// the bit, and the same accuracy.
#[test]
fn the_folded_plan_answers_as_tract_does() {
    use ternd::engine::Plan;
    for name in [
        "digits-cnn-int8",
        "digits-cnn-f32",
        "digits-mlp-int8",
        "digits-mlp-f32",
        "iris-mlp-int8",
        "iris-mlp-f32",
    ] {
        let dir = models().join(name);
        let chosen = Model::load_plan(&dir, NonZeroUsize::MIN, Plan::TractFolded).unwrap();
        assert_eq!(chosen.plan, Plan::TractFolded.name(), "{name}");
        let plain = Model::load_plan(&dir, NonZeroUsize::MIN, Plan::Tract).unwrap();
        assert_eq!(plain.plan, "tract");
        if name.starts_with("digits") {
            let (shape, pix) = npy_u8(&models().join("testsets/digits-test-pixels.npy"));
            for i in 0..shape[0] {
                let frame = Input::Frame {
                    width: 8,
                    height: 8,
                    format: PixelFormat::Gray8,
                    data: pix[i * 64..(i + 1) * 64].to_vec(),
                };
                let (a, b) = (
                    chosen
                        .run(frame.prepare(&chosen.manifest).unwrap())
                        .unwrap(),
                    plain.run(frame.prepare(&plain.manifest).unwrap()).unwrap(),
                );
                assert_eq!(a, b, "{name}: test image {i}");
            }
            assert_eq!(digits_accuracy(&chosen), digits_accuracy(&plain), "{name}");
        } else {
            assert_eq!(iris_accuracy(&chosen), iris_accuracy(&plain), "{name}");
        }
    }
}

/// The float rewrite of each shipped int8 package (`tract+float`: int8 weights dequantised at
/// load, activations kept float) passes its golden vectors and classifies the held-out sets as
/// accurately as the int8 graph, one sample of slack. A float package has nothing to rewrite;
/// the int8 detector's boxes move beyond its tolerance without int8 activations, and its
/// golden vectors refuse the plan.
#[test]
fn the_float_plan_of_an_int8_package_is_as_accurate_as_its_int8_graph() {
    use ternd::engine::{EngineError, Plan};
    for name in ["digits-cnn-int8", "digits-mlp-int8", "iris-mlp-int8"] {
        let dir = models().join(name);
        let float = Model::load_plan(&dir, NonZeroUsize::MIN, Plan::TractFloat).unwrap();
        assert_eq!(float.plan, "tract+float", "{name}");
        let int8 = Model::load_plan(&dir, NonZeroUsize::MIN, Plan::Tract).unwrap();
        let (a, b, n) = if name.starts_with("iris") {
            (iris_accuracy(&float), iris_accuracy(&int8), 45.0)
        } else {
            (digits_accuracy(&float), digits_accuracy(&int8), 360.0)
        };
        println!("accuracy {name}: tract+float {a:.4}, int8 graph {b:.4}");
        assert!((a - b).abs() <= 1.0 / n + 1e-9, "{name}: {a} vs {b}");
    }
    let e = Model::load_plan(
        &models().join("digits-cnn-f32"),
        NonZeroUsize::MIN,
        Plan::TractFloat,
    )
    .unwrap_err();
    assert!(e.to_string().contains("nothing quantised"), "{e}");
    let e = Model::load_plan(
        &models().join("digits-det-int8"),
        NonZeroUsize::MIN,
        Plan::TractFloat,
    )
    .unwrap_err();
    assert!(matches!(e, EngineError::SelfTest { .. }), "{e}");
}

/// Boxes `detect` gives for one image: (x0, y0, x1, y1, score, class).
fn boxes(m: &Model, input: &Input) -> Vec<[f64; 6]> {
    let p = m.infer(input).unwrap();
    p.outputs["detections"]["boxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| ["x0", "y0", "x1", "y1", "score", "class"].map(|k| b[k].as_f64().unwrap()))
        .collect()
}

/// mAP@0.5 as make_models.py computes it: per class, all-point interpolated AP.
fn mean_ap(pred: &[Vec<[f64; 6]>], truth: &[Vec<[f64; 5]>]) -> f64 {
    let iou = |a: &[f64], b: &[f64]| {
        let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h;
        if u > 0.0 { w * h / u } else { 0.0 }
    };
    let mut aps = Vec::new();
    for c in 0..10 {
        let mut dets: Vec<(f64, usize, [f64; 6])> = pred
            .iter()
            .enumerate()
            .flat_map(|(n, ds)| {
                ds.iter()
                    .filter(|d| d[5] as usize == c)
                    .map(move |d| (d[4], n, *d))
            })
            .collect();
        dets.sort_by(|a, b| b.0.total_cmp(&a.0));
        let total: usize = truth
            .iter()
            .map(|t| t.iter().filter(|b| b[4] as usize == c).count())
            .sum();
        if total == 0 {
            continue;
        }
        let mut used: Vec<Vec<bool>> = truth.iter().map(|t| vec![false; t.len()]).collect();
        let (mut tp, mut points) = (0.0, Vec::new());
        for (i, (_, n, d)) in dets.iter().enumerate() {
            let best = truth[*n]
                .iter()
                .enumerate()
                .filter(|(_, t)| t[4] as usize == c)
                .map(|(j, t)| (j, iou(d, t)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((j, v)) = best
                && v >= 0.5
                && !used[*n][j]
            {
                used[*n][j] = true;
                tp += 1.0;
            }
            points.push((tp / total as f64, tp / (i + 1) as f64));
        }
        let mut ap = 0.0;
        let mut prev_r = 0.0;
        for (k, (r, _)) in points.iter().enumerate() {
            let p = points[k..].iter().map(|x| x.1).fold(0.0, f64::max);
            ap += (r - prev_r) * p;
            prev_r = *r;
        }
        aps.push(ap);
    }
    aps.iter().sum::<f64>() / aps.len() as f64
}

/// The digit detector through tern's `detect` (YOLO rows, class-aware NMS) gives the boxes
/// onnxruntime plus the same postprocessing in numpy gives, and the same mAP; a letterboxed
/// image's boxes come back in its own coordinates.
#[test]
fn the_detector_finds_what_onnxruntime_finds_and_maps_letterboxed_boxes_back() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models().join("testsets/digits-det-boxes.json")).unwrap(),
    )
    .unwrap();
    let truth: Vec<Vec<[f64; 5]>> = reference["truth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|bs| {
            bs.as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    let v: Vec<f64> = b
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect();
                    [v[0], v[1], v[2], v[3], v[4]]
                })
                .collect()
        })
        .collect();
    let accuracy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("accuracy.json")).unwrap())
            .unwrap();
    for (form, tol) in [("f32", 1e-3), ("int8", 0.5)] {
        let m = load(&format!("digits-det-{form}"));
        let mut pred = Vec::new();
        let mut differ = 0;
        for n in 0..truth.len() {
            let png =
                std::fs::read(models().join(format!("testsets/digits-det/{n:03}.png"))).unwrap();
            let got = boxes(&m, &Input::Encoded(png));
            let want: Vec<[f64; 6]> = reference[form][n]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    let v: Vec<f64> = b
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect();
                    [v[0], v[1], v[2], v[3], v[4], v[5]]
                })
                .collect();
            let same = got.len() == want.len()
                && got.iter().zip(&want).all(|(g, w)| {
                    g[5] == w[5]
                        && g[..5]
                            .iter()
                            .zip(&w[..5])
                            .all(|(a, b)| (a - b).abs() <= tol)
                });
            if !same {
                differ += 1;
                eprintln!("digits-det-{form} image {n}: tern {got:?}\n  onnxruntime {want:?}");
            }
            pred.push(got);
        }
        let map = mean_ap(&pred, &truth);
        let ort = accuracy[format!("digits-det-{form} mAP@0.5")]
            .as_f64()
            .unwrap();
        eprintln!(
            "digits-det-{form}: mAP@0.5 {map:.4} in tern, {ort:.4} in onnxruntime; {differ} of {} images differ",
            truth.len()
        );
        // Float: the same boxes everywhere. Int8: tract and onnxruntime round a few
        // activations differently, which may move a box near the threshold.
        match form {
            "f32" => assert_eq!(differ, 0),
            _ => assert!(differ * 20 <= truth.len(), "{differ} images differ"),
        }
        assert!((map - ort).abs() <= 0.02, "mAP {map} vs {ort}");
    }

    // Rows 16..80 of a canvas whose digits all lie there: letterboxed back to 96x96 with 16
    // rows of pad above, the model sees the same pixels; the boxes shift by 16.
    let m = load("digits-det-f32");
    let mut checked = 0;
    for (n, t) in truth.iter().enumerate() {
        if !t.iter().all(|b| b[1] >= 16.0 && b[3] <= 80.0) {
            continue;
        }
        let png = std::fs::read(models().join(format!("testsets/digits-det/{n:03}.png"))).unwrap();
        let full = boxes(&m, &Input::Encoded(png.clone()));
        let img = image::load_from_memory(&png).unwrap().into_luma8();
        let band = image::imageops::crop_imm(&img, 0, 16, 96, 64).to_image();
        let frame = Input::Frame {
            width: 96,
            height: 64,
            format: PixelFormat::Gray8,
            data: band.into_raw(),
        };
        let cropped = boxes(&m, &frame);
        assert_eq!(
            cropped.len(),
            full.len(),
            "image {n}: {cropped:?} vs {full:?}"
        );
        for (c, f) in cropped.iter().zip(&full) {
            // The band is 96 wide and 64 high: boxes are clamped to it.
            let shifted = [
                f[0],
                (f[1] - 16.0).clamp(0.0, 64.0),
                f[2],
                (f[3] - 16.0).clamp(0.0, 64.0),
            ];
            for (a, b) in c[..4].iter().zip(shifted) {
                assert!((a - b).abs() < 1e-3, "image {n}: {c:?} vs {f:?}");
            }
            assert_eq!(c[5], f[5]);
        }
        checked += 1;
    }
    assert!(
        checked >= 5,
        "only {checked} canvases have every digit in rows 16..80"
    );
}

/// A golden case may be a folder of `.npy` (`in/<input>.npy`, `out/<output>.npy`) instead of
/// an `.npz`; it is checked just as strictly.
#[test]
fn golden_vectors_may_be_folders_of_npy() {
    let d = tempfile::tempdir().unwrap();
    copy(&models().join("digits-det-f32"), d.path());
    let npz = std::fs::read(d.path().join("golden/0.npz")).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(npz)).unwrap();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let to = d.path().join("golden/0").join(f.name());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::io::copy(&mut f, &mut std::fs::File::create(&to).unwrap()).unwrap();
    }
    std::fs::remove_file(d.path().join("golden/0.npz")).unwrap();
    let mf = d.path().join("tern-model.toml");
    let text = std::fs::read_to_string(&mf).unwrap();
    std::fs::write(&mf, text.replace("\"golden/0.npz\"", "\"golden/0\"")).unwrap();
    let m = Model::load(d.path(), NonZeroUsize::MIN).unwrap();
    assert_eq!(m.manifest.selftest.golden.len(), 2);

    // One reference value off by 1: the folder case refuses the model.
    change_last_f32(&d.path().join("golden/0/out/detections.npy"), |v| v + 1.0);
    let e = Model::load(d.path(), NonZeroUsize::MIN).unwrap_err();
    assert!(matches!(e, EngineError::SelfTest { vector: 0, .. }), "{e}");
}

/// Every input dtype tern feeds (f16, an i64 constant, i32, u8, bool) and an f16 output,
/// against onnxruntime's outputs; an array of the wrong dtype is refused by name.
#[test]
fn every_dtype_goes_in_and_comes_out_as_onnxruntime_says() {
    let m = load("dtypes-demo");
    let npz = std::fs::read(models().join("dtypes-demo/golden/1.npz")).unwrap();
    let arrays = ternd::engine::read_npz(&npz).unwrap();
    let want: Vec<f32> = arrays
        .iter()
        .find(|(n, _)| n == "out/y")
        .map(|(_, a)| a.data.to_f32())
        .unwrap();
    assert!(
        want.iter().any(|v| *v != 0.0),
        "a zero output proves nothing"
    );
    let fed: Vec<_> = arrays
        .iter()
        .filter(|(n, _)| n.starts_with("in/"))
        .cloned()
        .collect();
    let p = m.infer(&Input::Arrays(fed.clone())).unwrap();
    let got: Vec<f64> = p.outputs["y"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f32 - w).abs() < 1e-2, "{got:?} vs {want:?}");
    }
    // The i32 offset sent as floats: refused, naming the input and both dtypes.
    let mut wrong = fed;
    for (n, a) in wrong.iter_mut() {
        if n == "in/offset" {
            let v = a.data.to_f32();
            a.data = ternd::engine::Data::F32(v);
        }
    }
    let e = m.infer(&Input::Arrays(wrong)).unwrap_err().to_string();
    assert!(
        e.contains("input `offset` takes i32, the array is f32"),
        "{e}"
    );
}

/// With `auto`, every plan that passes the golden vectors is timed and the fastest serves; the
/// ones passed over are listed with their times. ONNX Runtime is one of them when its library
/// is here (CI installs it through pip and points ORT_DYLIB_PATH at it), and then answers as
/// tract does.
#[test]
fn auto_times_every_passing_plan_and_the_fastest_serves() {
    use ternd::engine::{Plan, PlanChoice, PoolSettings};
    let dir = models().join("digits-cnn-int8");
    let auto = load("digits-cnn-int8");
    // Every plan was timed, but onnxruntime where its library is missing (and says so).
    assert!(
        auto.timings.iter().all(|t| t.ends_with(" µs")
            || t.starts_with("onnxruntime: no ONNX Runtime library could be loaded")
            || t.starts_with("onnxruntime: this ternd was built without")),
        "{:?}",
        auto.timings
    );
    assert!(
        auto.timings.iter().any(|t| t.starts_with("tract+fold: ")),
        "{:?}",
        auto.timings
    );
    assert!(
        auto.timings.iter().any(|t| t.starts_with("tract: ")),
        "{:?}",
        auto.timings
    );
    // A quantised model is offered its float rewrite too.
    assert!(
        auto.timings.iter().any(|t| t.starts_with("tract+float: ")),
        "{:?}",
        auto.timings
    );
    // The one chosen is the fastest of those timed.
    let us = |t: &String| -> u64 {
        t.rsplit(": ")
            .next()
            .unwrap()
            .trim_end_matches(" µs")
            .parse()
            .unwrap()
    };
    let fastest = auto.timings.iter().min_by_key(|t| us(t)).unwrap();
    assert!(
        fastest.starts_with(&format!("{}: ", auto.plan)),
        "{} vs {:?}",
        auto.plan,
        auto.timings
    );

    let ort = Model::load_for(
        &dir,
        &PoolSettings {
            plan: PlanChoice::Onnxruntime,
            ..Default::default()
        },
    );
    let strict = std::env::var("TERN_TEST_STRICT").as_deref() == Ok("1");
    match ort {
        Ok(ort) => {
            assert_eq!(ort.plan, Plan::Onnxruntime.name());
            assert!(
                auto.timings.iter().any(|t| t.starts_with("onnxruntime: ")),
                "{:?}",
                auto.timings
            );
            // The same answers as tract on the held-out digits, within the package tolerance.
            let (shape, pix) = npy_u8(&models().join("testsets/digits-test-pixels.npy"));
            let tract = Model::load_plan(&dir, NonZeroUsize::MIN, Plan::Tract).unwrap();
            for i in 0..shape[0] {
                let frame = Input::Frame {
                    width: 8,
                    height: 8,
                    format: PixelFormat::Gray8,
                    data: pix[i * 64..(i + 1) * 64].to_vec(),
                };
                let a = ort.run(frame.prepare(&ort.manifest).unwrap()).unwrap();
                let b = tract.run(frame.prepare(&tract.manifest).unwrap()).unwrap();
                let diff = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff <= 0.01,
                    "test image {i}: onnxruntime and tract differ by {diff}"
                );
            }
            assert_eq!(digits_accuracy(&ort), digits_accuracy(&tract));
        }
        Err(e) if strict => panic!("the onnxruntime plan is required (TERN_TEST_STRICT=1): {e}"),
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("plan `onnxruntime`") && e.contains("ORT_DYLIB_PATH"),
                "{e}"
            );
            eprintln!("\n*** SKIPPED: the onnxruntime plan ({e}) ***\n");
        }
    }
}

/// A model whose manifest names its image batch runs several inputs together (the crops of a
/// chain) and answers each as it would alone; one bad input fails alone; a model that cannot
/// batch answers them one by one.
#[test]
fn inputs_run_together_answer_as_they_would_alone() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("digits-batched");
    std::fs::create_dir_all(&dir).unwrap();
    let src = models().join("digits-cnn-f32");
    std::fs::copy(src.join("model.onnx"), dir.join("model.onnx")).unwrap();
    let mut golden = Vec::new();
    for i in 0..2 {
        let g = dir.join(format!("golden/{i}"));
        std::fs::create_dir_all(g.join("in")).unwrap();
        std::fs::create_dir_all(g.join("out")).unwrap();
        std::fs::copy(
            src.join(format!("golden/{i}-input.npy")),
            g.join("in/input.npy"),
        )
        .unwrap();
        std::fs::copy(
            src.join(format!("golden/{i}-output.npy")),
            g.join("out/probs.npy"),
        )
        .unwrap();
        golden.push(format!("\"golden/{i}\""));
    }
    std::fs::write(
        dir.join("tern-model.toml"),
        format!(
            r#"format = 2
name = "digits-batched"
version = "1.0.0"
[[inputs]]
name = "input"
dtype = "f32"
shape = ["N<=4", 3, 32, 32]
[inputs.image]
layout = "nchw"
color = "rgb"
resize = "stretch"
filter = "nearest"
scale = 0.00392156862745098
[[outputs]]
name = "probs"
[outputs.postprocess]
kind = "classify"
softmax = false
top_k = 3
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
[selftest]
tolerance = 0.0001
golden = [{}]
"#,
            golden.join(", ")
        ),
    )
    .unwrap();
    let m = Model::load_plan(&dir, NonZeroUsize::MIN, ternd::engine::Plan::Tract).unwrap();
    assert_eq!(m.manifest.batch(), Some("N"));
    let inbox = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo/inbox");
    let mut inputs: Vec<Input> = [0, 1, 2, 3, 4, 5, 6]
        .iter()
        .map(|i| Input::Encoded(std::fs::read(inbox.join(format!("digit-{i}.png"))).unwrap()))
        .collect();
    inputs.insert(3, Input::Encoded(b"not an image".to_vec()));
    // A frame of the model's own size takes the shortcut past the image library.
    let rgb = image::load_from_memory(&png()).unwrap().into_rgb8();
    assert_eq!(rgb.dimensions(), (32, 32));
    inputs.push(Input::Frame {
        width: 32,
        height: 32,
        format: PixelFormat::Rgb24,
        data: rgb.into_raw(),
    });
    let together = m.infer_batch(&inputs);
    assert_eq!(together.len(), inputs.len());
    // 8 good inputs in batches of at most 4: a plan for a batch of 4 beside the self-test's
    // batch of 1.
    assert_eq!(m.plans_cached(), 2, "the inputs did not run together");
    for (i, (input, got)) in inputs.iter().zip(&together).enumerate() {
        match (m.infer(input), got) {
            (Ok(alone), Ok(got)) => {
                assert_eq!(got.top.len(), 3);
                for (a, b) in alone.top.iter().zip(&got.top) {
                    assert_eq!(a.label, b.label, "input {i}");
                    // Kernels may sum in another order for another batch.
                    let tolerance = 1e-4 * a.score.abs().max(1.0);
                    assert!(
                        (a.score - b.score).abs() < tolerance,
                        "input {i}: {a:?} {b:?}"
                    );
                }
            }
            (Err(a), Err(b)) => {
                assert_eq!(i, 3);
                assert_eq!(a.to_string(), b.to_string());
            }
            (a, b) => panic!("input {i}: alone {a:?}, together {b:?}"),
        }
    }
    let labels: Vec<&str> = together
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|p| p.top[0].label.as_str())
        .collect();
    assert_eq!(labels, ["0", "1", "2", "3", "4", "5", "6", "7"]);

    // A model without a named batch answers the same way, one by one.
    let plain = load("digits-cnn-f32");
    let each = plain.infer_batch(&inputs);
    assert!(each[3].is_err());
    assert_eq!(
        each.iter().filter_map(|r| r.as_ref().ok()).count(),
        8,
        "{each:?}"
    );

    // A named batch is tern's to fill: a caller's tensor is one sample.
    let two = Input::Tensor {
        shape: vec![2, 3, 32, 32],
        data: vec![0.0; 2 * 3 * 32 * 32],
    };
    let e = two.prepare(&m.manifest).unwrap_err().to_string();
    assert!(e.contains("one request is one sample"), "{e}");
}

/// A copy of digits-mlp-int8 whose evaluation set is its golden inputs, each against the
/// reference output `reference(i)`, under `rule`.
fn with_reference_set(
    dir: &Path,
    version: &str,
    rule: &str,
    reference: impl Fn(usize) -> usize,
) -> PathBuf {
    let d = version_of("digits-mlp-int8", version, dir);
    let mut toml = format!("\n[evaluation]\nrule = \"{rule}\"\n");
    for i in 0..4 {
        toml += &format!(
            "[[evaluation.samples]]\ninput = \"golden/{i}-input.npy\"\nreference = \"golden/{}-output.npy\"\n",
            reference(i)
        );
    }
    let mf = d.join("tern-model.toml");
    let text = std::fs::read_to_string(&mf).unwrap() + &toml;
    std::fs::write(&mf, text).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evaluation_gate_measures_the_difference_and_refuses_an_install_that_misses_it() {
    let d = tempfile::tempdir().unwrap();
    // Each golden input against its own output: the difference is the int8 plan's rounding.
    let same = with_reference_set(d.path(), "1.1.0", "max_difference <= 0.01", |i| i);
    let m = Model::load(&same, NonZeroUsize::MIN).unwrap();
    let v = m.evaluate().unwrap().expect("a set");
    assert!(v.passed && v.samples == 4 && v.figure <= 0.01, "{v}");
    // Against another sample's output: far off, and an install is refused with the figure.
    let other = with_reference_set(d.path(), "1.2.0", "max_difference <= 0.01", |i| (i + 1) % 4);
    let m = Model::load(&other, NonZeroUsize::MIN).unwrap();
    let v = m.evaluate().unwrap().expect("a set");
    assert!(!v.passed && v.figure > 0.1, "{v}");
    let store = Store::open(&d.path().join("tern.db")).unwrap();
    let reg = Registry::spawn(store, d.path());
    reg.install(&same, PoolSettings::default()).await.unwrap();
    let e = reg
        .install(&other, PoolSettings::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tern_update::Code::Evaluation, "{e}");
    let said = e.to_string();
    assert!(
        said.contains("evaluation: max_difference") && said.contains("on 4 samples"),
        "{said}"
    );
    let rows = reg.list().await.unwrap();
    assert!(rows.iter().any(|r| r.version == "1.1.0"));
    assert!(
        rows.iter().all(|r| r.version != "1.2.0"),
        "nothing installed"
    );
}
