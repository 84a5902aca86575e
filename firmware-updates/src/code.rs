//! The one vocabulary of error codes tern puts on the wire: command replies, D-Bus error names,
//! update refusals and failures in events, retained statuses and the database. Every code is
//! snake_case text there and never changes meaning; new codes may be added.

use std::fmt;

/// A stable error code. `as_str` is its wire form; serde uses the same text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    // Commands (MQTT replies, D-Bus errors).
    /// The request was malformed: arguments, an input that is no image or tensor.
    BadRequest,
    UnknownCommand,
    NotFound,
    /// Try again later with the same request.
    Busy,
    Unauthorized,
    /// The request cannot be done in the current state.
    Conflict,
    /// The box's own fault: its database, its disk, a bug.
    Internal,
    /// A model failed to load or its self-test (outside an update).
    BadModel,

    // Manifests, key rotations and artifacts refused (before anything is kept).
    Oversize,
    Malformed,
    Unsigned,
    BadSignature,
    UnknownKey,
    DuplicateSignature,
    BelowThreshold,
    Expired,
    /// Older than the box's freshness window, or no recent signed time to judge it by.
    Stale,
    Downgrade,
    Replay,
    RevokedKey,
    BadName,
    BadHash,
    BadSize,
    TruncatedChunk,
    ForeignChunk,
    PackageMismatch,
    WrongTarget,
    BadArtifact,
    BadChunk,

    // An accepted update that did not end committed.
    /// Not enough free disk for the update.
    NoSpace,
    /// Reading or writing the staging or the database failed.
    Io,
    /// A bundle file's copy was cut short by a restart.
    Interrupted,
    /// No chunk arrived for too long.
    Stalled,
    /// The operator cleared the retained manifest during the download.
    Withdrawn,
    /// A newer update of the same model replaced this one.
    Superseded,
    /// The new version failed its self-test.
    SelfTest,
    /// The new version missed its package's evaluation rule.
    Evaluation,
    /// The new version could not be made the active one.
    Activation,
    /// The new version failed its health window and was rolled back.
    Health,
    /// The candidate ran as a shadow and its verdict was against it (its agreement with the
    /// live model, its latency, or the operator's drop).
    Shadow,
}

impl Code {
    /// Every code, for documentation and tests.
    pub const ALL: &'static [Code] = &[
        Code::BadRequest,
        Code::UnknownCommand,
        Code::NotFound,
        Code::Busy,
        Code::Unauthorized,
        Code::Conflict,
        Code::Internal,
        Code::BadModel,
        Code::Oversize,
        Code::Malformed,
        Code::Unsigned,
        Code::BadSignature,
        Code::UnknownKey,
        Code::DuplicateSignature,
        Code::BelowThreshold,
        Code::Expired,
        Code::Stale,
        Code::Downgrade,
        Code::Replay,
        Code::RevokedKey,
        Code::BadName,
        Code::BadHash,
        Code::BadSize,
        Code::TruncatedChunk,
        Code::ForeignChunk,
        Code::PackageMismatch,
        Code::WrongTarget,
        Code::BadArtifact,
        Code::BadChunk,
        Code::NoSpace,
        Code::Io,
        Code::Interrupted,
        Code::Stalled,
        Code::Withdrawn,
        Code::Superseded,
        Code::SelfTest,
        Code::Evaluation,
        Code::Activation,
        Code::Health,
        Code::Shadow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::UnknownCommand => "unknown_command",
            Code::NotFound => "not_found",
            Code::Busy => "busy",
            Code::Unauthorized => "unauthorized",
            Code::Conflict => "conflict",
            Code::Internal => "internal",
            Code::BadModel => "bad_model",
            Code::Oversize => "oversize",
            Code::Malformed => "malformed",
            Code::Unsigned => "unsigned",
            Code::BadSignature => "bad_signature",
            Code::UnknownKey => "unknown_key",
            Code::DuplicateSignature => "duplicate_signature",
            Code::BelowThreshold => "below_threshold",
            Code::Expired => "expired",
            Code::Stale => "stale",
            Code::Downgrade => "downgrade",
            Code::Replay => "replay",
            Code::RevokedKey => "revoked_key",
            Code::BadName => "bad_name",
            Code::BadHash => "bad_hash",
            Code::BadSize => "bad_size",
            Code::TruncatedChunk => "truncated_chunk",
            Code::ForeignChunk => "foreign_chunk",
            Code::PackageMismatch => "package_mismatch",
            Code::WrongTarget => "wrong_target",
            Code::BadArtifact => "bad_artifact",
            Code::BadChunk => "bad_chunk",
            Code::NoSpace => "no_space",
            Code::Io => "io",
            Code::Interrupted => "interrupted",
            Code::Stalled => "stalled",
            Code::Withdrawn => "withdrawn",
            Code::Superseded => "superseded",
            Code::SelfTest => "self_test",
            Code::Evaluation => "evaluation",
            Code::Activation => "activation",
            Code::Health => "health",
            Code::Shadow => "shadow",
        }
    }

    /// The code whose wire form is `s`.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

/// So that a code compares with its wire form, as tests and readers of JSON do.
impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms_are_unique_snake_case_and_match_serde() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            let s = c.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
            assert_eq!(serde_json::to_value(c).unwrap(), s);
            assert_eq!(Code::parse(s), Some(*c));
        }
        assert_eq!(Code::parse("nonsense"), None);
    }
}
