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
//! - Consumers of one group share the partitions through [`Leases`](crate::stores::Leases): each
//!   writes only partitions whose lease it holds, checked after every fetch,
//!   right before the write, and hands a partition over only after storing
//!   its position. Stored positions only move forward (the sink keeps each
//!   partition's highest), so a member that lost its lease while paused
//!   between the check and the write writes rows older than the new
//!   holder's at worst, which the versions make harmless.
//!
//! How the steps repeat (retries, backoff, `--once`, idle waits) is in
//! [`loops`], which the simulation runs too.

mod consumer;
mod crash;
pub mod loops;
mod producer;

pub use consumer::{ConsumeStep, Consumer, ConsumerConfig, Store};
pub use crash::{CrashPoint, Crashed, Faults, NoFaults, is_crash};
pub use producer::{Cursor, FIRST_CLAIM_ROWS, KeysetCursor, ProduceStep, Producer, ProducerConfig};

/// Test-only wrong orderings, to show the harness catches them. Not compiled
/// into the release binary.
#[cfg(test)]
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
