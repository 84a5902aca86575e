//! `ternd run` as systemd runs it: readiness, results, reload, watchdog, stop, and kill -9.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_tests::*;

const T: Duration = Duration::from_secs(60);

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    inbox: PathBuf,
}

/// A copy of the demo: the demo's inbox and the int8 digits CNN, state in a temp dir.
fn demo_setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    copy_dir(&root().join("configs/demo/inbox"), &inbox).unwrap();
    let config = dir.path().join("ternd.toml");
    std::fs::write(&config, demo_config(extra)).unwrap();
    let state = dir.path().join("state");
    Setup {
        dir,
        config,
        state,
        inbox,
    }
}

fn demo_config(extra: &str) -> String {
    format!(
        "state_dir = \"state\"\n\n[[models]]\npackage = \"{}\"\n\n[[feeds]]\nkind = \"directory\"\nname = \"inbox\"\npath = \"inbox\"\n\n[[pipelines]]\nname = \"digits\"\nfeed = \"inbox\"\nmodel = \"digits-cnn-int8\"\n{extra}",
        package("digits-cnn-int8").display()
    )
}

fn results(state: &Path, pipeline: &str) -> Vec<(String, String)> {
    let c = db(state).unwrap();
    let mut s = c
        .prepare("SELECT source, label FROM results WHERE pipeline = ?1 ORDER BY source")
        .unwrap();
    s.query_map([pipeline], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn wait_results(state: &Path, pipeline: &str, n: i64) {
    let sql = format!("SELECT count(*) FROM results WHERE pipeline = '{pipeline}'");
    wait_for(&format!("{n} results of {pipeline}"), T, || {
        (count(state, &sql)? >= n).then_some(())
    })
    .unwrap();
}

/// Write a file the way a well-behaved producer does: a dot-name, then rename into place.
fn drop_file(inbox: &Path, name: &str, from: &Path) {
    let tmp = inbox.join(format!(".{name}"));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, inbox.join(name)).unwrap();
}

#[test]
fn demo_runs_ready_results_restart_and_stop() {
    let s = demo_setup("");
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    let ready = notify.wait_for("READY=1", T).unwrap();
    assert!(
        ready.contains("STATUS=ready: 1 model(s) active, 1 pipeline(s) running"),
        "{ready}"
    );
    assert!(!ready.contains("degraded"), "{ready}");
    // READY means the model is active in the database already.
    let active = count(
        &s.state,
        "SELECT count(*) FROM model_versions WHERE state = 'active'",
    );
    assert_eq!(active, Some(1));

    wait_results(&s.state, "digits", 12);
    let got = results(&s.state, "digits");
    let right = got
        .iter()
        .filter(|(src, label)| src[6..7] == *label)
        .count();
    assert!(right >= 11, "only {right}/12 right: {got:?}");

    // A new file arrives while running.
    drop_file(&s.inbox, "new-7.png", &s.inbox.join("digit-7.png"));
    wait_results(&s.state, "digits", 13);
    assert!(results(&s.state, "digits").contains(&("new-7.png".into(), "7".into())));

    d.signal("TERM").unwrap();
    notify.wait_for("STOPPING=1", T).unwrap();
    let status = d.wait(T).unwrap();
    assert!(status.success(), "exit {status}: {}", d.stderr());

    // Restart: done files are not redone; a file that arrived while stopped is.
    drop_file(&s.inbox, "zz-late-3.png", &s.inbox.join("digit-3.png"));
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 14);
    let got = results(&s.state, "digits");
    assert_eq!(got.len(), 14, "files were processed twice: {got:?}");
    assert!(
        got.contains(&("zz-late-3.png".into(), "3".into())),
        "{got:?}"
    );
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());
}

#[test]
fn watchdog_pings_at_half_the_period() {
    let s = demo_setup("");
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(
        &s.config,
        Some(&notify.path),
        &[("WATCHDOG_USEC", "400000")],
    )
    .unwrap();
    notify.wait_for("READY=1", T).unwrap();
    let start = std::time::Instant::now();
    for _ in 0..4 {
        notify
            .wait_for("WATCHDOG=1", Duration::from_secs(5))
            .unwrap();
    }
    // Four pings at a 200 ms pace take at least ~600 ms; a ping per message loop would not.
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "pings too fast: {:?}",
        start.elapsed()
    );
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

#[test]
fn sighup_keeps_running_config_on_error_and_applies_a_good_one() {
    let s = demo_setup("");
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 12);

    std::fs::write(
        &s.config,
        demo_config(
            "\n[[pipelines]]\nname = \"x\"\nfeed = \"nope\"\nmodel = \"digits-cnn-int8\"\n",
        ),
    )
    .unwrap();
    d.signal("HUP").unwrap();
    let msg = notify.wait_for("READY=1", T).unwrap();
    assert!(
        msg.contains("reload refused") && msg.contains("pipelines[1].feed"),
        "{msg}"
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "daemon died on a bad reload"
    );

    let second = format!(
        "\n[[models]]\npackage = \"{}\"\n\n[[pipelines]]\nname = \"mlp\"\nfeed = \"inbox\"\nmodel = \"digits-mlp-int8\"\n",
        package("digits-mlp-int8").display()
    );
    std::fs::write(&s.config, demo_config(&second)).unwrap();
    d.signal("HUP").unwrap();
    let msg = notify.wait_for("READY=1", T).unwrap();
    assert!(
        msg.contains("2 model(s) active, 2 pipeline(s) running"),
        "{msg}"
    );
    wait_results(&s.state, "mlp", 12);
    // The first pipeline was restarted, not reset: nothing redone.
    assert_eq!(results(&s.state, "digits").len(), 12);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());
}

#[test]
fn a_model_that_fails_its_self_test_leaves_the_daemon_up_and_degraded() {
    let s = demo_setup("");
    let text = demo_config("").replace(
        "digits-cnn-int8\"\n\n[[feeds]]",
        "digits-cnn-int8-broken\"\n\n[[feeds]]",
    );
    let text = text.replace(
        "model = \"digits-cnn-int8\"",
        "model = \"digits-cnn-int8-broken\"",
    );
    std::fs::write(&s.config, text).unwrap();
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    let ready = notify.wait_for("READY=1", T).unwrap();
    assert!(
        ready.contains("0 model(s) active, 0 pipeline(s)"),
        "{ready}"
    );
    assert!(
        ready.contains("degraded") && ready.contains("digits-cnn-int8-broken"),
        "{ready}"
    );
    assert!(
        d.stderr()
            .contains("output `probs` differs from the reference"),
        "{}",
        d.stderr()
    );
    // Refused before anything was written.
    assert_eq!(
        count(&s.state, "SELECT count(*) FROM model_versions"),
        Some(0)
    );
    assert!(!s.state.join("models/digits-cnn-int8-broken").exists());
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// kill -9 at arbitrary instants during install, activation and processing, then a clean
/// start: the database is intact, exactly one version is active, no half-copied model
/// remains, and every inbox file has exactly one result.
#[test]
fn kill_9_at_any_instant_leaves_a_consistent_state() {
    let s = demo_setup("");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill -9 delays from seed {seed}");
    let mut x = seed | 1;
    for round in 0..8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(x % 700);
        let mut d = Daemon::spawn(&s.config, None, &[]).unwrap();
        // Fault injection: the delay picks the instant of the crash, it waits for nothing.
        std::thread::sleep(delay);
        d.signal("KILL").unwrap();
        let st = d.wait(T).unwrap();
        eprintln!("round {round}: killed after {delay:?} ({st})");
    }
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 12);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());

    let c = db(&s.state).unwrap();
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let states: Vec<(String, String)> = c
        .prepare("SELECT version, state FROM model_versions")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(states, [("1.0.0".to_string(), "active".to_string())]);
    let leftovers: Vec<_> = std::fs::read_dir(s.state.join("models/digits-cnn-int8"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(leftovers, ["1.0.0"], "half-copied installs left behind");
    let pkg = s.state.join("models/digits-cnn-int8/1.0.0");
    let (st, _, err) = ternd(&[
        "infer",
        "--model",
        pkg.to_str().unwrap(),
        "--input",
        s.inbox.join("digit-4.png").to_str().unwrap(),
    ])
    .unwrap();
    assert!(st.success(), "installed copy does not load: {err}");
    let got = results(&s.state, "digits");
    let mut sources: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
    sources.dedup();
    assert_eq!(sources.len(), 12, "duplicates or losses: {got:?}");
    assert_eq!(got.len(), 12, "duplicates: {got:?}");
}
