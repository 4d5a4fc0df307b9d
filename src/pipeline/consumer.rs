//! The consumer: reads the log from its stored positions, writes the rows
//! to the sink, then stores the positions; members of a group share the
//! partitions through leases.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::change::{self, Change, DecodeError};
use crate::schema::TableSchema;
use crate::stores::{DeadLetter, ErrorKind, EventLog, Fetched, Leases, Position, Sink, StoreError, Unleased, kind};

#[cfg(test)]
use super::Ordering;
use super::{CrashPoint, Faults};

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
    #[cfg(test)]
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
            #[cfg(test)]
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
        return Err(StoreError::permanent(format!(
            "stored position {} of partition {partition} is past the end of the log ({high_watermark}): \
             the topic was deleted and created again, or the broker lost its data; \
             nothing was read (use another KAFKA_GROUP or topic, see docs/failure-modes.md)",
            position.next
        ))
        .into());
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
        #[cfg(test)]
        let first = start + i64::from(config.ordering == Ordering::SkipRecordAtPosition);
        #[cfg(not(test))]
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
                return Err(StoreError::permanent(format!(
                    "partition {p} no longer holds, at offset {}, the record this consumer group read there: \
                     the topic was deleted and created again, or the broker lost its data; records of the \
                     new log from offset {start} on were not read (use another KAFKA_GROUP or topic, see \
                     docs/failure-modes.md)",
                    start - 1
                ))
                .into());
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
        let now_ms = crate::types::time::now_unix_ms();
        for (p, result) in results {
            match result {
                Ok(batch) => {
                    // Metrics only: how long after its publish began the
                    // oldest record came back from the broker.
                    if let Some(first) = batch.records.first() {
                        let age_ms = (now_ms - first.timestamp_ms).max(0);
                        metrics::histogram!("pg2ch_fetched_age_seconds").record(age_ms as f64 / 1e3);
                    }
                    fetched.push((p, batch))
                }
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
                        return Err(
                            StoreError::permanent(format!("partition {p} offset {}: {e}", record.offset)).into()
                        );
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

        #[cfg(test)]
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
        let now_ms = crate::types::time::now_unix_ms();
        for (p, position) in &next {
            let end = step.high_watermarks.get(p).copied().unwrap_or(position.next);
            let behind = (end - position.next).max(0);
            metrics::gauge!("pg2ch_lag", "partition" => p.to_string()).set(behind as f64);
            // Behind: about as old as the newest record just written.
            let age_ms = match (behind, newest_ms.get(p)) {
                (1.., Some(&ts)) => (now_ms - ts).max(0),
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
