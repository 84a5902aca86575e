//! Helpers for tern's end-to-end tests: find and spawn the real binaries, hand out ports
//! without races, listen on a `NOTIFY_SOCKET` like systemd does, wait on events with
//! deadlines, and print everything useful when something fails (the daemon's and the
//! broker's logs).

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use anyhow::{Context, Result, anyhow, bail, ensure};

pub mod boxes;
pub mod dbus;
pub mod ejabberd;
pub mod mqtt;
pub mod updates;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A shipped model package.
pub fn package(name: &str) -> PathBuf {
    root().join("firmware-updates/models").join(name)
}

/// Path to a workspace binary (`ternd`, `ternctl`, `tern-update`) in the debug profile, built
/// by cargo before any test ran: `cargo test --workspace` (the README's test command) builds
/// every binary of the workspace first. A binary that is missing, or older than a source file
/// of the daemon or the tool (a `cargo test -p tern-tests` after a change to the daemon),
/// fails the test with what to run, instead of testing yesterday's daemon. Benches use the
/// same binaries.
pub fn bin(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    let build = "build the binaries first: `cargo test --workspace --no-run` (what `cargo test --workspace` does before testing)";
    assert_fresh(&path, name, build);
    path
}

/// The cargo target directory the tests were built in.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // <target>/<profile>/deps/<test>
    exe.ancestors()
        .nth(3)
        .expect("the test runs from <target>/<profile>/deps")
        .to_path_buf()
}

/// A workspace binary cross-built for `triple` in the debug profile (`.ci/run` builds the
/// aarch64 `ternd`). Missing: SKIPPED loudly with the command that builds it, or a failure
/// under `TERN_TEST_STRICT=1`; older than its sources: a failure, as for [`bin`].
pub fn cross_bin(triple: &str, name: &str) -> Option<PathBuf> {
    let path = target_dir().join(triple).join("debug").join(name);
    let build = format!(
        "cargo build --config cross/config.toml --target {triple} -p ternd --bin {name} \
         (needs Debian's cross toolchain; see .ci/run)"
    );
    if !path.is_file() {
        let why = format!("{} not built: {build}", path.display());
        skip(&why);
        return None;
    }
    assert_fresh(&path, name, &build);
    Some(path)
}

/// Fail unless the binary at `path` is newer than every source it is built from.
fn assert_fresh(path: &Path, name: &str, build: &str) {
    let built = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; {build}", path.display()));
    // Older than a source it is built from: a `cargo test -p tern-tests` after a change to
    // the daemon. (Not the ternd rlibs: cargo keeps one per feature set, built at different
    // moments, and a binary is linked against only one of them.)
    let dirs: &[&str] = match name {
        "tern-update" => &[
            "daemon/src",
            "firmware-updates/src",
            "firmware-updates/cli/src",
        ],
        _ => &["daemon/src", "firmware-updates/src"],
    };
    let newest_source = dirs.iter().flat_map(|d| sources(&root().join(d))).max();
    if let Some((changed, file)) = newest_source {
        assert!(
            changed <= built,
            "{} is older than {}, a source it is built from; {build}",
            path.display(),
            file.display()
        );
    }
}

/// Every `.rs` file under `dir` with its modification time.
fn sources(dir: &Path) -> Vec<(std::time::SystemTime, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs")
            && let Ok(t) = e.metadata().and_then(|m| m.modified())
        {
            out.push((t, p));
        }
    }
    out
}

/// A TCP port on 127.0.0.1 for a test's broker, held by this process until it ends. Ports
/// come from 20000..32000, below Linux's ephemeral range (so no outgoing connection is given
/// one meanwhile); each is claimed by an exclusive lock on a file in the system's temporary
/// directory, so test processes running at once (the e2e tests, benches, another checkout)
/// never hand out the same port, and is checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static HELD: Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> = Mutex::new(Vec::new());
    const FIRST: u16 = 20000;
    const SPAN: u16 = 12000;
    let dir = std::env::temp_dir().join("tern-test-ports");
    std::fs::create_dir_all(&dir).expect("the port lock directory");
    let start = (std::process::id() as u16).wrapping_mul(7919) % SPAN;
    for i in 0..SPAN {
        let port = FIRST + (start + i) % SPAN;
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{port}.lock")))
        else {
            continue;
        };
        let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
        return port;
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// Say loudly that a test is skipped, and why; under `TERN_TEST_STRICT=1` (CI) fail instead.
fn skip(why: &str) {
    if std::env::var("TERN_TEST_STRICT").as_deref() == Ok("1") {
        panic!("{why} (TERN_TEST_STRICT=1)");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
}

/// The environment that starts a program with its wall clock at 1970-01-02 (libfaketime), as
/// a box without a real-time clock boots; its monotonic clock is left alone. Missing:
/// SKIPPED loudly, or a failure under `TERN_TEST_STRICT=1`.
pub fn clock_at_1970() -> Option<Vec<(&'static str, String)>> {
    let lib = format!(
        "/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1",
        std::env::consts::ARCH
    );
    if !Path::new(&lib).is_file() {
        skip(&format!("{lib} not found (Debian package faketime)"));
        return None;
    }
    Some(vec![
        ("LD_PRELOAD", lib),
        ("FAKETIME", "@1970-01-02 00:00:00".into()),
        ("DONT_FAKE_MONOTONIC", "1".into()),
    ])
}

/// A program a test needs from the system. Missing: SKIPPED loudly, or a failure under
/// `TERN_TEST_STRICT=1` (which CI sets).
pub fn need(program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    if !found {
        skip(&format!("{program} not found on PATH"));
    }
    found
}

/// The third-party model packages `tests/models/fetch-third-party.sh` writes (`ppocr-det`,
/// `ppocr-cls`, `ppocr-cls-int8`, `ppocr-rec`, `silero-vad`), from `TERN_THIRD_PARTY` or the script's default
/// cache. Missing: SKIPPED loudly, or a failure under `TERN_TEST_STRICT=1`.
pub fn third_party() -> Option<PathBuf> {
    let dir = match std::env::var_os("TERN_THIRD_PARTY") {
        Some(d) => PathBuf::from(d),
        None => tern_cache().join("third-party/packages"),
    };
    let ready = [
        "ppocr-det",
        "ppocr-cls",
        "ppocr-cls-int8",
        "ppocr-rec",
        "silero-vad",
    ]
    .iter()
    .all(|p| dir.join(p).join("tern-model.toml").is_file());
    if !ready {
        let why = format!(
            "third-party packages not found in {} (run tests/models/fetch-third-party.sh)",
            dir.display()
        );
        skip(&why);
        return None;
    }
    Some(dir)
}

/// Where the setup scripts cache what they fetch, as they find it:
/// `${XDG_CACHE_HOME:-$HOME/.cache}/tern`.
fn tern_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default()
        .join("tern")
}

/// The Python of the venv `tests/home-assistant/setup.sh` makes (Home Assistant's MQTT
/// schemas and template engine), from `TERN_HA_PYTHON` or the script's default cache.
/// Missing: SKIPPED loudly, or a failure under `TERN_TEST_STRICT=1`.
pub fn home_assistant_python() -> Option<PathBuf> {
    let python = match std::env::var_os("TERN_HA_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => tern_cache().join("home-assistant/venv/bin/python"),
    };
    if !python.exists() {
        skip(&format!(
            "{} not found (run tests/home-assistant/setup.sh)",
            python.display()
        ));
        return None;
    }
    Some(python)
}

/// Root, for tests that act as other users (`setpriv`) or monitor a bus. Otherwise SKIPPED
/// loudly, or a failure under `TERN_TEST_STRICT=1`.
pub fn need_root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        skip("not root");
    }
    root
}

/// Poll `f` until it returns `Some`, failing after `timeout` with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A datagram socket standing in for systemd's notification socket.
pub struct NotifySocket {
    sock: UnixDatagram,
    pub path: PathBuf,
    /// Every message received so far, in order.
    pub messages: Vec<String>,
}

impl NotifySocket {
    pub fn new(dir: &Path) -> Result<NotifySocket> {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path)?;
        Ok(NotifySocket {
            sock,
            path,
            messages: Vec::new(),
        })
    }

    /// Receive until a message contains `needle` (as a whole `KEY=VALUE` line), or fail at
    /// the deadline. Returns that message.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no `{needle}` on NOTIFY_SOCKET within {timeout:?}; got {:?}",
                    self.messages
                );
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    self.messages.push(msg.clone());
                    if msg.lines().any(|l| l == needle || l.starts_with(needle)) {
                        return Ok(msg);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A running `ternd`, killed on drop; its stderr is kept in a file and printed on failure.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(config: &Path, notify: Option<&Path>, envs: &[(&str, &str)]) -> Result<Daemon> {
        Daemon::spawn_in(config, None, notify, envs)
    }

    /// [`Daemon::spawn`] in the working directory `cwd` (what relative ffmpeg inputs are
    /// relative to).
    pub fn spawn_in(
        config: &Path,
        cwd: Option<&Path>,
        notify: Option<&Path>,
        envs: &[(&str, &str)],
    ) -> Result<Daemon> {
        let log = config.with_extension(format!("{}.log", unique()));
        let stderr = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin("ternd"));
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        cmd.args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(stderr);
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("RUST_LOG");
        if let Some(n) = notify {
            cmd.env("NOTIFY_SOCKET", n);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawning ternd")?;
        Ok(Daemon { child, log })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal by name (`TERM`, `HUP`, `KILL`, `INT`) with kill(2): no procps needed.
    pub fn signal(&self, sig: &str) -> Result<()> {
        use nix::sys::signal::{Signal, kill};
        let sig: Signal = format!("SIG{sig}")
            .parse()
            .map_err(|e| anyhow!("signal {sig}: {e}"))?;
        kill(nix::unistd::Pid::from_raw(self.pid()), sig)?;
        Ok(())
    }

    /// Wait for exit within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = &mut self.child;
        wait_for("ternd to exit", timeout, || child.try_wait().ok().flatten())
    }

    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- ternd stderr ({}) ----\n{}",
                self.log.display(),
                self.stderr()
            );
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Run `ternd` with arguments to completion; returns (status, stdout, stderr).
pub fn ternd(args: &[&str]) -> Result<(ExitStatus, String, String)> {
    let out = Command::new(bin("ternd")).args(args).output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

/// Copy a directory tree (test fixtures are small).
pub fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

/// Open the daemon's database read-only (it runs in WAL mode, so this never blocks it).
pub fn db(state_dir: &Path) -> Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open_with_flags(
        state_dir.join("tern.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    c.busy_timeout(Duration::from_secs(5))?;
    Ok(c)
}

/// Every value of the one column a query returns, in its order.
pub fn column<T: rusqlite::types::FromSql>(state_dir: &Path, sql: &str) -> Vec<T> {
    let c = db(state_dir).expect("the database");
    let mut s = c.prepare(sql).expect("the query");
    s.query_map([], |r| r.get(0))
        .expect("the query runs")
        .map(|r| r.expect("a row"))
        .collect()
}

/// Count rows of a query returning one integer; `None` if the database is not there yet.
pub fn count(state_dir: &Path, sql: &str) -> Option<i64> {
    db(state_dir).ok()?.query_row(sql, [], |r| r.get(0)).ok()
}

/// `ternd infer --model PKG --input FILE [extra args]`; returns (status, stdout, stderr).
pub fn infer(pkg: &Path, input: &Path, extra: &[&str]) -> Result<(ExitStatus, String, String)> {
    let mut args = vec![
        "infer",
        "--model",
        path_str(pkg)?,
        "--input",
        path_str(input)?,
    ];
    args.extend_from_slice(extra);
    ternd(&args)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// The name and version a model package declares.
pub fn read_manifest(pkg: &Path) -> (String, String) {
    let text = std::fs::read_to_string(pkg.join("tern-model.toml")).expect("tern-model.toml");
    let v: toml::Table = text.parse().expect("tern-model.toml parses");
    (
        v["name"].as_str().expect("name").to_string(),
        v["version"].as_str().expect("version").to_string(),
    )
}

/// One HTTP/1.0 request to `port` (so no chunked body, and the server closes when done):
/// (status line, headers and body as text).
pub fn http(port: u16, method: &str, path: &str) -> (String, String) {
    try_http(port, method, path).unwrap_or_else(|e| panic!("{method} {path} on {port}: {e}"))
}

pub fn try_http(port: u16, method: &str, path: &str) -> std::io::Result<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (status, rest) = text.split_once("\r\n").unwrap_or((&text, ""));
    Ok((status.to_string(), rest.to_string()))
}

/// The samples of an exposition: `name{labels}` → value.
pub fn samples(body: &str) -> std::collections::HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Each stored result of `pipeline`, oldest first: its source and its outputs (JSON).
pub fn stored_outputs(state_dir: &Path, pipeline: &str) -> Vec<(String, serde_json::Value)> {
    let c = db(state_dir).unwrap();
    let mut s = c
        .prepare("SELECT source, outputs FROM results WHERE pipeline = ?1 ORDER BY id")
        .unwrap();
    s.query_map([pipeline], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })
    .unwrap()
    .map(|r| {
        let (src, outputs) = r.unwrap();
        (src, serde_json::from_str(&outputs).unwrap())
    })
    .collect()
}

/// Everything a child's stream has printed so far, gathered line by line on a thread.
pub fn gather_output(
    r: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::BufRead;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            let mut s = s2.lock().unwrap();
            s.push_str(&l);
            s.push('\n');
        }
    });
    seen
}
