//! A broker that is more than one process: ejabberd's MQTT service (Debian's `ejabberd`
//! package, 23.01 on bookworm) as a cluster of nodes on this machine, each with its own
//! config, spool, logs and MQTT port, joined with `ejabberdctl join_cluster`. Stopped with
//! `ejabberdctl stop` when dropped; their logs are printed if the test failed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::mqtt::{Broker, free_port};
use crate::{Context, Result, bail, need, need_root};

/// The login every client gives: ejabberd refuses MQTT without a username, and its
/// anonymous backend takes any password for a JID of the host.
pub const LOGIN: (&str, &str) = ("tern@localhost", "anonymous");

/// Largest MQTT payload the nodes take: AWS IoT Core's 128 KB, which tern's default chunks
/// fit and a bundle cut into larger chunks does not.
pub const MAX_PAYLOAD: usize = 128 * 1024;

pub struct Cluster {
    pub nodes: Vec<Broker>,
    names: Vec<String>,
    dir: tempfile::TempDir,
    /// Set once every node is up and joined: a start that failed shows the logs too.
    ready: bool,
}

impl Cluster {
    /// `n` nodes joined into one cluster; None (SKIPPED) without ejabberd or root (the nodes
    /// run as the `ejabberd` user, as Debian's `ejabberdctl` insists).
    pub fn start(n: usize) -> Result<Option<Cluster>> {
        if !need("ejabberdctl") || !need_root() {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let tag = format!("tern{}x{}", std::process::id(), free_port());
        let mut c = Cluster {
            nodes: Vec::new(),
            names: (0..n).map(|i| format!("{tag}n{i}@localhost")).collect(),
            dir,
            ready: false,
        };
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        for (i, port) in ports.iter().enumerate() {
            let d = c.node_dir(i);
            std::fs::create_dir_all(d.join("spool"))?;
            std::fs::create_dir_all(d.join("logs"))?;
            // `match_retained_limit`: the default 1000 would cut a subscription to a
            // bundle's chunks (`.../chunks/+`) short.
            std::fs::write(
                d.join("ejabberd.yml"),
                format!(
                    "hosts:\n  - localhost\nloglevel: info\nauth_method: [anonymous]\n\
                     anonymous_protocol: login_anon\nallow_multiple_connections: true\n\
                     listen:\n  - port: {port}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n\
                     \x20   max_payload_size: {MAX_PAYLOAD}\n\
                     modules:\n  mod_mqtt:\n    match_retained_limit: infinity\n"
                ),
            )?;
            // Its own ctl config: without one, /etc/ejabberd's forces that config (port 1883).
            std::fs::write(
                d.join("ejabberdctl.cfg"),
                format!("EJABBERD_PID_PATH={}/ejabberd.pid\n", d.display()),
            )?;
            std::fs::write(
                d.join("inetrc"),
                "{lookup,[\"file\",\"native\"]}.\n{host,{127,0,0,1}, [\"localhost\"]}.\n",
            )?;
        }
        let ok = Command::new("chown")
            .args(["-R", "ejabberd:ejabberd"])
            .arg(c.dir.path())
            .status()
            .context("chown")?;
        if !ok.success() {
            bail!("chown -R ejabberd {} failed", c.dir.path().display());
        }
        let login = (LOGIN.0.to_string(), LOGIN.1.to_string());
        for (i, port) in ports.iter().enumerate() {
            c.ctl(i, &["start"])?;
            c.ctl(i, &["started"])?;
            if i > 0 {
                let first = c.names[0].clone();
                c.ctl(i, &["join_cluster", &first])?;
                c.ctl(i, &["started"])?;
            }
            c.nodes.push(Broker::ejabberd_node(*port, login.clone())?);
        }
        let listed = c.ctl(0, &["list_cluster"])?;
        for name in &c.names {
            if !listed.contains(name.as_str()) {
                bail!("{name} is not in the cluster: {listed}");
            }
        }
        c.ready = true;
        Ok(Some(c))
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}"))
    }

    /// Run `ejabberdctl <args>` for node `i`: its stdout, or why it failed.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<String> {
        let d = self.node_dir(i);
        let o = Command::new("ejabberdctl")
            .arg("--config-dir")
            .arg(&d)
            .arg("--config")
            .arg(d.join("ejabberd.yml"))
            .arg("--ctl-config")
            .arg(d.join("ejabberdctl.cfg"))
            .args(["--node", &self.names[i]])
            .arg("--spool")
            .arg(d.join("spool"))
            .arg("--logs")
            .arg(d.join("logs"))
            .args(args)
            .output()
            .context("running ejabberdctl")?;
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        if !o.status.success() {
            bail!(
                "ejabberdctl {args:?} on {}: {}{out}{}",
                self.names[i],
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(out)
    }

    fn log(&self, i: usize) -> String {
        let logs = self.node_dir(i).join("logs");
        ["ejabberd.log", "error.log"]
            .iter()
            .map(|f| tail(&logs.join(f), 60))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() || !self.ready {
            for i in 0..self.names.len() {
                eprintln!("---- ejabberd {} log ----\n{}", self.names[i], self.log(i));
            }
        }
        for i in (0..self.names.len()).rev() {
            let _ = self.ctl(i, &["stop"]);
            let _ = self.ctl(i, &["stopped"]);
        }
    }
}
