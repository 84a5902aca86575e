//! Store-and-forward of everything bound for the broker.
//!
//! A message is a row in the `outbox` table from the transaction that produced it (a result is
//! inserted together with its outbox row) until the broker's PUBACK for it has been seen; only
//! then is the row deleted. rumqttc keeps unacknowledged messages in memory only, so after a
//! broker outage or a restart the fleet link simply sends every row that is still here again.
//! Consumers see each message at least once; the per-stream `seq` in every payload lets them
//! drop duplicates and detect gaps (which only the disk budget can cause, and which are then
//! reported on the events stream).

use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::Notify;

use tern_update::topics;

use crate::store::now_ms;

/// What a full disk budget drops first: the lowest class, oldest rows first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Telemetry = 0,
    Result = 1,
    Event = 2,
}

impl Class {
    /// Results travel in the bulk lane so a backlog of them never delays events and telemetry.
    fn lane(self) -> i64 {
        match self {
            Class::Result => 1,
            _ => 0,
        }
    }
}

/// Where upstream messages go and how much disk they may take. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    /// The box's topics: every upstream message goes to one of them.
    topics: Arc<topics::Device>,
    pub budget_bytes: u64,
    notify: Arc<Notify>,
}

/// One row on its way out.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Backlog figures for status and telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Backlog {
    pub rows: i64,
    pub bytes: i64,
}

impl Outbox {
    /// The outbox of a configured box: only with a fleet link (without a broker to send to, it
    /// would grow to its budget and then drop).
    pub fn for_config(config: &crate::config::Config) -> Option<Outbox> {
        config.fleet.as_ref().map(|f| {
            Outbox::new(
                topics::Device::new(&f.prefix, &f.device, &f.groups),
                config.outbox.budget_bytes,
            )
        })
    }

    pub fn new(topics: topics::Device, budget_bytes: u64) -> Outbox {
        Outbox {
            topics: Arc::new(topics),
            budget_bytes,
            notify: Arc::new(Notify::new()),
        }
    }

    /// Queue `body` (a JSON object) on `stream` inside the caller's transaction; `seq` is added
    /// to it. Call [`Outbox::wake`] after the transaction commits.
    pub fn enqueue(
        &self,
        tx: &Transaction<'_>,
        stream: &str,
        class: Class,
        topic: &str,
        body: Value,
    ) -> rusqlite::Result<i64> {
        let seq: i64 = tx
            .query_row(
                "SELECT next_seq FROM outbox_streams WHERE stream = ?1",
                [stream],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(1);
        tx.execute(
            "INSERT INTO outbox_streams (stream, next_seq) VALUES (?1, ?2)
             ON CONFLICT (stream) DO UPDATE SET next_seq = excluded.next_seq",
            params![stream, seq + 1],
        )?;
        let mut body = body;
        if let Value::Object(map) = &mut body {
            map.insert("seq".into(), seq.into());
        }
        let payload = serde_json::to_vec(&body).expect("JSON values serialise");
        let size = payload.len() as i64;
        tx.execute(
            "INSERT INTO outbox (stream, seq, class, lane, topic, payload, size, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                stream,
                seq,
                class as i64,
                class.lane(),
                topic,
                payload,
                size,
                now_ms()
            ],
        )?;
        tx.execute(
            "UPDATE outbox_totals SET rows = rows + 1, bytes = bytes + ?1",
            [size],
        )?;
        self.enforce_budget(tx)?;
        Ok(seq)
    }

    /// Queue one message in a transaction of its own and wake the fleet link: for messages
    /// that are not part of another state change (telemetry, events after the fact).
    pub async fn send(
        &self,
        store: &crate::store::Store,
        stream: &'static str,
        class: Class,
        topic: String,
        body: Value,
    ) -> Result<i64, crate::store::StoreError> {
        let o = self.clone();
        let seq = store
            .call(move |c| {
                let tx = c.transaction()?;
                let seq = o.enqueue(&tx, stream, class, &topic, body)?;
                tx.commit()?;
                Ok(seq)
            })
            .await?;
        self.wake();
        Ok(seq)
    }

    /// The box's topics.
    pub fn topics(&self) -> &topics::Device {
        &self.topics
    }

    /// Tell the fleet link that rows are waiting.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    pub async fn woken(&self) {
        self.notify.notified().await;
    }

    /// Past the budget, drop the oldest rows of the lowest class down to 90% of it (so the
    /// next message does not drop again at once) and count the drops per stream.
    fn enforce_budget(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let bytes = backlog(tx)?.bytes as u64;
        if bytes <= self.budget_bytes {
            return Ok(());
        }
        let mut to_free = bytes - self.budget_bytes * 9 / 10;
        let mut victims: Vec<(i64, String, i64, i64)> = Vec::new();
        {
            let mut stmt =
                tx.prepare("SELECT id, stream, seq, size FROM outbox ORDER BY class, id")?;
            let mut rows = stmt.query([])?;
            while to_free > 0
                && let Some(r) = rows.next()?
            {
                let size: i64 = r.get(3)?;
                victims.push((r.get(0)?, r.get(1)?, r.get(2)?, size));
                to_free = to_free.saturating_sub(size as u64);
            }
        }
        let mut freed = 0i64;
        for (id, stream, seq, size) in &victims {
            drop_row(tx, *id, stream, *seq, *size, "disk budget")?;
            freed += size;
        }
        tracing::warn!(
            dropped = victims.len(),
            bytes = freed,
            budget = self.budget_bytes,
            "outbox over its disk budget: oldest low-priority messages dropped"
        );
        Ok(())
    }
}

pub fn backlog(c: &rusqlite::Connection) -> rusqlite::Result<Backlog> {
    c.query_row("SELECT rows, bytes FROM outbox_totals", [], |r| {
        Ok(Backlog {
            rows: r.get(0)?,
            bytes: r.get(1)?,
        })
    })
}

/// Up to `limit` rows of `lane` after `after`, in order.
pub fn fetch(
    c: &rusqlite::Connection,
    lane: i64,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = c.prepare_cached(
        "SELECT id, topic, payload FROM outbox WHERE lane = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
    )?;
    stmt.query_map(params![lane, after, limit as i64], |r| {
        Ok(Row {
            id: r.get(0)?,
            topic: r.get(1)?,
            payload: r.get(2)?,
        })
    })?
    .collect()
}

/// Delete one row that will never be sent, counting it against its stream for the next drop
/// report.
fn drop_row(
    tx: &Transaction<'_>,
    id: i64,
    stream: &str,
    seq: i64,
    size: i64,
    why: &str,
) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
    tx.execute(
        "UPDATE outbox_streams SET dropped = dropped + 1,
             dropped_first = min(coalesce(dropped_first, ?2), ?2),
             dropped_last = max(coalesce(dropped_last, ?2), ?2),
             dropped_why = ?3
         WHERE stream = ?1",
        params![stream, seq, why],
    )?;
    tx.execute(
        "UPDATE outbox_totals SET rows = rows - 1, bytes = bytes - ?1",
        [size],
    )?;
    Ok(())
}

/// Give up on rows that cannot be delivered (the broker refused them, or their topic is one no
/// broker takes): they are dropped and reported like rows over the disk budget, never retried
/// forever in front of the rows behind them.
pub fn discard(c: &mut rusqlite::Connection, ids: &[(i64, String)]) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    for (id, why) in ids {
        let row: Option<(String, i64, i64)> = tx
            .query_row(
                "SELECT stream, seq, size FROM outbox WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((stream, seq, size)) = row {
            drop_row(&tx, *id, &stream, seq, size, why)?;
        }
    }
    tx.commit()
}

/// Delete rows the broker has acknowledged, in one transaction.
pub fn delete_acked(c: &mut rusqlite::Connection, ids: &[i64]) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    let (mut rows, mut bytes) = (0i64, 0i64);
    {
        let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1 RETURNING size")?;
        for id in ids {
            // A row may already be gone: dropped by the budget while in flight, or a duplicate
            // acknowledgement after a resend.
            if let Some(size) = stmt.query_row([id], |r| r.get::<_, i64>(0)).optional()? {
                rows += 1;
                bytes += size;
            }
        }
    }
    tx.execute(
        "UPDATE outbox_totals SET rows = rows - ?1, bytes = bytes - ?2",
        params![rows, bytes],
    )?;
    tx.commit()
}

/// Turn drop counters into events on the events stream (in the same transaction that resets
/// them, so a drop is reported exactly once). Returns how many streams had drops.
pub fn report_drops(outbox: &Outbox, c: &mut rusqlite::Connection) -> rusqlite::Result<usize> {
    let tx = c.transaction()?;
    type Drop = (String, i64, Option<i64>, Option<i64>, Option<String>);
    let drops: Vec<Drop> = {
        let mut stmt = tx.prepare(
            "SELECT stream, dropped, dropped_first, dropped_last, dropped_why FROM outbox_streams
             WHERE dropped > 0 ORDER BY stream",
        )?;
        stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<Result<_, _>>()?
    };
    if drops.is_empty() {
        // Nothing written: no commit, no fsync; this runs on every drain pass.
        return Ok(0);
    }
    // Every counter read is reset before any report is queued: queuing a report may push the
    // outbox over its budget and drop more, and those drops must count for the next round,
    // not be wiped by a reset that comes after them.
    tx.execute(
        "UPDATE outbox_streams SET dropped = 0, dropped_first = NULL, dropped_last = NULL,
             dropped_why = NULL
         WHERE dropped > 0",
        [],
    )?;
    for (stream, count, first, last, why) in &drops {
        outbox.event(
            &tx,
            serde_json::json!({
                "event": "outbox.dropped",
                "stream": stream,
                "count": count,
                "first_seq": first,
                "last_seq": last,
                "reason": why,
            }),
        )?;
    }
    tx.commit()?;
    Ok(drops.len())
}

impl Outbox {
    /// Queue an event (update progress, activations, feed failures, drops).
    pub fn event(&self, tx: &Transaction<'_>, body: Value) -> rusqlite::Result<i64> {
        let topic = self.topics.events();
        self.enqueue(tx, "events", Class::Event, &topic, stamped(body))
    }

    /// Queue an event in a transaction of its own.
    pub async fn send_event(
        &self,
        store: &crate::store::Store,
        body: Value,
    ) -> Result<i64, crate::store::StoreError> {
        let topic = self.topics.events();
        self.send(store, "events", Class::Event, topic, stamped(body))
            .await
    }
}

/// Events say when they happened, not only when they were sent.
fn stamped(mut body: Value) -> Value {
    if let Value::Object(m) = &mut body {
        m.entry("ts_ms").or_insert(now_ms().into());
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    async fn open() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("t.db")).unwrap();
        (d, s)
    }

    #[tokio::test]
    async fn seq_per_stream_and_ack_deletes() {
        let (_d, s) = open().await;
        let ob = Outbox::new(topics::Device::new("tern", "b", &[]), 1 << 20);
        let o = ob.clone();
        let seqs = s
            .call(move |c| {
                let tx = c.transaction()?;
                let a1 = o.enqueue(
                    &tx,
                    "results/a",
                    Class::Result,
                    "t/a",
                    serde_json::json!({}),
                )?;
                let b1 = o.enqueue(
                    &tx,
                    "results/b",
                    Class::Result,
                    "t/b",
                    serde_json::json!({}),
                )?;
                let a2 = o.enqueue(
                    &tx,
                    "results/a",
                    Class::Result,
                    "t/a",
                    serde_json::json!({"x": 1}),
                )?;
                let e1 = o.event(&tx, serde_json::json!({"event": "x"}))?;
                tx.commit()?;
                Ok((a1, b1, a2, e1))
            })
            .await
            .unwrap();
        assert_eq!(seqs, (1, 1, 2, 1));
        let (live, bulk, before) = s
            .call(|c| Ok((fetch(c, 0, 0, 10)?, fetch(c, 1, 0, 10)?, backlog(c)?)))
            .await
            .unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(bulk.len(), 3);
        let v: Value = serde_json::from_slice(&bulk[2].payload).unwrap();
        assert_eq!(v["seq"], 2);
        assert_eq!(v["x"], 1);
        assert_eq!(before.rows, 4);
        let ids: Vec<i64> = bulk.iter().map(|r| r.id).chain([bulk[0].id]).collect();
        let after = s
            .call(move |c| {
                delete_acked(c, &ids)?;
                Ok(backlog(c)?)
            })
            .await
            .unwrap();
        assert_eq!(after.rows, 1);
        assert_eq!(after.bytes, live[0].payload.len() as i64);
    }

    #[tokio::test]
    async fn budget_drops_telemetry_then_results_and_reports_once() {
        let (_d, s) = open().await;
        let ob = Outbox::new(topics::Device::new("tern", "b", &[]), 2000);
        let o = ob.clone();
        let report = s
            .call(move |c| {
                let pad = "x".repeat(80);
                for _ in 0..10 {
                    let tx = c.transaction()?;
                    o.enqueue(
                        &tx,
                        "telemetry",
                        Class::Telemetry,
                        "t",
                        serde_json::json!({"p": pad}),
                    )?;
                    o.event(&tx, serde_json::json!({"event": "e", "p": pad}))?;
                    tx.commit()?;
                }
                for _ in 0..20 {
                    let tx = c.transaction()?;
                    o.enqueue(
                        &tx,
                        "results/a",
                        Class::Result,
                        "t",
                        serde_json::json!({"p": pad}),
                    )?;
                    tx.commit()?;
                }
                let b = backlog(c)?;
                let left: Vec<(String, i64)> = c
                    .prepare("SELECT stream, count(*) FROM outbox GROUP BY stream ORDER BY stream")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                // Reporting adds events, which may push more results over the budget; those
                // drops are reported in turn. It settles because events are never dropped
                // while results are left.
                let mut rounds = 0;
                while report_drops(&o, c)? > 0 {
                    rounds += 1;
                    assert!(rounds < 10, "drop reports do not settle");
                }
                let left_results: i64 = c.query_row(
                    "SELECT count(*) FROM outbox WHERE stream = 'results/a'",
                    [],
                    |r| r.get(0),
                )?;
                let reported: Vec<Value> = fetch(c, 0, 0, 100)?
                    .iter()
                    .map(|r| serde_json::from_slice(&r.payload).unwrap())
                    .filter(|v: &Value| v["event"] == "outbox.dropped")
                    .collect();
                Ok((b, left, left_results, reported))
            })
            .await
            .unwrap();
        let (b, left, left_results, reported) = report;
        assert!(b.bytes as u64 <= 2000, "{b:?}");
        // Every telemetry row went before any event; events outlive results.
        assert!(!left.iter().any(|(s, _)| s == "telemetry"), "{left:?}");
        assert!(
            left.iter().any(|(s, c)| s == "events" && *c == 10),
            "{left:?}"
        );
        // Every result is either still queued or counted in exactly one drop report.
        let dropped_results: i64 = reported
            .iter()
            .filter(|v| v["stream"] == "results/a")
            .map(|v| v["count"].as_i64().unwrap())
            .sum();
        assert!(dropped_results > 0);
        assert_eq!(dropped_results + left_results, 20, "{reported:?}");
        let tel = reported
            .iter()
            .find(|v| v["stream"] == "telemetry")
            .unwrap();
        assert_eq!(tel["count"], 10);
        assert_eq!(tel["first_seq"], 1);
        assert_eq!(tel["last_seq"], 10);
    }
}
