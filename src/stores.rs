//! The three stores the pipeline talks to, as small traits.
//!
//! The pipeline ([`crate::pipeline`]) is written against these and nothing else,
//! so the same decisions run against PostgreSQL, Kafka and ClickHouse
//! (`postgres/`, `kafka.rs`, `clickhouse/`) and against the simulated
//! stores of the crash-replay harness. Every method may fail with a
//! [`StoreError`] whose kind the adapter chose; a failure may also mean
//! "outcome unknown" (a timeout after the server acted), and the pipeline
//! is written so that both readings are safe.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub use crate::error::{ErrorKind, StoreContext, StoreError, StoreResult, kind};

use crate::change::Change;
use crate::types::{Key, Value};

/// Whether other producer processes may work on a table beside this one.
/// Claims take no row lock in either mode, and hold nothing (no lock, no
/// snapshot) while their rows are published: a user's transaction never
/// waits for the broker. A process's lanes keep apart through their shared
/// cursor. Correctness rests on neither mode: a row changed between claim
/// and flag is left unsent (it goes again), and a row published twice is
/// collapsed by key and version in the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClaimMode {
    /// Several producer processes may run side by side. Two of them may
    /// claim the same rows at once and publish them twice (harmless, but
    /// double work): one process with several lanes is the efficient shape.
    #[default]
    Shared,
    /// This process is the only producer at work (the real adapter holds
    /// an advisory lock to make sure): no work is done twice.
    Exclusive,
}

/// The source table: rows with a `sent_to_kafka` flag, and the keys deleted
/// from it that are still to be sent.
///
/// One value is one producer's session: at most one claim is open at a time,
/// from [`claim`](Self::claim) until [`commit`](Self::commit) or
/// [`rollback`](Self::rollback). Dropping the value abandons the claim, as a
/// crashed process would.
#[allow(async_fn_in_trait)]
pub trait SourceTable {
    /// Claims up to `limit` unsent, unrejected rows and deleted keys with a
    /// key above `after` (all of them from the start when `None`), in key
    /// order, as of one snapshot, and gives them one version, higher than
    /// that of any claim before. It locks nothing and, once it returns,
    /// holds nothing on the server. A row that cannot be represented
    /// downstream comes back with the reason instead of a change.
    async fn claim(&mut self, after: Option<&Key>, limit: usize) -> StoreResult<Claim>;
    /// Takes the next chunk of the table's initial load, if one is left
    /// that no live session holds: the rows that were in the table when
    /// `init` added pg2ch (they read `sent_to_kafka = TRUE` without having
    /// been written) in one range of their physical addresses, as of one
    /// snapshot, with one version drawn as a claim's is (so a change made
    /// after the read is claimed later, with a higher version, and wins).
    /// The chunk is then the open claim: [`mark_sent`](Self::mark_sent) of
    /// its items writes nothing to their rows, and [`commit`](Self::commit)
    /// records the chunk as carried. `None` once no chunk is free.
    async fn load(&mut self) -> StoreResult<Option<Claim>>;
    /// In the claim's flag transaction (opened here, not yet visible to
    /// others), flags these items sent: each row only if it is still the
    /// row version claimed (its address and the transaction that wrote
    /// it), each deleted key by removing its outbox entry if that is still
    /// the one claimed. An item changed since the claim, or held by another
    /// session's lock, is skipped and stays unsent: it goes again. Never
    /// waits for a user's lock.
    async fn mark_sent(&mut self, items: &[usize]) -> StoreResult<()>;
    /// Flags these items of the open claim rejected, with the reason, under
    /// the same rule. Rejected rows are never claimed again until their
    /// content changes.
    async fn reject(&mut self, items: &[(usize, String)]) -> StoreResult<()>;
    /// Commits the flag transaction. An error may mean it happened anyway.
    async fn commit(&mut self) -> StoreResult<()>;
    /// Abandons the open claim, if any: nothing is flagged.
    async fn rollback(&mut self) -> StoreResult<()>;
}

/// What one claim handed out, in key order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claim {
    /// The version of every change in this claim.
    pub version: u64,
    pub items: Vec<Claimed>,
    /// Where the claim's pass goes on: `Some(k)` when a list came back full,
    /// and then the claim holds every unsent change from its first key up
    /// to `k`, and nothing past it; the next claim starts after `k`.
    /// `None`: nothing unsent lies past the claim, and the pass is over.
    pub horizon: Option<Key>,
}

/// One claimed row or deleted key, and what to do with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub key: Key,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Publish this change.
    Send(Change),
    /// The row cannot be represented downstream: flag it rejected with
    /// this reason, and delete its key downstream (whatever an earlier
    /// version left there). `key` holds the key's values.
    Reject { reason: String, key: Vec<Value> },
    /// The deletion of a key that exists again: nothing to publish (the
    /// row's own change, of a later claim, supersedes every earlier one);
    /// cleared with the claim.
    Superseded,
}

impl Claim {
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The horizon of a claim read as lists each limited to `limit` items
    /// (given as each list's length and last key): the lowest last key of
    /// the lists that came back full, `None` when none did.
    pub fn horizon_of<'k>(limit: usize, lists: impl IntoIterator<Item = (usize, Option<&'k Key>)>) -> Option<Key> {
        lists.into_iter().filter(|(n, _)| *n >= limit).filter_map(|(_, last)| last).min().cloned()
    }

    /// Whether a claim with `horizon` keeps an item at `key` its lists
    /// returned: it is cut at the horizon (what lies past it is the next
    /// claim's).
    pub fn keeps(horizon: Option<&Key>, key: &Key) -> bool {
        horizon.is_none_or(|h| key <= h)
    }
}

/// One record to append: key and value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A record read back, with its offset. The value is optional as in Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedRecord {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The record's timestamp (milliseconds), as the producer set it.
    pub timestamp_ms: i64,
}

impl FetchedRecord {
    /// A stable 64-bit digest of the record (XXH64 of its offset, timestamp,
    /// key and value), stored with the consumer's position so that a log
    /// that was replaced under it (topic deleted and created again, broker
    /// storage lost) is recognised instead of read from the wrong place.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::Hasher;
        let mut h = twox_hash::XxHash64::with_seed(0);
        h.write(&self.offset.to_le_bytes());
        h.write(&self.timestamp_ms.to_le_bytes());
        for part in [&self.key, &self.value] {
            match part {
                None => h.write(&[0]),
                Some(bytes) => {
                    h.write(&[1]);
                    h.write(&(bytes.len() as u64).to_le_bytes());
                    h.write(bytes);
                }
            }
        }
        h.finish()
    }
}

/// Where a consumer stands in one partition: the next offset to read, and
/// the fingerprint of the record just before it (`None` at offset 0, or when
/// stored by a pg2ch that kept none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub next: i64,
    pub last: Option<u64>,
}

/// A record the consumer could not decode, forwarded unchanged to the
/// dead-letter topic with why and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub reason: String,
}

/// What one fetch returned. Brokers return whole batches, so `records` may
/// start before the requested offset; `high_watermark` is the offset the next
/// appended record will get.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    pub records: Vec<FetchedRecord>,
    pub high_watermark: i64,
}

/// The log: a topic with a fixed number of partitions.
#[allow(async_fn_in_trait)]
pub trait EventLog {
    /// Number of partitions of the topic, fixed for the life of the value.
    fn partitions(&self) -> i32;
    /// Appends records to one partition and returns once the broker
    /// acknowledged them (acks=all). An error may mean they were appended anyway.
    async fn append(&self, partition: i32, records: Vec<LogRecord>) -> StoreResult<()>;
    /// Reads from `offset`, waiting at most `max_wait` for data to arrive.
    /// A position outside the log fails permanently.
    async fn fetch(&self, partition: i32, offset: i64, max_wait: Duration) -> StoreResult<Fetched>;
    /// The record at `offset`, if the log has one there (one small fetch,
    /// no waiting).
    async fn record_at(&self, partition: i32, offset: i64) -> StoreResult<Option<FetchedRecord>>;
    /// Appends undecodable records to the topic's dead-letter topic
    /// (`<topic>.dlq`). An error may mean they were appended anyway.
    async fn dead_letter(&self, letters: Vec<DeadLetter>) -> StoreResult<()>;
}

/// Several producers in one process share one log.
impl<T: EventLog> EventLog for &T {
    fn partitions(&self) -> i32 {
        (**self).partitions()
    }
    async fn append(&self, partition: i32, records: Vec<LogRecord>) -> StoreResult<()> {
        (**self).append(partition, records).await
    }
    async fn fetch(&self, partition: i32, offset: i64, max_wait: Duration) -> StoreResult<Fetched> {
        (**self).fetch(partition, offset, max_wait).await
    }
    async fn record_at(&self, partition: i32, offset: i64) -> StoreResult<Option<FetchedRecord>> {
        (**self).record_at(partition, offset).await
    }
    async fn dead_letter(&self, letters: Vec<DeadLetter>) -> StoreResult<()> {
        (**self).dead_letter(letters).await
    }
}

/// The sink table and the consumer's remembered positions, both in ClickHouse.
#[allow(async_fn_in_trait)]
pub trait Sink {
    /// Where this consumer group stands, per partition, as last stored.
    async fn positions(&mut self) -> StoreResult<BTreeMap<i32, Position>>;
    /// Inserts changes. The table keeps each key's highest version, so
    /// writing a change twice, or an older one after a newer, is harmless.
    async fn write(&mut self, changes: &[Change]) -> StoreResult<()>;
    /// Remembers where the consumer stands in these partitions.
    async fn store_positions(&mut self, positions: &BTreeMap<i32, Position>) -> StoreResult<()>;
}

/// The members of a consumer group as the leases see them: each live
/// member's id, in order, and this member's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    pub me: u32,
    pub all: Vec<u32>,
}

impl Members {
    /// The partitions (of `candidates`) that are this member's fair share:
    /// those whose position among the candidates, modulo the number of
    /// members, is this member's rank. Every member computes the same split
    /// from the same membership, so each partition has one owner.
    pub fn share(&self, candidates: &[i32]) -> BTreeSet<i32> {
        let Some(rank) = self.all.iter().position(|m| *m == self.me) else { return BTreeSet::new() };
        let n = self.all.len();
        candidates.iter().enumerate().filter(|(i, _)| i % n == rank).map(|(_, p)| *p).collect()
    }
}

/// Leases on a topic's partitions, for the consumers of one group: a
/// partition is written by the member holding its lease, one at a time, and
/// a member's leases die with it (its process ends, or it stops renewing
/// them for longer than they live).
#[allow(async_fn_in_trait)]
pub trait Leases {
    /// Renews this member's presence, joining the group again if its leases
    /// died, and returns the group's live members.
    async fn members(&mut self) -> StoreResult<Members>;
    /// Takes partition `p`'s lease if no member holds it; whether this
    /// member holds it now.
    async fn take(&mut self, p: i32) -> StoreResult<bool>;
    /// Lets go of partition `p`'s lease.
    async fn release(&mut self, p: i32) -> StoreResult<()>;
    /// The partitions whose leases this member holds now: none once its
    /// leases died, whatever it took before.
    async fn held(&mut self) -> StoreResult<BTreeSet<i32>>;
}

/// No leases: the consumer holds the partitions it was configured with, for
/// ever (a harness that runs one consumer; `Members` of one).
#[derive(Debug, Clone, Default)]
pub struct Unleased(pub BTreeSet<i32>);

impl Leases for Unleased {
    async fn members(&mut self) -> StoreResult<Members> {
        Ok(Members { me: 0, all: vec![0] })
    }
    async fn take(&mut self, p: i32) -> StoreResult<bool> {
        self.0.insert(p);
        Ok(true)
    }
    async fn release(&mut self, p: i32) -> StoreResult<()> {
        self.0.remove(&p);
        Ok(())
    }
    async fn held(&mut self) -> StoreResult<BTreeSet<i32>> {
        Ok(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::types::strategies::config(256))]

        /// Whatever the members (any ids, in any order, with gaps) and the
        /// partitions a consumer may read: every partition has exactly one
        /// owner among the members, and shares differ by one at most.
        #[test]
        fn every_partition_has_one_owner_and_shares_are_fair(
            ids in proptest::collection::btree_set(any::<u32>(), 1..8),
            candidates in proptest::collection::btree_set(0..=i32::MAX, 0..40),
        ) {
            let all: Vec<u32> = ids.iter().copied().collect();
            let candidates: Vec<i32> = candidates.into_iter().collect();
            let shares: Vec<BTreeSet<i32>> =
                all.iter().map(|me| Members { me: *me, all: all.clone() }.share(&candidates)).collect();
            for p in &candidates {
                prop_assert_eq!(shares.iter().filter(|s| s.contains(p)).count(), 1, "partition {}", p);
            }
            prop_assert_eq!(shares.iter().map(BTreeSet::len).sum::<usize>(), candidates.len());
            let (least, most) = (shares.iter().map(BTreeSet::len).min(), shares.iter().map(BTreeSet::len).max());
            prop_assert!(most.unwrap_or(0) - least.unwrap_or(0) <= 1, "{:?}", shares);
            // A member the others do not list (its membership died) owns nothing.
            let others: Vec<u32> = all.iter().copied().filter(|m| *m != u32::MAX).collect();
            let gone = Members { me: u32::MAX, all: others }.share(&candidates);
            prop_assert!(gone.is_empty(), "{:?}", gone);
        }
    }
}
