//! Typed commands and the one place they are carried out. The fleet link (MQTT) and the local
//! API (D-Bus) both turn requests into a [`Command`] and call [`Control::execute`], so the two
//! surfaces cannot behave differently.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use crate::config::Config;
use crate::engine::{EngineError, Input};
use crate::outbox::Outbox;
use crate::pipeline::PipelineStats;
use crate::registry::{Registry, RegistryError};
use crate::store::{Store, StoreError};

/// Stable error codes in replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BadRequest,
    UnknownCommand,
    NotFound,
    Busy,
    Unauthorized,
    Conflict,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::UnknownCommand => "unknown_command",
            Code::NotFound => "not_found",
            Code::Busy => "busy",
            Code::Unauthorized => "unauthorized",
            Code::Conflict => "conflict",
            Code::Internal => "internal",
        }
    }
}

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
            EngineError::Manifest { .. } | EngineError::Input { .. } => Code::BadRequest,
            // The version exists but cannot serve: the request conflicts with its state.
            EngineError::Load { .. } | EngineError::SelfTest { .. } => Code::Conflict,
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
            RegistryError::Conflict { .. } | RegistryError::NoPrevious { .. } => {
                CmdError::new(Code::Conflict, e.to_string())
            }
            RegistryError::Package { .. } => CmdError::new(Code::BadRequest, e.to_string()),
            RegistryError::Store(_) | RegistryError::Io { .. } => {
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

/// Most rows one `results.query` returns.
pub const MAX_QUERY_LIMIT: u32 = 1000;
/// `results.query` stops adding rows past this many bytes of JSON and says so.
pub const MAX_QUERY_BYTES: usize = 96 * 1024;
/// How long an `infer` command waits for its model.
pub const INFER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the local API (D-Bus) says as signals, fed by whoever did it.
#[derive(Debug, Clone)]
pub enum LocalEvent {
    /// A pipeline stored a result (the same JSON as its MQTT message).
    Result {
        pipeline: String,
        json: String,
    },
    ModelActivated {
        model: String,
        version: String,
    },
    Update {
        model: String,
        version: String,
        state: String,
        percent: u32,
    },
    /// The daemon's state or its active models changed.
    StateChanged,
}

#[derive(Debug, Clone)]
pub enum Command {
    Ping,
    Status,
    ModelsList,
    Activate {
        name: String,
        version: semver::Version,
    },
    Rollback {
        name: String,
    },
    Infer {
        model: String,
        input: Input,
    },
    ResultsQuery {
        since_ms: i64,
        after_id: Option<i64>,
        limit: u32,
    },
    Reload,
    LogLevel {
        level: String,
    },
    PipelinesList,
    PipelineStart {
        name: String,
    },
    PipelineStop {
        name: String,
    },
    CaptureExport {
        pipeline: String,
        since_ms: i64,
        limit: u32,
    },
    CaptureClear {
        pipeline: Option<String>,
        before_ms: Option<i64>,
    },
}

/// Every command name, for `unknown_command` messages.
pub const NAMES: &[&str] = &[
    "ping",
    "status",
    "models.list",
    "models.activate",
    "models.rollback",
    "infer",
    "results.query",
    "config.reload",
    "log.level",
    "pipelines.list",
    "pipelines.start",
    "pipelines.stop",
    "capture.export",
    "capture.clear",
];

/// Most samples one `capture.export` sends.
pub const MAX_EXPORT_LIMIT: u32 = 10_000;
/// Captured samples are sent in messages of about this many bytes (a larger sample goes alone).
pub const EXPORT_CHUNK_BYTES: usize = 64 * 1024;

fn args<T: for<'de> Deserialize<'de>>(name: &str, v: Value) -> Result<T, CmdError> {
    serde_json::from_value(v)
        .map_err(|e| CmdError::new(Code::BadRequest, format!("{name} arguments: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateArgs {
    name: String,
    version: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArgs {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferArgs {
    model: String,
    /// A string: base64 of PNG or JPEG bytes. Anything else: a JSON tensor.
    input: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryArgs {
    #[serde(default)]
    since: i64,
    /// With `since`: only results after the one with this id at that timestamp (a page's
    /// `next_after`), so paging never repeats or skips rows that share a timestamp.
    after: Option<i64>,
    #[serde(default = "default_limit")]
    limit: u32,
}

fn default_limit() -> u32 {
    100
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelArgs {
    level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportArgs {
    pipeline: String,
    #[serde(default)]
    since: i64,
    #[serde(default = "default_limit")]
    limit: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearArgs {
    pipeline: Option<String>,
    /// Only samples taken before this time (ms since the epoch).
    before: Option<i64>,
}

impl Command {
    /// Build a command from its wire name and JSON arguments (`null` for none).
    pub fn parse(name: &str, v: Value) -> Result<Command, CmdError> {
        let v = if v.is_null() { json!({}) } else { v };
        Ok(match name {
            "ping" => {
                args::<NoArgs>(name, v)?;
                Command::Ping
            }
            "status" => {
                args::<NoArgs>(name, v)?;
                Command::Status
            }
            "models.list" => {
                args::<NoArgs>(name, v)?;
                Command::ModelsList
            }
            "models.activate" => {
                let a: ActivateArgs = args(name, v)?;
                let version = semver::Version::parse(&a.version).map_err(|e| {
                    CmdError::new(
                        Code::BadRequest,
                        format!("models.activate arguments: version `{}`: {e}", a.version),
                    )
                })?;
                Command::Activate {
                    name: a.name,
                    version,
                }
            }
            "models.rollback" => Command::Rollback {
                name: args::<NameArgs>(name, v)?.name,
            },
            "infer" => {
                let a: InferArgs = args(name, v)?;
                let input = match a.input {
                    Value::String(b64) => Input::Encoded(
                        base64::engine::general_purpose::STANDARD
                            .decode(b64.trim())
                            .map_err(|e| {
                                CmdError::new(
                                    Code::BadRequest,
                                    format!("infer arguments: input is not base64: {e}"),
                                )
                            })?,
                    ),
                    other => {
                        let bytes = serde_json::to_vec(&other).expect("JSON values serialise");
                        Input::from_json(&bytes)?
                    }
                };
                Command::Infer {
                    model: a.model,
                    input,
                }
            }
            "results.query" => {
                let a: QueryArgs = args(name, v)?;
                if a.limit == 0 || a.limit > MAX_QUERY_LIMIT {
                    return Err(CmdError::new(
                        Code::BadRequest,
                        format!("results.query arguments: limit must be 1 to {MAX_QUERY_LIMIT}"),
                    ));
                }
                Command::ResultsQuery {
                    since_ms: a.since,
                    after_id: a.after,
                    limit: a.limit,
                }
            }
            "config.reload" => {
                args::<NoArgs>(name, v)?;
                Command::Reload
            }
            "log.level" => Command::LogLevel {
                level: args::<LevelArgs>(name, v)?.level,
            },
            "pipelines.list" => {
                args::<NoArgs>(name, v)?;
                Command::PipelinesList
            }
            "pipelines.start" => Command::PipelineStart {
                name: args::<NameArgs>(name, v)?.name,
            },
            "pipelines.stop" => Command::PipelineStop {
                name: args::<NameArgs>(name, v)?.name,
            },
            "capture.export" => {
                let a: ExportArgs = args(name, v)?;
                if a.limit == 0 || a.limit > MAX_EXPORT_LIMIT {
                    return Err(CmdError::new(
                        Code::BadRequest,
                        format!("capture.export arguments: limit must be 1 to {MAX_EXPORT_LIMIT}"),
                    ));
                }
                Command::CaptureExport {
                    pipeline: a.pipeline,
                    since_ms: a.since,
                    limit: a.limit,
                }
            }
            "capture.clear" => {
                let a: ClearArgs = args(name, v)?;
                Command::CaptureClear {
                    pipeline: a.pipeline,
                    before_ms: a.before,
                }
            }
            other => {
                return Err(CmdError::new(
                    Code::UnknownCommand,
                    format!("no command `{other}`; known: {}", NAMES.join(", ")),
                ));
            }
        })
    }

    /// Whether the command changes the box's state (and so may have to be signed).
    pub fn changes_state(name: &str) -> bool {
        matches!(
            name,
            "models.activate"
                | "models.rollback"
                | "config.reload"
                | "log.level"
                | "pipelines.start"
                | "pipelines.stop"
                | "capture.export"
                | "capture.clear"
        )
    }
}

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
    /// Reload the configuration; answered with the new summary.
    Reload(oneshot::Sender<Result<String, String>>),
    /// Start or stop a configured pipeline; answered with its new state.
    Pipeline {
        name: String,
        start: bool,
        reply: oneshot::Sender<Result<Value, CmdError>>,
    },
}

/// Changes the log filter; `Err` says why the filter was refused.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Handle to carry out commands; cheap to clone.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<Mutex<Registry>>,
    store: Store,
    outbox: Option<Outbox>,
    state: RwLock<DaemonState>,
    service: mpsc::Sender<ServiceRequest>,
    log: LogReload,
    started: Instant,
    /// Presence must be re-announced (models or pipelines changed).
    changed: Notify,
    fleet_connected: AtomicBool,
    fleet_session: AtomicU64,
    local: tokio::sync::broadcast::Sender<LocalEvent>,
}

impl Control {
    pub fn new(
        registry: Arc<Mutex<Registry>>,
        store: Store,
        outbox: Option<Outbox>,
        state: DaemonState,
        service: mpsc::Sender<ServiceRequest>,
        log: LogReload,
    ) -> Control {
        Control {
            inner: Arc::new(Inner {
                registry,
                store,
                outbox,
                state: RwLock::new(state),
                service,
                log,
                started: Instant::now(),
                changed: Notify::new(),
                fleet_connected: AtomicBool::new(false),
                fleet_session: AtomicU64::new(0),
                local: tokio::sync::broadcast::channel(256).0,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn outbox(&self) -> Option<&Outbox> {
        self.inner.outbox.as_ref()
    }

    pub fn uptime_s(&self) -> u64 {
        self.inner.started.elapsed().as_secs()
    }

    pub fn state(&self) -> DaemonState {
        self.inner.state.read().expect("state lock").clone()
    }

    /// The service calls this after every start and reload.
    pub fn set_state(&self, s: DaemonState) {
        *self.inner.state.write().expect("state lock") = s;
        self.inner.changed.notify_one();
        self.local(LocalEvent::StateChanged);
    }

    /// Something others report changed (an update activated a model): say so again.
    pub fn touch(&self) {
        self.inner.changed.notify_one();
        self.local(LocalEvent::StateChanged);
    }

    /// Tell local listeners (D-Bus signals); nobody listening is fine.
    pub fn local(&self, e: LocalEvent) {
        let _ = self.inner.local.send(e);
    }

    /// The sender pipelines report results on.
    pub fn local_sender(&self) -> tokio::sync::broadcast::Sender<LocalEvent> {
        self.inner.local.clone()
    }

    pub fn subscribe_local(&self) -> tokio::sync::broadcast::Receiver<LocalEvent> {
        self.inner.local.subscribe()
    }

    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    pub fn set_log_level(&self, level: &str) -> Result<(), String> {
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

    pub async fn pools(&self) -> Vec<crate::engine::ModelPool> {
        self.inner.registry.lock().await.pools().cloned().collect()
    }

    /// Active models as `{name, version}`, sorted by name.
    pub async fn active_models(&self) -> Vec<Value> {
        let mut v: Vec<(String, String)> = self
            .pools()
            .await
            .iter()
            .map(|p| (p.name().to_string(), p.active().version().to_string()))
            .collect();
        v.sort();
        v.into_iter()
            .map(|(name, version)| json!({"name": name, "version": version}))
            .collect()
    }

    pub async fn execute(&self, cmd: Command) -> Result<Value, CmdError> {
        match cmd {
            Command::Ping => Ok(json!({"pong": true, "uptime_s": self.uptime_s()})),
            Command::Status => self.status().await,
            Command::ModelsList => {
                let rows = self.inner.registry.lock().await.list().await?;
                Ok(serde_json::to_value(rows).expect("rows serialise"))
            }
            Command::Activate { name, version } => {
                let pool = self.pool_config(&name);
                self.inner
                    .registry
                    .lock()
                    .await
                    .activate(&name, &version, pool)
                    .await?;
                self.event(json!({"event": "model.activated", "model": name, "version": version.to_string(), "by": "command"}))
                    .await;
                self.local(LocalEvent::ModelActivated {
                    model: name.clone(),
                    version: version.to_string(),
                });
                self.touch();
                Ok(json!({"model": name, "active": version.to_string()}))
            }
            Command::Rollback { name } => {
                let (from, to) = self.inner.registry.lock().await.rollback(&name).await?;
                self.event(json!({"event": "model.rolled_back", "model": name, "from": from, "to": to, "by": "command"}))
                    .await;
                self.local(LocalEvent::ModelActivated {
                    model: name.clone(),
                    version: to.clone(),
                });
                self.touch();
                Ok(json!({"model": name, "from": from, "active": to}))
            }
            Command::Infer { model, input } => {
                let pool = self
                    .inner
                    .registry
                    .lock()
                    .await
                    .pool(&model)
                    .ok_or_else(|| {
                        CmdError::new(
                            Code::NotFound,
                            format!("model `{model}` has no active version"),
                        )
                    })?;
                // The engine's own queue bounds waiting; this bounds a wedged worker.
                let pred = tokio::time::timeout(INFER_TIMEOUT, pool.infer(input))
                    .await
                    .map_err(|_| {
                        CmdError::new(
                            Code::Busy,
                            format!("model `{model}` did not answer within {INFER_TIMEOUT:?}"),
                        )
                    })??;
                Ok(serde_json::to_value(pred).expect("predictions serialise"))
            }
            Command::ResultsQuery {
                since_ms,
                after_id,
                limit,
            } => self.results(since_ms, after_id, limit).await,
            Command::Reload => {
                let (tx, rx) = oneshot::channel();
                self.inner
                    .service
                    .send(ServiceRequest::Reload(tx))
                    .await
                    .map_err(|_| CmdError::new(Code::Internal, "the service is stopping"))?;
                match rx.await {
                    Ok(Ok(summary)) => Ok(json!({"status": summary})),
                    Ok(Err(why)) => Err(CmdError::new(Code::Conflict, why)),
                    Err(_) => Err(CmdError::new(Code::Internal, "the service is stopping")),
                }
            }
            Command::LogLevel { level } => {
                (self.inner.log)(&level).map_err(|e| {
                    CmdError::new(
                        Code::BadRequest,
                        format!("`{level}` is not a log filter: {e}"),
                    )
                })?;
                tracing::info!(%level, "log level changed by command");
                Ok(json!({"level": level}))
            }
            Command::PipelinesList => Ok(self.status().await?["pipelines"].take()),
            Command::PipelineStart { name } => self.pipeline(name, true).await,
            Command::PipelineStop { name } => self.pipeline(name, false).await,
            Command::CaptureExport {
                pipeline,
                since_ms,
                limit,
            } => self.capture_export(pipeline, since_ms, limit).await,
            Command::CaptureClear {
                pipeline,
                before_ms,
            } => {
                let deleted = self
                    .inner
                    .store
                    .call(move |c| {
                        Ok(crate::store::clear_captures(
                            c,
                            pipeline.as_deref(),
                            before_ms,
                        )?)
                    })
                    .await?;
                Ok(json!({"deleted": deleted}))
            }
        }
    }

    async fn pipeline(&self, name: String, start: bool) -> Result<Value, CmdError> {
        let (reply, rx) = oneshot::channel();
        let stopping = || CmdError::new(Code::Internal, "the service is stopping");
        self.inner
            .service
            .send(ServiceRequest::Pipeline { name, start, reply })
            .await
            .map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())?
    }

    /// Queue a pipeline's captured samples on the outbox, in chunks, in one transaction: an
    /// export is on its way whole or not at all.
    async fn capture_export(
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
                let topic = format!("{}/capture/{pipeline}", ob.base);
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

    fn pool_config(&self, name: &str) -> crate::config::PoolConfig {
        let s = self.inner.state.read().expect("state lock");
        s.config.pools().get(name)
    }

    async fn event(&self, body: Value) {
        let Some(ob) = &self.inner.outbox else {
            return;
        };
        if let Err(e) = ob.send_event(&self.inner.store, body).await {
            tracing::error!(error = %e, "event not queued");
        }
    }

    pub async fn status(&self) -> Result<Value, CmdError> {
        let state = self.state();
        let models: Vec<Value> = self
            .pools()
            .await
            .iter()
            .map(|p| {
                let s = p.stats();
                let m = p.active();
                json!({
                    "name": p.name(),
                    "version": m.version().to_string(),
                    "runtime": m.runtime,
                    "runtime_note": m.fallback,
                    "requests": s.completed.load(Ordering::Relaxed),
                    "errors": s.failed.load(Ordering::Relaxed),
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
            "outbox": backlog,
            "fleet": {
                "connected": self.inner.fleet_connected.load(Ordering::Relaxed),
                "session": self.inner.fleet_session.load(Ordering::Relaxed),
            },
        }))
    }

    async fn results(
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
                    "SELECT id, ts_ms, pipeline, source, model, version, label, score, top, latency_us
                     FROM results WHERE (ts_ms, id) > (?1, ?2) ORDER BY ts_ms, id LIMIT ?3",
                )?;
                // Without `after`, every row at `since` is wanted: ids start at 1.
                let after = after_id.unwrap_or(0);
                let rows = stmt
                    .query_map(rusqlite::params![since_ms, after, limit], |r| {
                        let top: String = r.get(8)?;
                        Ok(json!({
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
                        }))
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
