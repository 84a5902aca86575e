//! `ternctl` against a running ternd on a private system-type dbus-daemon with our policy:
//! every subcommand, for people and with `--json`, its exit codes, and the signals it follows
//! as `dbus-monitor` sees them.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use tern_tests::dbus::{Bus, system_bus};
use tern_tests::updates::{build, key, variant};
use tern_tests::*;

const T: Duration = Duration::from_secs(60);
const MODEL: &str = "digits-mlp-int8";

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "{}{}", self.stdout, self.stderr);
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", self.stdout))
    }

    /// One JSON document per line (results, checks).
    fn json_lines(&self) -> Vec<Value> {
        assert_eq!(self.code, Some(0), "{}{}", self.stdout, self.stderr);
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn ctl_as(bus: &str, nobody: bool, args: &[&str]) -> Out {
    let mut cmd = if nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin("ternctl"));
        c
    } else {
        Command::new(bin("ternctl"))
    };
    let o = cmd.arg("--bus").arg(bus).args(args).output().unwrap();
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

fn ctl(bus: &Bus, args: &[&str]) -> Out {
    ctl_as(&bus.address, false, args)
}

fn config(dir: &Path, bus: &Bus, keys: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("inbox")).unwrap();
    let p = dir.join("ternd.toml");
    std::fs::write(
        &p,
        format!(
            "state_dir = \"state\"\n\
             [[models]]\npackage = \"{}\"\n\
             [[models]]\npackage = \"{}\"\n\
             [[feeds]]\nkind = \"directory\"\nname = \"inbox\"\npath = \"inbox\"\n\
             [[pipelines]]\nname = \"digits\"\nfeed = \"inbox\"\nmodel = \"{MODEL}\"\n\
             [dbus]\nbus = \"{}\"\n\
             [updates]\nkeys = [\"{keys}\"]\nhealth_window_secs = 1\n",
            package(MODEL).display(),
            package("iris-mlp-int8").display(),
            bus.address
        ),
    )
    .unwrap();
    p
}

/// Lines a child prints, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if f(&l) => return l,
            Ok(_) => {}
            Err(e) => panic!("{what}: no such line ({e})"),
        }
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What `ternd infer` answers offline for the same package and file: ternctl must agree.
fn offline_label(pkg: &Path, input: &Path) -> String {
    let (status, out, err) = infer(pkg, input, &["--json"]).unwrap();
    assert!(status.success(), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["top"][0]["label"].as_str().unwrap().to_string()
}

#[test]
fn every_subcommand_against_a_running_ternd() {
    let Some(bus) = system_bus() else { return };
    if !need("dbus-monitor") || !need("setpriv") || !need_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let cfg = config(d.path(), &bus, &k.public().to_base64());
    let state = d.path().join("state");
    let mut daemon = Daemon::spawn(&cfg, None, &[]).unwrap();

    // Before ternd is on the bus: unavailable, and said so.
    let early = ctl_as(
        &format!("unix:path={}", d.path().join("no-bus").display()),
        false,
        &["status"],
    );
    assert_eq!(early.code, Some(69), "{}", early.stderr);
    assert!(early.stderr.contains("cannot reach"), "{}", early.stderr);
    wait_for("ternctl status", T, || {
        (ctl(&bus, &["status"]).code == Some(0)).then_some(())
    })
    .unwrap();

    // status
    let s = ctl(&bus, &["status"]);
    assert_eq!(s.code, Some(0));
    assert!(s.stdout.starts_with("ternd "), "{}", s.stdout);
    assert!(s.stdout.contains("ready"), "{}", s.stdout);
    for m in [MODEL, "iris-mlp-int8"] {
        assert!(
            s.stdout
                .lines()
                .any(|l| l.starts_with(m) && l.contains("1.0.0")),
            "{m} in {}",
            s.stdout
        );
    }
    let sj = ctl(&bus, &["--json", "status"]).json();
    // The packages install ternctl as a symlink to ternd: the same program answers.
    let link = d.path().join("ternctl");
    std::os::unix::fs::symlink(bin("ternd"), &link).unwrap();
    let o = Command::new(&link)
        .args(["--bus", &bus.address, "--json", "models"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let via_link: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(via_link, ctl(&bus, &["--json", "models"]).json());
    assert!(sj["status"].as_str().unwrap().starts_with("ready"), "{sj}");
    assert_eq!(sj["models"].as_array().map(Vec::len), Some(2), "{sj}");

    // models, pipelines
    let m = ctl(&bus, &["models"]);
    assert!(m.stdout.starts_with("MODEL"), "{}", m.stdout);
    let row: Vec<&str> = m
        .stdout
        .lines()
        .find(|l| l.starts_with(MODEL))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..4],
        &[MODEL, "1.0.0", "active", "int8"],
        "{}",
        m.stdout
    );
    let mj = ctl(&bus, &["models", "--json"]).json();
    assert_eq!(mj.as_array().map(Vec::len), Some(2), "{mj}");
    let p = ctl(&bus, &["pipelines"]);
    let row: Vec<&str> = p
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], &["digits", "inbox", MODEL], "{}", p.stdout);
    assert_eq!(
        ctl(&bus, &["pipelines", "--json"]).json()[0]["feed"],
        "inbox"
    );
    assert_eq!(row[3], "running", "{}", p.stdout);
    // Stop and start by name; the table says so, with the reason.
    let s = ctl(&bus, &["pipelines", "stop", "digits"]);
    assert_eq!(s.code, Some(0), "{}{}", s.stdout, s.stderr);
    assert_eq!(s.stdout, "digits: stopped (stopped by command)\n");
    let p = ctl(&bus, &["pipelines"]);
    assert!(
        p.stdout
            .lines()
            .nth(1)
            .unwrap()
            .contains("stopped by command"),
        "{}",
        p.stdout
    );
    let unknown = ctl(&bus, &["pipelines", "start", "nope"]);
    assert_eq!(unknown.code, Some(3), "{}", unknown.stderr);
    let s = ctl(&bus, &["pipelines", "start", "digits", "--json"]).json();
    // `starting` until its feed task has run once.
    assert!(s["state"] == "running" || s["state"] == "starting", "{s}");
    wait_for("the pipeline running again", T, || {
        let p = ctl(&bus, &["pipelines", "--json"]).json();
        (p[0]["state"] == "running").then_some(())
    })
    .unwrap();

    // infer: an image, a .npy tensor, a JSON tensor; the same classes as `ternd infer` offline.
    let png = root().join("configs/demo/inbox/digit-3.png");
    let want = offline_label(&package(MODEL), &png);
    let png_s = png.to_str().unwrap();
    let i = ctl(&bus, &["infer", "--model", MODEL, png_s]);
    assert_eq!(i.code, Some(0), "{}", i.stderr);
    let first: Vec<&str> = i
        .stdout
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(first[0], want, "{}", i.stdout);
    let ij = ctl(&bus, &["--json", "infer", "-m", MODEL, png_s]).json();
    assert_eq!(ij["top"][0]["label"], want.as_str(), "{ij}");
    assert_eq!(ij["version"], "1.0.0");
    let agrees = |model: &str, input: &Path| {
        let want = offline_label(&package(model), input);
        let ij = ctl(
            &bus,
            &["--json", "infer", "-m", model, input.to_str().unwrap()],
        )
        .json();
        assert_eq!(ij["top"][0]["label"], want.as_str(), "{ij}");
    };
    agrees(
        "iris-mlp-int8",
        &package("iris-mlp-int8").join("golden/1-input.npy"),
    );
    let tensor = d.path().join("flower.json");
    std::fs::write(&tensor, "[[6.7, 3.0, 5.2, 2.3]]").unwrap();
    agrees("iris-mlp-int8", &tensor);
    // ... and what goes wrong, with its own exit code.
    let two = ctl(&bus, &["infer", png_s]);
    assert_eq!(two.code, Some(65), "{}", two.stderr);
    assert!(two.stderr.contains("--model"), "{}", two.stderr);
    let missing = ctl(&bus, &["infer", "-m", MODEL, "/nonexistent.png"]);
    assert_eq!(missing.code, Some(3), "{}", missing.stderr);
    let unknown = ctl(&bus, &["infer", "-m", "no-such-model", png_s]);
    assert_eq!(unknown.code, Some(3), "{}", unknown.stderr);
    assert!(unknown.stderr.contains("NotFound"), "{}", unknown.stderr);
    let garbage = d.path().join("garbage.png");
    std::fs::write(&garbage, b"not a png at all").unwrap();
    let bad = ctl(&bus, &["infer", "-m", MODEL, garbage.to_str().unwrap()]);
    assert_eq!(bad.code, Some(65), "{}", bad.stderr);
    assert!(bad.stderr.contains("BadRequest"), "{}", bad.stderr);

    // results --follow sees a new result as it is stored, and so does dbus-monitor. A first
    // result is stored before the follower starts: its printing that one (queried after it
    // subscribed) says it is listening.
    std::fs::copy(&png, d.path().join("inbox/three.png")).unwrap();
    wait_for("the first result", T, || {
        count(&state, "SELECT count(*) FROM results").filter(|n| *n == 1)
    })
    .unwrap();
    let monitor = Command::new("dbus-monitor")
        .args(["--address", &bus.address])
        .arg("type='signal',interface='io.tern.Daemon1'")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut monitor = Killed(monitor);
    let monitored = lines(&mut monitor.0);
    // The bus takes the monitor's name away once it is monitoring.
    wait_line(&monitored, "dbus-monitor ready", |l| {
        l.contains("member=NameLost")
    });
    let follower = Command::new(bin("ternctl"))
        .args([
            "--bus",
            &bus.address,
            "--json",
            "results",
            "--since",
            "0",
            "--follow",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut follower = Killed(follower);
    let followed = lines(&mut follower.0);
    wait_line(&followed, "the stored result", |l| l.contains("three.png"));
    std::fs::copy(
        root().join("configs/demo/inbox/digit-7.png"),
        d.path().join("inbox/seven.png"),
    )
    .unwrap();
    let line = wait_line(&followed, "ternctl results --follow", |l| {
        l.contains("seven.png")
    });
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["pipeline"], "digits");
    assert_eq!(r["top"][0]["label"], "7", "{r}");
    wait_line(&monitored, "dbus-monitor", |l| {
        l.contains("member=ResultReady")
    });
    drop(follower);

    // results: stored rows, for people and as JSON.
    let rows = ctl(&bus, &["--json", "results", "--since", "0"]).json_lines();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1]["id"], r["id"]);
    let rh = ctl(&bus, &["results"]);
    assert!(rh.stdout.starts_with("ID"), "{}", rh.stdout);
    let row = rh.stdout.lines().nth(2).unwrap();
    assert!(
        row.contains("digits") && row.contains(&format!("{MODEL}@1.0.0")) && row.contains("7 ("),
        "{row}"
    );
    // One at a time: the hint on stderr continues exactly after the row shown.
    let first = ctl(&bus, &["--json", "results", "--since", "0", "--limit", "1"]);
    let shown = first.json_lines();
    assert_eq!(shown, rows[..1].to_vec());
    let hint = first
        .stderr
        .split("continue with ")
        .nth(1)
        .unwrap_or_else(|| panic!("no paging hint: {}", first.stderr));
    let mut args = vec!["--json", "results", "--limit", "1"];
    args.extend(hint.split_whitespace().take(4));
    assert_eq!(ctl(&bus, &args).json_lines(), rows[1..].to_vec());
    let future = ctl(&bus, &["--json", "results", "--since", "0s"]).json_lines();
    assert!(future.is_empty(), "{future:?}");
    let typo = ctl(&bus, &["results", "--since", "yesterday"]);
    assert_eq!(typo.code, Some(65), "{}", typo.stderr);

    // install: a tampered bundle is refused, a good one commits; progress goes to stderr.
    let v11 = build(
        &variant(
            &package(MODEL),
            &d.path().join("v11"),
            MODEL,
            "1.1.0",
            |t| t,
        ),
        4096,
        &[&k],
        |_| {},
    );
    let good = d.path().join("v11.bundle");
    v11.write(&good);
    let mut damaged = std::fs::read(&good).unwrap();
    let at = damaged.len() / 2;
    damaged[at] ^= 1;
    let bad = d.path().join("bad.bundle");
    std::fs::write(&bad, &damaged).unwrap();
    let refused = ctl(&bus, &["--json", "install", bad.to_str().unwrap()]);
    assert_eq!(
        refused.code,
        Some(1),
        "{}{}",
        refused.stdout,
        refused.stderr
    );
    let v: Value = serde_json::from_str(refused.stdout.trim()).unwrap();
    assert_eq!(v["code"], "bad_chunk", "{v}");
    let ok = ctl(&bus, &["install", good.to_str().unwrap()]);
    assert_eq!(ok.code, Some(0), "{}{}", ok.stdout, ok.stderr);
    assert_eq!(ok.stdout.trim(), format!("{MODEL} 1.1.0: committed"));
    assert!(ok.stderr.contains("1.1.0: activating"), "{}", ok.stderr);

    // rollback and activate, and who may.
    let stop = ctl_as(&bus.address, true, &["pipelines", "stop", "digits"]);
    assert_eq!(stop.code, Some(77), "{}", stop.stderr);
    let denied = ctl_as(&bus.address, true, &["rollback", MODEL]);
    assert_eq!(denied.code, Some(77), "{}", denied.stderr);
    let readable = ctl_as(&bus.address, true, &["models"]);
    assert_eq!(readable.code, Some(0), "{}", readable.stderr);
    assert!(readable.stdout.contains("1.1.0"), "{}", readable.stdout);
    let rb = ctl(&bus, &["rollback", MODEL]);
    assert_eq!(rb.code, Some(0), "{}", rb.stderr);
    assert_eq!(
        rb.stdout.trim(),
        format!("{MODEL}: rolled back from 1.1.0 to 1.0.0")
    );
    let a = ctl(&bus, &["--json", "activate", MODEL, "1.1.0"]).json();
    assert_eq!(a["active"], "1.1.0", "{a}");
    let none = ctl(&bus, &["activate", MODEL, "9.9.9"]);
    assert_eq!(none.code, Some(3), "{}", none.stderr);
    let malformed = ctl(&bus, &["activate", MODEL, "one"]);
    assert_eq!(malformed.code, Some(65), "{}", malformed.stderr);

    // check: every line ok on this box; a broker that does not answer and a config typo fail.
    let c = ctl(&bus, &["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(c.code, Some(0), "{}{}", c.stdout, c.stderr);
    for name in ["config", "store", "broker", "model", "disk", "daemon"] {
        assert!(
            c.stdout
                .lines()
                .any(|l| l.starts_with(&format!("✔ {name}"))),
            "{name}: {}",
            c.stdout
        );
    }
    let checks = ctl(
        &bus,
        &["--json", "check", "--config", cfg.to_str().unwrap()],
    )
    .json_lines();
    assert!(checks.iter().all(|c| c["status"] == "ok"), "{checks:?}");
    // The store's active versions are what gets self-tested: 1.1.0 now.
    assert!(
        checks
            .iter()
            .any(|c| c["check"] == "model" && c["detail"].as_str().unwrap().contains("1.1.0")),
        "{checks:?}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    let offline = d.path().join("offline.toml");
    std::fs::write(
        &offline,
        format!("{text}[fleet]\nbroker = \"mqtt://127.0.0.1:9\"\ndevice = \"x\"\n"),
    )
    .unwrap();
    let c = ctl(&bus, &["check", "--config", offline.to_str().unwrap()]);
    assert_eq!(c.code, Some(1), "{}", c.stdout);
    assert!(
        c.stdout
            .lines()
            .any(|l| l.starts_with("✘ broker") && l.contains("127.0.0.1:9")),
        "{}",
        c.stdout
    );
    // A camera whose ffmpeg is not there fails; a serial port that is not plugged in warns.
    let feeds = d.path().join("feeds.toml");
    std::fs::write(
        &feeds,
        format!(
            "{text}[[feeds]]\nkind = \"camera\"\nname = \"door\"\ninput = \"x\"\n\
             ffmpeg = \"/nonexistent/ffmpeg\"\n\
             [[feeds]]\nkind = \"serial\"\nname = \"probe\"\npath = \"/dev/ttyNOPE9\"\nfields = [\"t\"]\n"
        ),
    )
    .unwrap();
    let c = ctl(&bus, &["check", "--config", feeds.to_str().unwrap()]);
    assert_eq!(c.code, Some(1), "{}", c.stdout);
    assert!(
        c.stdout.lines().any(|l| l.starts_with("✘ feed")
            && l.contains("camera `door`: /nonexistent/ffmpeg not found")),
        "{}",
        c.stdout
    );
    assert!(
        c.stdout
            .lines()
            .any(|l| l.starts_with("‼ feed") && l.contains("/dev/ttyNOPE9 is missing")),
        "{}",
        c.stdout
    );
    let typo = d.path().join("typo.toml");
    std::fs::write(
        &typo,
        text.replace("[[pipelines]]\nname", "[[pipelines]]\nnmae"),
    )
    .unwrap();
    let c = ctl(&bus, &["check", "--config", typo.to_str().unwrap()]);
    assert_eq!(c.code, Some(1), "{}", c.stdout);
    assert!(
        c.stdout.starts_with("✘ config") && c.stdout.contains("pipelines[0].nmae: unknown field"),
        "{}",
        c.stdout
    );

    // With ternd gone, the daemon check warns and the box checks still run.
    daemon.signal("TERM").unwrap();
    daemon.wait(T).unwrap();
    let c = ctl(&bus, &["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(c.code, Some(0), "{}", c.stdout);
    assert!(
        c.stdout.lines().any(|l| l.starts_with("‼ daemon")),
        "{}",
        c.stdout
    );
    let gone = ctl(&bus, &["status"]);
    assert_eq!(gone.code, Some(69), "{}", gone.stderr);
    assert!(state.join("tern.db").exists());
}

/// `engine.runtime = "auto"` on a box with no GPU serves on the CPU and says why in the
/// status (which is also the telemetry body); a model asked to run on `cuda` does not load,
/// and the daemon says which and why.
#[test]
fn runtime_auto_falls_back_to_the_cpu_and_cuda_fails_the_model() {
    let Some(bus) = system_bus() else { return };
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("inbox")).unwrap();
    let cfg = d.path().join("ternd.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"state\"\n[engine]\nruntime = \"auto\"\n\
             [[models]]\npackage = \"{}\"\n\
             [[models]]\npackage = \"{}\"\nruntime = \"cuda\"\n\
             [dbus]\nbus = \"{}\"\n",
            package(MODEL).display(),
            package("iris-mlp-int8").display(),
            bus.address
        ),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&cfg, None, &[]).unwrap();
    let s = wait_for("ternctl status", T, || {
        let o = ctl(&bus, &["--json", "status"]);
        (o.code == Some(0)).then(|| o.json())
    })
    .unwrap();
    let models = s["models"].as_array().unwrap();
    if models.iter().any(|m| m["runtime"] == "cuda") {
        eprintln!("\n*** SKIPPED: this box has a usable GPU; the test is about one without ***\n");
        return;
    }
    assert_eq!(models.len(), 1, "{s}");
    assert_eq!(models[0]["name"], MODEL);
    assert_eq!(models[0]["runtime"], "cpu", "{s}");
    let note = models[0]["runtime_note"].as_str().unwrap_or_default();
    assert!(note.starts_with("auto: on the CPU, "), "{s}");
    assert!(
        s["status"].as_str().unwrap().contains("; degraded: "),
        "{s}"
    );
    let log = daemon.stderr();
    assert!(
        log.contains("iris-mlp-int8") && log.contains("runtime `cuda` was asked for, but "),
        "{log}"
    );
    daemon.signal("TERM").unwrap();
    daemon.wait(T).unwrap();
}
