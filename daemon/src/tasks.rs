//! Every long-running task of the daemon, by name, and what happens when one ends before the
//! daemon stops.
//!
//! The rule: a task that owns state nobody else can rebuild (the registry's pools, the MQTT
//! session, the command queue, the service loop) is [`Policy::Fatal`]: it ending early is a
//! bug, so the daemon stops and exits non-zero, and systemd starts it afresh from the
//! database. A task that only works on state kept elsewhere (presence, telemetry, the
//! outbox drain, retention, the watchdog, D-Bus signals, the updater, which resumes from the
//! database) is [`Policy::Restart`]: it is logged with its name and started again after a
//! back-off (1 s doubling to 30 s, back to 1 s after a run of 30 s or more). A pipeline's
//! tasks are [`Policy::Report`]: the service stops that pipeline and says why in its state
//! and the status, and the rest of the box runs on (a feed's own failures, a camera that
//! dies, are restarted inside the feed; a task that ends is a bug that a restart loop would
//! only hide). `pipelines.start` or a reload starts it again.
//!
//! At a stop every task is given one deadline; the ones still running at it are aborted and
//! named. A restart waiting out its back-off when the stop comes does not start.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio::time::Instant;

/// What to do when a task ends before the daemon stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Log it and start it again after a back-off.
    Restart,
    /// Stop the daemon with a non-zero exit.
    Fatal,
    /// Tell the caller of [`Tasks::failed`], which decides.
    Report,
}

type Run = Pin<Box<dyn Future<Output = ()> + Send>>;
type Make = Box<dyn Fn() -> Run + Send>;

struct Entry {
    name: String,
    policy: Policy,
    /// How to start a fresh run (restartable tasks only).
    make: Option<Make>,
    started: Instant,
    /// The delay before the next restart.
    delay: Duration,
    abort: AbortHandle,
}

const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A task that ran this long before ending was healthy: its back-off starts over.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// A fatal or reported task ended early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task `{name}` {why}")]
pub struct Failed {
    pub name: String,
    pub why: String,
    pub policy: Policy,
    /// Which run of that name (a name may be taken again by a new run).
    pub id: Id,
}

/// The daemon's tasks.
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<()>,
    entries: HashMap<Id, Entry>,
    stopping: bool,
    /// Failures seen while joining others, for the next `failed`.
    queued: Vec<Failed>,
    /// Cancelled when the daemon stops: a restart waiting out its back-off does not start.
    stop: tokio_util::sync::CancellationToken,
}

impl Tasks {
    /// A task that must run until the daemon stops; its ending early stops the daemon.
    pub fn fatal(
        &mut self,
        name: impl Into<String>,
        run: impl Future<Output = ()> + Send + 'static,
    ) {
        let abort = self.set.spawn(run);
        self.insert(name.into(), Policy::Fatal, None, abort, RESTART_MIN);
    }

    /// A task whose ending early is reported to the caller of [`Tasks::failed`]; its id says
    /// which run it was.
    pub fn report(
        &mut self,
        name: impl Into<String>,
        run: impl Future<Output = ()> + Send + 'static,
    ) -> Id {
        let abort = self.set.spawn(run);
        let id = abort.id();
        self.insert(name.into(), Policy::Report, None, abort, RESTART_MIN);
        id
    }

    /// A task started again (a fresh run from `make`) whenever it ends early.
    pub fn restart<F>(&mut self, name: impl Into<String>, make: impl Fn() -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let make: Make = Box::new(move || Box::pin(make()));
        let abort = self.set.spawn(make());
        self.insert(name.into(), Policy::Restart, Some(make), abort, RESTART_MIN);
    }

    fn insert(
        &mut self,
        name: String,
        policy: Policy,
        make: Option<Make>,
        abort: AbortHandle,
        delay: Duration,
    ) {
        self.entries.insert(
            abort.id(),
            Entry {
                name,
                policy,
                make,
                started: Instant::now(),
                delay,
                abort,
            },
        );
    }

    /// Names of the tasks running now.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.values().map(|e| e.name.clone()).collect();
        v.sort();
        v
    }

    /// Wait until a fatal or reported task ends early; restartable ones that end meanwhile
    /// are started again. Pending forever when no task is left.
    pub async fn failed(&mut self) -> Failed {
        if let Some(f) = self.queued.pop() {
            return f;
        }
        loop {
            let Some(ended) = self.set.join_next_with_id().await else {
                return std::future::pending().await;
            };
            if let Some(f) = self.ended(ended) {
                return f;
            }
        }
    }

    /// A task ended: restart it, or say it failed, as its policy says.
    fn ended(&mut self, ended: Result<(Id, ()), JoinError>) -> Option<Failed> {
        let (id, why) = match ended {
            Ok((id, ())) => (id, "ended".to_string()),
            Err(e) => (e.id(), describe(e)),
        };
        let entry = self.entries.remove(&id)?;
        if self.stopping {
            return None;
        }
        match (entry.policy, entry.make) {
            (Policy::Restart, Some(make)) => {
                let delay = if entry.started.elapsed() > HEALTHY_RUN {
                    RESTART_MIN
                } else {
                    entry.delay
                };
                tracing::error!(task = %entry.name, %why, restart_in = ?delay, "task ended; restarting it");
                let run = make();
                let stop = self.stop.clone();
                let abort = self.set.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(delay) => run.await,
                    }
                });
                let next = (delay * 2).min(RESTART_MAX);
                let id = abort.id();
                self.insert(entry.name, Policy::Restart, Some(make), abort, next);
                // Its run starts after the back-off: a crash right after is no healthy run.
                if let Some(e) = self.entries.get_mut(&id) {
                    e.started += delay;
                }
                None
            }
            (policy, _) => {
                if policy == Policy::Fatal {
                    tracing::error!(task = %entry.name, %why, "task ended; the daemon stops");
                }
                Some(Failed {
                    name: entry.name,
                    why,
                    policy,
                    id,
                })
            }
        }
    }

    /// From now on a task that ends is done, not failed, and no restart starts.
    pub fn stopping(&mut self) {
        self.stopping = true;
        self.stop.cancel();
    }

    /// Wait until `deadline` for the tasks named in `names` to end (they were told to);
    /// abort the rest. Returns the names of those that overran.
    pub async fn join(&mut self, names: &[&str], deadline: Instant) -> Vec<String> {
        self.join_where(|e| names.contains(&e.name.as_str()), deadline)
            .await
    }

    /// [`Tasks::join`] by the ids [`Tasks::report`] gave.
    pub async fn join_ids(&mut self, ids: &[Id], deadline: Instant) -> Vec<String> {
        self.join_where(|e| ids.contains(&e.abort.id()), deadline)
            .await
    }

    /// [`Tasks::join`] for every task left: the end of a stop.
    pub async fn join_all(&mut self, deadline: Instant) -> Vec<String> {
        self.stopping();
        self.join_where(|_| true, deadline).await
    }

    async fn join_where(
        &mut self,
        wanted: impl Fn(&Entry) -> bool,
        deadline: Instant,
    ) -> Vec<String> {
        while self.entries.values().any(&wanted) {
            let ended = match tokio::time::timeout_at(deadline, self.set.join_next_with_id()).await
            {
                Ok(Some(ended)) => ended,
                Ok(None) | Err(_) => break,
            };
            let id = match &ended {
                Ok((id, ())) => *id,
                Err(e) => e.id(),
            };
            if !self.entries.get(&id).is_some_and(&wanted) {
                // Another task ended meanwhile: it is handled as `failed` would.
                if let Some(f) = self.ended(ended) {
                    self.queued.push(f);
                }
                continue;
            }
            let entry = self.entries.remove(&id).expect("checked");
            if let Err(e) = ended
                && !e.is_cancelled()
            {
                tracing::error!(task = %entry.name, why = %describe(e), "task failed while stopping");
            }
        }
        let mut overran = Vec::new();
        self.entries.retain(|_, e| {
            if wanted(e) {
                e.abort.abort();
                tracing::error!(task = %e.name, "did not stop by the deadline; aborted");
                overran.push(e.name.clone());
                false
            } else {
                true
            }
        });
        overran.sort();
        overran
    }
}

fn describe(e: JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => crate::engine::panic_message(&*p),
        Err(e) if e.is_cancelled() => "was cancelled".into(),
        Err(_) => "failed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_restartable_task_comes_back_and_a_fatal_one_is_named() {
        let mut t = Tasks::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let third = Arc::new(tokio::sync::Notify::new());
        let (r, n) = (runs.clone(), third.clone());
        t.restart("flaky", move || {
            let (r, n) = (r.clone(), n.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
                n.notify_one();
                std::future::pending::<()>().await
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.fatal("owner", async move {
            let _ = rx.await;
        });
        // The flaky one fails twice and is restarted each time (after 1 s, then 2 s); the
        // owner is untouched.
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::select! {
                f = t.failed() => panic!("{f}"),
                _ = third.notified() => {}
            }
        })
        .await
        .expect("the third run within the deadline");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(t.names(), ["flaky", "owner"]);
        drop(tx);
        let f = t.failed().await;
        assert_eq!((f.name.as_str(), f.policy), ("owner", Policy::Fatal));
        assert_eq!(f.why, "ended");
        let overran = t
            .join_all(Instant::now() + Duration::from_millis(200))
            .await;
        assert_eq!(
            overran,
            ["flaky"],
            "the pending one is aborted at the deadline"
        );
        assert!(t.names().is_empty());
    }

    #[tokio::test]
    async fn a_panic_is_described() {
        let mut t = Tasks::default();
        t.fatal("p", async { panic!("the reason") });
        let f = t.failed().await;
        assert_eq!(f.why, "panicked: the reason");
    }
}
