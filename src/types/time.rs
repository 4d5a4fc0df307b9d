//! Dates and times as integers, and their text forms in the message.
//!
//! PostgreSQL keeps a `timestamp`/`timestamptz` as microseconds since
//! 2000-01-01 and a `date` as days since then, with the ends of the integer
//! range meaning `±infinity`. pg2ch carries them as microseconds and days
//! since 1970-01-01 (the Unix epoch ClickHouse uses), and writes them in
//! the message as ISO 8601 in UTC: `2024-05-01T12:00:00.123456Z` (exactly
//! six fractional digits, PostgreSQL's precision) and `2024-05-01`. Years
//! outside 0000-9999 take ISO 8601's expanded form, a sign and at least four
//! digits (`+12000-01-01`, `-0001-01-01` for 2 BC: year 0 is 1 BC), so every
//! value has exactly one text and reads back to itself.

use chrono::DateTime;

/// PostgreSQL's epoch (2000-01-01) in Unix microseconds.
pub const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;
/// PostgreSQL's epoch in Unix days.
pub const PG_EPOCH_UNIX_DAYS: i32 = 10_957;
pub const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

/// The earliest `timestamp` PostgreSQL admits (4714-11-24 00:00:00 BC), in its microseconds.
pub const PG_TIMESTAMP_MIN: i64 = -211_813_488_000_000_000;
/// The latest `timestamp` PostgreSQL admits (294276-12-31 23:59:59.999999), in its microseconds.
pub const PG_TIMESTAMP_MAX: i64 = 9_223_371_331_199_999_999;
/// The earliest `date` PostgreSQL admits (4714-11-24 BC), in its days.
pub const PG_DATE_MIN: i32 = -2_451_545;
/// The latest `date` PostgreSQL admits (5874897-12-31), in its days.
pub const PG_DATE_MAX: i32 = 2_145_031_948;

/// Now, in milliseconds since the Unix epoch, by this machine's clock (the
/// unit of a Kafka record's timestamp).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Now, in microseconds since PostgreSQL's epoch (2000-01-01 UTC), by this
/// machine's clock.
pub fn now_pg_us() -> i64 {
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    unix - PG_EPOCH_UNIX_US
}

/// Unix microseconds of a PostgreSQL timestamp, or why it has none that
/// fits an `Int64` (`±infinity`, or later than 294247-01-10T04:00:54.775807Z).
pub fn unix_micros(pg_us: i64) -> Result<i64, &'static str> {
    match pg_us {
        i64::MAX => Err("is infinity, which ClickHouse cannot hold"),
        i64::MIN => Err("is -infinity, which ClickHouse cannot hold"),
        us => us
            .checked_add(PG_EPOCH_UNIX_US)
            .ok_or("is later than +294247-01-10T04:00:54.775807Z, the last instant Int64 microseconds can hold"),
    }
}

/// Unix days of a PostgreSQL date, or why it has none (`±infinity`).
pub fn unix_days(pg_days: i32) -> Result<i32, &'static str> {
    match pg_days {
        i32::MAX => Err("is infinity, which ClickHouse cannot hold"),
        i32::MIN => Err("is -infinity, which ClickHouse cannot hold"),
        // Every finite PostgreSQL date fits once shifted (checked anyway).
        d => d.checked_add(PG_EPOCH_UNIX_DAYS).ok_or("is later than the last day Int32 can hold"),
    }
}

/// Writes a year as four digits, or in the expanded form outside 0000-9999.
fn write_year(out: &mut Vec<u8>, year: i64) {
    if (0..=9999).contains(&year) {
        out.extend_from_slice(format!("{year:04}").as_bytes());
    } else {
        out.push(if year < 0 { b'-' } else { b'+' });
        let digits = year.unsigned_abs().to_string();
        out.extend(std::iter::repeat_n(b'0', 4usize.saturating_sub(digits.len())));
        out.extend_from_slice(digits.as_bytes());
    }
}

/// Writes `us` (microseconds since the Unix epoch) as
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`. Every `i64` has a form, and
/// [`parse_time`] reads each one back.
pub fn write_time(out: &mut Vec<u8>, us: i64) {
    let (days, in_day) = (us.div_euclid(MICROS_PER_DAY), us.rem_euclid(MICROS_PER_DAY));
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        write_year(out, year);
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

/// Writes `days` (since the Unix epoch) as `YYYY-MM-DD`.
pub fn write_date(out: &mut Vec<u8>, days: i32) {
    let (year, month, day) = civil_from_days(i64::from(days));
    write_year(out, year);
    out.extend_from_slice(format!("-{month:02}-{day:02}").as_bytes());
}

/// Splits a leading year (four digits, or signed and expanded) from the rest.
fn split_year(s: &[u8]) -> Option<(i64, &[u8])> {
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
    let year = number(&digits[..year_len])? * if negative { -1 } else { 1 };
    Some((year, &digits[year_len..]))
}

fn number(s: &[u8]) -> Option<i64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0i64, |n, c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
}

/// Reads what [`write_date`] writes; `None` for anything else.
pub fn parse_date(s: &[u8]) -> Option<i32> {
    let (year, rest) = split_year(s)?;
    if rest.len() != 6 || rest[0] != b'-' || rest[3] != b'-' {
        return None;
    }
    let (month, day) = (number(&rest[1..3])?, number(&rest[4..6])?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    i32::try_from(days_from_civil(year, month, day)).ok()
}

/// Reads a time in the message: the exact form [`write_time`] produces,
/// parsed without chrono, else any RFC 3339 time chrono reads (another
/// producer following the format may write an offset or fewer digits).
pub fn parse_time(s: &str) -> Option<i64> {
    parse_time_fast(s.as_bytes()).or_else(|| DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_micros()))
}

/// The exact form [`write_time`] produces; `None` for anything else (other
/// offsets, fewer digits, leap seconds, a time outside `i64`...).
pub fn parse_time_fast(s: &[u8]) -> Option<i64> {
    let (year, rest) = split_year(s)?;
    if rest.len() != 23 || rest[0] != b'-' || rest[3] != b'-' || rest[6] != b'T' || rest[9] != b':' {
        return None;
    }
    if rest[12] != b':' || rest[15] != b'.' || rest[22] != b'Z' {
        return None;
    }
    let (month, day) = (number(&rest[1..3])?, number(&rest[4..6])?);
    let (hour, minute, second, micros) =
        (number(&rest[7..9])?, number(&rest[10..12])?, number(&rest[13..15])?, number(&rest[16..22])?);
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
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month, day).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
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

    fn text(us: i64) -> String {
        let mut out = Vec::new();
        write_time(&mut out, us);
        String::from_utf8(out).unwrap()
    }

    /// Years 0000 to 9999, the common case.
    const FOUR_DIGIT_YEARS: std::ops::Range<i64> = -62_167_219_200_000_000..253_402_300_800_000_000;

    /// Every `i64`, with weight on the edges.
    fn time_us() -> impl Strategy<Value = i64> {
        let pg_min = PG_TIMESTAMP_MIN + PG_EPOCH_UNIX_US;
        prop_oneof![
            any::<i64>(),
            pg_min..=i64::MAX,
            FOUR_DIGIT_YEARS,
            prop::sample::select(vec![
                i64::MIN,
                i64::MAX,
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
        #![proptest_config(crate::types::strategies::config(2048))]

        #[test]
        fn every_instant_reads_back_and_matches_chrono_where_it_has_a_form(us in time_us()) {
            let t = text(us);
            prop_assert_eq!(parse_time_fast(t.as_bytes()), Some(us), "{}", t);
            if let Some(c) = DateTime::from_timestamp_micros(us) {
                prop_assert_eq!(c.to_rfc3339_opts(SecondsFormat::Micros, true), t);
            }
        }

        #[test]
        fn every_date_reads_back(days in prop_oneof![any::<i32>(), (PG_DATE_MIN + PG_EPOCH_UNIX_DAYS)..=(PG_DATE_MAX + PG_EPOCH_UNIX_DAYS)]) {
            let mut out = Vec::new();
            write_date(&mut out, days);
            prop_assert_eq!(parse_date(&out), Some(days), "{}", String::from_utf8_lossy(&out));
            if let Some(c) = chrono::NaiveDate::from_num_days_from_ce_opt(days.wrapping_add(719_163))
                && (0..=9999).contains(&chrono::Datelike::year(&c))
            {
                prop_assert_eq!(c.format("%Y-%m-%d").to_string(), String::from_utf8_lossy(&out));
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
    fn the_ends_of_postgres_and_of_int64_have_exact_forms() {
        let unix = |pg| unix_micros(pg).unwrap();
        assert_eq!(text(unix(PG_TIMESTAMP_MIN)), "-4713-11-24T00:00:00.000000Z", "4714 BC is year -4713");
        assert_eq!(text(253_402_300_800_000_000), "+10000-01-01T00:00:00.000000Z");
        assert_eq!(text(i64::MAX), "+294247-01-10T04:00:54.775807Z");
        assert_eq!(text(i64::MIN), "-290308-12-21T19:59:05.224192Z");
        assert!(unix_micros(i64::MAX).unwrap_err().contains("infinity"));
        assert!(unix_micros(i64::MIN).unwrap_err().contains("-infinity"));
        assert!(unix_micros(PG_TIMESTAMP_MAX).unwrap_err().contains("+294247-01-10T04:00:54.775807Z"));
        let date = |pg| {
            let mut out = Vec::new();
            write_date(&mut out, unix_days(pg).unwrap());
            String::from_utf8(out).unwrap()
        };
        assert_eq!(date(PG_DATE_MIN), "-4713-11-24");
        assert_eq!(date(PG_DATE_MAX), "+5874897-12-31");
        assert_eq!(date(0), "2000-01-01");
        assert!(unix_days(i32::MAX).is_err() && unix_days(i32::MIN).is_err());
        assert_eq!(parse_time("2024-05-01T14:00:00+02:00"), Some(1_714_564_800_000_000), "offsets via chrono");
    }
}
