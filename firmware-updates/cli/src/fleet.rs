//! `tern-update fleet`: every box as its retained messages describe it (birth or `offline`,
//! latest telemetry, update outcomes) and the rollouts under way, once or followed.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_update::topics::{DeviceTopic, Topics};

use crate::BrokerArgs;
use crate::mqtt::{connect, plain};

/// One box as the broker remembers it.
#[derive(Default, Clone)]
struct Seen {
    state: Option<Value>,
    telemetry: Option<Value>,
    updates: BTreeMap<String, Value>,
}

#[derive(Default)]
pub struct View {
    boxes: BTreeMap<String, Seen>,
    rollouts: BTreeMap<String, Value>,
}

impl View {
    fn take(&mut self, topics: &Topics, topic: &str, payload: &[u8]) {
        if let Some(id) = topic
            .strip_prefix(topics.rollout("").as_str())
            .filter(|id| !id.contains('/'))
        {
            match serde_json::from_slice::<Value>(payload) {
                Ok(v) => self.rollouts.insert(id.to_string(), v),
                Err(_) => self.rollouts.remove(id),
            };
            return;
        }
        let Some((dev, what)) = topics.parse_device(topic) else {
            return;
        };
        // An empty retained message clears the topic: the box's record goes with it.
        let v = serde_json::from_slice::<Value>(payload).ok();
        let seen = self.boxes.entry(dev).or_default();
        match what {
            DeviceTopic::State => {
                // `offline` carries no birth details: keep the last birth's beside it.
                if let Some(v) = &v
                    && v["state"] != "online"
                    && let Some(old) = &mut seen.state
                {
                    old["state"] = v["state"].clone();
                    old["graceful"] = v["graceful"].clone();
                    if v["groups"].is_array() {
                        old["groups"] = v["groups"].clone();
                    }
                    return;
                }
                seen.state = v;
            }
            DeviceTopic::Telemetry => seen.telemetry = v,
            DeviceTopic::UpdateStatus(model) => match v {
                Some(v) => {
                    seen.updates.insert(model, v);
                }
                None => {
                    seen.updates.remove(&model);
                }
            },
        }
    }

    /// One row per box (of `group`, if given), as JSON.
    pub fn rows(&self, group: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        for (dev, s) in &self.boxes {
            let state = s.state.clone().unwrap_or(Value::Null);
            let groups: Vec<String> = state["groups"]
                .as_array()
                .map(|g| {
                    g.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(g) = group
                && !groups.iter().any(|x| x == g)
            {
                continue;
            }
            let t = s.telemetry.clone().unwrap_or(Value::Null);
            // The birth is said again whenever a model changes; telemetry only every so often.
            let models: Vec<Value> = state["models"].as_array().cloned().unwrap_or_default();
            let last_update = s
                .updates
                .iter()
                .max_by_key(|(_, v)| v["ts_ms"].as_i64().unwrap_or(0))
                .map(|(model, v)| {
                    json!({"model": model, "version": v["version"], "state": v["state"],
                           "reason": v["reason"], "ts_ms": v["ts_ms"]})
                });
            out.push(json!({
                "device": dev,
                "online": state["state"] == "online",
                "graceful": state["graceful"],
                "last_seen_ms": t["ts_ms"],
                "groups": groups,
                "ternd": state["version"],
                "models": models,
                "last_update": last_update,
                "health": state["status"],
                "outbox_rows": t["outbox"]["rows"],
                "outbox_bytes": t["outbox"]["bytes"],
            }));
        }
        out
    }
}

/// Counts per active version and per last update outcome.
pub fn summary(rows: &[Value]) -> Value {
    let mut versions: BTreeMap<String, usize> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let online = rows.iter().filter(|r| r["online"] == true).count();
    for r in rows {
        for m in r["models"].as_array().into_iter().flatten() {
            *versions
                .entry(format!("{} {}", plain(&m["name"]), plain(&m["version"])))
                .or_default() += 1;
        }
        let o = match &r["last_update"] {
            Value::Null => "none".to_string(),
            u => format!(
                "{} {} {}",
                plain(&u["model"]),
                plain(&u["version"]),
                plain(&u["state"])
            ),
        };
        *outcomes.entry(o).or_default() += 1;
    }
    json!({"boxes": rows.len(), "online": online, "versions": versions, "last_updates": outcomes})
}

fn ago(ms: i64) -> String {
    let s = (crate::now() * 1000).saturating_sub(ms).max(0) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn print_table(rows: &[Value], rollouts: &BTreeMap<String, Value>) {
    println!(
        "{:<20} {:<12} {:<12} {:<34} {:<30} {:>7}  health",
        "device", "online", "groups", "models (version plan)", "last update", "outbox"
    );
    for r in rows {
        let online = if r["online"] == true {
            "online".to_string()
        } else {
            match r["last_seen_ms"].as_i64() {
                Some(ms) => format!("off {} ago", ago(ms)),
                None => "offline".to_string(),
            }
        };
        let groups = r["groups"]
            .as_array()
            .map(|g| g.iter().map(plain).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        let models = r["models"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| {
                        let plan = m["plan"]
                            .as_str()
                            .map(|p| format!(" {p}"))
                            .unwrap_or_default();
                        format!("{} {}{plan}", plain(&m["name"]), plain(&m["version"]))
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let update = match &r["last_update"] {
            Value::Null => "-".to_string(),
            u => format!("{} {}", plain(&u["version"]), plain(&u["state"])),
        };
        let outbox = r["outbox_rows"]
            .as_i64()
            .map_or_else(|| "-".to_string(), |n| n.to_string());
        println!(
            "{:<20} {:<12} {:<12} {:<34} {:<30} {:>7}  {}",
            plain(&r["device"]),
            online,
            groups,
            models,
            update,
            outbox,
            r["health"].as_str().unwrap_or("-")
        );
    }
    let s = summary(rows);
    println!("{} box(es), {} online", s["boxes"], s["online"]);
    for (k, n) in s["versions"].as_object().into_iter().flatten() {
        println!("  {n:>6}  serving {k}");
    }
    for (k, n) in s["last_updates"].as_object().into_iter().flatten() {
        println!("  {n:>6}  last update {k}");
    }
    for (id, r) in rollouts {
        let waves = r["waves"].as_array().map_or(0, Vec::len);
        println!(
            "rollout {id}: {} {} {}, wave {}/{waves}{}",
            plain(&r["model"]),
            plain(&r["version"]),
            plain(&r["phase"]),
            (r["current"].as_u64().unwrap_or(0) as usize)
                .saturating_add(1)
                .min(waves),
            r["reason"]
                .as_str()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        );
    }
}

pub async fn run(
    b: BrokerArgs,
    group: Option<&str>,
    as_json: bool,
    watch: bool,
) -> anyhow::Result<ExitCode> {
    let topics = Topics::new(&b.prefix);
    let mut conn = connect(&b).await?;
    for f in [
        topics.all_states(),
        topics.all_telemetry(),
        topics.update_status("+", "+"),
        topics.rollout("+"),
    ] {
        conn.subscribe(&f).await?;
    }
    let mut view = View::default();
    // Retained messages follow each SUBACK at once: a short quiet ends them.
    for (t, p) in conn
        .gather(Duration::from_millis(500), Duration::from_secs(30))
        .await
    {
        view.take(&topics, &t, &p);
    }
    let show = |view: &View| {
        let rows = view.rows(group);
        if as_json {
            println!(
                "{}",
                json!({"boxes": rows, "summary": summary(&rows), "rollouts": view.rollouts})
            );
        } else {
            print_table(&rows, &view.rollouts);
        }
    };
    show(&view);
    if !watch {
        conn.disconnect().await;
        return Ok(ExitCode::SUCCESS);
    }
    // Followed: printed again at most once a second, after whatever changed.
    loop {
        let Some((t, p)) = conn.messages.recv().await else {
            anyhow::bail!("broker connection lost");
        };
        view.take(&topics, &t, &p);
        let until = Instant::now() + Duration::from_secs(1);
        for (t, p) in conn
            .gather(Duration::from_millis(200), until - Instant::now())
            .await
        {
            view.take(&topics, &t, &p);
        }
        if !as_json {
            println!();
        }
        show(&view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_is_pieced_together_from_its_retained_messages() {
        let topics = Topics::new("t");
        let mut v = View::default();
        let birth = json!({"state": "online", "device": "b1", "groups": ["lab"], "version": "0.9.0",
                           "models": [{"name": "m", "version": "1.1.0", "plan": "tract"}],
                           "status": "ready"});
        v.take(&topics, "t/b1/state", birth.to_string().as_bytes());
        let tel = json!({"ts_ms": 5, "models": [{"name": "m", "version": "1.0.0"}],
                         "outbox": {"rows": 3, "bytes": 90}});
        v.take(&topics, "t/b1/telemetry", tel.to_string().as_bytes());
        let up = |ver: &str, st: &str, ts: i64| {
            json!({"version": ver, "state": st, "ts_ms": ts}).to_string()
        };
        v.take(
            &topics,
            "t/b1/updates/m",
            up("1.1.0", "committed", 9).as_bytes(),
        );
        v.take(
            &topics,
            "t/b1/updates/n",
            up("2.0.0", "failed", 4).as_bytes(),
        );
        v.take(
            &topics,
            "t/b2/state",
            br#"{"state":"offline","groups":["other"]}"#,
        );
        v.take(&topics, "t/fleet/rollouts/r1", br#"{"phase":"running"}"#);
        let rows = v.rows(Some("lab"));
        assert_eq!(rows.len(), 1, "{rows:?}");
        let r = &rows[0];
        assert_eq!(
            r["models"][0]["plan"], "tract",
            "the birth's models, not older telemetry's"
        );
        assert_eq!(r["last_update"]["model"], "m", "the newest outcome");
        assert_eq!(r["outbox_rows"], 3);
        assert_eq!(r["health"], "ready");
        // Going offline keeps what the birth said.
        v.take(
            &topics,
            "t/b1/state",
            br#"{"state":"offline","graceful":false}"#,
        );
        let r = &v.rows(Some("lab"))[0];
        assert_eq!(
            (r["online"].clone(), r["ternd"].clone()),
            (json!(false), json!("0.9.0"))
        );
        let all = v.rows(None);
        assert_eq!(all.len(), 2);
        let s = summary(&all);
        assert_eq!(s["versions"]["m 1.1.0"], 1);
        assert_eq!(s["last_updates"]["none"], 1);
        assert_eq!(s["online"], 0);
        assert_eq!(v.rollouts["r1"]["phase"], "running");
        // A cleared telemetry topic takes the figures with it.
        v.take(&topics, "t/b1/telemetry", b"");
        assert_eq!(v.rows(Some("lab"))[0]["outbox_rows"], Value::Null);
    }
}
