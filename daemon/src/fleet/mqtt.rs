//! One face over rumqttc's MQTT 3.1.1 and MQTT 5 clients, so the fleet link is written once.
//!
//! Beyond hiding the two type families this tracks which of *our* publishes got which packet
//! id, so that a PUBACK can be matched to the outbox row it acknowledges. rumqttc reports a
//! publish's packet id only as an `Outgoing::Publish(pkid)` event when it writes it, in the
//! order requests were queued; [`Link`] keeps a FIFO of what was queued and pops it on each
//! such event. Sessions are clean (a broker keeps nothing for us between connections; the
//! outbox is our memory), and every connection gets a fresh rumqttc client and event loop:
//! nothing (queued requests, buffered events, packet ids, a pending collision) carries over
//! from one connection to the next, so the FIFO can never be shifted by a leftover.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::config::{FleetConfig, Protocol};

/// What a publish was, so its acknowledgement can be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// A reply, a presence message: nobody waits for its PUBACK.
    Plain,
    /// An outbox row.
    Row(i64),
    /// A retained message cleared (an empty payload), by its sender's token: forgotten only
    /// once the broker has it.
    Clear(u64),
}

/// A message the broker delivered to us.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 request/response properties.
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
}

/// What one poll of the event loop produced, reduced to what the link acts on.
#[derive(Debug)]
pub enum Event {
    Connected,
    Message(Message),
    /// The broker acknowledged an outbox row (or refused it with a reason code).
    Acked(i64, Option<String>),
    /// The broker acknowledged a clear sent with [`Link::clear_retained`].
    Cleared(u64),
    /// Our DISCONNECT went out: the session is over.
    Disconnected,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Not connected, or not the connection the caller started on: the outbox sends it
    /// again from the start of the next connection.
    Offline,
    /// rumqttc's request queue is full: try again after some acknowledgements.
    Full,
    /// A topic no broker accepts (empty, or with a wildcard): retrying cannot help.
    BadTopic,
    /// Larger than the broker's maximum packet size (MQTT 5 CONNACK): retrying cannot help.
    TooLarge(usize),
}

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

struct Track {
    /// The current connection's client; replaced together with the event loop.
    client: Client,
    connected: bool,
    /// Connections made so far; a new value means everything unacknowledged must go again.
    epoch: u64,
    /// The broker's maximum packet size, if it said (MQTT 5); a larger publish would make
    /// rumqttc drop the connection.
    max_packet: Option<usize>,
    queued: VecDeque<Tag>,
    in_flight: HashMap<u16, Tag>,
}

/// The sending half; cheap to clone, safe to use from any task.
#[derive(Clone)]
pub struct Link {
    track: Arc<Mutex<Track>>,
}

/// The receiving half: poll it from one task, always, or keep-alive stops.
pub struct Session {
    event_loop: Loop,
    track: Arc<Mutex<Track>>,
    fresh: Box<dyn Fn() -> (Client, Loop) + Send>,
    /// 3.1.1 only: the local relay rumqttc connects through.
    relay: Option<Arc<crate::relay::Relay>>,
}

/// rumqttc's request queue; our own window of rows in flight stays well below it.
const REQUEST_CAPACITY: usize = 512;
/// Publishes rumqttc may have unacknowledged at once (MQTT "receive maximum").
pub const MAX_INFLIGHT: u16 = 256;
/// Largest packet we send; replies and rows are capped well below it where they are made.
const MAX_OUTGOING: usize = 16 * 1024 * 1024;

pub fn connect(
    cfg: &FleetConfig,
    will_topic: &str,
    will_payload: &[u8],
    max_incoming: usize,
) -> Result<(Link, Session), String> {
    let tls = match &cfg.tls {
        None => None,
        Some(t) => Some(crate::tls::client_config(t).map_err(|(k, e)| format!("fleet.{k}: {e}"))?),
    };
    let max_packet = max_incoming + 64 * 1024;
    let mut relay = None;
    let fresh: Box<dyn Fn() -> (Client, Loop) + Send> = match cfg.protocol {
        Protocol::V311 => {
            // 3.1.1 cannot tell the broker our limit: the relay drops what is over it.
            let r = crate::relay::Relay::start(
                crate::relay::Upstream {
                    host: cfg.host.clone(),
                    port: cfg.port,
                    tls,
                },
                max_packet,
            )
            .map_err(|e| format!("starting the MQTT relay: {e}"))?;
            let mut o = rumqttc::MqttOptions::new(&cfg.client_id, r.path(), 0);
            relay = Some(Arc::new(r));
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_session(true)
                .set_transport(rumqttc::Transport::Unix)
                .set_inflight(MAX_INFLIGHT)
                .set_request_channel_capacity(REQUEST_CAPACITY)
                // Our own messages are bounded where they are made (replies, rows); what
                // comes in is bounded by the relay, with room for a topic above its limit.
                .set_max_packet_size(max_packet + 128 * 1024, MAX_OUTGOING)
                .set_last_will(rumqttc::LastWill::new(
                    will_topic,
                    will_payload.to_vec(),
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            if let Some((u, p)) = &cfg.credentials {
                o.set_credentials(u, p);
            }
            Box::new(move || {
                let (c, mut l) = rumqttc::AsyncClient::new(o.clone(), REQUEST_CAPACITY);
                l.set_network_options(crate::relay::Relay::network_options());
                (Client::V4(c), Loop::V4(Box::new(l)))
            })
        }
        Protocol::V5 => {
            let transport = match tls {
                None => rumqttc::Transport::Tcp,
                Some(c) => {
                    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(c))
                }
            };
            let mut o = rumqttc::v5::MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_start(true)
                .set_transport(transport)
                .set_outgoing_inflight_upper_limit(MAX_INFLIGHT)
                .set_request_channel_capacity(REQUEST_CAPACITY)
                // MQTT 5 tells the broker, which then never sends us anything larger.
                .set_max_packet_size(Some(max_packet as u32))
                .set_network_options(network_options())
                .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    will_topic,
                    will_payload.to_vec(),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    None,
                ));
            if let Some((u, p)) = &cfg.credentials {
                o.set_credentials(u, p);
            }
            Box::new(move || {
                let (c, l) = rumqttc::v5::AsyncClient::new(o.clone(), REQUEST_CAPACITY);
                (Client::V5(c), Loop::V5(Box::new(l)))
            })
        }
    };
    let (client, event_loop) = fresh();
    let track = Arc::new(Mutex::new(Track {
        client,
        connected: false,
        epoch: 0,
        max_packet: None,
        queued: VecDeque::new(),
        in_flight: HashMap::new(),
    }));
    Ok((
        Link {
            track: track.clone(),
        },
        Session {
            event_loop,
            track,
            fresh,
            relay,
        },
    ))
}

/// No Nagle: a reply written right after the PUBACK of its command would otherwise wait for
/// the broker's delayed ACK (40 ms on Linux) before leaving.
fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n.set_connection_timeout(10);
    n
}

impl Link {
    /// Queue a QoS 1 publish nobody waits on (a reply, presence). `correlation` is MQTT 5
    /// correlation data (ignored on 3.1.1).
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        correlation: Option<Bytes>,
    ) -> Result<(), SendError> {
        self.publish_on(None, topic, payload, retain, Tag::Plain, correlation)
    }

    /// Queue an outbox row, but only on connection `epoch`: after a reconnect the caller must
    /// start over from the oldest row, not carry on where it was.
    pub fn publish_row(
        &self,
        epoch: u64,
        topic: &str,
        payload: Vec<u8>,
        id: i64,
        retain: bool,
    ) -> Result<(), SendError> {
        self.publish_on(Some(epoch), topic, payload, retain, Tag::Row(id), None)
    }

    /// Clear a retained message (an empty retained payload) on connection `epoch`; its
    /// PUBACK comes back as [`Event::Cleared`] with `token`.
    pub fn clear_retained(&self, epoch: u64, topic: &str, token: u64) -> Result<(), SendError> {
        self.publish_on(
            Some(epoch),
            topic,
            Vec::new(),
            true,
            Tag::Clear(token),
            None,
        )
    }

    fn publish_on(
        &self,
        epoch: Option<u64>,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        tag: Tag,
        correlation: Option<Bytes>,
    ) -> Result<(), SendError> {
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return Err(SendError::BadTopic);
        }
        let mut t = self.track.lock().expect("link lock");
        if !t.connected || epoch.is_some_and(|e| e != t.epoch) {
            return Err(SendError::Offline);
        }
        // Fixed header, topic and properties are well under 1 KiB for our topics.
        if let Some(max) = t.max_packet
            && payload.len() + topic.len() + 1024 > max
        {
            return Err(SendError::TooLarge(max));
        }
        let sent = match &t.client {
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                match correlation {
                    Some(data) => {
                        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                            correlation_data: Some(data),
                            ..Default::default()
                        };
                        c.try_publish_with_properties(topic, qos, retain, payload, props)
                    }
                    None => c.try_publish(topic, qos, retain, payload),
                }
                .map_err(|e| e.to_string())
            }
        };
        match sent {
            Ok(()) => {
                t.queued.push_back(tag);
                Ok(())
            }
            Err(_) => Err(SendError::Full),
        }
    }

    pub fn subscribe(&self, filter: &str) -> Result<(), String> {
        match &self.track.lock().expect("link lock").client {
            Client::V4(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    pub fn unsubscribe(&self, filter: &str) -> Result<(), String> {
        match &self.track.lock().expect("link lock").client {
            Client::V4(c) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
        }
    }

    /// Rows queued or in flight: the outbox keeps its window below a bound with this.
    pub fn rows_outstanding(&self) -> usize {
        let t = self.track.lock().expect("link lock");
        t.queued.iter().filter(|t| matches!(t, Tag::Row(_))).count()
            + t.in_flight
                .values()
                .filter(|t| matches!(t, Tag::Row(_)))
                .count()
    }

    pub fn is_connected(&self) -> bool {
        self.track.lock().expect("link lock").connected
    }

    /// The current connection's number (0 before the first); see [`Track::epoch`].
    pub fn epoch(&self) -> u64 {
        self.track.lock().expect("link lock").epoch
    }

    /// Ask for a clean DISCONNECT (which, unlike a dropped connection, fires no last will).
    /// Never waits: with rumqttc's queue full, the stop goes ahead and the broker fires the
    /// will instead.
    pub fn disconnect(&self) {
        let t = self.track.lock().expect("link lock");
        let _ = match &t.client {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

impl Session {
    /// If the empty message just delivered on `topic` is what the relay left of one over the
    /// size limit: its size.
    pub fn take_dropped(&self, topic: &str) -> Option<usize> {
        self.relay.as_ref().and_then(|r| r.take_dropped(topic))
    }

    /// The next event; on error the connection is gone and the next call reconnects.
    pub async fn poll(&mut self) -> Result<Event, String> {
        let ev = match &mut self.event_loop {
            // Through the relay, a broker that cannot be reached looks like a closed socket;
            // the relay knows why.
            Loop::V4(l) => l.poll().await.map(v4_event).map_err(|e| {
                match self.relay.as_ref().and_then(|r| r.upstream_error()) {
                    Some(why) => why,
                    None => e.to_string(),
                }
            }),
            Loop::V5(l) => l.poll().await.map(v5_event).map_err(|e| e.to_string()),
        };
        let mut t = self.track.lock().expect("link lock");
        tracing::trace!(event = ?ev.as_ref().map(|r| r.describe()), queued = ?t.queued, in_flight = ?t.in_flight, "mqtt event");
        match ev {
            Ok(Raw::ConnAck(max_packet)) => {
                t.max_packet = max_packet;
                // rumqttc drops its unsent queue on a clean session, so whatever we had queued
                // before is gone too.
                t.queued.clear();
                t.in_flight.clear();
                t.connected = true;
                t.epoch += 1;
                Ok(Event::Connected)
            }
            Ok(Raw::Sent(pkid)) => {
                if let Some(tag) = t.queued.pop_front()
                    && pkid != 0
                {
                    t.in_flight.insert(pkid, tag);
                }
                Ok(Event::Other)
            }
            Ok(Raw::Acked(pkid, refused)) => match t.in_flight.remove(&pkid) {
                Some(Tag::Row(id)) => Ok(Event::Acked(id, refused)),
                Some(Tag::Clear(token)) if refused.is_none() => Ok(Event::Cleared(token)),
                _ => Ok(Event::Other),
            },
            Ok(Raw::Message(m)) => Ok(Event::Message(m)),
            Ok(Raw::Disconnected) => {
                t.connected = false;
                Ok(Event::Disconnected)
            }
            Ok(Raw::Other) => Ok(Event::Other),
            Err(e) => {
                // The next attempt starts from nothing: a new client (whose channel nobody
                // has written to) and a new event loop (no buffered events, no packet ids).
                let (client, event_loop) = (self.fresh)();
                self.event_loop = event_loop;
                t.client = client;
                t.queued.clear();
                t.in_flight.clear();
                t.connected = false;
                Err(e)
            }
        }
    }
}

impl Raw {
    fn describe(&self) -> String {
        match self {
            Raw::ConnAck(m) => format!("connack max_packet={m:?}"),
            Raw::Sent(p) => format!("sent {p}"),
            Raw::Acked(p, r) => format!("acked {p} {r:?}"),
            Raw::Message(m) => format!("message {}", m.topic),
            Raw::Disconnected => "disconnected".into(),
            Raw::Other => "other".into(),
        }
    }
}

enum Raw {
    /// With the broker's maximum packet size, when it gives one.
    ConnAck(Option<usize>),
    Sent(u16),
    Acked(u16, Option<String>),
    Message(Message),
    Disconnected,
    Other,
}

fn v4_event(e: rumqttc::Event) -> Raw {
    use rumqttc::{Event as E, Outgoing, Packet};
    match e {
        E::Incoming(Packet::ConnAck(_)) => Raw::ConnAck(None),
        E::Incoming(Packet::PubAck(a)) => Raw::Acked(a.pkid, None),
        E::Incoming(Packet::Publish(p)) => Raw::Message(Message {
            topic: p.topic,
            payload: p.payload,
            response_topic: None,
            correlation: None,
        }),
        E::Outgoing(Outgoing::Publish(pkid)) => Raw::Sent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Raw::Disconnected,
        _ => Raw::Other,
    }
}

fn v5_event(e: rumqttc::v5::Event) -> Raw {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event as E;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    match e {
        E::Incoming(Packet::ConnAck(c)) => Raw::ConnAck(
            c.properties
                .and_then(|p| p.max_packet_size)
                .map(|m| m as usize),
        ),
        E::Incoming(Packet::PubAck(a)) => {
            let refused = match a.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                other => Some(format!("{other:?}")),
            };
            Raw::Acked(a.pkid, refused)
        }
        E::Incoming(Packet::Publish(p)) => {
            let (response_topic, correlation) = p
                .properties
                .map(|pr| (pr.response_topic, pr.correlation_data))
                .unwrap_or_default();
            Raw::Message(Message {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                response_topic,
                correlation,
            })
        }
        E::Outgoing(Outgoing::Publish(pkid)) => Raw::Sent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Raw::Disconnected,
        _ => Raw::Other,
    }
}

/// Jittered exponential back-off between reconnects: 0.5–1.5 × min(1 s × 2ⁿ, max).
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << attempt.min(16))
        .min(max);
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let jitter = 0.5 + u16::from_le_bytes(b) as f64 / u16::MAX as f64;
    base.mul_f64(jitter)
}
