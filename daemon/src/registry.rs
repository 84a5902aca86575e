//! Installed model versions, on disk and in the database, and the active version per model.
//!
//! On disk: `<state_dir>/models/<name>/<version>/`, each a complete copy of a model package,
//! written under a temporary name, fsynced, renamed into place and the directory fsynced, so a
//! crash leaves either no version or a whole one. In the database, one row per version with
//! its state (`installed`, `active`, `previous`, `failed`); every state change is a single
//! transaction, and the in-memory switch happens only after it commits.
//!
//! A new version is always loaded and self-tested before anything is recorded as active, so a
//! version that does not load never becomes active, and a swap never makes requests fail:
//! requests already queued keep the version they took (see `engine::pool`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::config::{ModelConfig, PoolConfig};
use crate::engine::{EngineError, MANIFEST_FILE, MODEL_FILE, Manifest, Model, ModelPool};
use crate::store::{Store, StoreError, now_ms};

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
    #[error("installing into {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Package { path: PathBuf, message: String },
}

impl RegistryError {
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::Engine(e) => e.code(),
            RegistryError::Conflict { .. } => "conflict",
            RegistryError::NotInstalled { .. } | RegistryError::NotActive { .. } => "not_found",
            RegistryError::NoPrevious { .. } => "conflict",
            RegistryError::Package { .. } => "bad_request",
            RegistryError::Store(_) | RegistryError::Io { .. } => "internal",
        }
    }
}

/// One installed version as recorded in the database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRow {
    pub name: String,
    pub version: String,
    pub state: String,
    pub path: PathBuf,
    pub sha256: String,
    pub form: String,
    pub installed_at: i64,
    pub activated_at: Option<i64>,
    pub failure: Option<String>,
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

/// Owner of installed versions and of the running pool per model. Callers serialise access
/// (the service holds it behind one async mutex), so state changes never interleave.
pub struct Registry {
    store: Store,
    models_dir: PathBuf,
    pools: HashMap<String, ModelPool>,
}

impl Registry {
    pub fn new(store: Store, state_dir: &Path) -> Registry {
        Registry {
            store,
            models_dir: state_dir.join("models"),
            pools: HashMap::new(),
        }
    }

    pub fn pool(&self, name: &str) -> Option<ModelPool> {
        self.pools.get(name).cloned()
    }

    pub fn pools(&self) -> impl Iterator<Item = &ModelPool> {
        self.pools.values()
    }

    pub async fn list(&self) -> Result<Vec<VersionRow>, RegistryError> {
        Ok(self
            .store
            .call(|c| {
                let mut stmt = c.prepare(
                    "SELECT name, version, state, path, sha256, form, installed_at, activated_at, failure
                     FROM model_versions ORDER BY name, installed_at, version",
                )?;
                let rows = stmt.query_map([], row_to_version)?.collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// Load every version recorded as active. One that no longer loads (damaged file, a tract
    /// that disagrees with its golden vectors) is marked failed and its previous version, if
    /// any, is activated instead. Returns the problems met.
    pub async fn start(&mut self, pools: &crate::config::Pools) -> Vec<RegistryError> {
        let mut problems = Vec::new();
        let rows = match self.list().await {
            Ok(rows) => rows,
            Err(e) => return vec![e],
        };
        for row in rows.into_iter().filter(|r| r.state == "active") {
            let cfg = pools.get(&row.name);
            match load(row.path.clone(), cfg).await {
                Ok(model) => {
                    self.pools
                        .insert(row.name.clone(), ModelPool::spawn(model, cfg));
                }
                Err(e) => {
                    tracing::error!(model = %row.name, version = %row.version, error = %e, "active version does not load");
                    let reason = e.to_string();
                    problems.push(e.into());
                    if let Err(e) = self.fall_back(&row.name, &row.version, &reason, cfg).await {
                        problems.push(e);
                    }
                }
            }
        }
        problems
    }

    /// Mark `version` failed and activate the previous version, if there is one.
    async fn fall_back(
        &mut self,
        name: &str,
        version: &str,
        reason: &str,
        cfg: PoolConfig,
    ) -> Result<(), RegistryError> {
        let previous = self.previous(name).await?;
        match previous {
            Some(prev) => {
                let model = match load(prev.path.clone(), cfg).await {
                    Ok(m) => m,
                    Err(e) => {
                        self.mark_failed(name, version, reason).await?;
                        return Err(e.into());
                    }
                };
                self.replace_failed(name, version, reason, &prev.version)
                    .await?;
                tracing::warn!(model = name, from = version, to = %prev.version, "rolled back to the previous version");
                self.pools
                    .insert(name.to_string(), ModelPool::spawn(model, cfg));
            }
            None => self.mark_failed(name, version, reason).await?,
        }
        Ok(())
    }

    /// One transaction: `version` failed for `reason`, `previous` active again.
    async fn replace_failed(
        &self,
        name: &str,
        version: &str,
        reason: &str,
        previous: &str,
    ) -> Result<(), RegistryError> {
        let (n, v, r, p) = (
            name.to_string(),
            version.to_string(),
            reason.to_string(),
            previous.to_string(),
        );
        self.store
            .call(move |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "UPDATE model_versions SET state = 'failed', failure = ?3 WHERE name = ?1 AND version = ?2",
                    params![n, v, r],
                )?;
                tx.execute(
                    "UPDATE model_versions SET state = 'active', activated_at = ?3 WHERE name = ?1 AND version = ?2",
                    params![n, p, now_ms()],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn mark_failed(
        &self,
        name: &str,
        version: &str,
        reason: &str,
    ) -> Result<(), RegistryError> {
        let (n, v, r) = (name.to_string(), version.to_string(), reason.to_string());
        self.store
            .call(move |c| {
                c.execute(
                    "UPDATE model_versions SET state = 'failed', failure = ?3 WHERE name = ?1 AND version = ?2",
                    params![n, v, r],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Bring the registry in line with the configured models: install each package if new,
    /// and activate it if the model has no active version or this version was never active.
    /// A version activated later by an operator (rollback, update) is left active across
    /// restarts as long as the configured package does not change.
    pub async fn apply(&mut self, models: &[ModelConfig]) -> Vec<RegistryError> {
        let mut problems = Vec::new();
        for m in models {
            let installed = match self.install(&m.package).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(model = %m.name, package = %m.package.display(), error = %e, "model not installed");
                    problems.push(e);
                    continue;
                }
            };
            let active = self.pools.get(&m.name).map(|p| p.active());
            // A configured version that was never active is one the operator has just put in
            // the config (or one whose activation a crash interrupted): activate it. One that
            // has been active and was replaced since stays replaced.
            let needs = match &active {
                None => true,
                Some(a) => !installed.ever_activated && a.version() != &installed.version,
            };
            if !needs
                && let Some(a) = &active
                && a.version() != &installed.version
            {
                tracing::warn!(
                    model = %m.name,
                    configured = %installed.version,
                    active = %a.version(),
                    "keeping the active version: the configured one was active before and was replaced since (rollback or update)"
                );
            }
            if needs {
                if let Err(e) = self.activate(&m.name, &installed.version, m.pool).await {
                    tracing::error!(model = %m.name, error = %e, "model not activated");
                    problems.push(e);
                }
            } else if let Some(pool) = self.pools.get(&m.name)
                && pool.config() != m.pool
            {
                // Worker count and queue are fixed per pool: start a new pool on the same
                // model; the old one finishes its queue and ends.
                let pool = ModelPool::spawn(pool.active(), m.pool);
                self.pools.insert(m.name.clone(), pool);
            }
        }
        problems
    }

    /// Verify and copy a model package into the state directory. The package is loaded and
    /// self-tested first: nothing is written for a package that would be refused.
    pub async fn install(&mut self, package: &Path) -> Result<Installed, RegistryError> {
        let package = package.to_path_buf();
        let models_dir = self.models_dir.clone();
        // Hashing and the manifest are cheap; loading and self-testing the model is not, and
        // an identical version already installed was verified when it was installed (and is
        // self-tested again whenever it is loaded to run), so only a new version pays for it.
        let (manifest, digest) = tokio::task::spawn_blocking({
            let package = package.clone();
            move || -> Result<(Manifest, String), RegistryError> {
                Ok((Manifest::read(&package)?, package_digest(&package)?))
            }
        })
        .await
        .map_err(|e| RegistryError::Package {
            path: package.clone(),
            message: format!("verification failed: {e}"),
        })??;
        let (name, version) = (manifest.name.clone(), manifest.version.to_string());
        let existing = self.row(&name, &version).await?;
        let dest = match &existing {
            Some(row) if row.sha256 != digest => {
                return Err(RegistryError::Conflict { name, version });
            }
            Some(row) => row.path.clone(),
            None => models_dir.join(&name).join(&version),
        };
        if let Some(row) = &existing {
            // Recorded already. Make sure the copy is still whole (power lost before its
            // directory entries reached the disk, or the flash rotted) and recopy it if not.
            let path = row.path.clone();
            let intact = tokio::task::spawn_blocking(move || package_digest(&path).ok())
                .await
                .ok()
                .flatten()
                .is_some_and(|d| d == digest);
            if intact {
                return Ok(Installed {
                    name,
                    version: manifest.version,
                    new: false,
                    ever_activated: row.activated_at.is_some(),
                });
            }
            tracing::warn!(model = %name, %version, path = %row.path.display(), "installed copy is missing or damaged; copying it again");
        }
        // Verify before touching disk: a package that would be refused is never copied.
        tokio::task::spawn_blocking({
            let package = package.clone();
            move || Model::load(&package, std::num::NonZeroUsize::MIN).map(drop)
        })
        .await
        .map_err(|e| RegistryError::Package {
            path: package.clone(),
            message: format!("verification failed: {e}"),
        })??;
        tokio::task::spawn_blocking({
            let dest = dest.clone();
            move || copy_package(&package, &dest)
        })
        .await
        .map_err(|e| RegistryError::Package {
            path: dest.clone(),
            message: format!("copy failed: {e}"),
        })??;
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
                        "INSERT INTO model_versions (name, version, state, path, sha256, form, installed_at)
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

    /// Make an installed version the active one. It is loaded and self-tested first; the
    /// database switch is one transaction; then new requests go to it while requests in
    /// flight finish on the old one.
    pub async fn activate(
        &mut self,
        name: &str,
        version: &semver::Version,
        cfg: PoolConfig,
    ) -> Result<(), RegistryError> {
        let row = self.row(name, &version.to_string()).await?.ok_or_else(|| {
            RegistryError::NotInstalled {
                name: name.to_string(),
                version: version.to_string(),
            }
        })?;
        if row.state == "active" && self.pools.contains_key(name) {
            return Ok(());
        }
        let model = match load(row.path.clone(), cfg).await {
            Ok(m) => m,
            Err(e) => {
                let (n, v, r) = (name.to_string(), version.to_string(), e.to_string());
                self.store
                    .call(move |c| {
                        c.execute(
                            "UPDATE model_versions SET state = 'failed', failure = ?3
                             WHERE name = ?1 AND version = ?2 AND state != 'active'",
                            params![n, v, r],
                        )?;
                        Ok(())
                    })
                    .await?;
                return Err(e.into());
            }
        };
        let (n, v) = (name.to_string(), version.to_string());
        self.store
            .call(move |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "UPDATE model_versions SET state = 'installed' WHERE name = ?1 AND state = 'previous'",
                    params![n],
                )?;
                tx.execute(
                    "UPDATE model_versions SET state = 'previous' WHERE name = ?1 AND state = 'active'",
                    params![n],
                )?;
                tx.execute(
                    "UPDATE model_versions SET state = 'active', activated_at = ?3, failure = NULL
                     WHERE name = ?1 AND version = ?2",
                    params![n, v, now_ms()],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        crate::crash_point("activate:committed");
        self.switch(name, model, cfg);
        tracing::info!(model = name, %version, "activated");
        Ok(())
    }

    /// Swap the active and previous versions of `name`. Returns (from, to).
    pub async fn rollback(&mut self, name: &str) -> Result<(String, String), RegistryError> {
        let active =
            self.pools
                .get(name)
                .map(|p| p.active())
                .ok_or_else(|| RegistryError::NotActive {
                    name: name.to_string(),
                })?;
        let prev = self
            .previous(name)
            .await?
            .ok_or_else(|| RegistryError::NoPrevious {
                name: name.to_string(),
            })?;
        let cfg = self.pools[name].config();
        let model = load(prev.path.clone(), cfg).await?;
        let (n, from, to) = (
            name.to_string(),
            active.version().to_string(),
            prev.version.clone(),
        );
        {
            let (n, from, to) = (n.clone(), from.clone(), to.clone());
            self.store
                .call(move |c| {
                    let tx = c.transaction()?;
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
                    Ok(())
                })
                .await?;
        }
        self.switch(name, model, cfg);
        tracing::info!(model = name, %from, %to, "rolled back");
        Ok((from, to))
    }

    /// The version of `name` now serving requests.
    pub fn active_version(&self, name: &str) -> Option<semver::Version> {
        self.pools.get(name).map(|p| p.active().version().clone())
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
        &mut self,
        name: &str,
        version: &semver::Version,
        reason: &str,
    ) -> Result<String, RegistryError> {
        let active = self.active_version(name);
        let cfg = self.pools.get(name).map(|p| p.config()).unwrap_or_default();
        if active.as_ref() != Some(version) {
            // Already replaced (a restart fell back, or an operator moved on): only mark it.
            self.mark_failed(name, &version.to_string(), reason).await?;
            return Ok(active.map(|v| v.to_string()).unwrap_or_default());
        }
        let prev = self
            .previous(name)
            .await?
            .ok_or_else(|| RegistryError::NoPrevious {
                name: name.to_string(),
            })?;
        let model = load(prev.path.clone(), cfg).await?;
        self.replace_failed(name, &version.to_string(), reason, &prev.version)
            .await?;
        self.switch(name, model, cfg);
        tracing::warn!(model = name, from = %version, to = %prev.version, %reason, "new version rejected; previous version active again");
        Ok(prev.version)
    }

    fn switch(&mut self, name: &str, model: Arc<Model>, cfg: PoolConfig) {
        match self.pools.get(name) {
            Some(pool) if pool.config() == cfg => {
                pool.swap(model);
            }
            _ => {
                self.pools
                    .insert(name.to_string(), ModelPool::spawn(model, cfg));
            }
        }
    }

    async fn row(&self, name: &str, version: &str) -> Result<Option<VersionRow>, RegistryError> {
        let (n, v) = (name.to_string(), version.to_string());
        Ok(self
            .store
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT name, version, state, path, sha256, form, installed_at, activated_at, failure
                     FROM model_versions WHERE name = ?1 AND version = ?2",
                    params![n, v],
                    row_to_version,
                )
                .optional()?)
            })
            .await?)
    }

    async fn previous(&self, name: &str) -> Result<Option<VersionRow>, RegistryError> {
        let n = name.to_string();
        Ok(self
            .store
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT name, version, state, path, sha256, form, installed_at, activated_at, failure
                     FROM model_versions WHERE name = ?1 AND state = 'previous'",
                    params![n],
                    row_to_version,
                )
                .optional()?)
            })
            .await?)
    }
}

fn row_to_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        name: r.get(0)?,
        version: r.get(1)?,
        state: r.get(2)?,
        path: PathBuf::from(r.get::<_, String>(3)?),
        sha256: r.get(4)?,
        form: r.get(5)?,
        installed_at: r.get(6)?,
        activated_at: r.get(7)?,
        failure: r.get(8)?,
    })
}

async fn load(path: PathBuf, cfg: PoolConfig) -> Result<Arc<Model>, EngineError> {
    let m = tokio::task::spawn_blocking(move || Model::load_on(&path, cfg.threads, cfg.runtime))
        .await
        .expect("model load task panicked")?;
    if let Some(why) = &m.fallback {
        tracing::warn!(model = %m.name(), "{why}");
    }
    Ok(Arc::new(m))
}

/// The files of a package, relative paths sorted; symlinks and special files are refused so
/// that nothing outside the package is read or copied.
fn package_files(root: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), RegistryError> {
        let dir = root.join(rel);
        let io = |source| RegistryError::Io {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let ft = entry.file_type().map_err(io)?;
            let rel = rel.join(entry.file_name());
            if ft.is_dir() {
                walk(root, &rel, out)?;
            } else if ft.is_file() {
                out.push(rel);
            } else {
                return Err(RegistryError::Package {
                    path: root.join(&rel),
                    message: "is not a regular file or directory; packages may not hold links"
                        .into(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out)?;
    out.sort();
    for required in [MANIFEST_FILE, MODEL_FILE] {
        if !out.iter().any(|p| p == Path::new(required)) {
            return Err(RegistryError::Package {
                path: root.to_path_buf(),
                message: format!("has no {required}"),
            });
        }
    }
    Ok(out)
}

/// SHA-256 over every file's relative path, length and bytes, in path order. Streams: a
/// package's size never decides how much memory this takes.
pub fn package_digest(root: &Path) -> Result<String, RegistryError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    for rel in package_files(root)? {
        let path = root.join(&rel);
        let io = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::open(&path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        ctx.update(rel.to_string_lossy().as_bytes());
        ctx.update(&[0]);
        ctx.update(&len.to_le_bytes());
        let mut seen = 0u64;
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            seen += n as u64;
            ctx.update(&buf[..n]);
        }
        if seen != len {
            return Err(RegistryError::Package {
                path,
                message: "changed while being hashed".into(),
            });
        }
    }
    Ok(tern_update::hex(ctx.finish().as_ref()))
}

/// Copy a package to `dest` so that a crash at any instant leaves either nothing at `dest` or
/// the complete package: write under a temporary name, fsync every file and directory,
/// rename, fsync the parent.
fn copy_package(src: &Path, dest: &Path) -> Result<(), RegistryError> {
    let parent = dest.parent().expect("dest has a parent");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RegistryError::Io { path, source }
    };
    create_dirs_durably(parent)?;
    let file_name = dest.file_name().expect("dest has a name").to_string_lossy();
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    // A leftover from a crash after rename but before the database insert: replace it.
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(io(dest))?;
    }
    let files = package_files(src)?;
    let mut dirs = vec![tmp.clone()];
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    for rel in &files {
        let to = tmp.join(rel);
        let dir = to.parent().expect("file has a parent");
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            dirs.push(dir.to_path_buf());
        }
        let mut from = std::fs::File::open(src.join(rel)).map_err(io(&src.join(rel)))?;
        let mut f = std::fs::File::create(&to).map_err(io(&to))?;
        std::io::copy(&mut from, &mut f).map_err(io(&to))?;
        f.sync_all().map_err(io(&to))?;
    }
    for d in dirs.iter().rev() {
        fsync_dir(d)?;
    }
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    fsync_dir(parent)?;
    Ok(())
}

/// `create_dir_all`, but each directory it creates is fsynced into its parent, so the path
/// still exists after a power cut.
fn create_dirs_durably(dir: &Path) -> Result<(), RegistryError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(source) => {
            return Err(RegistryError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => fsync_dir(parent),
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), RegistryError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| RegistryError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Remove temporary install directories a crash left behind.
pub fn clean_temp(state_dir: &Path) {
    let Ok(models) = std::fs::read_dir(state_dir.join("models")) else {
        return;
    };
    for model in models.flatten() {
        let Ok(versions) = std::fs::read_dir(model.path()) else {
            continue;
        };
        for v in versions.flatten() {
            if v.file_name().to_string_lossy().contains(".tmp-") {
                tracing::info!(path = %v.path().display(), "removing an interrupted install");
                let _ = std::fs::remove_dir_all(v.path());
            }
        }
    }
}
