//! Many boxes on one machine: N real `ternd` processes, each with its own device id, groups,
//! state directory and watched folder, serving one small model against one broker. For fleet
//! tests, demos and the fleet bench; stopped with SIGTERM (and waited for) when dropped.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::mqtt::{Broker, Client, ClientOptions};
use crate::{Daemon, Result, package, wait_for};

pub struct Options<'a> {
    pub count: usize,
    /// Device ids are `<prefix>-<NNN>`.
    pub prefix: &'a str,
    pub groups: &'a [&'a str],
    pub model: &'a str,
    /// More TOML for every box (`[updates]` keys, a health window).
    pub extra: &'a str,
    pub telemetry_secs: u64,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            count: 10,
            prefix: "box",
            groups: &["lab"],
            model: "digits-mlp-int8",
            extra: "",
            telemetry_secs: 3600,
        }
    }
}

pub struct Box {
    pub device: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state: PathBuf,
    pub inbox: PathBuf,
    pub daemon: Option<Daemon>,
}

pub struct Boxes {
    _dir: tempfile::TempDir,
    pub boxes: Vec<Box>,
    broker_url: String,
}

impl Boxes {
    /// Write every box's config and start them all (without waiting for them).
    pub fn start(broker: &Broker, o: &Options<'_>) -> Result<Boxes> {
        Boxes::start_across(&[broker], o)
    }

    /// The same, box `i` on `brokers[i % brokers.len()]`: the nodes of a broker cluster.
    pub fn start_across(brokers: &[&Broker], o: &Options<'_>) -> Result<Boxes> {
        let dir = tempfile::tempdir()?;
        let url = brokers[0].url(true);
        let groups: Vec<String> = o.groups.iter().map(|g| format!("{g:?}")).collect();
        let mut boxes = Vec::with_capacity(o.count);
        for i in 0..o.count {
            let device = format!("{}-{i:03}", o.prefix);
            let bdir = dir.path().join(&device);
            let inbox = bdir.join("inbox");
            std::fs::create_dir_all(&inbox)?;
            let config = bdir.join("ternd.toml");
            let broker = brokers[i % brokers.len()];
            let login = match &broker.login {
                Some((u, p)) => format!("username = {u:?}\npassword = {p:?}\n"),
                None => String::new(),
            };
            // One worker and one thread: a hundred boxes share two cores.
            let text = format!(
                r#"state_dir = "state"
[engine]
plan = "tract"
threads = 1
workers = 1
[[models]]
package = "{pkg}"
[[feeds]]
kind = "directory"
name = "inbox"
path = "inbox"
[[pipelines]]
name = "main"
feed = "inbox"
model = "{model}"
[fleet]
broker = "{url}"
device = "{device}"
groups = [{groups}]
telemetry_secs = {tel}
{login}{extra}
"#,
                pkg = package(o.model).display(),
                model = o.model,
                groups = groups.join(", "),
                url = broker.url(true),
                tel = o.telemetry_secs,
                extra = o.extra,
            );
            std::fs::write(&config, text)?;
            boxes.push(Box {
                device,
                state: bdir.join("state"),
                dir: bdir,
                config,
                inbox,
                daemon: None,
            });
        }
        let mut all = Boxes {
            _dir: dir,
            boxes,
            broker_url: url,
        };
        for i in 0..all.boxes.len() {
            all.spawn(i)?;
        }
        Ok(all)
    }

    pub fn broker_url(&self) -> &str {
        &self.broker_url
    }

    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let b = &mut self.boxes[i];
        b.daemon = Some(Daemon::spawn(&b.config, None, &[])?);
        Ok(())
    }

    /// SIGTERM box `i` and wait for it: it says `offline` itself.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(mut d) = self.boxes[i].daemon.take() {
            d.signal("TERM")?;
            d.wait(Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// Wait until each of `which` has said `online` on its state topic, through `c` (which
    /// must be subscribed to `<prefix>/+/state`).
    pub fn wait_online(&self, c: &mut Client, which: &[usize], timeout: Duration) -> Result<()> {
        let mut left: BTreeSet<String> = which
            .iter()
            .map(|&i| format!("tern/{}/state", self.boxes[i].device))
            .collect();
        wait_for("the boxes online", timeout, || {
            while let Some(m) = c.recv_any(Duration::from_millis(200)) {
                if m.json()["state"] == "online" {
                    left.remove(&m.topic);
                }
            }
            left.is_empty().then_some(())
        })
        .map_err(|e| crate::anyhow!("{e}; still not online: {left:?}"))
    }

    /// A client subscribed to every box's state (retained births included).
    pub fn watcher(broker: &Broker, id: &str) -> Result<Client> {
        Client::connect(
            broker,
            ClientOptions {
                v5: false,
                id,
                subscribe: &["tern/+/state"],
                persistent: false,
            },
        )
    }

    /// `Rss` and `Pss` (bytes) of every running box, from /proc: the resident set counts the
    /// binary's pages in full for each box, the proportional set only a box's share of them,
    /// which is what a box adds.
    pub fn memory(&self) -> Vec<(u64, u64)> {
        self.boxes
            .iter()
            .filter_map(|b| b.daemon.as_ref())
            .filter_map(|d| {
                let s = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", d.pid())).ok()?;
                let kb = |key: &str| -> Option<u64> {
                    let l = s.lines().find(|l| l.starts_with(key))?;
                    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
                };
                Some((kb("Rss:")?, kb("Pss:")?))
            })
            .collect()
    }
}

impl Drop for Boxes {
    fn drop(&mut self) {
        // All told first, then waited for: a hundred stop together.
        for b in &self.boxes {
            if let Some(d) = &b.daemon {
                let _ = d.signal("TERM");
            }
        }
        for b in &mut self.boxes {
            if let Some(mut d) = b.daemon.take()
                && d.wait(Duration::from_secs(30)).is_err()
            {
                eprintln!("{} did not stop on SIGTERM; killed", b.device);
            }
        }
    }
}
