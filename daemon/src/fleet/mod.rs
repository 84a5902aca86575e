//! The fleet link: one MQTT session to the fleet broker.
//!
//! ```text
//!  session task ── polls rumqttc, nothing else (keep-alive is never starved)
//!      ├─ ConnAck ─► subscribe, session counter +1, wake presence and drain
//!      ├─ cmd/<name> ─► bounded command queue (full: `busy` at once)
//!      ├─ fleet/announce ─► wake presence
//!      └─ PUBACK of an outbox row ─► ack list, wake drain
//!  drain task ── outbox rows ─► publish (window of WINDOW rows), acked rows deleted in batches
//!  command task ── commands::handle ─► reply (MQTT 5 response topic, else <base>/reply/<id>)
//!  presence task ── retained birth on <base>/state on connect, on change, on announce;
//!                   Home Assistant discovery messages, and clears of those no longer wanted
//!  telemetry task ── every N s a telemetry message through the outbox
//!  updates task ── the updater's requests: chunk subscriptions, retained update statuses
//!                   (kept, and said again on every connect), manifests asked for again
//! ```
//!
//! Every topic is built in `tern_update::topics`, shared with the operator's tool. Manifests,
//! key rotations and chunks go to the updater as they arrive; the updater never touches the
//! link itself.

pub mod commands;
pub mod corrupt;
pub mod home_assistant;
pub mod mqtt;
pub mod telemetry;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use tern_update::topics::{self, Route};

use crate::config::FleetConfig;
use crate::control::{CmdError, Code, Control};
use crate::outbox::{self, Class, Outbox};
use crate::tasks::Tasks;
use crate::update::{self, Delivery, Updater, Uplink};
use mqtt::{Event, Link};

type Topics = topics::Device;

/// Outbox rows queued or awaiting their PUBACK at once.
const WINDOW: usize = 128;
/// How long a graceful stop waits for the `offline` message and DISCONNECT to go out, and for
/// commands already running to finish.
const STOP_DEADLINE: Duration = Duration::from_secs(3);
/// Commands carried out at the same time.
const COMMANDS_AT_ONCE: usize = 4;
/// How long a connection must have lasted for the reconnect back-off to start over.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);
/// Replies larger than this are replaced by an error saying so (a broker may refuse them, and
/// a box should not flood its uplink answering one question).
pub const MAX_REPLY_BYTES: usize = 120 * 1024;
/// The same for a group command, which every box of the group answers at once.
pub const MAX_GROUP_REPLY_BYTES: usize = 16 * 1024;

/// A command waiting for the command task, with where its reply goes.
struct Queued {
    cmd: commands::Incoming,
    /// An allowed MQTT 5 response topic and its correlation data; else the reply topic.
    reply_to: Option<(String, Option<bytes::Bytes>)>,
    /// The largest reply this command may get.
    max_reply: usize,
}

/// The running fleet link: what a stop needs. Its tasks are the service's, by name
/// (`fleet.session`, `fleet.commands`, `fleet.drain`, `fleet.presence`, `fleet.telemetry`,
/// `fleet.updates`).
pub struct Fleet {
    link: Link,
    topics: Topics,
    control: Control,
    /// Ends the tasks that only send (drain, presence, telemetry, updates).
    senders: CancellationToken,
    /// Ends the session (after our DISCONNECT) and the command task.
    cancel: CancellationToken,
}

struct Shared {
    acks: Mutex<Vec<i64>>,
    /// Rows the broker refused (MQTT 5 reason codes), with the reason.
    refused: Mutex<Vec<(i64, String)>>,
    drain: Notify,
    presence: Notify,
    /// A connection was made: the update statuses are said again.
    connected: Notify,
    /// Tokens of retained clears the broker acknowledged (Home Assistant discovery).
    cleared: Mutex<Vec<u64>>,
    /// A clear was acknowledged: discovery forgets its topic (no birth is said for it).
    cleared_notify: Notify,
}

/// Why the fleet link could not start.
#[derive(Debug, thiserror::Error)]
#[error("fleet link: {0}")]
pub struct FleetError(pub String);

/// The updater, seen from the link: where deliveries go and what it asks for.
pub struct UpdaterLink {
    pub updater: Updater,
    pub uplink: mpsc::Receiver<Uplink>,
}

pub fn spawn(
    cfg: &FleetConfig,
    control: Control,
    outbox: Outbox,
    updates: Option<UpdaterLink>,
    tasks: &mut Tasks,
) -> Result<Fleet, FleetError> {
    let topics = Topics::new(&cfg.prefix, &cfg.device, &cfg.groups);
    let will = offline(&topics, false);
    // Chunk messages must fit through the same bound as commands.
    let max_incoming = cfg
        .commands
        .max_payload_bytes
        .max(tern_update::bundle::CHUNK_HEADER + tern_update::bundle::MAX_CHUNK as usize);
    let (link, session) = mqtt::connect(
        cfg,
        &topics.state(),
        will.to_string().as_bytes(),
        max_incoming,
    )
    .map_err(FleetError)?;
    let cancel = CancellationToken::new();
    let senders = CancellationToken::new();
    let shared = Arc::new(Shared {
        acks: Mutex::new(Vec::new()),
        refused: Mutex::new(Vec::new()),
        drain: Notify::new(),
        presence: Notify::new(),
        connected: Notify::new(),
        cleared: Mutex::new(Vec::new()),
        cleared_notify: Notify::new(),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel::<Queued>(cfg.commands.queue.get());
    let (updater, uplink) = match updates {
        Some(u) => (Some(u.updater), Some(u.uplink)),
        None => (None, None),
    };
    let session = Session {
        session,
        link: link.clone(),
        topics: topics.clone(),
        cfg: cfg.clone(),
        control: control.clone(),
        shared: shared.clone(),
        cmd_tx,
        updater,
        refused_response_logged: Default::default(),
    };
    tasks.fatal("fleet.session", session.run(cancel.clone()));
    tasks.fatal(
        "fleet.commands",
        command_task(
            link.clone(),
            topics.clone(),
            cfg.commands.clone(),
            control.clone(),
            cmd_rx,
            cancel.clone(),
        ),
    );
    {
        let (link, control, outbox, shared, cancel) = (
            link.clone(),
            control.clone(),
            outbox.clone(),
            shared.clone(),
            senders.clone(),
        );
        tasks.restart("fleet.drain", move || {
            drain_task(
                link.clone(),
                control.clone(),
                outbox.clone(),
                shared.clone(),
                cancel.clone(),
            )
        });
    }
    {
        let (link, topics, control, shared, cancel) = (
            link.clone(),
            topics.clone(),
            control.clone(),
            shared.clone(),
            senders.clone(),
        );
        tasks.restart("fleet.presence", move || {
            presence_task(
                link.clone(),
                topics.clone(),
                control.clone(),
                shared.clone(),
                cancel.clone(),
            )
        });
    }
    {
        let (control, every, cancel) = (control.clone(), cfg.telemetry_every, senders.clone());
        tasks.restart("fleet.telemetry", move || {
            telemetry_task(control.clone(), outbox.clone(), every, cancel.clone())
        });
    }
    if let Some(rx) = uplink {
        let state = Arc::new(tokio::sync::Mutex::new(UpdatesLink {
            rx,
            statuses: Default::default(),
        }));
        let (link, topics, shared, cancel) = (
            link.clone(),
            topics.clone(),
            shared.clone(),
            senders.clone(),
        );
        tasks.restart("fleet.updates", move || {
            updates_task(
                state.clone(),
                link.clone(),
                topics.clone(),
                shared.clone(),
                cancel.clone(),
            )
        });
    }
    Ok(Fleet {
        link,
        topics,
        control,
        senders,
        cancel,
    })
}

impl Fleet {
    /// Say `offline` (retained) and disconnect cleanly, so the broker does not fire the last
    /// will; the session ends at our DISCONNECT, and commands already running finish, all by
    /// `deadline` or STOP_DEADLINE from now, whichever is later. Returns the tasks that
    /// overran.
    pub async fn stop(self, tasks: &mut Tasks, deadline: tokio::time::Instant) -> Vec<String> {
        self.senders.cancel();
        // Its own few seconds even when the pipelines' drain used up the stop's deadline: the
        // `offline` message and the DISCONNECT must get out, or the broker fires the will.
        let deadline = deadline.max(tokio::time::Instant::now() + STOP_DEADLINE);
        let mut overran = Vec::new();
        let senders = [
            "fleet.drain",
            "fleet.presence",
            "fleet.telemetry",
            "fleet.updates",
        ];
        overran.extend(tasks.join(&senders, deadline).await);
        self.cancel.cancel();
        if self.link.is_connected() {
            let msg = offline(&self.topics, true).to_string().into_bytes();
            let _ = self.link.publish(&self.topics.state(), msg, true, None);
            self.link.disconnect();
        }
        overran.extend(tasks.join(&["fleet.session"], deadline).await);
        // The command task stopped taking commands at the cancel and now finishes what is
        // running. Cut short, a command's id stays claimed and never runs twice.
        overran.extend(tasks.join(&["fleet.commands"], deadline).await);
        self.control.set_fleet(false, 0);
        overran
    }
}

/// The groups ride along so an operator's tool knows an offline box's groups (a rollout
/// plans its waves over the members that are away too).
fn offline(t: &Topics, graceful: bool) -> Value {
    json!({"state": "offline", "device": t.device, "groups": t.groups, "graceful": graceful})
}

/// What the session task works with.
struct Session {
    session: mqtt::Session,
    link: Link,
    topics: Topics,
    cfg: FleetConfig,
    control: Control,
    shared: Arc<Shared>,
    cmd_tx: mpsc::Sender<Queued>,
    updater: Option<Updater>,
    /// A refused response topic has been logged (once: requesters choose them).
    refused_response_logged: std::sync::atomic::AtomicBool,
}

impl Session {
    async fn run(mut self, cancel: CancellationToken) {
        let mut failures = 0u32;
        let mut connected_at: Option<std::time::Instant> = None;
        let broker = format!("{}:{}", self.cfg.host, self.cfg.port);
        loop {
            match self.session.poll().await {
                Ok(Event::Connected) => {
                    connected_at = Some(std::time::Instant::now());
                    for f in self.topics.filters(self.updater.is_some()) {
                        if let Err(e) = self.link.subscribe(&f) {
                            tracing::error!(filter = %f, error = %e, "subscribe not queued");
                        }
                    }
                    tracing::info!(%broker, "fleet link connected");
                    if let Some(u) = &self.updater {
                        u.offer(Delivery::Link(update::Link::Online));
                    }
                    self.shared.connected.notify_one();
                    self.shared.presence.notify_one();
                    self.shared.drain.notify_one();
                }
                Ok(Event::Message(m)) => self.route(m),
                Ok(Event::Cleared(token)) => {
                    self.shared
                        .cleared
                        .lock()
                        .expect("cleared lock")
                        .push(token);
                    self.shared.cleared_notify.notify_one();
                }
                Ok(Event::Acked(id, refused)) => {
                    match refused {
                        // Retrying a message the broker refuses (not authorised, over quota)
                        // would block every message behind it: it is dropped and reported.
                        Some(reason) => {
                            tracing::error!(row = id, %reason, "broker refused an outbox message; dropped");
                            let why = format!("refused by the broker: {reason}");
                            self.shared
                                .refused
                                .lock()
                                .expect("acks lock")
                                .push((id, why));
                        }
                        None => self.shared.acks.lock().expect("acks lock").push(id),
                    }
                    self.shared.drain.notify_one();
                }
                // Ours, at a stop. rumqttc also reports a protocol error this way; then the
                // next poll fails and reconnects.
                Ok(Event::Disconnected) if cancel.is_cancelled() => return,
                Ok(Event::Disconnected) => {}
                Ok(Event::Other) => {}
                Err(e) => {
                    self.control.set_fleet(false, 0);
                    if let Some(u) = &self.updater {
                        u.offer(Delivery::Link(update::Link::Offline));
                    }
                    if cancel.is_cancelled() {
                        return;
                    }
                    // Only a connection that lasted starts the back-off over: one the broker
                    // (or something it sends) ends right away must not be retried every second.
                    if connected_at
                        .take()
                        .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                    {
                        failures = 0;
                    }
                    let delay = mqtt::backoff(failures, self.cfg.reconnect_max);
                    if failures == 0 {
                        tracing::warn!(%broker, error = %e, retry_in = ?delay, "fleet link down");
                    } else {
                        tracing::debug!(%broker, error = %e, retry_in = ?delay, "fleet link still down");
                    }
                    failures = failures.saturating_add(1);
                    self.shared.drain.notify_one();
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Whether a reply may go to this MQTT 5 response topic: the box's own `reply/` topics
    /// or one matching `fleet.response_topics`, and never another of tern's own topics (a
    /// requester cannot make the box publish onto another box's commands or its own state).
    fn may_answer_on(&self, topic: &str) -> bool {
        self.topics.may_answer_on(topic)
            && (topic.starts_with(&self.topics.reply(""))
                || self
                    .cfg
                    .response_topics
                    .iter()
                    .any(|f| rumqttc::matches(topic, f)))
    }

    /// A delivered message to whoever takes it.
    fn route(&self, m: mqtt::Message) {
        let route = self.topics.route(&m.topic);
        // An empty message is no command (and a reply to it would have no id); on 3.1.1 it
        // is also what the relay leaves of one over the size limit, and has logged. (On an
        // update topic it means a cleared manifest, and on the announce topic it is an
        // announce.)
        if m.payload.is_empty() && matches!(route, Route::Command { .. }) {
            tracing::debug!(topic = %m.topic, "empty command ignored");
            return;
        }
        // Not a cleared manifest: one too large to read (the relay has logged it).
        if m.payload.is_empty()
            && let Some(size) = self.session.take_dropped(&m.topic)
        {
            tracing::warn!(topic = %m.topic, bytes = size, "an MQTT message over the size limit was dropped; ignored");
            return;
        }
        let offer = |d: Delivery| {
            if let Some(u) = &self.updater {
                u.offer(d);
            }
        };
        match route {
            Route::Announce => self.shared.presence.notify_one(),
            Route::Command { name, target } => {
                let reply_to = match m.response_topic {
                    Some(t) if self.may_answer_on(&t) => Some((t, m.correlation)),
                    Some(t) => {
                        use std::sync::atomic::Ordering;
                        if !self.refused_response_logged.swap(true, Ordering::Relaxed) {
                            tracing::warn!(response_topic = %t, "a response topic outside fleet.response_topics is not answered on; replying on the reply topic (logged once)");
                        }
                        None
                    }
                    None => None,
                };
                // One group command makes every box in the group answer at once.
                let max_reply = if target.starts_with("group:") {
                    MAX_GROUP_REPLY_BYTES
                } else {
                    MAX_REPLY_BYTES
                };
                let q = Queued {
                    cmd: commands::Incoming {
                        name,
                        target,
                        payload: m.payload,
                    },
                    reply_to,
                    max_reply,
                };
                if let Err(mpsc::error::TrySendError::Full(q)) = self.cmd_tx.try_send(q) {
                    let max = self.cfg.commands.max_payload_bytes;
                    let id = commands::peek_id(&q.cmd.payload, max);
                    let e = CmdError::new(
                        Code::Busy,
                        "too many commands waiting; try again with the same id",
                    );
                    let reply = commands::reply_err(id.as_deref(), &e);
                    send_reply(
                        &self.link,
                        &self.topics,
                        id.as_deref(),
                        q.reply_to,
                        q.max_reply,
                        &reply,
                    );
                }
            }
            Route::Manifest => offer(Delivery::Manifest {
                source: m.topic,
                payload: m.payload,
            }),
            Route::Keys => offer(Delivery::Link(update::Link::Keys { payload: m.payload })),
            Route::Time => offer(Delivery::Link(update::Link::Time { payload: m.payload })),
            Route::Chunk { sha256, index } => offer(Delivery::Link(update::Link::Chunk {
                sha256,
                index,
                payload: m.payload,
            })),
            Route::Other => {}
        }
    }
}

/// The updater's requests and the statuses it said, across restarts of the updates task.
struct UpdatesLink {
    rx: mpsc::Receiver<Uplink>,
    /// The last status said per model, said again on every connect (retained, so a
    /// `tern-update status` started later sees it).
    statuses: std::collections::BTreeMap<String, Value>,
}

/// Statuses said again on every connect, per model named by an update topic. Anyone who may
/// publish there can name models: past [`MAX_STATUSES`], a refusal's status is said once
/// and not kept, and a new outcome of a real update takes the place of a kept refusal.
fn remember_status(
    statuses: &mut std::collections::BTreeMap<String, Value>,
    model: String,
    body: Value,
) {
    if statuses.len() >= MAX_STATUSES && !statuses.contains_key(&model) {
        if body["state"] == "refused" {
            return;
        }
        let refusal = statuses
            .iter()
            .find(|(_, b)| b["state"] == "refused")
            .map(|(m, _)| m.clone());
        match refusal {
            Some(m) => statuses.remove(&m),
            None => return,
        };
    }
    statuses.insert(model, body);
}

/// Models whose last update status is kept to be said again on connect.
const MAX_STATUSES: usize = 64;

/// Carry out the updater's requests on the link.
async fn updates_task(
    state: Arc<tokio::sync::Mutex<UpdatesLink>>,
    link: Link,
    topics: Topics,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut st = state.lock().await;
    let say = |model: &str, body: &Value| {
        if link.is_connected() {
            let topic = topics.update_status(model);
            let _ = link.publish(&topic, body.to_string().into_bytes(), true, None);
        }
    };
    // Chunk subscriptions rumqttc's queue had no room for, tried again every second: the
    // updater counts them as asked for.
    let mut unsent: std::collections::BTreeSet<String> = Default::default();
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    loop {
        let req = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.connected.notified() => {
                // A new session: the updater asks for its chunks again on it.
                unsent.clear();
                for (model, body) in &st.statuses {
                    say(model, body);
                }
                continue;
            }
            _ = retry.tick(), if !unsent.is_empty() => {
                unsent.retain(|topic| link.subscribe(topic).is_err());
                continue;
            }
            req = st.rx.recv() => match req {
                Some(r) => r,
                None => return cancel.cancelled().await,
            },
        };
        match req {
            Uplink::Want { sha256, chunks } => {
                for i in chunks {
                    let topic = topics.fleet.chunk(&sha256, i);
                    if let Err(e) = link.subscribe(&topic) {
                        tracing::debug!(%topic, error = %e, "chunk subscription not queued; tried again");
                        unsent.insert(topic);
                    }
                }
            }
            Uplink::Unwant { sha256, chunks } => {
                for i in chunks {
                    let topic = topics.fleet.chunk(&sha256, i);
                    unsent.remove(&topic);
                    let _ = link.unsubscribe(&topic);
                }
            }
            Uplink::Status { model, body } => {
                say(&model, &body);
                remember_status(&mut st.statuses, model, body);
            }
            Uplink::Redeliver => {
                // Subscribing again makes the broker send the retained key set, time and
                // manifests again (in that order, as on connect).
                for f in topics
                    .trust_filters()
                    .into_iter()
                    .chain(topics.manifest_filters())
                {
                    let _ = link.unsubscribe(&f);
                    let _ = link.subscribe(&f);
                }
            }
        }
    }
}

fn send_reply(
    link: &Link,
    topics: &Topics,
    id: Option<&str>,
    reply_to: Option<(String, Option<bytes::Bytes>)>,
    max_reply: usize,
    reply: &Value,
) {
    let (topic, correlation) =
        reply_to.unwrap_or_else(|| (topics.reply(id.unwrap_or("invalid")), None));
    tracing::debug!(%topic, id = id.unwrap_or("-"), "reply");
    let mut payload = reply.to_string().into_bytes();
    if payload.len() > max_reply {
        let e = CmdError::new(
            Code::Internal,
            format!(
                "the reply is {} bytes, over the {max_reply}-byte limit{}; ask for less",
                payload.len(),
                if max_reply < MAX_REPLY_BYTES {
                    " for a group command (ask the box itself)"
                } else {
                    ""
                }
            ),
        );
        payload = commands::reply_err(id, &e).to_string().into_bytes();
    }
    let sent = match link.publish(&topic, payload, false, correlation.clone()) {
        Err(mqtt::SendError::TooLarge(max)) => {
            let e = CmdError::new(
                Code::Internal,
                format!("the reply is over the broker's {max}-byte packet limit; ask for less"),
            );
            let small = commands::reply_err(id, &e).to_string().into_bytes();
            link.publish(&topic, small, false, correlation)
        }
        other => other,
    };
    if let Err(e) = sent {
        tracing::warn!(%topic, error = ?e, "reply not sent; the requester may repeat the id");
    }
}

async fn command_task(
    link: Link,
    topics: Topics,
    cfg: crate::config::CommandsConfig,
    control: Control,
    mut rx: mpsc::Receiver<Queued>,
    cancel: CancellationToken,
) {
    // A few commands run at once, so one slow or wedged inference cannot hold up a rollback;
    // the queue in front of them stays bounded and answers `busy` when full.
    let slots = Arc::new(tokio::sync::Semaphore::new(COMMANDS_AT_ONCE));
    let ids = commands::Running::default();
    let mut running = tokio::task::JoinSet::new();
    loop {
        // On stop, commands still queued are not started (their ids were never claimed, so
        // the requester can send them again); those already running finish.
        let q = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            q = rx.recv() => match q {
                Some(q) => q,
                None => break,
            },
        };
        let slot = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (link, topics, cfg, control, ids) = (
            link.clone(),
            topics.clone(),
            cfg.clone(),
            control.clone(),
            ids.clone(),
        );
        running.spawn(async move {
            let (id, reply) = commands::handle(&control, &cfg, &ids, q.cmd).await;
            send_reply(
                &link,
                &topics,
                id.as_deref(),
                q.reply_to,
                q.max_reply,
                &reply,
            );
            drop(slot);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

async fn presence_task(
    link: Link,
    topics: Topics,
    control: Control,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let (mut seen_connects, mut session) = (0u64, 0u64);
    // What the last birth said, minus its uptime: a change notice that changes nothing
    // (the service's first status racing the connect) repeats no birth.
    let mut last_said: Option<Value> = None;
    let (mut state, mut models) = (control.watch_state(), control.registry().watch());
    let mut discovery = Discovery::default();
    loop {
        let asked = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.presence.notified() => true,
            _ = shared.cleared_notify.notified() => false,
            _ = changed(&mut state) => false,
            _ = changed(&mut models) => false,
        };
        if !link.is_connected() {
            continue;
        }
        let connects = link.epoch();
        if connects != seen_connects {
            seen_connects = connects;
            match control
                .store()
                .call(|c| {
                    Ok(c.query_row(
                        "UPDATE fleet_sessions SET counter = counter + 1 RETURNING counter",
                        [],
                        |r| r.get::<_, i64>(0),
                    )?)
                })
                .await
            {
                Ok(n) => session = n as u64,
                Err(e) => tracing::error!(error = %e, "session counter not updated"),
            }
        }
        control.set_fleet(true, session);
        discovery
            .sync(&link, &topics, &control, &shared, connects)
            .await;
        let state = control.state();
        let mut birth = json!({
            "state": "online",
            "device": topics.device,
            "groups": topics.groups,
            "version": crate::VERSION,
            "session": session,
            "models": control.active_models(),
            "feeds": state.config.feeds.iter().map(|f| f.name()).collect::<Vec<_>>(),
            "pipelines": state.pipelines.iter().map(|p| json!({"name": p.name, "feed": p.feed, "model": p.model})).collect::<Vec<_>>(),
            "status": state.summary,
        });
        if !asked && last_said.as_ref() == Some(&birth) {
            continue;
        }
        last_said = Some(birth.clone());
        birth["uptime_s"] = control.uptime_s().into();
        if let Err(e) = link.publish(&topics.state(), birth.to_string().into_bytes(), true, None) {
            tracing::warn!(error = ?e, "presence not sent");
        }
    }
}

/// The Home Assistant discovery messages said on the current connection, and the clears
/// of those no longer called for.
#[derive(Default)]
struct Discovery {
    epoch: u64,
    /// Topic and payload of each message published since `epoch`'s connect.
    said: std::collections::HashMap<String, String>,
    /// The topics recorded in SQLite as published (read once, then kept in step).
    recorded: Option<std::collections::HashSet<String>>,
    /// Clears sent on this connection and not yet acknowledged, by token.
    clearing: std::collections::HashMap<u64, String>,
    next_token: u64,
}

impl Discovery {
    /// Publish (retained) every discovery message the box's config, pipelines and models call
    /// for that this connection has not carried yet, and clear those recorded as published
    /// that are no longer called for. A topic is recorded before its message is published, and
    /// forgotten only once the broker has acknowledged its clear: a box that loses power or
    /// its connection in between clears it again later.
    async fn sync(
        &mut self,
        link: &Link,
        topics: &Topics,
        control: &Control,
        shared: &Shared,
        epoch: u64,
    ) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.said.clear();
            self.clearing.clear();
        }
        let wanted = wanted_entities(topics, control);
        // A topic wanted again while its clear was on its way stays recorded: it is about to
        // be published again.
        let acked: Vec<String> = std::mem::take(&mut *shared.cleared.lock().expect("cleared lock"))
            .into_iter()
            .filter_map(|t| self.clearing.remove(&t))
            .filter(|t| !wanted.iter().any(|e| &e.topic == t))
            .collect();
        let fresh: Vec<String> = match &self.recorded {
            Some(r) => wanted
                .iter()
                .filter(|e| !r.contains(&e.topic))
                .map(|e| e.topic.clone())
                .collect(),
            None => wanted.iter().map(|e| e.topic.clone()).collect(),
        };
        let load = self.recorded.is_none();
        if load || !fresh.is_empty() || !acked.is_empty() {
            let (fresh2, acked2) = (fresh.clone(), acked.clone());
            let stored = control
                .store()
                .call(move |c| {
                    let tx = c.transaction()?;
                    for t in &fresh2 {
                        tx.execute(
                            "INSERT OR IGNORE INTO ha_discovery (topic) VALUES (?1)",
                            [t],
                        )?;
                    }
                    for t in &acked2 {
                        tx.execute("DELETE FROM ha_discovery WHERE topic = ?1", [t])?;
                    }
                    let all: Option<Vec<String>> = if load {
                        Some(
                            tx.prepare("SELECT topic FROM ha_discovery")?
                                .query_map([], |r| r.get(0))?
                                .collect::<Result<_, _>>()?,
                        )
                    } else {
                        None
                    };
                    tx.commit()?;
                    Ok(all)
                })
                .await;
            match stored {
                Ok(Some(all)) => self.recorded = Some(all.into_iter().collect()),
                Ok(None) => {
                    let r = self.recorded.get_or_insert_with(Default::default);
                    r.extend(fresh);
                    for t in &acked {
                        r.remove(t);
                    }
                }
                Err(e) => {
                    // Nothing is published that is not recorded first.
                    tracing::error!(error = %e, "Home Assistant discovery topics not recorded");
                    return;
                }
            }
        }
        for t in &acked {
            tracing::info!(topic = %t, "Home Assistant entity removed");
        }
        for e in &wanted {
            let body = e.config.to_string();
            if self.said.get(&e.topic) == Some(&body) {
                continue;
            }
            match link.publish(&e.topic, body.clone().into_bytes(), true, None) {
                Ok(()) => {
                    self.said.insert(e.topic.clone(), body);
                }
                Err(err) => {
                    tracing::warn!(topic = %e.topic, error = ?err, "discovery message not sent")
                }
            }
        }
        let keep: std::collections::HashSet<&str> =
            wanted.iter().map(|e| e.topic.as_str()).collect();
        let stale: Vec<String> = self
            .recorded
            .iter()
            .flatten()
            .filter(|t| !keep.contains(t.as_str()) && !self.clearing.values().any(|c| c == *t))
            .cloned()
            .collect();
        for t in stale {
            // An empty retained message is how discovery removes an entity.
            self.next_token += 1;
            match link.clear_retained(epoch, &t, self.next_token) {
                Ok(()) => {
                    self.said.remove(&t);
                    self.clearing.insert(self.next_token, t);
                }
                Err(err) => tracing::warn!(topic = %t, error = ?err, "discovery clear not sent"),
            }
        }
    }
}

/// The discovery messages the box's config, pipelines and models call for now.
fn wanted_entities(topics: &Topics, control: &Control) -> Vec<home_assistant::Entity> {
    let state = control.state();
    let Some(ha) = &state.config.home_assistant else {
        return Vec::new();
    };
    let snapshot = control.registry().snapshot();
    let models: Vec<Option<Arc<crate::engine::Model>>> = state
        .pipelines
        .iter()
        .map(|p| snapshot.pool(&p.model).map(|m| m.active()))
        .collect();
    let pipelines: Vec<home_assistant::Pipeline<'_>> = state
        .pipelines
        .iter()
        .zip(&models)
        .map(|(p, m)| home_assistant::Pipeline {
            name: &p.name,
            outputs: m
                .as_ref()
                .filter(|m| m.manifest.format >= 2)
                .map(|m| m.manifest.outputs.as_slice()),
        })
        .collect();
    let names: Vec<String> = snapshot.pools().map(|p| p.name().to_string()).collect();
    home_assistant::entities(ha, topics, &pipelines, &names)
}

/// A change of `rx`; a sender that is gone never changes again.
async fn changed<T>(rx: &mut tokio::sync::watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn drain_task(
    link: Link,
    control: Control,
    outbox: Outbox,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let store = control.store().clone();
    let telemetry = outbox.topics().telemetry();
    // Ids sent on this connection, per lane (0: events and telemetry, 1: results).
    let mut cursors = [0i64; 2];
    let mut seen_connects = 0u64;
    let mut last_report = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = outbox.woken() => {}
            _ = shared.drain.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let acked = std::mem::take(&mut *shared.acks.lock().expect("acks lock"));
        let refused = std::mem::take(&mut *shared.refused.lock().expect("acks lock"));
        if !(acked.is_empty() && refused.is_empty())
            && let Err(e) = store
                .call(move |c| {
                    outbox::delete_acked(c, &acked)?;
                    outbox::discard(c, &refused)?;
                    Ok(())
                })
                .await
        {
            // The rows stay and are sent again: a duplicate, never a loss.
            tracing::error!(error = %e, "acknowledged rows not deleted");
        }
        if !link.is_connected() {
            continue;
        }
        let epoch = link.epoch();
        let new_session = epoch != seen_connects;
        if new_session {
            // A new session: everything still in the outbox goes again, from the start.
            seen_connects = epoch;
            cursors = [0, 0];
        }
        if new_session || last_report.elapsed() >= Duration::from_secs(1) {
            last_report = tokio::time::Instant::now();
            let o = outbox.clone();
            match store.call(move |c| Ok(outbox::report_drops(&o, c)?)).await {
                Ok(n) if n > 0 => tracing::warn!(streams = n, "reported dropped messages"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "drop report not queued"),
            }
        }
        fill(&link, &store, epoch, &mut cursors, &telemetry).await;
    }
}

/// Publish outbox rows after `cursors` until the window is full, the outbox is empty, or the
/// connection `epoch` is gone.
async fn fill(
    link: &Link,
    store: &crate::store::Store,
    epoch: u64,
    cursors: &mut [i64; 2],
    telemetry: &str,
) {
    loop {
        let room = WINDOW.saturating_sub(link.rows_outstanding());
        if room == 0 {
            return;
        }
        let c = *cursors;
        let fetched = store
            .call(move |conn| {
                let mut rows = outbox::fetch(conn, 0, c[0], room)?;
                let live = rows.len();
                if live < room {
                    rows.extend(outbox::fetch(conn, 1, c[1], room - live)?);
                }
                Ok((rows, live))
            })
            .await;
        let (rows, live) = match fetched {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "outbox not readable");
                return;
            }
        };
        if rows.is_empty() {
            return;
        }
        let mut unsendable = Vec::new();
        let mut stopped = false;
        for (i, row) in rows.into_iter().enumerate() {
            let lane = usize::from(i >= live);
            // The latest telemetry stays on the broker, for a fleet view that reads only
            // retained messages.
            let retain = row.topic == telemetry;
            match link.publish_row(epoch, &row.topic, row.payload, row.id, retain) {
                Ok(()) => cursors[lane] = row.id,
                Err(mqtt::SendError::BadTopic) => {
                    tracing::error!(topic = %row.topic, row = row.id, "no broker takes this topic; message dropped");
                    unsendable.push((row.id, "topic no broker accepts".to_string()));
                    cursors[lane] = row.id;
                }
                Err(mqtt::SendError::TooLarge(max)) => {
                    tracing::error!(
                        row = row.id,
                        max,
                        "message over the broker's packet limit; dropped"
                    );
                    unsendable.push((row.id, format!("over the broker's {max}-byte packet limit")));
                    cursors[lane] = row.id;
                }
                // Full: the acknowledgements will wake us. Offline or a new connection: the
                // next pass starts that connection from the oldest row.
                Err(mqtt::SendError::Full | mqtt::SendError::Offline) => {
                    stopped = true;
                    break;
                }
            }
        }
        if !unsendable.is_empty()
            && let Err(e) = store
                .call(move |c| Ok(outbox::discard(c, &unsendable)?))
                .await
        {
            tracing::error!(error = %e, "unsendable rows not dropped");
        }
        if stopped {
            return;
        }
    }
}

async fn telemetry_task(
    control: Control,
    outbox: Outbox,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cpu = telemetry::cpu_sample();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now_cpu = telemetry::cpu_sample();
        let cpu_pct = match (&cpu, &now_cpu) {
            (Some(a), Some(b)) => Some(telemetry::cpu_percent(a, b)),
            _ => None,
        };
        cpu = now_cpu;
        let mut body = match control.status().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "telemetry not gathered");
                continue;
            }
        };
        let state_dir = control.state().config.state_dir;
        if let Value::Object(m) = &mut body {
            m.remove("status");
            m.insert("ts_ms".into(), crate::store::now_ms().into());
            m.insert("rss_bytes".into(), telemetry::rss_bytes().into());
            m.insert("cpu_percent".into(), cpu_pct.into());
            m.insert(
                "disk_free_bytes".into(),
                telemetry::disk_free_bytes(&state_dir).into(),
            );
        }
        let topic = outbox.topics().telemetry();
        if let Err(e) = outbox
            .send(control.store(), "telemetry", Class::Telemetry, topic, body)
            .await
        {
            tracing::error!(error = %e, "telemetry not queued");
        }
    }
}
