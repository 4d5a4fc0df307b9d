//! Simulated ClickHouse: a `ReplacingMergeTree` by key keeping the highest
//! version (copies visible until a merge; `FINAL` shows each key's highest
//! version, the later insert on a tie, and leaves deleted keys out), inserts
//! that fail, whose response is lost after they landed, or that landed on
//! one shard of two and failed on the other, and the stored
//! consumer positions (largest offset wins, as in the real positions table).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use super::{Chaos, yield_now};
use crate::change::Change;
use crate::checksum;
use crate::schema::TableSchema;
use crate::stores::{Position, Sink, StoreError, StoreResult};
use crate::types::Key;
use crate::verify::{Finding, KeyRange, SinkRow, SinkSide, SinkSummary};

#[derive(Debug)]
pub struct SinkTable {
    pub schema: Arc<TableSchema>,
    /// Insert blocks in arrival order, not yet merged.
    pub parts: Vec<Vec<Change>>,
    /// (group, partition) → every position ever stored.
    positions: BTreeMap<(String, i32), Vec<Position>>,
}

impl SinkTable {
    pub fn new(schema: Arc<TableSchema>) -> Self {
        SinkTable { schema, parts: Vec::new(), positions: BTreeMap::new() }
    }

    /// Each key's newest change (deletions included): what the engine keeps.
    pub fn newest(&self) -> BTreeMap<Key, Change> {
        let mut newest: BTreeMap<Key, Change> = BTreeMap::new();
        for change in self.parts.iter().flatten() {
            let key = change.key(&self.schema);
            match newest.get(&key) {
                Some(kept) if kept.version > change.version => {}
                _ => {
                    newest.insert(key, change.clone());
                }
            }
        }
        newest
    }

    /// What `SELECT ... FINAL WHERE _pg2ch_deleted = 0` returns.
    pub fn final_rows(&self) -> BTreeMap<Key, Change> {
        self.newest().into_iter().filter(|(_, c)| !c.deleted).collect()
    }

    /// A background merge: all parts collapse into one.
    pub fn merge(&mut self) {
        let merged = self.newest().into_values().collect();
        self.parts = vec![merged];
    }
}

pub struct SimSink {
    pub(super) chaos: Rc<Chaos>,
    pub(super) table: Rc<RefCell<SinkTable>>,
    pub(super) group: String,
}

impl Sink for SimSink {
    async fn positions(&mut self) -> StoreResult<BTreeMap<i32, Position>> {
        yield_now().await;
        if self.chaos.fails("ch.positions") {
            return Err(StoreError::transient("simulated: reading positions failed"));
        }
        let table = self.table.borrow();
        Ok(table
            .positions
            .iter()
            .filter(|((g, _), _)| *g == self.group)
            // Largest offset wins, as `max`/`argMax` read the real table.
            .map(|((_, p), stored)| (*p, stored.iter().copied().max().unwrap_or_default()))
            .collect())
    }

    async fn write(&mut self, rows: &[Change]) -> StoreResult<()> {
        yield_now().await;
        if self.chaos.fails("ch.insert") {
            return Err(StoreError::transient("simulated: insert failed"));
        }
        if self.chaos.outcome_lost("ch.insert.shard") {
            // A sharded cluster's insert: one shard's rows landed, the
            // other shard's insert failed, and so did the write.
            let mut table = self.table.borrow_mut();
            let schema = table.schema.clone();
            let landed = rows.iter().filter(|c| checksum::shard(&schema, &c.values, 2) == 0).cloned().collect();
            table.parts.push(landed);
            return Err(StoreError::transient("simulated: one shard's insert failed after the other's landed"));
        }
        self.table.borrow_mut().parts.push(rows.to_vec());
        self.chaos.note(&("insert", rows.len()));
        if self.chaos.outcome_lost("ch.insert") {
            return Err(StoreError::unknown("simulated: insert response lost (it landed)"));
        }
        Ok(())
    }

    async fn store_positions(&mut self, positions: &BTreeMap<i32, Position>) -> StoreResult<()> {
        yield_now().await;
        if self.chaos.fails("ch.store_positions") {
            return Err(StoreError::transient("simulated: storing positions failed"));
        }
        let mut table = self.table.borrow_mut();
        for (p, offset) in positions {
            table.positions.entry((self.group.clone(), *p)).or_default().push(*offset);
        }
        drop(table);
        self.chaos.note(&("positions", positions.len()));
        if self.chaos.outcome_lost("ch.store_positions") {
            return Err(StoreError::unknown("simulated: storing positions response lost (it landed)"));
        }
        Ok(())
    }
}

/// The simulated sink as `verify` reads it.
pub struct SimVerifySink(pub(super) Rc<RefCell<SinkTable>>);

impl SinkSide for SimVerifySink {
    async fn bounds(&mut self) -> anyhow::Result<(Option<KeyRange>, u64)> {
        let table = self.0.borrow();
        let stored = table.parts.iter().flatten().count() as u64;
        if stored == 0 {
            return Ok((None, 0));
        }
        if !table.schema.integer_key() {
            return Ok((Some(KeyRange::ALL), stored));
        }
        let walks = table.parts.iter().flatten().map(|c| checksum::walk(&table.schema, &c.values));
        let (first, last) = walks.fold((i64::MAX, i64::MIN), |(lo, hi), w| (lo.min(w), hi.max(w)));
        Ok((Some(KeyRange { first, last }), stored))
    }

    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SinkSummary>> {
        let table = self.0.borrow();
        let mut out = vec![SinkSummary::default(); ranges.len()];
        for change in table.final_rows().values() {
            if let Some(i) = KeyRange::part_of(ranges, checksum::walk(&table.schema, &change.values)) {
                out[i].add(checksum::row(&table.schema, &change.values));
            }
        }
        Ok(out)
    }

    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<SinkRow>> {
        let table = self.0.borrow();
        Ok(table
            .newest()
            .into_iter()
            .map(|(key, change)| SinkRow { walk: checksum::walk(&table.schema, &change.values), key, change })
            .filter(|r| range.contains(r.walk))
            .collect())
    }

    async fn unmerged_copies(&mut self) -> anyhow::Result<Finding> {
        let table = self.0.borrow();
        // In walk order, as every finding lists its keys.
        let mut copies = BTreeMap::<(i64, Key), u32>::new();
        for change in table.parts.iter().flatten() {
            let walk = checksum::walk(&table.schema, &change.values);
            *copies.entry((walk, change.key(&table.schema))).or_default() += 1;
        }
        let mut finding = Finding::default();
        copies.into_iter().filter(|(_, n)| *n > 1).for_each(|((_, k), _)| finding.add(&k));
        Ok(finding)
    }
}
