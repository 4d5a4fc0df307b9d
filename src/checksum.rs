//! Row checksums that PostgreSQL computes on the server and pg2ch computes
//! identically for ClickHouse's rows, so that `verify` compares key ranges
//! by a count and a sum instead of by their rows.
//!
//! PostgreSQL's own 64-bit hash functions (`hashint8extended`,
//! `timestamp_hash_extended`, `hashtextextended`: Bob Jenkins' lookup3, as
//! PostgreSQL's hash indexes use it) cost about a sixth of `md5()` per row
//! there (measured over 10M rows: 1.4 s against 5.7-7.4 s, the only hash
//! ClickHouse shares with it). This module reproduces them bit for bit; a
//! real-service test compares both over the whole domain of each column.
//!
//! A row's checksum chains the three, each hash seeding the next:
//! `hashtextextended(username, timestamp_hash_extended(event_time, hashint8extended(id, 0)))`,
//! and a NULL anywhere makes it 0 (the SQL's `coalesce`). A range's checksum
//! is the exact sum of its rows' checksums (PostgreSQL's `sum(bigint)` is a
//! numeric, here an `i128`), so it does not depend on row order.

use crate::event::{LoginEvent, PgTimestamp};

/// The SQL expression PostgreSQL evaluates per row (a literal, for
/// `concat!`); [`row`] is its twin. The text is hashed as its stored bytes
/// (`COLLATE "C"` keeps a non-deterministic column collation out of it), the
/// time as PostgreSQL's microseconds since 2000 (the session runs in UTC, so
/// the cast to `timestamp` keeps the value).
macro_rules! row_sql {
    () => {
        "coalesce(hashtextextended(username::text COLLATE \"C\", \
         timestamp_hash_extended(event_time::timestamptz::timestamp, hashint8extended(id::bigint, 0))), 0)"
    };
}
pub(crate) use row_sql;

/// `row_sql!()` as a value, for tests that ask PostgreSQL directly.
pub const ROW_SQL: &str = row_sql!();

/// The checksum of a row as it travels.
pub fn event(e: &LoginEvent) -> i64 {
    stored(e.id, &e.username, e.event_time_us)
}

/// The checksum of a row as ClickHouse stores it.
pub fn stored(id: i64, username: &str, event_time_us: i64) -> i64 {
    // A time ClickHouse holds is one PostgreSQL admitted, so the shift back
    // to PostgreSQL's epoch cannot overflow; wrapping keeps this total.
    let pg_time = event_time_us.wrapping_sub(PgTimestamp::EPOCH_UNIX_US);
    row(id, Some(username.as_bytes()), Some(pg_time))
}

/// The checksum of a raw row, NULLs included, as `row_sql!()` computes it.
pub fn row(id: i64, username: Option<&[u8]>, pg_time: Option<i64>) -> i64 {
    let (Some(text), Some(time)) = (username, pg_time) else { return 0 };
    let seed = hash_int8(id, 0);
    let seed = hash_int8(time, seed);
    hash_bytes(text, seed) as i64
}

/// `hashint8extended`: folds the high half into the low one (the way
/// PostgreSQL keeps int2, int4 and int8 hashes equal for equal values) and
/// hashes that word.
pub fn hash_int8(value: i64, seed: u64) -> u64 {
    let high = (value >> 32) as u32;
    let low = value as u32 ^ if value >= 0 { high } else { !high };
    let mut s = State::new(4, seed);
    s.a = s.a.wrapping_add(low);
    s.finish()
}

/// `hash_bytes_extended`, which `hashtextextended` applies to a text's bytes.
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut s = State::new(bytes.len() as u32, seed);
    let mut blocks = bytes.chunks_exact(12);
    for block in &mut blocks {
        s.a = s.a.wrapping_add(le32(&block[0..4]));
        s.b = s.b.wrapping_add(le32(&block[4..8]));
        s.c = s.c.wrapping_add(le32(&block[8..12]));
        s.mix();
    }
    // The last 0-11 bytes, zero-padded; the lowest byte of `c` stays free
    // (lookup3 reserved it for the length).
    let mut tail = [0u8; 12];
    let rest = blocks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    s.a = s.a.wrapping_add(le32(&tail[0..4]));
    s.b = s.b.wrapping_add(le32(&tail[4..8]));
    s.c = s.c.wrapping_add(le32(&tail[8..12]) << 8);
    s.finish()
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// lookup3's three-word state.
struct State {
    a: u32,
    b: u32,
    c: u32,
}

impl State {
    fn new(len: u32, seed: u64) -> Self {
        let init = 0x9e37_79b9u32.wrapping_add(len).wrapping_add(3_923_095);
        let mut s = State { a: init, b: init, c: init };
        if seed != 0 {
            // The seed counts as one more 12-byte block, its last word zero.
            s.a = s.a.wrapping_add((seed >> 32) as u32);
            s.b = s.b.wrapping_add(seed as u32);
            s.mix();
        }
        s
    }

    fn mix(&mut self) {
        let State { a, b, c } = self;
        for (r1, r2, r3) in [(4, 6, 8), (16, 19, 4)] {
            *a = a.wrapping_sub(*c) ^ c.rotate_left(r1);
            *c = c.wrapping_add(*b);
            *b = b.wrapping_sub(*a) ^ a.rotate_left(r2);
            *a = a.wrapping_add(*c);
            *c = c.wrapping_sub(*b) ^ b.rotate_left(r3);
            *b = b.wrapping_add(*a);
        }
    }

    /// The final mix; the 64-bit result is `b` above `c`.
    fn finish(mut self) -> u64 {
        let State { a, b, c } = &mut self;
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
        ((*b as u64) << 32) | *c as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers PostgreSQL 15 gave for these calls (`hashtextextended`,
    /// `hashint8extended`, `timestamp_hash_extended`); the real-service test
    /// `tests/verify.rs` compares many more, drawn at random.
    #[test]
    fn known_answers_from_postgresql() {
        let text = [
            ("", 0, -6939563903564495251),
            ("a", 0, 3591986179850072241),
            ("hello world!", 0, -2866487628948787489),
            ("hello world!!", 12345, -3983304801064706546),
            ("abcdefghijklmnopqrstuvwxyz0123456789", -1, 7822736524944875629),
        ];
        for (s, seed, want) in text {
            assert_eq!(hash_bytes(s.as_bytes(), seed as u64) as i64, want, "hashtextextended({s:?}, {seed})");
        }
        let ints = [
            (0, 0, 4154612158245552303),
            (-1, 0, -1888257769727981238),
            (i64::MAX, 7, 5674636753829501817),
            (i64::MIN, -7, -2009052510785349830),
            // timestamp_hash_extended('infinity', 0): a timestamp hashes as its microseconds.
            (i64::MAX, 0, 1977219185673256887),
        ];
        for (v, seed, want) in ints {
            assert_eq!(hash_int8(v, seed as u64) as i64, want, "hashint8extended({v}, {seed})");
        }
    }

    #[test]
    fn a_null_column_makes_the_row_checksum_zero() {
        assert_eq!(row(1, None, Some(0)), 0);
        assert_eq!(row(1, Some(b"x"), None), 0);
        assert_ne!(row(1, Some(b"x"), Some(0)), row(2, Some(b"x"), Some(0)));
    }
}
