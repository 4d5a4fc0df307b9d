//! Simulated ClickHouse: a ReplacingMergeTree by id (copies visible until a
//! merge; FINAL shows the newest copy of each id), inserts that fail or whose
//! response is lost after they landed, and the stored consumer positions
//! (largest offset wins, as in the real positions table).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use super::{Chaos, yield_now};
use crate::checksum;
use crate::event::LoginEvent;
use crate::stores::{OutcomeUnknown, Position, Sink};
use crate::verify::{Finding, KeyRange, SAMPLE, SinkSide, SinkSummary};

#[derive(Debug, Default)]
pub struct SinkTable {
    /// Insert blocks in arrival order, not yet merged.
    pub parts: Vec<Vec<LoginEvent>>,
    /// (group, partition) → every position ever stored.
    positions: BTreeMap<(String, i32), Vec<Position>>,
}

impl SinkTable {
    /// What `SELECT ... FINAL ORDER BY id` returns: the newest copy of each id.
    pub fn final_rows(&self) -> Vec<LoginEvent> {
        let mut newest = BTreeMap::new();
        for row in self.parts.iter().flatten() {
            newest.insert(row.id, row.clone());
        }
        newest.into_values().collect()
    }

    /// `final_rows` of one id range.
    fn final_in(&self, range: KeyRange) -> Vec<LoginEvent> {
        let mut newest = BTreeMap::new();
        for row in self.parts.iter().flatten().filter(|r| range.contains(r.id)) {
            newest.insert(row.id, row.clone());
        }
        newest.into_values().collect()
    }

    /// A background merge: all parts collapse into one.
    pub fn merge(&mut self) {
        let merged = self.final_rows();
        self.parts = vec![merged];
    }
}

pub struct SimSink {
    pub(super) chaos: Rc<Chaos>,
    pub(super) table: Rc<RefCell<SinkTable>>,
    pub(super) group: String,
}

impl Sink for SimSink {
    async fn positions(&mut self) -> anyhow::Result<BTreeMap<i32, Position>> {
        yield_now().await;
        if self.chaos.fails("ch.positions") {
            anyhow::bail!("simulated: reading positions failed");
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

    async fn write(&mut self, rows: &[LoginEvent]) -> anyhow::Result<()> {
        yield_now().await;
        if self.chaos.fails("ch.insert") {
            anyhow::bail!("simulated: insert failed");
        }
        self.table.borrow_mut().parts.push(rows.to_vec());
        self.chaos.note(&("insert", rows.len()));
        if self.chaos.outcome_lost("ch.insert") {
            return Err(OutcomeUnknown::error("simulated: insert response lost (it landed)"));
        }
        Ok(())
    }

    async fn store_positions(&mut self, positions: &BTreeMap<i32, Position>) -> anyhow::Result<()> {
        yield_now().await;
        if self.chaos.fails("ch.store_positions") {
            anyhow::bail!("simulated: storing positions failed");
        }
        let mut table = self.table.borrow_mut();
        for (p, offset) in positions {
            table.positions.entry((self.group.clone(), *p)).or_default().push(*offset);
        }
        drop(table);
        self.chaos.note(&("positions", positions.len()));
        if self.chaos.outcome_lost("ch.store_positions") {
            return Err(OutcomeUnknown::error("simulated: storing positions response lost (it landed)"));
        }
        Ok(())
    }
}

/// The simulated sink as `verify` reads it.
pub struct SimVerifySink(pub(super) Rc<RefCell<SinkTable>>);

impl SinkSide for SimVerifySink {
    async fn bounds(&mut self) -> anyhow::Result<(Option<KeyRange>, u64)> {
        let table = self.0.borrow();
        let rows = || table.parts.iter().flatten();
        let bounds = rows().map(|r| r.id).min().zip(rows().map(|r| r.id).max());
        Ok((bounds.map(|(first, last)| KeyRange { first, last }), rows().count() as u64))
    }

    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SinkSummary>> {
        let mut out = vec![SinkSummary::default(); ranges.len()];
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else { return Ok(out) };
        for row in self.0.borrow().final_in(KeyRange { first: first.first, last: last.last }) {
            if let Some(i) = KeyRange::part_of(ranges, row.id) {
                out[i].add(checksum::event(&row));
            }
        }
        Ok(out)
    }

    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<LoginEvent>> {
        Ok(self.0.borrow().final_in(range))
    }

    async fn unmerged_copies(&mut self) -> anyhow::Result<Finding> {
        let mut copies = BTreeMap::<i64, u32>::new();
        for row in self.0.borrow().parts.iter().flatten() {
            *copies.entry(row.id).or_default() += 1;
        }
        let twice: Vec<i64> = copies.into_iter().filter(|(_, n)| *n > 1).map(|(id, _)| id).collect();
        Ok(Finding { count: twice.len() as u64, first_ids: twice.into_iter().take(SAMPLE).collect() })
    }
}
