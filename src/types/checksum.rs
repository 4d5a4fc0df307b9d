//! Each type's checksum, as PostgreSQL computes it on the server ([`sql`])
//! and as pg2ch computes it for a value read back from ClickHouse ([`hash`]).
//!
//! Built on PostgreSQL's own 64-bit hash functions, which pg2ch reproduces
//! bit for bit (lookup3's `hash_bytes` family, at the end of this file): integers and booleans through
//! `hashint8extended`, floats through `hashfloat8extended` (every NaN alike,
//! zero hashing to the seed), times through `timestamp_hash_extended`, a
//! date as its day number, a UUID through `uuid_hash_extended`, and every
//! type carried as PostgreSQL's text through `hashtextextended` of that text
//! in the `C` collation (`bytea` as its hex). An array hashes the text
//! `h1,h2,...` of its elements' hashes (`n` for a NULL element). A NULL
//! value has no hash (the row chain marks it, see [`crate::checksum`]).

use super::{PgType, Value};

/// PostgreSQL's epoch, from which a time is counted in microseconds.
const EPOCH: &str = "timestamptz '2000-01-01 00:00:00+00'";

/// The SQL expression hashing `v` (an SQL expression of type `ty`) with
/// `seed` (an SQL `bigint` expression); NULL when `v` is NULL.
pub fn sql(ty: &PgType, v: &str, seed: &str) -> String {
    match ty {
        PgType::Bool => format!("hashint8extended(({v})::int::int8, {seed})"),
        PgType::Int2 | PgType::Int4 | PgType::Int8 => format!("hashint8extended(({v})::int8, {seed})"),
        PgType::Float4 | PgType::Float8 => format!("hashfloat8extended(({v})::float8, {seed})"),
        PgType::Bytea => format!("hashtextextended(encode({v}, 'hex'), {seed})"),
        PgType::Uuid => format!("uuid_hash_extended({v}, {seed})"),
        PgType::Date => {
            format!("CASE WHEN isfinite({v}) THEN hashint8extended(({v} - DATE '2000-01-01')::int8, {seed}) END")
        }
        PgType::Timestamp => format!("timestamp_hash_extended({v}, {seed})"),
        // The same hash without converting to `timestamp` (a time zone
        // lookup per row, a third of a `timestamptz` column's checksum
        // time): an interval hashes as its length in microseconds through
        // `hashint8extended`, as a timestamp does, and the difference from
        // 2000-01-01 UTC is that length; the infinities, which cannot be
        // subtracted, as the largest and smallest ones.
        PgType::Timestamptz => format!(
            "interval_hash_extended(CASE WHEN isfinite({v}) THEN {v} - {EPOCH} WHEN {v} > {EPOCH} \
             THEN interval '9223372036854775807 microseconds' WHEN {v} < {EPOCH} \
             THEN interval '-9223372036854775808 microseconds' END, {seed})"
        ),
        // concat() writes a char(n) with its padding, as it is carried.
        PgType::Bpchar => format!("hashtextextended(concat({v}) COLLATE \"C\", {seed})"),
        PgType::Array(element) => {
            let each = sql(element, "pg2ch_x.e", "0");
            format!(
                "CASE WHEN {v} IS NOT NULL THEN hashtextextended(array_to_string(ARRAY(\
                 SELECT coalesce(({each})::text, 'n') FROM unnest({v}) WITH ORDINALITY AS pg2ch_x(e, i) ORDER BY pg2ch_x.i), ','), \
                 {seed}) END"
            )
        }
        _ => format!("hashtextextended(({v})::text COLLATE \"C\", {seed})"),
    }
}

/// The twin of [`sql`] for a value; `None` where the SQL gives NULL.
pub fn hash(ty: &PgType, value: &Value, seed: u64) -> Option<u64> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => hash_int8(i64::from(*b), seed),
        Value::Int(i) => hash_int8(*i, seed),
        Value::Float4(x) => hash_float8(f64::from(*x), seed),
        Value::Float8(x) => hash_float8(*x, seed),
        Value::Numeric(s) | Value::Text(s) => hash_bytes(s.as_bytes(), seed),
        Value::BadText(b) => hash_bytes(b, seed),
        Value::Bytea(b) => hash_bytes(super::hex(b).as_bytes(), seed),
        Value::Uuid(u) => hash_bytes(u, seed),
        Value::Date(d) if *d == i32::MAX || *d == i32::MIN => return None,
        Value::Date(d) => hash_int8(i64::from(*d), seed),
        Value::Timestamp(us) => hash_int8(*us, seed),
        Value::Array(a) => {
            let element = ty.element().unwrap_or(ty);
            let text: Vec<String> = a
                .elements
                .iter()
                .map(|e| hash(element, e, 0).map_or_else(|| "n".to_owned(), |h| (h as i64).to_string()))
                .collect();
            hash_bytes(text.join(",").as_bytes(), seed)
        }
    })
}

/// `hashfloat8extended`: zero (either sign) hashes to the seed itself, every
/// NaN as one NaN, any other value as its 8 bytes.
pub fn hash_float8(x: f64, seed: u64) -> u64 {
    if x == 0.0 {
        return seed;
    }
    let x = if x.is_nan() { f64::NAN } else { x };
    hash_bytes(&x.to_le_bytes(), seed)
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
