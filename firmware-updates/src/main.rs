//! `tern-update`: the operator's tool for keys, signed fleet commands and (later) model updates.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tern_update::command::{self, SigningKey};

#[derive(Parser)]
#[command(name = "tern-update", version, about = "tern operator tool")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a new Ed25519 signing key (PKCS#8, mode 0600) and print its public key (base64),
    /// the form `fleet.commands.keys` in ternd.toml takes.
    Keygen {
        /// Where to write the private key; refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key (base64) of a private key file.
    Pubkey {
        #[arg(long)]
        key: PathBuf,
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
    /// Build, sign, verify and publish model update bundles: not implemented yet.
    Bundle,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-update: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Keygen { out } => {
            let pkcs8 = command::generate_pkcs8();
            write_private(&out, &pkcs8)?;
            let key = SigningKey::from_pkcs8(&pkcs8)?;
            println!("{}", key.public().to_base64());
        }
        Cmd::Pubkey { key } => println!("{}", load_key(&key)?.public().to_base64()),
        Cmd::SignCommand {
            key,
            target,
            name,
            id,
            args,
        } => {
            let args: serde_json::Value =
                serde_json::from_str(&args).context("--args is not JSON")?;
            if !args.is_object() {
                bail!("--args must be a JSON object");
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs() as i64;
            let cmd = command::sign(&load_key(&key)?, &name, &target, &id, args, now);
            println!("{cmd}");
        }
        Cmd::Bundle => bail!(
            "bundles are not implemented yet; model packages are built by \
             firmware-updates/models/make_models.py"
        ),
    }
    Ok(())
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
