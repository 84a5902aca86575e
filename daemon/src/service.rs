//! Startup, reload, supervision, watchdog and graceful shutdown: the daemon as a systemd
//! service.
//!
//! ```text
//!  config ─► store ─► registry (active versions, then configured packages) ─► pipelines
//!                       ─► updater ─► fleet link ─► D-Bus ─► READY=1
//!  SIGHUP  ─► load + validate config ─► same apply path as startup (bad config: keep old)
//!  a task ends early ─► restart it, stop its pipeline, or stop the daemon (see `tasks`)
//!  SIGTERM ─► STOPPING=1 ─► feeds stop ─► pipelines drain ─► fleet says offline ─► the rest
//!             all by one deadline; whatever overran is aborted and named, exit 1
//!  timer   ─► WATCHDOG=1, only while no inference has hung
//! ```
//!
//! Start and reload share [`Daemon::apply`], so a config that starts is a config that reloads.
//! Every long-running task is registered by name in one [`Tasks`]: `registry`, `updater`,
//! `retention`, `watchdog`, `dbus.signals`, `fleet.*`, `pipeline.<name>` and
//! `pipeline.<name>.feed`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::control::{
    CmdError, Code, Control, DaemonState, LogReload, PipelineInfo, ReloadRefused, ServiceRequest,
};
use crate::events::Events;
use crate::fleet::{self, Fleet};
use crate::outbox::Outbox;
use crate::pipeline;
use crate::registry::{self, Registry};
use crate::store::{Keeper, Store};
use crate::tasks::{Failed, Policy, Tasks};
use crate::update;

/// How long SIGTERM waits for every task to end before aborting the rest.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

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
    #[error(transparent)]
    Task(#[from] Failed),
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
    registry: Registry,
    /// Every configured pipeline, running or not, in config order.
    pipelines: Vec<Slot>,
    keeper: Arc<Keeper>,
    /// What the last start or reload could not do; the status says "degraded" with these.
    problems: Vec<String>,
    /// What the start could not do that no reload changes (the metrics endpoint's port).
    lasting: Vec<String>,
    outbox: Option<Outbox>,
    control: Control,
    tasks: Tasks,
}

/// A configured pipeline: its counters and state, and while it runs its stop token and the
/// ids of its two tasks.
struct Slot {
    config: config::PipelineConfig,
    stats: Arc<pipeline::PipelineStats>,
    run: Option<(CancellationToken, [tokio::task::Id; 2])>,
}

/// Run the daemon until SIGTERM or SIGINT, or until a task it cannot do without fails.
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
    registry::clean_install_copies(&config.state_dir);
    let db = config.state_dir.join("tern.db");
    let opened = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .expect("store open panicked");
    let store = match opened {
        Ok(s) => s,
        // A damaged database: stay up and say so (a restart loop would say nothing upstream),
        // serving nothing that needs it, until stopped. Never a silent new database: that is
        // the operator's call (trust comes back from trust.json when they make it).
        Err(e) if e.is_damage() => {
            let reason = e.to_string();
            let recovery = crate::fleet::corrupt::recovery(&config.state_dir);
            tracing::error!(%reason, %recovery, "database damaged: serving nothing until it is repaired");
            let summary = format!("corrupt: {reason}");
            notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
            let cancel = CancellationToken::new();
            // Ask the bus too: `ternctl status` then explains instead of "not running".
            let _dbus = match &config.dbus {
                Some(bus) => {
                    let st = serde_json::json!({
                        "version": crate::VERSION, "state": "corrupt", "status": summary,
                        "reason": reason, "recovery": recovery,
                        "device": config.fleet.as_ref().map(|f| f.device.clone()),
                    });
                    crate::local::serve(bus, crate::local::Daemon1::damaged(st))
                        .await
                        .inspect_err(|e| dbus_not_served(&config, bus, e))
                        .ok()
                }
                None => None,
            };
            let link = config.fleet.clone().map(|f| {
                tokio::spawn(crate::fleet::corrupt::serve(
                    f,
                    reason,
                    recovery,
                    cancel.clone(),
                ))
            });
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            notify(&[NotifyState::Stopping]);
            cancel.cancel();
            if let Some(l) = link {
                let _ = l.await;
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };

    crate::engine::use_onnxruntime_library(config.onnxruntime_library.as_deref());
    let mut tasks = Tasks::default();
    // Ends the tasks that are not stopped in their own order (the fleet's, pipelines').
    let cancel = CancellationToken::new();
    status("loading models");
    let (registry, registry_task) = Registry::new(store.clone(), &config.state_dir);
    tasks.fatal("registry", registry_task.run_until(cancel.clone()));
    for e in registry.start(&config.pools()).await {
        tracing::error!(error = %e, "at start");
    }
    let outbox = Outbox::for_config(&config);
    let events = Events::default();
    let keeper = Keeper::new(config.store);
    {
        let (store, keeper, cancel) = (store.clone(), keeper.clone(), cancel.clone());
        tasks.restart("retention", move || {
            crate::store::retention_task(store.clone(), keeper.clone(), cancel.clone())
        });
    }
    // The updater asks the fleet link for chunks and to say its status; without a link
    // there is nobody to ask.
    let (uplink_tx, uplink_rx) = match &config.fleet {
        Some(_) => {
            let (tx, rx) = mpsc::channel(1024);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let updater = if config.updates.enabled() {
        let mut deps = update::Deps::new(&config, store.clone(), registry.clone(), outbox.clone());
        deps.events = Some(events.clone());
        deps.uplink = uplink_tx;
        Some(update::new(deps))
    } else {
        if config.fleet.is_some() {
            tracing::warn!(
                "{}",
                config::UPDATES_OFF_WARNING.trim_start_matches("warning: ")
            );
        }
        None
    };
    let (updater, updater_task) = updater.unzip();
    let (service_tx, mut service_rx) = mpsc::channel::<ServiceRequest>(4);
    let control = Control::new(
        crate::control::Deps {
            registry: registry.clone(),
            store: store.clone(),
            outbox: outbox.clone(),
            events: events.clone(),
            service: service_tx,
            log: log_reload,
            updater: updater.clone(),
        },
        DaemonState {
            config: config.clone(),
            pipelines: Vec::new(),
            summary: "starting".into(),
        },
    );
    let mut daemon = Daemon {
        config: config.clone(),
        store,
        registry,
        pipelines: Vec::new(),
        keeper,
        problems: Vec::new(),
        lasting: Vec::new(),
        outbox: outbox.clone(),
        control: control.clone(),
        tasks,
    };
    daemon.apply(config.clone()).await;
    if let Some(addr) = config.metrics
        && let Err(why) = serve_metrics(addr, &control, &cancel, &mut daemon.tasks)
    {
        daemon.lasting.push(why);
    }
    let summary = daemon.summary();
    daemon.publish_state(&summary);
    // The updater resumes once the configured models are in place, so an update it carries
    // on never races the boot's own activations.
    if let Some(task) = updater_task {
        let cancel = cancel.clone();
        daemon
            .tasks
            .restart("updater", move || task.run(cancel.clone()));
    }
    {
        let (control, cancel) = (control.clone(), cancel.clone());
        daemon.tasks.restart("shadows", move || {
            crate::shadow::task(control.clone(), cancel.clone())
        });
    }

    let fleet = match (&config.fleet, outbox) {
        (Some(f), Some(ob)) => {
            let updates = match (updater, uplink_rx) {
                (Some(updater), Some(uplink)) => Some(fleet::UpdaterLink { updater, uplink }),
                _ => None,
            };
            match fleet::spawn(f, control.clone(), ob, updates, &mut daemon.tasks) {
                Ok(fl) => Some(fl),
                Err(e) => {
                    // check-config builds the same TLS setup, so this is a file changed since.
                    tracing::error!(error = %e, "fleet link not started");
                    None
                }
            }
        }
        _ => None,
    };
    // The local API. A box without the bus (a container, a developer's laptop) runs on
    // without it: say so once.
    let _dbus = match &config.dbus {
        Some(bus) => {
            match crate::local::serve(bus, crate::local::Daemon1::new(control.clone())).await {
                Ok(conn) => {
                    tracing::info!(bus = ?bus, "D-Bus interface io.tern.Daemon1 served");
                    let (c, control, cancel) = (conn.clone(), control.clone(), cancel.clone());
                    daemon.tasks.restart("dbus.signals", move || {
                        let signals = crate::local::Signals::new(c.clone(), &control);
                        crate::local::signals(signals, cancel.clone())
                    });
                    Some(conn)
                }
                Err(e) => {
                    dbus_not_served(&config, bus, &e);
                    None
                }
            }
        }
        None => None,
    };
    tracing::info!(status = %summary, "ready");
    notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
    {
        let (registry, cancel) = (daemon.registry.clone(), cancel.clone());
        daemon.tasks.restart("watchdog", move || {
            watchdog(registry.clone(), cancel.clone())
        });
    }

    let failed = loop {
        tokio::select! {
            _ = hup.recv() => {
                let _ = daemon.reload(config_path).await;
            }
            Some(req) = service_rx.recv() => match req {
                ServiceRequest::Reload(reply) => {
                    let r = daemon.reload(config_path).await;
                    let _ = reply.send(r);
                }
                ServiceRequest::Pipeline { name, start, reply } => {
                    let r = daemon.start_stop(&name, start).await;
                    let _ = reply.send(r);
                }
            },
            f = daemon.tasks.failed() => match f.policy {
                Policy::Fatal => break Some(f),
                _ => daemon.pipeline_failed(&f),
            },
            _ = term.recv() => break None,
            _ = int.recv() => break None,
        }
    };
    tracing::info!("stopping");
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining pipelines"),
    ]);
    let overran = daemon.shutdown(fleet, cancel).await;
    if let Some(f) = failed {
        return Err(f.into());
    }
    if overran.is_empty() {
        Ok(())
    } else {
        Err(ServiceError::Hung(overran.join(", ")))
    }
}

impl Daemon {
    /// Stop everything by one deadline: feeds and pipelines first (their results reach the
    /// outbox), then the fleet link (it says `offline`), then the rest. Returns the tasks that
    /// overran and were aborted.
    async fn shutdown(&mut self, fleet: Option<Fleet>, cancel: CancellationToken) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
        self.tasks.stopping();
        let mut overran = self.stop_pipelines(deadline).await;
        if let Some(f) = fleet {
            // Named in the log; what the link could not send is in the outbox, so a link
            // that hangs (a broker that stopped answering) does not fail the stop.
            f.stop(&mut self.tasks, deadline).await;
        }
        cancel.cancel();
        overran.extend(self.tasks.join_all(deadline).await);
        overran
    }

    /// Bring running state in line with `config`: models first, then pipelines. The
    /// problems met are kept for the status; none of them stops the daemon.
    async fn apply(&mut self, config: Config) {
        let mut problems: Vec<String> = self
            .registry
            .apply(&config.models)
            .await
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        // A pipeline that overran its stop was aborted and is logged by name; it starts afresh
        // below, so it is no standing problem of the new configuration.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
        let _ = self.stop_pipelines(deadline).await;
        self.keeper.set(config.store);
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
            if let Err(msg) = self.start_pipeline(i) {
                problems.push(msg);
            }
        }
        self.problems = problems;
    }

    /// Start the pipeline in slot `i`; on failure its state says why, and so does the error.
    fn start_pipeline(&mut self, i: usize) -> Result<(), String> {
        let pool = self.registry.pool(&self.pipelines[i].config.model);
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
        let stages: Result<Vec<_>, String> = p
            .stages
            .iter()
            .map(|s| {
                self.registry
                    .pool(&s.model)
                    .ok_or_else(|| format!("stage model `{}` has no active version", s.model))
            })
            .collect();
        let built = match (pool, stages) {
            (None, _) => Err(format!("model `{}` has no active version", p.model)),
            (_, Err(why)) => Err(why),
            (Some(pool), Ok(stages)) => pipeline::build(
                p,
                feed,
                pool,
                stages,
                pipeline::Sinks {
                    store: self.store.clone(),
                    outbox: self.outbox.clone(),
                    local: Some(self.control.events().clone()),
                    keeper: self.keeper.clone(),
                },
                slot.stats.clone(),
                share,
                CancellationToken::new(),
            )
            .map_err(|e| e.to_string()),
        };
        match built {
            Ok(run) => {
                let name = &p.name;
                let serve = self.tasks.report(format!("pipeline.{name}"), run.serve);
                let feed = self.tasks.report(format!("pipeline.{name}.feed"), run.feed);
                slot.run = Some((run.cancel, [serve, feed]));
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

    /// One of a pipeline's tasks ended by itself (a bug): the pipeline stops, and its state
    /// and the status say why, until it is started again.
    fn pipeline_failed(&mut self, f: &Failed) {
        // By id: a task of a run that was stopped since (whose name a new run took) is no
        // news about the new one.
        let Some(i) = self
            .pipelines
            .iter()
            .position(|s| s.run.as_ref().is_some_and(|(_, ids)| ids.contains(&f.id)))
        else {
            tracing::debug!(task = %f.name, why = %f.why, "a task of a stopped pipeline ended");
            return;
        };
        let (cancel, _) = self.pipelines[i].run.take().expect("found by its run");
        // The other half follows: a feed with no pipeline, or a pipeline with no feed.
        cancel.cancel();
        let why = format!("its task {} {}", f.name, f.why);
        let name = self.pipelines[i].config.name.clone();
        tracing::error!(pipeline = %name, reason = %why, "pipeline stopped");
        self.pipelines[i]
            .stats
            .set_state(pipeline::State::Stopped(why.clone()));
        self.problems
            .push(format!("pipeline `{name}` stopped: {why}"));
        let summary = self.summary();
        self.publish_state(&summary);
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
                failed = self.start_pipeline(i).err();
                self.problems.extend(failed.clone());
            }
        } else if let Some((cancel, ids)) = self.pipelines[i].run.take() {
            cancel.cancel();
            let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
            if !self.tasks.join_ids(&ids, deadline).await.is_empty() {
                tracing::error!(pipeline = %name, "did not stop within {SHUTDOWN_DEADLINE:?}; aborted");
                failed = Some(format!("pipeline `{name}` did not stop in time; aborted"));
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
    async fn reload(&mut self, path: &Path) -> Result<String, ReloadRefused> {
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
            // The updater trusts the keys it started with (or a rotation's since): a changed
            // [updates] must not look applied when it is not.
            Ok(new) if new.updates != self.config.updates => {
                let why = "reload refused: [updates] changed (keys, threshold or limits); \
                           the running updater keeps its trust: restart ternd to apply it";
                tracing::error!("{why}");
                Err(ReloadRefused(why.to_string()))
            }
            Err(e) => {
                tracing::error!("new configuration refused, keeping the running one: {e}");
                Err(ReloadRefused(format!(
                    "reload refused: {}",
                    e.0.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )))
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
                if new.dbus != self.config.dbus {
                    tracing::warn!(
                        "dbus changes need a restart; keeping the running D-Bus interface"
                    );
                    new.dbus = self.config.dbus.clone();
                }
                if new.metrics != self.config.metrics {
                    tracing::warn!(
                        running = ?self.config.metrics,
                        "metrics changes need a restart; keeping the endpoint as it was started"
                    );
                    new.metrics = self.config.metrics;
                }
                if new.onnxruntime_library != self.config.onnxruntime_library {
                    tracing::warn!(
                        "engine.onnxruntime_library changes need a restart; keeping the loaded \
                         library"
                    );
                    new.onnxruntime_library = self.config.onnxruntime_library.clone();
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
            Ok(s) => s.clone(),
            Err(e) => e.0.clone(),
        };
        tracing::info!(status = %summary, "reloaded");
        notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
        result
    }

    /// Stop every pipeline by `deadline`: feeds first, then let each pipeline drain what is
    /// queued. Returns those that overran (and were aborted).
    async fn stop_pipelines(&mut self, deadline: tokio::time::Instant) -> Vec<String> {
        let mut ids = Vec::new();
        for s in &mut self.pipelines {
            if let Some((cancel, run)) = s.run.take() {
                cancel.cancel();
                ids.extend(run);
            }
        }
        self.tasks.join_ids(&ids, deadline).await
    }

    fn summary(&self) -> String {
        let models = self.registry.snapshot().len();
        let running = self.pipelines.iter().filter(|s| s.run.is_some()).count();
        let mut s = format!("ready: {models} model(s) active, {running} pipeline(s) running");
        let problems: Vec<&str> = self
            .lasting
            .iter()
            .chain(&self.problems)
            .map(String::as_str)
            .collect();
        if !problems.is_empty() {
            s += &format!("; degraded: {}", problems.join("; "));
        }
        s
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
/// stuck in one job for a whole period: a hung engine must get the service restarted. Every
/// tick reads the registry's snapshot, so a pool made at any time is watched at once.
async fn watchdog(registry: Registry, cancel: CancellationToken) {
    let Some(period) = watchdog_period() else {
        return cancel.cancelled().await;
    };
    let mut tick = tokio::time::interval(period / 2);
    let mut was_healthy = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stuck: Vec<String> = registry
            .snapshot()
            .pools()
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

/// Say that the local API is not served: a warning for a bus the configuration asked for, a
/// note for the default system bus (a laptop, a container has none).
fn dbus_not_served(config: &Config, bus: &config::Bus, e: &dyn std::fmt::Display) {
    if config.dbus_asked {
        tracing::warn!(bus = ?bus, error = %e, "D-Bus interface not served");
    } else {
        tracing::info!(bus = ?bus, error = %e, "D-Bus interface not served on the default system bus (dbus.bus is not set: set it to say where, or to \"none\")");
    }
}

/// The Prometheus endpoint on `addr`, supervised (a crashed server is started again on the
/// same socket); a port it cannot have is said (the status says it is degraded) and the
/// daemon runs on without it.
fn serve_metrics(
    addr: std::net::SocketAddr,
    control: &Control,
    cancel: &CancellationToken,
    tasks: &mut crate::tasks::Tasks,
) -> Result<(), String> {
    let bound = std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    });
    let socket = bound.map_err(|e| {
        let why = format!("metrics.listen {addr}: {e}; /metrics is not served");
        tracing::error!("{why}");
        why
    })?;
    tracing::info!(%addr, "metrics served at /metrics");
    let (control, cancel) = (control.clone(), cancel.clone());
    // One set of slots for every run of the server: a restart does not double them.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(crate::metrics::CONNECTIONS));
    tasks.restart("metrics", move || {
        let listener = socket
            .try_clone()
            .and_then(tokio::net::TcpListener::from_std);
        let (control, cancel, slots) = (control.clone(), cancel.clone(), slots.clone());
        async move {
            match listener {
                Ok(l) => crate::metrics::serve(l, control, slots, cancel).await,
                Err(e) => tracing::error!(error = %e, "metrics: the listening socket is lost"),
            }
        }
    });
    Ok(())
}
