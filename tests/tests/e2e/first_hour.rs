//! The README's "First hour" walkthrough, run line by line in one shell as an operator would
//! paste it: its own mosquitto, the fleet demo with an operator key, status, inference over
//! MQTT and D-Bus, a signed update followed to its commit, and a signed rollback.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tern_tests::mqtt::Broker;
use tern_tests::*;

use crate::fleet::{client, wait_online};

const T: Duration = Duration::from_secs(120);

/// The commands of the README's first-hour section, one per entry (comments and blank lines
/// left out; a line ending in `\` joined with the next).
fn walkthrough() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("## First hour")
        .nth(1)
        .expect("README has a First hour section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the First hour section has a sh block");
    let mut lines = Vec::new();
    let mut acc = String::new();
    for l in block.lines() {
        let l = l.trim();
        if acc.is_empty() && (l.is_empty() || l.starts_with('#')) {
            continue;
        }
        match l.strip_suffix('\\') {
            Some(head) => acc.push_str(head),
            None => {
                acc.push_str(l);
                lines.push(std::mem::take(&mut acc));
            }
        }
    }
    lines
}

/// A private session bus (`busctl --user` and `dbus.bus = "session"` find it by
/// DBUS_SESSION_BUS_ADDRESS).
struct SessionBus {
    child: std::process::Child,
    address: String,
}

impl Drop for SessionBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn session_bus(dir: &Path) -> SessionBus {
    let address = format!("unix:path={}", dir.join("session_bus").display());
    let mut child = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address"])
        .arg(format!("--address={address}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let printed = gather_output(child.stdout.take().unwrap());
    wait_for("the session bus", T, || {
        (!printed.lock().unwrap().is_empty()).then_some(())
    })
    .unwrap();
    SessionBus { child, address }
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    for p in [
        "mosquitto",
        "mosquitto_rr",
        "mosquitto_sub",
        "mosquitto_pub",
        "busctl",
        "dbus-daemon",
        "base64",
        "od",
        "stdbuf",
    ] {
        if !need(p) {
            return;
        }
    }
    let lines = walkthrough();
    // Each step the issue asks of the walkthrough is there; a README edit that drops one fails.
    for step in [
        "mosquitto -p",
        "tern-update keygen",
        "ternd run",
        "cmd/status",
        "cmd/infer",
        "busctl --user call",
        "tern-update bundle",
        "tern-update publish",
        "tern-update status",
        "models.rollback",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(step)),
            "the walkthrough lost `{step}`: {lines:#?}"
        );
    }

    // A tree laid out like the checkout: the configs and the demo's model copied (the
    // walkthrough writes into configs/), the binaries cargo built where the build line puts
    // them.
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    copy_dir(&root().join("configs"), &w.join("configs")).unwrap();
    copy_dir(
        &package("digits-cnn-int8"),
        &w.join("firmware-updates/models/digits-cnn-int8"),
    )
    .unwrap();
    std::fs::create_dir_all(w.join("target")).unwrap();
    let bins = bin("ternd").parent().unwrap().to_path_buf();
    bin("tern-update");
    std::os::unix::fs::symlink(&bins, w.join("target/release")).unwrap();
    // The test's own port for 1883, in the lines and in the demo's configuration.
    let port = free_port();
    let demo = w.join("configs/fleet-demo.toml");
    let text = std::fs::read_to_string(&demo).unwrap();
    assert!(text.contains("127.0.0.1:1883"), "fleet-demo.toml changed");
    std::fs::write(&demo, text.replace("1883", &port.to_string())).unwrap();
    let bus = session_bus(w);
    // The lines' mosquitto clients talk to 1883 by default: their own options files (as an
    // operator may keep in ~/.config) send them to the test's port instead.
    let xdg = w.join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    for c in ["mosquitto_pub", "mosquitto_sub", "mosquitto_rr"] {
        std::fs::write(xdg.join(c), format!("-p {port}\n")).unwrap();
    }

    // Line-buffered (stdbuf's setting goes to every child), as on a terminal: a background
    // listener's lines arrive as it prints them.
    let mut shell = Command::new("stdbuf")
        .args(["-oL", "bash", "--noprofile", "--norc"])
        .current_dir(w)
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .env("XDG_CONFIG_HOME", &xdg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = shell.id() as i32;
    let out = gather_output(shell.stdout.take().unwrap());
    let err = gather_output(shell.stderr.take().unwrap());
    let mut stdin = shell.stdin.take().unwrap();
    // Everything the walkthrough left running goes with the shell's process group.
    struct Group(i32);
    impl Drop for Group {
        fn drop(&mut self) {
            use nix::sys::signal::{Signal, killpg};
            let pg = nix::unistd::Pid::from_raw(self.0);
            let _ = killpg(pg, Signal::SIGTERM);
            // Gone before the temp dir goes (a daemon stops cleanly); killed if it lingers.
            let gone = wait_for("the walkthrough's processes to stop", T, || {
                killpg(pg, None).is_err().then_some(())
            });
            if gone.is_err() {
                let _ = killpg(pg, Signal::SIGKILL);
            }
        }
    }
    let _group = Group(pgid);
    let transcript = || {
        format!(
            "---- stdout\n{}\n---- stderr\n{}\n---- box.log\n{}",
            out.lock().unwrap(),
            err.lock().unwrap(),
            std::fs::read_to_string(w.join("box.log")).unwrap_or_default()
        )
    };

    let mut replies: Vec<(String, String)> = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let line = line.replace("1883", &port.to_string());
        if line.starts_with("cargo build") {
            // The test's binaries are cargo's fresh debug build (checked newer than their
            // sources), linked where this line would put them.
            continue;
        }
        // What runs, without a trailing comment.
        let command = line.split(" #").next().unwrap_or_default().trim_end();
        let background = command.ends_with('&');
        let is_sub = background && line.starts_with("mosquitto_sub");
        // A background listener prints SUBACK (-d) so the next line is not sent before it
        // listens.
        let line = if is_sub {
            format!("{} -d &", command.trim_end_matches('&').trim_end())
        } else {
            line
        };
        let start = out.lock().unwrap().len();
        let marker = format!("@@line {n} done:");
        writeln!(stdin, "{line}\necho \"{marker}$?\"").unwrap();
        stdin.flush().unwrap();
        let rc = wait_for(&format!("`{line}` to finish"), T, || {
            let o = out.lock().unwrap();
            let at = o[start..].find(&marker)?;
            let rest = &o[start + at + marker.len()..];
            let end = rest.find('\n')?;
            Some(rest[..end].trim().to_string())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", transcript()));
        assert_eq!(rc, "0", "`{line}` failed\n{}", transcript());
        let said = {
            let o = out.lock().unwrap();
            let at = o[start..].find(&marker).unwrap();
            o[start..start + at].to_string()
        };
        if background {
            if line.starts_with("mosquitto ") {
                Broker::started_elsewhere(port).unwrap();
            } else if line.starts_with("ternd run") {
                let broker = Broker::started_elsewhere(port).unwrap();
                let mut watcher = client(&broker, false, "first-hour", &["tern/demo-1/state"]);
                wait_online(&mut watcher, "demo-1");
                // As the README says: when box.log says "ready" (D-Bus is served by then).
                wait_for("the box to say ready", T, || {
                    std::fs::read_to_string(w.join("box.log"))
                        .ok()?
                        .contains(" ready ")
                        .then_some(())
                })
                .unwrap_or_else(|e| panic!("{e}\n{}", transcript()));
            } else if is_sub {
                wait_for("the listener to subscribe", T, || {
                    out.lock().unwrap()[start..]
                        .contains("SUBACK")
                        .then_some(())
                })
                .unwrap_or_else(|e| panic!("{e}\n{}", transcript()));
            }
        }
        eprintln!("ran `{line}`: {said}");
        replies.push((line, said));
    }

    let said = |needle: &str| -> &str {
        &replies
            .iter()
            .find(|(l, _)| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with `{needle}`"))
            .1
    };
    // A reply by its id, wherever in the shell's output it came (a listener in the background
    // prints when its message arrives).
    let reply = |id: &str| -> Value {
        out.lock()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["id"] == id)
            .unwrap_or_else(|| panic!("no reply to {id}\n{}", transcript()))
    };
    let status = reply("status-1");
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["result"]["device"], "demo-1", "{status}");

    // The MQTT inference's reply reached the background listener.
    let infer = reply("infer-1");
    assert_eq!(infer["ok"], true, "{infer}");
    assert_eq!(infer["result"]["top"][0]["label"], "7", "{infer}");

    // busctl prints the JSON as a quoted string.
    let dbus = said("busctl --user call").replace("\\\"", "\"");
    assert!(
        dbus.contains("\"model\":\"digits-cnn-int8\"") && dbus.contains("\"label\":\"7\""),
        "{dbus}"
    );

    assert!(
        said("tern-update status").contains("committed"),
        "{}",
        transcript()
    );
    let rollback = reply("rollback-1");
    assert_eq!(rollback["ok"], true, "{rollback}");
    assert_eq!(rollback["result"]["active"], "1.0.0", "{rollback}");
    assert_eq!(rollback["result"]["from"], "1.1.0", "{rollback}");
    // And the box's own record says so.
    let active: Vec<String> = column(
        &w.join("var/fleet-demo"),
        "SELECT version FROM model_versions WHERE state = 'active'",
    );
    assert_eq!(active, ["1.0.0"]);
    // At the end of its input the shell exits; what it left running goes with the group.
    drop(stdin);
    let ended = wait_for("the shell to exit", T, || shell.try_wait().ok().flatten());
    assert!(ended.is_ok_and(|s| s.success()), "{}", transcript());
}
