//! Over-the-air model updates: the state machine from a signed manifest to a committed (or
//! rolled back) model version, resumable after a crash at any instant.
//!
//! ```text
//!  manifest ─verify─► downloading ─all chunks─► verifying ─► staged ─► self_testing
//!     │ (refused: event, nothing changes)                                   │
//!     ▼                                                                      ▼
//!  committed ◄─ window passes ─ health ◄──────────────────────────── activating
//!                                  └─ errors or a hung inference ─► rolled_back
//!  any step that fails ─► failed (with a code and a reason)
//! ```
//!
//! One task owns every update and takes one at a time; each state change is one SQLite
//! transaction together with its event in the outbox. Chunks are written into a staging file
//! (`<state_dir>/updates/<id>/artifact`) at their offset and fsynced before the row that says
//! the box holds them commits, so after a restart only chunks never recorded are fetched
//! again. The model files themselves go through the registry (temp, fsync, rename), and the
//! switch to a new version is the registry's one transaction: after `kill -9` the active
//! version is the old or the new one, and a restart carries on from the recorded state.
//!
//! Delivery over MQTT: the manifest is retained on `<prefix>/fleet/<group>/update/<model>` or
//! `<prefix>/<device>/update/<model>`; chunk `i` of artifact `<sha256>` is retained on
//! `<prefix>/artifacts/<sha256>/<i>`. The box subscribes to a few missing chunks at a time
//! (`updates.window`) and unsubscribes from each once it is stored, so a box that joins late,
//! or restarts halfway, fetches exactly what it is missing. Key rotations arrive retained on
//! `<prefix>/fleet/keys`. Progress is reported as events and, retained, on
//! `<prefix>/<device>/updates/<model>`.
//!
//! A bundle file takes the same path: `ternd install` with the daemon stopped drives this
//! machine itself; with the daemon running it drops the file into `<state_dir>/spool/` and
//! waits for `<name>.result`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{OptionalExtension, params};
use serde_json::{Value, json};
use tern_update::artifact::{self, BundleFile, UnpackError};
use tern_update::bundle::{self, KeySet, RefusalError, Signed};
use tern_update::command::PublicKey;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::UpdatesConfig;
use crate::control::Control;
use crate::fleet::mqtt::Link;
use crate::outbox::Outbox;
use crate::registry::Registry;
use crate::store::{Store, StoreError, now_ms};

/// A download that has received nothing for this long asks for its chunks again.
const STALL: Duration = Duration::from_secs(20);
/// A chunk refused as bad is asked for again after this long (the operator may republish).
const RETRY_BAD_CHUNK: Duration = Duration::from_secs(10);
/// An inference stuck this long during the health window rolls the new version back.
const HUNG: Duration = Duration::from_secs(30);
/// A daemon that restarts this often inside one health window rolls the new version back.
const MAX_HEALTH_RESTARTS: u64 = 3;
/// A download that stalls this many times in a row (no chunk for STALL each time) fails as
/// `stalled`; the manifest is taken again when it is delivered again.
const MAX_STALLS: u32 = 30;
/// A step whose state could not be recorded is tried again after this long.
const STEP_RETRY: Duration = Duration::from_secs(5);
/// Manifests kept waiting while another update runs.
const MAX_WAITING: usize = 16;
/// Retained status messages at most this often while downloading.
const STATUS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Downloading,
    Verifying,
    Staged,
    SelfTesting,
    Activating,
    Health,
    Committed,
    Failed,
    RolledBack,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Downloading => "downloading",
            State::Verifying => "verifying",
            State::Staged => "staged",
            State::SelfTesting => "self_testing",
            State::Activating => "activating",
            State::Health => "health",
            State::Committed => "committed",
            State::Failed => "failed",
            State::RolledBack => "rolled_back",
        }
    }

    fn parse(s: &str) -> Option<State> {
        Some(match s {
            "downloading" => State::Downloading,
            "verifying" => State::Verifying,
            "staged" => State::Staged,
            "self_testing" => State::SelfTesting,
            "activating" => State::Activating,
            "health" => State::Health,
            "committed" => State::Committed,
            "failed" => State::Failed,
            "rolled_back" => State::RolledBack,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, State::Committed | State::Failed | State::RolledBack)
    }
}

/// Failure codes after which the same manifest may be tried again when it is delivered again
/// (the box's own trouble, not the update's).
/// Chunk-level codes count too: a bundle file damaged in transit (or a chunk cut short) says
/// nothing against the manifest itself.
const RETRYABLE: &[&str] = &[
    "no_space",
    "io",
    "interrupted",
    "stalled",
    "withdrawn",
    "bad_chunk",
    "bad_size",
    "truncated_chunk",
    "foreign_chunk",
];

/// What the updater is told.
pub enum Input {
    /// A manifest from `source` (a topic).
    Manifest {
        source: String,
        payload: Bytes,
    },
    /// A key rotation document.
    Keys {
        payload: Bytes,
    },
    /// A chunk message from `<prefix>/artifacts/<sha256>/<index>`.
    Chunk {
        sha256: String,
        index: usize,
        payload: Bytes,
    },
    /// The fleet link (re)connected: chunk subscriptions start over on it.
    Online(Link),
    Offline,
}

/// Everything the update machine works with.
#[derive(Clone)]
pub struct Deps {
    pub store: Store,
    pub registry: Arc<Mutex<Registry>>,
    pub outbox: Option<Outbox>,
    pub control: Option<Control>,
    pub cfg: UpdatesConfig,
    pub state_dir: PathBuf,
    pub device: String,
    pub groups: Vec<String>,
    /// `<prefix>` of the fleet topics, if there is a fleet link.
    pub prefix: Option<String>,
    pub pools: crate::config::Pools,
}

impl Deps {
    /// What a box configured as `config` updates with; `control` only inside the daemon.
    pub fn new(
        config: &crate::config::Config,
        store: Store,
        registry: Arc<Mutex<Registry>>,
        outbox: Option<Outbox>,
        control: Option<Control>,
    ) -> Deps {
        let fleet = config.fleet.as_ref();
        Deps {
            store,
            registry,
            outbox,
            control,
            cfg: config.updates.clone(),
            state_dir: config.state_dir.clone(),
            device: fleet.map(|f| f.device.clone()).unwrap_or_default(),
            groups: fleet.map(|f| f.groups.clone()).unwrap_or_default(),
            prefix: fleet.map(|f| f.prefix.clone()),
            pools: config.pools(),
        }
    }
}

/// Handle to the running updater.
#[derive(Clone)]
pub struct Updater {
    tx: mpsc::Sender<Input>,
}

impl Updater {
    /// Hand a message to the updater without waiting (the MQTT session never blocks on it).
    /// A chunk lost to a full queue is asked for again when the download stalls.
    pub fn offer(&self, input: Input) {
        match self.tx.try_send(input) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Input::Chunk { index, .. })) => {
                // Asked for again when the download stalls.
                tracing::warn!(chunk = index, "updater busy; chunk dropped");
            }
            Err(mpsc::error::TrySendError::Full(input)) => {
                // Manifests, key rotations and link changes must not be lost: wait for room
                // off the caller's task.
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(input).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Start the updater task: it resumes whatever update was in progress, then serves `Input`s
/// and the spool directory until `cancel`.
pub fn spawn(deps: Deps, cancel: CancellationToken) -> (Updater, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(run(Machine::new(deps), rx, cancel));
    (Updater { tx }, task)
}

async fn run(mut m: Machine, mut rx: mpsc::Receiver<Input>, cancel: CancellationToken) {
    m.resume().await;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // After a long step (hashing, a self-test) one tick, not a burst of missed ones.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            input = rx.recv() => match input {
                Some(i) => m.handle(i).await,
                None => break,
            },
            _ = tick.tick() => m.tick().await,
        }
    }
    m.stopping().await;
}

/// The update being worked on.
struct Active {
    id: i64,
    signed: Signed,
    version: semver::Version,
    state: State,
    /// Where the manifest came from: its topic, or `file:<path>`.
    source: String,
    /// SHA-256 of the manifest as delivered, in status messages so a rollout tool can tell
    /// this update from an older one of the same version.
    manifest_sha256: String,
    /// Stall rounds in a row without a stored chunk.
    stalls: u32,
    /// When a step whose record failed may be tried again.
    retry_at_step: Option<Instant>,
    /// Chunks already reported as refused (one event per chunk, not per retry).
    reported: HashSet<usize>,
    /// Code and reason of a failed or rolled back end, for the status message.
    outcome: Option<(String, String)>,
    dir: PathBuf,
    held: Vec<bool>,
    nheld: usize,
    received: u64,
    /// Chunks subscribed to and not yet received.
    asked: BTreeSet<usize>,
    /// Chunks refused as bad, with when to ask again.
    retry_at: HashMap<usize, Instant>,
    last_chunk: Instant,
    last_percent: u64,
    health: Option<HealthWatch>,
}

struct HealthWatch {
    deadline: Instant,
    /// Restarts of the daemon inside this update's health window so far.
    restarts: u64,
}

/// The outcome of a manifest offered to the box.
#[derive(Debug)]
pub enum Offer {
    /// Accepted as update `id`.
    Accepted(i64),
    /// The same manifest was seen before: nothing to do.
    Known,
    /// Another update is running; this one waits for it.
    Queued,
    Refused(RefusalError),
}

pub struct Machine {
    d: Deps,
    current: Option<Active>,
    /// Manifests that arrived while another update ran, latest per source.
    waiting: Vec<(String, Bytes)>,
    /// Spool files handed over by `ternd install`, by update id, to answer when it ends.
    spooled: HashMap<i64, PathBuf>,
    link: Option<Link>,
    /// The last status said per model, said again on every reconnect (retained, so a
    /// `tern-update status` started later sees it).
    statuses: HashMap<String, Value>,
    /// Digests of manifest payloads already handled in this run (retained messages come again
    /// on every reconnect).
    seen: HashSet<String>,
    last_status: Instant,
}

impl Machine {
    pub fn new(d: Deps) -> Machine {
        Machine {
            d,
            current: None,
            waiting: Vec::new(),
            spooled: HashMap::new(),
            link: None,
            statuses: HashMap::new(),
            seen: HashSet::new(),
            last_status: Instant::now(),
        }
    }

    fn updates_dir(&self) -> PathBuf {
        self.d.state_dir.join("updates")
    }

    pub fn spool_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("spool")
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Manifest { source, payload } => {
                let _ = self.offer(&source, payload).await;
            }
            Input::Keys { payload } => self.rotate(payload).await,
            Input::Chunk {
                sha256,
                index,
                payload,
            } => self.chunk(&sha256, index, &payload).await,
            Input::Online(link) => {
                self.link = Some(link);
                if let Some(a) = &mut self.current {
                    a.asked.clear();
                }
                self.request_chunks();
                self.say_status(None);
            }
            Input::Offline => {
                if let Some(a) = &mut self.current {
                    a.asked.clear();
                }
            }
        }
    }

    /// Pick up where the last run stopped: clear staging left by updates that ended (or never
    /// began), then carry the open update on.
    pub async fn resume(&mut self) {
        type OpenRow = (i64, String, String, Vec<u8>, Option<i64>);
        let open: Vec<OpenRow> = match self
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
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "updates not resumed");
                return;
            }
        };
        let keep: HashSet<String> = open.iter().map(|o| o.0.to_string()).collect();
        self.clean_staging(&keep);
        let n = open.len();
        for (i, (id, state, source, manifest, until)) in open.into_iter().enumerate() {
            // Only one update runs at a time; more open rows would be a bug, but they must not
            // block the box forever: all but the newest end here.
            if i + 1 < n {
                self.finish_row(
                    id,
                    State::Failed,
                    "superseded",
                    "a newer update replaced it",
                )
                .await;
                continue;
            }
            let signed = match bundle::parse(&manifest)
                .ok()
                .and_then(|m| serde_json::from_value::<Signed>(m.signed).ok())
            {
                Some(s) => s,
                None => {
                    self.finish_row(
                        id,
                        State::Failed,
                        "internal",
                        "recorded manifest unreadable",
                    )
                    .await;
                    continue;
                }
            };
            let state = State::parse(&state).unwrap_or(State::Failed);
            let mut a = self.active(id, signed, state, &source, &manifest);
            if state == State::Downloading && source.starts_with("file:") {
                // A bundle file's copy was cut short; `ternd install` (or the spool, which
                // still holds the file) starts it again.
                self.finish_row(
                    id,
                    State::Failed,
                    "interrupted",
                    "the copy from the bundle file was interrupted",
                )
                .await;
                let _ = std::fs::remove_dir_all(&a.dir);
                continue;
            }
            if state == State::Downloading {
                match self.held_chunks(id).await {
                    Ok(held) => {
                        for i in held {
                            if let Some(h) = a.held.get_mut(i) {
                                if !*h {
                                    a.nheld += 1;
                                }
                                *h = true;
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "held chunks not read"),
                }
                if !a.dir.join("artifact").exists() {
                    // The staging file is gone (or never reached the disk): start it over.
                    let _ = self.forget_chunks(id).await;
                    a.held.iter_mut().for_each(|h| *h = false);
                    a.nheld = 0;
                    self.current = Some(a);
                    if let Err(e) = self.create_staging() {
                        self.fail("io", &format!("staging: {e}")).await;
                        continue;
                    }
                    a = self.current.take().expect("just set");
                }
            }
            if state == State::Health {
                // `until` set means a daemon had started this window before: a restart.
                a.health = self.watch(&a, until.is_some()).await;
            }
            tracing::info!(update = id, model = %a.signed.name, version = %a.version, state = state.as_str(), held = a.nheld, "resuming update");
            self.current = Some(a);
            self.advance().await;
        }
    }

    fn active(
        &self,
        id: i64,
        signed: Signed,
        state: State,
        source: &str,
        manifest: &[u8],
    ) -> Active {
        let n = signed.artifact.chunks.len();
        Active {
            id,
            version: semver::Version::parse(&signed.version)
                .unwrap_or(semver::Version::new(0, 0, 0)),
            signed,
            state,
            source: source.to_string(),
            manifest_sha256: tern_update::sha256_hex(manifest),
            stalls: 0,
            retry_at_step: None,
            reported: HashSet::new(),
            outcome: None,
            dir: self.updates_dir().join(id.to_string()),
            held: vec![false; n],
            nheld: 0,
            received: 0,
            asked: BTreeSet::new(),
            retry_at: HashMap::new(),
            last_chunk: Instant::now(),
            last_percent: 0,
            health: None,
        }
    }

    /// Remove staging directories no open update owns (ended, or created by a run that died
    /// before its row committed).
    fn clean_staging(&self, keep: &HashSet<String>) {
        let Ok(rd) = std::fs::read_dir(self.updates_dir()) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                tracing::info!(path = %e.path().display(), "removing leftover update staging");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    async fn trust(&self) -> Result<(KeySet, u64), StoreError> {
        let cfg = self.d.cfg.clone();
        self.d
            .store
            .call(move |c| {
                let row: Option<(i64, String, i64, String)> = c
                    .query_row(
                        "SELECT version, keys, threshold, retired FROM update_trust WHERE id = 1",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()?;
                Ok(match row {
                    Some((version, keys, threshold, retired)) => {
                        let parse = |s: &str| -> Vec<PublicKey> {
                            serde_json::from_str::<Vec<String>>(s)
                                .unwrap_or_default()
                                .iter()
                                .filter_map(|k| PublicKey::parse(k).ok())
                                .collect()
                        };
                        (
                            KeySet {
                                keys: parse(&keys),
                                threshold: threshold as usize,
                                retired: parse(&retired),
                            },
                            version as u64,
                        )
                    }
                    None => (
                        KeySet {
                            keys: cfg.keys.clone(),
                            threshold: cfg.threshold,
                            retired: Vec::new(),
                        },
                        0,
                    ),
                })
            })
            .await
    }

    /// Verify a manifest for this box: signatures against the trusted keys, bounds, expiry,
    /// target, and above the highest version ever installed.
    async fn verify(&self, bytes: &[u8]) -> Result<Signed, RefusalError> {
        let m = bundle::parse(bytes)?;
        let (keys, _) = self
            .trust()
            .await
            .map_err(|e| RefusalError::Malformed(format!("trusted keys unreadable: {e}")))?;
        if keys.keys.is_empty() {
            return Err(RefusalError::UnknownKey(
                "(none: updates.keys is empty in this box's config)".into(),
            ));
        }
        // The name is only used to look up the installed version here; `verify` checks it.
        let name = m.signed.get("name").and_then(Value::as_str).unwrap_or("");
        let installed = if bundle::safe_name(name) {
            self.d
                .registry
                .lock()
                .await
                .highest(name)
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        let ternd = semver::Version::parse(crate::VERSION).expect("our version is semver");
        let this = bundle::ThisBox {
            device: &self.d.device,
            groups: &self.d.groups,
            arch: std::env::consts::ARCH,
            ternd: &ternd,
        };
        let now = now_ms() / 1000;
        bundle::verify(&m, &keys, now, &this, installed.as_ref())
    }

    /// A manifest arrived (from a topic or a bundle file): verify it and, if it is good and
    /// new, record it as an update in `downloading`.
    pub async fn offer(&mut self, source: &str, payload: Bytes) -> Offer {
        if payload.is_empty() {
            self.withdraw(source).await;
            return Offer::Known;
        }
        let digest = tern_update::sha256_hex(&payload);
        if self.seen.contains(&digest) {
            return Offer::Known;
        }
        if self.known(&payload).await {
            self.seen.insert(digest);
            return Offer::Known;
        }
        self.offer_new(source, payload, digest).await
    }

    /// The operator cleared a retained manifest: whatever it started and has not finished
    /// downloading stops, and a copy waiting its turn is forgotten.
    async fn withdraw(&mut self, source: &str) {
        self.waiting.retain(|(s, _)| s != source);
        if let Some(a) = &self.current
            && a.state == State::Downloading
            && a.source == source
        {
            tracing::info!(update = a.id, %source, "manifest withdrawn; download stopped");
            self.finish(State::Failed, "withdrawn", &format!("{source} was cleared"))
                .await;
        }
    }

    /// Verify and take a manifest not handled before.
    async fn offer_new(&mut self, source: &str, payload: Bytes, digest: String) -> Offer {
        if payload.len() > bundle::MAX_MANIFEST_BYTES {
            // Refused at once, never kept waiting: the bound holds before anything is stored.
            let e = bundle::parse(&payload).expect_err("over the bound");
            self.seen.insert(digest);
            self.refused(source, &payload, &e).await;
            return Offer::Refused(e);
        }
        // What it claims to be, unverified: only used to decide whether it waits.
        let (claimed_name, claimed_version) = peek(&payload);
        // A download may be replaced by a newer version of the same model (the operator fixed
        // a bad publish); an older or equal one, or any later step, waits its turn.
        let replaces = self.current.as_ref().is_some_and(|a| {
            a.state == State::Downloading
                && claimed_name.as_deref() == Some(a.signed.name.as_str())
                && claimed_version.as_ref().is_some_and(|v| *v > a.version)
        });
        if let Some(a) = &self.current
            && !replaces
        {
            tracing::info!(%source, running = a.id, "an update is in progress; this manifest waits");
            // One waiting manifest per model: the highest version claimed.
            let same_model = |p: &Bytes| {
                claimed_name.is_some() && peek(p).0.as_deref() == claimed_name.as_deref()
            };
            if self.waiting.iter().any(|(s, p)| {
                s != source
                    && same_model(p)
                    && peek(p).1 >= claimed_version
                    && claimed_version.is_some()
            }) {
                tracing::info!(%source, "a higher version of this model is already waiting; this one is dropped");
                return Offer::Queued;
            }
            self.waiting.retain(|(s, p)| s != source && !same_model(p));
            if self.waiting.len() >= MAX_WAITING {
                let (dropped, _) = self.waiting.remove(0);
                tracing::warn!(source = %dropped, "too many manifests waiting; the oldest is dropped (it comes again on reconnect)");
            }
            self.waiting.push((source.to_string(), payload));
            return Offer::Queued;
        }
        self.seen.insert(digest);
        let signed = match self.verify(&payload).await {
            Ok(s) => s,
            Err(e) => {
                self.refused(source, &payload, &e).await;
                return Offer::Refused(e);
            }
        };
        if let Some(a) = &self.current {
            let why = format!(
                "replaced by {} {} from {source}",
                signed.name, signed.version
            );
            tracing::info!(update = a.id, "{why}");
            // Not `finish`: that would take a waiting manifest before this one.
            let _ = std::fs::remove_dir_all(&a.dir);
            self.finish_row(a.id, State::Failed, "superseded", &why)
                .await;
            self.close().await;
        }
        match self.accept(source, &payload, signed).await {
            Ok(id) => Offer::Accepted(id),
            Err(e) => {
                tracing::error!(error = %e, "update not recorded");
                self.seen.remove(&tern_update::sha256_hex(&payload));
                Offer::Refused(RefusalError::Malformed(format!("not recorded: {e}")))
            }
        }
    }

    /// True if this exact manifest was accepted before and needs nothing more.
    async fn known(&self, payload: &Bytes) -> bool {
        let p = payload.to_vec();
        let row: Option<(String, Option<String>)> = self
            .d
            .store
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT state, code FROM updates WHERE manifest = ?1 ORDER BY id DESC LIMIT 1",
                    [p],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
            })
            .await
            .ok()
            .flatten();
        match row {
            None => false,
            Some((state, code)) => {
                let retry =
                    state == "failed" && code.is_some_and(|c| RETRYABLE.contains(&c.as_str()));
                !retry
            }
        }
    }

    async fn refused(&mut self, source: &str, payload: &[u8], e: &RefusalError) {
        let peek: Value = serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v.get("signed").cloned())
            .unwrap_or(Value::Null);
        tracing::warn!(%source, code = e.code().as_str(), error = %e, "update refused");
        // Said on the status topic too, under the model the update topic names, so a rollout
        // tool sees a refusal at once instead of waiting for an outcome that never comes.
        // Not for an older or the same version: the box has something newer, and its status
        // (committed, say) must not be hidden by a stale manifest on another topic.
        let topic_model = self
            .d
            .prefix
            .as_ref()
            .filter(|p| source.starts_with(&format!("{p}/")) && source.contains("/update/"))
            .and_then(|_| source.rsplit('/').next());
        if let Some(model) =
            topic_model.filter(|_| !matches!(e.code().as_str(), "downgrade" | "replay"))
        {
            let body = json!({
                "device": self.d.device, "model": model, "version": peek.get("version"),
                "state": "refused", "code": e.code().as_str(), "reason": e.to_string(),
                "manifest_sha256": tern_update::sha256_hex(payload), "ts_ms": now_ms(),
            });
            self.statuses.insert(model.to_string(), body);
            self.say_status(Some(model));
        }
        self.event(json!({
            "event": "update.refused",
            "code": e.code().as_str(),
            "reason": e.to_string(),
            "source": source,
            "model": peek.get("name"),
            "version": peek.get("version"),
        }))
        .await;
    }

    async fn accept(
        &mut self,
        source: &str,
        payload: &[u8],
        signed: Signed,
    ) -> Result<i64, StoreError> {
        let need = signed.artifact.size.saturating_mul(3) + self.d.cfg.min_free_bytes;
        let (s, p, src) = (signed.clone(), payload.to_vec(), source.to_string());
        let ob = self.d.outbox.clone();
        let id = self
            .d
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                let now = now_ms();
                tx.execute(
                    "INSERT INTO updates (model, version, sha256, manifest, source, state, created_ms, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'downloading', ?6, ?6)",
                    params![s.name, s.version, s.artifact.sha256, p, src, now],
                )?;
                let id = tx.last_insert_rowid();
                if let Some(ob) = &ob {
                    ob.event(&tx, json!({
                        "event": "update.downloading", "update": id, "model": s.name,
                        "version": s.version, "size": s.artifact.size,
                        "chunks": s.artifact.chunks.len(), "source": src,
                    }))?;
                }
                tx.commit()?;
                Ok(id)
            })
            .await?;
        self.wake();
        tracing::info!(update = id, model = %signed.name, version = %signed.version, size = signed.artifact.size, %source, "update accepted");
        let a = self.active(id, signed, State::Downloading, source, payload);
        crate::crash_point("update:accepted");
        // Room for the staging file, the unpacked package and the installed copy.
        let free = crate::fleet::telemetry::disk_free_bytes(&self.d.state_dir).unwrap_or(u64::MAX);
        self.current = Some(a);
        if free < need {
            self.fail(
                "no_space",
                &format!(
                    "{} bytes free on the state directory's file system, {need} needed",
                    free
                ),
            )
            .await;
            return Ok(id);
        }
        if let Err(e) = self.create_staging() {
            self.fail("io", &format!("staging: {e}")).await;
            return Ok(id);
        }
        self.request_chunks();
        self.publish_status(true);
        Ok(id)
    }

    fn create_staging(&self) -> std::io::Result<()> {
        let a = self.current.as_ref().expect("an update");
        std::fs::create_dir_all(&a.dir)?;
        let f = File::create(a.dir.join("artifact"))?;
        f.set_len(a.signed.artifact.size)?;
        f.sync_all()?;
        File::open(&a.dir)?.sync_all()?;
        File::open(self.updates_dir())?.sync_all()
    }

    /// Subscribe to missing chunks up to the window.
    fn request_chunks(&mut self) {
        let (Some(link), Some(prefix)) = (&self.link, &self.d.prefix) else {
            return;
        };
        let Some(a) = &mut self.current else {
            return;
        };
        if a.state != State::Downloading || !link.is_connected() {
            return;
        }
        let now = Instant::now();
        let window = self.d.cfg.window;
        for i in 0..a.held.len() {
            if a.asked.len() >= window {
                break;
            }
            if a.held[i] || a.asked.contains(&i) || a.retry_at.get(&i).is_some_and(|t| *t > now) {
                continue;
            }
            let topic = format!("{prefix}/artifacts/{}/{i}", a.signed.artifact.sha256);
            match link.subscribe(&topic) {
                Ok(()) => {
                    a.asked.insert(i);
                }
                Err(e) => {
                    tracing::debug!(%topic, error = %e, "chunk subscription not queued; retried later");
                    break;
                }
            }
        }
        if a.asked.is_empty() {
            return;
        }
        a.last_chunk = a.last_chunk.max(now - STALL / 2);
    }

    fn unsubscribe(&self, sha: &str, i: usize) {
        if let (Some(link), Some(prefix)) = (&self.link, &self.d.prefix) {
            let _ = link.unsubscribe(&format!("{prefix}/artifacts/{sha}/{i}"));
        }
    }

    async fn chunk(&mut self, sha: &str, index: usize, payload: &[u8]) {
        let Some(a) = &mut self.current else {
            return;
        };
        if a.state != State::Downloading
            || a.signed.artifact.sha256 != sha
            || !a.asked.contains(&index)
        {
            return; // a retained chunk still in flight after its unsubscribe, or not ours
        }
        tracing::debug!(
            update = a.id,
            chunk = index,
            bytes = payload.len(),
            "chunk received"
        );
        a.asked.remove(&index);
        a.last_chunk = Instant::now();
        let sha = sha.to_string();
        self.unsubscribe(&sha, index);
        let a = self.current.as_mut().expect("checked");
        if a.held[index] {
            return;
        }
        let data = match a.signed.artifact.open_chunk(index, payload) {
            Ok(d) => d,
            Err(e) => {
                a.retry_at.insert(index, Instant::now() + RETRY_BAD_CHUNK);
                // Said once per chunk: a bad chunk left retained is asked for again and again.
                let first = a.reported.insert(index);
                let (id, name, version) = (a.id, a.signed.name.clone(), a.signed.version.clone());
                tracing::warn!(update = id, chunk = index, code = e.code().as_str(), error = %e, "chunk refused");
                if first {
                    self.event(json!({
                        "event": "update.refused", "code": e.code().as_str(), "reason": e.to_string(),
                        "update": id, "model": name, "version": version, "chunk": index,
                    }))
                    .await;
                }
                self.request_chunks();
                return;
            }
        };
        let offset = index as u64 * a.signed.artifact.chunk_size;
        let path = a.dir.join("artifact");
        let written = (|| -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.write_all_at(data, offset)?;
            f.sync_data()
        })();
        if let Err(e) = written {
            self.fail("io", &format!("writing chunk {index}: {e}"))
                .await;
            return;
        }
        crate::crash_point("update:chunk-written");
        crate::crash_point(&format!("update:chunk-written-{}", a.nheld + 1));
        let (id, len) = (a.id, data.len() as i64);
        let r = self
            .d
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
            .await;
        if let Err(e) = r {
            self.fail("io", &format!("recording chunk {index}: {e}"))
                .await;
            return;
        }
        let a = self.current.as_mut().expect("checked");
        a.held[index] = true;
        a.nheld += 1;
        crate::crash_point(&format!("update:chunk-{}", a.nheld));
        a.received += len as u64;
        a.retry_at.remove(&index);
        a.stalls = 0;
        let percent = (a.nheld * 100 / a.held.len().max(1)) as u64;
        if percent / 10 > a.last_percent / 10 && a.nheld < a.held.len() {
            a.last_percent = percent;
            let ev = json!({
                "event": "update.progress", "update": a.id, "model": a.signed.name,
                "version": a.signed.version, "percent": percent,
                "chunks": a.nheld, "of": a.held.len(),
            });
            self.event(ev).await;
        }
        self.publish_status(false);
        if self
            .current
            .as_ref()
            .is_some_and(|a| a.nheld == a.held.len())
        {
            self.advance().await;
        } else {
            self.request_chunks();
        }
    }

    /// Drive the current update through every step that needs no outside input.
    async fn advance(&mut self) {
        while let Some(a) = &self.current {
            let state = a.state;
            match state {
                State::Downloading => {
                    if a.nheld < a.held.len() {
                        self.request_chunks();
                        return;
                    }
                    if self.set_state(State::Verifying, json!({})).await.is_err() {
                        return;
                    }
                }
                State::Verifying => {
                    if let Err((code, reason)) = self.verify_and_stage().await {
                        self.fail(code, &reason).await;
                        continue;
                    }
                    crate::crash_point("update:unpacked");
                    if self.set_state(State::Staged, json!({})).await.is_err() {
                        return;
                    }
                }
                State::Staged => {
                    if self.set_state(State::SelfTesting, json!({})).await.is_err() {
                        return;
                    }
                }
                State::SelfTesting => {
                    let package = a.dir.join("package");
                    let name = a.signed.name.clone();
                    let r = self.d.registry.lock().await.install(&package).await;
                    match r {
                        Ok(_) => {
                            crate::crash_point("update:installed");
                            let previous = self.d.registry.lock().await.active_version(&name);
                            let prev = previous.map(|v| v.to_string());
                            let id = a.id;
                            let _ = self
                                .d
                                .store
                                .call(move |c| {
                                    c.execute(
                                        "UPDATE updates SET previous = ?2 WHERE id = ?1",
                                        params![id, prev],
                                    )?;
                                    Ok(())
                                })
                                .await;
                            if self.set_state(State::Activating, json!({})).await.is_err() {
                                return;
                            }
                            // The registry holds its own copy now; the staging is not needed
                            // again, whatever happens next.
                            if let Some(a) = &self.current {
                                let _ = std::fs::remove_dir_all(&a.dir);
                            }
                        }
                        Err(e) => {
                            let code = match e.code() {
                                "internal" => "io",
                                _ => "self_test",
                            };
                            self.fail(code, &e.to_string()).await;
                        }
                    }
                }
                State::Activating => {
                    let (name, version) = (a.signed.name.clone(), a.version.clone());
                    // The running pool's settings (a reload may have changed them since this
                    // task started): the new version swaps into the pool pipelines use.
                    let live = self.d.registry.lock().await.pool(&name).map(|p| p.config());
                    let cfg = live.unwrap_or_else(|| self.d.pools.get(&name));
                    let r = self
                        .d
                        .registry
                        .lock()
                        .await
                        .activate(&name, &version, cfg)
                        .await;
                    match r {
                        Ok(()) => {
                            crate::crash_point("update:activated");
                            if let Some(c) = &self.d.control {
                                c.local(crate::control::LocalEvent::ModelActivated {
                                    model: name.clone(),
                                    version: version.to_string(),
                                });
                            }
                            self.touch();
                            let a = self.current.as_ref().expect("current");
                            let w = self.watch(a, false).await;
                            let window = w.as_ref().map(|_| self.d.cfg.health_window.as_secs());
                            self.current.as_mut().expect("current").health = w;
                            if self
                                .set_state(State::Health, json!({"window_secs": window}))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => self.fail("activation", &e.to_string()).await,
                    }
                }
                State::Health => {
                    if a.health.is_some() {
                        self.check_health().await;
                    }
                    return;
                }
                State::Committed | State::Failed | State::RolledBack => {
                    self.end().await;
                    return;
                }
            }
        }
    }

    /// Hash the whole staging file, then unpack the package it holds next to it.
    async fn verify_and_stage(&self) -> Result<(), (&'static str, String)> {
        let a = self.current.as_ref().expect("an update");
        let (dir, art) = (a.dir.clone(), a.signed.artifact.clone());
        let (name, version) = (a.signed.name.clone(), a.version.clone());
        tokio::task::spawn_blocking(move || -> Result<(), (&'static str, String)> {
            let path = dir.join("artifact");
            let io = |e: std::io::Error| ("io", format!("{}: {e}", path.display()));
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
                .map_err(|e| (e.code().as_str(), e.to_string()))?;
            let package = dir.join("package");
            if package.exists() {
                return Ok(()); // unpacked before a restart; renamed into place whole
            }
            let tmp = dir.join("package.tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            let f = File::open(&path).map_err(io)?;
            artifact::unpack(std::io::BufReader::new(f), &tmp).map_err(|e| match e {
                UnpackError::Refused(r) => (r.code().as_str(), r.to_string()),
                UnpackError::Io { .. } => ("io", e.to_string()),
            })?;
            let m = crate::engine::Manifest::read(&tmp)
                .map_err(|e| ("package_mismatch", e.to_string()))?;
            if m.name != name || m.version != version {
                let e = RefusalError::PackageMismatch(format!(
                    "it holds {} {}, the manifest says {name} {version}",
                    m.name, m.version
                ));
                return Err((e.code().as_str(), e.to_string()));
            }
            std::fs::rename(&tmp, &package).map_err(io)?;
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(("internal", format!("verification panicked: {e}"))))
    }

    /// Start watching the new version. A window runs on this process's monotonic clock. After
    /// a clean stop it goes on where it was (the recorded end, but never more than a whole
    /// window away, whatever the wall clock did); after a crash it starts again from now, and
    /// the crash counts: a daemon that keeps dying in the window rolls the version back. With
    /// the daemon stopped (`ternd install`) there is nothing to watch yet.
    async fn watch(&self, a: &Active, resumed: bool) -> Option<HealthWatch> {
        if !self.in_daemon() {
            return None;
        }
        let window = self.d.cfg.health_window;
        let window_ms = window.as_millis() as i64;
        let id = a.id;
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
        Some(HealthWatch {
            deadline: Instant::now() + Duration::from_millis(left_ms.max(0) as u64),
            restarts: restarts as u64,
        })
    }

    /// The daemon stops cleanly: a health window in progress is marked so, so the restart
    /// neither counts as a crash nor starts the window over.
    async fn stopping(&self) {
        let Some(a) = &self.current else { return };
        if a.state != State::Health || a.health.is_none() {
            return;
        }
        let id = a.id;
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

    /// During the health window: roll back on errors, a hung inference or a daemon that keeps
    /// restarting; commit at its end.
    async fn check_health(&mut self) {
        let Some(a) = &self.current else { return };
        let Some(h) = &a.health else { return };
        let pool = self.d.registry.lock().await.pool(&a.signed.name);
        let active = pool.as_ref().map(|p| p.active());
        let mut problem = None;
        if h.restarts >= MAX_HEALTH_RESTARTS {
            problem = Some(format!(
                "ternd restarted {} times within the health window",
                h.restarts
            ));
        } else if active.as_ref().is_none_or(|m| m.version() != &a.version) {
            problem = Some("the new version is no longer the active one".to_string());
        } else if let (Some(p), Some(m)) = (&pool, &active) {
            // The new version's own outcomes: requests queued before the switch ran on the
            // old one and do not count.
            let ok = m.outcomes.ok.load(std::sync::atomic::Ordering::Relaxed);
            let bad = m.outcomes.failed.load(std::sync::atomic::Ordering::Relaxed);
            if bad >= self.d.cfg.health_max_errors && bad * 10 >= ok + bad {
                problem = Some(format!(
                    "{bad} inference error(s) and {ok} success(es) in the health window"
                ));
            } else if !p.healthy(HUNG) {
                problem = Some(format!(
                    "an inference has been running for more than {HUNG:?}"
                ));
            }
        }
        if let Some(reason) = problem {
            let (name, version) = (a.signed.name.clone(), a.version.clone());
            let r = self
                .d
                .registry
                .lock()
                .await
                .reject_active(&name, &version, &reason)
                .await;
            match r {
                Ok(to) => {
                    if let Some(c) = &self.d.control {
                        c.local(crate::control::LocalEvent::ModelActivated {
                            model: name.clone(),
                            version: to.clone(),
                        });
                    }
                    self.touch();
                    self.finish(
                        State::RolledBack,
                        "health",
                        &format!("{reason}; {to} active again"),
                    )
                    .await;
                }
                Err(e) => {
                    self.finish(
                        State::Failed,
                        "health",
                        &format!("{reason}; rollback failed: {e}"),
                    )
                    .await
                }
            }
            return;
        }
        if Instant::now() >= h.deadline {
            crate::crash_point("update:health-passed");
            self.finish(State::Committed, "", "").await;
        }
    }

    async fn tick(&mut self) {
        self.poll_spool().await;
        let Some(a) = &mut self.current else {
            return;
        };
        match a.state {
            State::Downloading if a.nheld == a.held.len() => {
                // Everything is here but the step on was not recorded: try it again.
                if a.retry_at_step.is_none_or(|t| Instant::now() >= t) {
                    self.advance().await;
                }
            }
            State::Downloading => {
                let now = Instant::now();
                if now_ms() / 1000 > a.signed.expires {
                    let why = format!(
                        "the manifest expired at {} before the download finished",
                        a.signed.expires
                    );
                    self.fail("expired", &why).await;
                    return;
                }
                if !a.asked.is_empty() && now.duration_since(a.last_chunk) > STALL {
                    a.stalls += 1;
                    if a.stalls >= MAX_STALLS {
                        let why = format!("no chunk arrived in {:?}", STALL * MAX_STALLS);
                        self.fail("stalled", &why).await;
                        return;
                    }
                    // Nothing for a while: a lost subscription, a chunk not (yet) published.
                    tracing::info!(
                        update = a.id,
                        missing = a.held.len() - a.nheld,
                        "download stalled; asking for its chunks again"
                    );
                    let asked: Vec<usize> = std::mem::take(&mut a.asked).into_iter().collect();
                    a.last_chunk = now;
                    let sha = a.signed.artifact.sha256.clone();
                    for i in asked {
                        self.unsubscribe(&sha, i);
                    }
                }
                self.request_chunks();
                self.publish_status(false);
            }
            State::Health => self.check_health().await,
            // A step whose record failed: try it again, not on every tick.
            _ => {
                if a.retry_at_step.is_none_or(|t| Instant::now() >= t) {
                    self.advance().await;
                }
            }
        }
    }

    /// Record the next state with its event; only once that committed does the update move
    /// on (a database that refuses the write, a full disk, stops it where it was, and the next
    /// tick tries again).
    async fn set_state(&mut self, state: State, extra: Value) -> Result<(), StoreError> {
        let a = self.current.as_ref().expect("an update");
        let (id, name, version) = (a.id, a.signed.name.clone(), a.signed.version.clone());
        let ob = self.d.outbox.clone();
        let mut ev = json!({
            "event": format!("update.{}", state.as_str()),
            "update": id, "model": name, "version": version,
        });
        if let (Value::Object(e), Value::Object(x)) = (&mut ev, extra) {
            e.extend(x);
        }
        let r = self
            .d
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "UPDATE updates SET state = ?2, updated_ms = ?3 WHERE id = ?1",
                    params![id, state.as_str(), now_ms()],
                )?;
                if let Some(ob) = &ob {
                    ob.event(&tx, ev)?;
                }
                tx.commit()?;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(update = id, state = state.as_str(), error = %e, "update state not recorded; trying again in {STEP_RETRY:?}");
            self.current.as_mut().expect("an update").retry_at_step =
                Some(Instant::now() + STEP_RETRY);
            return Err(e);
        }
        self.current.as_mut().expect("an update").state = state;
        self.wake();
        crate::crash_point(&format!("update:{}", state.as_str()));
        tracing::info!(update = id, model = %name, %version, state = state.as_str(), "update");
        self.publish_status(true);
        Ok(())
    }

    async fn fail(&mut self, code: &str, reason: &str) {
        self.finish(State::Failed, code, reason).await;
    }

    /// End the current update in `state`, remove its staging and start what waits.
    async fn finish(&mut self, state: State, code: &str, reason: &str) {
        let Some(a) = &self.current else { return };
        let id = a.id;
        if state == State::Failed || state == State::RolledBack {
            tracing::warn!(update = id, model = %a.signed.name, version = %a.signed.version, code, reason, "update {}", state.as_str());
        }
        // Staging goes first: a crash before the row commits resumes a state that needs
        // none (or makes it again), and once the row says it ended nothing is left behind.
        let _ = std::fs::remove_dir_all(&a.dir);
        if RETRYABLE.contains(&code) {
            // The same manifest, delivered again (a reconnect, a restart), is taken again.
            let digest = a.manifest_sha256.clone();
            self.seen.remove(&digest);
        }
        self.finish_row(id, state, code, reason).await;
        if let Some(a) = &mut self.current {
            a.state = state;
            if !code.is_empty() {
                a.outcome = Some((code.to_string(), reason.to_string()));
            }
        }
        self.publish_status(true);
        self.end().await;
    }

    async fn finish_row(&self, id: i64, state: State, code: &str, reason: &str) {
        let ob = self.d.outbox.clone();
        let (code, reason) = (
            (!code.is_empty()).then(|| code.to_string()),
            (!reason.is_empty()).then(|| reason.to_string()),
        );
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
        self.wake();
        if state == State::Committed {
            tracing::info!(update = id, "update committed");
        }
    }

    /// After a final state: the next waiting manifest is taken.
    async fn end(&mut self) {
        self.close().await;
        while self.current.is_none() && !self.waiting.is_empty() {
            let (source, payload) = self.waiting.remove(0);
            Box::pin(self.offer(&source, payload)).await;
        }
        if self.current.is_some() {
            Box::pin(self.advance()).await;
        }
    }

    /// Let go of the current update: its staging, its chunk subscriptions, and the answer to
    /// `ternd install` if it came from the spool.
    async fn close(&mut self) {
        let Some(a) = self.current.take() else { return };
        let _ = std::fs::remove_dir_all(&a.dir);
        if let Some(link) = &self.link
            && let Some(prefix) = &self.d.prefix
        {
            for i in &a.asked {
                let _ = link.unsubscribe(&format!(
                    "{prefix}/artifacts/{}/{i}",
                    a.signed.artifact.sha256
                ));
            }
        }
        if let Some(spool) = self.spooled.remove(&a.id) {
            let row = self.row(a.id).await;
            answer_spool(&spool, &row.unwrap_or(json!({"update": a.id})));
        }
    }

    async fn held_chunks(&self, id: i64) -> Result<Vec<usize>, StoreError> {
        self.d
            .store
            .call(move |c| {
                let mut stmt = c.prepare("SELECT idx FROM update_chunks WHERE update_id = ?1")?;
                let v = stmt
                    .query_map([id], |r| r.get::<_, i64>(0))?
                    .map(|r| r.map(|i| i as usize))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(v)
            })
            .await
    }

    async fn forget_chunks(&self, id: i64) -> Result<(), StoreError> {
        self.d
            .store
            .call(move |c| {
                c.execute("DELETE FROM update_chunks WHERE update_id = ?1", [id])?;
                c.execute("UPDATE updates SET received_bytes = 0 WHERE id = ?1", [id])?;
                Ok(())
            })
            .await
    }

    /// The update row as JSON (for `ternd install` and status).
    pub async fn row(&self, id: i64) -> Option<Value> {
        self.d
            .store
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT id, model, version, state, code, reason, received_bytes FROM updates WHERE id = ?1",
                    [id],
                    |r| {
                        Ok(json!({
                            "update": r.get::<_, i64>(0)?, "model": r.get::<_, String>(1)?,
                            "version": r.get::<_, String>(2)?, "state": r.get::<_, String>(3)?,
                            "code": r.get::<_, Option<String>>(4)?, "reason": r.get::<_, Option<String>>(5)?,
                            "received_bytes": r.get::<_, i64>(6)?,
                        }))
                    },
                )
                .optional()?)
            })
            .await
            .ok()
            .flatten()
    }

    /// A key rotation: accepted when a threshold of the current keys signed it.
    async fn rotate(&mut self, payload: Bytes) {
        if payload.is_empty() {
            return;
        }
        let digest = tern_update::sha256_hex(&payload);
        if !self.seen.insert(digest) {
            return;
        }
        let p = payload.to_vec();
        let stored: Option<Vec<u8>> = self
            .d
            .store
            .call(|c| {
                Ok(
                    c.query_row("SELECT doc FROM update_trust WHERE id = 1", [], |r| {
                        r.get(0)
                    })
                    .optional()?,
                )
            })
            .await
            .ok()
            .flatten();
        if stored.as_deref() == Some(&p[..]) {
            return; // the rotation in force, delivered again
        }
        let result = match (bundle::parse(&payload), self.trust().await) {
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(RefusalError::Malformed(format!(
                "trusted keys unreadable: {e}"
            ))),
            (Ok(m), Ok((current, version))) => bundle::verify_rotation(&m, &current, version),
        };
        match result {
            Err(e) => {
                tracing::warn!(code = e.code().as_str(), error = %e, "key rotation refused");
                self.event(json!({"event": "update.refused", "code": e.code().as_str(), "reason": e.to_string(), "source": "keys"})).await;
            }
            Ok((set, version)) => {
                let keys: Vec<String> = set.keys.iter().map(|k| k.to_base64()).collect();
                let retired: Vec<String> = set.retired.iter().map(|k| k.to_base64()).collect();
                let ob = self.d.outbox.clone();
                let threshold = set.threshold as i64;
                let r = self
                    .d
                    .store
                    .call(move |c| {
                        let tx = c.transaction()?;
                        tx.execute(
                            "INSERT INTO update_trust (id, version, keys, threshold, retired, doc)
                             VALUES (1, ?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT (id) DO UPDATE SET version = excluded.version, keys = excluded.keys,
                               threshold = excluded.threshold, retired = excluded.retired, doc = excluded.doc",
                            params![version as i64, serde_json::to_string(&keys).expect("strings"), threshold,
                                    serde_json::to_string(&retired).expect("strings"), p],
                        )?;
                        if let Some(ob) = &ob {
                            ob.event(&tx, json!({"event": "update.keys_rotated", "version": version, "keys": keys, "threshold": threshold}))?;
                        }
                        tx.commit()?;
                        Ok(())
                    })
                    .await;
                match r {
                    Ok(()) => {
                        tracing::info!(version, "update keys rotated");
                        // Manifests refused under the old keys may be good under the new
                        // ones: have the broker deliver the retained ones again.
                        self.seen.clear();
                        self.redeliver_manifests();
                    }
                    Err(e) => tracing::error!(error = %e, "key rotation not recorded"),
                }
                self.wake();
            }
        }
    }

    /// Subscribe to the update topics again, which makes the broker send their retained
    /// manifests again.
    fn redeliver_manifests(&self) {
        let (Some(link), Some(prefix)) = (&self.link, &self.d.prefix) else {
            return;
        };
        let mut filters = vec![format!("{prefix}/{}/update/+", self.d.device)];
        for g in &self.d.groups {
            filters.push(format!("{prefix}/fleet/{g}/update/+"));
        }
        for f in filters {
            let _ = link.unsubscribe(&f);
            let _ = link.subscribe(&f);
        }
    }

    /// Take bundle files `ternd install` dropped into the spool directory.
    async fn poll_spool(&mut self) {
        if self.current.is_some() {
            return;
        }
        let dir = Self::spool_dir(&self.d.state_dir);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "bundle"))
            .collect();
        files.sort();
        let Some(path) = files.into_iter().next() else {
            return;
        };
        let outcome = self.install_file(&path).await;
        match outcome {
            Ok(id) if self.current.as_ref().is_some_and(|a| a.id == id) => {
                self.spooled.insert(id, path.clone());
            }
            Ok(id) => {
                let row = self.row(id).await.unwrap_or(json!({"update": id}));
                answer_spool(&path, &row);
            }
            Err(e) => answer_spool(
                &path,
                &json!({"state": "refused", "code": e.code(), "reason": e.to_string()}),
            ),
        }
    }

    /// Install from a bundle file: the same verification as over MQTT, the artifact copied
    /// from the file (each chunk checked) instead of fetched. Returns the update's id.
    pub async fn install_file(&mut self, path: &Path) -> Result<i64, InstallError> {
        let bundle = {
            let p = path.to_path_buf();
            tokio::task::spawn_blocking(move || BundleFile::open(&p))
                .await
                .map_err(|e| InstallError::Refused(RefusalError::Malformed(e.to_string())))?
        };
        let bundle = match bundle {
            Ok(b) => b,
            Err(UnpackError::Refused(e)) => {
                self.refused(&path.display().to_string(), b"", &e).await;
                return Err(e.into());
            }
            Err(e @ UnpackError::Io { .. }) => {
                return Err(RefusalError::Malformed(e.to_string()).into());
            }
        };
        let source = format!("file:{}", path.display());
        let payload = Bytes::from(bundle.manifest_bytes.clone());
        // The same bundle again, installed and serving: nothing to do. Anything else (an
        // older bundle installed once and since replaced) is judged afresh, as a downgrade
        // or a replay.
        if let Some(id) = self.serving(&payload).await {
            return Ok(id);
        }
        if let Some((id, state)) = self.current_state() {
            return Err(InstallError::Busy { id, state });
        }
        let digest = tern_update::sha256_hex(&payload);
        let id = match self.offer_new(&source, payload, digest).await {
            Offer::Accepted(id) => id,
            Offer::Refused(e) => return Err(e.into()),
            Offer::Queued | Offer::Known => {
                let (id, state) = self.current_state().unwrap_or((0, State::Downloading));
                return Err(InstallError::Busy { id, state });
            }
        };
        if !self
            .current
            .as_ref()
            .is_some_and(|a| a.id == id && a.state == State::Downloading)
        {
            return Ok(id); // failed at once (disk space)
        }
        let a = self.current.as_ref().expect("checked");
        if bundle.artifact_len != a.signed.artifact.size {
            let e = RefusalError::BadSize {
                got: bundle.artifact_len,
                want: a.signed.artifact.size,
            };
            self.fail(e.code().as_str(), &e.to_string()).await;
            return Ok(id);
        }
        let (art, dest) = (a.signed.artifact.clone(), a.dir.join("artifact"));
        let copied = tokio::task::spawn_blocking(move || -> Result<(), (&'static str, String)> {
            let mut src = bundle.artifact().map_err(|e| ("io", e.to_string()))?;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .open(&dest)
                .map_err(|e| ("io", e.to_string()))?;
            let mut buf = vec![0u8; art.chunk_size as usize];
            for i in 0..art.chunks.len() {
                let len = art.chunk_len(i).expect("in range");
                src.read_exact(&mut buf[..len])
                    .map_err(|e| ("bad_size", format!("chunk {i}: {e}")))?;
                art.check_chunk(i, &buf[..len])
                    .map_err(|e| (e.code().as_str(), e.to_string()))?;
                out.write_all(&buf[..len])
                    .map_err(|e| ("io", e.to_string()))?;
            }
            out.sync_all().map_err(|e| ("io", e.to_string()))
        })
        .await
        .unwrap_or_else(|e| Err(("internal", e.to_string())));
        if let Err((code, reason)) = copied {
            self.fail(code, &reason).await;
            return Ok(id);
        }
        let n = self.current.as_ref().map(|a| a.held.len()).unwrap_or(0) as i64;
        let size = self
            .current
            .as_ref()
            .map(|a| a.signed.artifact.size)
            .unwrap_or(0) as i64;
        let r = self
            .d
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
            .await;
        if let Err(e) = r {
            self.fail("io", &e.to_string()).await;
            return Ok(id);
        }
        if let Some(a) = &mut self.current {
            a.held.iter_mut().for_each(|h| *h = true);
            a.nheld = a.held.len();
        }
        self.advance().await;
        Ok(id)
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
        let active = self.d.registry.lock().await.active_version(&model)?;
        (active.to_string() == version).then_some(id)
    }

    /// The update in progress, if any, with its state.
    pub fn current_state(&self) -> Option<(i64, State)> {
        self.current.as_ref().map(|a| (a.id, a.state))
    }

    async fn event(&self, body: Value) {
        if let Some(ob) = &self.d.outbox
            && let Err(e) = ob.send_event(&self.d.store, body).await
        {
            tracing::error!(error = %e, "update event not queued");
        }
    }

    fn wake(&self) {
        if let Some(ob) = &self.d.outbox {
            ob.wake();
        }
    }

    /// False when `ternd install` drives the machine with the daemon stopped.
    fn in_daemon(&self) -> bool {
        self.d.control.is_some()
    }

    fn touch(&self) {
        if let Some(c) = &self.d.control {
            c.touch();
        }
    }

    /// The current update's state, retained on `<prefix>/<device>/updates/<model>` for
    /// `tern-update status`; progress at most every STATUS_EVERY unless `now`.
    fn publish_status(&mut self, now: bool) {
        let Some(a) = &self.current else { return };
        if !now && self.last_status.elapsed() < STATUS_EVERY {
            return;
        }
        self.last_status = Instant::now();
        let mut body = json!({
            "device": self.d.device, "update": a.id, "model": a.signed.name,
            "version": a.signed.version, "state": a.state.as_str(),
            "percent": (a.nheld * 100 / a.held.len().max(1)), "ts_ms": now_ms(),
            "manifest_sha256": a.manifest_sha256,
        });
        if let Some((code, reason)) = &a.outcome {
            body["code"] = code.clone().into();
            body["reason"] = reason.clone().into();
        }
        if let Some(c) = &self.d.control {
            c.local(crate::control::LocalEvent::Update {
                model: a.signed.name.clone(),
                version: a.signed.version.clone(),
                state: a.state.as_str().to_string(),
                percent: (a.nheld * 100 / a.held.len().max(1)) as u32,
            });
        }
        self.statuses.insert(a.signed.name.clone(), body);
        self.say_status(Some(&a.signed.name.clone()));
    }

    /// Publish the status of `model` (or of every model) if the link is up.
    fn say_status(&self, model: Option<&str>) {
        let (Some(link), Some(prefix)) = (&self.link, &self.d.prefix) else {
            return;
        };
        for (name, body) in &self.statuses {
            if model.is_some_and(|m| m != name) {
                continue;
            }
            let topic = format!("{prefix}/{}/updates/{name}", self.d.device);
            let _ = link.publish(&topic, body.to_string().into_bytes(), true, None);
        }
    }
}

/// Why a bundle file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("update {id} is still open ({}); it must end first", state.as_str())]
    Busy { id: i64, state: State },
    #[error(transparent)]
    Refused(#[from] RefusalError),
}

impl InstallError {
    pub fn code(&self) -> &'static str {
        match self {
            InstallError::Busy { .. } => "busy",
            InstallError::Refused(r) => r.code().as_str(),
        }
    }
}

/// The model name and version a manifest claims (unverified).
fn peek(payload: &[u8]) -> (Option<String>, Option<semver::Version>) {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return (None, None);
    };
    (
        v.pointer("/signed/name")
            .and_then(Value::as_str)
            .map(str::to_string),
        v.pointer("/signed/version")
            .and_then(Value::as_str)
            .and_then(|v| semver::Version::parse(v).ok()),
    )
}

/// Tell `ternd install` how its bundle ended: `<spool>/<name>.result`, written whole.
fn answer_spool(bundle: &Path, body: &Value) {
    let result = bundle.with_extension("result");
    let tmp = bundle.with_extension("result.tmp");
    let r = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(body.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &result)?;
        std::fs::remove_file(bundle)
    })();
    if let Err(e) = r {
        tracing::error!(path = %result.display(), error = %e, "install answer not written");
    }
}

/// `ternd install BUNDLE`: with no daemon on the state directory, drive the update here (it
/// ends active, in its health window, which starts when the daemon does); with one running,
/// hand the bundle to it through the spool directory and wait up to `wait` for its answer.
/// Either way the bundle meets exactly the checks an update from the fleet meets.
pub async fn install(
    config: &crate::config::Config,
    bundle: &Path,
    wait: Duration,
) -> Result<Value, String> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| format!("{}: {e}", config.state_dir.display()))?;
    if !config.updates.enabled() {
        return Err("updates.keys is empty in the configuration: no bundle can be trusted".into());
    }
    match crate::service::lock_state_dir(&config.state_dir) {
        Ok(_lock) => install_here(config, bundle).await,
        Err(crate::service::ServiceError::Locked { .. }) => {
            eprintln!(
                "ternd install: handing the bundle to the running ternd; waiting for the update to end"
            );
            hand_over(&config.state_dir, bundle, wait).await
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn install_here(config: &crate::config::Config, bundle: &Path) -> Result<Value, String> {
    crate::registry::clean_temp(&config.state_dir);
    let db = config.state_dir.join("tern.db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let pools = config.pools();
    // The box as the daemon would bring it up: active versions, then the configured packages.
    let mut reg = Registry::new(store.clone(), &config.state_dir);
    for e in reg.start(&pools).await {
        tracing::warn!(error = %e, "at start");
    }
    for e in reg.apply(&config.models).await {
        tracing::warn!(error = %e, "configured model");
    }
    // Events are kept for the fleet link to send when the daemon next runs.
    let outbox = Outbox::for_config(config);
    let mut m = Machine::new(Deps::new(
        config,
        store,
        Arc::new(Mutex::new(reg)),
        outbox,
        None,
    ));
    m.resume().await;
    let id = match m.install_file(bundle).await {
        Ok(id) => id,
        // Only a running daemon can finish the open update (its health window, say).
        Err(InstallError::Busy { id, state }) => {
            return Err(format!(
                "update {id} is still open ({}): start ternd to let it finish first",
                state.as_str()
            ));
        }
        Err(e) => return Err(format!("refused ({}): {e}", e.code())),
    };
    m.row(id)
        .await
        .ok_or_else(|| format!("update {id} not found"))
}

/// Hand a bundle to the running daemon through its spool directory and wait up to `wait` for
/// the outcome (`ternd install` with a daemon running, and D-Bus `InstallBundle`).
pub async fn hand_over(state_dir: &Path, bundle: &Path, wait: Duration) -> Result<Value, String> {
    let spool = Machine::spool_dir(state_dir);
    std::fs::create_dir_all(&spool).map_err(|e| format!("{}: {e}", spool.display()))?;
    let stem = format!("{}-{}", now_ms(), std::process::id());
    let tmp = spool.join(format!("{stem}.tmp"));
    let dest = spool.join(format!("{stem}.bundle"));
    let copy = || -> std::io::Result<()> {
        std::fs::copy(bundle, &tmp)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        File::open(&spool)?.sync_all()
    };
    copy().map_err(|e| format!("handing {} to the running ternd: {e}", bundle.display()))?;
    let result = spool.join(format!("{stem}.result"));
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(text) = std::fs::read_to_string(&result) {
            let _ = std::fs::remove_file(&result);
            return serde_json::from_str(&text).map_err(|e| format!("{}: {e}", result.display()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no answer from the running ternd within {wait:?}; it carries on (see its events and {})",
                spool.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
