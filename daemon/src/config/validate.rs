//! From the raw TOML to a [`Config`]: one function per section, each turning raw values into
//! typed ones and reporting every problem with its key (the caller adds file and line).
//! Sections that refer to others (pipelines to feeds and models, MQTT feeds to the fleet's
//! broker) take what those validated to.

use std::collections::HashSet;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};

use super::*;

/// Where a section says what is wrong: a key path and a message.
type Report<'a> = dyn FnMut(String, String) + 'a;
/// A path from the configuration made absolute (relative to the file that holds it).
type Resolve<'a> = dyn Fn(&Path) -> PathBuf + 'a;

pub(super) fn validate(
    raw: RawConfig,
    base: &Path,
    sources: &[Source],
) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut report = |key: String, message: String| {
        let (file, line) = locate(sources, &key);
        problems.push(Problem {
            file,
            line,
            key,
            message,
        });
    };
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let state_dir = resolve(
        raw.state_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_STATE_DIR)),
    );
    let log_level = log(&raw.log, &mut report);
    let engine_pool = engine(&raw.engine, raw.models.len(), cpus());
    // A model that sets its own threads gets its share of the CPUs in workers of that many,
    // unless workers are set.
    let share = |threads: NonZeroUsize| match raw.engine.workers {
        Some(w) => w,
        None => {
            engine(
                &RawEngine {
                    threads: Some(threads),
                    ..RawEngine::default()
                },
                raw.models.len(),
                cpus(),
            )
            .workers
        }
    };
    let models = models(&raw.models, engine_pool, &share, &resolve, &mut report);
    let fleet = raw
        .fleet
        .as_ref()
        .and_then(|f| validate_fleet(f, &resolve, &mut report));
    let feeds = feeds(&raw, fleet.as_ref(), &resolve, &mut report);
    // Every feed named, even one that did not validate: its own problem is reported, and a
    // pipeline reading it is not a second one.
    let feed_names: HashSet<&str> = raw.feeds.iter().map(RawFeed::name).collect();
    let pipelines = pipelines(&raw.pipelines, &feeds, &feed_names, &models, &mut report);
    feed_readers(&feeds, &pipelines, &mut report);
    let outbox = outbox(&raw.outbox, &mut report);
    let store = store(&raw.store, &mut report);
    let onnxruntime_library = raw.engine.onnxruntime_library.as_deref().map(&resolve);
    if let Some(p) = &onnxruntime_library
        && !p.is_file()
    {
        report(
            "engine.onnxruntime_library".into(),
            format!("{} is not a file", p.display()),
        );
    }
    let updates = validate_updates(&raw.updates, &mut report);
    let dbus = dbus(&raw.dbus, &mut report);
    let metrics =
        raw.metrics
            .listen
            .as_deref()
            .and_then(|a| match a.parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.port() == 0 => {
                    report(
                        "metrics.listen".into(),
                        format!("`{a}`: port 0 would be any port; give the one Prometheus scrapes"),
                    );
                    None
                }
                Ok(addr) => Some(addr),
                Err(_) => {
                    report(
                        "metrics.listen".into(),
                        format!("`{a}` is not an IP address and port (e.g. \"127.0.0.1:9464\")"),
                    );
                    None
                }
            });
    let home_assistant = raw
        .home_assistant
        .as_ref()
        .and_then(|h| home_assistant(h, raw.fleet.is_some(), &pipelines, &mut report));
    if problems.is_empty() {
        Ok(Config {
            state_dir,
            log_level,
            models,
            feeds,
            pipelines,
            fleet,
            outbox,
            updates,
            dbus,
            dbus_asked: raw.dbus.bus.is_some(),
            metrics,
            home_assistant,
            engine: engine_pool,
            onnxruntime_library,
            store,
        })
    } else {
        Err(ConfigError(problems))
    }
}

/// `[pipelines.drift]`: a window a baseline can be learned from, a threshold a score can
/// reach, a confidence.
fn drift(
    d: &RawDrift,
    key: &dyn Fn(&str) -> String,
    report: &mut Report<'_>,
) -> crate::drift::DriftConfig {
    use crate::drift::{DEFAULT_THRESHOLD, DEFAULT_WINDOW, DriftConfig};
    const WINDOWS: std::ops::RangeInclusive<usize> = 10..=100_000;
    let window = d.window.unwrap_or(DEFAULT_WINDOW);
    if !WINDOWS.contains(&window) {
        report(
            key("drift.window"),
            format!(
                "{window} results: give {} to {} (fewer say nothing of a distribution)",
                WINDOWS.start(),
                WINDOWS.end()
            ),
        );
    }
    let threshold = d.threshold.unwrap_or(DEFAULT_THRESHOLD);
    if !(threshold.is_finite() && threshold > 0.0) {
        report(
            key("drift.threshold"),
            format!("{threshold} is not a drift score above 0 (PSI; 0.25 is a significant shift)"),
        );
    }
    if let Some(c) = d.capture_below
        && !(0.0..=1.0).contains(&c)
    {
        report(
            key("drift.capture_below"),
            format!("{c} is not a confidence from 0 to 1"),
        );
    }
    DriftConfig {
        window,
        threshold,
        capture_below: d.capture_below,
    }
}

/// `[home_assistant]`: a discovery prefix Home Assistant can subscribe to, and classes of
/// pipelines this config has.
fn home_assistant(
    raw: &RawHomeAssistant,
    fleet: bool,
    pipelines: &[PipelineConfig],
    report: &mut Report<'_>,
) -> Option<HomeAssistant> {
    let mut ok = true;
    let mut bad = |key: &str, why: String| {
        ok = false;
        report(format!("home_assistant.{key}"), why);
    };
    if !fleet {
        bad(
            "discovery_prefix",
            "discovery messages go to the fleet broker: add a [fleet] section".into(),
        );
    }
    let p = &raw.discovery_prefix;
    if p.is_empty() || p.starts_with('/') || p.ends_with('/') || p.contains(['+', '#', '\0']) {
        bad(
            "discovery_prefix",
            format!(
                "`{p}` must be a topic without wildcards or a leading/trailing `/` (e.g. \"homeassistant\")"
            ),
        );
    } else if p.len() > 256 {
        bad(
            "discovery_prefix",
            format!("{} bytes: at most 256", p.len()),
        );
    }
    for (pipeline, labels) in &raw.classes {
        if !pipelines.iter().any(|c| &c.name == pipeline) {
            bad(
                &format!("classes.{pipeline}"),
                format!("no pipeline is called `{pipeline}`"),
            );
        }
        for (i, l) in labels.iter().enumerate() {
            if l.is_empty() || l.len() > 128 {
                bad(
                    &format!("classes.{pipeline}[{i}]"),
                    "a label must be 1 to 128 bytes".into(),
                );
            } else if labels[..i].contains(l) {
                bad(
                    &format!("classes.{pipeline}[{i}]"),
                    format!("`{l}` is listed twice"),
                );
            }
        }
    }
    ok.then(|| HomeAssistant {
        discovery_prefix: p.clone(),
        classes: raw.classes.clone(),
    })
}

/// `[log]`: a filter tracing takes.
fn log(raw: &RawLog, report: &mut Report<'_>) -> String {
    let level = raw
        .level
        .clone()
        .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        report(
            "log.level".into(),
            format!("`{level}` is not a log filter: {e}"),
        );
    }
    level
}

/// CPUs this process may run on (its affinity mask and cgroup quota included).
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `[engine]`: every model's pool settings unless the model says otherwise. By default the
/// CPUs are shared out between the configured models as workers of `threads` threads each
/// (one by default): at batch 1, requests in parallel (a pipeline keeps several in flight)
/// use a core each fully, while a second thread inside one inference gains far less (README,
/// "Threads").
fn engine(raw: &RawEngine, models: usize, cpus: usize) -> PoolSettings {
    let defaults = PoolSettings::default();
    let threads = raw.threads.unwrap_or(defaults.threads);
    let share =
        NonZeroUsize::new(cpus / (models.max(1) * threads.get())).unwrap_or(NonZeroUsize::MIN);
    PoolSettings {
        threads,
        workers: raw.workers.unwrap_or(share),
        queue: raw.queue.unwrap_or(defaults.queue),
        runtime: raw.runtime.unwrap_or(defaults.runtime),
        plan: raw.plan.unwrap_or(defaults.plan),
    }
}

/// `[[models]]`: each package's manifest read, each name once.
fn models(
    raw: &[RawModel],
    engine: PoolSettings,
    share: &dyn Fn(NonZeroUsize) -> NonZeroUsize,
    resolve: &Resolve<'_>,
    report: &mut Report<'_>,
) -> Vec<ModelConfig> {
    let mut models = Vec::new();
    let mut names = HashSet::new();
    for (i, m) in raw.iter().enumerate() {
        let package = resolve(&m.package);
        let manifest = match Manifest::read(&package) {
            Ok(manifest) => manifest,
            Err(e) => {
                report(format!("models[{i}].package"), e.to_string());
                continue;
            }
        };
        if !names.insert(manifest.name.clone()) {
            report(
                format!("models[{i}].package"),
                format!("model `{}` is configured twice", manifest.name),
            );
        }
        models.push(ModelConfig {
            package,
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            pool: PoolSettings {
                threads: m.threads.unwrap_or(engine.threads),
                workers: m.workers.unwrap_or_else(|| match m.threads {
                    Some(t) => share(t),
                    None => engine.workers,
                }),
                queue: m.queue.unwrap_or(engine.queue),
                runtime: m.runtime.unwrap_or(engine.runtime),
                plan: m.plan.unwrap_or(engine.plan),
            },
        });
    }
    models
}

/// `[[feeds]]`: each name once, each kind's settings.
fn feeds(
    raw: &RawConfig,
    fleet: Option<&FleetConfig>,
    resolve: &Resolve<'_>,
    report: &mut Report<'_>,
) -> Vec<FeedConfig> {
    let mut feeds = Vec::new();
    let mut names = HashSet::new();
    for (i, f) in raw.feeds.iter().enumerate() {
        let name = f.name();
        if !names.insert(name) {
            report(
                format!("feeds[{i}].name"),
                format!("feed `{name}` is defined twice"),
            );
        }
        let key = |k: &str| format!("feeds[{i}].{k}");
        let feed = match f {
            RawFeed::Camera { .. } => Some(camera(f, &key, resolve, report)),
            RawFeed::Serial { .. } => Some(serial(f, &key, resolve, report)),
            RawFeed::Mqtt { .. } => mqtt_feed(f, &key, fleet, raw.fleet.is_some(), report),
            RawFeed::Directory { .. } => Some(directory(f, &key, resolve, report)),
            RawFeed::Audio { .. } => Some(audio(f, &key, resolve, report)),
        };
        feeds.extend(feed);
    }
    feeds
}

fn camera(
    f: &RawFeed,
    key: &dyn Fn(&str) -> String,
    resolve: &Resolve<'_>,
    report: &mut Report<'_>,
) -> FeedConfig {
    let RawFeed::Camera {
        name,
        input,
        format,
        input_args,
        fps,
        stall_secs,
        ffmpeg,
    } = f
    else {
        unreachable!("a camera")
    };
    if input.is_empty() {
        report(key("input"), "must not be empty".into());
    }
    if let Some(f) = fps
        && !(f.is_finite() && *f > 0.0 && *f <= 1000.0)
    {
        report(
            key("fps"),
            format!("{f} is not a frame rate: give 0 < fps <= 1000"),
        );
    }
    // A slow sampling rate needs a longer wait for its frames.
    let gap = fps.filter(|f| f.is_finite() && *f > 0.0).map(|f| 1.0 / f);
    let default_stall = DEFAULT_STALL_SECS.max(gap.map_or(0.0, |g| 3.0 * g));
    let mut stall = stall_secs.unwrap_or(default_stall);
    if !(stall.is_finite() && (0.1..=3600.0).contains(&stall)) {
        report(
            key("stall_secs"),
            format!("{stall} is not a timeout: give 0.1 to 3600 seconds"),
        );
        stall = default_stall;
    } else if let Some(g) = gap
        && stall <= 2.0 * g
    {
        report(
            key("stall_secs"),
            format!(
                "{stall} s is too short for frames every {g:.2} s (fps): give more than {:.2}",
                2.0 * g
            ),
        );
    }
    FeedConfig::Camera(CameraConfig {
        name: name.clone(),
        input: input.clone(),
        format: format.clone(),
        input_args: input_args.clone(),
        fps: *fps,
        stall: std::time::Duration::from_secs_f64(stall.clamp(0.1, 3600.0)),
        // A bare name is looked up on PATH; a path is relative to this file.
        ffmpeg: program(ffmpeg.as_ref(), resolve),
    })
}

fn audio(
    f: &RawFeed,
    key: &dyn Fn(&str) -> String,
    resolve: &Resolve<'_>,
    report: &mut Report<'_>,
) -> FeedConfig {
    let RawFeed::Audio {
        name,
        input,
        format,
        input_args,
        stall_secs,
        ffmpeg,
    } = f
    else {
        unreachable!("an audio feed")
    };
    if input.is_empty() {
        report(key("input"), "must not be empty".into());
    }
    let mut stall = stall_secs.unwrap_or(DEFAULT_AUDIO_STALL_SECS);
    if !(stall.is_finite() && (0.1..=3600.0).contains(&stall)) {
        report(
            key("stall_secs"),
            format!("{stall} is not a timeout: give 0.1 to 3600 seconds"),
        );
        stall = DEFAULT_AUDIO_STALL_SECS;
    }
    FeedConfig::Audio(AudioConfig {
        name: name.clone(),
        input: input.clone(),
        format: format.clone(),
        input_args: input_args.clone(),
        stall: std::time::Duration::from_secs_f64(stall),
        ffmpeg: program(ffmpeg.as_ref(), resolve),
    })
}

/// `ffmpeg` as configured: a bare name is looked up on PATH, a path is taken from the
/// configuration's folder.
fn program(p: Option<&PathBuf>, resolve: &Resolve<'_>) -> PathBuf {
    match p {
        Some(p) if p.components().count() > 1 => resolve(p),
        Some(p) => p.clone(),
        None => PathBuf::from("ffmpeg"),
    }
}

/// A PCM stream's rate: required with a PCM format, refused with any other.
fn sample_rate(
    pcm: bool,
    rate: Option<u32>,
    fields: &[String],
    key: &dyn Fn(&str) -> String,
    report: &mut Report<'_>,
) {
    match (pcm, rate) {
        (true, None) => report(
            key("sample_rate"),
            "a PCM stream needs its samples per second (the model's rate)".into(),
        ),
        (true, Some(r)) if !(1000..=384_000).contains(&r) => report(
            key("sample_rate"),
            format!("{r} is not 1000 to 384000 samples per second"),
        ),
        (false, Some(_)) => report(
            key("sample_rate"),
            "only a PCM stream (`format = \"s16le\"` or `\"f32le\"`) has a sample rate".into(),
        ),
        _ => {}
    }
    if pcm && !fields.is_empty() {
        report(
            key("fields"),
            "a PCM stream is samples, not readings with named fields".into(),
        );
    }
}

fn serial(
    f: &RawFeed,
    key: &dyn Fn(&str) -> String,
    resolve: &Resolve<'_>,
    report: &mut Report<'_>,
) -> FeedConfig {
    let RawFeed::Serial {
        name,
        path,
        baud,
        data_bits,
        parity,
        stop_bits,
        format,
        fields,
        max_line_bytes,
        sample_rate: rate,
    } = f
    else {
        unreachable!("a serial port")
    };
    let pcm = matches!(format, LineFormat::S16le | LineFormat::F32le);
    sample_rate(pcm, *rate, fields, key, report);
    let data_bits = data_bits.unwrap_or(8);
    if !(5..=8).contains(&data_bits) {
        report(key("data_bits"), format!("{data_bits} is not 5, 6, 7 or 8"));
    }
    let stop_bits = stop_bits.unwrap_or(1);
    if !(1..=2).contains(&stop_bits) {
        report(key("stop_bits"), format!("{stop_bits} is not 1 or 2"));
    }
    let baud = baud.unwrap_or(DEFAULT_BAUD);
    if baud == 0 {
        report(key("baud"), "must be above 0".into());
    }
    if !pcm {
        check_fields(fields, &key("fields"), true, report);
    }
    let max_line_bytes = max_line_bytes.unwrap_or(DEFAULT_MAX_LINE_BYTES);
    if !(16..=1024 * 1024).contains(&max_line_bytes) {
        report(
            key("max_line_bytes"),
            format!("{max_line_bytes} is not 16 to 1048576"),
        );
    }
    FeedConfig::Serial(SerialConfig {
        name: name.clone(),
        path: resolve(path),
        baud,
        data_bits,
        parity: parity.unwrap_or_default(),
        stop_bits,
        format: *format,
        fields: fields.clone(),
        max_line_bytes,
        sample_rate: *rate,
    })
}

/// An MQTT feed, on its own broker or the fleet's; `None` when it has none.
fn mqtt_feed(
    f: &RawFeed,
    key: &dyn Fn(&str) -> String,
    fleet: Option<&FleetConfig>,
    fleet_configured: bool,
    report: &mut Report<'_>,
) -> Option<FeedConfig> {
    let RawFeed::Mqtt {
        name,
        topic,
        broker,
        format,
        fields,
        max_payload_bytes,
        sample_rate: rate,
    } = f
    else {
        unreachable!("an MQTT feed")
    };
    let pcm = matches!(format, PayloadFormat::S16le | PayloadFormat::F32le);
    sample_rate(pcm, *rate, fields, key, report);
    if let Some(why) = topic_filter_problem(topic) {
        report(key("topic"), format!("`{topic}` {why}"));
    }
    check_fields(fields, &key("fields"), false, report);
    let max_payload_bytes = max_payload_bytes.unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES);
    if !(1..=64 * 1024 * 1024).contains(&max_payload_bytes) {
        report(
            key("max_payload_bytes"),
            format!("{max_payload_bytes} is not 1 to 67108864"),
        );
    }
    let (host, port, tls, credentials, client_id) = mqtt_endpoint(
        name,
        broker.as_deref(),
        key,
        fleet,
        fleet_configured,
        report,
    )?;
    Some(FeedConfig::Mqtt(MqttFeedConfig {
        name: name.clone(),
        topic: topic.clone(),
        host,
        port,
        tls,
        credentials,
        client_id,
        format: *format,
        fields: fields.clone(),
        max_payload_bytes,
        sample_rate: *rate,
    }))
}

/// Host, port, TLS, login and client id of a broker connection.
type Endpoint = (
    String,
    u16,
    Option<TlsConfig>,
    Option<(String, String)>,
    String,
);

/// Where an MQTT feed connects: its own broker, or the fleet's with the fleet's TLS and login;
/// `None` when it has none (reported unless the fleet's own section failed).
fn mqtt_endpoint(
    name: &str,
    broker: Option<&str>,
    key: &dyn Fn(&str) -> String,
    fleet: Option<&FleetConfig>,
    fleet_configured: bool,
    report: &mut Report<'_>,
) -> Option<Endpoint> {
    let suffix = format!("-feed-{name}");
    match (broker, fleet) {
        (Some(url), _) => {
            // Unique per box on a shared broker: the fleet's client id, else the host's name.
            let base_id = match fleet {
                Some(f) => f.client_id.clone(),
                None => format!(
                    "tern-{}",
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .unwrap_or_default()
                        .trim()
                ),
            };
            match parse_broker(url) {
                Ok((host, port, tls)) => {
                    let tls = tls.then_some(TlsConfig {
                        ca_file: None,
                        client: None,
                    });
                    Some((host, port, tls, None, format!("{base_id}{suffix}")))
                }
                Err(e) => {
                    report(key("broker"), e.to_string());
                    None
                }
            }
        }
        (None, Some(f)) => Some((
            f.host.clone(),
            f.port,
            f.tls.clone(),
            f.credentials.clone(),
            format!("{}{suffix}", f.client_id),
        )),
        (None, None) => {
            if !fleet_configured {
                report(
                    key("broker"),
                    "no broker: give one, or configure [fleet]".into(),
                );
            }
            None
        }
    }
}

fn directory(
    f: &RawFeed,
    key: &dyn Fn(&str) -> String,
    resolve: &Resolve<'_>,
    report: &mut Report<'_>,
) -> FeedConfig {
    let RawFeed::Directory {
        name,
        path,
        extensions,
        max_file_bytes,
        on_done,
    } = f
    else {
        unreachable!("a directory")
    };
    let path = resolve(path);
    if !path.is_dir() {
        report(
            key("path"),
            format!("`{}` is not a directory", path.display()),
        );
    }
    let extensions = extensions
        .clone()
        .unwrap_or_else(|| DEFAULT_EXTENSIONS.iter().map(|s| s.to_string()).collect())
        .into_iter()
        .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
        .collect();
    let max_file_bytes = max_file_bytes.unwrap_or(DEFAULT_MAX_FILE_BYTES);
    if max_file_bytes == 0 {
        report(key("max_file_bytes"), "must be above 0".into());
    }
    FeedConfig::Directory {
        name: name.clone(),
        path,
        extensions,
        max_file_bytes,
        on_done: *on_done,
    }
}

/// `[[pipelines]]`: each name once and usable as a topic level, its feed and model known.
fn pipelines(
    raw: &[RawPipeline],
    feeds: &[FeedConfig],
    feed_names: &HashSet<&str>,
    models: &[ModelConfig],
    report: &mut Report<'_>,
) -> Vec<PipelineConfig> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        if let Some(why) = topic_level_problem(&p.name) {
            // The name is a topic level: tern/<device>/results/<pipeline>.
            report(
                format!("pipelines[{i}].name"),
                format!("`{}` {why}", p.name),
            );
        }
        if !names.insert(p.name.clone()) {
            report(
                format!("pipelines[{i}].name"),
                format!("pipeline `{}` is defined twice", p.name),
            );
        }
        if !feed_names.contains(p.feed.as_str()) {
            report(
                format!("pipelines[{i}].feed"),
                format!("no feed named `{}` is configured", p.feed),
            );
        }
        if !models.iter().any(|m| m.name == p.model) {
            let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            report(
                format!("pipelines[{i}].model"),
                format!(
                    "no model named `{}` is configured (configured: {})",
                    p.model,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        for (j, s) in p.stages.iter().enumerate() {
            if !models.iter().any(|m| m.name == s.model) {
                report(
                    format!("pipelines[{i}].stages[{j}].model"),
                    format!("no model named `{}` is configured", s.model),
                );
            }
        }
        out.push(pipeline(i, p, feeds, report));
    }
    out
}

/// One pipeline's own settings, checked against its feed's kind.
fn pipeline(
    i: usize,
    p: &RawPipeline,
    feeds: &[FeedConfig],
    report: &mut Report<'_>,
) -> PipelineConfig {
    let feed = feeds.iter().find(|f| f.name() == p.feed);
    let key = |k: &str| format!("pipelines[{i}].{k}");
    if let Some(fps) = p.max_fps
        && !(fps.is_finite() && fps > 0.0)
    {
        report(key("max_fps"), format!("{fps} is not a rate above 0"));
    }
    let window = p.window.unwrap_or(NonZeroUsize::MIN);
    let readings = feed.is_some_and(|f| !f.fields().is_empty());
    let sound = feed.is_some_and(|f| f.pcm().is_some());
    if sound {
        // Thinning or dropping pieces of a sound would join samples that do not follow each
        // other into one stream.
        for (k, set) in [
            ("every_nth", p.every_nth.is_some()),
            ("max_fps", p.max_fps.is_some()),
            ("on_full", p.on_full == Some(OnFull::DropOldest)),
        ] {
            if set {
                report(
                    key(k),
                    format!(
                        "feed `{}` streams sound: its samples are never thinned or dropped",
                        p.feed
                    ),
                );
            }
        }
    }
    if !p.stages.is_empty() && (sound || readings) {
        report(
            key("stages"),
            format!(
                "feed `{}` gives no images: stages run on crops of images",
                p.feed
            ),
        );
    }
    if let Some(ms) = p.stop_after_ms
        && ms > 60_000
    {
        report(key("stop_after_ms"), format!("{ms} is more than a minute"));
    }
    if (p.hop.is_some() || p.stop_after_ms.is_some()) && feed.is_some() && !sound {
        report(
            key(if p.hop.is_some() {
                "hop"
            } else {
                "stop_after_ms"
            }),
            format!(
                "feed `{}` gives no sound: `hop` and `stop_after_ms` are for audio feeds and PCM streams",
                p.feed
            ),
        );
    }
    if (p.window.is_some() || p.stride.is_some()) && feed.is_some() && !readings {
        report(
            key(if p.window.is_some() {
                "window"
            } else {
                "stride"
            }),
            format!(
                "feed `{}` gives images or tensors, not readings with named fields: windows need a serial or MQTT feed with `fields`",
                p.feed
            ),
        );
    }
    let publish = publish(p, &key, report);
    if let Some(c) = p.capture_below
        && !c.is_finite()
    {
        report(key("capture_below"), format!("{c} is not a score"));
    }
    if matches!(feed, Some(FeedConfig::Directory { .. })) {
        directory_rules(p, &key, report);
    }
    if let Some(q) = p.queue
        && q.get() > MAX_PIPELINE_QUEUE
    {
        report(
            key("queue"),
            format!("{q} is more than {MAX_PIPELINE_QUEUE} samples"),
        );
    }
    let drift = p.drift.as_ref().map(|d| drift(d, &key, report));
    let camera = matches!(feed, Some(FeedConfig::Camera(_)));
    PipelineConfig {
        drift,
        name: p.name.clone(),
        feed: p.feed.clone(),
        model: p.model.clone(),
        every_nth: p.every_nth.unwrap_or(NonZeroU32::MIN),
        max_fps: p.max_fps,
        window,
        // Without a stride, windows do not overlap.
        stride: p.stride.unwrap_or(window),
        queue: p
            .queue
            .filter(|q| q.get() <= MAX_PIPELINE_QUEUE)
            .unwrap_or(nz(DEFAULT_PIPELINE_QUEUE)),
        on_full: p.on_full.unwrap_or(if camera {
            OnFull::DropOldest
        } else {
            OnFull::Wait
        }),
        publish,
        store: p.store.unwrap_or(true),
        capture_below: p.capture_below,
        hop: p.hop,
        stop_after_ms: p.stop_after_ms.unwrap_or(DEFAULT_STOP_AFTER_MS),
        stages: stages(p, &key, report),
        max_crops: p
            .max_crops
            .filter(|n| (1..=MAX_MAX_CROPS).contains(n))
            .unwrap_or(DEFAULT_MAX_CROPS),
        crop_pad: p
            .crop_pad
            .filter(|x| (0.0..=2.0).contains(x))
            .unwrap_or(0.0),
    }
}

/// The models a pipeline runs on each crop, checked against its feed (images only).
fn stages(p: &RawPipeline, key: &dyn Fn(&str) -> String, report: &mut Report<'_>) -> Vec<Stage> {
    if let Some(n) = p.max_crops
        && !(1..=MAX_MAX_CROPS).contains(&n)
    {
        report(key("max_crops"), format!("{n} is not 1 to {MAX_MAX_CROPS}"));
    }
    if let Some(x) = p.crop_pad
        && !(0.0..=2.0).contains(&x)
    {
        report(
            key("crop_pad"),
            format!("{x} is not 0 to 2 (a fraction of the box's height)"),
        );
    }
    if (p.max_crops.is_some() || p.crop_pad.is_some()) && p.stages.is_empty() {
        report(
            key(if p.max_crops.is_some() {
                "max_crops"
            } else {
                "crop_pad"
            }),
            "the pipeline has no `stages` to run on crops".into(),
        );
    }
    p.stages
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let k = |f: &str| key(&format!("stages[{j}].{f}"));
            if s.model == p.model {
                report(
                    k("model"),
                    format!("`{}` is the pipeline's own model", s.model),
                );
            }
            let min_score = s.min_score.unwrap_or(0.9);
            if !(0.0..=1.0).contains(&min_score) {
                report(
                    k("min_score"),
                    format!("{min_score} is not a score from 0 to 1"),
                );
            }
            if s.min_score.is_some() && !s.rotate {
                report(
                    k("min_score"),
                    "only a stage with `rotate = true` turns crops".into(),
                );
            }
            Stage {
                model: s.model.clone(),
                rotate: s.rotate,
                min_score,
            }
        })
        .collect()
}

/// A directory pipeline does every file once: no thinning, no dropping.
fn directory_rules(p: &RawPipeline, key: &dyn Fn(&str) -> String, report: &mut Report<'_>) {
    if p.every_nth.is_some() || p.max_fps.is_some() {
        // Every file is a sample that must be done once; thinning would leave files
        // undone, to be offered again at each start.
        report(
            key(if p.every_nth.is_some() {
                "every_nth"
            } else {
                "max_fps"
            }),
            format!("feed `{}` is a directory: every file is processed", p.feed),
        );
    }
    if p.on_full == Some(OnFull::DropOldest) {
        report(
            key("on_full"),
            format!(
                "feed `{}` is a directory: a dropped file would wait for the next start; use \"wait\"",
                p.feed
            ),
        );
    }
}

/// Which results a pipeline sends upstream.
fn publish(p: &RawPipeline, key: &dyn Fn(&str) -> String, report: &mut Report<'_>) -> Publish {
    match (p.publish, p.min_score) {
        (None | Some(PublishMode::Always), None) => Publish::Always,
        (Some(PublishMode::OnChange), None) => Publish::OnChange,
        (Some(PublishMode::Above), Some(s)) if s.is_finite() => Publish::Above(s),
        (Some(PublishMode::Above), _) => {
            report(
                key("min_score"),
                "publish = \"above\" needs a min_score (a number)".into(),
            );
            Publish::Always
        }
        (_, Some(_)) => {
            report(
                key("min_score"),
                "only used with publish = \"above\"".into(),
            );
            Publish::Always
        }
    }
}

/// Feeds that cannot be shared: a serial port has one reader, a directory that deletes its
/// done files has one pipeline.
fn feed_readers(feeds: &[FeedConfig], pipelines: &[PipelineConfig], report: &mut Report<'_>) {
    for (i, f) in feeds.iter().enumerate() {
        let users = pipelines.iter().filter(|p| p.feed == f.name()).count();
        if let FeedConfig::Serial(s) = f
            && users > 1
        {
            // Each pipeline opens its feed, and a serial port opens once (exclusively).
            report(
                format!("feeds[{i}].path"),
                format!(
                    "serial feed `{}` is read by {users} pipelines; a port has one reader: give each pipeline its own port",
                    s.name
                ),
            );
        }
        if let FeedConfig::Directory { name, on_done, .. } = f
            && *on_done == OnDone::Delete
            && users > 1
        {
            report(
                format!("feeds[{i}].on_done"),
                format!(
                    "feed `{name}` deletes done files but {users} pipelines read it; use \"keep\""
                ),
            );
        }
    }
}

/// Megabytes as bytes, at least 0.01 MiB.
fn mib(key: String, v: f64, report: &mut Report<'_>) -> u64 {
    if !(v.is_finite() && v >= 0.01) {
        report(
            key,
            format!("{v} is not a budget: give at least 0.01 (MiB)"),
        );
    }
    (v.max(0.0) * 1024.0 * 1024.0) as u64
}

fn outbox(raw: &RawOutbox, report: &mut Report<'_>) -> OutboxConfig {
    let budget = raw.budget_mib.unwrap_or(DEFAULT_OUTBOX_BUDGET_MIB);
    OutboxConfig {
        budget_bytes: mib("outbox.budget_mib".into(), budget, report),
    }
}

fn store(raw: &RawStore, report: &mut Report<'_>) -> StoreConfig {
    let results_max_age = match raw.results_max_age_days {
        Some(d) if d.is_finite() && d > 0.0 && d < 100_000.0 => {
            Some(std::time::Duration::from_secs_f64(d * 86400.0))
        }
        Some(d) => {
            report(
                "store.results_max_age_days".into(),
                format!("{d} is not an age: give days above 0"),
            );
            None
        }
        None => None,
    };
    let results = raw.results_budget_mib.unwrap_or(DEFAULT_RESULTS_BUDGET_MIB);
    let capture = raw.capture_budget_mib.unwrap_or(DEFAULT_CAPTURE_BUDGET_MIB);
    StoreConfig {
        results_max_age,
        results_budget_bytes: mib("store.results_budget_mib".into(), results, report),
        capture_budget_bytes: mib("store.capture_budget_mib".into(), capture, report),
    }
}

fn dbus(raw: &RawDbus, report: &mut Report<'_>) -> Option<Bus> {
    match raw.bus.as_deref().unwrap_or("system") {
        "system" => Some(Bus::System),
        "session" => Some(Bus::Session),
        "none" => None,
        a if a.contains(':') && a.contains('=') => Some(Bus::Address(a.to_string())),
        other => {
            report(
                "dbus.bus".into(),
                format!("`{other}` is not `system`, `session`, `none` or a D-Bus address"),
            );
            None
        }
    }
}

/// `[updates]`: the trusted keys and how an update is watched.
fn validate_updates(u: &RawUpdates, report: &mut Report<'_>) -> UpdatesConfig {
    let mut keys = Vec::new();
    for (i, k) in u.keys.iter().enumerate() {
        match tern_update::command::PublicKey::parse(k) {
            Ok(k) if keys.contains(&k) => {
                report(format!("updates.keys[{i}]"), "the same key twice".into())
            }
            Ok(k) => keys.push(k),
            Err(e) => report(format!("updates.keys[{i}]"), e.to_string()),
        }
    }
    let threshold = u.threshold.unwrap_or(1);
    if threshold == 0 || (!u.keys.is_empty() && threshold > u.keys.len()) {
        report(
            "updates.threshold".into(),
            format!(
                "{threshold} signatures can never be met by {} key(s); give 1..={}",
                u.keys.len(),
                u.keys.len().max(1)
            ),
        );
    }
    let health = u.health_window_secs.unwrap_or(DEFAULT_HEALTH_WINDOW_SECS);
    if health > 86_400 {
        report(
            "updates.health_window_secs".into(),
            format!("{health} is more than a day (86400)"),
        );
    }
    let window = u.window.unwrap_or(DEFAULT_UPDATE_WINDOW);
    if !(1..=64).contains(&window) {
        report(
            "updates.window".into(),
            format!("{window} is outside 1..=64"),
        );
    }
    if let Some(f) = u.freshness_secs
        && !(60..=366 * 86_400).contains(&f)
    {
        report(
            "updates.freshness_secs".into(),
            format!("{f} is outside 60..=31622400 (a minute to a year)"),
        );
    }
    UpdatesConfig {
        freshness: u.freshness_secs.map(std::time::Duration::from_secs),
        keys,
        threshold,
        health_window: std::time::Duration::from_secs(health),
        health_max_errors: u
            .health_max_errors
            .unwrap_or(DEFAULT_HEALTH_MAX_ERRORS)
            .max(1),
        window,
        min_free_bytes: u.min_free_mib.unwrap_or(DEFAULT_MIN_FREE_MIB) * 1024 * 1024,
    }
}

/// A topic level we build topics from: no wildcards, no separators, not empty.
fn topic_level_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("must not be empty")
    } else if s.contains(['/', '+', '#', '\0']) {
        Some("must not contain `/`, `+`, `#` or NUL")
    } else if s.len() > 128 {
        Some("must be at most 128 bytes")
    } else {
        None
    }
}

/// Why an MQTT topic filter is not one a broker accepts, if it is not.
fn topic_filter_problem(t: &str) -> Option<&'static str> {
    if t.is_empty() || t.contains('\0') || t.len() > 1024 {
        return Some("must be 1 to 1024 bytes, without NUL");
    }
    let levels: Vec<&str> = t.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Some("has `#` other than as the whole last level");
        }
        if l.contains('+') && *l != "+" {
            return Some("has `+` other than as a whole level");
        }
    }
    None
}

/// Field names become JSON keys and column names in messages: plain, distinct and present.
fn check_fields(fields: &[String], key: &str, required: bool, report: &mut Report<'_>) {
    if required && fields.is_empty() {
        report(
            key.into(),
            "name at least one field: the numbers on each line, in order".into(),
        );
    }
    let mut seen = HashSet::new();
    for f in fields {
        if f.is_empty() || f.len() > 64 || f.contains(|c: char| c.is_control()) {
            report(key.into(), format!("`{f}` is not a field name"));
        }
        if !seen.insert(f) {
            report(key.into(), format!("field `{f}` is named twice"));
        }
    }
}

/// A broker URL that is not one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadBroker(pub String);

/// `mqtt://host[:port]` or `mqtts://host[:port]` as (host, port, TLS?).
pub fn parse_broker(url: &str) -> Result<(String, u16, bool), BadBroker> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        _ => {
            return Err(BadBroker(format!(
                "`{url}` is not a broker URL: expected mqtt://host[:port] or mqtts://host[:port]"
            )));
        }
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h.trim_matches(['[', ']']).to_string(), p),
            _ => return Err(BadBroker(format!("`{p}` is not a port number"))),
        },
        _ => (rest.to_string(), if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(BadBroker(format!("`{url}` names no host")));
    }
    Ok((host, port, tls))
}

/// `[fleet]`: the broker, the box's names on it, its login and TLS, and its commands. `None`
/// if anything is wrong (each problem reported).
fn validate_fleet(
    f: &RawFleet,
    resolve: &Resolve<'_>,
    report: &mut Report<'_>,
) -> Option<FleetConfig> {
    let found = std::cell::Cell::new(0usize);
    let mut bad = |key: &str, message: String| {
        found.set(found.get() + 1);
        report(format!("fleet.{key}"), message);
    };
    let (host, port, tls) = match parse_broker(&f.broker) {
        Ok(b) => b,
        Err(e) => {
            bad("broker", e.to_string());
            let tls = f.broker.starts_with("mqtts") || f.broker.starts_with("ssl");
            (String::new(), 0, tls)
        }
    };
    let prefix = fleet_names(f, &mut bad);
    let keep_alive = f.keep_alive_secs.unwrap_or(DEFAULT_KEEP_ALIVE_SECS);
    if !(5..=65535).contains(&keep_alive) {
        bad("keep_alive_secs", "must be between 5 and 65535".into());
    }
    let telemetry = f.telemetry_secs.unwrap_or(DEFAULT_TELEMETRY_SECS);
    if telemetry == 0 {
        bad("telemetry_secs", "must be above 0".into());
    }
    let reconnect_max = f.reconnect_max_secs.unwrap_or(DEFAULT_RECONNECT_MAX_SECS);
    if reconnect_max == 0 {
        bad("reconnect_max_secs", "must be above 0".into());
    }
    let credentials = fleet_login(f, resolve, &mut bad);
    let tls_config = fleet_tls(f, tls, resolve, &mut bad);
    let commands = fleet_commands(&f.commands, &mut bad);
    for (i, t) in f.response_topics.iter().enumerate() {
        if let Some(why) = topic_filter_problem(t) {
            bad(&format!("response_topics[{i}]"), format!("`{t}` {why}"));
        }
    }
    (found.get() == 0).then(|| FleetConfig {
        host,
        port,
        tls: tls_config,
        device: f.device.clone(),
        groups: f.groups.clone(),
        prefix,
        protocol: f.protocol.unwrap_or_default(),
        client_id: f
            .client_id
            .clone()
            .unwrap_or_else(|| format!("tern-{}", f.device)),
        keep_alive: std::time::Duration::from_secs(keep_alive),
        credentials,
        telemetry_every: std::time::Duration::from_secs(telemetry),
        reconnect_max: std::time::Duration::from_secs(reconnect_max),
        response_topics: f.response_topics.clone(),
        commands,
    })
}

/// A fleet section's problem: its key under `fleet.`, and what is wrong.
type Bad<'a> = dyn FnMut(&str, String) + 'a;

/// The device, its groups and the topic prefix: each a topic level (or topic) we build on.
fn fleet_names(f: &RawFleet, bad: &mut Bad<'_>) -> String {
    if let Some(why) = topic_level_problem(&f.device) {
        bad("device", format!("`{}` {why}", f.device));
    }
    for (i, g) in f.groups.iter().enumerate() {
        if let Some(why) = topic_level_problem(g) {
            bad(&format!("groups[{i}]"), format!("`{g}` {why}"));
        }
    }
    let prefix = f.prefix.clone().unwrap_or_else(|| DEFAULT_PREFIX.into());
    if prefix.is_empty()
        || prefix.starts_with('/')
        || prefix.ends_with('/')
        || prefix.contains(['+', '#', '\0'])
    {
        bad(
            "prefix",
            format!("`{prefix}` must be a topic without wildcards or a leading/trailing `/`"),
        );
    }
    prefix
}

/// The broker login: a username with a password given inline or in a file.
fn fleet_login(f: &RawFleet, resolve: &Resolve<'_>, bad: &mut Bad<'_>) -> Option<(String, String)> {
    let password = match (&f.password, &f.password_file) {
        (Some(_), Some(_)) => {
            bad(
                "password_file",
                "set either password or password_file, not both".into(),
            );
            None
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(file)) => match std::fs::read_to_string(resolve(file)) {
            Ok(p) => Some(p.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => {
                bad(
                    "password_file",
                    format!("cannot read `{}`: {e}", file.display()),
                );
                None
            }
        },
        (None, None) => None,
    };
    match (&f.username, password) {
        (Some(u), p) => Some((u.clone(), p.unwrap_or_default())),
        (None, Some(_)) => {
            let key = if f.password.is_some() {
                "password"
            } else {
                "password_file"
            };
            bad(key, "a password is set but no username".into());
            None
        }
        (None, None) => None,
    }
}

/// TLS for an `mqtts://` broker, built here as it will be at connect time so that a bad file
/// is named now; TLS settings for a plain broker are a mistake.
fn fleet_tls(
    f: &RawFleet,
    tls: bool,
    resolve: &Resolve<'_>,
    bad: &mut Bad<'_>,
) -> Option<TlsConfig> {
    if !tls {
        for (key, set) in [
            ("ca_file", f.ca_file.is_some()),
            ("cert_file", f.cert_file.is_some()),
            ("key_file", f.key_file.is_some()),
        ] {
            if set {
                bad(
                    key,
                    format!("is set but the broker URL `{}` is not mqtts://", f.broker),
                );
            }
        }
        return None;
    }
    let client = match (&f.cert_file, &f.key_file) {
        (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
        (None, None) => None,
        // Named at the key that is there, so the problem has a line.
        (Some(_), None) => {
            bad("cert_file", "is set but key_file is not".into());
            None
        }
        (None, Some(_)) => {
            bad("key_file", "is set but cert_file is not".into());
            None
        }
    };
    let t = TlsConfig {
        ca_file: f.ca_file.as_deref().map(resolve),
        client,
    };
    if let Err((key, e)) = crate::tls::client_config(&t) {
        bad(key, e);
    }
    Some(t)
}

/// `[fleet.commands]`: who may sign commands, which must be signed, and the bounds.
fn fleet_commands(c: &RawCommands, bad: &mut Bad<'_>) -> CommandsConfig {
    let mut keys = Vec::new();
    for (i, k) in c.keys.iter().enumerate() {
        match tern_update::command::PublicKey::parse(k) {
            Ok(k) => keys.push(k),
            Err(e) => bad(&format!("commands.keys[{i}]"), e.to_string()),
        }
    }
    let require_signed = c.require_signed.unwrap_or(if keys.is_empty() {
        SignPolicy::None
    } else {
        SignPolicy::StateChanging
    });
    if require_signed != SignPolicy::None && c.keys.is_empty() {
        bad(
            "commands.require_signed",
            "commands must be signed but no commands.keys are configured".into(),
        );
    }
    let skew = c.max_skew_secs.unwrap_or(DEFAULT_MAX_SKEW_SECS);
    if !(1..=86_400).contains(&skew) {
        bad(
            "commands.max_skew_secs",
            "must be between 1 and 86400".into(),
        );
    }
    let max_payload_bytes = c.max_payload_bytes.unwrap_or(DEFAULT_MAX_COMMAND_BYTES);
    if !(256..=64 * 1024 * 1024).contains(&max_payload_bytes) {
        bad(
            "commands.max_payload_bytes",
            "must be between 256 and 67108864".into(),
        );
    }
    CommandsConfig {
        keys,
        require_signed,
        max_skew_secs: skew.min(86_400) as i64,
        max_payload_bytes,
        queue: c.queue.unwrap_or(nz(DEFAULT_COMMAND_QUEUE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_are_shared_out_as_workers_between_models() {
        let none = RawEngine::default();
        let w = |models, cpus| engine(&none, models, cpus).workers.get();
        assert_eq!(w(1, 2), 2);
        assert_eq!(w(2, 4), 2);
        assert_eq!(w(3, 8), 2);
        // More models than CPUs: one each. None configured counts as one.
        assert_eq!(w(3, 2), 1);
        assert_eq!(w(0, 4), 4);
        // Two threads an inference: half as many workers.
        let two = RawEngine {
            threads: NonZeroUsize::new(2),
            ..RawEngine::default()
        };
        assert_eq!(engine(&two, 1, 8).workers.get(), 4);
        assert_eq!(engine(&two, 1, 1).workers.get(), 1);
        assert_eq!(engine(&none, 1, 8).threads.get(), 1);
        let set = RawEngine {
            workers: NonZeroUsize::new(3),
            threads: NonZeroUsize::new(2),
            ..RawEngine::default()
        };
        let s = engine(&set, 1, 2);
        assert_eq!((s.workers.get(), s.threads.get()), (3, 2));
    }
}
