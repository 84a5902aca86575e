//! A relay on the box between rumqttc and an MQTT 3.1.1 broker that reads an oversized
//! PUBLISH past its payload instead of handing it on.
//!
//! MQTT 3.1.1 cannot tell a broker the largest packet a client takes, and rumqttc ends the
//! connection on any packet over its limit. A retained message over the limit on a
//! subscribed topic is then sent again on every reconnect, and the box never stays
//! connected. The relay forwards every packet byte for byte, except such a PUBLISH, which it
//! forwards with its flags, topic and packet id and an empty payload: rumqttc acknowledges it
//! as usual, so the broker does not send it again, and the reader can tell what it was from
//! [`Relay::take_dropped`]. Memory stays bounded: a dropped payload is read in 8 KiB pieces.
//! MQTT 5 needs none of this: the CONNECT's maximum packet size makes the broker drop it.
//!
//! rumqttc reaches the relay over a Unix socket in a private (0700) directory, and the relay
//! makes the TCP or TLS connection to the broker itself; one broker connection per accepted
//! connection, closed together.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Where the relay connects.
#[derive(Clone)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Dropped messages remembered for the reader; more are counted in the log only.
const DROPPED_KEPT: usize = 64;
/// Topics warned about by name; a flood of distinct topics does not flood the log.
const WARNED_TOPICS: usize = 256;
/// The broker connection (TCP and TLS). rumqttc must wait longer than this for its CONNACK
/// (see [`CLIENT_TIMEOUT_SECS`]), or it would give up on a connection the relay still makes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// rumqttc's connection timeout for a relayed connection.
pub const CLIENT_TIMEOUT_SECS: u64 = 20;

#[derive(Default)]
struct Notes {
    /// (topic, remaining length) of each dropped PUBLISH not yet taken, oldest first.
    dropped: VecDeque<(String, usize)>,
    warned: HashSet<String>,
    /// Why the last broker connection could not be made, for the reader's error.
    upstream_error: Option<String>,
}

pub struct Relay {
    _dir: tempfile::TempDir,
    path: PathBuf,
    notes: Arc<Mutex<Notes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which ends every relayed connection.
        self.task.abort();
    }
}

impl Relay {
    /// What rumqttc needs to connect through a relay: its timeout above the relay's own.
    pub fn network_options() -> rumqttc::NetworkOptions {
        let mut n = rumqttc::NetworkOptions::new();
        n.set_connection_timeout(CLIENT_TIMEOUT_SECS);
        n
    }

    /// Listen for rumqttc; a PUBLISH whose remaining length is over `limit` is dropped.
    /// Must be called within a tokio runtime.
    pub fn start(up: Upstream, limit: usize) -> io::Result<Relay> {
        let dir = tempfile::Builder::new().prefix("ternd-mqtt-").tempdir()?;
        let path = dir.path().join("broker.sock");
        let listener = UnixListener::bind(&path)?;
        let notes = Arc::new(Mutex::new(Notes::default()));
        let task = tokio::spawn(accept(listener, up, limit, notes.clone()));
        Ok(Relay {
            _dir: dir,
            path,
            notes,
            task,
        })
    }

    /// The socket path, as rumqttc's host with `Transport::Unix`.
    pub fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The size of the oldest dropped message on `topic` not yet taken, if the empty
    /// message the reader got on `topic` is one the relay emptied.
    pub fn take_dropped(&self, topic: &str) -> Option<usize> {
        let mut n = self.notes.lock().expect("relay lock");
        let i = n.dropped.iter().position(|(t, _)| t == topic)?;
        n.dropped.remove(i).map(|(_, size)| size)
    }

    /// Why the relay could not reach the broker the last time, if it could not.
    pub fn upstream_error(&self) -> Option<String> {
        self.notes
            .lock()
            .expect("relay lock")
            .upstream_error
            .clone()
    }
}

async fn accept(listener: UnixListener, up: Upstream, limit: usize, notes: Arc<Mutex<Notes>>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((sock, _)) => {
                    conns.spawn(serve(sock, up.clone(), limit, notes.clone()));
                }
                // Out of descriptors, say: the next connection may do better.
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn serve(client: UnixStream, up: Upstream, limit: usize, notes: Arc<Mutex<Notes>>) {
    let broker = format!("{}:{}", up.host, up.port);
    let result = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&up)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection timed out",
        )),
    };
    let upstream = match result {
        Ok(s) => {
            notes.lock().expect("relay lock").upstream_error = None;
            s
        }
        Err(e) => {
            notes.lock().expect("relay lock").upstream_error =
                Some(format!("broker {broker}: {e}"));
            return;
        }
    };
    let (mut cr, cw) = client.into_split();
    let (ur, mut uw) = tokio::io::split(upstream);
    let ended = tokio::select! {
        r = tokio::io::copy(&mut cr, &mut uw) => r.map(|_| ()),
        r = down(BufReader::new(ur), cw, limit, &notes) => r,
    };
    if let Err(e) = ended {
        tracing::debug!(%broker, error = %e, "mqtt relay: connection ended");
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(up: &Upstream) -> io::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect((up.host.as_str(), up.port)).await?;
    // A reply written right after the PUBACK of its command would otherwise wait for the
    // broker's delayed ACK.
    tcp.set_nodelay(true)?;
    match &up.tls {
        None => Ok(Box::new(tcp)),
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(up.host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await?;
            Ok(Box::new(tls))
        }
    }
}

/// Broker to client: packet by packet, emptying PUBLISHes over `limit`.
async fn down<R, W>(mut r: R, mut w: W, limit: usize, notes: &Mutex<Notes>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let first = match r.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let len = read_remaining_length(&mut r).await?;
        if first >> 4 != 3 || len <= limit {
            let mut head = vec![first];
            put_remaining_length(&mut head, len);
            w.write_all(&head).await?;
            expect_all(
                len,
                tokio::io::copy(&mut (&mut r).take(len as u64), &mut w).await?,
            )?;
            continue;
        }
        let qos = (first >> 1) & 3;
        let topic_len = r.read_u16().await? as usize;
        let mut topic = vec![0u8; topic_len];
        r.read_exact(&mut topic).await?;
        let pkid = if qos > 0 {
            Some(r.read_u16().await?)
        } else {
            None
        };
        let kept = 2 + topic_len + if pkid.is_some() { 2 } else { 0 };
        let rest = len.checked_sub(kept).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "PUBLISH shorter than its header",
            )
        })?;
        expect_all(
            rest,
            tokio::io::copy(&mut (&mut r).take(rest as u64), &mut tokio::io::sink()).await?,
        )?;
        let mut packet = vec![first];
        put_remaining_length(&mut packet, kept);
        packet.extend_from_slice(&(topic_len as u16).to_be_bytes());
        packet.extend_from_slice(&topic);
        if let Some(id) = pkid {
            packet.extend_from_slice(&id.to_be_bytes());
        }
        // Noted before the reader can see the emptied message.
        let topic = String::from_utf8_lossy(&topic).into_owned();
        {
            let mut n = notes.lock().expect("relay lock");
            if n.warned.len() < WARNED_TOPICS && n.warned.insert(topic.clone()) {
                tracing::warn!(%topic, bytes = len, limit, "dropped an MQTT message over the size limit (logged once per topic)");
                if n.warned.len() == WARNED_TOPICS {
                    tracing::warn!("oversized MQTT messages on further topics are not logged");
                }
            }
            if n.dropped.len() == DROPPED_KEPT {
                n.dropped.pop_front();
            }
            n.dropped.push_back((topic, len));
        }
        w.write_all(&packet).await?;
    }
}

fn expect_all(want: usize, got: u64) -> io::Result<()> {
    if got == want as u64 {
        Ok(())
    } else {
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

/// MQTT's variable-length integer: 7 bits per byte, at most four bytes.
async fn read_remaining_length<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<usize> {
    let mut value = 0usize;
    for i in 0..4 {
        let b = r.read_u8().await?;
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "malformed MQTT remaining length",
    ))
}

fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: u8, retain: bool, topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut p = vec![0x30 | (qos << 1) | retain as u8];
        put_remaining_length(&mut p, body.len());
        p.extend(body);
        p
    }

    async fn relay(input: Vec<u8>, limit: usize) -> (io::Result<()>, Vec<u8>, Notes) {
        let notes = Mutex::new(Notes::default());
        let mut out = Vec::new();
        let r = down(&input[..], &mut out, limit, &notes).await;
        (r, out, notes.into_inner().unwrap())
    }

    #[tokio::test]
    async fn packets_within_the_limit_pass_unchanged() {
        let mut input = publish(1, true, "a/b", 7, &[5; 300]);
        input.extend(publish(0, false, "c", 0, b"small"));
        input.extend([0xd0, 0x00]); // PINGRESP
        let (r, out, notes) = relay(input.clone(), 300 + 7).await;
        r.unwrap();
        assert_eq!(out, input);
        assert!(notes.dropped.is_empty());
    }

    #[tokio::test]
    async fn an_oversized_publish_keeps_its_header_and_loses_its_payload() {
        let big = vec![9u8; 200_000];
        let mut input = publish(1, true, "tern/x/cmd/status", 513, &big);
        input.extend(publish(0, false, "next", 0, b"ok"));
        let (r, out, mut notes) = relay(input, 1000).await;
        r.unwrap();
        let mut want = publish(1, true, "tern/x/cmd/status", 513, b"");
        want.extend(publish(0, false, "next", 0, b"ok"));
        assert_eq!(out, want);
        let size = 2 + "tern/x/cmd/status".len() + 2 + big.len();
        assert_eq!(
            notes.dropped.pop_front(),
            Some(("tern/x/cmd/status".into(), size))
        );
        // Remaining length needs three bytes above; QoS 0 has no packet id.
        let (r, out, _) = relay(publish(0, false, "t", 0, &big), 10).await;
        r.unwrap();
        assert_eq!(out, publish(0, false, "t", 0, b""));
    }

    #[tokio::test]
    async fn a_truncated_or_malformed_stream_is_an_error() {
        let p = publish(1, false, "t", 1, &[1; 5000]);
        for cut in [2, 10, p.len() - 1] {
            let (r, _, _) = relay(p[..cut].to_vec(), 100).await;
            assert!(r.is_err(), "cut at {cut}");
            let (r, _, _) = relay(p[..cut].to_vec(), 100_000).await;
            assert!(r.is_err(), "cut at {cut}, within the limit");
        }
        let (r, _, _) = relay(vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 10).await;
        assert!(r.is_err());
        // Remaining length 3 cannot hold a 2-byte topic length, 2-byte topic and packet id.
        let (r, _, _) = relay(vec![0x32, 0x03, 0x00, 0x02, b'a', b'b'], 2).await;
        assert!(r.is_err());
    }

    #[test]
    fn remaining_lengths_encode_as_mqtt_says() {
        for (n, want) in [
            (0usize, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
        ] {
            let mut v = Vec::new();
            put_remaining_length(&mut v, n);
            assert_eq!(v, want, "{n}");
        }
    }
}
