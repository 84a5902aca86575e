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

use crate::control::{CmdError, Code, Command, Control};

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

    /// Running pipelines with their counters, as JSON.
    async fn list_pipelines(&self) -> Result<String, TernError> {
        let status: Value = serde_json::from_str(&self.run("status", json!({})).await?)
            .map_err(|e| TernError::Internal(e.to_string()))?;
        Ok(status["pipelines"].to_string())
    }

    /// Stored results after `since` (a result id), at most `limit`, as JSON.
    async fn query_results(&self, since: i64, limit: u32) -> Result<String, TernError> {
        self.run("results.query", json!({"since": since, "limit": limit}))
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
    builder
        .name("io.tern.Daemon1")?
        .serve_at("/io/tern/Daemon1", Daemon1::new(control, state_dir))?
        .build()
        .await
}
