//! `ternd run` as systemd runs it: readiness, results, reload, watchdog, stop, and kill -9.

use serde_json::Value;
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

/// The demo exactly as shipped: `configs/demo.toml` verbatim (plus `extra`), its inbox and the
/// int8 digits CNN, copied into a temp tree laid out like the repository, so the relative
/// paths in demo.toml resolve as they do for a newcomer and `var/demo` lands in the temp dir.
fn demo_setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    let inbox = configs.join("demo/inbox");
    copy_dir(&root().join("configs/demo/inbox"), &inbox).unwrap();
    copy_dir(
        &package("digits-cnn-int8"),
        &dir.path().join("firmware-updates/models/digits-cnn-int8"),
    )
    .unwrap();
    let config = configs.join("demo.toml");
    std::fs::write(&config, demo_config(extra)).unwrap();
    let state = dir.path().join("var/demo");
    Setup {
        dir,
        config,
        state,
        inbox,
    }
}

fn demo_config(extra: &str) -> String {
    std::fs::read_to_string(root().join("configs/demo.toml")).unwrap() + extra
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

/// The watched folder taken away is noticed at once (the feed fails into its restart loop)
/// and, put back, read again: what the watcher still reacts to on the folder itself now that
/// opening it (every scan does) no longer counts.
#[test]
fn a_watched_folder_removed_restarts_its_feed_and_put_back_is_read() {
    let s = demo_setup("");
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 12);
    let keep = s.dir.path().join("keep");
    copy_dir(&s.inbox, &keep).unwrap();
    std::fs::remove_dir_all(&s.inbox).unwrap();
    wait_for("the feed restarting", T, || {
        d.stderr().contains("feed failed; restarting").then_some(())
    })
    .unwrap();
    std::fs::create_dir(&s.inbox).unwrap();
    drop_file(&s.inbox, "back-7.png", &keep.join("digit-7.png"));
    wait_results(&s.state, "digits", 13);
    assert!(results(&s.state, "digits").contains(&("back-7.png".into(), "7".into())));
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
    // The demo asks for nothing it cannot have here (no system bus, no broker): a newcomer's
    // first run says nothing is wrong.
    let log = d.stderr();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warned.is_empty(), "the demo warned: {warned:#?}");
    assert!(log.contains("ready"), "{log}");

    // Restart: done files are not redone; a file that arrived while stopped is.
    drop_file(&s.inbox, "zz-late-3.png", &s.inbox.join("digit-3.png"));
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 14);
    // A sentinel that arrives by event after the start-up scan: once its result is in, any
    // redo of an old file would be too.
    drop_file(&s.inbox, "zzz-sentinel-5.png", &s.inbox.join("digit-5.png"));
    wait_results(&s.state, "digits", 15);
    let got = results(&s.state, "digits");
    assert_eq!(got.len(), 15, "files were processed twice: {got:?}");
    assert!(
        got.contains(&("zz-late-3.png".into(), "3".into())),
        "{got:?}"
    );
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());
}

/// The plan `auto` chose for each package: (sha256, fingerprint, plan, tried, chosen_at).
fn plan_rows(state: &Path) -> Vec<(String, String, String, String, i64)> {
    let c = db(state).unwrap();
    let mut s = c
        .prepare("SELECT sha256, fingerprint, plan, tried, chosen_at FROM model_plans")
        .unwrap();
    s.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .map(|r| r.unwrap())
    .collect()
}

/// `auto` times the plans once per package and machine: a restart takes the recorded choice
/// (self-tested again, not timed), and a setting that changes a plan's speed times them again.
#[test]
fn the_plan_choice_is_recorded_and_reused_until_what_it_depends_on_changes() {
    let s = demo_setup("");
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let start = |notify: &mut NotifySocket| {
        let d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
        notify.wait_for("READY=1", T).unwrap();
        d
    };
    let stop = |mut d: Daemon| {
        d.signal("TERM").unwrap();
        assert!(d.wait(T).unwrap().success(), "{}", d.stderr());
        d.stderr()
    };

    let log = stop(start(&mut notify));
    let first = plan_rows(&s.state);
    assert_eq!(first.len(), 1, "{first:?}");
    let (sha, fingerprint, plan, tried, _) = &first[0];
    let tried: Vec<String> = serde_json::from_str(tried).unwrap();
    assert!(tried.len() >= 2, "{tried:?}");
    assert!(
        tried.iter().any(|t| t.starts_with(&format!("{plan}: "))),
        "{plan} not among {tried:?}"
    );
    assert!(fingerprint.contains("threads 1"), "{fingerprint}");
    let active: Vec<String> = column(
        &s.state,
        "SELECT sha256 FROM model_versions WHERE state = 'active'",
    );
    assert_eq!(active, vec![sha.clone()]);
    assert_eq!(log.matches("plan chosen").count(), 1, "{log}");

    // Same package, ternd, machine and settings: the recorded plan, self-tested, not timed.
    let log = stop(start(&mut notify));
    assert!(!log.contains("plan chosen"), "{log}");
    assert!(
        log.contains("plan taken as recorded"),
        "no recorded plan taken: {log}"
    );
    assert_eq!(plan_rows(&s.state), first);

    // Two threads per inference change every plan's speed. A reload loads the model again
    // with them (the executor is part of it): timed again, recorded anew.
    let d = start(&mut notify);
    std::fs::write(&s.config, demo_config("\n[engine]\nthreads = 2\n")).unwrap();
    d.signal("HUP").unwrap();
    let again = wait_for("the plan choice with two threads", T, || {
        let rows = plan_rows(&s.state);
        rows.iter()
            .any(|r| r.1.contains("threads 2"))
            .then_some(rows)
    })
    .unwrap();
    let log = stop(d);
    assert_eq!(log.matches("plan chosen").count(), 1, "{log}");
    // Recorded beside the first choice (going back to one thread would not time again).
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(again.iter().all(|r| &r.0 == sha), "{again:?}");
    assert!(again.contains(&first[0]), "{again:?}");
}

/// A configured onnxruntime library that does not load: a model pinned to the onnxruntime
/// plan is refused saying which file failed, and is not installed; a model on `auto` serves
/// from tract's plans, and its recorded choice says why onnxruntime was not among them. The
/// configured path is the only one tried (no other library is guessed around it).
#[test]
fn an_onnxruntime_library_that_does_not_load_refuses_its_plan_and_auto_does_without() {
    let d = tempfile::tempdir().unwrap();
    let lib = d.path().join("libonnxruntime.so.1.99.0");
    std::fs::write(&lib, b"not a shared object").unwrap();
    let config = d.path().join("ternd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"state\"\n[engine]\nonnxruntime_library = \"{}\"\n\
             [[models]]\npackage = \"{}\"\nplan = \"onnxruntime\"\n\
             [[models]]\npackage = \"{}\"\n",
            lib.display(),
            package("digits-mlp-int8").display(),
            package("iris-mlp-int8").display()
        ),
    )
    .unwrap();
    let mut notify = NotifySocket::new(d.path()).unwrap();
    let mut daemon = Daemon::spawn(&config, Some(&notify.path), &[]).unwrap();
    let ready = notify.wait_for("READY=1", T).unwrap();
    assert!(
        ready.contains("1 model(s) active") && ready.contains("degraded"),
        "{ready}"
    );
    let state = d.path().join("state");
    let installed: Vec<String> = column(&state, "SELECT name FROM model_versions");
    assert_eq!(installed, vec!["iris-mlp-int8".to_string()]);
    let rows: Vec<(String, String)> = {
        let c = db(&state).unwrap();
        let mut q = c.prepare("SELECT plan, tried FROM model_plans").unwrap();
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].0.starts_with("tract"), "{rows:?}");
    // Why onnxruntime was not among the plans timed: the library named, with its error.
    let tried: Vec<String> = serde_json::from_str(&rows[0].1).unwrap();
    let ort = tried
        .iter()
        .find(|t| t.starts_with("onnxruntime: "))
        .unwrap_or_else(|| panic!("{tried:?}"));
    assert!(ort.contains(&lib.display().to_string()), "{ort}");
    daemon.signal("TERM").unwrap();
    assert!(daemon.wait(T).unwrap().success());
    let log = daemon.stderr();
    assert!(
        log.contains("plan `onnxruntime`") && log.contains(&lib.display().to_string()),
        "the refusal does not name the library: {log}"
    );
    assert!(
        !log.contains("capi/libonnxruntime"),
        "another library was tried: {log}"
    );
}

/// The watchdog is fed while the daemon runs, and only for the process systemd watches:
/// with `WATCHDOG_PID` naming another process no ping comes (sd_watchdog_enabled(3)).
#[test]
fn watchdog_pings_come_for_the_watched_process_only() {
    let s = demo_setup("");
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(
        &s.config,
        Some(&notify.path),
        &[("WATCHDOG_USEC", "400000")],
    )
    .unwrap();
    notify.wait_for("READY=1", T).unwrap();
    for _ in 0..7 {
        notify.wait_for("WATCHDOG=1", T).unwrap();
    }
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());

    let s = demo_setup("");
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(
        &s.config,
        Some(&notify.path),
        &[("WATCHDOG_USEC", "400000"), ("WATCHDOG_PID", "1")],
    )
    .unwrap();
    notify.wait_for("READY=1", T).unwrap();
    // Twelve results take many watchdog periods; none of them was pinged.
    wait_results(&s.state, "digits", 12);
    d.signal("TERM").unwrap();
    notify.wait_for("STOPPING=1", T).unwrap();
    assert!(d.wait(T).unwrap().success());
    assert!(
        !notify.messages.iter().any(|m| m.contains("WATCHDOG=1")),
        "{:?}",
        notify.messages
    );
}

/// A pipeline whose task panics (a bug, at its first inference) is stopped and says why,
/// and the rest of the daemon runs on: it still stops cleanly, and after a restart the file
/// whose attempt was counted is done.
#[test]
fn a_panicking_pipeline_stops_alone_and_says_why() {
    let s = demo_setup("");
    let mut d = Daemon::spawn(&s.config, None, &[("TERN_CRASH_AT", "infer:begun:panic")]).unwrap();
    let log = wait_for("the pipeline stopped", T, || {
        let log = d.stderr();
        log.contains("pipeline stopped").then_some(log)
    })
    .unwrap();
    assert!(
        log.contains("its task pipeline.digits panicked: TERN_CRASH_AT=infer:begun:panic"),
        "{log}"
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon runs on: {log}"
    );
    d.signal("TERM").unwrap();
    let status = d.wait(T).unwrap();
    assert!(status.success(), "exit {status}: {}", d.stderr());
    let mut d = Daemon::spawn(&s.config, None, &[]).unwrap();
    wait_results(&s.state, "digits", 12);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// A task the daemon cannot do without (here the registry's, panicking as a bug would, at
/// the first activation) takes the daemon down with a non-zero exit, naming it, so that
/// systemd restarts it; the restart finds the activation committed and serves.
#[test]
fn a_fatal_task_that_panics_stops_the_daemon_and_names_it() {
    let s = demo_setup("");
    let mut d = Daemon::spawn(
        &s.config,
        None,
        &[("TERN_CRASH_AT", "activate:committed:panic")],
    )
    .unwrap();
    let status = d.wait(T).unwrap();
    let log = d.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("task `registry` panicked: TERN_CRASH_AT=activate:committed:panic"),
        "{log}"
    );
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    let ready = notify.wait_for("READY=1", T).unwrap();
    assert!(
        ready.contains("1 model(s) active") && !ready.contains("degraded"),
        "{ready}"
    );
    wait_results(&s.state, "digits", 12);
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

    // A new pipeline and model are applied; a changed [dbus] is said to need a restart.
    let second = format!(
        "\n[[models]]\npackage = \"{}\"\n\n[[pipelines]]\nname = \"mlp\"\nfeed = \"inbox\"\nmodel = \"digits-mlp-int8\"\n\n[dbus]\nbus = \"session\"\n",
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
    // The first pipeline was restarted, not reset: nothing redone. A sentinel processed by
    // both pipelines after the reload shows any redo would have happened by now.
    drop_file(&s.inbox, "zzz-sentinel-2.png", &s.inbox.join("digit-2.png"));
    wait_results(&s.state, "digits", 13);
    wait_results(&s.state, "mlp", 13);
    assert_eq!(results(&s.state, "digits").len(), 13);
    assert_eq!(results(&s.state, "mlp").len(), 13);
    assert!(
        d.stderr()
            .contains("dbus changes need a restart; keeping the running D-Bus interface"),
        "{}",
        d.stderr()
    );
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());
}

#[test]
fn a_model_that_fails_its_self_test_leaves_the_daemon_up_and_degraded() {
    let s = demo_setup("");
    let broken = package("digits-cnn-int8-broken");
    let text = demo_config("")
        .replace(
            "../firmware-updates/models/digits-cnn-int8",
            broken.to_str().unwrap(),
        )
        .replace(
            "model = \"digits-cnn-int8\"",
            "model = \"digits-cnn-int8-broken\"",
        );
    assert!(
        text.contains("int8-broken\"\n"),
        "demo.toml changed shape: {text}"
    );
    // The fixture answers wrongly in tract only; onnxruntime runs it right (and `auto` would
    // serve it there).
    let text = format!("{text}\n[engine]\nplan = \"tract\"\n");
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
    // TERN_TEST_SEED replays a failing run's delays.
    let seed = std::env::var("TERN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill -9 delays from seed {seed} (TERN_TEST_SEED)");
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
    wait_all_handled(&s.state);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());

    assert_consistent(&s, &[("1.0.0", "active")]);
}

/// After a crash and a clean restart that processed the inbox: the database is intact, the
/// model versions are in exactly `versions` states, no half-copied install is left, the
/// installed copies load, and every inbox file has exactly one result.
fn assert_consistent(s: &Setup, versions: &[(&str, &str)]) {
    let c = db(&s.state).unwrap();
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let states: Vec<(String, String)> = c
        .prepare("SELECT version, state FROM model_versions ORDER BY version")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let want: Vec<(String, String)> = versions
        .iter()
        .map(|(v, st)| (v.to_string(), st.to_string()))
        .collect();
    assert_eq!(states, want);
    let mut leftovers: Vec<String> = std::fs::read_dir(s.state.join("models/digits-cnn-int8"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    leftovers.sort();
    let installed: Vec<String> = versions.iter().map(|(v, _)| v.to_string()).collect();
    assert_eq!(leftovers, installed, "half-copied installs left behind");
    for v in &installed {
        let pkg = s.state.join("models/digits-cnn-int8").join(v);
        let img = s.inbox.join("digit-4.png");
        let (st, _, err) = infer(&pkg, &img, &[]).unwrap();
        assert!(st.success(), "installed copy {v} does not load: {err}");
    }
    let got = results(&s.state, "digits");
    let mut sources: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
    sources.dedup();
    assert_eq!(sources.len(), got.len(), "duplicate results: {got:?}");
    // Every file has its result, except a file the daemon died on MAX_ATTEMPTS times while it
    // was inside the engine: that one is refused (and kept), by design.
    let refused = refused(&s.state);
    for r in &refused {
        assert!(s.inbox.join(r).exists(), "refused {r} was deleted");
        assert!(
            !sources.contains(&r.as_str()),
            "{r} is both refused and done"
        );
    }
    assert_eq!(
        sources.len() + refused.len(),
        12,
        "lost files: results {got:?}, refused {refused:?}"
    );
}

fn refused(state: &Path) -> Vec<String> {
    let c = db(state).unwrap();
    let mut st = c
        .prepare("SELECT name FROM feed_files WHERE outcome = 'refused' ORDER BY name")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// Wait until every inbox file has a result or was refused.
fn wait_all_handled(state: &Path) {
    let sql = "SELECT (SELECT count(*) FROM results WHERE pipeline = 'digits')
                    + (SELECT count(*) FROM feed_files WHERE outcome = 'refused')";
    wait_for("12 files handled", T, || {
        (count(state, sql)? >= 12).then_some(())
    })
    .unwrap();
}

/// Run once with `TERN_CRASH_AT=point` and require that the process really died there.
fn crash_at(s: &Setup, point: &str) {
    let mut d = Daemon::spawn(&s.config, None, &[("TERN_CRASH_AT", point)]).unwrap();
    let status = d.wait(T).unwrap();
    let err = d.stderr();
    assert!(
        !status.success() && err.contains(&format!("TERN_CRASH_AT={point}")),
        "never reached {point}: {status}\n{err}"
    );
}

fn start_and_drain(s: &Setup) {
    let mut notify = NotifySocket::new(s.dir.path()).unwrap_or_else(|_| {
        std::fs::remove_file(s.dir.path().join("notify.sock")).unwrap();
        NotifySocket::new(s.dir.path()).unwrap()
    });
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 12);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());
}

/// A power cut at each step where the state on disk changes: after the package is copied
/// but not recorded, after it is recorded but not activated, after activation commits but
/// before the switch, and after a result commits but before anything else.
#[test]
fn a_crash_at_every_state_change_recovers() {
    for point in [
        "install:copied",
        "install:recorded",
        "activate:committed",
        "result:committed",
    ] {
        let s = demo_setup("");
        crash_at(&s, point);
        start_and_drain(&s);
        assert_consistent(&s, &[("1.0.0", "active")]);
        assert!(
            refused(&s.state).is_empty(),
            "one crash must not refuse a file"
        );
    }
}

/// An upgrade by config whose activation is cut off by a crash still happens at the next
/// start, instead of leaving the new version installed and forgotten.
#[test]
fn an_interrupted_upgrade_completes_on_restart() {
    let s = demo_setup("");
    start_and_drain(&s);
    let v2 = s
        .dir
        .path()
        .join("firmware-updates/models/digits-cnn-int8-v2");
    copy_dir(&package("digits-cnn-int8"), &v2).unwrap();
    let mf = v2.join("tern-model.toml");
    let text = std::fs::read_to_string(&mf)
        .unwrap()
        .replace("version = \"1.0.0\"", "version = \"1.1.0\"");
    std::fs::write(&mf, text).unwrap();
    let config = demo_config("").replace("models/digits-cnn-int8\"", "models/digits-cnn-int8-v2\"");
    assert!(config.contains("int8-v2"), "demo.toml changed shape");
    std::fs::write(&s.config, config).unwrap();
    for point in ["install:recorded", "activate:committed"] {
        crash_at(&s, point);
    }
    start_and_drain(&s);
    assert_consistent(&s, &[("1.0.0", "previous"), ("1.1.0", "active")]);
}

/// The watchdog is fed only while inference answers: a hung inference stops the pings, so
/// systemd restarts the daemon.
#[test]
fn a_hung_inference_stops_the_watchdog() {
    let s = demo_setup("");
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(
        &s.config,
        Some(&notify.path),
        &[("WATCHDOG_USEC", "400000"), ("TERN_CRASH_AT", "infer:hang")],
    )
    .unwrap();
    notify.wait_for("READY=1", T).unwrap();
    // The first inbox image hangs its worker. Pings may go on until the hang is older than
    // the watchdog period; then they must stop for good.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "watchdog still fed 20 s after the hang"
        );
        if notify
            .wait_for("WATCHDOG=1", Duration::from_secs(2))
            .is_err()
        {
            break;
        }
    }
    wait_for("the hang to be logged", T, || {
        d.stderr().contains("an inference has hung").then_some(())
    })
    .unwrap();
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "ternd exited instead of hanging"
    );
    d.signal("KILL").unwrap();
    d.wait(T).unwrap();
}

/// `on_done = "delete"`: a file is removed once its result is stored; a file that is not a
/// usable input is recorded but left in place for someone to look at.
#[test]
fn delete_feed_removes_done_files_and_keeps_bad_ones() {
    let s = demo_setup("");
    let text = demo_config("").replace(
        "path = \"demo/inbox\"",
        "path = \"demo/inbox\"\non_done = \"delete\"",
    );
    assert!(text.contains("on_done"), "demo.toml changed shape");
    std::fs::write(&s.config, text).unwrap();
    std::fs::write(s.inbox.join("junk.png"), b"this is not a png").unwrap();
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 12);
    let left = || {
        let mut v: Vec<String> = std::fs::read_dir(&s.inbox)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    wait_for("done files to be deleted", T, || {
        (left() == ["junk.png"]).then_some(())
    })
    .unwrap();
    // The bad file must be recorded so that it is not retried forever.
    let sql = "SELECT count(*) FROM feed_files WHERE name = 'junk.png'";
    wait_for("junk.png to be recorded", T, || {
        (count(&s.state, sql)? == 1).then_some(())
    })
    .unwrap();
    assert!(s.inbox.join("junk.png").exists(), "a bad input was deleted");
    assert!(
        d.stderr().contains("junk.png") && d.stderr().contains("not a PNG or JPEG"),
        "{}",
        d.stderr()
    );
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// A file the engine never finishes (here: the daemon dies right after starting on it, three
/// times) is refused on the fourth start and left on disk; the files queued behind it are not
/// blamed and all get results.
#[test]
fn a_file_that_keeps_killing_the_engine_is_refused_after_three_attempts() {
    let s = demo_setup("");
    for _ in 0..3 {
        crash_at(&s, "infer:begun");
    }
    let attempts =
        "SELECT attempts FROM feed_files WHERE name = 'digit-0.png' AND outcome = 'pending'";
    assert_eq!(count(&s.state, attempts), Some(3));
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 11);
    let refused =
        "SELECT count(*) FROM feed_files WHERE name = 'digit-0.png' AND outcome = 'refused'";
    wait_for("digit-0.png to be refused", T, || {
        (count(&s.state, refused)? == 1).then_some(())
    })
    .unwrap();
    let got = results(&s.state, "digits");
    assert_eq!(got.len(), 11, "{got:?}");
    assert!(!got.iter().any(|(src, _)| src == "digit-0.png"), "{got:?}");
    assert!(
        s.inbox.join("digit-0.png").exists(),
        "a refused file must stay on disk"
    );
    assert!(
        d.stderr().contains("the engine never finished this file"),
        "{}",
        d.stderr()
    );
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// A crash between a result's commit and the file's deletion: the next start deletes the file
/// without running it again.
#[test]
fn a_delete_interrupted_by_a_crash_is_finished_without_a_second_result() {
    let s = demo_setup("");
    let text = demo_config("").replace(
        "path = \"demo/inbox\"",
        "path = \"demo/inbox\"\non_done = \"delete\"",
    );
    std::fs::write(&s.config, text).unwrap();
    crash_at(&s, "result:committed");
    assert_eq!(count(&s.state, "SELECT count(*) FROM results"), Some(1));
    assert!(
        s.inbox.join("digit-0.png").exists(),
        "the crash came before the delete"
    );
    let mut notify = NotifySocket::new(s.dir.path()).unwrap();
    let mut d = Daemon::spawn(&s.config, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", T).unwrap();
    wait_results(&s.state, "digits", 12);
    let left = || std::fs::read_dir(&s.inbox).unwrap().count();
    wait_for("the inbox to empty", T, || (left() == 0).then_some(())).unwrap();
    let got = results(&s.state, "digits");
    assert_eq!(got.len(), 12, "digit-0.png was run twice: {got:?}");
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// `[metrics] listen` serves /metrics to Prometheus: the counters agree with what happened,
/// the histogram with the counters, and anything but GET /metrics is refused.
#[test]
fn metrics_are_served_for_prometheus_and_agree_with_the_daemon() {
    let port = free_port();
    let s = demo_setup(&format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let (status, out, _) =
        ternd(&["check-config", "--config", s.config.to_str().unwrap()]).unwrap();
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("metrics: http://127.0.0.1:{port}/metrics")),
        "{out}"
    );
    let mut d = Daemon::spawn(&s.config, None, &[]).unwrap();
    wait_results(&s.state, "digits", 12);
    // A file that is no image: the caller's fault, counted as such.
    std::fs::write(s.inbox.join("junk.png"), b"not a png").unwrap();
    let model = "model=\"digits-cnn-int8\"";
    let scrape = || {
        let (status, rest) = http(port, "GET", "/metrics");
        assert!(status.contains("200"), "{status}");
        let (head, body) = rest.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        body.to_string()
    };
    let body = wait_for("the junk file counted", T, || {
        let body = scrape();
        let m = samples(&body);
        (m.get(&format!(
            "tern_inferences_total{{{model},outcome=\"bad_input\"}}"
        )) == Some(&1.0))
        .then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", scrape()));
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    let m = samples(&body);
    let ok = m[&format!("tern_inferences_total{{{model},outcome=\"ok\"}}")];
    assert_eq!(ok, 12.0, "{body}");
    assert_eq!(
        m[&format!("tern_inferences_total{{{model},outcome=\"error\"}}")],
        0.0
    );
    // The histogram counts every answer, in buckets that only grow.
    assert_eq!(
        m[&format!("tern_inference_duration_seconds_count{{{model}}}")],
        ok
    );
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter(|(k, _)| k.starts_with("tern_inference_duration_seconds_bucket{"))
        .map(|(k, v)| {
            let le = k.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            let bound = match le {
                "+Inf" => f64::INFINITY,
                b => b.parse::<f64>().unwrap(),
            };
            (bound, *v)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 10, "{body}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{buckets:?}\n{body}"
    );
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, ok));
    assert!(m[&format!("tern_inference_duration_seconds_sum{{{model}}}")] > 0.0);
    let results =
        "tern_pipeline_samples_total{pipeline=\"digits\",feed=\"inbox\",outcome=\"results\"}";
    assert_eq!(m[results], 12.0, "{body}");
    assert_eq!(m["tern_pipeline_running{pipeline=\"digits\"}"], 1.0);
    // Every failed request is counted by the code its answer carried: here the junk file.
    let by_code: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("tern_inference_errors_total{model=\"digits-cnn-int8\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(by_code, 1.0, "{body}");
    // No fleet link: nothing waits in the outbox.
    assert_eq!(m["tern_outbox_oldest_age_seconds"], 0.0, "{body}");
    assert!(body.contains("# TYPE tern_update_state gauge"), "{body}");
    assert!(m["tern_process_resident_memory_bytes"] > 1e6, "{body}");
    // The counts run across versions; the version serving now is its own series.
    assert_eq!(
        m.get("tern_model_info{model=\"digits-cnn-int8\",version=\"1.0.0\"}"),
        Some(&1.0),
        "{body}"
    );
    assert!(m.contains_key("tern_process_cpu_seconds_total"), "{body}");
    // A real Prometheus scrapes the box (OpenMetrics, as it negotiates) and answers a query
    // with the box's count. (promtool's `check metrics` reads the older text format only.)
    if need("prometheus") {
        let prom = free_port();
        let dir = s.dir.path().join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tern\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let mut server = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let said = || std::fs::read_to_string(&log).unwrap_or_default();
        let query = "/api/v1/query?query=tern_inferences_total%7Boutcome%3D%22ok%22%7D";
        let seen = wait_for("Prometheus to have scraped the box", T, || {
            if let Ok(Some(exit)) = server.try_wait() {
                panic!("prometheus exited ({exit}): {}", said());
            }
            let (status, rest) = try_http(prom, "GET", query).ok()?;
            let body = rest.split_once("\r\n\r\n")?.1;
            let v: Value = serde_json::from_str(body.trim()).ok()?;
            let r = v["data"]["result"].as_array()?.first()?.clone();
            (status.contains("200")).then_some(r)
        });
        let _ = server.kill();
        let _ = server.wait();
        let r = seen.unwrap_or_else(|e| panic!("{e}: {}", said()));
        assert_eq!(r["metric"]["model"], "digits-cnn-int8", "{r}");
        assert_eq!(r["value"][1], "12", "{r}");
    }
    // Only GET (and HEAD) /metrics.
    assert!(http(port, "GET", "/").0.contains("404"));
    let (status, rest) = http(port, "POST", "/metrics");
    assert!(status.contains("405"), "{status}");
    assert!(rest.to_lowercase().contains("allow: get, head"), "{rest}");
    let (status, rest) = http(port, "HEAD", "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(rest.ends_with("\r\n\r\n"), "HEAD has no body: {rest}");
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());

    // A port taken by someone else: the daemon runs on without the endpoint and says so.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = taken.local_addr().unwrap().port();
    let other = demo_setup(&format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{busy_port}\"\n"
    ));
    let mut notify = NotifySocket::new(other.dir.path()).unwrap();
    let mut d = Daemon::spawn(&other.config, Some(&notify.path), &[]).unwrap();
    let ready = notify.wait_for("READY=1", T).unwrap();
    assert!(ready.contains("degraded: metrics.listen"), "{ready}");
    wait_results(&other.state, "digits", 12);
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success(), "{}", d.stderr());
    drop(taken);

    // A listen address that is none, or port 0, is a configuration error naming the key.
    for listen in ["localhost", "127.0.0.1:0"] {
        let bad = demo_setup(&format!("\n[metrics]\nlisten = \"{listen}\"\n"));
        let (status, out, err) =
            ternd(&["check-config", "--config", bad.config.to_str().unwrap()]).unwrap();
        assert!(!status.success(), "{listen}");
        assert!(
            format!("{out}{err}").contains("metrics.listen"),
            "{listen}: {out}{err}"
        );
    }
}
