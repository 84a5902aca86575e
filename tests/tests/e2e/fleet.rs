//! The fleet link against real brokers: an embedded rumqttd (always) and mosquitto (when
//! installed; required under TERN_TEST_STRICT=1).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tern_tests::mqtt::{Broker, Client, ClientOptions};
use tern_tests::*;

const T: Duration = Duration::from_secs(60);

pub struct FleetBox {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
    pub inbox: PathBuf,
}

/// A box with the int8 digits CNN on a watched inbox and the fleet link to `broker_url`.
pub fn fleet_box(device: &str, broker_url: &str, fleet_extra: &str, extra: &str) -> FleetBox {
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let config = dir.path().join("ternd.toml");
    let text = format!(
        r#"state_dir = "state"
[[models]]
package = "{pkg}"
[[feeds]]
kind = "directory"
name = "inbox"
path = "inbox"
[[pipelines]]
name = "digits"
feed = "inbox"
model = "digits-cnn-int8"
{extra}
[fleet]
broker = "{broker_url}"
device = "{device}"
groups = ["lab"]
telemetry_secs = 3600
{fleet_extra}
"#,
        pkg = package("digits-cnn-int8").display()
    );
    std::fs::write(&config, text).unwrap();
    FleetBox {
        state: dir.path().join("state"),
        dir,
        config,
        inbox,
    }
}

pub fn client(broker: &Broker, v5: bool, id: &str, subscribe: &[&str]) -> Client {
    Client::connect(
        broker,
        ClientOptions {
            v5,
            id,
            subscribe,
            persistent: false,
        },
    )
    .unwrap()
}

/// Wait for the box's retained birth message; returns it.
pub fn wait_online(c: &mut Client, device: &str) -> Value {
    let topic = format!("tern/{device}/state");
    c.recv_match("birth message", T, |m| {
        m.topic == topic && m.json()["state"] == "online"
    })
    .unwrap()
    .json()
}

/// Send a command the MQTT 3.1.1 way and wait for its reply on `<prefix>/<device>/reply/<id>`
/// (the client must be subscribed to `tern/<device>/reply/+`).
pub fn command(c: &mut Client, device: &str, name: &str, payload: &Value) -> Value {
    let id = payload["id"]
        .as_str()
        .expect("payload has an id")
        .to_string();
    c.publish(
        &format!("tern/{device}/cmd/{name}"),
        payload.to_string().as_bytes(),
        None,
    )
    .unwrap();
    c.recv_on(&format!("tern/{device}/reply/{id}"), T)
        .unwrap()
        .json()
}

fn active_version(state: &Path) -> Option<String> {
    db(state)
        .ok()?
        .query_row(
            "SELECT version FROM model_versions WHERE name = 'digits-cnn-int8' AND state = 'active'",
            [],
            |r| r.get(0),
        )
        .ok()
}

/// A copy of the digits CNN package with another version number.
fn package_version(dir: &Path, version: &str) -> PathBuf {
    let to = dir.join(format!("digits-cnn-int8-{version}"));
    copy_dir(&package("digits-cnn-int8"), &to).unwrap();
    let m = to.join("tern-model.toml");
    let text = std::fs::read_to_string(&m).unwrap();
    let re = text.replacen(
        "version = \"1.0.0\"",
        &format!("version = \"{version}\""),
        1,
    );
    assert_ne!(text, re, "manifest version not found");
    std::fs::write(&m, re).unwrap();
    to
}

fn brokers() -> Vec<Broker> {
    let mut v = vec![Broker::embedded().unwrap()];
    if let Some(m) = Broker::mosquitto().unwrap() {
        v.push(m);
    }
    v
}

/// Client protocols to try against a box speaking `daemon_v5` through `broker`. rumqttd 0.20
/// panics forwarding a message between its MQTT 5 and 3.1.1 listeners, so on it each side
/// speaks the box's protocol; mosquitto takes every mix.
fn client_protocols(broker: &Broker, daemon_v5: bool) -> Vec<bool> {
    match broker.kind {
        tern_tests::mqtt::Kind::Embedded => vec![daemon_v5],
        tern_tests::mqtt::Kind::Mosquitto => vec![true, false],
    }
}

#[test]
fn requests_and_replies_over_mqtt5_and_311_on_every_broker() {
    for broker in brokers() {
        for daemon_v5 in [true, false] {
            let name = format!(
                "{}-{}",
                broker.name(),
                if daemon_v5 { "v5" } else { "v311" }
            );
            let b = fleet_box(
                &name,
                &broker.url(daemon_v5),
                if daemon_v5 {
                    ""
                } else {
                    "protocol = \"v3.1.1\""
                },
                "",
            );
            let state_t = format!("tern/{name}/state");
            let reply_t = format!("tern/{name}/reply/+");
            let mut clients: Vec<(bool, Client)> = client_protocols(&broker, daemon_v5)
                .into_iter()
                .map(|v5| {
                    let id = format!("{name}-c{}", if v5 { 5 } else { 4 });
                    let subs: &[&str] = if v5 {
                        &[&state_t, &reply_t, "answers/#"]
                    } else {
                        &[&state_t, &reply_t]
                    };
                    (v5, client(&broker, v5, &id, subs))
                })
                .collect();
            let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
            for (client_v5, c) in &mut clients {
                let ctx = format!(
                    "{name}, client on MQTT {}",
                    if *client_v5 { "5" } else { "3.1.1" }
                );
                let birth = wait_online(c, &name);
                assert_eq!(birth["device"], name.as_str(), "{ctx}: {birth}");
                assert_eq!(birth["models"][0]["name"], "digits-cnn-int8", "{birth}");
                assert_eq!(birth["models"][0]["version"], "1.0.0", "{birth}");
                assert_eq!(birth["groups"], json!(["lab"]), "{birth}");
                assert!(birth["session"].as_u64().unwrap() >= 1, "{birth}");

                // An MQTT 5 requester names its response topic and correlation data. A box on
                // MQTT 3.1.1 cannot see them and answers on its reply topic instead.
                if *client_v5 {
                    c.publish(
                        &format!("tern/{name}/cmd/ping"),
                        br#"{"id":"p-1"}"#,
                        Some(("answers/me", b"corr-42")),
                    )
                    .unwrap();
                    let j = if daemon_v5 {
                        let r = c.recv_on("answers/me", T).unwrap();
                        assert_eq!(r.correlation.as_deref(), Some(&b"corr-42"[..]), "{ctx}");
                        r.json()
                    } else {
                        c.recv_on(&format!("tern/{name}/reply/p-1"), T)
                            .unwrap()
                            .json()
                    };
                    assert_eq!(j["id"], "p-1", "{ctx}: {j}");
                    assert_eq!(j["ok"], true, "{ctx}: {j}");
                    assert_eq!(j["result"]["pong"], true, "{ctx}: {j}");
                }

                let st = command(c, &name, "status", &json!({"id": format!("s-{client_v5}")}));
                assert_eq!(st["ok"], true, "{ctx}: {st}");
                assert_eq!(st["result"]["device"], name.as_str(), "{st}");
                assert_eq!(st["result"]["fleet"]["connected"], true, "{st}");
                assert_eq!(st["result"]["models"][0]["version"], "1.0.0", "{st}");

                // A group command reaches the box too.
                let gid = format!("g-{client_v5}");
                c.publish(
                    "tern/fleet/lab/cmd/models.list",
                    json!({"id": gid}).to_string().as_bytes(),
                    None,
                )
                .unwrap();
                let r = c
                    .recv_on(&format!("tern/{name}/reply/{gid}"), T)
                    .unwrap()
                    .json();
                assert_eq!(r["ok"], true, "{ctx}: {r}");
                assert_eq!(r["result"][0]["state"], "active", "{r}");

                // infer with a base64 PNG answers what `ternd infer` answers.
                let png = std::fs::read(root().join("configs/demo/inbox/digit-7.png")).unwrap();
                let b64 = {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD.encode(png)
                };
                let r = command(
                    c,
                    &name,
                    "infer",
                    &json!({"id": format!("i-{client_v5}"), "args": {"model": "digits-cnn-int8", "input": b64}}),
                );
                assert_eq!(r["result"]["top"][0]["label"], "7", "{ctx}: {r}");
            }
        }
    }
}

#[test]
fn results_are_published_with_a_sequence_and_deleted_once_acknowledged() {
    for broker in brokers() {
        let dev = format!("res-{}", broker.name());
        let b = fleet_box(&dev, &broker.url(true), "", "");
        let filter = format!("tern/{dev}/results/+");
        let mut c = client(&broker, true, &format!("{dev}-c"), &[&filter]);
        let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
        for i in [3, 5, 8] {
            let from = root().join(format!("configs/demo/inbox/digit-{i}.png"));
            std::fs::copy(from, b.inbox.join(format!("d{i}.png"))).unwrap();
        }
        let mut seqs = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..3 {
            let m = c
                .recv_on(&format!("tern/{dev}/results/digits"), T)
                .unwrap()
                .json();
            seqs.push(m["seq"].as_i64().unwrap());
            labels.push((
                m["source"].as_str().unwrap().to_string(),
                m["top"][0]["label"].as_str().unwrap().to_string(),
            ));
            assert_eq!(m["model"], "digits-cnn-int8");
            assert_eq!(m["pipeline"], "digits");
        }
        seqs.sort();
        assert_eq!(seqs, [1, 2, 3], "{}", broker.name());
        labels.sort();
        assert_eq!(
            labels,
            [("d3.png", "3"), ("d5.png", "5"), ("d8.png", "8")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        wait_for("outbox to empty after PUBACKs", T, || {
            (count(&b.state, "SELECT count(*) FROM outbox")? == 0).then_some(())
        })
        .unwrap();
    }
}

#[test]
fn repeated_command_ids_get_the_first_reply_and_act_once_even_after_restart() {
    let broker = Broker::embedded().unwrap();
    let b = fleet_box("idem-1", &broker.url(true), "", "");
    let v2 = package_version(b.dir.path(), "1.1.0");
    let mut c = client(
        &broker,
        true,
        "idem-c",
        &["tern/idem-1/state", "tern/idem-1/reply/+"],
    );
    let mut notify = NotifySocket::new(b.dir.path()).unwrap();
    let mut d = Daemon::spawn(&b.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    let first_session = wait_online(&mut c, "idem-1")["session"].as_u64().unwrap();
    // Move to 1.1.0 through a reload, so that 1.0.0 is the previous version.
    let text = std::fs::read_to_string(&b.config).unwrap().replace(
        &package("digits-cnn-int8").display().to_string(),
        &v2.display().to_string(),
    );
    std::fs::write(&b.config, text).unwrap();
    let r = command(
        &mut c,
        "idem-1",
        "config.reload",
        &json!({"id": "reload-1"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(active_version(&b.state).as_deref(), Some("1.1.0"));

    let first = command(
        &mut c,
        "idem-1",
        "models.rollback",
        &json!({"id": "rb-1", "args": {"name": "digits-cnn-int8"}}),
    );
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["result"]["active"], "1.0.0", "{first}");
    assert_eq!(active_version(&b.state).as_deref(), Some("1.0.0"));
    // A second real rollback would swap back to 1.1.0; the repeat must not.
    let again = command(
        &mut c,
        "idem-1",
        "models.rollback",
        &json!({"id": "rb-1", "args": {"name": "digits-cnn-int8"}}),
    );
    assert_eq!(again, first);
    assert_eq!(active_version(&b.state).as_deref(), Some("1.0.0"));

    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    c.recv_match("birth of the next session", T, |m| {
        m.topic == "tern/idem-1/state" && m.json()["session"].as_u64() > Some(first_session)
    })
    .unwrap();
    let after = command(
        &mut c,
        "idem-1",
        "models.rollback",
        &json!({"id": "rb-1", "args": {"name": "digits-cnn-int8"}}),
    );
    assert_eq!(after, first);
    assert_eq!(active_version(&b.state).as_deref(), Some("1.0.0"));
    // A new id does act.
    let other = command(
        &mut c,
        "idem-1",
        "models.rollback",
        &json!({"id": "rb-2", "args": {"name": "digits-cnn-int8"}}),
    );
    assert_eq!(other["result"]["active"], "1.1.0", "{other}");
    assert_eq!(active_version(&b.state).as_deref(), Some("1.1.0"));
}

#[test]
fn malformed_unknown_and_oversized_commands_get_the_right_code_and_change_nothing() {
    let broker = Broker::embedded().unwrap();
    let b = fleet_box(
        "bad-1",
        &broker.url(true),
        "[fleet.commands]\nmax_payload_bytes = 4096",
        "",
    );
    let mut c = client(
        &broker,
        true,
        "bad-c",
        &["tern/bad-1/state", "tern/bad-1/reply/+"],
    );
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_online(&mut c, "bad-1");
    let send_raw = |c: &mut Client, name: &str, payload: &[u8]| {
        c.publish(&format!("tern/bad-1/cmd/{name}"), payload, None)
            .unwrap();
    };
    let cases: Vec<(&str, Vec<u8>, &str, &str, &str)> = vec![
        (
            "ping",
            b"{not json".to_vec(),
            "invalid",
            "bad_request",
            "not JSON",
        ),
        (
            "ping",
            b"[1,2]".to_vec(),
            "invalid",
            "bad_request",
            "JSON object",
        ),
        (
            "ping",
            br#"{"args":{}}"#.to_vec(),
            "invalid",
            "bad_request",
            "`id` is missing",
        ),
        (
            "ping",
            br#"{"id":"a/b"}"#.to_vec(),
            "invalid",
            "bad_request",
            "`id` must be",
        ),
        (
            "ping",
            br#"{"id":7}"#.to_vec(),
            "invalid",
            "bad_request",
            "must be a string",
        ),
        (
            "ping",
            br#"{"id":"m1","extra":1}"#.to_vec(),
            "m1",
            "bad_request",
            "unknown field `extra`",
        ),
        (
            "ping",
            br#"{"id":"m2","args":[1]}"#.to_vec(),
            "m2",
            "bad_request",
            "`args` must be",
        ),
        (
            "reboot",
            br#"{"id":"m3"}"#.to_vec(),
            "m3",
            "unknown_command",
            "no command `reboot`",
        ),
        (
            "results.query",
            br#"{"id":"m4","args":{"since":"yesterday"}}"#.to_vec(),
            "m4",
            "bad_request",
            "invalid type",
        ),
        (
            "results.query",
            br#"{"id":"m5","args":{"limit":100000}}"#.to_vec(),
            "m5",
            "bad_request",
            "limit must be",
        ),
        (
            "models.activate",
            br#"{"id":"m6","args":{"name":"digits-cnn-int8"}}"#.to_vec(),
            "m6",
            "bad_request",
            "missing field `version`",
        ),
        (
            "models.activate",
            br#"{"id":"m7","args":{"name":"digits-cnn-int8","version":"9.9.9"}}"#.to_vec(),
            "m7",
            "not_found",
            "not installed",
        ),
        (
            "models.activate",
            br#"{"id":"m8","args":{"name":"digits-cnn-int8","version":"one"}}"#.to_vec(),
            "m8",
            "bad_request",
            "version `one`",
        ),
        (
            "models.rollback",
            br#"{"id":"m9","args":{"name":"digits-cnn-int8"}}"#.to_vec(),
            "m9",
            "conflict",
            "no previous version",
        ),
        (
            "infer",
            br#"{"id":"m10","args":{"model":"nope","input":[1]}}"#.to_vec(),
            "m10",
            "not_found",
            "no active version",
        ),
        (
            "infer",
            br#"{"id":"m11","args":{"model":"digits-cnn-int8","input":"bm90IGFuIGltYWdl"}}"#
                .to_vec(),
            "m11",
            "bad_request",
            "bad input",
        ),
        (
            "log.level",
            br#"{"id":"m12","args":{"level":"lots[[["}}"#.to_vec(),
            "m12",
            "bad_request",
            "not a log filter",
        ),
    ];
    for (name, payload, id, code, says) in &cases {
        send_raw(&mut c, name, payload);
        let r = c
            .recv_on(&format!("tern/bad-1/reply/{id}"), T)
            .unwrap()
            .json();
        assert_eq!(r["ok"], false, "{name} {r}");
        assert_eq!(
            r["error"]["code"],
            *code,
            "{name} {}: {r}",
            String::from_utf8_lossy(payload)
        );
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{name}: {msg:?} should say {says:?}");
    }
    // Bounded before parsing: 5000 bytes of valid JSON is still too much.
    let big =
        json!({"id": "big-1", "args": {"model": "digits-cnn-int8", "input": "A".repeat(5000)}});
    send_raw(&mut c, "infer", big.to_string().as_bytes());
    let r = c.recv_on("tern/bad-1/reply/invalid", T).unwrap().json();
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than the 4096 allowed"),
        "{r}"
    );
    // Nothing changed: the model is still active and the box still answers.
    assert_eq!(active_version(&b.state).as_deref(), Some("1.0.0"));
    let ok = command(&mut c, "bad-1", "ping", &json!({"id": "after"}));
    assert_eq!(ok["ok"], true, "{ok}");
}

#[test]
fn a_command_flood_is_bounded_by_the_queue_and_answered_busy() {
    let broker = Broker::embedded().unwrap();
    let b = fleet_box(
        "flood-1",
        &broker.url(true),
        "[fleet.commands]\nqueue = 2",
        "",
    );
    let mut c = client(
        &broker,
        true,
        "flood-c",
        &["tern/flood-1/state", "tern/flood-1/reply/+"],
    );
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_online(&mut c, "flood-1");
    let png = std::fs::read(root().join("configs/demo/inbox/digit-7.png")).unwrap();
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(png)
    };
    let n = 300;
    for i in 0..n {
        let p = json!({"id": format!("f-{i}"), "args": {"model": "digits-cnn-int8", "input": b64}});
        c.publish("tern/flood-1/cmd/infer", p.to_string().as_bytes(), None)
            .unwrap();
    }
    let (mut ok, mut busy) = (0, 0);
    for _ in 0..n {
        let r = c
            .recv_match("a flood reply", T, |m| {
                m.topic.starts_with("tern/flood-1/reply/f-")
            })
            .unwrap()
            .json();
        match (r["ok"].as_bool(), r["error"]["code"].as_str()) {
            (Some(true), _) => ok += 1,
            (Some(false), Some("busy")) => busy += 1,
            _ => panic!("unexpected reply {r}"),
        }
    }
    assert_eq!(ok + busy, n);
    assert!(
        busy > 0,
        "a queue of 2 took {n} commands without a single busy"
    );
    assert!(ok > 0);
    // Busy is not remembered: the same id, sent again once the flood is over, is served.
    let busy_id = (0..n).map(|i| format!("f-{i}")).find(|id| {
        count(
            &b.state,
            &format!("SELECT count(*) FROM command_replies WHERE id = '{id}'"),
        ) == Some(0)
    });
    if let Some(id) = busy_id {
        let r = command(
            &mut c,
            "flood-1",
            "infer",
            &json!({"id": id, "args": {"model": "digits-cnn-int8", "input": b64}}),
        );
        assert_eq!(r["ok"], true, "{r}");
    }
}
