//! The one SQLite database: schema migrations and the single writer thread.
//!
//! Every access goes through [`Store::call`], which runs a closure on the store's own thread
//! with the one connection. That gives one writer without locks in callers, keeps blocking
//! I/O off the async runtime, and makes "one transaction per state change" a matter of one
//! closure per state change. The store knows tables, not what they mean: `registry`, the feeds
//! and the pipelines own their rows.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {path} is damaged: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("database {path} has schema version {found}, newer than this ternd knows ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database thread has stopped")]
    Stopped,
}

impl StoreError {
    /// The file is damaged (not a database, or a failed integrity check), as opposed to
    /// unreadable for another reason (permissions, a full disk), which a new database would
    /// not mend.
    pub fn is_damage(&self) -> bool {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        match self {
            StoreError::Corrupt { .. } => true,
            StoreError::Open { source, .. } | StoreError::Sql(source) => matches!(
                source.sqlite_error_code(),
                Some(DatabaseCorrupt | NotADatabase)
            ),
            _ => false,
        }
    }
}

/// Schema steps, applied in order; `PRAGMA user_version` records how many have run. Never edit
/// a released step: add a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE model_versions (
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('installed', 'active', 'previous', 'failed')),
    path         TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    form         TEXT NOT NULL DEFAULT '',
    installed_at INTEGER NOT NULL,
    activated_at INTEGER,
    failure      TEXT,
    PRIMARY KEY (name, version)
);
CREATE UNIQUE INDEX model_versions_one_active ON model_versions (name) WHERE state = 'active';
CREATE UNIQUE INDEX model_versions_one_previous ON model_versions (name) WHERE state = 'previous';

CREATE TABLE results (
    id         INTEGER PRIMARY KEY,
    ts_ms      INTEGER NOT NULL,
    pipeline   TEXT NOT NULL,
    source     TEXT NOT NULL,
    model      TEXT NOT NULL,
    version    TEXT NOT NULL,
    label      TEXT,
    score      REAL,
    top        TEXT NOT NULL,
    latency_us INTEGER NOT NULL
);
CREATE INDEX results_ts ON results (ts_ms);

CREATE TABLE feed_files (
    feed     TEXT NOT NULL,
    name     TEXT NOT NULL,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    PRIMARY KEY (feed, name)
);
"#,
    r#"
-- A file is marked 'pending' (and its attempt counted) before it is handed to the engine,
-- so an input that hangs or crashes the engine is refused after a few restarts instead of
-- looping forever; 'result' and 'refused' say how it ended.
ALTER TABLE feed_files ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE feed_files ADD COLUMN outcome TEXT NOT NULL DEFAULT 'result'
    CHECK (outcome IN ('pending', 'result', 'refused'));
"#,
    r#"
-- Everything bound for the broker waits here until its PUBACK. `lane` 0 (events, telemetry)
-- is sent ahead of lane 1 (results) so a results backlog never holds live traffic back;
-- `class` orders what a full disk budget drops first (0 telemetry, 1 results, 2 events).
-- AUTOINCREMENT: ids never come back after the table empties, so "sent up to id N" cursors
-- stay right.
CREATE TABLE outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    stream     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    class      INTEGER NOT NULL,
    lane       INTEGER NOT NULL,
    topic      TEXT NOT NULL,
    payload    BLOB NOT NULL,
    size       INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX outbox_lane ON outbox (lane, id);
CREATE INDEX outbox_class ON outbox (class, id);
CREATE TABLE outbox_streams (
    stream        TEXT PRIMARY KEY,
    next_seq      INTEGER NOT NULL,
    dropped       INTEGER NOT NULL DEFAULT 0,
    dropped_first INTEGER,
    dropped_last  INTEGER,
    dropped_why   TEXT
);
CREATE TABLE outbox_totals (
    one   INTEGER PRIMARY KEY CHECK (one = 1),
    rows  INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT INTO outbox_totals VALUES (1, 0, 0);

-- Replies to fleet commands by id, so a repeated id gets the first reply and does nothing
-- twice, across restarts; and the nonces of signed commands, so none is accepted twice.
-- `reply` is NULL from just before a command runs until its reply is stored: an id found
-- that way was interrupted and is never run again. `fingerprint` (SHA-256 of name, target and
-- arguments) keeps an id from answering for a different command.
CREATE TABLE command_replies (
    id          TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    reply       TEXT,
    ts_ms       INTEGER NOT NULL
);
CREATE INDEX command_replies_ts ON command_replies (ts_ms);
CREATE TABLE command_nonces (
    nonce TEXT PRIMARY KEY,
    ts_ms INTEGER NOT NULL
);
CREATE TABLE fleet_sessions (
    one     INTEGER PRIMARY KEY CHECK (one = 1),
    counter INTEGER NOT NULL
);
INSERT INTO fleet_sessions VALUES (1, 0);
"#,
    // 4: over-the-air updates. One row per accepted manifest, moved through its states one
    // transaction at a time; the chunks held so far (written and fsynced before their row);
    // the trusted update keys once a rotation has replaced the configured ones.
    r#"
CREATE TABLE updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    manifest BLOB NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    code TEXT,
    reason TEXT,
    previous TEXT,
    health_until_ms INTEGER,
    health_restarts INTEGER NOT NULL DEFAULT 0,
    health_clean_stop INTEGER NOT NULL DEFAULT 0,
    received_bytes INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX updates_by_model ON updates (model, id);
CREATE TABLE update_chunks (
    update_id INTEGER NOT NULL REFERENCES updates (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    PRIMARY KEY (update_id, idx)
) WITHOUT ROWID;
CREATE TABLE update_trust (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    keys TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    retired TEXT NOT NULL,
    doc BLOB NOT NULL
);
"#,
    // Retention by disk budget needs each row's size without scanning the table, and a
    // running total per table, kept in the transaction that adds or deletes rows.
    r#"
ALTER TABLE results ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE results SET bytes = length(pipeline) + length(source) + length(model) + length(version)
    + ifnull(length(label), 0) + length(top) + 48;
CREATE TABLE captures (
    id       INTEGER PRIMARY KEY,
    ts_ms    INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    source   TEXT NOT NULL,
    kind     TEXT NOT NULL,
    bytes    INTEGER NOT NULL,
    meta     TEXT NOT NULL,
    result   TEXT NOT NULL,
    -- Last: sums over `bytes` then never read the blob's overflow pages.
    data     BLOB NOT NULL
);
CREATE INDEX captures_by_pipeline ON captures (pipeline, ts_ms);
CREATE TABLE data_totals (
    what  TEXT PRIMARY KEY,
    rows  INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT INTO data_totals SELECT 'results', count(*), ifnull(sum(bytes), 0) FROM results;
INSERT INTO data_totals VALUES ('captures', 0, 0);
CREATE TABLE pipeline_stops (
    name  TEXT PRIMARY KEY,
    ts_ms INTEGER NOT NULL
);
"#,
    // Format 2 packages report every output, postprocessed (text, boxes, scores), as JSON by
    // output name; NULL for a format 1 package, whose `top` says it all.
    "ALTER TABLE results ADD COLUMN outputs TEXT;",
    // The plan `engine.plan = "auto"` chose for a package (by its digest), with what every
    // candidate measured, under the fingerprint of what the choice depends on (ternd version,
    // CPU, threads, onnxruntime library): a load on the same fingerprint reuses it, so going
    // back to earlier settings does not time again.
    r#"
CREATE TABLE model_plans (
    sha256      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    plan        TEXT NOT NULL,
    tried       TEXT NOT NULL,
    chosen_at   INTEGER NOT NULL,
    PRIMARY KEY (sha256, fingerprint)
);
"#,
    // Remembered replies are bounded in bytes as well as in count: the size of each (0 while
    // its command runs), readable with the age from one covering index, so eviction never
    // touches the reply text.
    r#"
ALTER TABLE command_replies ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE command_replies SET bytes = length(reply) WHERE reply IS NOT NULL;
CREATE INDEX command_replies_evict ON command_replies (ts_ms, bytes, id);
DROP INDEX command_replies_ts;
"#,
    // Home Assistant discovery topics this box has published retained: one no longer wanted
    // (a pipeline removed, discovery turned off) is cleared, even after a restart.
    "CREATE TABLE ha_discovery (topic TEXT PRIMARY KEY) WITHOUT ROWID;",
    // Drift baselines, one per pipeline and model version (a rollback finds its own again):
    // where each came from (the package's evaluation set, or the version's first results
    // here) and its histogram (JSON).
    r#"
CREATE TABLE drift_baselines (
    pipeline  TEXT NOT NULL,
    model     TEXT NOT NULL,
    version   TEXT NOT NULL,
    source    TEXT NOT NULL,
    histogram TEXT NOT NULL,
    ts_ms     INTEGER NOT NULL,
    PRIMARY KEY (pipeline, model, version)
);
"#,
    // Shadow evaluations: who started each (an update or a command), its spec, its tally
    // (JSON, written every half second while it runs) and its verdict (running until then).
    r#"
CREATE TABLE shadows (
    model      TEXT NOT NULL,
    version    TEXT NOT NULL,
    origin     TEXT NOT NULL,
    spec       TEXT NOT NULL,
    state      TEXT NOT NULL,
    tally      TEXT NOT NULL,
    verdict    TEXT,
    started_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    -- A command's shadow: its verdict was acted on (the candidate activated or failed).
    acted      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, version)
);
"#,
];

/// What retention keeps: results and captures within their budgets, results within an age.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub results_max_age: Option<std::time::Duration>,
    pub results_budget_bytes: u64,
    pub capture_budget_bytes: u64,
}

/// Rows deleted by one round of retention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub results: u64,
    pub captures: u64,
}

/// The retention limits in force (a reload may change them) and the bell writers ring when a
/// table went over its budget.
#[derive(Debug)]
pub struct Keeper {
    limits: std::sync::RwLock<Retention>,
    wake: tokio::sync::Notify,
}

impl Keeper {
    pub fn new(r: Retention) -> std::sync::Arc<Keeper> {
        std::sync::Arc::new(Keeper {
            limits: std::sync::RwLock::new(r),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub fn limits(&self) -> Retention {
        *self.limits.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, r: Retention) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = r;
        self.wake.notify_one();
    }

    /// Account for a row added to `what` (`results` or `captures`) inside the caller's
    /// transaction; true if the table is now over its budget (call [`Keeper::ring`] after
    /// the commit).
    pub fn count_added(
        &self,
        tx: &rusqlite::Transaction<'_>,
        what: &str,
        bytes: i64,
    ) -> rusqlite::Result<bool> {
        let total: i64 = tx.query_row(
            "UPDATE data_totals SET rows = rows + 1, bytes = bytes + ?2 WHERE what = ?1
             RETURNING bytes",
            rusqlite::params![what, bytes],
            |r| r.get(0),
        )?;
        let l = self.limits();
        let budget = if what == "results" {
            l.results_budget_bytes
        } else {
            l.capture_budget_bytes
        };
        Ok(total as u64 > budget)
    }

    pub fn ring(&self) {
        self.wake.notify_one();
    }
}

/// Delete the rows of `table` that `filter` (with `args` bound) picks, and take them off its
/// total: every deletion from `results` and `captures` goes through here.
fn delete_where(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    filter: &str,
    args: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<u64> {
    let (rows, bytes): (i64, i64) = tx.query_row(
        &format!("SELECT count(*), ifnull(sum(bytes), 0) FROM {table} WHERE {filter}"),
        args,
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    tx.execute(&format!("DELETE FROM {table} WHERE {filter}"), args)?;
    tx.execute(
        "UPDATE data_totals SET rows = rows - ?2, bytes = bytes - ?3 WHERE what = ?1",
        rusqlite::params![table, rows, bytes],
    )?;
    Ok(rows as u64)
}

/// Bring `table` within `budget` bytes: past it, the oldest rows go until 90% of it is used,
/// so pruning does not run again for every new row.
fn enforce(tx: &rusqlite::Transaction<'_>, table: &str, budget: u64) -> rusqlite::Result<u64> {
    let bytes: i64 = tx.query_row(
        "SELECT bytes FROM data_totals WHERE what = ?1",
        [table],
        |r| r.get(0),
    )?;
    if bytes as u64 <= budget {
        return Ok(0);
    }
    let to_free = bytes - (budget * 9 / 10) as i64;
    // Walks the oldest rows only as far as needed.
    let last: Option<i64> = tx
        .query_row(
            &format!(
                "SELECT id FROM (SELECT id, sum(bytes) OVER (ORDER BY id) AS run FROM {table})
                 WHERE run >= ?1 LIMIT 1"
            ),
            [to_free],
            |r| r.get(0),
        )
        .optional()?;
    let last = match last {
        Some(id) => id,
        None => tx.query_row(
            &format!("SELECT ifnull(max(id), 0) FROM {table}"),
            [],
            |r| r.get(0),
        )?,
    };
    delete_where(tx, table, "id <= ?1", &[&last])
}

/// One round of retention, in one transaction.
pub fn prune(c: &mut Connection, r: &Retention) -> rusqlite::Result<Pruned> {
    let tx = c.transaction()?;
    let mut pruned = Pruned::default();
    if let Some(age) = r.results_max_age {
        let cutoff = now_ms() - age.as_millis() as i64;
        // By timestamp, not id: a box whose clock was wrong at boot stored young results
        // with old ids, and those must stay.
        pruned.results += delete_where(&tx, "results", "ts_ms < ?1", &[&cutoff])?;
    }
    pruned.results += enforce(&tx, "results", r.results_budget_bytes)?;
    pruned.captures += enforce(&tx, "captures", r.capture_budget_bytes)?;
    tx.commit()?;
    Ok(pruned)
}

/// `capture.clear`: delete captured samples (of one pipeline, taken before a time); how many
/// went.
pub fn clear_captures(
    c: &mut Connection,
    pipeline: Option<&str>,
    before_ms: Option<i64>,
) -> rusqlite::Result<u64> {
    let tx = c.transaction()?;
    let before = before_ms.unwrap_or(i64::MAX);
    let n = delete_where(
        &tx,
        "captures",
        "(?1 IS NULL OR pipeline = ?1) AND ts_ms < ?2",
        &[&pipeline, &before],
    )?;
    tx.commit()?;
    Ok(n)
}

/// Bytes and rows now counted for `what`.
pub fn totals(c: &Connection, what: &str) -> rusqlite::Result<(i64, i64)> {
    c.query_row(
        "SELECT rows, bytes FROM data_totals WHERE what = ?1",
        [what],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Run retention now and then, and whenever a writer says it added data.
pub async fn retention_task(
    store: Store,
    keeper: std::sync::Arc<Keeper>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let round = keeper.limits();
        match store.call(move |c| Ok(prune(c, &round)?)).await {
            Ok(p) if p != Pruned::default() => {
                tracing::info!(
                    results = p.results,
                    captures = p.captures,
                    "retention deleted old rows"
                )
            }
            Ok(_) => {}
            Err(StoreError::Stopped) => return,
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = keeper.wake.notified() => {}
            _ = tokio::time::sleep(RETENTION_EVERY) => {}
        }
    }
}

/// How often retention runs when no writer wakes it (age limits need the clock, not writes).
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Handle to the database thread; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Job>,
}

impl Store {
    /// Open (creating if needed) the database, check its integrity, migrate it, and start its
    /// thread. Blocking: call before the runtime serves requests or from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        // WAL: readers never block the writer and a crash never leaves a half-written page.
        // synchronous=FULL: a committed transaction survives power loss, which is what
        // "acknowledged" means here. Each commit costs an fsync (a few ms on flash).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let check: Vec<String> = {
            let mut stmt = conn.prepare("PRAGMA integrity_check").map_err(open_err)?;
            stmt.query_map([], |r| r.get(0))
                .map_err(open_err)?
                .collect::<Result<_, _>>()
                .map_err(open_err)?
        };
        if check != ["ok"] {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: check.join("; "),
            });
        }
        migrate(&mut conn, path)?;
        let (tx, mut rx) = mpsc::channel::<Job>(256);
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut conn);
                }
            })
            .expect("spawning the store thread");
        Ok(Store { tx })
    }

    /// Run `f` on the database thread and return its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(f(conn));
        });
        self.tx.send(job).await.map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: current,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Bytes free for unprivileged use on the file system holding `path` (the state directory's
/// disk, which updates and retention budget against).
pub fn disk_free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Age goes by timestamp (a young result with an old id stays), the budget by id (oldest
    /// first, down to 90%), and the running totals always equal the rows.
    #[test]
    fn retention_prunes_by_age_and_budget_and_keeps_totals_true() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Connection::open(d.path().join("t.db")).unwrap();
        migrate(&mut c, &d.path().join("t.db")).unwrap();
        let keeper = Keeper::new(Retention {
            results_max_age: Some(std::time::Duration::from_secs(3600)),
            results_budget_bytes: 1000,
            capture_budget_bytes: 1 << 20,
        });
        let now = now_ms();
        let add = |c: &mut Connection, ts: i64| {
            let tx = c.transaction().unwrap();
            tx.execute(
                "INSERT INTO results (ts_ms, pipeline, source, model, version, top, latency_us, bytes)
                 VALUES (?1, 'p', 's', 'm', '1', '[]', 1, 100)",
                [ts],
            )
            .unwrap();
            let over = keeper.count_added(&tx, "results", 100).unwrap();
            tx.commit().unwrap();
            over
        };
        // Ids 1-3 written when the clock said now; id 4 when it was a day behind.
        for _ in 0..3 {
            assert!(!add(&mut c, now));
        }
        assert!(!add(&mut c, now - 86_400_000));
        let p = prune(&mut c, &keeper.limits()).unwrap();
        assert_eq!(p.results, 1);
        let ids: Vec<i64> = c
            .prepare("SELECT id FROM results ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(totals(&c, "results").unwrap(), (3, 300));
        // Over budget: the oldest go until 90% of it is left.
        let mut over = false;
        for _ in 0..8 {
            over |= add(&mut c, now);
        }
        assert!(over, "11 rows of 100 bytes are over a 1000-byte budget");
        let p = prune(&mut c, &keeper.limits()).unwrap();
        assert_eq!(p.results, 2);
        let (rows, bytes): (i64, i64) = c
            .query_row("SELECT count(*), sum(bytes) FROM results", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((rows, bytes), (9, 900));
        assert_eq!(totals(&c, "results").unwrap(), (9, 900));
        let first: i64 = c
            .query_row("SELECT min(id) FROM results", [], |r| r.get(0))
            .unwrap();
        assert_eq!(first, 3);
        assert_eq!(prune(&mut c, &keeper.limits()).unwrap(), Pruned::default());
    }

    #[tokio::test]
    async fn migrates_once_and_refuses_newer_and_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.db");
        let s = Store::open(&p).unwrap();
        let v: i64 = s
            .call(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        drop(s);
        // Reopening applies nothing twice (CREATE TABLE would fail).
        let s = Store::open(&p).unwrap();
        s.call(|c| Ok(c.pragma_update(None, "user_version", 99)?))
            .await
            .unwrap();
        drop(s);
        assert!(matches!(
            Store::open(&p),
            Err(StoreError::TooNew { found: 99, .. })
        ));

        let junk = d.path().join("junk.db");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let e = Store::open(&junk).err().expect("junk must not open");
        assert!(
            matches!(e, StoreError::Open { .. } | StoreError::Corrupt { .. }),
            "{e}"
        );
    }
}
