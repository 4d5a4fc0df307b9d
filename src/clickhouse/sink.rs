//! The [`Sink`] adapter: a consumer group's view of one table's ClickHouse
//! table and of the positions table.
//!
//! Changes are inserted as `RowBinary` built from the table's schema
//! ([`crate::types::clickhouse`]), into the physical columns by name; a
//! deletion is its key, the other columns' zero (NULL where nullable),
//! `_pg2ch_deleted = 1`. Positions keep, per (group, topic, partition), the
//! next offset and the fingerprint of the last record read (`last_record`,
//! 0 when unknown), so a replaced log is recognised.
//!
//! On a cluster of several shards each row goes to the shard that owns its
//! key, and the positions to the configured server's shard, once every
//! shard's insert has returned.

use std::collections::BTreeMap;
use std::sync::Arc;

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{ClickHouse, classify, taking_turns};
use crate::change::Change;
use crate::config::bounded;
use crate::error::StoreResult;
use crate::schema::TableSchema;
use crate::stores::{Position, Sink};

#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct PositionRow {
    consumer_group: String,
    topic: String,
    partition: i32,
    next_offset: u64,
    last_record: u64,
}

impl ClickHouse {
    /// Stored positions of one consumer group on one topic.
    pub async fn positions(&self, group: &str, topic: &str) -> StoreResult<BTreeMap<i32, Position>> {
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

    /// Inserts changes of `schema`'s table; on a sharded cluster, each into
    /// the shard that owns its key ([`crate::checksum::shard`]), the shards
    /// at once, returning when every shard has its rows.
    pub async fn write_changes(&self, schema: &TableSchema, changes: &[Change]) -> StoreResult<()> {
        if !self.sharded() {
            return self.insert_changes(&self.client, schema, changes.iter()).await;
        }
        let n = self.shards.len();
        let mut parts: Vec<Vec<&Change>> = vec![Vec::new(); n];
        for change in changes {
            parts[crate::checksum::shard(schema, &change.values, n)].push(change);
        }
        let inserts = parts
            .iter()
            .zip(self.shards.iter())
            .filter(|(part, _)| !part.is_empty())
            .map(|(part, client)| self.insert_changes(client, schema, part.iter().copied()));
        futures::future::try_join_all(inserts).await.map(|_| ())
    }

    /// One insert of changes through `client`.
    async fn insert_changes<'a>(
        &self,
        client: &clickhouse::Client,
        schema: &TableSchema,
        changes: impl ExactSizeIterator<Item = &'a Change>,
    ) -> StoreResult<()> {
        let mut buf = Vec::with_capacity(changes.len() * 48);
        for change in changes {
            for (column, value) in schema.columns.iter().zip(&change.values) {
                crate::types::clickhouse::write(&mut buf, &column.ty, column.nullable, value);
            }
            buf.extend_from_slice(&change.version.to_le_bytes());
            buf.push(u8::from(change.deleted));
        }
        let sql =
            format!("INSERT INTO {} ({}) FORMAT RowBinary", self.table(&schema.name), schema.ch_written(&self.caps));
        // Sent in slices: each is one compressed block, and a row may
        // straddle two (the server reads the blocks as one stream).
        const SLICE: usize = 1 << 20;
        let bytes = bytes::Bytes::from(buf);
        bounded(
            || format!("ClickHouse: inserting into {}", schema.name),
            self.timeout,
            taking_turns(|| async {
                let mut insert = client.insert_formatted_with(sql.clone());
                for start in (0..bytes.len()).step_by(SLICE) {
                    insert.send(bytes.slice(start..(start + SLICE).min(bytes.len()))).await?;
                }
                insert.end().await
            }),
        )
        .await
    }

    async fn store_positions(&self, group: &str, topic: &str, positions: &BTreeMap<i32, Position>) -> StoreResult<()> {
        bounded(
            || "ClickHouse: inserting into pg2ch_positions".into(),
            self.timeout,
            taking_turns(|| async {
                let mut insert = self.client.insert::<PositionRow>("pg2ch_positions").await?;
                for (p, position) in positions {
                    let row = PositionRow {
                        consumer_group: group.to_owned(),
                        topic: topic.to_owned(),
                        partition: *p,
                        next_offset: position.next as u64,
                        last_record: position.last.unwrap_or(0),
                    };
                    insert.write(&row).await?;
                }
                insert.end().await
            }),
        )
        .await
    }

    /// Rows stored, counting copies not yet merged away.
    pub async fn stored_count(&self, schema: &TableSchema) -> StoreResult<u64> {
        self.scalar(&format!("SELECT count() FROM {}", self.readable(&schema.name))).await
    }

    /// The highest version any row of the table carries (0 when empty).
    pub async fn max_version(&self, schema: &TableSchema) -> StoreResult<u64> {
        self.scalar(&format!(
            "SELECT toUInt64(max({})) FROM {}",
            crate::config::ch_ident(crate::schema::CH_VERSION),
            self.readable(&schema.name)
        ))
        .await
    }

    /// Live keys, as `FINAL` shows them.
    pub async fn final_count(&self, schema: &TableSchema) -> StoreResult<u64> {
        self.scalar(&format!(
            "SELECT count() FROM {} FINAL WHERE {} = 0",
            self.readable(&schema.name),
            crate::config::ch_ident(crate::schema::CH_DELETED)
        ))
        .await
    }
}

/// One consumer group's view of the sink of one table.
pub struct ChSink {
    pub ch: ClickHouse,
    pub schema: Arc<TableSchema>,
    pub group: String,
    pub topic: String,
}

impl Sink for ChSink {
    async fn positions(&mut self) -> StoreResult<BTreeMap<i32, Position>> {
        self.ch.positions(&self.group, &self.topic).await
    }

    async fn write(&mut self, changes: &[Change]) -> StoreResult<()> {
        self.ch.write_changes(&self.schema, changes).await
    }

    async fn store_positions(&mut self, positions: &BTreeMap<i32, Position>) -> StoreResult<()> {
        self.ch.store_positions(&self.group, &self.topic, positions).await
    }
}
