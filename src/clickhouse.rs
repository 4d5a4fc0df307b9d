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

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clickhouse::{Client, Compression, Row};
use serde::{Deserialize, Serialize};

use crate::config::{ChConfig, bounded};
use crate::event::LoginEvent;
use crate::stores::Sink;

/// What the server can do, detected at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub version: (u32, u32),
    /// `DateTime64` and `fromUnixTimestamp64Micro` (20.5 and later).
    pub datetime64: bool,
    /// `RowBinaryWithNamesAndTypes`, which the crate's schema validation needs.
    pub validation: bool,
}

impl Capabilities {
    pub fn from_version(text: &str) -> anyhow::Result<Self> {
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>());
        let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
            anyhow::bail!("cannot read ClickHouse version {text:?}");
        };
        Ok(Capabilities { version: (major, minor), datetime64: (major, minor) >= (20, 5), validation: major >= 24 })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
struct SinkRow {
    id: i64,
    username: String,
    event_time_us: i64,
}

#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct PositionRow {
    consumer_group: String,
    topic: String,
    partition: i32,
    next_offset: u64,
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
        let client = base_client(cfg)
            .with_database(&cfg.database)
            .with_validation(caps.validation)
            .with_compression(if caps.datetime64 { Compression::Lz4 } else { Compression::None });
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
                    next_offset UInt64
                ) ENGINE = ReplacingMergeTree(next_offset) ORDER BY (consumer_group, topic, partition)"
            ),
        )
        .await
    }

    /// Fails, naming the table, unless both pg2ch tables exist.
    pub async fn check_tables(&self) -> anyhow::Result<()> {
        for table in ["user_logins", "pg2ch_positions"] {
            let exists = bounded(|| "ClickHouse: checking tables".into(), self.timeout, async {
                // Asked from `default`: the configured database may not exist either.
                Ok(self
                    .client
                    .clone()
                    .with_database("default")
                    .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
                    .bind(self.database.as_str())
                    .bind(table)
                    .fetch_one::<u64>()
                    .await?)
            })
            .await?;
            if exists == 0 {
                anyhow::bail!("ClickHouse table {}.{table} does not exist (run `pg2ch init`)", self.database);
            }
        }
        Ok(())
    }

    /// Rows as `FINAL` reads them (one per id), in id order.
    pub async fn rows_final(&self) -> anyhow::Result<Vec<LoginEvent>> {
        let rows: Vec<SinkRow> = bounded(|| "ClickHouse: reading user_logins".into(), self.timeout * 4, async {
            Ok(self
                .client
                .query("SELECT id, username, event_time_us FROM user_logins FINAL ORDER BY id")
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

    /// How many ids are stored more than once (awaiting a merge), and the first few.
    pub async fn unmerged_copies(&self, sample: usize) -> anyhow::Result<(u64, Vec<i64>)> {
        let count =
            self.scalar("SELECT count() FROM (SELECT id FROM user_logins GROUP BY id HAVING count() > 1)").await?;
        let ids = bounded(|| "ClickHouse: sampling copies".into(), self.timeout, async {
            Ok(self
                .client
                .query("SELECT id FROM user_logins GROUP BY id HAVING count() > 1 ORDER BY id LIMIT ?")
                .bind(sample as u64)
                .fetch_all::<i64>()
                .await?)
        })
        .await?;
        Ok((count, ids))
    }

    async fn scalar(&self, sql: &str) -> anyhow::Result<u64> {
        bounded(|| format!("ClickHouse: {sql}"), self.timeout, async {
            Ok(self.client.query(sql).fetch_one::<u64>().await?)
        })
        .await
    }

    /// Stored positions of one consumer group on one topic.
    pub async fn positions(&self, group: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
        let rows: Vec<(i32, u64)> = bounded(|| "ClickHouse: reading positions".into(), self.timeout, async {
            Ok(self
                .client
                .query(
                    "SELECT partition, max(next_offset) FROM pg2ch_positions
                     WHERE consumer_group = ? AND topic = ? GROUP BY partition",
                )
                .bind(group)
                .bind(topic)
                .fetch_all()
                .await?)
        })
        .await?;
        Ok(rows.into_iter().map(|(p, o)| (p, o as i64)).collect())
    }

    async fn insert<T>(&self, table: &str, rows: impl IntoIterator<Item = T::Value<'_>>) -> anyhow::Result<()>
    where
        T: Serialize + clickhouse::RowWrite + for<'a> Row<Value<'a> = T>,
    {
        bounded(|| format!("ClickHouse: inserting into {table}"), self.timeout, async {
            let mut insert = self.client.insert::<T>(table).await?;
            for row in rows {
                insert.write(&row).await?;
            }
            Ok(insert.end().await?)
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
    async fn positions(&mut self) -> anyhow::Result<BTreeMap<i32, i64>> {
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

    async fn store_positions(&mut self, positions: &BTreeMap<i32, i64>) -> anyhow::Result<()> {
        self.ch
            .insert::<PositionRow>(
                "pg2ch_positions",
                positions.iter().map(|(p, o)| PositionRow {
                    consumer_group: self.group.clone(),
                    topic: self.topic.clone(),
                    partition: *p,
                    next_offset: *o as u64,
                }),
            )
            .await
    }
}
