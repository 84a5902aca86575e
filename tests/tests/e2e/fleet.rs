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
    fleet_box_with("digits-cnn-int8", device, broker_url, fleet_extra, extra)
}

pub fn fleet_box_with(
    model: &str,
    device: &str,
    broker_url: &str,
    fleet_extra: &str,
    extra: &str,
) -> FleetBox {
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
model = "{model}"
{extra}
[fleet]
broker = "{broker_url}"
device = "{device}"
groups = ["lab"]
{telemetry}
{fleet_extra}
"#,
        pkg = package(model).display(),
        // Quiet unless a test asks for telemetry.
        telemetry = if fleet_extra.contains("telemetry_secs") {
            ""
        } else {
            "telemetry_secs = 3600"
        }
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

pub fn active_version(state: &Path) -> Option<String> {
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
pub fn package_version(dir: &Path, version: &str) -> PathBuf {
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
        tern_tests::mqtt::Kind::Mosquitto | tern_tests::mqtt::Kind::Ejabberd => vec![true, false],
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
                    "response_topics = [\"answers/#\"]"
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
    // The id cannot be reused for another command, which would then go unanswered.
    let reuse = command(&mut c, "idem-1", "ping", &json!({"id": "rb-1"}));
    assert_eq!(reuse["error"]["code"], "conflict", "{reuse}");
    assert!(
        reuse["error"]["message"]
            .as_str()
            .unwrap()
            .contains("different command"),
        "{reuse}"
    );
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

mod signed {
    use super::*;
    use tern_update::command::{self as signing, SigningKey};

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&signing::generate_pkcs8()).unwrap()
    }

    /// A signed payload with a chosen nonce (the operator tool always picks a fresh one).
    fn with_nonce(
        k: &SigningKey,
        name: &str,
        target: &str,
        id: &str,
        args: Value,
        nonce: &str,
    ) -> Value {
        use base64::Engine as _;
        let ts = now();
        let sig = k.sign(&signing::signed_bytes(name, target, ts, nonce, id, &args));
        json!({"id": id, "args": args, "auth": {"target": target, "ts": ts, "nonce": nonce,
            "sig": base64::engine::general_purpose::STANDARD.encode(sig)}})
    }

    #[test]
    fn signed_command_matrix_refuses_everything_but_a_good_signature_and_changes_nothing() {
        let broker = Broker::embedded().unwrap();
        let trusted = key();
        let stranger = key();
        let fleet_extra = format!(
            "[fleet.commands]\nkeys = [\"{}\"]\nmax_skew_secs = 60",
            trusted.public().to_base64()
        );
        let b = fleet_box("sig-1", &broker.url(true), &fleet_extra, "");
        let v2 = package_version(b.dir.path(), "1.1.0");
        let mut c = client(
            &broker,
            true,
            "sig-c",
            &["tern/sig-1/state", "tern/sig-1/reply/+"],
        );
        let d = Daemon::spawn(&b.config, None, &[]).unwrap();
        wait_online(&mut c, "sig-1");
        // 1.1.0 active with 1.0.0 as previous, through SIGHUP (config.reload must be signed).
        let text = std::fs::read_to_string(&b.config).unwrap().replace(
            &package("digits-cnn-int8").display().to_string(),
            &v2.display().to_string(),
        );
        std::fs::write(&b.config, text).unwrap();
        d.signal("HUP").unwrap();
        wait_for("1.1.0 to be active", T, || {
            (active_version(&b.state)? == "1.1.0").then_some(())
        })
        .unwrap();

        let rb = json!({"name": "digits-cnn-int8"});
        let sign = |k: &SigningKey, target: &str, id: &str, ts: i64| {
            signing::sign(k, "models.rollback", target, id, rb.clone(), ts)
        };
        let mut tampered = sign(&trusted, "sig-1", "bad-sig", now());
        let sig = tampered["auth"]["sig"].as_str().unwrap().to_string();
        let flipped = if sig.starts_with('A') { "B" } else { "A" }.to_string() + &sig[1..];
        tampered["auth"]["sig"] = json!(flipped);
        let mut other_args = sign(&trusted, "sig-1", "other-args", now());
        other_args["args"] = json!({"name": "something-else"});

        let refusals: Vec<(&str, Value, &str)> = vec![
            (
                "unsigned",
                json!({"id": "unsigned", "args": rb}),
                "not signed",
            ),
            ("bad signature", tampered, "does not verify"),
            (
                "untrusted key",
                sign(&stranger, "sig-1", "stranger", now()),
                "does not verify",
            ),
            (
                "arguments changed after signing",
                other_args,
                "does not verify",
            ),
            (
                "expired",
                sign(&trusted, "sig-1", "old", now() - 3600),
                "clock skew",
            ),
            (
                "from the future",
                sign(&trusted, "sig-1", "future", now() + 3600),
                "clock skew",
            ),
            (
                "another device",
                sign(&trusted, "box-2", "elsewhere", now()),
                "addressed to `box-2`",
            ),
            (
                "malformed auth",
                json!({"id": "mal", "args": rb, "auth": {"sig": 1}}),
                "malformed",
            ),
        ];
        for (case, payload, says) in &refusals {
            let r = command(&mut c, "sig-1", "models.rollback", payload);
            assert_eq!(r["ok"], false, "{case}: {r}");
            assert_eq!(r["error"]["code"], "unauthorized", "{case}: {r}");
            let msg = r["error"]["message"].as_str().unwrap();
            assert!(msg.contains(says), "{case}: {msg:?} should say {says:?}");
            assert_eq!(
                active_version(&b.state).as_deref(),
                Some("1.1.0"),
                "{case} changed state"
            );
        }
        // A device command signed for this device but sent to its group is refused too.
        let dev_signed = sign(&trusted, "sig-1", "wrong-topic", now());
        c.publish(
            "tern/fleet/lab/cmd/models.rollback",
            dev_signed.to_string().as_bytes(),
            None,
        )
        .unwrap();
        let r = c.recv_on("tern/sig-1/reply/wrong-topic", T).unwrap().json();
        assert_eq!(r["error"]["code"], "unauthorized", "{r}");
        assert_eq!(active_version(&b.state).as_deref(), Some("1.1.0"));

        // Read-only commands stay unsigned by default.
        let st = command(&mut c, "sig-1", "status", &json!({"id": "st"}));
        assert_eq!(st["ok"], true, "{st}");

        // The good one acts once; its exact replay gets the first reply and acts not again.
        let good = with_nonce(
            &trusted,
            "models.rollback",
            "sig-1",
            "good",
            rb.clone(),
            "0123456789abcdef0123",
        );
        let r = command(&mut c, "sig-1", "models.rollback", &good);
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(active_version(&b.state).as_deref(), Some("1.0.0"));
        let again = command(&mut c, "sig-1", "models.rollback", &good);
        assert_eq!(again, r);
        assert_eq!(active_version(&b.state).as_deref(), Some("1.0.0"));
        // The same nonce under a new id (validly signed) is a replay.
        let reuse = with_nonce(
            &trusted,
            "models.rollback",
            "sig-1",
            "reuse",
            rb.clone(),
            "0123456789abcdef0123",
        );
        let r = command(&mut c, "sig-1", "models.rollback", &reuse);
        assert_eq!(r["error"]["code"], "unauthorized", "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("nonce was already used"),
            "{r}"
        );
        assert_eq!(active_version(&b.state).as_deref(), Some("1.0.0"));
        // A group command signed for the group works on the group topic.
        let grp = signing::sign(
            &trusted,
            "models.rollback",
            "group:lab",
            "grp",
            rb.clone(),
            now(),
        );
        c.publish(
            "tern/fleet/lab/cmd/models.rollback",
            grp.to_string().as_bytes(),
            None,
        )
        .unwrap();
        let r = c.recv_on("tern/sig-1/reply/grp", T).unwrap().json();
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(active_version(&b.state).as_deref(), Some("1.1.0"));
    }
}

#[test]
fn presence_birth_on_connect_offline_on_stop_last_will_on_kill_and_announce() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let b = fleet_box("pres-1", &broker.url(true), "keep_alive_secs = 5", "");
    let mut c = client(&broker, false, "pres-c", &["tern/pres-1/state"]);
    let mut d = Daemon::spawn(&b.config, None, &[]).unwrap();
    let s1 = wait_online(&mut c, "pres-1")["session"].as_u64().unwrap();

    // The fleet asks everyone to announce: the box repeats its birth.
    let asker = client(&broker, true, "pres-asker", &[]);
    asker.publish("tern/fleet/announce", b"{}", None).unwrap();
    let again = wait_online(&mut c, "pres-1");
    assert_eq!(
        again["session"].as_u64(),
        Some(s1),
        "announce is not a new session"
    );

    d.signal("TERM").unwrap();
    // A birth may be repeated at start (connect and first status race); what matters is the
    // next thing that is not a birth.
    let not_online =
        |m: &tern_tests::mqtt::Msg| m.topic == "tern/pres-1/state" && m.json()["state"] != "online";
    let off = c.recv_match("offline at stop", T, not_online).unwrap();
    assert_eq!(
        off.json(),
        json!({"state": "offline", "device": "pres-1", "groups": ["lab"], "graceful": true})
    );
    assert!(d.wait(T).unwrap().success());

    let mut d = Daemon::spawn(&b.config, None, &[]).unwrap();
    let s2 = wait_online(&mut c, "pres-1")["session"].as_u64().unwrap();
    assert!(
        s2 > s1,
        "session counter must increase on every connect: {s1} then {s2}"
    );
    d.signal("KILL").unwrap();
    d.wait(T).unwrap();
    // The broker publishes the last will once the connection is gone.
    let will = c.recv_match("the last will", T, not_online).unwrap();
    assert_eq!(
        will.json(),
        json!({"state": "offline", "device": "pres-1", "groups": ["lab"], "graceful": false})
    );
    // And it is retained: a newcomer learns the box is offline.
    let mut late = client(&broker, false, "pres-late", &["tern/pres-1/state"]);
    let m = late.recv_on("tern/pres-1/state", T).unwrap();
    assert!(m.retain, "state must be retained");
    assert_eq!(m.json()["state"], "offline");
}

#[test]
fn telemetry_reports_process_models_and_backlog() {
    let broker = Broker::embedded().unwrap();
    let b = fleet_box("tele-1", &broker.url(true), "telemetry_secs = 1", "");
    let mut c = client(&broker, true, "tele-c", &["tern/tele-1/telemetry"]);
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    std::fs::copy(
        root().join("configs/demo/inbox/digit-4.png"),
        b.inbox.join("x.png"),
    )
    .unwrap();
    let t = c
        .recv_match("telemetry after a result", T, |m| {
            m.topic == "tern/tele-1/telemetry" && m.json()["models"][0]["requests"] == 1
        })
        .unwrap()
        .json();
    assert!(t["rss_bytes"].as_u64().unwrap() > 1 << 20, "{t}");
    assert!(t["disk_free_bytes"].as_u64().unwrap() > 0, "{t}");
    assert!(t["cpu_percent"].as_f64().is_some(), "{t}");
    let m = &t["models"][0];
    assert_eq!(m["name"], "digits-cnn-int8");
    assert_eq!(m["errors"], 0);
    assert_eq!(m["latency_us"]["samples"], 1);
    let p50 = m["latency_us"]["p50"].as_u64().unwrap();
    assert!(
        p50 > 0 && p50 == m["latency_us"]["p99"].as_u64().unwrap(),
        "{m}"
    );
    assert_eq!(t["pipelines"][0]["results"], 1, "{t}");
    assert!(t["outbox"]["rows"].as_i64().is_some(), "{t}");
    assert!(t["seq"].as_i64().unwrap() >= 1);
    // The latest is retained: a fleet view that connects later reads it at once.
    let mut late = client(&broker, false, "tele-late", &["tern/tele-1/telemetry"]);
    let m = late.recv_on("tern/tele-1/telemetry", T).unwrap();
    assert!(m.retain, "telemetry must be retained");
    assert!(m.json()["seq"].as_i64().unwrap() >= t["seq"].as_i64().unwrap());
}

mod loss {
    use super::*;
    use std::collections::HashMap;

    fn results(state: &Path) -> i64 {
        count(state, "SELECT count(*) FROM results").unwrap_or(0)
    }

    /// 10,000 results while the broker is stopped and restarted 5 times and ternd is killed
    /// with SIGKILL twice: a subscriber must see every sequence number.
    #[test]
    fn ten_thousand_results_through_five_broker_restarts_and_two_kill_9_lose_nothing() {
        let Some(mut broker) = Broker::mosquitto_with(tern_tests::mqtt::MosquittoOptions {
            persistent: true,
            ..Default::default()
        })
        .unwrap() else {
            return;
        };
        const N: i64 = 10_000;
        let b = fleet_box_with(
            "digits-mlp-int8",
            "loss-1",
            &broker.url(true),
            "keep_alive_secs = 5",
            "",
        );
        let digits: Vec<Vec<u8>> = (0..10)
            .map(|i| {
                std::fs::read(root().join(format!("configs/demo/inbox/digit-{i}.png"))).unwrap()
            })
            .collect();
        for i in 0..N as usize {
            std::fs::write(b.inbox.join(format!("{i:05}.png")), &digits[i % 10]).unwrap();
        }
        // A persistent session: the broker keeps the subscription and queues for it while it
        // is away, and (with persistence) across its own restarts.
        let mut sub = Client::connect(
            &broker,
            ClientOptions {
                v5: false,
                id: "loss-sub",
                subscribe: &["tern/loss-1/results/+"],
                persistent: true,
            },
        )
        .unwrap();
        let mut seen: HashMap<i64, u32> = HashMap::new();
        // Order: a sequence number seen for the first time must be above every one seen
        // before it (resends after an outage repeat old numbers; they never jump ahead).
        let mut out_of_order = Vec::new();
        let mut max_seen = 0i64;
        let mut take = |sub: &mut Client, seen: &mut HashMap<i64, u32>| {
            while let Some(m) = sub.recv_any(Duration::from_millis(1)) {
                let seq = m.json()["seq"].as_i64().expect("every result has a seq");
                let n = seen.entry(seq).or_default();
                if *n == 0 && seq < max_seen {
                    out_of_order.push((seq, max_seen));
                }
                max_seen = max_seen.max(seq);
                *n += 1;
            }
        };

        let mut d = Daemon::spawn(&b.config, None, &[]).unwrap();
        // Outages and kills at points spread over the run, chosen by results stored so far.
        let mut plan: Vec<(i64, &str)> = vec![
            (800, "broker"),
            (1800, "kill"),
            (2800, "broker"),
            (4000, "broker"),
            (5200, "kill"),
            (6400, "broker"),
            (7600, "broker"),
        ];
        plan.reverse();
        let long = Duration::from_secs(600);
        while let Some((at, what)) = plan.pop() {
            wait_for(&format!("{at} results"), long, || {
                take(&mut sub, &mut seen);
                (results(&b.state) >= at).then_some(())
            })
            .unwrap();
            match what {
                "broker" => {
                    broker.stop().unwrap();
                    // Results keep coming while the broker is away; they wait in the outbox.
                    let during = results(&b.state) + 300;
                    wait_for("results during the outage", long, || {
                        (results(&b.state) >= during.min(N)).then_some(())
                    })
                    .unwrap();
                    let waiting = count(&b.state, "SELECT count(*) FROM outbox").unwrap();
                    assert!(waiting > 0, "nothing waited in the outbox during an outage");
                    broker.start().unwrap();
                }
                _ => {
                    d.signal("KILL").unwrap();
                    d.wait(T).unwrap();
                    d = Daemon::spawn(&b.config, None, &[]).unwrap();
                }
            }
        }
        wait_for("every sequence number at the subscriber", long, || {
            take(&mut sub, &mut seen);
            (seen.len() as i64 >= N).then_some(())
        })
        .unwrap();
        assert!(
            out_of_order.is_empty(),
            "first seen after a later one: {:?}",
            &out_of_order[..out_of_order.len().min(10)]
        );
        let missing: Vec<i64> = (1..=N).filter(|s| !seen.contains_key(s)).collect();
        let beyond: Vec<i64> = seen.keys().copied().filter(|s| *s > N || *s < 1).collect();
        let duplicates: u32 = seen.values().map(|c| c - 1).sum();
        eprintln!(
            "loss test: {} distinct results, {duplicates} duplicates (resent after an outage or a kill), {} missing",
            seen.len(),
            missing.len()
        );
        assert!(
            missing.is_empty(),
            "missing sequence numbers: {:?}",
            &missing[..missing.len().min(20)]
        );
        assert!(beyond.is_empty(), "unexpected sequence numbers: {beyond:?}");
        assert_eq!(results(&b.state), N, "one result per file");
        wait_for("the outbox to drain", T, || {
            (count(&b.state, "SELECT count(*) FROM outbox")? == 0).then_some(())
        })
        .unwrap();
    }
}

#[test]
fn tls_with_a_client_certificate_connects_and_a_wrong_ca_does_not() {
    if !need("openssl") {
        return;
    }
    let certs_dir = tempfile::tempdir().unwrap();
    let [ca, server_cert, server_key, client_cert, client_key] =
        tern_tests::mqtt::make_certs(certs_dir.path()).unwrap();
    let Some(broker) = Broker::mosquitto_with(tern_tests::mqtt::MosquittoOptions {
        tls: Some((ca.clone(), server_cert, server_key, true)),
        ..Default::default()
    })
    .unwrap() else {
        return;
    };
    let tls_port = broker.tls_port.unwrap();
    // MQTT 3.1.1 goes through the box's relay, which makes the TLS connection itself.
    for (proto, line) in [("v5", ""), ("v311", "\nprotocol = \"v3.1.1\"")] {
        let fleet = format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"{line}",
            ca.display(),
            client_cert.display(),
            client_key.display()
        );
        let dev = format!("tls-1-{proto}");
        let b = fleet_box(&dev, &format!("mqtts://localhost:{tls_port}"), &fleet, "");
        let mut c = client(
            &broker,
            false,
            &format!("{dev}-c"),
            &[&format!("tern/{dev}/state"), &format!("tern/{dev}/reply/+")],
        );
        let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
        wait_online(&mut c, &dev);
        let r = command(&mut c, &dev, "ping", &json!({"id": "tls-ping"}));
        assert_eq!(r["ok"], true, "{proto}: {r}");

        // A box that trusts another CA refuses the broker's certificate and says why.
        let other_dir = tempfile::tempdir().unwrap();
        let [other_ca, ..] = tern_tests::mqtt::make_certs(other_dir.path()).unwrap();
        let fleet = format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"{line}",
            other_ca.display(),
            client_cert.display(),
            client_key.display()
        );
        let b2 = fleet_box(
            &format!("tls-2-{proto}"),
            &format!("mqtts://localhost:{tls_port}"),
            &fleet,
            "",
        );
        let d2 = Daemon::spawn(&b2.config, None, &[]).unwrap();
        wait_for("a certificate error in the log", T, || {
            let log = d2.stderr();
            (log.contains("fleet link down") && log.to_lowercase().contains("certificate"))
                .then_some(())
        })
        .unwrap();
        assert!(!d2.stderr().contains("fleet link connected"), "{proto}");
    }
}

#[test]
fn past_the_disk_budget_the_oldest_results_are_dropped_and_the_drop_is_reported() {
    let Some(mut broker) = Broker::mosquitto_with(tern_tests::mqtt::MosquittoOptions {
        persistent: true,
        ..Default::default()
    })
    .unwrap() else {
        return;
    };
    const N: i64 = 200;
    let budget = 0.02; // MiB: room for a few dozen results
    let b = fleet_box_with(
        "digits-mlp-int8",
        "budget-1",
        &broker.url(true),
        "",
        &format!("[outbox]\nbudget_mib = {budget}"),
    );
    let mut sub = Client::connect(
        &broker,
        ClientOptions {
            v5: false,
            id: "budget-sub",
            subscribe: &["tern/budget-1/results/+", "tern/budget-1/events"],
            persistent: true,
        },
    )
    .unwrap();
    broker.stop().unwrap();
    let png = std::fs::read(root().join("configs/demo/inbox/digit-2.png")).unwrap();
    for i in 0..N {
        std::fs::write(b.inbox.join(format!("{i:04}.png")), &png).unwrap();
    }
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_for("all results stored", T, || {
        (count(&b.state, "SELECT count(*) FROM results")? >= N).then_some(())
    })
    .unwrap();
    let bytes = count(&b.state, "SELECT bytes FROM outbox_totals").unwrap();
    assert!(
        bytes as f64 <= budget * 1024.0 * 1024.0,
        "outbox holds {bytes} bytes, over its budget"
    );
    broker.start().unwrap();

    let drop = sub
        .recv_match("the drop report", T, |m| {
            m.topic == "tern/budget-1/events" && m.json()["stream"] == "results/digits"
        })
        .unwrap()
        .json();
    assert_eq!(drop["event"], "outbox.dropped", "{drop}");
    let (first, last, dropped) = (
        drop["first_seq"].as_i64().unwrap(),
        drop["last_seq"].as_i64().unwrap(),
        drop["count"].as_i64().unwrap(),
    );
    // The oldest went first, as one run of sequence numbers.
    assert_eq!((first, last - first + 1), (1, dropped), "{drop}");
    let mut got = std::collections::BTreeSet::new();
    wait_for("every result that was kept", T, || {
        while let Some(m) = sub.recv_any(Duration::from_millis(1)) {
            if m.topic.contains("/results/") {
                got.insert(m.json()["seq"].as_i64().unwrap());
            }
        }
        (got.len() as i64 >= N - dropped).then_some(())
    })
    .unwrap();
    let want: std::collections::BTreeSet<i64> = (last + 1..=N).collect();
    assert_eq!(got, want, "kept results must arrive, dropped ones must not");
}

/// The README's "Talking to a box" commands, run as written (plus the test broker's port).
#[test]
fn readme_mosquitto_client_commands_work_as_documented() {
    if !need("mosquitto_rr") || !need("mosquitto_sub") || !need("mosquitto_pub") {
        return;
    }
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("### Talking to a box")
        .nth(1)
        .expect("README has a Talking to a box section");
    let lines: Vec<&str> = section
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("## "))
        .filter(|l| l.starts_with("mosquitto_"))
        .collect();
    assert!(
        lines.len() >= 3,
        "expected the documented commands, got {lines:?}"
    );
    // The demo's allow-list of response topics, as configs/fleet-demo.toml has it.
    let demo = std::fs::read_to_string(root().join("configs/fleet-demo.toml")).unwrap();
    let allow = demo
        .lines()
        .find(|l| l.starts_with("response_topics"))
        .expect("fleet-demo.toml allows response topics");
    let b = fleet_box("demo-1", &broker.url(true), allow, "");
    let mut watcher = client(&broker, false, "readme-c", &["tern/demo-1/state"]);
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_online(&mut watcher, "demo-1");
    let port = format!(" -p {}", broker.port);
    let mut background = Vec::new();
    for line in &lines {
        if let Some(cmd) = line.strip_suffix('&') {
            // A listener: start it (with -d, which prints SUBACK; line-buffered, as a pipe
            // would otherwise hold the line back) and wait until it is subscribed.
            let mut child = std::process::Command::new("stdbuf")
                .args(["-oL", "sh", "-c"])
                .arg(format!("{}{port} -d", cmd.trim()))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let seen = gather_output(child.stdout.take().unwrap());
            wait_for("the listener to subscribe", T, || {
                seen.lock().unwrap().contains("SUBACK").then_some(())
            })
            .unwrap();
            background.push((line.to_string(), child, seen));
            continue;
        }
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{line}{port}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("ran `{line}{port}`: {stdout}");
        if line.starts_with("mosquitto_rr") {
            let v: Value = serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("{line}: {e}: {stdout}"));
            assert_eq!(v["ok"], true, "{v}");
            assert_eq!(v["result"]["device"], "demo-1", "{v}");
        }
    }
    assert!(!background.is_empty(), "the README shows a 3.1.1 listener");
    // Each listener exits by itself after one message (-C 1): the reply.
    for (line, mut child, seen) in background {
        let status = wait_for("the listener to get its reply", T, || {
            child.try_wait().ok().flatten()
        })
        .unwrap();
        let text = seen.lock().unwrap().clone();
        assert!(status.success(), "{line}: {text}");
        assert!(
            text.contains("\"ok\":true") && text.contains("\"device\":\"demo-1\""),
            "{line}: {text}"
        );
    }
}

/// The session task only polls MQTT: a wedged inference must not starve keep-alive, so the
/// broker never fires the last will and commands are still answered.
#[test]
fn a_hung_inference_does_not_starve_keep_alive() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let b = fleet_box("ka-1", &broker.url(true), "keep_alive_secs = 5", "");
    let mut c = client(
        &broker,
        false,
        "ka-c",
        &["tern/ka-1/state", "tern/ka-1/reply/+"],
    );
    let _d = Daemon::spawn(&b.config, None, &[("TERN_CRASH_AT", "infer:hang")]).unwrap();
    wait_online(&mut c, "ka-1");
    std::fs::copy(
        root().join("configs/demo/inbox/digit-1.png"),
        b.inbox.join("x.png"),
    )
    .unwrap();
    wait_for("the inference to start and hang", T, || {
        (count(&b.state, "SELECT attempts FROM feed_files")? == 1).then_some(())
    })
    .unwrap();
    // Three keep-alive periods with the only worker stuck: every ping is answered and the
    // state topic never says offline (mosquitto drops a client after 1.5 silent periods).
    let start = std::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(16) {
        let r = command(&mut c, "ka-1", "ping", &json!({"id": format!("ka-{i}")}));
        assert_eq!(r["ok"], true, "{r}");
        i += 1;
    }
    let offline: Vec<_> = c
        .drain()
        .into_iter()
        .filter(|m| m.topic == "tern/ka-1/state" && m.json()["state"] == "offline")
        .collect();
    assert!(
        offline.is_empty(),
        "the broker gave up on the box: {offline:?}"
    );
    // One session all along: a reconnect would have bumped the counter past the first.
    let st = command(&mut c, "ka-1", "status", &json!({"id": "ka-status"}));
    assert_eq!(st["result"]["fleet"]["connected"], true, "{st}");
    assert_eq!(st["result"]["fleet"]["session"], 1, "{st}");
}

#[test]
fn broker_login_with_a_password_file_and_a_wrong_password_is_refused() {
    if !need("mosquitto_passwd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let out = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["box-user", "s3cret"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two listeners: an authenticated one for the box, the test's own anonymous one.
    let Some(broker) = Broker::mosquitto_with(tern_tests::mqtt::MosquittoOptions {
        persistent: false,
        tls: None,
        password_file: Some(passwd.clone()),
        ..Default::default()
    })
    .unwrap() else {
        return;
    };
    let auth_port = broker.auth_port.unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let fleet = format!(
        "username = \"box-user\"\npassword_file = \"{}\"",
        dir.path().join("pw").display()
    );
    let b = fleet_box(
        "auth-1",
        &format!("mqtt://127.0.0.1:{auth_port}"),
        &fleet,
        "",
    );
    let mut c = client(&broker, false, "auth-c", &["tern/auth-1/state"]);
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_online(&mut c, "auth-1");

    let b2 = fleet_box(
        "auth-2",
        &format!("mqtt://127.0.0.1:{auth_port}"),
        "username = \"box-user\"\npassword = \"wrong\"",
        "",
    );
    let d2 = Daemon::spawn(&b2.config, None, &[]).unwrap();
    wait_for("the refusal in the log", T, || {
        let log = d2.stderr();
        let refused = ["NotAuthorized", "BadUserNamePassword"]
            .iter()
            .any(|w| log.contains(w));
        (log.contains("fleet link down") && refused).then_some(())
    })
    .unwrap();
    assert!(!d2.stderr().contains("fleet link connected"));
}
