//! Real MQTT peers for the fleet tests: a mosquitto process (stoppable and restartable on the
//! same port, optionally with TLS and persistence) or an embedded rumqttd broker, and a small
//! rumqttc-based client that records what it receives.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use crate::free_port;
use crate::{Context, Result, bail, need, wait_for};

fn wait_port(port: u16, up: bool) -> Result<()> {
    let what = format!("port {port} to {}", if up { "open" } else { "close" });
    wait_for(&what, Duration::from_secs(10), || {
        (TcpStream::connect(("127.0.0.1", port)).is_ok() == up).then_some(())
    })
}

pub enum Kind {
    Mosquitto,
    Embedded,
    /// A node of an ejabberd cluster ([`crate::ejabberd`]), which the cluster stops.
    Ejabberd,
}

/// A broker for one test.
pub struct Broker {
    pub kind: Kind,
    pub port: u16,
    /// The MQTT 5 port (the same as `port` for mosquitto).
    pub port_v5: u16,
    /// mosquitto's TLS listener, when asked for (test clients use the plain `port`).
    pub tls_port: Option<u16>,
    /// mosquitto's password-checked listener, when asked for.
    pub auth_port: Option<u16>,
    /// The username and password every client gives (ejabberd takes no anonymous MQTT).
    pub login: Option<(String, String)>,
    conf: Option<PathBuf>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

/// Extra mosquitto settings.
#[derive(Default)]
pub struct MosquittoOptions {
    /// Keep sessions and queued messages across restarts (in the broker's temp dir).
    pub persistent: bool,
    /// A TLS listener besides the plain one: (ca, cert, key, require client certificates).
    pub tls: Option<(PathBuf, PathBuf, PathBuf, bool)>,
    /// A listener that takes only the logins in this mosquitto_passwd file.
    pub password_file: Option<PathBuf>,
    /// Publish the `$SYS/broker/...` counters this often (seconds; mosquitto's default 10).
    pub sys_interval: Option<u32>,
}

impl Broker {
    /// A mosquitto process on a free port; None (SKIPPED) without mosquitto.
    pub fn mosquitto() -> Result<Option<Broker>> {
        Broker::mosquitto_with(MosquittoOptions::default())
    }

    pub fn mosquitto_with(o: MosquittoOptions) -> Result<Option<Broker>> {
        if !need("mosquitto") {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let port = free_port();
        // Listener settings are per listener, so a password-checked listener can sit beside
        // the anonymous one the test's own clients use.
        let mut conf = format!(
            "per_listener_settings true\nuser root\nset_tcp_nodelay true\n\
             max_queued_messages 0\nmax_inflight_messages 0\nlog_dest stderr\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n"
        );
        if let Some(n) = o.sys_interval {
            conf += &format!("sys_interval {n}\n");
        }
        if o.persistent {
            conf += &format!(
                "persistence true\npersistence_location {}/\nautosave_interval 0\n",
                dir.path().display()
            );
        }
        let tls_port = o.tls.as_ref().map(|_| free_port());
        if let (Some((ca, cert, key, require)), Some(tp)) = (&o.tls, tls_port) {
            conf += &format!(
                "listener {tp} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require}\n",
                ca.display(),
                cert.display(),
                key.display()
            );
        }
        let auth_port = o.password_file.as_ref().map(|_| free_port());
        if let (Some(pw), Some(ap)) = (&o.password_file, auth_port) {
            conf += &format!(
                "listener {ap} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
                pw.display()
            );
        }
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf)?;
        let mut b = Broker {
            kind: Kind::Mosquitto,
            port,
            port_v5: port,
            tls_port,
            auth_port,
            login: None,
            conf: Some(path),
            child: None,
            _dir: Some(dir),
        };
        b.start()?;
        Ok(Some(b))
    }

    /// A mosquitto someone else started on `port` (a README line the test runs), once it
    /// accepts connections; the test's clients connect to it, nothing here stops it.
    pub fn started_elsewhere(port: u16) -> Result<Broker> {
        wait_port(port, true)?;
        Ok(Broker {
            kind: Kind::Mosquitto,
            port,
            port_v5: port,
            tls_port: None,
            auth_port: None,
            login: None,
            conf: None,
            child: None,
            _dir: None,
        })
    }

    /// rumqttd inside this test process: MQTT 3.1.1 on `port`, MQTT 5 on `port_v5`. It has no
    /// shutdown API, so it lives until the test process ends.
    pub fn embedded() -> Result<Broker> {
        let (port, port_v5) = (free_port(), free_port());
        let text = format!(
            r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 2097152
    max_inflight_count = 500
    dynamic_filters = true

[v5.1]
name = "v5"
listen = "127.0.0.1:{port_v5}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 2097152
    max_inflight_count = 500
"#
        );
        let config: rumqttd::Config = toml::from_str(&text).context("rumqttd config")?;
        std::thread::spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("embedded rumqttd stopped: {e}");
            }
        });
        wait_port(port, true)?;
        wait_port(port_v5, true)?;
        Ok(Broker {
            kind: Kind::Embedded,
            port,
            port_v5,
            tls_port: None,
            auth_port: None,
            login: None,
            conf: None,
            child: None,
            _dir: None,
        })
    }

    /// A node of an ejabberd cluster on `port` (MQTT 3.1.1 and 5 alike), once it accepts
    /// connections.
    pub(crate) fn ejabberd_node(port: u16, login: (String, String)) -> Result<Broker> {
        wait_port(port, true)?;
        Ok(Broker {
            kind: Kind::Ejabberd,
            port,
            port_v5: port,
            tls_port: None,
            auth_port: None,
            login: Some(login),
            conf: None,
            child: None,
            _dir: None,
        })
    }

    /// The broker's process, when this harness started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Mosquitto => "mosquitto",
            Kind::Embedded => "rumqttd",
            Kind::Ejabberd => "ejabberd",
        }
    }

    pub fn url(&self, v5: bool) -> String {
        format!(
            "mqtt://127.0.0.1:{}",
            if v5 { self.port_v5 } else { self.port }
        )
    }

    /// (Re)start a stopped mosquitto on the same port.
    pub fn start(&mut self) -> Result<()> {
        let conf = self
            .conf
            .as_ref()
            .context("only mosquitto can be restarted")?;
        // Its log (`log_dest stderr`) is kept and printed if the test fails.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(conf.with_extension("log"))?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning mosquitto")?;
        self.child = Some(child);
        for p in [self.tls_port, self.auth_port].into_iter().flatten() {
            wait_port(p, true)?;
        }
        wait_port(self.port, true)
    }

    /// Stop mosquitto as an operator would (SIGTERM: it saves persistent state) and wait
    /// until the port is closed.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
            c.wait()?;
        }
        wait_port(self.port, false)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking()
            && let Some(conf) = &self.conf
        {
            let log = std::fs::read_to_string(conf.with_extension("log")).unwrap_or_default();
            eprintln!("---- mosquitto log ({}) ----\n{log}", conf.display());
        }
    }
}

fn nodelay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// A message a test client received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub correlation: Option<Vec<u8>>,
}

impl Msg {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

enum Handle {
    V4(rumqttc::Client),
    V5(rumqttc::v5::Client),
}

/// A test client: subscribes, publishes, and queues every message it receives.
pub struct Client {
    handle: Handle,
    rx: mpsc::Receiver<Msg>,
    /// Messages received but not yet taken by a `recv_*` call.
    pending: VecDeque<Msg>,
}

pub struct ClientOptions<'a> {
    pub v5: bool,
    pub id: &'a str,
    pub subscribe: &'a [&'a str],
    /// Keep the session across disconnects (and broker restarts, with persistence).
    pub persistent: bool,
}

impl Client {
    pub fn connect(broker: &Broker, o: ClientOptions<'_>) -> Result<Client> {
        let (tx, rx) = mpsc::channel();
        let (ack_tx, ack_rx) = mpsc::channel::<()>();
        let handle = if o.v5 {
            let mut opts = rumqttc::v5::MqttOptions::new(o.id, "127.0.0.1", broker.port_v5);
            opts.set_keep_alive(Duration::from_secs(5))
                .set_clean_start(!o.persistent)
                .set_max_packet_size(Some(64 * 1024 * 1024));
            if let Some((u, p)) = &broker.login {
                opts.set_credentials(u, p);
            }
            if o.persistent {
                opts.set_session_expiry_interval(Some(3600));
            }
            opts.set_network_options(nodelay());
            let (client, mut conn) = rumqttc::v5::Client::new(opts, 10_000);
            let subs: Vec<String> = o.subscribe.iter().map(|s| s.to_string()).collect();
            let c2 = client.clone();
            std::thread::spawn(move || {
                use rumqttc::v5::mqttbytes::v5::Packet;
                for ev in conn.iter() {
                    match ev {
                        Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(_))) => {
                            for s in &subs {
                                let _ = c2.subscribe(s, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
                            }
                        }
                        Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                            let _ = ack_tx.send(());
                        }
                        Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                            let correlation = p
                                .properties
                                .as_ref()
                                .and_then(|pr| pr.correlation_data.as_ref())
                                .map(|b| b.to_vec());
                            let m = Msg {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                                correlation,
                            };
                            if tx.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            });
            Handle::V5(client)
        } else {
            let mut opts = rumqttc::MqttOptions::new(o.id, "127.0.0.1", broker.port);
            opts.set_keep_alive(Duration::from_secs(5))
                .set_clean_session(!o.persistent)
                .set_max_packet_size(64 * 1024 * 1024, 64 * 1024 * 1024);
            if let Some((u, p)) = &broker.login {
                opts.set_credentials(u, p);
            }
            let (client, mut conn) = rumqttc::Client::new(opts, 10_000);
            conn.eventloop.set_network_options(nodelay());
            let subs: Vec<String> = o.subscribe.iter().map(|s| s.to_string()).collect();
            let c2 = client.clone();
            std::thread::spawn(move || {
                use rumqttc::Packet;
                for ev in conn.iter() {
                    match ev {
                        Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                            for s in &subs {
                                let _ = c2.subscribe(s, rumqttc::QoS::AtLeastOnce);
                            }
                        }
                        Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                            let _ = ack_tx.send(());
                        }
                        Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                            let m = Msg {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                                correlation: None,
                            };
                            if tx.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            });
            Handle::V4(client)
        };
        for s in o.subscribe {
            ack_rx
                .recv_timeout(Duration::from_secs(10))
                .with_context(|| {
                    format!("{} did not acknowledge subscribing to {s}", broker.name())
                })?;
        }
        Ok(Client {
            handle,
            rx,
            pending: VecDeque::new(),
        })
    }

    /// Publish at QoS 1; with `response` (MQTT 5 only) as response topic and correlation data.
    pub fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        response: Option<(&str, &[u8])>,
    ) -> Result<()> {
        match &self.handle {
            Handle::V4(c) => {
                if response.is_some() {
                    bail!("MQTT 3.1.1 has no response topic");
                }
                c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_vec())?;
            }
            Handle::V5(c) => {
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                match response {
                    Some((t, corr)) => {
                        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                            response_topic: Some(t.to_string()),
                            correlation_data: Some(corr.to_vec().into()),
                            ..Default::default()
                        };
                        c.publish_with_properties(topic, qos, false, payload.to_vec(), props)?;
                    }
                    None => c.publish(topic, qos, false, payload.to_vec())?,
                }
            }
        }
        Ok(())
    }

    /// Publish retained at QoS 1 (an empty payload clears the topic).
    pub fn publish_retained(&self, topic: &str, payload: &[u8]) -> Result<()> {
        match &self.handle {
            Handle::V4(c) => {
                c.publish(topic, rumqttc::QoS::AtLeastOnce, true, payload.to_vec())?;
            }
            Handle::V5(c) => c.publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                payload.to_vec(),
            )?,
        }
        Ok(())
    }

    /// Wait until the broker has handled everything this client published so far: publish a
    /// marker on `topic` (which this client must be subscribed to) and wait for it to come
    /// back; a broker handles one client's messages in order.
    pub fn sync(&mut self, topic: &str) -> Result<()> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let marker = format!(
            "sync-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.publish(topic, marker.as_bytes(), None)?;
        self.recv_match("the sync marker", Duration::from_secs(60), |m| {
            m.topic == topic && m.payload == marker.as_bytes()
        })
        .map(drop)
    }

    /// The first message (received now or later) for which `pred` holds, before `timeout`.
    /// Messages that do not match stay queued for later calls.
    pub fn recv_match(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Msg) -> bool,
    ) -> Result<Msg> {
        if let Some(i) = self.pending.iter().position(&pred) {
            return Ok(self.pending.remove(i).expect("index is in range"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) if pred(&m) => return Ok(m),
                Ok(m) => self.pending.push_back(m),
                Err(_) => bail!(
                    "timed out after {timeout:?} waiting for {what}; received meanwhile: {:?}",
                    self.pending
                        .iter()
                        .rev()
                        .take(5)
                        .map(|m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload)))
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    /// The next message on `topic`.
    pub fn recv_on(&mut self, topic: &str, timeout: Duration) -> Result<Msg> {
        self.recv_match(topic, timeout, |m| m.topic == topic)
    }

    /// Everything received so far, without waiting.
    pub fn drain(&mut self) -> Vec<Msg> {
        let mut out: Vec<Msg> = self.pending.drain(..).collect();
        out.extend(self.rx.try_iter());
        out
    }

    /// Block up to `timeout` for the next message of any kind.
    pub fn recv_any(&mut self, timeout: Duration) -> Option<Msg> {
        if let Some(m) = self.pending.pop_front() {
            return Some(m);
        }
        self.rx.recv_timeout(timeout).ok()
    }
}

/// Write a test CA and a server and client certificate signed by it, with the openssl CLI.
/// Returns (ca, server cert, server key, client cert, client key).
pub fn make_certs(dir: &Path) -> Result<[PathBuf; 5]> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    // A new P-256 key and a request for it (self-signed with `-x509`).
    let new_key = |x509: bool, key: &str, out: &str, subject: &str| {
        let mut args = vec!["req"];
        if x509 {
            args.extend(["-x509", "-days", "2"]);
        }
        args.extend([
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ]);
        args.extend(["-keyout", key, "-out", out, "-subj", subject]);
        run(&args)
    };
    new_key(true, "ca.key", "ca.pem", "/CN=tern test CA")?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )?;
    for name in ["server", "client"] {
        new_key(
            false,
            &format!("{name}.key"),
            &format!("{name}.csr"),
            &format!("/CN={name}"),
        )?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ])?;
    }
    Ok([
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ]
    .map(|f| dir.join(f)))
}
