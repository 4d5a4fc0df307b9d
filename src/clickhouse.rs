//! ClickHouse: the sink table, the consumer positions, capability detection,
//! and the [`Sink`] adapter.
//!
//! The table keeps the PostgreSQL id and is a `ReplacingMergeTree` ordered by
//! it: a row written twice (a replay) is two parts until a merge, and
//! `SELECT ... FINAL` shows it once. The exact time is `event_time_us Int64`
//! (microseconds since the epoch) on every server version; `event_time` is a
//! MATERIALIZED column computed from it, `DateTime64(6, 'UTC')` where the
//! server has that type and `DateTime` (seconds) on old servers like 18.16.
//!
//! Positions live in `pg2ch_positions`, one row per (group, topic, partition)
//! and store; the largest `next_offset` wins, so merges never lose progress.
//! Each keeps the fingerprint of the last record read (`last_record`, 0 when
//! unknown), so a replaced log is recognised.
//!
//! At `init` and at every start the tables are checked to be what exactly-once
//! needs: engines that collapse copies by key, the expected column types, and
//! inserts pinned synchronous (`async_insert=0` where the server has it), so
//! an insert that returned is in the table before its position is stored.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clickhouse::{Client, Compression, Row};
use serde::{Deserialize, Serialize};

use crate::checksum;
use crate::config::{ChConfig, bounded};
use crate::event::LoginEvent;
use crate::stores::{OutcomeUnknown, Permanent, Position, Sink};
use crate::verify::{Finding, KeyRange, SAMPLE, SinkSide, SinkSummary};

/// What the server can do, detected at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub version: (u32, u32),
    /// `DateTime64` and `fromUnixTimestamp64Micro` (20.5 and later).
    pub datetime64: bool,
    /// `RowBinaryWithNamesAndTypes`, which the crate's schema validation needs.
    pub validation: bool,
    /// The `async_insert` setting (21.11 and later), pinned off.
    pub async_insert: bool,
}

impl Capabilities {
    pub fn from_version(text: &str) -> anyhow::Result<Self> {
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>());
        let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
            anyhow::bail!("cannot read ClickHouse version {text:?}");
        };
        Ok(Capabilities {
            version: (major, minor),
            datetime64: (major, minor) >= (20, 5),
            validation: major >= 24,
            async_insert: (major, minor) >= (21, 11),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
struct SinkRow {
    id: i64,
    username: String,
    event_time_us: i64,
}

/// A stored row borrowed from the read buffer (no copy of the text).
#[derive(Debug, Row, Deserialize)]
struct SinkRowRef<'a> {
    id: i64,
    username: &'a str,
    event_time_us: i64,
}

#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct PositionRow {
    consumer_group: String,
    topic: String,
    partition: i32,
    next_offset: u64,
    last_record: u64,
}

/// The columns each pg2ch table must have, with their types.
const USER_LOGINS_COLUMNS: [(&str, &str); 3] = [("id", "Int64"), ("username", "String"), ("event_time_us", "Int64")];
const POSITIONS_COLUMNS: [(&str, &str); 5] = [
    ("consumer_group", "String"),
    ("topic", "String"),
    ("partition", "Int32"),
    ("next_offset", "UInt64"),
    ("last_record", "UInt64"),
];

/// Tags server answers that retrying cannot change (a missing table or
/// column, a type mismatch, a wrong password) as permanent.
fn classify(e: clickhouse::error::Error) -> anyhow::Error {
    if let clickhouse::error::Error::BadResponse(text) = &e {
        // UNKNOWN_IDENTIFIER, NO_SUCH_COLUMN_IN_TABLE, TYPE_MISMATCH,
        // UNKNOWN_TABLE, UNKNOWN_DATABASE, UNKNOWN_USER, AUTHENTICATION_FAILED,
        // CANNOT_PARSE_INPUT_ASSERTION_FAILED (a row shape the table rejects).
        // Old servers write `Code: 47, e.displayText()`, new ones `Code: 47. DB::Exception`.
        const PERMANENT: [u32; 9] = [47, 16, 53, 60, 81, 192, 516, 27, 62];
        let code = text
            .split_once("Code: ")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse::<u32>().ok()));
        if code.is_some_and(|c| PERMANENT.contains(&c)) {
            return Permanent::error(format!("ClickHouse refused: {}", text.lines().next().unwrap_or(text)));
        }
    }
    anyhow::Error::new(e)
}

/// A client for the configured database, with the server's capabilities.
#[derive(Clone)]
pub struct ClickHouse {
    pub client: Client,
    pub caps: Capabilities,
    pub database: String,
    timeout: Duration,
}

fn base_client(cfg: &ChConfig) -> Client {
    Client::default()
        .with_url(cfg.url())
        .with_user(&cfg.user)
        .with_password(cfg.password.expose())
        .with_validation(false)
}

impl ClickHouse {
    /// Connects, checks the password, and reads the server version.
    /// Does not require the database to exist (see [`ClickHouse::init`]).
    pub async fn connect(cfg: &ChConfig, timeout: Duration) -> anyhow::Result<Self> {
        let probe = base_client(cfg).with_compression(Compression::None);
        let version: String = bounded(|| format!("connecting to {}", cfg.describe()), timeout, async {
            Ok(probe.query("SELECT version()").fetch_one::<String>().await?)
        })
        .await
        .with_context(|| format!("cannot connect to {}", cfg.describe()))?;
        let caps = Capabilities::from_version(&version)?;
        let mut client = base_client(cfg)
            .with_database(&cfg.database)
            .with_validation(caps.validation)
            .with_compression(if caps.datetime64 { Compression::Lz4 } else { Compression::None });
        if caps.async_insert {
            // A position is stored once the insert returned: the rows must
            // be in the table by then, not in a buffer.
            client = client.with_setting("async_insert", "0");
        }
        Ok(ClickHouse { client, caps, database: cfg.database.clone(), timeout })
    }

    async fn run(&self, what: &str, sql: &str) -> anyhow::Result<()> {
        bounded(|| format!("ClickHouse: {what}"), self.timeout, async { Ok(self.client.query(sql).execute().await?) })
            .await
            .with_context(|| format!("ClickHouse: {what}"))
    }

    /// Creates the database, the sink table and the positions table if absent.
    pub async fn init(&self) -> anyhow::Result<()> {
        // The database name was checked by `config::identifier`; it is the
        // only name spliced into SQL text here.
        let db = &self.database;
        let create_db = format!("CREATE DATABASE IF NOT EXISTS {db}");
        bounded(|| "ClickHouse: create database".into(), self.timeout, async {
            Ok(self.client.clone().with_database("default").query(&create_db).execute().await?)
        })
        .await
        .with_context(|| format!("ClickHouse: creating database {db}"))?;
        let event_time = if self.caps.datetime64 {
            "DateTime64(6, 'UTC') MATERIALIZED fromUnixTimestamp64Micro(event_time_us)"
        } else {
            "DateTime MATERIALIZED toDateTime(intDiv(event_time_us, 1000000))"
        };
        self.run(
            "create table user_logins",
            &format!(
                "CREATE TABLE IF NOT EXISTS {db}.user_logins (
                    id Int64,
                    username String,
                    event_time_us Int64,
                    event_time {event_time}
                ) ENGINE = ReplacingMergeTree ORDER BY id"
            ),
        )
        .await?;
        self.run(
            "create table pg2ch_positions",
            &format!(
                "CREATE TABLE IF NOT EXISTS {db}.pg2ch_positions (
                    consumer_group String,
                    topic String,
                    partition Int32,
                    next_offset UInt64,
                    last_record UInt64
                ) ENGINE = ReplacingMergeTree(next_offset) ORDER BY (consumer_group, topic, partition)"
            ),
        )
        .await?;
        // Tables made by an earlier pg2ch lack the fingerprint.
        let columns = self.columns("pg2ch_positions").await?;
        if !columns.iter().any(|(name, _)| name == "last_record") {
            self.run(
                "add last_record to pg2ch_positions",
                &format!("ALTER TABLE {db}.pg2ch_positions ADD COLUMN last_record UInt64"),
            )
            .await?;
        }
        self.check_tables().await
    }

    /// The columns of one of our tables, with their types.
    async fn columns(&self, table: &str) -> anyhow::Result<Vec<(String, String)>> {
        bounded(|| format!("ClickHouse: reading the columns of {table}"), self.timeout, async {
            // Asked from `default`: the configured database may not exist.
            self.client
                .clone()
                .with_database("default")
                .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
                .bind(self.database.as_str())
                .bind(table)
                .fetch_all::<(String, String)>()
                .await
                .map_err(classify)
        })
        .await
    }

    /// Fails, naming the table and what is wrong, unless both pg2ch tables
    /// exist as exactly-once needs them: an engine that collapses copies by
    /// key (a `ReplacingMergeTree`, replicated or not; not a plain
    /// `MergeTree`, not a `Distributed` table, whose inserts may be
    /// asynchronous) and the expected columns and types.
    pub async fn check_tables(&self) -> anyhow::Result<()> {
        for (table, expected) in
            [("user_logins", &USER_LOGINS_COLUMNS[..]), ("pg2ch_positions", &POSITIONS_COLUMNS[..])]
        {
            let engine = bounded(|| "ClickHouse: checking tables".into(), self.timeout, async {
                self.client
                    .clone()
                    .with_database("default")
                    .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
                    .bind(self.database.as_str())
                    .bind(table)
                    .fetch_optional::<String>()
                    .await
                    .map_err(classify)
            })
            .await?;
            let db = &self.database;
            let Some(engine) = engine else {
                return Err(Permanent::error(format!(
                    "ClickHouse table {db}.{table} does not exist (run `pg2ch init`)"
                )));
            };
            if !matches!(engine.as_str(), "ReplacingMergeTree" | "ReplicatedReplacingMergeTree") {
                return Err(Permanent::error(format!(
                    "ClickHouse table {db}.{table} has engine {engine}, which does not collapse copies by key; \
                     pg2ch needs a ReplacingMergeTree (drop it and run `pg2ch init`)"
                )));
            }
            let columns = self.columns(table).await?;
            for (name, ty) in expected {
                match columns.iter().find(|(n, _)| n == name) {
                    Some((_, actual)) if actual == ty => {}
                    Some((_, actual)) => {
                        return Err(Permanent::error(format!(
                            "ClickHouse column {db}.{table}.{name} has type {actual}, pg2ch writes {ty}"
                        )));
                    }
                    None => {
                        // Only the fingerprint is added to an existing table by `init`.
                        let hint = if *name == "last_record" { " (run `pg2ch init`)" } else { "" };
                        return Err(Permanent::error(format!(
                            "ClickHouse table {db}.{table} lacks column {name}{hint}"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Rows as `FINAL` reads them (one per id), in id order.
    pub async fn rows_final(&self) -> anyhow::Result<Vec<LoginEvent>> {
        self.rows_in(KeyRange { first: i64::MIN, last: i64::MAX }).await
    }

    /// [`rows_final`](Self::rows_final) of one id range.
    async fn rows_in(&self, range: KeyRange) -> anyhow::Result<Vec<LoginEvent>> {
        let rows: Vec<SinkRow> =
            bounded(|| format!("ClickHouse: reading user_logins ids {range}"), self.timeout * 4, async {
                Ok(self
                .client
                .query("SELECT id, username, event_time_us FROM user_logins FINAL WHERE id BETWEEN ? AND ? ORDER BY id")
                .bind(range.first)
                .bind(range.last)
                .fetch_all()
                .await?)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| LoginEvent { id: r.id, username: r.username, event_time_us: r.event_time_us })
            .collect())
    }

    /// Rows stored, counting copies not yet merged away.
    pub async fn stored_count(&self) -> anyhow::Result<u64> {
        self.scalar("SELECT count() FROM user_logins").await
    }

    /// Distinct ids stored.
    pub async fn final_count(&self) -> anyhow::Result<u64> {
        self.scalar("SELECT count() FROM user_logins FINAL").await
    }

    async fn scalar(&self, sql: &str) -> anyhow::Result<u64> {
        bounded(|| format!("ClickHouse: {sql}"), self.timeout, async {
            Ok(self.client.query(sql).fetch_one::<u64>().await?)
        })
        .await
    }

    /// Stored positions of one consumer group on one topic.
    pub async fn positions(&self, group: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, Position>> {
        let rows: Vec<(i32, u64, u64)> = bounded(|| "ClickHouse: reading positions".into(), self.timeout, async {
            self.client
                .query(
                    "SELECT partition, max(next_offset), argMax(last_record, next_offset) FROM pg2ch_positions
                     WHERE consumer_group = ? AND topic = ? GROUP BY partition",
                )
                .bind(group)
                .bind(topic)
                .fetch_all()
                .await
                .map_err(classify)
        })
        .await?;
        Ok(rows
            .into_iter()
            .map(|(p, next, last)| (p, Position { next: next as i64, last: (next > 0 && last != 0).then_some(last) }))
            .collect())
    }

    async fn insert<T>(&self, table: &str, rows: impl IntoIterator<Item = T::Value<'_>>) -> anyhow::Result<()>
    where
        T: Serialize + clickhouse::RowWrite + for<'a> Row<Value<'a> = T>,
    {
        bounded(|| format!("ClickHouse: inserting into {table}"), self.timeout, async {
            let mut insert = self.client.insert::<T>(table).await.map_err(classify)?;
            for row in rows {
                insert.write(&row).await.map_err(classify)?;
            }
            insert.end().await.map_err(classify)
        })
        .await
    }
}

/// One consumer group's view of the sink.
pub struct ChSink {
    pub ch: ClickHouse,
    pub group: String,
    pub topic: String,
}

impl Sink for ChSink {
    async fn positions(&mut self) -> anyhow::Result<BTreeMap<i32, Position>> {
        self.ch.positions(&self.group, &self.topic).await
    }

    async fn write(&mut self, rows: &[LoginEvent]) -> anyhow::Result<()> {
        self.ch
            .insert::<SinkRow>(
                "user_logins",
                rows.iter().map(|r| SinkRow { id: r.id, username: r.username.clone(), event_time_us: r.event_time_us }),
            )
            .await
    }

    async fn store_positions(&mut self, positions: &BTreeMap<i32, Position>) -> anyhow::Result<()> {
        self.ch
            .insert::<PositionRow>(
                "pg2ch_positions",
                positions.iter().map(|(p, position)| PositionRow {
                    consumer_group: self.group.clone(),
                    topic: self.topic.clone(),
                    partition: *p,
                    next_offset: position.next as u64,
                    last_record: position.last.unwrap_or(0),
                }),
            )
            .await
    }
}

impl SinkSide for ClickHouse {
    async fn bounds(&mut self) -> anyhow::Result<(Option<KeyRange>, u64)> {
        let (first, last, stored) = bounded(|| "ClickHouse: reading the id range".into(), self.timeout, async {
            Ok(self
                .client
                .query("SELECT min(id), max(id), count() FROM user_logins")
                .fetch_one::<(i64, i64, u64)>()
                .await?)
        })
        .await?;
        Ok(((stored > 0).then_some(KeyRange { first, last }), stored))
    }

    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SinkSummary>> {
        let mut out = vec![SinkSummary::default(); ranges.len()];
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else { return Ok(out) };
        let span = KeyRange { first: first.first, last: last.last };
        let what = || format!("ClickHouse: checksumming user_logins ids {span}");
        // One pass over the span, each row counted in its range. A stream has
        // no overall deadline (its length is the table's); each block of rows
        // must come within the call timeout (a timer per row would cost more
        // than the row).
        let mut cursor = self
            .client
            .query("SELECT id, username, event_time_us FROM user_logins FINAL WHERE id BETWEEN ? AND ?")
            .bind(span.first)
            .bind(span.last)
            .fetch::<SinkRowRef<'_>>()
            .map_err(classify)
            .with_context(what)?;
        let mut finished = false;
        while !finished {
            tokio::time::timeout(self.timeout, async {
                for _ in 0..4096 {
                    let Some(row) = cursor.next().await? else {
                        finished = true;
                        break;
                    };
                    if let Some(i) = KeyRange::part_of(ranges, row.id) {
                        out[i].add(checksum::stored(row.id, row.username, row.event_time_us));
                    }
                }
                Ok::<_, clickhouse::error::Error>(())
            })
            .await
            .map_err(|_| OutcomeUnknown::error(format!("no rows within {:?}", self.timeout)))
            .with_context(what)?
            .map_err(classify)
            .with_context(what)?;
        }
        Ok(out)
    }

    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<LoginEvent>> {
        self.rows_in(range).await
    }

    async fn unmerged_copies(&mut self) -> anyhow::Result<Finding> {
        let count =
            self.scalar("SELECT count() FROM (SELECT id FROM user_logins GROUP BY id HAVING count() > 1)").await?;
        let first_ids = bounded(|| "ClickHouse: sampling copies".into(), self.timeout, async {
            Ok(self
                .client
                .query("SELECT id FROM user_logins GROUP BY id HAVING count() > 1 ORDER BY id LIMIT ?")
                .bind(SAMPLE as u64)
                .fetch_all::<i64>()
                .await?)
        })
        .await?;
        Ok(Finding { count, first_ids })
    }
}
