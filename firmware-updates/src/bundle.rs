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

use crate::command::{PublicKey, SigningKey, canonical_json};

const CONTEXT: &str = "tern-bundle-v1\n";
const KEYS_CONTEXT: &str = "tern-keys-v1\n";
/// Largest manifest accepted, before parsing.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Largest artifact accepted (a model package).
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;
pub const MIN_CHUNK: u64 = 4 * 1024;
pub const MAX_CHUNK: u64 = 1024 * 1024;
pub const FORMAT: u32 = 1;

/// What a manifest says, once verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[error("manifest is {0} bytes, more than {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
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
    #[error("version {offered} is not newer than installed {installed}")]
    NotNewer { offered: String, installed: String },
    #[error("not for this box: {0}")]
    WrongTarget(String),
    #[error("artifact: {0}")]
    BadArtifact(String),
    #[error("chunk {index}: {message}")]
    BadChunk { index: usize, message: String },
}

impl RefusalError {
    pub fn code(&self) -> &'static str {
        match self {
            RefusalError::TooLarge(_) => "oversize",
            RefusalError::Malformed(_) => "malformed",
            RefusalError::Unsigned => "unsigned",
            RefusalError::BadSignature(_) => "bad_signature",
            RefusalError::UnknownKey(_) => "unknown_key",
            RefusalError::DuplicateSignature(_) => "duplicate_signature",
            RefusalError::BelowThreshold { .. } => "below_threshold",
            RefusalError::Expired { .. } => "expired",
            RefusalError::NotNewer { .. } => "not_newer",
            RefusalError::WrongTarget(_) => "wrong_target",
            RefusalError::BadArtifact(_) => "bad_artifact",
            RefusalError::BadChunk { .. } => "bad_chunk",
        }
    }
}

/// The keys a box trusts and how many must agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySet {
    pub keys: Vec<PublicKey>,
    pub threshold: usize,
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
        return Err(RefusalError::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| RefusalError::Malformed(e.to_string()))
}

/// Count valid signatures over `msg` from distinct keys of `set`, refusing the first thing
/// that is wrong: no signature, an untrusted key, a key twice, a signature that does not
/// verify, too few.
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
        return Err(RefusalError::Malformed(format!(
            "name `{}` is not a plain file name",
            s.name
        )));
    }
    let version = semver::Version::parse(&s.version)
        .map_err(|e| RefusalError::Malformed(format!("version `{}`: {e}", s.version)))?;
    check_artifact(&s.artifact)?;
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
    if let Some(installed) = installed
        && version <= *installed
    {
        return Err(RefusalError::NotNewer {
            offered: version.to_string(),
            installed: installed.to_string(),
        });
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

    /// Check one chunk as it arrives: in range, the right length, the right hash.
    pub fn check_chunk(&self, index: usize, bytes: &[u8]) -> Result<(), RefusalError> {
        let err = |message: String| RefusalError::BadChunk { index, message };
        let Some(want) = self.chunks.get(index) else {
            return Err(err(format!("there are only {} chunks", self.chunks.len())));
        };
        let start = index as u64 * self.chunk_size;
        let len = self.chunk_size.min(self.size - start);
        if bytes.len() as u64 != len {
            return Err(err(format!("{} bytes, expected {len}", bytes.len())));
        }
        if crate::sha256_hex(bytes) != *want {
            return Err(err("hash does not match the manifest".into()));
        }
        Ok(())
    }

    /// Check the assembled artifact.
    pub fn check_whole(&self, bytes: &[u8]) -> Result<(), RefusalError> {
        if bytes.len() as u64 != self.size {
            return Err(RefusalError::BadArtifact(format!(
                "{} bytes, expected {}",
                bytes.len(),
                self.size
            )));
        }
        if crate::sha256_hex(bytes) != self.sha256 {
            return Err(RefusalError::BadArtifact(
                "hash does not match the manifest".into(),
            ));
        }
        Ok(())
    }
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
    if doc.version <= current_version {
        return Err(RefusalError::NotNewer {
            offered: doc.version.to_string(),
            installed: current_version.to_string(),
        });
    }
    let keys = doc
        .keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| RefusalError::Malformed(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if doc.threshold == 0 || doc.threshold > keys.len() {
        return Err(RefusalError::Malformed(format!(
            "threshold {} for {} keys",
            doc.threshold,
            keys.len()
        )));
    }
    Ok((
        KeySet {
            keys,
            threshold: doc.threshold,
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
        };
        let groups = vec!["lab".to_string()];
        let v = semver::Version::new(0, 1, 0);
        let me = this_box(&groups, &v);
        let installed = semver::Version::new(1, 0, 0);
        let data = vec![7u8; 10_000];
        let good = sign(&signed(&data), &[&a, &b]);
        let check =
            |m: &Manifest| verify(m, &set, NOW, &me, Some(&installed)).map_err(|e| e.code());

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

        for old in ["0.9.0", "1.0.0"] {
            let mut s = signed(&data);
            s.version = old.into();
            assert_eq!(check(&sign(&s, &[&a, &b])), Err("not_newer"), "{old}");
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
            assert_eq!(check(&sign(&s, &[&a, &b])), Err("malformed"), "{name:?}");
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
        assert_eq!(parse(&huge).map_err(|e| e.code()), Err("oversize"));
    }

    #[test]
    fn chunks_are_checked_for_range_length_and_hash() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let art = Artifact::describe(&data, MIN_CHUNK);
        assert_eq!(art.chunks.len(), 3);
        for (i, c) in data.chunks(MIN_CHUNK as usize).enumerate() {
            art.check_chunk(i, c).unwrap();
        }
        art.check_whole(&data).unwrap();
        let code = |r: Result<(), RefusalError>| r.map_err(|e| e.code());
        // Truncated, out of range, from another artifact, altered whole.
        assert_eq!(
            code(art.check_chunk(2, &data[8192..9000])),
            Err("bad_chunk")
        );
        assert_eq!(code(art.check_chunk(3, &data[..10])), Err("bad_chunk"));
        let other = Artifact::describe(&[1u8; 10_000], MIN_CHUNK);
        let foreign = &[1u8; 4096][..];
        other.check_chunk(0, foreign).unwrap();
        assert_eq!(code(art.check_chunk(0, foreign)), Err("bad_chunk"));
        let mut altered = data.clone();
        altered[5] ^= 1;
        assert_eq!(code(art.check_whole(&altered)), Err("bad_artifact"));
        assert_eq!(code(art.check_whole(&data[..9999])), Err("bad_artifact"));
    }

    #[test]
    fn rotation_needs_the_current_threshold_and_retires_old_keys() {
        let (a, b, c) = (key(), key(), key());
        let current = KeySet {
            keys: vec![a.public(), b.public()],
            threshold: 2,
        };
        let doc = KeysDoc {
            version: 2,
            keys: vec![c.public().to_base64()],
            threshold: 1,
        };
        let code = |r: Result<(KeySet, u64), RefusalError>| r.map(|_| ()).map_err(|e| e.code());
        assert_eq!(
            code(verify_rotation(&sign_keys(&doc, &[&a]), &current, 1)),
            Err("below_threshold")
        );
        assert_eq!(
            code(verify_rotation(&sign_keys(&doc, &[&a, &b]), &current, 2)),
            Err("not_newer")
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
                .map_err(|e| e.code()),
            Err("unknown_key")
        );
        assert!(verify(&sign(&s, &[&c]), &new, NOW, &me, None).is_ok());
        // A rotation document is not a manifest and the other way round.
        assert_eq!(
            verify(&sign_keys(&doc, &[&a, &b]), &current, NOW, &me, None)
                .map(|_| ())
                .map_err(|e| e.code()),
            Err("bad_signature")
        );
    }
}
