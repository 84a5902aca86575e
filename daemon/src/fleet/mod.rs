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
//!  presence task ── retained birth on <base>/state on connect, on change, on announce
//!  telemetry task ── every N s a telemetry message through the outbox
//! ```
//!
//! Topics (prefix `tern` by default): `<prefix>/<device>/{state,telemetry,events,results/<p>,
//! cmd/<name>,reply/<id>,update/<model>,updates/<model>}`, `<prefix>/fleet/<group>/{cmd/<name>,
//! update/<model>}`, `<prefix>/fleet/{announce,keys}`, `<prefix>/artifacts/<sha256>/<index>`
//! (update delivery is described in `crate::update`).

pub mod commands;
pub mod mqtt;
pub mod telemetry;
pub mod tls;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::FleetConfig;
use crate::control::{CmdError, Code, Control};
use crate::outbox::{self, Class, Outbox};
use crate::update::{self, Updater};
use mqtt::{Event, Link};

/// Outbox rows queued or awaiting their PUBACK at once.
const WINDOW: usize = 128;
/// How long a graceful stop waits for the `offline` message and DISCONNECT to go out, and for
/// commands already running to finish.
const STOP_DEADLINE: Duration = Duration::from_secs(3);
/// Commands carried out at the same time.
const COMMANDS_AT_ONCE: usize = 4;
/// Replies larger than this are replaced by an error saying so (a broker may refuse them, and
/// a box should not flood its uplink answering one question).
pub const MAX_REPLY_BYTES: usize = 120 * 1024;

/// Topic names for one device.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
    pub device: String,
    pub base: String,
    pub groups: Vec<String>,
}

impl Topics {
    pub fn new(cfg: &FleetConfig) -> Topics {
        Topics {
            prefix: cfg.prefix.clone(),
            device: cfg.device.clone(),
            base: format!("{}/{}", cfg.prefix, cfg.device),
            groups: cfg.groups.clone(),
        }
    }

    pub fn state(&self) -> String {
        format!("{}/state", self.base)
    }

    pub fn announce(&self) -> String {
        format!("{}/fleet/announce", self.prefix)
    }

    pub fn reply(&self, id: &str) -> String {
        format!("{}/reply/{id}", self.base)
    }

    /// An MQTT 5 response topic the box will publish a reply on: anything outside tern's own
    /// topics, or this box's reply topics. A requester cannot make the box publish onto
    /// another box's command topics or its own state, events or results.
    fn may_answer_on(&self, topic: &str) -> bool {
        let ours = format!("{}/", self.prefix);
        !topic.starts_with(&ours) || topic.starts_with(&format!("{}/reply/", self.base))
    }

    fn keys(&self) -> String {
        format!("{}/fleet/keys", self.prefix)
    }

    fn filters(&self, updates: bool) -> Vec<String> {
        let mut f = Vec::new();
        if updates {
            // Keys first: the broker sends retained messages per subscription in order, and a
            // rotation must be in force before the manifests signed with the new keys arrive.
            f.push(self.keys());
        }
        f.extend([format!("{}/cmd/+", self.base), self.announce()]);
        for g in &self.groups {
            f.push(format!("{}/fleet/{g}/cmd/+", self.prefix));
        }
        if updates {
            f.push(format!("{}/update/+", self.base));
            for g in &self.groups {
                f.push(format!("{}/fleet/{g}/update/+", self.prefix));
            }
        }
        f
    }

    /// What a delivered topic is to us.
    fn route(&self, topic: &str) -> Route {
        if topic == self.announce() {
            return Route::Announce;
        }
        if let Some(name) = topic
            .strip_prefix(&self.base)
            .and_then(|t| t.strip_prefix("/cmd/"))
        {
            return Route::Command {
                name: name.to_string(),
                target: self.device.clone(),
            };
        }
        if let Some(rest) = topic
            .strip_prefix(&self.prefix)
            .and_then(|t| t.strip_prefix("/fleet/"))
            && let Some((group, name)) = rest.split_once("/cmd/")
            && self.groups.iter().any(|g| g == group)
        {
            return Route::Command {
                name: name.to_string(),
                target: format!("group:{group}"),
            };
        }
        if topic == self.keys() {
            return Route::Keys;
        }
        let manifest = topic
            .strip_prefix(&self.base)
            .and_then(|t| t.strip_prefix("/update/"))
            .is_some()
            || topic
                .strip_prefix(&self.prefix)
                .and_then(|t| t.strip_prefix("/fleet/"))
                .and_then(|r| r.split_once("/update/"))
                .is_some_and(|(g, _)| self.groups.iter().any(|x| x == g));
        if manifest {
            return Route::Manifest;
        }
        if let Some(rest) = topic
            .strip_prefix(&self.prefix)
            .and_then(|t| t.strip_prefix("/artifacts/"))
            && let Some((sha, index)) = rest.split_once('/')
            && let Ok(index) = index.parse::<usize>()
        {
            return Route::Chunk {
                sha256: sha.to_string(),
                index,
            };
        }
        Route::Other
    }
}

enum Route {
    Command { name: String, target: String },
    Announce,
    Manifest,
    Keys,
    Chunk { sha256: String, index: usize },
    Other,
}

/// A command waiting for the command task, with where its reply goes.
struct Queued {
    cmd: commands::Incoming,
    reply_to: Option<(String, Option<bytes::Bytes>)>,
}

/// The running fleet link.
pub struct Fleet {
    link: Link,
    topics: Topics,
    control: Control,
    session: JoinHandle<()>,
    commands: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    cancel: CancellationToken,
}

struct Shared {
    acks: Mutex<Vec<i64>>,
    /// Rows the broker refused (MQTT 5 reason codes), with the reason.
    refused: Mutex<Vec<(i64, String)>>,
    drain: Notify,
    presence: Notify,
}

pub fn spawn(
    cfg: &FleetConfig,
    control: Control,
    outbox: Outbox,
    updater: Option<Updater>,
) -> Result<Fleet, String> {
    let topics = Topics::new(cfg);
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
    )?;
    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared {
        acks: Mutex::new(Vec::new()),
        refused: Mutex::new(Vec::new()),
        drain: Notify::new(),
        presence: Notify::new(),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel::<Queued>(cfg.commands.queue.get());

    let session = tokio::spawn(session_task(
        session,
        link.clone(),
        topics.clone(),
        cfg.clone(),
        control.clone(),
        shared.clone(),
        cmd_tx,
        updater,
        cancel.clone(),
    ));
    let commands = tokio::spawn(command_task(
        link.clone(),
        topics.clone(),
        cfg.commands.clone(),
        control.clone(),
        cmd_rx,
        cancel.clone(),
    ));
    let tasks = vec![
        tokio::spawn(drain_task(
            link.clone(),
            control.clone(),
            outbox.clone(),
            shared.clone(),
            cancel.clone(),
        )),
        tokio::spawn(presence_task(
            link.clone(),
            topics.clone(),
            control.clone(),
            shared.clone(),
            cancel.clone(),
        )),
        tokio::spawn(telemetry_task(
            control.clone(),
            outbox,
            cfg.telemetry_every,
            cancel.clone(),
        )),
    ];
    Ok(Fleet {
        link,
        topics,
        control,
        session,
        commands,
        tasks,
        cancel,
    })
}

impl Fleet {
    /// Say `offline` (retained) and disconnect cleanly, so the broker does not fire the last
    /// will; then end every task.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
        if self.link.is_connected() {
            let msg = offline(&self.topics, true).to_string().into_bytes();
            let _ = self.link.publish(&self.topics.state(), msg, true, None);
            self.link.disconnect();
        }
        if tokio::time::timeout(STOP_DEADLINE, &mut self.session)
            .await
            .is_err()
        {
            self.session.abort();
            tracing::warn!("fleet link did not close within {STOP_DEADLINE:?}");
        }
        // The command task stopped taking commands at the cancel and now finishes what is
        // running. Cut short, a command's id stays claimed and never runs twice.
        if tokio::time::timeout(STOP_DEADLINE, &mut self.commands)
            .await
            .is_err()
        {
            self.commands.abort();
            tracing::warn!("commands still running after {STOP_DEADLINE:?} were stopped");
        }
        self.control.set_fleet(false, 0);
    }
}

fn offline(t: &Topics, graceful: bool) -> Value {
    json!({"state": "offline", "device": t.device, "graceful": graceful})
}

#[allow(clippy::too_many_arguments)]
async fn session_task(
    mut session: mqtt::Session,
    link: Link,
    topics: Topics,
    cfg: FleetConfig,
    control: Control,
    shared: Arc<Shared>,
    cmd_tx: mpsc::Sender<Queued>,
    updater: Option<Updater>,
    cancel: CancellationToken,
) {
    let mut failures = 0u32;
    let broker = format!("{}:{}", cfg.host, cfg.port);
    loop {
        match session.poll().await {
            Ok(Event::Connected) => {
                failures = 0;
                for f in topics.filters(updater.is_some()) {
                    if let Err(e) = link.subscribe(&f) {
                        tracing::error!(filter = %f, error = %e, "subscribe not queued");
                    }
                }
                tracing::info!(%broker, "fleet link connected");
                if let Some(u) = &updater {
                    u.offer(update::Input::Online(link.clone()));
                }
                shared.presence.notify_one();
                shared.drain.notify_one();
            }
            Ok(Event::Message(m)) => match topics.route(&m.topic) {
                Route::Announce => shared.presence.notify_one(),
                Route::Command { name, target } => {
                    let reply_to = m.response_topic.map(|t| (t, m.correlation));
                    let q = Queued {
                        cmd: commands::Incoming {
                            name,
                            target,
                            payload: m.payload,
                        },
                        reply_to,
                    };
                    if let Err(mpsc::error::TrySendError::Full(q)) = cmd_tx.try_send(q) {
                        let id = commands::peek_id(&q.cmd.payload, cfg.commands.max_payload_bytes);
                        let e = CmdError::new(
                            Code::Busy,
                            "too many commands waiting; try again with the same id",
                        );
                        let reply = commands::reply_err(id.as_deref(), &e);
                        send_reply(&link, &topics, id.as_deref(), q.reply_to, &reply);
                    }
                }
                Route::Manifest => {
                    if let Some(u) = &updater {
                        u.offer(update::Input::Manifest {
                            source: m.topic,
                            payload: m.payload,
                        });
                    }
                }
                Route::Keys => {
                    if let Some(u) = &updater {
                        u.offer(update::Input::Keys { payload: m.payload });
                    }
                }
                Route::Chunk { sha256, index } => {
                    if let Some(u) = &updater {
                        u.offer(update::Input::Chunk {
                            sha256,
                            index,
                            payload: m.payload,
                        });
                    }
                }
                Route::Other => {}
            },
            Ok(Event::Acked(id, refused)) => {
                match refused {
                    // Retrying a message the broker refuses (not authorised, over quota)
                    // would block every message behind it: it is dropped and reported.
                    Some(reason) => {
                        tracing::error!(row = id, %reason, "broker refused an outbox message; dropped");
                        let why = format!("refused by the broker: {reason}");
                        shared.refused.lock().expect("acks lock").push((id, why));
                    }
                    None => shared.acks.lock().expect("acks lock").push(id),
                }
                shared.drain.notify_one();
            }
            // Ours, at a stop. rumqttc also reports a protocol error this way; then the next
            // poll fails and reconnects.
            Ok(Event::Disconnected) if cancel.is_cancelled() => return,
            Ok(Event::Disconnected) => {}
            Ok(Event::Other) => {}
            Err(e) => {
                control.set_fleet(false, 0);
                if let Some(u) = &updater {
                    u.offer(update::Input::Offline);
                }
                if cancel.is_cancelled() {
                    return;
                }
                let delay = mqtt::backoff(failures, cfg.reconnect_max);
                if failures == 0 {
                    tracing::warn!(%broker, error = %e, retry_in = ?delay, "fleet link down");
                } else {
                    tracing::debug!(%broker, error = %e, retry_in = ?delay, "fleet link still down");
                }
                failures = failures.saturating_add(1);
                shared.drain.notify_one();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
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
    reply: &Value,
) {
    let (topic, correlation) = match reply_to {
        Some((t, c)) if topics.may_answer_on(&t) => (t, c),
        Some((t, _)) => {
            tracing::warn!(response_topic = %t, "a response topic inside tern's own topics is not answered on; replying on the reply topic");
            (topics.reply(id.unwrap_or("invalid")), None)
        }
        None => (topics.reply(id.unwrap_or("invalid")), None),
    };
    tracing::debug!(%topic, id = id.unwrap_or("-"), "reply");
    let mut payload = reply.to_string().into_bytes();
    if payload.len() > MAX_REPLY_BYTES {
        let e = CmdError::new(
            Code::Internal,
            format!(
                "the reply is {} bytes, over the {MAX_REPLY_BYTES}-byte limit; ask for less",
                payload.len()
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
            send_reply(&link, &topics, id.as_deref(), q.reply_to, &reply);
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
    loop {
        let asked = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.presence.notified() => true,
            _ = control.changed() => false,
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
        let state = control.state();
        let mut birth = json!({
            "state": "online",
            "device": topics.device,
            "groups": topics.groups,
            "version": crate::VERSION,
            "session": session,
            "models": control.active_models().await,
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

async fn drain_task(
    link: Link,
    control: Control,
    outbox: Outbox,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let store = control.store().clone();
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
        fill(&link, &store, epoch, &mut cursors).await;
    }
}

/// Publish outbox rows after `cursors` until the window is full, the outbox is empty, or the
/// connection `epoch` is gone.
async fn fill(link: &Link, store: &crate::store::Store, epoch: u64, cursors: &mut [i64; 2]) {
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
            match link.publish_row(epoch, &row.topic, row.payload, row.id) {
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
        let topic = format!("{}/telemetry", outbox.base);
        if let Err(e) = outbox
            .send(control.store(), "telemetry", Class::Telemetry, topic, body)
            .await
        {
            tracing::error!(error = %e, "telemetry not queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_device_group_and_announce_topics() {
        let t = Topics {
            prefix: "tern".into(),
            device: "b1".into(),
            base: "tern/b1".into(),
            groups: vec!["g".into()],
        };
        assert!(
            matches!(t.route("tern/b1/cmd/ping"), Route::Command { name, target } if name == "ping" && target == "b1")
        );
        assert!(
            matches!(t.route("tern/fleet/g/cmd/status"), Route::Command { name, target } if name == "status" && target == "group:g")
        );
        assert!(matches!(
            t.route("tern/fleet/other/cmd/status"),
            Route::Other
        ));
        assert!(matches!(t.route("tern/b2/cmd/ping"), Route::Other));
        assert!(matches!(t.route("tern/fleet/announce"), Route::Announce));
        assert!(t.may_answer_on("apps/dashboard/answers"));
        assert!(t.may_answer_on("tern/b1/reply/x"));
        assert!(!t.may_answer_on("tern/b2/cmd/models.rollback"));
        assert!(!t.may_answer_on("tern/b1/state"));
    }
}
