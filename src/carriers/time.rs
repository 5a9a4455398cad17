//! Timestamp forms carriers use, to UTC. Each carrier module states its rule for
//! local times without an offset; the helpers here only parse.

use chrono::{DateTime, Duration, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};

use crate::error::RecordError;

/// A parsed instant and whether an offset-less local time was read as UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instant {
    pub utc: DateTime<Utc>,
    pub assumed_utc: bool,
}

const NAIVE_FORMATS: [&str; 4] = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"];

/// RFC 3339 / ISO 8601 with an offset or `Z`; without one, the local time is read
/// as UTC and flagged (the fallback rule where a carrier documents none).
pub fn parse_iso(field: &str, text: &str) -> Result<Instant, RecordError> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Instant { utc: t.with_timezone(&Utc), assumed_utc: false });
    }
    // ISO 8601 offsets without a colon (+0200) or with a short hour (-7:00).
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(text, fmt) {
            return Ok(Instant { utc: t.with_timezone(&Utc), assumed_utc: false });
        }
    }
    for fmt in NAIVE_FORMATS {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, fmt) {
            return Ok(Instant { utc: Utc.from_utc_datetime(&naive), assumed_utc: true });
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let naive = date.and_hms_opt(0, 0, 0).unwrap_or_default();
        return Ok(Instant { utc: Utc.from_utc_datetime(&naive), assumed_utc: true });
    }
    Err(RecordError::InvalidTimestamp {
        field: field.into(),
        value: text.into(),
        reason: "expected RFC 3339 / ISO 8601 (with or without offset)".into(),
    })
}

/// A UTC offset given in a field of its own: `-05:00`, `-7:00` (USPS `GMTOffset`
/// does not always zero-pad the hour), `+0530`, `+05` or `Z`.
pub fn parse_offset(field: &str, text: &str) -> Result<FixedOffset, RecordError> {
    let trimmed = text.trim();
    let invalid = || RecordError::InvalidTimestamp {
        field: field.into(),
        value: trimmed.into(),
        reason: "expected a UTC offset such as -05:00, -7:00, +0530 or Z".into(),
    };
    let (sign, rest) = if trimmed.eq_ignore_ascii_case("z") {
        (1, "00")
    } else if let Some(rest) = trimmed.strip_prefix('+') {
        (1, rest)
    } else if let Some(rest) = trimmed.strip_prefix('-') {
        (-1, rest)
    } else {
        return Err(invalid());
    };
    let (hours, minutes) = match rest.split_once(':') {
        Some(parts) => parts,
        // `+0530`. Four bytes need not be four characters (`-1€`): a byte index
        // inside a character is not a split point but an unreadable offset.
        None if rest.len() == 4 => rest.split_at_checked(2).ok_or_else(invalid)?,
        None => (rest, "00"),
    };
    let number = |s: &str, len: std::ops::RangeInclusive<usize>| {
        if len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse::<i32>().ok()
        } else {
            None
        }
    };
    match (number(hours, 1..=2), number(minutes, 2..=2)) {
        // Real offsets span -12:00..+14:00; 18 hours is ISO 8601's outer bound.
        (Some(h), Some(m)) if h <= 18 && m < 60 => {
            FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(invalid)
        }
        _ => Err(invalid()),
    }
}

/// A local wall-clock time (ISO 8601 without offset) whose UTC offset comes in a
/// separate field, e.g. USPS `eventTimestamp` + `GMTOffset`. When the local text
/// carries an offset of its own, that offset wins and `offset` is not read.
pub fn parse_local_with_offset(
    field: &str,
    local: &str,
    offset_field: &str,
    offset: &str,
) -> Result<Instant, RecordError> {
    let instant = parse_iso(field, local)?;
    if !instant.assumed_utc {
        return Ok(instant);
    }
    let offset = parse_offset(offset_field, offset)?;
    // `parse_iso` read the wall-clock time as if it were UTC; the real instant is
    // that reading minus the offset (13:58 at -05:00 is 18:58Z).
    let utc = instant.utc.checked_sub_signed(Duration::seconds(offset.local_minus_utc().into())).ok_or_else(|| {
        RecordError::InvalidTimestamp {
            field: field.into(),
            value: local.trim().into(),
            reason: "outside the representable range once the offset is applied".into(),
        }
    })?;
    Ok(Instant { utc, assumed_utc: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> (i64, bool) {
        let i = parse_iso("t", text).unwrap();
        (i.utc.timestamp_millis(), i.assumed_utc)
    }

    #[test]
    fn offsets_fractions_and_local_forms() {
        let z = ms("2024-07-31T15:00:00Z");
        assert_eq!(z, (1_722_438_000_000, false));
        assert_eq!(ms("2024-07-31T11:00:00-04:00"), z);
        assert_eq!(ms("2024-07-31T11:00:00-0400"), z);
        assert_eq!(ms("2024-07-31T15:00:00.000Z"), z);
        assert_eq!(ms("2024-07-31T15:00:00.041Z").0, z.0 + 41);
        assert_eq!(ms("2024-07-31T15:00:00"), (z.0, true));
        assert_eq!(ms("2024-07-31 15:00:00"), (z.0, true));
        assert_eq!(ms("2024-07-31").1, true);
        assert_eq!(parse_iso("f", "31/07/2024").unwrap_err().kind(), "invalid_timestamp");
    }

    #[test]
    fn separate_offsets() {
        let secs = |t: &str| parse_offset("o", t).map(|o| o.local_minus_utc());
        assert_eq!(secs("-05:00"), Ok(-5 * 3600));
        assert_eq!(secs("-7:00"), Ok(-7 * 3600));
        assert_eq!(secs("+0530"), Ok(5 * 3600 + 1800));
        assert_eq!(secs("+05"), Ok(5 * 3600));
        assert_eq!(secs(" Z "), Ok(0));
        for bad in ["", "EST", "-05:7", "+25:00", "-05:60", "05:00", "-0500:00"] {
            assert_eq!(parse_offset("o", bad).unwrap_err().kind(), "invalid_timestamp", "{bad}");
        }
    }

    /// Four bytes after the sign that are not four characters: byte 2 falls inside
    /// `€` (3 bytes), so splitting there by byte index would panic.
    #[test]
    fn multi_byte_offsets_are_errors_not_panics() {
        for bad in ["-1€", "+a€", "+€1", "-€", "+1€:00", "+é:00", "-0５00", "−05:00", "+\u{0}€"] {
            assert_eq!(parse_offset("o", bad).unwrap_err().kind(), "invalid_timestamp", "{bad}");
        }
        assert_eq!(
            parse_local_with_offset("t", "2025-05-02T14:26:00", "o", "-1€").unwrap_err(),
            RecordError::InvalidTimestamp {
                field: "o".into(),
                value: "-1€".into(),
                reason: "expected a UTC offset such as -05:00, -7:00, +0530 or Z".into()
            }
        );
    }

    #[test]
    fn local_time_with_separate_offset() {
        let at = |local: &str, offset: &str| {
            let i = parse_local_with_offset("t", local, "o", offset).unwrap();
            (i.utc.timestamp_millis(), i.assumed_utc)
        };
        assert_eq!(at("2024-11-22T13:58:00", "-05:00"), (ms("2024-11-22T18:58:00Z").0, false));
        assert_eq!(at("2024-04-04T07:03:12.041", "-7:00"), (ms("2024-04-04T14:03:12.041Z").0, false));
        // An offset in the local text itself wins over the separate field.
        assert_eq!(at("2024-11-22T13:58:00-06:00", "-05:00"), (ms("2024-11-22T19:58:00Z").0, false));
        assert_eq!(
            parse_local_with_offset("t", "2024-11-22T13:58:00", "o", "CST").unwrap_err(),
            RecordError::InvalidTimestamp {
                field: "o".into(),
                value: "CST".into(),
                reason: "expected a UTC offset such as -05:00, -7:00, +0530 or Z".into()
            }
        );
        assert_eq!(parse_local_with_offset("t", "22/11/2024", "o", "-05:00").unwrap_err().kind(), "invalid_timestamp");
    }

    mod never_panic {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            // Arbitrary strings rarely look like offsets; the second strategy keeps
            // them short and signed, where the byte-length rules apply.
            #[test]
            fn parse_offset_never_panics(any in any::<String>(), signed in "[+-]?\\PC{0,5}(:\\PC{0,3})?") {
                let _ = parse_offset("o", &any);
                let _ = parse_offset("o", &signed);
            }

            #[test]
            fn parse_local_with_offset_never_panics(
                // Mostly valid zone-less local times, so that the offset is read.
                local in prop_oneof![any::<String>(), "20[0-9]{2}-0[1-9]-1[0-9]T[01][0-9]:[0-5][0-9](:[0-5][0-9])?"],
                // Signed, short, with one- to three-byte characters (`-1€`).
                offset in prop_oneof![any::<String>(), "[-+Zz]?\\PC{0,5}", "[-+][0-9a-zé€:]{1,4}"],
            ) {
                let _ = parse_local_with_offset("t", &local, "o", &offset);
            }
        }
    }
}
