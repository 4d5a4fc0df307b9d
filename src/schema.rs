//! A table as pg2ch carries it: its columns with their types, its primary
//! key, and what follows from them (the ClickHouse columns, the message's
//! field names, how to tell that the table changed). Read from PostgreSQL's
//! catalogue by [`crate::postgres`]; the simulation draws random ones.
//!
//! pg2ch's own columns in PostgreSQL (`sent_to_kafka`, `pg2ch_rejected`,
//! `pg2ch_version`) are not part of it. In ClickHouse every table gains
//! `_pg2ch_version UInt64` (the version of the change a row came from) and
//! `_pg2ch_deleted UInt8` (1 for a deleted key).

use std::collections::HashMap;
use std::fmt;

use crate::config::{ch_ident, pg_ident};
use crate::types::clickhouse::{Capabilities, ChColumn};
use crate::types::{self, Key, KeyPart, PgType, Value};

/// pg2ch's own columns in the source table.
pub const SENT: &str = "sent_to_kafka";
pub const REJECTED: &str = "pg2ch_rejected";
pub const VERSION: &str = "pg2ch_version";
/// When the row last changed (inserted or updated by someone other than
/// pg2ch): the age of the oldest unsent change is the producer's lag in time.
pub const CHANGED_AT: &str = "pg2ch_changed_at";
pub const OWN_COLUMNS: [&str; 4] = [SENT, REJECTED, VERSION, CHANGED_AT];

/// pg2ch's columns in every ClickHouse table, and the message's fields for them.
pub const CH_VERSION: &str = "_pg2ch_version";
pub const CH_DELETED: &str = "_pg2ch_deleted";

/// One column of the source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: PgType,
    pub nullable: bool,
}

/// A source table.
#[derive(Debug, Clone)]
pub struct TableSchema {
    /// The PostgreSQL schema (namespace) holding it.
    pub namespace: String,
    /// Its name, which is also the ClickHouse table's.
    pub name: String,
    /// Every column pg2ch carries, in PostgreSQL's order.
    pub columns: Vec<Column>,
    /// The primary key's columns, in key order (indices into `columns`).
    pub key: Vec<usize>,
    by_name: HashMap<String, usize>,
}

impl PartialEq for TableSchema {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.name, &self.columns, &self.key)
            == (&other.namespace, &other.name, &other.columns, &other.key)
    }
}

impl fmt::Display for TableSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.namespace, self.name)
    }
}

impl TableSchema {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, columns: Vec<Column>, key: Vec<usize>) -> Self {
        let by_name = columns.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
        TableSchema { namespace: namespace.into(), name: name.into(), columns, key, by_name }
    }

    /// The table's name quoted for PostgreSQL: `"public"."orders"`.
    pub fn pg_name(&self) -> String {
        format!("{}.{}", pg_ident(&self.namespace), pg_ident(&self.name))
    }

    /// The column at `name`, if the table has it.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn key_columns(&self) -> impl Iterator<Item = &Column> {
        self.key.iter().map(|i| &self.columns[*i])
    }

    /// The key of a row (or of a tombstone: only the key's values set).
    pub fn key_of(&self, values: &[Value]) -> Key {
        self.key
            .iter()
            .map(|i| {
                let c = &self.columns[*i];
                values.get(*i).and_then(|v| KeyPart::of(&c.ty, v)).unwrap_or(KeyPart::Int(0))
            })
            .collect()
    }

    /// Whether a row with these values can travel, or the reason it cannot,
    /// naming the first column that cannot: the one decision the real and
    /// the simulated source both go through ([`types::check`] per column).
    pub fn check_row(&self, values: &[Value]) -> Result<(), String> {
        for (c, v) in self.columns.iter().zip(values) {
            types::check(&c.ty, v).map_err(|why| format!("{} {why}", c.name))?;
        }
        Ok(())
    }

    /// The key of a key's values (in key order), as a deletion holds them.
    pub fn key_of_key(&self, key: &[Value]) -> Key {
        let mut values = vec![Value::Null; self.columns.len()];
        for (i, v) in self.key.iter().zip(key) {
            values[*i] = v.clone();
        }
        self.key_of(&values)
    }

    /// The key is one integer column: it is then also the verify walk's
    /// coordinate and the Kafka partition is the key modulo the count.
    pub fn integer_key(&self) -> bool {
        matches!(self.key.as_slice(), [i] if matches!(self.columns[*i].ty, PgType::Int2 | PgType::Int4 | PgType::Int8))
    }

    /// The ClickHouse columns, in the order pg2ch writes the physical ones,
    /// then pg2ch's two.
    pub fn ch_columns(&self, caps: &Capabilities) -> Vec<ChColumn> {
        let mut out: Vec<ChColumn> =
            self.columns.iter().flat_map(|c| types::clickhouse::columns(&c.name, &c.ty, c.nullable, caps)).collect();
        out.push(ChColumn { name: CH_VERSION.into(), ty: "UInt64".into(), materialized: None });
        out.push(ChColumn { name: CH_DELETED.into(), ty: "UInt8".into(), materialized: None });
        out
    }

    /// The physical ClickHouse columns (those pg2ch writes), quoted and comma-separated.
    pub fn ch_written(&self, caps: &Capabilities) -> String {
        self.ch_columns(caps)
            .iter()
            .filter(|c| c.materialized.is_none())
            .map(|c| ch_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The ClickHouse sorting key: the primary key's value columns.
    pub fn ch_order_by(&self) -> String {
        let cols: Vec<String> =
            self.key_columns().map(|c| ch_ident(&types::clickhouse::value_column(&c.name, &c.ty))).collect();
        if cols.len() == 1 { cols[0].clone() } else { format!("({})", cols.join(", ")) }
    }

    /// What must stay the same for a running pipeline to go on: every
    /// column's name, type and nullability. Compared with the catalogue at
    /// every claim.
    pub fn fingerprint(&self) -> String {
        self.columns
            .iter()
            .map(|c| format!("{}:{}:{}", c.name, c.ty, if c.nullable { "null" } else { "not null" }))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Why this table cannot be carried as it is, naming the column: a
    /// ClickHouse column pg2ch would derive that another column already
    /// names, or a name ClickHouse cannot take.
    pub fn check_names(&self) -> Result<(), String> {
        let mut seen: HashMap<String, String> = HashMap::new();
        for c in &self.columns {
            if c.name.chars().any(char::is_control) {
                return Err(format!("column {:?} of {self} has a control character in its name", c.name));
            }
            if c.name.starts_with("_pg2ch_") {
                return Err(format!("column {:?} of {self} takes a name pg2ch reserves (_pg2ch_...)", c.name));
            }
            for derived in types::clickhouse::columns(&c.name, &c.ty, c.nullable, &Capabilities::from_parts(0, 0)) {
                if let Some(other) = seen.insert(derived.name.clone(), c.name.clone()) {
                    return Err(format!(
                        "columns {other:?} and {:?} of {self} would both be ClickHouse column {:?} \
                         (a date is carried as <name>_days, a timestamp as <name>_us, a nullable array adds <name>_null); \
                         rename one",
                        c.name, derived.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The default table, which `init` creates when it does not exist and `seed` fills.
pub const DEFAULT_TABLE: &str = "user_logins";

impl TableSchema {
    /// The default table's shape, as `init` creates it in `public` (the
    /// pipeline reads it from the catalogue; benchmarks and tests build it here).
    pub fn user_logins() -> TableSchema {
        TableSchema::new(
            "public",
            DEFAULT_TABLE,
            vec![
                Column { name: "id".into(), ty: PgType::Int8, nullable: false },
                Column { name: "username".into(), ty: PgType::Text, nullable: false },
                Column { name: "event_time".into(), ty: PgType::Timestamptz, nullable: false },
            ],
            vec![0],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_logins_keeps_its_clickhouse_columns() {
        let s = crate::change::tests::logins();
        let caps = Capabilities::from_parts(18, 16);
        assert_eq!(s.ch_written(&caps), "`id`, `username`, `event_time_us`, `_pg2ch_version`, `_pg2ch_deleted`");
        assert_eq!(s.ch_order_by(), "`id`");
        assert!(s.integer_key());
        assert_eq!(s.pg_name(), "\"public\".\"user_logins\"");
    }

    #[test]
    fn derived_names_that_collide_are_refused_by_name() {
        let s = TableSchema::new(
            "public",
            "t",
            vec![
                Column { name: "at".into(), ty: PgType::Timestamp, nullable: false },
                Column { name: "at_us".into(), ty: PgType::Int8, nullable: false },
            ],
            vec![1],
        );
        let e = s.check_names().unwrap_err();
        assert!(e.contains("\"at\" and \"at_us\"") && e.contains("public.t"), "{e}");
        let reserved = TableSchema::new(
            "s",
            "t",
            vec![Column { name: "_pg2ch_x".into(), ty: PgType::Int8, nullable: false }],
            vec![0],
        );
        assert!(reserved.check_names().unwrap_err().contains("reserves"));
    }
}
