//! A watched directory: files present at start, then every file closed after writing or moved
//! in. Each file is one sample.
//!
//! A file counts as done once its result is committed together with a `feed_files` row (by
//! the pipeline, in one transaction), so after a restart or a crash exactly the files without
//! a committed result are read again. The kernel's event queue can overflow; then, and on any
//! watcher error, the directory is rescanned, which is always safe because done files are
//! skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::UNIX_EPOCH;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::queue::Sender;
use super::{Data, Sample};
use crate::config::OnDone;
use crate::engine::{EngineError, Input};
use crate::store::{Store, StoreError, now_ms};

#[derive(Debug, Clone)]
pub struct DirectoryFeed {
    /// The pipeline this instance feeds; done files are remembered per pipeline.
    pub pipeline: String,
    pub path: PathBuf,
    pub extensions: Vec<String>,
    pub max_file_bytes: u64,
    pub on_done: OnDone,
}

/// What the pipeline records (and does) once a file's result is committed.
#[derive(Debug, Clone)]
pub struct FileDone {
    pub pipeline: String,
    /// Attempts recorded before this one (0 for a new or changed file).
    pub attempts: i64,
    pub name: String,
    pub size: i64,
    pub mtime_ns: i64,
    pub path: PathBuf,
    pub on_done: OnDone,
}

/// How a file's processing ended, as recorded in `feed_files.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A result was stored.
    Result,
    /// The file is not a usable input (or kept failing the engine); it stays on disk.
    Refused,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Result => "result",
            Outcome::Refused => "refused",
        }
    }
}

impl FileDone {
    /// Count an attempt, durably, just before the engine starts on the file; only the file
    /// actually inside the engine is counted, not those queued behind it.
    pub fn begin(&self, c: &rusqlite::Connection) -> rusqlite::Result<()> {
        c.execute(
            "INSERT INTO feed_files (feed, name, size, mtime_ns, attempts, outcome)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending')
             ON CONFLICT (feed, name) DO UPDATE SET size = excluded.size,
                 mtime_ns = excluded.mtime_ns, attempts = excluded.attempts, outcome = 'pending'",
            rusqlite::params![
                self.pipeline,
                self.name,
                self.size,
                self.mtime_ns,
                self.attempts + 1
            ],
        )?;
        Ok(())
    }

    /// Record how the file ended; call inside the transaction that stores its result.
    pub fn record(&self, tx: &rusqlite::Transaction<'_>, outcome: Outcome) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO feed_files (feed, name, size, mtime_ns, attempts, outcome) VALUES (?1, ?2, ?3, ?4, 1, ?5)
             ON CONFLICT (feed, name) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,
                 outcome = excluded.outcome",
            rusqlite::params![self.pipeline, self.name, self.size, self.mtime_ns, outcome.as_str()],
        )?;
        Ok(())
    }

    /// After the commit of a result: delete the file if the feed is configured to.
    pub fn finish(&self) {
        if self.on_done == OnDone::Delete
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not delete a done file");
        }
    }
}

/// What is known about a file the feed has seen: its row in the database, or `Offered` once
/// this run has handed it to the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: i64,
    mtime_ns: i64,
    attempts: i64,
    state: FileState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    /// The engine started on it in an earlier run and never finished.
    Pending,
    Done(Outcome),
    /// Handed to the pipeline in this run (kept in memory only).
    Offered,
}

/// Tries at a file that never finished (the daemon died or hung on it) before it is refused:
/// enough that a power cut during a file does not cost it, few enough that a file that kills
/// the engine does not keep the box in a restart loop.
const MAX_ATTEMPTS: i64 = 3;
/// How often the directory is rescanned for files whose events were missed or that could
/// not be read before.
const RESCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// A failed watch (directory removed, watch limit reached) is retried with back-off; only
/// cancellation or a closed pipeline ends the feed.
impl super::Source for DirectoryFeed {
    async fn once(&self, ctx: &super::FeedCtx, tx: &Sender) -> super::Ended {
        ctx.running();
        match self
            .clone()
            .run(ctx.store.clone(), tx.clone(), ctx.cancel.clone())
            .await
        {
            Ok(()) => super::Ended::Stop,
            Err(e) => super::Ended::Failed(e.to_string()),
        }
    }
}

impl DirectoryFeed {
    /// Watch the directory until `cancel`, sending samples to `tx` (waiting when it is full:
    /// files can wait, nothing is dropped). Ends when cancelled or when the receiver is gone.
    pub async fn run(
        self,
        store: Store,
        tx: Sender,
        cancel: CancellationToken,
    ) -> Result<(), FeedError> {
        let (ev_tx, mut ev_rx) = mpsc::channel::<PathBuf>(1024);
        let rescan = Arc::new(Notify::new());
        let overflowed = Arc::new(AtomicBool::new(false));
        let mut watcher = {
            let rescan = rescan.clone();
            let overflowed = overflowed.clone();
            let watched = self.path.clone();
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let lost = match res {
                    // The directory itself was removed or moved: the rescan finds it gone and
                    // the feed fails into its retry loop instead of going silent. Not when it
                    // was merely opened or read: every scan opens it, and rescanning on that
                    // kept an idle feed scanning in a loop (2% of a core per idle box).
                    Ok(ev)
                        if ev.paths.contains(&watched)
                            && !matches!(ev.kind, EventKind::Access(_)) =>
                    {
                        rescan.notify_one();
                        false
                    }
                    Ok(ev) => {
                        let wanted = matches!(
                            ev.kind,
                            EventKind::Access(AccessKind::Close(AccessMode::Write))
                                | EventKind::Modify(ModifyKind::Name(
                                    RenameMode::To | RenameMode::Both
                                ))
                        );
                        ev.need_rescan()
                            || (wanted && ev.paths.into_iter().any(|p| ev_tx.try_send(p).is_err()))
                    }
                    Err(_) => true,
                };
                if lost {
                    overflowed.store(true, Ordering::Relaxed);
                    rescan.notify_one();
                }
            })
            .map_err(|e| FeedError::Watch {
                path: self.path.clone(),
                message: e.to_string(),
            })?
        };
        // Watch before the first scan so a file written during the scan is not missed.
        watcher
            .watch(&self.path, RecursiveMode::NonRecursive)
            .map_err(|e| FeedError::Watch {
                path: self.path.clone(),
                message: e.to_string(),
            })?;

        let mut seen = self.load_seen(&store).await?;
        let mut queue = self.scan()?;
        self.forget_gone(&queue, &mut seen, &store).await?;
        let mut periodic =
            tokio::time::interval_at(tokio::time::Instant::now() + RESCAN_EVERY, RESCAN_EVERY);
        periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while let Some(path) = queue.pop() {
                if !self.offer(&path, &store, &mut seen, &tx, &cancel).await {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                Some(path) = ev_rx.recv() => queue.push(path),
                _ = periodic.tick() => {
                    queue = self.scan()?;
                    self.forget_gone(&queue, &mut seen, &store).await?;
                }
                _ = rescan.notified() => {
                    if overflowed.swap(false, Ordering::Relaxed) {
                        tracing::warn!(path = %self.path.display(), "file events were lost; rescanning");
                    }
                    queue = self.scan()?;
                }
            }
        }
    }

    async fn load_seen(&self, store: &Store) -> Result<HashMap<String, Seen>, FeedError> {
        let pipeline = self.pipeline.clone();
        Ok(store
            .call(move |c| {
                let mut stmt = c.prepare(
                    "SELECT name, size, mtime_ns, attempts, outcome FROM feed_files WHERE feed = ?1",
                )?;
                let rows = stmt
                    .query_map([pipeline], |r| {
                        let state = match r.get::<_, String>(4)?.as_str() {
                            "pending" => FileState::Pending,
                            "refused" => FileState::Done(Outcome::Refused),
                            _ => FileState::Done(Outcome::Result),
                        };
                        Ok((
                            r.get(0)?,
                            Seen { size: r.get(1)?, mtime_ns: r.get(2)?, attempts: r.get(3)?, state },
                        ))
                    })?
                    .collect::<Result<HashMap<_, _>, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// Forget files no longer in the directory (`listing`, a full scan): their rows would
    /// otherwise pile up for as long as files come and go. One still with the pipeline in
    /// this run is kept; its result's commit writes its row again anyway.
    async fn forget_gone(
        &self,
        listing: &[PathBuf],
        seen: &mut HashMap<String, Seen>,
        store: &Store,
    ) -> Result<(), FeedError> {
        // Names as `offer` keys them.
        let present: std::collections::HashSet<String> = listing
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .collect();
        let gone: Vec<String> = seen
            .iter()
            .filter(|(name, s)| s.state != FileState::Offered && !present.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        for name in &gone {
            seen.remove(name);
        }
        let pipeline = self.pipeline.clone();
        let n = gone.len();
        store
            .call(move |c| {
                let tx = c.transaction()?;
                {
                    let mut del =
                        tx.prepare("DELETE FROM feed_files WHERE feed = ?1 AND name = ?2")?;
                    for name in &gone {
                        del.execute(rusqlite::params![pipeline, name])?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        tracing::debug!(pipeline = %self.pipeline, files = n, "forgot files no longer in the folder");
        Ok(())
    }

    /// Candidate files, returned so that `pop` yields them in name order. Fails if the
    /// directory is gone.
    fn scan(&self) -> Result<Vec<PathBuf>, FeedError> {
        let read = std::fs::read_dir(&self.path).map_err(|e| FeedError::Watch {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let mut files: Vec<PathBuf> = read.flatten().map(|e| e.path()).collect();
        files.sort();
        files.reverse();
        Ok(files)
    }

    fn wanted(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        // Dot-files are how writers stage a file before renaming it into place.
        !name.is_empty() && !name.starts_with('.') && self.extensions.contains(&ext)
    }

    /// Send one file if it is new or changed. False when the feed should stop.
    fn done(&self, name: &str, size: i64, mtime_ns: i64, path: &Path) -> FileDone {
        FileDone {
            pipeline: self.pipeline.clone(),
            attempts: 0,
            name: name.to_string(),
            size,
            mtime_ns,
            path: path.to_path_buf(),
            on_done: self.on_done,
        }
    }

    async fn offer(
        &self,
        path: &Path,
        store: &Store,
        seen: &mut HashMap<String, Seen>,
        tx: &Sender,
        cancel: &CancellationToken,
    ) -> bool {
        if !self.wanted(path) {
            return true;
        }
        let Some((size, mtime_ns)) = stamp(path) else {
            return true;
        };
        let name = path
            .file_name()
            .expect("a file has a name")
            .to_string_lossy()
            .to_string();
        let known = seen
            .get(&name)
            .copied()
            .filter(|k| k.size == size && k.mtime_ns == mtime_ns);
        let attempts = match known {
            Some(k) if k.state == FileState::Done(Outcome::Result) => {
                // A crash between the commit and the delete left it behind: finish the job.
                if self.on_done == OnDone::Delete {
                    self.done(&name, size, mtime_ns, path).finish();
                }
                return true;
            }
            // Refused for good, or already handed to the engine in this run.
            Some(k)
                if matches!(
                    k.state,
                    FileState::Done(Outcome::Refused) | FileState::Offered
                ) =>
            {
                return true;
            }
            // Pending from an earlier run that never finished it.
            Some(k) if k.attempts >= MAX_ATTEMPTS => {
                tracing::error!(pipeline = %self.pipeline, file = %name, attempts = k.attempts,
                    "the engine never finished this file; refusing it (it stays on disk)");
                let done = self.done(&name, size, mtime_ns, path);
                let stored = store
                    .call(move |c| {
                        let tx = c.transaction()?;
                        done.record(&tx, Outcome::Refused)?;
                        tx.commit()?;
                        Ok(())
                    })
                    .await;
                if let Err(e) = stored {
                    tracing::error!(pipeline = %self.pipeline, error = %e, "could not record a refused file");
                }
                seen.insert(
                    name,
                    Seen {
                        state: FileState::Done(Outcome::Refused),
                        ..k
                    },
                );
                return true;
            }
            Some(k) => k.attempts,
            None => 0,
        };
        let before = seen.insert(
            name.clone(),
            Seen {
                size,
                mtime_ns,
                attempts,
                state: FileState::Offered,
            },
        );
        // Not offered after all: what was known of the file (its attempts) stays known.
        let forget = |seen: &mut HashMap<String, Seen>| match before {
            Some(b) => seen.insert(name.clone(), b),
            None => seen.remove(&name),
        };
        let ts_ms = now_ms();
        // Reading a file of up to max_file_bytes from flash can take a while: not on the runtime.
        let input = {
            let (path, max) = (path.to_path_buf(), self.max_file_bytes);
            tokio::task::spawn_blocking(move || Input::from_file(&path, max))
                .await
                .expect("file read task panicked")
        };
        // A scan can find a file its writer has not finished: if it changed while it was read,
        // what was read may be half of it. Its writer's close (or the next scan) offers it again.
        if stamp(path) != Some((size, mtime_ns)) {
            tracing::debug!(pipeline = %self.pipeline, file = %name, "file changed while read; waiting for its writer");
            forget(seen);
            return true;
        }
        if let Err(e @ EngineError::Unreadable { .. }) = &input {
            // Not the content's fault (permissions, a file replaced mid-read): try again at the
            // next event or rescan rather than refusing it.
            tracing::warn!(pipeline = %self.pipeline, error = %e, "file not readable yet");
            forget(seen);
            return true;
        }
        let sample = Sample {
            source: name.clone(),
            ts_ms,
            taken: std::time::Instant::now(),
            data: Data::Input(input),
            done: Some(FileDone {
                attempts,
                ..self.done(&name, size, mtime_ns, path)
            }),
        };
        tokio::select! {
            _ = cancel.cancelled() => false,
            sent = tx.send(sample) => sent.is_ok(),
        }
    }
}

/// A regular file's size and modification time (ns), which say whether it changed.
fn stamp(path: &Path) -> Option<(i64, i64)> {
    let meta = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    Some((meta.len() as i64, mtime_ns))
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("watching {path}: {message}")]
    Watch { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}
