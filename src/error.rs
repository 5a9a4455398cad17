//! Error taxonomy. Every error knows its fate: a bad record is dead-lettered, a
//! transient fault is retried, anything that makes progress unsafe stops the worker.

use std::borrow::Cow;

use thiserror::Error;

/// Input values quoted in a reason (and panic messages) are cut to this many
/// characters: reasons travel in dead letters and logs, and a 1 MiB timestamp
/// string must not make a 1 MiB reason.
pub const MAX_QUOTED_CHARS: usize = 200;

/// The free-text reasons (`Unsupported`, `UnknownCarrier`, ...) are cut to this
/// many characters: they are built from fixed text plus values already cut to
/// [`MAX_QUOTED_CHARS`], and this bounds the ones that quote several values.
pub const MAX_MESSAGE_CHARS: usize = 1_000;

/// `text` cut to [`MAX_QUOTED_CHARS`] characters, saying how long it was.
pub fn clip(text: &str) -> Cow<'_, str> {
    clip_to(text, MAX_QUOTED_CHARS)
}

/// `text` cut to [`MAX_MESSAGE_CHARS`] characters.
fn clip_message(text: &str) -> Cow<'_, str> {
    clip_to(text, MAX_MESSAGE_CHARS)
}

fn clip_to(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => Cow::Borrowed(text),
        // `at` comes from char_indices, so it is a char boundary.
        Some((at, _)) => Cow::Owned(format!("{}… ({} bytes in all)", &text[..at], text.len())),
    }
}

/// What the runner does with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Transient (broker unavailable, timeout): try the same work again.
    Retry,
    /// The record itself is bad: send it to the dead-letter topic and move on.
    DeadLetter,
    /// Progress is unsafe (config, corrupt or unwritable store): stop, do not commit.
    Stop,
}

/// Why a record was rejected. The `kind()` is a bounded metric label and the
/// `error_kind` of the dead-letter record; the Display text is the human reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    // Every String here may hold input (a header, a body field, a parser message
    // quoting one): Display cuts each with `clip`/`clip_message`, so a reason stays
    // short whatever the record held. The fields keep the whole value for code.
    #[error("body is {size} bytes, over the {limit}-byte limit (raise limits.max_body_bytes if this carrier really sends such bodies)")]
    TooLarge { size: usize, limit: usize },
    /// An archive line too long to be the envelope of a body within the limit.
    #[error("archive line is {size} bytes, over the {limit}-byte limit for lines (6 times limits.max_body_bytes plus 64 KiB; raise limits.max_body_bytes if the carrier really sends such bodies)")]
    LineTooLong { size: usize, limit: usize },
    #[error("body is not valid UTF-8 at byte {at}")]
    InvalidUtf8 { at: usize },
    #[error("body is not valid JSON: {}", clip_message(.0))]
    InvalidJson(String),
    #[error("field `{}` has the wrong type: expected {expected}", clip(.field))]
    WrongType { field: String, expected: &'static str },
    #[error("required field `{}` is missing or empty", clip(.0))]
    MissingField(String),
    #[error("no carrier for this record: {}", clip_message(.0))]
    UnknownCarrier(String),
    #[error("no tenant: header `tenant-id` is absent and tenancy.require_tenant is true")]
    MissingTenant,
    #[error("header `{}` is invalid: {}", clip(.name), clip_message(.reason))]
    InvalidHeader { name: String, reason: String },
    #[error("timestamp `{}` in `{}` is unreadable: {}", clip(.value), clip(.field), clip_message(.reason))]
    InvalidTimestamp { field: String, value: String, reason: String },
    #[error("timestamp `{}` in `{}` is outside the plausible range {}..{}", clip(.value), clip(.field), clip(.min), clip(.max))]
    AbsurdTimestamp { field: String, value: String, min: String, max: String },
    #[error("archive line is not a kcat -J envelope: {}", clip_message(.0))]
    InvalidEnvelope(String),
    #[error("not a tracking event: {}", clip_message(.0))]
    Unsupported(String),
    /// A control-topic record that is not a correction Waymark can apply.
    #[error("correction not applied: {}", clip_message(.0))]
    Correction(String),
    /// A carrier normalizer panicked: a bug in Waymark, contained to this record.
    #[error("carrier `{}` panicked on this record (a bug in Waymark: report it with this dead letter): {}", clip(.carrier), clip(.message))]
    CarrierPanic { carrier: String, message: String },
    /// Any other defect of Waymark's own, confined to this record (an unreadable
    /// repartition record, say; its dead letter says so: please report it).
    #[error("internal error: {}", clip(.0))]
    Internal(String),
}

impl RecordError {
    /// Every value [`RecordError::kind`] returns: the closed set of the `reason`
    /// metric label and of the dead-letter schema's `error_kind` enum.
    pub const KINDS: [&'static str; 14] = [
        "too_large",
        "invalid_utf8",
        "invalid_json",
        "wrong_type",
        "missing_field",
        "unknown_carrier",
        "missing_tenant",
        "invalid_header",
        "invalid_timestamp",
        "absurd_timestamp",
        "invalid_envelope",
        "unsupported",
        "invalid_correction",
        "internal_error",
    ];

    /// Bounded label for metrics and the dead-letter `error_kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordError::TooLarge { .. } | RecordError::LineTooLong { .. } => "too_large",
            RecordError::InvalidUtf8 { .. } => "invalid_utf8",
            RecordError::InvalidJson(_) => "invalid_json",
            RecordError::WrongType { .. } => "wrong_type",
            RecordError::MissingField(_) => "missing_field",
            RecordError::UnknownCarrier(_) => "unknown_carrier",
            RecordError::MissingTenant => "missing_tenant",
            RecordError::InvalidHeader { .. } => "invalid_header",
            RecordError::InvalidTimestamp { .. } => "invalid_timestamp",
            RecordError::AbsurdTimestamp { .. } => "absurd_timestamp",
            RecordError::InvalidEnvelope(_) => "invalid_envelope",
            RecordError::Unsupported(_) => "unsupported",
            RecordError::Correction(_) => "invalid_correction",
            RecordError::Internal(_) | RecordError::CarrierPanic { .. } => "internal_error",
        }
    }

    /// A record error is always dead-lettered: even an internal error is specific
    /// to this record's body, and retrying it would fail the same way.
    pub fn fate(&self) -> Fate {
        Fate::DeadLetter
    }
}

/// Failure of the state store (RocksDB or the in-memory one).
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state store I/O failed: {0} (check that the state directory is writable and the disk is not full)")]
    Io(String),
    /// The store cannot be opened; the text carries the one hint that fits.
    #[error("{0}")]
    Open(String),
    #[error("state store holds a corrupt value in {keyspace}: {reason} (restore the state directory from a backup or export, or delete it to start with empty dedupe state)")]
    Corrupt { keyspace: &'static str, reason: String },
}

impl StoreError {
    /// A store that cannot write or read is never worked around: the worker stops
    /// consuming rather than emit without remembering.
    pub fn fate(&self) -> Fate {
        Fate::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_cuts_long_text_at_a_character() {
        assert_eq!(clip("-1€"), "-1€");
        let exact = "€".repeat(MAX_QUOTED_CHARS);
        assert_eq!(clip(&exact), exact.as_str());
        let long = "€".repeat(MAX_QUOTED_CHARS + 1);
        assert_eq!(clip(&long), format!("{}… ({} bytes in all)", exact, long.len()));
    }

    /// Reasons quote input values; a huge value must not make a huge reason.
    #[test]
    fn reasons_are_bounded_whatever_the_values() {
        let huge = "\"€".repeat(500_000);
        let h = || huge.clone();
        let errors = [
            RecordError::InvalidJson(h()),
            RecordError::WrongType { field: h(), expected: "string" },
            RecordError::MissingField(h()),
            RecordError::UnknownCarrier(h()),
            RecordError::InvalidHeader { name: h(), reason: h() },
            RecordError::InvalidTimestamp { field: h(), value: h(), reason: h() },
            RecordError::AbsurdTimestamp { field: h(), value: h(), min: h(), max: h() },
            RecordError::InvalidEnvelope(h()),
            RecordError::Unsupported(h()),
            RecordError::CarrierPanic { carrier: h(), message: h() },
            RecordError::Internal(h()),
        ];
        for error in errors {
            let reason = error.to_string();
            assert!(reason.chars().count() <= 2_000, "{}: {} chars", error.kind(), reason.chars().count());
        }
        // Short values are quoted whole.
        let short = RecordError::InvalidTimestamp { field: "f".into(), value: "-1€".into(), reason: "r".into() };
        assert_eq!(short.to_string(), "timestamp `-1€` in `f` is unreadable: r");
    }
}
