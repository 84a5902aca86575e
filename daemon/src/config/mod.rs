//! The `ternd.toml` schema, its defaults, drop-in merging and validation.
//!
//! Loading is two-phase. First every file (the main one, then `config.d/*.toml` in name order)
//! is parsed on its own against the raw schema, so that a syntax error, an unknown key or a
//! wrong type is reported with the file and line it is on. Then the files are merged and the
//! merged whole is validated: cross references (a pipeline naming a model that is not
//! configured), paths that do not exist, duplicate names. Every problem found is reported, not
//! just the first, each with its key path and, where it can be found, its file and line.
//!
//! This module never touches running state: it turns text into a [`Config`] or a list of
//! [`Problem`]s, and `ternd check-config` runs exactly what `ternd run` and SIGHUP run.

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod validate;

use crate::engine::{Manifest, PlanChoice, PoolSettings, Pools, Runtime};
pub use crate::tls::TlsConfig;
pub use validate::{BadBroker, parse_broker};

/// Exit code for a configuration error (EX_USAGE), so that systemd's
/// `RestartPreventExitStatus=64` stops a restart loop on a typo.
pub const EXIT_CONFIG: i32 = 64;

/// Image and tensor files larger than this are refused before they are read.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the database and installed models live.
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub engine: RawEngine,
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub feeds: Vec<RawFeed>,
    #[serde(default)]
    pub pipelines: Vec<RawPipeline>,
    pub fleet: Option<RawFleet>,
    #[serde(default)]
    pub outbox: RawOutbox,
    #[serde(default)]
    pub updates: RawUpdates,
    #[serde(default)]
    pub dbus: RawDbus,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub metrics: RawMetrics,
    pub home_assistant: Option<RawHomeAssistant>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDrift {
    /// Results compared with the baseline (the latest), and results a baseline learned from
    /// the first results is made of.
    pub window: Option<usize>,
    /// The drift score (PSI) that raises `drift.detected`.
    pub threshold: Option<f64>,
    /// While drifting, samples whose top-1 confidence is below this are captured.
    pub capture_below: Option<f32>,
}

fn default_discovery_prefix() -> String {
    "homeassistant".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHomeAssistant {
    /// The topic Home Assistant reads discovery messages under (its default:
    /// `homeassistant`).
    #[serde(default = "default_discovery_prefix")]
    pub discovery_prefix: String,
    /// Per pipeline, labels that get an on/off entity: on while the latest result's top-1
    /// label, or any of its boxes, is the label.
    #[serde(default)]
    pub classes: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Address and port of the Prometheus endpoint (`/metrics`); none: not served.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Results older than this many days are deleted (fractions allowed); none: no age limit.
    pub results_max_age_days: Option<f64>,
    /// Disk budget for stored results, in MiB; the oldest go first.
    pub results_budget_mib: Option<f64>,
    /// Disk budget for samples captured for retraining, in MiB; the oldest go first.
    pub capture_budget_mib: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDbus {
    /// `system` (default), `session`, `none`, or a D-Bus address (`unix:path=...`).
    pub bus: Option<String>,
}

/// Where the local API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    System,
    Session,
    Address(String),
}

impl Bus {
    /// As `dbus.bus` and `ternctl --bus` name it: `system`, `session` or the address.
    pub fn name(&self) -> &str {
        match self {
            Bus::System => "system",
            Bus::Session => "session",
            Bus::Address(a) => a,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpdates {
    /// Ed25519 public keys (base64) trusted to sign update manifests; none: updates off.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Valid signatures from distinct trusted keys a manifest needs.
    pub threshold: Option<usize>,
    /// How long a new version is watched after activation before it is committed.
    pub health_window_secs: Option<u64>,
    /// Inference errors in the health window that roll the new version back.
    pub health_max_errors: Option<u64>,
    /// Chunks asked for at once while downloading.
    pub window: Option<usize>,
    /// Free disk space (MiB) an update must leave on the state directory's file system.
    pub min_free_mib: Option<u64>,
    /// Refuse manifests from the network made longer ago than this, or judged without an
    /// operator's signed time (`<prefix>/fleet/time`) younger than this; absent: no such rule.
    pub freshness_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub broker: String,
    pub device: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub prefix: Option<String>,
    pub protocol: Option<Protocol>,
    pub client_id: Option<String>,
    pub keep_alive_secs: Option<u64>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub telemetry_secs: Option<u64>,
    pub reconnect_max_secs: Option<u64>,
    /// Topic filters an MQTT 5 response topic may match, besides the box's own `reply/`.
    #[serde(default)]
    pub response_topics: Vec<String>,
    #[serde(default)]
    pub commands: RawCommands,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "v5")]
    V5,
    #[serde(rename = "v3.1.1")]
    V311,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCommands {
    /// Ed25519 public keys (base64) whose signatures state-changing commands must carry.
    #[serde(default)]
    pub keys: Vec<String>,
    pub require_signed: Option<SignPolicy>,
    pub max_skew_secs: Option<u64>,
    pub max_payload_bytes: Option<usize>,
    pub queue: Option<NonZeroUsize>,
}

/// Which commands must be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignPolicy {
    None,
    StateChanging,
    All,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbox {
    /// Disk budget for messages waiting for the broker, in MiB (fractions allowed).
    pub budget_mib: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawEngine {
    pub threads: Option<NonZeroUsize>,
    pub workers: Option<NonZeroUsize>,
    pub queue: Option<NonZeroUsize>,
    pub runtime: Option<Runtime>,
    pub plan: Option<PlanChoice>,
    /// The ONNX Runtime library (`libonnxruntime.so...`) for the `onnxruntime` plan; default:
    /// `ORT_DYLIB_PATH`, the system's, or an installed `onnxruntime` Python wheel's.
    pub onnxruntime_library: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// A model package directory: installed if new, then activated.
    pub package: PathBuf,
    pub threads: Option<NonZeroUsize>,
    pub workers: Option<NonZeroUsize>,
    pub queue: Option<NonZeroUsize>,
    pub runtime: Option<Runtime>,
    pub plan: Option<PlanChoice>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum RawFeed {
    Directory {
        name: String,
        path: PathBuf,
        extensions: Option<Vec<String>>,
        max_file_bytes: Option<u64>,
        #[serde(default)]
        on_done: OnDone,
    },
    Camera {
        name: String,
        /// What ffmpeg reads: `-i <input>` (a URL, `/dev/video0`, a file, a lavfi graph).
        input: String,
        /// ffmpeg's input format (`-f` before `-i`): `v4l2`, `lavfi`, `rtsp`, ...
        format: Option<String>,
        /// Passed to ffmpeg before `-i`, e.g. `["-hwaccel", "vaapi"]` or `["-re"]`.
        #[serde(default)]
        input_args: Vec<String>,
        /// Frames per second to sample; none: every frame the source gives.
        fps: Option<f64>,
        /// No frame for this long means the source is stalled: ffmpeg is restarted.
        stall_secs: Option<f64>,
        /// The ffmpeg program; default `ffmpeg` on PATH.
        ffmpeg: Option<PathBuf>,
    },
    Serial {
        name: String,
        path: PathBuf,
        baud: Option<u32>,
        data_bits: Option<u8>,
        parity: Option<Parity>,
        stop_bits: Option<u8>,
        #[serde(default)]
        format: LineFormat,
        /// Names of the numbers on a line: CSV columns in order, or JSON keys (none for PCM).
        #[serde(default)]
        fields: Vec<String>,
        max_line_bytes: Option<usize>,
        /// Samples per second of a PCM stream (`format = "s16le"` or `"f32le"`): the model's.
        sample_rate: Option<u32>,
    },
    Mqtt {
        name: String,
        /// A topic filter; wildcards allowed.
        topic: String,
        /// `mqtt://host[:port]`; none: the fleet broker, with the fleet's TLS and credentials.
        broker: Option<String>,
        #[serde(default)]
        format: PayloadFormat,
        /// Names of the numbers in a JSON reading, in the order the model wants them.
        #[serde(default)]
        fields: Vec<String>,
        max_payload_bytes: Option<usize>,
        /// Samples per second of PCM payloads (`format = "s16le"` or `"f32le"`): the model's.
        sample_rate: Option<u32>,
    },
    /// Sound through ffmpeg (an ALSA or PulseAudio device, a file, a stream), resampled to
    /// the model's rate, mono.
    Audio {
        name: String,
        /// What ffmpeg reads: `-i <input>` (`hw:0`, `default`, a file, a URL).
        input: String,
        /// ffmpeg's input format (`-f` before `-i`): `alsa`, `pulse`, `wav`, ...
        format: Option<String>,
        /// Passed to ffmpeg before `-i`, e.g. `["-re"]` to play a file at its own pace.
        #[serde(default)]
        input_args: Vec<String>,
        /// No sound for this long means the source is stalled: ffmpeg is restarted.
        stall_secs: Option<f64>,
        /// The ffmpeg program; default `ffmpeg` on PATH.
        ffmpeg: Option<PathBuf>,
    },
}

impl RawFeed {
    pub fn name(&self) -> &str {
        match self {
            RawFeed::Directory { name, .. }
            | RawFeed::Camera { name, .. }
            | RawFeed::Serial { name, .. }
            | RawFeed::Mqtt { name, .. }
            | RawFeed::Audio { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

/// How a serial line carries its numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    /// A line starting with `{` is JSON, any other CSV.
    #[default]
    Auto,
    /// `5.1,3.5,1.4,0.2`, columns named by `fields` in order.
    Csv,
    /// `{"sepal_length": 5.1, ...}`, keys named by `fields`.
    Json,
    /// Not lines: a stream of 16-bit little-endian mono samples at `sample_rate`.
    S16le,
    /// Not lines: a stream of 32-bit float little-endian mono samples at `sample_rate`.
    F32le,
}

/// What an MQTT feed's messages hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON object is a reading, a JSON array a tensor, anything else an image.
    #[default]
    Auto,
    /// PNG or JPEG bytes.
    Image,
    /// A JSON reading (object) or tensor (array).
    Json,
    /// Each message a piece of a stream of 16-bit little-endian mono samples.
    S16le,
    /// Each message a piece of a stream of 32-bit float little-endian mono samples.
    F32le,
}

/// What a directory feed does with a file once its result is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDone {
    /// Leave it; the feed remembers (in the database) that it was done.
    #[default]
    Keep,
    Delete,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub name: String,
    pub feed: String,
    pub model: String,
    /// Run the model on one sample in every N.
    pub every_nth: Option<NonZeroU32>,
    /// Run the model at most this often per second; samples in between are skipped.
    pub max_fps: Option<f64>,
    /// Readings stacked into one input: the last N samples of the feed's fields.
    pub window: Option<NonZeroUsize>,
    /// New readings between two windows.
    pub stride: Option<NonZeroUsize>,
    /// Samples waiting for the model.
    pub queue: Option<NonZeroUsize>,
    /// What a full queue does; by default cameras drop the oldest sample, others wait.
    pub on_full: Option<OnFull>,
    /// Which results go upstream: `always`, `on_change` (of the top class) or `above`.
    pub publish: Option<PublishMode>,
    /// With `publish = "above"`: the top score a result needs to be published.
    pub min_score: Option<f32>,
    /// Keep results in the database (default true).
    pub store: Option<bool>,
    /// Keep inputs whose top score is below this, for retraining.
    pub capture_below: Option<f32>,
    /// Audio: new samples between two windows (default: the model's window).
    pub hop: Option<NonZeroUsize>,
    /// Audio: how long a score must stay off before its stop is said (default 100 ms).
    pub stop_after_ms: Option<u64>,
    /// Models run on each box the pipeline's model finds (`detect` or `text_boxes`), in order.
    #[serde(default)]
    pub stages: Vec<RawStage>,
    /// How far the results have moved from a baseline; none: not watched.
    pub drift: Option<RawDrift>,
    /// Boxes cropped per sample at most (the highest scores first).
    pub max_crops: Option<usize>,
    /// Each crop grows by this fraction of the box's height on every side.
    pub crop_pad: Option<f32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    pub model: String,
    /// The stage's top label is the crop's rotation in degrees (`0`, `90`, `180`, `270`): the
    /// stages after it see the crop turned upright.
    #[serde(default)]
    pub rotate: bool,
    /// With `rotate`: the top score a turn needs (default 0.9).
    pub min_score: Option<f32>,
}

/// A model run on each crop of the pipeline's boxes.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub model: String,
    pub rotate: bool,
    pub min_score: f32,
}

pub const DEFAULT_MAX_CROPS: usize = 16;
pub const MAX_MAX_CROPS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Fresh samples beat stale ones: the oldest waiting sample is dropped (and counted).
    DropOldest,
    /// The feed waits for room: nothing is dropped.
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    Always,
    OnChange,
    Above,
}

/// A validated configuration: every path absolute, every reference resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub state_dir: PathBuf,
    pub log_level: String,
    pub models: Vec<ModelConfig>,
    pub feeds: Vec<FeedConfig>,
    pub pipelines: Vec<PipelineConfig>,
    pub fleet: Option<FleetConfig>,
    pub outbox: OutboxConfig,
    pub updates: UpdatesConfig,
    /// None: no D-Bus interface.
    pub dbus: Option<Bus>,
    /// `metrics.listen`: where `/metrics` is served; none: not served.
    pub metrics: Option<std::net::SocketAddr>,
    /// `[home_assistant]`: MQTT discovery messages for this box; none: not sent (and those
    /// sent before are cleared).
    pub home_assistant: Option<HomeAssistant>,
    /// Whether `dbus.bus` was set: a box left on the default system bus where there is none
    /// (a laptop, a container) only notes it, one that asked for a bus warns.
    pub dbus_asked: bool,
    /// `[engine]`: the pool settings of a model not listed in `[[models]]` (one an update
    /// brought) and the defaults of those listed.
    pub engine: PoolSettings,
    /// `engine.onnxruntime_library`, resolved and found to exist.
    pub onnxruntime_library: Option<PathBuf>,
    pub store: StoreConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeAssistant {
    pub discovery_prefix: String,
    pub classes: std::collections::BTreeMap<String, Vec<String>>,
}

/// `[store]`: how much of its own data the box keeps.
pub use crate::store::Retention as StoreConfig;

pub const DEFAULT_RESULTS_BUDGET_MIB: f64 = 256.0;
pub const DEFAULT_CAPTURE_BUDGET_MIB: f64 = 64.0;

impl Config {
    /// Each model's pool settings: its own, else the engine's.
    pub fn pools(&self) -> Pools {
        Pools {
            models: self
                .models
                .iter()
                .map(|m| (m.name.clone(), m.pool))
                .collect(),
            default: self.engine,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpdatesConfig {
    pub keys: Vec<tern_update::command::PublicKey>,
    pub threshold: usize,
    pub health_window: std::time::Duration,
    pub health_max_errors: u64,
    pub window: usize,
    pub min_free_bytes: u64,
    pub freshness: Option<std::time::Duration>,
}

impl UpdatesConfig {
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }
}

pub const DEFAULT_HEALTH_WINDOW_SECS: u64 = 60;
pub const DEFAULT_HEALTH_MAX_ERRORS: u64 = 3;
pub const DEFAULT_UPDATE_WINDOW: usize = 4;
pub const DEFAULT_MIN_FREE_MIB: u64 = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    pub host: String,
    pub port: u16,
    pub tls: Option<TlsConfig>,
    pub device: String,
    pub groups: Vec<String>,
    pub prefix: String,
    pub protocol: Protocol,
    pub client_id: String,
    pub keep_alive: std::time::Duration,
    pub credentials: Option<(String, String)>,
    pub telemetry_every: std::time::Duration,
    pub reconnect_max: std::time::Duration,
    /// Filters an MQTT 5 response topic must match to be answered on (besides the box's own
    /// `reply/` topics, always allowed).
    pub response_topics: Vec<String>,
    pub commands: CommandsConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandsConfig {
    pub keys: Vec<tern_update::command::PublicKey>,
    pub require_signed: SignPolicy,
    pub max_skew_secs: i64,
    pub max_payload_bytes: usize,
    pub queue: NonZeroUsize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxConfig {
    pub budget_bytes: u64,
}

pub const DEFAULT_PREFIX: &str = "tern";
pub const DEFAULT_KEEP_ALIVE_SECS: u64 = 30;
pub const DEFAULT_TELEMETRY_SECS: u64 = 60;
pub const DEFAULT_RECONNECT_MAX_SECS: u64 = 60;
pub const DEFAULT_MAX_SKEW_SECS: u64 = 300;
pub const DEFAULT_MAX_COMMAND_BYTES: usize = 1024 * 1024;
pub const DEFAULT_COMMAND_QUEUE: usize = 32;
pub const DEFAULT_OUTBOX_BUDGET_MIB: f64 = 64.0;

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub package: PathBuf,
    pub name: String,
    pub version: semver::Version,
    pub pool: PoolSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FeedConfig {
    Directory {
        name: String,
        path: PathBuf,
        extensions: Vec<String>,
        max_file_bytes: u64,
        on_done: OnDone,
    },
    Camera(CameraConfig),
    Serial(SerialConfig),
    Mqtt(MqttFeedConfig),
    Audio(AudioConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AudioConfig {
    pub name: String,
    pub input: String,
    pub format: Option<String>,
    pub input_args: Vec<String>,
    pub stall: std::time::Duration,
    pub ffmpeg: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    pub name: String,
    pub input: String,
    pub format: Option<String>,
    pub input_args: Vec<String>,
    pub fps: Option<f64>,
    pub stall: std::time::Duration,
    pub ffmpeg: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SerialConfig {
    pub name: String,
    pub path: PathBuf,
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub format: LineFormat,
    pub fields: Vec<String>,
    pub max_line_bytes: usize,
    pub sample_rate: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MqttFeedConfig {
    pub name: String,
    pub topic: String,
    pub host: String,
    pub port: u16,
    pub tls: Option<TlsConfig>,
    pub credentials: Option<(String, String)>,
    pub client_id: String,
    pub format: PayloadFormat,
    pub fields: Vec<String>,
    pub max_payload_bytes: usize,
    pub sample_rate: Option<u32>,
}

/// What a box with a fleet link but no update keys says: it ignores every published bundle.
pub const UPDATES_OFF_WARNING: &str = "warning: updates are off on a box with a fleet link: \
    it ignores every bundle published to it; set updates.keys to the operator's public key \
    (`tern-update keygen` prints it)";

pub const DEFAULT_STALL_SECS: f64 = 10.0;
pub const DEFAULT_AUDIO_STALL_SECS: f64 = 5.0;
pub const DEFAULT_STOP_AFTER_MS: u64 = 100;
pub const DEFAULT_BAUD: u32 = 9600;
pub const DEFAULT_MAX_LINE_BYTES: usize = 4096;
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;
pub const DEFAULT_PIPELINE_QUEUE: usize = 8;
/// A queue holds whole samples (camera frames): more than this is memory, not freshness.
pub const MAX_PIPELINE_QUEUE: usize = 1024;

impl FeedConfig {
    pub fn name(&self) -> &str {
        match self {
            FeedConfig::Directory { name, .. } => name,
            FeedConfig::Camera(c) => &c.name,
            FeedConfig::Serial(s) => &s.name,
            FeedConfig::Mqtt(m) => &m.name,
            FeedConfig::Audio(a) => &a.name,
        }
    }

    /// The sound this feed streams: its sample encoding and rate (`None` for the rate: the
    /// model's, which ffmpeg resamples to); `None` for feeds of images or readings.
    pub fn pcm(&self) -> Option<(crate::engine::Pcm, Option<u32>)> {
        use crate::engine::Pcm;
        match self {
            FeedConfig::Serial(s) => match s.format {
                LineFormat::S16le => Some((Pcm::S16le, s.sample_rate)),
                LineFormat::F32le => Some((Pcm::F32le, s.sample_rate)),
                _ => None,
            },
            FeedConfig::Mqtt(m) => match m.format {
                PayloadFormat::S16le => Some((Pcm::S16le, m.sample_rate)),
                PayloadFormat::F32le => Some((Pcm::F32le, m.sample_rate)),
                _ => None,
            },
            FeedConfig::Audio(_) => Some((Pcm::S16le, None)),
            _ => None,
        }
    }

    /// The names of the numbers in this feed's readings; empty for image feeds.
    pub fn fields(&self) -> &[String] {
        match self {
            FeedConfig::Serial(s) => &s.fields,
            FeedConfig::Mqtt(m) => &m.fields,
            _ => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    pub name: String,
    pub feed: String,
    pub model: String,
    pub every_nth: NonZeroU32,
    pub max_fps: Option<f64>,
    pub window: NonZeroUsize,
    pub stride: NonZeroUsize,
    pub queue: NonZeroUsize,
    pub on_full: OnFull,
    pub publish: Publish,
    pub store: bool,
    pub capture_below: Option<f32>,
    pub hop: Option<NonZeroUsize>,
    pub stop_after_ms: u64,
    pub stages: Vec<Stage>,
    pub max_crops: usize,
    pub crop_pad: f32,
    pub drift: Option<crate::drift::DriftConfig>,
}

/// Which results a pipeline sends upstream (all are stored unless `store = false`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Publish {
    Always,
    OnChange,
    Above(f32),
}

const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("zero"),
    }
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/tern";
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "npy", "json"];

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    /// Dotted key path, e.g. `pipelines[0].model`; empty for file-level problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            _ => {}
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError(pub Vec<Problem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} configuration problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// The config file and its drop-ins, as read from disk.
struct Source {
    path: PathBuf,
    text: String,
}

/// Read, merge and validate the configuration at `path` and its `config.d/` drop-ins.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let sources = read_sources(path)?;
    let mut problems = Vec::new();
    let mut merged = toml::Table::new();
    for src in &sources {
        match parse_one(src) {
            Ok(table) => merge(&mut merged, table),
            Err(p) => problems.push(p),
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError(problems));
    }
    let raw: RawConfig = match RawConfig::deserialize(toml::Value::Table(merged)) {
        Ok(raw) => raw,
        Err(e) => {
            return Err(ConfigError(vec![Problem {
                file: Some(path.to_path_buf()),
                line: None,
                key: String::new(),
                message: e.to_string(),
            }]));
        }
    };
    let base = std::path::absolute(path.parent().unwrap_or(Path::new(".")))
        .unwrap_or_else(|_| path.parent().unwrap_or(Path::new(".")).to_path_buf());
    validate::validate(raw, &base, &sources)
}

fn read_sources(path: &Path) -> Result<Vec<Source>, ConfigError> {
    let problem = |p: &Path, message: String| Problem {
        file: Some(p.to_path_buf()),
        line: None,
        key: String::new(),
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(vec![problem(path, format!("cannot read: {e}"))]))?;
    let mut sources = vec![Source {
        path: path.to_path_buf(),
        text,
    }];
    let dropins = path.parent().unwrap_or(Path::new(".")).join("config.d");
    if dropins.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dropins)
            .map_err(|e| ConfigError(vec![problem(&dropins, format!("cannot list: {e}"))]))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        names.sort();
        for p in names {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| ConfigError(vec![problem(&p, format!("cannot read: {e}"))]))?;
            sources.push(Source { path: p, text });
        }
    }
    Ok(sources)
}

/// Parse one file against the raw schema so that syntax errors, unknown keys and wrong types
/// are reported with this file's line numbers, then return it as a plain table for merging.
fn parse_one(src: &Source) -> Result<toml::Table, Problem> {
    let to_problem = |e: toml::de::Error, key: String| {
        let line = e.span().map(|s| line_of(&src.text, s.start));
        Problem {
            file: Some(src.path.clone()),
            line,
            key,
            message: e.message().trim().to_string(),
        }
    };
    let de = toml::Deserializer::parse(&src.text).map_err(|e| to_problem(e, String::new()))?;
    if let Err(e) = serde_path_to_error::deserialize::<_, RawConfig>(de) {
        let key = display_path(e.path());
        return Err(to_problem(e.into_inner(), key));
    }
    let mut table: toml::Table =
        toml::from_str(&src.text).map_err(|e| to_problem(e, String::new()))?;
    anchor_paths(&mut table, src.path.parent().unwrap_or(Path::new(".")));
    Ok(table)
}

/// Drop `.` and fold `..` lexically, so logs show `/etc/tern/models`, not `/etc/tern/x/../models`.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Make the relative paths of one file relative to that file's directory, before merging
/// loses track of which file a value came from.
fn anchor_paths(table: &mut toml::Table, dir: &Path) {
    // The file's real directory: folding `..` below is lexical, so start from a path with no
    // symbolic links in it.
    let dir = std::fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf());
    let anchor = |v: &mut toml::Value| {
        if let toml::Value::String(s) = v
            && Path::new(s.as_str()).is_relative()
        {
            *s = normalize(&dir.join(s.as_str()))
                .to_string_lossy()
                .to_string();
        }
    };
    if let Some(v) = table.get_mut("state_dir") {
        anchor(v);
    }
    if let Some(toml::Value::Table(fleet)) = table.get_mut("fleet") {
        for key in ["ca_file", "cert_file", "key_file", "password_file"] {
            if let Some(v) = fleet.get_mut(key) {
                anchor(v);
            }
        }
    }
    for (array, key) in [("models", "package"), ("feeds", "path")] {
        if let Some(toml::Value::Array(items)) = table.get_mut(array) {
            for item in items {
                if let Some(v) = item.get_mut(key) {
                    anchor(v);
                }
            }
        }
    }
}

fn display_path(path: &serde_path_to_error::Path) -> String {
    let s = path.to_string();
    // serde_path_to_error writes `.` for the root and `models[0].x` otherwise.
    if s == "." { String::new() } else { s }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Drop-ins override scalars and plain arrays, merge tables key by key, and append to arrays
/// of tables (`[[models]]`, `[[feeds]]`, `[[pipelines]]`), so a drop-in can add a pipeline.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (Some(toml::Value::Array(a)), toml::Value::Array(b))
                if a.iter().chain(b.iter()).all(|x| x.is_table()) =>
            {
                a.extend(b)
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Find the file and line of a key path like `pipelines[1].model` (the last file that sets it
/// wins, as in the merge). Arrays of tables are counted across files in merge order.
fn locate(sources: &[Source], key: &str) -> (Option<PathBuf>, Option<usize>) {
    let segments = parse_key(key);
    let mut array_offsets: std::collections::HashMap<String, usize> = Default::default();
    let mut found = (None, None);
    for src in sources {
        let Ok(doc) = toml_edit::Document::parse(src.text.as_str()) else {
            continue;
        };
        let mut item: Option<&toml_edit::Item> = Some(doc.as_item());
        let mut shifted = Vec::new();
        for seg in &segments {
            item = match (seg, item) {
                (Seg::Key(k), Some(it)) => it.get(k.as_str()),
                (Seg::Index(i), Some(it)) => {
                    let path = shifted.join(".");
                    let offset = array_offsets.get(&path).copied().unwrap_or(0);
                    i.checked_sub(offset).and_then(|i| it.get(i))
                }
                (_, None) => None,
            };
            if let Seg::Key(k) = seg {
                shifted.push(k.clone());
            }
        }
        if let Some(span) = item.and_then(|it| it.span()) {
            found = (Some(src.path.clone()), Some(line_of(&src.text, span.start)));
        } else if item.is_some() {
            found = (Some(src.path.clone()), None);
        }
        // Advance array-of-tables offsets for the next file.
        for name in ["models", "feeds", "pipelines"] {
            if let Some(n) = doc
                .get(name)
                .and_then(|i| i.as_array_of_tables())
                .map(|a| a.len())
            {
                *array_offsets.entry(name.to_string()).or_default() += n;
            }
        }
    }
    found
}

enum Seg {
    Key(String),
    Index(usize),
}

fn parse_key(key: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let mut rest = part;
        if let Some(b) = rest.find('[') {
            out.push(Seg::Key(rest[..b].to_string()));
            rest = &rest[b..];
            while let Some(end) = rest.find(']') {
                if let Ok(i) = rest[1..end].parse() {
                    out.push(Seg::Index(i));
                }
                rest = &rest[end + 1..];
            }
        } else if !rest.is_empty() {
            out.push(Seg::Key(rest.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn problems(r: Result<Config, ConfigError>) -> Vec<Problem> {
        match r {
            Ok(c) => panic!("expected problems, got {c:?}"),
            Err(e) => e.0,
        }
    }

    /// A model an update brought (not in `[[models]]`) runs with the engine's settings; a
    /// listed one with its own over the engine's; a misspelt runtime is named at its key.
    #[test]
    fn engine_settings_are_every_model_s_default() {
        let d = tempfile::tempdir().unwrap();
        let pkg =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-updates/models/iris-mlp-int8");
        let p = write(
            d.path(),
            "t.toml",
            &format!(
                "state_dir = \"s\"\n[engine]\nruntime = \"auto\"\nthreads = 2\n\
                 [[models]]\npackage = \"{}\"\nruntime = \"cpu\"\n",
                pkg.display()
            ),
        );
        let c = load(&p).unwrap();
        let pools = c.pools();
        let listed = pools.get("iris-mlp-int8");
        assert_eq!((listed.runtime, listed.threads.get()), (Runtime::Cpu, 2));
        let other = pools.get("brought-by-an-update");
        assert_eq!((other.runtime, other.threads.get()), (Runtime::Auto, 2));
        let p = write(d.path(), "u.toml", "[engine]\nruntime = \"gpu\"\n");
        let ps = problems(load(&p));
        assert_eq!(ps[0].key, "engine.runtime", "{}", ps[0]);
        assert!(
            ps[0]
                .message
                .contains("unknown variant `gpu`, expected one of `cpu`, `cuda`, `auto`"),
            "{}",
            ps[0]
        );
    }

    /// The CPU plan: the engine's for every model, a model's own over it, a typo named.
    #[test]
    fn plans_are_chosen_per_engine_and_per_model() {
        use crate::engine::PlanChoice;
        let d = tempfile::tempdir().unwrap();
        let pkg =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-updates/models/iris-mlp-int8");
        let p = write(
            d.path(),
            "t.toml",
            &format!(
                "state_dir = \"s\"\n[engine]\nplan = \"tract\"\n\
                 [[models]]\npackage = \"{}\"\nplan = \"tract+fold\"\n",
                pkg.display()
            ),
        );
        let pools = load(&p).unwrap().pools();
        assert_eq!(pools.get("iris-mlp-int8").plan, PlanChoice::TractFolded);
        assert_eq!(pools.get("another").plan, PlanChoice::Tract);
        let p = write(d.path(), "u.toml", "[engine]\nplan = \"fast\"\n");
        let ps = problems(load(&p));
        assert_eq!(ps[0].key, "engine.plan", "{}", ps[0]);
        assert!(
            ps[0].message.contains("`auto`, `tract`, `tract+fold`"),
            "{}",
            ps[0]
        );
        let p = write(d.path(), "v.toml", "state_dir = \"s\"\n");
        assert_eq!(
            load(&p).unwrap().engine.plan,
            PlanChoice::Auto,
            "the default"
        );
        let p = write(
            d.path(),
            "w.toml",
            "[engine]\nplan = \"onnxruntime\"\nonnxruntime_library = \"nowhere/libonnxruntime.so\"\n",
        );
        let ps = problems(load(&p));
        assert_eq!(ps[0].key, "engine.onnxruntime_library", "{}", ps[0]);
        assert!(
            ps[0].message.contains("nowhere/libonnxruntime.so"),
            "{}",
            ps[0]
        );
    }

    /// Every feed kind's settings reach the config, defaults filled in; each misfit between a
    /// pipeline and its feed is named at its key.
    #[test]
    fn camera_serial_and_mqtt_feeds_validate_with_their_pipelines() {
        let d = tempfile::tempdir().unwrap();
        let pkg =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-updates/models/iris-mlp-int8");
        let base = format!(
            "state_dir = \"s\"\n[[models]]\npackage = \"{}\"\n\
             [[feeds]]\nkind = \"camera\"\nname = \"cam\"\ninput = \"/dev/video0\"\nformat = \"v4l2\"\n\
             [[feeds]]\nkind = \"serial\"\nname = \"tty\"\npath = \"/dev/ttyUSB0\"\nfields = [\"a\", \"b\"]\n\
             [[feeds]]\nkind = \"mqtt\"\nname = \"site\"\ntopic = \"site/#\"\nbroker = \"mqtt://10.0.0.2\"\n",
            pkg.display()
        );
        let pipe = |name: &str, feed: &str, extra: &str| {
            format!(
                "[[pipelines]]\nname = \"{name}\"\nfeed = \"{feed}\"\nmodel = \"iris-mlp-int8\"\n{extra}\n"
            )
        };
        let ok = base.clone()
            + &pipe("c", "cam", "max_fps = 2.5\ncapture_below = 0.4")
            + &pipe(
                "s",
                "tty",
                "window = 2\nstride = 1\npublish = \"above\"\nmin_score = 0.9",
            );
        let c = load(&write(d.path(), "ok.toml", &ok)).unwrap();
        let FeedConfig::Camera(cam) = &c.feeds[0] else {
            panic!("{:?}", c.feeds[0])
        };
        assert_eq!(cam.stall.as_secs_f64(), DEFAULT_STALL_SECS);
        assert_eq!(cam.ffmpeg, Path::new("ffmpeg"));
        let FeedConfig::Serial(tty) = &c.feeds[1] else {
            panic!("{:?}", c.feeds[1])
        };
        assert_eq!(
            (tty.baud, tty.data_bits, tty.stop_bits),
            (DEFAULT_BAUD, 8, 1)
        );
        assert_eq!(tty.format, LineFormat::Auto);
        let FeedConfig::Mqtt(site) = &c.feeds[2] else {
            panic!("{:?}", c.feeds[2])
        };
        assert_eq!((site.host.as_str(), site.port), ("10.0.0.2", 1883));
        let (cp, sp) = (&c.pipelines[0], &c.pipelines[1]);
        assert_eq!((cp.on_full, sp.on_full), (OnFull::DropOldest, OnFull::Wait));
        assert_eq!(cp.max_fps, Some(2.5));
        assert_eq!((sp.window.get(), sp.stride.get()), (2, 1));
        assert_eq!(sp.publish, Publish::Above(0.9));
        assert_eq!(c.store.results_budget_bytes, 256 * 1024 * 1024);

        let bad = base
            .replace("fields = [\"a\", \"b\"]", "fields = []")
            .replace("broker = \"mqtt://10.0.0.2\"\n", "")
            + "[store]\nresults_budget_mib = 0\n"
            + &pipe("c", "cam", "window = 4")
            + &pipe("s", "tty", "publish = \"above\"")
            + &pipe("t", "tty", "min_score = 0.5\nmax_fps = 0");
        let ps = problems(load(&write(d.path(), "bad.toml", &bad)));
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "feeds[1].fields",
                "feeds[2].broker",
                "pipelines[0].window",
                "pipelines[1].min_score",
                "pipelines[2].max_fps",
                "pipelines[2].min_score",
                "feeds[1].path",
                "store.results_budget_mib",
            ],
            "{ps:#?}"
        );
        assert!(ps[2].message.contains("not readings"), "{}", ps[2]);
        assert!(ps[6].message.contains("read by 2 pipelines"), "{}", ps[6]);
    }

    /// Values that would panic or loop at run time are refused up front.
    #[test]
    fn feed_values_that_cannot_work_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("in")).unwrap();
        let text = "[[feeds]]\nkind = \"camera\"\nname = \"a\"\ninput = \"x\"\nstall_secs = nan\n\
            [[feeds]]\nkind = \"camera\"\nname = \"b\"\ninput = \"x\"\nfps = 0.1\nstall_secs = 5\n\
            [[feeds]]\nkind = \"mqtt\"\nname = \"c\"\ntopic = \"a/#/b\"\nbroker = \"mqtt://h\"\n\
            [[feeds]]\nkind = \"mqtt\"\nname = \"e\"\ntopic = \"a+/b\"\nbroker = \"mqtt://h\"\n\
            [[feeds]]\nkind = \"directory\"\nname = \"f\"\npath = \"in\"\n\
            [[pipelines]]\nname = \"p\"\nfeed = \"f\"\nmodel = \"m\"\non_full = \"drop_oldest\"\nqueue = 100000\n";
        let ps = problems(load(&write(d.path(), "t.toml", text)));
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "feeds[0].stall_secs",
                "feeds[1].stall_secs",
                "feeds[2].topic",
                "feeds[3].topic",
                "pipelines[0].model",
                "pipelines[0].on_full",
                "pipelines[0].queue",
            ],
            "{ps:#?}"
        );
        assert!(ps[1].message.contains("too short"), "{}", ps[1]);
        // Without a stall given, a slow camera waits three of its frame gaps.
        let slow = "[[feeds]]\nkind = \"camera\"\nname = \"a\"\ninput = \"x\"\nfps = 0.05\n";
        let c = load(&write(d.path(), "s.toml", slow)).unwrap();
        let FeedConfig::Camera(cam) = &c.feeds[0] else {
            panic!()
        };
        assert_eq!(cam.stall.as_secs(), 60);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "t.toml",
            "state_dir = \"s\"\n\n[engine]\nthreds = 2\n",
        );
        let ps = problems(load(&p));
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert_eq!(ps[0].line, Some(4));
        assert!(ps[0].message.contains("threds"), "{}", ps[0]);
    }

    #[test]
    fn wrong_type_and_zero_name_key() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "t.toml", "[engine]\nqueue = 0\n");
        let ps = problems(load(&p));
        assert_eq!(ps[0].key, "engine.queue", "{}", ps[0]);
        assert_eq!(ps[0].line, Some(2));
        let p = write(d.path(), "t.toml", "[engine]\nthreads = \"two\"\n");
        let ps = problems(load(&p));
        assert_eq!(ps[0].key, "engine.threads", "{}", ps[0]);
    }

    /// Discovery needs the fleet broker, a prefix Home Assistant can subscribe to, and classes
    /// of pipelines that exist; each mistake is named at its key.
    #[test]
    fn home_assistant_discovery_validates_its_prefix_and_pipelines() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("in")).unwrap();
        let pkg =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-updates/models/iris-mlp-int8");
        let base = format!(
            "state_dir = \"s\"\n[[models]]\npackage = \"{}\"\n\
             [[feeds]]\nkind = \"directory\"\nname = \"f\"\npath = \"in\"\n\
             [[pipelines]]\nname = \"p\"\nfeed = \"f\"\nmodel = \"iris-mlp-int8\"\n",
            pkg.display()
        );
        let fleet = "[fleet]\nbroker = \"mqtt://127.0.0.1\"\ndevice = \"b1\"\n";
        let ok = format!(
            "{base}{fleet}[home_assistant]\ndiscovery_prefix = \"ha/site\"\n\
             [home_assistant.classes]\np = [\"setosa\"]\n"
        );
        let c = load(&write(d.path(), "ok.toml", &ok)).unwrap();
        let ha = c.home_assistant.expect("discovery on");
        assert_eq!(ha.discovery_prefix, "ha/site");
        assert_eq!(ha.classes["p"], ["setosa"]);
        assert_eq!(
            load(&write(d.path(), "off.toml", &base))
                .unwrap()
                .home_assistant,
            None
        );
        let bad = format!(
            "{base}[home_assistant]\ndiscovery_prefix = \"ha/#\"\n\
             [home_assistant.classes]\nq = [\"\"]\np = [\"a\", \"a\"]\n"
        );
        let ps = problems(load(&write(d.path(), "bad.toml", &bad)));
        let said: Vec<(&str, &str)> = ps
            .iter()
            .map(|p| (p.key.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            said,
            [
                (
                    "home_assistant.discovery_prefix",
                    "discovery messages go to the fleet broker: add a [fleet] section"
                ),
                (
                    "home_assistant.discovery_prefix",
                    "`ha/#` must be a topic without wildcards or a leading/trailing `/` (e.g. \"homeassistant\")"
                ),
                ("home_assistant.classes.p[1]", "`a` is listed twice"),
                ("home_assistant.classes.q", "no pipeline is called `q`"),
                (
                    "home_assistant.classes.q[0]",
                    "a label must be 1 to 128 bytes"
                ),
            ]
        );
    }

    #[test]
    fn semantic_problems_all_reported_with_lines_in_dropins() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("in")).unwrap();
        let p = write(
            d.path(),
            "t.toml",
            "[[feeds]]\nkind = \"directory\"\nname = \"a\"\npath = \"in\"\n",
        );
        write(
            d.path(),
            "config.d/10-x.toml",
            "[[feeds]]\nkind = \"directory\"\nname = \"b\"\npath = \"nope\"\n\n[[pipelines]]\nname = \"p\"\nfeed = \"zz\"\nmodel = \"m\"\n",
        );
        let ps = problems(load(&p));
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["feeds[1].path", "pipelines[0].feed", "pipelines[0].model"],
            "{ps:?}"
        );
        assert!(ps[0].file.as_ref().unwrap().ends_with("config.d/10-x.toml"));
        assert_eq!(ps[0].line, Some(4));
        assert_eq!(ps[1].line, Some(8));
    }

    #[test]
    fn relative_paths_are_relative_to_the_file_that_holds_them() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("config.d/in")).unwrap();
        let p = write(d.path(), "t.toml", "state_dir = \"s\"\n");
        write(
            d.path(),
            "config.d/feed.toml",
            "[[feeds]]\nkind = \"directory\"\nname = \"a\"\npath = \"in\"\n",
        );
        let c = load(&p).unwrap();
        assert_eq!(c.state_dir, d.path().join("s"));
        let FeedConfig::Directory { path, .. } = &c.feeds[0] else {
            panic!("a directory feed")
        };
        assert_eq!(path, &d.path().join("config.d/in"));
    }

    #[test]
    fn defaults_and_merge() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "t.toml",
            "state_dir = \"s\"\n[log]\nlevel = \"info\"\n",
        );
        write(d.path(), "config.d/a.toml", "[log]\nlevel = \"debug\"\n");
        let c = load(&p).unwrap();
        assert_eq!(c.state_dir, d.path().join("s"));
        assert_eq!(c.log_level, "debug");
        assert!(c.models.is_empty());
    }
}
