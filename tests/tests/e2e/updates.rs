//! Signed model updates end to end: the operator's tool and hand-made hostile bundles,
//! mosquitto, the real ternd, real packages run by tract.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tern_tests::mqtt::{Broker, Client};
use tern_tests::updates::{self, Built, build, key, variant, with_evaluation};
use tern_tests::*;
use tern_update::command::SigningKey;

use crate::fleet::{FleetBox, client, fleet_box_with, wait_online};

pub(crate) const T: Duration = Duration::from_secs(60);
pub(crate) const MODEL: &str = "digits-mlp-int8";
pub(crate) const SYNC: &str = "tern-test/sync";
pub(crate) const CHUNK: u64 = 4096;

pub(crate) fn mosquitto() -> Option<Broker> {
    Broker::mosquitto().unwrap()
}

pub(crate) fn keys_toml(keys: &[&SigningKey], threshold: usize, extra: &str) -> String {
    let list: Vec<String> = keys
        .iter()
        .map(|k| format!("\"{}\"", k.public().to_base64()))
        .collect();
    let window = if extra.contains("health_window_secs") {
        ""
    } else {
        "health_window_secs = 1\n"
    };
    format!(
        "[updates]\nkeys = [{}]\nthreshold = {threshold}\n{window}{extra}\n",
        list.join(", ")
    )
}

pub(crate) fn update_box(
    device: &str,
    broker: &Broker,
    keys: &[&SigningKey],
    threshold: usize,
    extra: &str,
) -> FleetBox {
    // tract's plan only: the -broken fixtures these tests send answer wrongly in tract (and
    // are refused), but rightly in onnxruntime, which `auto` would serve them with.
    let engine = "[engine]\nplan = \"tract\"\n";
    fleet_box_with(
        MODEL,
        device,
        &broker.url(true),
        "",
        &format!("{engine}{}", keys_toml(keys, threshold, extra)),
    )
}

/// The model's next version, packaged under `dir`; `edit` changes its tern-model.toml.
pub fn next(dir: &Path, version: &str, edit: impl Fn(String) -> String) -> PathBuf {
    variant(
        &package(MODEL),
        &dir.join(format!("{MODEL}-{version}")),
        MODEL,
        version,
        edit,
    )
}

pub(crate) fn same(s: String) -> String {
    s
}

/// The events a test watches, and the sync marker.
pub(crate) fn watcher(broker: &Broker, device: &str) -> Client {
    let events = format!("tern/{device}/events");
    let state = format!("tern/{device}/state");
    let status = format!("tern/{device}/updates/+");
    client(
        broker,
        false,
        &format!("watch-{device}-{}", std::process::id()),
        &[&events, &state, &status, SYNC],
    )
}

pub(crate) fn event(
    c: &mut Client,
    device: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let topic = format!("tern/{device}/events");
    c.recv_match(what, T, |m| m.topic == topic && pred(&m.json()))
        .unwrap()
        .json()
}

pub(crate) fn active(state: &Path) -> Option<(String, String)> {
    db(state)
        .ok()?
        .query_row(
            "SELECT version, sha256 FROM model_versions WHERE name = ?1 AND state = 'active'",
            [MODEL],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok()
}

pub(crate) fn versions(state: &Path) -> Vec<(String, String)> {
    let c = db(state).unwrap();
    let mut s = c
        .prepare("SELECT version, state FROM model_versions WHERE name = ?1 ORDER BY version")
        .unwrap();
    s.query_map([MODEL], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn staging_empty(state: &Path) -> bool {
    std::fs::read_dir(state.join("updates")).map_or(true, |mut d| d.next().is_none())
}

fn update_rows(state: &Path) -> i64 {
    count(state, "SELECT count(*) FROM updates").unwrap_or(0)
}

/// The operator's path: `tern-update bundle` and `publish` to a group, the publisher gone
/// before the box starts; the box still gets every chunk, self-tests, activates, passes its
/// health window and commits; `tern-update status` shows it.
#[test]
fn late_joiner_gets_the_update_published_by_the_tool() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let tool = bin("tern-update");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(&tool)
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tern-update {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let public = run(&["keygen", "--out", "op.key"]).trim().to_string();
    let pkg = next(d.path(), "1.1.0", same);
    run(&[
        "bundle",
        "--package",
        pkg.to_str().unwrap(),
        "--out",
        "u.bundle",
        "--key",
        "op.key",
        "--group",
        "lab",
        "--chunk-size",
        "4096",
    ]);
    let url = broker.url(false);
    let out = run(&["publish", "--broker", &url, "--group", "lab", "u.bundle"]);
    assert!(
        out.contains("published digits-mlp-int8 1.1.0 to tern/fleet/lab/update/digits-mlp-int8"),
        "{out}"
    );

    let metrics = free_port();
    let b = fleet_box_with(
        MODEL,
        "late-1",
        &broker.url(true),
        "",
        &format!(
            "[updates]\nkeys = [\"{public}\"]\nhealth_window_secs = 1\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"
        ),
    );
    let mut w = watcher(&broker, "late-1");
    let _d = Daemon::spawn(&b.config, None, &[]).unwrap();
    let first = event(&mut w, "late-1", "update.downloading", |e| {
        e["event"] == "update.downloading"
    });
    assert_eq!(first["version"], "1.1.0");
    let done = event(&mut w, "late-1", "the update's end", |e| {
        matches!(
            e["event"].as_str(),
            Some("update.committed" | "update.failed" | "update.rolled_back")
        )
    });
    assert_eq!(done["event"], "update.committed", "{done}");
    assert_eq!(active(&b.state).unwrap().0, "1.1.0");
    assert!(staging_empty(&b.state));
    // Every step was said, in order.
    let steps: Vec<String> = w
        .drain()
        .into_iter()
        .filter(|m| m.topic == "tern/late-1/events")
        .map(|m| m.json()["event"].as_str().unwrap_or("").to_string())
        .filter(|e| e.starts_with("update.") && e != "update.progress")
        .collect();
    assert_eq!(
        steps,
        [
            "update.verifying",
            "update.staged",
            "update.self_testing",
            "update.activating",
            "update.health"
        ],
        "{steps:?}"
    );

    let st = run(&[
        "status", "--broker", &url, "--group", "lab", "--once", "--json",
    ]);
    let rows: Value = serde_json::from_str(st.trim()).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["device"] == "late-1")
        .expect("the box is listed");
    assert_eq!(
        (
            row["version"].as_str(),
            row["state"].as_str(),
            row["percent"].as_u64()
        ),
        (Some("1.1.0"), Some("committed"), Some(100)),
        "{row}"
    );
    // The box's metrics say so too.
    let state =
        format!("tern_update_state{{model=\"{MODEL}\",version=\"1.1.0\",state=\"committed\"}}");
    wait_for("the metrics to show the commit, linked", T, || {
        let m = samples(&http(metrics, "GET", "/metrics").1);
        (m.get(&state) == Some(&1.0) && m.get("tern_fleet_connected") == Some(&1.0)).then_some(())
    })
    .unwrap();
    // Following this bundle ends at once: every online box of the group has committed it.
    let followed = run(&[
        "status", "--broker", &url, "--group", "lab", "--bundle", "u.bundle", "--json",
    ]);
    let last: Value = serde_json::from_str(followed.trim().lines().last().unwrap()).unwrap();
    assert_eq!(last[0]["state"], "committed", "{followed}");

    // Withdrawn: the broker keeps neither the manifest nor any chunk.
    let out = run(&["withdraw", "--broker", &url, "--group", "lab", "u.bundle"]);
    assert!(out.starts_with("withdrawn:"), "{out}");
    let mut c = client(
        &broker,
        false,
        "after-withdraw",
        &["tern/fleet/lab/update/+", "tern/artifacts/#", SYNC],
    );
    c.sync(SYNC).unwrap();
    let left: Vec<String> = c
        .drain()
        .into_iter()
        .filter(|m| m.topic != SYNC)
        .map(|m| m.topic)
        .collect();
    assert!(left.is_empty(), "still retained: {left:?}");
}

/// Every attack on the manifest and the artifact, each refused with its own code and no
/// change to the active model; each manifest refused again after a restart; chunk attacks
/// do not stop the download, which completes once good chunks are published.
#[test]
fn attack_matrix_each_refused_with_its_own_code_before_and_after_restart() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let (a, b, stranger) = (key(), key(), key());
    let bx = update_box("atk-1", &broker, &[&a, &b], 2, "");
    let mut w = watcher(&broker, "atk-1");
    let mut daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    wait_online(&mut w, "atk-1");
    let before = active(&bx.state).unwrap();
    assert_eq!(before.0, "1.0.0");

    let good = build(&next(d.path(), "1.1.0", same), CHUNK, &[&a, &b], |_| {});
    let huge = vec![b' '; 300 * 1024];
    let mut attacks: Vec<(&str, Vec<u8>)> = vec![
        ("unsigned", good.resigned(&[], |_| {}).manifest),
        ("bad_signature", {
            let mut m = good.manifest_value();
            m.signed["expires"] = (updates::now() + 7200).into();
            serde_json::to_vec(&m).unwrap()
        }),
        (
            "unknown_key",
            good.resigned(&[&a, &stranger], |_| {}).manifest,
        ),
        ("below_threshold", good.resigned(&[&a], |_| {}).manifest),
        (
            "duplicate_signature",
            good.resigned(&[&a, &a], |_| {}).manifest,
        ),
        (
            "expired",
            good.resigned(&[&a, &b], |s| s.expires = updates::now() - 10)
                .manifest,
        ),
        (
            "downgrade",
            good.resigned(&[&a, &b], |s| s.version = "0.9.0".into())
                .manifest,
        ),
        (
            "replay",
            good.resigned(&[&a, &b], |s| s.version = "1.0.0".into())
                .manifest,
        ),
        (
            "wrong_target",
            good.resigned(&[&a, &b], |s| s.targets.groups = vec!["elsewhere".into()])
                .manifest,
        ),
        (
            "bad_name",
            good.resigned(&[&a, &b], |s| s.name = "../etc".into())
                .manifest,
        ),
        (
            "bad_artifact",
            good.resigned(&[&a, &b], |s| s.artifact.size = (1 << 30) + 1)
                .manifest,
        ),
        ("malformed", b"{\"signed\": 1".to_vec()),
        ("oversize", huge),
    ];
    // Wrong hardware: an architecture this box is not.
    attacks.push((
        "wrong_target",
        good.resigned(&[&a, &b], |s| s.targets.arch = vec!["riscv64".into()])
            .manifest,
    ));
    let topic = |i: usize| format!("tern/atk-1/update/attack-{i}");
    for round in ["fresh", "after restart"] {
        if round == "after restart" {
            daemon.signal("TERM").unwrap();
            daemon.wait(T).unwrap();
            daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
        }
        for (i, (code, payload)) in attacks.iter().enumerate() {
            if round == "fresh" {
                w.publish_retained(&topic(i), payload).unwrap();
            }
            let source = topic(i);
            let e = event(&mut w, "atk-1", &format!("refusal {code} ({round})"), |e| {
                e["event"] == "update.refused" && e["source"] == source.as_str()
            });
            assert_eq!(e["code"], *code, "attack {i} ({round}): {e}");
        }
        assert_eq!(active(&bx.state).unwrap(), before, "{round}");
        assert_eq!(
            update_rows(&bx.state),
            0,
            "a refused manifest records nothing ({round})"
        );
        assert!(staging_empty(&bx.state));
    }
    for i in 0..attacks.len() {
        w.publish_retained(&topic(i), b"").unwrap();
    }

    // Artifact attacks, each signed and so accepted for download, then caught.
    let mut failed = |built: &Built, name: &str, code: &str| {
        built.publish(&mut w, &format!("tern/atk-1/update/{name}"), SYNC);
        let e = event(&mut w, "atk-1", code, |e| {
            e["event"] == "update.failed" && e["version"] == built.signed.version.as_str()
        });
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(active(&bx.state).unwrap(), before);
        w.publish_retained(&format!("tern/atk-1/update/{name}"), b"")
            .unwrap();
    };
    // The whole artifact's hash differs from the one signed (the chunks match their list).
    let wrong_sha = good.resigned(&[&a, &b], |s| {
        s.version = "1.1.1".into();
        s.artifact.sha256 = "0".repeat(64);
    });
    failed(&wrong_sha, "hash", "bad_hash");
    // The package inside is another version than the manifest says.
    let mismatch = build(&next(d.path(), "1.1.2", same), CHUNK, &[&a, &b], |s| {
        s.version = "1.1.3".into()
    });
    failed(&mismatch, "mismatch", "package_mismatch");
    // A `../` path inside the artifact.
    let evil = {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        tar.append(&h, &b"x"[..]).unwrap();
        let bytes = tar.into_inner().unwrap();
        let mut s = good.signed.clone();
        s.version = "1.1.4".into();
        s.artifact = tern_update::bundle::Artifact::describe(&bytes, CHUNK);
        Built {
            manifest: serde_json::to_vec(&tern_update::bundle::sign(&s, &[&a, &b])).unwrap(),
            signed: s,
            artifact: bytes,
        }
    };
    failed(&evil, "evil", "bad_name");
    assert!(!bx.state.join("escape").exists() && !bx.state.join("updates/escape").exists());

    // Chunk attacks on a good update: a truncated chunk, a chunk of another artifact, a
    // manifest whose size disagrees with its chunks. Each refused; nothing else changes.
    let v12 = build(&next(d.path(), "1.2.0", same), CHUNK, &[&a, &b], |_| {});
    let chunks = v12.chunks();
    let n = chunks.len();
    assert!(n >= 3, "{n} chunks");
    let other = &mismatch.chunks()[1];
    w.publish_retained(
        &v12.chunk_topic("tern", 0),
        &chunks[0][..chunks[0].len() - 100],
    )
    .unwrap();
    w.publish_retained(&v12.chunk_topic("tern", 1), other)
        .unwrap();
    for (i, c) in chunks.iter().enumerate().skip(2) {
        w.publish_retained(&v12.chunk_topic("tern", i), c).unwrap();
    }
    w.publish_retained("tern/atk-1/update/v12", &v12.manifest)
        .unwrap();
    for code in ["truncated_chunk", "foreign_chunk"] {
        let e = event(&mut w, "atk-1", code, |e| {
            e["event"] == "update.refused" && e["code"] == code
        });
        assert_eq!(e["version"], "1.2.0", "{e}");
    }
    assert_eq!(active(&bx.state).unwrap(), before);
    // The operator republishes the good chunks: the box asks again and completes.
    w.publish_retained(&v12.chunk_topic("tern", 0), &chunks[0])
        .unwrap();
    w.publish_retained(&v12.chunk_topic("tern", 1), &chunks[1])
        .unwrap();
    let e = event(&mut w, "atk-1", "v1.2.0 committed", |e| {
        e["version"] == "1.2.0"
            && matches!(
                e["event"].as_str(),
                Some("update.committed" | "update.failed")
            )
    });
    assert_eq!(e["event"], "update.committed", "{e}");
    assert_eq!(active(&bx.state).unwrap().0, "1.2.0");
    let size_lie = build(&next(d.path(), "1.3.0", same), CHUNK, &[&a, &b], |s| {
        let short = s.artifact.size - 100;
        s.artifact.size = short;
        s.artifact.chunks.truncate(short.div_ceil(CHUNK) as usize);
    });
    for (i, c) in size_lie.chunks().iter().enumerate() {
        w.publish_retained(&size_lie.chunk_topic("tern", i), c)
            .unwrap();
    }
    w.publish_retained("tern/atk-1/update/size", &size_lie.manifest)
        .unwrap();
    let e = event(&mut w, "atk-1", "bad_size", |e| {
        e["event"] == "update.refused" && e["version"] == "1.3.0"
    });
    assert_eq!(e["code"], "bad_size", "{e}");
    assert_eq!(active(&bx.state).unwrap().0, "1.2.0");
    w.publish_retained("tern/atk-1/update/size", b"").unwrap();

    // Rotation to a new key, signed by the current threshold; then the old keys are refused
    // as rotated out, and the new one is obeyed.
    let c = key();
    let doc = tern_update::bundle::KeysDoc {
        version: 1,
        keys: vec![c.public().to_base64()],
        threshold: 1,
    };
    let only_a = serde_json::to_vec(&tern_update::bundle::sign_keys(&doc, &[&a])).unwrap();
    w.publish_retained("tern/fleet/keys", &only_a).unwrap();
    let e = event(&mut w, "atk-1", "rotation refused", |e| {
        e["event"] == "update.refused" && e["source"] == "keys"
    });
    assert_eq!(e["code"], "below_threshold");
    let rotation = serde_json::to_vec(&tern_update::bundle::sign_keys(&doc, &[&a, &b])).unwrap();
    w.publish_retained("tern/fleet/keys", &rotation).unwrap();
    event(&mut w, "atk-1", "keys rotated", |e| {
        e["event"] == "update.keys_rotated"
    });
    let v14 = build(&next(d.path(), "1.4.0", same), CHUNK, &[&a, &b], |_| {});
    v14.publish(&mut w, "tern/atk-1/update/old-keys", SYNC);
    let e = event(&mut w, "atk-1", "revoked_key", |e| {
        e["event"] == "update.refused" && e["version"] == "1.4.0"
    });
    assert_eq!(e["code"], "revoked_key", "{e}");
    let v14c = v14.resigned(&[&c], |_| {});
    w.publish_retained("tern/atk-1/update/new-keys", &v14c.manifest)
        .unwrap();
    let e = event(&mut w, "atk-1", "1.4.0 by the new key", |e| {
        e["version"] == "1.4.0"
            && matches!(
                e["event"].as_str(),
                Some("update.committed" | "update.failed")
            )
    });
    assert_eq!(e["event"], "update.committed", "{e}");
    // The rotation survives a restart.
    daemon.signal("TERM").unwrap();
    daemon.wait(T).unwrap();
    let mut daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    let e = event(&mut w, "atk-1", "old keys refused after restart", |e| {
        e["event"] == "update.refused" && e["source"] == "tern/atk-1/update/old-keys"
    });
    assert_eq!(e["code"], "revoked_key");
    let ok: String = db(&bx.state)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");

    // The database lost (deleted, as after a failed integrity check) and the rotation no
    // longer retained: the key set comes back from trust.json, not from the configuration's
    // keys, which the rotation retired (with those, the old-keys 1.4.0 would install).
    w.publish_retained("tern/fleet/keys", b"").unwrap();
    w.sync(SYNC).unwrap();
    daemon.signal("TERM").unwrap();
    daemon.wait(T).unwrap();
    for f in ["tern.db", "tern.db-wal", "tern.db-shm"] {
        let _ = std::fs::remove_file(bx.state.join(f));
    }
    let _daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    let e = event(
        &mut w,
        "atk-1",
        "old keys refused with a new database",
        |e| e["event"] == "update.refused" && e["source"] == "tern/atk-1/update/old-keys",
    );
    assert_eq!(e["code"], "revoked_key", "{e}");
    for t in ["old-keys", "new-keys", "v12"] {
        w.publish_retained(&format!("tern/atk-1/update/{t}"), b"")
            .unwrap();
    }
    w.publish_retained("tern/fleet/keys", b"").unwrap();
}

/// A new version that fails its self-test (the silently wrong int8 form; a model file cut
/// short) is never activated, and one whose preprocessing fails on the box's real inputs is
/// rolled back by the health window: 20 of 20 trials each.
#[test]
fn self_test_failures_never_activate_and_health_failures_roll_back() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let bx = update_box(
        "st-1",
        &broker,
        &[&k],
        1,
        "health_max_errors = 2\nhealth_window_secs = 30",
    );
    let mut w = watcher(&broker, "st-1");
    let _daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    wait_online(&mut w, "st-1");
    let before = active(&bx.state).unwrap();
    let topic = "tern/st-1/update/digits-mlp-int8";

    let broken = variant(
        &package("digits-mlp-int8-broken"),
        &d.path().join("broken"),
        MODEL,
        "2.0.0",
        same,
    );
    let cut = next(d.path(), "2.0.0", same);
    let onnx = cut.join("model.onnx");
    let len = std::fs::metadata(&onnx).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&onnx)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    for trial in 0..20 {
        let pkg = if trial % 2 == 0 { &broken } else { &cut };
        // A new signature each time: a byte-identical manifest would be known already.
        let bad = build(pkg, CHUNK, &[&k], |s| {
            s.expires = updates::now() + 3600 + trial
        });
        bad.publish(&mut w, topic, SYNC);
        let e = event(&mut w, "st-1", "self-test failure", |e| {
            e["version"] == "2.0.0"
                && matches!(
                    e["event"].as_str(),
                    Some("update.failed" | "update.committed" | "update.health")
                )
        });
        assert_eq!(
            (e["event"].as_str(), e["code"].as_str()),
            (Some("update.failed"), Some("self_test")),
            "trial {trial}: {e}"
        );
        assert_eq!(active(&bx.state).unwrap(), before, "trial {trial}");
    }
    assert!(!versions(&bx.state).iter().any(|(v, _)| v == "2.0.0"));

    // Health: the new version drops `resize`, so the 32×32 images the inbox gets fail.
    let sample = root().join("configs/demo/inbox/digit-3.png");
    for trial in 0..20u64 {
        let version = format!("1.{}.0", trial + 1);
        let pkg = next(d.path(), &version, |t| t.replace("resize = [8, 8]\n", ""));
        let bad = build(&pkg, CHUNK, &[&k], |_| {});
        bad.publish(&mut w, topic, SYNC);
        event(&mut w, "st-1", "health window", |e| {
            e["event"] == "update.health" && e["version"] == version.as_str()
        });
        assert_eq!(active(&bx.state).unwrap().0, version);
        for i in 0..2 {
            std::fs::copy(&sample, bx.inbox.join(format!("t{trial}-{i}.png"))).unwrap();
        }
        let e = event(&mut w, "st-1", "rollback", |e| {
            e["version"] == version.as_str()
                && matches!(
                    e["event"].as_str(),
                    Some("update.rolled_back" | "update.committed" | "update.failed")
                )
        });
        assert_eq!(
            (e["event"].as_str(), e["code"].as_str()),
            (Some("update.rolled_back"), Some("health")),
            "trial {trial}: {e}"
        );
        assert_eq!(active(&bx.state).unwrap(), before, "trial {trial}");
        // The rejected version is failed, not `previous`: an operator's rollback cannot bring
        // it back.
        assert!(versions(&bx.state).contains(&(version.clone(), "failed".into())));
    }
    w.publish_retained(topic, b"").unwrap();
}

/// `tern-update bundle` for `pkg`: whether it made a bundle, and what it said.
fn bundle_with_tool(dir: &Path, pkg: &Path, key: &Path) -> (bool, String) {
    let o = std::process::Command::new(bin("tern-update"))
        .args(["bundle", "--package"])
        .arg(pkg)
        .arg("--out")
        .arg(dir.join("tool.bundle"))
        .arg("--key")
        .arg(key)
        .args(["--group", "lab"])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A package's evaluation set gates its activation: a version whose answers are worse (its
/// label table rotated, so every digit is named wrongly) is refused by the tool before
/// signing and by the box before activating, both with the measured accuracy; the same set
/// with the right labels passes both.
#[test]
fn an_evaluation_set_refuses_a_worse_model_with_its_accuracy_and_passes_a_good_one() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let pkcs8 = tern_update::command::generate_pkcs8();
    let k = SigningKey::from_pkcs8(&pkcs8).unwrap();
    let key_file = d.path().join("op.key");
    std::fs::write(&key_file, &pkcs8).unwrap();
    let bx = update_box("ev-1", &broker, &[&k], 1, "");
    let mut w = watcher(&broker, "ev-1");
    let _daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    wait_online(&mut w, "ev-1");
    let before = active(&bx.state).unwrap();
    let topic = "tern/ev-1/update/digits-mlp-int8";
    let rotate = |t: String| {
        let labels = r#"labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]"#;
        assert!(t.contains(labels), "{t}");
        t.replace(
            labels,
            r#"labels = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0"]"#,
        )
    };
    let worse = next(d.path(), "1.1.0", rotate);
    let n = with_evaluation(&worse, "accuracy >= 0.8");
    let (made, said) = bundle_with_tool(d.path(), &worse, &key_file);
    assert!(!made, "{said}");
    assert!(
        said.contains(&format!(
            "fails its evaluation: accuracy 0.0000 on {n} samples"
        )) && said.contains("requires accuracy >= 0.8"),
        "{said}"
    );

    // Signed without the tool's gate, the box refuses it itself.
    let bad = build(&worse, CHUNK, &[&k], |_| {});
    bad.publish(&mut w, topic, SYNC);
    let e = event(&mut w, "ev-1", "the evaluation's verdict", |e| {
        e["version"] == "1.1.0"
            && matches!(
                e["event"].as_str(),
                Some("update.failed" | "update.committed")
            )
    });
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("update.failed"), Some("evaluation")),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("accuracy 0.0000 on {n} samples")),
        "{e}"
    );
    assert_eq!(active(&bx.state).unwrap(), before);
    assert!(!versions(&bx.state).iter().any(|(v, _)| v == "1.1.0"));

    // The right labels: both gates pass, and the box commits it.
    let good = next(d.path(), "1.2.0", same);
    with_evaluation(&good, "accuracy >= 0.8");
    let (made, said) = bundle_with_tool(d.path(), &good, &key_file);
    assert!(made && said.contains("evaluation: accuracy"), "{said}");
    let ok = build(&good, CHUNK, &[&k], |_| {});
    ok.publish(&mut w, topic, SYNC);
    let e = event(&mut w, "ev-1", "the good version's outcome", |e| {
        e["version"] == "1.2.0"
            && matches!(
                e["event"].as_str(),
                Some("update.failed" | "update.committed")
            )
    });
    assert_eq!(e["event"], "update.committed", "{e}");
    assert_eq!(active(&bx.state).unwrap().0, "1.2.0");
    w.publish_retained(topic, b"").unwrap();
}

/// The health window judges the model, not its callers: inputs no version takes (bytes that
/// are no image, over D-Bus as `nobody` and in the watched folder) are counted and reported
/// but never roll a good version back, while an input the previous version took and the new
/// one refuses still does (the health test above).
#[test]
fn bad_input_from_anyone_on_the_box_cannot_burn_a_new_version() {
    let Some(broker) = mosquitto() else { return };
    if !need("busctl") || !need("setpriv") || !need_root() {
        return;
    }
    let Some(bus) = tern_tests::dbus::system_bus() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let bx = update_box(
        "burn-1",
        &broker,
        &[&k],
        1,
        &format!(
            "health_max_errors = 2\nhealth_window_secs = 10\n[dbus]\nbus = \"{}\"\n",
            bus.address
        ),
    );
    let mut w = watcher(&broker, "burn-1");
    let _daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    wait_online(&mut w, "burn-1");
    let topic = "tern/burn-1/update/digits-mlp-int8";
    let v11 = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    v11.publish(&mut w, topic, SYNC);
    event(&mut w, "burn-1", "health window", |e| {
        e["event"] == "update.health" && e["version"] == "1.1.0"
    });

    let busctl = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "busctl"])
            .arg(format!("--address={}", bus.address))
            .args([
                "--json=short",
                "call",
                "io.tern.Daemon1",
                "/io/tern/Daemon1",
            ])
            .arg("io.tern.Daemon1")
            .args(args)
            .output()
            .unwrap()
    };
    for i in 0..4 {
        let o = busctl(&["Infer", "say", MODEL, "4", "1", "2", "3", &i.to_string()]);
        assert!(!o.status.success(), "junk bytes answered");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("BadRequest") || e.contains("bad input"), "{e}");
    }
    for i in 0..2 {
        std::fs::write(bx.inbox.join(format!("junk-{i}.png")), b"no image at all").unwrap();
    }
    // The junk landed inside the window: the update is still being watched. (On a version
    // that counted it, 4 errors of 4 answers would have rolled it back by now or soon.)
    let o = busctl(&["Status"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let status: Value = serde_json::from_str(v["data"][0].as_str().unwrap()).unwrap();
    let state: String = db(&bx.state)
        .unwrap()
        .query_row(
            "SELECT state FROM updates ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(state, "health", "{status}");
    let m = &status["models"][0];
    assert_eq!(m["version"], "1.1.0", "{status}");
    assert!(m["bad_input"].as_u64().unwrap() >= 4, "{status}");
    assert_eq!(m["errors"], 0, "{status}");

    let e = event(&mut w, "burn-1", "end of the health window", |e| {
        e["version"] == "1.1.0"
            && matches!(
                e["event"].as_str(),
                Some("update.rolled_back" | "update.committed" | "update.failed")
            )
    });
    assert_eq!(e["event"], "update.committed", "{e}");
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
    w.publish_retained(topic, b"").unwrap();
}

/// `ternd install`: with the daemon stopped it drives the update itself (health window when
/// the daemon starts); with the daemon running it hands the bundle over and reports; a
/// tampered bundle is refused the same way either way.
#[test]
fn ternd_install_offline_and_through_the_running_daemon() {
    let d = tempfile::tempdir().unwrap();
    let k = key();
    // The running daemon takes a bundle over its bus.
    let Some(bus) = tern_tests::dbus::system_bus() else {
        return;
    };
    let bx = fleet_box_with(
        MODEL,
        "inst-1",
        "mqtt://127.0.0.1:9",
        "reconnect_max_secs = 1",
        &format!(
            "{}\n[dbus]\nbus = \"{}\"\n",
            keys_toml(&[&k], 1, ""),
            bus.address
        ),
    );
    let install = |bundle: &Path| {
        let o = std::process::Command::new(bin("ternd"))
            .args(["install", "--config"])
            .arg(&bx.config)
            .arg(bundle)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let v11 = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    let f11 = d.path().join("v11.bundle");
    v11.write(&f11);
    let mut tampered = std::fs::read(&f11).unwrap();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    let bad = d.path().join("bad.bundle");
    std::fs::write(&bad, &tampered).unwrap();

    // Offline.
    let (code, out) = install(&bad);
    assert_eq!(code, Some(65), "{out}");
    assert!(out.contains("bad_chunk"), "{out}");
    let (code, out) = install(&f11);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"state\":\"health\""), "{out}");
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
    let (code, out) = install(&f11);
    assert_eq!(
        code,
        Some(0),
        "installing the same bundle again changes nothing: {out}"
    );
    assert!(staging_empty(&bx.state));

    // The daemon starts the health window and commits; the copy a killed `sudo ternd
    // install` left is removed as it starts.
    let leftover = bx.state.join(".install-a1b2c3.bundle");
    std::fs::write(&leftover, b"half a bundle").unwrap();
    let _daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    let state = bx.state.clone();
    wait_for("the offline install committed", T, || {
        (count(
            &state,
            "SELECT count(*) FROM updates WHERE state = 'committed'",
        ) == Some(1))
        .then_some(())
    })
    .unwrap();
    assert!(!leftover.exists());

    // Through the running daemon: a damaged copy is refused, a good one goes through.
    let v12 = build(&next(d.path(), "1.2.0", same), CHUNK, &[&k], |_| {});
    let f12 = d.path().join("v12.bundle");
    v12.write(&f12);
    let mut damaged = std::fs::read(&f12).unwrap();
    let at = damaged.len() / 2;
    damaged[at] ^= 1;
    let bad12 = d.path().join("bad12.bundle");
    std::fs::write(&bad12, &damaged).unwrap();
    let (code, out) = install(&bad12);
    assert_eq!(code, Some(65), "{out}");
    assert!(out.contains("bad_chunk"), "{out}");
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
    let (code, out) = install(&f12);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"state\":\"committed\""), "{out}");
    assert_eq!(active(&bx.state).unwrap().0, "1.2.0");
    // An older one is refused as a downgrade.
    let (code, out) = install(&f11);
    assert_eq!(code, Some(65), "{out}");
    assert!(out.contains("downgrade"), "{out}");
    assert_eq!(active(&bx.state).unwrap().0, "1.2.0");
    // Bundles go to the running daemon's updater directly: there is no spool to poll.
    assert!(!bx.state.join("spool").exists(), "no spool directory");
}

fn integrity_ok(state: &Path) -> bool {
    db(state)
        .and_then(|c| Ok(c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))?))
        .is_ok_and(|s| s == "ok")
}

/// The state of the update to `version`, if it has a row.
pub fn update_state(state: &Path, version: &str) -> Option<String> {
    db(state)
        .ok()?
        .query_row(
            "SELECT state FROM updates WHERE version = ?1 ORDER BY id DESC LIMIT 1",
            [version],
            |r| r.get(0),
        )
        .ok()
}

/// A small xorshift, seeded from the clock and printed, so a failing run can be replayed with
/// TERN_TEST_SEED.
fn rng() -> impl FnMut() -> u64 {
    let seed = std::env::var("TERN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| updates::now() as u64 ^ u64::from(std::process::id()));
    eprintln!("TERN_TEST_SEED={seed}");
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Power cut at 50 instants spread over download → verify → stage → self-test → activate →
/// health (every named step once, the rest at random moments by SIGKILL): after each, the
/// database is intact, the active version is the old or the new one, and a restart finishes
/// the update with no staging left behind.
#[test]
fn power_cut_at_50_points_leaves_old_or_new_and_the_restart_finishes() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let bx = update_box("cr-1", &broker, &[&k], 1, "");
    let mut w = watcher(&broker, "cr-1");
    let topic = "tern/cr-1/update/digits-mlp-int8";
    const POINTS: &[&str] = &[
        "update:accepted",
        "update:chunk-written",
        "update:verifying",
        "update:unpacked",
        "update:staged",
        "update:self_testing",
        "install:copied",
        "install:recorded",
        "update:installed",
        "update:activating",
        "activate:committed",
        "update:activated",
        "update:health",
        "update:health-passed",
    ];
    let mut next_rand = rng();
    let mut old = "1.0.0".to_string();
    // How long an update takes here, measured on the first (uninterrupted) one: random kills
    // land within it.
    let mut span_ms = 0u64;
    // scripts: tests/bench/crash_campaign.sh runs 1,000.
    let points: usize = std::env::var("TERN_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    for i in 0..=points {
        let version = format!("1.{}.0", i + 1);
        let built = build(&next(d.path(), &version, same), CHUNK, &[&k], |_| {});
        let how = match i {
            0 => "calibration".to_string(),
            i if i <= POINTS.len() => POINTS[i - 1].to_string(),
            _ => format!("kill after {} ms", next_rand() % (span_ms + 300)),
        };
        let crash_at = how.starts_with("update:")
            || how.starts_with("install:")
            || how.starts_with("activate:");
        let envs: Vec<(&str, &str)> = if crash_at {
            vec![("TERN_CRASH_AT", how.as_str())]
        } else {
            vec![]
        };
        let mut daemon = Daemon::spawn(&bx.config, None, &envs).unwrap();
        wait_online(&mut w, "cr-1");
        let started = std::time::Instant::now();
        built.publish(&mut w, topic, SYNC);
        if i == 0 {
            // Up to activation; the health window after it is mostly waiting.
            event(&mut w, "cr-1", "calibration update", |e| {
                e["event"] == "update.health" && e["version"] == version.as_str()
            });
            span_ms = started.elapsed().as_millis() as u64;
            eprintln!("an update takes {span_ms} ms here up to its health window");
            event(&mut w, "cr-1", "calibration commit", |e| {
                e["event"] == "update.committed" && e["version"] == version.as_str()
            });
            daemon.signal("TERM").unwrap();
            daemon.wait(T).unwrap();
            old = version;
            continue;
        }
        if crash_at {
            let status = daemon.wait(T).unwrap_or_else(|e| panic!("{how}: {e}"));
            assert!(
                !status.success(),
                "{how}: the crash point was never reached"
            );
        } else {
            let ms: u64 = how.split(' ').nth(2).unwrap().parse().unwrap();
            let until = started + Duration::from_millis(ms);
            std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
            daemon.signal("KILL").unwrap();
            daemon.wait(T).unwrap();
        }
        assert!(integrity_ok(&bx.state), "{how}: integrity_check");
        let (now, _) = active(&bx.state).unwrap();
        assert!(
            now == old || now == version,
            "{how}: active {now}, expected {old} or {version}"
        );

        let _daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
        let state = bx.state.clone();
        let end = wait_for(
            &format!("{how}: the update to end after the restart"),
            T,
            || {
                update_state(&state, &version)
                    .filter(|s| matches!(s.as_str(), "committed" | "failed" | "rolled_back"))
            },
        )
        .unwrap();
        assert_eq!(end, "committed", "{how}");
        assert_eq!(active(&bx.state).unwrap().0, version, "{how}");
        assert!(staging_empty(&bx.state), "{how}: staging left behind");
        assert!(integrity_ok(&bx.state), "{how}");
        // No half-copied model directory either.
        let models = bx.state.join("models").join(MODEL);
        for e in std::fs::read_dir(&models).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                semver::Version::parse(&name).is_ok(),
                "{how}: stray {name} in {}",
                models.display()
            );
        }
        drop(_daemon);
        old = version;
        w.drain();
    }
}

/// A download killed at 10%, 20% … 90% resumes: across all the restarts no chunk is received
/// more than once beyond the one being written at the kill, and the result is whole.
#[test]
fn resume_fetches_only_missing_chunks() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = key();
    // One chunk asked for at a time: at a kill nothing else is on the wire, so what the box
    // logs as received is what crossed the network.
    let bx = fleet_box_with(
        "digits-cnn-int8",
        "rs-1",
        &broker.url(true),
        "",
        &format!(
            "[updates]\nkeys = [\"{}\"]\nhealth_window_secs = 1\nwindow = 1\n",
            k.public().to_base64()
        ),
    );
    let mut w = watcher(&broker, "rs-1");
    let pkg = variant(
        &package("digits-cnn-int8"),
        &d.path().join("cnn"),
        "digits-cnn-int8",
        "1.1.0",
        same,
    );
    let built = build(&pkg, 16 * 1024, &[&k], |_| {});
    let n = built.signed.artifact.chunks.len();
    built.publish(&mut w, "tern/rs-1/update/digits-cnn-int8", SYNC);
    let log_env = ("RUST_LOG", "info,ternd::update=debug");
    let mut logs = Vec::new();
    let mut kills = 0;
    for p in (10..=90).step_by(10) {
        let at = n * p / 100;
        // Every other kill lands between writing a chunk and recording it.
        let point = if p % 20 == 0 {
            format!("update:chunk-written-{at}")
        } else {
            format!("update:chunk-{at}")
        };
        let mut daemon = Daemon::spawn(
            &bx.config,
            None,
            &[("TERN_CRASH_AT", point.as_str()), log_env],
        )
        .unwrap();
        let status = daemon.wait(T).unwrap();
        assert!(!status.success(), "{point} not reached");
        kills += 1;
        logs.push(daemon.stderr());
        assert_eq!(
            update_state(&bx.state, "1.1.0").as_deref(),
            Some("downloading"),
            "{point}"
        );
    }
    let daemon = Daemon::spawn(&bx.config, None, &[log_env]).unwrap();
    let state = bx.state.clone();
    wait_for("the resumed update committed", T, || {
        (update_state(&state, "1.1.0").as_deref() == Some("committed")).then_some(())
    })
    .unwrap();
    logs.push(daemon.stderr());
    drop(daemon);

    let mut seen = vec![0u32; n];
    let mut refetched_per_run = Vec::new();
    for log in &logs {
        let mut again = 0;
        for line in log.lines().filter(|l| l.contains("chunk received")) {
            let i: usize = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("chunk="))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no chunk index in {line:?}"));
            if seen[i] > 0 {
                again += 1;
            }
            seen[i] += 1;
        }
        refetched_per_run.push(again);
    }
    assert!(
        seen.iter().all(|&c| c >= 1),
        "every chunk arrived: {seen:?}"
    );
    assert!(
        refetched_per_run.iter().all(|&a| a <= 1),
        "at most one chunk fetched again per restart: {refetched_per_run:?}"
    );
    let total: u32 = seen.iter().sum();
    assert!(
        total as usize <= n + kills,
        "{total} receptions for {n} chunks and {kills} kills"
    );
    assert_eq!(
        active_of(&bx.state, "digits-cnn-int8").as_deref(),
        Some("1.1.0")
    );
    let installed = bx.state.join("models/digits-cnn-int8/1.1.0/model.onnx");
    assert_eq!(
        std::fs::read(installed).unwrap(),
        std::fs::read(pkg.join("model.onnx")).unwrap()
    );
}

pub fn active_of(state: &Path, model: &str) -> Option<String> {
    db(state)
        .ok()?
        .query_row(
            "SELECT version FROM model_versions WHERE name = ?1 AND state = 'active'",
            [model],
            |r| r.get(0),
        )
        .ok()
}

/// `tern-update publish` to group `lab` with `canaries` canaries and no failure allowed:
/// whether it went on to the group, and what it printed.
fn canary_publish(broker: &Broker, bundle: &Path, canaries: u32, wait_secs: u32) -> (bool, String) {
    let o = std::process::Command::new(bin("tern-update"))
        .args([
            "publish",
            "--broker",
            &broker.url(false),
            "--group",
            "lab",
            "--canary",
        ])
        .arg(canaries.to_string())
        .args(["--abort-above", "0", "--wait-secs"])
        .arg(wait_secs.to_string())
        .arg(bundle)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// Staged rollout with the tool: a canary that fails stops the rollout before the rest of the
/// group sees the update; a healthy canary lets it go on to the whole group.
#[test]
fn canary_failure_stops_the_rollout_and_success_lets_it_go_on() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let boxes: Vec<FleetBox> = ["can-1", "can-2"]
        .iter()
        .map(|dev| update_box(dev, &broker, &[&k], 1, ""))
        .collect();
    let mut w = client(
        &broker,
        false,
        "can-watch",
        &["tern/+/state", "tern/+/events", SYNC],
    );
    let _daemons: Vec<Daemon> = boxes
        .iter()
        .map(|b| Daemon::spawn(&b.config, None, &[]).unwrap())
        .collect();
    wait_online(&mut w, "can-1");
    wait_online(&mut w, "can-2");
    let publish = |bundle: &Path| canary_publish(&broker, bundle, 1, 60);

    let broken = variant(
        &package("digits-mlp-int8-broken"),
        &d.path().join("broken"),
        MODEL,
        "2.0.0",
        same,
    );
    let bad = build(&broken, CHUNK, &[&k], |_| {});
    let bad_file = d.path().join("bad.bundle");
    bad.write(&bad_file);
    let (ok, out) = publish(&bad_file);
    assert!(!ok, "a failed canary must stop the rollout: {out}");
    assert!(
        out.contains("can-1") && out.contains("failed") && out.contains("rollout stopped"),
        "{out}"
    );
    assert_eq!(
        update_state(&boxes[0].state, "2.0.0").as_deref(),
        Some("failed")
    );
    assert_eq!(
        update_state(&boxes[1].state, "2.0.0"),
        None,
        "the rest of the group never saw it"
    );

    let good = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    let good_file = d.path().join("good.bundle");
    good.write(&good_file);
    let (ok, out) = publish(&good_file);
    assert!(ok, "{out}");
    assert!(out.contains("rolling out to group lab"), "{out}");
    for b in &boxes {
        let state = b.state.clone();
        wait_for("the group update committed", T, || {
            (update_state(&state, "1.1.0").as_deref() == Some("committed")).then_some(())
        })
        .unwrap();
        assert_eq!(active(&b.state).unwrap().0, "1.1.0");
    }
}

/// A canary abort rolls the committed canaries back even when someone on the broker claimed
/// the abort's command id first (it used to be `rollout-abort-<sha12>-<device>`, answered
/// `conflict` and never read), and the tool says what each box answered.
#[test]
fn a_canary_abort_cannot_be_pre_empted_and_reports_each_rollback() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let (k, stranger) = (key(), key());
    // ab-2 trusts another key: it refuses the bundle, so the canaries fail at 50%.
    let boxes = [
        update_box("ab-1", &broker, &[&k], 1, ""),
        update_box("ab-2", &broker, &[&stranger], 1, ""),
    ];
    let mut w = client(
        &broker,
        false,
        "ab-watch",
        &["tern/+/state", "tern/+/events", "tern/ab-1/reply/#", SYNC],
    );
    let _daemons: Vec<Daemon> = boxes
        .iter()
        .map(|b| Daemon::spawn(&b.config, None, &[]).unwrap())
        .collect();
    wait_online(&mut w, "ab-1");
    wait_online(&mut w, "ab-2");
    let before = active(&boxes[0].state).unwrap();
    let v11 = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    let file = d.path().join("v11.bundle");
    v11.write(&file);
    // The old abort id, claimed by an unsigned read command (the default policy takes it).
    let old_id = format!("rollout-abort-{}-ab-1", &v11.signed.artifact.sha256[..12]);
    w.publish(
        "tern/ab-1/cmd/status",
        serde_json::json!({"id": old_id, "args": {}})
            .to_string()
            .as_bytes(),
        None,
    )
    .unwrap();
    let claimed = format!("tern/ab-1/reply/{old_id}");
    w.recv_match("the claim's reply", T, |m| m.topic == claimed)
        .unwrap();

    let (ok, out) = canary_publish(&broker, &file, 2, 20);
    assert!(!ok, "{out}");
    assert!(out.contains("rollout stopped"), "{out}");
    assert!(
        out.contains(&format!("ab-1: rolled back from 1.1.0 to {}", before.0)),
        "{out}"
    );
    assert_eq!(
        update_state(&boxes[0].state, "1.1.0").as_deref(),
        Some("committed")
    );
    assert_eq!(active(&boxes[0].state).unwrap(), before, "{out}");
}

/// A daemon that keeps dying inside the health window (a model that crashes it, say) gets the
/// new version rolled back, and an operator who clears a manifest stops its download.
#[test]
fn restarts_in_the_health_window_roll_back_and_a_cleared_manifest_stops_its_download() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let bx = update_box("hr-1", &broker, &[&k], 1, "health_window_secs = 600");
    let mut w = watcher(&broker, "hr-1");
    let topic = "tern/hr-1/update/digits-mlp-int8";
    let mut daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    wait_online(&mut w, "hr-1");
    let v11 = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    v11.publish(&mut w, topic, SYNC);
    event(&mut w, "hr-1", "health window", |e| {
        e["event"] == "update.health"
    });
    // A clean stop and start (an upgrade, a reboot) is not held against the new version.
    daemon.signal("TERM").unwrap();
    assert!(daemon.wait(T).unwrap().success());
    let flag = "SELECT health_clean_stop FROM updates WHERE version = '1.1.0'";
    assert_eq!(count(&bx.state, flag), Some(1));
    daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
    let state = bx.state.clone();
    wait_for("the clean restart resumed the window", T, || {
        (count(&state, flag) == Some(0)).then_some(())
    })
    .unwrap();
    assert_eq!(
        count(
            &bx.state,
            "SELECT health_restarts FROM updates WHERE version = '1.1.0'"
        ),
        Some(0)
    );
    for n in 1..=3 {
        daemon.signal("KILL").unwrap();
        daemon.wait(T).unwrap();
        assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
        daemon = Daemon::spawn(&bx.config, None, &[]).unwrap();
        // The restart has been counted before the next kill.
        let state = bx.state.clone();
        wait_for("the restart counted", T, || {
            (count(
                &state,
                "SELECT health_restarts FROM updates WHERE version = '1.1.0'",
            ) >= Some(n))
            .then_some(())
        })
        .unwrap();
    }
    let e = event(&mut w, "hr-1", "rollback after restarts", |e| {
        matches!(
            e["event"].as_str(),
            Some("update.rolled_back" | "update.committed")
        )
    });
    assert_eq!(e["event"], "update.rolled_back", "{e}");
    assert!(
        e["reason"].as_str().unwrap().contains("restarted 3 times"),
        "{e}"
    );
    assert_eq!(active(&bx.state).unwrap().0, "1.0.0");

    // A manifest whose chunks never come, then cleared by the operator.
    let v12 = build(&next(d.path(), "1.2.0", same), CHUNK, &[&k], |_| {});
    w.publish_retained(topic, &v12.manifest).unwrap();
    event(&mut w, "hr-1", "download started", |e| {
        e["event"] == "update.downloading" && e["version"] == "1.2.0"
    });
    w.publish_retained(topic, b"").unwrap();
    let e = event(&mut w, "hr-1", "download withdrawn", |e| {
        e["event"] == "update.failed" && e["version"] == "1.2.0"
    });
    assert_eq!(e["code"], "withdrawn", "{e}");
    assert!(staging_empty(&bx.state));
    drop(daemon);
}

/// An update that would not leave the configured free space is a clear failure before a byte
/// is staged, and changes nothing.
#[test]
fn a_full_disk_is_a_clear_failure() {
    let d = tempfile::tempdir().unwrap();
    let k = key();
    // More free space asked for than any disk here has.
    let bx = fleet_box_with(
        MODEL,
        "full-1",
        "mqtt://127.0.0.1:9",
        "",
        &keys_toml(&[&k], 1, "min_free_mib = 1000000000"),
    );
    let v11 = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    let f = d.path().join("v11.bundle");
    v11.write(&f);
    let o = std::process::Command::new(bin("ternd"))
        .args(["install", "--config"])
        .arg(&bx.config)
        .arg(&f)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(65), "{out}");
    assert!(
        out.contains("\"code\":\"no_space\"") && out.contains("bytes free"),
        "{out}"
    );
    assert_eq!(active(&bx.state).unwrap().0, "1.0.0");
    assert!(staging_empty(&bx.state));
}

/// No lock is held across a self-test: while an update's new version is stuck in its
/// self-test (a crash point hangs the load), `status`, `ping` and an inference of another
/// model are answered, and the box still says the old version serves.
#[test]
fn commands_answer_while_an_update_self_tests() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let iris = package("iris-mlp-int8");
    let bx = update_box(
        "slow-1",
        &broker,
        &[&k],
        1,
        &format!("[[models]]\npackage = \"{}\"\n", iris.display()),
    );
    let mut w = watcher(&broker, "slow-1");
    let mut c = client(&broker, false, "slow-1-asker", &["tern/slow-1/reply/+"]);
    // A first run installs both configured models; the second hangs any new version's
    // self-test (configured packages installed already are not verified again).
    {
        let mut first = Daemon::spawn(&bx.config, None, &[]).unwrap();
        wait_online(&mut w, "slow-1");
        first.signal("TERM").unwrap();
        assert!(first.wait(T).unwrap().success(), "{}", first.stderr());
    }
    let _daemon = Daemon::spawn(
        &bx.config,
        None,
        &[("TERN_CRASH_AT", "install:verifying:hang")],
    )
    .unwrap();
    wait_online(&mut w, "slow-1");
    let v11 = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    v11.publish(&mut w, "tern/slow-1/update/digits-mlp-int8", SYNC);
    event(&mut w, "slow-1", "the self-test", |e| {
        e["event"] == "update.self_testing" && e["version"] == "1.1.0"
    });
    let asked = std::time::Instant::now();
    let pong = crate::fleet::command(&mut c, "slow-1", "ping", &serde_json::json!({"id": "p1"}));
    assert_eq!(pong["result"]["pong"], true, "{pong}");
    let status =
        crate::fleet::command(&mut c, "slow-1", "status", &serde_json::json!({"id": "s1"}));
    let models = status["result"]["models"].as_array().unwrap().clone();
    let digits = models.iter().find(|m| m["name"] == MODEL).unwrap();
    assert_eq!(digits["version"], "1.0.0", "{status}");
    let infer = serde_json::json!({"id": "i1", "args": {"model": "iris-mlp-int8", "input": [[5.1, 3.5, 1.4, 0.2]]}});
    let r = crate::fleet::command(&mut c, "slow-1", "infer", &infer);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["top"][0]["label"], "setosa", "{r}");
    eprintln!(
        "three commands answered in {:?} during the self-test",
        asked.elapsed()
    );
    // The update is still in its self-test: nothing waited for it to end.
    assert_eq!(
        update_state(&bx.state, "1.1.0").as_deref(),
        Some("self_testing")
    );
    w.publish_retained("tern/slow-1/update/digits-mlp-int8", b"")
        .unwrap();
}

/// The updater is restarted when it panics (a bug): the daemon stays up, names the task in
/// its log, and the update resumes from the database and commits.
#[test]
fn a_panicking_updater_is_restarted_and_its_update_goes_on() {
    let Some(broker) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let bx = update_box("panic-1", &broker, &[&k], 1, "");
    let mut w = watcher(&broker, "panic-1");
    let mut daemon = Daemon::spawn(
        &bx.config,
        None,
        &[("TERN_CRASH_AT", "update:accepted:panic")],
    )
    .unwrap();
    wait_online(&mut w, "panic-1");
    let v11 = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    v11.publish(&mut w, "tern/panic-1/update/digits-mlp-int8", SYNC);
    event(&mut w, "panic-1", "the commit", |e| {
        e["event"] == "update.committed" && e["version"] == "1.1.0"
    });
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon runs on"
    );
    let log = daemon.stderr();
    assert!(
        log.contains("task ended; restarting it") && log.contains("updater"),
        "{log}"
    );
    assert_eq!(
        count(&bx.state, "SELECT count(*) FROM updates").unwrap(),
        1,
        "one update, resumed, not a second one"
    );
    daemon.signal("TERM").unwrap();
    assert!(daemon.wait(T).unwrap().success(), "{}", daemon.stderr());
    w.publish_retained("tern/panic-1/update/digits-mlp-int8", b"")
        .unwrap();
}

/// Finding 12: a box with no real-time clock (its wall clock at 1970 under libfaketime) and
/// `updates.freshness_secs`. Before any signed time it refuses a good manifest as stale;
/// `tern-update time` lets that one in; by the signed clock an expired manifest and one made
/// too long ago are refused (by its own clock neither is); the time outlives a restart with
/// its retained message gone.
#[test]
fn a_box_without_a_clock_judges_manifests_by_the_operators_signed_time() {
    let Some(broker) = mosquitto() else { return };
    let Some(clock) = clock_at_1970() else { return };
    let clock: Vec<(&str, &str)> = clock.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = tempfile::tempdir().unwrap();
    let pkcs8 = tern_update::command::generate_pkcs8();
    let key_file = d.path().join("op.key");
    std::fs::write(&key_file, &pkcs8).unwrap();
    let k = SigningKey::from_pkcs8(&pkcs8).unwrap();
    let dev = "rtcless-1";
    let bx = update_box(dev, &broker, &[&k], 1, "freshness_secs = 3600\n");
    let mut w = watcher(&broker, dev);
    let mut daemon = Daemon::spawn(&bx.config, None, &clock).unwrap();
    wait_online(&mut w, dev);
    let topic = |v: &str| format!("tern/{dev}/update/{}", v.replace('.', "-"));
    let refused = |w: &mut Client, code: &str, version: &str| {
        event(w, dev, &format!("{version} refused as {code}"), |e| {
            e["event"] == "update.refused" && e["version"] == version
        })["code"]
            .as_str()
            .map(str::to_string)
    };

    let good = build(&next(d.path(), "1.1.0", same), CHUNK, &[&k], |_| {});
    good.publish(&mut w, &topic("1.1.0"), SYNC);
    assert_eq!(refused(&mut w, "stale", "1.1.0").as_deref(), Some("stale"));
    assert_eq!(active(&bx.state).unwrap().0, "1.0.0");

    let o = std::process::Command::new(bin("tern-update"))
        .args(["time", "--broker", &broker.url(false), "--key"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let done = event(&mut w, dev, "1.1.0 committed", |e| {
        matches!(
            e["event"].as_str(),
            Some("update.committed" | "update.failed" | "update.rolled_back")
        )
    });
    assert_eq!(
        (done["event"].as_str(), done["version"].as_str()),
        (Some("update.committed"), Some("1.1.0")),
        "{done}"
    );
    let kept: Value =
        serde_json::from_slice(&std::fs::read(bx.state.join("trust.json")).unwrap()).unwrap();
    let t = kept["time"].as_i64().expect("the signed time is kept");
    assert!((updates::now() - t).abs() < 600, "{kept}");
    // The box's own clock really was in 1970 (else this test proves nothing about it).
    let log = daemon.stderr();
    assert!(
        log.contains("clock is behind the operator's signed time") && log.contains("clock=86400"),
        "{log}"
    );

    // Good signatures, but by the signed clock one expired and one is two hours old.
    // Expired before the signed time, so also by every clock the box may have since.
    let expired = build(&next(d.path(), "1.2.0", same), CHUNK, &[&k], |s| {
        s.expires = t - 1
    });
    let old = build(&next(d.path(), "1.3.0", same), CHUNK, &[&k], |s| {
        s.issued = Some(updates::now() - 7200)
    });
    expired.publish(&mut w, &topic("1.2.0"), SYNC);
    assert_eq!(
        refused(&mut w, "expired", "1.2.0").as_deref(),
        Some("expired")
    );
    old.publish(&mut w, &topic("1.3.0"), SYNC);
    assert_eq!(refused(&mut w, "stale", "1.3.0").as_deref(), Some("stale"));

    // Restarted with the retained time gone: the kept one still judges.
    for v in ["1.2.0", "1.3.0"] {
        w.publish_retained(&topic(v), b"").unwrap();
    }
    w.publish_retained("tern/fleet/time", b"").unwrap();
    w.sync(SYNC).unwrap();
    daemon.signal("TERM").unwrap();
    daemon.wait(T).unwrap();
    let _daemon = Daemon::spawn(&bx.config, None, &clock).unwrap();
    wait_online(&mut w, dev);
    let expired = build(&next(d.path(), "1.2.1", same), CHUNK, &[&k], |s| {
        s.expires = t - 1
    });
    expired.publish(&mut w, &topic("1.2.1"), SYNC);
    assert_eq!(
        refused(&mut w, "expired", "1.2.1").as_deref(),
        Some("expired")
    );
    assert_eq!(active(&bx.state).unwrap().0, "1.1.0");
}
