//! Commands and the one place they are carried out. The fleet link (MQTT) and the local API
//! (D-Bus) both go through the command table in [`commands`], so the two surfaces cannot
//! behave differently; [`Control`] holds the handles the commands reach the owning modules
//! by (the registry, the store, the service loop, the updater) and the service's published
//! state.

pub mod commands;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::engine::EngineError;
use crate::events::{Events, LocalEvent};
use crate::outbox::Outbox;
use crate::pipeline::PipelineStats;
use crate::registry::{Registry, RegistryError};
use crate::store::{Store, StoreError};
use crate::update::Updater;

pub use commands::Command;
pub use tern_update::Code;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct CmdError {
    pub code: Code,
    pub message: String,
}

impl CmdError {
    pub fn new(code: Code, message: impl Into<String>) -> CmdError {
        CmdError {
            code,
            message: message.into(),
        }
    }
}

impl From<EngineError> for CmdError {
    fn from(e: EngineError) -> CmdError {
        let code = match e {
            EngineError::Manifest { .. }
            | EngineError::Input { .. }
            | EngineError::Shape { .. } => Code::BadRequest,
            // The version exists but cannot serve: the request conflicts with its state.
            EngineError::Load { .. }
            | EngineError::SelfTest { .. }
            | EngineError::Evaluation { .. } => Code::Conflict,
            EngineError::Busy { .. } => Code::Busy,
            EngineError::Run { .. }
            | EngineError::Stopped { .. }
            | EngineError::Unreadable { .. } => Code::Internal,
        };
        CmdError::new(code, e.to_string())
    }
}

impl From<RegistryError> for CmdError {
    fn from(e: RegistryError) -> CmdError {
        match e {
            RegistryError::Engine(e) => e.into(),
            RegistryError::NotInstalled { .. } | RegistryError::NotActive { .. } => {
                CmdError::new(Code::NotFound, e.to_string())
            }
            RegistryError::Moved { .. } => CmdError::new(Code::Busy, e.to_string()),
            RegistryError::Conflict { .. }
            | RegistryError::NoPrevious { .. }
            | RegistryError::Shadow(_) => CmdError::new(Code::Conflict, e.to_string()),
            RegistryError::Package { .. } => CmdError::new(Code::BadRequest, e.to_string()),
            RegistryError::Store(_) | RegistryError::Io { .. } | RegistryError::Stopped => {
                CmdError::new(Code::Internal, e.to_string())
            }
        }
    }
}

impl From<StoreError> for CmdError {
    fn from(e: StoreError) -> CmdError {
        CmdError::new(Code::Internal, e.to_string())
    }
}

/// `results.query` stops adding rows past this many bytes of JSON and says so.
pub const MAX_QUERY_BYTES: usize = 96 * 1024;
/// Captured samples are sent in messages of about this many bytes (a larger sample goes alone).
pub const EXPORT_CHUNK_BYTES: usize = 64 * 1024;

/// A running pipeline as status reports it.
#[derive(Clone)]
pub struct PipelineInfo {
    pub name: String,
    pub feed: String,
    pub model: String,
    pub stats: Arc<PipelineStats>,
}

/// What the service publishes about itself after every start and reload.
#[derive(Clone)]
pub struct DaemonState {
    pub config: Config,
    pub pipelines: Vec<PipelineInfo>,
    pub summary: String,
}

/// What the command side asks of the service loop, which owns the running pipelines.
pub enum ServiceRequest {
    /// Reload the configuration; answered with the new summary, or why the new
    /// configuration was refused.
    Reload(oneshot::Sender<Result<String, ReloadRefused>>),
    /// Start or stop a configured pipeline; answered with its new state.
    Pipeline {
        name: String,
        start: bool,
        reply: oneshot::Sender<Result<Value, CmdError>>,
    },
}

/// A reload that kept the running configuration, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReloadRefused(pub String);

/// A log filter that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadFilter(pub String);

/// Changes the log filter.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), BadFilter> + Send + Sync>;

/// Handle to carry out commands; cheap to clone.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

/// What commands reach: the module that owns each piece of state, by handle.
pub struct Deps {
    pub registry: Registry,
    pub store: Store,
    pub outbox: Option<Outbox>,
    pub events: Events,
    /// The service's loop, which owns the running pipelines and the configuration.
    pub service: mpsc::Sender<ServiceRequest>,
    pub log: LogReload,
    /// The updater, when updates are on (`updates.keys`).
    pub updater: Option<Updater>,
}

struct Inner {
    registry: Registry,
    store: Store,
    outbox: Option<Outbox>,
    state: watch::Sender<DaemonState>,
    service: mpsc::Sender<ServiceRequest>,
    log: LogReload,
    started: Instant,
    fleet_connected: AtomicBool,
    fleet_session: AtomicU64,
    events: Events,
    updater: Option<Updater>,
}

impl Control {
    pub fn new(d: Deps, state: DaemonState) -> Control {
        Control {
            inner: Arc::new(Inner {
                registry: d.registry,
                store: d.store,
                outbox: d.outbox,
                state: watch::channel(state).0,
                service: d.service,
                log: d.log,
                started: Instant::now(),
                fleet_connected: AtomicBool::new(false),
                fleet_session: AtomicU64::new(0),
                events: d.events,
                updater: d.updater,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn outbox(&self) -> Option<&Outbox> {
        self.inner.outbox.as_ref()
    }

    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    pub fn uptime_s(&self) -> u64 {
        self.inner.started.elapsed().as_secs()
    }

    pub fn state(&self) -> DaemonState {
        self.inner.state.borrow().clone()
    }

    /// The service's state as it changes (start, reload, a pipeline started or stopped).
    pub fn watch_state(&self) -> watch::Receiver<DaemonState> {
        self.inner.state.subscribe()
    }

    /// The service calls this after every start and reload.
    pub fn set_state(&self, s: DaemonState) {
        self.inner.state.send_replace(s);
    }

    /// Tell local listeners (D-Bus signals); nobody listening is fine.
    pub fn local(&self, e: LocalEvent) {
        self.inner.events.send(e);
    }

    pub fn set_log_level(&self, level: &str) -> Result<(), BadFilter> {
        (self.inner.log)(level)
    }

    pub fn set_fleet(&self, connected: bool, session: u64) {
        self.inner
            .fleet_connected
            .store(connected, Ordering::Relaxed);
        if session > 0 {
            self.inner.fleet_session.store(session, Ordering::Relaxed);
        }
    }

    /// Active models as `{name, version}`, sorted by name.
    /// Name, version and plan of each model served, for the birth message (a fleet view shows
    /// which plan each box runs).
    pub fn active_models(&self) -> Vec<Value> {
        self.inner
            .registry
            .snapshot()
            .pools()
            .map(|p| {
                let m = p.active();
                json!({"name": p.name(), "version": m.version().to_string(), "plan": m.plan})
            })
            .collect()
    }

    /// Run the command called `name` with JSON arguments (MQTT, tests).
    pub async fn dispatch(&self, name: &str, args: Value) -> Result<Value, CmdError> {
        match commands::find(name) {
            Some(e) => e.run(self, args).await,
            None => Err(unknown(name)),
        }
    }

    /// Run a command built by its caller (D-Bus).
    pub async fn run<C: Command>(&self, cmd: C) -> Result<Value, CmdError> {
        cmd.run(self).await
    }

    pub fn updater(&self) -> Option<&Updater> {
        self.inner.updater.as_ref()
    }

    async fn ask_service(&self, req: ServiceRequest) -> Result<(), CmdError> {
        self.inner.service.send(req).await.map_err(|_| stopping())
    }

    pub(crate) async fn pipeline(&self, name: String, start: bool) -> Result<Value, CmdError> {
        let (reply, rx) = oneshot::channel();
        self.ask_service(ServiceRequest::Pipeline { name, start, reply })
            .await?;
        rx.await.map_err(|_| stopping())?
    }

    /// Queue a pipeline's captured samples on the outbox, in chunks, in one transaction: an
    /// export is on its way whole or not at all.
    pub(crate) async fn capture_export(
        &self,
        pipeline: String,
        since_ms: i64,
        limit: u32,
    ) -> Result<Value, CmdError> {
        let ob = self.inner.outbox.clone().ok_or_else(|| {
            CmdError::new(
                Code::Conflict,
                "no fleet link is configured: captured samples have nowhere to go",
            )
        })?;
        let waker = ob.clone();
        let result = self
            .inner
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                let samples: Vec<Value> = {
                    let mut stmt = tx.prepare(
                        "SELECT id, ts_ms, source, kind, meta, data, result FROM captures
                         WHERE pipeline = ?1 AND ts_ms >= ?2 ORDER BY ts_ms, id LIMIT ?3",
                    )?;
                    stmt.query_map(rusqlite::params![pipeline, since_ms, limit], |r| {
                        let meta: String = r.get(4)?;
                        let result: String = r.get(6)?;
                        Ok(json!({
                            "id": r.get::<_, i64>(0)?,
                            "ts_ms": r.get::<_, i64>(1)?,
                            "source": r.get::<_, String>(2)?,
                            "kind": r.get::<_, String>(3)?,
                            "meta": serde_json::from_str::<Value>(&meta).unwrap_or(Value::Null),
                            "data": base64::engine::general_purpose::STANDARD
                                .encode(r.get::<_, Vec<u8>>(5)?),
                            "result": serde_json::from_str::<Value>(&result).unwrap_or(Value::Null),
                        }))
                    })?
                    .collect::<Result<_, _>>()?
                };
                let mut chunks: Vec<Vec<Value>> = Vec::new();
                let mut size = 0;
                let mut total = 0;
                for s in samples {
                    let n = s.to_string().len();
                    total += n;
                    match chunks.last_mut() {
                        Some(c) if size + n <= EXPORT_CHUNK_BYTES => c.push(s),
                        _ => {
                            chunks.push(vec![s]);
                            size = 0;
                        }
                    }
                    size += n;
                }
                // Past half the outbox's budget, the export would push out other messages
                // (or itself) before it is sent.
                if total as u64 > ob.budget_bytes / 2 {
                    return Ok(Err(CmdError::new(
                        Code::Conflict,
                        format!(
                            "{total} bytes of samples is more than half the outbox budget ({} bytes): export fewer (limit) or later ones (since)",
                            ob.budget_bytes
                        ),
                    )));
                }
                let export = crate::store::now_ms();
                let count: usize = chunks.iter().map(|c| c.len()).sum();
                let n = chunks.len();
                let topic = ob.topics().capture(&pipeline);
                for (i, chunk) in chunks.into_iter().enumerate() {
                    ob.enqueue(
                        &tx,
                        &format!("capture/{pipeline}"),
                        crate::outbox::Class::Result,
                        &topic,
                        json!({
                            "export": export,
                            "pipeline": pipeline,
                            "chunk": i,
                            "chunks": n,
                            "samples": chunk,
                        }),
                    )?;
                }
                tx.commit()?;
                Ok(Ok(json!({
                    "export": export,
                    "samples": count,
                    "chunks": n,
                    "bytes": total,
                    "topic": topic,
                })))
            })
            .await??;
        waker.wake();
        Ok(result)
    }

    pub(crate) async fn event(&self, body: Value) {
        let Some(ob) = &self.inner.outbox else {
            return;
        };
        if let Err(e) = ob.send_event(&self.inner.store, body).await {
            tracing::error!(error = %e, "event not queued");
        }
    }

    /// What the metrics endpoint reads from the database: when the oldest message waiting in
    /// the outbox was made, and each model's latest update (model, version, state).
    pub async fn store_figures(
        &self,
    ) -> Result<(Option<i64>, Vec<(String, String, String)>), CmdError> {
        let figures = self
            .inner
            .store
            .call(|c| {
                use rusqlite::OptionalExtension as _;
                // Ids only grow: the lowest is the oldest, found without a scan.
                let oldest: Option<i64> = c
                    .query_row(
                        "SELECT created_ms FROM outbox ORDER BY id LIMIT 1",
                        [],
                        |r| r.get(0),
                    )
                    .optional()?;
                let mut stmt = c.prepare(
                    "SELECT model, version, state FROM updates WHERE id IN \
                     (SELECT max(id) FROM updates GROUP BY model) ORDER BY model",
                )?;
                let updates = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((oldest, updates))
            })
            .await?;
        Ok(figures)
    }

    /// The pools serving now (for the metrics endpoint's histograms).
    pub fn pools(&self) -> Vec<crate::engine::ModelPool> {
        self.inner.registry.snapshot().pools().cloned().collect()
    }

    pub async fn status(&self) -> Result<Value, CmdError> {
        let state = self.state();
        let models: Vec<Value> = self
            .inner
            .registry
            .snapshot()
            .pools()
            .map(|p| {
                let s = p.stats();
                let m = p.active();
                json!({
                    "name": p.name(),
                    "version": m.version().to_string(),
                    "runtime": m.runtime,
                    "plan": m.plan,
                    "plans_tried": m.timings,
                    "plan_chosen": m.chosen,
                    "runtime_note": m.fallback,
                    "requests": s.completed.load(Ordering::Relaxed),
                    "errors": s.failed.load(Ordering::Relaxed),
                    "bad_input": s.bad_input.load(Ordering::Relaxed),
                    "busy": s.rejected_busy.load(Ordering::Relaxed),
                    "queued": p.queued(),
                    "latency_us": s.quantiles(),
                })
            })
            .collect();
        let pipelines: Vec<Value> = state
            .pipelines
            .iter()
            .map(|p| {
                let mut v = json!({
                    "name": p.name,
                    "feed": p.feed,
                    "model": p.model,
                });
                if let (Value::Object(m), Value::Object(s)) = (&mut v, p.stats.json()) {
                    m.extend(s);
                }
                v
            })
            .collect();
        let backlog = self
            .inner
            .store
            .call(|c| Ok(crate::outbox::backlog(c)?))
            .await?;
        Ok(json!({
            "version": crate::VERSION,
            "device": state.config.fleet.as_ref().map(|f| f.device.clone()),
            "uptime_s": self.uptime_s(),
            "status": state.summary,
            "models": models,
            "pipelines": pipelines,
            "shadows": self.inner.registry.shadows().reports(),
            "outbox": backlog,
            "fleet": {
                "connected": self.inner.fleet_connected.load(Ordering::Relaxed),
                "session": self.inner.fleet_session.load(Ordering::Relaxed),
            },
        }))
    }

    pub(crate) async fn results(
        &self,
        since_ms: i64,
        after_id: Option<i64>,
        limit: u32,
    ) -> Result<Value, CmdError> {
        let rows = self
            .inner
            .store
            .call(move |c| {
                let mut stmt = c.prepare(
                    "SELECT id, ts_ms, pipeline, source, model, version, label, score, top, latency_us, outputs
                     FROM results WHERE (ts_ms, id) > (?1, ?2) ORDER BY ts_ms, id LIMIT ?3",
                )?;
                // Without `after`, every row at `since` is wanted: ids start at 1.
                let after = after_id.unwrap_or(0);
                let rows = stmt
                    .query_map(rusqlite::params![since_ms, after, limit], |r| {
                        let top: String = r.get(8)?;
                        let outputs: Option<String> = r.get(10)?;
                        let mut row = json!({
                            "id": r.get::<_, i64>(0)?,
                            "ts_ms": r.get::<_, i64>(1)?,
                            "pipeline": r.get::<_, String>(2)?,
                            "source": r.get::<_, String>(3)?,
                            "model": r.get::<_, String>(4)?,
                            "version": r.get::<_, String>(5)?,
                            "label": r.get::<_, Option<String>>(6)?,
                            "score": r.get::<_, Option<f64>>(7)?,
                            "top": serde_json::from_str::<Value>(&top).unwrap_or(Value::Null),
                            "latency_us": r.get::<_, i64>(9)?,
                        });
                        if let Some(o) = outputs {
                            row["outputs"] =
                                serde_json::from_str::<Value>(&o).unwrap_or(Value::Null);
                        }
                        Ok(row)
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        // Bounded in bytes too, so a reply always fits a broker's packet limit; `next_since`
        // continues where this page stopped.
        let mut kept = Vec::new();
        let mut bytes = 0;
        let mut truncated = false;
        for r in rows {
            bytes += r.to_string().len();
            if bytes > MAX_QUERY_BYTES && !kept.is_empty() {
                truncated = true;
                break;
            }
            kept.push(r);
        }
        let next_since = kept.last().and_then(|r| r["ts_ms"].as_i64());
        let next_after = kept.last().and_then(|r| r["id"].as_i64());
        Ok(json!({
            "results": kept,
            "truncated": truncated,
            "next_since": next_since,
            "next_after": next_after,
        }))
    }
}

/// The reply when the service loop is gone.
fn stopping() -> CmdError {
    CmdError::new(Code::Internal, "the service is stopping")
}

/// The reply to a command name nobody knows.
pub fn unknown(name: &str) -> CmdError {
    CmdError::new(
        Code::UnknownCommand,
        format!(
            "no command `{name}`; known: {}",
            commands::fleet_names().join(", ")
        ),
    )
}
