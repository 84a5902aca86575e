//! What a publisher on the broker or a user on the box can do to a box, against mosquitto and
//! the real daemon: each test is one of issue 16's findings.

use std::time::Duration;

use serde_json::json;
use tern_tests::mqtt::Broker;
use tern_tests::*;

use crate::fleet::{client, command, fleet_box, wait_online};

const T: Duration = Duration::from_secs(60);

fn digits() -> String {
    format!(
        "[[models]]\npackage = \"{}\"\n",
        package("digits-cnn-int8").display()
    )
}

/// Finding 2: MQTT 3.1.1 cannot tell the broker the box's size limit, so a retained message
/// over it was delivered on every connection, and every connection ended on it: the box
/// reconnected about once a second and never answered. Now the message is emptied on the box
/// while it is read, logged, and the link and the feed stay up.
#[test]
fn an_oversized_retained_message_keeps_neither_a_311_box_nor_its_feed_offline() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let dev = "big311";
    let dir = tempfile::tempdir().unwrap();
    // Over the box's command limit (a chunk, 1 MiB, plus headers) and the feed's 64 KiB.
    let big = vec![b'x'; 3 << 20];
    let mut publisher = client(&broker, false, "big-publisher", &["big-sync"]);
    publisher
        .publish_retained(&format!("tern/{dev}/cmd/status"), &big)
        .unwrap();
    publisher.publish_retained("site/cam0/image", &big).unwrap();
    publisher.sync("big-sync").unwrap();

    let config = dir.path().join("ternd.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "state"
[dbus]
bus = "none"
{models}
[[feeds]]
kind = "mqtt"
name = "site"
topic = "site/+/image"
broker = "{url}"
max_payload_bytes = 65536

[[pipelines]]
name = "images"
feed = "site"
model = "digits-cnn-int8"

[fleet]
broker = "{url}"
protocol = "v3.1.1"
device = "{dev}"
telemetry_secs = 3600
"#,
            models = digits(),
            url = broker.url(false),
        ),
    )
    .unwrap();
    let mut c = client(
        &broker,
        false,
        "big-test",
        &[&format!("tern/{dev}/state"), &format!("tern/{dev}/reply/+")],
    );
    let mut d = Daemon::spawn(&config, None, &[]).unwrap();
    wait_online(&mut c, dev);
    let st = command(&mut c, dev, "status", &json!({"id": "after-big"}));
    assert_eq!(st["ok"], true, "{st}");

    // The feed skipped the image it could not take and reads the next one.
    let png = std::fs::read(root().join("configs/demo/inbox/digit-7.png")).unwrap();
    c.publish("site/cam1/image", &png, None).unwrap();
    let state = dir.path().join("state");
    wait_for("the small image's result", T, || {
        (count(
            &state,
            "SELECT count(*) FROM results WHERE pipeline = 'images'",
        )? == 1)
            .then_some(())
    })
    .unwrap();
    let source: String = db(&state)
        .unwrap()
        .query_row("SELECT source FROM results", [], |r| r.get(0))
        .unwrap();
    assert_eq!(source, "site/cam1/image");
    let p = command(&mut c, dev, "pipelines.list", &json!({"id": "pl"}));
    let images = &p["result"][0];
    assert_eq!(images["garbage"], 1, "{p}");
    assert_eq!(images["restarts"], 0, "{p}");

    // One more, live this time, while connected: dropped the same way, and the link stays.
    c.publish(&format!("tern/{dev}/cmd/status"), &big, None)
        .unwrap();
    let st = command(&mut c, dev, "status", &json!({"id": "after-live-big"}));
    assert_eq!(st["ok"], true, "{st}");

    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    let log = d.stderr();
    let connects = log.matches("fleet link connected").count();
    assert_eq!(connects, 1, "one connection, kept:\n{log}");
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("dropped an MQTT message over the size limit"))
        .collect();
    assert!(
        warned
            .iter()
            .any(|l| l.contains(&format!("tern/{dev}/cmd/status"))),
        "{log}"
    );
    // Logged once per topic, though two came on it.
    assert_eq!(
        warned
            .iter()
            .filter(|l| l.contains(&format!("tern/{dev}/cmd/status")))
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("over max_payload_bytes (65536); dropped unread"),
        "{log}"
    );
}

/// Finding 4: a box answered on any MQTT 5 response topic outside its prefix, so a party that
/// may publish commands but not read replies could read results by naming its own topic, and a
/// group command made every box of the group send up to 120 KiB there. Now response topics
/// are confined to the box's own `reply/` and `fleet.response_topics`, and a group command's
/// reply is held to 16 KiB.
#[test]
fn replies_go_only_to_allowed_response_topics_and_group_replies_are_small() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let dev = "answers5";
    let b = fleet_box(
        dev,
        &broker.url(true),
        "response_topics = [\"ops/answers/#\"]",
        "",
    );
    // Results enough that a page of them is well over 16 KiB.
    let png = std::fs::read(root().join("configs/demo/inbox/digit-7.png")).unwrap();
    for i in 0..120 {
        std::fs::write(b.inbox.join(format!("d{i:03}.png")), &png).unwrap();
    }
    let mut c = client(
        &broker,
        true,
        "answers-c",
        &[
            &format!("tern/{dev}/state"),
            &format!("tern/{dev}/reply/+"),
            "ops/answers/#",
            "elsewhere/#",
            "tern/other/#",
        ],
    );
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_online(&mut c, dev);
    wait_for("120 results", T, || {
        (count(&b.state, "SELECT count(*) FROM results")? == 120).then_some(())
    })
    .unwrap();

    // results.query for a page as large as a reply may be; ping for a small reply.
    let ask = |c: &mut tern_tests::mqtt::Client, topic: &str, id: &str, response: &str| {
        let body = if topic.ends_with("/ping") {
            json!({"id": id})
        } else {
            json!({"id": id, "args": {"limit": 1000}})
        };
        c.publish(
            topic,
            body.to_string().as_bytes(),
            Some((response, b"corr")),
        )
        .unwrap();
    };
    // Allowed: answered where asked.
    ask(
        &mut c,
        &format!("tern/{dev}/cmd/results.query"),
        "q-ok",
        "ops/answers/me",
    );
    let r = c.recv_on("ops/answers/me", T).unwrap().json();
    assert_eq!(r["id"], "q-ok", "{r}");
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["result"]["results"].as_array().unwrap().len() > 40, "{r}");

    // Outside the allow-list, and inside tern's own topics: the reply goes to the box's own
    // reply topic instead, whose readers the broker's ACL decides.
    for (id, response) in [
        ("q-out", "elsewhere/me"),
        ("q-ours", "tern/other/cmd/models.rollback"),
    ] {
        ask(
            &mut c,
            &format!("tern/{dev}/cmd/results.query"),
            id,
            response,
        );
        let r = c
            .recv_on(&format!("tern/{dev}/reply/{id}"), T)
            .unwrap()
            .json();
        assert_eq!(r["ok"], true, "{r}");
    }
    // Nothing came on the topics that were not allowed: the broker handles one client's
    // messages in order, so after a round trip on an allowed topic nothing else is on its way.
    ask(
        &mut c,
        &format!("tern/{dev}/cmd/ping"),
        "sync",
        "ops/answers/sync",
    );
    let r = c.recv_on("ops/answers/sync", T).unwrap().json();
    assert_eq!(r["ok"], true, "{r}");
    let stray: Vec<String> = c
        .drain()
        .into_iter()
        .map(|m| m.topic)
        .filter(|t| t.starts_with("elsewhere/") || t.starts_with("tern/other/"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // A group command's reply is small or an error that says why; the box itself answers in
    // full.
    ask(
        &mut c,
        "tern/fleet/lab/cmd/results.query",
        "g-big",
        "ops/answers/group",
    );
    let r = c.recv_on("ops/answers/group", T).unwrap().json();
    assert_eq!(r["ok"], false, "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("16384-byte limit for a group command"), "{r}");
    ask(
        &mut c,
        "tern/fleet/lab/cmd/ping",
        "g-small",
        "ops/answers/group",
    );
    let r = c.recv_on("ops/answers/group", T).unwrap().json();
    assert_eq!(r["ok"], true, "{r}");
}
