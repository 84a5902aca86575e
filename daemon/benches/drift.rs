//! `cargo bench -p ternd --bench drift`
//!
//! What watching drift adds to each result, against what one inference costs, in one run:
//! the digits CNN (int8) loaded as ternd loads it, run on a digit image (the baseline); then a
//! drift watch (window 500, a learned baseline) reading that many results, as a pipeline does
//! after each answer: the reading, the comparison, and the report status and telemetry show.
//! Printed: time per result of each and the ratio. The answers fed alternate between the ten
//! labels with varied confidence, so every bin and label moves.
//!
//! Environment: `TERN_BENCH_RESULTS` (default 200000) drift readings timed.

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Instant;

use ternd::drift::{Drift, DriftConfig, Reading};
use ternd::engine::{Class, Input, Model, Prediction};

fn main() {
    let n: usize = std::env::var("TERN_BENCH_RESULTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = Model::load(
        &root.join("firmware-updates/models/digits-cnn-int8"),
        NonZeroUsize::MIN,
    )
    .expect("the digits CNN loads");
    let input = Input::from_file(&root.join("configs/demo/inbox/digit-7.png"), 1 << 20)
        .expect("the demo digit reads");
    for _ in 0..50 {
        model.infer(&input).expect("runs");
    }
    let runs = 2000;
    let t = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(model.infer(&input).expect("runs"));
    }
    let infer_us = t.elapsed().as_secs_f64() * 1e6 / runs as f64;

    let answers: Vec<Prediction> = (0..1000)
        .map(|i| Prediction {
            model: "digits-cnn-int8".into(),
            version: "1.0.0".into(),
            top: vec![Class {
                index: i % 10,
                label: (i % 10).to_string(),
                score: 0.5 + ((i * 37) % 50) as f32 / 100.0,
            }],
            outputs: Default::default(),
            latency_us: 1000,
            batch: None,
        })
        .collect();
    let mut drift = Drift::new(DriftConfig {
        window: 500,
        threshold: 0.25,
        capture_below: None,
    });
    drift.watch("digits-cnn-int8", "1.0.0", None);
    // Learn the baseline and fill the window first: the steady state is what is timed.
    for p in answers.iter().cycle().take(1000) {
        drift.observe(Reading::of(p));
    }
    let t = Instant::now();
    for p in answers.iter().cycle().take(n) {
        std::hint::black_box(drift.observe(Reading::of(p)));
        std::hint::black_box(drift.report());
    }
    let drift_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("digits-cnn-int8, one thread: an inference {infer_us:.1} µs (baseline, {runs} runs)");
    println!(
        "drift watch per result (read, compare, report; window 500): {drift_us:.2} µs = {:.4} of an inference ({n} results)",
        drift_us / infer_us
    );
}
