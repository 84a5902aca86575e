//! A fleet of a hundred real `ternd` boxes on mosquitto, rolled out to in waves by
//! `tern-update rollout`: killed mid-wave and resumed, boxes away during their wave updating
//! when they return, a canary whose health window fails stopping the rollout, and
//! `tern-update fleet` reading it all back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tern_tests::boxes::{Boxes, Options};
use tern_tests::mqtt::{Broker, Client, ClientOptions};
use tern_tests::updates::{build, key};
use tern_tests::*;
use tern_update::command::SigningKey;

use crate::updates::{active_of, next, update_state};

const MODEL: &str = "digits-mlp-int8";
const BOXES: usize = 100;
const AWAY: std::ops::Range<usize> = 90..100;

fn active(state: &Path) -> Option<String> {
    active_of(state, MODEL)
}

/// `count` boxes taking updates signed by `k` (a 3 s health window that two errors fail),
/// all online.
fn update_fleet(broker: &Broker, k: &SigningKey, count: usize, prefix: &str) -> Boxes {
    let extra = format!(
        "[updates]\nkeys = [\"{}\"]\nhealth_window_secs = 3\nhealth_max_errors = 2\n",
        k.public().to_base64()
    );
    let mut w = Boxes::watcher(broker, &format!("{prefix}-watch")).unwrap();
    let fleet = Boxes::start(
        broker,
        &Options {
            count,
            prefix,
            extra: &extra,
            ..Options::default()
        },
    )
    .unwrap();
    let all: Vec<usize> = (0..count).collect();
    fleet
        .wait_online(&mut w, &all, Duration::from_secs(180))
        .unwrap();
    fleet
}

/// Copies a digit image into each folder every 100 ms until stopped: a version that cannot
/// take it fails its health window there.
struct Feeder {
    on: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(inboxes: Vec<PathBuf>) -> Feeder {
        let on = Arc::new(AtomicBool::new(true));
        let sample = root().join("configs/demo/inbox/digit-3.png");
        let threads = inboxes
            .into_iter()
            .map(|inbox| {
                let (on, sample) = (on.clone(), sample.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while on.load(Ordering::Relaxed) {
                        std::fs::copy(&sample, inbox.join(format!("f{n}.png"))).unwrap();
                        n += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
            })
            .collect();
        Feeder { on, threads }
    }

    fn stop(self) {
        self.on.store(false, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

fn rollout_cmd(broker: &Broker, id: &str, bundle: &Path, states: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("tern-update"));
    c.args([
        "rollout",
        "--broker",
        &broker.url(false),
        "--id",
        id,
        "--bundle",
    ])
    .arg(bundle)
    .arg("--state-dir")
    .arg(states)
    .args(["--group", "lab"])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

pub(crate) fn output(c: std::process::Child) -> (Option<i32>, String) {
    let o = c.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// How many boxes each wave of a rollout's state holds.
pub(crate) fn wave_sizes(state: &Value) -> Vec<usize> {
    state["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["devices"].as_array().unwrap().len())
        .collect()
}

pub(crate) fn state_file(states: &Path, id: &str) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(states.join(format!("{id}.json"))).ok()?).ok()
}

/// Live (not retained) manifests the broker forwarded per device: each is one targeting.
fn manifests_sent(c: &mut Client) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for m in c.drain() {
        let dev = m.topic.split('/').nth(1).unwrap_or("").to_string();
        out.entry(dev).or_default().push(m.payload);
    }
    out
}

/// The whole fleet story on one set of boxes (starting a hundred is the expensive part).
#[test]
fn a_hundred_boxes_roll_out_in_waves_resume_after_a_kill_and_stop_on_a_failing_canary() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let states = d.path().join("rollouts");
    let k = key();
    let mut fleet = update_fleet(&broker, &k, BOXES, "box");
    let mem = fleet.memory();
    eprintln!(
        "{} boxes online; PSS per box {:.1} MiB on average",
        mem.len(),
        mem.iter().map(|m| m.1).sum::<u64>() as f64 / mem.len() as f64 / 1048576.0
    );
    // Ten boxes go away before the rollout; they keep their place in the group.
    for i in AWAY {
        fleet.stop(i).unwrap();
    }
    let mut manifests = Client::connect(
        &broker,
        ClientOptions {
            v5: false,
            id: "rollout-manifests",
            subscribe: &["tern/+/update/+"],
            persistent: false,
        },
    )
    .unwrap();

    // 1.1.0 in four waves; the tool is killed during the third and run again.
    let good = build(&next(d.path(), "1.1.0", |s| s), 4096, &[&k], |_| {});
    let good_file = d.path().join("good.bundle");
    good.write(&good_file);
    let waves = ["--waves", "1,5%,25%,rest", "--wait-secs", "120"];
    let first = rollout_cmd(&broker, "r1", &good_file, &states, &waves)
        .spawn()
        .unwrap();
    let mut first = scopeguard(first);
    wait_for("wave 3 under way", Duration::from_secs(240), || {
        let s = state_file(&states, "r1")?;
        (s["current"] == 2 && s["waves"][2]["targeted_ms"].is_i64()).then_some(())
    })
    .unwrap();
    first.kill().unwrap();
    let (_, said) = output(first.take());
    let (code, out) = output(
        rollout_cmd(&broker, "r1", &good_file, &states, &waves)
            .spawn()
            .unwrap(),
    );
    assert_eq!(code, Some(0), "first run:\n{said}\nresumed:\n{out}");
    assert!(out.contains("resuming"), "{out}");
    let s = state_file(&states, "r1").unwrap();
    assert_eq!(wave_sizes(&s), [1, 5, 25, 69], "{out}");
    assert_eq!(s["phase"], "completed");
    assert!(
        out.contains("not back yet (10"),
        "the away boxes are listed: {out}"
    );
    for (i, b) in fleet.boxes.iter().enumerate() {
        if AWAY.contains(&i) {
            continue;
        }
        assert_eq!(
            (
                active(&b.state).as_deref(),
                update_state(&b.state, "1.1.0").as_deref()
            ),
            (Some("1.1.0"), Some("committed")),
            "{}",
            b.device
        );
    }
    // Each box was targeted once: the resumed run did not send the done boxes theirs again.
    let sent = manifests_sent(&mut manifests);
    assert_eq!(sent.len(), BOXES, "{:?}", sent.keys());
    for (dev, m) in &sent {
        assert_eq!(m.len(), 1, "{dev} got its manifest {} times", m.len());
        assert!(json_eq(&m[0], &good.manifest), "{dev}");
    }

    // The away boxes come back and update on their own, within a minute.
    let away: Vec<usize> = AWAY.collect();
    for &i in &away {
        fleet.spawn(i).unwrap();
    }
    for &i in &away {
        let state = fleet.boxes[i].state.clone();
        wait_for("a late joiner committed", Duration::from_secs(60), || {
            (update_state(&state, "1.1.0").as_deref() == Some("committed")).then_some(())
        })
        .unwrap();
    }
    // Run again, the finished rollout reads that everyone is done.
    let (code, out) = output(
        rollout_cmd(&broker, "r1", &good_file, &states, &["--late-secs", "30"])
            .spawn()
            .unwrap(),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("69 committed"), "{out}");
    assert!(!out.contains("not back yet"), "{out}");

    // The fleet view sees all of it.
    let o = Command::new(bin("tern-update"))
        .args([
            "fleet",
            "--broker",
            &broker.url(false),
            "--group",
            "lab",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["boxes"], BOXES);
    assert_eq!(v["summary"]["online"], BOXES);
    assert_eq!(
        v["summary"]["versions"][format!("{MODEL} 1.1.0")],
        BOXES,
        "{v}"
    );
    assert_eq!(
        v["summary"]["last_updates"][format!("{MODEL} 1.1.0 committed")],
        BOXES
    );
    assert_eq!(v["rollouts"]["r1"]["phase"], "completed");
    let one = &v["boxes"][0];
    assert_eq!(one["models"][0]["plan"], "tract", "{one}");
    assert!(one["outbox_rows"].is_i64(), "{one}");

    // 1.2.0 drops the resize its inputs need: the canary fails its health window on the
    // images its folder gets, and the rollout stops before wave 2.
    let bad = build(
        &next(d.path(), "1.2.0", |t| t.replace("resize = [8, 8]\n", "")),
        4096,
        &[&k],
        |_| {},
    );
    let bad_file = d.path().join("bad.bundle");
    bad.write(&bad_file);
    let feeder = Feeder::start(vec![fleet.boxes[0].inbox.clone()]);
    let (code, out) = output(
        rollout_cmd(&broker, "r2", &bad_file, &states, &["--wait-secs", "60"])
            .spawn()
            .unwrap(),
    );
    feeder.stop();
    assert_eq!(code, Some(65), "{out}");
    assert!(out.contains("wave 1: 1 of 1 failed"), "{out}");
    assert!(
        out.contains("box-000 rolled_back") && out.contains("in the health window"),
        "{out}"
    );
    let s = state_file(&states, "r2").unwrap();
    assert_eq!(s["phase"], "aborted");
    assert!(s["waves"][1]["targeted_ms"].is_null(), "{s}");
    for b in &fleet.boxes {
        assert_eq!(active(&b.state).as_deref(), Some("1.1.0"), "{}", b.device);
    }
    assert_eq!(
        update_state(&fleet.boxes[0].state, "1.2.0").as_deref(),
        Some("rolled_back")
    );
    let sent = manifests_sent(&mut manifests);
    let canary = &fleet.boxes[0].device;
    assert_eq!(
        sent.keys().collect::<Vec<_>>(),
        [canary],
        "only the canary was targeted"
    );
    let m = &sent[canary];
    assert_eq!(m.len(), 2, "sent, then withdrawn");
    assert!(json_eq(&m[0], &bad.manifest) && m[1].is_empty());
}

/// The same JSON document (the bundle file keeps its manifest pretty-printed).
fn json_eq(a: &[u8], b: &[u8]) -> bool {
    serde_json::from_slice::<Value>(a).ok() == serde_json::from_slice::<Value>(b).ok()
}

/// A child process killed when the test fails before it is waited for.
struct Guard(Option<std::process::Child>);

fn scopeguard(c: std::process::Child) -> Guard {
    Guard(Some(c))
}

impl Guard {
    fn kill(&mut self) -> std::io::Result<()> {
        self.0.as_mut().expect("not taken").kill()
    }

    fn take(&mut self) -> std::process::Child {
        self.0.take().expect("not taken")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two `tern-update ingest` workers on one MQTT 5 shared subscription take five boxes' results
/// between them into one database: every result once, both workers doing part of it, no gap;
/// a row taken out is reported as a gap.
#[test]
fn shared_subscription_workers_ingest_every_result_once_and_find_gaps() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let db_path = d.path().join("results.db");
    let worker = |n: usize| {
        let log = d.path().join(format!("worker-{n}.log"));
        let child = Command::new(bin("tern-update"))
            .args(["ingest", "--broker", &broker.url(true), "--share", "ingest"])
            .arg("--db")
            .arg(&db_path)
            .arg("--events")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for("the worker subscribed", Duration::from_secs(30), || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("consuming")
                .then_some(())
        })
        .unwrap();
        scopeguard(child)
    };
    let mut workers = [worker(1), worker(2)];
    let mut w = Boxes::watcher(&broker, "ingest-watch").unwrap();
    let fleet = Boxes::start(
        &broker,
        &Options {
            count: 5,
            ..Options::default()
        },
    )
    .unwrap();
    fleet
        .wait_online(&mut w, &[0, 1, 2, 3, 4], Duration::from_secs(60))
        .unwrap();
    const EACH: usize = 20;
    let sample = root().join("configs/demo/inbox/digit-3.png");
    for b in &fleet.boxes {
        for i in 0..EACH {
            std::fs::copy(&sample, b.inbox.join(format!("s{i}.png"))).unwrap();
        }
    }
    let results = |sql: &str| -> i64 {
        rusqlite::Connection::open(&db_path)
            .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
            .unwrap_or(-1)
    };
    wait_for("every result stored", Duration::from_secs(120), || {
        (results("SELECT count(*) FROM messages WHERE stream = 'results/main'")
            == (5 * EACH) as i64)
            .then_some(())
    })
    .unwrap();
    let mut said = Vec::new();
    for g in &mut workers {
        let c = g.take();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let (code, out) = output(c);
        assert_eq!(code, Some(0), "{out}");
        said.push(out);
    }
    for out in &said {
        let stored: u64 = out
            .split("stored ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(stored > 0, "each worker took a share: {said:?}");
    }
    assert_eq!(
        results("SELECT count(DISTINCT consumer) FROM messages WHERE stream = 'results/main'"),
        2
    );
    // Every box's results stream is 1..=EACH, each once (the key forbids a second).
    assert_eq!(
        results(
            "SELECT count(*) FROM (SELECT device FROM messages WHERE stream = 'results/main' \
             GROUP BY device HAVING min(seq) = 1 AND max(seq) = 20 AND count(*) = 20)"
        ),
        5
    );
    let gaps = || {
        let o = Command::new(bin("tern-update"))
            .arg("gaps")
            .arg("--db")
            .arg(&db_path)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let (code, out) = gaps();
    assert_eq!(code, Some(0), "{out}");
    rusqlite::Connection::open(&db_path)
        .unwrap()
        .execute(
            "DELETE FROM messages WHERE device = 'box-002' AND stream = 'results/main' AND seq = 7",
            [],
        )
        .unwrap();
    let (code, out) = gaps();
    assert_eq!(code, Some(65), "{out}");
    assert!(
        out.contains("box-002 results/main: missing seq 7\n"),
        "{out}"
    );
    assert!(out.contains("1 with gaps"), "{out}");
}

/// A wave that fails after an earlier one committed: the abort rolls the committed boxes back
/// by command and clears every targeted manifest; run again, the aborted rollout stays
/// stopped and finds nothing left to roll back.
#[test]
fn an_abort_rolls_back_the_boxes_of_earlier_waves() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let states = d.path().join("rollouts");
    let k = key();
    let fleet = update_fleet(&broker, &k, 4, "ab");
    // The new version drops the resize the folder's images need: it passes where no image
    // comes (the first wave) and fails where they do (the second).
    let bad = build(
        &next(d.path(), "1.1.0", |t| t.replace("resize = [8, 8]\n", "")),
        4096,
        &[&k],
        |_| {},
    );
    let bad_file = d.path().join("bad.bundle");
    bad.write(&bad_file);
    let feeder = Feeder::start(fleet.boxes[1..].iter().map(|b| b.inbox.clone()).collect());
    let args = [
        "--waves",
        "1,rest",
        "--abort-above",
        "1",
        "--wait-secs",
        "60",
    ];
    let (code, out) = output(
        rollout_cmd(&broker, "ab", &bad_file, &states, &args)
            .spawn()
            .unwrap(),
    );
    feeder.stop();
    assert_eq!(code, Some(65), "{out}");
    assert!(out.contains("wave 2: 3 of 3 failed, above 1"), "{out}");
    assert!(
        out.contains("ab-000: rolled back from 1.1.0 to 1.0.0"),
        "the first wave's box is rolled back: {out}"
    );
    for b in &fleet.boxes {
        assert_eq!(active(&b.state).as_deref(), Some("1.0.0"), "{}", b.device);
    }
    let s = state_file(&states, "ab").unwrap();
    assert_eq!(s["phase"], "aborted");
    assert!(
        s["rollbacks"]["ab-000"]
            .as_str()
            .unwrap()
            .starts_with("rolled back"),
        "{s}"
    );
    // Every targeted manifest is gone from the broker: a box that restarts finds nothing.
    let mut late = Client::connect(
        &broker,
        ClientOptions {
            v5: false,
            id: "abort-late",
            subscribe: &["tern/+/update/+", "abort/sync"],
            persistent: false,
        },
    )
    .unwrap();
    late.sync("abort/sync").unwrap();
    let left: Vec<String> = late
        .drain()
        .into_iter()
        .filter(|m| m.topic != "abort/sync")
        .map(|m| m.topic)
        .collect();
    assert!(left.is_empty(), "retained manifests left: {left:?}");
    // Run again: still stopped, nothing rolled back twice.
    let (code, again) = output(
        rollout_cmd(&broker, "ab", &bad_file, &states, &[])
            .spawn()
            .unwrap(),
    );
    assert_eq!(code, Some(65), "{again}");
    // A second rollback would have swapped the box back to 1.1.0.
    assert_eq!(
        active(&fleet.boxes[0].state).as_deref(),
        Some("1.0.0"),
        "{again}"
    );
}

/// A rollout of an update that runs as a shadow first waits on each box's verdict: a version
/// that agrees with the live one on the boxes' own digits is promoted and committed wave by
/// wave; one that names the digit the boxes see wrongly is refused by its shadow on the
/// canary, with the measured agreement, and the rollout stops there.
#[test]
fn a_rollout_waits_on_shadow_verdicts_and_stops_on_a_refused_canary() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let states = d.path().join("rollouts");
    let pkcs8 = tern_update::command::generate_pkcs8();
    let k = SigningKey::from_pkcs8(&pkcs8).unwrap();
    let key_file = d.path().join("op.key");
    std::fs::write(&key_file, &pkcs8).unwrap();
    let fleet = update_fleet(&broker, &k, 3, "sh");
    let feeder = Feeder::start(fleet.boxes.iter().map(|b| b.inbox.clone()).collect());
    // Made by the operator's tool, the shadow rule signed into the manifest.
    let bundle = |pkg: &Path, name: &str| -> PathBuf {
        let out = d.path().join(name);
        let o = Command::new(bin("tern-update"))
            .args(["bundle", "--package"])
            .arg(pkg)
            .arg("--out")
            .arg(&out)
            .arg("--key")
            .arg(&key_file)
            .args(["--group", "lab"])
            .args([
                "--shadow",
                "agreement=0.95,samples=20,fraction=1,cpu_share=0.5",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let args = [
        "--waves",
        "1,rest",
        "--abort-above",
        "0",
        "--wait-secs",
        "120",
    ];

    let good = bundle(
        &next(d.path(), "1.1.0", crate::updates::same),
        "good.bundle",
    );
    let (code, out) = output(
        rollout_cmd(&broker, "sh1", &good, &states, &args)
            .spawn()
            .unwrap(),
    );
    assert_eq!(code, Some(0), "{out}");
    for b in &fleet.boxes {
        assert_eq!(active(&b.state).as_deref(), Some("1.1.0"), "{}", b.device);
        let (state, verdict): (String, String) = db(&b.state)
            .unwrap()
            .query_row(
                "SELECT state, verdict FROM shadows WHERE version = '1.1.0'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(state, "promoted", "{}: {verdict}", b.device);
        assert!(verdict.contains("agreement 1.0000 over"), "{verdict}");
    }

    let swapped = next(d.path(), "1.2.0", crate::shadow::swapped("3", "5"));
    let bad = bundle(&swapped, "bad.bundle");
    let (code, out) = output(
        rollout_cmd(&broker, "sh2", &bad, &states, &args)
            .spawn()
            .unwrap(),
    );
    feeder.stop();
    assert_eq!(code, Some(65), "{out}");
    assert!(out.contains("wave 1: 1 of 1 failed, above 0"), "{out}");
    assert!(
        out.contains("sh-000 failed") && out.contains("agreement 0.0000 over 20 samples"),
        "{out}"
    );
    for b in &fleet.boxes {
        assert_eq!(active(&b.state).as_deref(), Some("1.1.0"), "{}", b.device);
    }
    // The later waves were never targeted: no shadow of 1.2.0 ran there.
    for b in &fleet.boxes[1..] {
        let n: i64 = db(&b.state)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM shadows WHERE version = '1.2.0'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "{}", b.device);
    }
}
