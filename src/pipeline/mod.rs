//! Every decision pg2ch makes, in one place: claim, publish, mark, fetch,
//! write, remember the position.
//!
//! Written against the traits in [`crate::stores`], so the real adapters and
//! the simulated stores run exactly this code. Each step is a sequence of store
//! calls with a named [`CrashPoint`] between them; [`Faults`] decides whether
//! the process "dies" there. A crash drops the component's memory (cursor,
//! cached positions, open claim); the stores keep what they committed.
//!
//! Why the order is safe:
//! - The producer marks rows sent only after the broker acknowledged every
//!   partition, and marking happens in the claim's transaction. A failure or
//!   crash anywhere before the commit leaves the rows unsent, so they are
//!   published again (a duplicate in the log, never a gap). Lanes sharing a
//!   cursor never publish each other's rows; producers that do not share one
//!   are kept apart by row locks, and where claims take none (exclusive), a
//!   row changed by another since the claim fails the mark.
//! - Every claim gives its changes one version, higher than any earlier
//!   claim's (the source serialises claims briefly to make it so), and the
//!   sink keeps each key's highest version. A change published twice, or
//!   an older one arriving after a newer one, is therefore harmless; and a
//!   row is flagged sent only if it is still the version that was published.
//! - The consumer stores its position only after the rows are in ClickHouse.
//!   A crash in between replays those records; the sink collapses them by key.
//! - Consumers of one group share the partitions through [`Leases`]: each
//!   writes only partitions whose lease it holds, checked after every fetch,
//!   right before the write, and hands a partition over only after storing
//!   its position. Stored positions only move forward (the sink keeps each
//!   partition's highest), so a member that lost its lease while paused
//!   between the check and the write writes rows older than the new
//!   holder's at worst, which the versions make harmless.
//!
//! How the steps repeat (retries, backoff, `--once`, idle waits) is in
//! [`loops`], which the simulation runs too.

pub mod loops;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::change::{self, Change, DecodeError};
use crate::schema::TableSchema;
use crate::stores::{
    DeadLetter, ErrorKind, EventLog, Fetched, Leases, LogRecord, Outcome, Permanent, Position, Sink, SourceTable,
    Unleased, kind,
};
use crate::types::{Key, key_text};

/// The places where a component may die between two store calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrashPoint {
    /// Rows are locked; nothing published yet.
    AfterClaim,
    /// Some partitions have acknowledged, others not yet.
    MidPublish,
    /// Every partition acknowledged; the flags are not updated.
    AfterAck,
    /// Flags updated inside the transaction; not committed.
    AfterMark,
    /// Committed; the producer has not moved its cursor.
    AfterCommit,
    /// Consumer fetched records; nothing written.
    AfterFetch,
    /// Some insert chunks written, not all.
    MidWrite,
    /// All rows written; position not stored.
    AfterWrite,
    /// Position stored; in-memory position not yet advanced.
    AfterStorePosition,
}

impl CrashPoint {
    pub const ALL: [CrashPoint; 9] = [
        CrashPoint::AfterClaim,
        CrashPoint::MidPublish,
        CrashPoint::AfterAck,
        CrashPoint::AfterMark,
        CrashPoint::AfterCommit,
        CrashPoint::AfterFetch,
        CrashPoint::MidWrite,
        CrashPoint::AfterWrite,
        CrashPoint::AfterStorePosition,
    ];

    pub fn is_producer(self) -> bool {
        matches!(
            self,
            CrashPoint::AfterClaim
                | CrashPoint::MidPublish
                | CrashPoint::AfterAck
                | CrashPoint::AfterMark
                | CrashPoint::AfterCommit
        )
    }
}

/// The error a component returns when [`Faults`] killed it. Callers treat it
/// as the end of the component: drop it and build a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("crash injected at {0:?}")]
pub struct Crashed(pub CrashPoint);

/// Decides, at each crash point, whether the component dies there.
pub trait Faults {
    fn at(&self, point: CrashPoint) -> Result<(), Crashed>;
}

/// Production: nobody dies on purpose.
pub struct NoFaults;

impl Faults for NoFaults {
    fn at(&self, _: CrashPoint) -> Result<(), Crashed> {
        Ok(())
    }
}

/// Whether an error is an injected crash rather than a store failure.
pub fn is_crash(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Crashed>().is_some()
}

/// A claim made into records.
struct Encoded {
    /// Each item's key, in the claim's order (its changes are gone: they
    /// are the records now, and a lane holds one copy of a batch, not two).
    keys: Vec<Key>,
    /// Items done once the records are acknowledged (published, or
    /// superseded: nothing to publish).
    published: Vec<usize>,
    /// Items that cannot be represented, with why.
    rejected: Vec<(usize, String)>,
    records: BTreeMap<i32, Vec<LogRecord>>,
    /// Bytes of the records' keys and values.
    bytes: usize,
}

/// The records of a claim's changes (the items in `mine`), by partition. A
/// row that cannot be represented (rejected by the source, or too large to
/// publish) is on the rejected list, and its key's deletion is published
/// instead, so that nothing an earlier version left downstream stays.
fn encode(schema: &TableSchema, claim: crate::stores::Claim, mine: &[usize], partitions: i32) -> Encoded {
    let version = claim.version;
    let (keys, mut outcomes): (Vec<Key>, Vec<Option<Outcome>>) =
        claim.items.into_iter().map(|c| (c.key, Some(c.outcome))).unzip();
    let mut out = Encoded {
        keys: Vec::new(),
        published: Vec::with_capacity(mine.len()),
        rejected: Vec::new(),
        records: BTreeMap::new(),
        bytes: 0,
    };
    let (records, bytes) = (&mut out.records, &mut out.bytes);
    let mut record = |change: &Change, key: &Key| {
        let value = change::encode(schema, change);
        if let Some(reason) = change::oversize(&value, change.version) {
            return Err(reason);
        }
        let key_bytes = change::key_bytes(schema, change);
        let p = change::partition_for(schema, key, &key_bytes, partitions);
        *bytes += key_bytes.len() + value.len();
        records.entry(p).or_default().push(LogRecord { key: key_bytes, value });
        Ok(())
    };
    for &i in mine {
        let Some(outcome) = outcomes[i].take() else { continue };
        let key = &keys[i];
        let deletion = |key: &[crate::types::Value]| Change::delete(schema, key.to_vec(), version);
        match outcome {
            Outcome::Send(change) => match record(&change, key) {
                Ok(()) => out.published.push(i),
                Err(reason) => {
                    out.rejected.push((i, reason));
                    let values: Vec<_> = schema.key.iter().map(|k| change.values[*k].clone()).collect();
                    if !change.deleted {
                        let _ = record(&deletion(&values), key);
                    }
                }
            },
            Outcome::Reject { reason, key: values } => {
                out.rejected.push((i, reason));
                // A key that cannot travel (invalid text) was never sent.
                if schema.key_columns().zip(&values).all(|(c, v)| crate::types::check(&c.ty, v).is_ok()) {
                    let _ = record(&deletion(&values), key);
                }
            }
            Outcome::Superseded => out.published.push(i),
        }
    }
    drop(outcomes);
    out.keys = keys;
    out
}

/// Test-only wrong orderings, to show the harness catches them. Not compiled
/// into the release binary.
#[cfg(any(test, feature = "broken-orderings"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    #[default]
    Correct,
    /// Flag rows sent (and commit) before publishing them.
    MarkBeforePublish,
    /// Store the consumer position before writing the rows.
    PositionBeforeWrite,
    /// Drop the record at the stored position (`offset > start`), which
    /// leaves a partition's last record unread for ever: a liveness bug.
    SkipRecordAtPosition,
}

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Most rows claimed, published and marked together.
    pub batch_rows: usize,
    /// About how many bytes of messages a claim may make: claims of wide
    /// rows hold fewer of them, so a lane's memory is bounded by bytes
    /// whatever the rows' width. The first claim holds [`FIRST_CLAIM_ROWS`]
    /// rows; each next one as many as the last one's average message size
    /// fits in this budget (at most four times the last, at most `batch_rows`).
    pub batch_bytes: usize,
    #[cfg(any(test, feature = "broken-orderings"))]
    pub ordering: Ordering,
}

/// Rows in a lane's first claim, before it knows how wide they are.
pub const FIRST_CLAIM_ROWS: usize = 64;

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            batch_rows: 10_000,
            batch_bytes: 2 << 20,
            #[cfg(any(test, feature = "broken-orderings"))]
            ordering: Ordering::Correct,
        }
    }
}

impl ProducerConfig {
    /// The rows to claim next, after a claim of `rows` rows whose messages
    /// came to `bytes` bytes and that asked for `asked`.
    pub fn next_limit(&self, asked: usize, rows: usize, bytes: usize) -> usize {
        let most = self.batch_rows.max(1);
        if rows == 0 {
            return asked.clamp(1, most);
        }
        let fits = self.batch_bytes / bytes.div_ceil(rows).max(1);
        fits.clamp(1, asked.saturating_mul(4).clamp(1, most))
    }
}

/// What one producer step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceStep {
    /// Published and marked this many rows; 0 when a pass ended with nothing
    /// left above the cursor (the next step starts a new pass), or when every
    /// row claimed was in a sibling lane's open batch.
    Moved(usize),
    /// Nothing unsent and unlocked is visible: the table is drained (for now).
    Idle,
}

/// Keyset cursor: claim keys above `after` (all of them at the start of a
/// pass). It wraps to the start whenever a claim comes back short, so rows
/// whose keys committed out of order, or that changed again behind the
/// cursor, are found on the next pass instead of being skipped for ever.
/// Producers in one process (lanes) may share one: they claim one at a time,
/// each after the rows the others hold, and a claim drops the rows of any
/// key range a sibling held when the claim began (not when it returned: a
/// sibling that commits in between has flagged rows the claim's snapshot
/// still shows unsent). That last rule is what keeps lanes apart when claims
/// take no row locks (an exclusive producer) and a new pass starts over while
/// a sibling's batch is still in flight. The position is only a hint: the
/// wrap-around keeps claims complete whatever it says. Keys compare in
/// memory as PostgreSQL orders them in pg2ch's index (see [`crate::types::KeyPart`]).
pub struct KeysetCursor {
    after: RefCell<Option<Key>>,
    /// Completed passes: each wrap means every row that was visible, unsent
    /// and not held elsewhere when the pass began has been claimed by a sharer.
    passes: Cell<u64>,
    /// Held from the start of a claim until the cursor has moved past it,
    /// so that a sharer's claim starts after this one's rows instead of
    /// reading them again (without row locks it would; `held` makes that
    /// harmless, this makes it rare).
    turn: futures::lock::Mutex<()>,
    /// Lowest and highest key of each sharer's open claim, by lane.
    held: RefCell<BTreeMap<u64, (Key, Key)>>,
    lanes: Cell<u64>,
}

impl Default for KeysetCursor {
    fn default() -> Self {
        KeysetCursor {
            after: RefCell::new(None),
            passes: Cell::default(),
            turn: futures::lock::Mutex::default(),
            held: RefCell::default(),
            lanes: Cell::default(),
        }
    }
}

impl KeysetCursor {
    fn wrap(&self) {
        *self.after.borrow_mut() = None;
        self.passes.set(self.passes.get() + 1);
    }

    fn new_lane(&self) -> u64 {
        self.lanes.set(self.lanes.get() + 1);
        self.lanes.get()
    }

    /// The key ranges of the siblings' open claims.
    fn held_by_others(&self, lane: u64) -> Vec<(Key, Key)> {
        self.held.borrow().iter().filter(|(l, _)| **l != lane).map(|(_, range)| range.clone()).collect()
    }
}

pub type Cursor = Rc<KeysetCursor>;

/// A lane's open claim as its siblings see it; gone when the step ends,
/// however it ends (a crash drops it with the step).
struct Hold {
    cursor: Cursor,
    lane: u64,
}

impl Hold {
    fn new(cursor: &Cursor, lane: u64, low: Key, high: Key) -> Self {
        cursor.held.borrow_mut().insert(lane, (low, high));
        Hold { cursor: cursor.clone(), lane }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.cursor.held.borrow_mut().remove(&self.lane);
    }
}

/// Claims unsent rows and deleted keys, publishes them, marks them sent.
pub struct Producer<S, L> {
    pub source: S,
    pub log: L,
    schema: Arc<TableSchema>,
    config: ProducerConfig,
    cursor: Cursor,
    lane: u64,
    /// Rows to claim next (see [`ProducerConfig::batch_bytes`]).
    limit: usize,
    /// Whether chunks of an initial load may be left.
    loading: bool,
}

impl<S: SourceTable, L: EventLog> Producer<S, L> {
    pub fn new(schema: Arc<TableSchema>, source: S, log: L, config: ProducerConfig) -> Self {
        let cursor = Cursor::default();
        let lane = cursor.new_lane();
        let limit = FIRST_CLAIM_ROWS.clamp(1, config.batch_rows.max(1));
        Producer { source, log, schema, config, cursor, lane, limit, loading: true }
    }

    /// Passes over the table completed by this producer and those sharing
    /// its cursor. Once it is above 0, every row that was committed, unsent
    /// and not held by another process before the first step was claimed.
    pub fn passes(&self) -> u64 {
        self.cursor.passes.get()
    }

    /// Shares `cursor` with other producers in this process.
    pub fn with_cursor(mut self, cursor: Cursor) -> Self {
        self.lane = cursor.new_lane();
        self.cursor = cursor;
        self
    }

    /// One claim, publish, mark cycle.
    pub async fn step(&mut self, faults: &dyn Faults) -> anyhow::Result<ProduceStep> {
        // Wall time here only feeds metrics; no decision depends on it.
        let started = std::time::Instant::now();
        let turn = self.cursor.turn.lock().await;
        let after = self.cursor.after.borrow().clone();
        // Taken before the claim's snapshot: a sibling may commit its batch
        // and let go of it while our claim runs, and a snapshot without
        // row locks still shows those rows unsent.
        let siblings = self.cursor.held_by_others(self.lane);
        let limit = self.limit;
        let claim = self.source.claim(after.as_ref(), limit).await?;
        metrics::counter!("pg2ch_rows_claimed_total").increment(claim.len() as u64);
        if claim.is_empty() {
            self.cursor.wrap();
            drop(turn);
            self.source.rollback().await?;
            // A pass that ends empty-handed returns, rather than starting
            // the next pass at once: rescanning from the lowest key walks
            // every index entry the pass left dead (about 0.3 s per
            // million rows), which a caller that wanted one pass
            // (`--once`) would pay for nothing.
            return Ok(if after.is_none() { ProduceStep::Idle } else { ProduceStep::Moved(0) });
        };
        // Move the cursor now, not after the commit, so that a producer
        // sharing it claims the next rows while this one publishes. A claim
        // with nothing past it ends the pass.
        match &claim.horizon {
            Some(horizon) => *self.cursor.after.borrow_mut() = Some(horizon.clone()),
            None => self.cursor.wrap(),
        }
        let theirs = |k: &Key| siblings.iter().any(|(low, high)| low <= k && k <= high);
        let mine: Vec<usize> = (0..claim.len()).filter(|i| !theirs(&claim.items[*i].key)).collect();
        let (Some(first), Some(last)) = (mine.first(), mine.last()) else {
            // Every row is in a sibling's batch: theirs to publish.
            drop(turn);
            self.source.rollback().await?;
            return Ok(ProduceStep::Moved(0));
        };
        // What siblings must leave alone: every key up to the horizon. Past
        // it, this claim holds only rows it locked, which siblings skip;
        // other changes there are theirs to take.
        let last = &claim.items[*last].key;
        let high = claim.horizon.as_ref().map_or(last, |h| h.min(last)).clone();
        let _hold = Hold::new(&self.cursor, self.lane, claim.items[*first].key.clone(), high);
        drop(turn);
        let moved = self.carry(claim, &mine, Some(limit), faults).await?;
        metrics::histogram!("pg2ch_produce_batch_seconds").record(started.elapsed().as_secs_f64());
        Ok(ProduceStep::Moved(moved))
    }

    /// Whether chunks of the table's initial load may still be left (true
    /// until a [`load_step`](Self::load_step) finds none).
    pub fn loading(&self) -> bool {
        self.loading
    }

    /// Carries one chunk of the table's initial load: reads it, publishes
    /// it, records it carried. Returns the rows published, or `None` when
    /// no chunk is left to take (and [`loading`](Self::loading) turns false).
    pub async fn load_step(&mut self, faults: &dyn Faults) -> anyhow::Result<Option<usize>> {
        let Some(chunk) = self.source.load().await? else {
            self.loading = false;
            return Ok(None);
        };
        metrics::counter!("pg2ch_rows_loaded_total").increment(chunk.len() as u64);
        let all: Vec<usize> = (0..chunk.len()).collect();
        self.carry(chunk, &all, None, faults).await.map(Some)
    }

    /// Publishes the items `mine` of the open claim (or chunk), then flags
    /// them and commits; a claim's `limit` sizes the next claim. Returns the
    /// items published.
    async fn carry(
        &mut self,
        claim: crate::stores::Claim,
        mine: &[usize],
        limit: Option<usize>,
        faults: &dyn Faults,
    ) -> anyhow::Result<usize> {
        faults.at(CrashPoint::AfterClaim)?;
        let Encoded { keys, published, rejected, records, bytes } =
            encode(&self.schema, claim, mine, self.log.partitions());
        if let Some(limit) = limit {
            self.limit = self.config.next_limit(limit, mine.len(), bytes);
        }

        #[cfg(any(test, feature = "broken-orderings"))]
        if self.config.ordering == Ordering::MarkBeforePublish {
            self.mark_and_commit(&keys, &published, &rejected, faults).await?;
            self.publish(records, faults).await?;
            return Ok(published.len());
        }

        if let Err(e) = self.publish(records, faults).await {
            if !is_crash(&e) {
                // Not acknowledged (or unknown): end the claim, keep the
                // rows unsent. They go again on the next step.
                let _ = self.source.rollback().await;
            }
            return Err(e);
        }
        metrics::counter!("pg2ch_rows_published_total").increment(published.len() as u64);
        faults.at(CrashPoint::AfterAck)?;
        self.mark_and_commit(&keys, &published, &rejected, faults).await?;
        Ok(published.len())
    }

    /// Flags the published items sent and the unrepresentable ones
    /// rejected, in the claim's transaction, and commits.
    async fn mark_and_commit(
        &mut self,
        keys: &[Key],
        published: &[usize],
        rejected: &[(usize, String)],
        faults: &dyn Faults,
    ) -> anyhow::Result<()> {
        if !rejected.is_empty() {
            self.source.reject(rejected).await?;
        }
        if !published.is_empty() {
            self.source.mark_sent(published).await?;
        }
        faults.at(CrashPoint::AfterMark)?;
        self.source.commit().await?;
        metrics::counter!("pg2ch_rows_marked_total").increment(published.len() as u64);
        metrics::counter!("pg2ch_rows_rejected_total").increment(rejected.len() as u64);
        for (i, reason) in rejected {
            let key = key_text(&keys[*i]);
            tracing::warn!("row {key} of {} cannot be sent and is flagged rejected: {reason}", self.schema);
        }
        faults.at(CrashPoint::AfterCommit)?;
        Ok(())
    }

    /// Publishes records to their partitions, all partitions at once;
    /// returns only when every partition acknowledged.
    async fn publish(&self, by_partition: BTreeMap<i32, Vec<LogRecord>>, faults: &dyn Faults) -> anyhow::Result<()> {
        let total = by_partition.len();
        let mut pending: FuturesUnordered<_> = by_partition
            .into_iter()
            .map(|(p, records)| async move {
                self.log.append(p, records).await.map_err(|e| e.context(format!("publishing to partition {p}")))
            })
            .collect();
        let mut acknowledged = 0;
        while let Some(result) = pending.next().await {
            result?;
            acknowledged += 1;
            if acknowledged < total {
                faults.at(CrashPoint::MidPublish)?;
            }
        }
        Ok(())
    }

    /// Carries the initial load's chunks, then runs steps until the table
    /// is drained. Returns the rows moved.
    pub async fn drain(&mut self, faults: &dyn Faults) -> anyhow::Result<usize> {
        let mut moved = 0;
        while let Some(n) = self.load_step(faults).await? {
            moved += n;
        }
        while let ProduceStep::Moved(n) = self.step(faults).await? {
            moved += n;
        }
        Ok(moved)
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Partitions this consumer may read: all of them, or those given with
    /// `--partitions`. With [`Leases`], it reads its fair share of these,
    /// among the group's members; without, all of them.
    pub partitions: Vec<i32>,
    /// Whether `partitions` were given by hand: then a consumer with
    /// leases takes all of them (as each comes free), not a share.
    pub by_hand: bool,
    /// Most rows in one ClickHouse insert.
    pub insert_rows: usize,
    #[cfg(any(test, feature = "broken-orderings"))]
    pub ordering: Ordering,
}

impl ConsumerConfig {
    /// Most rows in one ClickHouse insert unless told otherwise.
    pub const INSERT_ROWS: usize = 100_000;

    pub fn all_partitions(count: i32) -> Self {
        ConsumerConfig {
            partitions: (0..count).collect(),
            by_hand: false,
            insert_rows: Self::INSERT_ROWS,
            #[cfg(any(test, feature = "broken-orderings"))]
            ordering: Ordering::Correct,
        }
    }
}

/// What one consumer step did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsumeStep {
    /// Records consumed (rows written plus dead letters).
    pub records: usize,
    /// Of which sent to the dead-letter topic.
    pub dead_letters: usize,
    /// The high watermark each partition reported.
    pub high_watermarks: BTreeMap<i32, i64>,
}

/// Reads the log from its remembered positions and writes to the sink.
pub struct Consumer<L, K, G = Unleased> {
    pub log: L,
    pub sink: K,
    schema: Arc<TableSchema>,
    config: ConsumerConfig,
    /// Which partitions this consumer may write.
    leases: G,
    /// Where this consumer stands in each partition it reads; `None` until
    /// loaded from the sink.
    positions: Option<BTreeMap<i32, Position>>,
    /// Positions of rows already written but not yet stored in the sink
    /// (see [`Store`]).
    unstored: BTreeMap<i32, Position>,
}

/// Whether a consumer step stores the positions of rows earlier steps wrote
/// (while it fetches), or leaves that to a later step (or
/// [`Consumer::store_positions`]). Rows are always written before their
/// positions are stored; storing later only means that a crash in between
/// replays more records, which the sink collapses (same key and version).
/// It saves one sink write per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Now,
    Later,
}

/// Fails, permanently, if `position` lies beyond the end of its partition:
/// the log it belongs to is gone (topic deleted and created again, broker
/// storage lost, retention), and reading on would skip records.
fn within_log(partition: i32, position: &Position, high_watermark: i64) -> anyhow::Result<()> {
    if position.next > high_watermark {
        return Err(Permanent::error(format!(
            "stored position {} of partition {partition} is past the end of the log ({high_watermark}): \
             the topic was deleted and created again, or the broker lost its data; \
             nothing was read (use another KAFKA_GROUP or topic, see docs/failure-modes.md)",
            position.next
        )));
    }
    Ok(())
}

impl<L: EventLog, K: Sink> Consumer<L, K> {
    /// A consumer of every configured partition, without leases.
    pub fn new(schema: Arc<TableSchema>, log: L, sink: K, config: ConsumerConfig) -> Self {
        let leases = Unleased(config.partitions.iter().copied().collect());
        Consumer { log, sink, schema, config, leases, positions: None, unstored: BTreeMap::new() }
    }

    /// The same consumer, reading only partitions whose lease it holds:
    /// none until [`Consumer::rebalance`] takes its share.
    pub fn with_leases<G: Leases>(self, leases: G) -> Consumer<L, K, G> {
        let Consumer { log, sink, schema, config, .. } = self;
        Consumer { log, sink, schema, config, leases, positions: Some(BTreeMap::new()), unstored: BTreeMap::new() }
    }
}

impl<L: EventLog, K: Sink, G: Leases> Consumer<L, K, G> {
    /// The positions in memory (loaded from the sink on first use).
    pub async fn positions(&mut self) -> anyhow::Result<&BTreeMap<i32, Position>> {
        if self.positions.is_none() {
            let stored = self.sink.positions().await?;
            let mine =
                self.config.partitions.iter().map(|p| (*p, stored.get(p).copied().unwrap_or_default())).collect();
            self.positions = Some(mine);
        }
        Ok(self.positions.as_ref().expect("just loaded"))
    }

    /// The partitions this consumer reads now.
    pub fn partitions(&self) -> Vec<i32> {
        self.positions.as_ref().map_or_else(|| self.config.partitions.clone(), |p| p.keys().copied().collect())
    }

    /// Forgets the partitions whose lease is gone (their rows written and
    /// not stored are replayed by the next holder).
    fn forget_lost(&mut self, held: &BTreeSet<i32>) {
        if let Some(positions) = self.positions.as_mut() {
            let lost: Vec<i32> = positions.keys().filter(|p| !held.contains(p)).copied().collect();
            for p in lost {
                tracing::warn!("partition {p}: lease lost (this process stopped renewing it); another member takes it");
                positions.remove(&p);
                self.unstored.remove(&p);
            }
        }
    }

    /// Renews this member's leases and moves to its fair share of the
    /// partitions among the group's live members: a partition over its
    /// share is handed over (its position stored, then its lease released),
    /// a free one in its share is taken (its lease first, then its position
    /// read, so that the last holder's final one is seen). A partition of
    /// its share that another member still holds is taken on a later call.
    pub async fn rebalance(&mut self, faults: &dyn Faults) -> anyhow::Result<()> {
        let members = self.leases.members().await?;
        let share = match self.config.by_hand {
            true => self.config.partitions.iter().copied().collect(),
            false => members.share(&self.config.partitions),
        };
        self.positions().await?;
        let held = self.leases.held().await?;
        self.forget_lost(&held);
        let reading: BTreeSet<i32> = self.positions.as_ref().expect("loaded above").keys().copied().collect();
        for &p in reading.difference(&share) {
            self.store_positions(faults).await?;
            self.positions.as_mut().expect("loaded above").remove(&p);
            self.leases.release(p).await?;
            tracing::info!("partition {p}: handed over to another member of the group");
        }
        // Taken without knowing it (the answer was lost) and not ours to read.
        for p in held.iter().filter(|p| !reading.contains(p) && !share.contains(p)) {
            self.leases.release(*p).await?;
        }
        let mut stored = None;
        for &p in share.difference(&reading) {
            if !self.leases.take(p).await? {
                continue;
            }
            let stored = match &stored {
                Some(s) => s,
                None => stored.insert(self.sink.positions().await?),
            };
            let position = stored.get(&p).copied().unwrap_or_default();
            self.positions.as_mut().expect("loaded above").insert(p, position);
            tracing::info!("partition {p}: taken, from offset {}", position.next);
        }
        metrics::gauge!("pg2ch_partitions_held").set(self.positions.as_ref().map_or(0, |p| p.len()) as f64);
        Ok(())
    }

    /// Fetches one partition from `position` and makes sure the records
    /// continue the log this consumer read so far: the record before
    /// `position` must still be the one whose fingerprint was stored with it.
    async fn fetch_checked(
        log: &L,
        config: &ConsumerConfig,
        p: i32,
        position: Position,
        max_wait: Duration,
    ) -> anyhow::Result<Fetched> {
        let _ = config;
        let start = position.next;
        let mut batch = log
            .fetch(p, start, max_wait)
            .await
            .map_err(|e| e.context(format!("fetching partition {p} at offset {start}")))?;
        within_log(p, &position, batch.high_watermark)?;
        // Brokers return whole batches: drop what lies before our position.
        #[cfg(any(test, feature = "broken-orderings"))]
        let first = start + i64::from(config.ordering == Ordering::SkipRecordAtPosition);
        #[cfg(not(any(test, feature = "broken-orderings")))]
        let first = start;
        batch.records.retain(|r| r.offset >= first);
        if let (false, Some(expected)) = (batch.records.is_empty(), position.last) {
            // A record that differs is proof the log was replaced; none at
            // all is not (see below).
            // The broker holds records past it, so the record is there: an
            // empty answer is the broker's (a fetch that timed out), not
            // evidence. Asked again a few times, then retried like any
            // failed fetch.
            let mut before = None;
            for _ in 0..3 {
                before = log
                    .record_at(p, start - 1)
                    .await
                    .map_err(|e| e.context(format!("reading partition {p} at offset {}", start - 1)))?;
                if before.is_some() {
                    break;
                }
            }
            let Some(before) = before else {
                anyhow::bail!("partition {p}: the broker returned no record at offset {}; retrying", start - 1);
            };
            if before.fingerprint() != expected {
                return Err(Permanent::error(format!(
                    "partition {p} no longer holds, at offset {}, the record this consumer group read there: \
                     the topic was deleted and created again, or the broker lost its data; records of the \
                     new log from offset {start} on were not read (use another KAFKA_GROUP or topic, see \
                     docs/failure-modes.md)",
                    start - 1
                )));
            }
        }
        Ok(batch)
    }

    /// One fetch, write, remember cycle over all assigned partitions. A
    /// partition whose fetch fails does not hold up the others: their rows
    /// are written and their positions stored, then the failure is returned.
    ///
    /// With [`Store::Now`], the positions of rows written by earlier steps
    /// are stored while the fetches wait for the broker, rather than after
    /// this step's write: a store then holds no row back (storing after the
    /// write stalled every row that arrived meanwhile, once a second, by a
    /// sink insert, which made the tail of the latency).
    pub async fn step(&mut self, faults: &dyn Faults, max_wait: Duration, store: Store) -> anyhow::Result<ConsumeStep> {
        let from = self.positions().await?.clone();
        let unstored = match store {
            Store::Now => std::mem::take(&mut self.unstored),
            Store::Later => BTreeMap::new(),
        };
        let (log, config, sink, leases) = (&self.log, &self.config, &mut self.sink, &mut self.leases);
        let fetches =
            futures::future::join_all(from.iter().map(|(&p, &position)| async move {
                (p, Self::fetch_checked(log, config, p, position, max_wait).await)
            }));
        let storing = async {
            match unstored.is_empty() {
                true => Ok(None),
                false => Self::store_held(leases, sink, &unstored).await.map(Some),
            }
        };
        let (results, stored) = futures::future::join(fetches, storing).await;
        match stored {
            Err(e) => {
                // Stored again by a later step; what was fetched is fetched
                // again, as after any failed step.
                self.unstored.extend(unstored);
                return Err(e);
            }
            Ok(Some((held, any))) => {
                self.forget_lost(&held);
                if any {
                    faults.at(CrashPoint::AfterStorePosition)?;
                }
            }
            Ok(None) => {}
        }
        let mut fetched = Vec::with_capacity(results.len());
        let mut failed: Option<anyhow::Error> = None;
        for (p, result) in results {
            match result {
                Ok(batch) => fetched.push((p, batch)),
                Err(e) if kind(&e) == ErrorKind::Permanent => return Err(e),
                Err(e) => {
                    tracing::debug!("partition {p}: {e:#}");
                    failed.get_or_insert(e);
                }
            }
        }
        faults.at(CrashPoint::AfterFetch)?;
        // Only partitions still ours are written: a member that stopped
        // renewing its leases (paused) may have lost some to another.
        let held = self.leases.held().await?;
        if fetched.iter().any(|(p, _)| !held.contains(p)) {
            self.forget_lost(&held);
            fetched.retain(|(p, _)| held.contains(p));
        }
        // From here on: decode, write, remember (the fetch may have waited
        // for data on purpose). Metrics only; no decision depends on it.
        let started = std::time::Instant::now();

        let mut step = ConsumeStep::default();
        let mut rows = Vec::new();
        let mut dead = Vec::new();
        let mut next = BTreeMap::new();
        let mut newest_ms = BTreeMap::new();
        for (p, batch) in fetched {
            step.high_watermarks.insert(p, batch.high_watermark);
            for record in batch.records {
                newest_ms.insert(p, record.timestamp_ms);
                let position = Position { next: record.offset + 1, last: Some(record.fingerprint()) };
                match change::decode(&self.schema, record.value.as_deref()) {
                    Ok(change) => rows.push(change),
                    // A column this process does not know: the table grew.
                    // Not the record's fault; stop before writing anything.
                    Err(e @ DecodeError::UnknownColumn { .. }) => {
                        return Err(Permanent::error(format!("partition {p} offset {}: {e}", record.offset)));
                    }
                    // Poison: forwarded unchanged to the dead-letter topic, so
                    // one bad record never stops the partition.
                    Err(reason) => dead.push(DeadLetter {
                        partition: p,
                        offset: record.offset,
                        key: record.key,
                        value: record.value,
                        reason: reason.to_string(),
                    }),
                }
                step.records += 1;
                next.insert(p, position);
            }
        }
        if next.is_empty() {
            return failed.map_or(Ok(step), Err);
        }

        #[cfg(any(test, feature = "broken-orderings"))]
        if self.config.ordering == Ordering::PositionBeforeWrite {
            self.sink.store_positions(&next).await?;
            faults.at(CrashPoint::AfterStorePosition)?;
            self.write(&rows, faults).await?;
            self.positions.as_mut().expect("loaded above").extend(next);
            return Ok(step);
        }

        self.write(&rows, faults).await?;
        // Dead letters go before the position moves past them: a crash in
        // between sends them again (the dead-letter topic is at-least-once).
        step.dead_letters = dead.len();
        if !dead.is_empty() {
            for d in &dead {
                tracing::warn!(
                    "partition {} offset {}: undecodable record sent to the dead-letter topic: {}",
                    d.partition,
                    d.offset,
                    d.reason
                );
            }
            self.log.dead_letter(dead).await?;
        }
        faults.at(CrashPoint::AfterWrite)?;
        self.unstored.extend(next.iter().map(|(p, position)| (*p, *position)));
        metrics::counter!("pg2ch_rows_written_total").increment(rows.len() as u64);
        metrics::counter!("pg2ch_dead_letters_total").increment(step.dead_letters as u64);
        metrics::histogram!("pg2ch_consume_batch_seconds").record(started.elapsed().as_secs_f64());
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        for (p, position) in &next {
            let end = step.high_watermarks.get(p).copied().unwrap_or(position.next);
            let behind = (end - position.next).max(0);
            metrics::gauge!("pg2ch_lag", "partition" => p.to_string()).set(behind as f64);
            // Behind: about as old as the newest record just written.
            let age_ms = match (behind, newest_ms.get(p)) {
                (1.., Some(&ts)) => (now_ms as i64 - ts).max(0),
                _ => 0,
            };
            metrics::gauge!("pg2ch_lag_seconds", "partition" => p.to_string()).set(age_ms as f64 / 1e3);
        }
        self.positions.as_mut().expect("loaded above").extend(next);
        failed.map_or(Ok(step), Err)
    }

    /// Stores the positions of what was written and not stored yet.
    pub async fn store_positions(&mut self, faults: &dyn Faults) -> anyhow::Result<()> {
        if self.unstored.is_empty() {
            return Ok(());
        }
        let (held, any) = Self::store_held(&mut self.leases, &mut self.sink, &self.unstored).await?;
        self.forget_lost(&held);
        self.unstored.clear();
        if any {
            faults.at(CrashPoint::AfterStorePosition)?;
        }
        Ok(())
    }

    /// Stores those of `positions` whose partitions this member still
    /// holds, the leases checked first (a member that stopped renewing them
    /// may have lost some to another). Returns the partitions held, and
    /// whether anything was stored. Takes the fields it uses, so that a step
    /// can store while it fetches.
    async fn store_held(
        leases: &mut G,
        sink: &mut K,
        positions: &BTreeMap<i32, Position>,
    ) -> anyhow::Result<(BTreeSet<i32>, bool)> {
        let held = leases.held().await?;
        let mine: BTreeMap<i32, Position> =
            positions.iter().filter(|(p, _)| held.contains(p)).map(|(p, position)| (*p, *position)).collect();
        if !mine.is_empty() {
            sink.store_positions(&mine).await?;
        }
        Ok((held, !mine.is_empty()))
    }

    async fn write(&mut self, rows: &[Change], faults: &dyn Faults) -> anyhow::Result<()> {
        for (i, chunk) in rows.chunks(self.config.insert_rows.max(1)).enumerate() {
            if i > 0 {
                faults.at(CrashPoint::MidWrite)?;
            }
            self.sink.write(chunk).await?;
        }
        Ok(())
    }

    /// The current end of every assigned partition, as a fetch reports it.
    /// (Some brokers answer ListOffsets(latest) wrongly; the fetch's high
    /// watermark is right everywhere.) A position past an end fails, so
    /// that a drain never takes a replaced log for a finished one.
    pub async fn high_watermarks(&mut self) -> anyhow::Result<BTreeMap<i32, i64>> {
        let from = self.positions().await?.clone();
        let log = &self.log;
        let marks = futures::future::try_join_all(from.iter().map(|(&p, position)| async move {
            let mark = log.fetch(p, position.next, Duration::ZERO).await?.high_watermark;
            within_log(p, position, mark)?;
            Ok::<_, anyhow::Error>((p, mark))
        }))
        .await?;
        Ok(marks.into_iter().collect())
    }

    /// True when every partition this consumer reads has reached its target
    /// in `targets` (one without a target has not).
    pub fn reached(&self, targets: &BTreeMap<i32, i64>) -> bool {
        let Some(positions) = &self.positions else {
            return targets.values().all(|t| *t <= 0);
        };
        positions.iter().all(|(p, pos)| targets.get(p).is_some_and(|t| pos.next >= *t))
    }

    /// Consumes until every assigned partition reached its end as it stands
    /// now, and stores the positions.
    pub async fn drain(&mut self, faults: &dyn Faults, max_wait: Duration) -> anyhow::Result<usize> {
        let targets = self.high_watermarks().await?;
        let mut records = 0;
        while !self.reached(&targets) {
            records += self.step(faults, max_wait, Store::Now).await?.records;
        }
        self.store_positions(faults).await?;
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_grow_to_the_row_limit_for_narrow_rows_and_shrink_to_the_byte_budget_for_wide_ones() {
        let c = ProducerConfig { batch_rows: 10_000, batch_bytes: 1 << 20, ..ProducerConfig::default() };
        // 100-byte messages: four times more each claim, up to the row limit.
        let mut limit = FIRST_CLAIM_ROWS;
        let mut seen = vec![limit];
        while limit < 10_000 {
            limit = c.next_limit(limit, limit, limit * 100);
            seen.push(limit);
        }
        assert_eq!(seen, [64, 256, 1024, 4096, 10_000]);
        // 100 KiB messages: ten rows fill the budget.
        assert_eq!(c.next_limit(10_000, 10_000, 10_000 * 100 * 1024), 10);
        // Wider than the whole budget: one row at a time, never none.
        assert_eq!(c.next_limit(10, 10, 10 * (2 << 20)), 1);
        // A claim that found nothing keeps its size.
        assert_eq!(c.next_limit(256, 0, 0), 256);
    }
}
