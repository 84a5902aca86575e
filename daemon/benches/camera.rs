//! `cargo bench -p ternd --bench camera` (needs ffmpeg)
//!
//! A camera pipeline end to end, in-process: an ffmpeg lavfi test source → raw frames →
//! drop-oldest queue → model pool → one SQLite transaction (`synchronous=FULL`) per batch of
//! results that finished together.
//! In one run, for the digits CNN (int8 and float):
//!
//! - **throughput**: a source paced at 1.25× raw tract's rate, so the pipeline runs flat out
//!   without ffmpeg taking a core to draw frames that would only be dropped; results stored
//!   per second against raw tract's runs per second on the same model, thread count and
//!   input shape (the ratio is what tern's path costs);
//! - **latency**: a paced source at `TERN_BENCH_FPS` (default 25 fps), under capacity; p50
//!   and p99 from the frame read off ffmpeg's pipe to its result committed.
//!
//! Environment: `TERN_BENCH_SECS` (default 8) per measurement.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

use ternd::config::{CameraConfig, FeedConfig, OnFull, PipelineConfig, Publish};
use ternd::engine::PoolSettings;
use ternd::engine::{Model, ModelPool, Runtime};
use ternd::pipeline::{self, PipelineStats, Sinks};
use ternd::store::{Keeper, Retention, Store};

fn secs() -> Duration {
    Duration::from_secs_f64(
        std::env::var("TERN_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8.0),
    )
}

/// Raw tract runs per second: `runnable.run` on a ready 1x3x32x32 tensor, back to back.
fn raw_tract_rate(pkg: &Path, for_: Duration) -> f64 {
    let model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_path(pkg.join("model.onnx"))
        .expect("load")
        .into_optimized()
        .expect("optimise")
        .into_runnable()
        .expect("runnable");
    let input: Tensor =
        tract_ndarray::Array4::<f32>::from_shape_fn((1, 3, 32, 32), |(_, c, y, x)| {
            ((c * 31 + y * 7 + x) % 255) as f32 / 255.0
        })
        .into();
    for _ in 0..20 {
        model.run(tvec!(input.clone().into())).expect("run");
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_ {
        model.run(tvec!(input.clone().into())).expect("run");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct Run {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    dropped: u64,
}

/// One camera pipeline on `pkg` for `for_`, fed by a lavfi source paced at `fps`.
async fn pipeline_run(pkg: &Path, fps: u32, for_: Duration) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("tern.db")).expect("store");
    let model = Model::load_on(pkg, NonZeroUsize::MIN, Runtime::Cpu).expect("model");
    let pool = ModelPool::spawn(
        Arc::new(model),
        PoolSettings {
            plan: Default::default(),
            threads: NonZeroUsize::MIN,
            workers: NonZeroUsize::MIN,
            queue: NonZeroUsize::new(16).unwrap(),
            runtime: Runtime::Cpu,
        },
    );
    let feed = FeedConfig::Camera(CameraConfig {
        name: "bench".into(),
        input: format!("testsrc2=size=64x64:rate={fps}"),
        format: Some("lavfi".into()),
        input_args: vec!["-re".into()],
        fps: None,
        stall: Duration::from_secs(10),
        ffmpeg: "ffmpeg".into(),
    });
    let cfg = PipelineConfig {
        name: "bench".into(),
        feed: "bench".into(),
        model: pool.name().to_string(),
        every_nth: std::num::NonZeroU32::MIN,
        max_fps: None,
        window: NonZeroUsize::MIN,
        stride: NonZeroUsize::MIN,
        queue: NonZeroUsize::new(8).unwrap(),
        on_full: OnFull::DropOldest,
        publish: Publish::Always,
        store: true,
        capture_below: None,
        hop: None,
        stop_after_ms: 100,
        stages: Vec::new(),
        max_crops: 16,
        crop_pad: 0.0,
        drift: None,
    };
    let keeper = Keeper::new(Retention {
        results_max_age: None,
        results_budget_bytes: 1 << 30,
        capture_budget_bytes: 1 << 30,
    });
    let sinks = Sinks {
        store,
        outbox: None,
        local: None,
        keeper,
    };
    let stats = Arc::new(PipelineStats::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = pipeline::build(
        &cfg,
        &feed,
        pool,
        Vec::new(),
        sinks,
        stats.clone(),
        1,
        cancel.clone(),
    )
    .expect("pipeline starts");
    let (feed, serve) = (tokio::spawn(run.feed), tokio::spawn(run.serve));
    // Measure from the first result on: ffmpeg's start is not the pipeline's speed.
    while stats.results.load(Ordering::Relaxed) < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (n0, t0) = (stats.results.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(for_).await;
    let (n1, t1) = (stats.results.load(Ordering::Relaxed), Instant::now());
    let q = stats.e2e.quantiles();
    cancel.cancel();
    let _ = feed.await;
    let _ = serve.await;
    Run {
        rate: (n1 - n0) as f64 / (t1 - t0).as_secs_f64(),
        p50_ms: q.p50 as f64 / 1000.0,
        p99_ms: q.p99 as f64 / 1000.0,
        dropped: stats.feed.dropped.load(Ordering::Relaxed),
    }
}

fn main() {
    let ffmpeg = std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ffmpeg {
        eprintln!("*** SKIPPED: the camera bench needs ffmpeg on PATH ***");
        return;
    }
    let fps: u32 = std::env::var("TERN_BENCH_FPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-updates/models");
    println!(
        "camera pipeline (ffmpeg lavfi 64x64 → 32x32 rgb24), 1 worker, 1 thread, {:.0} s per figure",
        secs().as_secs_f64()
    );
    println!(
        "{:<16} {:>12} {:>14} {:>7} {:>9} {:>12} {:>12}",
        "model", "raw tract/s", "pipeline fr/s", "ratio", "dropped", "e2e p50 ms", "e2e p99 ms"
    );
    for name in ["digits-cnn-int8", "digits-cnn-f32"] {
        let pkg = models.join(name);
        let raw_before = raw_tract_rate(&pkg, secs() / 2);
        let flood = rt.block_on(pipeline_run(&pkg, (raw_before * 1.25) as u32, secs()));
        let raw_after = raw_tract_rate(&pkg, secs() / 2);
        let raw = (raw_before + raw_after) / 2.0;
        let paced = rt.block_on(pipeline_run(&pkg, fps, secs()));
        println!(
            "{name:<16} {raw:>12.1} {:>14.1} {:>7.3} {:>9} {:>12.2} {:>12.2}",
            flood.rate,
            flood.rate / raw,
            flood.dropped,
            paced.p50_ms,
            paced.p99_ms
        );
        println!(
            "{:<16} {:>12} {:>14} {:>7} {:>9} {:>12} {:>12}   (at {fps} fps paced: {:.1} fr/s, {} dropped; flood p50/p99 {:.1}/{:.1} ms)",
            "", "", "", "", "", "", "", paced.rate, paced.dropped, flood.p50_ms, flood.p99_ms
        );
    }
}
