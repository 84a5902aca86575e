//! Drift: a pipeline's answers compared with a baseline, learned from its first results or
//! taken from its package's evaluation set; a shift raises `drift.detected` and starts
//! capture.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tern_tests::mqtt::{Broker, Client};
use tern_tests::updates;
use tern_tests::*;

use crate::fleet::{client, command};

const T: Duration = Duration::from_secs(60);
const DEV: &str = "drift-1";
/// Results in a window: the demo's twelve digits, twice.
const WINDOW: usize = 24;

/// The demo's digit images, in name order.
fn digits() -> Vec<std::path::PathBuf> {
    let inbox = root().join("configs/demo/inbox");
    let mut v: Vec<_> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("digit-")
        })
        .collect();
    v.sort();
    v
}

/// Copy the demo digits into `inbox` as `<tag>-<n>-<name>.png`, `rounds` times, inverted
/// (white digits on black become black on white) if asked.
fn feed(inbox: &Path, tag: &str, rounds: usize, invert: bool) -> usize {
    let mut n = 0;
    for r in 0..rounds {
        for p in digits() {
            let mut img = image::open(&p).unwrap().to_luma8();
            if invert {
                image::imageops::invert(&mut img);
            }
            let stem = p.file_stem().unwrap().to_string_lossy();
            // Written beside, then renamed in: the feed never sees half a file.
            let tmp = inbox.join(format!(".{tag}-{r}-{stem}.png"));
            img.save(&tmp).unwrap();
            std::fs::rename(&tmp, inbox.join(format!("{tag}-{r}-{stem}.png"))).unwrap();
            n += 1;
        }
    }
    n
}

fn results(state: &Path, pipeline: &str) -> i64 {
    count(
        state,
        &format!("SELECT count(*) FROM results WHERE pipeline = '{pipeline}'"),
    )
    .unwrap_or(0)
}

fn wait_results(state: &Path, pipeline: &str, n: i64) {
    wait_for(&format!("{n} results of {pipeline}"), T, || {
        (results(state, pipeline) >= n).then_some(())
    })
    .unwrap();
}

fn event(c: &mut Client, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let topic = format!("tern/{DEV}/events");
    c.recv_match(what, T, |m| m.topic == topic && pred(&m.json()))
        .unwrap()
        .json()
}

/// The drift report of `pipeline` in the box's status.
fn drift_status(c: &mut Client, pipeline: &str, id: &str) -> Value {
    let st = command(c, DEV, "status", &json!({"id": id}));
    st["result"]["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pipeline)
        .unwrap_or_else(|| panic!("{pipeline} in {st}"))["drift"]
        .clone()
}

/// Two pipelines read the demo digits: one learns its baseline from its first results, the
/// other's model carries an evaluation set. The same digits again stay under the threshold;
/// inverted digits raise `drift.detected` within a window, and the low-confidence ones among
/// the inverted are captured from then on. The drift score and state are metrics; a baseline
/// survives a kill -9.
#[test]
fn inverted_digits_raise_drift_within_a_window_and_start_capture() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for d in ["cnn-in", "mlp-in"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let evaluated = updates::variant(
        &package("digits-mlp-int8"),
        &dir.path().join("mlp-evaluated"),
        "digits-mlp-int8",
        "1.0.0",
        |t| t,
    );
    let eval_samples = updates::with_evaluation(&evaluated, "accuracy >= 0.8");
    let port = free_port();
    let config = dir.path().join("ternd.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "state"
[dbus]
bus = "none"
[metrics]
listen = "127.0.0.1:{port}"
[[models]]
package = "{cnn}"
[[models]]
package = "{mlp}"
[[feeds]]
kind = "directory"
name = "cnn-in"
path = "cnn-in"
[[feeds]]
kind = "directory"
name = "mlp-in"
path = "mlp-in"
[[pipelines]]
name = "cnn"
feed = "cnn-in"
model = "digits-cnn-int8"
[pipelines.drift]
window = {WINDOW}
capture_below = 0.9
[[pipelines]]
name = "mlp"
feed = "mlp-in"
model = "digits-mlp-int8"
[pipelines.drift]
window = {WINDOW}
[fleet]
broker = "{url}"
device = "{DEV}"
telemetry_secs = 3600
"#,
            cnn = package("digits-cnn-int8").display(),
            mlp = evaluated.display(),
            url = broker.url(true),
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let (cnn, mlp) = (dir.path().join("cnn-in"), dir.path().join("mlp-in"));
    let mut c = client(
        &broker,
        false,
        "drift-c",
        &[
            &format!("tern/{DEV}/events"),
            &format!("tern/{DEV}/reply/+"),
        ],
    );
    let mut d = Daemon::spawn(&config, None, &[]).unwrap();

    // The first window of the CNN is its baseline; the MLP's comes from its package at once.
    let n = digits().len() as i64;
    feed(&cnn, "a", 2, false);
    feed(&mlp, "a", 2, false);
    let learned = event(&mut c, "the CNN's learned baseline", |e| {
        e["event"] == "drift.baseline" && e["pipeline"] == "cnn"
    });
    assert_eq!(
        (learned["source"].as_str(), learned["results"].as_u64()),
        (Some("first_results"), Some(WINDOW as u64)),
        "{learned}"
    );
    let packaged = event(&mut c, "the MLP's package baseline", |e| {
        e["event"] == "drift.baseline" && e["pipeline"] == "mlp"
    });
    assert_eq!(
        (packaged["source"].as_str(), packaged["results"].as_u64()),
        (Some("package"), Some(eval_samples as u64)),
        "{packaged}"
    );

    // The same digits again: a full window, under the threshold.
    feed(&cnn, "b", 2, false);
    wait_results(&state, "cnn", 4 * n);
    wait_results(&state, "mlp", 2 * n);
    let calm = drift_status(&mut c, "cnn", "s-calm");
    assert_eq!(calm["in_window"], WINDOW, "{calm}");
    assert_eq!(calm["drifting"], false, "{calm}");
    let score = calm["score"].as_f64().unwrap();
    assert!(score < 0.25, "the same digits drift by {score}: {calm}");
    let mlp_calm = drift_status(&mut c, "mlp", "s-mlp-calm");
    assert_eq!(mlp_calm["drifting"], false, "{mlp_calm}");
    assert!(mlp_calm["score"].as_f64().unwrap() < 0.25, "{mlp_calm}");
    let (_, body) = http(port, "GET", "/metrics");
    let m = samples(&body);
    assert_eq!(
        m.get(r#"tern_drift_detected{pipeline="cnn"}"#),
        Some(&0.0),
        "{body}"
    );
    let calm_metric = m[r#"tern_drift_score{pipeline="cnn"}"#];
    assert!(
        (calm_metric - score).abs() < 1e-3,
        "{calm_metric} vs {score}"
    );
    assert_eq!(
        count(&state, "SELECT count(*) FROM captures"),
        Some(0),
        "nothing is captured before drift"
    );

    // Inverted digits: detected before a window of them has passed.
    feed(&cnn, "inv", 2, true);
    feed(&mlp, "inv", 2, true);
    let detected = event(&mut c, "the CNN's drift", |e| {
        e["event"] == "drift.detected" && e["pipeline"] == "cnn"
    });
    let at = results(&state, "cnn");
    assert!(
        at <= 4 * n + WINDOW as i64,
        "detected after {} inverted results: {detected}",
        at - 4 * n
    );
    eprintln!("DETECTED after {} inverted: {detected}", at - 4 * n);
    assert!(detected["score"].as_f64().unwrap() >= 0.25, "{detected}");
    assert_eq!(detected["baseline"], "first_results");
    let mlp_detected = event(&mut c, "the MLP's drift", |e| {
        e["event"] == "drift.detected" && e["pipeline"] == "mlp"
    });
    assert_eq!(mlp_detected["baseline"], "package", "{mlp_detected}");

    // From then on the CNN's unsure inverted digits are captured (the MLP captures nothing:
    // it has no capture_below).
    wait_results(&state, "cnn", 6 * n);
    wait_results(&state, "mlp", 4 * n);
    let captured: Vec<String> = column(&state, "SELECT source FROM captures");
    assert!(!captured.is_empty(), "captures after drift");
    for s in &captured {
        assert!(s.starts_with("inv-"), "captured {s}");
    }
    let confidences: Vec<f64> = column(
        &state,
        "SELECT json_extract(result, '$.top[0].score') FROM captures",
    );
    assert!(confidences.iter().all(|c| *c < 0.9), "{confidences:?}");
    let (_, body) = http(port, "GET", "/metrics");
    let m = samples(&body);
    assert_eq!(
        m.get(r#"tern_drift_detected{pipeline="cnn"}"#),
        Some(&1.0),
        "{body}"
    );
    assert!(m[r#"tern_drift_score{pipeline="cnn"}"#] >= 0.25, "{body}");

    // The baselines are recorded: after a kill -9 neither is made again, and the window fills
    // anew.
    let recorded = |state: &Path| -> Vec<(String, String, i64)> {
        let db = db(state).unwrap();
        let mut q = db
            .prepare("SELECT pipeline, source, ts_ms FROM drift_baselines ORDER BY pipeline")
            .unwrap();
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let before = recorded(&state);
    assert_eq!(
        before
            .iter()
            .map(|(p, s, _)| (p.as_str(), s.as_str()))
            .collect::<Vec<_>>(),
        [("cnn", "first_results"), ("mlp", "package")]
    );
    d.signal("KILL").unwrap();
    d.wait(T).unwrap();
    let _d = Daemon::spawn(&config, None, &[]).unwrap();
    feed(&cnn, "c", 1, false);
    feed(&mlp, "c", 1, false);
    wait_results(&state, "cnn", 7 * n);
    wait_results(&state, "mlp", 5 * n);
    let after = drift_status(&mut c, "cnn", "s-after");
    assert_eq!(after["baseline"], "first_results", "{after}");
    assert_eq!(after["baseline_results"], WINDOW, "{after}");
    assert_eq!(after["learning"], Value::Null, "{after}");
    assert_eq!(after["in_window"], n, "the window fills anew: {after}");
    assert_eq!(recorded(&state), before, "no baseline made again");
}
