//! Camera, serial and MQTT feeds against real peers: ffmpeg (lavfi test sources), a socat
//! pseudo-terminal pair, mosquitto and mosquitto_pub; with the pipelines' commands, drop
//! policy, retention and capture export seen from the fleet side.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tern_tests::mqtt::{Broker, Client};
use tern_tests::*;

use crate::fleet::{client, command, wait_online};

const T: Duration = Duration::from_secs(60);

/// A running box with `body`, online: its config, its state dir, a client watching all its
/// topics, and the daemon.
pub(crate) fn start(
    dir: &Path,
    device: &str,
    broker: &Broker,
    body: &str,
) -> (PathBuf, PathBuf, Client, Daemon) {
    let config = feed_box(dir, device, broker, body);
    let mut c = client(
        broker,
        false,
        &format!("{device}-test"),
        &[&format!("tern/{device}/#")],
    );
    let d = Daemon::spawn(&config, None, &[]).unwrap();
    wait_online(&mut c, device);
    (config, dir.join("state"), c, d)
}

/// A box with `body` (models, feeds, pipelines) and the fleet link to `broker`.
fn feed_box(dir: &Path, device: &str, broker: &Broker, body: &str) -> PathBuf {
    let config = dir.join("ternd.toml");
    let text = format!(
        r#"state_dir = "state"
[dbus]
bus = "none"
{body}
[fleet]
broker = "{url}"
device = "{device}"
telemetry_secs = 3600
"#,
        url = broker.url(false),
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn digits() -> String {
    format!(
        "[[models]]\npackage = \"{}\"\n",
        package("digits-cnn-int8").display()
    )
}

pub(crate) fn cmd(c: &mut Client, device: &str, name: &str, args: Value) -> Value {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = format!("f{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut payload = json!({"id": id});
    if !args.is_null() {
        payload["args"] = args;
    }
    command(c, device, name, &payload)
}

/// One pipeline's entry in `pipelines.list`.
fn pipeline(c: &mut Client, device: &str, name: &str) -> Value {
    let r = cmd(c, device, "pipelines.list", Value::Null);
    assert_eq!(r["ok"], true, "{r}");
    r["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {r}"))
        .clone()
}

/// The ffmpeg processes ternd (`pid`) runs now.
fn ffmpeg_children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let children =
            std::fs::read_to_string(task.unwrap().path().join("children")).unwrap_or_default();
        for c in children.split_whitespace() {
            let c: i32 = c.parse().unwrap();
            let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
            if comm.trim() == "ffmpeg" {
                out.push(c);
            }
        }
    }
    out
}

fn max_id(state: &Path, pipeline: &str) -> i64 {
    count(
        state,
        &format!("SELECT ifnull(max(id), 0) FROM results WHERE pipeline = '{pipeline}'"),
    )
    .unwrap_or(0)
}

pub(crate) fn wait_rows(state: &Path, pipeline: &str, n: i64) {
    let sql = format!("SELECT count(*) FROM results WHERE pipeline = '{pipeline}'");
    wait_for(&format!("{n} results of {pipeline}"), T, || {
        (count(state, &sql)? >= n).then_some(())
    })
    .unwrap();
}

fn mosquitto() -> Option<Broker> {
    if !need("ffmpeg") {
        return None;
    }
    Broker::mosquitto().unwrap()
}

#[test]
fn a_camera_restarts_its_ffmpeg_and_pipelines_stop_and_start_by_command() {
    let Some(broker) = mosquitto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"{models}
[[feeds]]
kind = "camera"
name = "cam0"
format = "lavfi"
input = "testsrc2=size=96x64:rate=10"
input_args = ["-re"]
stall_secs = 5

[[pipelines]]
name = "cam"
feed = "cam0"
model = "digits-cnn-int8"
"#,
        models = digits()
    );
    let (config, state, mut c, mut d) = start(dir.path(), "cam1", &broker, &body);

    // Results arrive from the camera in time order, and upstream with their sequence.
    wait_rows(&state, "cam", 5);
    let ts: Vec<i64> = column(
        &state,
        "SELECT ts_ms FROM results WHERE pipeline = 'cam' ORDER BY id",
    );
    // Frames may wait in the pipe together when the box is busy, so two can share a
    // millisecond; none is older than the one before it.
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
    assert!(ts.last() > ts.first(), "{ts:?}");
    let first = c.recv_on("tern/cam1/results/cam", T).unwrap().json();
    assert_eq!(first["model"], "digits-cnn-int8");
    assert_eq!(first["version"], "1.0.0");
    assert_eq!(first["source"], "cam0");
    assert!(first["latency_us"].as_u64().unwrap() > 0, "{first}");
    assert!(!first["top"].as_array().unwrap().is_empty(), "{first}");
    let second = c.recv_on("tern/cam1/results/cam", T).unwrap().json();
    assert!(
        second["seq"].as_i64() > first["seq"].as_i64(),
        "{first} {second}"
    );
    assert!(second["ts_ms"].as_i64() >= first["ts_ms"].as_i64());

    // Kill ffmpeg: the feed says why, restarts it, and results go on.
    let before = ffmpeg_children(d.pid());
    assert_eq!(before.len(), 1, "{before:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // On a loaded machine the camera may also have stalled once before: that restart is
    // reported too, with its own reason, and is not the one looked for here.
    let ev = c
        .recv_match("feed.restarting for the kill", T, |m| {
            let j = m.json();
            m.topic == "tern/cam1/events"
                && j["event"] == "feed.restarting"
                && j["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("ffmpeg ended"))
        })
        .unwrap()
        .json();
    assert_eq!(ev["pipeline"], "cam");
    assert_eq!(ev["feed"], "cam0");
    assert!(
        ev["reason"].as_str().unwrap().contains("ffmpeg ended"),
        "{ev}"
    );
    let at_kill = max_id(&state, "cam");
    wait_for("results after the restart", T, || {
        (max_id(&state, "cam") > at_kill + 5).then_some(())
    })
    .unwrap();
    let after = ffmpeg_children(d.pid());
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before);
    let p = pipeline(&mut c, "cam1", "cam");
    assert_eq!(p["state"], "running", "{p}");
    assert!(p["restarts"].as_u64().unwrap() >= 1, "{p}");
    assert!(p["results"].as_u64().unwrap() > 5, "{p}");

    // Stop by command: ffmpeg goes, and the choice survives a restart of the daemon.
    let r = cmd(&mut c, "cam1", "pipelines.stop", json!({"name": "cam"}));
    assert_eq!(r["result"]["state"], "stopped", "{r}");
    wait_for("ffmpeg to go", T, || {
        ffmpeg_children(d.pid()).is_empty().then_some(())
    })
    .unwrap();
    let stopped = max_id(&state, "cam");
    let r = cmd(&mut c, "cam1", "pipelines.stop", json!({"name": "nope"}));
    assert_eq!(r["error"]["code"], "not_found", "{r}");
    // Nothing more was stored once the stop was answered.
    assert_eq!(max_id(&state, "cam"), stopped);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    c.drain();
    let mut d = Daemon::spawn(&config, None, &[]).unwrap();
    wait_online(&mut c, "cam1");
    let p = pipeline(&mut c, "cam1", "cam");
    assert_eq!(p["state"], "stopped", "{p}");
    assert_eq!(p["reason"], "stopped by command", "{p}");
    assert!(ffmpeg_children(d.pid()).is_empty());
    let stopped_at = max_id(&state, "cam");
    let r = cmd(&mut c, "cam1", "pipelines.start", json!({"name": "cam"}));
    assert_eq!(r["ok"], true, "{r}");
    wait_for("results after pipelines.start", T, || {
        (max_id(&state, "cam") > stopped_at + 3).then_some(())
    })
    .unwrap();
    assert_eq!(pipeline(&mut c, "cam1", "cam")["state"], "running");
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// `ternd infer` offline: the top label for one input file.
fn offline_label(pkg: &str, input: &Path) -> String {
    let (status, out, err) = infer(&package(pkg), input, &["--json"]).unwrap();
    assert!(status.success(), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["top"][0]["label"].as_str().unwrap().to_string()
}

#[test]
fn a_flooding_camera_drops_oldest_and_shares_its_model_with_an_mqtt_feed() {
    let Some(broker) = mosquitto() else { return };
    if !need("mosquitto_pub") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No -re: ffmpeg draws frames as fast as it can, far faster than the model runs.
    let body = format!(
        r#"{models}
[[feeds]]
kind = "camera"
name = "flood"
format = "lavfi"
input = "testsrc2=size=64x64:rate=1000"

[[feeds]]
kind = "mqtt"
name = "site"
topic = "site/+/image"

[[pipelines]]
name = "flood"
feed = "flood"
model = "digits-cnn-int8"
queue = 4

[[pipelines]]
name = "images"
feed = "site"
model = "digits-cnn-int8"
"#,
        models = digits()
    );
    let (_, state, mut c, mut d) = start(dir.path(), "cam2", &broker, &body);
    wait_rows(&state, "flood", 50);
    wait_for("the MQTT feed subscribed", T, || {
        (pipeline(&mut c, "cam2", "images")["state"] == "running").then_some(())
    })
    .unwrap();

    // While the camera saturates the model, images published by another device get their
    // results: the camera holds at most its share of places in the model's queue.
    let mut images: Vec<PathBuf> = std::fs::read_dir(root().join("configs/demo/inbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    images.sort();
    let port = broker.url(false).rsplit(':').next().unwrap().to_string();
    for (i, img) in images.iter().enumerate() {
        let st = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t"])
            .arg(format!("site/cam{i}/image"))
            .arg("-f")
            .arg(img)
            .status()
            .unwrap();
        assert!(st.success());
    }
    // A message that is no image is counted and skipped.
    let st = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "site/x/image",
            "-m",
            "{\"not\": 1}",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let flood_before = max_id(&state, "flood");
    wait_rows(&state, "images", images.len() as i64);
    let conn = db(&state).unwrap();
    for (i, img) in images.iter().enumerate() {
        let label: String = conn
            .query_row(
                "SELECT label FROM results WHERE pipeline = 'images' AND source = ?1",
                [format!("site/cam{i}/image")],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            label,
            offline_label("digits-cnn-int8", img),
            "{}",
            img.display()
        );
    }
    assert!(
        max_id(&state, "flood") > flood_before,
        "the camera went on too"
    );
    let p = wait_for("the bad message counted", T, || {
        let p = pipeline(&mut c, "cam2", "images");
        (p["garbage"] == 1).then_some(p)
    })
    .unwrap();
    assert_eq!(p["errors"], 0, "{p}");

    // Drop-oldest: frames were dropped and counted rather than queued (the queue of 4 bounds
    // the wait, where back-pressure would have let it grow for as long as ffmpeg ran ahead),
    // and each stored result's end-to-end latency was measured. How long that latency is is
    // the camera bench's business, not a test's on a loaded machine.
    let p = pipeline(&mut c, "cam2", "flood");
    assert!(p["dropped"].as_u64().unwrap() > 0, "{p}");
    let e2e = &p["e2e_latency_us"];
    assert!(
        e2e["samples"].as_u64().unwrap() > 0 && e2e["p99"].as_u64().unwrap() > 0,
        "{p}"
    );
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

pub(crate) struct Socat {
    child: Child,
}

impl Socat {
    pub(crate) fn start(dev: &Path, writer: &Path) -> Socat {
        let _ = std::fs::remove_file(dev);
        let _ = std::fs::remove_file(writer);
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", dev.display()))
            .arg(format!("pty,raw,echo=0,link={}", writer.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("socat's pty links", T, || {
            (dev.exists() && writer.exists()).then_some(())
        })
        .unwrap();
        Socat { child }
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_serial_sensor_on_a_pty_skips_garbage_and_survives_a_replug() {
    if !need("socat") {
        return;
    }
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("ttyIRIS");
    let writer = dir.path().join("ttyWRITER");
    let mut socat = Socat::start(&dev, &writer);
    let body = format!(
        r#"[[models]]
package = "{pkg}"

[[feeds]]
kind = "serial"
name = "iris"
path = "{dev}"
baud = 115200
fields = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
max_line_bytes = 256

[[pipelines]]
name = "flowers"
feed = "iris"
model = "iris-mlp-int8"
"#,
        pkg = package("iris-mlp-int8").display(),
        dev = dev.display()
    );
    let (_, state, mut c, mut d) = start(dir.path(), "sensor1", &broker, &body);
    wait_for("the port open", T, || {
        (pipeline(&mut c, "sensor1", "flowers")["state"] == "running").then_some(())
    })
    .unwrap();

    let readings = [
        [5.1, 3.5, 1.4, 0.2],
        [6.4, 3.2, 4.5, 1.5],
        [6.9, 3.1, 5.4, 2.1],
        [4.9, 3.0, 1.4, 0.2],
        [5.7, 2.8, 4.1, 1.3],
        [7.7, 2.6, 6.9, 2.3],
    ];
    let expected: Vec<String> = readings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let f = dir.path().join(format!("r{i}.json"));
            std::fs::write(&f, json!([r]).to_string()).unwrap();
            offline_label("iris-mlp-int8", &f)
        })
        .collect();
    assert!(
        expected.iter().collect::<BTreeSet<_>>().len() == 3,
        "the readings cover all three species: {expected:?}"
    );
    let keys = ["sepal_length", "sepal_width", "petal_length", "petal_width"];
    let line = |i: usize| -> String {
        let r = readings[i];
        if i.is_multiple_of(2) {
            format!("{},{},{},{}\r\n", r[0], r[1], r[2], r[3])
        } else {
            let obj: serde_json::Map<String, Value> = keys
                .iter()
                .zip(r)
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            format!("{}\n", Value::Object(obj))
        }
    };
    let garbage = [
        "iris sensor v1.2 ready\n".to_string(),
        "1,2,3\n".to_string(),
        format!("{}\n", "9".repeat(5000)),
        "{\"sepal_length\": \"wide\"}\n".to_string(),
        "\u{1b}[2J\u{0}\u{7f}\n".to_string(),
    ];
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&writer)
        .unwrap();
    for (i, g) in garbage.iter().take(4).enumerate() {
        w.write_all(g.as_bytes()).unwrap();
        w.write_all(line(i).as_bytes()).unwrap();
    }
    w.write_all(garbage[4].as_bytes()).unwrap();
    w.flush().unwrap();
    wait_rows(&state, "flowers", 4);
    let p = wait_for("garbage counted", T, || {
        let p = pipeline(&mut c, "sensor1", "flowers");
        (p["garbage"] == 5).then_some(p)
    })
    .unwrap();
    assert_eq!(p["results"], 4, "{p}");

    // Unplug: the port's other end goes away; the feed says so and reopens it when it is
    // back.
    drop(w);
    socat.stop();
    let p = wait_for("the feed restarting", T, || {
        let p = pipeline(&mut c, "sensor1", "flowers");
        (p["state"] == "restarting").then_some(p)
    })
    .unwrap();
    assert!(p["reason"].as_str().unwrap().contains("ttyIRIS"), "{p}");
    let _socat = Socat::start(&dev, &writer);
    wait_for("the port open again", T, || {
        (pipeline(&mut c, "sensor1", "flowers")["state"] == "running").then_some(())
    })
    .unwrap();
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&writer)
        .unwrap();
    for i in 4..6 {
        w.write_all(line(i).as_bytes()).unwrap();
    }
    w.flush().unwrap();
    wait_rows(&state, "flowers", 6);
    let labels: Vec<String> = column(
        &state,
        "SELECT label FROM results WHERE pipeline = 'flowers' ORDER BY id",
    );
    assert_eq!(labels, expected);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

#[test]
fn retention_keeps_the_budget_and_capture_export_delivers_every_sample() {
    let Some(broker) = mosquitto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"{models}
[store]
results_budget_mib = 0.01
capture_budget_mib = 0.2

[[feeds]]
kind = "camera"
name = "cam0"
format = "lavfi"
input = "testsrc2=size=32x32:rate=200"
input_args = ["-re"]

[[pipelines]]
name = "cam"
feed = "cam0"
model = "digits-cnn-int8"
# Every frame is captured: the budget, not the score, decides what stays.
capture_below = 2.0
publish = "above"
min_score = 2.0
"#,
        models = digits()
    );
    let (_, state, mut c, mut d) = start(dir.path(), "cam3", &broker, &body);
    wait_for("400 results", T, || {
        (max_id(&state, "cam") >= 400).then_some(())
    })
    .unwrap();
    let r = cmd(&mut c, "cam3", "pipelines.stop", json!({"name": "cam"}));
    assert_eq!(r["result"]["state"], "stopped", "{r}");
    // Retention runs as soon as a table goes over: wait for its round after the last row.
    let budget = (0.01f64 * 1024.0 * 1024.0) as i64;
    let cap_budget = (0.2f64 * 1024.0 * 1024.0) as i64;
    let conn = db(&state).unwrap();
    let totals = |what: &str| -> (i64, i64) {
        conn.query_row(
            "SELECT rows, bytes FROM data_totals WHERE what = ?1",
            [what],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    wait_for("results within budget", T, || {
        (totals("results").1 <= budget && totals("captures").1 <= cap_budget).then_some(())
    })
    .unwrap();
    // The running totals agree with the rows; the oldest rows went, the newest stayed.
    let (rows, bytes): (i64, i64) = conn
        .query_row("SELECT count(*), sum(bytes) FROM results", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((rows, bytes), totals("results"));
    assert!(rows > 10 && rows < 200, "{rows}");
    let (lo, hi): (i64, i64) = conn
        .query_row("SELECT min(id), max(id) FROM results", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert!(lo > 100 && hi >= 400, "{lo}..{hi}");
    let (crows, cbytes): (i64, i64) = conn
        .query_row(
            "SELECT count(*), ifnull(sum(bytes), 0) FROM captures",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((crows, cbytes), totals("captures"));
    assert!(crows >= 5, "{crows}");
    let p = pipeline(&mut c, "cam3", "cam");
    assert!(p["captured"].as_i64().unwrap() > crows, "{p}");
    // publish = above 2.0: nothing went upstream.
    assert_eq!(p["published"], 0, "{p}");
    let ids: BTreeSet<i64> = column(&state, "SELECT id FROM captures")
        .into_iter()
        .collect();

    // Export: every captured sample arrives upstream, in chunks, with its bytes.
    let r = cmd(
        &mut c,
        "cam3",
        "capture.export",
        json!({"pipeline": "cam", "limit": 1000}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["samples"], crows, "{r}");
    let chunks = r["result"]["chunks"].as_u64().unwrap();
    assert!(chunks >= 2, "{r}");
    let mut got = BTreeSet::new();
    for _ in 0..chunks {
        let m = c.recv_on("tern/cam3/capture/cam", T).unwrap().json();
        assert_eq!(m["export"], r["result"]["export"]);
        for s in m["samples"].as_array().unwrap() {
            let data = base64::engine::general_purpose::STANDARD
                .decode(s["data"].as_str().unwrap())
                .unwrap();
            assert_eq!(s["kind"], "frame");
            assert_eq!(data.len(), 32 * 32 * 3, "{}", s["meta"]);
            assert_eq!(s["meta"]["format"], "rgb24");
            assert_eq!(s["result"]["model"], "digits-cnn-int8");
            got.insert(s["id"].as_i64().unwrap());
        }
    }
    assert_eq!(got, ids);
    let r = cmd(
        &mut c,
        "cam3",
        "capture.export",
        json!({"pipeline": "cam", "limit": 0}),
    );
    assert_eq!(r["error"]["code"], "bad_request", "{r}");

    let r = cmd(&mut c, "cam3", "capture.clear", json!({"pipeline": "cam"}));
    assert_eq!(r["result"]["deleted"], crows, "{r}");
    assert_eq!(totals("captures"), (0, 0));
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// The camera demo exactly as shipped, laid out like the repository: one command, results.
#[test]
fn the_camera_demo_runs_as_shipped() {
    if !need("ffmpeg") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    copy_dir(
        &package("digits-cnn-int8"),
        &dir.path().join("firmware-updates/models/digits-cnn-int8"),
    )
    .unwrap();
    let config = configs.join("camera-demo.toml");
    std::fs::copy(root().join("configs/camera-demo.toml"), &config).unwrap();
    let (st, out, err) = ternd(&["check-config", "--config", config.to_str().unwrap()]).unwrap();
    assert!(st.success(), "{out}{err}");
    let state = dir.path().join("var/camera-demo");
    let mut d = Daemon::spawn(&config, None, &[]).unwrap();
    wait_rows(&state, "camera", 3);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    let models: i64 = count(&state, "SELECT count(DISTINCT model) FROM results").unwrap();
    assert_eq!(models, 1);
}

/// A source that sends nothing is a stall: ffmpeg is restarted, and the state and an event
/// say so.
#[test]
fn a_camera_that_sends_nothing_is_restarted_as_stalled() {
    let Some(broker) = mosquitto() else { return };
    let dir = tempfile::tempdir().unwrap();
    // ffmpeg blocks opening a FIFO nobody writes to: no frame ever comes.
    let fifo = dir.path().join("never");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let body = format!(
        r#"{models}
[[feeds]]
kind = "camera"
name = "dead"
format = "rawvideo"
input = "{fifo}"
input_args = ["-pixel_format", "rgb24", "-video_size", "32x32"]
stall_secs = 1

[[pipelines]]
name = "dead"
feed = "dead"
model = "digits-cnn-int8"
"#,
        models = digits(),
        fifo = fifo.display()
    );
    let (_, state, mut c, mut d) = start(dir.path(), "cam4", &broker, &body);
    let ev = c
        .recv_match("feed.restarting", T, |m| {
            m.topic == "tern/cam4/events" && m.json()["event"] == "feed.restarting"
        })
        .unwrap()
        .json();
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("the source stalled"),
        "{ev}"
    );
    let p = wait_for("two more stalls", T, || {
        let p = pipeline(&mut c, "cam4", "dead");
        (p["restarts"].as_u64()? >= 3).then_some(p)
    })
    .unwrap();
    assert_eq!(p["state"], "restarting", "{p}");
    assert_eq!(p["results"], 0, "{p}");
    // One event for the failure, not one per retry: a retry counts its restart before it
    // queues its event, so by the third restart the second one's event would be queued.
    let next = count(
        &state,
        "SELECT next_seq FROM outbox_streams WHERE stream = 'events'",
    )
    .unwrap();
    assert_eq!(next, ev["seq"].as_i64().unwrap() + 1, "{ev}");
    // Each stalled ffmpeg was killed before the next one started.
    assert!(ffmpeg_children(d.pid()).len() <= 1);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// A format 2 model in a pipeline: every output's postprocessed result (here the detector's
/// boxes) is in the MQTT result, the results table and `results.query`.
#[test]
fn a_detector_pipeline_reports_its_boxes_everywhere() {
    let Some(broker) = mosquitto() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("inbox")).unwrap();
    let body = format!(
        r#"[[models]]
package = "{}"

[[feeds]]
kind = "directory"
name = "inbox"
path = "{}"

[[pipelines]]
name = "det"
feed = "inbox"
model = "digits-det-f32"
"#,
        package("digits-det-f32").display(),
        dir.path().join("inbox").display()
    );
    let (_config, state, mut c, _d) = start(dir.path(), "det1", &broker, &body);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(package("testsets/digits-det-boxes.json")).unwrap(),
    )
    .unwrap();
    let canvas = |n: usize| package(&format!("testsets/digits-det/{n:03}.png"));
    std::fs::copy(canvas(0), dir.path().join("inbox/c0.png")).unwrap();
    let msg = c.recv_on("tern/det1/results/det", T).unwrap().json();
    let boxes = msg["outputs"]["detections"]["boxes"].as_array().unwrap();
    let want = reference["f32"][0].as_array().unwrap();
    assert_eq!(boxes.len(), want.len(), "{msg}");
    for (b, w) in boxes.iter().zip(want) {
        assert_eq!(b["class"], w[5], "{msg}");
        assert!(
            (b["x0"].as_f64().unwrap() - w[0].as_f64().unwrap()).abs() < 1e-3,
            "{msg}"
        );
    }
    // Stored with the result, and served by results.query.
    wait_rows(&state, "det", 1);
    let stored: Vec<String> = column(&state, "SELECT outputs FROM results WHERE pipeline = 'det'");
    let stored: Value = serde_json::from_str(&stored[0]).unwrap();
    assert_eq!(stored["detections"], msg["outputs"]["detections"]);
    let r = cmd(&mut c, "det1", "results.query", json!({"since": 0}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["result"]["results"][0]["outputs"]["detections"], msg["outputs"]["detections"],
        "{r}"
    );
}

/// A model with state on readings: each source (an MQTT topic under one wildcard) carries its
/// own stream, window after window, never mixed with another's, and a restarted pipeline
/// starts every stream from the initial state. `running-total` outputs the sum of its
/// stream's readings so far, so each result shows which readings went into its state.
#[test]
fn a_stateful_model_on_readings_keeps_one_stream_per_source() {
    let Some(broker) = mosquitto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"[[models]]
package = "{}"

[[feeds]]
kind = "mqtt"
name = "sensors"
topic = "sensors/+/level"
fields = ["level"]

[[pipelines]]
name = "totals"
feed = "sensors"
model = "running-total"
"#,
        package("running-total").display()
    );
    let (_, state, mut c, _d) = start(dir.path(), "sum1", &broker, &body);
    wait_for("the MQTT feed subscribed", T, || {
        (pipeline(&mut c, "sum1", "totals")["state"] == "running").then_some(())
    })
    .unwrap();
    let totals = |state: &Path| -> Vec<(String, f64)> {
        stored_outputs(state, "totals")
            .into_iter()
            .map(|(src, v)| (src, v["total"]["values"][0].as_f64().unwrap()))
            .collect()
    };
    let send = |c: &Client, topic: &str, level: f64| {
        c.publish(
            topic,
            json!({ "level": level }).to_string().as_bytes(),
            None,
        )
        .unwrap();
    };
    // Interleaved: a's readings 1..5, b's 100..500.
    for i in 1..=5 {
        send(&c, "sensors/a/level", f64::from(i));
        send(&c, "sensors/b/level", f64::from(100 * i));
    }
    let got = wait_for("ten results", T, || {
        let t = totals(&state);
        (t.len() >= 10).then_some(t)
    })
    .unwrap();
    let of = |src: &str, got: &[(String, f64)]| -> Vec<f64> {
        got.iter()
            .filter(|(s, _)| s.contains(src))
            .map(|(_, v)| *v)
            .collect()
    };
    assert_eq!(
        of("sensors/a", &got),
        [1.0, 3.0, 6.0, 10.0, 15.0],
        "{got:?}"
    );
    assert_eq!(
        of("sensors/b", &got),
        [100.0, 300.0, 600.0, 1000.0, 1500.0],
        "{got:?}"
    );

    // A restarted pipeline starts each stream over.
    for name in ["pipelines.stop", "pipelines.start"] {
        let r = cmd(&mut c, "sum1", name, json!({"name": "totals"}));
        assert_eq!(r["ok"], true, "{r}");
    }
    wait_for("the MQTT feed subscribed again", T, || {
        (pipeline(&mut c, "sum1", "totals")["state"] == "running").then_some(())
    })
    .unwrap();
    send(&c, "sensors/a/level", 7.0);
    let got = wait_for("the next result", T, || {
        let t = totals(&state);
        (t.len() >= 11).then_some(t)
    })
    .unwrap();
    assert_eq!(got[10].1, 7.0, "the stream did not start over: {got:?}");
}
