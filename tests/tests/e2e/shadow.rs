//! Shadow evaluation end to end: a candidate runs beside the live model on the box's own
//! inputs (the digits test set through the watched folder), its answers are compared, and its
//! verdict promotes it through the normal activation path or refuses it; by an update's
//! signed rule, by `models.shadow` and by the operator's word; across a kill -9.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_tests::mqtt::Client;
use tern_tests::updates::{build, variant};
use tern_tests::*;
use tern_update::bundle::ShadowSpec;

use crate::drift::{feed, test_set};
use crate::fleet::{client, command, wait_online};
use crate::updates::{
    CHUNK, MODEL, SYNC, T, active, event, mosquitto, next, same, update_box, versions, watcher,
};

const DEV: &str = "shadow-1";

fn spec(pairs: &str) -> ShadowSpec {
    ShadowSpec::parse_pairs(pairs).unwrap()
}

/// The label table with `a` and `b` swapped: the same network naming two digits wrongly,
/// as a model trained with those labels exchanged would.
pub(crate) fn swapped(a: &str, b: &str) -> impl Fn(String) -> String {
    let (a, b) = (format!("\"{a}\""), format!("\"{b}\""));
    move |t: String| {
        let labels = r#"labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]"#;
        assert!(t.contains(labels), "{t}");
        let l = labels
            .replace(&a, "\"#\"")
            .replace(&b, &a)
            .replace("\"#\"", &b);
        t.replace(labels, &l)
    }
}

/// Feed digits of the test set into the inbox, `batch` at a time, until `pred` matches an
/// event (or the deadline passes); returns the event and how many digits were fed.
fn feed_until(
    w: &mut Client,
    inbox: &Path,
    tag: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (Value, usize) {
    let set = test_set();
    let topic = format!("tern/{DEV}/events");
    let deadline = Instant::now() + T;
    let mut fed = 0;
    // A few at a time, often: a shadow busy (or starved) drops what comes in bursts.
    for round in 0.. {
        let from = (round * 5) % (set.len() - 5);
        fed += feed(inbox, &format!("{tag}{round}"), &set[from..from + 5], false);
        let wait = Duration::from_millis(400);
        if let Ok(m) = w.recv_match(what, wait, |m| m.topic == topic && pred(&m.json())) {
            return (m.json(), fed);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen after {fed} digits"
        );
    }
    unreachable!()
}

/// The box's status (each asked with a new command id: a repeated one is answered with its
/// first reply).
fn status_as(c: &mut Client, tag: &str) -> Value {
    static ASKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    command(c, DEV, "status", &json!({"id": format!("{tag}-{n}")}))
}

fn status(c: &mut Client) -> Value {
    status_as(c, "st")
}

/// The status once the box has answered everything it was given and the shadow has taken
/// everything it was handed: two reads 300 ms apart that agree.
fn settled(c: &mut Client) -> Value {
    let counts = |st: &Value| {
        let sh = &st["result"]["shadows"][0];
        (
            st["result"]["models"][0]["requests"].clone(),
            sh["samples"].clone(),
            sh["dropped"].clone(),
        )
    };
    let deadline = Instant::now() + T;
    let mut last = status(c);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = status(c);
        if counts(&now) == counts(&last) {
            return now;
        }
        assert!(Instant::now() < deadline, "the box never settled");
        last = now;
    }
}

/// The box's running shadows, from its status.
fn shadows(c: &mut Client, tag: &str) -> Vec<Value> {
    status_as(c, tag)["result"]["shadows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn metric(port: u16, line_start: &str) -> Option<f64> {
    let (_, body) = http(port, "GET", "/metrics");
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// An update whose manifest asks for a shadow runs beside the live version until its rule
/// judges it: the same network (agreeing on every digit) is promoted and committed through
/// the health window; one with two labels exchanged (so it names two digits of ten wrongly)
/// is refused with its measured agreement and marked failed, the live version untouched, and
/// so is one trained on shuffled labels (agreeing about as often as chance). A
/// kill -9 while a shadow runs loses neither its update nor its count. `models.shadow` runs
/// an installed version as a shadow, and the operator's drop ends one.
#[test]
fn a_shadow_that_agrees_is_promoted_and_one_that_disagrees_is_refused() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = tern_tests::updates::key();
    let port = free_port();
    let bx = update_box(
        DEV,
        &broker,
        &[&k],
        1,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut w = watcher(&broker, DEV);
    let reply = format!("tern/{DEV}/reply/+");
    let mut c = client(&broker, false, &format!("cmd-{DEV}"), &[&reply]);
    let daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    wait_online(&mut w, DEV);
    let topic = format!("tern/{DEV}/update/{MODEL}");
    let ended = |v: &'static str| {
        move |e: &Value| {
            e["version"] == v
                && matches!(
                    e["event"].as_str(),
                    Some("update.committed" | "update.failed" | "update.rolled_back")
                )
        }
    };

    // 1.1.0: the same network. Shadowed, it agrees on every digit and is promoted.
    let good = next(d.path(), "1.1.0", same);
    let rule = "agreement=0.95,samples=40,fraction=1,cpu_share=1,latency_p90_ms=1000";
    build(&good, CHUNK, &[&k], |s| s.shadow = Some(spec(rule))).publish(&mut w, &topic, SYNC);
    let e = event(&mut w, DEV, "1.1.0 in shadow", |e| {
        e["event"] == "update.shadow" && e["version"] == "1.1.0"
    });
    assert_eq!(e["shadow"]["samples"], 40, "{e}");
    assert_eq!(
        active(&bx.state).unwrap().0,
        "1.0.0",
        "a shadow is not active"
    );
    let (e, fed) = feed_until(&mut w, &bx.inbox, "a", "1.1.0 promoted", |e| {
        e["event"] == "shadow.promoted" && e["version"] == "1.1.0"
    });
    let sh = &e["shadow"];
    assert_eq!(e["by"], "rule", "{e}");
    assert_eq!(sh["against"], "1.0.0", "{e}");
    assert!(sh["samples"].as_u64().unwrap() >= 40, "{e}");
    assert!(sh["samples"].as_u64().unwrap() <= fed as u64, "{e}");
    assert_eq!(sh["agreement"], 1.0, "{e}");
    assert_eq!(sh["errors"], 0, "{e}");
    assert!(sh["latency_p90_ms"].as_f64().unwrap() > 0.0, "{e}");
    eprintln!("1.1.0 promoted: {} ({fed} digits fed)", e["reason"]);
    let e = event(&mut w, DEV, "1.1.0's end", ended("1.1.0"));
    assert_eq!(e["event"], "update.committed", "{e}");
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");

    // 1.2.0: "3" and "5" exchanged. Killed mid-shadow, it goes on counting after the restart;
    // then the rule refuses it with its figures.
    let bad = next(d.path(), "1.2.0", swapped("3", "5"));
    let rule = "agreement=0.95,samples=60,fraction=1,cpu_share=1";
    build(&bad, CHUNK, &[&k], |s| s.shadow = Some(spec(rule))).publish(&mut w, &topic, SYNC);
    event(&mut w, DEV, "1.2.0 in shadow", |e| {
        e["event"] == "update.shadow" && e["version"] == "1.2.0"
    });
    let deadline = Instant::now() + T;
    let mut fed_b = 0;
    let before = loop {
        let counted = shadows(&mut c, "s1")
            .first()
            .and_then(|s| s["samples"].as_u64())
            .unwrap_or(0);
        if counted >= 10 {
            break counted;
        }
        assert!(
            Instant::now() < deadline,
            "shadow counted {counted} of {fed_b}"
        );
        let from = fed_b % 356;
        fed_b += feed(
            &bx.inbox,
            &format!("b{fed_b}-"),
            &test_set()[from..from + 4],
            false,
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let agreement = metric(
        port,
        &format!("tern_shadow_agreement{{model=\"{MODEL}\",version=\"1.2.0\"}}"),
    );
    assert!(agreement.is_some_and(|a| a < 1.0), "{agreement:?}");
    // The flush to SQLite runs every half second: wait until the database holds a count.
    let recorded = || -> u64 {
        db(&bx.state)
            .unwrap()
            .query_row(
                "SELECT tally FROM shadows WHERE model = ?1 AND version = '1.2.0'",
                [MODEL],
                |r| r.get::<_, String>(0),
            )
            .map(|t| {
                serde_json::from_str::<Value>(&t).unwrap()["samples"]
                    .as_u64()
                    .unwrap()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + T;
    while recorded() == 0 {
        assert!(Instant::now() < deadline, "tally never written");
        std::thread::sleep(Duration::from_millis(100));
    }
    let started_ms = shadows(&mut c, "s1b")
        .first()
        .expect("judged before the kill: the rule asks for more samples")["started_ms"]
        .clone();
    drop(daemon); // SIGKILL
    let kept = recorded();
    assert!(kept > 0 && kept <= fed_b as u64, "{kept} of {fed_b} fed");
    let daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    // The first run said `online` again as its models changed: wait for the second run's.
    let state = format!("tern/{DEV}/state");
    w.recv_match("the restarted box's birth", T, |m| {
        m.topic == state && m.json()["state"] == "online" && m.json()["session"] == 2
    })
    .unwrap();
    let deadline = Instant::now() + T;
    let resumed = loop {
        if let Some(s) = shadows(&mut c, "s2").first().cloned() {
            break s;
        }
        assert!(Instant::now() < deadline, "the shadow did not resume");
        std::thread::sleep(Duration::from_millis(100));
    };
    // The same record taken up again (not a new one), its count going on.
    assert_eq!(resumed["version"], "1.2.0");
    assert_eq!(resumed["started_ms"], started_ms, "{resumed}");
    assert!(
        resumed["samples"].as_u64().unwrap() >= kept,
        "{resumed} after {before}"
    );
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
    let (e, _) = feed_until(&mut w, &bx.inbox, "c", "1.2.0 refused", |e| {
        e["event"] == "shadow.rejected" && e["version"] == "1.2.0"
    });
    let a = e["shadow"]["agreement"].as_f64().unwrap();
    eprintln!(
        "1.2.0 refused: {}; {kept} samples kept over the kill, {} after the restart",
        e["reason"], resumed["samples"]
    );
    // The test set has about a fifth 3s and 5s: far under the rule, far over chance.
    assert!((0.6..0.95).contains(&a), "{e}");
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("agreement {a:.4}")),
        "{e}"
    );
    let e = event(&mut w, DEV, "1.2.0's end", ended("1.2.0"));
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("update.failed"), Some("shadow")),
        "{e}"
    );
    assert!(e.to_string().contains(&format!("agreement {a:.4}")), "{e}");
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
    assert!(versions(&bx.state).contains(&("1.2.0".into(), "failed".into())));
    // Ended: no shadow runs, and none is fed.
    let deadline = Instant::now() + T;
    while !shadows(&mut c, "s3").is_empty() {
        assert!(Instant::now() < deadline, "the refused shadow still runs");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 1.3.0: the same network trained on shuffled labels (digits-mlp-shuffled-int8, from
    // make_models.py), a model that agrees with the live one about as often as chance.
    let shuffled = variant(
        &package("digits-mlp-shuffled-int8"),
        &d.path().join(format!("{MODEL}-1.3.0")),
        MODEL,
        "1.3.0",
        same,
    );
    let rule = "agreement=0.9,samples=40,fraction=1,cpu_share=1";
    build(&shuffled, CHUNK, &[&k], |s| s.shadow = Some(spec(rule))).publish(&mut w, &topic, SYNC);
    event(&mut w, DEV, "1.3.0 in shadow", |e| {
        e["event"] == "update.shadow" && e["version"] == "1.3.0"
    });
    let (e, _) = feed_until(&mut w, &bx.inbox, "s", "1.3.0 refused", |e| {
        e["event"] == "shadow.rejected" && e["version"] == "1.3.0"
    });
    let a = e["shadow"]["agreement"].as_f64().unwrap();
    eprintln!("1.3.0 (shuffled labels) refused: {}", e["reason"]);
    assert_eq!(e["by"], "rule", "{e}");
    assert_eq!(e["shadow"]["against"], "1.1.0", "{e}");
    // Ten classes: chance is about a tenth.
    assert!(a < 0.3, "{e}");
    let e = event(&mut w, DEV, "1.3.0's end", ended("1.3.0"));
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("update.failed"), Some("shadow")),
        "{e}"
    );
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
    assert!(versions(&bx.state).contains(&("1.3.0".into(), "failed".into())));
    let deadline = Instant::now() + T;
    while !shadows(&mut c, "s3b").is_empty() {
        assert!(Instant::now() < deadline, "the refused shadow still runs");
        std::thread::sleep(Duration::from_millis(100));
    }

    // `models.shadow` on the version the box ran before; bad arguments change nothing.
    let bad_args = [
        json!({"id": "x1", "args": {"name": MODEL, "version": "1.0.0", "fraction": 0}}),
        json!({"id": "x2", "args": {"name": MODEL, "version": "1.0.0", "agreement": 0.9, "sample": 3}}),
        json!({"id": "x3", "args": {"name": MODEL, "version": "1.1.0"}}),
        json!({"id": "x4", "args": {"name": MODEL, "version": "1.2.0"}}),
        json!({"id": "x5", "args": {"name": MODEL, "version": "9.0.0"}}),
    ];
    for (args, (code, says)) in bad_args.iter().zip([
        ("bad_request", "fraction 0 is not in [0.001, 1]"),
        ("bad_request", "unknown field `sample`"),
        ("conflict", "is the active version"),
        ("conflict", "marked failed"),
        ("not_found", "not installed"),
    ]) {
        let r = command(&mut c, DEV, "models.shadow", args);
        assert_eq!(r["error"]["code"], code, "{args}: {r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains(says),
            "{args}: {r}"
        );
        assert!(shadows(&mut c, "s4").is_empty());
    }
    let answered = |st: &Value| st["result"]["models"][0]["requests"].as_i64().unwrap();
    let before_shadow = answered(&settled(&mut c));
    let r = command(
        &mut c,
        DEV,
        "models.shadow",
        &json!({"id": "m1", "args": {"name": MODEL, "version": "1.0.0", "fraction": 0.5}}),
    );
    assert_eq!(r["result"]["version"], "1.0.0", "{r}");
    assert_eq!(r["result"]["origin"], "command", "{r}");
    let e = event(&mut w, DEV, "1.0.0 started", |e| {
        e["event"] == "shadow.started" && e["version"] == "1.0.0"
    });
    assert_eq!(e["by"], "command");
    // Half the digits reach it; without a rule it runs until the operator decides.
    let deadline = Instant::now() + T;
    loop {
        let st = status(&mut c);
        let s = st["result"]["shadows"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let n = s.first().and_then(|s| s["samples"].as_u64()).unwrap_or(0);
        if n >= 20 {
            // Once nothing is in flight, every other answer was picked: counted or dropped.
            let st = settled(&mut c);
            let s = &st["result"]["shadows"][0];
            assert_eq!(s["agreement"], 1.0, "{s}");
            assert!(s["verdict"].is_null(), "{s}");
            let picked = (s["samples"].as_u64().unwrap() + s["dropped"].as_u64().unwrap()) as i64;
            let live = answered(&st) - before_shadow;
            assert!((live - 2 * picked).abs() <= 1, "{picked} of {live} picked");
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        feed(&bx.inbox, &format!("e{n}-"), &test_set()[..4], false);
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = command(
        &mut c,
        DEV,
        "models.shadow.drop",
        &json!({"id": "m2", "args": {"name": MODEL}}),
    );
    assert_eq!(r["result"]["verdict"]["by"], "operator", "{r}");
    let e = event(&mut w, DEV, "dropped", |e| {
        e["event"] == "shadow.rejected" && e["version"] == "1.0.0"
    });
    assert_eq!(e["by"], "operator");
    let r = command(
        &mut c,
        DEV,
        "models.shadow.drop",
        &json!({"id": "m3", "args": {"name": MODEL}}),
    );
    assert!(
        matches!(r["error"]["code"].as_str(), Some("not_found" | "conflict")),
        "{r}"
    );
    // Dropped, not failed: the operator may still activate it.
    let deadline = Instant::now() + T;
    while !shadows(&mut c, "s6").is_empty() {
        assert!(Instant::now() < deadline, "the dropped shadow still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(versions(&bx.state).contains(&("1.0.0".into(), "previous".into())));
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
    drop(daemon); // SIGKILL
    w.publish_retained(&topic, b"").unwrap();
}

/// A detector's shadow is judged by its boxes: the same network matches every box of the
/// canvases the box sees (label and overlap) and is promoted; one that names 3s as 5s and 5s
/// as 3s leaves those boxes unmatched and is refused.
#[test]
fn a_detector_shadow_is_judged_by_its_matched_boxes() {
    const DET: &str = "digits-det-int8";
    const DEV: &str = "shadow-det";
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = tern_tests::updates::key();
    let bx = crate::fleet::fleet_box_with(
        DET,
        DEV,
        &broker.url(true),
        "",
        &format!(
            "[engine]\nplan = \"tract\"\n{}",
            crate::updates::keys_toml(&[&k], 1, "")
        ),
    );
    let mut w = watcher(&broker, DEV);
    let _daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    wait_online(&mut w, DEV);
    let topic = format!("tern/{DEV}/update/{DET}");
    let events = format!("tern/{DEV}/events");
    let canvases = package("testsets/digits-det");
    // Canvases into the inbox until `pred` matches an event.
    let mut fed = 0;
    let mut feed_until = |w: &mut Client, what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = Instant::now() + T;
        loop {
            for _ in 0..20 {
                let from = canvases.join(format!("{:03}.png", fed % 100));
                let tmp = bx.inbox.join(format!(".c{fed}.png"));
                std::fs::copy(&from, &tmp).unwrap();
                std::fs::rename(&tmp, bx.inbox.join(format!("c{fed}.png"))).unwrap();
                fed += 1;
            }
            let wait = Duration::from_secs(3);
            if let Ok(m) = w.recv_match(what, wait, |m| m.topic == events && pred(&m.json())) {
                return m.json();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen after {fed} canvases"
            );
        }
    };
    let variant = |version: &str, edit: &dyn Fn(String) -> String| {
        tern_tests::updates::variant(
            &package(DET),
            &d.path().join(format!("{DET}-{version}")),
            DET,
            version,
            edit,
        )
    };
    let rule = "agreement=0.95,samples=30,fraction=1,cpu_share=1";

    let good = variant("1.1.0", &|t| t);
    build(&good, CHUNK, &[&k], |s| s.shadow = Some(spec(rule))).publish(&mut w, &topic, SYNC);
    let e = feed_until(&mut w, "1.1.0 promoted", &|e| {
        e["version"] == "1.1.0"
            && matches!(
                e["event"].as_str(),
                Some("shadow.promoted" | "shadow.rejected")
            )
    });
    assert_eq!(e["event"], "shadow.promoted", "{e}");
    let b = &e["shadow"]["boxes"];
    let live = b["live"].as_u64().unwrap();
    // The canvases hold one to three digits each.
    assert!(live >= 30, "{e}");
    assert_eq!(
        (b["candidate"].as_u64(), b["matched"].as_u64()),
        (Some(live), Some(live)),
        "{e}"
    );
    assert_eq!(e["shadow"]["agreement"], 1.0, "{e}");

    let swapped = variant("1.2.0", &swapped("3", "5"));
    build(&swapped, CHUNK, &[&k], |s| s.shadow = Some(spec(rule))).publish(&mut w, &topic, SYNC);
    let e = feed_until(&mut w, "1.2.0 judged", &|e| {
        e["version"] == "1.2.0"
            && matches!(
                e["event"].as_str(),
                Some("shadow.promoted" | "shadow.rejected")
            )
    });
    eprintln!(
        "detector: 1.1.0 matched {live} of {live} boxes; 1.2.0: {}",
        e["reason"]
    );
    assert_eq!(e["event"], "shadow.rejected", "{e}");
    let b = &e["shadow"]["boxes"];
    let (l, c, m) = (
        b["live"].as_u64().unwrap(),
        b["candidate"].as_u64().unwrap(),
        b["matched"].as_u64().unwrap(),
    );
    // The same boxes, some with another label: fewer matched, none lost or added.
    assert_eq!(l, c, "{e}");
    assert!(m > 0 && m < l, "{e}");
    let a = e["shadow"]["agreement"].as_f64().unwrap();
    assert!(a > 0.0 && a < 0.95, "{e}");
    w.publish_retained(&topic, b"").unwrap();
}
