//! tern update bundles: the format, signing and verification shared by the `tern-update`
//! operator tool and the daemon.
//!
//! Empty on purpose for now: the bundle format, Ed25519 signing and verification land with the
//! over-the-air update work. The model packages this crate will bundle live in `models/`.
