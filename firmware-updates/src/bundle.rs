//! Signed update manifests: the format, its canonical bytes, and every check a box makes before
//! it fetches a byte of an update. The daemon and `tern-update` share this code.
//!
//! A manifest is JSON: `{"signed": {...}, "signatures": [{"key", "sig"}]}`. The signatures
//! cover `tern-bundle-v1\n` followed by the `signed` object in canonical JSON (keys sorted,
//! no white space), so the box re-derives the exact bytes instead of trusting any encoding it
//! was sent. Trust follows TUF's ideas in small: a key set with a threshold; a manifest needs
//! valid signatures from at least `threshold` distinct trusted keys; a new key set is accepted
//! only when a threshold of the current set signed it (rotation), after which the old keys no
//! longer count.
//!
//! Everything read from the network is bounded before it is used: the manifest's size, the
//! number of chunks, the artifact's size, every name.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Code;
use crate::command::{PublicKey, SigningKey, canonical_json};

const CONTEXT: &str = "tern-bundle-v1\n";
const KEYS_CONTEXT: &str = "tern-keys-v1\n";
const TIME_CONTEXT: &str = "tern-time-v1\n";
/// Largest manifest accepted, before parsing.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Largest artifact accepted (a model package).
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;
pub const MIN_CHUNK: u64 = 4 * 1024;
pub const MAX_CHUNK: u64 = 1024 * 1024;
pub const FORMAT: u32 = 1;

/// What a manifest says, once verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    pub format: u32,
    /// `model` now; `config` and `daemon` are reserved and refused by this version.
    pub kind: String,
    pub name: String,
    pub version: String,
    pub artifact: Artifact,
    #[serde(default)]
    pub targets: Targets,
    /// Unix seconds after which the manifest is refused.
    pub expires: i64,
    /// Unix seconds when it was made: boxes with a freshness rule refuse it once it is older
    /// than their window. Absent in manifests made before the rule existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<i64>,
    /// Run the version as a shadow of the active one before (and instead of, until its
    /// verdict) activating it. Absent: activate it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
}

/// How a candidate runs as a shadow, and the rule that judges it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    /// Share of the live inputs the candidate also runs on, in [0.001, 1].
    #[serde(default = "ShadowSpec::default_fraction")]
    pub fraction: f64,
    /// Share of one core the candidate may use, in [0.01, 1]: it rests after each input long
    /// enough to stay within it (and runs at the lowest priority).
    #[serde(default = "ShadowSpec::default_cpu_share")]
    pub cpu_share: f64,
    /// Promote once this share of at least `samples` compared inputs agree; refuse once
    /// `samples` are compared and fewer agree. Absent: only the operator decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(default = "ShadowSpec::default_samples")]
    pub samples: u64,
    /// And the candidate's 90th percentile latency is at most this, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p90_ms: Option<f64>,
}

impl ShadowSpec {
    fn default_fraction() -> f64 {
        0.1
    }
    fn default_cpu_share() -> f64 {
        0.25
    }
    fn default_samples() -> u64 {
        200
    }

    /// Why these figures make no rule, if they do not.
    pub fn check(&self) -> Result<(), String> {
        // A share so small that the shadow would never see an input, or rest for ever.
        let share = |what: &str, v: f64, min: f64| {
            if v >= min && v <= 1.0 {
                Ok(())
            } else {
                Err(format!("shadow {what} {v} is not in [{min}, 1]"))
            }
        };
        share("fraction", self.fraction, 0.001)?;
        share("cpu_share", self.cpu_share, 0.01)?;
        if let Some(a) = self.agreement
            && !(0.0..=1.0).contains(&a)
        {
            return Err(format!("shadow agreement {a} is not in [0, 1]"));
        }
        if !(1..=1_000_000).contains(&self.samples) {
            return Err(format!(
                "shadow samples {} is not in 1..=1000000",
                self.samples
            ));
        }
        if let Some(l) = self.latency_p90_ms
            && !(l > 0.0 && l.is_finite())
        {
            return Err(format!(
                "shadow latency_p90_ms {l} is not a positive number"
            ));
        }
        if self.latency_p90_ms.is_some() && self.agreement.is_none() {
            return Err("shadow latency_p90_ms needs an agreement rule beside it".into());
        }
        Ok(())
    }

    /// From `key=value` pairs separated by commas, as `tern-update bundle --shadow` takes
    /// them: `agreement=0.95,samples=200,fraction=0.5,cpu_share=0.25,latency_p90_ms=50`.
    pub fn parse_pairs(s: &str) -> Result<ShadowSpec, String> {
        let mut spec = ShadowSpec {
            fraction: Self::default_fraction(),
            cpu_share: Self::default_cpu_share(),
            agreement: None,
            samples: Self::default_samples(),
            latency_p90_ms: None,
        };
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("shadow `{pair}` is not key=value"))?;
            let num = || {
                v.trim()
                    .parse::<f64>()
                    .map_err(|e| format!("shadow {k}: `{v}`: {e}"))
            };
            match k.trim() {
                "fraction" => spec.fraction = num()?,
                "cpu_share" => spec.cpu_share = num()?,
                "agreement" => spec.agreement = Some(num()?),
                "latency_p90_ms" => spec.latency_p90_ms = Some(num()?),
                "samples" => {
                    spec.samples = v
                        .trim()
                        .parse()
                        .map_err(|e| format!("shadow samples: `{v}`: {e}"))?
                }
                other => {
                    return Err(format!(
                        "shadow has no `{other}` (fraction, cpu_share, agreement, samples, latency_p90_ms)"
                    ));
                }
            }
        }
        spec.check()?;
        Ok(spec)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// SHA-256 of the whole artifact, hex.
    pub sha256: String,
    pub size: u64,
    pub chunk_size: u64,
    /// SHA-256 of each chunk, hex, in order; the last chunk may be short.
    pub chunks: Vec<String>,
}

/// Which boxes an update is for. Empty lists match every box.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub devices: Vec<String>,
    /// `std::env::consts::ARCH` values: x86_64, aarch64, arm.
    #[serde(default)]
    pub arch: Vec<String>,
    /// Oldest ternd that may install it.
    pub min_ternd: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signing key, base64 (as configured).
    pub key: String,
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub signed: Value,
    pub signatures: Vec<Signature>,
}

/// Why a manifest, a key set or a chunk was refused; `code()` is the stable event code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusalError {
    #[error("{what} is {got} bytes, more than {max}")]
    TooLarge {
        what: &'static str,
        got: usize,
        max: usize,
    },
    #[error("manifest is malformed: {0}")]
    Malformed(String),
    #[error("manifest carries no signature")]
    Unsigned,
    #[error("a signature does not verify for key {0}")]
    BadSignature(String),
    #[error("key {0} is not trusted")]
    UnknownKey(String),
    #[error("key {0} signed more than once")]
    DuplicateSignature(String),
    #[error("{valid} valid signature(s) from trusted keys, {threshold} needed")]
    BelowThreshold { valid: usize, threshold: usize },
    #[error("manifest expired at {expires} (now {now})")]
    Expired { expires: i64, now: i64 },
    #[error("stale: {0}")]
    Stale(String),
    /// Stale for want of a recent operator time: a newer one may fix it.
    #[error("stale: {0}")]
    StaleTime(String),
    #[error("version {offered} is older than installed {installed}")]
    Downgrade { offered: String, installed: String },
    #[error("version {0} is already installed")]
    Replay(String),
    #[error("key {0} was rotated out")]
    RevokedKey(String),
    #[error("name `{0}` is not a plain file name")]
    BadName(String),
    #[error("artifact hash {got} does not match the manifest's {want}")]
    BadHash { got: String, want: String },
    #[error("artifact is {got} bytes, the manifest says {want}")]
    BadSize { got: u64, want: u64 },
    #[error("chunk {index} is truncated: {got} bytes of {want}")]
    TruncatedChunk {
        index: usize,
        got: usize,
        want: usize,
    },
    #[error("chunk {index}: {message}")]
    ForeignChunk { index: usize, message: String },
    #[error("the package inside does not match the manifest: {0}")]
    PackageMismatch(String),
    #[error("not for this box: {0}")]
    WrongTarget(String),
    #[error("artifact: {0}")]
    BadArtifact(String),
    #[error("chunk {index}: {message}")]
    BadChunk { index: usize, message: String },
}

impl RefusalError {
    /// The stable code this refusal is reported under.
    pub fn code(&self) -> Code {
        match self {
            RefusalError::TooLarge { .. } => Code::Oversize,
            RefusalError::Malformed(_) => Code::Malformed,
            RefusalError::Unsigned => Code::Unsigned,
            RefusalError::BadSignature(_) => Code::BadSignature,
            RefusalError::UnknownKey(_) => Code::UnknownKey,
            RefusalError::DuplicateSignature(_) => Code::DuplicateSignature,
            RefusalError::BelowThreshold { .. } => Code::BelowThreshold,
            RefusalError::Expired { .. } => Code::Expired,
            RefusalError::Stale(_) | RefusalError::StaleTime(_) => Code::Stale,
            RefusalError::Downgrade { .. } => Code::Downgrade,
            RefusalError::Replay(_) => Code::Replay,
            RefusalError::RevokedKey(_) => Code::RevokedKey,
            RefusalError::BadName(_) => Code::BadName,
            RefusalError::BadHash { .. } => Code::BadHash,
            RefusalError::BadSize { .. } => Code::BadSize,
            RefusalError::TruncatedChunk { .. } => Code::TruncatedChunk,
            RefusalError::ForeignChunk { .. } => Code::ForeignChunk,
            RefusalError::PackageMismatch(_) => Code::PackageMismatch,
            RefusalError::WrongTarget(_) => Code::WrongTarget,
            RefusalError::BadArtifact(_) => Code::BadArtifact,
            RefusalError::BadChunk { .. } => Code::BadChunk,
        }
    }
}

/// The keys a box trusts and how many must agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySet {
    pub keys: Vec<PublicKey>,
    pub threshold: usize,
    /// Keys rotated out: a signature by one is refused as `revoked_key`, not merely unknown.
    pub retired: Vec<PublicKey>,
}

/// A name that is one plain path component: it cannot escape the folder it is joined to.
pub fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Parse a manifest, bounded before parsing.
pub fn parse(bytes: &[u8]) -> Result<Manifest, RefusalError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(RefusalError::TooLarge {
            what: "manifest",
            got: bytes.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| RefusalError::Malformed(e.to_string()))
}

/// Count valid signatures over `msg` from distinct keys of `set`, refusing the first thing
/// that is wrong: no signature, an untrusted key, a key twice, a signature that does not
/// verify, too few.
/// Every signature verifies under the key it names: what a publisher can check without the
/// boxes' key set (a manifest changed after signing fails here as on every box).
pub fn check_own_signatures(m: &Manifest) -> Result<(), RefusalError> {
    let keys = m
        .signatures
        .iter()
        .map(|s| PublicKey::parse(&s.key).map_err(|e| RefusalError::Malformed(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let set = KeySet {
        keys,
        threshold: m.signatures.len(),
        retired: Vec::new(),
    };
    check_signatures(&set, &signed_bytes(CONTEXT, &m.signed), &m.signatures)
}

fn check_signatures(set: &KeySet, msg: &[u8], sigs: &[Signature]) -> Result<(), RefusalError> {
    if sigs.is_empty() {
        return Err(RefusalError::Unsigned);
    }
    let mut seen = HashSet::new();
    let mut valid = 0;
    for s in sigs {
        let key = PublicKey::parse(&s.key)
            .map_err(|e| RefusalError::Malformed(format!("signature key: {e}")))?;
        if !seen.insert(key.to_base64()) {
            return Err(RefusalError::DuplicateSignature(s.key.clone()));
        }
        if set.retired.contains(&key) && !set.keys.contains(&key) {
            return Err(RefusalError::RevokedKey(s.key.clone()));
        }
        if !set.keys.contains(&key) {
            return Err(RefusalError::UnknownKey(s.key.clone()));
        }
        let sig = B64
            .decode(&s.sig)
            .map_err(|e| RefusalError::Malformed(format!("signature is not base64: {e}")))?;
        if !key.verify(msg, &sig) {
            return Err(RefusalError::BadSignature(s.key.clone()));
        }
        valid += 1;
    }
    if valid < set.threshold.max(1) {
        return Err(RefusalError::BelowThreshold {
            valid,
            threshold: set.threshold.max(1),
        });
    }
    Ok(())
}

fn signed_bytes(context: &str, signed: &Value) -> Vec<u8> {
    format!("{context}{}", canonical_json(signed)).into_bytes()
}

/// The box this code runs on, for target checks.
#[derive(Debug, Clone)]
pub struct ThisBox<'a> {
    pub device: &'a str,
    pub groups: &'a [String],
    pub arch: &'a str,
    pub ternd: &'a semver::Version,
}

/// Verify a manifest completely: signatures against the key set, then the content's bounds,
/// expiry, target and (given the installed version) that it only goes up.
pub fn verify(
    m: &Manifest,
    keys: &KeySet,
    now: i64,
    this: &ThisBox<'_>,
    installed: Option<&semver::Version>,
) -> Result<Signed, RefusalError> {
    check_signatures(keys, &signed_bytes(CONTEXT, &m.signed), &m.signatures)?;
    let s: Signed = serde_json::from_value(m.signed.clone())
        .map_err(|e| RefusalError::Malformed(e.to_string()))?;
    if s.format != FORMAT {
        return Err(RefusalError::Malformed(format!(
            "format {} (this box reads {FORMAT})",
            s.format
        )));
    }
    if s.kind != "model" {
        return Err(RefusalError::Malformed(format!(
            "kind `{}` is not supported",
            s.kind
        )));
    }
    if !safe_name(&s.name) {
        return Err(RefusalError::BadName(s.name.clone()));
    }
    let version = semver::Version::parse(&s.version)
        .map_err(|e| RefusalError::Malformed(format!("version `{}`: {e}", s.version)))?;
    check_artifact(&s.artifact)?;
    if let Some(spec) = &s.shadow {
        spec.check().map_err(RefusalError::Malformed)?;
    }
    if now > s.expires {
        return Err(RefusalError::Expired {
            expires: s.expires,
            now,
        });
    }
    let t = &s.targets;
    if !t.devices.is_empty() && !t.devices.iter().any(|d| d == this.device) {
        return Err(RefusalError::WrongTarget(format!(
            "device `{}` is not listed",
            this.device
        )));
    }
    if !t.groups.is_empty() && !t.groups.iter().any(|g| this.groups.contains(g)) {
        return Err(RefusalError::WrongTarget(
            "none of this box's groups is listed".into(),
        ));
    }
    if !t.arch.is_empty() && !t.arch.iter().any(|a| a == this.arch) {
        return Err(RefusalError::WrongTarget(format!(
            "architecture `{}` is not listed",
            this.arch
        )));
    }
    if let Some(min) = &t.min_ternd {
        let min = semver::Version::parse(min)
            .map_err(|e| RefusalError::Malformed(format!("min_ternd `{min}`: {e}")))?;
        if *this.ternd < min {
            return Err(RefusalError::WrongTarget(format!(
                "needs ternd {min}, this is {}",
                this.ternd
            )));
        }
    }
    if let Some(installed) = installed {
        if version < *installed {
            return Err(RefusalError::Downgrade {
                offered: version.to_string(),
                installed: installed.to_string(),
            });
        }
        if version == *installed {
            return Err(RefusalError::Replay(version.to_string()));
        }
    }
    Ok(s)
}

fn check_artifact(a: &Artifact) -> Result<(), RefusalError> {
    let bad = |m: String| Err(RefusalError::BadArtifact(m));
    if !is_hex_digest(&a.sha256) {
        return bad("sha256 is not 64 lower-case hex digits".into());
    }
    if a.size == 0 || a.size > MAX_ARTIFACT_BYTES {
        return bad(format!(
            "size {} is outside 1..={MAX_ARTIFACT_BYTES}",
            a.size
        ));
    }
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&a.chunk_size) {
        return bad(format!(
            "chunk_size {} is outside {MIN_CHUNK}..={MAX_CHUNK}",
            a.chunk_size
        ));
    }
    let want = a.size.div_ceil(a.chunk_size);
    if a.chunks.len() as u64 != want {
        return bad(format!("{} chunk hashes for {want} chunks", a.chunks.len()));
    }
    if let Some(i) = a.chunks.iter().position(|c| !is_hex_digest(c)) {
        return bad(format!("chunk hash {i} is not 64 lower-case hex digits"));
    }
    Ok(())
}

impl Artifact {
    /// Describe `bytes` as an artifact in chunks of `chunk_size`.
    pub fn describe(bytes: &[u8], chunk_size: u64) -> Artifact {
        Artifact {
            sha256: crate::sha256_hex(bytes),
            size: bytes.len() as u64,
            chunk_size,
            chunks: bytes
                .chunks(chunk_size as usize)
                .map(crate::sha256_hex)
                .collect(),
        }
    }

    /// The length chunk `index` must have, if the artifact has such a chunk.
    pub fn chunk_len(&self, index: usize) -> Option<usize> {
        (index < self.chunks.len()).then(|| {
            let start = index as u64 * self.chunk_size;
            self.chunk_size.min(self.size - start) as usize
        })
    }

    /// Check one chunk's data as it arrives: in range, the right length, the right hash.
    pub fn check_chunk(&self, index: usize, bytes: &[u8]) -> Result<(), RefusalError> {
        let Some(want) = self.chunk_len(index) else {
            return Err(RefusalError::BadChunk {
                index,
                message: format!("there are only {} chunks", self.chunks.len()),
            });
        };
        if bytes.len() < want {
            return Err(RefusalError::TruncatedChunk {
                index,
                got: bytes.len(),
                want,
            });
        }
        if bytes.len() > want {
            // Only a manifest whose size disagrees with the artifact it was made from (or a
            // sender that pads) gets here: the chunk is longer than the manifest allows.
            return Err(RefusalError::BadSize {
                got: index as u64 * self.chunk_size + bytes.len() as u64,
                want: self.size,
            });
        }
        if crate::sha256_hex(bytes) != self.chunks[index] {
            return Err(RefusalError::BadChunk {
                index,
                message: "hash does not match the manifest".into(),
            });
        }
        Ok(())
    }

    /// The data of a chunk message for chunk `index` of this artifact, checked: bounded before
    /// anything else, then its header (the artifact and index it claims), then length and hash.
    pub fn open_chunk<'a>(&self, index: usize, msg: &'a [u8]) -> Result<&'a [u8], RefusalError> {
        let max = CHUNK_HEADER + self.chunk_size as usize;
        if msg.len() > max {
            return Err(RefusalError::TooLarge {
                what: "chunk message",
                got: msg.len(),
                max,
            });
        }
        if msg.len() < CHUNK_HEADER || &msg[..8] != CHUNK_MAGIC {
            return Err(RefusalError::BadChunk {
                index,
                message: "not a tern chunk message".into(),
            });
        }
        let artifact = crate::hex(&msg[8..40]);
        if artifact != self.sha256 {
            return Err(RefusalError::ForeignChunk {
                index,
                message: format!("belongs to artifact {artifact}, not {}", self.sha256),
            });
        }
        let claimed = u32::from_be_bytes(msg[40..44].try_into().expect("4 bytes")) as usize;
        if claimed != index {
            return Err(RefusalError::ForeignChunk {
                index,
                message: format!("says it is chunk {claimed}"),
            });
        }
        let data = &msg[CHUNK_HEADER..];
        self.check_chunk(index, data)?;
        Ok(data)
    }

    /// Check the assembled artifact's size and hash.
    pub fn check_whole(&self, size: u64, sha256: &str) -> Result<(), RefusalError> {
        if size != self.size {
            return Err(RefusalError::BadSize {
                got: size,
                want: self.size,
            });
        }
        if sha256 != self.sha256 {
            return Err(RefusalError::BadHash {
                got: sha256.to_string(),
                want: self.sha256.clone(),
            });
        }
        Ok(())
    }
}

/// Chunk messages start with this, then the artifact's SHA-256 (32 bytes) and the chunk's
/// index (u32, big-endian), then the data: a chunk says what it is, so one published on the
/// wrong topic is named for what it is instead of failing as garbage.
pub const CHUNK_MAGIC: &[u8; 8] = b"TERNCHK1";
pub const CHUNK_HEADER: usize = 8 + 32 + 4;

/// The chunk message for chunk `index` of `artifact`, whose data is `data`.
pub fn chunk_message(artifact_sha256: &str, index: usize, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHUNK_HEADER + data.len());
    m.extend_from_slice(CHUNK_MAGIC);
    m.extend_from_slice(&unhex32(artifact_sha256));
    m.extend_from_slice(&(index as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn unhex32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = s
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

/// Sign `signed` with each key (the operator's tool).
pub fn sign(signed: &Signed, keys: &[&SigningKey]) -> Manifest {
    let value = serde_json::to_value(signed).expect("manifests serialise");
    sign_value(value, CONTEXT, keys)
}

fn sign_value(value: Value, context: &str, keys: &[&SigningKey]) -> Manifest {
    let msg = signed_bytes(context, &value);
    let signatures = keys
        .iter()
        .map(|k| Signature {
            key: k.public().to_base64(),
            sig: B64.encode(k.sign(&msg)),
        })
        .collect();
    Manifest {
        signed: value,
        signatures,
    }
}

/// A new trusted key set, signed by the current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysDoc {
    /// Goes up with every rotation; an older or equal one is refused.
    pub version: u64,
    pub keys: Vec<String>,
    pub threshold: usize,
}

pub fn sign_keys(doc: &KeysDoc, keys: &[&SigningKey]) -> Manifest {
    sign_value(
        serde_json::to_value(doc).expect("key sets serialise"),
        KEYS_CONTEXT,
        keys,
    )
}

/// The operator's signed time (`<prefix>/fleet/time`): a box without a real-time clock learns
/// from it a time it can trust not to be too early.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeDoc {
    /// Unix seconds when it was signed.
    pub time: i64,
}

pub fn sign_time(doc: &TimeDoc, keys: &[&SigningKey]) -> Manifest {
    sign_value(
        serde_json::to_value(doc).expect("times serialise"),
        TIME_CONTEXT,
        keys,
    )
}

/// Accept a signed time: signed by a threshold of the update keys in force (its own context,
/// so no manifest or key set signature passes as one).
pub fn verify_time(m: &Manifest, keys: &KeySet) -> Result<i64, RefusalError> {
    check_signatures(keys, &signed_bytes(TIME_CONTEXT, &m.signed), &m.signatures)?;
    let doc: TimeDoc = serde_json::from_value(m.signed.clone())
        .map_err(|e| RefusalError::Malformed(e.to_string()))?;
    if doc.time <= 0 {
        return Err(RefusalError::Malformed(format!("time {}", doc.time)));
    }
    Ok(doc.time)
}

/// Accept a rotation: signed by a threshold of `current`, newer than `current_version`, and a
/// usable set itself. The caller persists the result; from then on only it counts.
pub fn verify_rotation(
    m: &Manifest,
    current: &KeySet,
    current_version: u64,
) -> Result<(KeySet, u64), RefusalError> {
    check_signatures(
        current,
        &signed_bytes(KEYS_CONTEXT, &m.signed),
        &m.signatures,
    )?;
    let doc: KeysDoc = serde_json::from_value(m.signed.clone())
        .map_err(|e| RefusalError::Malformed(e.to_string()))?;
    if doc.version < current_version {
        return Err(RefusalError::Downgrade {
            offered: doc.version.to_string(),
            installed: current_version.to_string(),
        });
    }
    if doc.version == current_version {
        return Err(RefusalError::Replay(doc.version.to_string()));
    }
    let keys = doc
        .keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| RefusalError::Malformed(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(k) = keys
        .iter()
        .enumerate()
        .find_map(|(i, k)| keys[..i].contains(k).then_some(k))
    {
        // A threshold counted over a key listed twice could never be met again.
        return Err(RefusalError::Malformed(format!(
            "key {} is listed twice",
            k.to_base64()
        )));
    }
    if doc.threshold == 0 || doc.threshold > keys.len() {
        return Err(RefusalError::Malformed(format!(
            "threshold {} for {} keys",
            doc.threshold,
            keys.len()
        )));
    }
    let mut retired: Vec<PublicKey> = current.retired.clone();
    retired.extend(current.keys.iter().cloned());
    retired.retain(|k| !keys.contains(k));
    retired.dedup();
    Ok((
        KeySet {
            keys,
            threshold: doc.threshold,
            retired,
        },
        doc.version,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::generate_pkcs8;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&generate_pkcs8()).unwrap()
    }

    const NOW: i64 = 1_800_000_000;

    fn signed(artifact: &[u8]) -> Signed {
        Signed {
            format: FORMAT,
            kind: "model".into(),
            name: "digits-cnn-int8".into(),
            version: "1.1.0".into(),
            artifact: Artifact::describe(artifact, MIN_CHUNK),
            targets: Targets {
                groups: vec!["lab".into()],
                devices: vec![],
                arch: vec!["x86_64".into(), "aarch64".into()],
                min_ternd: Some("0.1.0".into()),
            },
            expires: NOW + 3600,
            issued: Some(NOW),
            shadow: None,
        }
    }

    fn this_box<'a>(groups: &'a [String], v: &'a semver::Version) -> ThisBox<'a> {
        ThisBox {
            device: "box-1",
            groups,
            arch: "x86_64",
            ternd: v,
        }
    }

    /// Every refusal of the attack matrix that the manifest alone decides, each with its own
    /// code, and the good manifest accepted.
    #[test]
    fn attack_matrix_each_refused_with_its_own_code() {
        let (a, b, stranger) = (key(), key(), key());
        let set = KeySet {
            keys: vec![a.public(), b.public()],
            threshold: 2,
            retired: vec![],
        };
        let groups = vec!["lab".to_string()];
        let v = semver::Version::new(0, 1, 0);
        let me = this_box(&groups, &v);
        let installed = semver::Version::new(1, 0, 0);
        let data = vec![7u8; 10_000];
        let good = sign(&signed(&data), &[&a, &b]);
        let check = |m: &Manifest| {
            verify(m, &set, NOW, &me, Some(&installed)).map_err(|e| e.code().as_str())
        };

        assert_eq!(check(&good).unwrap().version, "1.1.0");
        // Round trip through bytes, as it travels.
        let wire = serde_json::to_vec(&good).unwrap();
        assert!(check(&parse(&wire).unwrap()).is_ok());

        let mut unsigned = good.clone();
        unsigned.signatures.clear();
        assert_eq!(check(&unsigned), Err("unsigned"));

        let mut tampered = good.clone();
        tampered.signed["version"] = "9.0.0".into();
        assert_eq!(check(&tampered), Err("bad_signature"));

        assert_eq!(
            check(&sign(&signed(&data), &[&a, &stranger])),
            Err("unknown_key")
        );
        assert_eq!(check(&sign(&signed(&data), &[&a])), Err("below_threshold"));
        assert_eq!(
            check(&sign(&signed(&data), &[&a, &a])),
            Err("duplicate_signature")
        );

        let mut s = signed(&data);
        s.expires = NOW - 1;
        assert_eq!(check(&sign(&s, &[&a, &b])), Err("expired"));

        for (old, code) in [("0.9.0", "downgrade"), ("1.0.0", "replay")] {
            let mut s = signed(&data);
            s.version = old.into();
            assert_eq!(check(&sign(&s, &[&a, &b])), Err(code), "{old}");
        }
        let mut s = signed(&data);
        s.targets.groups = vec!["other".into()];
        assert_eq!(check(&sign(&s, &[&a, &b])), Err("wrong_target"));
        let mut s = signed(&data);
        s.targets.arch = vec!["riscv64".into()];
        assert_eq!(check(&sign(&s, &[&a, &b])), Err("wrong_target"));
        let mut s = signed(&data);
        s.targets.min_ternd = Some("9.0.0".into());
        assert_eq!(check(&sign(&s, &[&a, &b])), Err("wrong_target"));

        for name in ["../etc", "a/b", "..", ""] {
            let mut s = signed(&data);
            s.name = name.into();
            assert_eq!(check(&sign(&s, &[&a, &b])), Err("bad_name"), "{name:?}");
        }
        let mut s = signed(&data);
        s.artifact.size = MAX_ARTIFACT_BYTES + 1;
        assert_eq!(check(&sign(&s, &[&a, &b])), Err("bad_artifact"));
        let mut s = signed(&data);
        s.artifact.chunks.pop();
        assert_eq!(check(&sign(&s, &[&a, &b])), Err("bad_artifact"));
        let mut s = signed(&data);
        s.kind = "daemon".into();
        assert_eq!(check(&sign(&s, &[&a, &b])), Err("malformed"));

        // Bounded before parsing.
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert_eq!(parse(&huge).map_err(|e| e.code().as_str()), Err("oversize"));
    }

    #[test]
    fn chunks_are_checked_for_header_range_length_and_hash() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let art = Artifact::describe(&data, MIN_CHUNK);
        assert_eq!(art.chunks.len(), 3);
        let msgs: Vec<Vec<u8>> = data
            .chunks(MIN_CHUNK as usize)
            .enumerate()
            .map(|(i, c)| chunk_message(&art.sha256, i, c))
            .collect();
        for (i, m) in msgs.iter().enumerate() {
            let got = art.open_chunk(i, m).unwrap();
            assert_eq!(got, &data[i * 4096..(i * 4096 + got.len())]);
        }
        art.check_whole(data.len() as u64, &crate::sha256_hex(&data))
            .unwrap();
        let code = |r: Result<&[u8], RefusalError>| r.map(|_| ()).map_err(|e| e.code().as_str());

        let truncated = chunk_message(&art.sha256, 2, &data[8192..9000]);
        assert_eq!(code(art.open_chunk(2, &truncated)), Err("truncated_chunk"));
        let padded = chunk_message(&art.sha256, 2, &[&data[8192..], &[0u8; 5]].concat());
        assert_eq!(code(art.open_chunk(2, &padded)), Err("bad_size"));
        let mut flipped = msgs[1].clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(code(art.open_chunk(1, &flipped)), Err("bad_chunk"));
        assert_eq!(code(art.open_chunk(1, &msgs[0])), Err("foreign_chunk"));
        assert_eq!(code(art.open_chunk(3, &msgs[0])), Err("foreign_chunk"));
        assert_eq!(code(art.open_chunk(0, b"garbage")), Err("bad_chunk"));
        let other = Artifact::describe(&[1u8; 10_000], MIN_CHUNK);
        let foreign = chunk_message(&other.sha256, 0, &[1u8; 4096]);
        other.open_chunk(0, &foreign).unwrap();
        assert_eq!(code(art.open_chunk(0, &foreign)), Err("foreign_chunk"));
        let endless = vec![0u8; CHUNK_HEADER + MIN_CHUNK as usize + 1];
        assert_eq!(code(art.open_chunk(0, &endless)), Err("oversize"));

        let whole =
            |size: u64, sha: &str| art.check_whole(size, sha).map_err(|e| e.code().as_str());
        let mut altered = data.clone();
        altered[5] ^= 1;
        assert_eq!(
            whole(altered.len() as u64, &crate::sha256_hex(&altered)),
            Err("bad_hash")
        );
        assert_eq!(whole(9999, &art.sha256), Err("bad_size"));
    }

    #[test]
    fn rotation_needs_the_current_threshold_and_retires_old_keys() {
        let (a, b, c) = (key(), key(), key());
        let current = KeySet {
            keys: vec![a.public(), b.public()],
            threshold: 2,
            retired: vec![],
        };
        let doc = KeysDoc {
            version: 2,
            keys: vec![c.public().to_base64()],
            threshold: 1,
        };
        let code =
            |r: Result<(KeySet, u64), RefusalError>| r.map(|_| ()).map_err(|e| e.code().as_str());
        assert_eq!(
            code(verify_rotation(&sign_keys(&doc, &[&a]), &current, 1)),
            Err("below_threshold")
        );
        assert_eq!(
            code(verify_rotation(&sign_keys(&doc, &[&a, &b]), &current, 2)),
            Err("replay")
        );
        assert_eq!(
            code(verify_rotation(&sign_keys(&doc, &[&a, &b]), &current, 3)),
            Err("downgrade")
        );
        let twice = KeysDoc {
            version: 2,
            keys: vec![c.public().to_base64(), c.public().to_base64()],
            threshold: 2,
        };
        assert_eq!(
            code(verify_rotation(&sign_keys(&twice, &[&a, &b]), &current, 1)),
            Err("malformed")
        );
        let (new, version) = verify_rotation(&sign_keys(&doc, &[&a, &b]), &current, 1).unwrap();
        assert_eq!((new.threshold, version), (1, 2));
        // After rotation the old keys no longer sign anything that counts.
        let groups: Vec<String> = vec![];
        let v = semver::Version::new(0, 1, 0);
        let me = this_box(&groups, &v);
        let mut s = signed(&[0u8; 5000]);
        s.targets = Targets::default();
        let by_old = sign(&s, &[&a, &b]);
        assert_eq!(
            verify(&by_old, &new, NOW, &me, None)
                .map(|_| ())
                .map_err(|e| e.code().as_str()),
            Err("revoked_key")
        );
        assert!(verify(&sign(&s, &[&c]), &new, NOW, &me, None).is_ok());
        // A rotation document is not a manifest and the other way round.
        assert_eq!(
            verify(&sign_keys(&doc, &[&a, &b]), &current, NOW, &me, None)
                .map(|_| ())
                .map_err(|e| e.code().as_str()),
            Err("bad_signature")
        );
    }
}
