//! Signed fleet commands: the canonical bytes a signature covers, signing (operator side) and
//! verification (box side). One implementation for both ends so they cannot drift apart.
//!
//! A signed command is the usual command JSON plus an `auth` object:
//!
//! ```json
//! {"id": "7f3c", "args": {"name": "digits-cnn", "version": "1.0.0"},
//!  "auth": {"target": "box-17", "ts": 1764374400, "nonce": "9d1e…", "sig": "<base64>"}}
//! ```
//!
//! The signature covers the command name (taken from the topic, not the payload), the target
//! (a device id, or `group:<name>` for a group topic), the timestamp, the nonce, the id and the
//! arguments in canonical JSON (object keys sorted, no white space). So a captured command
//! cannot be replayed to another device or group, renamed into another command, or re-used
//! with other arguments; the box refuses old timestamps and nonces it has seen.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde_json::Value;

/// Domain separation: these bytes can never be mistaken for a bundle manifest's.
const CONTEXT: &str = "tern-command-v1";

/// The `auth` object of a signed command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub target: String,
    /// Seconds since the Unix epoch when the command was signed.
    pub ts: i64,
    pub nonce: String,
    /// Ed25519 signature, base64.
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("public key is not base64: {0}")]
    Base64(String),
    #[error("public key must be 32 bytes of Ed25519, got {0}")]
    Length(usize),
    #[error("private key is not an Ed25519 PKCS#8 document: {0}")]
    Private(String),
}

/// An Ed25519 public key as configured: 32 bytes, written in base64.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", B64.encode(self.0))
    }
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(PublicKey(arr))
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(msg, sig)
            .is_ok()
    }
}

/// A new Ed25519 key pair as a PKCS#8 document (what `tern-update keygen` writes).
pub fn generate_pkcs8() -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    Ed25519KeyPair::generate_pkcs8(&rng)
        .expect("the system random generator works")
        .as_ref()
        .to_vec()
}

/// A signing key loaded from PKCS#8 bytes.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    pub fn from_pkcs8(bytes: &[u8]) -> Result<SigningKey, KeyError> {
        Ed25519KeyPair::from_pkcs8(bytes)
            .map(SigningKey)
            .map_err(|e| KeyError::Private(e.to_string()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(
            self.0
                .public_key()
                .as_ref()
                .try_into()
                .expect("Ed25519 public keys are 32 bytes"),
        )
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.0.sign(msg).as_ref().to_vec()
    }
}

/// JSON with object keys sorted and no white space, the form signatures cover.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The bytes a command signature covers.
pub fn signed_bytes(
    name: &str,
    target: &str,
    ts: i64,
    nonce: &str,
    id: &str,
    args: &Value,
) -> Vec<u8> {
    format!(
        "{CONTEXT}\n{name}\n{target}\n{ts}\n{nonce}\n{id}\n{}",
        canonical_json(args)
    )
    .into_bytes()
}

/// A command id nobody can guess ahead of the tool: `prefix-` and 128 random bits. A box
/// answers a second command with a known id as `conflict` (or with the first reply), so a
/// predictable id lets a publisher pre-empt the real command.
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random generator works");
    format!("{prefix}-{}", crate::hex(&b))
}

/// Build a signed command payload, as an operator's tool sends it.
pub fn sign(key: &SigningKey, name: &str, target: &str, id: &str, args: Value, ts: i64) -> Value {
    let mut nonce = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .expect("the system random generator works");
    let nonce = crate::hex(&nonce);
    let sig = key.sign(&signed_bytes(name, target, ts, &nonce, id, &args));
    serde_json::json!({
        "id": id,
        "args": args,
        "auth": Auth { target: target.to_string(), ts, nonce, sig: B64.encode(sig) },
    })
}

/// Why a signed command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("command is not signed")]
    Missing,
    #[error("`auth` is malformed: {0}")]
    Malformed(String),
    #[error("command is addressed to `{got}`, not to `{want}`")]
    WrongTarget { got: String, want: String },
    #[error("command was signed at {ts}, outside the allowed clock skew of {skew}s around {now}")]
    Expired { ts: i64, now: i64, skew: i64 },
    #[error("signature does not verify with any trusted command key")]
    BadSignature,
}

/// What a command signature is checked against: where it arrived and what it carries.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// The command name, from the topic.
    pub name: &'a str,
    /// What the topic addresses: the device id, or `group:<name>`.
    pub target: &'a str,
    pub id: &'a str,
    pub args: &'a Value,
}

/// Check the signature, target and freshness of a command. Replay of a nonce is the caller's
/// to check (it needs memory that outlives this call).
pub fn verify(
    keys: &[PublicKey],
    cmd: Signed<'_>,
    auth: &Auth,
    now: i64,
    skew: i64,
) -> Result<(), AuthError> {
    let Signed {
        name,
        target,
        id,
        args,
    } = cmd;
    if auth.target != target {
        return Err(AuthError::WrongTarget {
            got: auth.target.clone(),
            want: target.to_string(),
        });
    }
    if auth.nonce.len() < 16 || auth.nonce.len() > 128 {
        return Err(AuthError::Malformed(
            "nonce must be 16 to 128 characters".into(),
        ));
    }
    let sig = B64
        .decode(&auth.sig)
        .map_err(|e| AuthError::Malformed(format!("sig is not base64: {e}")))?;
    let msg = signed_bytes(name, target, auth.ts, &auth.nonce, id, args);
    if !keys.iter().any(|k| k.verify(&msg, &sig)) {
        return Err(AuthError::BadSignature);
    }
    // Freshness after the signature: an unsigned timestamp says nothing.
    if (auth.ts - now).abs() > skew {
        return Err(AuthError::Expired {
            ts: auth.ts,
            now,
            skew,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&generate_pkcs8()).unwrap()
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v: Value = serde_json::from_str(r#"{"b": [ {"z": 1, "a": "x"} ], "a": 1.5}"#).unwrap();
        assert_eq!(canonical_json(&v), r#"{"a":1.5,"b":[{"a":"x","z":1}]}"#);
    }

    #[test]
    fn sign_then_verify_and_every_tamper_fails() {
        let k = key();
        let keys = [k.public()];
        let args = json!({"name": "m", "version": "1.0.0"});
        let cmd = sign(&k, "models.activate", "box-1", "c1", args.clone(), 1000);
        let auth: Auth = serde_json::from_value(cmd["auth"].clone()).unwrap();
        let ok = |name: &str, target: &str, id: &str, args: &Value, now: i64| {
            let cmd = Signed {
                name,
                target,
                id,
                args,
            };
            verify(&keys, cmd, &auth, now, 300)
        };
        assert_eq!(ok("models.activate", "box-1", "c1", &args, 1000), Ok(()));
        assert_eq!(
            ok("models.rollback", "box-1", "c1", &args, 1000),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            ok("models.activate", "box-2", "c1", &args, 1000),
            Err(AuthError::WrongTarget { .. })
        ));
        assert_eq!(
            ok("models.activate", "box-1", "c2", &args, 1000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            ok(
                "models.activate",
                "box-1",
                "c1",
                &json!({"name": "m", "version": "2.0.0"}),
                1000
            ),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            ok("models.activate", "box-1", "c1", &args, 1000 + 301),
            Err(AuthError::Expired { .. })
        ));
        let other = key();
        assert_eq!(
            verify(
                &[other.public()],
                Signed {
                    name: "models.activate",
                    target: "box-1",
                    id: "c1",
                    args: &args
                },
                &auth,
                1000,
                300
            ),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn public_key_parse_errors_name_the_problem() {
        assert!(matches!(PublicKey::parse("!!"), Err(KeyError::Base64(_))));
        assert_eq!(PublicKey::parse("AAAA"), Err(KeyError::Length(3)));
        let k = key().public();
        assert_eq!(PublicKey::parse(&k.to_base64()), Ok(k));
    }
}
