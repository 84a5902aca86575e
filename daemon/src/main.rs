//! `ternd`: run the daemon, check a configuration, or run one inference.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};

use ternd::config::{self, EXIT_CONFIG};
use ternd::engine::{Input, Model};

/// Exit code for a model that was refused or an input that could not be used (EX_DATAERR).
const EXIT_DATA: u8 = 65;

#[derive(Parser)]
#[command(name = "ternd", version = ternd::VERSION, about = "tern edge inference daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (as a systemd Type=notify service or in a terminal).
    Run {
        #[arg(long, short, default_value = "/etc/tern/ternd.toml")]
        config: PathBuf,
    },
    /// Validate a configuration and its config.d drop-ins; print every problem (exit 64 if any).
    CheckConfig {
        #[arg(long, short, default_value = "/etc/tern/ternd.toml")]
        config: PathBuf,
    },
    /// Load a model package (with its self-test) and run it on one input file.
    Infer {
        /// The model package directory (holding tern-model.toml and model.onnx).
        #[arg(long)]
        model: PathBuf,
        /// A PNG or JPEG image, an .npy tensor, an .npz of named inputs, a JSON array, a WAV or
        /// raw mono PCM (.s16le, .f32le; cut into the audio input's windows), or a folder of
        /// inputs. Audio, a folder, or an
        /// .npy with several rows for a batch-1 input runs as one stream: states and score
        /// events carry from each step to the next, and each step prints a line.
        #[arg(long)]
        input: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Threads the model may use for one inference.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Which plan: `auto` (every one that passes the golden vectors, timed; the fastest
        /// serves), `tract`, `tract+fold`, `tract+float` (a quantised model made float at
        /// load) or `onnxruntime`.
        #[arg(long, default_value = "auto", value_parser = parse_plan)]
        plan: ternd::engine::PlanChoice,
        /// Run each input this many times after one warm-up and print the median and p90 of
        /// `latency_us` and the plan, instead of the results.
        #[arg(long)]
        repeat: Option<std::num::NonZeroUsize>,
    },
    /// Install a signed update bundle (a `tern-update bundle` file) with the same checks as an
    /// update from the fleet: here if no ternd runs on the state directory, else through it.
    Install {
        #[arg(long, short, default_value = "/etc/tern/ternd.toml")]
        config: PathBuf,
        /// The bundle file.
        bundle: PathBuf,
        /// How long to wait for a running ternd to finish the update (health window included).
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
    /// Print the version of ternd and of its inference engine.
    Version,
}

fn main() -> ExitCode {
    // Installed as one executable with a `ternctl` symlink: tract is stored once on the box.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if Path::new(&argv0).file_name() == Some("ternctl".as_ref()) {
        return ternd::ctl::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::Infer {
            model,
            input,
            json,
            threads,
            plan,
            repeat,
        } => infer(&model, &input, json, threads, plan, repeat),
        Command::Install {
            config,
            bundle,
            wait_secs,
        } => install(&config, &bundle, wait_secs),
        Command::Version => {
            println!("ternd {} (tract-onnx 0.23)", ternd::VERSION);
            ExitCode::SUCCESS
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(c) => {
            println!(
                "{}: OK ({} model(s), {} feed(s), {} pipeline(s); state in {})",
                path.display(),
                c.models.len(),
                c.feeds.len(),
                c.pipelines.len(),
                c.state_dir.display()
            );
            match &c.fleet {
                Some(f) => println!(
                    "fleet: {} at {}:{}{}, {} command key(s)",
                    f.device,
                    f.host,
                    f.port,
                    if f.tls.is_some() { " (TLS)" } else { "" },
                    f.commands.keys.len()
                ),
                None => println!("fleet: none (no [fleet] table)"),
            }
            if c.updates.enabled() {
                println!(
                    "updates: {} trusted key(s), threshold {}, health window {} s",
                    c.updates.keys.len(),
                    c.updates.threshold,
                    c.updates.health_window.as_secs()
                );
            } else {
                println!("updates: off (no updates.keys)");
                if c.fleet.is_some() {
                    println!("{}", ternd::config::UPDATES_OFF_WARNING);
                }
            }
            match &c.dbus {
                Some(config::Bus::System) => println!("dbus: io.tern.Daemon1 on the system bus"),
                Some(config::Bus::Session) => println!("dbus: io.tern.Daemon1 on the session bus"),
                Some(config::Bus::Address(a)) => println!("dbus: io.tern.Daemon1 at {a}"),
                None => println!("dbus: off"),
            }
            match c.metrics {
                Some(a) => println!("metrics: http://{a}/metrics"),
                None => println!("metrics: off"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ternd: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    // RUST_LOG, when set, wins over the config so a developer can turn up one module.
    let from_env = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::new(from_env.as_deref().unwrap_or(&config.log_level));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only for a person at a terminal, not in the journal or a log file.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .init();
    let log_reload: ternd::control::LogReload = Box::new(move |level: &str| {
        use ternd::control::BadFilter;
        if from_env.is_some() {
            return Ok(());
        }
        let f = EnvFilter::try_new(level).map_err(|e| BadFilter(e.to_string()))?;
        handle.reload(f).map_err(|e| BadFilter(e.to_string()))
    });
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(ternd::service::run(path, config, log_reload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ternd: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn install(path: &Path, bundle: &Path, wait_secs: u64) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ternd: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    // Verified here (the daemon stopped) with the plans the box will serve with.
    ternd::engine::use_onnxruntime_library(config.onnxruntime_library.as_deref());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let wait = std::time::Duration::from_secs(wait_secs);
    let fail = |e: &dyn std::fmt::Display, code: u8| {
        eprintln!("ternd install: {e}");
        ExitCode::from(code)
    };
    if !config.updates.enabled() {
        let e = "updates.keys is empty in the configuration: no bundle can be trusted";
        return fail(&e, 1);
    }
    if let Err(e) = std::fs::create_dir_all(&config.state_dir) {
        return fail(&format!("{}: {e}", config.state_dir.display()), 1);
    }
    // Run as root on a state directory the service user owns, everything this creates
    // (database, staging, model folders) would be root's, and the daemon could not use it:
    // become the directory's owner first, with a copy of the bundle root may read and it may
    // not. Before the runtime starts threads.
    let mut bundle = bundle.to_path_buf();
    let _copy = match as_state_owner(&config.state_dir, &bundle) {
        Ok(Some(copy)) => {
            bundle = copy.path().to_path_buf();
            Some(copy)
        }
        Ok(None) => None,
        Err(e) => return fail(&e, 1),
    };
    let bundle = bundle.as_path();
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    // The same checks either way: here with the daemon stopped, through it when it runs.
    let row = match ternd::service::lock_state_dir(&config.state_dir) {
        Ok(_lock) => match runtime.block_on(ternd::update::install_here(&config, bundle)) {
            Ok(row) => row,
            Err(e @ ternd::update::HereError::Refused { .. }) => return fail(&e, EXIT_DATA),
            Err(e) => return fail(&e, 1),
        },
        Err(ternd::service::ServiceError::Locked { .. }) => {
            let Some(bus) = &config.dbus else {
                let e = "ternd runs on this state directory and serves no D-Bus interface \
                         (dbus.bus = \"none\"): stop it, or let it serve [dbus], to install";
                return fail(&e, 1);
            };
            eprintln!(
                "ternd install: handing the bundle to the running ternd; waiting for the update to end"
            );
            match runtime.block_on(ternd::ctl::install_through_daemon(bus, bundle, wait)) {
                Ok(row) => row,
                Err(e) => return fail(&e, 1),
            }
        }
        Err(e) => return fail(&e, 1),
    };
    println!("{row}");
    match row.get("state").and_then(|s| s.as_str()) {
        Some("health" | "committed") => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_DATA),
    }
}

/// As root on a state directory owned by another user: copy the bundle into it for that user,
/// then become that user (groups, group, user). The copy is removed when dropped.
fn as_state_owner(
    state_dir: &Path,
    bundle: &Path,
) -> Result<Option<tempfile::NamedTempFile>, String> {
    use nix::unistd::{Gid, Uid, fchown, setgid, setgroups, setuid};
    use std::os::unix::fs::MetadataExt as _;
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let meta = std::fs::metadata(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let (uid, gid) = (Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid()));
    if uid.is_root() {
        return Ok(None);
    }
    let mut copy = tempfile::Builder::new()
        .prefix(".install-")
        .suffix(".bundle")
        .tempfile_in(state_dir)
        .map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let mut src = std::fs::File::open(bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
    std::io::copy(&mut src, copy.as_file_mut())
        .and_then(|_| copy.as_file().sync_all())
        .map_err(|e| {
            format!(
                "copying {} into {}: {e}",
                bundle.display(),
                state_dir.display()
            )
        })?;
    fchown(copy.as_file(), Some(uid), Some(gid)).map_err(|e| format!("chown: {e}"))?;
    setgroups(&[gid])
        .and_then(|()| setgid(gid))
        .and_then(|()| setuid(uid))
        .map_err(|e| {
            format!(
                "becoming uid {uid}, the owner of {}: {e}",
                state_dir.display()
            )
        })?;
    eprintln!(
        "ternd install: running as uid {uid} (gid {gid}), the owner of {}",
        state_dir.display()
    );
    Ok(Some(copy))
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("ternd: cannot start the runtime: {e}");
            None
        }
    }
}

fn parse_plan(s: &str) -> Result<ternd::engine::PlanChoice, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("`{s}`: expected auto, tract, tract+fold, tract+float or onnxruntime"))
}

fn infer(
    model: &Path,
    input: &Path,
    json: bool,
    threads: usize,
    plan: ternd::engine::PlanChoice,
    repeat: Option<std::num::NonZeroUsize>,
) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("ternd: {e}");
        ExitCode::from(EXIT_DATA)
    };
    let Some(threads) = std::num::NonZeroUsize::new(threads) else {
        eprintln!("ternd: --threads must be at least 1");
        return ExitCode::from(EXIT_CONFIG as u8);
    };
    let settings = ternd::engine::PoolSettings {
        threads,
        plan,
        ..Default::default()
    };
    let model = match Model::load_for(model, &settings) {
        Ok(m) => m,
        Err(e) => return fail(&e),
    };
    let (steps, sequence) = match infer_steps(&model, input) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if let Some(n) = repeat {
        return infer_repeat(&model, &steps, n.get(), json);
    }
    let mut stream = model.stream();
    for (i, (start, input)) in steps.iter().enumerate() {
        let pred = match model.infer_in(input, &mut stream) {
            Ok(p) => p,
            Err(e) if sequence => return fail(&format!("step {i}: {e}")),
            Err(e) => return fail(&e),
        };
        if json {
            let mut v = serde_json::to_value(&pred).expect("predictions serialise");
            v["plan"] = model.plan.into();
            if sequence {
                v["step"] = i.into();
                if let Some(s) = start {
                    v["start_s"] = (*s).into();
                }
            }
            println!("{v}");
            continue;
        }
        if sequence {
            match start {
                Some(s) => println!("step {i} at {s:.3} s"),
                None => println!("step {i}"),
            }
        }
        println!(
            "{} {}  ({} µs, plan {})",
            pred.model, pred.version, pred.latency_us, model.plan
        );
        if !pred.top.is_empty() && pred.outputs.is_empty() {
            println!("{:>5}  {:<16} {:>8}", "rank", "label", "score");
            for (i, c) in pred.top.iter().enumerate() {
                println!("{:>5}  {:<16} {:>8.4}", i + 1, c.label, c.score);
            }
        }
        for (name, v) in &pred.outputs {
            println!("  {name}: {}", summary(v));
        }
    }
    ExitCode::SUCCESS
}

/// `--repeat`: every step run `n` times after a warm-up (a stream's steps in order, its state
/// carried), then the median and p90 of tern's own `latency_us`.
fn infer_repeat(model: &Model, steps: &[(Option<f64>, Input)], n: usize, json: bool) -> ExitCode {
    let mut latencies = Vec::with_capacity(n * steps.len());
    for round in 0..=n {
        let mut stream = model.stream();
        for (_, input) in steps {
            match model.infer_in(input, &mut stream) {
                Ok(p) if round > 0 => latencies.push(p.latency_us),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("ternd: {e}");
                    return ExitCode::from(EXIT_DATA);
                }
            }
        }
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let (median, p90) = (at(0.5), at(0.9));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "model": model.name(),
                "version": model.version().to_string(),
                "plan": model.plan,
                "runs": latencies.len(),
                "median_us": median,
                "p90_us": p90,
                "plans_tried": model.timings,
            })
        );
    } else {
        println!(
            "{} {}  plan {}: median {median} µs, p90 {p90} µs over {} runs",
            model.name(),
            model.version(),
            model.plan,
            latencies.len()
        );
        for t in &model.timings {
            println!("  tried {t}");
        }
    }
    ExitCode::SUCCESS
}

/// One line about a postprocessed output, for people.
fn summary(v: &serde_json::Value) -> String {
    if let Some(t) = v.get("text") {
        return format!("text {t} (score {:.3})", v["score"].as_f64().unwrap_or(0.0));
    }
    if let Some(b) = v.get("boxes").and_then(|b| b.as_array()) {
        let list: Vec<String> = b
            .iter()
            .map(|b| format!("[{} {} {} {}]", b["x0"], b["y0"], b["x1"], b["y1"]))
            .collect();
        return format!("{} box(es) {}", b.len(), list.join(" "));
    }
    if let Some(top) = v.get("top").and_then(|t| t.as_array()) {
        let list: Vec<String> = top
            .iter()
            .map(|c| {
                format!(
                    "{} {:.4}",
                    c["label"].as_str().unwrap_or("?"),
                    c["score"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        return list.join(", ");
    }
    v.to_string()
}

/// Steps `ternd infer` runs, each with its start time for audio.
type Steps = Vec<(Option<f64>, Input)>;

/// The inputs `ternd infer` runs, in order, and whether they are a stream (audio, a folder,
/// rows of an .npy) even if it has one step, so its output has the same form at any length.
fn infer_steps(model: &Model, path: &Path) -> Result<(Steps, bool), ternd::engine::EngineError> {
    use ternd::engine::EngineError;
    let max = config::DEFAULT_MAX_FILE_BYTES;
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| EngineError::Unreadable {
                message: format!("{}: {e}", path.display()),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::Input {
                message: format!("{}: the folder holds no input files", path.display()),
            });
        }
        return files
            .iter()
            .map(|f| Input::from_file(f, max).map(|i| (None, i)))
            .collect::<Result<_, _>>()
            .map(|s| (s, true));
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let audio = match ext.as_str() {
        "wav" => Some(None),
        "s16le" => Some(Some(ternd::engine::Pcm::S16le)),
        "f32le" => Some(Some(ternd::engine::Pcm::F32le)),
        _ => None,
    };
    if let Some(pcm) = audio {
        let bytes = ternd::engine::read_bounded(path, max)?;
        let windows = ternd::engine::audio_windows(&model.manifest, &bytes, pcm)
            .map_err(|e| EngineError::Input {
                message: format!("{}: {e}", path.display()),
            })?
            .into_iter()
            .map(|(s, i)| (Some(s), i))
            .collect();
        return Ok((windows, true));
    }
    let input = Input::from_file(path, max)?;
    // Several rows for an input that takes one: a sequence, one row per step.
    if let Input::Tensor { shape, data } = &input
        && let Some(spec) = model.manifest.primary()
        && spec.shape.first() == Some(&ternd::engine::Dim::Fixed(1))
        && shape.len() == spec.shape.len()
        && shape[0] > 1
    {
        let row: Vec<usize> = std::iter::once(1)
            .chain(shape[1..].iter().copied())
            .collect();
        let n: usize = row.iter().product();
        let rows = data
            .chunks(n.max(1))
            .map(|c| {
                (
                    None,
                    Input::Tensor {
                        shape: row.clone(),
                        data: c.to_vec(),
                    },
                )
            })
            .collect();
        return Ok((rows, true));
    }
    Ok((vec![(None, input)], false))
}
