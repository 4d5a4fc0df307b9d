//! Simulated Kafka log: partitions of batches with contiguous offsets,
//! appends that fail or time out after appending (so a retry appends twice),
//! and fetches that return whole batches, sometimes starting well before the
//! requested offset, as real brokers may. The topic can be deleted and
//! created again ([`Log::recreate`]), as a broker that lost its storage does.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use super::{Chaos, yield_now};
use crate::stores::{DeadLetter, EventLog, Fetched, FetchedRecord, LogRecord, StoreError, StoreResult};

#[derive(Debug)]
struct Batch {
    base: i64,
    /// The producer's timestamp of every record in the batch.
    timestamp_ms: i64,
    values: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct Log {
    partitions: Vec<Vec<Batch>>,
    /// A logical clock for record timestamps (one tick per append).
    clock: i64,
    /// The dead-letter topic: (source partition, source offset, value).
    pub dead_letters: Vec<(i32, i64, Option<Vec<u8>>)>,
}

impl Log {
    pub fn new(partitions: i32) -> Self {
        Log { partitions: (0..partitions).map(|_| Vec::new()).collect(), clock: 0, dead_letters: Vec::new() }
    }

    /// The topic is deleted and created again, empty, with as many partitions.
    pub fn recreate(&mut self) {
        self.partitions.iter_mut().for_each(Vec::clear);
    }

    fn push(&mut self, partition: usize, values: Vec<Vec<u8>>) -> i64 {
        let base = self.end(partition);
        self.clock += 1;
        self.partitions[partition].push(Batch { base, timestamp_ms: self.clock, values });
        base
    }

    /// Appends a record that is not a login event, as a foreign producer
    /// might; returns its offset.
    pub fn append_poison(&mut self, partition: usize, value: Vec<u8>) -> (i32, i64) {
        let base = self.push(partition, vec![value]);
        (partition as i32, base)
    }

    fn end(&self, partition: usize) -> i64 {
        self.partitions[partition].last().map(|b| b.base + b.values.len() as i64).unwrap_or(0)
    }

    /// Every value ever appended, in any partition.
    pub fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.partitions.iter().flatten().flat_map(|b| b.values.iter().map(|v| v.as_slice()))
    }

    fn records(batch: &Batch) -> impl Iterator<Item = FetchedRecord> + '_ {
        batch.values.iter().enumerate().map(|(i, v)| FetchedRecord {
            offset: batch.base + i as i64,
            key: None,
            value: Some(v.clone()),
            timestamp_ms: batch.timestamp_ms,
        })
    }
}

pub struct SimLog {
    pub(super) chaos: Rc<Chaos>,
    pub(super) log: Rc<RefCell<Log>>,
    pub(super) partitions: i32,
}

impl EventLog for SimLog {
    fn partitions(&self) -> i32 {
        self.partitions
    }

    async fn append(&self, partition: i32, records: Vec<LogRecord>) -> StoreResult<()> {
        yield_now().await;
        if self.chaos.fails("kafka.append") {
            return Err(StoreError::transient("simulated: produce failed"));
        }
        let mut log = self.log.borrow_mut();
        let count = records.len();
        let base = log.push(partition as usize, records.into_iter().map(|r| r.value).collect());
        self.chaos.note(&("append", partition, base, count));
        if self.chaos.outcome_lost("kafka.append") {
            return Err(StoreError::unknown("simulated: produce timed out (it was appended)"));
        }
        Ok(())
    }

    async fn fetch(&self, partition: i32, offset: i64, _max_wait: Duration) -> StoreResult<Fetched> {
        yield_now().await;
        if self.chaos.fails("kafka.fetch") {
            return Err(StoreError::transient("simulated: fetch failed"));
        }
        let log = self.log.borrow();
        let batches = &log.partitions[partition as usize];
        let high_watermark = log.end(partition as usize);
        // Past the end, some brokers answer OffsetOutOfRange, others an
        // empty fetch whose high watermark tells; the consumer must stop on both.
        if offset > high_watermark && self.chaos.chance(0.5) {
            return Err(StoreError::permanent(format!(
                "simulated OffsetOutOfRange: offset {offset} is outside partition {partition}: the topic was deleted and created again"
            )));
        }
        let Some(mut first) = batches.iter().position(|b| offset < b.base + b.values.len() as i64) else {
            return Ok(Fetched { records: Vec::new(), high_watermark });
        };
        if first > 0 && self.chaos.chance(0.3) {
            first -= 1; // a batch wholly before the requested offset
        }
        let take = 1 + self.chaos.below(3);
        let records = batches[first..].iter().take(take).flat_map(Log::records).collect();
        Ok(Fetched { records, high_watermark })
    }

    async fn record_at(&self, partition: i32, offset: i64) -> StoreResult<Option<FetchedRecord>> {
        yield_now().await;
        if self.chaos.fails("kafka.fetch") {
            return Err(StoreError::transient("simulated: fetch failed"));
        }
        let log = self.log.borrow();
        Ok(log.partitions[partition as usize].iter().flat_map(Log::records).find(|r| r.offset == offset))
    }

    async fn dead_letter(&self, letters: Vec<DeadLetter>) -> StoreResult<()> {
        yield_now().await;
        if self.chaos.fails("kafka.dead_letter") {
            return Err(StoreError::transient("simulated: produce to the dead-letter topic failed"));
        }
        let mut log = self.log.borrow_mut();
        for d in letters {
            log.dead_letters.push((d.partition, d.offset, d.value));
        }
        drop(log);
        if self.chaos.outcome_lost("kafka.dead_letter") {
            return Err(StoreError::unknown("simulated: dead-letter produce timed out (it was appended)"));
        }
        Ok(())
    }
}
