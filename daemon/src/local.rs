//! The local API: `io.tern.Daemon1` at `/io/tern/Daemon1` on D-Bus (zbus), for apps on the box.
//!
//! Every method turns into the same typed [`Command`] the fleet link uses and runs through
//! [`Control::execute`], so both surfaces behave identically; errors are named D-Bus errors
//! (`io.tern.Error.NotFound`, ...) carrying the same message an MQTT reply would. Results come
//! back as JSON strings (the same documents as the MQTT replies) so that a shell with `busctl`
//! or `gdbus` and a program with any binding read them the same way.

use std::path::PathBuf;

use serde_json::{Value, json};
use zbus::interface;
use zbus::object_server::SignalEmitter;

use crate::control::{CmdError, Code, Command, Control, LocalEvent};

/// The D-Bus errors, one per reply code.
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
            Code::Conflict => TernError::Conflict(m),
            Code::Internal => TernError::Internal(m),
        }
    }
}

pub struct Daemon1 {
    control: Control,
    state_dir: PathBuf,
}

impl Daemon1 {
    pub fn new(control: Control, state_dir: PathBuf) -> Daemon1 {
        Daemon1 { control, state_dir }
    }

    async fn run(&self, name: &str, args: Value) -> Result<String, TernError> {
        let cmd = Command::parse(name, args)?;
        Ok(self.control.execute(cmd).await?.to_string())
    }
}

#[interface(name = "io.tern.Daemon1")]
impl Daemon1 {
    /// The daemon's status as JSON (the `status` command's reply).
    async fn status(&self) -> Result<String, TernError> {
        self.run("status", json!({})).await
    }

    /// Installed versions of every model, as JSON.
    async fn list_models(&self) -> Result<String, TernError> {
        self.run("models.list", json!({})).await
    }

    /// Run `model` on `input`: PNG or JPEG bytes. Returns the prediction as JSON.
    async fn infer(&self, model: String, input: Vec<u8>) -> Result<String, TernError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(input);
        self.run("infer", json!({"model": model, "input": b64}))
            .await
    }

    /// Run `model` on a tensor given as JSON (nested arrays of numbers).
    async fn infer_tensor(&self, model: String, tensor_json: String) -> Result<String, TernError> {
        let tensor: Value = serde_json::from_str(&tensor_json)
            .map_err(|e| TernError::BadRequest(format!("tensor is not JSON: {e}")))?;
        if tensor.is_string() {
            return Err(TernError::BadRequest(
                "tensor must be a JSON array, not a string".into(),
            ));
        }
        self.run("infer", json!({"model": model, "input": tensor}))
            .await
    }

    async fn activate(&self, model: String, version: String) -> Result<String, TernError> {
        self.run(
            "models.activate",
            json!({"name": model, "version": version}),
        )
        .await
    }

    async fn rollback(&self, model: String) -> Result<String, TernError> {
        self.run("models.rollback", json!({"name": model})).await
    }

    /// Every configured pipeline with its state and counters, as JSON.
    async fn list_pipelines(&self) -> Result<String, TernError> {
        self.run("pipelines.list", json!({})).await
    }

    /// Start a configured pipeline (the choice survives restarts); its new state as JSON.
    async fn start_pipeline(&self, name: String) -> Result<String, TernError> {
        self.run("pipelines.start", json!({"name": name})).await
    }

    /// Stop a pipeline until it is started again (across restarts); its new state as JSON.
    async fn stop_pipeline(&self, name: String) -> Result<String, TernError> {
        self.run("pipelines.stop", json!({"name": name})).await
    }

    /// Stored results with a feed timestamp at or after `since` (ms since the epoch), oldest
    /// first, at most `limit`, as JSON.
    async fn query_results(&self, since: i64, limit: u32) -> Result<String, TernError> {
        self.run("results.query", json!({"since": since, "limit": limit}))
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
        self.run(
            "results.query",
            json!({"since": since, "after": after, "limit": limit}),
        )
        .await
    }

    /// Install a signed update bundle (a path readable by ternd) with the same checks as an
    /// update from the fleet; returns the update's outcome as JSON when it ends.
    async fn install_bundle(&self, path: String) -> Result<String, TernError> {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(TernError::BadRequest(format!(
                "`{}` is not an absolute path",
                path.display()
            )));
        }
        if !self.control.state().config.updates.enabled() {
            return Err(TernError::Conflict(
                "updates.keys is empty in the configuration: no bundle can be trusted".into(),
            ));
        }
        let state_dir = self.state_dir.clone();
        let r = crate::update::hand_over(&state_dir, &path, std::time::Duration::from_secs(3600))
            .await
            .map_err(TernError::BadRequest)?;
        match r.get("state").and_then(Value::as_str) {
            Some("refused" | "failed" | "rolled_back") => Err(TernError::Conflict(r.to_string())),
            _ => Ok(r.to_string()),
        }
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
        self.control.state().summary
    }

    /// Active version per model.
    #[zbus(property)]
    async fn active_models(&self) -> std::collections::HashMap<String, String> {
        self.control
            .active_models()
            .await
            .into_iter()
            .filter_map(|m| {
                Some((
                    m["name"].as_str()?.to_string(),
                    m["version"].as_str()?.to_string(),
                ))
            })
            .collect()
    }
}

/// Where to serve: the system bus, the session bus, or an address.
pub async fn serve(
    bus: &crate::config::Bus,
    control: Control,
    state_dir: PathBuf,
) -> zbus::Result<zbus::Connection> {
    let builder = match bus {
        crate::config::Bus::System => zbus::connection::Builder::system()?,
        crate::config::Bus::Session => zbus::connection::Builder::session()?,
        crate::config::Bus::Address(a) => zbus::connection::Builder::address(a.as_str())?,
    };
    finish(builder.name("io.tern.Daemon1")?, control, state_dir).await
}

/// Serve one peer directly on `stream`, with no bus in between (the tests' fast path; also
/// how an app could embed the interface on a private socket).
pub async fn serve_p2p(
    stream: tokio::net::UnixStream,
    guid: zbus::Guid<'static>,
    control: Control,
    state_dir: PathBuf,
) -> zbus::Result<zbus::Connection> {
    let builder = zbus::connection::Builder::unix_stream(stream)
        .server(guid)?
        .p2p();
    finish(builder, control, state_dir).await
}

async fn finish(
    builder: zbus::connection::Builder<'_>,
    control: Control,
    state_dir: PathBuf,
) -> zbus::Result<zbus::Connection> {
    let events = control.subscribe_local();
    let conn = builder
        .serve_at(PATH, Daemon1::new(control, state_dir))?
        .build()
        .await?;
    tokio::spawn(signals(conn.clone(), events));
    Ok(conn)
}

const PATH: &str = "/io/tern/Daemon1";

/// Say what happens as signals and property changes, for as long as the connection lives.
async fn signals(conn: zbus::Connection, mut events: tokio::sync::broadcast::Receiver<LocalEvent>) {
    let iface = match conn.object_server().interface::<_, Daemon1>(PATH).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "D-Bus signals not sent");
            return;
        }
    };
    loop {
        let e = match events.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "D-Bus signals fell behind; some were not sent");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let em = iface.signal_emitter();
        let sent = match &e {
            LocalEvent::Result { pipeline, json } => {
                Daemon1::result_ready(em, pipeline, json).await
            }
            LocalEvent::ModelActivated { model, version } => {
                Daemon1::model_activated(em, model, version).await
            }
            LocalEvent::Update {
                model,
                version,
                state,
                percent,
            } => Daemon1::update_progress(em, model, version, state, *percent).await,
            LocalEvent::StateChanged => {
                let d = iface.get().await;
                match d.state_changed(em).await {
                    Ok(()) => d.active_models_changed(em).await,
                    Err(e) => Err(e),
                }
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
