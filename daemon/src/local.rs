//! The local API: `io.tern.Daemon1` at `/io/tern/Daemon1` on D-Bus (zbus), for apps on the box.
//!
//! Every method builds the same typed command the fleet link parses from JSON and runs it
//! through [`Control::run`], so both surfaces behave identically; errors are named D-Bus errors
//! (`io.tern.Error.NotFound`, ...) carrying the same message an MQTT reply would. Results come
//! back as JSON strings (the same documents as the MQTT replies) so that a shell with `busctl`
//! or `gdbus` and a program with any binding read them the same way.

use zbus::interface;
use zbus::object_server::SignalEmitter;

use crate::control::commands as c;
use crate::control::{CmdError, Code, Command, Control};
use crate::events::LocalEvent;

/// The D-Bus errors, one per command reply code.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.tern.Error")]
pub enum TernError {
    #[zbus(error)]
    ZBus(zbus::Error),
    BadRequest(String),
    UnknownCommand(String),
    NotFound(String),
    Busy(String),
    Unauthorized(String),
    Conflict(String),
    Internal(String),
}

impl From<CmdError> for TernError {
    fn from(e: CmdError) -> TernError {
        let m = e.message;
        match e.code {
            Code::BadRequest => TernError::BadRequest(m),
            Code::UnknownCommand => TernError::UnknownCommand(m),
            Code::NotFound => TernError::NotFound(m),
            Code::Busy => TernError::Busy(m),
            Code::Unauthorized => TernError::Unauthorized(m),
            Code::Internal => TernError::Internal(m),
            // Every other code is an update's or a model's outcome: the request met a state
            // that refuses it.
            _ => TernError::Conflict(m),
        }
    }
}

pub struct Daemon1 {
    backend: Backend,
    /// Inference calls being read and run at once; any local user may make them.
    infer_slots: std::sync::Arc<tokio::sync::Semaphore>,
}

enum Backend {
    Live(Control),
    /// The database is damaged: `Status` says why and what to do, everything else is
    /// refused with that (nothing here works without the database).
    Damaged {
        status: serde_json::Value,
    },
}

/// The largest image or tensor text an inference call takes.
pub const MAX_INPUT_BYTES: usize = 16 * 1024 * 1024;
/// Inference calls at once; more are answered `Busy` (the engine's own queue is behind them).
pub const INFER_CALLS_AT_ONCE: usize = 8;

impl Daemon1 {
    pub fn new(control: Control) -> Daemon1 {
        Daemon1::with(Backend::Live(control))
    }

    /// The interface of a daemon whose database is damaged: `status` is its `Status` reply
    /// (`state: corrupt`, the reason and the recovery).
    pub fn damaged(status: serde_json::Value) -> Daemon1 {
        Daemon1::with(Backend::Damaged { status })
    }

    fn with(backend: Backend) -> Daemon1 {
        Daemon1 {
            backend,
            infer_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(INFER_CALLS_AT_ONCE)),
        }
    }

    fn control(&self) -> Result<&Control, TernError> {
        match &self.backend {
            Backend::Live(c) => Ok(c),
            Backend::Damaged { status } => Err(TernError::Internal(format!(
                "this box's database is damaged ({}); it serves nothing until it is repaired: {}",
                status["reason"].as_str().unwrap_or("?"),
                status["recovery"].as_str().unwrap_or("?")
            ))),
        }
    }

    /// A slot for one inference call with an input of `len` bytes, or why not.
    fn admit(
        &self,
        what: &str,
        len: usize,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, TernError> {
        if len > MAX_INPUT_BYTES {
            return Err(TernError::BadRequest(format!(
                "{what} is {len} bytes, over the {MAX_INPUT_BYTES}-byte limit"
            )));
        }
        self.infer_slots.clone().try_acquire_owned().map_err(|_| {
            TernError::Busy(format!(
                "{INFER_CALLS_AT_ONCE} inference calls are running; try again"
            ))
        })
    }

    /// Run a command built from the method's arguments; its reply as JSON text.
    async fn run<C: Command>(&self, cmd: C) -> Result<String, TernError> {
        Ok(self.control()?.run(cmd).await?.to_string())
    }
}

#[interface(name = "io.tern.Daemon1")]
impl Daemon1 {
    /// The daemon's status as JSON (the `status` command's reply).
    async fn status(&self) -> Result<String, TernError> {
        match &self.backend {
            Backend::Damaged { status } => Ok(status.to_string()),
            Backend::Live(_) => self.run(c::Status {}).await,
        }
    }

    /// Installed versions of every model, as JSON.
    async fn list_models(&self) -> Result<String, TernError> {
        self.run(c::ModelsList {}).await
    }

    /// Run `model` on `input`: PNG or JPEG bytes. Returns the prediction as JSON.
    async fn infer(&self, model: String, input: Vec<u8>) -> Result<String, TernError> {
        let _slot = self.admit("the input", input.len())?;
        let input = crate::engine::Input::Encoded(input);
        self.run(c::Infer { model, input }).await
    }

    /// Run `model` on a tensor given as JSON (nested arrays of numbers).
    async fn infer_tensor(&self, model: String, tensor_json: String) -> Result<String, TernError> {
        let _slot = self.admit("the tensor", tensor_json.len())?;
        // Read once, straight into numbers: no JSON tree of the whole tensor.
        let input = crate::engine::Input::from_json(tensor_json.as_bytes())
            .map_err(|e| TernError::BadRequest(format!("tensor: {e}")))?;
        drop(tensor_json);
        self.run(c::Infer { model, input }).await
    }

    async fn activate(&self, model: String, version: String) -> Result<String, TernError> {
        self.run(c::Activate::new(model, &version)?).await
    }

    async fn rollback(&self, model: String) -> Result<String, TernError> {
        self.run(c::Rollback { name: model }).await
    }

    /// Every configured pipeline with its state and counters, as JSON.
    async fn list_pipelines(&self) -> Result<String, TernError> {
        self.run(c::PipelinesList {}).await
    }

    /// Start a configured pipeline (the choice survives restarts); its new state as JSON.
    async fn start_pipeline(&self, name: String) -> Result<String, TernError> {
        self.run(c::PipelineStart { name }).await
    }

    /// Stop a pipeline until it is started again (across restarts); its new state as JSON.
    async fn stop_pipeline(&self, name: String) -> Result<String, TernError> {
        self.run(c::PipelineStop { name }).await
    }

    /// Stored results with a feed timestamp at or after `since` (ms since the epoch), oldest
    /// first, at most `limit`, as JSON.
    async fn query_results(&self, since: i64, limit: u32) -> Result<String, TernError> {
        let after = None;
        self.run(c::ResultsQuery {
            since,
            after,
            limit,
        })
        .await
    }

    /// The next page after a previous one: results from `since` on that come after result
    /// `after` at that timestamp (a reply's `next_since` and `next_after`).
    async fn query_results_after(
        &self,
        since: i64,
        after: i64,
        limit: u32,
    ) -> Result<String, TernError> {
        let after = Some(after);
        self.run(c::ResultsQuery {
            since,
            after,
            limit,
        })
        .await
    }

    /// Install a signed update bundle (a path readable by ternd) with the same checks as an
    /// update from the fleet. Answered as soon as the bundle's bytes are staged, with the
    /// update as JSON (`update` is its id); the update goes on and says how in
    /// `UpdateProgress` signals, and `GetUpdate` reads it. A refused or failed bundle is
    /// `io.tern.Error.Conflict` with the outcome as JSON.
    async fn install_bundle(&self, path: String) -> Result<String, TernError> {
        let path = std::path::PathBuf::from(path);
        self.run(c::UpdateInstall { path }).await
    }

    /// An update as JSON: its model, version, state and, when it failed, code and reason.
    async fn get_update(&self, id: i64) -> Result<String, TernError> {
        self.run(c::UpdateGet { id }).await
    }

    /// A pipeline stored a result: its JSON (the same document as its MQTT message).
    #[zbus(signal)]
    async fn result_ready(
        emitter: &SignalEmitter<'_>,
        pipeline: &str,
        json: &str,
    ) -> zbus::Result<()>;

    /// A version of a model became the active one (activation, rollback, update).
    #[zbus(signal)]
    async fn model_activated(
        emitter: &SignalEmitter<'_>,
        model: &str,
        version: &str,
    ) -> zbus::Result<()>;

    /// An update moved on: its state (`downloading`, ..., `committed`) and percent downloaded.
    #[zbus(signal)]
    async fn update_progress(
        emitter: &SignalEmitter<'_>,
        model: &str,
        version: &str,
        state: &str,
        percent: u32,
    ) -> zbus::Result<()>;

    /// The daemon's one-line state (`ready: ...`, `degraded: ...`).
    #[zbus(property)]
    async fn state(&self) -> String {
        match &self.backend {
            Backend::Live(c) => c.state().summary,
            Backend::Damaged { status } => plain(&status["status"]),
        }
    }

    /// Active version per model.
    #[zbus(property)]
    async fn active_models(&self) -> std::collections::HashMap<String, String> {
        match &self.backend {
            Backend::Live(c) => c.registry().snapshot().versions().into_iter().collect(),
            Backend::Damaged { .. } => Default::default(),
        }
    }
}

fn plain(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Where to serve: the system bus, the session bus, or an address.
pub async fn serve(bus: &crate::config::Bus, iface: Daemon1) -> zbus::Result<zbus::Connection> {
    let builder = match bus {
        crate::config::Bus::System => zbus::connection::Builder::system()?,
        crate::config::Bus::Session => zbus::connection::Builder::session()?,
        crate::config::Bus::Address(a) => zbus::connection::Builder::address(a.as_str())?,
    };
    finish(builder.name("io.tern.Daemon1")?, iface).await
}

/// Serve one peer directly on `stream`, with no bus in between (the tests' fast path; also
/// how an app could embed the interface on a private socket).
pub async fn serve_p2p(
    stream: tokio::net::UnixStream,
    guid: zbus::Guid<'static>,
    control: Control,
) -> zbus::Result<zbus::Connection> {
    let builder = zbus::connection::Builder::unix_stream(stream)
        .server(guid)?
        .p2p();
    let signals = Signals::new_unbound(&control);
    let conn = finish(builder, Daemon1::new(control)).await?;
    let forever = tokio_util::sync::CancellationToken::new();
    tokio::spawn(self::signals(signals.bind(conn.clone()), forever));
    Ok(conn)
}

async fn finish(
    builder: zbus::connection::Builder<'_>,
    iface: Daemon1,
) -> zbus::Result<zbus::Connection> {
    builder.serve_at(PATH, iface)?.build().await
}

const PATH: &str = "/io/tern/Daemon1";

/// The signals of one connection: news, and the two standing states behind the properties.
/// Subscribed when made, so nothing said from then on is missed.
pub struct Signals {
    conn: zbus::Connection,
    events: tokio::sync::broadcast::Receiver<LocalEvent>,
    state: tokio::sync::watch::Receiver<crate::control::DaemonState>,
    models: tokio::sync::watch::Receiver<std::sync::Arc<crate::registry::Snapshot>>,
}

impl Signals {
    pub fn new(conn: zbus::Connection, control: &Control) -> Signals {
        Signals::new_unbound(control).bind(conn)
    }

    fn new_unbound(control: &Control) -> Unbound {
        Unbound {
            events: control.events().subscribe(),
            state: control.watch_state(),
            models: control.registry().watch(),
        }
    }
}

/// Subscribed before the connection exists, so that a peer's first call cannot race it.
struct Unbound {
    events: tokio::sync::broadcast::Receiver<LocalEvent>,
    state: tokio::sync::watch::Receiver<crate::control::DaemonState>,
    models: tokio::sync::watch::Receiver<std::sync::Arc<crate::registry::Snapshot>>,
}

impl Unbound {
    fn bind(self, conn: zbus::Connection) -> Signals {
        Signals {
            conn,
            events: self.events,
            state: self.state,
            models: self.models,
        }
    }
}

/// Say what happens as signals and property changes, for as long as the connection lives.
pub async fn signals(mut w: Signals, cancel: tokio_util::sync::CancellationToken) {
    let iface = match w.conn.object_server().interface::<_, Daemon1>(PATH).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "D-Bus signals not sent");
            return;
        }
    };
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let em = iface.signal_emitter();
        let sent = tokio::select! {
            _ = cancel.cancelled() => return,
            e = w.events.recv() => match e {
                Ok(LocalEvent::Result { pipeline, json }) => {
                    Daemon1::result_ready(em, &pipeline, &json).await
                }
                Ok(LocalEvent::ModelActivated { model, version }) => {
                    Daemon1::model_activated(em, &model, &version).await
                }
                Ok(LocalEvent::Update { model, version, state, percent }) => {
                    Daemon1::update_progress(em, &model, &version, &state, percent).await
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "D-Bus signals fell behind; some were not sent");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
            changed = w.state.changed() => {
                if changed.is_err() {
                    return;
                }
                iface.get().await.state_changed(em).await
            }
            changed = w.models.changed() => {
                if changed.is_err() {
                    return;
                }
                iface.get().await.active_models_changed(em).await
            }
        };
        match sent {
            Ok(()) => {}
            // The peer of a peer-to-peer connection is gone: nobody is left to tell.
            Err(zbus::Error::InputOutput(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return;
            }
            Err(err) => tracing::debug!(error = %err, "D-Bus signal not sent"),
        }
    }
}

/// A client of `io.tern.Daemon1` (used by `ternctl` and by tests): `client::Daemon1Proxy`.
pub mod client {
    #[zbus::proxy(
        interface = "io.tern.Daemon1",
        default_service = "io.tern.Daemon1",
        default_path = "/io/tern/Daemon1"
    )]
    pub trait Daemon1 {
        fn status(&self) -> zbus::Result<String>;
        fn list_models(&self) -> zbus::Result<String>;
        fn infer(&self, model: &str, input: &[u8]) -> zbus::Result<String>;
        fn infer_tensor(&self, model: &str, tensor_json: &str) -> zbus::Result<String>;
        fn activate(&self, model: &str, version: &str) -> zbus::Result<String>;
        fn rollback(&self, model: &str) -> zbus::Result<String>;
        fn list_pipelines(&self) -> zbus::Result<String>;
        fn start_pipeline(&self, name: &str) -> zbus::Result<String>;
        fn stop_pipeline(&self, name: &str) -> zbus::Result<String>;
        fn query_results(&self, since: i64, limit: u32) -> zbus::Result<String>;
        fn query_results_after(&self, since: i64, after: i64, limit: u32) -> zbus::Result<String>;
        fn install_bundle(&self, path: &str) -> zbus::Result<String>;
        fn get_update(&self, id: i64) -> zbus::Result<String>;

        #[zbus(signal)]
        fn result_ready(&self, pipeline: String, json: String) -> zbus::Result<()>;
        #[zbus(signal)]
        fn model_activated(&self, model: String, version: String) -> zbus::Result<()>;
        #[zbus(signal)]
        fn update_progress(
            &self,
            model: String,
            version: String,
            state: String,
            percent: u32,
        ) -> zbus::Result<()>;

        #[zbus(property)]
        fn state(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn active_models(&self) -> zbus::Result<std::collections::HashMap<String, String>>;
    }
}
