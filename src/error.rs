//! How a failed call to an outside system should be met: the error tags
//! every adapter sets where it converts a driver's error, and the one
//! function the loops ask. A leaf: it imports nothing of pg2ch.

/// How a failed store call should be met. Adapters tag what they know:
/// [`Permanent`] for what retrying cannot fix, [`OutcomeUnknown`] for a call
/// that may have acted before it failed (cut by its timeout, an answer lost);
/// anything untagged is transient. Transient and unknown outcomes are both
/// retried with backoff, which the pipeline makes safe: a repeated publish or
/// insert is collapsed downstream, a repeated claim finds what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Failed without effect: retry with backoff (a refused connection).
    Transient,
    /// May have taken effect: retry; dedup makes the repeat harmless.
    Unknown,
    /// Stop: retrying gives the same answer (a dropped column, a ClickHouse
    /// type mismatch, a position past the end of the log, a missing topic).
    Permanent,
}

/// A failure that retrying cannot fix, with its one-line cause. Carried
/// inside `anyhow::Error` so that context added on the way up stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

impl Permanent {
    pub fn error(cause: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Permanent(cause.into()))
    }
}

/// A call that failed after it may have acted, with what happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OutcomeUnknown(pub String);

impl OutcomeUnknown {
    pub fn error(cause: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(OutcomeUnknown(cause.into()))
    }
}

/// The kind of a store error, from the tags in its chain (permanent wins).
pub fn kind(e: &anyhow::Error) -> ErrorKind {
    if tagged::<Permanent>(e) {
        ErrorKind::Permanent
    } else if tagged::<OutcomeUnknown>(e) {
        ErrorKind::Unknown
    } else {
        ErrorKind::Transient
    }
}

/// Whether `e` carries the tag `T`, as its root cause or as context added
/// on the way up (anyhow reaches context only through its own downcast).
fn tagged<T: std::error::Error + Send + Sync + 'static>(e: &anyhow::Error) -> bool {
    e.downcast_ref::<T>().is_some() || e.chain().any(|c| c.downcast_ref::<T>().is_some())
}
