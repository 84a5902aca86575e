//! Over-the-air model updates: from a signed manifest to a committed (or rolled back) model
//! version, resumable after a crash at any instant.
//!
//! ```text
//!  manifest ─verify─► downloading ─all chunks─► verifying ─► staged ─► self_testing
//!     │ (refused: event, nothing changes)                                   │
//!     ▼                                                                      ▼
//!  committed ◄─ window passes ─ health ◄──────────────────────────── activating
//!                                  └─ errors or a hung inference ─► rolled_back
//!  any step that fails ─► failed (with a code and a reason)
//!
//!  self_testing ─(the manifest asks for a shadow)─► shadow ─promoted─► activating
//!                                                      └─ refused ─► failed (`shadow`)
//! ```
//!
//! Two halves: [`core`] decides (every rule, no I/O, unit-tested on plain values) and
//! [`driver`] does (the database, the staging files, the registry, the fleet link's chunk
//! subscriptions and retained statuses, local signals). One task owns both and takes one
//! update at a time; each state change is one SQLite transaction together with its event in
//! the outbox. Chunks are written into a staging file (`<state_dir>/updates/<id>/artifact`)
//! at their offset and fsynced before the row that says the box holds them commits, so after
//! a restart only chunks never recorded are fetched again. The model files themselves go
//! through the registry (temp, fsync, rename), and the switch to a new version is the
//! registry's one transaction: after `kill -9` the active version is the old or the new one,
//! and a restart carries on from the recorded state.
//!
//! The fleet link delivers what arrives ([`Delivery`]: manifests, key rotations, chunks, the
//! link going up and down) and carries out what the updater asks of the broker ([`Uplink`]:
//! the chunks it wants, its retained status); the topics are the fleet's business. A bundle
//! file takes the same path: [`Updater::install`] from the running daemon (D-Bus, ternctl,
//! `ternd install`), or [`install_here`] with the daemon stopped.

pub mod core;
mod driver;
pub mod mirror;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::OptionalExtension as _;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, UpdatesConfig};
use crate::engine::Pools;
use crate::events::Events;
use crate::outbox::Outbox;
use crate::registry::Registry;
use crate::store::{Store, StoreError};

pub use self::core::{InstallError, Link, State};

/// What the fleet link delivers to the updater.
#[derive(Debug)]
pub enum Delivery {
    /// A manifest from `source` (its topic); empty when the operator cleared it.
    Manifest { source: String, payload: Bytes },
    /// Key rotations, chunks, and the link going up and down.
    Link(Link),
}

/// What the updater asks of the fleet link.
#[derive(Debug, Clone, PartialEq)]
pub enum Uplink {
    /// Subscribe to these chunks of artifact `sha256`.
    Want { sha256: String, chunks: Vec<usize> },
    /// Unsubscribe from them.
    Unwant { sha256: String, chunks: Vec<usize> },
    /// The retained status of the box's update of `model`: kept, and said again on every
    /// reconnect.
    Status { model: String, body: Value },
    /// Ask the broker for the retained manifests again (the trusted keys changed).
    Redeliver,
}

enum Msg {
    Delivery(Delivery),
    Bundle {
        path: std::path::PathBuf,
        reply: oneshot::Sender<Result<i64, InstallError>>,
    },
}

/// Everything the updater works with.
#[derive(Clone)]
pub struct Deps {
    pub store: Store,
    pub registry: Registry,
    pub outbox: Option<Outbox>,
    /// Local signals; `None` when `ternd install` runs with the daemon stopped (then no
    /// health window is watched either: the daemon does that when it starts).
    pub events: Option<Events>,
    /// Requests to the fleet link, if there is one.
    pub uplink: Option<mpsc::Sender<Uplink>>,
    pub cfg: UpdatesConfig,
    pub state_dir: std::path::PathBuf,
    pub device: String,
    pub groups: Vec<String>,
    /// `<prefix>` of the fleet topics, if there is a fleet link.
    pub prefix: Option<String>,
    pub pools: Pools,
}

impl Deps {
    /// What a box configured as `config` updates with.
    pub fn new(config: &Config, store: Store, registry: Registry, outbox: Option<Outbox>) -> Deps {
        let fleet = config.fleet.as_ref();
        Deps {
            store,
            registry,
            outbox,
            events: None,
            uplink: None,
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
    tx: mpsc::Sender<Msg>,
    /// A manifest or key message was dropped on a full queue: the retained ones are asked
    /// for again once there is room.
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl Updater {
    /// Hand a delivery to the updater without waiting (the MQTT session never blocks on it).
    /// A chunk lost to a full queue is asked for again when the download stalls.
    pub fn offer(&self, d: Delivery) {
        match self.tx.try_send(Msg::Delivery(d)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Msg::Delivery(Delivery::Link(Link::Chunk {
                index,
                ..
            })))) => {
                tracing::warn!(chunk = index, "updater busy; chunk dropped");
            }
            // A cleared manifest is no longer retained: it cannot be delivered again.
            Err(mpsc::error::TrySendError::Full(Msg::Delivery(Delivery::Manifest {
                source,
                payload,
            }))) if payload.is_empty() => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx
                        .send(Msg::Delivery(Delivery::Manifest { source, payload }))
                        .await;
                });
            }
            Err(mpsc::error::TrySendError::Full(Msg::Delivery(
                Delivery::Manifest { .. } | Delivery::Link(Link::Keys { .. } | Link::Time { .. }),
            ))) => {
                // Anyone who may publish on an update topic can fill the queue: nothing is
                // held for them. What matters is retained, and is delivered again.
                use std::sync::atomic::Ordering::Relaxed;
                if !self.dropped.swap(true, Relaxed) {
                    tracing::warn!("updater busy; update messages dropped, asked for again later");
                }
            }
            Err(mpsc::error::TrySendError::Full(msg)) => {
                // A link change (one per connection or loss) must not be lost: wait for
                // room off the caller's task.
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(msg).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Install a bundle file: answered once its bytes are staged (or it was refused), with
    /// the update's id; the update goes on after the answer (see [`row`] and the progress
    /// signals). The file may be removed once this returns.
    pub async fn install(&self, path: &Path) -> Result<i64, InstallCallError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Bundle {
            path: path.to_path_buf(),
            reply,
        };
        self.tx
            .send(msg)
            .await
            .map_err(|_| InstallCallError::Stopped)?;
        rx.await
            .map_err(|_| InstallCallError::Stopped)?
            .map_err(InstallCallError::Install)
    }
}

/// Why [`Updater::install`] gave no update.
#[derive(Debug, thiserror::Error)]
pub enum InstallCallError {
    #[error(transparent)]
    Install(InstallError),
    #[error("the updater has stopped")]
    Stopped,
}

/// The updater's task: run it for as long as the daemon runs. It may be run again after it
/// ended (a panic): each run starts from the database, as a restart of the daemon would.
pub struct Task {
    deps: Deps,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Msg>>>,
    /// Whether the fleet link is up, as its deliveries said: a run after a restart starts
    /// with it (the link does not say it again).
    online: Arc<std::sync::atomic::AtomicBool>,
    runs: Arc<std::sync::atomic::AtomicU64>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

/// The handle and the task that owns every update; the task must be run (with the cancel
/// token that ends it).
pub fn new(deps: Deps) -> (Updater, Task) {
    let (tx, rx) = mpsc::channel(256);
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (
        Updater {
            tx,
            dropped: dropped.clone(),
        },
        Task {
            dropped,
            deps,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
            online: Arc::default(),
            runs: Arc::default(),
        },
    )
}

impl Task {
    /// Resume whatever update was in progress, then serve deliveries and bundles until
    /// `cancel`.
    pub fn run(&self, cancel: CancellationToken) -> impl Future<Output = ()> + Send + use<> {
        use std::sync::atomic::Ordering::SeqCst;
        let (deps, rx) = (self.deps.clone(), self.rx.clone());
        let (online, runs, dropped) =
            (self.online.clone(), self.runs.clone(), self.dropped.clone());
        async move {
            let mut rx = rx.lock().await;
            let uplink = deps.uplink.clone();
            let mut d = driver::Driver::new(deps);
            // Nothing is judged with keys or ids the database has not given yet.
            while let Err(e) = d.resume().await {
                tracing::error!(error = %e, "updates not resumed; trying again in 5 s");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
            if runs.fetch_add(1, SeqCst) > 0 {
                // A run after a failure: the link's state, and the retained manifests that
                // came while the last run died, are asked for again.
                if online.load(SeqCst) {
                    d.deliver(Delivery::Link(Link::Online)).await;
                }
                if let Some(u) = &uplink {
                    let _ = u.send(Uplink::Redeliver).await;
                }
            }
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            // After a long step (hashing, a self-test) one tick, not a burst of missed ones.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    msg = rx.recv() => match msg {
                        Some(Msg::Delivery(del)) => {
                            match del {
                                Delivery::Link(Link::Online) => online.store(true, SeqCst),
                                Delivery::Link(Link::Offline) => online.store(false, SeqCst),
                                _ => {}
                            }
                            d.deliver(del).await
                        }
                        Some(Msg::Bundle { path, reply }) => d.bundle(&path, Some(reply)).await,
                        None => break,
                    },
                    _ = tick.tick() => {
                        // The queue has room again (this task is reading it).
                        if dropped.swap(false, SeqCst)
                            && let Some(u) = &uplink
                        {
                            let _ = u.send(Uplink::Redeliver).await;
                        }
                        d.tick().await
                    }
                }
            }
            d.stopping().await;
        }
    }
}

/// The update row `id` as JSON (for `ternd install`, D-Bus and status).
pub async fn row(store: &Store, id: i64) -> Result<Option<Value>, StoreError> {
    store
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
}

/// Why `ternd install` with the daemon stopped did not install.
#[derive(Debug, thiserror::Error)]
pub enum HereError {
    #[error("{0}")]
    Setup(String),
    #[error("update {id} is still open ({}): start ternd to let it finish first", state.as_str())]
    Busy { id: i64, state: State },
    #[error("refused ({}): {refusal}", refusal.code())]
    Refused {
        refusal: tern_update::bundle::RefusalError,
    },
}

/// `ternd install BUNDLE` with no daemon on the state directory: drive the update here, with
/// exactly the checks an update from the fleet meets. It ends active, in its health window,
/// which starts when the daemon does. Returns the update's row.
pub async fn install_here(config: &Config, bundle: &Path) -> Result<Value, HereError> {
    crate::registry::clean_temp(&config.state_dir);
    let db = config.state_dir.join("tern.db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| HereError::Setup(e.to_string()))?
        .map_err(|e| HereError::Setup(e.to_string()))?;
    // The box as the daemon would bring it up: active versions, then the configured packages.
    let registry = Registry::spawn(store.clone(), &config.state_dir);
    for e in registry.start(&config.pools()).await {
        tracing::warn!(error = %e, "at start");
    }
    for e in registry.apply(&config.models).await {
        tracing::warn!(error = %e, "configured model");
    }
    // Events are kept for the fleet link to send when the daemon next runs.
    let outbox = Outbox::for_config(config);
    let mut d = driver::Driver::new(Deps::new(config, store.clone(), registry, outbox));
    d.resume()
        .await
        .map_err(|e| HereError::Setup(format!("updates not resumed: {e}")))?;
    let (reply, rx) = oneshot::channel();
    d.bundle(bundle, Some(reply)).await;
    let id = match rx.await {
        Ok(Ok(id)) => id,
        // Only a running daemon can finish the open update (its health window, say).
        Ok(Err(InstallError::Busy { id, state })) => return Err(HereError::Busy { id, state }),
        Ok(Err(InstallError::Refused(refusal))) => return Err(HereError::Refused { refusal }),
        Err(_) => return Err(HereError::Setup("the update was dropped".into())),
    };
    row(&store, id)
        .await
        .map_err(|e| HereError::Setup(e.to_string()))?
        .ok_or_else(|| HereError::Setup(format!("update {id} not found")))
}
