//! `cargo bench -p tern-tests --bench fleet` (needs mosquitto on PATH)
//!
//! In one run, against one local mosquitto:
//! 1. a raw rumqttc loop publishing N QoS 1 messages with nothing persisted, until every PUBACK
//!    is in (the baseline);
//! 2. tern's outbox: N result-sized messages, each committed in its own transaction (as a
//!    result is) while the fleet link drains them, until every row is acknowledged and deleted;
//!    the ratio to (1);
//! 3. `ping` round trips from an MQTT 5 client (response topic) to the box and back: p50, p99;
//! 4. the real `ternd` with 100,000 messages backlogged and no broker: its RSS, against the
//!    same daemon with an empty outbox; then the broker comes back, and the backlog drains:
//!    peak RSS and drain rate.
//!
//! Environment: `TERN_BENCH_MESSAGES` (default 20000), `TERN_BENCH_PINGS` (default 1000),
//! `TERN_BENCH_BACKLOG` (default 100000).

use std::time::{Duration, Instant};

use serde_json::json;
use tern_tests::mqtt::{Broker, Client, ClientOptions, free_port};
use tern_tests::{Daemon, NotifySocket, wait_for};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// A payload the size of a real result message.
fn result_body(i: usize) -> serde_json::Value {
    json!({
        "id": i, "pipeline": "bench", "source": format!("frame-{i:08}.png"), "ts_ms": 1_795_000_000_000u64 + i as u64,
        "model": "digits-cnn-int8", "version": "1.0.0",
        "top": [{"index": 7, "label": "7", "score": 0.94}, {"index": 9, "label": "9", "score": 0.05},
                {"index": 8, "label": "8", "score": 0.01}],
        "latency_us": 4200,
    })
}

fn raw_rumqttc(broker: &Broker, n: usize) -> Duration {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut o = rumqttc::v5::MqttOptions::new("bench-raw", "127.0.0.1", broker.port);
        o.set_outgoing_inflight_upper_limit(256);
        let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 512);
        let payload = serde_json::to_vec(&result_body(0)).unwrap();
        // Connect first, so the clock measures publishing only.
        loop {
            if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(
                _,
            ))) = el.poll().await
            {
                break;
            }
        }
        let start = Instant::now();
        let pub_task = tokio::spawn(async move {
            for _ in 0..n {
                client
                    .publish(
                        "bench/raw",
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                    )
                    .await
                    .unwrap();
            }
            client
        });
        let mut acks = 0;
        while acks < n {
            if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))) =
                el.poll().await
            {
                acks += 1;
            }
        }
        let elapsed = start.elapsed();
        drop(pub_task.await);
        elapsed
    })
}

/// The box's side in this process: store, outbox and fleet link, as `service` wires them.
struct InProcess {
    rt: tokio::runtime::Runtime,
    store: ternd::store::Store,
    outbox: ternd::outbox::Outbox,
    _fleet: ternd::fleet::Fleet,
    _tasks: ternd::tasks::Tasks,
    _dir: tempfile::TempDir,
}

fn in_process(broker: &Broker) -> InProcess {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("ternd.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "state_dir = \"state\"\n[fleet]\nbroker = \"{}\"\ndevice = \"bench\"\ntelemetry_secs = 3600\nresponse_topics = [\"bench/answers\"]\n[outbox]\nbudget_mib = 1024\n",
            broker.url(true)
        ),
    )
    .unwrap();
    let config = ternd::config::load(&cfg_path).unwrap();
    std::fs::create_dir_all(&config.state_dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = ternd::store::Store::open(&config.state_dir.join("tern.db")).unwrap();
    let outbox = ternd::outbox::Outbox::new(
        tern_update::topics::Device::new("tern", "bench", &[]),
        config.outbox.budget_bytes,
    );
    let registry = {
        let _g = rt.enter();
        ternd::registry::Registry::spawn(store.clone(), &config.state_dir)
    };
    let (reload_tx, _reload_rx) = tokio::sync::mpsc::channel(1);
    let fleet_cfg = config.fleet.clone().unwrap();
    let control = ternd::control::Control::new(
        ternd::control::Deps {
            registry,
            store: store.clone(),
            outbox: Some(outbox.clone()),
            events: Default::default(),
            service: reload_tx,
            log: Box::new(|_| Ok(())),
            updater: None,
        },
        ternd::control::DaemonState {
            config,
            pipelines: Vec::new(),
            summary: "bench".into(),
        },
    );
    // The link's tasks live as long as this set does.
    let mut tasks = ternd::tasks::Tasks::default();
    let fleet = {
        let _g = rt.enter();
        ternd::fleet::spawn(&fleet_cfg, control, outbox.clone(), None, &mut tasks).unwrap()
    };
    InProcess {
        rt,
        store,
        outbox,
        _fleet: fleet,
        _tasks: tasks,
        _dir: dir,
    }
}

fn backlog(b: &InProcess) -> i64 {
    b.rt.block_on(b.store.call(|c| Ok(ternd::outbox::backlog(c)?)))
        .unwrap()
        .rows
}

fn outbox_throughput(b: &InProcess, n: usize) -> (Duration, Duration) {
    // Wait for the link (the telemetry row goes out first).
    wait_for("the fleet link", Duration::from_secs(30), || {
        (backlog(b) == 0).then_some(())
    })
    .unwrap();
    let start = Instant::now();
    for i in 0..n {
        let (o, body) = (b.outbox.clone(), result_body(i));
        b.rt.block_on(b.store.call(move |c| {
            let tx = c.transaction()?;
            o.enqueue(
                &tx,
                "results/bench",
                ternd::outbox::Class::Result,
                "tern/bench/results/bench",
                body,
            )?;
            tx.commit()?;
            Ok(())
        }))
        .unwrap();
        b.outbox.wake();
    }
    let persisted = start.elapsed();
    wait_for("every row acknowledged", Duration::from_secs(600), || {
        (backlog(b) == 0).then_some(())
    })
    .unwrap();
    (persisted, start.elapsed())
}

fn pings(broker: &Broker, n: usize) -> (Duration, Duration) {
    let mut c = Client::connect(
        broker,
        ClientOptions {
            v5: true,
            id: "bench-pinger",
            subscribe: &["bench/answers"],
            persistent: false,
        },
    )
    .unwrap();
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let t = Instant::now();
        c.publish(
            "tern/bench/cmd/ping",
            json!({"id": format!("ping-{i}")}).to_string().as_bytes(),
            Some(("bench/answers", b"x")),
        )
        .unwrap();
        c.recv_on("bench/answers", Duration::from_secs(10)).unwrap();
        if i >= 20 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    (times[n / 2], times[n * 99 / 100])
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// RSS of a real ternd (fleet only, no models) after READY, with `rows` messages backlogged.
fn daemon_with_backlog(rows: usize, port: u16) -> (tempfile::TempDir, Daemon, NotifySocket) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    {
        let store = ternd::store::Store::open(&state.join("tern.db")).unwrap();
        let ob = ternd::outbox::Outbox::new(
            tern_update::topics::Device::new("tern", "bench", &[]),
            u64::MAX,
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(store.call(move |c| {
            let tx = c.transaction()?;
            for i in 0..rows {
                ob.enqueue(
                    &tx,
                    "results/bench",
                    ternd::outbox::Class::Result,
                    "tern/bench/results/bench",
                    result_body(i),
                )?;
            }
            tx.commit()?;
            Ok(())
        }))
        .unwrap();
    }
    let cfg = dir.path().join("ternd.toml");
    std::fs::write(
        &cfg,
        format!("state_dir = \"state\"\n[fleet]\nbroker = \"mqtt://127.0.0.1:{port}\"\ndevice = \"bench\"\nreconnect_max_secs = 1\ntelemetry_secs = 3600\n[outbox]\nbudget_mib = 1024\n"),
    )
    .unwrap();
    let mut notify = NotifySocket::new(dir.path()).unwrap();
    let d = Daemon::spawn(&cfg, Some(&notify.path), &[]).unwrap();
    notify.wait_for("READY=1", Duration::from_secs(60)).unwrap();
    (dir, d, notify)
}

fn settle_rss(pid: i32) -> u64 {
    // RSS after start-up settles: sample until two readings 200 ms apart agree within 1%.
    let mut last = rss_kib(pid);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = rss_kib(pid);
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_usize("TERN_BENCH_MESSAGES", 20_000);
    let n_ping = env_usize("TERN_BENCH_PINGS", 1000);
    let n_backlog = env_usize("TERN_BENCH_BACKLOG", 100_000);
    let Some(broker) = Broker::mosquitto().unwrap() else {
        eprintln!("fleet bench SKIPPED: mosquitto not found");
        return;
    };

    let raw = raw_rumqttc(&broker, n);
    let b = in_process(&broker);
    let (persisted, acked) = outbox_throughput(&b, n);
    let (p50, p99) = pings(&broker, n_ping);
    drop(b);

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "fleet bench: {n} messages of {} bytes, mosquitto on 127.0.0.1",
        serde_json::to_vec(&result_body(0)).unwrap().len()
    );
    println!(
        "  raw rumqttc QoS 1, nothing persisted   {:>9.0} msg/s",
        rate(raw)
    );
    println!(
        "  tern outbox: persisted (fsync each)     {:>9.0} msg/s",
        rate(persisted)
    );
    println!(
        "  tern outbox: persisted and acknowledged {:>9.0} msg/s   ratio to raw {:.3}",
        rate(acked),
        raw.as_secs_f64() / acked.as_secs_f64()
    );
    println!(
        "  ping round trip (MQTT 5)                p50 {:.2} ms   p99 {:.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );

    // A broker that is not there yet, on a port we can start one on later.
    let port = free_port();
    let (_d0, empty, _n0) = daemon_with_backlog(0, port);
    let rss_empty = settle_rss(empty.pid());
    drop(empty);
    let (dir, mut d, _n1) = daemon_with_backlog(n_backlog, port);
    let rss_backlog = settle_rss(d.pid());
    // Bring a broker up on that port and watch the backlog drain.
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"),
    )
    .unwrap();
    let mut mosq = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut peak = rss_backlog;
    let state = dir.path().join("state");
    wait_for("the backlog to drain", Duration::from_secs(900), || {
        peak = peak.max(rss_kib(d.pid()));
        (tern_tests::count(&state, "SELECT rows FROM outbox_totals")? == 0).then_some(())
    })
    .unwrap();
    let drain = start.elapsed();
    d.signal("TERM").unwrap();
    let _ = d.wait(Duration::from_secs(30));
    let _ = mosq.kill();
    let _ = mosq.wait();
    println!(
        "  ternd RSS, empty outbox                 {:>9} KiB",
        rss_empty
    );
    println!(
        "  ternd RSS, {n_backlog} backlogged           {:>9} KiB   ratio {:.3}",
        rss_backlog,
        rss_backlog as f64 / rss_empty as f64
    );
    println!("  ternd RSS peak while draining           {:>9} KiB", peak);
    println!(
        "  backlog drain after the broker returns  {:>9.0} msg/s ({n_backlog} in {:.1} s, incl. reconnect)",
        n_backlog as f64 / drain.as_secs_f64(),
        drain.as_secs_f64()
    );
}
