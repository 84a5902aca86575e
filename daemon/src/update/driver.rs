//! The update core's hands: reads the facts each input needs, and carries out the actions the
//! core returns, in order. An effect's outcome goes straight back to the core before anything
//! else is taken, so the core's picture and the database never drift apart.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{OptionalExtension, params};
use serde_json::{Value, json};
use tern_update::Code;
use tern_update::artifact::{self, BundleFile, UnpackError};
use tern_update::bundle::{KeySet, RefusalError};
use tern_update::command::PublicKey;
use tern_update::topics;
use tokio::sync::oneshot;

use super::core::{
    Action, ChunkFailure, Core, Effect, HUNG, HealthFacts, Input, Known, ManifestFacts, Now,
    OpenRow, Outcome, Settings, ShadowVerdict, State, Trust,
};
use super::{Delivery, Deps, InstallError, Uplink};
use crate::events::LocalEvent;
use crate::store::{StoreError, now_ms};

type Reply = oneshot::Sender<Result<i64, InstallError>>;

/// Finished updates kept per model (besides the one its serving version came from).
const KEEP_UPDATES_PER_MODEL: i64 = 32;

/// Each retry of a manifest and each new one adds a row: a model keeps its newest ones, any
/// still under way, and the last committed one. Anti-rollback does not need the rest: it goes
/// by the versions installed, which stay. Returns how many went.
fn prune_finished(tx: &rusqlite::Transaction<'_>, model: &str) -> rusqlite::Result<usize> {
    tx.execute(
        "DELETE FROM updates WHERE model = ?1
           AND state IN ('committed', 'failed', 'rolled_back')
           AND id IS NOT (SELECT max(id) FROM updates WHERE model = ?1 AND state = 'committed')
           AND id NOT IN (SELECT id FROM updates WHERE model = ?1 ORDER BY id DESC LIMIT ?2)",
        params![model, KEEP_UPDATES_PER_MODEL],
    )
}

pub struct Driver {
    d: Deps,
    core: Core,
    /// Callers of bundle installs waiting for their answer, by ticket.
    tickets: HashMap<u64, Reply>,
    /// The bundle file handed over last, as opened then: its artifact is copied from this
    /// open file, so the caller may remove the path once handed over, and a path swapped
    /// meanwhile (for a FIFO) is never read.
    opened: Option<BundleFile>,
    /// The trust and floors mirrored beside the database (read at resume).
    mirror: super::mirror::Mirror,
    next_ticket: u64,
}

fn now() -> Now {
    Now {
        at: Instant::now(),
        wall_ms: now_ms(),
    }
}

impl Driver {
    pub fn new(d: Deps) -> Driver {
        let settings = Settings {
            device: d.device.clone(),
            groups: d.groups.clone(),
            arch: std::env::consts::ARCH.to_string(),
            ternd: semver::Version::parse(crate::VERSION).expect("our version is semver"),
            topics: d
                .prefix
                .as_ref()
                .map(|p| topics::Device::new(p, &d.device, &d.groups)),
            window: d.cfg.window,
            health_window: d.cfg.health_window,
            health_max_errors: d.cfg.health_max_errors,
            min_free_bytes: d.cfg.min_free_bytes,
            freshness: d.cfg.freshness,
            in_daemon: d.events.is_some(),
        };
        let trust = configured_trust(&d);
        Driver {
            core: Core::new(settings, trust, now()),
            d,
            tickets: HashMap::new(),
            opened: None,
            next_ticket: 1,
            mirror: Default::default(),
        }
    }

    fn updates_dir(&self) -> PathBuf {
        self.d.state_dir.join("updates")
    }

    fn staging(&self, id: i64) -> PathBuf {
        self.updates_dir().join(id.to_string())
    }

    /// Take `input` and everything that follows from it.
    async fn run(&mut self, input: Input) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let mut actions: VecDeque<Action> = self.core.step(input, now()).into();
            while let Some(a) = actions.pop_front() {
                match a {
                    Action::Do(effect) => {
                        let outcome = self.effect(effect).await;
                        actions.extend(self.core.step(Input::Done(outcome), now()));
                    }
                    Action::Reoffer { source, payload } => {
                        let facts = self.facts(&payload, false).await;
                        inputs.push_back(Input::Manifest {
                            source,
                            payload,
                            facts,
                        });
                    }
                    other => self.act(other).await,
                }
            }
        }
        // A shadow an update started runs only while that update is in `shadow`: its verdict
        // was taken, or a newer version replaced it.
        for s in self.d.registry.shadows().all() {
            let current = self
                .core
                .shadowing()
                .is_some_and(|(n, v)| n == s.model && v.to_string() == s.version);
            if s.origin == crate::shadow::Origin::Update && !current {
                self.d.registry.shadow_end(&s.model, &s.version).await;
            }
        }
    }

    /// Pick up where the last run stopped. Until this has read the database (the open
    /// updates, the trusted keys, the next id) nothing else may be taken.
    pub async fn resume(&mut self) -> Result<(), StoreError> {
        let mut input = self.resume_input().await?;
        if let Input::Resume { trust, time, .. } = &mut input {
            *trust = self
                .reconcile_mirror(std::mem::replace(trust, configured_trust(&self.d)))
                .await?;
            *time = self.mirror.time;
        }
        self.run(input).await;
        Ok(())
    }

    /// Read the mirror and make it and the database agree: the newer key set wins (a lost or
    /// restored database never resets trust), and the floors cover every installed version.
    /// Returns the trust to start with.
    async fn reconcile_mirror(&mut self, from_db: Trust) -> Result<Trust, StoreError> {
        use super::mirror;
        let state_dir = self.d.state_dir.clone();
        let corrupt = |detail: String| StoreError::Corrupt {
            path: mirror::path(&state_dir),
            detail,
        };
        let mut m = mirror::read(&state_dir).map_err(corrupt)?;
        let from_file = match &m.trust {
            Some(t) => Some(t.to_trust().map_err(corrupt)?),
            None => None,
        };
        let trust = match from_file {
            Some(f) if f.version > from_db.version => {
                tracing::warn!(
                    file = f.version,
                    database = from_db.version,
                    "the database's update key set is older than trust.json's: using the file's"
                );
                f
            }
            _ => from_db,
        };
        let before = m.clone();
        if trust.version > 0 {
            m.trust = Some(mirror::TrustDoc::of(&trust));
        }
        let versions: Vec<(String, String)> = self
            .d
            .store
            .call(|c| {
                let mut stmt = c.prepare("SELECT name, version FROM model_versions")?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        for (name, v) in versions {
            if let Ok(v) = semver::Version::parse(&v) {
                m.raise(&name, &v);
            }
        }
        if m != before {
            mirror::write(&state_dir, &m).map_err(|e| corrupt(format!("not written: {e}")))?;
        }
        self.mirror = m;
        Ok(trust)
    }

    async fn resume_input(&self) -> Result<Input, StoreError> {
        type Row = (i64, String, String, Vec<u8>, Option<i64>);
        type Read = (Vec<Row>, i64, Vec<(i64, i64)>, Option<StoredTrust>);
        let (rows, next_id, held, stored): Read = self
            .d
            .store
            .call(|c| {
                let mut stmt = c.prepare(
                    "SELECT id, state, source, manifest, health_until_ms FROM updates
                     WHERE state NOT IN ('committed', 'failed', 'rolled_back') ORDER BY id",
                )?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })?
                    .collect::<Result<Vec<Row>, _>>()?;
                let seq: Option<i64> = c
                    .query_row(
                        "SELECT seq FROM sqlite_sequence WHERE name = 'updates'",
                        [],
                        |r| r.get(0),
                    )
                    .optional()?;
                let mut stmt = c.prepare(
                    "SELECT update_id, idx FROM update_chunks WHERE update_id IN
                     (SELECT id FROM updates WHERE state = 'downloading')",
                )?;
                let held = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((rows, seq.unwrap_or(0) + 1, held, stored_trust(c)?))
            })
            .await?;
        let open = rows
            .into_iter()
            .map(|(id, state, source, manifest, until)| OpenRow {
                id,
                state: State::parse(&state),
                source,
                manifest,
                health_until_ms: until,
                held: held
                    .iter()
                    .filter(|(u, _)| *u == id)
                    .map(|(_, i)| *i as usize)
                    .collect(),
                staging: self.staging(id).join("artifact").exists(),
            })
            .collect();
        let trust = match stored {
            Some(t) => t.into_trust(),
            None => configured_trust(&self.d),
        };
        Ok(Input::Resume {
            open,
            trust,
            next_id,
            time: None,
        })
    }

    /// What the fleet link delivered.
    pub async fn deliver(&mut self, d: Delivery) {
        let input = match d {
            Delivery::Manifest { source, payload } => {
                let facts = self.facts(&payload, false).await;
                Input::Manifest {
                    source,
                    payload,
                    facts,
                }
            }
            Delivery::Link(l) => Input::Link(l),
        };
        self.run(input).await;
    }

    /// A bundle file handed over; `reply` is answered once its bytes are staged or it was
    /// refused.
    pub async fn bundle(&mut self, path: &Path, reply: Option<Reply>) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if let Some(r) = reply {
            self.tickets.insert(ticket, r);
        }
        let opened = {
            let p = path.to_path_buf();
            tokio::task::spawn_blocking(move || BundleFile::open(&p)).await
        };
        let input = match opened {
            Ok(Ok(mut b)) => {
                let manifest = Bytes::from(std::mem::take(&mut b.manifest_bytes));
                let artifact_len = b.artifact_len;
                self.opened = Some(b);
                let facts = self.facts(&manifest, true).await;
                Input::Bundle {
                    ticket,
                    path: path.to_path_buf(),
                    source: format!("file:{}", path.display()),
                    manifest,
                    artifact_len,
                    facts,
                }
            }
            Ok(Err(UnpackError::Refused(refusal))) => Input::BundleRefused {
                ticket,
                source: path.display().to_string(),
                refusal,
            },
            // Not the bundle's fault (unreadable, or the reader died): said to the caller only.
            Ok(Err(e @ UnpackError::Io { .. })) => return self.unread(ticket, e.to_string()),
            Err(e) => return self.unread(ticket, e.to_string()),
        };
        self.run(input).await;
    }

    /// Answer a bundle that could not be read at all.
    fn unread(&mut self, ticket: u64, why: String) {
        if let Some(r) = self.tickets.remove(&ticket) {
            let _ = r.send(Err(RefusalError::Malformed(why).into()));
        }
    }

    pub async fn tick(&mut self) {
        let watched = self.core.watching().map(str::to_string);
        let health = watched.as_deref().map(|name| self.health(name));
        let shadowing = self
            .core
            .shadowing()
            .map(|(n, v)| (n.to_string(), v.to_string()));
        let shadow = shadowing.as_ref().and_then(|(n, v)| {
            let s = self
                .d
                .registry
                .shadows()
                .get(n)
                .filter(|s| s.version == *v && s.origin == crate::shadow::Origin::Update)?;
            let v = s.recorded_verdict()?;
            Some(ShadowVerdict {
                promote: v.promote,
                reason: format!("{} by {}", v.reason, v.by),
            })
        });
        self.run(Input::Tick { health, shadow }).await;
        // The window is over (committed or rolled back): the serving version's refused
        // inputs are no longer checked against its predecessor.
        if let Some(name) = watched
            && self.core.watching() != Some(name.as_str())
            && let Some(pool) = self.d.registry.pool(&name)
        {
            pool.active().outcomes.set_baseline(None);
        }
    }

    pub async fn stopping(&mut self) {
        self.run(Input::Stopping).await;
    }

    fn health(&self, name: &str) -> HealthFacts {
        let Some(pool) = self.d.registry.pool(name) else {
            return HealthFacts::default();
        };
        let m = pool.active();
        use std::sync::atomic::Ordering::Relaxed;
        HealthFacts {
            active_version: Some(m.version().clone()),
            ok: m.outcomes.ok.load(Relaxed),
            failed: m.outcomes.failed.load(Relaxed),
            refused: m.outcomes.refused.load(Relaxed),
            hung: !pool.healthy(HUNG),
        }
    }

    /// What a manifest is judged with; for a bundle file, also whether it serves already.
    async fn facts(&self, payload: &[u8], bundle: bool) -> ManifestFacts {
        let p = payload.to_vec();
        let known = self
            .d
            .store
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT state, code FROM updates WHERE manifest = ?1 ORDER BY id DESC LIMIT 1",
                    [p],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
                )
                .optional()?)
            })
            .await
            .ok()
            .flatten()
            .map(|(state, code)| Known {
                state: State::parse(&state).unwrap_or(State::Failed),
                code: code.as_deref().and_then(Code::parse),
            });
        // The versions installed, or the mirror's floor if a lost database forgot some.
        let highest = match Core::claimed_name(payload) {
            Some(name) => {
                let installed = self.d.registry.highest(&name).await.ok().flatten();
                installed.max(self.mirror.floor(&name))
            }
            None => None,
        };
        let serving = match bundle {
            true => self.serving(payload).await,
            false => None,
        };
        ManifestFacts {
            known,
            highest,
            free_bytes: crate::store::disk_free_bytes(&self.d.state_dir).unwrap_or(u64::MAX),
            serving,
        }
    }

    /// The update this exact manifest made, if it ended well (or is in its health window) and
    /// its version is the one serving now.
    async fn serving(&self, payload: &[u8]) -> Option<i64> {
        let p = payload.to_vec();
        let (id, model, version): (i64, String, String) = self
            .d
            .store
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT id, model, version FROM updates WHERE manifest = ?1
                     AND state IN ('health', 'committed') ORDER BY id DESC LIMIT 1",
                    [p],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?)
            })
            .await
            .ok()
            .flatten()?;
        let active = self.d.registry.active_version(&model)?;
        (active.to_string() == version).then_some(id)
    }

    /// Carry out an action whose outcome the core does not wait for.
    async fn act(&mut self, a: Action) {
        match a {
            Action::Do(_) | Action::Reoffer { .. } => unreachable!("handled by run"),
            Action::FinishRow {
                id,
                state,
                code,
                reason,
            } => self.finish_row(id, state, code, reason).await,
            Action::RecordPrevious { id, previous } => {
                let _ = self
                    .d
                    .store
                    .call(move |c| {
                        c.execute(
                            "UPDATE updates SET previous = ?2 WHERE id = ?1",
                            params![id, previous],
                        )?;
                        Ok(())
                    })
                    .await;
            }
            Action::CleanStop { id } => {
                let r = self
                    .d
                    .store
                    .call(move |c| {
                        c.execute(
                            "UPDATE updates SET health_clean_stop = 1 WHERE id = ?1",
                            [id],
                        )?;
                        Ok(())
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!(update = id, error = %e, "clean stop not recorded");
                }
            }
            Action::RemoveStaging { id } => {
                let _ = std::fs::remove_dir_all(self.staging(id));
            }
            Action::CleanStaging { keep } => {
                let Ok(rd) = std::fs::read_dir(self.updates_dir()) else {
                    return;
                };
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !keep.iter().any(|id| id.to_string() == name) {
                        tracing::info!(path = %e.path().display(), "removing leftover update staging");
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            Action::Event(body) => {
                if let Some(ob) = &self.d.outbox
                    && let Err(e) = ob.send_event(&self.d.store, body).await
                {
                    tracing::error!(error = %e, "update event not queued");
                }
            }
            Action::Want { sha256, chunks } => self.uplink(Uplink::Want { sha256, chunks }).await,
            Action::Unwant { sha256, chunks } => {
                self.uplink(Uplink::Unwant { sha256, chunks }).await
            }
            Action::Status { model, body } => self.uplink(Uplink::Status { model, body }).await,
            Action::Redeliver => self.uplink(Uplink::Redeliver).await,
            Action::SaveTime(t) => {
                // Not fatal if it fails: the time only ever goes up, and a restart with an
                // older one (or none) judges as if the newest had not come yet.
                let mut m = self.mirror.clone();
                m.time = Some(t);
                match super::mirror::write(&self.d.state_dir, &m) {
                    Ok(()) => self.mirror = m,
                    Err(e) => tracing::warn!(error = %e, "operator time not kept in trust.json"),
                }
            }
            Action::Progress {
                model,
                version,
                state,
                percent,
            } => {
                if let Some(ev) = &self.d.events {
                    ev.send(LocalEvent::Update {
                        model,
                        version,
                        state: state.as_str().to_string(),
                        percent,
                    });
                }
            }
            Action::ModelActivated { model, version } => {
                // Upstream as a command's activation is, so a fleet view sees every switch.
                let body = json!({"event": "model.activated", "model": model, "version": version, "by": "update"});
                if let Some(ob) = &self.d.outbox
                    && let Err(e) = ob.send_event(&self.d.store, body).await
                {
                    tracing::error!(error = %e, "model.activated event not queued");
                }
                if let Some(ev) = &self.d.events {
                    ev.send(LocalEvent::ModelActivated { model, version });
                }
            }
            Action::Answer { ticket, result } => {
                self.opened = None;
                if let Some(r) = self.tickets.remove(&ticket) {
                    let _ = r.send(result);
                }
            }
            Action::Wake => {
                if let Some(ob) = &self.d.outbox {
                    ob.wake();
                }
            }
            Action::Crash(point) => crate::crash_point(&point),
        }
    }

    /// Ask the fleet link, waiting for room: a dropped status would never be said again. A
    /// link that is gone (it did not start) takes nothing.
    async fn uplink(&self, u: Uplink) {
        if let Some(tx) = &self.d.uplink {
            let _ = tx.send(u).await;
        }
    }

    async fn finish_row(&self, id: i64, state: State, code: Option<Code>, reason: Option<String>) {
        let ob = self.d.outbox.clone();
        let code = code.map(|c| c.as_str().to_string());
        let r = self
            .d
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                let (model, version): (String, String) = tx.query_row(
                    "SELECT model, version FROM updates WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                tx.execute(
                    "UPDATE updates SET state = ?2, code = ?3, reason = ?4, updated_ms = ?5 WHERE id = ?1",
                    params![id, state.as_str(), code, reason, now_ms()],
                )?;
                tx.execute("DELETE FROM update_chunks WHERE update_id = ?1", [id])?;
                if let Some(ob) = &ob {
                    ob.event(&tx, json!({
                        "event": format!("update.{}", state.as_str()),
                        "update": id, "model": model, "version": version,
                        "code": code, "reason": reason,
                    }))?;
                }
                tx.commit()?;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(update = id, error = %e, "update end not recorded");
        }
    }

    /// Carry out an effect and say how it went.
    async fn effect(&mut self, e: Effect) -> Outcome {
        match e {
            Effect::Insert {
                id,
                signed,
                manifest,
                source,
                event,
            } => Outcome::Recorded(self.insert(id, &signed, manifest, source, event).await),
            Effect::CreateStaging { id, size } => {
                Outcome::Recorded(self.create_staging(id, size).map_err(|e| e.to_string()))
            }
            Effect::RestartStaging { id, size } => {
                let forgot = self
                    .d
                    .store
                    .call(move |c| {
                        c.execute("DELETE FROM update_chunks WHERE update_id = ?1", [id])?;
                        c.execute("UPDATE updates SET received_bytes = 0 WHERE id = ?1", [id])?;
                        Ok(())
                    })
                    .await;
                if let Err(e) = forgot {
                    tracing::warn!(update = id, error = %e, "held chunks not forgotten");
                }
                Outcome::Recorded(self.create_staging(id, size).map_err(|e| e.to_string()))
            }
            Effect::SetState { id, state, event } => {
                let set = move |tx: &rusqlite::Transaction<'_>| {
                    tx.execute(
                        "UPDATE updates SET state = ?2, updated_ms = ?3 WHERE id = ?1",
                        params![id, state.as_str(), now_ms()],
                    )
                    .map(drop)
                };
                Outcome::Recorded(self.record(set, event).await)
            }
            Effect::StoreChunk {
                id,
                index,
                offset,
                data,
                nth,
            } => Outcome::Chunk(self.store_chunk(id, index, offset, data, nth).await),
            Effect::CopyBundle { id, path, artifact } => {
                let opened = self.opened.take().filter(|b| b.path == path);
                Outcome::Step(self.copy_bundle(id, path, opened, *artifact).await)
            }
            Effect::VerifyStage {
                id,
                artifact,
                name,
                version,
            } => Outcome::Step(self.verify_and_stage(id, *artifact, name, version).await),
            Effect::Install { id, name } => {
                let package = self.staging(id).join("package");
                // The floor goes up in the mirror before the database records the version,
                // and back down if the install fails (a retry must not be a replay).
                let before = self.mirror.clone();
                let version = crate::engine::Manifest::read_draft(&package).map(|m| m.version);
                if let Ok(v) = &version {
                    let mut m = self.mirror.clone();
                    if m.raise(&name, v) {
                        if let Err(e) = super::mirror::write(&self.d.state_dir, &m) {
                            return Outcome::Installed(Err((Code::Io, format!("trust.json: {e}"))));
                        }
                        self.mirror = m;
                    }
                }
                let installed = self
                    .d
                    .registry
                    .install(&package, self.d.pools.get(&name))
                    .await;
                if installed.is_err() && self.mirror != before {
                    match super::mirror::write(&self.d.state_dir, &before) {
                        Ok(()) => self.mirror = before,
                        Err(e) => {
                            tracing::error!(error = %e, "trust.json: floor not lowered after a failed install")
                        }
                    }
                }
                match installed {
                    Ok(_) => Outcome::Installed(Ok(self
                        .d
                        .registry
                        .active_version(&name)
                        .map(|v| v.to_string()))),
                    Err(e) => {
                        let code = match e.code() {
                            Code::Internal => Code::Io,
                            Code::Evaluation => Code::Evaluation,
                            _ => Code::SelfTest,
                        };
                        Outcome::Installed(Err((code, e.to_string())))
                    }
                }
            }
            Effect::Activate { name, version } => {
                // The running pool's settings (a reload may have changed them since this
                // task started): the new version swaps into the pool pipelines use.
                let settings = self
                    .d
                    .registry
                    .pool(&name)
                    .map(|p| p.config())
                    .unwrap_or_else(|| self.d.pools.get(&name));
                let r = self.d.registry.activate(&name, &version, settings).await;
                if r.is_ok() {
                    // Right at the swap, not when the window's start is recorded: what the
                    // new version meets in between is judged the same way.
                    self.set_baseline(&name).await;
                }
                Outcome::Step(r.map_err(|e| (Code::Activation, e.to_string())))
            }
            Effect::StartShadow {
                id: _,
                name,
                version,
                spec,
            } => {
                let r = self
                    .d
                    .registry
                    .shadow_start(&name, &version, *spec, crate::shadow::Origin::Update)
                    .await;
                use crate::registry::RegistryError as E;
                let code = |e: &E| match e {
                    // The box's own trouble: tried again.
                    E::Store(_) | E::Stopped | E::Moved { .. } => Code::Io,
                    E::Engine(_) => Code::SelfTest,
                    _ => Code::Shadow,
                };
                Outcome::Step(r.map(|_| ()).map_err(|e| (code(&e), e.to_string())))
            }
            Effect::StartWatch { id, name, resumed } => {
                self.set_baseline(&name).await;
                self.watch(id, resumed).await
            }
            Effect::Reject {
                name,
                version,
                reason,
            } => {
                let r = self
                    .d
                    .registry
                    .reject_active(&name, &version, &reason)
                    .await;
                Outcome::Rejected(r.map_err(|e| e.to_string()))
            }
            Effect::Rotate { trust, event } => {
                // Mirrored first: a database lost after this commit still knows the new keys.
                let mut m = self.mirror.clone();
                m.trust = Some(super::mirror::TrustDoc::of(&trust));
                match super::mirror::write(&self.d.state_dir, &m) {
                    Ok(()) => {
                        self.mirror = m;
                        Outcome::Recorded(self.rotate(trust, event).await)
                    }
                    Err(e) => Outcome::Recorded(Err(format!("trust.json: {e}"))),
                }
            }
        }
    }

    /// One state change and its event, in one transaction.
    async fn record(
        &self,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()> + Send + 'static,
        event: Value,
    ) -> Result<(), String> {
        let ob = self.d.outbox.clone();
        self.d
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                change(&tx)?;
                if let Some(ob) = &ob {
                    ob.event(&tx, event)?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// Record a verified manifest as a new update, in the transaction that says so.
    async fn insert(
        &self,
        id: i64,
        s: &tern_update::bundle::Signed,
        manifest: Bytes,
        source: String,
        event: Value,
    ) -> Result<(), String> {
        let (name, version, sha) = (s.name.clone(), s.version.clone(), s.artifact.sha256.clone());
        let insert = move |tx: &rusqlite::Transaction<'_>| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO updates (id, model, version, sha256, manifest, source, state, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'downloading', ?7, ?7)",
                params![id, name, version, sha, manifest.to_vec(), source, now],
            )?;
            prune_finished(tx, &name).map(drop)
        };
        self.record(insert, event).await
    }

    fn create_staging(&self, id: i64, size: u64) -> std::io::Result<()> {
        let dir = self.staging(id);
        std::fs::create_dir_all(&dir)?;
        let f = File::create(dir.join("artifact"))?;
        f.set_len(size)?;
        f.sync_all()?;
        File::open(&dir)?.sync_all()?;
        File::open(self.updates_dir())?.sync_all()
    }

    async fn store_chunk(
        &self,
        id: i64,
        index: usize,
        offset: u64,
        data: Bytes,
        nth: usize,
    ) -> Result<(), ChunkFailure> {
        let path = self.staging(id).join("artifact");
        let written = (|| -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.write_all_at(&data, offset)?;
            f.sync_data()
        })();
        written.map_err(|e| ChunkFailure::Write(e.to_string()))?;
        crate::crash_point("update:chunk-written");
        crate::crash_point(&format!("update:chunk-written-{nth}"));
        let len = data.len() as i64;
        self.d
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                let new = tx.execute(
                    "INSERT OR IGNORE INTO update_chunks (update_id, idx) VALUES (?1, ?2)",
                    params![id, index as i64],
                )?;
                tx.execute(
                    "UPDATE updates SET received_bytes = received_bytes + ?2, updated_ms = ?3 WHERE id = ?1",
                    params![id, len * new as i64, now_ms()],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| ChunkFailure::Record(e.to_string()))
    }

    /// Copy a bundle's artifact into the staging, each chunk checked against the manifest,
    /// then record every chunk as held.
    async fn copy_bundle(
        &self,
        id: i64,
        path: PathBuf,
        opened: Option<BundleFile>,
        art: tern_update::bundle::Artifact,
    ) -> Result<(), (Code, String)> {
        let dest = self.staging(id).join("artifact");
        let (n, size) = (art.chunks.len() as i64, art.size as i64);
        tokio::task::spawn_blocking(move || -> Result<(), (Code, String)> {
            let io = |e: std::io::Error| (Code::Io, e.to_string());
            let bundle = match opened {
                Some(b) => b,
                None => BundleFile::open(&path).map_err(|e| (Code::Io, e.to_string()))?,
            };
            let mut src = bundle.artifact().map_err(io)?;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .open(&dest)
                .map_err(io)?;
            let mut buf = vec![0u8; art.chunk_size as usize];
            for i in 0..art.chunks.len() {
                let len = art.chunk_len(i).expect("in range");
                src.read_exact(&mut buf[..len])
                    .map_err(|e| (Code::BadSize, format!("chunk {i}: {e}")))?;
                art.check_chunk(i, &buf[..len])
                    .map_err(|e| (e.code(), e.to_string()))?;
                out.write_all(&buf[..len]).map_err(io)?;
            }
            out.sync_all().map_err(io)
        })
        .await
        .unwrap_or_else(|e| Err((Code::Internal, e.to_string())))?;
        self.d
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                for i in 0..n {
                    tx.execute(
                        "INSERT OR IGNORE INTO update_chunks (update_id, idx) VALUES (?1, ?2)",
                        params![id, i],
                    )?;
                }
                tx.execute(
                    "UPDATE updates SET received_bytes = ?2 WHERE id = ?1",
                    params![id, size],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| (Code::Io, e.to_string()))
    }

    /// Hash the whole staging file, then unpack the package it holds next to it.
    async fn verify_and_stage(
        &self,
        id: i64,
        art: tern_update::bundle::Artifact,
        name: String,
        version: semver::Version,
    ) -> Result<(), (Code, String)> {
        let dir = self.staging(id);
        tokio::task::spawn_blocking(move || -> Result<(), (Code, String)> {
            let path = dir.join("artifact");
            let io = |e: std::io::Error| (Code::Io, format!("{}: {e}", path.display()));
            let mut f = File::open(&path).map_err(io)?;
            let size = f.metadata().map_err(io)?.len();
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
            }
            let sha = tern_update::hex(ctx.finish().as_ref());
            art.check_whole(size, &sha)
                .map_err(|e| (e.code(), e.to_string()))?;
            let package = dir.join("package");
            if package.exists() {
                return Ok(()); // unpacked before a restart; renamed into place whole
            }
            let tmp = dir.join("package.tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            let f = File::open(&path).map_err(io)?;
            artifact::unpack(std::io::BufReader::new(f), &tmp).map_err(|e| match e {
                UnpackError::Refused(r) => (r.code(), r.to_string()),
                UnpackError::Io { .. } => (Code::Io, e.to_string()),
            })?;
            let m = crate::engine::Manifest::read(&tmp)
                .map_err(|e| (Code::PackageMismatch, e.to_string()))?;
            if m.name != name || m.version != version {
                let e = RefusalError::PackageMismatch(format!(
                    "it holds {} {}, the manifest says {name} {version}",
                    m.name, m.version
                ));
                return Err((e.code(), e.to_string()));
            }
            std::fs::rename(&tmp, &package).map_err(io)?;
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err((Code::Internal, format!("verification panicked: {e}"))))
    }

    /// Give the new version the manifest of the one it replaced, so that the window can tell
    /// an input the new version broke from one no version takes. Without one (a first
    /// install, an unreadable package) every refused input is the caller's.
    async fn set_baseline(&self, name: &str) {
        let Some(pool) = self.d.registry.pool(name) else {
            return;
        };
        let previous = match self.d.registry.previous(name).await {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(model = name, error = %e, "previous version not read; refused inputs count as the callers'");
                return;
            }
        };
        let path = previous.path;
        match tokio::task::spawn_blocking(move || crate::engine::Manifest::read(&path)).await {
            Ok(Ok(m)) => pool
                .active()
                .outcomes
                .set_baseline(Some(std::sync::Arc::new(m))),
            Ok(Err(e)) => {
                tracing::warn!(model = name, error = %e, "previous version's manifest not read; refused inputs count as the callers'")
            }
            Err(e) => tracing::warn!(model = name, error = %e, "previous manifest read panicked"),
        }
    }

    /// Start watching the new version. A window runs on this process's monotonic clock. After
    /// a clean stop it goes on where it was (the recorded end, but never more than a whole
    /// window away, whatever the wall clock did); after a crash it starts again from now, and
    /// the crash counts: a daemon that keeps dying in the window rolls the version back.
    async fn watch(&self, id: i64, resumed: bool) -> Outcome {
        let window = self.d.cfg.health_window;
        let window_ms = window.as_millis() as i64;
        let r = self
            .d
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                let (until, clean): (Option<i64>, i64) = tx.query_row(
                    "SELECT health_until_ms, health_clean_stop FROM updates WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let now = now_ms();
                let (until, crashed) = match until {
                    Some(u) if resumed && clean == 1 => (u.clamp(now, now + window_ms), false),
                    _ => (now + window_ms, resumed),
                };
                tx.execute(
                    "UPDATE updates SET health_until_ms = ?2, health_clean_stop = 0,
                       health_restarts = health_restarts + ?3 WHERE id = ?1",
                    params![id, until, crashed as i64],
                )?;
                let restarts: i64 = tx.query_row(
                    "SELECT health_restarts FROM updates WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )?;
                tx.commit()?;
                Ok((until - now, restarts))
            })
            .await;
        let (left_ms, restarts) = match r {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(update = id, error = %e, "health window not recorded; watching from now");
                (window_ms, 0)
            }
        };
        Outcome::Watching {
            left: Duration::from_millis(left_ms.max(0) as u64),
            restarts: restarts as u64,
        }
    }

    async fn rotate(&self, t: Trust, event: Value) -> Result<(), String> {
        let keys: Vec<String> = t.keys.keys.iter().map(|k| k.to_base64()).collect();
        let retired: Vec<String> = t.keys.retired.iter().map(|k| k.to_base64()).collect();
        let (version, threshold) = (t.version as i64, t.keys.threshold as i64);
        let doc = t.doc.unwrap_or_default();
        let store = move |tx: &rusqlite::Transaction<'_>| {
            tx.execute(
                "INSERT INTO update_trust (id, version, keys, threshold, retired, doc)
                 VALUES (1, ?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version, keys = excluded.keys,
                   threshold = excluded.threshold, retired = excluded.retired, doc = excluded.doc",
                params![
                    version,
                    serde_json::to_string(&keys).expect("strings"),
                    threshold,
                    serde_json::to_string(&retired).expect("strings"),
                    doc
                ],
            )
            .map(drop)
        };
        self.record(store, event).await
    }
}

/// The keys in the configuration, before any rotation.
fn configured_trust(d: &Deps) -> Trust {
    Trust {
        keys: KeySet {
            keys: d.cfg.keys.clone(),
            threshold: d.cfg.threshold,
            retired: Vec::new(),
        },
        version: 0,
        doc: None,
    }
}

/// The trust a rotation recorded.
struct StoredTrust {
    version: i64,
    keys: String,
    threshold: i64,
    retired: String,
    doc: Vec<u8>,
}

impl StoredTrust {
    fn into_trust(self) -> Trust {
        let parse = |s: &str| -> Vec<PublicKey> {
            serde_json::from_str::<Vec<String>>(s)
                .unwrap_or_default()
                .iter()
                .filter_map(|k| PublicKey::parse(k).ok())
                .collect()
        };
        Trust {
            keys: KeySet {
                keys: parse(&self.keys),
                threshold: self.threshold as usize,
                retired: parse(&self.retired),
            },
            version: self.version as u64,
            doc: Some(self.doc),
        }
    }
}

fn stored_trust(c: &rusqlite::Connection) -> rusqlite::Result<Option<StoredTrust>> {
    c.query_row(
        "SELECT version, keys, threshold, retired, doc FROM update_trust WHERE id = 1",
        [],
        |r| {
            Ok(StoredTrust {
                version: r.get(0)?,
                keys: r.get(1)?,
                threshold: r.get(2)?,
                retired: r.get(3)?,
                doc: r.get(4)?,
            })
        },
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_updates_are_pruned_per_model_keeping_the_last_committed() {
        let d = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&d.path().join("t.db")).unwrap();
        let left = store
            .call(|c| {
                let tx = c.transaction()?;
                let add = |id: i64, model: &str, state: &str| {
                    tx.execute(
                        "INSERT INTO updates (id, model, version, sha256, manifest, source, state, created_ms, updated_ms)
                         VALUES (?1, ?2, '1.0.0', 'x', x'00', 's', ?3, 0, 0)",
                        params![id, model, state],
                    )
                    .map(drop)
                };
                // 1: the last committed; then 60 failed retries; an old one under way; and
                // another model's rows, which are not this model's to prune.
                add(1, "m", "committed")?;
                add(2, "m", "health")?;
                for id in 3..63 {
                    add(id, "m", "failed")?;
                }
                for id in 100..140 {
                    add(id, "other", "rolled_back")?;
                }
                let gone = prune_finished(&tx, "m")?;
                let ids: Vec<i64> = tx
                    .prepare("SELECT id FROM updates WHERE model = 'm' ORDER BY id")?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                let others: i64 =
                    tx.query_row("SELECT count(*) FROM updates WHERE model = 'other'", [], |r| {
                        r.get(0)
                    })?;
                Ok((gone, ids, others))
            })
            .await
            .unwrap();
        let (gone, ids, others) = left;
        // A model never committed is pruned too (no committed row to keep).
        let never = store
            .call(|c| {
                let tx = c.transaction()?;
                for id in 200..260 {
                    tx.execute(
                        "INSERT INTO updates (id, model, version, sha256, manifest, source, state, created_ms, updated_ms)
                         VALUES (?1, 'n', '1.0.0', 'x', x'00', 's', 'failed', 0, 0)",
                        [id],
                    )?;
                }
                let gone = prune_finished(&tx, "n")?;
                Ok(gone)
            })
            .await
            .unwrap();
        assert_eq!(never, 60 - KEEP_UPDATES_PER_MODEL as usize);
        let mut want = vec![1, 2];
        want.extend(63 - KEEP_UPDATES_PER_MODEL..63);
        assert_eq!(ids, want);
        assert_eq!(gone, 60 - KEEP_UPDATES_PER_MODEL as usize);
        assert_eq!(others, 40);
    }
}
