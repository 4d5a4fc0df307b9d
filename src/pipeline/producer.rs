//! The producer: claims unsent rows and deleted keys, encodes them into
//! records, publishes them, and flags them sent once the broker has them
//! all; lanes of one process share a [`KeysetCursor`].

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::change::{self, Change};
use crate::schema::TableSchema;
use crate::stores::{EventLog, LogRecord, Outcome, SourceTable};
use crate::types::{Key, key_text};

#[cfg(test)]
use super::Ordering;
use super::{CrashPoint, Faults, is_crash};

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
    #[cfg(test)]
    pub ordering: Ordering,
}

/// Rows in a lane's first claim, before it knows how wide they are.
pub const FIRST_CLAIM_ROWS: usize = 64;

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            batch_rows: 10_000,
            batch_bytes: 2 << 20,
            #[cfg(test)]
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

        #[cfg(test)]
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
        // Metrics only: how long the broker took to acknowledge.
        let started = std::time::Instant::now();
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
        metrics::histogram!("pg2ch_publish_seconds").record(started.elapsed().as_secs_f64());
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
