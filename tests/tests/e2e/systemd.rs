//! The systemd unit: it verifies, it is hardened, and it agrees with what ternd does.

use std::process::Command;

use tern_tests::*;

fn unit_with_this_ternd(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("configs/ternd.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/ternd run"), "{text}");
    // verify checks that ExecStart exists: point it at the binary under test.
    let text = text.replace("/usr/bin/ternd", bin("ternd").to_str().unwrap());
    let p = dir.join("ternd.service");
    std::fs::write(&p, text).unwrap();
    p
}

fn value<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn unit_verifies_scores_and_matches_the_daemon() {
    if !need("systemd-analyze") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let unit = unit_with_this_ternd(d.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "verify: {stderr}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for ternd.service:").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {text}"));
    eprintln!("systemd-analyze security --offline=true: {score}");
    // 0 is a locked-down service, 10 an unprotected one; README records the value.
    assert!(score <= 2.0, "exposure {score} regressed:\n{text}");

    let unit = std::fs::read_to_string(root().join("configs/ternd.service")).unwrap();
    assert_eq!(value(&unit, "Type"), ["notify"]);
    assert_eq!(value(&unit, "Restart"), ["on-failure"]);
    assert_eq!(value(&unit, "StateDirectory"), ["tern"]);
    assert_eq!(value(&unit, "ConfigurationDirectory"), ["tern"]);
    assert!(!value(&unit, "WatchdogSec").is_empty());
    // The exit code systemd must not restart on is the one ternd gives a bad config.
    let prevent = value(&unit, "RestartPreventExitStatus");
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "stat_dir = 1\n").unwrap();
    let (status, _, _) = ternd(&["run", "--config", bad.to_str().unwrap()]).unwrap();
    assert_eq!(prevent, [status.code().unwrap().to_string().as_str()]);
    // Reload is SIGHUP, which ternd handles as a reload.
    assert_eq!(value(&unit, "ExecReload"), ["/bin/kill -HUP $MAINPID"]);
}
