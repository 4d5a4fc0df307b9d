//! How a failed call to an outside system should be met: the typed error
//! every store returns ([`StoreError`], whose kind is chosen where a
//! driver's error is converted) and the one function the loops ask
//! ([`kind`]). A leaf: it imports nothing of pg2ch.

use std::fmt;

/// How a failed store call should be met. Transient and unknown outcomes
/// are both retried with backoff, which the pipeline makes safe: a repeated
/// publish or insert is collapsed downstream, a repeated claim finds what
/// is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Failed without effect: retry with backoff (a refused connection).
    Transient,
    /// May have taken effect (cut by its timeout, an answer lost): retry;
    /// dedup makes the repeat harmless.
    Unknown,
    /// Stop: retrying gives the same answer (a dropped column, a ClickHouse
    /// type mismatch, a position past the end of the log, a missing topic).
    Permanent,
}

/// A failed store call: what happened, and its [`ErrorKind`]. Every store
/// trait returns it, and there is no conversion from an untyped error: each
/// adapter says, where it converts its driver's error (`From` impls beside
/// the adapter, or one of the constructors), which kind the failure is.
/// Above the stores it travels inside `anyhow::Error`, where context added
/// on the way up keeps it, and [`kind`] finds it.
pub struct StoreError {
    kind: ErrorKind,
    error: anyhow::Error,
}

/// What a store call returns.
pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    pub fn new(kind: ErrorKind, error: impl Into<anyhow::Error>) -> Self {
        StoreError { kind, error: error.into() }
    }

    /// A failure without effect, in words.
    pub fn transient(cause: impl fmt::Display + Send + Sync + 'static) -> Self {
        Self::from_message(ErrorKind::Transient, cause)
    }

    /// A call that may have acted before it failed, in words.
    pub fn unknown(cause: impl fmt::Display + Send + Sync + 'static) -> Self {
        Self::from_message(ErrorKind::Unknown, cause)
    }

    /// A failure that retrying cannot fix, in words.
    pub fn permanent(cause: impl fmt::Display + Send + Sync + 'static) -> Self {
        Self::from_message(ErrorKind::Permanent, cause)
    }

    fn from_message(kind: ErrorKind, cause: impl fmt::Display + Send + Sync + 'static) -> Self {
        StoreError { kind, error: anyhow::Error::msg(cause.to_string()) }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The same failure with `context` in front of its message.
    pub fn context(self, context: impl fmt::Display + Send + Sync + 'static) -> Self {
        StoreError { kind: self.kind, error: self.error.context(context) }
    }

    /// Like [`context`](Self::context), made only on failure.
    pub fn with_context<C: fmt::Display + Send + Sync + 'static>(self, context: impl FnOnce() -> C) -> Self {
        self.context(context())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} error: {:#}", self.kind, self.error)
    }
}

impl std::error::Error for StoreError {}

/// The kind of an error from the stores, wherever it sits in `e`'s chain
/// (the first [`StoreError`] in it; permanent wins over context that says
/// otherwise). An error that no store made (the pipeline's own, a crash
/// point) is transient unless it is a [`StoreError`] itself.
pub fn kind(e: &anyhow::Error) -> ErrorKind {
    let mut kinds =
        e.downcast_ref::<StoreError>().into_iter().chain(e.chain().filter_map(|c| c.downcast_ref::<StoreError>()));
    let first = kinds.next().map(StoreError::kind);
    if first.is_some() && kinds.any(|s| s.kind() == ErrorKind::Permanent) {
        return ErrorKind::Permanent;
    }
    first.unwrap_or(ErrorKind::Transient)
}

/// Adds context to a store call's failure, as `anyhow::Context` does for
/// untyped errors, keeping its kind.
pub trait StoreContext<T> {
    fn context(self, context: impl fmt::Display + Send + Sync + 'static) -> StoreResult<T>;
    fn with_context<C: fmt::Display + Send + Sync + 'static>(self, context: impl FnOnce() -> C) -> StoreResult<T>;
}

impl<T> StoreContext<T> for StoreResult<T> {
    fn context(self, context: impl fmt::Display + Send + Sync + 'static) -> StoreResult<T> {
        self.map_err(|e| e.context(context))
    }
    fn with_context<C: fmt::Display + Send + Sync + 'static>(self, context: impl FnOnce() -> C) -> StoreResult<T> {
        self.map_err(|e| e.with_context(context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_survive_context_and_untyped_errors_are_transient() {
        let gone: anyhow::Error = StoreError::permanent("column dropped").into();
        assert_eq!(kind(&gone), ErrorKind::Permanent);
        let wrapped =
            anyhow::Error::from(StoreError::permanent("column dropped").context("while flagging")).context("in a step");
        assert_eq!(kind(&wrapped), ErrorKind::Permanent, "context added on the way up keeps the kind");
        assert_eq!(format!("{wrapped:#}"), "in a step: while flagging: column dropped");
        let cut: anyhow::Error = StoreError::unknown("insert timed out").into();
        assert_eq!(kind(&cut), ErrorKind::Unknown);
        assert_eq!(kind(&anyhow::anyhow!("no store said")), ErrorKind::Transient);
        let io = StoreError::new(ErrorKind::Transient, std::io::Error::other("refused"));
        assert_eq!(io.kind(), ErrorKind::Transient);
        assert!(format!("{io:?}").starts_with("Transient error: refused"), "{io:?}");
    }
}
