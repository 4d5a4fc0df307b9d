//! `pg2ch status`: each table's backlog, topic, consumer positions and lag.

use std::io::Write;

use serde::Serialize;

use crate::kafka;
use crate::postgres;
use crate::postgres::lease;
use crate::stores::EventLog;

use super::run::open_consumer;
use super::{RunOptions, Settings, tables};

/// One partition in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    pub end_offset: i64,
    pub position: i64,
    pub lag: i64,
    /// How long the oldest record this group has not written yet has been
    /// in the topic (seconds, by the broker's record timestamp); 0 when
    /// there is none.
    pub lag_seconds: f64,
    /// The session holding the partition's lease (`pg2ch consumer host:pid`).
    pub holder: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub table: String,
    pub topic: String,
    pub group: String,
    /// Rows changed and not sent yet, and deletions not sent yet.
    pub unsent_rows: i64,
    /// How long the oldest of them has waited (seconds); `None` when none does.
    pub oldest_unsent_seconds: Option<f64>,
    /// Rows flagged `pg2ch_rejected` (never sent).
    pub rejected_rows: u64,
    pub partitions: Vec<PartitionStatus>,
    /// The sessions holding the table's producer lease.
    pub producers: Vec<String>,
    /// Records in `<topic>.dlq`.
    pub dead_letters: i64,
    /// How the topic's partitions are copied across the brokers.
    pub replication: Option<kafka::Replication>,
    pub clickhouse_rows_final: u64,
    pub clickhouse_rows_stored: u64,
    /// The initial load of the rows there were at `init`, if there was one.
    pub initial_load: Option<postgres::LoadProgress>,
    /// pg2ch's triggers that are disabled (changes made meanwhile are lost).
    pub disabled_triggers: Vec<String>,
}

pub async fn status(s: &Settings) -> anyhow::Result<Vec<Status>> {
    let pool = postgres::connect(&s.pg, 2, s.timeouts.call).await?;
    let client = kafka::connect(&s.kafka, s.timeouts.call).await?;
    let mut out = Vec::new();
    for table in tables(s, &pool, false).await? {
        // Read-only: nothing is added to ClickHouse nor flagged here.
        let mut c = open_consumer(s, &RunOptions::default(), None, &table).await?;
        let positions = c.positions().await?.clone();
        let ends = c.high_watermarks().await?;
        let now_ms = crate::types::time::now_unix_ms();
        let (mut holders, producers) = lease::holders(&pool, &s.kafka.group, &table.topic, table.oid).await?;
        let mut partitions = Vec::new();
        for (&p, position) in &positions {
            let end_offset = ends.get(&p).copied().unwrap_or(0);
            let position = position.next;
            let lag = (end_offset - position).max(0);
            let lag_seconds = match lag {
                0 => 0.0,
                _ => c.log.record_at(p, position).await?.map_or(0.0, |r| (now_ms - r.timestamp_ms).max(0) as f64 / 1e3),
            };
            let holder = holders.remove(&p);
            partitions.push(PartitionStatus { partition: p, end_offset, position, lag, lag_seconds, holder });
        }
        let unsent = postgres::unsent(&pool, &table.schema).await?;
        out.push(Status {
            table: table.schema.to_string(),
            topic: table.topic.clone(),
            group: s.kafka.group.clone(),
            unsent_rows: unsent.changes,
            oldest_unsent_seconds: unsent.oldest_seconds,
            rejected_rows: postgres::rejected_count(&pool, &table.schema).await?,
            partitions,
            producers,
            dead_letters: c.log.dead_letter_count().await?,
            replication: kafka::replication(&client, &table.topic, s.timeouts.call).await?,
            clickhouse_rows_final: c.sink.ch.final_count(&table.schema).await?,
            clickhouse_rows_stored: c.sink.ch.stored_count(&table.schema).await?,
            initial_load: postgres::load_progress(&pool, table.oid).await?,
            disabled_triggers: postgres::disabled_triggers(&pool, table.oid).await?,
        });
    }
    Ok(out)
}

impl Status {
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "table {}: topic {:?}, consumer group {:?}", self.table, self.topic, self.group)?;
        let waiting = self.oldest_unsent_seconds.map_or(String::new(), |s| format!(", the oldest waiting {s:.3} s"));
        writeln!(
            out,
            "unsent changes in PostgreSQL: {}{waiting} (plus {} rows rejected as not representable)",
            self.unsent_rows, self.rejected_rows
        )?;
        if !self.disabled_triggers.is_empty() {
            writeln!(out, "WARNING: {}", postgres::disabled_warning(&self.disabled_triggers))?;
        }
        if let Some(load) = &self.initial_load {
            writeln!(out, "initial load of the rows there were at init: {}", load.describe())?;
        }
        let producers = if self.producers.is_empty() { "none".to_owned() } else { self.producers.join(", ") };
        writeln!(out, "producers at work: {producers}")?;
        writeln!(
            out,
            "{:>9} {:>12} {:>12} {:>10} {:>10}  held by",
            "partition", "end offset", "position", "lag", "lag (s)"
        )?;
        for p in &self.partitions {
            writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>10} {:>10.3}  {}",
                p.partition,
                p.end_offset,
                p.position,
                p.lag,
                p.lag_seconds,
                p.holder.as_deref().unwrap_or("nobody")
            )?;
        }
        writeln!(out, "dead letters in {:?}: {}", kafka::dead_letter_topic(&self.topic), self.dead_letters)?;
        if let Some(r) = &self.replication {
            let behind = match r.under_replicated.as_slice() {
                [] => "none".to_owned(),
                parts => format!("{parts:?}"),
            };
            let insync = r.min_insync.map_or("unknown".to_owned(), |m| m.to_string());
            writeln!(
                out,
                "replication: {} replicas per partition on {} brokers, min.insync.replicas {insync}, under-replicated \
                 partitions: {behind}",
                r.replicas, r.brokers
            )?;
            if let Some(warning) = r.warning(&self.topic) {
                writeln!(out, "WARNING: {warning}")?;
            }
        }
        writeln!(
            out,
            "ClickHouse rows: {} (FINAL, deleted keys left out), {} stored before merging",
            self.clickhouse_rows_final, self.clickhouse_rows_stored
        )
    }
}
