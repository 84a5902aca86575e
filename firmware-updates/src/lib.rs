//! tern update bundles and signed commands: the formats, signing and verification shared by the
//! `tern-update` operator tool and the daemon.
//!
//! Bundles (model packages with signed manifests) land with the over-the-air update work; the
//! signed-command scheme used by the fleet link is here now.

pub mod bundle;
pub mod command;
