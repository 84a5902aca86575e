//! Startup, reload, watchdog and graceful shutdown: the daemon as a systemd service.
//!
//! ```text
//!  config ─► store ─► registry (active versions, then configured packages) ─► pipelines
//!                                                                  │
//!                                              READY=1 ◄───────────┘
//!  SIGHUP  ─► load + validate config ─► same apply path as startup (bad config: keep old)
//!  SIGTERM ─► STOPPING=1 ─► stop feeds ─► pipelines drain ─► exit 0 (or name what hung)
//!  timer   ─► WATCHDOG=1, only while no inference has hung
//! ```
//!
//! Start and reload share [`Daemon::apply`], so a config that starts is a config that reloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::control::{CmdError, Code, Control, DaemonState, PipelineInfo, ServiceRequest};
use crate::engine::ModelPool;
use crate::fleet;
use crate::outbox::Outbox;
use crate::pipeline;
use crate::registry::{self, Registry};
use crate::store::{Keeper, Store};
use crate::update;

/// How long SIGTERM waits for pipelines to drain before giving up on them.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

pub use crate::control::LogReload;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{path} is locked: another ternd runs on this state directory ({source})")]
    Locked {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("shutdown deadline passed with tasks still running: {0}")]
    Hung(String),
}

impl ServiceError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ServiceError::Config(_) => config::EXIT_CONFIG,
            _ => 1,
        }
    }
}

struct Daemon {
    config: Config,
    store: Store,
    registry: Arc<Mutex<Registry>>,
    /// Every configured pipeline, running or not, in config order.
    pipelines: Vec<Slot>,
    keeper: Arc<Keeper>,
    /// What the last start or reload could not do; the status says "degraded" with these.
    problems: Vec<String>,
    pools_tx: watch::Sender<Vec<ModelPool>>,
    cancel: CancellationToken,
    outbox: Option<Outbox>,
    control: Control,
}

/// A configured pipeline: its counters and state, and its tasks while it runs.
struct Slot {
    config: config::PipelineConfig,
    stats: Arc<pipeline::PipelineStats>,
    run: Option<pipeline::Running>,
}

/// Run the daemon until SIGTERM or SIGINT.
pub async fn run(
    config_path: &Path,
    config: Config,
    log_reload: LogReload,
) -> Result<(), ServiceError> {
    let mut hup = signal(SignalKind::hangup()).map_err(ServiceError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(ServiceError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServiceError::Signals)?;

    status("opening the store");
    std::fs::create_dir_all(&config.state_dir).map_err(|source| ServiceError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let _lock = lock_state_dir(&config.state_dir)?;
    registry::clean_temp(&config.state_dir);
    let db = config.state_dir.join("tern.db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .expect("store open panicked")?;

    status("loading models");
    let mut reg = Registry::new(store.clone(), &config.state_dir);
    for e in reg.start(&config.pools()).await {
        tracing::error!(error = %e, "at start");
    }
    let (pools_tx, pools_rx) = watch::channel(Vec::new());
    let cancel = CancellationToken::new();
    let outbox = Outbox::for_config(&config);
    let registry = Arc::new(Mutex::new(reg));
    let (reload_tx, mut reload_rx) = mpsc::channel::<ServiceRequest>(4);
    let keeper = Keeper::new(config.store.into());
    let retention = tokio::spawn(crate::store::retention_task(
        store.clone(),
        keeper.clone(),
        cancel.clone(),
    ));
    let control = Control::new(
        registry.clone(),
        store.clone(),
        outbox.clone(),
        DaemonState {
            config: config.clone(),
            pipelines: Vec::new(),
            summary: "starting".into(),
        },
        reload_tx,
        log_reload,
    );
    let mut daemon = Daemon {
        config: config.clone(),
        store,
        registry,
        pipelines: Vec::new(),
        keeper,
        problems: Vec::new(),
        pools_tx,
        cancel: cancel.clone(),
        outbox: outbox.clone(),
        control: control.clone(),
    };
    daemon.apply(config.clone()).await;
    let summary = daemon.summary();
    daemon.publish_state(&summary);

    let updater = if config.updates.enabled() {
        let (u, task) = update::spawn(
            update::Deps::new(
                &config,
                daemon.store.clone(),
                daemon.registry.clone(),
                outbox.clone(),
                Some(control.clone()),
            ),
            cancel.child_token(),
        );
        Some((u, task))
    } else {
        None
    };
    let fleet = match (&config.fleet, outbox) {
        (Some(f), Some(ob)) => match fleet::spawn(
            f,
            control.clone(),
            ob,
            updater.as_ref().map(|(u, _)| u.clone()),
        ) {
            Ok(fl) => Some(fl),
            Err(e) => {
                // check-config builds the same TLS setup, so this is a file changed since.
                tracing::error!(error = %e, "fleet link not started");
                None
            }
        },
        _ => None,
    };
    // The local API. A box without the bus (a container, a developer's laptop) runs on
    // without it: say so once.
    let _dbus = match &config.dbus {
        Some(bus) => {
            match crate::local::serve(bus, control.clone(), config.state_dir.clone()).await {
                Ok(conn) => {
                    tracing::info!(bus = ?bus, "D-Bus interface io.tern.Daemon1 served");
                    Some(conn)
                }
                Err(e) => {
                    tracing::warn!(bus = ?bus, error = %e, "D-Bus interface not served (set dbus.bus = \"none\" to silence this)");
                    None
                }
            }
        }
        None => None,
    };
    tracing::info!(status = %summary, "ready");
    notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);

    let watchdog = tokio::spawn(watchdog(pools_rx, cancel.clone()));

    loop {
        tokio::select! {
            _ = hup.recv() => {
                let _ = daemon.reload(config_path).await;
            }
            Some(req) = reload_rx.recv() => match req {
                ServiceRequest::Reload(reply) => {
                    let r = daemon.reload(config_path).await;
                    let _ = reply.send(r);
                }
                ServiceRequest::Pipeline { name, start, reply } => {
                    let r = daemon.start_stop(&name, start).await;
                    let _ = reply.send(r);
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping");
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining pipelines"),
    ]);
    let result = daemon.stop_pipelines().await;
    // After the pipelines: results of the drain are in the outbox and go out next time.
    if let Some(f) = fleet {
        f.stop().await;
    }
    cancel.cancel();
    if let Some((_, task)) = updater {
        let _ = task.await;
    }
    let _ = watchdog.await;
    let _ = retention.await;
    result.map_err(ServiceError::Hung)
}

impl Daemon {
    /// Bring running state in line with `config`: models first, then pipelines. Returns the
    /// problems met (kept for the status); none of them stops the daemon.
    async fn apply(&mut self, config: Config) {
        let mut problems: Vec<String> = Vec::new();
        {
            let mut reg = self.registry.lock().await;
            problems.extend(
                reg.apply(&config.models)
                    .await
                    .into_iter()
                    .map(|e| e.to_string()),
            );
        }
        // A pipeline that overran its stop was aborted and is logged by name; it starts afresh
        // below, so it is no standing problem of the new configuration.
        let _ = self.stop_pipelines().await;
        self.keeper.set(config.store.into());
        let stopped: std::collections::HashSet<String> = self
            .store
            .call(|c| {
                let mut s = c.prepare("SELECT name FROM pipeline_stops")?;
                let names = s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                Ok(names)
            })
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "stopped pipelines not read; starting all");
                Default::default()
            });
        self.config = config;
        self.pipelines = self
            .config
            .pipelines
            .iter()
            .map(|p| Slot {
                config: p.clone(),
                stats: Arc::default(),
                run: None,
            })
            .collect();
        for i in 0..self.pipelines.len() {
            if stopped.contains(&self.pipelines[i].config.name) {
                self.pipelines[i]
                    .stats
                    .set_state(pipeline::State::Stopped("stopped by command".into()));
                continue;
            }
            if let Err(msg) = self.start_pipeline(i).await {
                problems.push(msg);
            }
        }
        let pools: Vec<ModelPool> = self.registry.lock().await.pools().cloned().collect();
        self.pools_tx.send_replace(pools);
        self.problems = problems;
    }

    /// Start the pipeline in slot `i`; on failure its state says why, and so does the error.
    async fn start_pipeline(&mut self, i: usize) -> Result<(), String> {
        let pool = self
            .registry
            .lock()
            .await
            .pool(&self.pipelines[i].config.model);
        let share = self
            .pipelines
            .iter()
            .filter(|s| s.config.model == self.pipelines[i].config.model)
            .count();
        let slot = &mut self.pipelines[i];
        let p = &slot.config;
        let feed = self
            .config
            .feeds
            .iter()
            .find(|f| f.name() == p.feed)
            .expect("validated");
        let started = match pool {
            None => Err(format!("model `{}` has no active version", p.model)),
            Some(pool) => pipeline::spawn(
                p,
                feed,
                pool,
                pipeline::Sinks {
                    store: self.store.clone(),
                    outbox: self.outbox.clone(),
                    local: Some(self.control.local_sender()),
                    keeper: self.keeper.clone(),
                },
                slot.stats.clone(),
                share,
                self.cancel.child_token(),
            ),
        };
        match started {
            Ok(run) => {
                slot.run = Some(run);
                Ok(())
            }
            Err(why) => {
                let msg = format!("pipeline `{}` not started: {why}", p.name);
                tracing::error!("{msg}");
                slot.stats.set_state(pipeline::State::Stopped(why));
                Err(msg)
            }
        }
    }

    /// `pipelines.start` / `pipelines.stop`: the choice is kept in the database, so a stopped
    /// pipeline stays stopped across restarts and reloads until it is started again.
    async fn start_stop(&mut self, name: &str, start: bool) -> Result<serde_json::Value, CmdError> {
        let i = self
            .pipelines
            .iter()
            .position(|s| s.config.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .pipelines
                    .iter()
                    .map(|s| s.config.name.as_str())
                    .collect();
                CmdError::new(
                    Code::NotFound,
                    format!(
                        "no pipeline `{name}` is configured (configured: {})",
                        known.join(", ")
                    ),
                )
            })?;
        let owned = name.to_string();
        self.store
            .call(move |c| {
                if start {
                    c.execute("DELETE FROM pipeline_stops WHERE name = ?1", [&owned])?;
                } else {
                    c.execute(
                        "INSERT OR REPLACE INTO pipeline_stops (name, ts_ms) VALUES (?1, ?2)",
                        rusqlite::params![owned, crate::store::now_ms()],
                    )?;
                }
                Ok(())
            })
            .await?;
        let mut failed = None;
        // Whatever the pipeline's last start said no longer holds.
        let prefix = format!("pipeline `{name}` ");
        self.problems.retain(|p| !p.starts_with(&prefix));
        if start {
            if self.pipelines[i].run.is_none() {
                failed = self.start_pipeline(i).await.err();
                self.problems.extend(failed.clone());
            }
        } else if let Some(run) = self.pipelines[i].run.take() {
            if let Err(hung) = stop_all(vec![(name.to_string(), run)]).await {
                failed = Some(format!("{hung} did not stop in time; aborted"));
            }
            self.pipelines[i]
                .stats
                .set_state(pipeline::State::Stopped("stopped by command".into()));
        }
        tracing::info!(pipeline = %name, start, "pipeline {} by command", if start { "started" } else { "stopped" });
        let summary = self.summary();
        self.publish_state(&summary);
        let state = self.pipelines[i].stats.state();
        match failed {
            Some(why) => Err(CmdError::new(Code::Conflict, why)),
            None => Ok(
                serde_json::json!({"pipeline": name, "state": state.name(), "reason": state.reason()}),
            ),
        }
    }

    /// Tell the command side what is running now.
    fn publish_state(&self, summary: &str) {
        self.control.set_state(DaemonState {
            config: self.config.clone(),
            pipelines: self
                .pipelines
                .iter()
                .map(|p| PipelineInfo {
                    name: p.config.name.clone(),
                    feed: p.config.feed.clone(),
                    model: p.config.model.clone(),
                    stats: p.stats.clone(),
                })
                .collect(),
            summary: summary.to_string(),
        });
    }

    /// Reload the configuration: the new status, or why the new configuration was refused.
    async fn reload(&mut self, path: &Path) -> Result<String, String> {
        notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Status("reloading")),
        ]);
        tracing::info!(config = %path.display(), "reloading");
        let loaded = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || config::load(&path))
                .await
                .expect("config load panicked")
        };
        let result = match loaded {
            Err(e) => {
                tracing::error!("new configuration refused, keeping the running one: {e}");
                Err(format!(
                    "reload refused: {}",
                    e.0.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            }
            Ok(mut new) => {
                if new.state_dir != self.config.state_dir {
                    tracing::warn!(
                        running = %self.config.state_dir.display(),
                        new = %new.state_dir.display(),
                        "state_dir changes need a restart; keeping the running one"
                    );
                    new.state_dir = self.config.state_dir.clone();
                }
                if new.fleet != self.config.fleet || new.outbox != self.config.outbox {
                    tracing::warn!(
                        "fleet and outbox changes need a restart; keeping the running ones"
                    );
                    new.fleet = self.config.fleet.clone();
                    new.outbox = self.config.outbox;
                }
                if let Err(e) = self.control.set_log_level(&new.log_level) {
                    tracing::warn!(error = %e, "log level not changed");
                }
                self.apply(new).await;
                let summary = self.summary();
                self.publish_state(&summary);
                Ok(summary)
            }
        };
        let summary = match &result {
            Ok(s) | Err(s) => s.clone(),
        };
        tracing::info!(status = %summary, "reloaded");
        notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
        result
    }

    /// Stop every pipeline: feeds first, then let each pipeline drain what is queued.
    async fn stop_pipelines(&mut self) -> Result<(), String> {
        let running = self
            .pipelines
            .iter_mut()
            .filter_map(|s| Some((s.config.name.clone(), s.run.take()?)))
            .collect();
        stop_all(running).await
    }

    fn summary(&self) -> String {
        let models = self.pools_tx.borrow().len();
        let running = self.pipelines.iter().filter(|s| s.run.is_some()).count();
        let mut s = format!("ready: {models} model(s) active, {running} pipeline(s) running");
        if !self.problems.is_empty() {
            s += &format!("; degraded: {}", self.problems.join("; "));
        }
        s
    }
}

/// Stop pipelines: feeds first, then let each pipeline drain what is queued; names what
/// overran the deadline (and was aborted).
async fn stop_all(running: Vec<(String, pipeline::Running)>) -> Result<(), String> {
    for (_, p) in &running {
        p.cancel.cancel();
    }
    let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
    let mut hung = Vec::new();
    for (name, mut p) in running {
        let feed_done = tokio::time::timeout_at(deadline, &mut p.feed_task)
            .await
            .is_ok();
        let task_done = tokio::time::timeout_at(deadline, &mut p.task).await.is_ok();
        if !(feed_done && task_done) {
            // Abort what overran so that a reload never runs two copies of a pipeline.
            p.feed_task.abort();
            p.task.abort();
            tracing::error!(pipeline = %name, "did not stop within {SHUTDOWN_DEADLINE:?}; aborted");
            hung.push(format!("pipeline `{name}`"));
        }
    }
    if hung.is_empty() {
        Ok(())
    } else {
        Err(hung.join(", "))
    }
}

/// Hold `<state_dir>/ternd.lock` for as long as the daemon runs: two daemons on one state
/// directory would fight over its database and models, and `ternd install` uses the lock to
/// tell whether a daemon is there to hand a bundle to.
pub fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ServiceError> {
    let path = dir.join("ternd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ServiceError::StateDir {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        ServiceError::Locked {
            path,
            source: std::io::Error::from(e),
        }
    })
}

/// Feed the systemd watchdog at half its period, but only while no inference worker has been
/// stuck in one job for a whole period: a hung engine must get the service restarted.
async fn watchdog(pools: watch::Receiver<Vec<ModelPool>>, cancel: CancellationToken) {
    let Some(period) = watchdog_period() else {
        return;
    };
    let mut tick = tokio::time::interval(period / 2);
    let mut was_healthy = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stuck: Vec<String> = pools
            .borrow()
            .iter()
            .filter(|p| !p.healthy(period))
            .map(|p| p.name().to_string())
            .collect();
        if stuck.is_empty() {
            notify(&[NotifyState::Watchdog]);
            if !was_healthy {
                tracing::info!("inference workers answer again; watchdog resumed");
            }
            was_healthy = true;
        } else if was_healthy {
            tracing::error!(models = ?stuck, "an inference has hung; withholding the watchdog ping");
            was_healthy = false;
        }
    }
}

/// The watchdog period systemd asks for, as `sd_watchdog_enabled(3)` reads it: `WATCHDOG_USEC`,
/// unless `WATCHDOG_PID` is set and names another process.
fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok()? != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

fn status(s: &str) {
    notify(&[NotifyState::Status(s)]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
