//! `cargo bench -p tern-tests --bench updates` (needs mosquitto and mosquitto_pub on PATH)
//!
//! In one run, against one local mosquitto, for a 2 MiB and a 20 MiB model package:
//! 1. the baseline: `mosquitto_pub -f` of the artifact's bytes as one QoS 1 message, timed from
//!    its start until a subscriber has the whole message;
//! 2. tern: `tern-update publish` of the signed bundle to a group with a running `ternd` in it,
//!    timed from the start of `publish` to the box's `update.committed` event (health window 0:
//!    delivery, verification, unpacking, self-test, install and activation), and the transfer
//!    alone (the box's `update.downloading` to `update.verifying` events);
//!    the transfer rate's ratio to (1).
//!
//! The 20 MiB package is the int8 digits CNN with 18 MiB of padding in an extra file.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_tests::mqtt::{Broker, Client, ClientOptions};
use tern_tests::updates::{noise, variant};
use tern_tests::{Daemon, bin, need, package};

const T: Duration = Duration::from_secs(300);

fn client(broker: &Broker, id: &str, subscribe: &[&str]) -> Client {
    Client::connect(
        broker,
        ClientOptions {
            v5: false,
            id,
            subscribe,
            persistent: false,
        },
    )
    .unwrap()
}

fn run(args: &[&str], dir: &Path) -> String {
    let o = Command::new(bin("tern-update"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "tern-update {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1048576.0 / d.as_secs_f64()
}

fn main() {
    if !need("mosquitto") || !need("mosquitto_pub") {
        return;
    }
    let broker = Broker::mosquitto().unwrap().expect("mosquitto");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let public = run(&["keygen", "--out", "op.key"], dir).trim().to_string();

    let small = variant(
        &package("digits-cnn-int8"),
        &dir.join("small"),
        "digits-cnn-int8",
        "1.1.0",
        |t| t,
    );
    let large = variant(
        &package("digits-cnn-int8"),
        &dir.join("large"),
        "digits-cnn-int8",
        "1.2.0",
        |t| t,
    );
    std::fs::write(large.join("padding.bin"), noise(18 * 1024 * 1024)).unwrap();

    let config = dir.join("ternd.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "state"
[[models]]
package = "{}"
[updates]
keys = ["{public}"]
health_window_secs = 0
[fleet]
broker = "{}"
device = "bench-1"
groups = ["bench"]
telemetry_secs = 3600
"#,
            package("digits-cnn-int8").display(),
            broker.url(true)
        ),
    )
    .unwrap();
    let mut watch = client(
        &broker,
        "bench-watch",
        &["tern/bench-1/events", "tern/bench-1/state", "bench/raw"],
    );
    let _daemon = Daemon::spawn(&config, None, &[]).unwrap();
    watch
        .recv_match("birth", T, |m| {
            m.topic == "tern/bench-1/state" && m.json()["state"] == "online"
        })
        .unwrap();

    println!(
        "{:<10} {:>9} {:>12} {:>14} {:>16} {:>14} {:>8}",
        "package", "bytes", "raw MiB/s", "box MiB/s", "publish→commit", "tool publish", "ratio"
    );
    for (name, pkg) in [("2 MiB", &small), ("20 MiB", &large)] {
        let bundle = dir.join(format!("{name}.bundle").replace(' ', ""));
        let b = bundle.to_str().unwrap();
        run(
            &[
                "bundle",
                "--package",
                pkg.to_str().unwrap(),
                "--out",
                b,
                "--key",
                "op.key",
                "--group",
                "bench",
            ],
            dir,
        );
        // The artifact's bytes, for the baseline.
        let raw = dir.join("artifact.tar");
        let st = Command::new("tar")
            .args(["-xf", b, "-C"])
            .arg(dir)
            .arg("artifact.tar")
            .status()
            .unwrap();
        assert!(st.success());
        let bytes = std::fs::metadata(&raw).unwrap().len();

        let start = Instant::now();
        let st = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port.to_string(),
                "-q",
                "1",
                "-t",
                "bench/raw",
                "-f",
            ])
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success());
        watch
            .recv_match("the raw artifact", T, |m| {
                m.topic == "bench/raw" && m.payload.len() as u64 == bytes
            })
            .unwrap();
        let raw_time = start.elapsed();

        let start = Instant::now();
        let out = Command::new(bin("tern-update"))
            .args([
                "publish",
                "--broker",
                &broker.url(false),
                "--group",
                "bench",
                b,
            ])
            .output()
            .unwrap();
        let tool_time = start.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ev = |what: &str, watch: &mut Client| -> Value {
            watch
                .recv_match(what, T, |m| {
                    m.topic == "tern/bench-1/events" && m.json()["event"] == what
                })
                .unwrap()
                .json()
        };
        let down = ev("update.downloading", &mut watch);
        let verifying = ev("update.verifying", &mut watch);
        let committed = ev("update.committed", &mut watch);
        let total = start.elapsed();
        assert_eq!(committed["version"], down["version"]);
        let transfer = Duration::from_millis(
            (verifying["ts_ms"].as_i64().unwrap() - down["ts_ms"].as_i64().unwrap()).max(1) as u64,
        );
        let (raw_rate, box_rate) = (mib_s(bytes, raw_time), mib_s(bytes, transfer));
        println!(
            "{:<10} {:>9} {:>12.1} {:>14.1} {:>14.0}ms {:>12.0}ms {:>8.2}",
            name,
            bytes,
            raw_rate,
            box_rate,
            total.as_secs_f64() * 1000.0,
            tool_time.as_secs_f64() * 1000.0,
            box_rate / raw_rate
        );
    }
}
