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

/// Finding 5: remembered replies were bounded in count only (10,000 replies of up to ~96 KiB,
/// outside every budget), and a watched folder's `feed_files` rows stayed forever after their
/// files were gone. Now replies are held to 8 MiB, newest kept, and a folder's rows follow its
/// files.
#[test]
fn remembered_replies_and_folder_rows_stay_bounded() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let dev = "bounded";
    let b = fleet_box(dev, &broker.url(false), "protocol = \"v3.1.1\"", "");
    // 400 results: a page of `results.query` is then its largest (96 KiB).
    let png = std::fs::read(root().join("configs/demo/inbox/digit-7.png")).unwrap();
    for i in 0..400 {
        std::fs::write(b.inbox.join(format!("d{i:03}.png")), &png).unwrap();
    }
    let mut c = client(
        &broker,
        false,
        "bounded-c",
        &[&format!("tern/{dev}/state"), &format!("tern/{dev}/reply/+")],
    );
    let mut d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_online(&mut c, dev);
    wait_for("400 results", T, || {
        (count(&b.state, "SELECT count(*) FROM results")? == 400).then_some(())
    })
    .unwrap();

    let mut sizes = Vec::new();
    for i in 0..120 {
        let r = command(
            &mut c,
            dev,
            "results.query",
            &json!({"id": format!("q{i:03}"), "args": {"limit": 1000}}),
        );
        assert_eq!(r["ok"], true, "{r}");
        sizes.push(r.to_string().len());
    }
    let asked: usize = sizes.iter().sum();
    assert!(
        asked > 10 << 20,
        "the replies asked for ({asked} bytes) exceed the cap"
    );
    let (rows, bytes): (i64, i64) = db(&b.state)
        .unwrap()
        .query_row(
            "SELECT count(*), ifnull(sum(length(reply)), 0) FROM command_replies",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(bytes <= 8 << 20, "{bytes} bytes of replies kept");
    assert!(rows < 120 && rows > 50, "{rows} replies kept");
    // The newest are the ones kept; the first are remembered no more.
    let kept: Vec<String> = column(&b.state, "SELECT id FROM command_replies ORDER BY id");
    assert!(kept.contains(&"q119".to_string()), "{kept:?}");
    assert!(!kept.contains(&"q000".to_string()), "{kept:?}");

    // Files gone from the folder are forgotten (at the next full scan: here, the start).
    let names: i64 = count(&b.state, "SELECT count(*) FROM feed_files").unwrap();
    assert_eq!(names, 400);
    for i in 0..300 {
        std::fs::remove_file(b.inbox.join(format!("d{i:03}.png"))).unwrap();
    }
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_online(&mut c, dev);
    wait_for("the rows of removed files forgotten", T, || {
        (count(&b.state, "SELECT count(*) FROM feed_files")? == 100).then_some(())
    })
    .unwrap();
    // The files still there are still known as done: nothing was read twice.
    assert_eq!(count(&b.state, "SELECT count(*) FROM results"), Some(400));
}

fn status_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Finding 10: `InferTensor` built a JSON tree of its whole argument (tens of times its size,
/// per concurrent call, open to every local user), and `InstallBundle` of a FIFO wedged the
/// updater for good. Now inputs are capped, read straight into numbers, at most 8 calls at
/// once, and only a regular file is read as a bundle. The flood: 1,000 calls with junk
/// tensors of 512 KiB, 8 at a time, and 20 over the cap; the daemon's peak RSS stays within
/// twice its idle RSS and it answers afterwards.
#[test]
fn dbus_arguments_are_bounded_and_a_fifo_is_no_bundle() {
    let Some(bus) = tern_tests::dbus::system_bus() else {
        return;
    };
    if !need_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let k = tern_tests::updates::key();
    let cfg = d.path().join("ternd.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"state\"\n{models}[dbus]\nbus = \"{}\"\n[updates]\nkeys = [\"{}\"]\n",
            bus.address,
            k.public().to_base64(),
            models = digits(),
        ),
    )
    .unwrap();
    let daemon = Daemon::spawn(&cfg, None, &[]).unwrap();
    let pid = daemon.pid();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let p = ternd::local::client::Daemon1Proxy::new(&conn)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + T;
        while p.status().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "ternd on the bus");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let tensor = |values: usize| {
            let row = vec!["0"; 64].join(",");
            let rows = vec![format!("[{row}]"); values / 64].join(",");
            format!("[[{rows}]]")
        };
        // One call first, so that what a first call sets up once counts as idle.
        let first = p.infer_tensor("digits-cnn-int8", &tensor(64)).await;
        assert!(first.is_err(), "a 1×1×64 tensor is no input of the CNN");
        let idle = status_kib(pid, "VmRSS:");
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();

        // 512 KiB of numbers, ragged only at the very end.
        let junk = {
            let t = tensor(256 * 1024);
            format!("{},[0]]", &t[..t.len() - 1])
        };
        assert!(junk.len() > 512 * 1024, "{}", junk.len());
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..1000 {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let (p, junk) = (p.clone(), junk.clone());
            calls.spawn(async move {
                let r = p.infer_tensor("digits-cnn-int8", &junk).await;
                drop(permit);
                r
            });
        }
        let mut ragged = 0;
        while let Some(r) = calls.join_next().await {
            match r.unwrap() {
                Err(zbus::Error::MethodError(name, Some(m), _)) => {
                    if name.as_str() == "io.tern.Error.BadRequest" && m.contains("ragged") {
                        ragged += 1;
                    } else {
                        assert_eq!(name.as_str(), "io.tern.Error.Busy", "{m}");
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(ragged > 0);
        let over = "[".to_string() + &"0,".repeat(8 * 1024 * 1024 + 1) + "0]";
        for _ in 0..20 {
            match p.infer_tensor("digits-cnn-int8", &over).await {
                Err(zbus::Error::MethodError(name, Some(m), _)) => {
                    assert_eq!(name.as_str(), "io.tern.Error.BadRequest", "{m}");
                    assert!(m.contains("over the 16777216-byte limit"), "{m}");
                }
                other => panic!("{other:?}"),
            }
        }
        let peak = status_kib(pid, "VmHWM:");
        eprintln!("D-Bus flood: idle RSS {idle} KiB, peak {peak} KiB, {ragged} of 1000 read");
        assert!(
            peak <= 2 * idle,
            "peak RSS {peak} KiB over twice the idle {idle} KiB"
        );

        // A FIFO named as a bundle is refused at once, and the updater still takes work.
        let fifo = d.path().join("pipe.bundle");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let r = tokio::time::timeout(T, p.install_bundle(fifo.to_str().unwrap()))
            .await
            .expect("InstallBundle of a FIFO answers");
        match r {
            Err(zbus::Error::MethodError(_, Some(m), _)) => {
                assert!(m.contains("not a regular file"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let junk_file = d.path().join("junk.bundle");
        std::fs::write(&junk_file, b"not a tar").unwrap();
        let r = tokio::time::timeout(T, p.install_bundle(junk_file.to_str().unwrap()))
            .await
            .expect("the updater answers after the FIFO");
        assert!(r.is_err(), "{r:?}");
        p.status().await.unwrap();
    });
}

/// The flood: 10,000 junk messages on each topic the box subscribes to (its commands, its
/// group's, the announce, the key set, its and its group's update topics, and an MQTT feed),
/// while a folder feeds it work. The link stays up, results keep coming, the outbox and the
/// remembered replies stay within their budgets, and the daemon's peak RSS stays within twice
/// its idle RSS.
#[test]
fn a_flood_of_junk_on_every_subscribed_topic_changes_nothing_that_matters() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    if !need_root() {
        return;
    }
    const N: usize = 10_000;
    let dev = "flooded";
    let k = tern_tests::updates::key();
    let extra = format!(
        "[updates]\nkeys = [\"{}\"]\n[outbox]\nbudget_mib = 1\n\
         [[feeds]]\nkind = \"mqtt\"\nname = \"site\"\ntopic = \"site/+/image\"\n\
         [[pipelines]]\nname = \"site\"\nfeed = \"site\"\nmodel = \"digits-cnn-int8\"\n",
        k.public().to_base64()
    );
    let b = fleet_box(dev, &broker.url(true), "telemetry_secs = 3600", &extra);
    let mut c = client(
        &broker,
        true,
        "flood-c",
        &[&format!("tern/{dev}/state"), &format!("tern/{dev}/reply/+")],
    );
    let mut d = Daemon::spawn(&b.config, None, &[]).unwrap();
    let pid = d.pid();
    wait_online(&mut c, dev);
    let r = command(&mut c, dev, "status", &json!({"id": "before"}));
    assert_eq!(r["ok"], true, "{r}");
    let idle = status_kib(pid, "VmRSS:");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();

    let png = std::fs::read(root().join("configs/demo/inbox/digit-7.png")).unwrap();
    let publisher = client(&broker, true, "flood-p", &[]);
    for i in 0..N {
        let junk = format!(
            "{{\"id\": \"j{i}\", \"signed\": {{\"name\": {i}}}, \"x\": \"{}\"",
            "z".repeat(i % 700)
        );
        let topics = [
            format!("tern/{dev}/cmd/status"),
            format!("tern/{dev}/cmd/junk{}", i % 50),
            "tern/fleet/lab/cmd/ping".to_string(),
            "tern/fleet/announce".to_string(),
            "tern/fleet/keys".to_string(),
            format!("tern/{dev}/update/m{i}"),
            format!("tern/fleet/lab/update/m{}", i % 300),
            format!("site/cam{}/image", i % 20),
        ];
        for (n, t) in topics.iter().enumerate() {
            // Half are valid JSON (unknown commands, unsigned manifests), half broken.
            let body = if (i + n) % 2 == 0 {
                format!("{junk}}}")
            } else {
                junk.clone()
            };
            publisher.publish(t, body.as_bytes(), None).unwrap();
        }
        if i % 1000 == 0 {
            std::fs::write(b.inbox.join(format!("during-{i}.png")), &png).unwrap();
        }
    }
    // Results kept coming: the folder's ten files, and an image on the feed after it all.
    publisher.publish("site/cam0/image", &png, None).unwrap();
    wait_for("the folder's results", T * 3, || {
        (count(
            &b.state,
            "SELECT count(*) FROM results WHERE pipeline = 'digits'",
        )? == 10)
            .then_some(())
    })
    .unwrap();
    wait_for("the feed's good image", T * 3, || {
        (count(
            &b.state,
            "SELECT count(*) FROM results WHERE pipeline = 'site'",
        )? >= 1)
            .then_some(())
    })
    .unwrap();
    // Junk commands may still fill the queue: `busy` says to send the same id again.
    wait_for("a status after the flood", T, || {
        let r = command(&mut c, dev, "status", &json!({"id": "after"}));
        (r["ok"] == true).then_some(())
    })
    .unwrap();
    let peak = status_kib(pid, "VmHWM:");
    let (outbox, replies): (i64, i64) = db(&b.state)
        .unwrap()
        .query_row(
            "SELECT (SELECT bytes FROM outbox_totals),
                    (SELECT ifnull(sum(length(reply)), 0) FROM command_replies)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    eprintln!(
        "MQTT flood: idle RSS {idle} KiB, peak {peak} KiB, outbox {outbox} B, replies {replies} B"
    );
    assert!(outbox <= 1 << 20, "outbox {outbox} bytes");
    assert!(replies <= 8 << 20, "replies {replies} bytes");
    assert!(
        peak <= 2 * idle,
        "peak RSS {peak} KiB over twice the idle {idle} KiB"
    );
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    let log = d.stderr();
    assert_eq!(log.matches("fleet link connected").count(), 1, "{log}");
}

/// Finding 8: with no command keys any publisher could `models.activate` any installed version,
/// an old or a failed one included. Now a version below the anti-rollback floor (or marked
/// failed) needs `force`, and `force` needs a signed command: without command keys, going
/// back is `models.rollback` (one version) and nothing further.
#[test]
fn activating_below_the_floor_needs_a_signed_force() {
    use tern_update::command::{self as signing, SigningKey};
    let broker = Broker::embedded().unwrap();
    let trusted = SigningKey::from_pkcs8(&signing::generate_pkcs8()).unwrap();
    for keys in [false, true] {
        let dev = format!("floor-{keys}");
        let fleet_extra = if keys {
            format!(
                "[fleet.commands]\nkeys = [\"{}\"]\nrequire_signed = \"none\"",
                trusted.public().to_base64()
            )
        } else {
            String::new()
        };
        let b = fleet_box(&dev, &broker.url(true), &fleet_extra, "");
        let v2 = crate::fleet::package_version(b.dir.path(), "1.1.0");
        let mut c = client(
            &broker,
            true,
            &format!("{dev}-c"),
            &[&format!("tern/{dev}/state"), &format!("tern/{dev}/reply/+")],
        );
        let d = Daemon::spawn(&b.config, None, &[]).unwrap();
        wait_online(&mut c, &dev);
        let text = std::fs::read_to_string(&b.config).unwrap().replace(
            &package("digits-cnn-int8").display().to_string(),
            &v2.display().to_string(),
        );
        std::fs::write(&b.config, text).unwrap();
        d.signal("HUP").unwrap();
        wait_for("1.1.0 active", T, || {
            (crate::fleet::active_version(&b.state)? == "1.1.0").then_some(())
        })
        .unwrap();
        let old = json!({"name": "digits-cnn-int8", "version": "1.0.0"});
        let r = command(
            &mut c,
            &dev,
            "models.activate",
            &json!({"id": "old", "args": old}),
        );
        assert_eq!(r["error"]["code"], "conflict", "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("below the anti-rollback floor"),
            "{r}"
        );
        let mut forced = old.clone();
        forced["force"] = json!(true);
        let r = command(
            &mut c,
            &dev,
            "models.activate",
            &json!({"id": "forced-unsigned", "args": forced}),
        );
        assert_eq!(r["error"]["code"], "unauthorized", "{r}");
        assert_eq!(
            crate::fleet::active_version(&b.state).as_deref(),
            Some("1.1.0")
        );
        if keys {
            let now = tern_tests::updates::now();
            let signed = signing::sign(
                &trusted,
                "models.activate",
                &dev,
                "forced-signed",
                forced.clone(),
                now,
            );
            let r = command(&mut c, &dev, "models.activate", &signed);
            assert_eq!(r["ok"], true, "{r}");
            assert_eq!(
                crate::fleet::active_version(&b.state).as_deref(),
                Some("1.0.0")
            );
        } else {
            // One version back is still the operator's rollback.
            let r = command(
                &mut c,
                &dev,
                "models.rollback",
                &json!({"id": "rb", "args": {"name": "digits-cnn-int8"}}),
            );
            assert_eq!(r["ok"], true, "{r}");
        }
    }
}

/// Finding 7: `sudo ternd install` left root-owned files in a state directory the service user
/// owns, which the daemon then could not use. Now, as root on such a directory, it becomes the
/// directory's owner first (with a copy of the bundle, which may sit where only root reads).
#[test]
fn ternd_install_as_root_leaves_only_files_the_service_user_owns() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    if !need_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let k = tern_tests::updates::key();
    let state = d.path().join("state");
    std::fs::create_dir(&state).unwrap();
    nix::unistd::chown(
        &state,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .unwrap();
    let cfg = d.path().join("ternd.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"state\"\n{models}[dbus]\nbus = \"none\"\n[updates]\nkeys = [\"{}\"]\n",
            k.public().to_base64(),
            models = digits(),
        ),
    )
    .unwrap();
    let private = d.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let pkg = tern_tests::updates::variant(
        &package("digits-cnn-int8"),
        &private.join("pkg"),
        "digits-cnn-int8",
        "1.1.0",
        |s| s,
    );
    let built = tern_tests::updates::build(&pkg, 64 * 1024, &[&k], |_| {});
    let bundle = private.join("v11.bundle");
    built.write(&bundle);
    let o = std::process::Command::new(bin("ternd"))
        .args(["install", "--config"])
        .arg(&cfg)
        .arg(&bundle)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("\"state\":\"health\""), "{out}");
    assert!(out.contains("running as uid 65534"), "{out}");
    let mut stack = vec![state.clone()];
    let mut seen = 0;
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.uid(), 65534, "{} is uid {}", p.display(), m.uid());
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !name.starts_with(".install-"),
            "{} left behind",
            p.display()
        );
        seen += 1;
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(seen > 5, "the install wrote files: {seen}");
}

/// Finding 11 (the tool's side): `tern-update publish` sent bundles every box would refuse
/// (expired, for another group, changed after signing) and said nothing; and it printed
/// "broker connection lost" after a clean publish. Now it refuses them before connecting, and
/// a clean publish ends quietly.
#[test]
fn publish_refuses_what_every_box_would_refuse_and_ends_quietly() {
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let k = tern_tests::updates::key();
    let pkg = tern_tests::updates::variant(
        &package("digits-cnn-int8"),
        &d.path().join("pkg"),
        "digits-cnn-int8",
        "1.1.0",
        |s| s,
    );
    let now = tern_tests::updates::now();
    let write = |name: &str, b: &tern_tests::updates::Built| {
        let p = d.path().join(name);
        b.write(&p);
        p
    };
    let good = tern_tests::updates::build(&pkg, 64 * 1024, &[&k], |_| {});
    let expired = good.resigned(&[&k], |s| s.expires = now - 60);
    let elsewhere = good.resigned(&[&k], |s| s.targets.groups = vec!["elsewhere".into()]);
    let mut tampered = good.resigned(&[&k], |_| {});
    let mut m = tampered.manifest_value();
    m.signed["expires"] = (now + 7200).into();
    tampered.manifest = serde_json::to_vec(&m).unwrap();
    let publish = |bundle: &std::path::Path, url: &str| {
        let o = std::process::Command::new(bin("tern-update"))
            .args(["publish", "--broker", url, "--group", "lab"])
            .arg(bundle)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    // Refused before any connection: nothing listens on port 9.
    for (name, b, says) in [
        ("expired", &expired, "expired"),
        ("elsewhere", &elsewhere, "not `lab`"),
        ("tampered", &tampered, "every box would refuse it"),
    ] {
        let (ok, out) = publish(&write(&format!("{name}.bundle"), b), "mqtt://127.0.0.1:9");
        assert!(!ok, "{name}: {out}");
        assert!(out.contains(says), "{name}: {out}");
    }
    let (ok, out) = publish(&write("good.bundle", &good), &broker.url(false));
    assert!(ok, "{out}");
    assert!(out.contains("published"), "{out}");
    assert!(!out.contains("connection lost"), "{out}");
}

/// Finding 9 (in part): a reload that changed `[updates]` kept the old keys silently. Now it is
/// refused and says why; the rest of the running configuration is untouched.
#[test]
fn a_reload_that_changes_update_keys_is_refused_and_says_why() {
    let broker = Broker::embedded().unwrap();
    let (k1, k2) = (tern_tests::updates::key(), tern_tests::updates::key());
    let dev = "rekey";
    let keys = |k: &tern_update::command::SigningKey| {
        format!("[updates]\nkeys = [\"{}\"]\n", k.public().to_base64())
    };
    let b = fleet_box(dev, &broker.url(true), "", &keys(&k1));
    let mut c = client(
        &broker,
        true,
        "rekey-c",
        &[&format!("tern/{dev}/state"), &format!("tern/{dev}/reply/+")],
    );
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    wait_online(&mut c, dev);
    let text = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(&b.config, text.replace(&keys(&k1), &keys(&k2))).unwrap();
    let r = command(&mut c, dev, "config.reload", &json!({"id": "rk"}));
    assert_eq!(r["error"]["code"], "conflict", "{r}");
    let m = r["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("[updates] changed") && m.contains("restart"),
        "{r}"
    );
    // Put back as it was, the same reload goes through.
    std::fs::write(&b.config, &text).unwrap();
    let r = command(&mut c, dev, "config.reload", &json!({"id": "rk2"}));
    assert_eq!(r["ok"], true, "{r}");
}

/// Finding 12 (in part): a database that fails to open or its integrity check used to stop the
/// daemon, and systemd's restarts said nothing upstream. Now the box stays up serving nothing
/// that needs the database: its presence says `corrupt` with the reason and the way out, every
/// command is answered with that, `ternctl status` explains it over D-Bus, and a stop is clean.
/// The database is left as it was.
#[test]
fn a_damaged_database_leaves_the_box_up_saying_corrupt_and_how_to_recover() {
    let Some(bus) = tern_tests::dbus::system_bus() else {
        return;
    };
    let broker = Broker::embedded().unwrap();
    let dev = "corrupt1";
    let dbus = format!("[dbus]\nbus = \"{}\"\n", bus.address);
    let b = fleet_box(dev, &broker.url(true), "", &dbus);
    std::fs::create_dir_all(&b.state).unwrap();
    let junk = b"this is not an SQLite database, whatever its name says".repeat(200);
    std::fs::write(b.state.join("tern.db"), &junk).unwrap();
    let mut c = client(
        &broker,
        true,
        "corrupt-c",
        &[&format!("tern/{dev}/state"), &format!("tern/{dev}/reply/+")],
    );
    let mut d = Daemon::spawn(&b.config, None, &[]).unwrap();
    let presence = c
        .recv_match("a corrupt presence", T, |m| {
            m.topic == format!("tern/{dev}/state") && m.json()["state"] == "corrupt"
        })
        .unwrap()
        .json();
    assert!(
        presence["reason"].as_str().unwrap().contains("tern.db"),
        "{presence}"
    );
    assert!(
        presence["recovery"]
            .as_str()
            .unwrap()
            .contains("trust.json"),
        "{presence}"
    );
    let r = command(&mut c, dev, "status", &json!({"id": "st"}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("damaged"),
        "{r}"
    );

    // On the box: ternctl says what is wrong and how to recover, and fails.
    let ctl = |args: &[&str]| {
        std::process::Command::new(bin("ternctl"))
            .args(["--bus", &bus.address])
            .args(args)
            .output()
            .unwrap()
    };
    let o = wait_for("ternd on the bus", T, || {
        let o = ctl(&["status"]);
        (o.status.code() != Some(69)).then_some(o)
    })
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("corrupt: ") && out.contains("Recovery: ") && out.contains("trust.json"),
        "{out}"
    );
    let j: serde_json::Value = serde_json::from_slice(&ctl(&["--json", "status"]).stdout).unwrap();
    assert_eq!(j["state"], "corrupt", "{j}");
    let o = ctl(&["models"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("damaged"), "{err}");

    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    assert_eq!(std::fs::read(b.state.join("tern.db")).unwrap(), junk);
}
