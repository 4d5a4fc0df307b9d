//! Simulated PostgreSQL table: committed rows by key with their sent flag,
//! rejection and published version; the outbox of deleted keys; claims that
//! take no lock and hold nothing once they return; flag updates that lock
//! what they flag, skip what a user holds, and flag only the row version
//! that was claimed (a row changed since is left unsent); inserts committed
//! later and out of order; updates, deletes, key changes and re-inserts of
//! deleted keys; commits that fail or whose outcome is lost.
//!
//! Every write makes a new tuple at an address (partition, slot, xmin), as
//! PostgreSQL does (a `ctid` changes on UPDATE, and `xmin` names the
//! transaction that wrote the tuple). A slot is free again as soon as no
//! live tuple holds it, and the lowest free one is taken first: VACUUM may
//! reuse a slot whenever no snapshot needs its dead tuple, and a claim keeps
//! none. Slots repeat across partitions; the outbox is a relation of its
//! own. Flags are set by the whole address, like the real adapter's
//! `(tableoid, ctid, xmin)`; three test-only variants flag by slot alone
//! ([`Table::blind_flags`], the code before partitions were handled), by
//! `(partition, slot)` without the version ([`Table::flags_by_slot`], which
//! flags whatever row took a freed slot), and by key whatever the row's
//! version ([`Table::flags_by_key`], a flag update that does not check the
//! row is still the one published), to show the property search catches
//! each. A claim reads and draws its version in one step, as the real
//! adapter does under its claim lock.
//!
//! The rows already there when `init` ran read sent without having been
//! written (the real column's default, `TRUE`, as a catalogue-only change)
//! and are carried by the initial load: chunks of slot ranges, each read as
//! of one moment with a version drawn as a claim's, held by the session
//! that took it until it commits or dies. A test-only variant
//! ([`Table::load_outranks`]) gives a chunk a version above later claims'.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

use super::{Chaos, yield_now};
use crate::change::Change;
use crate::checksum;
use crate::schema::TableSchema;
use crate::stores::{Claim, Claimed, Outcome, SourceTable, StoreError, StoreResult};
use crate::types::{Key, Value};
use crate::verify::{Finding, KeyRange, RowState, SAMPLE, SourceRow, SourceSide, SourceSummary};

/// A tuple's physical address and version: (partition, slot within the
/// partition, the writing transaction). The outbox is partition -1.
pub type Addr = (i64, u64, u64);

/// The outbox's "partition": a relation of its own.
const OUTBOX: i64 = -1;

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
pub(super) enum Lockable {
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
    /// The last transaction id given to a tuple.
    xids: u64,
    /// The last version a claim drew.
    last_version: u64,
    /// What every claim handed out as a change: (key, version) → the
    /// row's values, or `None` for a deletion. For the properties.
    pub claimed: BTreeMap<(Key, u64), Option<Vec<Value>>>,
    /// Test only: flag rows by slot alone, ignoring the partition.
    pub blind_flags: bool,
    /// Test only: flag rows by key, whatever happened to them since the claim.
    pub flags_by_key: bool,
    /// Test only: flag rows by (partition, slot), without their version.
    pub flags_by_slot: bool,
    /// The initial load's chunks still to carry: (partition, first slot) →
    /// the slot past the last, and the session holding it.
    pub chunks: BTreeMap<(i64, u64), (u64, Option<u32>)>,
    /// Test only: a chunk's version outranks the claims that follow it.
    pub load_outranks: bool,
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
            xids: 0,
            last_version: 0,
            claimed: BTreeMap::new(),
            blind_flags: false,
            flags_by_key: false,
            flags_by_slot: false,
            chunks: BTreeMap::new(),
            load_outranks: false,
        }
    }

    /// The rows that were there when `init` ran: committed, reading sent
    /// (version 0, never written), carried by chunks of `chunk_slots` slots
    /// covering every slot they hold. A key that exists is skipped.
    pub fn preload(&mut self, rows: Vec<Vec<Value>>, chunk_slots: u64) {
        for values in rows {
            let key = self.schema.key_of(&values);
            if self.committed.contains_key(&key) {
                continue;
            }
            let addr = self.new_addr(&key);
            self.committed.insert(key, SimRow { values, sent: true, rejected: None, version: 0, addr });
        }
        let step = chunk_slots.max(1);
        for partition in 0..self.partitions {
            let end = self.committed.values().filter(|r| r.addr.0 == partition).map(|r| r.addr.1 + 1).max();
            let mut first = 1;
            while first < end.unwrap_or(0) {
                self.chunks.insert((partition, first), (first + step, None));
                first += step;
            }
        }
    }

    /// Whether a tuple at `addr` lies in a chunk still to carry.
    pub fn pending_load(&self, addr: Addr) -> bool {
        self.chunks
            .range(..=(addr.0, addr.1))
            .next_back()
            .is_some_and(|((p, _), (end, _))| *p == addr.0 && addr.1 < *end)
    }

    /// Whether a row counts as sent: flagged, and not waiting for its chunk.
    pub fn counts_sent(&self, row: &SimRow) -> bool {
        row.sent && !self.pending_load(row.addr)
    }

    /// Lets go of the chunks `session` holds (it died, or its connection did).
    fn free_chunks(&mut self, session: u32) {
        for (_, taker) in self.chunks.values_mut() {
            if *taker == Some(session) {
                *taker = None;
            }
        }
    }

    /// Skips versions, as if claims had happened elsewhere (tests plant
    /// changes with versions above those handed out so far).
    pub fn advance_versions(&mut self, n: u64) {
        self.last_version += n;
    }

    /// The address of a new tuple of `key` in the table.
    fn new_addr(&mut self, key: &Key) -> Addr {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        self.new_addr_in((h.finish() % self.partitions as u64) as i64)
    }

    /// The address of a new tuple in `partition`: the lowest slot no live
    /// tuple holds (the tuple being replaced still holds its own), and a
    /// new transaction id.
    fn new_addr_in(&mut self, partition: i64) -> Addr {
        let used: std::collections::BTreeSet<u64> = self
            .committed
            .values()
            .map(|r| r.addr)
            .chain(self.deletes.values().map(|t| t.addr))
            .filter(|a| a.0 == partition)
            .map(|a| a.1)
            .collect();
        let slot = (1..).find(|s| !used.contains(s)).expect("a free slot");
        self.xids += 1;
        (partition, slot, self.xids)
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
        let addr = self.new_addr_in(OUTBOX);
        self.deletes.insert(key.clone(), Tomb { key: key_values, addr });
    }

    fn release(&mut self, session: u32) {
        self.locks.retain(|_, holder| *holder != session);
    }

    /// The rows a flag update of the claimed row `key` at `addr` finds: the
    /// row if it is still that version, or what a test-only variant finds.
    fn flag_targets(&self, key: &Key, addr: Addr) -> Vec<Key> {
        let find = |matches: &dyn Fn(Addr) -> bool| -> Vec<Key> {
            self.committed.iter().filter(|(_, r)| matches(r.addr)).map(|(k, _)| k.clone()).collect()
        };
        if self.flags_by_key {
            self.committed.contains_key(key).then(|| key.clone()).into_iter().collect()
        } else if self.blind_flags {
            find(&|a| a.1 == addr.1)
        } else if self.flags_by_slot {
            find(&|a| (a.0, a.1) == (addr.0, addr.1))
        } else {
            self.committed.get(key).filter(|r| r.addr == addr).map(|_| key.clone()).into_iter().collect()
        }
    }

    /// Hands out a row in a claim (or chunk) at `version`: to send, or to
    /// reject; and records what the claim publishes for its key (the row,
    /// or, for a row that cannot travel, here or for its size, its deletion).
    fn hand_out(
        &mut self,
        schema: &TableSchema,
        key: Key,
        row: &SimRow,
        version: u64,
        claim: &mut Claim,
        items: &mut Vec<Item>,
    ) {
        let outcome = match schema.check_row(&row.values) {
            Ok(()) => Outcome::Send(Change::upsert(row.values.clone(), version)),
            Err(reason) => Outcome::Reject { reason, key: schema.key.iter().map(|i| row.values[*i].clone()).collect() },
        };
        let sent = Table::travels(schema, &row.values).is_ok().then(|| row.values.clone());
        self.claimed.insert((key.clone(), version), sent);
        items.push(Item::Row { key: key.clone(), addr: row.addr });
        claim.items.push(Claimed { key, outcome });
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
    /// The open claim: its version and items; `None` without one.
    pub(super) open: Option<(u64, Vec<Item>)>,
    /// What the flag transaction locked to flag sent, applied at commit.
    pub(super) marked: Vec<Lockable>,
    /// What it locked to flag rejected, with the reason.
    pub(super) rejected: Vec<(Lockable, String)>,
    /// The chunk the open claim is, if it is one.
    pub(super) chunk: Option<(i64, u64)>,
}

impl SimSource {
    /// Ends the open claim, if any (a rollback): the session lives on, and
    /// keeps the chunk it took (its next chunk read takes it again).
    fn end_claim(&mut self) {
        self.open = None;
        self.chunk = None;
        self.marked.clear();
        self.rejected.clear();
        self.table.borrow_mut().release(self.session);
    }

    /// A failed call: the connection ends, and with it the session's locks
    /// and its hold on a chunk.
    fn abort(&mut self) {
        self.end_claim();
        self.table.borrow_mut().free_chunks(self.session);
    }

    /// Takes the first chunk no other session holds and reads it as one
    /// claim: every row whose tuple lies in its slots, whatever its flag.
    fn read_chunk(&mut self) -> Option<Claim> {
        let mut table = self.table.borrow_mut();
        let session = self.session;
        let (&id, _) = table.chunks.iter().find(|(_, (_, taker))| taker.is_none_or(|t| t == session))?;
        let end = {
            let chunk = table.chunks.get_mut(&id).expect("found above");
            chunk.1 = Some(session);
            chunk.0
        };
        table.last_version += 1;
        let version = if table.load_outranks { table.last_version + 1_000 } else { table.last_version };
        let schema = table.schema.clone();
        let rows: Vec<(Key, SimRow)> = table
            .committed
            .iter()
            .filter(|(_, r)| r.addr.0 == id.0 && (id.1..end).contains(&r.addr.1))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        let mut claim = Claim { version, items: Vec::new(), horizon: None };
        let mut items = Vec::new();
        for (key, row) in rows {
            table.hand_out(&schema, key, &row, version, &mut claim, &mut items);
        }
        self.open = Some((version, items));
        self.chunk = Some(id);
        self.chaos.note(&("chunk", self.session, id, claim.len()));
        Some(claim)
    }

    /// The flag transaction's `SELECT … FOR NO KEY UPDATE SKIP LOCKED` of
    /// these items: each one that is still the version claimed and that no
    /// other session holds is locked and returned; the rest are skipped (a
    /// row changed since its claim stays unsent and goes again). It never
    /// waits and never fails.
    fn lock_for_update(&mut self, items: &[usize]) -> StoreResult<Vec<Lockable>> {
        let Some((_, claimed)) = &self.open else {
            return Err(StoreError::transient("simulated: flag update without a claim"));
        };
        let mut table = self.table.borrow_mut();
        let mut locked = Vec::new();
        for i in items {
            let targets = match &claimed[*i] {
                Item::Row { key, addr } => table.flag_targets(key, *addr).into_iter().map(Lockable::Row).collect(),
                Item::Tomb { key, addr } => match table.deletes.get(key) {
                    Some(t) if t.addr == *addr => vec![Lockable::Tomb(key.clone())],
                    _ => vec![],
                },
            };
            for target in targets {
                match table.locks.get(&target) {
                    Some(holder) if *holder != self.session => continue,
                    Some(_) => {}
                    None => {
                        table.locks.insert(target.clone(), self.session);
                    }
                }
                if !locked.contains(&target) {
                    locked.push(target);
                }
            }
        }
        Ok(locked)
    }

    /// The claim's queries: unsent rows and deleted keys above `after` as
    /// of now, in key order, all given one new version. Nothing is locked.
    fn read_claim(&mut self, after: Option<&Key>, limit: usize) -> Claim {
        let mut table = self.table.borrow_mut();
        table.last_version += 1;
        let version = table.last_version;
        let schema = table.schema.clone();
        let above = |k: &Key| after.is_none_or(|a| k > a);
        let rows: Vec<(Key, SimRow)> = table
            .committed
            .iter()
            .filter(|(k, r)| above(k) && !r.sent && r.rejected.is_none())
            .take(limit)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        let tombs: Vec<(Key, Tomb)> =
            table.deletes.iter().filter(|(k, _)| above(k)).take(limit).map(|(k, t)| (k.clone(), t.clone())).collect();
        // As the real claim: a list that came back full ends where it does
        // (keys past its last are the next claim's), and the rest is merged
        // in key order, a row before a deletion of the same key (so a claim
        // may hold `limit` rows and one deletion more), cut at the horizon.
        let horizon = Claim::horizon_of(
            limit,
            [(rows.len(), rows.last().map(|(k, _)| k)), (tombs.len(), tombs.last().map(|(k, _)| k))],
        );
        let mut merged: Vec<(Key, Result<SimRow, Tomb>)> =
            rows.into_iter().map(|(k, r)| (k, Ok(r))).chain(tombs.into_iter().map(|(k, t)| (k, Err(t)))).collect();
        merged.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.is_err().cmp(&b.1.is_err())));
        merged.retain(|(k, _)| Claim::keeps(horizon.as_ref(), k));
        let mut claim = Claim { version, items: Vec::new(), horizon };
        let mut items = Vec::new();
        for (key, what) in merged {
            match what {
                Ok(row) => table.hand_out(&schema, key, &row, version, &mut claim, &mut items),
                Err(tomb) => {
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
        let mut table = self.table.borrow_mut();
        table.release(self.session);
        table.free_chunks(self.session);
    }
}

impl SourceTable for SimSource {
    async fn claim(&mut self, after: Option<&Key>, limit: usize) -> StoreResult<Claim> {
        yield_now().await;
        self.end_claim();
        if self.chaos.fails("pg.claim") {
            return Err(StoreError::transient("simulated: claim failed"));
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

    async fn load(&mut self) -> StoreResult<Option<Claim>> {
        yield_now().await;
        self.end_claim();
        if self.table.borrow().chunks.is_empty() {
            return Ok(None);
        }
        if self.chaos.fails("pg.load") {
            self.abort();
            return Err(StoreError::transient("simulated: chunk read failed"));
        }
        let chunk = self.read_chunk();
        for _ in 0..self.chaos.below(8) {
            yield_now().await;
        }
        Ok(chunk)
    }

    async fn mark_sent(&mut self, items: &[usize]) -> StoreResult<()> {
        yield_now().await;
        if self.open.is_none() {
            return Err(StoreError::transient("simulated: mark_sent without a claim"));
        }
        if self.chaos.fails("pg.mark") {
            self.abort();
            return Err(StoreError::transient("simulated: update failed"));
        }
        if self.chunk.is_some() {
            // A chunk's rows already read sent: nothing to write to them.
            return Ok(());
        }
        let locked = self.lock_for_update(items)?;
        self.marked.extend(locked);
        Ok(())
    }

    async fn reject(&mut self, items: &[(usize, String)]) -> StoreResult<()> {
        yield_now().await;
        if self.open.is_none() {
            return Err(StoreError::transient("simulated: reject without a claim"));
        }
        if self.chaos.fails("pg.reject") {
            self.abort();
            return Err(StoreError::transient("simulated: update failed"));
        }
        for (i, reason) in items {
            let locked = self.lock_for_update(&[*i])?;
            self.rejected.extend(locked.into_iter().map(|l| (l, reason.clone())));
        }
        Ok(())
    }

    async fn commit(&mut self) -> StoreResult<()> {
        yield_now().await;
        let Some((version, _)) = self.open.take() else {
            return Err(StoreError::transient("simulated: commit without a claim"));
        };
        if self.chaos.fails("pg.commit") {
            self.abort();
            return Err(StoreError::transient("simulated: commit failed"));
        }
        let marked = std::mem::take(&mut self.marked);
        let rejected = std::mem::take(&mut self.rejected);
        {
            let mut table = self.table.borrow_mut();
            if let Some(id) = self.chunk.take()
                && table.chunks.get(&id).is_some_and(|(_, taker)| *taker == Some(self.session))
            {
                table.chunks.remove(&id);
            }
            // Each target is locked by this session: unchanged since it was.
            for target in &marked {
                match target {
                    Lockable::Row(key) => {
                        let addr = table.new_addr(key);
                        if let Some(row) = table.committed.get_mut(key) {
                            row.sent = true;
                            row.version = version;
                            row.addr = addr;
                        }
                    }
                    Lockable::Tomb(key) => {
                        table.deletes.remove(key);
                    }
                }
            }
            for (target, reason) in &rejected {
                match target {
                    Lockable::Row(key) => {
                        let fresh = table.new_addr(key);
                        if let Some(row) = table.committed.get_mut(key) {
                            row.rejected = Some(reason.clone());
                            row.sent = false;
                            row.addr = fresh;
                        }
                    }
                    // A deletion that cannot be sent cannot have been
                    // preceded by a row that was: it goes.
                    Lockable::Tomb(key) => {
                        table.deletes.remove(key);
                    }
                }
            }
            table.release(self.session);
        }
        self.chaos.note(&("commit", self.session, marked.len()));
        if self.chaos.outcome_lost("pg.commit") {
            return Err(StoreError::unknown("simulated: commit outcome unknown"));
        }
        Ok(())
    }

    async fn rollback(&mut self) -> StoreResult<()> {
        yield_now().await;
        self.end_claim();
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
            if table.counts_sent(row) {
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
                state: match (&r.rejected, table.counts_sent(r)) {
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
            let done = |r: &SimRow| table.counts_sent(r) || r.rejected.is_some();
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
            let addr = table.new_addr_in(OUTBOX);
            table.deletes.insert(key.clone(), Tomb { key: values.clone(), addr });
            recorded.push(key);
        }
        Ok(recorded)
    }
}
