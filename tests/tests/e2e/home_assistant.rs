//! Home Assistant MQTT discovery, read back as Home Assistant reads it: every message a
//! subscriber to the discovery prefix and the box's topics receives goes through Home
//! Assistant's own discovery schemas and template engine (`tests/home-assistant/check.py`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tern_tests::mqtt::{Broker, Client, ClientOptions, Msg};
use tern_tests::updates;
use tern_tests::*;

const T: Duration = Duration::from_secs(60);
const PREFIX: &str = "ha-test";

/// The first message in `log` for which `pred` holds, else receive into `log` until one comes.
fn until(c: &mut Client, log: &mut Vec<Msg>, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
    if let Some(m) = log.iter().find(|m| pred(m)) {
        return m.clone();
    }
    loop {
        let m = next(c, log, what);
        if pred(&m) {
            return m;
        }
    }
}

/// The next message, received into `log`.
fn next(c: &mut Client, log: &mut Vec<Msg>, what: &str) -> Msg {
    let Some(m) = c.recv_any(T) else {
        let last: Vec<String> = log.iter().rev().take(5).map(|m| m.topic.clone()).collect();
        panic!("timed out waiting for {what}; last topics: {last:?}");
    };
    log.push(m.clone());
    m
}

/// What Home Assistant's entities show after these messages, by discovery topic; fails on
/// anything Home Assistant's code would have logged as a warning or error.
fn home_assistant_reads(python: &Path, log: &[Msg]) -> serde_json::Map<String, Value> {
    let messages: Vec<(String, String)> = log
        .iter()
        .map(|m| {
            (
                m.topic.clone(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect();
    let mut child = Command::new(python)
        .arg(root().join("tests/home-assistant/check.py"))
        .arg(PREFIX)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&messages).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "check.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read["log"], json!([]), "Home Assistant's log");
    match &read["entities"] {
        Value::Object(m) => m.clone(),
        v => panic!("check.py printed {v}"),
    }
}

fn config_topic(component: &str, object: &str) -> String {
    format!("{PREFIX}/{component}/tern_ha-1/{object}/config")
}

/// Each pipeline's latest label and score, each configured class and thresholded score as
/// on/off, each model's version, all unavailable once the box is killed; a pipeline removed
/// from the config takes its entities with it after a restart.
#[test]
fn home_assistant_sees_pipelines_events_models_and_the_box_going_offline() {
    let Some(python) = home_assistant_python() else {
        return;
    };
    let Some(packages) = third_party() else {
        return;
    };
    if !need("ffmpeg") {
        return;
    }
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for d in ["digits-in", "det-in"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(package("testsets/digits-det-boxes.json")).unwrap(),
    )
    .unwrap();
    // The canvas's boxes: [x0, y0, x1, y1, score, class]; the best one is the sensor's label.
    let want = reference["f32"][0].as_array().unwrap();
    let best = want
        .iter()
        .max_by(|a, b| a[4].as_f64().unwrap().total_cmp(&b[4].as_f64().unwrap()))
        .unwrap()[5]
        .to_string();
    let present = want[0][5].to_string();
    let absent = (0..10u64)
        .find(|c| want.iter().all(|w| w[5].as_u64() != Some(*c)))
        .expect("a digit the canvas does not hold");
    let pipelines = r#"
[[pipelines]]
name = "digits"
feed = "digits-in"
model = "digits-cnn-int8"

[[pipelines]]
name = "voice"
feed = "mic"
model = "silero-vad"
"#;
    let det = r#"
[[pipelines]]
name = "det"
feed = "det-in"
model = "digits-det-f32"
"#;
    let key = updates::key();
    let config = |with_det: bool| {
        format!(
            r#"state_dir = "state"
[dbus]
bus = "none"
[[models]]
package = "{cnn}"
[[models]]
package = "{det_pkg}"
[[models]]
package = "{vad}"
[[feeds]]
kind = "directory"
name = "digits-in"
path = "digits-in"
[[feeds]]
kind = "directory"
name = "det-in"
path = "det-in"
[[feeds]]
kind = "audio"
name = "mic"
input = "{wav}"
# At its own pace: the speech (from 1 s in) comes after the entities' discovery.
input_args = ["-re"]
{pipelines}{det}
[updates]
keys = ["{public}"]
health_window_secs = 1
[fleet]
broker = "{url}"
device = "ha-1"
telemetry_secs = 3600
[home_assistant]
discovery_prefix = "{PREFIX}"
[home_assistant.classes]
digits = ["7", "1"]
{det_classes}
"#,
            cnn = package("digits-cnn-int8").display(),
            det_pkg = package("digits-det-f32").display(),
            vad = packages.join("silero-vad").display(),
            wav = packages.join("../testdata/speech.wav").display(),
            url = broker.url(true),
            public = key.public().to_base64(),
            det = if with_det { det } else { "" },
            det_classes = if with_det {
                format!("det = [\"{present}\", \"{absent}\"]")
            } else {
                String::new()
            },
        )
    };
    let path = dir.path().join("ternd.toml");
    std::fs::write(&path, config(true)).unwrap();
    let mut c = Client::connect(
        &broker,
        ClientOptions {
            v5: true,
            id: "ha-watcher",
            subscribe: &[&format!("{PREFIX}/#"), "tern/ha-1/#"],
            persistent: false,
        },
    )
    .unwrap();
    let mut log = Vec::new();
    let mut d = Daemon::spawn(&path, None, &[]).unwrap();

    let expected: BTreeSet<String> = [
        ("sensor", "result_digits"),
        ("binary_sensor", "class_digits_7"),
        ("binary_sensor", "class_digits_1"),
        ("sensor", "result_voice"),
        ("binary_sensor", "score_voice_output"),
        ("sensor", "result_det"),
        ("binary_sensor", &format!("class_det_{present}")),
        ("binary_sensor", &format!("class_det_{absent}")),
        ("update", "model_digits-cnn-int8"),
        ("sensor", "update_digits-cnn-int8"),
        ("update", "model_digits-det-f32"),
        ("sensor", "update_digits-det-f32"),
        ("update", "model_silero-vad"),
        ("sensor", "update_silero-vad"),
    ]
    .iter()
    .map(|(c, o)| config_topic(c, o))
    .collect();
    let announced = |log: &[Msg]| -> BTreeSet<String> {
        let mut on = BTreeSet::new();
        for m in log.iter().filter(|m| m.topic.starts_with(PREFIX)) {
            if m.payload.is_empty() {
                on.remove(&m.topic);
            } else {
                on.insert(m.topic.clone());
            }
        }
        on
    };
    while announced(&log) != expected {
        let have = announced(&log);
        assert!(
            have.is_subset(&expected),
            "unexpected entities: {:?}",
            have.difference(&expected)
        );
        next(&mut c, &mut log, "every discovery message");
    }
    let sent: Vec<&Msg> = log.iter().filter(|m| m.topic.starts_with(PREFIX)).collect();
    let bytes: usize = sent.iter().map(|m| m.topic.len() + m.payload.len()).sum();
    eprintln!(
        "discovery: {} messages, {bytes} bytes (topics and payloads)",
        sent.len()
    );

    std::fs::copy(
        root().join("configs/demo/inbox/digit-7.png"),
        dir.path().join("digits-in/d7.png"),
    )
    .unwrap();
    std::fs::copy(
        package("testsets/digits-det/000.png"),
        dir.path().join("det-in/c0.png"),
    )
    .unwrap();
    let digit = until(&mut c, &mut log, "the digit's result", |m| {
        m.topic == "tern/ha-1/results/digits"
    })
    .json();
    until(&mut c, &mut log, "the canvas's result", |m| {
        m.topic == "tern/ha-1/results/det"
    });
    // Speech starts and stops in the recording: both flips reach the broker.
    let voice = |on: bool| {
        move |m: &Msg| {
            m.topic == "tern/ha-1/results/voice" && m.json()["outputs"]["output"]["on"] == on
        }
    };
    until(&mut c, &mut log, "speech", voice(true));
    until(&mut c, &mut log, "silence after speech", voice(false));

    // An update of the classifier: the update entity sees it coming, then installed.
    let newer = updates::variant(
        &package("digits-cnn-int8"),
        &dir.path().join("cnn-1.1.0"),
        "digits-cnn-int8",
        "1.1.0",
        |t| t,
    );
    updates::build(&newer, 64 * 1024, &[&key], |_| {}).publish(
        &mut c,
        "tern/ha-1/update/digits-cnn-int8",
        &format!("{PREFIX}/sync"),
    );
    until(&mut c, &mut log, "the update's commit", |m| {
        m.topic == "tern/ha-1/updates/digits-cnn-int8" && m.json()["state"] == "committed"
    });
    until(&mut c, &mut log, "a birth naming the new version", |m| {
        m.topic == "tern/ha-1/state"
            && m.json()["models"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["version"] == "1.1.0"))
    });
    // A version its evaluation refuses: on its way in, then not the latest any more.
    let refused = updates::variant(
        &package("digits-cnn-int8"),
        &dir.path().join("cnn-1.2.0"),
        "digits-cnn-int8",
        "1.2.0",
        |t| t,
    );
    updates::with_evaluation(&refused, "accuracy >= 1.0");
    updates::build(&refused, 64 * 1024, &[&key], |_| {}).publish(
        &mut c,
        "tern/ha-1/update/digits-cnn-int8",
        &format!("{PREFIX}/sync"),
    );
    let failed = until(&mut c, &mut log, "the refused update's failure", |m| {
        m.topic == "tern/ha-1/updates/digits-cnn-int8" && m.json()["state"] == "failed"
    })
    .json();
    assert_eq!(failed["code"], "evaluation", "{failed}");
    d.signal("KILL").unwrap();
    d.wait(T).unwrap();
    until(&mut c, &mut log, "the last will", |m| {
        m.topic == "tern/ha-1/state" && m.json()["state"] == "offline"
    });

    let read = home_assistant_reads(&python, &log);
    assert_eq!(read.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (topic, e) in &read {
        assert_eq!(e["valid"], true, "{topic}: {e}");
        assert_eq!(e["errors"], serde_json::json!([]), "{topic}: {e}");
        // Available while the box was up; unavailable only once it was gone.
        assert_eq!(
            e["available"],
            serde_json::json!([true, false]),
            "{topic}: {e}"
        );
    }
    let entity = |component: &str, object: &str| &read[&config_topic(component, object)];
    let states = |component: &str, object: &str| entity(component, object)["states"].clone();
    assert_eq!(states("sensor", "result_digits"), serde_json::json!(["7"]));
    assert_eq!(
        entity("sensor", "result_digits")["attributes"]["score"],
        digit["top"][0]["score"],
        "the score comes with the label"
    );
    assert_eq!(
        states("binary_sensor", "class_digits_7"),
        serde_json::json!(["on"])
    );
    assert_eq!(
        states("binary_sensor", "class_digits_1"),
        serde_json::json!(["off"])
    );
    assert_eq!(states("sensor", "result_det"), serde_json::json!([best]));
    assert_eq!(
        states("binary_sensor", &format!("class_det_{present}")),
        serde_json::json!(["on"])
    );
    assert_eq!(
        states("binary_sensor", &format!("class_det_{absent}")),
        serde_json::json!(["off"])
    );
    let voice = states("binary_sensor", "score_voice_output");
    assert_eq!(voice[0], "on", "{voice}");
    assert_eq!(voice[1], "off", "{voice}");
    assert_eq!(
        states("update", "model_digits-cnn-int8"),
        serde_json::json!([
            {"installed": "1.0.0", "latest": "1.0.0", "state": "off"},
            {"installed": "1.0.0", "latest": "1.1.0", "state": "on"},
            {"installed": "1.1.0", "latest": "1.1.0", "state": "off"},
            {"installed": "1.1.0", "latest": "1.2.0", "state": "on"},
            {"installed": "1.1.0", "latest": "1.1.0", "state": "off"},
        ])
    );
    let steps = states("sensor", "update_digits-cnn-int8");
    let steps: Vec<&str> = steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let committed = steps.iter().position(|s| *s == "committed").unwrap();
    assert_eq!(
        (steps[0], steps[committed + 1], *steps.last().unwrap()),
        ("downloading", "downloading", "failed"),
        "{steps:?}"
    );
    let said = &entity("sensor", "update_digits-cnn-int8")["attributes"];
    assert_eq!(
        (&said["version"], &said["code"]),
        (&json!("1.2.0"), &json!("evaluation"))
    );
    for m in ["digits-det-f32", "silero-vad"] {
        let version = std::fs::read_to_string(
            if m == "silero-vad" {
                packages.join(m)
            } else {
                package(m)
            }
            .join("tern-model.toml"),
        )
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("version = \"")
                .map(|v| v.trim_end_matches('"').to_string())
        })
        .unwrap();
        assert_eq!(
            states("update", &format!("model_{m}")),
            serde_json::json!([{"installed": version, "latest": version, "state": "off"}]),
            "{m}"
        );
    }

    // Without the detector's pipeline, its entities are cleared (empty retained) after the
    // restart; everything else is announced again.
    std::fs::write(&path, config(false)).unwrap();
    let _d = Daemon::spawn(&path, None, &[]).unwrap();
    let gone: BTreeSet<String> = [
        config_topic("sensor", "result_det"),
        config_topic("binary_sensor", &format!("class_det_{present}")),
        config_topic("binary_sensor", &format!("class_det_{absent}")),
    ]
    .into_iter()
    .collect();
    let left: BTreeSet<String> = expected.difference(&gone).cloned().collect();
    let mut after = Vec::new();
    loop {
        let m = next(&mut c, &mut after, "the removed pipeline's clears");
        let cleared: BTreeSet<String> = after
            .iter()
            .filter(|m| m.payload.is_empty())
            .map(|m| m.topic.clone())
            .collect();
        assert!(cleared.is_subset(&gone), "{} cleared", m.topic);
        if cleared == gone {
            break;
        }
    }
    let mut fresh = Client::connect(
        &broker,
        ClientOptions {
            v5: false,
            id: "ha-late",
            subscribe: &[&format!("{PREFIX}/#")],
            persistent: false,
        },
    )
    .unwrap();
    let mut retained = Vec::new();
    fresh.sync(&format!("{PREFIX}/sync")).unwrap();
    retained.extend(fresh.drain());
    let topics: BTreeSet<String> = retained
        .iter()
        .filter(|m| m.retain)
        .map(|m| m.topic.clone())
        .collect();
    assert_eq!(
        topics, left,
        "a newcomer finds only the entities the box has"
    );

    // Read by Home Assistant from the start: the removed entities are gone, and the others
    // came back.
    until(&mut c, &mut after, "the box back online", |m| {
        m.topic == "tern/ha-1/state" && m.json()["state"] == "online"
    });
    log.extend(after);
    let read = home_assistant_reads(&python, &log);
    for (topic, e) in &read {
        if gone.contains(topic) {
            assert_eq!(e["removed"], true, "{topic}: {e}");
        } else {
            assert_eq!(e["available"], json!([true, false, true]), "{topic}: {e}");
        }
    }
}
