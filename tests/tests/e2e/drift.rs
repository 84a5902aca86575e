//! Drift: a pipeline's answers compared with a baseline, learned from its first results or
//! taken from its package's evaluation set; a shift raises `drift.detected` and starts
//! capture.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tern_tests::mqtt::{Broker, Client};
use tern_tests::updates;
use tern_tests::*;

use crate::feeds::wait_rows;
use crate::fleet::{client, command};

const T: Duration = Duration::from_secs(60);
const DEV: &str = "drift-1";
/// Results in a window, and in a learned baseline.
const WINDOW: usize = 100;

/// The digits test set shipped with the models (360 8x8 gray images, white on black, and
/// their labels), which neither model was trained on.
pub(crate) fn test_set() -> Vec<(image::GrayImage, String)> {
    let read = |name: &str| {
        ternd::engine::read_npy(&std::fs::read(package(&format!("testsets/{name}"))).unwrap())
            .unwrap()
    };
    let (pixels, labels) = (
        read("digits-test-pixels.npy"),
        read("digits-test-labels.npy"),
    );
    let (ternd::engine::Data::U8(p), ternd::engine::Data::I64(l)) = (pixels.data, labels.data)
    else {
        panic!("the digits test set is u8 pixels and i64 labels")
    };
    p.chunks(64)
        .zip(l)
        .map(|(px, label)| {
            let img = image::GrayImage::from_raw(8, 8, px.to_vec()).unwrap();
            (img, label.to_string())
        })
        .collect()
}

/// Write `images` into `dir` as `<tag>-<i>.png`, inverted (black digits on white) if asked;
/// each written beside and renamed in, so a feed never sees half a file.
pub(crate) fn feed(
    dir: &Path,
    tag: &str,
    images: &[(image::GrayImage, String)],
    invert: bool,
) -> usize {
    for (i, (img, _)) in images.iter().enumerate() {
        let mut img = img.clone();
        if invert {
            image::imageops::invert(&mut img);
        }
        let tmp = dir.join(format!(".{tag}-{i:03}.png"));
        img.save(&tmp).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{tag}-{i:03}.png"))).unwrap();
    }
    images.len()
}

/// Give `pkg` an evaluation set of `images` with their labels.
fn evaluated(pkg: &Path, images: &[(image::GrayImage, String)]) {
    let eval = pkg.join("eval");
    std::fs::create_dir_all(&eval).unwrap();
    feed(&eval, "e", images, false);
    let mut toml = String::from("\n[evaluation]\nrule = \"accuracy >= 0.8\"\n");
    for (i, (_, label)) in images.iter().enumerate() {
        toml += &format!(
            "[[evaluation.samples]]\ninput = \"eval/e-{i:03}.png\"\nlabel = \"{label}\"\n"
        );
    }
    let m = pkg.join("tern-model.toml");
    let text = std::fs::read_to_string(&m).unwrap() + &toml;
    std::fs::write(&m, text).unwrap();
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

/// Two pipelines read the digits test set: one learns its baseline from its first results,
/// the other's model carries 200 of the digits as its evaluation set. Other digits of the same
/// set stay under the threshold; inverted digits raise `drift.detected` within a window, and
/// the unsure ones among them are captured from then on, until digits as before clear it. The
/// drift score and state are metrics; the baselines survive a kill -9.
#[test]
fn inverted_digits_raise_drift_within_a_window_and_start_capture() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let set = test_set();
    assert_eq!(set.len(), 360);
    let dir = tempfile::tempdir().unwrap();
    for d in ["cnn-in", "mlp-in"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let mlp_pkg = updates::variant(
        &package("digits-mlp-int8"),
        &dir.path().join("mlp-evaluated"),
        "digits-mlp-int8",
        "1.0.0",
        |t| t,
    );
    evaluated(&mlp_pkg, &set[..200]);
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
            mlp = mlp_pkg.display(),
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
    let w = WINDOW as i64;

    // The CNN's first window is its baseline; the MLP's comes from its package at once.
    feed(&cnn, "a", &set[..WINDOW], false);
    feed(&mlp, "a", &set[200..], false);
    let learned = event(&mut c, "the CNN's learned baseline", |e| {
        e["event"] == "drift.baseline" && e["pipeline"] == "cnn"
    });
    assert_eq!(
        (learned["source"].as_str(), learned["results"].as_i64()),
        (Some("first_results"), Some(w)),
        "{learned}"
    );
    let packaged = event(&mut c, "the MLP's package baseline", |e| {
        e["event"] == "drift.baseline" && e["pipeline"] == "mlp"
    });
    assert_eq!(
        (packaged["source"].as_str(), packaged["results"].as_i64()),
        (Some("package"), Some(200)),
        "{packaged}"
    );

    // Other digits of the same set: a full window each, under the threshold.
    feed(&cnn, "b", &set[WINDOW..2 * WINDOW], false);
    wait_rows(&state, "cnn", 2 * w);
    wait_rows(&state, "mlp", 160);
    for (p, id) in [("cnn", "s-calm"), ("mlp", "s-mlp-calm")] {
        let calm = drift_status(&mut c, p, id);
        assert_eq!(
            (calm["in_window"].as_i64(), &calm["drifting"]),
            (Some(w), &json!(false)),
            "{calm}"
        );
        let score = calm["score"].as_f64().unwrap();
        assert!(score < 0.25, "{p}: the same set drifts by {score}: {calm}");
    }
    let calm = drift_status(&mut c, "cnn", "s-calm-2");
    let (_, body) = http(port, "GET", "/metrics");
    let m = samples(&body);
    assert_eq!(
        m.get(r#"tern_drift_detected{pipeline="cnn"}"#),
        Some(&0.0),
        "{body}"
    );
    let calm_metric = m[r#"tern_drift_score{pipeline="cnn"}"#];
    let calm_score = calm["score"].as_f64().unwrap();
    assert!(
        (calm_metric - calm_score).abs() < 1e-3,
        "{calm_metric} vs {calm_score}"
    );
    assert_eq!(
        count(&state, "SELECT count(*) FROM captures"),
        Some(0),
        "nothing captured before drift"
    );

    // Inverted digits, more than a window of them: detected within one window.
    feed(&cnn, "inv", &set[200..], true);
    feed(&mlp, "inv", &set[..160], true);
    let detected = event(&mut c, "the CNN's drift", |e| {
        e["event"] == "drift.detected" && e["pipeline"] == "cnn"
    });
    let inverted_seen = detected["seen"].as_i64().unwrap() - w;
    eprintln!("drift detected after {inverted_seen} inverted digits: {detected}");
    assert!(0 < inverted_seen && inverted_seen <= w, "{detected}");
    assert!(detected["score"].as_f64().unwrap() >= 0.25, "{detected}");
    assert_eq!(detected["baseline"], "first_results");
    let mlp_detected = event(&mut c, "the MLP's drift", |e| {
        e["event"] == "drift.detected" && e["pipeline"] == "mlp"
    });
    assert_eq!(mlp_detected["baseline"], "package", "{mlp_detected}");
    assert!(
        mlp_detected["seen"].as_i64().unwrap() - 160 <= w,
        "{mlp_detected}"
    );

    // From then on the CNN's unsure inverted digits are captured (the MLP has no
    // capture_below: nothing of it).
    wait_rows(&state, "cnn", 2 * w + 160);
    wait_rows(&state, "mlp", 320);
    let captured: Vec<(String, String)> =
        column::<String>(&state, "SELECT pipeline || ' ' || source FROM captures")
            .into_iter()
            .map(|s| {
                let (p, f) = s.split_once(' ').unwrap();
                (p.to_string(), f.to_string())
            })
            .collect();
    assert!(!captured.is_empty(), "captures after drift");
    for (p, f) in &captured {
        assert_eq!(p, "cnn");
        assert!(f.starts_with("inv-"), "captured {f}");
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

    // Digits as before, more than a window: cleared, and capture stops.
    feed(&cnn, "back", &set[..2 * WINDOW], false);
    let cleared = event(&mut c, "the CNN's drift cleared", |e| {
        e["event"] == "drift.cleared" && e["pipeline"] == "cnn"
    });
    assert!(cleared["score"].as_f64().unwrap() < 0.25 * 0.8, "{cleared}");
    wait_rows(&state, "cnn", 4 * w + 160);
    // The result that cleared it was the k-th of these (the folder is read in name order);
    // none after it was captured.
    let k = cleared["seen"].as_i64().unwrap() - w - 160;
    assert!(0 < k && k <= 2 * w, "{cleared}");
    let back: Vec<String> = column(
        &state,
        "SELECT source FROM captures WHERE source LIKE 'back-%' ORDER BY source",
    );
    for f in &back {
        let i: i64 = f["back-".len().."back-".len() + 3].parse().unwrap();
        assert!(i < k, "{f} captured after the drift cleared at the {k}th");
    }

    // The baselines are recorded, one per pipeline and version: after a kill -9 neither is
    // made again, and the window fills anew.
    let recorded = |state: &Path| -> Vec<(String, String, String, i64)> {
        let db = db(state).unwrap();
        let mut q = db
            .prepare(
                "SELECT pipeline, version, source, ts_ms FROM drift_baselines ORDER BY pipeline",
            )
            .unwrap();
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let before = recorded(&state);
    assert_eq!(
        before
            .iter()
            .map(|(p, v, s, _)| (p.as_str(), v.as_str(), s.as_str()))
            .collect::<Vec<_>>(),
        [
            ("cnn", "1.0.0", "first_results"),
            ("mlp", "1.0.0", "package")
        ]
    );
    d.signal("KILL").unwrap();
    d.wait(T).unwrap();
    let _d = Daemon::spawn(&config, None, &[]).unwrap();
    feed(&cnn, "c", &set[..10], false);
    wait_rows(&state, "cnn", 4 * w + 170);
    let after = drift_status(&mut c, "cnn", "s-after");
    assert_eq!(after["baseline"], "first_results", "{after}");
    assert_eq!(after["baseline_results"], w, "{after}");
    assert_eq!(after["learning"], Value::Null, "{after}");
    assert_eq!(after["in_window"], 10, "the window fills anew: {after}");
    assert_eq!(recorded(&state), before, "no baseline made again");
}
