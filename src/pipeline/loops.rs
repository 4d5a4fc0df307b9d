//! Loop policy: how a producer or consumer goes on after each step. A
//! failure is retried with capped exponential backoff unless it is
//! permanent (or a crash); an idle producer looks for new rows again after
//! a wait that grows from the coalescing window to the poll interval; `--once`
//! stops after one pass (the producer) or at the partitions' ends (the
//! consumer, once its producer is done).
//!
//! The loops are written against [`Waits`], which owns time and shutdown:
//! the real one sleeps and abandons a step that outlives shutdown's grace; the simulation's yields to its
//! scheduler instead of sleeping and bounds a drain's steps. Both run these
//! loops unchanged.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::Duration;

use super::{Consumer, Faults, ProduceStep, Producer, Store, is_crash};
use crate::stores::{ErrorKind, EventLog, Leases, Sink, SourceTable, kind};

/// Time and shutdown, as a loop sees them.
#[allow(async_fn_in_trait)] // run on one thread: the loops need no `Send`
pub trait Waits {
    /// Whether shutdown was asked: the loop stops before its next step.
    fn stopping(&self) -> bool;
    /// Runs one step; `None` when it was abandoned (shutdown's grace passed,
    /// or the simulation's step budget ran out).
    async fn step<T>(&mut self, step: impl Future<Output = T>) -> Option<T>;
    /// A wait: before a retry, between a busy producer's passes, or an idle
    /// producer's before it looks again.
    async fn pause(&mut self, d: Duration);
    /// Monotonic time since some fixed origin.
    fn now(&self) -> Duration;
}

/// Capped exponential backoff that logs once when trouble starts and once
/// when it ends, not on every retry.
pub struct Backoff {
    what: String,
    delay: Duration,
    failing: bool,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const CAP: Duration = Duration::from_secs(5);

    pub fn new(what: String) -> Self {
        Backoff { what, delay: Self::FIRST, failing: false }
    }

    pub fn ok(&mut self) {
        if self.failing {
            tracing::info!("{}: recovered", self.what);
        }
        self.failing = false;
        self.delay = Self::FIRST;
    }

    /// Counts a failure; returns how long to wait before the retry.
    pub fn failed(&mut self, e: &anyhow::Error) -> Duration {
        metrics::counter!("pg2ch_retries_total", "component" => self.what.clone()).increment(1);
        if !self.failing {
            let unknown = match kind(e) {
                ErrorKind::Unknown => " (it may have taken effect; the repeat is collapsed downstream)",
                _ => "",
            };
            tracing::warn!("{}: {e:#}{unknown}; retrying with backoff", self.what);
        }
        self.failing = true;
        let now = self.delay;
        self.delay = (self.delay * 2).min(Self::CAP);
        now
    }
}

/// Whether a failure ends the loop instead of being retried.
fn fatal(e: &anyhow::Error) -> bool {
    is_crash(e) || kind(e) == ErrorKind::Permanent
}

/// Runs a producer until shutdown, a fatal error, or (with `once`) the end
/// of one pass over the table. Returns the rows it moved.
///
/// A pass that ended with rows is followed by the next no sooner than
/// `coalesce` after the step began: under a steady load, claims come at
/// most that often, so a row changed many times a second (a hot counter)
/// is published and flagged at most once per `coalesce`, and each claim
/// carries what the window gathered. A backlog is not slowed: a full claim
/// does not end its pass, and the next claim follows at once.
///
/// While the table's initial load lasts, the producer carries its chunks
/// between claims: after each claim, chunks until the window is over, then
/// the next claim. Changes made meanwhile keep flowing at the usual pace,
/// and `once` goes on until the load is over and a pass found nothing more.
///
/// A pass that found nothing is followed by the next after [`IdleWait`]:
/// one window after work (more is likely on its way), less and less often
/// as the table stays quiet, down to once per `poll`.
pub async fn produce<S: SourceTable, L: EventLog, W: Waits>(
    p: &mut Producer<S, L>,
    faults: &dyn Faults,
    what: String,
    once: bool,
    pace: Pace,
    waits: &mut W,
) -> anyhow::Result<usize> {
    let coalesce = pace.coalesce;
    let mut idle = IdleWait::new(pace);
    let mut moved = 0;
    let mut backoff = Backoff::new(what);
    // When the last claim began, and whether the last step was a claim:
    // while an initial load lasts, chunks fill the windows between claims
    // (one chunk at least after each claim).
    let mut last_claim: Option<Duration> = None;
    let mut claimed_last = false;
    while !waits.stopping() {
        let passes = p.passes();
        let began = waits.now();
        let window = last_claim.is_some_and(|at| claimed_last || began.saturating_sub(at) < coalesce);
        if p.loading() && window {
            claimed_last = false;
            let Some(step) = waits.step(p.load_step(faults)).await else { break };
            match step {
                Ok(loaded) => {
                    backoff.ok();
                    moved += loaded.unwrap_or(0);
                    if loaded.is_some_and(|n| n > 0) {
                        idle.worked();
                    }
                }
                Err(e) if once || fatal(&e) => return Err(e),
                Err(e) => {
                    let d = backoff.failed(&e);
                    waits.pause(d).await;
                }
            }
            continue;
        }
        last_claim = Some(began);
        claimed_last = true;
        let Some(step) = waits.step(p.step(faults)).await else { break };
        match step {
            Ok(ProduceStep::Moved(n)) => {
                backoff.ok();
                moved += n;
                tracing::debug!("published and flagged {n} rows");
                if n > 0 {
                    idle.worked();
                }
                // One pass finds every change committed before it began; a
                // second would only rescan what the first left behind.
                if once && p.passes() > 0 && !p.loading() {
                    break;
                }
                if p.passes() > passes && !p.loading() {
                    if n > 0 {
                        // The load goes on, most likely: gather its changes
                        // for the window, then claim them at once.
                        let rest = coalesce.saturating_sub(waits.now().saturating_sub(began));
                        if !rest.is_zero() {
                            waits.pause(rest).await;
                        }
                    } else {
                        // A pass ended empty-handed.
                        waits.pause(idle.after_empty_look()).await;
                    }
                }
            }
            Ok(ProduceStep::Idle) if p.loading() => backoff.ok(),
            Ok(ProduceStep::Idle) => {
                backoff.ok();
                if once {
                    break;
                }
                waits.pause(idle.after_empty_look()).await;
            }
            Err(e) if once || fatal(&e) => return Err(e),
            Err(e) => {
                let d = backoff.failed(&e);
                waits.pause(d).await;
            }
        }
    }
    Ok(moved)
}

/// How long a fetch may wait for records while they keep coming, and for how
/// long after the last ones. A Kafka broker answers a waiting fetch as soon
/// as records arrive, but nisshi as released answers after half the wait
/// whatever arrives (measured: a 200 ms wait returns after 100 ms with a
/// record produced at 20 ms; the local stack's build wakes on produce), and
/// serves one connection's requests in turn, so a long wait would hold every
/// row that long. Idle, the fetch
/// waits the poll interval up to [`COLD_WAIT`], so an idle consumer costs a
/// few requests a second and the first row after a pause waits at most that.
pub const HOT_WAIT: Duration = Duration::from_millis(4);
pub const HOT_FOR: Duration = Duration::from_secs(2);
pub const COLD_WAIT: Duration = Duration::from_millis(200);

/// How often a running consumer stores its positions: on its first step
/// after this long since the last store (an idle consumer steps at least
/// every [`COLD_WAIT`]), and when its loop ends. A crash replays what was
/// written since the last store, which the sink collapses; storing after
/// every write would double the sink's inserts.
pub const STORE_EVERY: Duration = Duration::from_secs(1);

/// How often a running consumer renews its partition leases and moves to
/// its fair share ([`Consumer::rebalance`]): a member that joins gets its
/// share, and one that left is replaced, within about this long of the
/// leases noticing.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// The longest an idle producer waits before it looks for new rows again,
/// unless told otherwise (`--poll-ms`): how late the first change after a
/// quiet spell can be found.
pub const DEFAULT_POLL: Duration = Duration::from_millis(200);

/// An idle producer's shortest wait after work (with no coalescing window).
pub const IDLE_FIRST: Duration = Duration::from_millis(10);

/// How often a producer looks for new rows and how long it gathers them.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// The longest wait of an idle producer ([`DEFAULT_POLL`]).
    pub poll: Duration,
    /// The window of a busy one ([`DEFAULT_COALESCE`]).
    pub coalesce: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace { poll: DEFAULT_POLL, coalesce: DEFAULT_COALESCE }
    }
}

/// An idle producer's waits: the coalescing window after work (at least
/// [`IDLE_FIRST`]), twice as long after every empty look, up to the poll
/// interval. A busy table's lanes then claim no more often than the window
/// (a sibling lane's empty pass is not followed by a claim at once, which
/// would flag hot rows again); a quiet table costs a few cheap index
/// lookups a second. Nothing in a user's statement wakes producers: a
/// statement trigger would tax every user statement (measured: see
/// docs/performance.md).
pub struct IdleWait {
    first: Duration,
    next: Duration,
    poll: Duration,
}

impl IdleWait {
    pub fn new(pace: Pace) -> Self {
        let first = pace.coalesce.max(IDLE_FIRST).min(pace.poll);
        IdleWait { first, next: first, poll: pace.poll }
    }

    /// Rows were found: the next idle wait is short again.
    pub fn worked(&mut self) {
        self.next = self.first;
    }

    /// The wait before the next look, after an empty one.
    pub fn after_empty_look(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).min(self.poll);
        now
    }
}

/// The window a busy producer gathers changes over between two passes,
/// unless told otherwise (`--coalesce-ms`): a row changed many times a
/// second is published at most once per window, at the cost of up to this
/// much more time from commit to ClickHouse under load.
pub const DEFAULT_COALESCE: Duration = Duration::from_millis(100);

/// A fetch's wait, given when records last came (on [`Waits::now`]'s clock).
pub fn fetch_wait(poll: Duration, now: Duration, last_records: Option<Duration>) -> Duration {
    match last_records {
        Some(at) if now.saturating_sub(at) < HOT_FOR => HOT_WAIT.min(poll),
        _ => poll.min(COLD_WAIT),
    }
}

/// Runs a consumer until shutdown or a fatal error. `done` is its
/// producer's outcome when it runs beside one with `--once` (or already
/// `Some(true)` when the producer finished before): once the producer
/// succeeded, the consumer drains to the partitions' ends as they are then,
/// and returns; if it failed, the consumer stops (the producer reports why).
/// Returns the records it wrote.
pub async fn consume<L: EventLog, K: Sink, G: Leases, W: Waits>(
    c: &mut Consumer<L, K, G>,
    faults: &dyn Faults,
    what: String,
    done: Option<&Cell<Option<bool>>>,
    poll: Duration,
    waits: &mut W,
) -> anyhow::Result<usize> {
    let mut records = 0;
    let mut targets: Option<BTreeMap<i32, i64>> = None;
    let mut backoff = Backoff::new(what);
    let mut last_records = None;
    let mut last_store = waits.now();
    let mut last_renew: Option<Duration> = None;
    while !waits.stopping() {
        // Leases first: a consumer reads nothing until it holds its share.
        let renew = last_renew.is_none_or(|at| waits.now().saturating_sub(at) >= RENEW_EVERY);
        let step = if renew {
            match waits.step(c.rebalance(faults)).await {
                None => return Ok(records),
                Some(Ok(())) => {
                    last_renew = Some(waits.now());
                    Ok(None)
                }
                Some(Err(e)) => Err(e),
            }
        } else {
            if let Some(done) = done {
                match done.get() {
                    Some(false) => break,
                    Some(true) if targets.is_none() => targets = Some(BTreeMap::new()),
                    _ => {}
                }
            }
            if let Some(t) = &mut targets {
                // The ends as they are when the producer is done, for the
                // partitions read then and those taken since.
                if c.partitions().iter().any(|p| !t.contains_key(p)) {
                    for (p, end) in c.high_watermarks().await? {
                        t.entry(p).or_insert(end);
                    }
                }
                if c.reached(t) {
                    break;
                }
            }
            let wait = fetch_wait(poll, waits.now(), last_records);
            let store = if waits.now().saturating_sub(last_store) >= STORE_EVERY { Store::Now } else { Store::Later };
            let Some(step) = waits.step(c.step(faults, wait, store)).await else { return Ok(records) };
            if store == Store::Now && step.is_ok() {
                last_store = waits.now();
            }
            step.map(Some)
        };
        match step {
            Ok(None) => backoff.ok(),
            Ok(Some(step)) => {
                backoff.ok();
                records += step.records;
                if step.records > 0 {
                    last_records = Some(waits.now());
                }
            }
            Err(e) if is_crash(&e) => return Err(e),
            Err(e) if done.is_some() || fatal(&e) => {
                // What was written stays written; store its positions if
                // the sink lets us, so that a restart replays less.
                let _ = waits.step(c.store_positions(faults)).await;
                return Err(e);
            }
            Err(e) => {
                let d = backoff.failed(&e);
                waits.pause(d).await;
            }
        }
    }
    match waits.step(c.store_positions(faults)).await {
        Some(Err(e)) => Err(e),
        _ => Ok(records),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_starts_over_after_a_success() {
        let mut b = Backoff::new("test".into());
        let e = anyhow::anyhow!("down");
        let waits: Vec<Duration> = (0..8).map(|_| b.failed(&e)).collect();
        assert_eq!(waits[0], Backoff::FIRST);
        assert!(waits.windows(2).all(|w| w[1] == (w[0] * 2).min(Backoff::CAP)), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), Backoff::CAP);
        b.ok();
        assert_eq!(b.failed(&e), Backoff::FIRST);
    }

    #[test]
    fn a_fetch_waits_briefly_while_records_come_and_the_poll_interval_when_idle() {
        let poll = Duration::from_millis(500);
        let at = Duration::from_secs(10);
        assert_eq!(fetch_wait(poll, at, None), COLD_WAIT);
        assert_eq!(fetch_wait(poll, at, Some(at - Duration::from_millis(10))), HOT_WAIT);
        assert_eq!(fetch_wait(poll, at, Some(at - HOT_FOR)), COLD_WAIT);
        assert_eq!(fetch_wait(Duration::from_millis(1), at, Some(at)), Duration::from_millis(1));
    }

    #[test]
    fn an_idle_producer_looks_soon_after_work_and_at_the_poll_interval_when_quiet() {
        let ms = Duration::from_millis;
        let mut idle = IdleWait::new(Pace { poll: ms(1000), coalesce: ms(0) });
        let waits: Vec<_> = (0..9).map(|_| idle.after_empty_look()).collect();
        assert_eq!(waits, [ms(10), ms(20), ms(40), ms(80), ms(160), ms(320), ms(640), ms(1000), ms(1000)]);
        idle.worked();
        assert_eq!(idle.after_empty_look(), IDLE_FIRST);
        // The coalescing window is the first wait: lanes claim no more often.
        let mut windowed = IdleWait::new(Pace::default());
        assert_eq!(
            [windowed.after_empty_look(), windowed.after_empty_look(), windowed.after_empty_look()],
            [ms(100), ms(200), ms(200)]
        );
        windowed.worked();
        assert_eq!(windowed.after_empty_look(), DEFAULT_COALESCE);
        // A poll interval under the first wait bounds every wait.
        let mut quick = IdleWait::new(Pace { poll: ms(3), coalesce: ms(50) });
        assert_eq!([quick.after_empty_look(), quick.after_empty_look()], [ms(3), ms(3)]);
        quick.worked();
        assert_eq!(quick.after_empty_look(), ms(3));
    }
}
