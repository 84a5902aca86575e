//! The fleet protocol on a broker that is more than one process: a two-node ejabberd cluster
//! (Debian's ejabberd 23.01, MQTT 5), boxes on both nodes, the operator's tool on either.
//! ejabberd keeps retained messages in a replicated table but answers subscriptions from a
//! per-node cache, so a retained message published through one node is not delivered by the
//! other: tern-update finds that out and publishes and reads retained messages through every
//! node it is given; given one node, the box on the other says its chunks never came.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tern_tests::boxes::{Boxes, Options};
use tern_tests::ejabberd::{Cluster, LOGIN};
use tern_tests::mqtt::{Client, ClientOptions};
use tern_tests::updates::{build, key, noise};
use tern_tests::*;

use crate::rollout::{output, state_file, wave_sizes};
use crate::updates::{active_of, next, update_state};

const MODEL: &str = "digits-mlp-int8";
const T: Duration = Duration::from_secs(20);

/// `tern-update <sub>` through `nodes` of the cluster, with the login ejabberd wants.
fn tool(cluster: &Cluster, nodes: &[usize], password: &Path, sub: &str) -> Command {
    let mut c = Command::new(bin("tern-update"));
    c.arg(sub);
    for &n in nodes {
        c.args(["--broker", &cluster.nodes[n].url(false)]);
    }
    c.args(["--username", LOGIN.0, "--password-file"])
        .arg(password)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_rollout_on_a_two_node_ejabberd_cluster_reaches_boxes_on_both_nodes() {
    let Some(cluster) = Cluster::start(2).unwrap() else {
        return;
    };
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let d = tempfile::tempdir().unwrap();
    let password = d.path().join("password");
    std::fs::write(&password, LOGIN.1).unwrap();
    let states = d.path().join("rollouts");
    let k = key();
    let extra = format!(
        "[updates]\nkeys = [\"{}\"]\nhealth_window_secs = 3\nhealth_max_errors = 2\n",
        k.public().to_base64()
    );
    // Births published through node 1 reach a subscriber on node 0 live.
    let mut w0 = Boxes::watcher(n0, "watch-0").unwrap();
    let mut fleet = Boxes::start_across(
        &[n0, n1],
        &Options {
            count: 6,
            prefix: "cl",
            extra: &extra,
            ..Options::default()
        },
    )
    .unwrap();
    let all: Vec<usize> = (0..6).collect();
    fleet
        .wait_online(&mut w0, &all, Duration::from_secs(120))
        .unwrap();
    let on_node = |i: usize| i % 2;

    // Commands cross nodes: requesters on node 1, the box on node 0. On MQTT 5 the response
    // topic and correlation data survive the hop; on 3.1.1 the reply comes on the reply topic.
    let dev0 = fleet.boxes[0].device.clone();
    let reply_t = format!("tern/{dev0}/reply/+");
    let mut c5 = Client::connect(
        n1,
        ClientOptions {
            v5: true,
            id: "requester-5",
            subscribe: &[&reply_t],
            persistent: false,
        },
    )
    .unwrap();
    c5.publish(
        &format!("tern/{dev0}/cmd/ping"),
        br#"{"id":"p-1"}"#,
        Some((&format!("tern/{dev0}/reply/p-1"), b"corr-7")),
    )
    .unwrap();
    let r = c5.recv_on(&format!("tern/{dev0}/reply/p-1"), T).unwrap();
    assert_eq!(r.correlation.as_deref(), Some(&b"corr-7"[..]));
    assert_eq!(r.json()["result"]["pong"], true, "{}", r.json());
    let mut c4 = Client::connect(
        n1,
        ClientOptions {
            v5: false,
            id: "requester-4",
            subscribe: &[&reply_t],
            persistent: false,
        },
    )
    .unwrap();
    let st = crate::fleet::command(&mut c4, &dev0, "status", &json!({"id": "s-1"}));
    assert_eq!(st["result"]["device"], dev0.as_str(), "{st}");

    // Two boxes, one per node, are away during the rollout.
    let away = [4, 5];
    for i in away {
        fleet.stop(i).unwrap();
    }
    let good = build(&next(d.path(), "1.1.0", |s| s), 4096, &[&k], |_| {});
    let good_file = d.path().join("good.bundle");
    good.write(&good_file);
    let rollout = |nodes: &[usize], id: &str, file: &Path, extra: &[&str]| {
        let mut c = tool(&cluster, nodes, &password, "rollout");
        c.args(["--id", id, "--bundle"])
            .arg(file)
            .arg("--state-dir")
            .arg(&states)
            .args(extra);
        output(c.spawn().unwrap())
    };
    let waves = ["--group", "lab", "--waves", "1,rest", "--wait-secs", "120"];
    let (code, out) = rollout(&[0, 1], "c1", &good_file, &waves);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("keeps retained messages per node"),
        "the tool found the broker's retained messages per node: {out}"
    );
    let s = state_file(&states, "c1").unwrap();
    assert_eq!(s["phase"], "completed", "{s}");
    assert_eq!(
        wave_sizes(&s),
        [1, 5],
        "boxes of both nodes are members, away ones too: {s}"
    );
    assert!(out.contains("not back yet (2"), "{out}");
    for (i, b) in fleet.boxes.iter().enumerate() {
        if away.contains(&i) {
            continue;
        }
        assert_eq!(
            update_state(&b.state, "1.1.0").as_deref(),
            Some("committed"),
            "{} on node {}",
            b.device,
            on_node(i)
        );
    }

    // The late joiners come back, each to its own node, and find the retained manifest and
    // chunks there.
    for i in away {
        fleet.spawn(i).unwrap();
    }
    for i in away {
        let state = fleet.boxes[i].state.clone();
        wait_for("a late joiner committed", Duration::from_secs(60), || {
            (update_state(&state, "1.1.0").as_deref() == Some("committed")).then_some(())
        })
        .unwrap();
        assert_eq!(active_of(&state, MODEL).as_deref(), Some("1.1.0"));
    }

    // The fleet view through both nodes sees every box; through one node, only the boxes
    // whose retained births that node holds.
    let fleet_json = |nodes: &[usize]| -> Value {
        let mut c = tool(&cluster, nodes, &password, "fleet");
        let o = c.args(["--group", "lab", "--json"]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v = fleet_json(&[0, 1]);
    assert_eq!(v["summary"]["boxes"], 6, "{v}");
    assert_eq!(v["summary"]["online"], 6, "{v}");
    assert_eq!(v["summary"]["versions"][format!("{MODEL} 1.1.0")], 6, "{v}");
    let v = fleet_json(&[0]);
    assert_eq!(
        v["summary"]["boxes"], 3,
        "node 0 holds its own boxes' births: {v}"
    );

    // Given node 0 alone, a box on node 1 gets the manifest (live messages cross nodes) but
    // never the chunks: its status says so, and the rollout stops with its words.
    let more = build(&next(d.path(), "1.2.0", |s| s), 4096, &[&k], |_| {});
    let more_file = d.path().join("more.bundle");
    more.write(&more_file);
    let dev1 = fleet.boxes[1].device.clone();
    let (code, out) = rollout(
        &[0],
        "c2",
        &more_file,
        &["--device", &dev1, "--wait-secs", "40"],
    );
    assert_eq!(code, Some(65), "{out}");
    assert!(
        out.contains(&format!("{dev1} no outcome (last downloading none of the"))
            && out.contains("broker cluster that does not share retained messages"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{dev1} reports on this update, but its presence"))
            && out.contains("Give each node with --broker"),
        "the tool names the missing broker feature: {out}"
    );
    assert_eq!(
        active_of(&fleet.boxes[1].state, MODEL).as_deref(),
        Some("1.1.0")
    );

    // A box killed on node 1: its last will reaches node 0's subscribers.
    let mut w = Boxes::watcher(n0, "watch-will").unwrap();
    let dev3 = fleet.boxes[3].device.clone();
    fleet.boxes[3]
        .daemon
        .as_ref()
        .unwrap()
        .signal("KILL")
        .unwrap();
    let topic = format!("tern/{dev3}/state");
    w.recv_match("the last will", Duration::from_secs(60), |m| {
        m.topic == topic && m.json()["state"] == "offline"
    })
    .unwrap();

    // The nodes take messages up to 128 KiB: a bundle cut into 256 KiB chunks ends the
    // connection at its first chunk, and the tool says so at once rather than waiting.
    let big_pkg = next(d.path(), "1.3.0", |s| s);
    std::fs::write(big_pkg.join("padding.bin"), noise(600_000)).unwrap();
    let big = build(&big_pkg, 256 * 1024, &[&k], |_| {});
    assert!(big.signed.artifact.size > 256 * 1024);
    let big_file = d.path().join("big.bundle");
    big.write(&big_file);
    let started = std::time::Instant::now();
    let mut c = tool(&cluster, &[0], &password, "publish");
    let o = c
        .args(["--group", "nobody"])
        .arg(&big_file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("connection ended") && err.contains("limits message size"),
        "{err}"
    );
    // Not after a timeout: the closed connection itself is the answer.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "reported after {:?}",
        started.elapsed()
    );

    // ejabberd refuses MQTT 5 shared subscriptions, and ingest says so.
    let mut c = tool(&cluster, &[0], &password, "ingest");
    let o = c
        .args(["--share", "workers", "--db"])
        .arg(d.path().join("results.db"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.to_lowercase()
            .contains("shared subscriptions not supported"),
        "{err}"
    );
}
