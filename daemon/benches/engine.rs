//! `cargo bench -p ternd --bench engine`
//!
//! For every shipped model package, in one run and interleaved so that machine noise hits
//! both alike: the median latency of raw tract (`runnable.run` on a prepared tensor, loaded
//! the way tract's own examples do) against tern's whole path (decode the PNG or take the
//! tensor, preprocess, run, postprocess: `Model::infer`). Prints the overhead ratio. Image
//! models are measured twice: from a PNG (decode included) and from a raw RGB frame, which
//! is what a camera feed hands the engine. `prepare` is decode plus preprocessing alone.
//!
//! Environment: `TERN_BENCH_ITERS` (default 400) measured runs per side, after 50 warm-ups;
//! `TERN_BENCH_PACKAGES`: comma-separated package directories to measure instead of the shipped
//! ones (to compare quantisation choices, say).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

use ternd::engine::{Input, Model, PixelFormat, read_npy_f32};

fn packages_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-updates/models")
}

fn raw_tract(pkg: &Path) -> Arc<TypedRunnableModel> {
    let model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_path(pkg.join("model.onnx"))
        .expect("load")
        .into_optimized()
        .expect("optimise");
    model.into_runnable().expect("runnable")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let iters: usize = std::env::var("TERN_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let sample_png =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo/inbox/digit-7.png");
    let png = std::fs::read(&sample_png).expect("demo image");
    println!("tern engine overhead, batch 1, 1 thread, median of {iters} runs (µs)");
    println!(
        "{:<18} {:<8} {:>10} {:>10} {:>10} {:>9}",
        "package", "input", "raw tract", "prepare", "tern", "tern/raw"
    );
    let shipped = [
        "digits-cnn-f32",
        "digits-cnn-int8",
        "digits-mlp-f32",
        "digits-mlp-int8",
        "iris-mlp-f32",
        "iris-mlp-int8",
    ];
    let packages: Vec<PathBuf> = match std::env::var("TERN_BENCH_PACKAGES") {
        Ok(list) => list.split(',').map(PathBuf::from).collect(),
        Err(_) => shipped.iter().map(|n| packages_dir().join(n)).collect(),
    };
    for pkg in packages {
        let name = pkg.file_name().unwrap().to_string_lossy().to_string();
        let tern = Model::load(&pkg, NonZeroUsize::MIN).expect("tern load");
        let raw = raw_tract(&pkg);
        let (shape, data) =
            read_npy_f32(&std::fs::read(pkg.join("golden/0-input.npy")).expect("golden"))
                .expect("npy");
        let tensor: Tensor = tract_ndarray::ArrayD::from_shape_vec(shape.clone(), data.clone())
            .unwrap()
            .into();
        // Image models: a PNG (decode included) and the raw RGB frame a camera feed delivers.
        let inputs = if tern.manifest.image().is_some() {
            let rgb = image::load_from_memory(&png).expect("png").into_rgb8();
            let (width, height) = rgb.dimensions();
            let frame = Input::Frame {
                width,
                height,
                format: PixelFormat::Rgb24,
                data: rgb.into_raw(),
            };
            vec![(Input::Encoded(png.clone()), "png"), (frame, "frame")]
        } else {
            vec![(Input::Tensor { shape, data }, "tensor")]
        };
        for (input, kind) in inputs {
            for _ in 0..50 {
                raw.run(tvec!(tensor.clone().into())).unwrap();
                tern.infer(&input).unwrap();
            }
            let (mut r, mut t, mut p) = (
                Vec::with_capacity(iters),
                Vec::with_capacity(iters),
                Vec::with_capacity(iters),
            );
            for _ in 0..iters {
                let s = Instant::now();
                std::hint::black_box(input.prepare(&tern.manifest).unwrap());
                p.push(s.elapsed());
                let s = Instant::now();
                let out = raw.run(tvec!(tensor.clone().into())).unwrap();
                r.push(s.elapsed());
                std::hint::black_box(out);
                let s = Instant::now();
                let out = tern.infer(&input).unwrap();
                t.push(s.elapsed());
                std::hint::black_box(out);
            }
            let (r, t, p) = (median(r), median(t), median(p));
            println!(
                "{:<18} {:<8} {:>10.1} {:>10.1} {:>10.1} {:>9.3}",
                name,
                kind,
                r.as_secs_f64() * 1e6,
                p.as_secs_f64() * 1e6,
                t.as_secs_f64() * 1e6,
                t.as_secs_f64() / r.as_secs_f64()
            );
        }
    }
}
