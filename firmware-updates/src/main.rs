//! `tern-update`: the operator's tool for building, signing and publishing model updates.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Say so plainly rather than pretend: nothing here builds or signs bundles yet.
    eprintln!(
        "tern-update {}: bundle, sign, verify and publish are not implemented yet; \
         model packages are built by firmware-updates/models/make_models.py",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
