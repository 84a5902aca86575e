//! Every command, declared once: its wire name, its arguments (the struct), whether it
//! changes the box's state (and so may have to be signed on MQTT), who may call it on the
//! box's bus, on which surfaces it is offered, and its handler.
//!
//! ```text
//!  MQTT  cmd/<name> {args} ─► TABLE[name] ─► parse JSON into the command ─┐
//!  D-Bus method(typed args) ─► the command, built directly ───────────────┼─► Command::run
//!  ternctl ─► D-Bus                                                       ┘
//! ```
//!
//! Adding a command: a struct with its arguments, an `impl Command` with its [`Spec`] and
//! handler, a line in [`TABLE`]; then, if apps on the box may call it, a D-Bus method that
//! builds the struct (and, for `Access::Anyone`, an allow line in the bus policy, which a
//! test checks against this table).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{CmdError, Code, Control, ServiceRequest};
use crate::engine::Input;
use crate::events::LocalEvent;
use crate::update::{InstallCallError, InstallError};

/// Who may call a command on the box's bus. The bus policy (`configs/io.tern.Daemon1.conf`)
/// enforces it; on MQTT the broker's ACLs and, for state-changing commands, signatures do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every local user: reading, and running inferences.
    Anyone,
    /// root and the `tern` group: changing state.
    Operator,
}

/// What a command is, apart from what it does.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// The wire name (`cmd/<name>` on MQTT).
    pub name: &'static str,
    /// Changes the box's state: must be signed where the policy says so, and is logged.
    pub changes_state: bool,
    pub access: Access,
    /// Offered to the fleet over MQTT.
    pub fleet: bool,
    /// The D-Bus methods that run it, if apps on the box may.
    pub dbus: &'static [&'static str],
}

type Reply = Result<Value, CmdError>;
type Boxed = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// A command: its arguments are the struct's fields.
pub trait Command: Sized + Send + 'static {
    const SPEC: Spec;
    /// Build the command from its JSON arguments (`{}` when it has none).
    fn parse(args: Value) -> Result<Self, CmdError>;
    fn run(self, c: &Control) -> impl Future<Output = Reply> + Send;
}

/// A command as the table holds it: run from JSON arguments by name.
pub struct Entry {
    pub spec: Spec,
    run: fn(Control, Value) -> Boxed,
    check: fn(Value) -> Result<(), CmdError>,
}

impl Entry {
    /// Parse `args` and run the command.
    pub fn run(&self, c: &Control, args: Value) -> Boxed {
        (self.run)(c.clone(), args)
    }

    /// Parse `args` only: whether the command would take them.
    pub fn check(&self, args: Value) -> Result<(), CmdError> {
        (self.check)(args)
    }
}

const fn entry<C: Command>() -> Entry {
    Entry {
        spec: C::SPEC,
        run: run_json::<C>,
        check: check_json::<C>,
    }
}

fn check_json<C: Command>(args: Value) -> Result<(), CmdError> {
    C::parse(args).map(drop)
}

fn run_json<C: Command>(c: Control, args: Value) -> Boxed {
    Box::pin(async move { C::parse(args)?.run(&c).await })
}

/// Every command, in the order `unknown_command` lists them.
pub static TABLE: &[Entry] = &[
    entry::<Ping>(),
    entry::<Status>(),
    entry::<ModelsList>(),
    entry::<Activate>(),
    entry::<Rollback>(),
    entry::<ShadowStart>(),
    entry::<ShadowPromote>(),
    entry::<ShadowDrop>(),
    entry::<Infer>(),
    entry::<ResultsQuery>(),
    entry::<Reload>(),
    entry::<LogLevel>(),
    entry::<PipelinesList>(),
    entry::<PipelineStart>(),
    entry::<PipelineStop>(),
    entry::<CaptureExport>(),
    entry::<CaptureClear>(),
    entry::<UpdateGet>(),
    entry::<UpdateInstall>(),
];

/// The command called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static Entry> {
    TABLE.iter().find(|e| e.spec.name == name)
}

/// The names of the fleet's commands, for `unknown_command` replies.
pub fn fleet_names() -> Vec<&'static str> {
    TABLE
        .iter()
        .filter(|e| e.spec.fleet)
        .map(|e| e.spec.name)
        .collect()
}

/// `args` (`null` for none) into `T`, or a `bad_request` naming the command.
fn args<T: for<'de> Deserialize<'de>>(name: &str, v: Value) -> Result<T, CmdError> {
    let v = if v.is_null() { json!({}) } else { v };
    serde_json::from_value(v)
        .map_err(|e| CmdError::new(Code::BadRequest, format!("{name} arguments: {e}")))
}

const READ: Spec = Spec {
    name: "",
    changes_state: false,
    access: Access::Anyone,
    fleet: true,
    dbus: &[],
};

const CHANGE: Spec = Spec {
    name: "",
    changes_state: true,
    access: Access::Operator,
    fleet: true,
    dbus: &[],
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {}

impl Command for Ping {
    const SPEC: Spec = Spec {
        name: "ping",
        ..READ
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        Ok(json!({"pong": true, "uptime_s": c.uptime_s()}))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {}

impl Command for Status {
    const SPEC: Spec = Spec {
        name: "status",
        dbus: &["Status"],
        ..READ
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        c.status().await
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsList {}

impl Command for ModelsList {
    const SPEC: Spec = Spec {
        name: "models.list",
        dbus: &["ListModels"],
        ..READ
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        let rows = c.registry().list().await?;
        Ok(serde_json::to_value(rows).expect("rows serialise"))
    }
}

#[derive(Debug)]
pub struct Activate {
    pub name: String,
    pub version: semver::Version,
    /// Activate a version below the anti-rollback floor or marked failed. Over MQTT only in
    /// a signed command (see `fleet::commands`).
    pub force: bool,
}

impl Activate {
    /// From the version as text, as both surfaces give it.
    pub fn new(name: String, version: &str) -> Result<Activate, CmdError> {
        let version = semver::Version::parse(version).map_err(|e| {
            CmdError::new(
                Code::BadRequest,
                format!("models.activate arguments: version `{version}`: {e}"),
            )
        })?;
        Ok(Activate {
            name,
            version,
            force: false,
        })
    }
}

impl Command for Activate {
    const SPEC: Spec = Spec {
        name: "models.activate",
        dbus: &["Activate"],
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct A {
            name: String,
            version: String,
            #[serde(default)]
            force: bool,
        }
        let a: A = args(Self::SPEC.name, v)?;
        Ok(Activate {
            force: a.force,
            ..Activate::new(a.name, &a.version)?
        })
    }
    async fn run(self, c: &Control) -> Reply {
        let Activate {
            name,
            version,
            force,
        } = self;
        let reg = c.registry();
        let active = reg.active_version(&name);
        if !force && active.as_ref() != Some(&version) {
            // Going back is `models.rollback`; anything further needs the operator to say so.
            let row = reg.row(&name, &version.to_string()).await?;
            if let Some(r) = row.filter(|r| r.state == crate::registry::VersionState::Failed) {
                return Err(CmdError::new(
                    Code::Conflict,
                    format!(
                        "{name} {version} is marked failed ({}); activating it needs `force` (in a signed command)",
                        r.failure.as_deref().unwrap_or("no reason recorded")
                    ),
                ));
            }
            if let Some(highest) = reg.highest(&name).await?.filter(|h| *h > version) {
                return Err(CmdError::new(
                    Code::Conflict,
                    format!(
                        "{name} {version} is below the anti-rollback floor ({highest} was installed); \
                         go back with models.rollback, or activate it with `force` (in a signed command)"
                    ),
                ));
            }
        }
        let settings = c.state().config.pools().get(&name);
        c.registry().activate(&name, &version, settings).await?;
        c.event(json!({"event": "model.activated", "model": name, "version": version.to_string(), "by": "command"}))
            .await;
        c.local(LocalEvent::ModelActivated {
            model: name.clone(),
            version: version.to_string(),
        });
        Ok(json!({"model": name, "active": version.to_string()}))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    pub name: String,
}

impl Command for Rollback {
    const SPEC: Spec = Spec {
        name: "models.rollback",
        dbus: &["Rollback"],
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        let name = self.name;
        let (from, to) = c.registry().rollback(&name).await?;
        c.event(json!({"event": "model.rolled_back", "model": name, "from": from, "to": to, "by": "command"}))
            .await;
        c.local(LocalEvent::ModelActivated {
            model: name.clone(),
            version: to.clone(),
        });
        Ok(json!({"model": name, "from": from, "active": to}))
    }
}

/// `models.shadow`: run an installed version as a shadow of the active one.
#[derive(Debug)]
pub struct ShadowStart {
    pub name: String,
    pub version: semver::Version,
    pub spec: tern_update::bundle::ShadowSpec,
}

impl Command for ShadowStart {
    const SPEC: Spec = Spec {
        name: "models.shadow",
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        let bad =
            |m: String| CmdError::new(Code::BadRequest, format!("models.shadow arguments: {m}"));
        let Value::Object(mut m) = v else {
            return Err(bad("an object with name and version is needed".into()));
        };
        let mut text = |k: &str| match m.remove(k) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(bad(format!("`{k}` must be a string, not {other}"))),
            None => Err(bad(format!("`{k}` is missing"))),
        };
        let (name, version) = (text("name")?, text("version")?);
        let version = semver::Version::parse(&version)
            .map_err(|e| bad(format!("version `{version}`: {e}")))?;
        // The rest is the spec, with its defaults.
        let spec: tern_update::bundle::ShadowSpec =
            serde_json::from_value(Value::Object(m)).map_err(|e| bad(e.to_string()))?;
        spec.check().map_err(bad)?;
        Ok(ShadowStart {
            name,
            version,
            spec,
        })
    }
    async fn run(self, c: &Control) -> Reply {
        let s = c
            .registry()
            .shadow_start(
                &self.name,
                &self.version,
                self.spec,
                crate::shadow::Origin::Command,
            )
            .await?;
        let report = s.report();
        c.event(json!({"event": "shadow.started", "model": self.name,
                       "version": self.version.to_string(), "by": "command", "shadow": report}))
            .await;
        Ok(report)
    }
}

/// `models.shadow.promote` and `.drop`: the operator's verdict on a model's shadow.
async fn shadow_verdict(c: &Control, name: &str, promote: bool) -> Reply {
    let s = c
        .registry()
        .shadows()
        .get(name)
        .ok_or_else(|| CmdError::new(Code::NotFound, format!("no shadow of `{name}` runs")))?;
    let word = if promote { "promoted" } else { "dropped" };
    if !s.decide(promote, &format!("{word} by command")) {
        return Err(CmdError::new(
            Code::Conflict,
            format!("the shadow of {name} {} has its verdict already", s.version),
        ));
    }
    // Recorded before the answer: whoever acts on it (the updater, or the shadow task) may
    // do so from now on, even after a restart.
    crate::shadow::flush(c.registry().shadows(), c.store(), c.outbox()).await?;
    if s.recorded_verdict().is_none() {
        // Not in the database yet (another flush failed with it): the shadow task writes it.
        return Err(CmdError::new(
            Code::Internal,
            "the verdict is taken but not recorded yet; it will be".to_string(),
        ));
    }
    Ok(s.report())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowPromote {
    pub name: String,
}

impl Command for ShadowPromote {
    const SPEC: Spec = Spec {
        name: "models.shadow.promote",
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        shadow_verdict(c, &self.name, true).await
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowDrop {
    pub name: String,
}

impl Command for ShadowDrop {
    const SPEC: Spec = Spec {
        name: "models.shadow.drop",
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        shadow_verdict(c, &self.name, false).await
    }
}

/// How long an `infer` command waits for its model.
pub const INFER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug)]
pub struct Infer {
    pub model: String,
    pub input: Input,
}

impl Infer {
    /// A tensor given as JSON (nested arrays of numbers).
    pub fn tensor(model: String, tensor: &Value) -> Result<Infer, CmdError> {
        let bytes = serde_json::to_vec(tensor).expect("JSON values serialise");
        Ok(Infer {
            model,
            input: Input::from_json(&bytes)?,
        })
    }
}

impl Command for Infer {
    const SPEC: Spec = Spec {
        name: "infer",
        dbus: &["Infer", "InferTensor"],
        ..READ
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct A {
            model: String,
            /// A string: base64 of PNG or JPEG bytes. Anything else: a JSON tensor.
            input: Value,
        }
        let a: A = args(Self::SPEC.name, v)?;
        match a.input {
            Value::String(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| {
                        CmdError::new(
                            Code::BadRequest,
                            format!("infer arguments: input is not base64: {e}"),
                        )
                    })?;
                Ok(Infer {
                    model: a.model,
                    input: Input::Encoded(bytes),
                })
            }
            other => Infer::tensor(a.model, &other),
        }
    }
    async fn run(self, c: &Control) -> Reply {
        let Infer { model, input } = self;
        let pool = c.registry().pool(&model).ok_or_else(|| {
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
}

/// Most rows one `results.query` returns.
pub const MAX_QUERY_LIMIT: u32 = 1000;

fn default_limit() -> u32 {
    100
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsQuery {
    #[serde(default)]
    pub since: i64,
    /// With `since`: only results after the one with this id at that timestamp (a page's
    /// `next_after`), so paging never repeats or skips rows that share a timestamp.
    pub after: Option<i64>,
    #[serde(default = "default_limit")]
    pub limit: u32,
}

impl ResultsQuery {
    fn check(self) -> Result<Self, CmdError> {
        if self.limit == 0 || self.limit > MAX_QUERY_LIMIT {
            return Err(CmdError::new(
                Code::BadRequest,
                format!("results.query arguments: limit must be 1 to {MAX_QUERY_LIMIT}"),
            ));
        }
        Ok(self)
    }
}

impl Command for ResultsQuery {
    const SPEC: Spec = Spec {
        name: "results.query",
        dbus: &["QueryResults", "QueryResultsAfter"],
        ..READ
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args::<Self>(Self::SPEC.name, v)?.check()
    }
    async fn run(self, c: &Control) -> Reply {
        let q = self.check()?;
        c.results(q.since, q.after, q.limit).await
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reload {}

impl Command for Reload {
    const SPEC: Spec = Spec {
        name: "config.reload",
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        c.ask_service(ServiceRequest::Reload(tx)).await?;
        match rx.await {
            Ok(Ok(summary)) => Ok(json!({"status": summary})),
            Ok(Err(why)) => Err(CmdError::new(Code::Conflict, why.to_string())),
            Err(_) => Err(super::stopping()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLevel {
    pub level: String,
}

impl Command for LogLevel {
    const SPEC: Spec = Spec {
        name: "log.level",
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        let level = self.level;
        c.set_log_level(&level).map_err(|e| {
            CmdError::new(
                Code::BadRequest,
                format!("`{level}` is not a log filter: {e}"),
            )
        })?;
        tracing::info!(%level, "log level changed by command");
        Ok(json!({"level": level}))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelinesList {}

impl Command for PipelinesList {
    const SPEC: Spec = Spec {
        name: "pipelines.list",
        dbus: &["ListPipelines"],
        ..READ
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        Ok(c.status().await?["pipelines"].take())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineStart {
    pub name: String,
}

impl Command for PipelineStart {
    const SPEC: Spec = Spec {
        name: "pipelines.start",
        dbus: &["StartPipeline"],
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        c.pipeline(self.name, true).await
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineStop {
    pub name: String,
}

impl Command for PipelineStop {
    const SPEC: Spec = Spec {
        name: "pipelines.stop",
        dbus: &["StopPipeline"],
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        c.pipeline(self.name, false).await
    }
}

/// Most samples one `capture.export` sends.
pub const MAX_EXPORT_LIMIT: u32 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureExport {
    pub pipeline: String,
    #[serde(default)]
    pub since: i64,
    #[serde(default = "default_limit")]
    pub limit: u32,
}

impl Command for CaptureExport {
    const SPEC: Spec = Spec {
        name: "capture.export",
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        let a: Self = args(Self::SPEC.name, v)?;
        if a.limit == 0 || a.limit > MAX_EXPORT_LIMIT {
            return Err(CmdError::new(
                Code::BadRequest,
                format!("capture.export arguments: limit must be 1 to {MAX_EXPORT_LIMIT}"),
            ));
        }
        Ok(a)
    }
    async fn run(self, c: &Control) -> Reply {
        c.capture_export(self.pipeline, self.since, self.limit)
            .await
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureClear {
    pub pipeline: Option<String>,
    /// Only samples taken before this time (ms since the epoch).
    pub before: Option<i64>,
}

impl Command for CaptureClear {
    const SPEC: Spec = Spec {
        name: "capture.clear",
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        let CaptureClear { pipeline, before } = self;
        let deleted = c
            .store()
            .call(move |c| {
                Ok(crate::store::clear_captures(
                    c,
                    pipeline.as_deref(),
                    before,
                )?)
            })
            .await?;
        Ok(json!({"deleted": deleted}))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateGet {
    pub id: i64,
}

impl Command for UpdateGet {
    const SPEC: Spec = Spec {
        name: "updates.get",
        dbus: &["GetUpdate"],
        ..READ
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        crate::update::row(c.store(), self.id)
            .await?
            .ok_or_else(|| CmdError::new(Code::NotFound, format!("no update {}", self.id)))
    }
}

/// Install a bundle file on the box; answered with the update (its id, model, version and
/// state) once the bundle's bytes are staged, while the update goes on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateInstall {
    pub path: PathBuf,
}

impl Command for UpdateInstall {
    const SPEC: Spec = Spec {
        name: "updates.install",
        // A path on the box means nothing to the fleet, which sends manifests instead.
        fleet: false,
        dbus: &["InstallBundle"],
        ..CHANGE
    };
    fn parse(v: Value) -> Result<Self, CmdError> {
        args(Self::SPEC.name, v)
    }
    async fn run(self, c: &Control) -> Reply {
        let path = self.path;
        if !path.is_absolute() {
            return Err(CmdError::new(
                Code::BadRequest,
                format!("`{}` is not an absolute path", path.display()),
            ));
        }
        let Some(updater) = c.updater() else {
            return Err(CmdError::new(
                Code::Conflict,
                "updates.keys is empty in the configuration: no bundle can be trusted",
            ));
        };
        // A refused or failed update is a conflict carrying its outcome as JSON, so that a
        // caller can print it; one that goes on is the answer.
        let conflict = |v: Value| CmdError::new(Code::Conflict, v.to_string());
        let id = match updater.install(&path).await {
            Ok(id) => id,
            Err(InstallCallError::Install(e @ InstallError::Busy { .. })) => {
                return Err(CmdError::new(Code::Busy, e.to_string()));
            }
            Err(InstallCallError::Install(InstallError::Refused(e))) => {
                let v = json!({"state": "refused", "code": e.code(), "reason": e.to_string()});
                return Err(conflict(v));
            }
            Err(e @ InstallCallError::Stopped) => {
                return Err(CmdError::new(Code::Internal, e.to_string()));
            }
        };
        let row = crate::update::row(c.store(), id)
            .await?
            .unwrap_or_else(|| json!({"update": id}));
        match row.get("state").and_then(Value::as_str) {
            Some("failed" | "rolled_back") => Err(conflict(row)),
            _ => Ok(row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_changes_are_for_operators() {
        let mut seen = std::collections::HashSet::new();
        for e in TABLE {
            assert!(seen.insert(e.spec.name), "{} twice", e.spec.name);
            assert_eq!(
                e.spec.changes_state,
                e.spec.access == Access::Operator,
                "{}: state-changing commands are for operators, the rest for anyone",
                e.spec.name
            );
            assert!(find(e.spec.name).is_some());
        }
        assert!(find("nope").is_none());
        assert!(!fleet_names().contains(&"updates.install"));
    }

    /// The bus policy lets everyone call exactly the methods of commands for anyone.
    #[test]
    fn the_bus_policy_matches_the_table() {
        let policy = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs/io.tern.Daemon1.conf"),
        )
        .expect("the policy file");
        let open: Vec<&str> = policy
            .lines()
            .filter(|l| l.contains("send_interface=\"io.tern.Daemon1\""))
            .filter_map(|l| l.split("send_member=\"").nth(1)?.split('"').next())
            .collect();
        let mut anyone: Vec<&str> = TABLE
            .iter()
            .filter(|e| e.spec.access == Access::Anyone)
            .flat_map(|e| e.spec.dbus.iter().copied())
            .collect();
        let mut open = open;
        anyone.sort();
        open.sort();
        assert_eq!(open, anyone);
    }
}
