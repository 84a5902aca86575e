//! `tern-update ingest`: a results consumer for a whole fleet. Several run side by side on one
//! MQTT 5 shared subscription (`$share/<name>/<prefix>/+/results/#`), the broker handing each
//! message to one of them; each writes what it gets to a SQLite database and acknowledges a
//! message only once it is committed, so a worker that dies loses nothing the broker will not
//! send again. Duplicates (the boxes' outbox is at-least-once) fall on the primary key
//! (device, stream, seq); `tern-update gaps` reads the database for missing sequence numbers, less the
//! ranges the boxes reported dropped (`outbox.dropped` events).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rusqlite::{Connection, params};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::BrokerArgs;

pub struct Args {
    pub broker: BrokerArgs,
    pub share: String,
    pub db: PathBuf,
    pub events: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    device TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL,
    topic TEXT NOT NULL, payload TEXT NOT NULL, received_ms INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    PRIMARY KEY (device, stream, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dropped (
    device TEXT NOT NULL, stream TEXT NOT NULL, first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, count INTEGER NOT NULL, reason TEXT,
    PRIMARY KEY (device, stream, first_seq, last_seq));
";

fn open(path: &Path) -> anyhow::Result<Connection> {
    let c = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    // Several workers write one file: WAL lets them take turns without failing each other.
    c.busy_timeout(Duration::from_secs(30))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    // A message is acknowledged once committed: the commit must be on disk.
    c.pragma_update(None, "synchronous", "FULL")?;
    c.execute_batch(SCHEMA)?;
    Ok(c)
}

/// `(device, stream)` of a results or events topic: the stream is what `seq` counts in.
pub fn stream_of(prefix: &str, topic: &str) -> Option<(String, String)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (device, stream) = rest.split_once('/')?;
    let ok = stream == "events"
        || stream
            .strip_prefix("results/")
            .is_some_and(|p| !p.is_empty() && !p.contains('/'));
    (ok && device != "fleet").then(|| (device.to_string(), stream.to_string()))
}

#[derive(Default, Debug, PartialEq)]
pub struct Tally {
    pub stored: u64,
    pub duplicates: u64,
    pub malformed: u64,
}

/// Store one batch in one transaction.
fn store(
    c: &mut Connection,
    prefix: &str,
    consumer: &str,
    batch: &[(String, Vec<u8>)],
    t: &mut Tally,
) -> anyhow::Result<()> {
    let tx = c.transaction()?;
    let now = crate::now() * 1000;
    for (topic, payload) in batch {
        let (Some((device, stream)), Ok(v)) = (
            stream_of(prefix, topic),
            serde_json::from_slice::<Value>(payload),
        ) else {
            t.malformed += 1;
            continue;
        };
        // A box counts from 1: anything else is not one of its messages.
        let Some(seq) = v["seq"].as_i64().filter(|&q| q >= 1) else {
            t.malformed += 1;
            continue;
        };
        let n = tx.execute(
            "INSERT OR IGNORE INTO messages VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![device, stream, seq, topic, v.to_string(), now, consumer],
        )?;
        if n == 0 {
            t.duplicates += 1;
            continue;
        }
        t.stored += 1;
        if stream == "events" && v["event"] == "outbox.dropped" {
            tx.execute(
                "INSERT OR IGNORE INTO dropped VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    device,
                    v["stream"].as_str().unwrap_or(""),
                    v["first_seq"].as_i64().unwrap_or(0),
                    v["last_seq"].as_i64().unwrap_or(0),
                    v["count"].as_i64().unwrap_or(0),
                    v["reason"].as_str()
                ],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.share.is_empty() || a.share.contains(['/', '+', '#']) {
        bail!("--share {:?}: a name without `/`, `+` or `#`", a.share);
    }
    let mut db = open(&a.db)?;
    let prefix = a.broker.prefix.clone();
    if a.broker.broker.len() > 1 {
        bail!("ingest takes one --broker: start a worker per node to spread them");
    }
    let r = crate::mqtt::reach(&a.broker, a.broker.primary())?;
    let consumer = format!("tern-ingest-{}-{}", a.share, std::process::id());
    let mut o = MqttOptions::new(&consumer, r.host, r.port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_manual_acks(true)
        .set_max_packet_size(Some(16 * 1024 * 1024));
    if let Some(t) = r.tls {
        o.set_transport(t);
    }
    if let Some((u, p)) = r.login {
        o.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(o, 1024);
    let mut filters = vec![format!("$share/{}/{prefix}/+/results/#", a.share)];
    if a.events {
        filters.push(format!("$share/{}/{prefix}/+/events", a.share));
    }
    for f in &filters {
        client.subscribe(f.as_str(), QoS::AtLeastOnce).await?;
    }
    let (tx, mut rx) = mpsc::channel::<Publish>(4096);
    let (ready_tx, ready) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let broker = a.broker.primary().to_string();
    let mut unacked = filters.len();
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    // A broker without shared subscriptions refuses the filter: said, not
                    // waited on forever.
                    if s.return_codes.iter().any(|c| {
                        !matches!(
                            c,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    }) {
                        let why = format!(
                            "{broker} refused a subscription ({:?}): does it support MQTT 5 \
                             shared subscriptions?",
                            s.return_codes
                        );
                        match ready_tx.take() {
                            Some(r) => {
                                let _ = r.send(Err(why));
                            }
                            None => eprintln!("tern-update: {why}"),
                        }
                        return;
                    }
                    // Ready once every filter is in place: what is published after this
                    // reaches one of the workers.
                    unacked -= 1;
                    if unacked == 0
                        && let Some(r) = ready_tx.take()
                    {
                        let _ = r.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    crate::mqtt::lost(&mut ready_tx, e.to_string());
                    return;
                }
            }
        }
    });
    crate::mqtt::ready(a.broker.primary(), ready).await?;
    eprintln!(
        "{consumer}: consuming {} into {}",
        filters.join(" and "),
        a.db.display()
    );
    let mut t = Tally::default();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let first = tokio::select! {
            p = rx.recv() => match p {
                Some(p) => p,
                // Lost the broker (said above): a failure, for a supervisor to restart it.
                None => {
                    println!(
                        "{consumer}: stored {}, duplicates {}, malformed {}",
                        t.stored, t.duplicates, t.malformed
                    );
                    bail!("{}: the connection ended", a.broker.primary());
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let mut batch = vec![first];
        while batch.len() < 512
            && let Ok(p) = rx.try_recv()
        {
            batch.push(p);
        }
        let rows: Vec<(String, Vec<u8>)> = batch
            .iter()
            .map(|p| {
                (
                    String::from_utf8_lossy(&p.topic).to_string(),
                    p.payload.to_vec(),
                )
            })
            .collect();
        store(&mut db, &prefix, &consumer, &rows, &mut t)?;
        // Committed: now the broker may forget them.
        for p in &batch {
            client.ack(p).await?;
        }
    }
    let _ = client.disconnect().await;
    println!(
        "{consumer}: stored {}, duplicates {}, malformed {}",
        t.stored, t.duplicates, t.malformed
    );
    Ok(ExitCode::SUCCESS)
}

/// Seq ranges (first, last) per (device, stream).
pub type Ranges = BTreeMap<(String, String), Vec<(i64, i64)>>;

/// Missing sequence numbers per stream, as (first, last) ranges, less the dropped ones.
pub fn missing(db: &Connection) -> anyhow::Result<Ranges> {
    let mut dropped = Ranges::new();
    let mut s = db.prepare("SELECT device, stream, first_seq, last_seq FROM dropped")?;
    for r in s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))? {
        let (d, st, a, b): (String, String, i64, i64) = r?;
        dropped.entry((d, st)).or_default().push((a, b));
    }
    let mut out = Ranges::new();
    let mut s =
        db.prepare("SELECT device, stream, seq FROM messages ORDER BY device, stream, seq")?;
    let mut last: Option<((String, String), i64)> = None;
    for r in s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))? {
        let (d, st, seq): (String, String, i64) = r?;
        let key = (d, st);
        let prev = match &last {
            Some((k, p)) if *k == key => *p,
            // A stream starts at 1.
            _ => 0,
        };
        // The gap between two stored numbers, less the ranges the box said it dropped: by
        // interval, never number by number (a stray seq may be far ahead).
        if seq > prev + 1 {
            let mut from = prev + 1;
            let mut drops: Vec<(i64, i64)> = dropped.get(&key).cloned().unwrap_or_default();
            drops.sort_unstable();
            let gaps = out.entry(key.clone()).or_default();
            for (a, b) in drops {
                if b < from || a >= seq {
                    continue;
                }
                if a > from {
                    gaps.push((from, a - 1));
                }
                from = from.max(b.saturating_add(1));
            }
            if from < seq {
                gaps.push((from, seq - 1));
            }
        }
        last = Some((key, seq));
    }
    out.retain(|_, v| !v.is_empty());
    Ok(out)
}

pub fn gaps(path: &Path) -> anyhow::Result<ExitCode> {
    if !path.exists() {
        bail!("{}: no such database", path.display());
    }
    let db = open(path)?;
    let streams: i64 = db.query_row(
        "SELECT count(*) FROM (SELECT DISTINCT device, stream FROM messages)",
        [],
        |r| r.get(0),
    )?;
    let gaps = missing(&db)?;
    for ((device, stream), ranges) in &gaps {
        let text: Vec<String> = ranges
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        println!("{device} {stream}: missing seq {}", text.join(", "));
    }
    println!(
        "{streams} stream(s), {} with gaps (the newest messages of a stream cannot be known missing)",
        gaps.len()
    );
    Ok(if gaps.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(65)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_what_seq_counts_in() {
        assert_eq!(
            stream_of("tern", "tern/b1/results/main"),
            Some(("b1".into(), "results/main".into()))
        );
        assert_eq!(
            stream_of("tern", "tern/b1/events"),
            Some(("b1".into(), "events".into()))
        );
        for t in [
            "tern/b1/results/a/b",
            "tern/b1/results/",
            "tern/fleet/events",
            "x/b1/events",
        ] {
            assert_eq!(stream_of("tern", t), None, "{t}");
        }
    }

    #[test]
    fn duplicates_fall_and_gaps_less_drops_are_found() {
        let d = tempfile::tempdir().unwrap();
        let mut c = open(&d.path().join("i.db")).unwrap();
        let msg = |dev: &str, seq: i64| {
            (
                format!("tern/{dev}/results/p"),
                serde_json::to_vec(&serde_json::json!({"seq": seq})).unwrap(),
            )
        };
        let mut batch: Vec<_> = [1, 2, 3, 5, 6, 9, 3, 0, -4]
            .iter()
            .map(|&s| msg("a", s))
            .collect();
        // Far ahead: a gap of a quadrillion numbers is one range, found at once.
        batch.push(msg("c", 1_000_000_000_000_000));
        batch.extend([1, 2].iter().map(|&s| msg("b", s)));
        batch.push(("tern/a/results/p".into(), b"not json".to_vec()));
        batch.push((
            "tern/a/events".into(),
            serde_json::to_vec(&serde_json::json!({"seq": 1, "event": "outbox.dropped",
                "stream": "results/p", "first_seq": 7, "last_seq": 7, "count": 1}))
            .unwrap(),
        ));
        let mut t = Tally::default();
        store(&mut c, "tern", "w", &batch, &mut t).unwrap();
        assert_eq!(
            t,
            Tally {
                stored: 10,
                duplicates: 1,
                malformed: 3
            }
        );
        let gaps = missing(&c).unwrap();
        // 4 is lost; 7 was dropped by the box (said so); 8 is lost.
        assert_eq!(
            gaps.into_iter().collect::<Vec<_>>(),
            vec![
                (("a".into(), "results/p".into()), vec![(4, 4), (8, 8)]),
                (
                    ("c".into(), "results/p".into()),
                    vec![(1, 999_999_999_999_999)]
                )
            ]
        );
    }
}
