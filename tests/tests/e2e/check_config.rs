//! `ternd check-config` names what is wrong, by key and line, and exits 64.

use std::path::Path;

use tern_tests::*;

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle in text")
        + 1
}

fn check(dir: &Path, text: &str) -> (i32, String, String) {
    let p = dir.join("ternd.toml");
    std::fs::write(&p, text).unwrap();
    let (status, out, err) = ternd(&["check-config", "--config", p.to_str().unwrap()]).unwrap();
    (status.code().unwrap_or(-1), out, err)
}

fn base(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join("inbox")).unwrap();
    format!(
        "state_dir = \"state\"\n\n[[models]]\npackage = \"{}\"\n\n[[feeds]]\nkind = \"directory\"\nname = \"in\"\npath = \"inbox\"\n\n[[pipelines]]\nname = \"p\"\nfeed = \"in\"\nmodel = \"digits-mlp-f32\"\n",
        package("digits-mlp-f32").display()
    )
}

#[test]
fn good_config_passes_and_demo_config_passes() {
    let d = tempfile::tempdir().unwrap();
    let (code, out, err) = check(d.path(), &base(d.path()));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 model(s), 1 feed(s), 1 pipeline(s)"),
        "{out}"
    );
    let demo = root().join("configs/demo.toml");
    let (status, out, err) = ternd(&["check-config", "--config", demo.to_str().unwrap()]).unwrap();
    assert!(status.success(), "demo.toml: {out}{err}");
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let d = tempfile::tempdir().unwrap();
    let text = base(d.path()).replace("[[pipelines]]\n", "[[pipelines]]\nmodle = \"x\"\n");
    let (code, _, err) = check(d.path(), &text);
    assert_eq!(code, 64, "{err}");
    let want = format!("ternd.toml:{}: pipelines[0].modle", line_of(&text, "modle"));
    assert!(err.contains(&want), "want {want}: {err}");
}

#[test]
fn wrong_type_is_named_by_key() {
    let d = tempfile::tempdir().unwrap();
    let text = format!("{}\n[engine]\nworkers = \"four\"\n", base(d.path()));
    let (code, _, err) = check(d.path(), &text);
    assert_eq!(code, 64, "{err}");
    let want = format!("ternd.toml:{}: engine.workers", line_of(&text, "four"));
    assert!(err.contains(&want), "want {want}: {err}");
}

#[test]
fn missing_model_and_missing_dir_are_both_reported() {
    let d = tempfile::tempdir().unwrap();
    let text = base(d.path())
        .replace("model = \"digits-mlp-f32\"", "model = \"digits-nope\"")
        .replace("path = \"inbox\"", "path = \"no-such-dir\"");
    let (code, _, err) = check(d.path(), &text);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("2 configuration problems"), "{err}");
    assert!(
        err.contains("feeds[0].path") && err.contains("no-such-dir"),
        "{err}"
    );
    let want = format!(
        "ternd.toml:{}: pipelines[0].model",
        line_of(&text, "digits-nope")
    );
    assert!(err.contains(&want), "want {want}: {err}");
    assert!(err.contains("configured: digits-mlp-f32"), "{err}");
}

#[test]
fn broken_package_in_config_is_named() {
    let d = tempfile::tempdir().unwrap();
    let pkg = d.path().join("pkg");
    copy_dir(&package("digits-mlp-f32"), &pkg).unwrap();
    let manifest = std::fs::read_to_string(pkg.join("tern-model.toml")).unwrap();
    std::fs::write(
        pkg.join("tern-model.toml"),
        manifest.replace("layout =", "lay_out ="),
    )
    .unwrap();
    let text = base(d.path()).replace(
        &package("digits-mlp-f32").display().to_string(),
        pkg.to_str().unwrap(),
    );
    let (code, _, err) = check(d.path(), &text);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("models[0].package") && err.contains("lay_out"),
        "{err}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_64() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("ternd.toml");
    std::fs::write(&p, "stat_dir = \"x\"\n").unwrap();
    let (status, _, err) = ternd(&["run", "--config", p.to_str().unwrap()]).unwrap();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(err.contains("stat_dir"), "{err}");
}

#[test]
fn the_commented_production_example_stays_valid() {
    // Point its absolute paths at this checkout so every key of the example is checked
    // against the schema the daemon really uses.
    if !need("openssl") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("inbox")).unwrap();
    let tls = d.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    tern_tests::mqtt::make_certs(&tls).unwrap();
    let text = std::fs::read_to_string(root().join("configs/ternd.toml"))
        .unwrap()
        .replace(
            "/usr/share/tern/models",
            root().join("firmware-updates/models").to_str().unwrap(),
        )
        .replace(
            "/var/lib/tern/inbox",
            d.path().join("inbox").to_str().unwrap(),
        )
        .replace("/var/lib/tern", d.path().join("state").to_str().unwrap())
        .replace("/etc/tern/tls", tls.to_str().unwrap());
    let (code, out, err) = check(d.path(), &text);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("2 model(s), 4 feed(s), 4 pipeline(s)"),
        "{out}"
    );
    assert!(
        out.contains("fleet: box-0001 at mqtt.example.com:8883 (TLS)"),
        "{out}"
    );
    assert!(
        out.contains("updates: 1 trusted key(s), threshold 1, health window 60 s"),
        "{out}"
    );
}

#[test]
fn update_problems_are_each_named_by_key_and_line() {
    let d = tempfile::tempdir().unwrap();
    let updates = "\n[updates]\nkeys = [\"c2hvcnQ=\"]\nthreshold = 3\nwindow = 0\n\
        health_window_secs = 100000\n";
    let text = base(d.path()) + updates;
    let (code, _, err) = check(d.path(), &text);
    assert_eq!(code, 64, "{err}");
    for (key, needle, says) in [
        ("updates.keys[0]", "keys =", "must be 32 bytes"),
        ("updates.threshold", "threshold =", "can never be met"),
        ("updates.window", "window =", "outside 1..=64"),
        (
            "updates.health_window_secs",
            "health_window_secs",
            "more than a day",
        ),
    ] {
        let line = line_of(&text, needle);
        let want = format!("ternd.toml:{line}: {key}: ");
        let found = err.lines().find(|l| l.contains(&want));
        assert!(
            found.is_some_and(|l| l.contains(says)),
            "want `{want}…{says}` in:\n{err}"
        );
    }
}

#[test]
fn fleet_problems_are_each_named_by_key_and_line() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("not-a-cert.pem"), "hello\n").unwrap();
    let fleet = "\n[fleet]\nbroker = \"mqtts://broker.example:99999\"\ndevice = \"box/1\"\n\
        groups = [\"ok\", \"a+b\"]\nca_file = \"not-a-cert.pem\"\nkey_file = \"client.key\"\n\
        password = \"p\"\n\n[fleet.commands]\nkeys = [\"c2hvcnQ=\"]\n\n[outbox]\nbudget_mib = 0\n";
    let text = base(d.path()) + fleet;
    let (code, _, err) = check(d.path(), &text);
    assert_eq!(code, 64, "{err}");
    for (key, needle, says) in [
        ("fleet.broker", "broker =", "not a port number"),
        ("fleet.device", "device =", "must not contain"),
        ("fleet.groups[1]", "groups =", "must not contain"),
        ("fleet.password", "password =", "no username"),
        (
            "fleet.key_file",
            "key_file =",
            "is set but cert_file is not",
        ),
        ("fleet.ca_file", "ca_file =", "holds no PEM certificate"),
        ("fleet.commands.keys[0]", "keys =", "must be 32 bytes"),
        ("outbox.budget_mib", "budget_mib", "not a budget"),
    ] {
        let line = line_of(&text, needle);
        let want = format!("ternd.toml:{line}: {key}: ");
        let found = err.lines().find(|l| l.contains(&want));
        assert!(
            found.is_some_and(|l| l.contains(says)),
            "want `{want}…{says}` in:\n{err}"
        );
    }

    // The shipped fleet demo is valid.
    let demo = root().join("configs/fleet-demo.toml");
    let (status, out, err) = ternd(&["check-config", "--config", demo.to_str().unwrap()]).unwrap();
    assert!(status.success(), "fleet-demo.toml: {out}{err}");
    // It has a fleet link and no update keys: the usual mistake is named, with the key to set.
    assert!(
        out.contains("warning: updates are off on a box with a fleet link")
            && out.contains("updates.keys"),
        "{out}"
    );
}
