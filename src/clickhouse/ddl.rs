//! The tables pg2ch creates in ClickHouse, and the check every start makes
//! that they are what exactly-once needs.
//!
//! A source table's ClickHouse table has its columns (see
//! [`crate::types::clickhouse`]), then `_pg2ch_version UInt64` and
//! `_pg2ch_deleted UInt8`; its engine is `ReplacingMergeTree(_pg2ch_version)`,
//! with `_pg2ch_deleted` as the engine's `is_deleted` where the server has
//! it (23.2 and later), ordered by the primary key. `pg2ch_positions` holds
//! one row per (group, topic, partition) and store; the largest
//! `next_offset` wins, so merges never lose progress.
//!
//! On a cluster (`CH_CLUSTER`) every statement runs `ON CLUSTER` and the
//! engines are the `Replicated` ones, at ZooKeeper path
//! `/clickhouse/tables/{shard}/<database>.<table>` with replica `{replica}`
//! (the servers' macros). On a cluster of several shards each source table
//! also gets `<table>_distributed`, a `Distributed` table over every shard's
//! table for reading (pg2ch writes to the shards themselves).
//!
//! Beside each source table, `<table>_current` is a view of the table as
//! PostgreSQL has it: `FINAL`, deleted keys left out, without
//! `_pg2ch_deleted` (through `<table>_distributed` on a sharded cluster).
//! `run` creates it when absent and creates it anew when columns are added.
//!
//! At start, the table is compared with PostgreSQL's: columns PostgreSQL
//! gained are added (and the caller resends the rows that hold values in
//! them); a column dropped, renamed or retyped in PostgreSQL stops the
//! table's pipeline with a line naming it; an engine that does not keep the
//! highest version is refused.

use anyhow::Context;

use super::{ClickHouse, reading_catalogue};
use crate::config::{bounded, bounded_store, ch_ident};
use crate::error::{StoreError, StoreResult};
use crate::schema::{CH_DELETED, CH_VERSION, TableSchema};
use crate::types::clickhouse::ChColumn;

/// The columns of the positions table, with their types.
const POSITIONS_COLUMNS: [(&str, &str); 5] = [
    ("consumer_group", "String"),
    ("topic", "String"),
    ("partition", "Int32"),
    ("next_offset", "UInt64"),
    ("last_record", "UInt64"),
];

/// One column as `system.columns` shows it.
#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct Existing {
    name: String,
    #[serde(rename = "type")]
    ty: String,
}

/// The name of the `Distributed` table over a source table's shards.
pub fn distributed(name: &str) -> String {
    format!("{name}_distributed")
}

/// The name of the view of a source table's current rows.
pub fn current(name: &str) -> String {
    format!("{name}_current")
}

/// A string literal for ClickHouse SQL.
fn ch_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn definition(c: &ChColumn) -> String {
    match &c.materialized {
        Some(expr) => format!("{} {} MATERIALIZED {expr}", ch_ident(&c.name), c.ty),
        None => format!("{} {}", ch_ident(&c.name), c.ty),
    }
}

impl ClickHouse {
    /// The database, quoted.
    pub fn db(&self) -> String {
        ch_ident(&self.database)
    }

    /// A table of the database, quoted.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{}", self.db(), ch_ident(name))
    }

    /// The table to read a source table's rows from: on a sharded cluster
    /// the `Distributed` table over every shard, else the table itself.
    pub fn readable(&self, name: &str) -> String {
        if self.sharded() { self.table(&distributed(name)) } else { self.table(name) }
    }

    /// The engine `engine(args)`, replicated on a cluster.
    fn engine_of(&self, table: &str, engine: &str, args: &str) -> String {
        match &self.cluster {
            None => format!("{engine}({args})"),
            Some(_) => {
                let path = format!("/clickhouse/tables/{{shard}}/{}.{table}", self.database);
                format!("Replicated{engine}({}, '{{replica}}', {args})", ch_literal(&path))
            }
        }
    }

    /// Creates the database and the positions table if absent.
    pub async fn init(&self) -> anyhow::Result<()> {
        let db = self.db();
        let create_db = format!("CREATE DATABASE IF NOT EXISTS {db}{}", self.on_cluster());
        bounded_store(|| "ClickHouse: create database".into(), self.timeout, async {
            Ok(self.client.clone().with_database("default").query(&create_db).execute().await?)
        })
        .await
        .with_context(|| format!("ClickHouse: creating database {db}"))?;
        self.run(
            "create table pg2ch_positions",
            &format!(
                "CREATE TABLE IF NOT EXISTS {}{} (
                    consumer_group String,
                    topic String,
                    partition Int32,
                    next_offset UInt64,
                    last_record UInt64
                ) ENGINE = {} ORDER BY (consumer_group, topic, partition)",
                self.table("pg2ch_positions"),
                self.on_cluster(),
                self.engine_of("pg2ch_positions", "ReplacingMergeTree", "next_offset")
            ),
        )
        .await?;
        // Tables made by an earlier pg2ch lack the fingerprint.
        let columns = self.columns("pg2ch_positions").await?;
        if !columns.iter().any(|c| c.name == "last_record") {
            self.run(
                "add last_record to pg2ch_positions",
                &format!(
                    "ALTER TABLE {}{} ADD COLUMN last_record UInt64",
                    self.table("pg2ch_positions"),
                    self.on_cluster()
                ),
            )
            .await?;
        }
        self.check_positions().await
    }

    /// Creates the table of `schema` if absent.
    pub async fn create_table(&self, schema: &TableSchema) -> anyhow::Result<()> {
        let columns: Vec<String> = schema.ch_columns(&self.caps).iter().map(definition).collect();
        let args = if self.caps.is_deleted {
            format!("{}, {}", ch_ident(CH_VERSION), ch_ident(CH_DELETED))
        } else {
            ch_ident(CH_VERSION)
        };
        let engine = self.engine_of(&schema.name, "ReplacingMergeTree", &args);
        self.run(
            &format!("create table {}", schema.name),
            &format!(
                "CREATE TABLE IF NOT EXISTS {}{} ({}) ENGINE = {engine} ORDER BY {}",
                self.table(&schema.name),
                self.on_cluster(),
                columns.join(", "),
                schema.ch_order_by()
            ),
        )
        .await?;
        self.create_distributed(schema, false).await?;
        self.create_current(schema, false).await
    }

    /// Creates `<table>_current`, the view of the table's current rows, if
    /// absent (anew with `replace`, after columns were added: a view's
    /// columns are fixed when it is created). Refuses, naming it, a table
    /// of that name that is not a view.
    async fn create_current(&self, schema: &TableSchema, replace: bool) -> anyhow::Result<()> {
        let name = current(&schema.name);
        // 18.16 has no `CREATE OR REPLACE VIEW`: when columns are added,
        // queries of the view fail from its drop until it is created again,
        // a moment later.
        if !self.make_way(schema, &name, "View", replace).await? {
            return Ok(());
        }
        let columns: Vec<String> =
            schema.ch_columns(&self.caps).iter().filter(|c| c.name != CH_DELETED).map(|c| ch_ident(&c.name)).collect();
        // `WHERE` after `FINAL`, not `PREWHERE`: the filter must see each
        // key's newest version only, or an older live one would show.
        self.run(
            &format!("create view {name}"),
            &format!(
                "CREATE VIEW IF NOT EXISTS {}{} AS SELECT {} FROM {} FINAL WHERE {} = 0",
                self.table(&name),
                self.on_cluster(),
                columns.join(", "),
                self.readable(&schema.name),
                ch_ident(CH_DELETED)
            ),
        )
        .await
    }

    /// Whether `name`, a table pg2ch keeps for reading `schema`'s table
    /// (of engine `engine`), is to be created: when it is absent, or when
    /// `replace` (then it is dropped first). Refuses, naming it, a table of
    /// that name with another engine: it is not pg2ch's to drop.
    async fn make_way(&self, schema: &TableSchema, name: &str, engine: &str, replace: bool) -> anyhow::Result<bool> {
        match self.engine(name).await? {
            None => Ok(true),
            Some((found, _)) if found != engine => Err(StoreError::permanent(format!(
                "ClickHouse table {}.{name} is a {found}, not the {engine} pg2ch keeps there for reading {schema}; \
                 rename that table",
                self.database
            ))
            .into()),
            Some(_) if !replace => Ok(false),
            Some(_) => {
                self.run(
                    &format!("drop {name}"),
                    &format!("DROP TABLE IF EXISTS {}{}", self.table(name), self.on_cluster()),
                )
                .await?;
                Ok(true)
            }
        }
    }

    /// On a sharded cluster, creates `<table>_distributed` for reading
    /// (anew with `replace`, after columns were added: 18.16 cannot alter a
    /// table that is not replicated `ON CLUSTER` when the shards are). Its
    /// columns are all plain: 18.16 computes a `MATERIALIZED` column of a
    /// `Distributed` table itself, from columns it does not read.
    async fn create_distributed(&self, schema: &TableSchema, replace: bool) -> anyhow::Result<()> {
        let Some(cluster) = self.cluster.as_ref().filter(|_| self.sharded()) else { return Ok(()) };
        let name = distributed(&schema.name);
        if !self.make_way(schema, &name, "Distributed", replace).await? {
            return Ok(());
        }
        let columns: Vec<String> =
            schema.ch_columns(&self.caps).iter().map(|c| format!("{} {}", ch_ident(&c.name), c.ty)).collect();
        // For reading only: without a sharding key ClickHouse refuses
        // inserts into it, which would bypass pg2ch's routing.
        self.run(
            &format!("create table {name}"),
            &format!(
                "CREATE TABLE IF NOT EXISTS {}{} ({}) ENGINE = Distributed({}, {}, {})",
                self.table(&name),
                self.on_cluster(),
                columns.join(", "),
                ch_ident(&cluster.name),
                self.db(),
                ch_ident(&schema.name)
            ),
        )
        .await
    }

    /// The columns of a table of ours, with their types.
    async fn columns(&self, table: &str) -> StoreResult<Vec<Existing>> {
        bounded(|| format!("ClickHouse: reading the columns of {table}"), self.timeout, async {
            // Asked from `default`: the configured database may not exist.
            reading_catalogue(|| {
                self.client
                    .clone()
                    .with_database("default")
                    .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
                    .bind(self.database.as_str())
                    .bind(table)
                    .fetch_all::<Existing>()
            })
            .await
        })
        .await
    }

    /// The table's engine, by name and in full, if the table exists.
    async fn engine(&self, table: &str) -> StoreResult<Option<(String, String)>> {
        bounded(|| "ClickHouse: reading a table's engine".into(), self.timeout, async {
            reading_catalogue(|| {
                self.client
                    .clone()
                    .with_database("default")
                    .query("SELECT engine, engine_full FROM system.tables WHERE database = ? AND name = ?")
                    .bind(self.database.as_str())
                    .bind(table)
                    .fetch_optional::<(String, String)>()
            })
            .await
        })
        .await
    }

    /// Fails, naming what is wrong, unless the positions table collapses
    /// copies by key and has the expected columns.
    pub async fn check_positions(&self) -> anyhow::Result<()> {
        let table = "pg2ch_positions";
        let db = &self.database;
        let Some((engine, _)) = self.engine(table).await? else {
            return Err(StoreError::permanent(format!(
                "ClickHouse table {db}.{table} does not exist (run `pg2ch init`)"
            ))
            .into());
        };
        if !matches!(engine.as_str(), "ReplacingMergeTree" | "ReplicatedReplacingMergeTree") {
            return Err(StoreError::permanent(format!(
                "ClickHouse table {db}.{table} has engine {engine}, which does not collapse copies by key; \
                 pg2ch needs a ReplacingMergeTree (drop it and run `pg2ch init`)"
            ))
            .into());
        }
        let columns = self.columns(table).await?;
        for (name, ty) in POSITIONS_COLUMNS {
            match columns.iter().find(|c| c.name == name) {
                Some(c) if c.ty == ty => {}
                Some(c) => {
                    return Err(StoreError::permanent(format!(
                        "ClickHouse column {db}.{table}.{name} has type {}, pg2ch writes {ty}",
                        c.ty
                    ))
                    .into());
                }
                None => {
                    let hint = if name == "last_record" { " (run `pg2ch init`)" } else { "" };
                    return Err(StoreError::permanent(format!(
                        "ClickHouse table {db}.{table} lacks column {name}{hint}"
                    ))
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Compares the table of `schema` with what pg2ch writes: adds the
    /// columns of PostgreSQL columns it lacks (returning those PostgreSQL
    /// columns), and fails, naming the column, on any other difference.
    pub async fn sync_table(&self, schema: &TableSchema) -> anyhow::Result<Vec<String>> {
        self.compare_table(schema, true).await
    }

    /// Whether the table exists in ClickHouse.
    pub async fn table_exists(&self, schema: &TableSchema) -> anyhow::Result<bool> {
        Ok(self.engine(&schema.name).await?.is_some())
    }

    /// [`sync_table`](Self::sync_table) without changing anything: a
    /// column still to be added is an error too.
    pub async fn check_table(&self, schema: &TableSchema) -> anyhow::Result<()> {
        self.compare_table(schema, false).await.map(|_| ())
    }

    /// Fails, naming the table, unless it exists and keeps one row per key,
    /// the highest `_pg2ch_version` (its columns are not compared: see
    /// [`check_table`](Self::check_table)).
    pub async fn check_engine(&self, schema: &TableSchema) -> anyhow::Result<()> {
        let name = &schema.name;
        let db = &self.database;
        let Some((engine, full)) = self.engine(name).await? else {
            return Err(StoreError::permanent(format!(
                "ClickHouse table {db}.{name} does not exist (run `pg2ch init --table {schema}`)"
            ))
            .into());
        };
        if !matches!(engine.as_str(), "ReplacingMergeTree" | "ReplicatedReplacingMergeTree") {
            return Err(StoreError::permanent(format!(
                "ClickHouse table {db}.{name} has engine {engine}, which does not keep one row per key; \
                 pg2ch needs a ReplacingMergeTree (drop it and run `pg2ch init`)"
            ))
            .into());
        }
        if !full.contains(CH_VERSION) {
            return Err(StoreError::permanent(format!(
                "ClickHouse table {db}.{name} keeps the last row inserted, not the highest {CH_VERSION} (it was \
                 made by an older pg2ch): updates could go back in time; create it anew (rename it, run `pg2ch init`, \
                 and `verify --repair`)"
            ))
            .into());
        }
        Ok(())
    }

    async fn compare_table(&self, schema: &TableSchema, add: bool) -> anyhow::Result<Vec<String>> {
        let name = &schema.name;
        let db = &self.database;
        self.check_engine(schema).await?;
        let existing = self.columns(name).await?;
        // Every check first; columns are added only when all pass.
        let mut to_add: Vec<(String, Vec<ChColumn>)> = Vec::new();
        let mut expected: Vec<ChColumn> = Vec::new();
        for column in &schema.columns {
            let derived = crate::types::clickhouse::columns(&column.name, &column.ty, column.nullable, &self.caps);
            if derived.iter().all(|d| !existing.iter().any(|e| e.name == d.name)) {
                to_add.push((column.name.clone(), derived));
            } else {
                expected.extend(derived);
            }
        }
        expected.push(ChColumn { name: CH_VERSION.into(), ty: "UInt64".into(), materialized: None });
        expected.push(ChColumn { name: CH_DELETED.into(), ty: "UInt8".into(), materialized: None });
        if let Some(x) = expected.iter().find(|x| !existing.iter().any(|e| e.name == x.name)) {
            return Err(StoreError::permanent(format!(
                "ClickHouse table {db}.{name} lacks column {} (of type {}), which pg2ch writes; create the column or \
                 the table anew",
                x.name, x.ty
            ))
            .into());
        }
        for e in &existing {
            match expected.iter().find(|x| x.name == e.name) {
                Some(x) if x.ty == e.ty => {}
                Some(x) => {
                    return Err(StoreError::permanent(format!(
                        "ClickHouse column {db}.{name}.{} is {}, but its PostgreSQL column now needs {}: the column's \
                         type or nullability changed in PostgreSQL; pg2ch stops rather than rewrite it",
                        e.name, e.ty, x.ty
                    ))
                    .into());
                }
                None => {
                    return Err(StoreError::permanent(format!(
                        "ClickHouse column {db}.{name}.{} matches no column of PostgreSQL table {schema}: the column \
                         was dropped or renamed in PostgreSQL; pg2ch stops rather than guess",
                        e.name
                    ))
                    .into());
                }
            }
        }
        if let (false, Some((column, _))) = (add, to_add.first()) {
            return Err(StoreError::permanent(format!(
                "ClickHouse table {db}.{name} has no column for PostgreSQL column {column:?} yet (run `pg2ch init \
                 --table {schema}`, or start `pg2ch run`, which add it)"
            ))
            .into());
        }
        let mut added = Vec::new();
        for (column, derived) in to_add {
            for d in &derived {
                self.run(
                    &format!("add column {} to {name}", d.name),
                    &format!("ALTER TABLE {}{} ADD COLUMN {}", self.table(name), self.on_cluster(), definition(d)),
                )
                .await?;
            }
            tracing::info!("{schema}: added column {column} to ClickHouse {db}.{name}");
            added.push(column);
        }
        if !added.is_empty() {
            self.create_distributed(schema, true).await?;
        }
        self.create_current(schema, !added.is_empty()).await?;
        Ok(added)
    }
}
