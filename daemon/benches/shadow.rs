//! `cargo bench -p ternd --bench shadow`
//!
//! Whether a shadow slows the live model down: the digits CNN (int8) served by a pool as
//! ternd serves it (one worker, one thread), fed one digit after another, each answer's
//! latency as its caller sees it. Three ways, in interleaved rounds so that drift of the
//! machine falls on all of them alike: no shadow (the baseline), a shadow of the same network
//! on every input with a quarter of a core, and one with a whole core (what a shadow can take
//! at most). Printed per way: the median and 90th percentile over all its rounds, the spread
//! of its round medians, and the ratio to the baseline; the baseline's own spread is the
//! noise the ratios are read against.
//!
//! Environment: `TERN_BENCH_ROUNDS` (default 5) rounds of `TERN_BENCH_RUNS` (default 2000)
//! inferences per way.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tern_update::bundle::ShadowSpec;
use ternd::engine::{Input, Model, ModelPool, PoolSettings};
use ternd::shadow::{Origin, Shadow};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    let rounds = env("TERN_BENCH_ROUNDS", 5);
    let runs = env("TERN_BENCH_RUNS", 2000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pkg = root.join("firmware-updates/models/digits-cnn-int8");
    let load = || Arc::new(Model::load(&pkg, NonZeroUsize::MIN).expect("the digits CNN loads"));
    let pool = ModelPool::spawn(load(), PoolSettings::default());
    let input = Input::from_file(&root.join("configs/demo/inbox/digit-7.png"), 1 << 20)
        .expect("the demo digit reads");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let ways: [(&str, Option<f64>); 3] = [
        ("no shadow (baseline)", None),
        ("shadow, cpu_share 0.25", Some(0.25)),
        ("shadow, cpu_share 1", Some(1.0)),
    ];
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let mut medians: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let mut shadowed = vec![(0u64, 0u64); ways.len()];
    for _ in 0..50 {
        rt.block_on(pool.infer(input.clone())).expect("runs");
    }
    for _ in 0..rounds {
        for (w, (_, share)) in ways.iter().enumerate() {
            let shadow = share.map(|share| {
                let spec = ShadowSpec::parse_pairs(&format!("fraction=1,cpu_share={share}"))
                    .expect("a spec");
                Shadow::start(Origin::Command, spec, load(), 0, Default::default(), None)
            });
            let mut round = Vec::with_capacity(runs);
            for _ in 0..runs {
                let t = Instant::now();
                let p = rt.block_on(pool.infer(input.clone())).expect("runs");
                round.push(t.elapsed().as_secs_f64() * 1e6);
                // As the pipeline does: after the live answer, never waiting.
                if let Some(s) = &shadow
                    && s.pick()
                {
                    s.offer(input.clone(), p);
                }
            }
            if let Some(s) = shadow {
                let r = s.report();
                shadowed[w].0 += r["samples"].as_u64().unwrap_or(0);
                shadowed[w].1 += r["dropped"].as_u64().unwrap_or(0);
            }
            round.sort_by(f64::total_cmp);
            medians[w].push(pct(&round, 0.5));
            lat[w].extend(round);
        }
    }
    println!(
        "digits-cnn-int8, live pool of one worker and one thread; {rounds} rounds of {runs} \
         inferences per way, interleaved"
    );
    let mut base = (0.0, 0.0);
    for (w, (name, _)) in ways.iter().enumerate() {
        lat[w].sort_by(f64::total_cmp);
        medians[w].sort_by(f64::total_cmp);
        let (p50, p90) = (pct(&lat[w], 0.5), pct(&lat[w], 0.9));
        let (lo, hi) = (medians[w][0], medians[w][medians[w].len() - 1]);
        if w == 0 {
            base = (p50, p90);
        }
        let shadow = if w == 0 {
            String::new()
        } else {
            let (n, d) = shadowed[w];
            format!("; the shadow ran {n} inputs, dropped {d}")
        };
        println!(
            "{name:<24} median {p50:7.1} µs (x{:.3}), p90 {p90:7.1} µs (x{:.3}); round medians {lo:.1}–{hi:.1} µs{shadow}",
            p50 / base.0,
            p90 / base.1,
        );
    }
}
