//! Simulated PostgreSQL table: committed rows by key with their sent flag,
//! rejection and published version; the outbox of deleted keys; row locks
//! with SKIP LOCKED; claims without locks whose flag update fails when a row
//! changed since (REPEATABLE READ); inserts committed later and out of
//! order; updates, deletes, key changes and re-inserts of deleted keys;
//! commits that fail or whose outcome is lost.
//!
//! Every write makes a new tuple at a new address (partition, slot), as
//! PostgreSQL does (a `ctid` changes on UPDATE), and slots repeat across
//! partitions. Flags are set by address, like the real adapter's
//! `(tableoid, ctid)`; two test-only variants flag by slot alone
//! ([`Table::blind_flags`], the code before partitions were handled) and by
//! key whatever the row's version ([`Table::flags_by_key`], a flag update
//! that does not check the row is still the one published), to show the
//! property search catches both. A claim reads and draws its version in one
//! step, as the real adapter does under its claim lock.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

use super::{Chaos, yield_now};
use crate::change::Change;
use crate::checksum;
use crate::schema::TableSchema;
use crate::stores::{Claim, ClaimMode, Claimed, Outcome, OutcomeUnknown, SourceTable};
use crate::types::{Key, Value};
use crate::verify::{Finding, KeyRange, RowState, SAMPLE, SourceRow, SourceSide, SourceSummary};

/// A tuple's physical address: (partition, slot within the partition).
pub type Addr = (i64, u64);

/// A committed row.
#[derive(Debug, Clone)]
pub struct SimRow {
    pub values: Vec<Value>,
    pub sent: bool,
    pub rejected: Option<String>,
    /// The version it was last published as (`pg2ch_version`).
    pub version: u64,
    pub addr: Addr,
}

/// A deleted key in the outbox, waiting to be sent.
#[derive(Debug, Clone)]
pub struct Tomb {
    /// The key's values, in key order.
    pub key: Vec<Value>,
    pub addr: Addr,
}

/// What a lock is on: a row of the table, or a key in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Lockable {
    Row(Key),
    Tomb(Key),
}

#[derive(Debug)]
pub struct Table {
    pub schema: Arc<TableSchema>,
    /// Committed rows by key.
    pub committed: BTreeMap<Key, SimRow>,
    /// The outbox of deleted keys.
    pub deletes: BTreeMap<Key, Tomb>,
    locks: BTreeMap<Lockable, u32>,
    /// Inserted, not committed yet.
    pub pending: Vec<Vec<Value>>,
    /// Partitions of the table (1: a plain table).
    pub partitions: i64,
    slots: BTreeMap<i64, u64>,
    /// The last version a claim drew.
    last_version: u64,
    /// What every claim handed out as a change: (key, version) → the
    /// row's values, or `None` for a deletion. For the properties.
    pub claimed: BTreeMap<(Key, u64), Option<Vec<Value>>>,
    /// Test only: flag rows by slot alone, ignoring the partition.
    pub blind_flags: bool,
    /// Test only: flag rows by key, whatever happened to them since the claim.
    pub flags_by_key: bool,
}

impl Table {
    pub fn new(schema: Arc<TableSchema>, partitions: i64) -> Self {
        Table {
            schema,
            committed: BTreeMap::new(),
            deletes: BTreeMap::new(),
            locks: BTreeMap::new(),
            pending: Vec::new(),
            partitions: partitions.max(1),
            slots: BTreeMap::new(),
            last_version: 0,
            claimed: BTreeMap::new(),
            blind_flags: false,
            flags_by_key: false,
        }
    }

    /// Skips versions, as if claims had happened elsewhere (tests plant
    /// changes with versions above those handed out so far).
    pub fn advance_versions(&mut self, n: u64) {
        self.last_version += n;
    }

    /// A fresh address for a new tuple of `key`.
    fn new_addr(&mut self, key: &Key) -> Addr {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let partition = (h.finish() % self.partitions as u64) as i64;
        let slot = self.slots.entry(partition).or_insert(0);
        *slot += 1;
        (partition, *slot)
    }

    fn locked(&self, what: &Lockable) -> bool {
        self.locks.contains_key(what)
    }

    /// Commits the pending insert at `index` (modulo the number pending).
    /// A key that exists is a unique violation: the insert is dropped.
    pub fn commit_insert(&mut self, index: usize) {
        if self.pending.is_empty() {
            return;
        }
        let values = self.pending.remove(index % self.pending.len());
        let key = self.schema.key_of(&values);
        if self.committed.contains_key(&key) {
            return;
        }
        let addr = self.new_addr(&key);
        self.committed.insert(key, SimRow { values, sent: false, rejected: None, version: 0, addr });
    }

    /// A user's UPDATE of the row with `key` to `values` (a new key, when
    /// the key's values differ). What a trigger does: the row becomes
    /// unsent and unrejected; a key change records the old key's deletion.
    /// `false` when it would wait for a lock (the user's statement would
    /// block; here it does not happen) or violate the key.
    pub fn update(&mut self, key: &Key, values: Vec<Value>) -> bool {
        if self.locked(&Lockable::Row(key.clone())) || !self.committed.contains_key(key) {
            return false;
        }
        let new_key = self.schema.key_of(&values);
        if new_key != *key {
            if self.committed.contains_key(&new_key) || self.locked(&Lockable::Tomb(key.clone())) {
                return false;
            }
            let old = self.committed.remove(key).expect("checked above");
            self.record_delete(key, &old.values);
        }
        let addr = self.new_addr(&new_key);
        let version = self.committed.get(&new_key).map_or(0, |r| r.version);
        self.committed.insert(new_key, SimRow { values, sent: false, rejected: None, version, addr });
        true
    }

    /// A user's DELETE: the row goes, its key goes to the outbox.
    pub fn delete(&mut self, key: &Key) -> bool {
        if self.locked(&Lockable::Row(key.clone())) || self.locked(&Lockable::Tomb(key.clone())) {
            return false;
        }
        match self.committed.remove(key) {
            Some(row) => {
                self.record_delete(key, &row.values);
                true
            }
            None => false,
        }
    }

    /// The trigger's upsert into the outbox (a new tuple either way).
    fn record_delete(&mut self, key: &Key, values: &[Value]) {
        let key_values = self.schema.key.iter().map(|i| values[*i].clone()).collect();
        let addr = self.new_addr(key);
        self.deletes.insert(key.clone(), Tomb { key: key_values, addr });
    }

    fn release(&mut self, session: u32) {
        self.locks.retain(|_, holder| *holder != session);
    }

    /// Flags rows sent with `version`, by address, as the flag update does.
    fn flag(&mut self, addrs: &[Addr], version: u64) {
        let blind = self.blind_flags;
        let keys: Vec<Key> = self
            .committed
            .iter()
            .filter(|(_, row)| addrs.iter().any(|a| if blind { a.1 == row.addr.1 } else { *a == row.addr }))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let addr = self.new_addr(&key);
            let row = self.committed.get_mut(&key).expect("just listed");
            row.sent = true;
            row.version = version;
            row.addr = addr;
        }
    }

    /// Whether every row could travel: the shared decision, then the size limit.
    pub fn travels(schema: &TableSchema, values: &[Value]) -> Result<(), String> {
        schema.check_row(values)?;
        let change = Change::upsert(values.to_vec(), 0);
        crate::change::oversize(&crate::change::encode(schema, &change), 0).map_or(Ok(()), Err)
    }
}

/// What an open claim handed out, for its flag update.
#[derive(Debug, Clone)]
pub(super) enum Item {
    Row { key: Key, addr: Addr },
    Tomb { key: Key, addr: Addr },
}

/// One producer's session. Dropping it releases its locks, as the server
/// does when a client's connection dies.
pub struct SimSource {
    pub(super) chaos: Rc<Chaos>,
    pub(super) table: Rc<RefCell<Table>>,
    pub(super) session: u32,
    pub(super) mode: ClaimMode,
    /// The open claim: its version and items; `None` without one.
    pub(super) open: Option<(u64, Vec<Item>)>,
    /// Items flagged sent and rejected in the open claim, applied at commit.
    pub(super) marked: Vec<usize>,
    pub(super) rejected: Vec<(usize, String)>,
}

impl SimSource {
    fn abort(&mut self) {
        self.open = None;
        self.marked.clear();
        self.rejected.clear();
        self.table.borrow_mut().release(self.session);
    }

    /// Locks an item for its flag update, as PostgreSQL's UPDATE (or the
    /// outbox's DELETE) does. A shared claim locked it already. After an
    /// exclusive claim, an item changed since it was read fails the update
    /// (a serialization failure); one locked by another session would make
    /// PostgreSQL wait, and here that wait times out.
    fn lock_for_update(&mut self, items: &[usize]) -> anyhow::Result<()> {
        let Some((_, claimed)) = &self.open else { anyhow::bail!("simulated: flag update without a claim") };
        let refused = {
            let mut table = self.table.borrow_mut();
            items.iter().find_map(|i| {
                let (lockable, addr) = match &claimed[*i] {
                    Item::Row { key, addr } => (Lockable::Row(key.clone()), *addr),
                    Item::Tomb { key, addr } => (Lockable::Tomb(key.clone()), *addr),
                };
                match table.locks.get(&lockable) {
                    Some(holder) if *holder == self.session => return None,
                    Some(_) => return Some(format!("{lockable:?} is locked by another session; lock wait timed out")),
                    None => {}
                }
                assert_eq!(self.mode, ClaimMode::Exclusive, "the pipeline flagged an item it had not locked");
                let now = match &lockable {
                    Lockable::Row(key) => table.committed.get(key).map(|r| r.addr),
                    Lockable::Tomb(key) => table.deletes.get(key).map(|t| t.addr),
                };
                let changed = now != Some(addr);
                let by_key = table.flags_by_key && now.is_some() && matches!(lockable, Lockable::Row(_));
                if changed && !by_key {
                    return Some(format!("could not serialize access to {lockable:?} due to concurrent update"));
                }
                table.locks.insert(lockable, self.session);
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

    /// The claim's queries: unsent rows and deleted keys above `after` as
    /// of now, in key order, locked in shared mode, all given one new version.
    fn read_claim(&mut self, after: Option<&Key>, limit: usize) -> Claim {
        let mut table = self.table.borrow_mut();
        table.last_version += 1;
        let version = table.last_version;
        let schema = table.schema.clone();
        let above = |k: &Key| after.is_none_or(|a| k > a);
        let free = |table: &Table, l: Lockable| self.mode == ClaimMode::Exclusive || !table.locked(&l);
        let rows: Vec<(Key, SimRow)> = table
            .committed
            .iter()
            .filter(|(k, r)| above(k) && !r.sent && r.rejected.is_none() && free(&table, Lockable::Row((*k).clone())))
            .take(limit)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        let tombs: Vec<(Key, Tomb)> = table
            .deletes
            .iter()
            .filter(|(k, _)| above(k) && free(&table, Lockable::Tomb((*k).clone())))
            .take(limit)
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        // As the real claim: a list that came back full ends where it does
        // (keys past its last are the next claim's), and the rest is merged
        // in key order, a row before a deletion of the same key (so a claim
        // may hold `limit` rows and one deletion more). Without row locks
        // the claim is cut at the horizon; with them it keeps (and locks)
        // everything both lists returned.
        let horizon = Claim::horizon_of(
            limit,
            [(rows.len(), rows.last().map(|(k, _)| k)), (tombs.len(), tombs.last().map(|(k, _)| k))],
        );
        let mut merged: Vec<(Key, Result<SimRow, Tomb>)> =
            rows.into_iter().map(|(k, r)| (k, Ok(r))).chain(tombs.into_iter().map(|(k, t)| (k, Err(t)))).collect();
        merged.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.is_err().cmp(&b.1.is_err())));
        merged.retain(|(k, _)| Claim::keeps(self.mode, horizon.as_ref(), k));
        let mut claim = Claim { version, items: Vec::new(), horizon };
        let mut items = Vec::new();
        for (key, what) in merged {
            match what {
                Ok(row) => {
                    if self.mode == ClaimMode::Shared {
                        table.locks.insert(Lockable::Row(key.clone()), self.session);
                    }
                    let outcome = match schema.check_row(&row.values) {
                        Ok(()) => Outcome::Send(Change::upsert(row.values.clone(), version)),
                        Err(reason) => {
                            Outcome::Reject { reason, key: schema.key.iter().map(|i| row.values[*i].clone()).collect() }
                        }
                    };
                    // What this claim publishes for the key: the row, or (a
                    // row that cannot travel, here or for its size) its deletion.
                    let sent = Table::travels(&schema, &row.values).is_ok().then(|| row.values.clone());
                    table.claimed.insert((key.clone(), version), sent);
                    items.push(Item::Row { key: key.clone(), addr: row.addr });
                    claim.items.push(Claimed { key, outcome });
                }
                Err(tomb) => {
                    if self.mode == ClaimMode::Shared {
                        table.locks.insert(Lockable::Tomb(key.clone()), self.session);
                    }
                    let outcome = if table.committed.contains_key(&key) {
                        Outcome::Superseded
                    } else {
                        table.claimed.insert((key.clone(), version), None);
                        Outcome::Send(Change::delete(&schema, tomb.key.clone(), version))
                    };
                    items.push(Item::Tomb { key: key.clone(), addr: tomb.addr });
                    claim.items.push(Claimed { key, outcome });
                }
            }
        }
        self.open = Some((version, items));
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
    async fn claim(&mut self, after: Option<&Key>, limit: usize) -> anyhow::Result<Claim> {
        yield_now().await;
        self.abort();
        if self.chaos.fails("pg.claim") {
            anyhow::bail!("simulated: claim failed");
        }
        let claim = self.read_claim(after, limit);
        // The rows are as of the query's snapshot; others go on (and
        // commit) while the answer travels back, as they do while a real
        // query runs.
        for _ in 0..self.chaos.below(8) {
            yield_now().await;
        }
        Ok(claim)
    }

    async fn mark_sent(&mut self, items: &[usize]) -> anyhow::Result<()> {
        yield_now().await;
        if self.open.is_none() {
            anyhow::bail!("simulated: mark_sent without a claim");
        }
        if self.chaos.fails("pg.mark") {
            self.abort();
            anyhow::bail!("simulated: update failed");
        }
        self.lock_for_update(items)?;
        self.marked = items.to_vec();
        Ok(())
    }

    async fn reject(&mut self, items: &[(usize, String)]) -> anyhow::Result<()> {
        yield_now().await;
        if self.open.is_none() {
            anyhow::bail!("simulated: reject without a claim");
        }
        if self.chaos.fails("pg.reject") {
            self.abort();
            anyhow::bail!("simulated: update failed");
        }
        let which: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
        self.lock_for_update(&which)?;
        self.rejected = items.to_vec();
        Ok(())
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        yield_now().await;
        let Some((version, items)) = self.open.take() else { anyhow::bail!("simulated: commit without a claim") };
        if self.chaos.fails("pg.commit") {
            self.abort();
            anyhow::bail!("simulated: commit failed");
        }
        let marked = std::mem::take(&mut self.marked);
        let rejected = std::mem::take(&mut self.rejected);
        {
            let mut table = self.table.borrow_mut();
            let by_key = table.flags_by_key;
            let mut addrs = Vec::new();
            for i in &marked {
                match &items[*i] {
                    Item::Row { key, addr } => {
                        if by_key {
                            if let Some(row) = table.committed.get(key) {
                                addrs.push(row.addr);
                            }
                        } else {
                            addrs.push(*addr);
                        }
                    }
                    Item::Tomb { key, addr } => {
                        if table.deletes.get(key).is_some_and(|t| t.addr == *addr) {
                            table.deletes.remove(key);
                        }
                    }
                }
            }
            table.flag(&addrs, version);
            for (i, reason) in &rejected {
                match &items[*i] {
                    Item::Row { key, addr } => {
                        let fresh = table.new_addr(key);
                        if let Some(row) = table.committed.get_mut(key).filter(|r| r.addr == *addr) {
                            row.rejected = Some(reason.clone());
                            row.addr = fresh;
                        }
                    }
                    // A deletion that cannot be sent cannot have been
                    // preceded by a row that was: it goes.
                    Item::Tomb { key, .. } => {
                        table.deletes.remove(key);
                    }
                }
            }
            table.release(self.session);
        }
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

/// The simulated table as `verify` reads it, with the real adapter's rules.
pub struct SimVerifySource(pub(super) Rc<RefCell<Table>>);

/// The walk coordinate of a key's values, placed in a row of the table.
pub fn walk_of_key(schema: &TableSchema, key: &[Value]) -> i64 {
    let mut values = vec![Value::Null; schema.columns.len()];
    for (i, v) in schema.key.iter().zip(key) {
        values[*i] = v.clone();
    }
    checksum::walk(schema, &values)
}

impl SourceSide for SimVerifySource {
    async fn bounds(&mut self) -> anyhow::Result<Option<KeyRange>> {
        let table = self.0.borrow();
        if table.committed.is_empty() {
            return Ok(None);
        }
        if !table.schema.integer_key() {
            return Ok(Some(KeyRange::ALL));
        }
        let walks = table.committed.values().map(|r| checksum::walk(&table.schema, &r.values));
        let (first, last) = walks.fold((i64::MAX, i64::MIN), |(lo, hi), w| (lo.min(w), hi.max(w)));
        Ok(Some(KeyRange { first, last }))
    }

    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SourceSummary>> {
        let table = self.0.borrow();
        let mut out = vec![SourceSummary::default(); ranges.len()];
        for row in table.committed.values() {
            let Some(i) = KeyRange::part_of(ranges, checksum::walk(&table.schema, &row.values)) else { continue };
            if row.rejected.is_some() {
                out[i].rejected += 1;
                continue;
            }
            out[i].rows += 1;
            if row.sent {
                out[i].sent += 1;
                out[i].checksum += i128::from(checksum::row(&table.schema, &row.values));
            }
        }
        Ok(out)
    }

    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<SourceRow>> {
        let table = self.0.borrow();
        Ok(table
            .committed
            .iter()
            .filter(|(_, r)| range.contains(checksum::walk(&table.schema, &r.values)))
            .map(|(key, r)| SourceRow {
                walk: checksum::walk(&table.schema, &r.values),
                key: key.clone(),
                values: r.values.clone(),
                state: match (&r.rejected, r.sent) {
                    (Some(_), _) => RowState::Rejected,
                    (None, true) => RowState::Sent(r.version),
                    (None, false) => RowState::Pending,
                },
            })
            .collect())
    }

    async fn pending_deletes(&mut self, range: KeyRange) -> anyhow::Result<Vec<(i64, Key)>> {
        let table = self.0.borrow();
        Ok(table
            .deletes
            .iter()
            .map(|(k, t)| (walk_of_key(&table.schema, &t.key), k.clone()))
            .filter(|(w, _)| range.contains(*w))
            .collect())
    }

    async fn rejected(&mut self) -> anyhow::Result<Finding> {
        let table = self.0.borrow();
        let mut finding = Finding::default();
        for (key, _) in table.committed.iter().filter(|(_, r)| r.rejected.is_some()) {
            finding.add(key);
        }
        finding.first_ids.truncate(SAMPLE);
        Ok(finding)
    }

    async fn flag_unsent(&mut self, keys: &[Key]) -> anyhow::Result<Vec<Key>> {
        let mut table = self.0.borrow_mut();
        let mut flagged = Vec::new();
        for key in keys {
            let done = |r: &SimRow| r.sent || r.rejected.is_some();
            if table.locked(&Lockable::Row(key.clone())) || !table.committed.get(key).is_some_and(done) {
                continue;
            }
            let addr = table.new_addr(key);
            let row = table.committed.get_mut(key).expect("checked above");
            row.sent = false;
            row.rejected = None;
            row.addr = addr;
            flagged.push(key.clone());
        }
        Ok(flagged)
    }

    async fn record_deletes(&mut self, keys: &[Vec<Value>]) -> anyhow::Result<Vec<Key>> {
        let mut table = self.0.borrow_mut();
        let schema = table.schema.clone();
        let mut recorded = Vec::new();
        for values in keys {
            let key = schema.key_of_key(values);
            if table.committed.contains_key(&key) || table.locked(&Lockable::Tomb(key.clone())) {
                continue;
            }
            let addr = table.new_addr(&key);
            table.deletes.insert(key.clone(), Tomb { key: values.clone(), addr });
            recorded.push(key);
        }
        Ok(recorded)
    }
}
