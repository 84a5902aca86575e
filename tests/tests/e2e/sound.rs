//! Sound as a stream with state: espeak-ng speech between silences, fed to Silero VAD through
//! a pseudo-terminal as s16le PCM, through ffmpeg playing a WAV at its own pace, and as two
//! sources on one MQTT wildcard; speech start and stop come out as events timed by the
//! samples.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tern_tests::mqtt::Broker;
use tern_tests::*;

use crate::feeds::{Socat, start};

const T: Duration = Duration::from_secs(60);
const RATE: usize = 16_000;
/// How far an event may be from the speech's edge in the samples.
const WITHIN_S: f64 = 0.1;

/// One phrase spoken by espeak-ng, at the model's rate, mono.
fn speak(dir: &Path, i: usize, text: &str) -> Vec<i16> {
    let wav = dir.join(format!("u{i}.wav"));
    let raw = dir.join(format!("u{i}.s16le"));
    let ok = Command::new("espeak-ng")
        .arg("-w")
        .arg(&wav)
        .arg(text)
        .status()
        .unwrap();
    assert!(ok.success());
    let ok = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-i"])
        .arg(&wav)
        .args(["-ac", "1", "-ar", &RATE.to_string(), "-f", "s16le"])
        .arg(&raw)
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::read(&raw)
        .unwrap()
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Phrases between silences (seconds before each): the samples, and where the speech is
/// (from its first to its last sample louder than 2% of full scale).
fn speech(dir: &Path, phrases: &[(f64, &str)], tail_s: f64) -> (Vec<i16>, Vec<(f64, f64)>) {
    let mut out = Vec::new();
    let mut truth = Vec::new();
    for (i, (silence, text)) in phrases.iter().enumerate() {
        out.extend(std::iter::repeat_n(0i16, (silence * RATE as f64) as usize));
        let u = speak(dir, i, text);
        let loud: Vec<usize> = (0..u.len())
            .filter(|&k| i32::from(u[k]).abs() > 655)
            .collect();
        let at = |k: usize| (out.len() + k) as f64 / RATE as f64;
        truth.push((at(loud[0]), at(*loud.last().unwrap())));
        out.extend(u);
    }
    out.extend(std::iter::repeat_n(0i16, (tail_s * RATE as f64) as usize));
    (out, truth)
}

fn bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// The score events of `source` on the box's events topic, once `n` have come.
fn events(c: &mut tern_tests::mqtt::Client, device: &str, source: &str, n: usize) -> Vec<Value> {
    let topic = format!("tern/{device}/events");
    let mut got = Vec::new();
    while got.len() < n {
        let m = c
            .recv_match(&format!("{n} score events of {source}"), T, |m| {
                m.topic == topic
                    && m.json()["source"] == source
                    && m.json()["event"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("score."))
            })
            .unwrap();
        got.push(m.json());
    }
    got
}

/// Each utterance a start and a stop, in order, each within [`WITHIN_S`] of the speech's
/// edges in the samples.
fn assert_heard(source: &str, got: &[Value], truth: &[(f64, f64)]) {
    let said: Vec<(String, f64)> = got
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["start_s"].as_f64().unwrap(),
            )
        })
        .collect();
    eprintln!("{source}: events {said:?}, speech {truth:?}");
    assert_eq!(said.len(), 2 * truth.len(), "{source}: {said:?}");
    for (k, (from, to)) in truth.iter().enumerate() {
        let (start, stop) = (&said[2 * k], &said[2 * k + 1]);
        assert_eq!(
            (start.0.as_str(), stop.0.as_str()),
            ("score.start", "score.stop")
        );
        assert!(
            (start.1 - from).abs() <= WITHIN_S,
            "{source}: speech {k} starts at {from:.3} s, heard at {:.3} s",
            start.1
        );
        assert!(
            (stop.1 - to).abs() <= WITHIN_S,
            "{source}: speech {k} ends at {to:.3} s, heard to stop at {:.3} s",
            stop.1
        );
    }
    for e in got {
        assert_eq!(e["output"], "output");
        assert!(e["ts_ms"].as_i64().unwrap() > 0);
    }
}

#[test]
fn voice_activity_from_a_serial_port_ffmpeg_and_two_mqtt_sources_is_timed_by_the_samples() {
    if !need("espeak-ng") || !need("ffmpeg") || !need("socat") {
        return;
    }
    let Some(packages) = third_party() else {
        return;
    };
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, truth_a) = speech(
        dir.path(),
        &[
            (1.0, "The meter reads forty two"),
            (1.5, "Open the north gate"),
            (1.5, "Temperature is rising quickly"),
        ],
        1.5,
    );
    let (b, truth_b) = speech(
        dir.path(),
        &[(2.5, "Hello from the second microphone"), (2.0, "Stop")],
        1.5,
    );
    let wav = dir.path().join("a.wav");
    let ok = Command::new("ffmpeg")
        .args([
            "-loglevel",
            "error",
            "-y",
            "-f",
            "s16le",
            "-ar",
            "16000",
            "-ac",
            "1",
        ])
        .args(["-i", "pipe:0"])
        .arg(&wav)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(&bytes(&a))?;
            c.wait()
        })
        .unwrap();
    assert!(ok.success());

    let dev = dir.path().join("ttyMIC");
    let writer = dir.path().join("ttyWRITER");
    let _socat = Socat::start(&dev, &writer);
    let body = format!(
        r#"[[models]]
package = "{pkg}"
queue = 16

[[feeds]]
kind = "serial"
name = "tty"
path = "{dev}"
baud = 921600
format = "s16le"
sample_rate = 16000

[[feeds]]
kind = "audio"
name = "mic"
input = "{wav}"
input_args = ["-re"]

[[feeds]]
kind = "mqtt"
name = "site"
topic = "site/audio/+"
format = "s16le"
sample_rate = 16000

[[pipelines]]
name = "vad-tty"
feed = "tty"
model = "silero-vad"

[[pipelines]]
name = "vad-mic"
feed = "mic"
model = "silero-vad"

[[pipelines]]
name = "vad-site"
feed = "site"
model = "silero-vad"
"#,
        pkg = packages.join("silero-vad").display(),
        dev = dev.display(),
        wav = wav.display(),
    );
    let (_config, state, mut c, mut d) = start(dir.path(), "ears1", &broker, &body);
    let running = |c: &mut tern_tests::mqtt::Client, name: &str| {
        let r = crate::feeds::cmd(c, "ears1", "pipelines.list", Value::Null);
        r["result"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == name && p["state"] == "running")
    };
    wait_for("the serial port and the MQTT feed open", T, || {
        (running(&mut c, "vad-tty") && running(&mut c, "vad-site")).then_some(())
    })
    .unwrap();

    // The port: all at once (the pty paces it). MQTT: two sources' pieces interleaved, so a
    // stream shared between them would mix their states.
    let mut port = std::fs::OpenOptions::new()
        .write(true)
        .open(&writer)
        .unwrap();
    port.write_all(&bytes(&a)).unwrap();
    let piece = 1600;
    let (pa, pb) = (
        a.chunks(piece).collect::<Vec<_>>(),
        b.chunks(piece).collect::<Vec<_>>(),
    );
    for k in 0..pa.len().max(pb.len()) {
        if let Some(p) = pa.get(k) {
            c.publish("site/audio/a", &bytes(p), None).unwrap();
        }
        if let Some(p) = pb.get(k) {
            c.publish("site/audio/b", &bytes(p), None).unwrap();
        }
    }

    let alone = events(&mut c, "ears1", "tty", 6);
    assert_heard("tty", &alone, &truth_a);
    let mixed = events(&mut c, "ears1", "site/audio/a", 6);
    assert_heard("site/audio/a", &mixed, &truth_a);
    // The same sound alone on the port and interleaved with another source: the same events.
    let when = |v: &[Value]| -> Vec<(Value, Value)> {
        v.iter()
            .map(|e| (e["event"].clone(), e["start_s"].clone()))
            .collect()
    };
    assert_eq!(when(&mixed), when(&alone));
    assert_heard(
        "site/audio/b",
        &events(&mut c, "ears1", "site/audio/b", 4),
        &truth_b,
    );
    // ffmpeg plays the WAV in real time: its events come last.
    assert_heard("mic", &events(&mut c, "ears1", "mic", 6), &truth_a);

    // The flips are the pipelines' results: stored, with the samples' time.
    let stored = count(
        &state,
        "SELECT count(*) FROM results WHERE pipeline = 'vad-site' AND source = 'site/audio/b'",
    )
    .unwrap();
    assert_eq!(stored, 4);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// A shipped demo laid out like the repository: `configs/<name>.toml` copied, and the fetch
/// script's link from `tests/models/third-party` to its cache. The folder and the config.
pub(crate) fn demo_as_shipped(name: &str, packages: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    let models = dir.path().join("tests/models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(packages.parent().unwrap(), models.join("third-party")).unwrap();
    let config = configs.join(format!("{name}.toml"));
    std::fs::copy(root().join(format!("configs/{name}.toml")), &config).unwrap();
    (dir, config)
}

/// The voice demo exactly as shipped, laid out like the repository (the fetch script's link
/// to its cache included): speech start and stop stored, where `speech.json` says the speech is.
#[test]
fn the_voice_demo_runs_as_shipped() {
    if !need("ffmpeg") {
        return;
    }
    let Some(packages) = third_party() else {
        return;
    };
    let (dir, config) = demo_as_shipped("vad-demo", &packages);
    let (st, out, err) = ternd(&["check-config", "--config", config.to_str().unwrap()]).unwrap();
    assert!(st.success(), "{out}{err}");
    let truth: Value =
        serde_json::from_slice(&std::fs::read(packages.join("../testdata/speech.json")).unwrap())
            .unwrap();
    let (from, to) = (
        truth["speech"][0][0].as_f64().unwrap(),
        truth["speech"][0][1].as_f64().unwrap(),
    );
    let state = dir.path().join("var/vad-demo");
    let mut d = Daemon::spawn_in(&config, Some(dir.path()), None, &[]).unwrap();
    let sql = "SELECT count(*) FROM results WHERE pipeline = 'voice'";
    wait_for("a start and a stop stored", T, || {
        (count(&state, sql)? >= 2).then_some(())
    })
    .unwrap();
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    let c = db(&state).unwrap();
    let mut s = c
        .prepare("SELECT outputs, ts_ms FROM results WHERE pipeline = 'voice' ORDER BY id LIMIT 2")
        .unwrap();
    let rows: Vec<(String, i64)> = s
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let event = |o: &str| -> String {
        let v: Value = serde_json::from_str(o).unwrap();
        v["output"]["event"].as_str().unwrap().to_string()
    };
    assert_eq!(
        (event(&rows[0].0), event(&rows[1].0)),
        ("start".into(), "stop".into())
    );
    // Their times are the samples': as far apart as the speech lasts.
    let lasted = (rows[1].1 - rows[0].1) as f64 / 1000.0;
    assert!(
        (lasted - (to - from)).abs() <= 2.0 * WITHIN_S,
        "speech of {:.3} s, events {lasted:.3} s apart",
        to - from
    );
}
