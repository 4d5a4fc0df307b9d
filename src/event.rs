//! The one record pg2ch moves: a login event, and its JSON form on the topic.
//!
//! The message value is a JSON object with every column of the row, so other
//! consumers can read the topic without pg2ch:
//! `{"id":42,"username":"alice","event_time":"2024-05-01T12:00:00.123456Z"}`.
//! `event_time` is RFC 3339 in UTC with exactly six fractional digits, which is
//! PostgreSQL's own precision, so nothing is rounded on the way. The key is the
//! id as decimal ASCII.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;

/// A row of `user_logins` as it travels. Time is kept as microseconds since the
/// Unix epoch: an integer cannot lose precision between the three systems.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoginEvent {
    pub id: i64,
    pub username: String,
    pub event_time_us: i64,
}

#[derive(Deserialize)]
struct Wire<'a> {
    id: i64,
    #[serde(borrow)]
    username: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    event_time: std::borrow::Cow<'a, str>,
}

/// Why a message value could not be turned back into a [`LoginEvent`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty or null message value")]
    Empty,
    #[error("not a login event: {0}")]
    Json(String),
    #[error("event_time {0:?} is not an RFC 3339 timestamp")]
    Time(String),
}

impl LoginEvent {
    /// The time as chrono sees it; `None` only outside chrono's range.
    pub fn event_time(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_micros(self.event_time_us)
    }

    /// The Kafka key: the id in decimal, so the same row always lands in the same partition.
    pub fn key(&self) -> Vec<u8> {
        self.id.to_string().into_bytes()
    }

    /// The JSON message value documented above. Written by hand rather than
    /// through a serde derive: this runs once per row and the derive, with
    /// chrono's formatter, cost twice as much (see `benches/codec.rs`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(72 + self.username.len());
        out.extend_from_slice(b"{\"id\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.id).as_bytes());
        out.extend_from_slice(b",\"username\":");
        // serde_json does the string escaping, exactly as it always did.
        serde_json::to_writer(&mut out, self.username.as_str()).expect("writing a str to a Vec cannot fail");
        out.extend_from_slice(b",\"event_time\":\"");
        write_time(&mut out, self.event_time_us);
        out.extend_from_slice(b"\"}");
        out
    }

    /// Parses a message value written by [`LoginEvent::encode`] (or by anyone
    /// following the documented format).
    pub fn decode(value: Option<&[u8]>) -> Result<Self, DecodeError> {
        let bytes = match value {
            None | Some([]) => return Err(DecodeError::Empty),
            Some(b) => b,
        };
        let wire: Wire<'_> = serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
        let event_time_us = match parse_time_fast(wire.event_time.as_bytes()) {
            Some(us) => us,
            None => DateTime::parse_from_rfc3339(&wire.event_time)
                .map_err(|_| DecodeError::Time(wire.event_time.clone().into_owned()))?
                .with_timezone(&Utc)
                .timestamp_micros(),
        };
        Ok(LoginEvent { id: wire.id, username: wire.username.into_owned(), event_time_us })
    }
}

const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

/// Writes `us` (microseconds since the epoch) as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
/// Years outside 0000-9999 go through chrono, which knows how to sign and
/// widen them; a time outside chrono's range is written empty, as before.
fn write_time(out: &mut Vec<u8>, us: i64) {
    let (days, in_day) = (us.div_euclid(MICROS_PER_DAY), us.rem_euclid(MICROS_PER_DAY));
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        if let Some(t) = DateTime::from_timestamp_micros(us) {
            out.extend_from_slice(t.to_rfc3339_opts(SecondsFormat::Micros, true).as_bytes());
        }
        return;
    }
    let secs = in_day / 1_000_000;
    let fields: [(i64, usize); 7] = [
        (year, 4),
        (month, 2),
        (day, 2),
        (secs / 3600, 2),
        (secs / 60 % 60, 2),
        (secs % 60, 2),
        (in_day % 1_000_000, 6),
    ];
    let mut text = *b"0000-00-00T00:00:00.000000";
    let mut at = 0;
    for (value, width) in fields {
        let mut v = value;
        for i in (at..at + width).rev() {
            text[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        at += width + 1;
    }
    out.extend_from_slice(&text);
    out.push(b'Z');
}

/// The exact form [`write_time`] produces, parsed without chrono; `None` for
/// anything else (other offsets, fewer digits, leap seconds...), which the
/// caller then hands to chrono's full RFC 3339 parser.
fn parse_time_fast(s: &[u8]) -> Option<i64> {
    if s.len() != 27 || s[4] != b'-' || s[7] != b'-' || s[10] != b'T' || s[13] != b':' || s[16] != b':' {
        return None;
    }
    if s[19] != b'.' || s[26] != b'Z' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        s[from..to].iter().try_fold(0i64, |n, c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second, micros) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 26)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * MICROS_PER_DAY + ((hour * 60 + minute) * 60 + second) * 1_000_000 + micros)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, FileFailurePersistence};

    /// What `encode` produced before it was written by hand: a serde derive
    /// with chrono formatting the time. The format must not change.
    #[derive(serde::Serialize)]
    struct Reference<'a> {
        id: i64,
        username: &'a str,
        event_time: String,
    }

    fn reference(e: &LoginEvent) -> String {
        let event_time = e.event_time().map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)).unwrap_or_default();
        serde_json::to_string(&Reference { id: e.id, username: &e.username, event_time }).unwrap()
    }

    /// Years 0000 to 9999, the range the hand-written path covers itself.
    const FOUR_DIGIT_YEARS: std::ops::Range<i64> = -62_167_219_200_000_000..253_402_300_800_000_000;

    fn time_us() -> impl Strategy<Value = i64> {
        prop_oneof![any::<i64>(), FOUR_DIGIT_YEARS, 1_600_000_000_000_000i64..1_900_000_000_000_000]
    }

    /// The fixed-width form, fields mostly in range and sometimes one past it.
    fn timestamp_text() -> impl Strategy<Value = String> {
        (0..=9999i64, 0..=13i64, 0..=32i64, (0..=24i64, 0..=60i64, 0..=60i64), 0..1_000_000i64)
            .prop_map(|(y, mo, d, (h, mi, s), us)| format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z"))
    }

    proptest! {
        #![proptest_config(Config {
            cases: 2048,
            failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
            ..Config::default()
        })]

        #[test]
        fn encode_writes_exactly_what_the_serde_derive_wrote(id in any::<i64>(), username in ".*", us in time_us()) {
            let e = LoginEvent { id, username, event_time_us: us };
            prop_assert_eq!(String::from_utf8(e.encode()).unwrap(), reference(&e));
        }

        #[test]
        fn decode_reads_back_what_encode_wrote(id in any::<i64>(), username in ".*", us in FOUR_DIGIT_YEARS) {
            let e = LoginEvent { id, username, event_time_us: us };
            prop_assert_eq!(LoginEvent::decode(Some(&e.encode())).unwrap(), e);
        }

        #[test]
        fn fast_time_parser_agrees_with_chrono(s in timestamp_text()) {
            let by_chrono = DateTime::parse_from_rfc3339(&s).ok().map(|t| t.timestamp_micros());
            match parse_time_fast(s.as_bytes()) {
                Some(fast) => prop_assert_eq!(Some(fast), by_chrono),
                // Left to chrono: only what chrono refuses too, or a leap second.
                None => prop_assert!(by_chrono.is_none() || &s[17..19] == "60", "{} parses in chrono only", s),
            }
        }
    }

    #[test]
    fn round_trips_awkward_text_and_microseconds() {
        let e = LoginEvent {
            id: 7,
            username: "quote\" back\\slash\nnew\ttab 🦀 '; DROP TABLE x; --".into(),
            event_time_us: 1_700_000_000_123_456,
        };
        let bytes = e.encode();
        assert!(std::str::from_utf8(&bytes).unwrap().contains("2023-11-14T22:13:20.123456Z"));
        assert_eq!(LoginEvent::decode(Some(&bytes)).unwrap(), e);
    }

    #[test]
    fn rejects_what_is_not_an_event() {
        assert_eq!(LoginEvent::decode(None), Err(DecodeError::Empty));
        assert_eq!(LoginEvent::decode(Some(b"")), Err(DecodeError::Empty));
        assert!(matches!(LoginEvent::decode(Some(b"nope")), Err(DecodeError::Json(_))));
        assert!(matches!(
            LoginEvent::decode(Some(br#"{"username":"a","event_time":"2024-01-01T00:00:00Z"}"#)),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            LoginEvent::decode(Some(br#"{"id":1,"username":"a","event_time":"yesterday"}"#)),
            Err(DecodeError::Time(_))
        ));
    }
}
