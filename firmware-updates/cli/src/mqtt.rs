//! `publish` and `status`: the rollout over MQTT.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{Value, json};
use tern_update::artifact::BundleFile;
use tern_update::bundle::{self, Signed};
use tern_update::command::{self, SigningKey};
use tern_update::topics::{DeviceTopic, Topics};
use tokio::sync::mpsc;

use crate::BrokerArgs;

pub struct PublishArgs {
    pub broker: BrokerArgs,
    pub group: Option<String>,
    pub device: Option<String>,
    pub canary: Option<usize>,
    pub abort_above: f64,
    pub wait: Duration,
    pub command_key: Option<SigningKey>,
    pub bundle: PathBuf,
}

/// A connection to the broker (to each node given, for a cluster that keeps retained
/// messages per node): messages delivered to us, and a count of PUBACKs.
pub(crate) struct Conn {
    /// The first node's client carries commands; the others only retained messages.
    clients: Vec<AsyncClient>,
    pub(crate) messages: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    acked: Arc<AtomicU64>,
    sent: u64,
    /// Why a node's connection ended, once it did.
    gone: Arc<std::sync::Mutex<Option<String>>>,
    /// Whether retained messages are published and read through every node: the nodes do
    /// not share them.
    spread: bool,
}

/// How to reach the broker, for MQTT 3.1.1 and 5 clients alike: host, port, the TLS
/// transport (for `mqtts://`) and the login.
pub(crate) struct Reach {
    pub host: String,
    pub port: u16,
    pub tls: Option<rumqttc::Transport>,
    pub login: Option<(String, String)>,
}

pub(crate) fn reach(b: &BrokerArgs, url: &str) -> anyhow::Result<Reach> {
    let (host, port, tls) = ternd::config::parse_broker(url).map_err(anyhow::Error::msg)?;
    let tls = if tls {
        let t = ternd::config::TlsConfig {
            ca_file: b.ca_file.clone(),
            client: None,
        };
        let c = ternd::tls::client_config(&t).map_err(|(k, e)| anyhow::anyhow!("{k}: {e}"))?;
        Some(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(c),
        ))
    } else {
        None
    };
    let login = match &b.username {
        Some(u) => {
            let p = match &b.password_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                None => String::new(),
            };
            Some((u.clone(), p))
        }
        None => None,
    };
    Ok(Reach {
        host,
        port,
        tls,
        login,
    })
}

/// What an event loop does with a connection error: the one waiting for the connection is
/// told why, or, once connected, the loss is said.
pub(crate) fn lost(
    ready_tx: &mut Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    e: String,
) {
    match ready_tx.take() {
        Some(r) => {
            let _ = r.send(Err(e));
        }
        None => eprintln!("tern-update: broker connection lost: {e}"),
    }
}

/// Wait for a connection's event loop to say it is ready (or why not).
pub(crate) async fn ready(
    broker: &str,
    ready: tokio::sync::oneshot::Receiver<Result<(), String>>,
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(15), ready)
        .await
        .map_err(|_| anyhow::anyhow!("{broker}: no answer within 15 s"))?
        .map_err(|_| anyhow::anyhow!("{broker}: connection closed"))?
        .map_err(|e| anyhow::anyhow!("{broker}: {e}"))
}

/// How long a node has to deliver the retained probe another node took.
const PROBE_WAIT: Duration = Duration::from_secs(3);

pub(crate) async fn connect(b: &BrokerArgs) -> anyhow::Result<Conn> {
    let (tx, messages) = mpsc::unbounded_channel();
    let acked = Arc::new(AtomicU64::new(0));
    let gone = Arc::new(std::sync::Mutex::new(None));
    // One node lost ends every node's loop, so the message channel closes and whoever reads
    // it learns the connection is gone (each loop holds a sender).
    let lost_any = Arc::new(tokio::sync::watch::channel(false).0);
    let mut clients = Vec::new();
    for (n, url) in b.broker.iter().enumerate() {
        clients.push(connect_node(b, url, n, &tx, &acked, &gone, &lost_any).await?);
    }
    drop(tx);
    let mut conn = Conn {
        clients,
        messages,
        acked,
        sent: 0,
        gone,
        spread: false,
    };
    if b.broker.len() > 1 {
        let apart = conn.probe_retained(&b.prefix).await?;
        for n in &apart {
            eprintln!(
                "tern-update: {} does not deliver a retained message published through {} \
                 within {PROBE_WAIT:?}: this broker keeps retained messages per node, so \
                 tern-update publishes and reads them through every node given",
                b.broker[*n],
                b.primary()
            );
        }
        conn.spread = !apart.is_empty();
        if !conn.spread {
            // The nodes share retained messages: the first carries everything.
            for c in conn.clients.drain(1..) {
                let _ = c.disconnect().await;
            }
        }
    }
    Ok(conn)
}

async fn connect_node(
    b: &BrokerArgs,
    url: &str,
    n: usize,
    tx: &mpsc::UnboundedSender<(String, Vec<u8>)>,
    acked: &Arc<AtomicU64>,
    gone: &Arc<std::sync::Mutex<Option<String>>>,
    lost_any: &Arc<tokio::sync::watch::Sender<bool>>,
) -> anyhow::Result<AsyncClient> {
    let r = reach(b, url)?;
    let mut o = MqttOptions::new(
        format!("tern-update-{}-{n}", std::process::id()),
        r.host,
        r.port,
    );
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024)
        .set_inflight(64);
    if let Some(t) = r.tls {
        o.set_transport(t);
    }
    if let Some((u, p)) = r.login {
        o.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(o, 256);
    let (ready_tx, ready) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let (count, tx, gone, url_) = (acked.clone(), tx.clone(), gone.clone(), url.to_string());
    let (lost_any, mut other_lost) = (lost_any.clone(), lost_any.subscribe());
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        loop {
            let ev = tokio::select! {
                ev = el.poll() => ev,
                _ = other_lost.wait_for(|l| *l) => return,
            };
            match ev {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(_))) => {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let _ = tx.send((p.topic, p.payload.to_vec()));
                }
                // Our own DISCONNECT: the end of a clean session, not a lost connection.
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    *gone.lock().expect("not poisoned") = Some(format!("{url_}: {e}"));
                    lost(&mut ready_tx, e.to_string());
                    lost_any.send_replace(true);
                    return;
                }
            }
        }
    });
    self::ready(url, ready).await?;
    Ok(client)
}

impl Conn {
    /// The nodes a message goes through: every node for what concerns retained messages
    /// when they keep them apart, else the first.
    fn through(&self, retained: bool) -> &[AsyncClient] {
        match retained && self.spread {
            true => &self.clients,
            false => &self.clients[..1],
        }
    }

    /// Publish at QoS 1. A retained message goes through every node when they keep retained
    /// messages apart; anything else through the first.
    pub(crate) async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> anyhow::Result<()> {
        // Clients are handles on their event loops: cheap to clone, and the loop below counts
        // into `self`.
        for c in self.through(retain).to_vec() {
            if let Err(e) = c
                .publish(topic, QoS::AtLeastOnce, retain, payload.clone())
                .await
            {
                // The event loop ended: why it did says more than the closed request queue.
                return Err(self
                    .ended()
                    .unwrap_or_else(|| anyhow::anyhow!("publishing to {topic}: {e}")));
            }
            self.sent += 1;
        }
        Ok(())
    }

    /// Why a node's connection ended, said for the operator, once one did.
    fn ended(&self) -> Option<anyhow::Error> {
        let e = self.gone.lock().expect("not poisoned").clone()?;
        Some(anyhow::anyhow!(
            "the broker connection ended with {} of {} messages acknowledged ({e}); a broker \
             that limits message size closes the connection on a larger one, which may be why",
            self.acked.load(Ordering::SeqCst),
            self.sent
        ))
    }

    /// Subscribe at QoS 1: through every node when they keep retained messages apart (what
    /// they hold is read from each; live messages then come once per node).
    pub(crate) async fn subscribe(&self, filter: &str) -> anyhow::Result<()> {
        for c in self.through(true) {
            c.subscribe(filter, QoS::AtLeastOnce)
                .await
                .with_context(|| format!("subscribing to {filter}"))?;
        }
        Ok(())
    }

    pub(crate) async fn unsubscribe(&self, filter: &str) -> anyhow::Result<()> {
        for c in self.through(true) {
            c.unsubscribe(filter)
                .await
                .with_context(|| format!("unsubscribing from {filter}"))?;
        }
        Ok(())
    }

    pub(crate) async fn disconnect(&self) {
        for c in &self.clients {
            let _ = c.disconnect().await;
        }
    }

    /// Wait until the broker acknowledged everything published so far.
    pub(crate) async fn settle(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while self.acked.load(Ordering::SeqCst) < self.sent {
            if let Some(e) = self.ended() {
                return Err(e);
            }
            if Instant::now() > deadline {
                bail!(
                    "the broker acknowledged {} of {} messages within {within:?}",
                    self.acked.load(Ordering::SeqCst),
                    self.sent
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Messages until `quiet` passes with none (retained messages arrive right after SUBACK).
    pub(crate) async fn gather(
        &mut self,
        quiet: Duration,
        max: Duration,
    ) -> Vec<(String, Vec<u8>)> {
        let end = Instant::now() + max;
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(
            quiet.min(end.saturating_duration_since(Instant::now())),
            self.messages.recv(),
        )
        .await
        {
            out.push(m);
        }
        out
    }

    /// Which nodes (by index) do not deliver a retained message published through the first:
    /// one probe topic per node, retained through the first node, then subscribed to through
    /// its node (again every 500 ms, for a cluster that shares them a little late). The
    /// probes are cleared through every node, whatever happened.
    async fn probe_retained(&mut self, prefix: &str) -> anyhow::Result<Vec<usize>> {
        let nonce = command::new_id("probe");
        let topic = |n: usize| format!("{prefix}/fleet/probe/{nonce}/{n}");
        let nodes = self.clients.len();
        let seen = self.probe_rounds(&topic).await;
        for n in 1..nodes {
            let _ = self.clients[n].unsubscribe(topic(n)).await;
            for c in &self.clients {
                c.publish(topic(n), QoS::AtLeastOnce, true, Vec::new())
                    .await?;
                self.sent += 1;
            }
        }
        self.settle(Duration::from_secs(15)).await?;
        let seen = seen?;
        Ok((0..nodes).filter(|n| !seen[*n]).collect())
    }

    async fn probe_rounds(
        &mut self,
        topic: &impl Fn(usize) -> String,
    ) -> anyhow::Result<Vec<bool>> {
        let nodes = self.clients.len();
        for n in 1..nodes {
            self.publish(&topic(n), b"probe".to_vec(), true).await?;
        }
        self.settle(Duration::from_secs(15)).await?;
        let mut seen = vec![false; nodes];
        seen[0] = true;
        let deadline = Instant::now() + PROBE_WAIT;
        while seen.contains(&false) && Instant::now() < deadline {
            for n in (1..nodes).filter(|n| !seen[*n]) {
                let _ = self.clients[n].unsubscribe(topic(n)).await;
                self.clients[n]
                    .subscribe(topic(n), QoS::AtLeastOnce)
                    .await?;
            }
            let round = (Instant::now() + Duration::from_millis(500)).min(deadline);
            while let Ok(Some((t, p))) = tokio::time::timeout(
                round.saturating_duration_since(Instant::now()),
                self.messages.recv(),
            )
            .await
            {
                if let Some(n) = (1..nodes).find(|n| t == topic(*n))
                    && !p.is_empty()
                {
                    seen[n] = true;
                }
            }
        }
        Ok(seen)
    }
}

/// A bundle file and its signed part, as publish and withdraw both read it.
pub(crate) fn open_bundle(path: &std::path::Path) -> anyhow::Result<(BundleFile, Signed)> {
    let b = BundleFile::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let signed: Signed = serde_json::from_value(b.manifest.signed.clone())
        .with_context(|| format!("{}: manifest", path.display()))?;
    Ok((b, signed))
}

/// `group:<name>` for a group, else the device id: what [`Topics::manifest`] takes.
fn target(group: &Option<String>, device: &Option<String>) -> anyhow::Result<String> {
    Ok(match (group, device) {
        (Some(g), _) => format!("group:{g}"),
        (None, Some(d)) => d.clone(),
        (None, None) => bail!("give --group or --device"),
    })
}

/// A bundle fit to publish to `group` or `devices`: signed, by keys that verify, not expired,
/// and targeted so those boxes would take it. What every box would refuse is not worth a
/// broker's storage: said before a byte goes.
pub(crate) fn checked_bundle(
    path: &std::path::Path,
    group: Option<&str>,
    devices: &[String],
) -> anyhow::Result<(BundleFile, Signed)> {
    let (b, signed) = open_bundle(path)?;
    let shown = path.display();
    if b.manifest.signatures.is_empty() {
        bail!("{shown} is not signed; `tern-update sign` it first");
    }
    bundle::check_own_signatures(&b.manifest)
        .map_err(|e| anyhow::anyhow!("{shown}: {e}; every box would refuse it"))?;
    let now = super::now();
    if signed.expires <= now {
        bail!(
            "{shown}: the manifest expired {} s ago; make the bundle again (a box refuses it as expired)",
            now - signed.expires
        );
    }
    let t = &signed.targets;
    if let Some(g) = group
        && !t.groups.is_empty()
        && !t.groups.iter().any(|x| x == g)
    {
        bail!(
            "{shown} is signed for group(s) {:?}, not `{g}`: its boxes would refuse it as wrong_target",
            t.groups
        );
    }
    if let Some(d) = devices
        .iter()
        .find(|d| !t.devices.is_empty() && !t.devices.contains(d))
    {
        bail!(
            "{shown} is signed for device(s) {:?}, not `{d}`: it would refuse it as wrong_target",
            t.devices
        );
    }
    Ok((b, signed))
}

/// Every chunk of the bundle at `path`, retained, checked against its manifest first; the
/// broker has them all when this returns.
pub(crate) async fn publish_chunks(
    conn: &mut Conn,
    topics: &Topics,
    path: &std::path::Path,
    want_sha: &str,
) -> anyhow::Result<()> {
    let (b, signed) = open_bundle(path)?;
    let art = &signed.artifact;
    if art.sha256 != want_sha {
        bail!(
            "{}: its artifact is {}, not {want_sha}",
            path.display(),
            art.sha256
        );
    }
    let mut bytes = Vec::new();
    b.artifact()?.read_to_end(&mut bytes)?;
    let started = Instant::now();
    for (i, c) in bytes.chunks(art.chunk_size as usize).enumerate() {
        art.check_chunk(i, c).with_context(|| {
            format!("{}: the bundle does not match its manifest", path.display())
        })?;
        let topic = topics.chunk(&art.sha256, i);
        conn.publish(&topic, bundle::chunk_message(&art.sha256, i, c), true)
            .await?;
    }
    conn.settle(Duration::from_secs(300)).await?;
    let took = started.elapsed();
    eprintln!(
        "chunks: {} × {} bytes retained under {} in {:.2} s ({:.1} MiB/s)",
        art.chunks.len(),
        art.chunk_size,
        topics.artifacts(&art.sha256),
        took.as_secs_f64(),
        art.size as f64 / 1048576.0 / took.as_secs_f64().max(1e-9)
    );
    Ok(())
}

pub async fn publish(a: PublishArgs) -> anyhow::Result<ExitCode> {
    let devices: Vec<String> = a.device.iter().cloned().collect();
    let (b, signed) = checked_bundle(&a.bundle, a.group.as_deref(), &devices)?;
    let art = &signed.artifact;
    let topics = Topics::new(&a.broker.prefix);
    let mut conn = connect(&a.broker).await?;
    publish_chunks(&mut conn, &topics, &a.bundle, &art.sha256).await?;
    let manifest = b.manifest_bytes.clone();
    let topic_for = |target: &str| topics.manifest(target, &signed.name);
    let target = target(&a.group, &a.device)?;
    if let (Some(n), Some(group)) = (a.canary, &a.group) {
        let ok = canary(&mut conn, &a, &signed, &manifest, group, n, &topic_for).await?;
        if !ok {
            return Ok(ExitCode::FAILURE);
        }
    }
    let topic = topic_for(&target);
    conn.publish(&topic, manifest, true).await?;
    conn.settle(Duration::from_secs(30)).await?;
    println!(
        "published {} {} to {topic} ({} bytes, {} chunks)",
        signed.name,
        signed.version,
        art.size,
        art.chunks.len()
    );
    conn.disconnect().await;
    Ok(ExitCode::SUCCESS)
}

/// Online members of `group`, from the retained births on every box's state topic.
async fn members(
    conn: &mut Conn,
    topics: &Topics,
    group: &str,
) -> anyhow::Result<BTreeMap<String, bool>> {
    conn.subscribe(&topics.all_states()).await?;
    let mut out = BTreeMap::new();
    for (_, payload) in conn
        .gather(Duration::from_millis(700), Duration::from_secs(5))
        .await
    {
        let Ok(v) = serde_json::from_slice::<Value>(&payload) else {
            continue;
        };
        let Some(dev) = v.get("device").and_then(Value::as_str) else {
            continue;
        };
        let online = v.get("state").and_then(Value::as_str) == Some("online");
        let in_group = v
            .get("groups")
            .and_then(Value::as_array)
            .is_some_and(|g| g.iter().any(|x| x.as_str() == Some(group)));
        if in_group {
            out.insert(dev.to_string(), online);
        } else if !online {
            // An offline message carries no groups: keep what the birth said.
            if let Some(o) = out.get_mut(dev) {
                *o = false;
            }
        }
    }
    Ok(out)
}

/// Send to `n` canaries, wait for them, and say whether the rollout may go on. On abort the
/// canaries' manifests are withdrawn and those that committed are rolled back.
async fn canary(
    conn: &mut Conn,
    a: &PublishArgs,
    signed: &Signed,
    manifest: &[u8],
    group: &str,
    n: usize,
    topic_for: &dyn Fn(&str) -> String,
) -> anyhow::Result<bool> {
    let topics = Topics::new(&a.broker.prefix);
    let manifest_sha = tern_update::sha256_hex(manifest);
    let all = members(conn, &topics, group).await?;
    let canaries: Vec<String> = all
        .iter()
        .filter(|(_, on)| **on)
        .map(|(d, _)| d.clone())
        .take(n)
        .collect();
    if canaries.is_empty() {
        bail!(
            "no online device of group `{group}` announced itself on {}",
            topics.all_states()
        );
    }
    eprintln!("canaries: {}", canaries.join(", "));
    conn.subscribe(&topics.update_status("+", &signed.name))
        .await?;
    for d in &canaries {
        conn.publish(&topic_for(d), manifest.to_vec(), true).await?;
    }
    conn.settle(Duration::from_secs(30)).await?;
    let mut outcome: BTreeMap<String, Value> = BTreeMap::new();
    let deadline = Instant::now() + a.wait;
    while outcome.len() < canaries.len() && Instant::now() < deadline {
        let Ok(Some((topic, payload))) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            conn.messages.recv(),
        )
        .await
        else {
            break;
        };
        let Ok(v) = serde_json::from_slice::<Value>(&payload) else {
            continue;
        };
        let Some((dev, DeviceTopic::UpdateStatus(_))) = topics.parse_device(&topic) else {
            continue;
        };
        let dev = dev.as_str();
        // This very manifest: a retained status of an older update (even of the same
        // version) says nothing about this one.
        if !canaries.iter().any(|c| c == dev)
            || v.get("manifest_sha256").and_then(Value::as_str) != Some(manifest_sha.as_str())
        {
            continue;
        }
        let state = v.get("state").and_then(Value::as_str).unwrap_or("");
        eprintln!(
            "  {dev}: {state} {}",
            v.get("percent")
                .map(|p| format!("{p}%"))
                .unwrap_or_default()
        );
        if matches!(state, "committed" | "failed" | "rolled_back" | "refused") {
            outcome.insert(dev.to_string(), v);
        }
    }
    let failed: Vec<&String> = canaries
        .iter()
        .filter(|d| outcome.get(*d).and_then(|v| v["state"].as_str()) != Some("committed"))
        .collect();
    let share = failed.len() as f64 * 100.0 / canaries.len() as f64;
    for d in &canaries {
        let v = outcome.get(d);
        println!(
            "{d:<24} {:<12} {}",
            v.and_then(|v| v["state"].as_str()).unwrap_or("no answer"),
            v.and_then(|v| v["reason"].as_str()).unwrap_or("")
        );
    }
    // The canaries' own manifests go either way: on success the group's takes over.
    for d in &canaries {
        conn.publish(&topic_for(d), Vec::new(), true).await?;
    }
    if share <= a.abort_above {
        eprintln!(
            "canaries: {:.0}% failed (limit {}%): rolling out to group {group}",
            share, a.abort_above
        );
        return Ok(true);
    }
    eprintln!(
        "canaries: {:.0}% failed, above {}%: rollout stopped",
        share, a.abort_above
    );
    let mut unrolled = Vec::new();
    for d in &canaries {
        if outcome.get(d).and_then(|v| v["state"].as_str()) != Some("committed") {
            continue;
        }
        // A broker error on one canary's rollback is that canary's outcome: the others are
        // still rolled back.
        let rolled = roll_back(conn, a.command_key.as_ref(), &topics, d, &signed.name)
            .await
            .unwrap_or_else(|e| Err(format!("broker: {e:#}")));
        match rolled {
            Ok(result) => eprintln!(
                "  {d}: rolled back from {} to {}",
                plain(&result["from"]),
                plain(&result["active"])
            ),
            Err(why) => {
                eprintln!("  {d}: NOT rolled back: {why}");
                unrolled.push(d.clone());
            }
        }
    }
    if !unrolled.is_empty() {
        eprintln!(
            "canaries still on {} {}: {} (roll them back with a signed `models.rollback`)",
            signed.name,
            signed.version,
            unrolled.join(", ")
        );
    }
    Ok(false)
}

pub(crate) fn plain(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// How long a box has to answer the abort's rollback.
const ROLLBACK_REPLY: Duration = Duration::from_secs(30);

/// Send `models.rollback` for `model` to `device` and read its reply: the result, or why it
/// did not roll back. Each id is random, so nobody can claim it first; `busy` is retried (with
/// a new id, which the box treats alike), every other refusal is final.
pub(crate) async fn roll_back(
    conn: &mut Conn,
    key: Option<&SigningKey>,
    topics: &Topics,
    device: &str,
    model: &str,
) -> anyhow::Result<Result<Value, String>> {
    let box_topics = tern_update::topics::Device::new(topics.prefix(), device, &[]);
    let mut last = String::new();
    for _ in 0..3 {
        let id = command::new_id("rollout-abort");
        let reply_topic = box_topics.reply(&id);
        // The broker takes a client's packets in order: the subscription is in place before
        // the command can be answered.
        conn.subscribe(reply_topic.as_str()).await?;
        let args = json!({ "name": model });
        let body = match key {
            Some(k) => command::sign(k, "models.rollback", device, &id, args, super::now()),
            None => json!({"id": id, "args": args}),
        };
        conn.publish(
            &topics.command(device, "models.rollback"),
            body.to_string().into_bytes(),
            false,
        )
        .await?;
        let deadline = Instant::now() + ROLLBACK_REPLY;
        let reply = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, conn.messages.recv()).await {
                Ok(Some((t, payload))) if t == reply_topic => {
                    break serde_json::from_slice::<Value>(&payload).ok();
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break None,
            }
        };
        let _ = conn.unsubscribe(reply_topic.as_str()).await;
        let Some(reply) = reply else {
            return Ok(Err(format!(
                "no reply to `models.rollback` (id {id}) within {ROLLBACK_REPLY:?}"
            )));
        };
        if reply["ok"] == true {
            return Ok(Ok(reply["result"].clone()));
        }
        let code = plain(&reply["error"]["code"]);
        last = format!("{code}: {}", plain(&reply["error"]["message"]));
        // `busy` is a moment (a reload, a full queue) and releases the id. Anything else,
        // `conflict` included, is the box's answer: a second rollback could swap back.
        if code != "busy" {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(Err(last))
}

/// Publish the signed time, once or every `every`.
pub async fn time(
    b: BrokerArgs,
    keys: Vec<SigningKey>,
    every: Option<Duration>,
) -> anyhow::Result<()> {
    let topic = Topics::new(&b.prefix).time();
    let mut conn = connect(&b).await?;
    let keys = keys.iter().collect::<Vec<_>>();
    loop {
        let t = crate::now();
        let m = bundle::sign_time(&bundle::TimeDoc { time: t }, &keys);
        conn.publish(&topic, serde_json::to_vec(&m)?, true).await?;
        conn.settle(Duration::from_secs(30)).await?;
        println!("time {t} published on {topic}");
        let Some(every) = every else { break };
        tokio::time::sleep(every).await;
    }
    conn.disconnect().await;
    Ok(())
}

/// Clear a bundle's retained manifest and chunks.
pub async fn withdraw(
    b: BrokerArgs,
    group: Option<String>,
    device: Option<String>,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let (_, signed) = open_bundle(path)?;
    let topics = Topics::new(&b.prefix);
    let topic = topics.manifest(&target(&group, &device)?, &signed.name);
    let mut conn = connect(&b).await?;
    conn.publish(&topic, Vec::new(), true).await?;
    let a = &signed.artifact;
    for i in 0..a.chunks.len() {
        conn.publish(&topics.chunk(&a.sha256, i), Vec::new(), true)
            .await?;
    }
    conn.settle(Duration::from_secs(60)).await?;
    println!(
        "withdrawn: {topic} and {} chunks under {}",
        a.chunks.len(),
        topics.artifacts(&a.sha256)
    );
    conn.disconnect().await;
    Ok(())
}

/// A bundle's update as `status --bundle` follows it: its model and the digest its statuses
/// carry.
struct Followed {
    model: String,
    manifest_sha: String,
}

/// Print the group's update statuses; with a bundle, only that update's, until every online
/// member has an outcome for it.
pub async fn status(
    b: BrokerArgs,
    group: &str,
    once: bool,
    bundle: Option<&std::path::Path>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let followed = match bundle {
        Some(path) => {
            let (file, signed) = open_bundle(path)?;
            Some(Followed {
                model: signed.name,
                manifest_sha: tern_update::sha256_hex(&file.manifest_bytes),
            })
        }
        None => None,
    };
    let topics = Topics::new(&b.prefix);
    let mut conn = connect(&b).await?;
    let mut groups: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    let mut updates: BTreeMap<(String, String), Value> = BTreeMap::new();
    conn.subscribe(&topics.all_states()).await?;
    conn.subscribe(&topics.update_status("+", "+")).await?;
    let take = |groups: &mut BTreeMap<String, (bool, bool)>,
                updates: &mut BTreeMap<(String, String), Value>,
                topic: &str,
                payload: &[u8]| {
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let Some((dev, what)) = topics.parse_device(topic) else {
            return;
        };
        match what {
            DeviceTopic::State => {
                let online = v["state"] == "online";
                let e = groups.entry(dev).or_insert((false, false));
                e.0 = online;
                if let Some(g) = v["groups"].as_array() {
                    e.1 = g.iter().any(|x| x.as_str() == Some(group));
                }
            }
            DeviceTopic::UpdateStatus(model) => {
                updates.insert((dev, model), v);
            }
            DeviceTopic::Telemetry => {}
        }
    };
    loop {
        for (t, p) in conn
            .gather(Duration::from_millis(500), Duration::from_secs(3))
            .await
        {
            take(&mut groups, &mut updates, &t, &p);
        }
        let rows: Vec<Value> = groups
            .iter()
            .filter(|(_, (_, member))| *member)
            .flat_map(|(dev, (online, _))| {
                let mine: Vec<&Value> = updates
                    .iter()
                    .filter(|((d, model), v)| {
                        d == dev
                            && followed.as_ref().is_none_or(|f| {
                                *model == f.model
                                    && v["manifest_sha256"].as_str() == Some(&f.manifest_sha)
                            })
                    })
                    .map(|(_, v)| v)
                    .collect();
                if mine.is_empty() {
                    vec![json!({"device": dev, "online": online})]
                } else {
                    mine.into_iter()
                        .map(|v| {
                            let mut r = v.clone();
                            r["online"] = (*online).into();
                            r
                        })
                        .collect()
                }
            })
            .collect();
        if as_json {
            println!("{}", Value::Array(rows.clone()));
        } else {
            println!(
                "{:<20} {:<7} {:<18} {:<10} {:<13} {:>5}  reason",
                "device", "online", "model", "version", "state", "%"
            );
            for r in &rows {
                println!(
                    "{:<20} {:<7} {:<18} {:<10} {:<13} {:>5}  {}",
                    r["device"].as_str().unwrap_or(""),
                    r["online"],
                    r["model"].as_str().unwrap_or("-"),
                    r["version"].as_str().unwrap_or("-"),
                    r["state"].as_str().unwrap_or("-"),
                    // Before a download starts there is no percentage yet.
                    r["percent"]
                        .as_u64()
                        .map_or_else(|| "-".to_string(), |p| p.to_string()),
                    r["reason"].as_str().unwrap_or("")
                );
            }
        }
        if once {
            conn.disconnect().await;
            return Ok(ExitCode::SUCCESS);
        }
        if followed.is_some() {
            let online: Vec<&Value> = rows.iter().filter(|r| r["online"] == true).collect();
            let done = |r: &&Value| {
                matches!(
                    r["state"].as_str(),
                    Some("committed" | "failed" | "rolled_back" | "refused")
                )
            };
            if !online.is_empty() && online.iter().all(done) {
                conn.disconnect().await;
                let all_committed = online.iter().all(|r| r["state"] == "committed");
                // 65, as `ternd install` says a refused or failed update; 1 is an error here.
                return Ok(if all_committed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(65)
                });
            }
        }
        match conn.messages.recv().await {
            Some((t, p)) => take(&mut groups, &mut updates, &t, &p),
            None => bail!("broker connection lost"),
        }
    }
}
