//! What travels: a change to one row of a table (its new content, or its
//! deletion), with the version ClickHouse orders changes of a key by, and
//! its form on the topic.
//!
//! The message value is a JSON object with every column of the row, then
//! pg2ch's two fields, so that other consumers can read the topic without pg2ch:
//!
//! ```json
//! {"id":42,"username":"alice","event_time":"2024-05-01T12:00:00.123456Z","_pg2ch_version":7,"_pg2ch_deleted":false}
//! ```
//!
//! A deletion carries the key's columns only, and `"_pg2ch_deleted":true`.
//! Each column's JSON form is in [`crate::types::json`]. The message key is
//! the primary key's JSON: `42` for one column, `[42,"a"]` for several. A
//! single integer key goes to partition `key mod N`, as `user_logins`
//! always did; any other key to Kafka's default partition for its bytes
//! (`murmur2(key) mod N`), so another Kafka producer puts it in the same place.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};

use crate::schema::{CH_DELETED, CH_VERSION, TableSchema};
use crate::types::json::{self, ValueSeed};
use crate::types::{Key, KeyPart, Value};

/// A change to one row: its content and version, or its deletion.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// One value per column of the table; for a deletion, NULL outside the key.
    pub values: Vec<Value>,
    /// Changes of a key are ordered by version: the highest is the row's state.
    pub version: u64,
    pub deleted: bool,
}

impl Change {
    pub fn upsert(values: Vec<Value>, version: u64) -> Self {
        Change { values, version, deleted: false }
    }

    /// The deletion of `key` (values of the key's columns, in key order).
    pub fn delete(schema: &TableSchema, key: Vec<Value>, version: u64) -> Self {
        let mut values = vec![Value::Null; schema.columns.len()];
        for (i, v) in schema.key.iter().zip(key) {
            values[*i] = v;
        }
        Change { values, version, deleted: true }
    }

    pub fn key(&self, schema: &TableSchema) -> Key {
        schema.key_of(&self.values)
    }
}

/// The largest message value pg2ch publishes: under Kafka's default
/// `max.message.bytes` (1 MiB) with room for the batch framing, so no broker
/// tuning is needed. A row whose message would be larger is rejected.
pub const MAX_MESSAGE_BYTES: usize = 900_000;

/// The size a message of `len` bytes carrying `version` counts as against
/// [`MAX_MESSAGE_BYTES`] (see [`oversize`]).
pub fn counted_len(len: usize, version: u64) -> usize {
    let digits = version.checked_ilog10().map_or(1, |d| d as usize + 1);
    len - digits.min(len) + 20
}

/// Why a message value carrying `version` is too large to publish, if it
/// is. The version is counted as if it had all 20 digits a `u64` may have,
/// so whether a row fits never depends on which claim's version it gets
/// (a row one byte under the limit as version 9 would be over as version 10).
pub fn oversize(value: &[u8], version: u64) -> Option<String> {
    let counted = counted_len(value.len(), version);
    (counted > MAX_MESSAGE_BYTES).then(|| {
        format!("its message would be {counted} bytes (its version counted as 20 digits), over the {MAX_MESSAGE_BYTES}-byte limit")
    })
}

/// The message key: the primary key's JSON.
pub fn key_bytes(schema: &TableSchema, change: &Change) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    let several = schema.key.len() > 1;
    if several {
        out.push(b'[');
    }
    for (n, i) in schema.key.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        json::write(&mut out, &schema.columns[*i].ty, &change.values[*i]);
    }
    if several {
        out.push(b']');
    }
    out
}

/// The message value (see the module comment).
pub fn encode(schema: &TableSchema, change: &Change) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 24 * change.values.len());
    out.push(b'{');
    let mut first = true;
    for (i, (column, value)) in schema.columns.iter().zip(&change.values).enumerate() {
        if change.deleted && !schema.key.contains(&i) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        json::string(&mut out, &column.name);
        out.push(b':');
        json::write(&mut out, &column.ty, value);
    }
    if !first {
        out.push(b',');
    }
    out.extend_from_slice(b"\"");
    out.extend_from_slice(CH_VERSION.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(itoa::Buffer::new().format(change.version).as_bytes());
    out.extend_from_slice(b",\"");
    out.extend_from_slice(CH_DELETED.as_bytes());
    out.extend_from_slice(if change.deleted { b"\":true}" } else { b"\":false}" });
    out
}

/// Which partition a change goes to (see the module comment).
pub fn partition_for(schema: &TableSchema, key: &Key, key_bytes: &[u8], partitions: i32) -> i32 {
    match (schema.integer_key(), key.as_slice()) {
        (true, [KeyPart::Int(id)]) => id.rem_euclid(i64::from(partitions)) as i32,
        _ => ((murmur2(key_bytes) & 0x7fff_ffff) % partitions as u32) as i32,
    }
}

/// Kafka's `murmur2`, as its default partitioner applies it to a record's key.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// Why a message value could not be read as a change of the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty or null message value")]
    Empty,
    #[error("not a change of {table}: {why}")]
    Json { table: String, why: String },
    /// A column the table does not have: the source table gained a column
    /// that this process does not know yet. Not the record's fault.
    #[error(
        "a record has column {column:?}, which {table} has no ClickHouse column for: the PostgreSQL table gained a \
         column; restart pg2ch (it adds the column to ClickHouse at start)"
    )]
    UnknownColumn { table: String, column: String },
}

/// Reads a message value written by [`encode`] (or by anyone following the
/// documented format). A column missing from the message is NULL if the
/// column admits NULL (a message written before the column existed), else
/// the message is refused; a deletion needs its key only.
pub fn decode(schema: &TableSchema, value: Option<&[u8]>) -> Result<Change, DecodeError> {
    let bytes = match value {
        None | Some([]) => return Err(DecodeError::Empty),
        Some(b) => b,
    };
    let json_error = |why: String| DecodeError::Json { table: schema.to_string(), why };
    let mut d = serde_json::Deserializer::from_slice(bytes);
    let fields = MessageSeed(schema).deserialize(&mut d).map_err(|e| json_error(e.to_string()))?;
    d.end().map_err(|e| json_error(e.to_string()))?;
    if let Some(column) = fields.unknown.first() {
        // A change of this table in every other way, with a column more:
        // the table grew. Anything else with a foreign field is not ours.
        let whole = fields.version.is_some() && schema.key.iter().all(|&i| fields.seen[i]);
        return Err(if whole {
            DecodeError::UnknownColumn { table: schema.to_string(), column: column.clone() }
        } else {
            json_error(format!("unknown field {column:?}"))
        });
    }
    let Fields { mut values, seen, version, deleted, .. } = fields;
    for (i, column) in schema.columns.iter().enumerate() {
        let in_key = schema.key.contains(&i);
        if deleted && !in_key {
            values[i] = Value::Null;
            continue;
        }
        let required = !column.nullable || in_key;
        if !seen[i] && required {
            return Err(json_error(format!("column {:?} is missing", column.name)));
        }
        if values[i].is_null() && required {
            return Err(json_error(format!("column {:?} is null", column.name)));
        }
        if let Err(why) = crate::types::check(&column.ty, &values[i]) {
            return Err(json_error(format!("column {:?} {why}", column.name)));
        }
    }
    Ok(Change { values, version: version.unwrap_or(0), deleted })
}

struct MessageSeed<'a>(&'a TableSchema);

struct Fields {
    values: Vec<Value>,
    /// Which columns the message named, by index.
    seen: Vec<bool>,
    version: Option<u64>,
    deleted: bool,
    /// Fields that name no column of the table.
    unknown: Vec<String>,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = Fields;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a JSON object with the columns of {}", self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let schema = self.0;
        let mut fields = Fields {
            values: vec![Value::Null; schema.columns.len()],
            seen: vec![false; schema.columns.len()],
            version: None,
            deleted: false,
            unknown: Vec::new(),
        };
        // `encode` writes the columns in the table's order: the column after
        // the last one read is tried first, before the lookup by name.
        let mut next = 0;
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if name == CH_VERSION {
                fields.version = Some(map.next_value()?);
            } else if name == CH_DELETED {
                fields.deleted = map.next_value()?;
            } else if let Some(i) =
                schema.columns.get(next).filter(|c| c.name == name).map(|_| next).or_else(|| schema.column_index(&name))
            {
                if std::mem::replace(&mut fields.seen[i], true) {
                    return Err(de::Error::custom(format!("column {name:?} appears twice")));
                }
                next = i + 1;
                fields.values[i] = map.next_value_seed(ValueSeed(&schema.columns[i].ty))?;
            } else {
                map.next_value::<de::IgnoredAny>()?;
                fields.unknown.push(name.into_owned());
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::schema::Column;
    use crate::types::strategies;
    use proptest::prelude::*;

    pub fn logins() -> TableSchema {
        TableSchema::user_logins()
    }

    /// Any table shape: 1 to 3 key columns of key types, 0 to 6 other
    /// columns of any type, nullable or not, with names that need quoting.
    pub fn table() -> impl Strategy<Value = TableSchema> {
        let key = proptest::collection::vec(strategies::key_type(), 1..=3);
        let others = proptest::collection::vec((strategies::pg_type(), any::<bool>()), 0..=6);
        (key, others, any::<bool>()).prop_map(|(key, others, odd_names)| {
            let name = |i: usize| if odd_names { format!("Col \"{i}\" `é`") } else { format!("c{i}") };
            let mut columns = Vec::new();
            for (i, ty) in key.iter().enumerate() {
                columns.push(Column { name: name(i), ty: ty.clone(), nullable: false });
            }
            for (j, (ty, nullable)) in others.into_iter().enumerate() {
                columns.push(Column { name: name(key.len() + j), ty, nullable });
            }
            TableSchema::new("public", "t", columns, (0..key.len()).collect())
        })
    }

    /// A table and a row of it (whole-domain values, NULLs where admitted).
    pub fn table_and_row() -> impl Strategy<Value = (TableSchema, Vec<Value>)> {
        table().prop_flat_map(|t| {
            let values: Vec<_> = t.columns.iter().map(|c| strategies::value_of(&c.ty, c.nullable)).collect();
            (Just(t), values)
        })
    }

    proptest! {
        #![proptest_config(crate::types::strategies::config(2048))]

        /// A row every column of which travels reads back exactly, as an
        /// upsert and as a deletion of its key.
        #[test]
        fn every_change_reads_back_exactly((table, values) in table_and_row(), version in any::<u64>()) {
            let travels = table.columns.iter().zip(&values).all(|(c, v)| crate::types::check(&c.ty, v).is_ok());
            prop_assume!(travels);
            let change = Change::upsert(values, version);
            prop_assert_eq!(decode(&table, Some(&encode(&table, &change))).unwrap(), change.clone());
            let key: Vec<Value> = table.key.iter().map(|i| change.values[*i].clone()).collect();
            let gone = Change::delete(&table, key, version);
            prop_assert_eq!(decode(&table, Some(&encode(&table, &gone))).unwrap(), gone);
            let p = partition_for(&table, &change.key(&table), &key_bytes(&table, &change), 7);
            prop_assert!((0..7).contains(&p));
        }
    }

    #[test]
    fn user_logins_keeps_its_message_format() {
        let s = logins();
        let c = Change::upsert(
            vec![
                Value::Int(42),
                Value::Text("alice".into()),
                Value::Timestamp(1_714_564_800_123_456 - 946_684_800_000_000),
            ],
            7,
        );
        let text = String::from_utf8(encode(&s, &c)).unwrap();
        assert_eq!(
            text,
            r#"{"id":42,"username":"alice","event_time":"2024-05-01T12:00:00.123456Z","_pg2ch_version":7,"_pg2ch_deleted":false}"#
        );
        assert_eq!(key_bytes(&s, &c), b"42");
        assert_eq!(partition_for(&s, &c.key(&s), b"42", 4), 2);
        assert_eq!(partition_for(&s, &vec![KeyPart::Int(-7)], b"-7", 4), 1, "never negative");
        // A message an older pg2ch wrote, without version: version 0.
        let old = br#"{"id":1,"username":"a","event_time":"2024-01-01T00:00:00.000000Z"}"#;
        assert_eq!(decode(&s, Some(old)).unwrap().version, 0);
        let gone = Change::delete(&s, vec![Value::Int(42)], 9);
        assert_eq!(
            String::from_utf8(encode(&s, &gone)).unwrap(),
            r#"{"id":42,"_pg2ch_version":9,"_pg2ch_deleted":true}"#
        );
    }

    #[test]
    fn fields_in_any_order_read_alike_and_a_repeated_column_is_refused() {
        let s = logins();
        let in_order = br#"{"id":1,"username":"a","event_time":"2024-01-01T00:00:00.000000Z","_pg2ch_version":3}"#;
        let shuffled = br#"{"_pg2ch_version":3,"event_time":"2024-01-01T00:00:00.000000Z","username":"a","id":1}"#;
        assert_eq!(decode(&s, Some(shuffled)).unwrap(), decode(&s, Some(in_order)).unwrap());
        for twice in [
            &br#"{"id":1,"id":2,"username":"a","event_time":"2024-01-01T00:00:00.000000Z"}"#[..],
            br#"{"id":1,"username":"a","event_time":"2024-01-01T00:00:00.000000Z","username":"b"}"#,
            br#"{"username":"a","id":1,"username":"b","event_time":"2024-01-01T00:00:00.000000Z"}"#,
        ] {
            let e = decode(&s, Some(twice)).unwrap_err().to_string();
            assert!(e.contains("appears twice"), "{e}");
        }
    }

    #[test]
    fn kafka_murmur2_known_answers() {
        // From Kafka's UtilsTest.testMurmur2.
        for (key, want) in [
            (&b"21"[..], -973_932_308i32),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key) as i32, want, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn what_is_not_a_change_is_refused_and_a_new_column_is_named() {
        let s = logins();
        assert_eq!(decode(&s, None), Err(DecodeError::Empty));
        assert!(matches!(decode(&s, Some(b"nope")), Err(DecodeError::Json { .. })));
        let missing = br#"{"username":"a","event_time":"2024-01-01T00:00:00Z"}"#;
        assert!(matches!(decode(&s, Some(missing)), Err(DecodeError::Json { .. })));
        let bad_time = br#"{"id":1,"username":"a","event_time":"yesterday"}"#;
        assert!(matches!(decode(&s, Some(bad_time)), Err(DecodeError::Json { .. })));
        let twice = br#"{"id":1,"id":2,"username":"a","event_time":"2024-01-01T00:00:00Z"}"#;
        assert!(matches!(decode(&s, Some(twice)), Err(DecodeError::Json { .. })));
        let added = br#"{"id":1,"username":"a","event_time":"2024-01-01T00:00:00Z","country":"NZ","_pg2ch_version":3}"#;
        match decode(&s, Some(added)) {
            Err(DecodeError::UnknownColumn { column, .. }) => assert_eq!(column, "country"),
            other => panic!("{other:?}"),
        }
        let foreign = br#"{"id":"seven","nope":1}"#;
        assert!(matches!(decode(&s, Some(foreign)), Err(DecodeError::Json { .. })), "not a change: poison");
    }
}
