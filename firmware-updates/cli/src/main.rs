//! `tern-update`: the operator's tool for keys, signed fleet commands and model update bundles.

mod fleet;
mod ingest;
mod mqtt;
mod package;
mod rollout;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tern_update::artifact::{self, BundleFile};
use tern_update::bundle::{self, Artifact, KeySet, Signed, Targets};
use tern_update::command::{self, PublicKey, SigningKey};

#[derive(Parser)]
#[command(name = "tern-update", version, about = "tern operator tool")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct BrokerArgs {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`. Give it once per node for a broker
    /// cluster whose nodes keep retained messages apart (ejabberd 23.01): tern-update checks,
    /// and then publishes and reads retained messages through every node.
    #[arg(long, required = true)]
    broker: Vec<String>,
    #[arg(long, default_value = "tern")]
    prefix: String,
    /// CA certificate (PEM) for mqtts; default: the system's roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    #[arg(long)]
    username: Option<String>,
    /// A file holding the broker password.
    #[arg(long)]
    password_file: Option<PathBuf>,
}

impl BrokerArgs {
    /// The node commands and live messages go through.
    fn primary(&self) -> &str {
        &self.broker[0]
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a new Ed25519 signing key (PKCS#8, mode 0600) and print its public key (base64),
    /// the form `fleet.commands.keys` and `updates.keys` in ternd.toml take.
    Keygen {
        /// Where to write the private key; refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key (base64) of a private key file.
    Pubkey {
        /// The private key file.
        #[arg(required_unless_present = "key", conflicts_with = "key")]
        path: Option<PathBuf>,
        /// The same, as an option.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Print a signed command payload, ready for `mosquitto_pub -s` to
    /// `<prefix>/<device>/cmd/<name>` (or `<prefix>/fleet/<group>/cmd/<name>`).
    SignCommand {
        #[arg(long)]
        key: PathBuf,
        /// The device id, or `group:<name>` for a group topic.
        #[arg(long)]
        target: String,
        /// The command name, e.g. `models.activate`.
        #[arg(long)]
        name: String,
        /// The command id; a repeat of an id is answered with the first reply.
        #[arg(long)]
        id: String,
        /// The arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
    },
    /// Build an update bundle from a model package directory. The package is loaded and its
    /// golden vectors run in tern's engine first: a package that fails is refused.
    Bundle {
        /// The model package directory (tern-model.toml, model.onnx, golden vectors).
        #[arg(long)]
        package: PathBuf,
        /// Where to write the bundle.
        #[arg(long)]
        out: PathBuf,
        /// Sign with this key (repeat for several; none: sign later with `sign`).
        #[arg(long)]
        key: Vec<PathBuf>,
        /// Only boxes in one of these groups install it (default: any).
        #[arg(long)]
        group: Vec<String>,
        /// Only these devices install it (default: any).
        #[arg(long)]
        device: Vec<String>,
        /// Only these architectures (`x86_64`, `aarch64`, `arm`; default: any).
        #[arg(long)]
        arch: Vec<String>,
        /// The oldest ternd that may install it.
        #[arg(long)]
        min_ternd: Option<String>,
        /// Days until boxes refuse the manifest.
        #[arg(long, default_value_t = 30)]
        expires_in_days: u64,
        /// Bytes per chunk over MQTT.
        #[arg(long, default_value_t = 64 * 1024)]
        chunk_size: u64,
        /// Run it as a shadow of the active version first, judged by this rule:
        /// `agreement=0.95,samples=200[,latency_p90_ms=50][,fraction=0.1][,cpu_share=0.25]`
        /// (without `agreement`, the operator promotes or drops it by command).
        #[arg(long, value_parser = |s: &str| bundle::ShadowSpec::parse_pairs(s))]
        shadow: Option<bundle::ShadowSpec>,
    },
    /// Add a signature to a bundle (for a threshold of several keys, each holder signs). It
    /// signs what the bundle holds and runs no self-test: that ran when `bundle` made it.
    Sign {
        #[arg(long)]
        key: PathBuf,
        bundle: PathBuf,
    },
    /// Verify a bundle as a box would: signatures against the given keys and threshold, the
    /// manifest's bounds and expiry, every chunk and the whole artifact, and what it unpacks to.
    Verify {
        /// A trusted public key (base64); repeat for several.
        #[arg(long = "trust", required = true)]
        trust: Vec<String>,
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        bundle: PathBuf,
    },
    /// Print what a bundle holds.
    Inspect {
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Sign a new trusted key set with the current keys (key rotation); publish the output
    /// retained on `<prefix>/fleet/keys`.
    SignKeys {
        /// Goes up with every rotation.
        #[arg(long)]
        version: u64,
        /// A public key (base64) of the new set; repeat for several.
        #[arg(long = "new-key", required = true)]
        new_keys: Vec<String>,
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// A current private key; repeat up to the current threshold.
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
    },
    /// Publish a bundle over MQTT: chunks retained on `<prefix>/artifacts/<sha256>/<i>`, then
    /// the manifest retained on the group's or device's update topic.
    Publish {
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long, conflicts_with = "device", required_unless_present = "device")]
        group: Option<String>,
        #[arg(long)]
        device: Option<String>,
        /// Send to this many devices of the group first and wait for them to commit.
        #[arg(long, requires = "group")]
        canary: Option<usize>,
        /// Stop the rollout (rolling back canaries that committed) if more than this percentage
        /// of the canaries failed, were refused or did not answer in time.
        #[arg(long, default_value_t = 0.0)]
        abort_above: f64,
        /// How long to wait for the canaries.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
        /// Key to sign the canaries' rollback commands with (when boxes require signing).
        #[arg(long)]
        command_key: Option<PathBuf>,
        bundle: PathBuf,
    },
    /// Publish the time, signed with the update keys, retained on `<prefix>/fleet/time`:
    /// boxes without a real-time clock judge expiry by it, and boxes with
    /// `updates.freshness_secs` need one younger than that window. Run it more often than
    /// the shortest window (`--every-secs`, or a timer).
    Time {
        #[command(flatten)]
        broker: BrokerArgs,
        /// An update signing key; repeat up to the boxes' threshold.
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
        /// Publish again every this many seconds, until stopped.
        #[arg(long)]
        every_secs: Option<u64>,
    },
    /// Take a published bundle off the broker: clear its retained manifest on the group's or
    /// device's update topic (boxes stop a download of it in progress) and its retained chunks.
    Withdraw {
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long, conflicts_with = "device", required_unless_present = "device")]
        group: Option<String>,
        #[arg(long)]
        device: Option<String>,
        bundle: PathBuf,
    },
    /// Bring your own model: a manifest skeleton from an ONNX file, golden vectors from
    /// onnxruntime.
    Package {
        #[command(subcommand)]
        action: PackageCmd,
    },
    /// Show the rollout in a group: each device's update state, live (or once).
    Status {
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long)]
        group: String,
        /// Print once and exit (after the broker's retained messages arrived).
        #[arg(long)]
        once: bool,
        /// Follow this bundle's update only, until every online box of the group has an
        /// outcome for it: exit 0 if all committed, 65 if any failed, was refused or rolled
        /// back (1: an error here). It waits as long as no online box has an outcome.
        #[arg(long, conflicts_with = "once")]
        bundle: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Roll a bundle out in waves: each wave's boxes get it on their own update topic, the
    /// next wave starts when this one committed (and soaked), and a wave that fails more than
    /// `--abort-above` stops the rollout: manifests withdrawn, committed boxes rolled back. The
    /// state is kept in `<state-dir>/<id>.json` and retained on `<prefix>/fleet/rollouts/<id>`:
    /// the same command again resumes it. Exit 0 when every wave passed, 65 when it stopped.
    Rollout {
        #[command(flatten)]
        broker: BrokerArgs,
        /// The rollout's name (letters, digits, `-`, `_`, `.`).
        #[arg(long)]
        id: String,
        /// The signed bundle (needed to start; on resume it must be the same).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Roll out to the members of this group (from their retained births, away ones too).
        #[arg(long, conflicts_with = "device")]
        group: Option<String>,
        /// Or to these devices, in this order (repeat).
        #[arg(long)]
        device: Vec<String>,
        /// Wave sizes: counts, percentages of the target, `rest` [default: 1,5%,25%,rest].
        #[arg(long)]
        waves: Option<String>,
        /// Failures a wave may have and go on: a count or `N%` of the wave [default: 0].
        #[arg(long)]
        abort_above: Option<String>,
        /// How long a wave's online boxes have to commit [default: 600].
        #[arg(long)]
        wait_secs: Option<u64>,
        /// Minimum time between a wave passing and the next starting [default: 0].
        #[arg(long)]
        soak_secs: Option<u64>,
        /// After the last wave, wait this long for boxes that were away.
        #[arg(long, default_value_t = 0)]
        late_secs: u64,
        /// Key to sign the abort's rollback commands with (when boxes require signing).
        #[arg(long)]
        command_key: Option<PathBuf>,
        /// Where rollout states are kept [default: $XDG_STATE_HOME/tern-update/rollouts].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Every box as the broker remembers it (presence, groups, models and plans, last update,
    /// health, outbox backlog) and the rollouts, printed once the retained messages arrived.
    Fleet {
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        json: bool,
        /// Keep printing as boxes change.
        #[arg(long)]
        watch: bool,
    },
    /// Consume the fleet's results into a SQLite database, as one of several workers on an
    /// MQTT 5 shared subscription (`$share/<share>/<prefix>/+/results/#`): each message is
    /// stored, then acknowledged; duplicates fall on (device, stream, seq). Runs until SIGINT or
    /// SIGTERM; `tern-update gaps` then reads the database.
    Ingest {
        #[command(flatten)]
        broker: BrokerArgs,
        /// The shared subscription's name: workers with the same name share the messages.
        #[arg(long, default_value = "tern-ingest")]
        share: String,
        /// The database (created if missing; several workers may share it).
        #[arg(long)]
        db: PathBuf,
        /// Events too (`<prefix>/+/events`): `outbox.dropped` ones explain gaps.
        #[arg(long)]
        events: bool,
    },
    /// Missing sequence numbers per stream in an `ingest` database, less the ranges the boxes
    /// reported dropped: exit 0 when none, 65 when some.
    Gaps {
        #[arg(long)]
        db: PathBuf,
    },
}

#[derive(Subcommand)]
enum PackageCmd {
    /// Write a package directory: the model (copied) and a format 2 manifest skeleton from
    /// the file's inputs and outputs, with what it leaves open marked TODO.
    Init {
        /// The ONNX file.
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The package name (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
    },
    /// Record golden vectors: each input file (image, .npy, .npz, JSON) through tern's
    /// preprocessing, its outputs from onnxruntime; then load the package as a box would.
    Golden {
        /// The package directory.
        dir: PathBuf,
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// A Python with numpy and onnxruntime.
        #[arg(long, default_value = "python3")]
        python: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        // The reader went away (`| head`): what it wanted it has; nothing went wrong here.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern-update: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Keygen { out } => {
            let pkcs8 = command::generate_pkcs8();
            write_private(&out, &pkcs8)?;
            let key = SigningKey::from_pkcs8(&pkcs8)?;
            println!("{}", key.public().to_base64());
        }
        Cmd::Pubkey { path, key } => {
            let path = path.or(key).expect("clap requires one");
            println!("{}", load_key(&path)?.public().to_base64())
        }
        Cmd::SignCommand {
            key,
            target,
            name,
            id,
            args,
        } => {
            let args: Value = serde_json::from_str(&args).context("--args is not JSON")?;
            if !args.is_object() {
                bail!("--args must be a JSON object");
            }
            let cmd = command::sign(&load_key(&key)?, &name, &target, &id, args, now());
            println!("{cmd}");
        }
        Cmd::Bundle {
            package,
            out,
            key,
            group,
            device,
            arch,
            min_ternd,
            expires_in_days,
            chunk_size,
            shadow,
        } => {
            if !(bundle::MIN_CHUNK..=bundle::MAX_CHUNK).contains(&chunk_size) {
                bail!(
                    "--chunk-size {chunk_size} is outside {}..={}",
                    bundle::MIN_CHUNK,
                    bundle::MAX_CHUNK
                );
            }
            // The same load and golden-vector self-test a box runs before it activates.
            let model = ternd::engine::Model::load(&package, std::num::NonZeroUsize::MIN)
                .with_context(|| format!("{} fails tern's self-test", package.display()))?;
            // A plan some boxes lack may be the only one that passes (onnxruntime running a
            // model tract runs wrongly): those boxes will refuse the update. Say so now.
            let refused: Vec<&String> = model
                .timings
                .iter()
                .filter(|t| !t.ends_with(" µs"))
                .collect();
            if !refused.is_empty() {
                eprintln!(
                    "tern-update: warning: {} passes its self-test on plan `{}` here, but not on: \
                     {}; boxes that only have those plans will refuse the update",
                    package.display(),
                    model.plan,
                    refused
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            // The evaluation gate a box runs next, before anything is signed.
            match model
                .evaluate()
                .with_context(|| format!("{} fails its evaluation", package.display()))?
            {
                Some(v) if !v.passed => {
                    bail!("{} fails its evaluation: {v}", package.display())
                }
                Some(v) => eprintln!("evaluation: {v}"),
                None => {}
            }
            let bytes = artifact::pack(&package)
                .with_context(|| format!("packing {}", package.display()))?;
            let signed = Signed {
                format: bundle::FORMAT,
                kind: "model".into(),
                name: model.name().to_string(),
                version: model.version().to_string(),
                artifact: Artifact::describe(&bytes, chunk_size),
                targets: Targets {
                    groups: group,
                    devices: device,
                    arch,
                    min_ternd,
                },
                expires: now() + expires_in_days as i64 * 86_400,
                issued: Some(now()),
                shadow,
            };
            let keys = key
                .iter()
                .map(|k| load_key(k))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let m = bundle::sign(&signed, &keys.iter().collect::<Vec<_>>());
            artifact::write_bundle(&out, &m, &mut &bytes[..])
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}: {} {} ({} bytes in {} chunks, sha256 {}), {} signature(s)",
                out.display(),
                signed.name,
                signed.version,
                signed.artifact.size,
                signed.artifact.chunks.len(),
                signed.artifact.sha256,
                m.signatures.len()
            );
        }
        Cmd::Sign { key, bundle: path } => {
            let key = load_key(&key)?;
            let b =
                BundleFile::open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let mut m = b.manifest.clone();
            let signed: Signed = serde_json::from_value(m.signed.clone())
                .with_context(|| format!("{}: manifest", path.display()))?;
            let me = key.public().to_base64();
            if m.signatures.iter().any(|s| s.key == me) {
                bail!("{} is already signed by {me}", path.display());
            }
            m.signatures
                .extend(bundle::sign(&signed, &[&key]).signatures);
            let mut art = b.artifact()?;
            artifact::write_bundle(&path, &m, &mut art)?;
            println!("{}: {} signature(s)", path.display(), m.signatures.len());
            eprintln!(
                "tern-update: signed without a self-test (that ran when `bundle` made it); \
                 `tern-update verify` checks the signatures and the artifact"
            );
        }
        Cmd::Verify {
            trust,
            threshold,
            bundle: path,
        } => return verify(&trust, threshold, &path),
        Cmd::Inspect { bundle: path, json } => inspect(&path, json)?,
        Cmd::Package {
            action: PackageCmd::Init { model, out, name },
        } => package::init(&model, &out, name)?,
        Cmd::Package {
            action:
                PackageCmd::Golden {
                    dir,
                    inputs,
                    python,
                },
        } => {
            if !package::golden(&dir, &inputs, &python)? {
                return Ok(ExitCode::from(2));
            }
        }
        Cmd::SignKeys {
            version,
            new_keys,
            threshold,
            key,
        } => {
            let mut parsed = Vec::new();
            for k in &new_keys {
                let p = PublicKey::parse(k).with_context(|| format!("--new-key {k}"))?;
                if parsed.contains(&p) {
                    bail!("--new-key {k} is given twice");
                }
                parsed.push(p);
            }
            if threshold == 0 || threshold > new_keys.len() {
                bail!("--threshold {threshold} for {} key(s)", new_keys.len());
            }
            let keys = key
                .iter()
                .map(|k| load_key(k))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let doc = bundle::KeysDoc {
                version,
                keys: new_keys,
                threshold,
            };
            let m = bundle::sign_keys(&doc, &keys.iter().collect::<Vec<_>>());
            println!("{}", serde_json::to_string(&m)?);
        }
        Cmd::Publish {
            broker,
            group,
            device,
            canary,
            abort_above,
            wait_secs,
            command_key,
            bundle: path,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            return rt.block_on(mqtt::publish(mqtt::PublishArgs {
                broker,
                group,
                device,
                canary,
                abort_above,
                wait: Duration::from_secs(wait_secs),
                command_key: command_key.map(|k| load_key(&k)).transpose()?,
                bundle: path,
            }));
        }
        Cmd::Time {
            broker,
            key,
            every_secs,
        } => {
            let keys = key
                .iter()
                .map(|k| load_key(k))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if every_secs == Some(0) {
                bail!("--every-secs must be at least 1");
            }
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(mqtt::time(
                broker,
                keys,
                every_secs.map(Duration::from_secs),
            ))?;
        }
        Cmd::Withdraw {
            broker,
            group,
            device,
            bundle: path,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(mqtt::withdraw(broker, group, device, &path))?;
        }
        Cmd::Rollout {
            broker,
            id,
            bundle,
            group,
            device,
            waves,
            abort_above,
            wait_secs,
            soak_secs,
            late_secs,
            command_key,
            state_dir,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            return rt.block_on(rollout::run(rollout::Args {
                broker,
                id,
                bundle,
                group,
                devices: device,
                waves,
                abort_above,
                wait_secs,
                soak_secs,
                late_secs,
                command_key: command_key.map(|k| load_key(&k)).transpose()?,
                state_dir,
            }));
        }
        Cmd::Ingest {
            broker,
            share,
            db,
            events,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            return rt.block_on(ingest::run(ingest::Args {
                broker,
                share,
                db,
                events,
            }));
        }
        Cmd::Gaps { db } => return ingest::gaps(&db),
        Cmd::Fleet {
            broker,
            group,
            json,
            watch,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            return rt.block_on(fleet::run(broker, group.as_deref(), json, watch));
        }
        Cmd::Status {
            broker,
            group,
            once,
            bundle,
            json,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            return rt.block_on(mqtt::status(broker, &group, once, bundle.as_deref(), json));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(trust: &[String], threshold: usize, path: &Path) -> anyhow::Result<ExitCode> {
    let keys = trust
        .iter()
        .map(|k| PublicKey::parse(k).with_context(|| format!("--trust {k}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let set = KeySet {
        keys,
        threshold,
        retired: vec![],
    };
    let refused = |code: tern_update::Code, e: &dyn std::fmt::Display| {
        println!("REFUSED ({code}): {e}");
        Ok(ExitCode::from(65))
    };
    let b = match BundleFile::open(path) {
        Ok(b) => b,
        Err(artifact::UnpackError::Refused(e)) => return refused(e.code(), &e),
        Err(e) => return Err(e.into()),
    };
    // Targeting is the box's business; check everything else as a box in the target would.
    let signed: Signed = match serde_json::from_value(b.manifest.signed.clone()) {
        Ok(s) => s,
        Err(e) => return refused(tern_update::Code::Malformed, &e),
    };
    let t = &signed.targets;
    let device = t.devices.first().cloned().unwrap_or_default();
    let ternd = t
        .min_ternd
        .as_deref()
        .and_then(|v| semver::Version::parse(v).ok())
        .unwrap_or(semver::Version::new(0, 0, 0))
        .max(semver::Version::parse(ternd::VERSION)?);
    let this = bundle::ThisBox {
        device: &device,
        groups: &t.groups,
        arch: t
            .arch
            .first()
            .map(String::as_str)
            .unwrap_or(std::env::consts::ARCH),
        ternd: &ternd,
    };
    let s = match bundle::verify(&b.manifest, &set, now(), &this, None) {
        Ok(s) => s,
        Err(e) => return refused(e.code(), &e),
    };
    if b.artifact_len != s.artifact.size {
        let e = bundle::RefusalError::BadSize {
            got: b.artifact_len,
            want: s.artifact.size,
        };
        return refused(e.code(), &e);
    }
    let mut bytes = Vec::new();
    b.artifact()?.read_to_end(&mut bytes)?;
    for (i, c) in bytes.chunks(s.artifact.chunk_size as usize).enumerate() {
        if let Err(e) = s.artifact.check_chunk(i, c) {
            return refused(e.code(), &e);
        }
    }
    if let Err(e) = s
        .artifact
        .check_whole(bytes.len() as u64, &tern_update::sha256_hex(&bytes))
    {
        return refused(e.code(), &e);
    }
    let dir = tempfile::tempdir()?;
    if let Err(e) = artifact::unpack(&bytes[..], &dir.path().join("p")) {
        return match e {
            artifact::UnpackError::Refused(r) => refused(r.code(), &r),
            other => Err(other.into()),
        };
    }
    println!(
        "OK: {} {}, {} signature(s), {} bytes, sha256 {}",
        s.name,
        s.version,
        b.manifest.signatures.len(),
        s.artifact.size,
        s.artifact.sha256
    );
    Ok(ExitCode::SUCCESS)
}

fn inspect(path: &Path, as_json: bool) -> anyhow::Result<()> {
    let b = BundleFile::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let s = &b.manifest.signed;
    let mut files = Vec::new();
    let mut ar = tar_entries(&b)?;
    files.append(&mut ar);
    let info = json!({
        "kind": s.get("kind"), "name": s.get("name"), "version": s.get("version"),
        "expires": s.get("expires"), "issued": s.get("issued"), "targets": s.get("targets"),
        "artifact": {
            "sha256": s.pointer("/artifact/sha256"), "size": s.pointer("/artifact/size"),
            "chunk_size": s.pointer("/artifact/chunk_size"),
            "chunks": s.pointer("/artifact/chunks").and_then(Value::as_array).map(Vec::len),
        },
        "signatures": b.manifest.signatures.iter().map(|g| &g.key).collect::<Vec<_>>(),
        "files": files,
    });
    if as_json {
        println!("{info}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "bundle     {}", path.display())?;
    for k in ["kind", "name", "version", "issued", "expires"] {
        writeln!(out, "{k:<10} {}", info[k])?;
    }
    writeln!(out, "targets    {}", info["targets"])?;
    writeln!(out, "artifact   {}", info["artifact"])?;
    for k in b.manifest.signatures.iter() {
        writeln!(out, "signed by  {}", k.key)?;
    }
    for f in &files {
        writeln!(
            out,
            "  {:>10}  {}",
            f["size"],
            f["path"].as_str().unwrap_or("")
        )?;
    }
    Ok(())
}

fn tar_entries(b: &BundleFile) -> anyhow::Result<Vec<Value>> {
    let mut ar = tar::Archive::new(b.artifact()?);
    let mut out = Vec::new();
    for e in ar.entries()? {
        let e = e?;
        out.push(json!({"path": e.path()?.display().to_string(), "size": e.size()}));
    }
    Ok(out)
}

fn load_key(path: &Path) -> anyhow::Result<SigningKey> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    SigningKey::from_pkcs8(&bytes).with_context(|| path.display().to_string())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
