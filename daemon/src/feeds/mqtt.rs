//! An MQTT topic as a feed: images or JSON readings that other devices on the site publish,
//! on the fleet broker or a local one. Its own connection (MQTT 3.1.1, clean session), so a
//! busy feed never delays fleet commands, and the fleet link's outbox is not involved.
//!
//! Payloads: PNG/JPEG bytes become images; a JSON object is a reading of the feed's fields; a
//! JSON array is a tensor. What does not parse is counted and skipped. A lost connection is
//! retried with back-off, and the subscription is made again on every connection.

use rumqttc::{Event, Incoming, QoS};

use super::queue::Sender;
use super::serial::json_reading;
use super::{Data, Ended, FeedCtx, Sample};
use crate::config::{MqttFeedConfig, PayloadFormat};
use crate::engine::Input;

pub struct MqttFeed {
    pub cfg: MqttFeedConfig,
}

impl super::Source for MqttFeed {
    /// One connection, from connect to its loss.
    async fn once(&self, ctx: &FeedCtx, tx: &Sender) -> Ended {
        let c = &self.cfg;
        // One connection per pipeline reading the feed: brokers disconnect a client whose id
        // another connection takes.
        let id = format!("{}-{}", c.client_id, ctx.pipeline);
        let tls = match &c.tls {
            None => None,
            Some(t) => match crate::tls::client_config(t) {
                Ok(cfg) => Some(cfg),
                Err((k, e)) => return Ended::Failed(format!("TLS {k}: {e}")),
            },
        };
        // MQTT 3.1.1 cannot tell the broker our limit, and rumqttc ends the connection on a
        // packet over its own: the relay empties messages over max_payload_bytes (plus room
        // for the topic) instead, so one retained message cannot keep the feed down.
        let limit = c.max_payload_bytes + 64 * 1024 + 4;
        let relay = match crate::relay::Relay::start(
            crate::relay::Upstream {
                host: c.host.clone(),
                port: c.port,
                tls,
            },
            limit,
        ) {
            Ok(r) => r,
            Err(e) => return Ended::Failed(format!("starting the MQTT relay: {e}")),
        };
        let mut o = rumqttc::MqttOptions::new(id, relay.path(), 0);
        o.set_keep_alive(std::time::Duration::from_secs(30))
            .set_clean_session(true)
            .set_transport(rumqttc::Transport::Unix)
            .set_max_packet_size(limit + 128 * 1024, 64 * 1024);
        if let Some((u, p)) = &c.credentials {
            o.set_credentials(u, p);
        }
        let (client, mut events) = rumqttc::AsyncClient::new(o, 16);
        events.set_network_options(crate::relay::Relay::network_options());
        let broker = format!("{}:{}", c.host, c.port);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    // Readings missed while disconnected: a window starts over. Before the
                    // subscription, since a broker may send retained messages ahead of SUBACK.
                    if tx
                        .send(Sample::new(c.topic.clone(), Data::Restart))
                        .await
                        .is_err()
                    {
                        return Ended::Stop;
                    }
                    // Clean sessions: the broker forgot the subscription with the last one.
                    if let Err(e) = client.try_subscribe(&c.topic, QoS::AtLeastOnce) {
                        return Ended::Failed(format!("subscribing to `{}`: {e}", c.topic));
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|r| matches!(r, rumqttc::SubscribeReasonCode::Failure))
                    {
                        return Ended::Failed(format!(
                            "broker {broker} refused the subscription to `{}`",
                            c.topic
                        ));
                    }
                    tracing::info!(pipeline = %ctx.pipeline, topic = %c.topic, %broker, "subscribed");
                    ctx.running();
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    if p.payload.is_empty()
                        && let Some(size) = relay.take_dropped(&p.topic)
                    {
                        ctx.garbage(&format!(
                            "message on `{}`: about {size} bytes is over max_payload_bytes ({}); dropped unread",
                            p.topic, c.max_payload_bytes
                        ));
                        continue;
                    }
                    if p.payload.len() > c.max_payload_bytes {
                        ctx.garbage(&format!(
                            "message on `{}`: {} bytes is over max_payload_bytes ({})",
                            p.topic,
                            p.payload.len(),
                            c.max_payload_bytes
                        ));
                        continue;
                    }
                    let data = match parse(&p.payload, c.format, &c.fields) {
                        Ok(d) => d,
                        Err(why) => {
                            ctx.garbage(&format!("message on `{}`: {why}", p.topic));
                            continue;
                        }
                    };
                    if tx.send(Sample::new(p.topic.clone(), data)).await.is_err() {
                        let _ = client.try_disconnect();
                        return Ended::Stop;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let why = relay
                        .upstream_error()
                        .unwrap_or_else(|| format!("broker {broker}: {e}"));
                    return Ended::Failed(why);
                }
            }
        }
    }
}

/// What one message holds, by the feed's format.
pub(crate) fn parse(
    payload: &[u8],
    format: PayloadFormat,
    fields: &[String],
) -> Result<Data, String> {
    let pcm = match format {
        PayloadFormat::S16le => Some(crate::engine::Pcm::S16le),
        PayloadFormat::F32le => Some(crate::engine::Pcm::F32le),
        _ => None,
    };
    if let Some(pcm) = pcm {
        // Each message is whole samples: a stray byte would shift every sample after it.
        let mut rest = Vec::new();
        let samples = crate::engine::pcm_stream(payload, pcm, &mut rest);
        if !rest.is_empty() || samples.is_empty() {
            return Err(format!(
                "{} bytes is not a whole number of {pcm:?} samples",
                payload.len()
            ));
        }
        return Ok(Data::Pcm(samples));
    }
    let first = payload.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let json = match format {
        PayloadFormat::S16le | PayloadFormat::F32le => unreachable!("taken above"),
        PayloadFormat::Image => false,
        PayloadFormat::Json => true,
        PayloadFormat::Auto => matches!(first, Some(b'{' | b'[')),
    };
    if !json {
        if payload.is_empty() {
            return Err("empty".into());
        }
        return Ok(Data::Input(Ok(Input::Encoded(payload.to_vec()))));
    }
    match first {
        Some(b'{') if fields.is_empty() => {
            Err("a JSON reading, but the feed names no `fields`".into())
        }
        Some(b'{') => json_reading(payload, fields).map(Data::Reading),
        _ => Input::from_json(payload)
            .map(|i| Data::Input(Ok(i)))
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_told_apart_by_format() {
        let f = vec!["x".to_string()];
        assert!(matches!(
            parse(b"\x89PNG....", PayloadFormat::Auto, &f),
            Ok(Data::Input(Ok(Input::Encoded(_))))
        ));
        assert!(matches!(
            parse(br#" {"x": 2}"#, PayloadFormat::Auto, &f),
            Ok(Data::Reading(v)) if v == [2.0]
        ));
        assert!(matches!(
            parse(b"[[1, 2]]", PayloadFormat::Json, &f),
            Ok(Data::Input(Ok(Input::Tensor { .. })))
        ));
        assert!(parse(b"not json", PayloadFormat::Json, &f).is_err());
        assert!(parse(br#"{"x": 1}"#, PayloadFormat::Auto, &[]).is_err());
        assert!(parse(b"", PayloadFormat::Image, &f).is_err());
        assert!(matches!(
            parse(&[0, 64, 0, 192], PayloadFormat::S16le, &[]),
            Ok(Data::Pcm(v)) if v == [0.5, -0.5]
        ));
        assert!(parse(&[0, 64, 0], PayloadFormat::S16le, &[]).is_err());
        assert!(parse(&[], PayloadFormat::F32le, &[]).is_err());
    }
}
