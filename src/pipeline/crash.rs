//! Named crash points: where a component may die between two store calls,
//! and the [`Faults`] that decide whether it does. Production never dies on
//! purpose ([`NoFaults`]); the simulation dies everywhere it can.

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
