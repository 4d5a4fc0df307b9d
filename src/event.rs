//! The one record pg2ch moves: a login event, how a source row becomes one
//! (or is rejected), and its JSON form on the topic.
//!
//! The message value is a JSON object with every column of the row, so other
//! consumers can read the topic without pg2ch:
//! `{"id":42,"username":"alice","event_time":"2024-05-01T12:00:00.123456Z"}`.
//! `event_time` is RFC 3339 in UTC with exactly six fractional digits, which is
//! PostgreSQL's own precision, so nothing is rounded on the way. Years outside
//! 0000-9999 (PostgreSQL admits 4713 BC to 294276 AD) are written in ISO 8601's
//! expanded form, a sign and at least four digits (`+12000-01-01T…`,
//! `-0001-01-01T…` for 2 BC), as chrono writes them. The key is the id as
//! decimal ASCII.
//!
//! [`SourceRow::into_event`] is the single place that decides whether a row
//! can travel: the real source adapter and the simulated one both go through
//! it, and the encoder and decoder below are one codec whose round trip is a
//! property over every `i64` time.

use chrono::{DateTime, Utc};
use serde::Deserialize;

/// A row of `user_logins` as it travels. Time is kept as microseconds since the
/// Unix epoch: an integer cannot lose precision between the three systems.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoginEvent {
    pub id: i64,
    pub username: String,
    pub event_time_us: i64,
}

/// A `timestamptz` (or `timestamp`) exactly as PostgreSQL stores it:
/// microseconds since 2000-01-01 00:00:00 UTC, with `infinity` and
/// `-infinity` as `i64::MAX` and `i64::MIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    pub const INFINITY: PgTimestamp = PgTimestamp(i64::MAX);
    pub const NEG_INFINITY: PgTimestamp = PgTimestamp(i64::MIN);
    /// The earliest value PostgreSQL admits: 4714-11-24 00:00:00 BC.
    pub const MIN: PgTimestamp = PgTimestamp(-211_813_488_000_000_000);
    /// The latest value PostgreSQL admits: 294276-12-31 23:59:59.999999.
    pub const MAX: PgTimestamp = PgTimestamp(9_223_371_331_199_999_999);
    /// PostgreSQL's epoch (2000-01-01) in Unix microseconds.
    pub const EPOCH_UNIX_US: i64 = 946_684_800_000_000;

    /// Microseconds since the Unix epoch, or why the value has none that
    /// fits `event_time_us Int64` in ClickHouse.
    pub fn unix_micros(self) -> Result<i64, String> {
        match self {
            PgTimestamp::INFINITY => Err("event_time is infinity, which ClickHouse cannot hold".into()),
            PgTimestamp::NEG_INFINITY => Err("event_time is -infinity, which ClickHouse cannot hold".into()),
            PgTimestamp(us) => us.checked_add(Self::EPOCH_UNIX_US).ok_or_else(|| {
                let mut text = Vec::new();
                write_time(&mut text, i64::MAX);
                format!(
                    "event_time is later than {}, the last instant event_time_us Int64 can hold",
                    String::from_utf8_lossy(&text)
                )
            }),
        }
    }
}

/// A source row as PostgreSQL hands it over, before anything is decided:
/// the text's raw bytes (a `SQL_ASCII` database admits any byte but NUL)
/// and the raw time, each possibly NULL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceRow {
    pub id: i64,
    pub username: Option<Vec<u8>>,
    pub event_time: Option<PgTimestamp>,
}

impl SourceRow {
    /// The event this row travels as, or why it cannot travel (the row is
    /// then flagged rejected with this reason, never sent).
    pub fn into_event(self) -> Result<LoginEvent, String> {
        let username = match self.username {
            None => return Err("username is NULL".into()),
            Some(bytes) => String::from_utf8(bytes).map_err(|e| {
                format!("username is not valid UTF-8 (byte {} of {})", e.utf8_error().valid_up_to(), e.as_bytes().len())
            })?,
        };
        let event_time_us = match self.event_time {
            None => return Err("event_time is NULL".into()),
            Some(t) => t.unix_micros()?,
        };
        Ok(LoginEvent { id: self.id, username, event_time_us })
    }
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
    /// The time as chrono sees it; `None` outside chrono's range (years
    /// beyond ±262143), which [`encode`](Self::encode) does not need.
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

/// Writes `us` (microseconds since the epoch) as `YYYY-MM-DDTHH:MM:SS.ffffffZ`,
/// with years outside 0000-9999 in the expanded form (`+12000`, `-0001`).
/// Every `i64` has a form, and [`parse_time_fast`] reads each one back.
fn write_time(out: &mut Vec<u8>, us: i64) {
    let (days, in_day) = (us.div_euclid(MICROS_PER_DAY), us.rem_euclid(MICROS_PER_DAY));
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        out.push(if year < 0 { b'-' } else { b'+' });
        let digits = year.unsigned_abs().to_string();
        out.extend(std::iter::repeat_n(b'0', 4usize.saturating_sub(digits.len())));
        out.extend_from_slice(digits.as_bytes());
    }
    let secs = in_day / 1_000_000;
    let fields: [(i64, usize); 7] = [
        (year.rem_euclid(10_000), 4),
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
    // An expanded year has written all its digits already.
    let skip = if (0..=9999).contains(&year) { 0 } else { 4 };
    out.extend_from_slice(&text[skip..]);
    out.push(b'Z');
}

/// The exact form [`write_time`] produces, parsed without chrono; `None` for
/// anything else (other offsets, fewer digits, leap seconds, a time outside
/// `i64`...), which the caller then hands to chrono's full RFC 3339 parser.
fn parse_time_fast(s: &[u8]) -> Option<i64> {
    let (negative, digits) = match s.first()? {
        b'+' => (false, &s[1..]),
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    let year_len = digits.iter().position(|c| *c == b'-')?;
    let signed = digits.len() != s.len();
    if year_len < 4 || (!signed && year_len != 4) || year_len > 7 {
        return None;
    }
    let rest = &digits[year_len..];
    if rest.len() != 23 || rest[0] != b'-' || rest[3] != b'-' || rest[6] != b'T' || rest[9] != b':' {
        return None;
    }
    if rest[12] != b':' || rest[15] != b'.' || rest[22] != b'Z' {
        return None;
    }
    let num = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |n, c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
    };
    let year = num(&digits[..year_len])? * if negative { -1 } else { 1 };
    let (month, day) = (num(&rest[1..3])?, num(&rest[4..6])?);
    let (hour, minute, second, micros) =
        (num(&rest[7..9])?, num(&rest[10..12])?, num(&rest[13..15])?, num(&rest[16..22])?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = i128::from(days_from_civil(year, month, day));
    let us = days * i128::from(MICROS_PER_DAY) + i128::from(((hour * 60 + minute) * 60 + second) * 1_000_000 + micros);
    i64::try_from(us).ok()
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
    use chrono::SecondsFormat;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, FileFailurePersistence};

    /// What `encode` produced before it was written by hand: a serde derive
    /// with chrono formatting the time. The format must not change where
    /// chrono has a form; beyond chrono's range `encode` goes on alone.
    #[derive(serde::Serialize)]
    struct Reference<'a> {
        id: i64,
        username: &'a str,
        event_time: String,
    }

    fn reference(e: &LoginEvent) -> Option<String> {
        let event_time = e.event_time()?.to_rfc3339_opts(SecondsFormat::Micros, true);
        Some(serde_json::to_string(&Reference { id: e.id, username: &e.username, event_time }).unwrap())
    }

    /// Years 0000 to 9999, the common case.
    const FOUR_DIGIT_YEARS: std::ops::Range<i64> = -62_167_219_200_000_000..253_402_300_800_000_000;

    /// Every `i64`, with weight on the edges: PostgreSQL's whole range in
    /// Unix microseconds, the four-digit years and their borders, today.
    fn time_us() -> impl Strategy<Value = i64> {
        let pg_min = PgTimestamp::MIN.0 + PgTimestamp::EPOCH_UNIX_US;
        prop_oneof![
            any::<i64>(),
            pg_min..=i64::MAX,
            FOUR_DIGIT_YEARS,
            1_600_000_000_000_000i64..1_900_000_000_000_000,
            prop::sample::select(vec![
                i64::MIN,
                i64::MIN + 1,
                i64::MAX,
                i64::MAX - 1,
                pg_min,
                0,
                -1,
                FOUR_DIGIT_YEARS.start - 1,
                FOUR_DIGIT_YEARS.start,
                FOUR_DIGIT_YEARS.end - 1,
                FOUR_DIGIT_YEARS.end,
            ]),
        ]
    }

    /// Any text, with weight on what breaks naive encoders: every control
    /// character, quotes, backslashes, non-ASCII.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[\\x00-\\x1f\\x7f\"\\\\]{0,40}", ".*"]
    }

    /// A PostgreSQL time: every value it admits, ±infinity, and NULL.
    pub fn pg_timestamp() -> impl Strategy<Value = Option<PgTimestamp>> {
        prop_oneof![
            4 => (PgTimestamp::MIN.0..=PgTimestamp::MAX.0).prop_map(|t| Some(PgTimestamp(t))),
            1 => prop::sample::select(vec![
                Some(PgTimestamp::INFINITY),
                Some(PgTimestamp::NEG_INFINITY),
                Some(PgTimestamp::MIN),
                Some(PgTimestamp::MAX),
                Some(PgTimestamp(i64::MAX - PgTimestamp::EPOCH_UNIX_US)),
                Some(PgTimestamp(i64::MAX - PgTimestamp::EPOCH_UNIX_US + 1)),
                None,
            ]),
        ]
    }

    /// Raw text bytes: valid UTF-8 mostly, and any bytes (what a SQL_ASCII
    /// database lets in), or NULL.
    pub fn pg_text() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![
            4 => text().prop_map(|s| Some(s.into_bytes())),
            2 => proptest::collection::vec(1u8.., 0..40).prop_map(Some),
            1 => Just(None),
        ]
    }

    fn timestamp_text() -> impl Strategy<Value = String> {
        let year = prop_oneof![
            (0..=9999i64).prop_map(|y| format!("{y:04}")),
            (-300_000..=300_000i64)
                .prop_filter("expanded form is for years outside 0000-9999", |y| !(0..=9999).contains(y))
                .prop_map(|y| format!("{}{:04}", if y < 0 { '-' } else { '+' }, y.abs())),
        ];
        (year, 0..=13i64, 0..=32i64, (0..=24i64, 0..=60i64, 0..=60i64), 0..1_000_000i64)
            .prop_map(|(y, mo, d, (h, mi, s), us)| format!("{y}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z"))
    }

    proptest! {
        #![proptest_config(Config {
            cases: 2048,
            failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
            ..Config::default()
        })]

        #[test]
        fn encode_writes_exactly_what_the_serde_derive_wrote(id in any::<i64>(), username in text(), us in time_us()) {
            let e = LoginEvent { id, username, event_time_us: us };
            if let Some(expected) = reference(&e) {
                prop_assert_eq!(String::from_utf8(e.encode()).unwrap(), expected);
            }
        }

        #[test]
        fn decode_reads_back_what_encode_wrote(id in any::<i64>(), username in text(), us in time_us()) {
            let e = LoginEvent { id, username, event_time_us: us };
            prop_assert_eq!(LoginEvent::decode(Some(&e.encode())).unwrap(), e);
        }

        /// The producer never hands on a row the consumer would refuse:
        /// every source row is either an event that survives the round trip
        /// with its exact content, or rejected for the reason that applies.
        #[test]
        fn every_source_row_travels_exactly_or_is_rejected(id in any::<i64>(), username in pg_text(), time in pg_timestamp()) {
            let row = SourceRow { id, username: username.clone(), event_time: time };
            match row.into_event() {
                Ok(e) => {
                    prop_assert_eq!(LoginEvent::decode(Some(&e.encode())).unwrap(), e.clone());
                    prop_assert_eq!(Some(e.username.as_bytes()), username.as_deref());
                    prop_assert_eq!(i128::from(e.event_time_us), i128::from(time.unwrap().0) + i128::from(PgTimestamp::EPOCH_UNIX_US));
                }
                Err(reason) => {
                    let bad_text = username.as_ref().is_none_or(|b| std::str::from_utf8(b).is_err());
                    let bad_time = time.is_none_or(|t| t.unix_micros().is_err());
                    prop_assert!(bad_text || bad_time, "rejected a carriable row: {}", reason);
                    let named = if bad_text { "username" } else { "event_time" };
                    prop_assert!(reason.starts_with(named), "{}", reason);
                }
            }
        }

        #[test]
        fn fast_time_parser_agrees_with_chrono(s in timestamp_text()) {
            let by_chrono = DateTime::parse_from_rfc3339(&s).ok().map(|t| t.timestamp_micros());
            match parse_time_fast(s.as_bytes()) {
                Some(fast) => {
                    // chrono reads four-digit years only; the expanded ones
                    // must agree with what chrono formats.
                    if s.len() == 27 {
                        prop_assert_eq!(Some(fast), by_chrono);
                    } else if let Some(t) = DateTime::from_timestamp_micros(fast) {
                        prop_assert_eq!(t.to_rfc3339_opts(SecondsFormat::Micros, true), s);
                    }
                }
                // Left to chrono: only what chrono refuses too, or a leap second.
                None => prop_assert!(by_chrono.is_none() || s.contains(":60."), "{} parses in chrono only", s),
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
    fn years_outside_four_digits_and_the_ends_of_postgres_have_exact_forms() {
        let text = |us: i64| {
            let mut out = Vec::new();
            write_time(&mut out, us);
            String::from_utf8(out).unwrap()
        };
        let unix = |t: PgTimestamp| t.unix_micros().unwrap();
        assert_eq!(text(unix(PgTimestamp::MIN)), "-4713-11-24T00:00:00.000000Z", "4714 BC is year -4713");
        assert_eq!(text(253_402_300_800_000_000), "+10000-01-01T00:00:00.000000Z");
        assert_eq!(text(i64::MAX), "+294247-01-10T04:00:54.775807Z");
        assert_eq!(text(i64::MIN), "-290308-12-21T19:59:05.224192Z");
        for us in [i64::MIN, i64::MAX, unix(PgTimestamp::MIN), -62_167_219_200_000_001] {
            assert_eq!(parse_time_fast(text(us).as_bytes()), Some(us), "{}", text(us));
        }
        assert!(PgTimestamp::INFINITY.unix_micros().unwrap_err().contains("infinity"));
        assert!(PgTimestamp::NEG_INFINITY.unix_micros().unwrap_err().contains("-infinity"));
        let late = PgTimestamp::MAX.unix_micros().unwrap_err();
        assert!(late.contains("+294247-01-10T04:00:54.775807Z"), "{late}");
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
        assert!(matches!(
            LoginEvent::decode(Some(br#"{"id":1,"username":"a","event_time":"+99999999-01-01T00:00:00.000000Z"}"#)),
            Err(DecodeError::Time(_))
        ));
    }
}
