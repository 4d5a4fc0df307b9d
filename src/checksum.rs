//! Row checksums that PostgreSQL computes on the server and pg2ch computes
//! identically for ClickHouse's rows, so that `verify` compares key ranges
//! by a count and a sum instead of by their rows.
//!
//! PostgreSQL's own 64-bit hash functions (`hashint8extended`,
//! `timestamp_hash_extended`, `hashtextextended`, ...: Bob Jenkins' lookup3,
//! as PostgreSQL's hash indexes use it) cost about a sixth of `md5()` per row
//! there (measured over 10M rows: 1.4 s against 5.7-7.4 s, the only hash
//! ClickHouse shares with it). This module reproduces them bit for bit; each
//! type's use of them is in [`crate::types::checksum`], and a real-service
//! test compares both sides over the whole domain of every type.
//!
//! A row's checksum chains its columns in the table's order, each hash
//! seeding the next, starting from 0: a `NOT NULL` column `c` makes
//! `h = hash_c(c, h)`; a nullable one `h = hashint8extended(coalesce(hash_c(c, 0), NULL_MARK), h)`,
//! so that NULL and every value differ. For `user_logins` that is
//! `timestamp_hash_extended(event_time, hashtextextended(username, hashint8extended(id, 0)))`
//! (computed for a `timestamptz` as `interval_hash_extended` of its distance
//! from 2000-01-01 UTC: the same number, without a time zone conversion).
//! The version is not part of it: two claims of an unchanged row may leave
//! ClickHouse a higher version than the one PostgreSQL recorded, with the
//! same content (see [`crate::verify`]).
//! A range's checksum is the exact sum of its rows' checksums (PostgreSQL's
//! `sum(bigint)` is a numeric, here an `i128`), so it does not depend on row order.
//!
//! The walk coordinate `verify` splits ranges by ([`walk_sql`]) is the key
//! itself for a single integer key, else the same chain over the key's columns.

pub use crate::types::checksum::{hash_bytes, hash_float8, hash_int8};

use crate::config::pg_ident;
use crate::schema::TableSchema;
use crate::types::{self, Value};

/// What a NULL contributes to a nullable column's link of the chain.
pub const NULL_MARK: i64 = 0x7067_3263_6820_6e75; // "pg2ch nu"

/// The SQL expression of a row's checksum (bigint, never NULL), over the
/// columns of `schema` as named in its table.
pub fn row_sql(schema: &TableSchema) -> String {
    let mut h = "0".to_owned();
    for c in &schema.columns {
        let v = pg_ident(&c.name);
        h = if c.nullable {
            format!("hashint8extended(coalesce({}, {NULL_MARK}), {h})", types::checksum::sql(&c.ty, &v, "0"))
        } else {
            types::checksum::sql(&c.ty, &v, &h)
        };
    }
    format!("coalesce({h}, 0)")
}

/// The checksum of a row's values, as [`row_sql`] computes it.
pub fn row(schema: &TableSchema, values: &[Value]) -> i64 {
    let Ok(h) = row_with(schema, |i, c, seed| {
        Ok::<_, std::convert::Infallible>(types::checksum::hash(&c.ty, &values[i], seed))
    });
    h
}

/// The checksum of a row whose column `i` hashes with a seed as
/// `hash(i, column, seed)` ([`types::checksum::hash`] of its value), asked
/// once per column in order, even after the chain is already NULL: a
/// reader hashing values as it reads them must read every one.
pub fn row_with<E>(
    schema: &TableSchema,
    mut hash: impl FnMut(usize, &crate::schema::Column, u64) -> Result<Option<u64>, E>,
) -> Result<i64, E> {
    let mut h = Some(0u64);
    for (i, c) in schema.columns.iter().enumerate() {
        h = if c.nullable {
            let link = hash(i, c, 0)?.map_or(NULL_MARK, |x| x as i64);
            h.map(|h| hash_int8(link, h))
        } else {
            let x = hash(i, c, h.unwrap_or(0))?;
            h.and(x)
        };
    }
    Ok(h.map_or(0, |h| h as i64))
}

/// The SQL expression of a row's walk coordinate (bigint).
pub fn walk_sql(schema: &TableSchema) -> String {
    if schema.integer_key() {
        return format!("({})::int8", pg_ident(&schema.columns[schema.key[0]].name));
    }
    key_hash_sql(schema)
}

/// A row's walk coordinate, as [`walk_sql`] computes it.
pub fn walk(schema: &TableSchema, values: &[Value]) -> i64 {
    if schema.integer_key() {
        return values.get(schema.key[0]).map_or(0, walk_of_key);
    }
    key_hash(schema, values)
}

/// The walk coordinate of a single integer key's value.
pub fn walk_of_key(value: &Value) -> i64 {
    match value {
        Value::Int(i) => *i,
        _ => 0,
    }
}

/// The SQL expression of the hash of a row's key (bigint): the chain over
/// the key's columns.
pub fn key_hash_sql(schema: &TableSchema) -> String {
    let mut h = "0".to_owned();
    for c in schema.key_columns() {
        h = types::checksum::sql(&c.ty, &pg_ident(&c.name), &h);
    }
    format!("coalesce({h}, 0)")
}

/// The hash of a row's key, as [`key_hash_sql`] computes it.
pub fn key_hash(schema: &TableSchema, values: &[Value]) -> i64 {
    let mut h = Some(0u64);
    for i in &schema.key {
        h = h.and_then(|h| types::checksum::hash(&schema.columns[*i].ty, &values[*i], h));
    }
    h.map_or(0, |h| h as i64)
}

/// The shard (of `shards`, from 0) that owns a row: its key's hash modulo
/// the number of shards, rounded towards negative infinity so that it is
/// never negative. Deterministic by key, and computable in PostgreSQL
/// ([`shard_sql`]), so `verify` can compare one shard with its rows.
pub fn shard(schema: &TableSchema, values: &[Value], shards: usize) -> usize {
    key_hash(schema, values).rem_euclid(shards.max(1) as i64) as usize
}

/// The SQL expression of [`shard`] (bigint).
pub fn shard_sql(schema: &TableSchema, shards: usize) -> String {
    let n = shards.max(1);
    format!("((({}) % {n}) + {n}) % {n}", key_hash_sql(schema))
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
    fn user_logins_chains_its_columns_in_order() {
        let s = crate::change::tests::logins();
        let values = [Value::Int(7), Value::Text("x".into()), Value::Timestamp(123)];
        assert_eq!(row(&s, &values), hash_int8(123, hash_bytes(b"x", hash_int8(7, 0))) as i64);
        let epoch = "timestamptz '2000-01-01 00:00:00+00'";
        assert_eq!(
            row_sql(&s),
            format!(
                "coalesce(interval_hash_extended(CASE WHEN isfinite(\"event_time\") THEN \"event_time\" - {epoch} \
                 WHEN \"event_time\" > {epoch} THEN interval '9223372036854775807 microseconds' \
                 WHEN \"event_time\" < {epoch} THEN interval '-9223372036854775808 microseconds' END, \
                 hashtextextended((\"username\")::text COLLATE \"C\", hashint8extended((\"id\")::int8, 0))), 0)"
            )
        );
        assert_eq!(walk(&s, &values), 7);
        assert_eq!(walk_sql(&s), "(\"id\")::int8");
    }

    #[test]
    fn nulls_and_values_never_chain_alike() {
        let mut s = crate::change::tests::logins();
        s.columns[1].nullable = true;
        let with = |v: Value| row(&s, &[Value::Int(1), v, Value::Timestamp(0)]);
        assert_ne!(with(Value::Null), with(Value::Text(String::new())));
        assert_ne!(with(Value::Text("a".into())), with(Value::Text("b".into())));
        assert_eq!(hash_float8(-0.0, 9), 9);
        assert_eq!(hash_float8(f64::NAN, 1), hash_float8(-f64::NAN, 1));
    }

    proptest::proptest! {
        /// PostgreSQL's `%` truncates towards zero, as Rust's does: the
        /// SQL's `((h % n) + n) % n` is the shard pg2ch routes to, for any
        /// hash and shard count.
        #[test]
        fn the_shard_sql_arithmetic_is_the_routing(h in proptest::num::i64::ANY, n in 1usize..=1024) {
            let m = n as i64;
            let sql = ((h % m) + m) % m;
            proptest::prop_assert_eq!(sql, h.rem_euclid(m));
            proptest::prop_assert!((sql as usize) < n);
            let suffix = format!(" % {n}");
            proptest::prop_assert!(shard_sql(&crate::change::tests::logins(), n).ends_with(&suffix));
        }
    }

    #[test]
    fn a_key_keeps_its_shard_whatever_else_the_row_holds() {
        let s = crate::change::tests::logins();
        let a = [Value::Int(42), Value::Text("x".into()), Value::Timestamp(1)];
        let b = [Value::Int(42), Value::Text("y".into()), Value::Timestamp(2)];
        assert_eq!(shard(&s, &a, 2), shard(&s, &b, 2));
        assert_eq!(shard(&s, &a, 3), (hash_int8(42, 0) as i64).rem_euclid(3) as usize);
        let shards: std::collections::BTreeSet<usize> =
            (0..100).map(|i| shard(&s, &[Value::Int(i), Value::Null, Value::Null], 2)).collect();
        assert_eq!(shards.len(), 2, "keys spread over both shards");
    }
}
