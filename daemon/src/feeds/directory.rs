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

use super::Sample;
use crate::config::OnDone;
use crate::engine::Input;
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
    pub name: String,
    pub size: i64,
    pub mtime_ns: i64,
    pub path: PathBuf,
    pub on_done: OnDone,
}

impl FileDone {
    /// Record the file as done; call inside the transaction that stores its result.
    pub fn record(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO feed_files (feed, name, size, mtime_ns) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (feed, name) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns",
            rusqlite::params![self.pipeline, self.name, self.size, self.mtime_ns],
        )?;
        Ok(())
    }

    /// After the commit: delete the file if the feed is configured to.
    pub fn finish(&self) {
        if self.on_done == OnDone::Delete
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not delete a done file");
        }
    }
}

impl DirectoryFeed {
    /// Watch the directory until `cancel`, sending samples to `tx` (waiting when it is full:
    /// files can wait, nothing is dropped). Ends when cancelled or when the receiver is gone.
    pub async fn run(
        self,
        store: Store,
        tx: mpsc::Sender<Sample>,
        cancel: CancellationToken,
    ) -> Result<(), FeedError> {
        let (ev_tx, mut ev_rx) = mpsc::channel::<PathBuf>(1024);
        let rescan = Arc::new(Notify::new());
        let overflowed = Arc::new(AtomicBool::new(false));
        let mut watcher = {
            let rescan = rescan.clone();
            let overflowed = overflowed.clone();
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let lost = match res {
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
        loop {
            while let Some(path) = queue.pop() {
                if !self.offer(&path, &mut seen, &tx, &cancel).await {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                Some(path) = ev_rx.recv() => queue.push(path),
                _ = rescan.notified() => {
                    if overflowed.swap(false, Ordering::Relaxed) {
                        tracing::warn!(path = %self.path.display(), "file events were lost; rescanning");
                    }
                    queue = self.scan()?;
                }
            }
        }
    }

    async fn load_seen(&self, store: &Store) -> Result<HashMap<String, (i64, i64)>, FeedError> {
        let pipeline = self.pipeline.clone();
        Ok(store
            .call(move |c| {
                let mut stmt =
                    c.prepare("SELECT name, size, mtime_ns FROM feed_files WHERE feed = ?1")?;
                let rows = stmt
                    .query_map([pipeline], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
                    .collect::<Result<HashMap<_, _>, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// Candidate files, returned so that `pop` yields them in name order.
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
    async fn offer(
        &self,
        path: &Path,
        seen: &mut HashMap<String, (i64, i64)>,
        tx: &mpsc::Sender<Sample>,
        cancel: &CancellationToken,
    ) -> bool {
        if !self.wanted(path) {
            return true;
        }
        let Ok(meta) = std::fs::metadata(path) else {
            return true;
        };
        if !meta.is_file() {
            return true;
        }
        let name = path
            .file_name()
            .expect("a file has a name")
            .to_string_lossy()
            .to_string();
        let size = meta.len() as i64;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        if seen.get(&name) == Some(&(size, mtime_ns)) {
            return true;
        }
        seen.insert(name.clone(), (size, mtime_ns));
        let ts_ms = now_ms();
        // Reading a file of up to max_file_bytes from flash can take a while: not on the runtime.
        let input = {
            let (path, max) = (path.to_path_buf(), self.max_file_bytes);
            tokio::task::spawn_blocking(move || Input::from_file(&path, max))
                .await
                .expect("file read task panicked")
        };
        let sample = Sample {
            source: name.clone(),
            ts_ms,
            input,
            done: Some(FileDone {
                pipeline: self.pipeline.clone(),
                name,
                size,
                mtime_ns,
                path: path.to_path_buf(),
                on_done: self.on_done,
            }),
        };
        tokio::select! {
            _ = cancel.cancelled() => false,
            sent = tx.send(sample) => sent.is_ok(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("watching {path}: {message}")]
    Watch { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}
