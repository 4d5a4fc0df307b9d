//! The crash-replay harness: the real pipeline ([`crate::pipeline`]) run
//! unchanged against simulated stores that can fail at every step.
//!
//! Deterministic by construction: one thread, no clock, and every random
//! choice (store faults, crashes at named crash points, fetch shapes) comes
//! from one seeded RNG. Every simulated store call first yields once, so a
//! component's future advances exactly one store call per poll; a
//! [`Scenario`]'s schedule says which component is polled next, when a
//! component is killed (its future dropped wherever it stands: its memory is
//! lost, the stores keep what they committed), when new rows are inserted
//! and committed (ids may commit out of order), and when the sink merges.
//!
//! [`run`] checks after every action that nothing is in the sink that the
//! table lacks and that every row flagged sent is in the log; at the end it
//! stops all faults, drains with fresh components, and checks that the sink's
//! `FINAL` view equals the table row for row with every row flagged sent.

pub mod log;
pub mod sink;
pub mod source;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::event::LoginEvent;
use crate::pipeline::{
    Consumer, ConsumerConfig, CrashPoint, Crashed, Cursor, Faults, NoFaults, Ordering, Producer, ProducerConfig,
    is_crash,
};
use crate::stores::ClaimMode;

/// How often things go wrong, each a probability per opportunity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultRates {
    /// A store call fails without effect.
    pub fail: f64,
    /// A store call takes effect but reports an error (timeout, lost response).
    pub lost: f64,
    /// A component dies at a named crash point it passes.
    pub crash: f64,
}

impl FaultRates {
    pub const NONE: FaultRates = FaultRates { fail: 0.0, lost: 0.0, crash: 0.0 };
}

/// The one source of randomness and faults, shared by all simulated stores.
/// Also keeps a running hash of what happened, to show runs are identical.
pub struct Chaos {
    rng: RefCell<StdRng>,
    rates: Cell<FaultRates>,
    trace: Cell<u64>,
    crashed_at: RefCell<BTreeSet<CrashPoint>>,
}

impl Chaos {
    fn new(seed: u64, rates: FaultRates) -> Self {
        Chaos {
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
            rates: Cell::new(rates),
            trace: Cell::new(seed),
            crashed_at: RefCell::default(),
        }
    }

    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.rng.borrow_mut().random_bool(p.min(1.0))
    }

    pub fn below(&self, n: usize) -> usize {
        self.rng.borrow_mut().random_range(0..n.max(1))
    }

    fn fails(&self, what: &str) -> bool {
        let failed = self.chance(self.rates.get().fail);
        if failed {
            self.note(&("fail", what));
        }
        failed
    }

    fn outcome_lost(&self, what: &str) -> bool {
        let lost = self.chance(self.rates.get().lost);
        if lost {
            self.note(&("lost", what));
        }
        lost
    }

    /// Folds an event into the trace hash.
    pub fn note(&self, event: &impl Hash) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.trace.get().hash(&mut h);
        event.hash(&mut h);
        self.trace.set(h.finish());
    }
}

/// A future that is pending once, then ready: the point where the scheduler
/// may switch components or kill this one.
pub async fn yield_now() {
    struct YieldOnce(bool);
    impl Future for YieldOnce {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
    YieldOnce(false).await
}

/// Crash decisions for one component, from the shared chaos.
pub struct SimFaults(Rc<Chaos>);

impl Faults for SimFaults {
    fn at(&self, point: CrashPoint) -> Result<(), Crashed> {
        if self.0.chance(self.0.rates.get().crash) {
            self.0.note(&("crash", point));
            self.0.crashed_at.borrow_mut().insert(point);
            Err(Crashed(point))
        } else {
            Ok(())
        }
    }
}

/// The three simulated stores.
pub struct World {
    pub chaos: Rc<Chaos>,
    pub table: Rc<RefCell<source::Table>>,
    pub log: Rc<RefCell<log::Log>>,
    pub sink: Rc<RefCell<sink::SinkTable>>,
    partitions: i32,
    /// Poison records appended to the log: (partition, offset).
    poison: RefCell<Vec<(i32, i64)>>,
}

const GROUP: &str = "sim";

impl World {
    pub fn new(seed: u64, rates: FaultRates, partitions: i32) -> Self {
        World {
            chaos: Rc::new(Chaos::new(seed, rates)),
            table: Rc::default(),
            log: Rc::new(RefCell::new(log::Log::new(partitions))),
            sink: Rc::default(),
            partitions,
            poison: RefCell::default(),
        }
    }

    pub fn source(&self, session: u32, mode: ClaimMode) -> source::SimSource {
        source::SimSource {
            chaos: self.chaos.clone(),
            table: self.table.clone(),
            session,
            mode,
            marked: None,
            seen: Default::default(),
        }
    }

    pub fn event_log(&self) -> log::SimLog {
        log::SimLog { chaos: self.chaos.clone(), log: self.log.clone(), partitions: self.partitions }
    }

    pub fn sink_store(&self) -> sink::SimSink {
        sink::SimSink { chaos: self.chaos.clone(), table: self.sink.clone(), group: GROUP.into() }
    }

    pub fn faults(&self) -> SimFaults {
        SimFaults(self.chaos.clone())
    }

    /// Inserts a row with awkward content chosen by the RNG (not yet committed).
    fn insert_row(&self) {
        const NAMES: [&str; 6] =
            ["alice", "", "quote\" back\\slash", "new\nline\ttab", "🦀 emoji", "'; DROP TABLE x; --"];
        let name = NAMES[self.chaos.below(NAMES.len())].to_owned();
        let time = 1_700_000_000_000_000 + self.chaos.below(1_000_000_000) as i64;
        let representable = !self.chaos.chance(0.05);
        self.table.borrow_mut().insert(name, time, representable);
    }

    /// Appends a record that is not a login event to a partition.
    fn append_poison(&self, partition: u8) {
        const JUNK: [&[u8]; 4] =
            [b"not json", b"", br#"{"id":"seven"}"#, br#"{"username":"no id","event_time":"2024-01-01T00:00:00Z"}"#];
        let value = JUNK[self.chaos.below(JUNK.len())].to_vec();
        let at = self.log.borrow_mut().append_poison(partition as usize % self.partitions as usize, value);
        self.poison.borrow_mut().push(at);
    }

    /// The properties that must hold at every moment.
    pub fn check_always(&self) -> Result<(), String> {
        let table = self.table.borrow();
        for row in self.sink.borrow().parts.iter().flatten() {
            match table.committed.get(&row.id) {
                Some((pg, _)) if pg == row => {}
                Some((pg, _)) => {
                    return Err(format!("sink has id {} with content {row:?}, table has {pg:?}", row.id));
                }
                None => return Err(format!("sink has id {} that the table lacks", row.id)),
            }
        }
        let logged: BTreeSet<LoginEvent> =
            self.log.borrow().values().filter_map(|v| LoginEvent::decode(Some(v)).ok()).collect();
        for (row, sent) in table.committed.values() {
            if *sent && !logged.contains(row) {
                return Err(format!("row {} is flagged sent but is not in the log", row.id));
            }
            if *sent && table.rejected.contains_key(&row.id) {
                return Err(format!("row {} is flagged both sent and rejected", row.id));
            }
        }
        Ok(())
    }

    /// The properties that must hold once everything drained.
    pub fn check_quiescent(&self) -> Result<(), String> {
        let table = self.table.borrow();
        for (row, sent) in table.committed.values() {
            let unrepresentable = table.unrepresentable.contains(&row.id);
            if unrepresentable && !table.rejected.contains_key(&row.id) {
                return Err(format!("unrepresentable row {} was not flagged rejected", row.id));
            }
            if !unrepresentable && !sent {
                return Err(format!("row {} is still unsent after draining", row.id));
            }
        }
        let dead: BTreeSet<(i32, i64)> = self.log.borrow().dead_letters.iter().map(|(p, o, _)| (*p, *o)).collect();
        if let Some(missing) = self.poison.borrow().iter().find(|at| !dead.contains(at)) {
            return Err(format!(
                "poison record at partition {} offset {} never reached the dead-letter topic",
                missing.0, missing.1
            ));
        }
        let sendable: Vec<(LoginEvent, bool)> =
            table.rows().into_iter().filter(|(r, _)| !table.rejected.contains_key(&r.id)).collect();
        let expected: Vec<LoginEvent> = sendable.iter().map(|(r, _)| r.clone()).collect();
        let report = crate::verify::reconcile(&sendable, &self.sink.borrow().final_rows());
        if !report.ok() || report.clickhouse_final_rows != expected.len() as u64 {
            return Err(format!("sink FINAL differs from the table after draining:\n{report}"));
        }
        Ok(())
    }
}

/// One thing the scheduler does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Advance a component by one store call (starting it if it is dead).
    Step(Component),
    /// Kill a component wherever it stands.
    Kill(Component),
    /// Insert this many rows (ids allocated, not yet committed).
    Insert(u8),
    /// Commit one pending insert (chosen by index, so ids commit out of order).
    CommitInsert(u8),
    /// A background merge in the sink.
    Merge,
    /// A foreign producer writes a record that is not a login event to this partition.
    Poison(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Producer1,
    Producer2,
    Consumer,
}

/// A whole simulated run: seed, fault rates, shape, and schedule.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub rates: FaultRates,
    pub partitions: i32,
    pub batch_rows: usize,
    pub insert_rows: usize,
    /// Whether the two producers share one keyset cursor (lanes of one
    /// process). A restarted producer keeps the shared, possibly stale, value:
    /// the cursor is a hint, and any value must be safe.
    pub shared_cursor: bool,
    /// How each producer claims. Two exclusive producers at once is what the
    /// advisory lock prevents in real life; here it must still be safe.
    pub modes: [ClaimMode; 2],
    pub actions: Vec<Action>,
}

/// Which ordering the producer and consumer use (the wrong ones exist only in tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Orderings {
    pub producer: Ordering,
    pub consumer: Ordering,
}

/// What a finished run looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub rows: usize,
    /// Hash of every store effect, fault and crash, in order.
    pub trace: u64,
    /// The named crash points at which a component died.
    pub crashed_at: BTreeSet<CrashPoint>,
}

type Task = LocalBoxFuture<'static, anyhow::Error>;

fn producer_task(world: &World, session: u32, mode: ClaimMode, config: ProducerConfig, cursor: Option<Cursor>) -> Task {
    let mut producer = Producer::new(world.source(session, mode), world.event_log(), config);
    if let Some(cursor) = cursor {
        producer = producer.with_cursor(cursor);
    }
    let faults = world.faults();
    async move {
        loop {
            // As in `pg2ch produce`: a store error is retried by the same
            // component; only a crash ends it.
            if let Err(e) = producer.step(&faults).await
                && is_crash(&e)
            {
                return e;
            }
        }
    }
    .boxed_local()
}

fn consumer_task(world: &World, config: ConsumerConfig) -> Task {
    let mut consumer = Consumer::new(world.event_log(), world.sink_store(), config);
    let faults = world.faults();
    async move {
        loop {
            if let Err(e) = consumer.step(&faults, Duration::ZERO).await
                && is_crash(&e)
            {
                return e;
            }
        }
    }
    .boxed_local()
}

/// Runs a scenario; `Err` says which property broke and when.
pub fn run(s: &Scenario, orderings: Orderings) -> Result<Outcome, String> {
    let world = World::new(s.seed, s.rates, s.partitions);
    let producer_config = ProducerConfig { batch_rows: s.batch_rows, ordering: orderings.producer };
    let mut consumer_config = ConsumerConfig::all_partitions(s.partitions);
    consumer_config.insert_rows = s.insert_rows;
    consumer_config.ordering = orderings.consumer;

    let shared = s.shared_cursor.then(Cursor::default);
    let mut tasks: [Option<Task>; 3] = [None, None, None];
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for (i, action) in s.actions.iter().enumerate() {
        world.chaos.note(&format!("{action:?}"));
        match *action {
            Action::Step(c) => {
                let slot = &mut tasks[c as usize];
                let task = slot.get_or_insert_with(|| match c {
                    Component::Producer1 => {
                        producer_task(&world, 1, s.modes[0], producer_config.clone(), shared.clone())
                    }
                    Component::Producer2 => {
                        producer_task(&world, 2, s.modes[1], producer_config.clone(), shared.clone())
                    }
                    Component::Consumer => consumer_task(&world, consumer_config.clone()),
                });
                if let Poll::Ready(_crash) = task.as_mut().poll(&mut cx) {
                    *slot = None; // died at a crash point; restarts on its next step
                }
            }
            Action::Kill(c) => tasks[c as usize] = None,
            Action::Insert(n) => (0..n).for_each(|_| world.insert_row()),
            Action::CommitInsert(k) => world.table.borrow_mut().commit_insert(k as usize),
            Action::Merge => world.sink.borrow_mut().merge(),
            Action::Poison(p) => world.append_poison(p),
        }
        world.check_always().map_err(|e| format!("after action {i} ({action:?}): {e}"))?;
    }

    // Quiescence: no more faults, every insert committed, every component
    // restarted from what the stores kept, drained to the end.
    world.chaos.rates.set(FaultRates::NONE);
    drop(tasks);
    while !world.table.borrow().pending.is_empty() {
        world.table.borrow_mut().commit_insert(0);
    }
    let mut producer = Producer::new(world.source(3, s.modes[0]), world.event_log(), producer_config);
    futures::executor::block_on(producer.drain(&NoFaults)).map_err(|e| format!("final produce: {e:#}"))?;
    let mut consumer = Consumer::new(world.event_log(), world.sink_store(), consumer_config);
    futures::executor::block_on(consumer.drain(&NoFaults, Duration::ZERO))
        .map_err(|e| format!("final consume: {e:#}"))?;
    world.check_always().map_err(|e| format!("after draining: {e}"))?;
    world.check_quiescent()?;
    world.sink.borrow_mut().merge();
    world.check_quiescent().map_err(|e| format!("after the final merge: {e}"))?;
    Ok(Outcome {
        rows: world.table.borrow().committed.len(),
        trace: world.chaos.trace.get(),
        crashed_at: world.chaos.crashed_at.borrow().clone(),
    })
}

#[cfg(test)]
mod tests;
