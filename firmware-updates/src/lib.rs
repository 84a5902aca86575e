//! tern update bundles and signed commands: the formats, signing and verification shared by the
//! `tern-update` operator tool and the daemon.
//!
//! `bundle`: signed update manifests and chunk messages; `artifact`: the package as a tar
//! archive and the bundle file; `command`: signed fleet commands; `topics`: every MQTT topic;
//! `code`: the error codes both ends put on the wire.

pub mod artifact;
pub mod bundle;
pub mod code;
pub mod command;
pub mod topics;

pub use code::Code;

/// Lower-case hex, the form digests and nonces take in manifests, commands and the database.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}
