//! Each type's checksum, as PostgreSQL computes it on the server ([`sql`])
//! and as pg2ch computes it for a value read back from ClickHouse ([`hash`]).
//!
//! Built on PostgreSQL's own 64-bit hash functions, which pg2ch reproduces
//! bit for bit ([`crate::checksum`]): integers and booleans through
//! `hashint8extended`, floats through `hashfloat8extended` (every NaN alike,
//! zero hashing to the seed), times through `timestamp_hash_extended`, a
//! date as its day number, a UUID through `uuid_hash_extended`, and every
//! type carried as PostgreSQL's text through `hashtextextended` of that text
//! in the `C` collation (`bytea` as its hex). An array hashes the text
//! `h1,h2,...` of its elements' hashes (`n` for a NULL element). A NULL
//! value has no hash (the row chain marks it, see [`crate::checksum`]).

use super::{PgType, Value};
use crate::checksum::{hash_bytes, hash_float8, hash_int8};

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
