//! What the box trusts, kept beside the database as well as in it: the update key set (after
//! any rotation) and each model's anti-rollback floor, in `<state_dir>/trust.json`, written
//! (temp file, fsync, rename, fsync of the folder) before the database commit that goes with
//! it. A database that is lost or recreated (the way out of a failed integrity check) then
//! starts from this file, not from the configuration's keys (which a rotation may have
//! retired) and an empty floor.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tern_update::bundle::KeySet;
use tern_update::command::PublicKey;

use super::core::Trust;

pub const FILE: &str = "trust.json";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// The key set a rotation put in force (none: the configuration's).
    pub trust: Option<TrustDoc>,
    /// Per model, the highest version ever installed: an update must go above it.
    pub floors: BTreeMap<String, String>,
    /// The newest operator signed time (unix seconds) the box took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDoc {
    pub version: u64,
    pub keys: Vec<String>,
    pub threshold: usize,
    pub retired: Vec<String>,
    /// The signed key-set document, base64.
    pub doc: String,
}

impl TrustDoc {
    pub fn of(t: &Trust) -> TrustDoc {
        TrustDoc {
            version: t.version,
            keys: t.keys.keys.iter().map(|k| k.to_base64()).collect(),
            threshold: t.keys.threshold,
            retired: t.keys.retired.iter().map(|k| k.to_base64()).collect(),
            doc: base64::engine::general_purpose::STANDARD.encode(t.doc.as_deref().unwrap_or(&[])),
        }
    }

    pub fn to_trust(&self) -> Result<Trust, String> {
        let parse = |keys: &[String]| {
            keys.iter()
                .map(|k| PublicKey::parse(k).map_err(|e| format!("key `{k}`: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Trust {
            keys: KeySet {
                keys: parse(&self.keys)?,
                threshold: self.threshold,
                retired: parse(&self.retired)?,
            },
            version: self.version,
            doc: Some(
                base64::engine::general_purpose::STANDARD
                    .decode(&self.doc)
                    .map_err(|e| format!("doc: {e}"))?,
            ),
        })
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The mirror in `state_dir`: empty if there is none yet; an error if one is there but
/// unreadable (never silently taken as empty: that would reset trust).
pub fn read(state_dir: &Path) -> Result<Mirror, String> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Mirror::default()),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// Replace the mirror durably: after this returns, a power cut leaves the new one.
pub fn write(state_dir: &Path, m: &Mirror) -> std::io::Result<()> {
    let p = path(state_dir);
    let tmp = state_dir.join(format!(".{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(m).expect("plain data"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p)?;
    std::fs::File::open(state_dir)?.sync_all()
}

impl Mirror {
    pub fn floor(&self, model: &str) -> Option<semver::Version> {
        self.floors
            .get(model)
            .and_then(|v| semver::Version::parse(v).ok())
    }

    /// Raise `model`'s floor to `version`; false if it was there already.
    pub fn raise(&mut self, model: &str, version: &semver::Version) -> bool {
        if self.floor(model).is_some_and(|f| f >= *version) {
            return false;
        }
        self.floors.insert(model.to_string(), version.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_round_trips_and_an_unreadable_one_is_an_error_not_empty() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), Mirror::default());
        let mut m = Mirror::default();
        assert!(m.raise("m", &semver::Version::new(1, 2, 0)));
        assert!(!m.raise("m", &semver::Version::new(1, 1, 0)));
        assert!(m.raise("m", &semver::Version::new(1, 10, 0)));
        write(d.path(), &m).unwrap();
        let back = read(d.path()).unwrap();
        assert_eq!(back.floor("m"), Some(semver::Version::new(1, 10, 0)));
        std::fs::write(path(d.path()), b"{ truncated").unwrap();
        assert!(read(d.path()).is_err());
    }
}
