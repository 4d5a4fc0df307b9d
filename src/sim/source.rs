//! Simulated PostgreSQL table: committed rows with the sent flag, row locks
//! with SKIP LOCKED, claims without locks that fail to flag a row someone
//! else changed since (REPEATABLE READ), inserts whose ids are allocated now
//! and committed later (out of order), and commits that fail or whose
//! outcome is lost.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use super::{Chaos, yield_now};
use crate::event::LoginEvent;
use crate::stores::{Claim, ClaimMode, Rejected, SourceTable};

#[derive(Debug, Default)]
pub struct Table {
    /// Committed rows and their sent flag.
    pub committed: BTreeMap<i64, (LoginEvent, bool)>,
    /// Row locks: id → session holding it.
    locks: BTreeMap<i64, u32>,
    /// How many times each row's flags were changed by a commit.
    versions: BTreeMap<i64, u64>,
    /// Inserted, id allocated, not committed yet.
    pub pending: Vec<LoginEvent>,
    next_id: i64,
    /// Rows that cannot be represented downstream (a NULL, in real life).
    pub unrepresentable: BTreeSet<i64>,
    /// Rows flagged rejected, with the reason.
    pub rejected: BTreeMap<i64, String>,
}

impl Table {
    /// How many commits have changed this row's flags.
    fn version(&self, id: i64) -> u64 {
        self.versions.get(&id).copied().unwrap_or(0)
    }

    /// Allocates an id for a new row; it becomes visible when committed.
    pub fn insert(&mut self, username: String, event_time_us: i64, representable: bool) {
        self.next_id += 1;
        if !representable {
            self.unrepresentable.insert(self.next_id);
        }
        self.pending.push(LoginEvent { id: self.next_id, username, event_time_us });
    }

    /// Commits the pending insert at `index` (modulo the number pending).
    pub fn commit_insert(&mut self, index: usize) {
        if !self.pending.is_empty() {
            let row = self.pending.remove(index % self.pending.len());
            self.committed.insert(row.id, (row, false));
        }
    }

    pub fn rows(&self) -> Vec<(LoginEvent, bool)> {
        self.committed.values().cloned().collect()
    }

    fn release(&mut self, session: u32) {
        self.locks.retain(|_, holder| *holder != session);
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
    /// Rows the open claim handed out, with their versions then.
    pub(super) seen: BTreeMap<i64, u64>,
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
                let seen = self.seen.get(&id).expect("the pipeline flagged a row it had not claimed");
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

    /// The claim's query: unsent rows above `after_id` as of now, locked
    /// in shared mode, their versions remembered in exclusive mode.
    fn read_claim(&mut self, after_id: i64, limit: usize) -> Claim {
        let mut table = self.table.borrow_mut();
        let rows: Vec<LoginEvent> = table
            .committed
            .range(after_id.saturating_add(1)..)
            .filter(|(id, (_, sent))| {
                let skip_locked = self.mode == ClaimMode::Shared && table.locks.contains_key(id);
                !sent && !skip_locked && !table.rejected.contains_key(id)
            })
            .take(limit)
            .map(|(_, (row, _))| row.clone())
            .collect();
        let mut claim = Claim::default();
        for row in rows {
            self.seen.insert(row.id, table.version(row.id));
            if self.mode == ClaimMode::Shared {
                table.locks.insert(row.id, self.session);
            }
            if table.unrepresentable.contains(&row.id) {
                claim.rejected.push(Rejected { id: row.id, reason: "username is NULL".into() });
            } else {
                claim.rows.push(row);
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
    async fn claim(&mut self, after_id: i64, limit: usize) -> anyhow::Result<Claim> {
        yield_now().await;
        self.abort();
        if self.chaos.fails("pg.claim") {
            anyhow::bail!("simulated: claim failed");
        }
        let claim = self.read_claim(after_id, limit);
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
            for id in &marked {
                if let Some(row) = table.committed.get_mut(id) {
                    row.1 = true;
                }
            }
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
            anyhow::bail!("simulated: commit outcome unknown");
        }
        Ok(())
    }

    async fn rollback(&mut self) -> anyhow::Result<()> {
        yield_now().await;
        self.abort();
        Ok(())
    }
}
