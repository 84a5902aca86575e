//! `cargo bench -p ternd --bench metrics` (needs ffmpeg)
//!
//! What the Prometheus endpoint and the drift watch cost the hot path. The real `ternd` (this
//! profile's build) runs a camera pipeline (an ffmpeg test source at a fixed rate, under
//! capacity, so every frame is answered and stored; the engine on its default plan, one
//! worker, one thread) four ways:
//!
//! - **off**: no `[metrics]`, no drift watch (the baseline);
//! - **on**: the endpoint listening, nobody scraping;
//! - **scraped**: the endpoint scraped every 100 ms (150 times a 15 s scrape interval);
//! - **drift**: `[pipelines.drift]` with its defaults (a window of 500 results), no endpoint.
//!
//! Each way runs `TERN_BENCH_ROUNDS` times (default 3), interleaved, so machine noise hits all
//! alike. Measured: the daemon's own CPU time per stored result (ffmpeg is a child and not
//! counted) and results per second; printed as ratios to **off**.
//!
//! Environment: `TERN_BENCH_SECS` (default 10) per run, `TERN_BENCH_FPS` (default 200),
//! `TERN_BENCH_MODEL` (a shipped package, default digits-cnn-int8).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// CPU seconds process `pid` has used itself (0 once it is gone).
fn cpu_s(pid: u32) -> f64 {
    ternd::fleet::telemetry::cpu_seconds_of(pid).unwrap_or(0.0)
}

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The daemon, stopped with SIGTERM and waited for when dropped (a failed run too).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Results stored so far (0 until the daemon made its database).
fn results(state: &Path) -> i64 {
    let db = state.join("tern.db");
    if !db.exists() {
        return 0;
    }
    rusqlite::Connection::open(db)
        .and_then(|c| c.query_row("SELECT count(*) FROM results", [], |r| r.get(0)))
        .unwrap_or(0)
}

/// One GET /metrics; the body.
fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Way {
    Off,
    On,
    Scraped,
    Drift,
}

struct Run {
    cpu_per_result_us: f64,
    results_per_s: f64,
}

fn run(way: Way, model: &str, secs: u64, fps: u64) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pkg: PathBuf = root.join("firmware-updates/models").join(model);
    let port = free_port();
    let (metrics, drift) = match way {
        Way::Off => (String::new(), ""),
        Way::Drift => (String::new(), "[pipelines.drift]\n"),
        _ => (format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"), ""),
    };
    let config = dir.path().join("ternd.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "state"
[dbus]
bus = "none"
[engine]
threads = 1
workers = 1
[store]
results_budget_mib = 64
[[models]]
package = "{pkg}"
[[feeds]]
kind = "camera"
name = "cam"
format = "lavfi"
input = "testsrc2=size=64x64:rate={fps}"
input_args = ["-re"]
[[pipelines]]
name = "main"
feed = "cam"
model = "{model}"
{drift}
{metrics}"#,
            pkg = pkg.display()
        ),
    )
    .unwrap();
    let child = Running(
        Command::new(env!("CARGO_BIN_EXE_ternd"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let state = dir.path().join("state");
    // Running once the first results are stored (start-up is not what is measured).
    let deadline = Instant::now() + Duration::from_secs(60);
    while results(&state) < 50 {
        assert!(Instant::now() < deadline, "ternd stored no results");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (c0, r0, t0) = (cpu_s(pid), results(&state), Instant::now());
    let end = t0 + Duration::from_secs(secs);
    while Instant::now() < end {
        if way == Way::Scraped {
            let body = scrape(port);
            assert!(body.contains("tern_inferences_total"), "{body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (c1, r1, took) = (cpu_s(pid), results(&state), t0.elapsed());
    drop(child);
    let n = (r1 - r0).max(1) as f64;
    Run {
        cpu_per_result_us: (c1 - c0) * 1e6 / n,
        results_per_s: n / took.as_secs_f64(),
    }
}

fn main() {
    let has_ffmpeg = Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_ffmpeg {
        eprintln!("SKIPPED: ffmpeg not found");
        return;
    }
    let (secs, fps, rounds) = (
        env_u64("TERN_BENCH_SECS", 10),
        env_u64("TERN_BENCH_FPS", 200),
        env_u64("TERN_BENCH_ROUNDS", 3).max(1),
    );
    let model = std::env::var("TERN_BENCH_MODEL").unwrap_or_else(|_| "digits-cnn-int8".into());
    let ways = [Way::Off, Way::On, Way::Scraped, Way::Drift];
    let mut got: Vec<Vec<Run>> = ways.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, way) in ways.iter().enumerate() {
            let r = run(*way, &model, secs, fps);
            eprintln!(
                "round {} {way:?}: {:.1} µs CPU per result, {:.0} results/s",
                round + 1,
                r.cpu_per_result_us,
                r.results_per_s
            );
            got[i].push(r);
        }
    }
    let median = |v: &[Run], f: fn(&Run) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let base_cpu = median(&got[0], |r| r.cpu_per_result_us);
    println!(
        "\nternd, camera pipeline on {model} at {fps} fps, {secs} s per run, median of {rounds}"
    );
    println!("| way | ternd CPU per result | ratio to off | results/s |");
    println!("| --- | ---: | ---: | ---: |");
    for (i, way) in ways.iter().enumerate() {
        let cpu = median(&got[i], |r| r.cpu_per_result_us);
        println!(
            "| {} | {cpu:.1} µs | {:.3} | {:.0} |",
            match way {
                Way::Off => "off (baseline)",
                Way::On => "metrics on, not scraped",
                Way::Scraped => "metrics on, scraped every 100 ms",
                Way::Drift => "drift watched (window 500)",
            },
            cpu / base_cpu,
            median(&got[i], |r| r.results_per_s)
        );
    }
}
