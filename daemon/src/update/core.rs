//! The update decision core: every rule of an over-the-air update, with no I/O.
//!
//! [`Core::step`] takes what happened ([`Input`], with the facts it needs already read) and
//! the time, changes the core's state and returns what must be done ([`Action`]s), in order.
//! At most one of them is an [`Effect`] whose outcome matters: it comes last, and the driver
//! hands its [`Outcome`] back as the next input before anything else. So the core never
//! waits, never reads a clock or a file, and every rule is tested here on plain values:
//! anti-rollback, expiry, targets and signatures (through `tern_update::bundle`), one update
//! at a time and who waits, superseding, withdrawal, retry classes, stalls, health verdicts,
//! and where a restart picks up.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tern_update::Code;
use tern_update::bundle::{self, KeySet, RefusalError, Signed};
use tern_update::topics;

/// A download that has received nothing for this long asks for its chunks again.
pub const STALL: Duration = Duration::from_secs(20);
/// A chunk refused as bad is asked for again after this long (the operator may republish).
pub const RETRY_BAD_CHUNK: Duration = Duration::from_secs(10);
/// An inference stuck this long during the health window rolls the new version back.
pub const HUNG: Duration = Duration::from_secs(30);
/// A daemon that restarts this often inside one health window rolls the new version back.
pub const MAX_HEALTH_RESTARTS: u64 = 3;
/// A download that stalls this many times in a row (no chunk for STALL each time) fails as
/// `stalled`; the manifest is taken again when it is delivered again.
pub const MAX_STALLS: u32 = 30;
/// A step whose state could not be recorded is tried again after this long.
pub const STEP_RETRY: Duration = Duration::from_secs(5);
/// Manifests kept waiting while another update runs.
pub const MAX_WAITING: usize = 16;
/// Manifest digests remembered as handled; older ones are checked again if they come back.
pub const MAX_SEEN: usize = 1024;
/// A box clock at or after 2025-01-01 is taken to be set (one without a real-time clock
/// starts in 1970).
pub const SANE_CLOCK: i64 = 1_735_689_600;
/// How far ahead of a set clock an operator's signed time may be.
pub const MAX_AHEAD: i64 = 86_400;
/// `update.refused` events (and refusal statuses) said in a burst, and one more each minute
/// after; more are counted and the count goes with the next one said. Refusals are anyone's
/// to cause who may publish on an update topic, and events outrank results in the outbox.
pub const REFUSAL_BURST: u32 = 20;
/// Retained status messages at most this often while downloading.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Downloading,
    Verifying,
    Staged,
    SelfTesting,
    /// Installed, running beside the active version on a sample of its inputs until the
    /// shadow's verdict.
    Shadow,
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
            State::Shadow => "shadow",
            State::Activating => "activating",
            State::Health => "health",
            State::Committed => "committed",
            State::Failed => "failed",
            State::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "downloading" => State::Downloading,
            "verifying" => State::Verifying,
            "staged" => State::Staged,
            "self_testing" => State::SelfTesting,
            "shadow" => State::Shadow,
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

/// Failures after which the same manifest may be tried again when it is delivered again:
/// the box's own trouble, or a bundle damaged on its way, says nothing against the manifest.
pub fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::NoSpace
            | Code::Io
            | Code::Interrupted
            | Code::Stalled
            | Code::Withdrawn
            | Code::BadChunk
            | Code::BadSize
            | Code::TruncatedChunk
            | Code::ForeignChunk
    )
}

/// Fixed facts about the box.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device: String,
    pub groups: Vec<String>,
    pub arch: String,
    pub ternd: semver::Version,
    /// The box's topics, with a fleet link: a refusal on an update topic is said on that
    /// model's status topic.
    pub topics: Option<topics::Device>,
    /// Chunks asked for at once.
    pub window: usize,
    pub health_window: Duration,
    pub health_max_errors: u64,
    pub min_free_bytes: u64,
    /// Refuse manifests from the network older than this, or judged without an operator's
    /// signed time younger than this (`updates.freshness`; none: no such rule).
    pub freshness: Option<Duration>,
    /// Inside the running daemon: the health window is watched. `ternd install` with the
    /// daemon stopped leaves a new version in `health` for the daemon to watch when it starts.
    pub in_daemon: bool,
}

/// The keys trusted now, and the rotation document that put them there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    pub keys: KeySet,
    /// 0: the configured keys.
    pub version: u64,
    pub doc: Option<Vec<u8>>,
}

/// The time, as the driver read it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub wall_ms: i64,
}

/// An earlier update row with the same manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub state: State,
    pub code: Option<Code>,
}

/// What the driver read for a manifest before offering it.
#[derive(Debug, Clone, Default)]
pub struct ManifestFacts {
    /// The newest update row made from this very manifest.
    pub known: Option<Known>,
    /// The highest version ever installed of the model the manifest names.
    pub highest: Option<semver::Version>,
    /// Free bytes on the state directory's file system.
    pub free_bytes: u64,
    /// For a bundle file: the update this manifest made, if its version serves now.
    pub serving: Option<i64>,
}

/// An open update as the database holds it, for [`Input::Resume`].
#[derive(Debug, Clone)]
pub struct OpenRow {
    pub id: i64,
    pub state: Option<State>,
    pub source: String,
    pub manifest: Vec<u8>,
    /// Set once a daemon started this update's health window.
    pub health_until_ms: Option<i64>,
    /// Chunk indices recorded as held (downloads only).
    pub held: Vec<usize>,
    /// Whether the staging file is there (downloads only).
    pub staging: bool,
}

/// What the health window looks at, read at each tick while one runs.
#[derive(Debug, Clone, Default)]
pub struct HealthFacts {
    pub active_version: Option<semver::Version>,
    /// The new version's own outcomes so far: answers, its own faults, and the inputs that
    /// were its callers' fault (reported, never held against it).
    pub ok: u64,
    pub failed: u64,
    pub refused: u64,
    /// An inference has run longer than [`HUNG`].
    pub hung: bool,
}

/// A shadow's recorded verdict on its candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowVerdict {
    pub promote: bool,
    /// Its figures, or the operator's word.
    pub reason: String,
}

/// What the fleet link delivers to the updater besides manifests (which are judged with facts
/// the driver reads first).
#[derive(Debug)]
pub enum Link {
    /// A key rotation document.
    Keys {
        payload: Bytes,
    },
    /// The operator's signed time.
    Time {
        payload: Bytes,
    },
    /// Chunk `index` of artifact `sha256`.
    Chunk {
        sha256: String,
        index: usize,
        payload: Bytes,
    },
    /// The link (re)connected: chunk subscriptions start over on it.
    Online,
    Offline,
}

/// What happened.
#[derive(Debug)]
pub enum Input {
    /// The daemon (or `ternd install`) starts: the open updates, the trust, the next id.
    Resume {
        open: Vec<OpenRow>,
        trust: Trust,
        next_id: i64,
        /// The newest operator time kept (unix seconds).
        time: Option<i64>,
    },
    /// A manifest (or an empty payload: withdrawn) on `source`, a topic.
    Manifest {
        source: String,
        payload: Bytes,
        facts: ManifestFacts,
    },
    /// A bundle file handed over locally; answered with `ticket`.
    Bundle {
        ticket: u64,
        path: std::path::PathBuf,
        source: String,
        manifest: Bytes,
        artifact_len: u64,
        facts: ManifestFacts,
    },
    /// A bundle file whose manifest could not be read.
    BundleRefused {
        ticket: u64,
        source: String,
        refusal: RefusalError,
    },
    /// What the fleet link delivered, besides manifests.
    Link(Link),
    /// Every half second; `health` while a health window runs, `shadow` once the shadow of
    /// the update in [`State::Shadow`] has a recorded verdict.
    Tick {
        health: Option<HealthFacts>,
        shadow: Option<ShadowVerdict>,
    },
    /// The outcome of the last [`Effect`].
    Done(Outcome),
    /// The daemon stops cleanly.
    Stopping,
}

/// Work whose outcome the core waits for.
#[derive(Debug)]
pub enum Effect {
    /// Record a new update in `downloading`, with its event, in one transaction.
    Insert {
        id: i64,
        signed: Box<Signed>,
        manifest: Bytes,
        source: String,
        event: Value,
    },
    /// Create the staging file for update `id`, `size` bytes.
    CreateStaging { id: i64, size: u64 },
    /// Forget the recorded chunks of `id` and create its staging file anew.
    RestartStaging { id: i64, size: u64 },
    /// Record the next state with its event.
    SetState { id: i64, state: State, event: Value },
    /// Write chunk `index` at `offset` of the staging file, fsync, then record it.
    StoreChunk {
        id: i64,
        index: usize,
        offset: u64,
        data: Bytes,
        /// How many chunks are held once this one is (for crash points).
        nth: usize,
    },
    /// Copy the artifact of a bundle file into the staging, checking each chunk, then record
    /// every chunk as held.
    CopyBundle {
        id: i64,
        path: std::path::PathBuf,
        artifact: Box<bundle::Artifact>,
    },
    /// Hash the whole staging file, unpack the package beside it and check its manifest.
    VerifyStage {
        id: i64,
        artifact: Box<bundle::Artifact>,
        name: String,
        version: semver::Version,
    },
    /// Install the staged package into the registry (load, self-test, copy).
    Install { id: i64, name: String },
    /// Run the installed version as a shadow of the active one (or go on with the shadow
    /// a restart left running).
    StartShadow {
        id: i64,
        name: String,
        version: semver::Version,
        spec: Box<bundle::ShadowSpec>,
    },
    /// Make the installed version the active one.
    Activate {
        name: String,
        version: semver::Version,
    },
    /// Start (or, after a restart, continue) the health window of `id`, an update of `name`.
    StartWatch {
        id: i64,
        name: String,
        resumed: bool,
    },
    /// Take the new version out of service; the previous one serves again.
    Reject {
        name: String,
        version: semver::Version,
        reason: String,
    },
    /// Record a key rotation with its event.
    Rotate { trust: Trust, event: Value },
}

/// How an [`Effect`] went.
#[derive(Debug)]
pub enum Outcome {
    Recorded(Result<(), String>),
    Chunk(Result<(), ChunkFailure>),
    /// Verification, unpacking, copying or installing: a code and a reason on failure.
    Step(Result<(), (Code, String)>),
    /// The version that was active before the install.
    Installed(Result<Option<String>, (Code, String)>),
    Watching {
        left: Duration,
        restarts: u64,
    },
    Rejected(Result<String, String>),
}

#[derive(Debug)]
pub enum ChunkFailure {
    Write(String),
    Record(String),
}

/// What the driver must do.
#[derive(Debug)]
pub enum Action {
    Do(Effect),
    /// End update `id` in the database: state, code, reason, its chunk rows gone, its event.
    FinishRow {
        id: i64,
        state: State,
        code: Option<Code>,
        reason: Option<String>,
    },
    /// Which version was active before the update (for the record).
    RecordPrevious {
        id: i64,
        previous: Option<String>,
    },
    /// Remember that the health window of `id` was left by a clean stop.
    CleanStop {
        id: i64,
    },
    RemoveStaging {
        id: i64,
    },
    /// Remove staging directories no open update owns.
    CleanStaging {
        keep: Vec<i64>,
    },
    /// An event on its own.
    Event(Value),
    /// Subscribe to these chunks of `sha256`.
    Want {
        sha256: String,
        chunks: Vec<usize>,
    },
    Unwant {
        sha256: String,
        chunks: Vec<usize>,
    },
    /// The retained status of `model`.
    Status {
        model: String,
        body: Value,
    },
    /// An update's progress for local listeners.
    Progress {
        model: String,
        version: String,
        state: State,
        percent: u32,
    },
    ModelActivated {
        model: String,
        version: String,
    },
    /// Ask the broker for the retained manifests again (the keys or the time changed).
    Redeliver,
    /// Keep the newest operator time (unix seconds) beside the database.
    SaveTime(i64),
    /// Offer a waiting manifest again, with fresh facts.
    Reoffer {
        source: String,
        payload: Bytes,
    },
    /// Answer a bundle handed over locally.
    Answer {
        ticket: u64,
        result: Result<i64, InstallError>,
    },
    /// Wake the outbox (something was queued in a transaction).
    Wake,
    Crash(String),
}

/// Why a bundle file was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InstallError {
    #[error("update {id} is still open ({}); it must end first", state.as_str())]
    Busy { id: i64, state: State },
    #[error(transparent)]
    Refused(#[from] RefusalError),
}

impl InstallError {
    pub fn code(&self) -> Code {
        match self {
            InstallError::Busy { .. } => Code::Busy,
            InstallError::Refused(r) => r.code(),
        }
    }
}

/// The update being worked on.
#[derive(Debug)]
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
    outcome: Option<(Code, String)>,
    held: Vec<bool>,
    nheld: usize,
    /// Chunks subscribed to and not yet received.
    asked: BTreeSet<usize>,
    /// Chunks refused as bad, with when to ask again.
    retry_at: HashMap<usize, Instant>,
    last_chunk: Instant,
    last_percent: u64,
    health: Option<Watch>,
    /// In [`State::Shadow`]: whether this run started (or found) the shadow.
    shadowing: bool,
    /// A bundle file's: the ticket to answer once its bytes are staged.
    ticket: Option<u64>,
    /// A bundle file's: where it is.
    bundle_path: Option<std::path::PathBuf>,
}

#[derive(Debug)]
struct Watch {
    deadline: Instant,
    /// Restarts of the daemon inside this update's health window so far.
    restarts: u64,
}

/// What the core waits for: the outcome of the effect it asked for, and what it was for.
#[derive(Debug)]
enum Pending {
    /// What the new update is judged by once recorded: the free space read with its facts,
    /// and a bundle's artifact length.
    Insert {
        free_bytes: u64,
        artifact_len: Option<u64>,
    },
    Staging,
    RestartStaging,
    SetState(State),
    Chunk {
        index: usize,
    },
    Copy,
    Verify,
    Install,
    Activate,
    /// `record`: the window starts now (from `activating`), its state is to be recorded.
    Watch {
        record: bool,
    },
    Reject {
        reason: String,
        /// The version never served: a shadow's verdict was against it.
        shadow: bool,
    },
    Shadow,
    Rotate {
        trust: Trust,
    },
}

/// A manifest accepted by verification, about to be recorded.
struct Accepted {
    id: i64,
    source: String,
    payload: Bytes,
    signed: Signed,
    free_bytes: u64,
    ticket: Option<(u64, u64)>,
}

/// A set of digests that forgets its oldest past [`MAX_SEEN`].
#[derive(Default)]
struct Seen {
    set: HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Seen {
    fn contains(&self, d: &str) -> bool {
        self.set.contains(d)
    }

    /// False if it was there already.
    fn insert(&mut self, d: String) -> bool {
        if self.set.contains(&d) {
            return false;
        }
        if self.order.len() == MAX_SEEN
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(d.clone());
        self.set.insert(d)
    }

    fn remove(&mut self, d: &str) {
        if self.set.remove(d) {
            self.order.retain(|x| x != d);
        }
    }

    fn clear(&mut self) {
        self.set.clear();
        self.order.clear();
    }
}

pub struct Core {
    s: Settings,
    trust: Trust,
    next_id: i64,
    current: Option<Active>,
    /// Manifests that arrived while another update ran, latest per source.
    waiting: Vec<(String, Bytes)>,
    /// Digests of manifest payloads already handled in this run (retained messages come again
    /// on every reconnect).
    seen: Seen,
    /// Refusals that may be said now, when that last grew, and how many were not said since
    /// the last one that was.
    refusals: (u32, Instant, u64),
    online: bool,
    last_status: Option<Instant>,
    /// The last status said, without its time.
    last_said: Option<Value>,
    pending: Option<Pending>,
    now: Now,
    /// The newest operator time (unix seconds) and when it arrived: the box's clock is never
    /// taken to be earlier than it plus the time since.
    time: Option<(i64, Instant)>,
    /// A manifest was refused as stale since the last time arrived: a newer time asks for
    /// the retained manifests again.
    stale_refused: bool,
    out: Vec<Action>,
}

impl Core {
    pub fn new(s: Settings, trust: Trust, now: Now) -> Core {
        Core {
            s,
            trust,
            next_id: 1,
            current: None,
            waiting: Vec::new(),
            seen: Seen::default(),
            refusals: (REFUSAL_BURST, now.at, 0),
            online: false,
            last_status: None,
            last_said: None,
            pending: None,
            now,
            time: None,
            stale_refused: false,
            out: Vec::new(),
        }
    }

    /// The update in progress, with its state.
    pub fn current(&self) -> Option<(i64, State)> {
        self.current.as_ref().map(|a| (a.id, a.state))
    }

    /// The model whose health window runs, if one does: the driver reads its facts.
    /// The model and version of the update running as a shadow, if one is.
    pub fn shadowing(&self) -> Option<(&str, &semver::Version)> {
        self.current
            .as_ref()
            .filter(|a| a.state == State::Shadow && a.shadowing)
            .map(|a| (a.signed.name.as_str(), &a.version))
    }

    pub fn watching(&self) -> Option<&str> {
        self.current
            .as_ref()
            .filter(|a| a.state == State::Health && a.health.is_some())
            .map(|a| a.signed.name.as_str())
    }

    /// The model whose installed versions an offered manifest is compared with (unverified).
    pub fn claimed_name(payload: &[u8]) -> Option<String> {
        peek(payload).0.filter(|n| bundle::safe_name(n))
    }

    /// Take `input` at `now`; what must be done, in order.
    pub fn step(&mut self, input: Input, now: Now) -> Vec<Action> {
        self.now = now;
        match input {
            Input::Done(outcome) => self.done(outcome),
            other if self.pending.is_some() => {
                // The driver feeds an outcome before anything else; another input here is a
                // driver bug, and dropping it is safer than acting on a half-done step.
                tracing::error!(input = ?other, "update input while a step is pending; dropped");
            }
            Input::Resume {
                open,
                trust,
                next_id,
                time,
            } => {
                self.trust = trust;
                self.next_id = next_id;
                self.time = time.map(|t| (t, self.now.at));
                self.resume(open);
            }
            Input::Manifest {
                source,
                payload,
                facts,
            } => self.offer(source, payload, facts, None),
            Input::Bundle {
                ticket,
                path,
                source,
                manifest,
                artifact_len,
                facts,
            } => self.bundle(ticket, path, source, manifest, artifact_len, facts),
            Input::BundleRefused {
                ticket,
                source,
                refusal,
            } => {
                self.refused(&source, b"", &refusal);
                self.answer(ticket, Err(refusal.into()));
            }
            Input::Link(Link::Keys { payload }) => self.rotate(payload),
            Input::Link(Link::Time { payload }) => self.signed_time(payload),
            Input::Link(Link::Chunk {
                sha256,
                index,
                payload,
            }) => self.chunk(&sha256, index, payload),
            Input::Link(Link::Online) => {
                self.online = true;
                if let Some(a) = &mut self.current {
                    a.asked.clear();
                }
                self.request_chunks();
            }
            Input::Link(Link::Offline) => {
                self.online = false;
                if let Some(a) = &mut self.current {
                    a.asked.clear();
                }
            }
            Input::Tick { health, shadow } => self.tick(health, shadow),
            Input::Stopping => {
                if let Some(a) = &self.current
                    && a.state == State::Health
                    && a.health.is_some()
                {
                    self.out.push(Action::CleanStop { id: a.id });
                }
                return std::mem::take(&mut self.out);
            }
        }
        // Idle with manifests waiting: the first is offered again, with fresh facts (the
        // next is taken when that one is done with, whatever became of it).
        if self.current.is_none() && self.pending.is_none() && !self.waiting.is_empty() {
            let (source, payload) = self.waiting.remove(0);
            self.out.push(Action::Reoffer { source, payload });
        }
        std::mem::take(&mut self.out)
    }

    fn effect(&mut self, e: Effect, p: Pending) {
        self.pending = Some(p);
        self.out.push(Action::Do(e));
    }

    fn answer(&mut self, ticket: u64, result: Result<i64, InstallError>) {
        self.out.push(Action::Answer { ticket, result });
    }

    /// Pick up where the last run stopped: clear staging left by updates that ended (or never
    /// began), then carry the open update on.
    fn resume(&mut self, open: Vec<OpenRow>) {
        self.out.push(Action::CleanStaging {
            keep: open.iter().map(|o| o.id).collect(),
        });
        let n = open.len();
        for (i, row) in open.into_iter().enumerate() {
            // Only one update runs at a time; more open rows would be a bug, but they must not
            // block the box forever: all but the newest end here.
            if i + 1 < n {
                self.finish_row(
                    row.id,
                    State::Failed,
                    Some(Code::Superseded),
                    "a newer update replaced it",
                );
                continue;
            }
            let signed = bundle::parse(&row.manifest)
                .ok()
                .and_then(|m| serde_json::from_value::<Signed>(m.signed).ok());
            let Some(signed) = signed else {
                self.finish_row(
                    row.id,
                    State::Failed,
                    Some(Code::Internal),
                    "recorded manifest unreadable",
                );
                continue;
            };
            let state = row.state.unwrap_or(State::Failed);
            let mut a = self.active(row.id, signed, state, &row.source, &row.manifest);
            if state == State::Downloading && row.source.starts_with("file:") {
                // A bundle file's copy was cut short; handing the file over again starts
                // it again.
                self.finish_row(
                    row.id,
                    State::Failed,
                    Some(Code::Interrupted),
                    "the copy from the bundle file was interrupted",
                );
                self.out.push(Action::RemoveStaging { id: row.id });
                continue;
            }
            if state == State::Downloading {
                for i in row.held {
                    if let Some(h) = a.held.get_mut(i)
                        && !*h
                    {
                        *h = true;
                        a.nheld += 1;
                    }
                }
                if !row.staging {
                    // The staging file is gone (or never reached the disk): start it over.
                    a.held.iter_mut().for_each(|h| *h = false);
                    a.nheld = 0;
                    tracing::info!(update = a.id, "staging missing; download starts over");
                    let size = a.signed.artifact.size;
                    let id = a.id;
                    self.current = Some(a);
                    self.effect(Effect::RestartStaging { id, size }, Pending::RestartStaging);
                    return;
                }
            }
            tracing::info!(update = a.id, model = %a.signed.name, version = %a.version, state = state.as_str(), held = a.nheld, "resuming update");
            let id = a.id;
            let name = a.signed.name.clone();
            self.current = Some(a);
            if state == State::Health && self.s.in_daemon {
                // `until` set means a daemon had started this window before: a restart.
                let resumed = row.health_until_ms.is_some();
                self.effect(
                    Effect::StartWatch { id, name, resumed },
                    Pending::Watch { record: false },
                );
                return;
            }
            self.advance();
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
            held: vec![false; n],
            nheld: 0,
            asked: BTreeSet::new(),
            retry_at: HashMap::new(),
            last_chunk: self.now.at,
            last_percent: 0,
            health: None,
            shadowing: false,
            ticket: None,
            bundle_path: None,
        }
    }

    /// The box's time in unix seconds: its own clock, or the operator's signed time plus
    /// the time since it arrived when that is later (a box without a real-time clock starts
    /// in 1970, and must not take a manifest that expired long ago as good).
    pub fn clock_s(&self) -> i64 {
        let own = self.now.wall_ms / 1000;
        match self.time {
            Some((t, at)) => own.max(t + self.now.at.duration_since(at).as_secs() as i64),
            None => own,
        }
    }

    /// Verify a manifest for this box: signatures against the trusted keys, bounds, expiry,
    /// target, and above the highest version ever installed; from the network, also the
    /// freshness rule.
    fn verify(
        &self,
        bytes: &[u8],
        highest: Option<&semver::Version>,
        network: bool,
    ) -> Result<Signed, RefusalError> {
        let m = bundle::parse(bytes)?;
        if self.trust.keys.keys.is_empty() {
            return Err(RefusalError::UnknownKey(
                "(none: updates.keys is empty in this box's config)".into(),
            ));
        }
        let this = bundle::ThisBox {
            device: &self.s.device,
            groups: &self.s.groups,
            arch: &self.s.arch,
            ternd: &self.s.ternd,
        };
        let s = bundle::verify(&m, &self.trust.keys, self.clock_s(), &this, highest)?;
        match self.s.freshness {
            Some(window) if network => self.fresh(&s, window).map(|()| s),
            _ => Ok(s),
        }
    }

    /// The freshness rule: the box holds an operator time younger than `window`, and the
    /// manifest was made less than `window` before now. A bundle file handed over on the box
    /// is not held to it (whoever may do that already has the box).
    fn fresh(&self, s: &Signed, window: Duration) -> Result<(), RefusalError> {
        let now = self.clock_s();
        let w = window.as_secs() as i64;
        let Some((t, _)) = self.time else {
            return Err(RefusalError::StaleTime(
                "no signed time from the operator yet (updates.freshness is set; publish one with `tern-update time`)".into(),
            ));
        };
        if now - t > w {
            return Err(RefusalError::StaleTime(format!(
                "the operator's newest signed time is {}s old, more than updates.freshness ({w}s)",
                now - t
            )));
        }
        match s.issued {
            None => Err(RefusalError::Stale(
                "the manifest carries no `issued` time".into(),
            )),
            Some(i) if now - i > w => Err(RefusalError::Stale(format!(
                "the manifest was made {}s ago, more than updates.freshness ({w}s)",
                now - i
            ))),
            Some(_) => Ok(()),
        }
    }

    /// The operator's signed time: kept if it verifies and is newer than the one held; a
    /// manifest refused as stale meanwhile is asked for again.
    fn signed_time(&mut self, payload: Bytes) {
        if payload.is_empty() {
            return;
        }
        let digest = tern_update::sha256_hex(&payload);
        if !self.seen.insert(digest) {
            return;
        }
        let own = self.now.wall_ms / 1000;
        let held = self.time.map(|(held, _)| held);
        let result = bundle::parse(&payload)
            .and_then(|m| bundle::verify_time(&m, &self.trust.keys))
            .and_then(|t| {
                // Kept for good and never going back, a time from a wrong clock would make
                // every manifest expired: a box whose own clock is set takes none far ahead.
                let newer = held.is_none_or(|h| t > h);
                if newer && own >= SANE_CLOCK && t > own + MAX_AHEAD {
                    Err(RefusalError::Malformed(format!(
                        "signed time {t} is {}s ahead of this box's clock",
                        t - own
                    )))
                } else {
                    Ok(t)
                }
            });
        match result {
            Err(e) => self.refuse_trust("signed time", "time", &e),
            Ok(t) if held.is_some_and(|h| t <= h) => {
                tracing::debug!(time = t, "signed time not newer than the one held");
            }
            Ok(t) => {
                if t > own + 60 {
                    tracing::info!(
                        time = t,
                        clock = own,
                        "this box's clock is behind the operator's signed time; update checks use the signed time"
                    );
                }
                self.time = Some((t, self.now.at));
                self.out.push(Action::SaveTime(t));
                if std::mem::take(&mut self.stale_refused) {
                    self.out.push(Action::Redeliver);
                }
            }
        }
    }

    /// A manifest arrived (from a topic or a bundle file): verify it and, if it is good and
    /// new, record it as an update in `downloading`.
    fn offer(
        &mut self,
        source: String,
        payload: Bytes,
        facts: ManifestFacts,
        ticket: Option<(u64, u64)>,
    ) {
        if payload.is_empty() {
            self.withdraw(&source);
            return;
        }
        let digest = tern_update::sha256_hex(&payload);
        if self.seen.contains(&digest) {
            return;
        }
        let known = facts.known.as_ref().is_some_and(|k| {
            let retry = k.state == State::Failed && k.code.is_some_and(retryable);
            !retry
        });
        if known {
            self.seen.insert(digest);
            return;
        }
        self.offer_new(source, payload, digest, facts, ticket);
    }

    /// The operator cleared a retained manifest: whatever it started and has not finished
    /// downloading stops, and a copy waiting its turn is forgotten.
    fn withdraw(&mut self, source: &str) {
        self.waiting.retain(|(s, _)| s != source);
        if let Some(a) = &self.current
            && a.state == State::Downloading
            && a.source == source
        {
            tracing::info!(update = a.id, %source, "manifest withdrawn; download stopped");
            self.fail(Code::Withdrawn, &format!("{source} was cleared"));
        }
    }

    /// Verify and take a manifest not handled before.
    fn offer_new(
        &mut self,
        source: String,
        payload: Bytes,
        digest: String,
        facts: ManifestFacts,
        ticket: Option<(u64, u64)>,
    ) {
        if payload.len() > bundle::MAX_MANIFEST_BYTES {
            // Refused at once, never kept waiting: the bound holds before anything is stored.
            let e = bundle::parse(&payload).expect_err("over the bound");
            self.seen.insert(digest);
            self.refused(&source, &payload, &e);
            if let Some((t, _)) = ticket {
                self.answer(t, Err(e.into()));
            }
            return;
        }
        // What it claims to be, unverified: only used to decide whether it waits.
        let (claimed_name, claimed_version) = peek(&payload);
        // A download, or a version running as a shadow, may be replaced by a newer version of
        // the same model (the operator fixed a bad publish); an older or equal one, or any
        // other step, waits its turn.
        let replaces = self.current.as_ref().is_some_and(|a| {
            matches!(a.state, State::Downloading | State::Shadow)
                && claimed_name.as_deref() == Some(a.signed.name.as_str())
                && claimed_version.as_ref().is_some_and(|v| *v > a.version)
        });
        if let Some(a) = &self.current
            && !replaces
        {
            if let Some((t, _)) = ticket {
                // A bundle file is not kept waiting: its caller is told to come back.
                let busy = InstallError::Busy {
                    id: a.id,
                    state: a.state,
                };
                self.answer(t, Err(busy));
                return;
            }
            // Only a manifest that verifies may wait: junk must not push a good one out.
            if let Err(e) = self.verify(&payload, facts.highest.as_ref(), true) {
                self.seen.insert(digest.clone());
                self.refused(&source, &payload, &e);
                self.forget_if_stale(&digest, &e);
                return;
            }
            tracing::info!(%source, running = a.id, "an update is in progress; this manifest waits");
            self.queue(source, payload, claimed_name, claimed_version);
            return;
        }
        self.seen.insert(digest.clone());
        let signed = match self.verify(&payload, facts.highest.as_ref(), ticket.is_none()) {
            Ok(s) => s,
            Err(e) => {
                self.refused(&source, &payload, &e);
                self.forget_if_stale(&digest, &e);
                if let Some((t, _)) = ticket {
                    self.answer(t, Err(e.into()));
                }
                return;
            }
        };
        let mut free_bytes = facts.free_bytes;
        if let Some(a) = self.current.take() {
            // Its staging goes before the new one is staged: its chunks count as free.
            let staged = a.nheld as u64 * a.signed.artifact.chunk_size;
            free_bytes = free_bytes.saturating_add(staged);
            let why = format!(
                "replaced by {} {} from {source}",
                signed.name, signed.version
            );
            tracing::info!(update = a.id, "{why}");
            // Not `finish`: that would take a waiting manifest before this one.
            self.out.push(Action::RemoveStaging { id: a.id });
            self.finish_row(a.id, State::Failed, Some(Code::Superseded), &why);
            self.close(a);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.accept(Accepted {
            id,
            source,
            payload,
            signed,
            free_bytes,
            ticket,
        });
    }

    /// A stale manifest is judged again when a newer operator time arrives (its digest is not
    /// kept as handled, and the time asks for the retained manifests again).
    fn forget_if_stale(&mut self, digest: &str, e: &RefusalError) {
        // Only a time can make it fresh: a manifest too old, or undated, stays refused.
        if matches!(e, RefusalError::StaleTime(_)) {
            self.seen.remove(digest);
            self.stale_refused = true;
        }
    }

    /// One waiting manifest per model: the highest version claimed.
    fn queue(
        &mut self,
        source: String,
        payload: Bytes,
        claimed_name: Option<String>,
        claimed_version: Option<semver::Version>,
    ) {
        let same_model =
            |p: &Bytes| claimed_name.is_some() && peek(p).0.as_deref() == claimed_name.as_deref();
        if self.waiting.iter().any(|(s, p)| {
            *s != source
                && same_model(p)
                && peek(p).1 >= claimed_version
                && claimed_version.is_some()
        }) {
            tracing::info!(%source, "a higher version of this model is already waiting; this one is dropped");
            return;
        }
        self.waiting.retain(|(s, p)| *s != source && !same_model(p));
        if self.waiting.len() >= MAX_WAITING {
            let (dropped, _) = self.waiting.remove(0);
            tracing::warn!(source = %dropped, "too many manifests waiting; the oldest is dropped (it comes again on reconnect)");
        }
        self.waiting.push((source, payload));
    }

    /// Whether a refusal may be said now (a token of the burst), and how many were not said
    /// since the last one that was; `None`: counted, not said.
    fn may_say_refusal(&mut self) -> Option<u64> {
        let (tokens, grown, unsaid) = &mut self.refusals;
        let minutes = self.now.at.duration_since(*grown).as_secs() / 60;
        if minutes > 0 {
            *tokens = (*tokens as u64 + minutes).min(REFUSAL_BURST as u64) as u32;
            *grown += Duration::from_secs(minutes * 60);
        }
        if *tokens == 0 {
            *unsaid += 1;
            return None;
        }
        *tokens -= 1;
        Some(std::mem::take(unsaid))
    }

    fn refused(&mut self, source: &str, payload: &[u8], e: &RefusalError) {
        // What the manifest claims, unverified: short strings only, so that a refusal never
        // carries a stranger's kilobytes into the outbox.
        let signed: Value = serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v.get("signed").cloned())
            .unwrap_or(Value::Null);
        let short = |v: &Value| match v.as_str() {
            Some(s) if s.len() <= 128 => Value::String(s.to_string()),
            _ => Value::Null,
        };
        let claimed = json!({"name": short(&signed["name"]), "version": short(&signed["version"])});
        let reason = clip(&e.to_string(), 512);
        let source = clip(source, 256);
        let source = source.as_str();
        let Some(suppressed) = self.may_say_refusal() else {
            tracing::debug!(%source, code = %e.code(), error = %reason, "update refused (not said: too many)");
            return;
        };
        tracing::warn!(%source, code = %e.code(), error = %reason, "update refused");
        // Said on the status topic too, under the model the update topic names, so a rollout
        // tool sees a refusal at once instead of waiting for an outcome that never comes;
        // downgrades and replays too (a manifest this box once took is known, and ignored,
        // so a stale retained one does not come here to hide a newer outcome).
        let topic_model = self
            .s
            .topics
            .as_ref()
            .and_then(|t| t.manifest_model(source));
        if let Some(model) = topic_model {
            let body = json!({
                "device": self.s.device, "model": model, "version": claimed["version"],
                "state": "refused", "code": e.code(), "reason": reason,
                "manifest_sha256": tern_update::sha256_hex(payload), "ts_ms": self.now.wall_ms,
            });
            self.out.push(Action::Status {
                model: model.to_string(),
                body,
            });
            // The running update's next status is said even if unchanged: this one hid it.
            self.last_said = None;
        }
        let mut ev = json!({
            "event": "update.refused",
            "code": e.code(),
            "reason": reason,
            "source": source,
            "model": claimed["name"],
            "version": claimed["version"],
        });
        if suppressed > 0 {
            ev["suppressed"] = json!(suppressed);
        }
        self.out.push(Action::Event(ev));
    }

    fn accept(&mut self, acc: Accepted) {
        let s = &acc.signed;
        let event = json!({
            "event": "update.downloading", "update": acc.id, "model": s.name,
            "version": s.version, "size": s.artifact.size,
            "chunks": s.artifact.chunks.len(), "source": acc.source,
        });
        let mut a = self.active(
            acc.id,
            acc.signed.clone(),
            State::Downloading,
            &acc.source,
            &acc.payload,
        );
        a.ticket = acc.ticket.map(|(t, _)| t);
        self.current = Some(a);
        self.effect(
            Effect::Insert {
                id: acc.id,
                signed: Box::new(acc.signed),
                manifest: acc.payload,
                source: acc.source,
                event,
            },
            Pending::Insert {
                free_bytes: acc.free_bytes,
                artifact_len: acc.ticket.map(|(_, len)| len),
            },
        );
    }

    /// The new update's row is recorded (or not).
    fn inserted(&mut self, r: Result<(), String>, free: u64, artifact_len: Option<u64>) {
        let Some(a) = &self.current else { return };
        if let Err(e) = r {
            tracing::error!(error = %e, "update not recorded");
            let digest = a.manifest_sha256.clone();
            self.seen.remove(&digest);
            let refusal = RefusalError::Malformed(format!("not recorded: {e}"));
            let a = self.current.take().expect("checked");
            if let Some(t) = a.ticket {
                self.answer(t, Err(refusal.into()));
            }
            return;
        }
        self.out.push(Action::Wake);
        tracing::info!(update = a.id, model = %a.signed.name, version = %a.signed.version, size = a.signed.artifact.size, source = %a.source, "update accepted");
        self.out.push(Action::Crash("update:accepted".into()));
        // Room for the staging file, the unpacked package and the installed copy.
        let need = a.signed.artifact.size.saturating_mul(3) + self.s.min_free_bytes;
        if free < need {
            let why =
                format!("{free} bytes free on the state directory's file system, {need} needed");
            self.fail(Code::NoSpace, &why);
            return;
        }
        if let Some(len) = artifact_len.filter(|len| *len != a.signed.artifact.size) {
            let e = RefusalError::BadSize {
                got: len,
                want: a.signed.artifact.size,
            };
            self.fail(e.code(), &e.to_string());
            return;
        }
        let (id, size) = (a.id, a.signed.artifact.size);
        self.effect(Effect::CreateStaging { id, size }, Pending::Staging);
    }

    fn staged(&mut self, r: Result<(), String>) {
        if let Err(e) = r {
            self.fail(Code::Io, &format!("staging: {e}"));
            return;
        }
        self.request_chunks();
        self.publish_status(true);
        let Some(a) = &self.current else { return };
        if let (Some(_), Some(path)) = (a.ticket, a.bundle_path.clone()) {
            let id = a.id;
            let artifact = Box::new(a.signed.artifact.clone());
            self.effect(Effect::CopyBundle { id, path, artifact }, Pending::Copy);
        }
    }

    fn copied(&mut self, r: Result<(), (Code, String)>) {
        let Some(a) = &mut self.current else { return };
        let ticket = a.ticket.take();
        let id = a.id;
        match r {
            Ok(()) => {
                a.held.iter_mut().for_each(|h| *h = true);
                a.nheld = a.held.len();
                a.asked.clear();
                a.retry_at.clear();
                if let Some(t) = ticket {
                    self.answer(t, Ok(id));
                }
                self.advance();
            }
            Err((code, reason)) => {
                self.fail(code, &reason);
                if let Some(t) = ticket {
                    self.answer(t, Ok(id));
                }
            }
        }
    }

    /// Subscribe to missing chunks up to the window.
    fn request_chunks(&mut self) {
        if !self.online || self.s.topics.is_none() {
            return;
        }
        let window = self.s.window;
        let now = self.now.at;
        let Some(a) = &mut self.current else { return };
        if a.state != State::Downloading || a.ticket.is_some() {
            return;
        }
        let mut new = Vec::new();
        for i in 0..a.held.len() {
            if a.asked.len() >= window {
                break;
            }
            if a.held[i] || a.asked.contains(&i) || a.retry_at.get(&i).is_some_and(|t| *t > now) {
                continue;
            }
            a.asked.insert(i);
            new.push(i);
        }
        if a.asked.is_empty() {
            return;
        }
        if new.iter().any(|i| !a.reported.contains(i)) {
            // Chunks asked for the first time get time to come; nothing else holds a stall
            // off (not a chunk that came back bad, asked for again).
            a.last_chunk = a.last_chunk.max(now - STALL / 2);
        }
        if !new.is_empty() {
            self.out.push(Action::Want {
                sha256: a.signed.artifact.sha256.clone(),
                chunks: new,
            });
        }
    }

    fn chunk(&mut self, sha: &str, index: usize, payload: Bytes) {
        let now = self.now.at;
        let Some(a) = &mut self.current else { return };
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
        self.out.push(Action::Unwant {
            sha256: sha.to_string(),
            chunks: vec![index],
        });
        if a.held[index] {
            return;
        }
        let data = match a.signed.artifact.open_chunk(index, &payload) {
            // Only a good chunk is progress: a junk one left retained must not keep a
            // stalled download from failing.
            Ok(d) => {
                a.last_chunk = now;
                payload.slice_ref(d)
            }
            Err(e) => {
                a.retry_at.insert(index, now + RETRY_BAD_CHUNK);
                // Said once per chunk: a bad chunk left retained is asked for again and again.
                let first = a.reported.insert(index);
                tracing::warn!(update = a.id, chunk = index, code = %e.code(), error = %e, "chunk refused");
                if first {
                    let ev = json!({
                        "event": "update.refused", "code": e.code(), "reason": e.to_string(),
                        "update": a.id, "model": a.signed.name, "version": a.signed.version,
                        "chunk": index,
                    });
                    self.out.push(Action::Event(ev));
                }
                self.request_chunks();
                return;
            }
        };
        let offset = index as u64 * a.signed.artifact.chunk_size;
        let (id, nth) = (a.id, a.nheld + 1);
        self.effect(
            Effect::StoreChunk {
                id,
                index,
                offset,
                data,
                nth,
            },
            Pending::Chunk { index },
        );
    }

    fn chunk_stored(&mut self, r: Result<(), ChunkFailure>, index: usize) {
        match r {
            Err(ChunkFailure::Write(e)) => {
                return self.fail(Code::Io, &format!("writing chunk {index}: {e}"));
            }
            Err(ChunkFailure::Record(e)) => {
                return self.fail(Code::Io, &format!("recording chunk {index}: {e}"));
            }
            Ok(()) => {}
        }
        let Some(a) = &mut self.current else { return };
        a.held[index] = true;
        a.nheld += 1;
        self.out
            .push(Action::Crash(format!("update:chunk-{}", a.nheld)));
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
            self.out.push(Action::Event(ev));
        }
        self.publish_status(false);
        if self
            .current
            .as_ref()
            .is_some_and(|a| a.nheld == a.held.len())
        {
            self.advance();
        } else {
            self.request_chunks();
        }
    }

    /// Drive the current update through every step that needs no outside input, up to the
    /// first effect it has to wait for.
    fn advance(&mut self) {
        let Some(a) = &self.current else { return };
        let (id, name) = (a.id, a.signed.name.clone());
        match a.state {
            State::Downloading => {
                if a.nheld < a.held.len() {
                    self.request_chunks();
                } else {
                    self.set_state(State::Verifying, json!({}));
                }
            }
            State::Verifying => {
                let e = Effect::VerifyStage {
                    id,
                    artifact: Box::new(a.signed.artifact.clone()),
                    name,
                    version: a.version.clone(),
                };
                self.effect(e, Pending::Verify);
            }
            State::Staged => self.set_state(State::SelfTesting, json!({})),
            State::SelfTesting => self.effect(Effect::Install { id, name }, Pending::Install),
            State::Shadow => {
                let Some(spec) = a.signed.shadow.clone() else {
                    // Only a manifest with a shadow gets here; a recorded one without is
                    // activated as any other.
                    return self.set_state(State::Activating, json!({}));
                };
                let e = Effect::StartShadow {
                    id,
                    name,
                    version: a.version.clone(),
                    spec: Box::new(spec),
                };
                self.effect(e, Pending::Shadow);
            }
            State::Activating => {
                let version = a.version.clone();
                self.effect(Effect::Activate { name, version }, Pending::Activate);
            }
            State::Health => {
                if a.health.is_some() {
                    self.check_health(None);
                }
            }
            State::Committed | State::Failed | State::RolledBack => self.end(),
        }
    }

    /// Record the next state with its event; only once that committed does the update move
    /// on (a database that refuses the write, a full disk, stops it where it was, and a later
    /// tick tries again).
    fn set_state(&mut self, state: State, extra: Value) {
        let Some(a) = &self.current else { return };
        let mut event = json!({
            "event": format!("update.{}", state.as_str()),
            "update": a.id, "model": a.signed.name, "version": a.signed.version,
        });
        if let (Value::Object(e), Value::Object(x)) = (&mut event, extra) {
            e.extend(x);
        }
        let id = a.id;
        self.effect(
            Effect::SetState { id, state, event },
            Pending::SetState(state),
        );
    }

    fn state_set(&mut self, r: Result<(), String>, state: State) {
        let now = self.now.at;
        let Some(a) = &mut self.current else { return };
        if let Err(e) = r {
            tracing::error!(update = a.id, state = state.as_str(), error = %e, "update state not recorded; trying again in {STEP_RETRY:?}");
            a.retry_at_step = Some(now + STEP_RETRY);
            return;
        }
        a.state = state;
        a.retry_at_step = None;
        let id = a.id;
        tracing::info!(update = id, model = %a.signed.name, version = %a.signed.version, state = state.as_str(), "update");
        self.out.push(Action::Wake);
        self.out
            .push(Action::Crash(format!("update:{}", state.as_str())));
        self.publish_status(true);
        if state == State::Activating || state == State::Shadow {
            // The registry holds its own copy now; the staging is not needed again,
            // whatever happens next.
            self.out.push(Action::RemoveStaging { id });
        }
        if state != State::Health {
            self.advance();
        }
    }

    fn done(&mut self, outcome: Outcome) {
        let Some(p) = self.pending.take() else {
            tracing::error!(?outcome, "update outcome with nothing pending; dropped");
            return;
        };
        match (p, outcome) {
            (
                Pending::Insert {
                    free_bytes,
                    artifact_len,
                },
                Outcome::Recorded(r),
            ) => self.inserted(r, free_bytes, artifact_len),
            (Pending::Staging, Outcome::Recorded(r)) => self.staged(r),
            (Pending::RestartStaging, Outcome::Recorded(r)) => match r {
                Ok(()) => self.advance(),
                Err(e) => self.fail(Code::Io, &format!("staging: {e}")),
            },
            (Pending::SetState(s), Outcome::Recorded(r)) => self.state_set(r, s),
            (Pending::Chunk { index }, Outcome::Chunk(r)) => self.chunk_stored(r, index),
            (Pending::Copy, Outcome::Step(r)) => self.copied(r),
            (Pending::Verify, Outcome::Step(r)) => match r {
                Ok(()) => {
                    self.out.push(Action::Crash("update:unpacked".into()));
                    self.set_state(State::Staged, json!({}));
                }
                Err((code, reason)) => self.fail(code, &reason),
            },
            (Pending::Install, Outcome::Installed(r)) => match r {
                Ok(previous) => {
                    self.out.push(Action::Crash("update:installed".into()));
                    if let Some(a) = &self.current {
                        let id = a.id;
                        self.out.push(Action::RecordPrevious { id, previous });
                    }
                    match self.current.as_ref().and_then(|a| a.signed.shadow.clone()) {
                        Some(spec) => self.set_state(State::Shadow, json!({"shadow": spec})),
                        None => self.set_state(State::Activating, json!({})),
                    }
                }
                Err((code, reason)) => self.fail(code, &reason),
            },
            (Pending::Activate, Outcome::Step(r)) => match r {
                Ok(()) => {
                    self.out.push(Action::Crash("update:activated".into()));
                    let Some(a) = &self.current else { return };
                    self.out.push(Action::ModelActivated {
                        model: a.signed.name.clone(),
                        version: a.version.to_string(),
                    });
                    if self.s.in_daemon {
                        let (id, name) = (a.id, a.signed.name.clone());
                        self.effect(
                            Effect::StartWatch {
                                id,
                                name,
                                resumed: false,
                            },
                            Pending::Watch { record: true },
                        );
                    } else {
                        self.set_state(State::Health, json!({"window_secs": null}));
                    }
                }
                Err((_, reason)) => self.fail(Code::Activation, &reason),
            },
            (Pending::Watch { record }, Outcome::Watching { left, restarts }) => {
                let deadline = self.now.at + left;
                let Some(a) = &mut self.current else { return };
                a.health = Some(Watch { deadline, restarts });
                if !record {
                    // Resumed in `health`: nothing to record, the window goes on.
                    self.advance();
                } else {
                    let window = self.s.health_window.as_secs();
                    self.set_state(State::Health, json!({"window_secs": window}));
                }
            }
            (Pending::Shadow, Outcome::Step(r)) => match r {
                Ok(()) => {
                    if let Some(a) = &mut self.current {
                        a.shadowing = true;
                        a.retry_at_step = None;
                    }
                }
                Err((Code::Io, reason)) => {
                    // The box's own trouble (its database): started again on a later tick.
                    tracing::error!(%reason, "shadow not started; trying again in {STEP_RETRY:?}");
                    let now = self.now.at;
                    if let Some(a) = &mut self.current {
                        a.retry_at_step = Some(now + STEP_RETRY);
                    }
                }
                Err((code, reason)) => self.fail(code, &reason),
            },
            (
                Pending::Reject {
                    reason,
                    shadow: true,
                },
                Outcome::Rejected(r),
            ) => match r {
                Ok(_) => self.fail(Code::Shadow, &reason),
                Err(e) => {
                    // Not marked failed: the next tick brings the verdict again.
                    tracing::error!(error = %e, "shadow candidate not marked failed; trying again");
                    let now = self.now.at;
                    if let Some(a) = &mut self.current {
                        a.retry_at_step = Some(now + STEP_RETRY);
                    }
                }
            },
            (Pending::Reject { reason, .. }, Outcome::Rejected(r)) => match r {
                Ok(to) => {
                    if let Some(a) = &self.current {
                        self.out.push(Action::ModelActivated {
                            model: a.signed.name.clone(),
                            version: to.clone(),
                        });
                    }
                    self.finish(
                        State::RolledBack,
                        Some(Code::Health),
                        &format!("{reason}; {to} active again"),
                    );
                }
                Err(e) => self.finish(
                    State::Failed,
                    Some(Code::Health),
                    &format!("{reason}; rollback failed: {e}"),
                ),
            },
            (Pending::Rotate { trust }, Outcome::Recorded(r)) => match r {
                Ok(()) => {
                    tracing::info!(version = trust.version, "update keys rotated");
                    self.trust = trust;
                    // Manifests refused under the old keys may be good under the new ones:
                    // have the broker deliver the retained ones again.
                    self.seen.clear();
                    self.out.push(Action::Redeliver);
                    self.out.push(Action::Wake);
                }
                Err(e) => {
                    tracing::error!(error = %e, "key rotation not recorded");
                    self.out.push(Action::Wake);
                }
            },
            (p, o) => {
                tracing::error!(pending = ?p, outcome = ?o, "update outcome does not match its step; dropped")
            }
        }
    }

    /// During the health window: roll back on errors, a hung inference or a daemon that keeps
    /// restarting; commit at its end.
    fn check_health(&mut self, facts: Option<HealthFacts>) {
        let Some(a) = &self.current else { return };
        let Some(h) = &a.health else { return };
        let mut problem = None;
        if h.restarts >= MAX_HEALTH_RESTARTS {
            problem = Some(format!(
                "ternd restarted {} times within the health window",
                h.restarts
            ));
        } else if let Some(f) = &facts {
            if f.active_version.as_ref() != Some(&a.version) {
                problem = Some("the new version is no longer the active one".to_string());
            } else if f.failed >= self.s.health_max_errors && f.failed * 10 >= f.ok + f.failed {
                problem = Some(format!(
                    "{} inference error(s) and {} success(es) in the health window \
                     ({} input(s) refused as the callers' fault, not counted)",
                    f.failed, f.ok, f.refused
                ));
            } else if f.hung {
                problem = Some(format!(
                    "an inference has been running for more than {HUNG:?}"
                ));
            }
        }
        if let Some(reason) = problem {
            let (name, version) = (a.signed.name.clone(), a.version.clone());
            self.effect(
                Effect::Reject {
                    name,
                    version,
                    reason: reason.clone(),
                },
                Pending::Reject {
                    reason,
                    shadow: false,
                },
            );
            return;
        }
        if let Some(f) = facts.as_ref().filter(|_| self.now.at >= h.deadline) {
            tracing::info!(
                update = a.id,
                answers = f.ok,
                errors = f.failed,
                refused_inputs = f.refused,
                "health window passed"
            );
            self.out.push(Action::Crash("update:health-passed".into()));
            self.finish(State::Committed, None, "");
        }
    }

    fn tick(&mut self, health: Option<HealthFacts>, shadow: Option<ShadowVerdict>) {
        let now = self.now;
        let clock_s = self.clock_s();
        let Some(a) = &mut self.current else { return };
        let step_due = a.retry_at_step.is_none_or(|t| now.at >= t);
        match a.state {
            State::Downloading if a.nheld == a.held.len() => {
                // Everything is here but the step on was not recorded: try it again.
                if step_due {
                    self.advance();
                }
            }
            State::Downloading => {
                if clock_s > a.signed.expires {
                    let why = format!(
                        "the manifest expired at {} before the download finished",
                        a.signed.expires
                    );
                    return self.fail(Code::Expired, &why);
                }
                // From the last good chunk, whatever is asked for: chunks that keep coming
                // back bad are no progress.
                if now.at.duration_since(a.last_chunk) > STALL {
                    a.stalls += 1;
                    if a.stalls >= MAX_STALLS {
                        let why = format!(
                            "no chunk arrived in {:?}: {}",
                            STALL * MAX_STALLS,
                            stall_note(a.nheld, a.held.len())
                        );
                        return self.fail(Code::Stalled, &why);
                    }
                    // Nothing for a while: a lost subscription, a chunk not (yet) published.
                    tracing::info!(
                        update = a.id,
                        missing = a.held.len() - a.nheld,
                        "download stalled; asking for its chunks again"
                    );
                    let asked: Vec<usize> = std::mem::take(&mut a.asked).into_iter().collect();
                    a.last_chunk = now.at;
                    let sha256 = a.signed.artifact.sha256.clone();
                    self.out.push(Action::Unwant {
                        sha256,
                        chunks: asked,
                    });
                }
                self.request_chunks();
                self.publish_status(false);
            }
            State::Health => self.check_health(health),
            State::Shadow if a.shadowing => {
                let (Some(v), true) = (shadow, step_due) else {
                    return;
                };
                if v.promote {
                    self.set_state(State::Activating, json!({"shadow": v.reason}));
                } else {
                    let e = Effect::Reject {
                        name: a.signed.name.clone(),
                        version: a.version.clone(),
                        reason: v.reason.clone(),
                    };
                    let p = Pending::Reject {
                        reason: format!("shadow: {}", v.reason),
                        shadow: true,
                    };
                    self.effect(e, p);
                }
            }
            // A step whose record failed: try it again, not on every tick.
            _ => {
                if step_due {
                    self.advance();
                }
            }
        }
    }

    fn fail(&mut self, code: Code, reason: &str) {
        self.finish(State::Failed, Some(code), reason);
    }

    /// End the current update in `state`, remove its staging and start what waits.
    fn finish(&mut self, state: State, code: Option<Code>, reason: &str) {
        let Some(a) = &self.current else { return };
        let id = a.id;
        if state == State::Failed || state == State::RolledBack {
            tracing::warn!(update = id, model = %a.signed.name, version = %a.signed.version, code = ?code, reason, "update {}", state.as_str());
        }
        // Staging goes first: a crash before the row commits resumes a state that needs
        // none (or makes it again), and once the row says it ended nothing is left behind.
        self.out.push(Action::RemoveStaging { id });
        if code.is_some_and(retryable) {
            // The same manifest, delivered again (a reconnect, a restart), is taken again.
            let digest = a.manifest_sha256.clone();
            self.seen.remove(&digest);
        }
        self.finish_row(id, state, code, reason);
        if let Some(a) = self.current.as_mut() {
            a.state = state;
            if let Some(c) = code {
                a.outcome = Some((c, reason.to_string()));
            }
        }
        self.publish_status(true);
        self.end();
    }

    fn finish_row(&mut self, id: i64, state: State, code: Option<Code>, reason: &str) {
        self.out.push(Action::FinishRow {
            id,
            state,
            code,
            reason: (!reason.is_empty()).then(|| reason.to_string()),
        });
        self.out.push(Action::Wake);
        if state == State::Committed {
            tracing::info!(update = id, "update committed");
        }
    }

    /// After a final state: the next waiting manifest is offered again.
    fn end(&mut self) {
        if let Some(a) = self.current.take() {
            self.close(a);
        }
    }

    /// Let go of an update: its staging, its chunk subscriptions, a bundle's caller.
    fn close(&mut self, a: Active) {
        self.out.push(Action::RemoveStaging { id: a.id });
        if !a.asked.is_empty() {
            self.out.push(Action::Unwant {
                sha256: a.signed.artifact.sha256.clone(),
                chunks: a.asked.iter().copied().collect(),
            });
        }
        if let Some(t) = a.ticket {
            self.answer(t, Ok(a.id));
        }
    }

    /// A key rotation: accepted when a threshold of the current keys signed it.
    fn rotate(&mut self, payload: Bytes) {
        if payload.is_empty() {
            return;
        }
        let digest = tern_update::sha256_hex(&payload);
        if !self.seen.insert(digest) {
            return;
        }
        if self.trust.doc.as_deref() == Some(&payload[..]) {
            return; // the rotation in force, delivered again
        }
        let result = bundle::parse(&payload)
            .and_then(|m| bundle::verify_rotation(&m, &self.trust.keys, self.trust.version));
        match result {
            Err(e) => self.refuse_trust("key rotation", "keys", &e),
            Ok((keys, version)) => {
                let event = json!({
                    "event": "update.keys_rotated", "version": version,
                    "keys": keys.keys.iter().map(|k| k.to_base64()).collect::<Vec<_>>(),
                    "threshold": keys.threshold,
                });
                let trust = Trust {
                    keys,
                    version,
                    doc: Some(payload.to_vec()),
                };
                self.effect(
                    Effect::Rotate {
                        trust: trust.clone(),
                        event,
                    },
                    Pending::Rotate { trust },
                );
            }
        }
    }

    /// A key set or a signed time refused: logged, and said as an `update.refused` event from
    /// `source` within the refusal burst.
    fn refuse_trust(&mut self, what: &str, source: &str, e: &RefusalError) {
        let reason = clip(&e.to_string(), 512);
        let Some(suppressed) = self.may_say_refusal() else {
            tracing::debug!(code = %e.code(), error = %reason, "{what} refused (not said: too many)");
            return;
        };
        tracing::warn!(code = %e.code(), error = %reason, "{what} refused");
        let mut ev = json!({"event": "update.refused", "code": e.code(), "reason": reason, "source": source});
        if suppressed > 0 {
            ev["suppressed"] = json!(suppressed);
        }
        self.out.push(Action::Event(ev));
    }

    /// A bundle file: the same verification as over MQTT, the artifact copied from the file
    /// (each chunk checked) instead of fetched.
    fn bundle(
        &mut self,
        ticket: u64,
        path: std::path::PathBuf,
        source: String,
        manifest: Bytes,
        artifact_len: u64,
        facts: ManifestFacts,
    ) {
        // The same bundle again, installed and serving: nothing to do. Anything else (an
        // older bundle installed once and since replaced) is judged afresh, as a downgrade
        // or a replay.
        if let Some(id) = facts.serving {
            return self.answer(ticket, Ok(id));
        }
        if let Some(a) = &self.current {
            let busy = InstallError::Busy {
                id: a.id,
                state: a.state,
            };
            return self.answer(ticket, Err(busy));
        }
        let digest = tern_update::sha256_hex(&manifest);
        let bundle = Some((ticket, artifact_len));
        self.offer_new(source, manifest, digest, facts, bundle);
        if let Some(a) = self.current.as_mut().filter(|a| a.ticket == Some(ticket)) {
            a.bundle_path = Some(path);
        }
    }

    /// The current update's state, retained for `tern-update status` and said to local
    /// listeners; progress at most every STATUS_EVERY unless `now`.
    fn publish_status(&mut self, now: bool) {
        let Some(a) = &self.current else { return };
        if !now
            && self
                .last_status
                .is_some_and(|t| self.now.at < t + STATUS_EVERY)
        {
            return;
        }
        let percent = a.nheld * 100 / a.held.len().max(1);
        let mut body = json!({
            "device": self.s.device, "update": a.id, "model": a.signed.name,
            "version": a.signed.version, "state": a.state.as_str(),
            "percent": percent, "ts_ms": self.now.wall_ms,
            "manifest_sha256": a.manifest_sha256,
        });
        if let Some((code, reason)) = &a.outcome {
            body["code"] = code.as_str().into();
            body["reason"] = reason.clone().into();
        }
        if a.state == State::Downloading && a.stalls > 0 {
            body["note"] = stall_note(a.nheld, a.held.len()).into();
        }
        // Said on change only: a download waiting for chunks says nothing new each second.
        let mut said = body.clone();
        said["ts_ms"] = Value::Null;
        if self.last_said.as_ref() == Some(&said) {
            return;
        }
        self.last_said = Some(said);
        self.last_status = Some(self.now.at);
        if self.s.in_daemon {
            self.out.push(Action::Progress {
                model: a.signed.name.clone(),
                version: a.signed.version.clone(),
                state: a.state,
                percent: percent as u32,
            });
        }
        self.out.push(Action::Status {
            model: a.signed.name.clone(),
            body,
        });
    }
}

/// Why a download waits, as far as the box can tell: the operator reads it in the status.
fn stall_note(held: usize, of: usize) -> String {
    if held == 0 {
        // The manifest came but no chunk: they are not retained where this box's broker node
        // can see them.
        format!(
            "none of the {of} chunks arrived: the broker does not deliver the retained chunks \
             (withdrawn, never published, or kept on another node of a broker cluster that \
             does not share retained messages)"
        )
    } else {
        format!(
            "{held} of {of} chunks arrived, then none for a while: the broker stopped \
                 delivering the retained chunks"
        )
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

/// `s` cut to at most `max` bytes (on a character boundary), marked when cut.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
