//! `ternctl`: look inside and steer the box's ternd over its D-Bus interface.
//!
//! Tables for people, `--json` for scripts (the daemon's own documents, one per line). Exit
//! codes say what went wrong so that scripts can branch on them; see [`Exit`].
//!
//! It lives in the library so that one executable can be both programs: `ternd` run under
//! the name `ternctl` (the packages' symlink) is ternctl, and the box stores tract once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::config;
use crate::engine::Input;
use crate::local::client::{Daemon1Proxy, UpdateProgressArgs};

/// What an exit status means (sysexits where one fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Ok = 0,
    /// The daemon refused or the operation failed (conflict, internal error, a failed check).
    Failed = 1,
    /// No such model, version or file.
    NotFound = 3,
    /// The request or input was malformed (EX_DATAERR).
    BadInput = 65,
    /// ternd is not reachable: no bus, or not running on it (EX_UNAVAILABLE).
    Unavailable = 69,
    /// The model is busy; try again later (EX_TEMPFAIL).
    Busy = 75,
    /// The bus policy or the daemon refused this caller (EX_NOPERM).
    Denied = 77,
}

#[derive(Parser)]
#[command(name = "ternctl", version = crate::VERSION, about = "look inside and steer ternd over D-Bus")]
struct Cli {
    /// The bus ternd serves on: `system`, `session` or a D-Bus address [default: system; for
    /// `check`, the configuration's `dbus.bus`].
    #[arg(long, global = true, env = "TERN_BUS")]
    bus: Option<String>,
    /// Print the daemon's JSON documents (one per line) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The daemon's state, its models and pipelines, the outbox and the fleet link.
    Status,
    /// Every installed version of every model.
    Models,
    /// Make an installed version the active one.
    Activate { model: String, version: String },
    /// Go back to the version that was active before.
    Rollback { model: String },
    /// Run a model on a file: PNG or JPEG, a float32 .npy, or a JSON array.
    Infer {
        file: PathBuf,
        /// The model to run; may be left out when exactly one model is active.
        #[arg(long, short)]
        model: Option<String>,
    },
    /// Pipelines with their state and counters; `start NAME` or `stop NAME` one.
    Pipelines {
        #[command(subcommand)]
        action: Option<PipelineAction>,
    },
    /// Stored results, oldest first; with --follow, then every new one as it is stored.
    Results {
        /// From when: ms since the epoch, or an age such as `90s`, `15m`, `2h`, `1d`.
        #[arg(long, default_value = "1h")]
        since: String,
        /// With --since as ms: only results after this result id (a previous run's hint).
        #[arg(long)]
        after: Option<i64>,
        /// Stored results to show at most (pages of up to 1000 are fetched as needed).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, short)]
        follow: bool,
    },
    /// Install a signed update bundle through the running daemon and wait for its outcome.
    Install { bundle: PathBuf },
    /// Check the box: configuration, store, broker, models, disk, daemon (exit 1 on a failure).
    Check {
        #[arg(long, short, default_value = "/etc/tern/ternd.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PipelineAction {
    /// Start a pipeline stopped by command (or one that failed to start).
    Start { name: String },
    /// Stop a pipeline; it stays stopped across restarts until started.
    Stop { name: String },
}

/// A failure with its exit status.
struct Fail(Exit, String);

type Res<T> = Result<T, Fail>;

/// ternctl's entry point: arguments from the command line, an exit status for it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(e) => ExitCode::from(e as u8),
        Err(Fail(code, message)) => {
            eprintln!("ternctl: {message}");
            ExitCode::from(code as u8)
        }
    }
}

async fn run(cli: Cli) -> Res<Exit> {
    let json = cli.json;
    if let Cmd::Check { config } = &cli.command {
        return Ok(check(config, cli.bus.as_deref(), json).await);
    }
    let bus = cli.bus.as_deref().unwrap_or("system");
    // Installing waits for the update's end, health window included; the rest answer at once
    // or the daemon is wedged, which is worth saying rather than hanging.
    let timeout = match cli.command {
        Cmd::Install { .. } | Cmd::Results { follow: true, .. } => None,
        _ => Some(CALL_TIMEOUT),
    };
    let d = connect(bus, timeout).await?;
    match cli.command {
        Cmd::Status => {
            let s = doc(d.status().await)?;
            if s["state"] == "corrupt" {
                print(json, &s, |s| {
                    format!(
                        "ternd {}  corrupt: {}\nIt serves nothing until the database is repaired.\nRecovery: {}\n",
                        plain(&s["version"]),
                        plain(&s["reason"]),
                        plain(&s["recovery"])
                    )
                });
                return Ok(Exit::Failed);
            }
            print(json, &s, status_text);
        }
        Cmd::Models => {
            let m = doc(d.list_models().await)?;
            print(json, &m, models_text);
        }
        Cmd::Activate { model, version } => {
            let r = doc(d.activate(&model, &version).await)?;
            print(json, &r, |r| {
                format!(
                    "{}: {} is active\n",
                    plain(&r["model"]),
                    plain(&r["active"])
                )
            });
        }
        Cmd::Rollback { model } => {
            let r = doc(d.rollback(&model).await)?;
            print(json, &r, |r| {
                format!(
                    "{}: rolled back from {} to {}\n",
                    plain(&r["model"]),
                    plain(&r["from"]),
                    plain(&r["active"])
                )
            });
        }
        Cmd::Infer { file, model } => {
            let model = match model {
                Some(m) => m,
                None => only_model(&d).await?,
            };
            let input = Input::from_file(&file, MAX_INPUT_BYTES).map_err(|e| match e {
                crate::engine::EngineError::Unreadable { .. } => {
                    Fail(Exit::NotFound, e.to_string())
                }
                e => Fail(Exit::BadInput, e.to_string()),
            })?;
            let reply = match input {
                Input::Encoded(bytes) => d.infer(&model, &bytes).await,
                Input::Tensor { shape, data } => {
                    d.infer_tensor(&model, &nest(&shape, &data).to_string())
                        .await
                }
                Input::Arrays(_) => {
                    return Err(Fail(
                        Exit::BadInput,
                        format!(
                            "{}: ternctl sends images and float tensors (.png, .jpg, .npy, \
                             .json); run a model on named arrays with `ternd infer`",
                            file.display()
                        ),
                    ));
                }
                Input::Frame { .. } => unreachable!("files are never raw frames"),
            };
            let p = doc(reply)?;
            print(json, &p, prediction_text);
        }
        Cmd::Pipelines { action: None } => {
            let p = doc(d.list_pipelines().await)?;
            print(json, &p, pipelines_text);
        }
        Cmd::Pipelines {
            action: Some(action),
        } => {
            let r = match &action {
                PipelineAction::Start { name } => d.start_pipeline(name).await,
                PipelineAction::Stop { name } => d.stop_pipeline(name).await,
            };
            let p = doc(r)?;
            print(json, &p, |v| {
                let mut s = format!("{}: {}", plain(&v["pipeline"]), plain(&v["state"]));
                if let Some(r) = v["reason"].as_str() {
                    s += &format!(" ({r})");
                }
                s + "\n"
            });
        }
        Cmd::Results {
            since,
            limit,
            follow,
            after,
        } => results(&d, &since, after, limit, follow, json).await?,
        Cmd::Install { bundle } => install(&d, &bundle, json).await?,
        Cmd::Check { .. } => unreachable!("handled above"),
    }
    Ok(Exit::Ok)
}

/// The largest input file sent to the daemon (its MQTT and D-Bus limits are of this order).
const MAX_INPUT_BYTES: u64 = 8 << 20;

/// How long a call may take before ternd counts as not answering (inferences queue behind
/// others; the daemon itself gives up on one after 30 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(45);

async fn connect(bus: &str, timeout: Option<Duration>) -> Res<Daemon1Proxy<'static>> {
    let mut builder = match bus {
        "system" => zbus::connection::Builder::system(),
        "session" => zbus::connection::Builder::session(),
        a => zbus::connection::Builder::address(a),
    }
    .map_err(|e| Fail(Exit::Unavailable, format!("bus `{bus}`: {e}")))?;
    if let Some(t) = timeout {
        builder = builder.method_timeout(t);
    }
    let conn = builder.build().await.map_err(|e| {
        Fail(
            Exit::Unavailable,
            format!("cannot reach the {bus} bus: {e}"),
        )
    })?;
    Daemon1Proxy::new(&conn).await.map_err(failure)
}

/// A method's JSON reply, or why there is none.
fn doc(r: zbus::Result<String>) -> Res<Value> {
    let s = r.map_err(failure)?;
    serde_json::from_str(&s).map_err(|e| Fail(Exit::Failed, format!("reply is not JSON: {e}")))
}

fn failure(e: zbus::Error) -> Fail {
    if let zbus::Error::InputOutput(io) = &e
        && io.kind() == std::io::ErrorKind::TimedOut
    {
        return Fail(
            Exit::Unavailable,
            format!("ternd did not answer within {CALL_TIMEOUT:?}"),
        );
    }
    let zbus::Error::MethodError(name, message, _) = &e else {
        return Fail(Exit::Unavailable, format!("D-Bus: {e}"));
    };
    let message = message.clone().unwrap_or_default();
    let code = match name.as_str() {
        "io.tern.Error.NotFound" => Exit::NotFound,
        "io.tern.Error.BadRequest" => Exit::BadInput,
        "io.tern.Error.Busy" => Exit::Busy,
        "io.tern.Error.Unauthorized" | "org.freedesktop.DBus.Error.AccessDenied" => Exit::Denied,
        "org.freedesktop.DBus.Error.ServiceUnknown"
        | "org.freedesktop.DBus.Error.NameHasNoOwner"
        | "org.freedesktop.DBus.Error.NoReply" => {
            return Fail(
                Exit::Unavailable,
                format!("ternd is not running on this bus ({name}: {message})"),
            );
        }
        _ => Exit::Failed,
    };
    let short = name.as_str().rsplit('.').next().unwrap_or(name.as_str());
    Fail(code, format!("{short}: {message}"))
}

fn print(json: bool, v: &Value, text: impl Fn(&Value) -> String) {
    if json {
        out(&format!("{v}\n"));
    } else {
        out(&text(v));
    }
}

/// Write to stdout and flush (a follower is often piped into another program). A reader that
/// went away (`ternctl results -f | head`) ends ternctl quietly, as it would a shell tool.
fn out(s: &str) {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(s.as_bytes()).and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("ternctl: stdout: {e}");
        std::process::exit(Exit::Failed as i32);
    }
}

/// The one active model, for `infer` without `--model`.
async fn only_model(d: &Daemon1Proxy<'_>) -> Res<String> {
    let active = d.active_models().await.map_err(failure)?;
    let mut names: Vec<_> = active.into_keys().collect();
    names.sort();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Fail(Exit::NotFound, "no model is active".into())),
        many => Err(Fail(
            Exit::BadInput,
            format!(
                "several models are active ({}); pick one with --model",
                many.join(", ")
            ),
        )),
    }
}

/// Row-major values as nested JSON arrays of `shape`.
fn nest(shape: &[usize], data: &[f32]) -> Value {
    match shape {
        [] => json!(data.first().copied().unwrap_or(0.0)),
        [n] => json!(&data[..*n]),
        [n, rest @ ..] => {
            let step: usize = rest.iter().product();
            Value::Array(
                (0..*n)
                    .map(|i| nest(rest, &data[i * step..(i + 1) * step]))
                    .collect(),
            )
        }
    }
}

/// `since` as ms since the epoch: a plain number is one already; `15m` is that long ago.
fn since_ms(s: &str, now_ms: i64) -> Res<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || {
        Fail(
            Exit::BadInput,
            format!("--since `{s}`: give ms since the epoch or an age such as 90s, 15m, 2h, 1d"),
        )
    };
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    Ok(now_ms - n.saturating_mul(secs * 1000))
}

async fn results(
    d: &Daemon1Proxy<'_>,
    since: &str,
    after: Option<i64>,
    limit: u32,
    follow: bool,
    json: bool,
) -> Res<()> {
    if after.is_some() && since.parse::<i64>().is_err() {
        return Err(Fail(
            Exit::BadInput,
            "--after continues a page: give --since in ms, as the hint printed it".into(),
        ));
    }
    let mut cursor = (since_ms(since, crate::store::now_ms())?, after.unwrap_or(0));
    // Listen before asking, so that no result falls between the query and the stream.
    let mut stream = if follow {
        Some(d.receive_result_ready().await.map_err(failure)?)
    } else {
        None
    };
    if !json {
        out(&result_line(RESULT_HEADER.map(String::from)));
    }
    let mut shown = std::collections::HashSet::new();
    let mut more = false;
    while shown.len() < limit as usize {
        let want = (limit as usize - shown.len()).min(MAX_PAGE) as u32;
        let page = doc(d.query_results_after(cursor.0, cursor.1, want).await)?;
        let rows = page["results"].as_array().cloned().unwrap_or_default();
        for r in &rows {
            shown.insert(r["id"].as_i64().unwrap_or(0));
            print_result(r, json);
        }
        match (page["next_since"].as_i64(), page["next_after"].as_i64()) {
            (Some(ts), Some(id)) => cursor = (ts, id),
            _ => break,
        }
        more = rows.len() == want as usize || page["truncated"] == true;
        if !more {
            break;
        }
    }
    if more {
        eprintln!(
            "ternctl: {} result(s) shown and there may be more: continue with --since {} --after {}{}",
            shown.len(),
            cursor.0,
            cursor.1,
            if follow { " (new ones follow)" } else { "" }
        );
    }
    let Some(stream) = stream.as_mut() else {
        return Ok(());
    };
    // Signals may arrive out of id order (pipelines commit independently): skip only what
    // the query already printed.
    while let Some(sig) = stream.next().await {
        let Ok(args) = sig.args() else { continue };
        let Ok(r) = serde_json::from_str::<Value>(args.json()) else {
            continue;
        };
        if !shown.contains(&r["id"].as_i64().unwrap_or(-1)) {
            print_result(&r, json);
        }
    }
    Err(Fail(Exit::Unavailable, "ternd left the bus".into()))
}

/// The most results the daemon returns in one page.
const MAX_PAGE: usize = 1000;

const RESULT_HEADER: [&str; 6] = ["ID", "TIME (UTC)", "PIPELINE", "MODEL", "TOP", "LATENCY"];

/// Fixed widths, so that rows printed as they come still line up under the header.
fn result_line(c: [String; 6]) -> String {
    format!(
        "{:<6}  {:<24}  {:<14}  {:<24}  {:<14}  {}\n",
        c[0], c[1], c[2], c[3], c[4], c[5]
    )
}

fn print_result(r: &Value, json: bool) {
    if json {
        out(&format!("{r}\n"));
        return;
    }
    let time = r["ts_ms"]
        .as_u64()
        .map(|ms| {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        })
        .unwrap_or_else(|| plain(&r["ts_ms"]));
    out(&result_line([
        plain(&r["id"]),
        time,
        plain(&r["pipeline"]),
        format!("{}@{}", plain(&r["model"]), plain(&r["version"])),
        top(&r["top"]),
        format!("{} µs", plain(&r["latency_us"])),
    ]));
}

fn top(t: &Value) -> String {
    match t.get(0) {
        Some(c) => format!(
            "{} ({:.2})",
            plain(&c["label"]),
            c["score"].as_f64().unwrap_or(f64::NAN)
        ),
        None => "-".into(),
    }
}

/// A JSON value as text people read: strings without quotes, null as `-`.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// One step of an update, on stderr.
fn say_progress(a: &UpdateProgressArgs<'_>) {
    eprintln!(
        "{} {}: {} {}%",
        a.model(),
        a.version(),
        a.state(),
        a.percent()
    );
}

async fn install(d: &Daemon1Proxy<'_>, bundle: &Path, json: bool) -> Res<()> {
    let say = |a: &UpdateProgressArgs<'_>| {
        if !json {
            say_progress(a);
        }
    };
    let v = install_and_follow(d, bundle, say).await?;
    print(json, &v, update_text);
    if v["state"] == "committed" {
        Ok(())
    } else {
        Err(Fail(Exit::Failed, "the update did not go through".into()))
    }
}

/// Hand a bundle to the ternd on the other end of `d` and follow its update to the end,
/// telling `say` of each step: the update's final document (`state` committed, failed,
/// rolled_back, or refused with its `code` and `reason`).
async fn install_and_follow(
    d: &Daemon1Proxy<'_>,
    bundle: &Path,
    say: impl Fn(&UpdateProgressArgs<'_>),
) -> Res<Value> {
    let path = std::fs::canonicalize(bundle)
        .map_err(|e| Fail(Exit::NotFound, format!("{}: {e}", bundle.display())))?;
    let text = path.to_str().ok_or_else(|| {
        Fail(
            Exit::BadInput,
            format!("{}: not a UTF-8 path", path.display()),
        )
    })?;
    // Listening before asking: every step of this update after the answer is in the stream.
    let mut progress = d.receive_update_progress().await.map_err(failure)?;
    let answer = match d.install_bundle(text).await {
        Ok(s) => serde_json::from_str::<Value>(&s).unwrap_or(Value::String(s)),
        // A refused or failed update comes back as a conflict carrying its outcome.
        Err(zbus::Error::MethodError(name, Some(m), _))
            if name.as_str() == "io.tern.Error.Conflict" && m.starts_with('{') =>
        {
            return Ok(serde_json::from_str(&m).unwrap_or(Value::String(m)));
        }
        Err(e) => return Err(failure(e)),
    };
    let Some(id) = answer["update"].as_i64() else {
        return Err(Fail(
            Exit::Failed,
            format!("the daemon's answer has no update: {answer}"),
        ));
    };
    let (model, version) = (answer["model"].clone(), answer["version"].clone());
    if final_state(&answer) {
        return Ok(answer);
    }
    // The update's own row says when it ends; the signals say how it gets there. A signal
    // can be lost (a listener that lags loses the oldest), so the row is also read now and
    // then: the follow ends however the news travels.
    let mut check = tokio::time::interval(Duration::from_secs(2));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            p = progress.next() => {
                let Some(p) = p else {
                    return Err(Fail(Exit::Unavailable, "ternd left the bus".into()));
                };
                let Ok(a) = p.args() else { continue };
                // Only this update's model and version: a fleet update to another model
                // may run meanwhile.
                if model != a.model().as_str() || version != a.version().as_str() {
                    continue;
                }
                say(&a);
                if !matches!(a.state().as_str(), "committed" | "failed" | "rolled_back") {
                    continue;
                }
            }
            _ = check.tick() => {}
        }
        let now = doc(d.get_update(id).await)?;
        if final_state(&now) {
            return Ok(now);
        }
    }
}

/// Whether an update document says the update ended.
fn final_state(v: &Value) -> bool {
    matches!(
        v["state"].as_str(),
        Some("committed" | "failed" | "rolled_back" | "refused")
    )
}

/// Why `ternd install` got no outcome from the running daemon.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoOutcome(String);

/// `ternd install` while ternd runs: the bundle goes to it over its bus, and its update is
/// followed for at most `wait`. The final document, or why there is none.
pub async fn install_through_daemon(
    bus: &config::Bus,
    bundle: &Path,
    wait: Duration,
) -> Result<Value, NoOutcome> {
    let d = connect(bus.name(), None)
        .await
        .map_err(|Fail(_, m)| NoOutcome(m))?;
    match tokio::time::timeout(wait, install_and_follow(&d, bundle, say_progress)).await {
        Ok(r) => r.map_err(|Fail(_, m)| NoOutcome(m)),
        Err(_) => Err(NoOutcome(format!(
            "no answer from the running ternd within {wait:?}; it carries on (see its events)"
        ))),
    }
}

fn update_text(v: &Value) -> String {
    let mut s = format!(
        "{} {}: {}",
        plain(&v["model"]),
        plain(&v["version"]),
        plain(&v["state"])
    );
    for k in ["code", "reason", "message"] {
        if let Some(x) = v.get(k).filter(|x| !x.is_null()) {
            s += &format!(" ({k}: {})", plain(x));
        }
    }
    s + "\n"
}

/// One row per element of the JSON array `v` (none if it is not an array).
fn array_rows(v: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array().into_iter().flatten().map(row).collect()
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s += c;
            } else {
                s += &format!("{c:<width$}  ", width = w[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn status_text(s: &Value) -> String {
    let mut out = format!(
        "ternd {}  {}\nuptime {} s  device {}  fleet {}  outbox {} message(s)\n\n",
        plain(&s["version"]),
        plain(&s["status"]),
        s["uptime_s"],
        plain(&s["device"]),
        match (s["device"].is_null(), s["fleet"]["connected"] == true) {
            (true, _) => "off",
            (false, true) => "connected",
            (false, false) => "disconnected",
        },
        plain(&s["outbox"]["rows"]),
    );
    let rows = array_rows(&s["models"], |m| {
        vec![
            plain(&m["name"]),
            plain(&m["version"]),
            format!("{} {}", plain(&m["runtime"]), plain(&m["plan"])),
            plain(&m["requests"]),
            plain(&m["errors"]),
            plain(&m["bad_input"]),
            plain(&m["busy"]),
            plain(&m["queued"]),
            plain(&m["latency_us"]["p50"]),
            plain(&m["latency_us"]["p99"]),
        ]
    });
    out += &table(
        &[
            "MODEL",
            "VERSION",
            "PLAN",
            "REQUESTS",
            "ERRORS",
            "BAD INPUT",
            "BUSY",
            "QUEUED",
            "P50 µs",
            "P99 µs",
        ],
        &rows,
    );
    out += "\n";
    out += &pipelines_text(&s["pipelines"]);
    out
}

fn models_text(m: &Value) -> String {
    let rows = array_rows(m, |v| {
        vec![
            plain(&v["name"]),
            plain(&v["version"]),
            plain(&v["state"]),
            plain(&v["form"]),
            plain(&v["sha256"]).chars().take(12).collect(),
            plain(&v["plan"]),
            plain(&v["failure"]),
        ]
    });
    table(
        &[
            "MODEL", "VERSION", "STATE", "FORM", "SHA256", "PLAN", "FAILURE",
        ],
        &rows,
    )
}

fn pipelines_text(p: &Value) -> String {
    let rows = array_rows(p, |v| {
        vec![
            plain(&v["name"]),
            plain(&v["feed"]),
            plain(&v["model"]),
            plain(&v["state"]),
            plain(&v["results"]),
            plain(&v["errors"]),
            plain(&v["dropped"]),
            plain(&v["e2e_latency_us"]["p50"]),
            plain(&v["reason"]),
        ]
    });
    table(
        &[
            "PIPELINE",
            "FEED",
            "MODEL",
            "STATE",
            "RESULTS",
            "ERRORS",
            "DROPPED",
            "E2E P50 µs",
            "REASON",
        ],
        &rows,
    )
}

fn prediction_text(p: &Value) -> String {
    let mut out = format!(
        "{} {}  {} µs\n",
        plain(&p["model"]),
        plain(&p["version"]),
        p["latency_us"]
    );
    let rows = array_rows(&p["top"], |c| {
        vec![
            plain(&c["label"]),
            format!("{:.4}", c["score"].as_f64().unwrap_or(f64::NAN)),
        ]
    });
    out += &table(&["LABEL", "SCORE"], &rows);
    out
}

/// One line of `ternctl check`.
struct Check {
    name: &'static str,
    level: Level,
    detail: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warning,
    Error,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// Checks that need no running daemon come first, so a box that will not start can still be
/// diagnosed; the daemon's own view is added when it answers.
async fn check(path: &Path, bus: Option<&str>, json: bool) -> Exit {
    let mut checks = Vec::new();
    let mut add = |name, level, detail: String| {
        let c = Check {
            name,
            level,
            detail,
        };
        if json {
            let v = json!({"check": c.name, "status": c.level.word(), "detail": c.detail});
            out(&format!("{v}\n"));
        } else {
            let mark = match c.level {
                Level::Ok => "✔",
                Level::Warning => "‼",
                Level::Error => "✘",
            };
            out(&format!("{mark} {:<8} {}\n", c.name, c.detail));
        }
        checks.push(c);
    };
    // Where to find the daemon: as asked, else where its configuration serves it.
    let mut served = Some(config::Bus::System);
    match config::load(path) {
        Err(e) => add("config", Level::Error, format!("{}: {e}", path.display())),
        Ok(c) => {
            add("config", Level::Ok, format!("{}: valid", path.display()));
            crate::engine::use_onnxruntime_library(c.onnxruntime_library.as_deref());
            for (name, level, detail) in box_checks(&c).await {
                add(name, level, detail);
            }
            served = c.dbus.clone();
        }
    }
    let bus = match (bus, &served) {
        (Some(b), _) => b.to_string(),
        (None, Some(served)) => served.name().to_string(),
        (None, None) => {
            add(
                "daemon",
                Level::Warning,
                "not asked: the configuration serves no D-Bus interface (dbus.bus = \"none\")"
                    .into(),
            );
            return verdict(&checks);
        }
    };
    match connect(&bus, Some(CALL_TIMEOUT)).await {
        Ok(d) => match doc(d.status().await) {
            Ok(s) => {
                let summary = plain(&s["status"]);
                // The summary is `ready: ...`, with `; degraded: why` when something failed.
                let level = if summary.starts_with("ready") && !summary.contains("degraded") {
                    Level::Ok
                } else {
                    Level::Warning
                };
                add(
                    "daemon",
                    level,
                    format!("ternd {}: {summary}", plain(&s["version"])),
                );
            }
            Err(Fail(_, m)) => add("daemon", Level::Warning, format!("not answering: {m}")),
        },
        Err(Fail(_, m)) => add("daemon", Level::Warning, m),
    }
    verdict(&checks)
}

fn verdict(checks: &[Check]) -> Exit {
    if checks.iter().any(|c| c.level == Level::Error) {
        Exit::Failed
    } else {
        Exit::Ok
    }
}

async fn box_checks(c: &config::Config) -> Vec<(&'static str, Level, String)> {
    let mut v = Vec::new();
    if c.fleet.is_some() && !c.updates.enabled() {
        let why = config::UPDATES_OFF_WARNING.trim_start_matches("warning: ");
        v.push(("updates", Level::Warning, why.to_string()));
    }
    let db = c.state_dir.join("tern.db");
    let active = match db.try_exists() {
        Ok(true) => match store_check(&db) {
            Ok(active) => {
                v.push((
                    "store",
                    Level::Ok,
                    format!("{}: integrity ok", db.display()),
                ));
                active
            }
            // Not being allowed to look is not a broken store.
            Err(StoreCheck::Unreadable(e)) => {
                v.push((
                    "store",
                    Level::Warning,
                    format!(
                        "{}: cannot open it to check ({e}); run as root?",
                        db.display()
                    ),
                ));
                Vec::new()
            }
            Err(StoreCheck::Broken(e)) => {
                v.push(("store", Level::Error, format!("{}: {e}", db.display())));
                Vec::new()
            }
        },
        Ok(false) => {
            v.push((
                "store",
                Level::Warning,
                format!(
                    "{}: not created yet (ternd makes it on first start)",
                    db.display()
                ),
            ));
            Vec::new()
        }
        Err(e) => {
            v.push((
                "store",
                Level::Warning,
                format!("{}: cannot look ({e}); run as root?", db.display()),
            ));
            Vec::new()
        }
    };
    match &c.fleet {
        None => v.push(("broker", Level::Ok, "no fleet configured".into())),
        Some(f) => {
            let addr = if f.host.contains(':') {
                format!("[{}]:{}", f.host, f.port)
            } else {
                format!("{}:{}", f.host, f.port)
            };
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(&addr),
            )
            .await;
            v.push(match r {
                Ok(Ok(_)) => ("broker", Level::Ok, format!("{addr} accepts connections")),
                Ok(Err(e)) => ("broker", Level::Error, format!("{addr}: {e}")),
                Err(_) => ("broker", Level::Error, format!("{addr}: no answer in 5 s")),
            });
        }
    }
    // The versions the daemon would run: the active ones recorded in the store, else the
    // configured packages; each on the runtime the configuration gives it.
    let packages: Vec<(String, String, PathBuf)> = if active.is_empty() {
        c.models
            .iter()
            .map(|m| (m.name.clone(), m.version.to_string(), m.package.clone()))
            .collect()
    } else {
        active
    };
    let pools = c.pools();
    for (model, version, dir) in packages {
        // As the box will serve it: the pool's runtime and plans (threads do not change
        // answers, and one keeps the check quick).
        let settings = crate::engine::PoolSettings {
            threads: std::num::NonZeroUsize::MIN,
            ..pools.get(&model)
        };
        let name = format!("{model} {version}");
        let r =
            tokio::task::spawn_blocking(move || crate::engine::Model::load_for(&dir, &settings))
                .await;
        v.push(match r {
            Ok(Ok(m)) => (
                "model",
                Level::Ok,
                format!(
                    "{name}: loads and passes its self-test on {}{}",
                    m.runtime,
                    m.fallback.map(|f| format!(" ({f})")).unwrap_or_default()
                ),
            ),
            Ok(Err(e)) => ("model", Level::Error, format!("{name}: {e}")),
            Err(e) => ("model", Level::Error, format!("{name}: {e}")),
        });
    }
    let need = c.updates.min_free_bytes;
    match crate::store::disk_free_bytes(&c.state_dir) {
        Some(free) => {
            let mib = |b: u64| b / (1024 * 1024);
            let level = if free < need { Level::Error } else { Level::Ok };
            v.push((
                "disk",
                level,
                format!(
                    "{} MiB free for {} (updates need {} MiB; outbox budget {} MiB)",
                    mib(free),
                    c.state_dir.display(),
                    mib(need),
                    mib(c.outbox.budget_bytes)
                ),
            ));
        }
        None => v.push((
            "disk",
            Level::Warning,
            format!("{}: free space unknown", c.state_dir.display()),
        )),
    }
    // What the feeds need from the box; a directory was checked with the configuration.
    for f in &c.feeds {
        match f {
            config::FeedConfig::Camera(cam) => {
                v.push(ffmpeg_check("camera", &cam.name, &cam.ffmpeg))
            }
            config::FeedConfig::Audio(a) => v.push(ffmpeg_check("audio", &a.name, &a.ffmpeg)),
            config::FeedConfig::Serial(s) => v.push(if s.path.exists() {
                (
                    "feed",
                    Level::Ok,
                    format!("serial `{}`: {} is there", s.name, s.path.display()),
                )
            } else {
                (
                    "feed",
                    Level::Warning,
                    format!(
                        "serial `{}`: {} is missing (unplugged? ternd opens it when it appears)",
                        s.name,
                        s.path.display()
                    ),
                )
            }),
            config::FeedConfig::Directory { .. } | config::FeedConfig::Mqtt(_) => {}
        }
    }
    v
}

/// Whether the ffmpeg a feed runs is there.
fn ffmpeg_check(kind: &str, name: &str, ffmpeg: &Path) -> (&'static str, Level, String) {
    match find_program(ffmpeg) {
        Some(p) => (
            "feed",
            Level::Ok,
            format!("{kind} `{name}`: {}", p.display()),
        ),
        None => (
            "feed",
            Level::Error,
            format!(
                "{kind} `{name}`: {} not found{}; install ffmpeg or set `ffmpeg`",
                ffmpeg.display(),
                if ffmpeg.components().count() > 1 {
                    ""
                } else {
                    " on PATH"
                }
            ),
        ),
    }
}

/// Where a program is: a path as given, a bare name on PATH.
fn find_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

enum StoreCheck {
    Unreadable(String),
    Broken(String),
}

/// Integrity of the store, read-only, and its active versions: (name, version, directory).
fn store_check(db: &Path) -> Result<Vec<(String, String, PathBuf)>, StoreCheck> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| StoreCheck::Unreadable(e.to_string()))?;
    // Reading a WAL database needs its -shm file: a caller who may not create it cannot look.
    let r: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| match e.sqlite_error_code() {
            Some(
                rusqlite::ErrorCode::CannotOpen
                | rusqlite::ErrorCode::PermissionDenied
                | rusqlite::ErrorCode::ReadOnly,
            ) => StoreCheck::Unreadable(e.to_string()),
            _ => StoreCheck::Broken(e.to_string()),
        })?;
    if r != "ok" {
        return Err(StoreCheck::Broken(format!("integrity check: {r}")));
    }
    let mut stmt = conn
        .prepare(
            "SELECT name, version, path FROM model_versions WHERE state = 'active' ORDER BY name",
        )
        .map_err(|e| StoreCheck::Broken(e.to_string()))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                PathBuf::from(r.get::<_, String>(2)?),
            ))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StoreCheck::Broken(e.to_string()))?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_json_keeps_shape_and_order() {
        let data: Vec<f32> = (0..6).map(|i| i as f32).collect();
        assert_eq!(
            nest(&[2, 3], &data),
            json!([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
        );
        assert_eq!(
            nest(&[3, 2], &data),
            json!([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
        );
    }

    #[test]
    fn since_takes_ms_or_an_age() {
        assert_eq!(since_ms("1700000000000", 5).ok(), Some(1_700_000_000_000));
        assert_eq!(since_ms("15m", 1_000_000).ok(), Some(1_000_000 - 900_000));
        assert_eq!(since_ms("2d", 0).ok(), Some(-172_800_000));
        for bad in ["", "m", "15x", "-3h", "1.5h"] {
            assert!(since_ms(bad, 0).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "LONGER"], &[vec!["wide cell".into(), "x".into()]]);
        assert_eq!(t, "A          LONGER\nwide cell  x\n");
    }
}
