//! Building update bundles for tests, good and hostile, with tern-update's library: the
//! operator's tool refuses to make the hostile ones.

use std::path::{Path, PathBuf};

use tern_update::artifact;
use tern_update::bundle::{self, Artifact, Manifest, Signed, Targets};
use tern_update::command::{SigningKey, generate_pkcs8};

use crate::mqtt::Client;

/// `len` deterministic bytes that do not compress: padding that makes a package (and its
/// artifact) as large as a test needs.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn key() -> SigningKey {
    SigningKey::from_pkcs8(&generate_pkcs8()).expect("a fresh key parses")
}

/// Copy package `src` to `dst`, renamed and re-versioned, with `edit` applied to its
/// tern-model.toml text (after the name and version lines are replaced).
pub fn variant(
    src: &Path,
    dst: &Path,
    name: &str,
    version: &str,
    edit: impl Fn(String) -> String,
) -> PathBuf {
    crate::copy_dir(src, dst).expect("copying the package");
    let path = dst.join("tern-model.toml");
    let text = std::fs::read_to_string(&path).expect("tern-model.toml");
    // Only the top-level keys, before the first table (whose `name` keys are other things).
    let mut top = true;
    let text: String = text
        .lines()
        .map(|l| {
            top &= !l.starts_with('[');
            if !top {
                l.to_string()
            } else if l.starts_with("name = ") {
                format!("name = \"{name}\"")
            } else if l.starts_with("version = ") {
                format!("version = \"{version}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, edit(text + "\n")).expect("writing tern-model.toml");
    dst.to_path_buf()
}

/// A bundle: the signed manifest as it travels, and the artifact.
#[derive(Clone)]
pub struct Built {
    pub signed: Signed,
    pub manifest: Vec<u8>,
    pub artifact: Vec<u8>,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Pack `pkg` (named `name` `version` inside) and sign a manifest for it; `tweak` may change
/// the manifest before it is signed.
pub fn build(
    pkg: &Path,
    chunk: u64,
    keys: &[&SigningKey],
    tweak: impl FnOnce(&mut Signed),
) -> Built {
    let artifact = artifact::pack(pkg).expect("packing");
    let m = crate::read_manifest(pkg);
    let mut signed = Signed {
        format: bundle::FORMAT,
        kind: "model".into(),
        name: m.0,
        version: m.1,
        artifact: Artifact::describe(&artifact, chunk),
        targets: Targets::default(),
        expires: now() + 3600,
        issued: Some(now()),
        shadow: None,
    };
    tweak(&mut signed);
    let manifest = serde_json::to_vec(&bundle::sign(&signed, keys)).expect("serialises");
    Built {
        signed,
        manifest,
        artifact,
    }
}

impl Built {
    /// The same manifest with its signatures replaced by `keys`' over `signed` (changed).
    pub fn resigned(&self, keys: &[&SigningKey], tweak: impl FnOnce(&mut Signed)) -> Built {
        let mut signed = self.signed.clone();
        tweak(&mut signed);
        Built {
            manifest: serde_json::to_vec(&bundle::sign(&signed, keys)).expect("serialises"),
            signed,
            artifact: self.artifact.clone(),
        }
    }

    pub fn manifest_value(&self) -> Manifest {
        serde_json::from_slice(&self.manifest).expect("a manifest")
    }

    /// Chunk messages, as the operator's tool publishes them.
    pub fn chunks(&self) -> Vec<Vec<u8>> {
        let a = &self.signed.artifact;
        self.artifact
            .chunks(a.chunk_size as usize)
            .enumerate()
            .map(|(i, c)| bundle::chunk_message(&a.sha256, i, c))
            .collect()
    }

    pub fn chunk_topic(&self, prefix: &str, i: usize) -> String {
        tern_update::topics::Topics::new(prefix).chunk(&self.signed.artifact.sha256, i)
    }

    /// Publish every chunk retained, then the manifest retained on `topic`, and wait for the
    /// broker to have them all (`sync_topic` must be subscribed by `c`).
    pub fn publish(&self, c: &mut Client, topic: &str, sync_topic: &str) {
        for (i, m) in self.chunks().iter().enumerate() {
            c.publish_retained(&self.chunk_topic("tern", i), m)
                .expect("chunk published");
        }
        c.publish_retained(topic, &self.manifest)
            .expect("manifest published");
        c.sync(sync_topic).expect("broker synced");
    }

    /// Write it as a bundle file.
    pub fn write(&self, path: &Path) {
        artifact::write_bundle(path, &self.manifest_value(), &mut &self.artifact[..])
            .expect("bundle written");
    }
}

/// Give `pkg` an evaluation set: the demo's digit images, each labelled by its file name.
pub fn with_evaluation(pkg: &Path, rule: &str) -> usize {
    let inbox = crate::root().join("configs/demo/inbox");
    let mut names: Vec<String> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("digit-"))
        .collect();
    names.sort();
    std::fs::create_dir_all(pkg.join("eval")).unwrap();
    let mut toml = format!("\n[evaluation]\nrule = \"{rule}\"\n");
    for n in &names {
        // digit-3.png, digit-3-b.jpg: the digit is the seventh character.
        let label = &n["digit-".len()..="digit-".len()];
        std::fs::copy(inbox.join(n), pkg.join("eval").join(n)).unwrap();
        toml += &format!("[[evaluation.samples]]\ninput = \"eval/{n}\"\nlabel = \"{label}\"\n");
    }
    let m = pkg.join("tern-model.toml");
    let text = std::fs::read_to_string(&m).unwrap() + &toml;
    std::fs::write(&m, text).unwrap();
    names.len()
}
