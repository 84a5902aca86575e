//! The one SQLite database: schema migrations and the single writer thread.
//!
//! Every access goes through [`Store::call`], which runs a closure on the store's own thread
//! with the one connection. That gives one writer without locks in callers, keeps blocking
//! I/O off the async runtime, and makes "one transaction per state change" a matter of one
//! closure per state change. The store knows tables, not what they mean: `registry`, the feeds
//! and the pipelines own their rows.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
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
];

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

#[cfg(test)]
mod tests {
    use super::*;

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
