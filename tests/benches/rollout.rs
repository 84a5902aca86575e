//! `cargo bench -p tern-tests --bench rollout` (needs mosquitto; debug-profile binaries from
//! `cargo build --workspace --bins`). `TERN_BENCH_BOXES=500` for more boxes.
//!
//! In one run, N real `ternd` boxes (the many-box harness) on one local mosquitto:
//! 1. the per-box cost: start-up to all online, memory (PSS and RSS), CPU at idle, and the broker's messages and
//!    bytes per box per hour at idle (mosquitto's own `$SYS` counters, telemetry every 60 s);
//! 2. `tern-update rollout` of a new version in waves `1,5%,25%,rest` (health window 1 s):
//!    start to all committed, broker messages, bytes and CPU per box;
//! 3. `tern-update fleet --json` over the N boxes, and over 5,000 simulated boxes (a retained
//!    birth, telemetry and update status each).
//!
//! Baselines from the same run: N plain MQTT clients fetching the same retained manifests and
//! chunks from the broker (its floor for delivering a rollout's bytes), and one plain client
//! reading the retained messages the fleet view reads, with the view's 500 ms quiet rule.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_tests::boxes::{Boxes, Options};
use tern_tests::mqtt::{Broker, Client, ClientOptions, MosquittoOptions};
use tern_tests::updates::{build, key, variant};
use tern_tests::{bin, need, package};

const MODEL: &str = "digits-mlp-int8";

/// CPU seconds process `pid` has used itself (0 once it is gone).
fn cpu_s(pid: u32) -> f64 {
    ternd::fleet::telemetry::cpu_seconds_of(pid).unwrap_or(0.0)
}

/// mosquitto's `$SYS/broker/{messages,bytes}/{received,sent}`, as published next.
fn counters(c: &mut Client) -> HashMap<String, f64> {
    c.drain();
    let mut out = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < 4 && Instant::now() < deadline {
        if let Some(m) = c.recv_any(Duration::from_millis(500))
            && let Some(v) = String::from_utf8_lossy(&m.payload)
                .trim()
                .parse::<f64>()
                .ok()
        {
            out.insert(m.topic.trim_start_matches("$SYS/broker/").to_string(), v);
        }
    }
    out
}

fn delta(a: &HashMap<String, f64>, b: &HashMap<String, f64>, k: &str) -> f64 {
    b.get(k).copied().unwrap_or(0.0) - a.get(k).copied().unwrap_or(0.0)
}

fn fleet_view(broker: &Broker) -> (Duration, Value) {
    let t = Instant::now();
    let o = Command::new(bin("tern-update"))
        .args(["fleet", "--broker", &broker.url(false), "--json"])
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (took, serde_json::from_slice(&o.stdout).unwrap())
}

/// N plain clients at once, each subscribed to its box's manifest topic and the chunks, until
/// each has them all: how fast the broker alone hands out a rollout's retained bytes.
fn floor(broker: &Broker, fleet: &Boxes, sha256: &str, chunks: usize) -> Duration {
    let chunk_filter = format!("tern/artifacts/{sha256}/+");
    let t = Instant::now();
    std::thread::scope(|s| {
        for (i, b) in fleet.boxes.iter().enumerate() {
            let (chunk_filter, manifest) =
                (&chunk_filter, format!("tern/{}/update/{MODEL}", b.device));
            s.spawn(move || {
                let mut c = Client::connect(
                    broker,
                    ClientOptions {
                        v5: false,
                        id: &format!("floor-{i}"),
                        subscribe: &[&manifest, chunk_filter],
                        persistent: false,
                    },
                )
                .unwrap();
                let mut got = 0;
                while got < chunks + 1 {
                    c.recv_any(Duration::from_secs(60))
                        .expect("the retained messages");
                    got += 1;
                }
            });
        }
    });
    t.elapsed()
}

/// One plain client reading what the fleet view reads, until 500 ms pass without a message.
fn raw_view(broker: &Broker) -> (Duration, usize) {
    let t = Instant::now();
    let mut c = Client::connect(
        broker,
        ClientOptions {
            v5: false,
            id: "raw-view",
            subscribe: &[
                "tern/+/state",
                "tern/+/telemetry",
                "tern/+/updates/+",
                "tern/fleet/rollouts/+",
            ],
            persistent: false,
        },
    )
    .unwrap();
    let mut n = 0;
    while c.recv_any(Duration::from_millis(500)).is_some() {
        n += 1;
    }
    (t.elapsed(), n)
}

fn main() {
    if !need("mosquitto") {
        return;
    }
    let n: usize = std::env::var("TERN_BENCH_BOXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let broker = Broker::mosquitto_with(MosquittoOptions {
        sys_interval: Some(1),
        ..Default::default()
    })
    .unwrap()
    .expect("mosquitto");
    let broker_pid = broker.pid().expect("our mosquitto");
    let mut sys = Client::connect(
        &broker,
        ClientOptions {
            v5: false,
            id: "bench-sys",
            subscribe: &["$SYS/broker/messages/+", "$SYS/broker/bytes/+"],
            persistent: false,
        },
    )
    .unwrap();
    let k = key();
    let extra = format!(
        "[updates]\nkeys = [\"{}\"]\nhealth_window_secs = 1\n",
        k.public().to_base64()
    );
    let mut w = Boxes::watcher(&broker, "bench-watch").unwrap();
    let t = Instant::now();
    let fleet = Boxes::start(
        &broker,
        &Options {
            count: n,
            extra: &extra,
            telemetry_secs: 60,
            ..Options::default()
        },
    )
    .unwrap();
    let all: Vec<usize> = (0..n).collect();
    fleet
        .wait_online(&mut w, &all, Duration::from_secs(600))
        .unwrap();
    let online = t.elapsed();
    let mem = fleet.memory();
    let avg = |f: fn(&(u64, u64)) -> u64| {
        mem.iter().map(f).sum::<u64>() as f64 / mem.len() as f64 / 1048576.0
    };
    let (rss_mib, pss_mib) = (avg(|m| m.0), avg(|m| m.1));
    let pids: Vec<u32> = fleet
        .boxes
        .iter()
        .filter_map(|b| b.daemon.as_ref().map(|d| d.pid() as u32))
        .collect();
    let boxes_cpu = || pids.iter().map(|&p| cpu_s(p)).sum::<f64>();

    // Idle: a minute, after the start-up settled.
    std::thread::sleep(Duration::from_secs(5));
    let idle = Duration::from_secs(60);
    let (c0, b0, m0) = (boxes_cpu(), cpu_s(broker_pid), counters(&mut sys));
    std::thread::sleep(idle);
    let (c1, b1, m1) = (boxes_cpu(), cpu_s(broker_pid), counters(&mut sys));
    let per_hour = 3600.0 / idle.as_secs_f64() / n as f64;
    let idle_cpu_pct = (c1 - c0) / idle.as_secs_f64() / n as f64 * 100.0;
    let idle_broker_pct = (b1 - b0) / idle.as_secs_f64() * 100.0;
    let idle_msgs =
        (delta(&m0, &m1, "messages/received") + delta(&m0, &m1, "messages/sent")) * per_hour;
    let idle_bytes = (delta(&m0, &m1, "bytes/received") + delta(&m0, &m1, "bytes/sent")) * per_hour;

    // A rollout to all of them.
    let d = tempfile::tempdir().unwrap();
    let pkg = variant(
        &package(MODEL),
        &d.path().join("pkg"),
        MODEL,
        "1.1.0",
        |s| s,
    );
    let bundle = d.path().join("b.bundle");
    let built = build(&pkg, 64 * 1024, &[&k], |_| {});
    built.write(&bundle);
    let (b0, m0) = (cpu_s(broker_pid), counters(&mut sys));
    let t = Instant::now();
    let o = Command::new(bin("tern-update"))
        .args(["rollout", "--broker", &broker.url(false), "--id", "bench"])
        .args([
            "--group",
            "lab",
            "--waves",
            "1,5%,25%,rest",
            "--wait-secs",
            "600",
        ])
        .arg("--bundle")
        .arg(&bundle)
        .arg("--state-dir")
        .arg(d.path())
        .output()
        .unwrap();
    let rollout = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (b1, m1) = (cpu_s(broker_pid), counters(&mut sys));
    let r_msgs =
        (delta(&m0, &m1, "messages/received") + delta(&m0, &m1, "messages/sent")) / n as f64;
    let r_bytes = (delta(&m0, &m1, "bytes/received") + delta(&m0, &m1, "bytes/sent")) / n as f64;

    let floor_t = floor(
        &broker,
        &fleet,
        &built.signed.artifact.sha256,
        built.signed.artifact.chunks.len(),
    );
    let (raw_n, _) = raw_view(&broker);
    let (view_n, v) = fleet_view(&broker);
    assert_eq!(v["summary"]["boxes"], n);
    assert_eq!(v["summary"]["versions"][format!("{MODEL} 1.1.0")], n);

    // 5,000 simulated boxes: what a real box leaves retained, under other device ids.
    let sim = 5000;
    let mut c = Client::connect(
        &broker,
        ClientOptions {
            v5: false,
            id: "bench-sim",
            subscribe: &["bench/sync"],
            persistent: false,
        },
    )
    .unwrap();
    for i in 0..sim {
        let dev = format!("sim-{i:05}");
        let birth = json!({"state": "online", "device": dev, "groups": ["sim"], "version": "0.1.0",
            "models": [{"name": MODEL, "version": "1.0.0", "plan": "tract"}], "status": "ready"});
        let tel = json!({"ts_ms": 1, "outbox": {"rows": 0, "bytes": 0}, "rss_bytes": 40_000_000});
        let up = json!({"model": MODEL, "version": "1.0.0", "state": "committed", "ts_ms": 1});
        c.publish_retained(&format!("tern/{dev}/state"), birth.to_string().as_bytes())
            .unwrap();
        c.publish_retained(&format!("tern/{dev}/telemetry"), tel.to_string().as_bytes())
            .unwrap();
        c.publish_retained(
            &format!("tern/{dev}/updates/{MODEL}"),
            up.to_string().as_bytes(),
        )
        .unwrap();
    }
    c.sync("bench/sync").unwrap();
    let (raw_sim, read) = raw_view(&broker);
    assert!(read >= 3 * sim, "{read} retained messages read");
    let (view_sim, v) = fleet_view(&broker);
    assert_eq!(v["summary"]["boxes"], n + sim);

    println!("\n{n} ternd boxes on one mosquitto (2 cores)");
    println!("| measure | value |\n| --- | ---: |");
    println!("| start to all online | {:.1} s |", online.as_secs_f64());
    println!(
        "| memory per box: PSS (its share) / RSS (binary counted whole) | {pss_mib:.1} / {rss_mib:.1} MiB |"
    );
    println!("| CPU per box at idle | {idle_cpu_pct:.3}% of a core |");
    println!("| broker CPU at idle | {idle_broker_pct:.2}% of a core |");
    println!("| broker messages per box per hour at idle (in + out) | {idle_msgs:.0} |");
    println!(
        "| broker bytes per box per hour at idle (in + out) | {:.0} |",
        idle_bytes
    );
    println!(
        "| rollout in 4 waves, start to all committed | {:.1} s |",
        rollout.as_secs_f64()
    );
    println!(
        "| baseline: {n} plain clients fetch the same manifests and chunks | {:.2} s (rollout {:.1}×; its 4 health windows alone take 4 s) |",
        floor_t.as_secs_f64(),
        rollout.as_secs_f64() / floor_t.as_secs_f64()
    );
    println!("| broker messages per box during the rollout | {r_msgs:.0} |");
    println!("| broker bytes per box during the rollout | {r_bytes:.0} |");
    println!(
        "| broker CPU during the rollout | {:.2} s ({:.1} ms per box) |",
        b1 - b0,
        (b1 - b0) * 1000.0 / n as f64
    );
    println!(
        "| `tern-update fleet --json`, {n} boxes | {:.2} s ({:.2}× a plain client's read, {:.2} s) |",
        view_n.as_secs_f64(),
        view_n.as_secs_f64() / raw_n.as_secs_f64(),
        raw_n.as_secs_f64()
    );
    println!(
        "| `tern-update fleet --json`, {} boxes ({sim} simulated) | {:.2} s ({:.2}× a plain client's read, {:.2} s) |",
        n + sim,
        view_sim.as_secs_f64(),
        view_sim.as_secs_f64() / raw_sim.as_secs_f64(),
        raw_sim.as_secs_f64()
    );
}
