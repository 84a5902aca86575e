//! The manifest parser and verifier, and chunk checks, on arbitrary bytes. Half the inputs
//! are taken as the `signed` part and signed with a key the verifier trusts, so the checks
//! behind the signature (bounds, names, versions, targets, chunk lists) are reached too.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tern_update::bundle::{self, KeySet, Manifest, Signature};
use tern_update::command::{SigningKey, generate_pkcs8};

fn key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| SigningKey::from_pkcs8(&generate_pkcs8()).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let set = KeySet {
        keys: vec![key().public()],
        threshold: 1,
        retired: vec![],
    };
    let groups = vec!["lab".to_string()];
    let ternd = semver::Version::new(0, 1, 0);
    let this = bundle::ThisBox {
        device: "box-1",
        groups: &groups,
        arch: "x86_64",
        ternd: &ternd,
    };
    let installed = semver::Version::new(1, 0, 0);
    let manifest = if mode % 2 == 0 {
        match bundle::parse(rest) {
            Ok(m) => m,
            Err(_) => return,
        }
    } else {
        let Ok(signed) = serde_json::from_slice::<serde_json::Value>(rest) else {
            return;
        };
        // Sign exactly these bytes' value, as a trusted operator would.
        let msg = format!("tern-bundle-v1\n{}", tern_update::command::canonical_json(&signed));
        let sig = key().sign(msg.as_bytes());
        use base64::Engine as _;
        Manifest {
            signed,
            signatures: vec![Signature {
                key: key().public().to_base64(),
                sig: base64::engine::general_purpose::STANDARD.encode(sig),
            }],
        }
    };
    if let Ok(s) = bundle::verify(&manifest, &set, 1_800_000_000, &this, Some(&installed)) {
        // A verified artifact description must be safe to use on any chunk.
        let a = &s.artifact;
        let n = a.chunks.len();
        for i in [0, n / 2, n.saturating_sub(1), n] {
            let _ = a.open_chunk(i, rest);
            let _ = a.chunk_len(i);
        }
        let _ = a.check_whole(rest.len() as u64, &tern_update::sha256_hex(rest));
    }
    let _ = bundle::verify_rotation(&manifest, &set, 0);
});
