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
//! stops all faults, drains with fresh components (in a bounded number of
//! steps: a drain that stops making progress fails with the stuck state),
//! and checks that the sink's `FINAL` view equals the table row for row,
//! every row flagged sent or, if it cannot travel, rejected.
//!
//! Rows cover the whole domain PostgreSQL admits ([`World::insert_row`]):
//! any bytes for text (invalid UTF-8, control characters, empty, NULL, over
//! the message limit), any time from 4714 BC to 294276 AD, `±infinity`, ids
//! anywhere in `i64`, and tables split into partitions whose slot numbers
//! repeat.

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

use crate::event::{LoginEvent, PgTimestamp};
use crate::pipeline::{
    Consumer, ConsumerConfig, CrashPoint, Crashed, Cursor, Faults, NoFaults, Ordering, ProduceStep, Producer,
    ProducerConfig, is_crash,
};
use crate::stores::{ClaimMode, ErrorKind, kind};
use crate::verify::{Plan, Report};

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

    /// A value in `range`, uniformly.
    pub fn within(&self, range: std::ops::RangeInclusive<i64>) -> i64 {
        self.rng.borrow_mut().random_range(range)
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

/// A verify plan for tables of tens of rows that still walks every level:
/// several top ranges, splits, and row-by-row leaves.
pub const SMALL_RANGES: Plan = Plan { chunk_rows: 8, fan_out: 3, leaf_rows: 4, repair: false };

/// The source table's shape: where ids start, how they step, how many
/// partitions hold the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableShape {
    pub first_id: i64,
    pub id_step: i64,
    pub partitions: i64,
}

impl Default for TableShape {
    fn default() -> Self {
        TableShape { first_id: 1, id_step: 1, partitions: 1 }
    }
}

impl World {
    pub fn new(seed: u64, rates: FaultRates, partitions: i32) -> Self {
        Self::with_table(seed, rates, partitions, TableShape::default())
    }

    pub fn with_table(seed: u64, rates: FaultRates, partitions: i32, shape: TableShape) -> Self {
        World {
            chaos: Rc::new(Chaos::new(seed, rates)),
            table: Rc::new(RefCell::new(source::Table::new(shape.first_id, shape.id_step, shape.partitions))),
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

    /// Inserts a row (not yet committed) with content drawn by the RNG from
    /// the whole domain PostgreSQL admits for each column.
    pub fn insert_row(&self) {
        let (username, event_time) = (self.username(), self.event_time());
        self.table.borrow_mut().insert(username, event_time);
    }

    /// Text as PostgreSQL may hold it: tame and awkward names, control
    /// characters, any non-NUL bytes (a SQL_ASCII database), NULL, and now
    /// and then one around the message size limit.
    fn username(&self) -> Option<Vec<u8>> {
        const NAMES: [&str; 6] =
            ["alice", "", "quote\" back\\slash", "new\nline\ttab", "🦀 emoji", "'; DROP TABLE x; --"];
        let c = &self.chaos;
        let len = c.below(24);
        Some(match c.below(1000) {
            0..=399 => NAMES[c.below(NAMES.len())].as_bytes().to_vec(),
            400..=599 => (0..len).map(|_| 1 + c.below(255) as u8).collect(),
            600..=799 => {
                const ODD: [char; 8] = ['\u{1}', '\u{1f}', '\u{7f}', '"', '\\', 'é', '\u{10ffff}', '\u{2028}'];
                (0..len).map(|_| ODD[c.below(ODD.len())]).collect::<String>().into_bytes()
            }
            800..=949 => (0..len).map(|_| b'a' + c.below(26) as u8).collect(),
            950..=996 => return None,
            // Straddles the limit: the JSON around the name is under 100 bytes.
            _ => vec![b'x'; crate::pipeline::MAX_MESSAGE_BYTES - 100 + c.below(120)],
        })
    }

    /// A time as PostgreSQL may hold it: near today, anywhere in its range,
    /// its ends, the end of what `Int64` microseconds hold, the borders of
    /// four-digit years, `±infinity`, NULL.
    fn event_time(&self) -> Option<PgTimestamp> {
        let c = &self.chaos;
        let today = 1_700_000_000_000_000 - PgTimestamp::EPOCH_UNIX_US;
        Some(PgTimestamp(match c.below(100) {
            0..=39 => today + c.below(1_000_000_000) as i64,
            40..=69 => c.within(PgTimestamp::MIN.0..=PgTimestamp::MAX.0),
            70..=94 => {
                let edges = [
                    PgTimestamp::MIN.0,
                    PgTimestamp::MAX.0,
                    PgTimestamp::INFINITY.0,
                    PgTimestamp::NEG_INFINITY.0,
                    i64::MAX - PgTimestamp::EPOCH_UNIX_US,
                    i64::MAX - PgTimestamp::EPOCH_UNIX_US + 1,
                    -62_167_219_200_000_000 - PgTimestamp::EPOCH_UNIX_US - 1,
                    253_402_300_800_000_000 - PgTimestamp::EPOCH_UNIX_US,
                    -PgTimestamp::EPOCH_UNIX_US,
                    0,
                ];
                edges[c.below(edges.len())]
            }
            _ => return None,
        }))
    }

    /// What a committed row must become: the event it travels as, or the
    /// reason it cannot travel (the real decision, then the message limit).
    fn expected(row: &source::SimRow) -> Result<LoginEvent, String> {
        let event = row.event()?;
        crate::pipeline::oversize(&event.encode()).map_or(Ok(event), Err)
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
            match table.committed.get(&row.id).map(World::expected) {
                Some(Ok(pg)) if pg == *row => {}
                Some(Ok(pg)) => {
                    return Err(format!("sink has id {} with content {row:?}, table has {pg:?}", row.id));
                }
                Some(Err(why)) => return Err(format!("sink has id {}, which cannot travel: {why}", row.id)),
                None => return Err(format!("sink has id {} that the table lacks", row.id)),
            }
        }
        let logged: BTreeSet<LoginEvent> =
            self.log.borrow().values().filter_map(|v| LoginEvent::decode(Some(v)).ok()).collect();
        for (id, row) in &table.committed {
            if !row.sent {
                continue;
            }
            match World::expected(row) {
                Ok(event) if logged.contains(&event) => {}
                Ok(_) => return Err(format!("row {id} is flagged sent but is not in the log")),
                Err(why) => return Err(format!("row {id} is flagged sent but cannot travel: {why}")),
            }
            if table.rejected.contains_key(id) {
                return Err(format!("row {id} is flagged both sent and rejected"));
            }
        }
        Ok(())
    }

    /// The properties that must hold once everything drained.
    pub fn check_quiescent(&self) -> Result<(), String> {
        let table = self.table.borrow();
        let mut sendable = Vec::new();
        for (id, row) in &table.committed {
            match (World::expected(row), table.rejected.get(id)) {
                (Ok(event), None) if row.sent => sendable.push((event, true)),
                (Ok(_), None) => return Err(format!("row {id} is still unsent after draining")),
                (Ok(_), Some(why)) => return Err(format!("row {id} could travel but was rejected: {why}")),
                (Err(why), None) => return Err(format!("row {id} cannot travel ({why}) but was not flagged rejected")),
                (Err(_), Some(_)) => {}
            }
        }
        let dead: BTreeSet<(i32, i64)> = self.log.borrow().dead_letters.iter().map(|(p, o, _)| (*p, *o)).collect();
        if let Some(missing) = self.poison.borrow().iter().find(|at| !dead.contains(at)) {
            return Err(format!(
                "poison record at partition {} offset {} never reached the dead-letter topic",
                missing.0, missing.1
            ));
        }
        let report = self.verify(SMALL_RANGES).map_err(|e| format!("verify: {e:#}"))?;
        if !report.ok() || report.clickhouse_final_rows != sendable.len() as u64 {
            return Err(format!("sink FINAL differs from the table after draining:\n{report}"));
        }
        Ok(())
    }

    /// Runs the real `verify` walk over the simulated stores.
    pub fn verify(&self, plan: Plan) -> anyhow::Result<Report> {
        let mut source = source::SimVerifySource(self.table.clone());
        let mut sink = sink::SimVerifySink(self.sink.clone());
        futures::executor::block_on(crate::verify::verify(&mut source, &mut sink, plan, |_, _| {}))
    }

    /// Drains with fresh components and no faults, in a bounded number of
    /// steps; a drain that stops making progress fails with where it stuck.
    pub fn drain(&self, modes: ClaimMode, producer: ProducerConfig, consumer: ConsumerConfig) -> Result<(), String> {
        let budget = 1_000 + 20 * (self.table.borrow().committed.len() + self.log.borrow().values().count());
        let mut p = Producer::new(self.source(3, modes), self.event_log(), producer);
        let mut steps = 0;
        loop {
            match futures::executor::block_on(p.step(&NoFaults)) {
                Ok(ProduceStep::Idle) => break,
                Ok(ProduceStep::Moved(_)) => {}
                Err(e) => return Err(format!("final produce: {e:#}")),
            }
            steps += 1;
            if steps > budget {
                let left: Vec<i64> =
                    self.table.borrow().committed.iter().filter(|(_, r)| !r.sent).map(|(id, _)| *id).take(10).collect();
                return Err(format!("final produce made no progress in {budget} steps; unsent ids include {left:?}"));
            }
        }
        let mut c = Consumer::new(self.event_log(), self.sink_store(), consumer);
        let targets = futures::executor::block_on(c.high_watermarks()).map_err(|e| format!("final consume: {e:#}"))?;
        let mut steps = 0;
        while !c.reached(&targets) {
            futures::executor::block_on(c.step(&NoFaults, Duration::ZERO))
                .map_err(|e| format!("final consume: {e:#}"))?;
            steps += 1;
            if steps > budget {
                let at = futures::executor::block_on(c.positions()).map(|p| format!("{p:?}")).unwrap_or_default();
                return Err(format!("final consume made no progress in {budget} steps: at {at}, targets {targets:?}"));
            }
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
    /// A second consumer of the same group, reading the same partitions at
    /// the same time (what a misconfigured second process does).
    Consumer2,
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
    pub table: TableShape,
    pub actions: Vec<Action>,
}

/// Which ordering the producer and consumer use, and whether flags ignore
/// the partition (the wrong ones exist only in tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Orderings {
    pub producer: Ordering,
    pub consumer: Ordering,
    pub blind_flags: bool,
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
            // component; a crash or a permanent error ends it.
            if let Err(e) = producer.step(&faults).await
                && (is_crash(&e) || kind(&e) == ErrorKind::Permanent)
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
                && (is_crash(&e) || kind(&e) == ErrorKind::Permanent)
            {
                return e;
            }
        }
    }
    .boxed_local()
}

/// Runs a scenario; `Err` says which property broke and when.
pub fn run(s: &Scenario, orderings: Orderings) -> Result<Outcome, String> {
    let world = World::with_table(s.seed, s.rates, s.partitions, s.table);
    world.table.borrow_mut().blind_flags = orderings.blind_flags;
    let producer_config = ProducerConfig { batch_rows: s.batch_rows, ordering: orderings.producer };
    let mut consumer_config = ConsumerConfig::all_partitions(s.partitions);
    consumer_config.insert_rows = s.insert_rows;
    consumer_config.ordering = orderings.consumer;

    let shared = s.shared_cursor.then(Cursor::default);
    let mut tasks: [Option<Task>; 4] = [None, None, None, None];
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
                    Component::Consumer | Component::Consumer2 => consumer_task(&world, consumer_config.clone()),
                });
                if let Poll::Ready(e) = task.as_mut().poll(&mut cx) {
                    if !is_crash(&e) {
                        return Err(format!("after action {i} ({action:?}): {c:?} stopped: {e:#}"));
                    }
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
    world.drain(s.modes[0], producer_config, consumer_config)?;
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
