//! Installed model versions, on disk and in the database, and the active version per model.
//!
//! ```text
//!  writers (service, control, update)          readers (status, presence, telemetry,
//!    │ install: verify, copy (no lock held)     infer, pipelines, the watchdog)
//!    │ activate / rollback / reject: load and          │
//!    │   self-test the version (no lock held)          │  snapshot(): the active pools,
//!    ▼                                                 │  never waits on a writer
//!  registry task ── one change at a time: check, one transaction, swap, publish ──► watch
//! ```
//!
//! On disk: `<state_dir>/models/<name>/<version>/`, each a complete copy of a model package,
//! written under a temporary name, fsynced, renamed into place and the directory fsynced, so a
//! crash leaves either no version or a whole one. In the database, one row per version with
//! its state (`installed`, `active`, `previous`, `failed`); every state change is a single
//! transaction, and the in-memory switch happens only after it commits.
//!
//! One task owns the running pools and is the only writer of version states. The slow part
//! of a change (loading and self-testing a model, copying a package) is done by the caller
//! before it asks, so the task's turn is a check, a transaction and a pointer swap: a slow
//! self-test never holds up `status`, an inference or another model's rollback. A version
//! that does not load never becomes active, and a swap never makes requests fail: requests
//! already queued keep the version they took (see `engine::pool`). A pool made at any time
//! (the first version of a model an update brought) is in the next snapshot, which the
//! watchdog reads on every tick.

mod files;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tern_update::Code;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::ModelConfig;
use crate::engine::{
    EngineError, Manifest, Model, ModelPool, PlanChoice, PoolSettings, Pools, RecordedPlan,
    plan_fingerprint,
};
use crate::store::{Store, StoreError, now_ms};

pub use files::{clean_install_copies, clean_temp, package_digest};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("model `{name}` version {version} is already installed with different content")]
    Conflict { name: String, version: String },
    #[error("model `{name}` version {version} is not installed")]
    NotInstalled { name: String, version: String },
    #[error("model `{name}` has no previous version to roll back to")]
    NoPrevious { name: String },
    #[error("model `{name}` is not active")]
    NotActive { name: String },
    #[error("model `{name}` changed while this request ran ({what}); ask again")]
    Moved { name: String, what: String },
    #[error("installing into {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Package { path: PathBuf, message: String },
    #[error("the registry has stopped")]
    Stopped,
    #[error("{0}")]
    Shadow(String),
}

impl RegistryError {
    pub fn code(&self) -> Code {
        match self {
            RegistryError::Engine(e) => e.code(),
            RegistryError::Conflict { .. }
            | RegistryError::NoPrevious { .. }
            | RegistryError::Shadow(_) => Code::Conflict,
            RegistryError::Moved { .. } => Code::Busy,
            RegistryError::NotInstalled { .. } | RegistryError::NotActive { .. } => Code::NotFound,
            RegistryError::Package { .. } => Code::BadRequest,
            RegistryError::Store(_) | RegistryError::Io { .. } | RegistryError::Stopped => {
                Code::Internal
            }
        }
    }
}

/// What became of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    Installed,
    Active,
    /// The one a rollback goes back to.
    Previous,
    /// Refused at load or rejected by an update's health window; never active again.
    Failed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Installed => "installed",
            VersionState::Active => "active",
            VersionState::Previous => "previous",
            VersionState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> VersionState {
        match s {
            "active" => VersionState::Active,
            "previous" => VersionState::Previous,
            "failed" => VersionState::Failed,
            _ => VersionState::Installed,
        }
    }
}

/// One installed version as recorded in the database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRow {
    pub name: String,
    pub version: String,
    pub state: VersionState,
    pub path: PathBuf,
    pub sha256: String,
    pub form: String,
    pub installed_at: i64,
    pub activated_at: Option<i64>,
    pub failure: Option<String>,
    /// The plan `auto` last chose for this package, what each candidate measured, and when
    /// (listings only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plans_tried: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_chosen_at: Option<i64>,
}

/// The result of an install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub name: String,
    pub version: semver::Version,
    /// False if the identical version was already installed.
    pub new: bool,
    /// True if this version was active at some point (it may since have been replaced by an
    /// operator's rollback or an update, which a restart must not undo).
    pub ever_activated: bool,
}

/// The pools serving now, by model name: what every reader sees.
#[derive(Default)]
pub struct Snapshot {
    pools: BTreeMap<String, ModelPool>,
}

impl Snapshot {
    pub fn pool(&self, name: &str) -> Option<&ModelPool> {
        self.pools.get(name)
    }

    /// In name order.
    pub fn pools(&self) -> impl Iterator<Item = &ModelPool> {
        self.pools.values()
    }

    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// `(name, active version)` in name order.
    pub fn versions(&self) -> Vec<(String, String)> {
        self.pools
            .iter()
            .map(|(n, p)| (n.clone(), p.active().version().to_string()))
            .collect()
    }
}

/// A change the registry task carries out: everything slow is done before it is sent.
enum Change {
    /// Serve `model` (a version already active in the database): at start, or after a
    /// fallback found nothing to fall back to.
    Serve {
        model: Arc<Model>,
        settings: PoolSettings,
    },
    /// Make `version` (loaded as `model`) the active one.
    Activate {
        version: String,
        model: Arc<Model>,
        settings: PoolSettings,
    },
    /// Swap the active version `from` with the previous one `to` (loaded as `model`).
    Rollback {
        from: String,
        to: String,
        model: Arc<Model>,
    },
    /// `version` failed for `reason`; `previous` (loaded as `model`) serves again, if given.
    Fail {
        version: String,
        reason: String,
        previous: Option<(String, Arc<Model>, PoolSettings)>,
        /// Only if the version is not the active one (a failed activation).
        unless_active: bool,
    },
    /// New pool settings for the running model (a reload changed them).
    Settings {
        settings: PoolSettings,
        /// The active version loaded again with `settings`, when they change how it runs.
        model: Option<Arc<Model>>,
    },
}

struct Request {
    name: String,
    change: Change,
    reply: oneshot::Sender<Result<(), RegistryError>>,
}

/// Handle to the registry; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    tx: mpsc::Sender<Request>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    store: Store,
    models_dir: PathBuf,
    /// Installs copy one at a time: two of the same version would share a temporary name.
    copying: Arc<tokio::sync::Mutex<()>>,
    /// Writers load models one at a time, so that memory holds one model being loaded on top
    /// of those serving; readers never wait for it.
    loading: Arc<tokio::sync::Mutex<()>>,
    shadows: crate::shadow::Shadows,
}

/// The registry's task: run it (`run`) for as long as the handles are used.
pub struct Task {
    rx: mpsc::Receiver<Request>,
    pools: BTreeMap<String, ModelPool>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    store: Store,
    shadows: crate::shadow::Shadows,
}

impl Registry {
    /// The handle and the task that owns the pools; the task must be run.
    pub fn new(store: Store, state_dir: &Path) -> (Registry, Task) {
        let (tx, rx) = mpsc::channel(16);
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let shadows = crate::shadow::Shadows::default();
        (
            Registry {
                tx,
                snapshot: snap_rx,
                store: store.clone(),
                models_dir: state_dir.join("models"),
                copying: Arc::default(),
                loading: Arc::default(),
                shadows: shadows.clone(),
            },
            Task {
                rx,
                pools: BTreeMap::new(),
                snapshot: snap_tx,
                store,
                shadows,
            },
        )
    }

    /// A registry whose task runs on the current runtime, unsupervised: for tools and tests.
    pub fn spawn(store: Store, state_dir: &Path) -> Registry {
        let (r, task) = Registry::new(store, state_dir);
        tokio::spawn(task.run());
        r
    }

    /// The pools serving now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Changes to the snapshot: a new pool, a swapped version, new settings.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    pub fn pool(&self, name: &str) -> Option<ModelPool> {
        self.snapshot.borrow().pool(name).cloned()
    }

    pub fn shadows(&self) -> &crate::shadow::Shadows {
        &self.shadows
    }

    /// Run installed `version` of `name` as a shadow of its active version, or go on with
    /// the one already running (or recorded, with its tally and any verdict, before a
    /// restart). One shadow per model at a time; never the active version, nor a failed one.
    pub async fn shadow_start(
        &self,
        name: &str,
        version: &semver::Version,
        spec: tern_update::bundle::ShadowSpec,
        origin: crate::shadow::Origin,
    ) -> Result<Arc<crate::shadow::Shadow>, RegistryError> {
        use crate::shadow::{self, Origin, Shadow};
        let v = version.to_string();
        spec.check().map_err(RegistryError::Shadow)?;
        let _one = self.shadows.starting.lock().await;
        if let Some(s) = self.shadows.get(name) {
            if s.version == v && s.origin == origin {
                return Ok(s);
            }
            return Err(RegistryError::Shadow(format!(
                "{name} {} runs as a shadow already (started by {}); drop it first",
                s.version,
                s.origin.as_str()
            )));
        }
        let pool = self.pool(name).ok_or_else(|| RegistryError::NotActive {
            name: name.to_string(),
        })?;
        if pool.active().version() == version {
            return Err(RegistryError::Shadow(format!(
                "{name} {v} is the active version; a shadow runs another"
            )));
        }
        let row = self
            .row(name, &v)
            .await?
            .ok_or_else(|| RegistryError::NotInstalled {
                name: name.to_string(),
                version: v.clone(),
            })?;
        if row.state == VersionState::Failed {
            return Err(RegistryError::Shadow(format!(
                "{name} {v} is marked failed ({})",
                row.failure.as_deref().unwrap_or("no reason recorded")
            )));
        }
        // One inference at a time on one thread: the shadow's share is bounded by its rests.
        let settings = PoolSettings {
            threads: std::num::NonZeroUsize::MIN,
            workers: std::num::NonZeroUsize::MIN,
            ..pool.config()
        };
        let candidate = self.load(&row, settings).await?;
        let (n, vv) = (name.to_string(), v.clone());
        let recorded = self
            .store
            .call(move |c| Ok(shadow::read_row(c, &n, &vv)?))
            .await?;
        let s = match recorded {
            // The same shadow before a restart: its count goes on, and a verdict recorded but
            // not yet acted on is acted on now (by its updater, or by the shadow task).
            Some(r) if r.origin == origin && !r.acted => Shadow::start(
                r.origin,
                r.spec,
                candidate,
                r.started_ms,
                r.tally,
                r.verdict,
            ),
            // An update's shadow of this version not done with yet (its updater takes it up):
            // a command must not start its count over.
            Some(r) if r.origin == Origin::Update && !r.acted => {
                return Err(RegistryError::Shadow(format!(
                    "{name} {v} is an update's shadow not yet judged; its update takes it up"
                )));
            }
            _ => {
                let s = Shadow::start(
                    origin,
                    spec,
                    candidate,
                    crate::store::now_ms(),
                    Default::default(),
                    None,
                );
                let fresh = s.clone();
                self.store
                    .call(move |c| Ok(shadow::write_new(c, &fresh)?))
                    .await?;
                s
            }
        };
        // In the map first, then on the pool serving now (not the one read before the load:
        // a reload may have rebuilt it meanwhile, and a rebuild takes its shadow from the map).
        self.shadows.insert(s.clone());
        if s.recorded_verdict().is_none() {
            self.pool(name)
                .unwrap_or(pool.clone())
                .set_shadow(Some(s.clone()));
        }
        tracing::info!(model = name, version = %v, against = %pool.active().version(), origin = s.origin.as_str(), "shadow running");
        Ok(s)
    }

    /// Take up a shadow `models.shadow` started before a restart, with its recorded spec.
    pub async fn shadow_resume(
        &self,
        name: &str,
        version: &semver::Version,
    ) -> Result<Arc<crate::shadow::Shadow>, RegistryError> {
        let (n, v) = (name.to_string(), version.to_string());
        let row = self
            .store
            .call(move |c| Ok(crate::shadow::read_row(c, &n, &v)?))
            .await?
            .ok_or_else(|| RegistryError::Shadow(format!("no shadow of {name} {version}")))?;
        self.shadow_start(name, version, row.spec, crate::shadow::Origin::Command)
            .await
    }

    /// Stop `name`'s shadow of `version`; its record stays, marked as done with (a later
    /// shadow of the version starts a new count).
    pub async fn shadow_end(&self, name: &str, version: &str) {
        if let Some(s) = self.shadows.remove(name, version)
            && let Some(pool) = self.pool(name)
            && pool.shadow().is_some_and(|p| Arc::ptr_eq(&p, &s))
        {
            pool.set_shadow(None);
        }
        let (n, v) = (name.to_string(), version.to_string());
        let marked = self
            .store
            .call(move |c| {
                c.execute(
                    "UPDATE shadows SET acted = 1 WHERE model = ?1 AND version = ?2",
                    [n, v],
                )?;
                Ok(())
            })
            .await;
        if let Err(e) = marked {
            // Taken up again after a restart, then ended again.
            tracing::warn!(model = name, %version, error = %e, "ended shadow not marked");
        }
    }

    /// The version of `name` now serving requests.
    pub fn active_version(&self, name: &str) -> Option<semver::Version> {
        self.pool(name).map(|p| p.active().version().clone())
    }

    async fn ask(&self, name: &str, change: Change) -> Result<(), RegistryError> {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            name: name.to_string(),
            change,
            reply,
        };
        self.tx
            .send(req)
            .await
            .map_err(|_| RegistryError::Stopped)?;
        rx.await.map_err(|_| RegistryError::Stopped)?
    }

    pub async fn list(&self) -> Result<Vec<VersionRow>, RegistryError> {
        Ok(self
            .store
            .call(|c| {
                let mut stmt = c.prepare(
                    "SELECT v.name, v.version, v.state, v.path, v.sha256, v.form, v.installed_at,
                            v.activated_at, v.failure, p.plan, p.tried, p.chosen_at
                     FROM model_versions v LEFT JOIN (
                         SELECT sha256, plan, tried, max(chosen_at) AS chosen_at
                         FROM model_plans GROUP BY sha256
                     ) p ON p.sha256 = v.sha256
                     ORDER BY v.name, v.installed_at, v.version",
                )?;
                let rows = stmt
                    .query_map([], |r| {
                        let mut v = row_to_version(r)?;
                        let tried: Option<String> = r.get(10)?;
                        v.plan = r.get(9)?;
                        v.plans_tried = tried
                            .and_then(|t| serde_json::from_str(&t).ok())
                            .unwrap_or_default();
                        v.plan_chosen_at = r.get(11)?;
                        Ok(v)
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// Load every version recorded as active. One that no longer loads (damaged file, a tract
    /// that disagrees with its golden vectors) is marked failed and its previous version, if
    /// any, is activated instead. Returns the problems met.
    pub async fn start(&self, pools: &Pools) -> Vec<RegistryError> {
        let mut problems = Vec::new();
        let rows = match self.list().await {
            Ok(rows) => rows,
            Err(e) => return vec![e],
        };
        for row in rows.into_iter().filter(|r| r.state == VersionState::Active) {
            let settings = pools.get(&row.name);
            let outcome = match self.load(&row, settings).await {
                Ok(model) => self.ask(&row.name, Change::Serve { model, settings }).await,
                Err(e) => {
                    tracing::error!(model = %row.name, version = %row.version, error = %e, "active version does not load");
                    let reason = e.to_string();
                    problems.push(e.into());
                    self.fall_back(&row.name, &row.version, &reason, settings)
                        .await
                }
            };
            if let Err(e) = outcome {
                problems.push(e);
            }
        }
        problems
    }

    /// Mark `version` failed and activate the previous version, if there is one.
    async fn fall_back(
        &self,
        name: &str,
        version: &str,
        reason: &str,
        settings: PoolSettings,
    ) -> Result<(), RegistryError> {
        let fail = |previous| Change::Fail {
            version: version.to_string(),
            reason: reason.to_string(),
            previous,
            unless_active: false,
        };
        let Some(prev) = self.previous(name).await? else {
            return self.ask(name, fail(None)).await;
        };
        let model = match self.load(&prev, settings).await {
            Ok(m) => m,
            Err(e) => {
                self.ask(name, fail(None)).await?;
                return Err(e.into());
            }
        };
        self.ask(name, fail(Some((prev.version.clone(), model, settings))))
            .await?;
        tracing::warn!(model = name, from = version, to = %prev.version, "rolled back to the previous version");
        Ok(())
    }

    /// Bring the registry in line with the configured models: install each package if new,
    /// and activate it if the model has no active version or this version was never active.
    /// A version activated later by an operator (rollback, update) is left active across
    /// restarts as long as the configured package does not change.
    pub async fn apply(&self, models: &[ModelConfig]) -> Vec<RegistryError> {
        let mut problems = Vec::new();
        for m in models {
            let installed = match self.install(&m.package, m.pool).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(model = %m.name, package = %m.package.display(), error = %e, "model not installed");
                    problems.push(e);
                    continue;
                }
            };
            let active = self.pool(&m.name);
            let active_version = active.as_ref().map(|p| p.active().version().clone());
            // A configured version that was never active is one the operator has just put in
            // the config (or one whose activation a crash interrupted): activate it. One that
            // has been active and was replaced since stays replaced.
            let needs = match &active_version {
                None => true,
                Some(a) => !installed.ever_activated && a != &installed.version,
            };
            if !needs
                && let Some(a) = &active_version
                && a != &installed.version
            {
                tracing::warn!(
                    model = %m.name,
                    configured = %installed.version,
                    active = %a,
                    "keeping the active version: the configured one was active before and was replaced since (rollback or update)"
                );
            }
            let done = if needs {
                self.activate(&m.name, &installed.version, m.pool).await
            } else if let Some(p) = active.filter(|p| p.config() != m.pool) {
                if let Err(e) = self.resettle(&m.name, &p, m.pool).await {
                    tracing::error!(model = %m.name, error = %e, "new settings not applied; serving with the old ones");
                    problems.push(e);
                }
                continue;
            } else {
                Ok(())
            };
            if let Err(e) = done {
                tracing::error!(model = %m.name, error = %e, "model not activated");
                problems.push(e);
            }
        }
        problems
    }

    /// Serve the active version of `name` (running in `pool`) with new pool settings. Threads,
    /// runtime, plan and workers are part of the loaded model (its executor, its plans,
    /// onnxruntime's session per worker), so a change to one of them loads the version again
    /// with them, its golden vectors checked, before the new pool takes it; the queue alone
    /// only needs the new pool. A version that no longer loads keeps serving as it was.
    async fn resettle(
        &self,
        name: &str,
        pool: &ModelPool,
        settings: PoolSettings,
    ) -> Result<(), RegistryError> {
        let old = pool.config();
        let model = if (old.threads, old.runtime, old.plan, old.workers)
            != (
                settings.threads,
                settings.runtime,
                settings.plan,
                settings.workers,
            ) {
            let version = pool.active().version().to_string();
            let row =
                self.row(name, &version)
                    .await?
                    .ok_or_else(|| RegistryError::NotInstalled {
                        name: name.to_string(),
                        version,
                    })?;
            Some(self.load(&row, settings).await?)
        } else {
            None
        };
        self.ask(name, Change::Settings { settings, model }).await
    }

    /// Verify and copy a model package into the state directory. The package is loaded and
    /// self-tested first: nothing is written for a package that would be refused.
    /// Verification runs with `settings`, the pool's the version will serve in: the plans it
    /// may use are the ones that must pass.
    pub async fn install(
        &self,
        package: &Path,
        settings: PoolSettings,
    ) -> Result<Installed, RegistryError> {
        let package = package.to_path_buf();
        // Hashing and the manifest are cheap; loading and self-testing the model is not, and
        // an identical version already installed was verified when it was installed (and is
        // self-tested again whenever it is loaded to run), so only a new version pays for it.
        let (manifest, digest) = blocking(&package, "verification", {
            let package = package.clone();
            move || -> Result<(Manifest, String), RegistryError> {
                Ok((Manifest::read(&package)?, package_digest(&package)?))
            }
        })
        .await?;
        if let Some(done) = self.installed(&manifest, &digest).await? {
            return Ok(done);
        }
        // Verify before touching disk: a package that would be refused is never copied.
        {
            let _turn = self.loading.lock().await;
            // On a blocking thread, as the verification itself: a `:hang` there must not park
            // one of the runtime's workers.
            let _ = tokio::task::spawn_blocking(|| crate::crash_point("install:verifying")).await;
            // The plan chosen here is recorded for the package: activating it takes that plan
            // without timing every plan again.
            let model = load_model(&self.store, package.clone(), &digest, settings).await?;
            // The evaluation gate, on the plan just chosen (the one it will serve with).
            let verdict = tokio::task::spawn_blocking(move || model.evaluate())
                .await
                .expect("evaluation task panicked")?;
            if let Some(v) = verdict {
                if !v.passed {
                    return Err(EngineError::Evaluation {
                        model: manifest.name.clone(),
                        message: v.to_string(),
                    }
                    .into());
                }
                tracing::info!(model = %manifest.name, version = %manifest.version, evaluation = %v, "evaluation passed");
            }
        }
        let _copying = self.copying.lock().await;
        // Another install of the same version may have finished while this one verified.
        if let Some(done) = self.installed(&manifest, &digest).await? {
            return Ok(done);
        }
        let (name, version) = (manifest.name.clone(), manifest.version.to_string());
        let existing = self.row(&name, &version).await?;
        let dest = match &existing {
            Some(row) => row.path.clone(),
            None => self.models_dir.join(&name).join(&version),
        };
        blocking(&dest, "copy", {
            let dest = dest.clone();
            move || files::copy_package(&package, &dest)
        })
        .await?;
        crate::crash_point("install:copied");
        if existing.is_none() {
            let row = (
                name.clone(),
                version.clone(),
                dest.display().to_string(),
                digest,
                manifest.form.clone(),
            );
            self.store
                .call(move |c| {
                    c.execute(
                        "INSERT OR IGNORE INTO model_versions (name, version, state, path, sha256, form, installed_at)
                         VALUES (?1, ?2, 'installed', ?3, ?4, ?5, ?6)",
                        params![row.0, row.1, row.2, row.3, row.4, now_ms()],
                    )?;
                    Ok(())
                })
                .await?;
            tracing::info!(model = %name, %version, path = %dest.display(), "installed");
        }
        crate::crash_point("install:recorded");
        Ok(Installed {
            name,
            version: manifest.version,
            new: existing.is_none(),
            ever_activated: existing.is_some_and(|r| r.activated_at.is_some()),
        })
    }

    /// The install of this exact package, if it is recorded and its copy is whole; a
    /// conflict if the same version was installed with other content.
    async fn installed(
        &self,
        manifest: &Manifest,
        digest: &str,
    ) -> Result<Option<Installed>, RegistryError> {
        let (name, version) = (manifest.name.clone(), manifest.version.to_string());
        let Some(row) = self.row(&name, &version).await? else {
            return Ok(None);
        };
        if row.sha256 != digest {
            return Err(RegistryError::Conflict { name, version });
        }
        // Recorded already. Make sure the copy is still whole (power lost before its
        // directory entries reached the disk, or the flash rotted) and recopy it if not.
        let (path, want) = (row.path.clone(), digest.to_string());
        let intact = tokio::task::spawn_blocking(move || package_digest(&path).ok())
            .await
            .ok()
            .flatten()
            .is_some_and(|d| d == want);
        if !intact {
            tracing::warn!(model = %name, %version, path = %row.path.display(), "installed copy is missing or damaged; copying it again");
            return Ok(None);
        }
        Ok(Some(Installed {
            name,
            version: manifest.version.clone(),
            new: false,
            ever_activated: row.activated_at.is_some(),
        }))
    }

    /// Make an installed version the active one. It is loaded and self-tested first; the
    /// database switch is one transaction; then new requests go to it while requests in
    /// flight finish on the old one.
    pub async fn activate(
        &self,
        name: &str,
        version: &semver::Version,
        settings: PoolSettings,
    ) -> Result<(), RegistryError> {
        let v = version.to_string();
        let row = self
            .row(name, &v)
            .await?
            .ok_or_else(|| RegistryError::NotInstalled {
                name: name.to_string(),
                version: v.clone(),
            })?;
        if row.state == VersionState::Active && self.active_version(name).as_ref() == Some(version)
        {
            return Ok(());
        }
        let model = match self.load(&row, settings).await {
            Ok(m) => m,
            Err(e) => {
                let fail = Change::Fail {
                    version: v,
                    reason: e.to_string(),
                    previous: None,
                    unless_active: true,
                };
                self.ask(name, fail).await?;
                return Err(e.into());
            }
        };
        let change = Change::Activate {
            version: v,
            model,
            settings,
        };
        self.ask(name, change).await?;
        tracing::info!(model = name, %version, "activated");
        Ok(())
    }

    /// Swap the active and previous versions of `name`. Returns (from, to).
    pub async fn rollback(&self, name: &str) -> Result<(String, String), RegistryError> {
        let pool = self.pool(name).ok_or_else(|| RegistryError::NotActive {
            name: name.to_string(),
        })?;
        let prev = self.previous_to_go_back_to(name).await?;
        let model = self.load(&prev, pool.config()).await?;
        let (from, to) = (pool.active().version().to_string(), prev.version.clone());
        let change = Change::Rollback {
            from: from.clone(),
            to: to.clone(),
            model,
        };
        self.ask(name, change).await?;
        tracing::info!(model = name, %from, %to, "rolled back");
        Ok((from, to))
    }

    /// The highest version of `name` ever installed, whatever became of it: an update must
    /// go above it (anti-rollback). Version rows are never deleted, so this is durable.
    pub async fn highest(&self, name: &str) -> Result<Option<semver::Version>, RegistryError> {
        let n = name.to_string();
        let versions: Vec<String> = self
            .store
            .call(move |c| {
                let mut stmt = c.prepare("SELECT version FROM model_versions WHERE name = ?1")?;
                let v = stmt
                    .query_map([n], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(v)
            })
            .await?;
        Ok(versions
            .iter()
            .filter_map(|v| semver::Version::parse(v).ok())
            .max())
    }

    /// Take the active `version` of `name` out of service for `reason`: it is marked failed
    /// (an operator's rollback can never bring it back) and the previous version serves again,
    /// in one transaction and an in-place swap. Returns the version now active.
    pub async fn reject_active(
        &self,
        name: &str,
        version: &semver::Version,
        reason: &str,
    ) -> Result<String, RegistryError> {
        let pool = self.pool(name);
        let active = pool.as_ref().map(|p| p.active().version().clone());
        let fail = |previous| Change::Fail {
            version: version.to_string(),
            reason: reason.to_string(),
            previous,
            unless_active: false,
        };
        if active.as_ref() != Some(version) {
            // Already replaced (a restart fell back, or an operator moved on): only mark it.
            self.ask(name, fail(None)).await?;
            return Ok(active.map(|v| v.to_string()).unwrap_or_default());
        }
        let prev = self.previous_to_go_back_to(name).await?;
        let settings = pool.map(|p| p.config()).unwrap_or_default();
        let model = self.load(&prev, settings).await?;
        self.ask(name, fail(Some((prev.version.clone(), model, settings))))
            .await?;
        // What serves now: the previous version, unless another change came first.
        let now = self.active_version(name).map(|v| v.to_string());
        tracing::warn!(model = name, from = %version, to = ?now, %reason, "new version rejected");
        Ok(now.unwrap_or_default())
    }

    /// Load and self-test a version for serving, in turn with other writers' loads.
    async fn load(
        &self,
        row: &VersionRow,
        settings: PoolSettings,
    ) -> Result<Arc<Model>, EngineError> {
        let _turn = self.loading.lock().await;
        load_model(&self.store, row.path.clone(), &row.sha256, settings).await
    }

    pub async fn row(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<VersionRow>, RegistryError> {
        let (n, v) = (name.to_string(), version.to_string());
        Ok(self
            .store
            .call(move |c| Ok(version_row(c, &n, &v)?))
            .await?)
    }

    /// The version a rollback of `name` goes back to, or why there is none.
    async fn previous_to_go_back_to(&self, name: &str) -> Result<VersionRow, RegistryError> {
        self.previous(name)
            .await?
            .ok_or_else(|| RegistryError::NoPrevious {
                name: name.to_string(),
            })
    }

    /// The version a rollback would bring back, if any.
    pub async fn previous(&self, name: &str) -> Result<Option<VersionRow>, RegistryError> {
        let n = name.to_string();
        Ok(self.store.call(move |c| Ok(previous_row(c, &n)?)).await?)
    }
}

impl Task {
    /// Carry out changes until every handle is gone.
    pub async fn run(self) {
        self.run_until(CancellationToken::new()).await
    }

    /// Carry out changes until every handle is gone or `cancel`; a change begun is finished.
    pub async fn run_until(mut self, cancel: CancellationToken) {
        loop {
            let req = tokio::select! {
                _ = cancel.cancelled() => return,
                req = self.rx.recv() => match req {
                    Some(r) => r,
                    None => return,
                },
            };
            let r = self.apply(&req.name, req.change).await;
            let _ = req.reply.send(r);
        }
    }

    async fn apply(&mut self, name: &str, change: Change) -> Result<(), RegistryError> {
        let n = name.to_string();
        match change {
            Change::Serve { model, settings } => {
                self.switch(name, model, settings);
            }
            Change::Settings { settings, model } => {
                if let Some(pool) = self.pools.get(name) {
                    // Worker count and queue are fixed per pool: start a new pool on the same
                    // version; the old one finishes its queue and ends. Another version made
                    // active while this one reloaded was loaded with the old settings: they
                    // stay, and the next reload tries again.
                    let model = match model {
                        Some(m) if m.version() != pool.active().version() => {
                            return Err(RegistryError::Moved {
                                name: n,
                                what: format!(
                                    "version {} became active while {} reloaded",
                                    pool.active().version(),
                                    m.version()
                                ),
                            });
                        }
                        Some(m) => m,
                        None => pool.active(),
                    };
                    // From the running shadows, not the old pool: one ended meanwhile is not
                    // carried over.
                    let shadow = self
                        .shadows
                        .get(&n)
                        .filter(|s| s.recorded_verdict().is_none());
                    let pool = ModelPool::spawn(model, settings);
                    pool.set_shadow(shadow);
                    self.pools.insert(n, pool);
                    self.publish();
                }
            }
            Change::Activate {
                version,
                model,
                settings,
            } => {
                let v = version.clone();
                self.store
                    .call(move |c| {
                        let tx = c.transaction()?;
                        // Checked here, in the writer's turn: the row may have changed
                        // while the caller loaded the model.
                        match version_row(&tx, &n, &v)? {
                            None => {
                                return Ok(Err(RegistryError::NotInstalled { name: n, version: v }));
                            }
                            // Active in the database, not yet served (a start that fell
                            // through): nothing to record, and its previous stays.
                            Some(r) if r.state == VersionState::Active => return Ok(Ok(())),
                            Some(_) => {}
                        }
                        tx.execute(
                            "UPDATE model_versions SET state = 'installed' WHERE name = ?1 AND state = 'previous'",
                            params![n],
                        )?;
                        tx.execute(
                            "UPDATE model_versions SET state = 'previous' WHERE name = ?1 AND state = 'active' AND version != ?2",
                            params![n, v],
                        )?;
                        tx.execute(
                            "UPDATE model_versions SET state = 'active', activated_at = ?3, failure = NULL
                             WHERE name = ?1 AND version = ?2",
                            params![n, v, now_ms()],
                        )?;
                        tx.commit()?;
                        Ok(Ok(()))
                    })
                    .await??;
                crate::crash_point("activate:committed");
                self.switch(name, model, settings);
            }
            Change::Rollback { from, to, model } => {
                let active = self
                    .pools
                    .get(name)
                    .map(|p| p.active().version().to_string());
                if active.as_deref() != Some(from.as_str()) {
                    return Err(RegistryError::Moved {
                        name: n,
                        what: format!("{from} is no longer the active version"),
                    });
                }
                let settings = self.pools[name].config();
                self.store
                    .call(move |c| {
                        let tx = c.transaction()?;
                        if previous_row(&tx, &n)?.is_none_or(|p| p.version != to) {
                            return Ok(Err(RegistryError::Moved {
                                name: n,
                                what: format!("{to} is no longer the previous version"),
                            }));
                        }
                        tx.execute(
                            "UPDATE model_versions SET state = 'installed' WHERE name = ?1 AND version = ?2",
                            params![n, to],
                        )?;
                        tx.execute(
                            "UPDATE model_versions SET state = 'previous' WHERE name = ?1 AND version = ?2",
                            params![n, from],
                        )?;
                        tx.execute(
                            "UPDATE model_versions SET state = 'active', activated_at = ?3 WHERE name = ?1 AND version = ?2",
                            params![n, to, now_ms()],
                        )?;
                        tx.commit()?;
                        Ok(Ok(()))
                    })
                    .await??;
                self.switch(name, model, settings);
            }
            Change::Fail {
                version,
                reason,
                previous,
                unless_active,
            } => {
                let back = previous.as_ref().map(|(v, _, _)| v.clone());
                let failed = version.clone();
                let swap = self
                    .store
                    .call(move |c| {
                        let tx = c.transaction()?;
                        // Checked in the writer's turn: going back only if `version` is still
                        // the active one and `back` still the one to go back to. If another
                        // change came first, `version` is only marked failed.
                        let active = active_row(&tx, &n)?.map(|r| r.version);
                        let previous = previous_row(&tx, &n)?.map(|r| r.version);
                        let swap = back.is_some()
                            && active.as_deref() == Some(failed.as_str())
                            && previous == back;
                        let guard = if unless_active || (back.is_some() && !swap) {
                            " AND state != 'active'"
                        } else {
                            ""
                        };
                        tx.execute(
                            &format!(
                                "UPDATE model_versions SET state = 'failed', failure = ?3
                                 WHERE name = ?1 AND version = ?2{guard}"
                            ),
                            params![n, failed, reason],
                        )?;
                        if let (true, Some(p)) = (swap, &back) {
                            tx.execute(
                                "UPDATE model_versions SET state = 'active', activated_at = ?3 WHERE name = ?1 AND version = ?2",
                                params![n, p, now_ms()],
                            )?;
                        }
                        tx.commit()?;
                        Ok(swap)
                    })
                    .await?;
                match previous {
                    Some((_, model, settings)) if swap => self.switch(name, model, settings),
                    Some(_) => {
                        tracing::warn!(model = name, %version, "another change came first; the version is only marked failed");
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// Serve `model` for `name`: in its running pool, which pipelines hold (a reload that
    /// changed the pool's settings made a new one already, see [`Change::Settings`]), or in a
    /// new pool with `settings` if the model has none.
    fn switch(&mut self, name: &str, model: Arc<Model>, settings: PoolSettings) {
        match self.pools.get(name) {
            Some(pool) => {
                pool.swap(model);
            }
            None => {
                self.pools
                    .insert(name.to_string(), ModelPool::spawn(model, settings));
            }
        }
        self.publish();
    }

    fn publish(&self) {
        self.snapshot.send_replace(Arc::new(Snapshot {
            pools: self.pools.clone(),
        }));
    }
}

/// The row of `version` of `name`.
fn version_row(
    c: &rusqlite::Connection,
    name: &str,
    version: &str,
) -> rusqlite::Result<Option<VersionRow>> {
    row_where(c, "version = ?2", params![name, version])
}

/// The row of `name` in `state` (`active` and `previous` have one at most).
fn state_row(
    c: &rusqlite::Connection,
    name: &str,
    state: VersionState,
) -> rusqlite::Result<Option<VersionRow>> {
    row_where(c, "state = ?2", params![name, state.as_str()])
}

fn active_row(c: &rusqlite::Connection, name: &str) -> rusqlite::Result<Option<VersionRow>> {
    state_row(c, name, VersionState::Active)
}

fn previous_row(c: &rusqlite::Connection, name: &str) -> rusqlite::Result<Option<VersionRow>> {
    state_row(c, name, VersionState::Previous)
}

fn row_where(
    c: &rusqlite::Connection,
    condition: &str,
    params: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<Option<VersionRow>> {
    c.query_row(
        &format!(
            "SELECT name, version, state, path, sha256, form, installed_at, activated_at, failure
             FROM model_versions WHERE name = ?1 AND {condition}"
        ),
        params,
        row_to_version,
    )
    .optional()
}

fn row_to_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        name: r.get(0)?,
        version: r.get(1)?,
        state: VersionState::parse(&r.get::<_, String>(2)?),
        path: PathBuf::from(r.get::<_, String>(3)?),
        sha256: r.get(4)?,
        form: r.get(5)?,
        installed_at: r.get(6)?,
        activated_at: r.get(7)?,
        failure: r.get(8)?,
        plan: None,
        plans_tried: Vec::new(),
        plan_chosen_at: None,
    })
}

/// The plan recorded for the package with digest `sha256` under `fingerprint`.
fn recorded_plan(
    c: &rusqlite::Connection,
    sha256: &str,
    fingerprint: &str,
) -> rusqlite::Result<Option<RecordedPlan>> {
    c.query_row(
        "SELECT plan, tried FROM model_plans WHERE sha256 = ?1 AND fingerprint = ?2",
        params![sha256, fingerprint],
        |r| {
            let tried: String = r.get(1)?;
            Ok(RecordedPlan {
                plan: r.get(0)?,
                // A damaged list is only lost figures: the plan itself is still self-tested.
                tried: serde_json::from_str(&tried).unwrap_or_default(),
            })
        },
    )
    .optional()
}

/// Run blocking package work off the runtime; a panic in it is an error about `path`.
async fn blocking<T: Send + 'static>(
    path: &Path,
    what: &str,
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Package {
            path: path.to_path_buf(),
            message: format!("{what} failed: {e}"),
        })?
}

/// Load and self-test the package at `path` (whose digest is `sha256`) for serving. With
/// `engine.plan = "auto"`, the plan chosen for this package on this machine before is taken
/// again, untimed; a new choice is recorded. The record is an optimisation: a database that
/// cannot read or write it costs a timing, not the load.
async fn load_model(
    store: &Store,
    path: PathBuf,
    sha256: &str,
    settings: PoolSettings,
) -> Result<Arc<Model>, EngineError> {
    // Only `auto` chooses, so only `auto` needs the fingerprint (which loads onnxruntime's
    // library to name it).
    let fingerprint = match settings.plan {
        PlanChoice::Auto => Some(
            tokio::task::spawn_blocking(move || plan_fingerprint(&settings))
                .await
                .expect("fingerprint task panicked"),
        ),
        _ => None,
    };
    let recorded = match &fingerprint {
        Some(fp) => {
            let (digest, fp) = (sha256.to_string(), fp.clone());
            store
                .call(move |c| Ok(recorded_plan(c, &digest, &fp)?))
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "recorded plan not read; timing every plan");
                    None
                })
        }
        None => None,
    };
    let m = tokio::task::spawn_blocking(move || {
        crate::crash_point("load");
        Model::load_recorded(&path, &settings, recorded.as_ref())
    })
    .await
    .expect("model load task panicked")?;
    if let Some(fingerprint) = fingerprint.filter(|_| m.chosen == "timed") {
        let row = (
            sha256.to_string(),
            fingerprint,
            m.plan.to_string(),
            serde_json::to_string(&m.timings).expect("strings serialise"),
        );
        let saved = store
            .call(move |c| {
                c.execute(
                    "INSERT OR REPLACE INTO model_plans (sha256, fingerprint, plan, tried, chosen_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![row.0, row.1, row.2, row.3, now_ms()],
                )?;
                Ok(())
            })
            .await;
        if let Err(e) = saved {
            tracing::warn!(model = %m.name(), error = %e, "plan choice not recorded; the next load times every plan again");
        }
    }
    if let Some(why) = &m.fallback {
        tracing::warn!(model = %m.name(), "{why}");
    }
    Ok(Arc::new(m))
}
