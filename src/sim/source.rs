//! Simulated PostgreSQL table: committed rows with the sent flag, row locks
//! with SKIP LOCKED, claims without locks that fail to flag a row someone
//! else changed since (REPEATABLE READ), inserts whose ids are allocated now
//! and committed later (out of order), and commits that fail or whose
//! outcome is lost.
//!
//! Rows are raw, as PostgreSQL hands them over ([`SourceRow`]: any bytes,
//! any time, NULLs), and go through the same [`SourceRow::into_event`] as in
//! the real adapter. The table may be partitioned: each row lives in
//! partition `id mod n` at a slot numbered within its partition, so slots
//! repeat across partitions as `ctid`s do. Flags are set by address
//! (partition, slot), like the real adapter's `(tableoid, ctid)`; the
//! test-only [`Table::blind_flags`] sets them by slot alone, as the code
//! before the fix did, to show the property search catches that.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use super::{Chaos, yield_now};
use crate::checksum;
use crate::event::{LoginEvent, SourceRow};
use crate::stores::{Claim, ClaimMode, OutcomeUnknown, Rejected, SourceTable};
use crate::verify::{Finding, KeyRange, SAMPLE, SourceSide, SourceSummary};

/// A committed row: its raw content, sent flag and physical address.
#[derive(Debug, Clone)]
pub struct SimRow {
    pub raw: SourceRow,
    pub sent: bool,
    /// (partition, slot within the partition).
    pub addr: (i64, u64),
}

impl SimRow {
    /// What the row travels as, or why it cannot travel: the real decision.
    pub fn event(&self) -> Result<LoginEvent, String> {
        self.raw.clone().into_event()
    }
}

#[derive(Debug, Default)]
pub struct Table {
    /// Committed rows by id.
    pub committed: BTreeMap<i64, SimRow>,
    /// Row locks: id → session holding it.
    locks: BTreeMap<i64, u32>,
    /// How many times each row's flags were changed by a commit.
    versions: BTreeMap<i64, u64>,
    /// Inserted, id allocated, not committed yet.
    pub pending: Vec<SourceRow>,
    /// Ids are handed out from here, then in steps of `id_step`, so that a
    /// run covers negative ids, zero and the ends of `i64`.
    pub next_id: i64,
    pub id_step: i64,
    /// Partitions of the table (1: a plain table).
    pub partitions: i64,
    /// Next free slot per partition.
    slots: BTreeMap<i64, u64>,
    /// Rows flagged rejected, with the reason.
    pub rejected: BTreeMap<i64, String>,
    /// Test only: flag rows by slot alone, ignoring the partition.
    pub blind_flags: bool,
}

impl Table {
    pub fn new(first_id: i64, id_step: i64, partitions: i64) -> Self {
        Table { next_id: first_id, id_step: id_step.max(1), partitions: partitions.max(1), ..Table::default() }
    }

    /// How many commits have changed this row's flags.
    fn version(&self, id: i64) -> u64 {
        self.versions.get(&id).copied().unwrap_or(0)
    }

    /// Allocates an id for a new row; it becomes visible when committed.
    /// `None` once the ids ran out (the end of `i64`).
    pub fn insert(&mut self, username: Option<Vec<u8>>, event_time: Option<crate::event::PgTimestamp>) -> Option<i64> {
        let id = self.next_id;
        self.next_id = id.checked_add(self.id_step)?;
        self.pending.push(SourceRow { id, username, event_time });
        Some(id)
    }

    /// Commits the pending insert at `index` (modulo the number pending).
    pub fn commit_insert(&mut self, index: usize) {
        if !self.pending.is_empty() {
            let raw = self.pending.remove(index % self.pending.len());
            let partition = raw.id.rem_euclid(self.partitions);
            let slot = self.slots.entry(partition).or_insert(0);
            *slot += 1;
            let addr = (partition, *slot);
            self.committed.insert(raw.id, SimRow { raw, sent: false, addr });
        }
    }

    fn release(&mut self, session: u32) {
        self.locks.retain(|_, holder| *holder != session);
    }

    /// Flags the rows at these addresses sent, as the flag update does.
    fn flag(&mut self, addrs: &[(i64, u64)]) {
        let blind = self.blind_flags;
        for row in self.committed.values_mut() {
            let hit = addrs.iter().any(|a| if blind { a.1 == row.addr.1 } else { *a == row.addr });
            if hit {
                row.sent = true;
            }
        }
    }
}

/// One producer's session. Dropping it releases its locks, as the server
/// does when a client's connection dies.
pub struct SimSource {
    pub(super) chaos: Rc<Chaos>,
    pub(super) table: Rc<RefCell<Table>>,
    pub(super) session: u32,
    pub(super) mode: ClaimMode,
    pub(super) marked: Option<(Vec<i64>, Vec<Rejected>)>,
    /// Rows the open claim handed out, with their versions and addresses then.
    pub(super) seen: BTreeMap<i64, (u64, (i64, u64))>,
}

impl SimSource {
    fn abort(&mut self) {
        self.marked = None;
        self.seen.clear();
        self.table.borrow_mut().release(self.session);
    }

    /// Row-locks `ids` for a flag update, as PostgreSQL's UPDATE does. A
    /// shared claim locked them already. After an exclusive claim, a row
    /// changed since it was read fails the update (a serialization failure);
    /// a row locked by another session would make PostgreSQL wait for it,
    /// and here that wait times out.
    fn lock_for_update(&mut self, ids: impl Iterator<Item = i64>) -> anyhow::Result<()> {
        let refused = {
            let mut table = self.table.borrow_mut();
            ids.into_iter().find_map(|id| {
                let (seen, _) = self.seen.get(&id).expect("the pipeline flagged a row it had not claimed");
                match table.locks.get(&id) {
                    Some(holder) if *holder == self.session => return None,
                    Some(_) => return Some(format!("row {id} is locked by another session; lock wait timed out")),
                    None => {}
                }
                assert_eq!(self.mode, ClaimMode::Exclusive, "the pipeline flagged a row it had not locked");
                if table.version(id) != *seen {
                    return Some(format!("could not serialize access to row {id} due to concurrent update"));
                }
                table.locks.insert(id, self.session);
                None
            })
        };
        match refused {
            // As in PostgreSQL, the failed statement ends the transaction.
            Some(why) => {
                self.abort();
                anyhow::bail!("simulated: {why}")
            }
            None => Ok(()),
        }
    }

    /// The claim's query: unsent rows from `from_id` on as of now, locked
    /// in shared mode, their versions remembered in exclusive mode.
    fn read_claim(&mut self, from_id: i64, limit: usize) -> Claim {
        let mut table = self.table.borrow_mut();
        let rows: Vec<SimRow> = table
            .committed
            .range(from_id..)
            .filter(|(id, row)| {
                let skip_locked = self.mode == ClaimMode::Shared && table.locks.contains_key(id);
                !row.sent && !skip_locked && !table.rejected.contains_key(id)
            })
            .take(limit)
            .map(|(_, row)| row.clone())
            .collect();
        let mut claim = Claim::default();
        for row in rows {
            let id = row.raw.id;
            self.seen.insert(id, (table.version(id), row.addr));
            if self.mode == ClaimMode::Shared {
                table.locks.insert(id, self.session);
            }
            match row.event() {
                Ok(event) => claim.rows.push(event),
                Err(reason) => claim.rejected.push(Rejected { id, reason }),
            }
        }
        self.marked = Some((Vec::new(), Vec::new()));
        self.chaos.note(&("claim", self.session, claim.len()));
        claim
    }
}

impl Drop for SimSource {
    fn drop(&mut self) {
        self.table.borrow_mut().release(self.session);
    }
}

impl SourceTable for SimSource {
    async fn claim(&mut self, from_id: i64, limit: usize) -> anyhow::Result<Claim> {
        yield_now().await;
        self.abort();
        if self.chaos.fails("pg.claim") {
            anyhow::bail!("simulated: claim failed");
        }
        let claim = self.read_claim(from_id, limit);
        // The rows are as of the query's snapshot; others go on (and
        // commit) while the answer travels back, as they do while a real
        // query runs.
        for _ in 0..self.chaos.below(8) {
            yield_now().await;
        }
        Ok(claim)
    }

    async fn mark_sent(&mut self, ids: &[i64]) -> anyhow::Result<()> {
        yield_now().await;
        if self.marked.is_none() {
            anyhow::bail!("simulated: mark_sent without a claim");
        }
        if self.chaos.fails("pg.mark") {
            self.abort();
            anyhow::bail!("simulated: update failed");
        }
        self.lock_for_update(ids.iter().copied())?;
        self.marked.as_mut().expect("checked above").0 = ids.to_vec();
        Ok(())
    }

    async fn reject(&mut self, rows: &[Rejected]) -> anyhow::Result<()> {
        yield_now().await;
        if self.marked.is_none() {
            anyhow::bail!("simulated: reject without a claim");
        }
        if self.chaos.fails("pg.reject") {
            self.abort();
            anyhow::bail!("simulated: update failed");
        }
        self.lock_for_update(rows.iter().map(|r| r.id))?;
        self.marked.as_mut().expect("checked above").1 = rows.to_vec();
        Ok(())
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        yield_now().await;
        let Some((marked, rejected)) = self.marked.take() else { anyhow::bail!("simulated: commit without a claim") };
        if self.chaos.fails("pg.commit") {
            self.abort();
            anyhow::bail!("simulated: commit failed");
        }
        {
            let mut table = self.table.borrow_mut();
            let addrs: Vec<(i64, u64)> = marked.iter().map(|id| self.seen[id].1).collect();
            table.flag(&addrs);
            for r in &rejected {
                table.rejected.insert(r.id, r.reason.clone());
            }
            for id in marked.iter().copied().chain(rejected.iter().map(|r| r.id)) {
                *table.versions.entry(id).or_default() += 1;
            }
            table.release(self.session);
        }
        self.seen.clear();
        self.chaos.note(&("commit", self.session, marked.len()));
        if self.chaos.outcome_lost("pg.commit") {
            return Err(OutcomeUnknown::error("simulated: commit outcome unknown"));
        }
        Ok(())
    }

    async fn rollback(&mut self) -> anyhow::Result<()> {
        yield_now().await;
        self.abort();
        Ok(())
    }
}

/// The simulated table as `verify` reads it, with the real adapter's rules:
/// figures over rows flagged sent and not rejected, checksums of the raw
/// row (NULLs included), repair that skips rows a claim holds.
pub struct SimVerifySource(pub(super) Rc<RefCell<Table>>);

impl SourceSide for SimVerifySource {
    async fn bounds(&mut self) -> anyhow::Result<Option<KeyRange>> {
        let table = self.0.borrow();
        let (first, last) = (table.committed.keys().next(), table.committed.keys().next_back());
        Ok(first.zip(last).map(|(first, last)| KeyRange { first: *first, last: *last }))
    }

    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SourceSummary>> {
        let table = self.0.borrow();
        Ok(ranges
            .iter()
            .map(|range| {
                let mut s = SourceSummary::default();
                for (id, row) in table.committed.range(range.first..=range.last) {
                    if table.rejected.contains_key(id) {
                        continue;
                    }
                    s.rows += 1;
                    if row.sent {
                        s.sent += 1;
                        let raw = &row.raw;
                        s.checksum +=
                            i128::from(checksum::row(raw.id, raw.username.as_deref(), raw.event_time.map(|t| t.0)));
                    }
                }
                s
            })
            .collect())
    }

    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<(LoginEvent, bool)>> {
        let table = self.0.borrow();
        Ok(table
            .committed
            .range(range.first..=range.last)
            .filter(|(id, _)| !table.rejected.contains_key(id))
            .filter_map(|(_, row)| Some((row.event().ok()?, row.sent)))
            .collect())
    }

    async fn rejected(&mut self) -> anyhow::Result<Finding> {
        let table = self.0.borrow();
        let first_ids = table.rejected.keys().take(SAMPLE).copied().collect();
        Ok(Finding { count: table.rejected.len() as u64, first_ids })
    }

    async fn flag_unsent(&mut self, ids: &[i64]) -> anyhow::Result<Vec<i64>> {
        let mut table = self.0.borrow_mut();
        let mut flagged = Vec::new();
        for id in ids {
            if table.locks.contains_key(id) {
                continue;
            }
            if let Some(row) = table.committed.get_mut(id).filter(|r| r.sent) {
                row.sent = false;
                flagged.push(*id);
            }
        }
        Ok(flagged)
    }
}
