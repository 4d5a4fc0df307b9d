//! The crash-replay harness: the real pipeline ([`crate::pipeline`]) run
//! unchanged against simulated stores that can fail at every step.
//!
//! Deterministic by construction: one thread, no clock, and every random
//! choice (store faults, crashes at named crash points, fetch shapes, the
//! table's shape and its rows) comes from one seeded RNG. Every simulated
//! store call first yields once, so a component's future advances exactly
//! one store call per poll; a [`Scenario`]'s schedule says which component
//! is polled next, when a component is killed (its future dropped wherever
//! it stands: its memory is lost, the stores keep what they committed), when
//! rows are inserted and committed (keys may commit out of order), updated
//! (their content, or their key), deleted, or inserted again after a
//! deletion, and when the sink merges.
//!
//! The table is drawn too: a random schema (one to three key columns of the
//! types a key may hold, up to six other columns of any type pg2ch carries,
//! nullable or not, names that need quoting) over a plain table or one split
//! into partitions whose slot numbers repeat. Rows are drawn from the whole
//! domain PostgreSQL admits for each column ([`crate::types::strategies`]),
//! and now and then one straddles the message size limit.
//!
//! [`run`] checks after every action that everything the sink holds is
//! exactly a change some claim handed out, and that every row flagged sent
//! is, as it is now, a change in the log; at the end it stops all faults,
//! drains with fresh components (in a bounded number of steps: a drain that
//! stops making progress fails with the stuck state), and checks that the
//! sink's `FINAL` view without deleted keys equals the table's rows that
//! can travel, column by column, every row flagged sent or, if it cannot
//! travel, rejected (and absent from the sink); and that the real `verify`
//! walk agrees.

mod checks;
pub mod leases;
pub mod log;
pub mod sink;
pub mod source;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use proptest::strategy::{BoxedStrategy, Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::change::{self, Change};
use crate::pipeline::{
    Consumer, ConsumerConfig, CrashPoint, Crashed, Cursor, Faults, NoFaults, Ordering, Producer, ProducerConfig,
    is_crash, loops,
};
use crate::schema::TableSchema;
use crate::stores::{ClaimMode, ErrorKind, kind};
use crate::types::{Key, PgType, Value, key_text, strategies};
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

/// Draws rows for the table from the whole domain of each column.
struct Rows {
    runner: TestRunner,
    columns: Vec<BoxedStrategy<Value>>,
}

impl Rows {
    fn new(seed: u64, schema: &TableSchema) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
        // A key column never holds NULL.
        let columns = schema
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| strategies::value_of(&c.ty, c.nullable && !schema.key.contains(&i)))
            .collect();
        Rows { runner, columns }
    }

    fn draw(&mut self, column: usize) -> Value {
        self.columns[column].new_tree(&mut self.runner).expect("value strategies never reject").current()
    }
}

/// The three simulated stores.
pub struct World {
    pub chaos: Rc<Chaos>,
    pub schema: Arc<TableSchema>,
    pub table: Rc<RefCell<source::Table>>,
    pub log: Rc<RefCell<log::Log>>,
    pub sink: Rc<RefCell<sink::SinkTable>>,
    pub leases: Rc<RefCell<leases::LeaseTable>>,
    partitions: i32,
    /// Poison records appended to the log: (partition, offset).
    poison: RefCell<Vec<(i32, i64)>>,
    rows: RefCell<Rows>,
    /// Keys (their values) that were deleted, for inserting them again.
    gone: RefCell<Vec<Vec<Value>>>,
}

const GROUP: &str = "sim";

/// A verify plan for tables of tens of rows that still walks every level:
/// several top ranges, splits, and row-by-row leaves.
pub const SMALL_RANGES: Plan = Plan { chunk_rows: 8, fan_out: 3, leaf_rows: 4, top_batch: 2, repair: false };

impl World {
    /// A world whose table is `user_logins` in one physical partition.
    pub fn new(seed: u64, rates: FaultRates, partitions: i32) -> Self {
        Self::with_table(seed, rates, partitions, Arc::new(change::tests::logins()), 1)
    }

    pub fn with_table(seed: u64, rates: FaultRates, partitions: i32, schema: Arc<TableSchema>, physical: i64) -> Self {
        World {
            chaos: Rc::new(Chaos::new(seed, rates)),
            table: Rc::new(RefCell::new(source::Table::new(schema.clone(), physical))),
            log: Rc::new(RefCell::new(log::Log::new(partitions))),
            sink: Rc::new(RefCell::new(sink::SinkTable::new(schema.clone()))),
            leases: Rc::default(),
            partitions,
            poison: RefCell::default(),
            rows: RefCell::new(Rows::new(seed, &schema)),
            gone: RefCell::default(),
            schema,
        }
    }

    /// A producer's session; claims behave alike in both modes (the mode
    /// only decides whether other producer processes may run beside it).
    pub fn source(&self, session: u32, _mode: ClaimMode) -> source::SimSource {
        source::SimSource {
            chaos: self.chaos.clone(),
            table: self.table.clone(),
            session,
            open: None,
            marked: Vec::new(),
            rejected: Vec::new(),
            chunk: None,
        }
    }

    pub fn event_log(&self) -> log::SimLog {
        log::SimLog { chaos: self.chaos.clone(), log: self.log.clone(), partitions: self.partitions }
    }

    pub fn sink_store(&self) -> sink::SimSink {
        sink::SimSink { chaos: self.chaos.clone(), table: self.sink.clone(), group: GROUP.into() }
    }

    /// A new lease session for `component`'s consumer.
    pub fn lease_session(&self, component: u8) -> leases::SimLeases {
        leases::SimLeases { chaos: self.chaos.clone(), table: self.leases.clone(), component, session: None }
    }

    pub fn faults(&self) -> SimFaults {
        SimFaults(self.chaos.clone())
    }

    pub fn producer(
        &self,
        session: u32,
        mode: ClaimMode,
        config: ProducerConfig,
    ) -> Producer<source::SimSource, log::SimLog> {
        Producer::new(self.schema.clone(), self.source(session, mode), self.event_log(), config)
    }

    pub fn consumer(&self, config: ConsumerConfig) -> Consumer<log::SimLog, sink::SimSink> {
        Consumer::new(self.schema.clone(), self.event_log(), self.sink_store(), config)
    }

    /// The values of a new row: drawn from the whole domain of each
    /// column; now and then its key is one deleted before (an insert
    /// again), and now and then a text column holds text around the
    /// message size limit.
    fn new_row(&self) -> Vec<Value> {
        let mut rows = self.rows.borrow_mut();
        let mut values: Vec<Value> = (0..self.schema.columns.len()).map(|i| rows.draw(i)).collect();
        let gone = self.gone.borrow();
        if !gone.is_empty() && self.chaos.chance(0.3) {
            let key = &gone[self.chaos.below(gone.len())];
            for (i, v) in self.schema.key.iter().zip(key) {
                values[*i] = v.clone();
            }
        }
        if self.chaos.chance(0.01) {
            let big = self.schema.columns.iter().enumerate().position(|(i, c)| {
                !self.schema.key.contains(&i) && matches!(c.ty, PgType::Text | PgType::Json | PgType::Bytea)
            });
            if let Some(i) = big {
                let n = change::MAX_MESSAGE_BYTES - 600 + self.chaos.below(700);
                values[i] = if self.schema.columns[i].ty == PgType::Bytea {
                    Value::Bytea(vec![7; n * 3 / 4])
                } else {
                    Value::Text("x".repeat(n))
                };
            }
        }
        values
    }

    /// Puts `n` rows in the table as if they were there when `init` ran,
    /// to be carried by the initial load in chunks of `chunk_slots` slots.
    pub fn preload(&self, n: usize, chunk_slots: u64) {
        let rows = (0..n).map(|_| self.new_row()).collect();
        self.table.borrow_mut().preload(rows, chunk_slots);
    }

    /// Inserts a row (not yet committed).
    pub fn insert_row(&self) {
        let row = self.new_row();
        self.table.borrow_mut().pending.push(row);
    }

    /// The `n`th committed row's key (modulo their number).
    fn nth_key(&self, n: u8) -> Option<Key> {
        let table = self.table.borrow();
        let len = table.committed.len();
        (len > 0).then(|| table.committed.keys().nth(n as usize % len).expect("in range").clone())
    }

    /// A user's UPDATE of a committed row: new content for its other
    /// columns, and one time in four a new key as well.
    pub fn update_row(&self, n: u8) {
        let Some(key) = self.nth_key(n) else { return };
        let fresh = self.new_row();
        let mut values = self.table.borrow().committed[&key].values.clone();
        let rekey = self.chaos.chance(0.25);
        for (i, v) in fresh.into_iter().enumerate() {
            if rekey || !self.schema.key.contains(&i) {
                values[i] = v;
            }
        }
        let old_key_values: Vec<Value> =
            self.schema.key.iter().map(|i| self.table.borrow().committed[&key].values[*i].clone()).collect();
        if self.table.borrow_mut().update(&key, values) && rekey {
            self.gone.borrow_mut().push(old_key_values);
        }
    }

    /// A user's DELETE of a committed row.
    pub fn delete_row(&self, n: u8) {
        let Some(key) = self.nth_key(n) else { return };
        let key_values: Vec<Value> =
            self.schema.key.iter().map(|i| self.table.borrow().committed[&key].values[*i].clone()).collect();
        if self.table.borrow_mut().delete(&key) {
            self.gone.borrow_mut().push(key_values);
        }
    }

    /// Appends a record that is not a change of the table to a partition.
    fn append_poison(&self, partition: u8) {
        const JUNK: [&[u8]; 4] = [b"not json", b"", br#"{"id":"seven"}"#, br#"{"_pg2ch_version":1}"#];
        let value = JUNK[self.chaos.below(JUNK.len())].to_vec();
        let at = self.log.borrow_mut().append_poison(partition as usize % self.partitions as usize, value);
        self.poison.borrow_mut().push(at);
    }

    /// Runs the real `verify` walk over the simulated stores.
    pub fn verify(&self, plan: Plan) -> anyhow::Result<Report> {
        let mut source = source::SimVerifySource(self.table.clone());
        let mut sink = sink::SimVerifySink(self.sink.clone());
        futures::executor::block_on(crate::verify::verify(&self.schema, &mut source, &mut sink, plan, |_, _| {}))
    }

    /// Drains with fresh components and no faults as `pg2ch run --once`
    /// does (the same loops: one producer pass, then the consumer to the
    /// partitions' ends), in a bounded number of steps; a drain that stops
    /// making progress fails with where it stuck. That one pass moved every
    /// change is then a property ([`World::check_quiescent`]).
    pub fn drain(
        &self,
        modes: ClaimMode,
        producer: ProducerConfig,
        consumer: ConsumerConfig,
        leased: bool,
    ) -> Result<(), String> {
        let budget = 1_000 + 20 * (self.table.borrow().committed.len() + self.log.borrow().values().count());
        let mut p = self.producer(3, modes, producer);
        let mut waits = SimWaits::bounded(budget);
        futures::executor::block_on(loops::produce(
            &mut p,
            &NoFaults,
            "producer".into(),
            true,
            loops::Pace::default(),
            &mut waits,
        ))
        .map_err(|e| format!("final produce: {e:#}"))?;
        // What one pass left unsent, [`World::check_quiescent`] reports.
        if waits.exhausted() {
            return Err(format!("the final --once produce pass did not end in {budget} steps"));
        }
        let all = consumer.partitions.len();
        if leased {
            self.drain_consumer(self.consumer(consumer).with_leases(self.lease_session(0)), budget, all)
        } else {
            self.drain_consumer(self.consumer(consumer), budget, all)
        }
    }

    /// Runs a consumer as `pg2ch consume --once` does, in a bounded number of
    /// steps; it must end reading all of the `all` partitions, at their ends.
    fn drain_consumer<G: crate::stores::Leases>(
        &self,
        mut c: Consumer<log::SimLog, sink::SimSink, G>,
        budget: usize,
        all: usize,
    ) -> Result<(), String> {
        let done = std::cell::Cell::new(Some(true));
        let mut waits = SimWaits::bounded(budget);
        futures::executor::block_on(loops::consume(
            &mut c,
            &NoFaults,
            "consumer".into(),
            Some(&done),
            Duration::ZERO,
            &mut waits,
        ))
        .map_err(|e| format!("final consume: {e:#}"))?;
        if c.partitions().len() != all {
            return Err(format!("the one consumer left reads partitions {:?}, not all {all}", c.partitions()));
        }
        let targets = futures::executor::block_on(c.high_watermarks()).map_err(|e| format!("final consume: {e:#}"))?;
        if !c.reached(&targets) {
            let at = futures::executor::block_on(c.positions()).map(|p| format!("{p:?}")).unwrap_or_default();
            return Err(format!("final consume made no progress in {budget} steps: at {at}, targets {targets:?}"));
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
    /// End a consumer's lease session while it runs on, as the server does
    /// when a process is paused past its lease and then wakes up.
    Expire(Component),
    /// Insert this many rows (not yet committed).
    Insert(u8),
    /// Commit one pending insert (chosen by index, so keys commit out of order).
    CommitInsert(u8),
    /// Update the content (sometimes the key) of a committed row, chosen by index.
    Update(u8),
    /// Delete a committed row, chosen by index.
    Delete(u8),
    /// A background merge in the sink.
    Merge,
    /// A foreign producer writes a record that is not a change to this partition.
    Poison(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Producer1,
    Producer2,
    Consumer,
    /// Other consumers of the same group: sharing the partitions through
    /// leases, or (without) reading the same partitions at the same time,
    /// as a second process given the same `--partitions` without leases would.
    Consumer2,
    Consumer3,
}

/// A whole simulated run: seed, fault rates, shape, and schedule.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub rates: FaultRates,
    pub partitions: i32,
    pub batch_rows: usize,
    /// The producers' byte budget per claim (`usize::MAX`: rows alone bound it).
    pub batch_bytes: usize,
    pub insert_rows: usize,
    /// How far the consumers' clock moves per step: zero stores positions
    /// only when a loop ends, [`loops::STORE_EVERY`] or more after every
    /// write, in between every few writes.
    pub consumer_tick: Duration,
    /// Whether the two producers share one keyset cursor (lanes of one
    /// process). A restarted producer keeps the shared, possibly stale, value:
    /// the cursor is a hint, and any value must be safe.
    pub shared_cursor: bool,
    /// How each producer claims. Two exclusive producers at once is what the
    /// advisory lock prevents in real life; here it must still be safe.
    pub modes: [ClaimMode; 2],
    /// Whether the consumers share the partitions through leases.
    pub leased: bool,
    pub table: Arc<TableSchema>,
    /// Physical partitions of the source table (slots repeat across them).
    pub physical: i64,
    /// Rows in the table when `init` ran, carried by the initial load in
    /// chunks of this many slots.
    pub preloaded: (usize, u64),
    pub actions: Vec<Action>,
}

/// Which ordering the producer and consumer use, and how flags find their
/// rows (the wrong ones exist only in tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Orderings {
    pub producer: Ordering,
    pub consumer: Ordering,
    pub blind_flags: bool,
    pub flags_by_key: bool,
    pub flags_by_slot: bool,
    pub load_outranks: bool,
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

/// Time and shutdown for the pipeline's loops in the simulation: there is
/// no clock, a wait is one scheduling point, and a drain's steps are bounded
/// so that one that stops making progress fails instead of spinning.
pub struct SimWaits {
    /// Steps left (`None`: unbounded).
    budget: Option<usize>,
    /// The clock, moved by `tick` at each step.
    clock: Duration,
    tick: Duration,
}

impl SimWaits {
    pub fn unbounded() -> Self {
        SimWaits { budget: None, clock: Duration::ZERO, tick: Duration::ZERO }
    }

    pub fn bounded(steps: usize) -> Self {
        SimWaits { budget: Some(steps), ..Self::unbounded() }
    }

    /// The clock moves by `tick` at each step.
    pub fn ticking(self, tick: Duration) -> Self {
        SimWaits { tick, ..self }
    }

    /// Whether the budget ran out.
    pub fn exhausted(&self) -> bool {
        self.budget == Some(0)
    }
}

impl crate::pipeline::loops::Waits for SimWaits {
    fn stopping(&self) -> bool {
        false
    }

    async fn step<T>(&mut self, step: impl Future<Output = T>) -> Option<T> {
        self.clock += self.tick;
        match &mut self.budget {
            Some(0) => None,
            Some(left) => {
                *left -= 1;
                Some(step.await)
            }
            None => Some(step.await),
        }
    }

    async fn pause(&mut self, _: Duration) {
        yield_now().await;
    }

    fn now(&self) -> Duration {
        self.clock
    }
}

/// Runs `pg2ch produce`'s loop (not `--once`) until it ends: at a crash or
/// a permanent error, which it returns; store errors are retried.
fn producer_task(world: &World, session: u32, mode: ClaimMode, config: ProducerConfig, cursor: Option<Cursor>) -> Task {
    let mut producer = world.producer(session, mode, config);
    if let Some(cursor) = cursor {
        producer = producer.with_cursor(cursor);
    }
    let faults = world.faults();
    async move {
        let ended = loops::produce(
            &mut producer,
            &faults,
            "producer".into(),
            false,
            loops::Pace::default(),
            &mut SimWaits::unbounded(),
        )
        .await;
        ended.err().unwrap_or_else(|| anyhow::anyhow!("the producer loop stopped without shutdown"))
    }
    .boxed_local()
}

/// Runs `pg2ch consume`'s loop until it ends, as [`producer_task`]; with
/// leases, as a member of the group.
fn consumer_task(world: &World, config: ConsumerConfig, tick: Duration, leases: Option<u8>) -> Task {
    async fn run<G: crate::stores::Leases>(
        mut consumer: Consumer<log::SimLog, sink::SimSink, G>,
        faults: SimFaults,
        tick: Duration,
    ) -> anyhow::Error {
        let mut waits = SimWaits::unbounded().ticking(tick);
        let ended = loops::consume(&mut consumer, &faults, "consumer".into(), None, Duration::ZERO, &mut waits).await;
        ended.err().unwrap_or_else(|| anyhow::anyhow!("the consumer loop stopped without shutdown"))
    }
    let consumer = world.consumer(config);
    match leases {
        Some(component) => {
            run(consumer.with_leases(world.lease_session(component)), world.faults(), tick).boxed_local()
        }
        None => run(consumer, world.faults(), tick).boxed_local(),
    }
}

/// Runs a scenario; `Err` says which property broke and when.
pub fn run(s: &Scenario, orderings: Orderings) -> Result<Outcome, String> {
    let world = World::with_table(s.seed, s.rates, s.partitions, s.table.clone(), s.physical);
    {
        let mut table = world.table.borrow_mut();
        table.blind_flags = orderings.blind_flags;
        table.flags_by_key = orderings.flags_by_key;
        table.flags_by_slot = orderings.flags_by_slot;
        table.load_outranks = orderings.load_outranks;
    }
    world.preload(s.preloaded.0, s.preloaded.1);
    let producer_config =
        ProducerConfig { batch_rows: s.batch_rows, batch_bytes: s.batch_bytes, ordering: orderings.producer };
    let mut consumer_config = ConsumerConfig::all_partitions(s.partitions);
    consumer_config.insert_rows = s.insert_rows;
    consumer_config.ordering = orderings.consumer;

    let shared = s.shared_cursor.then(Cursor::default);
    let mut tasks: [Option<Task>; 5] = Default::default();
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
                    Component::Consumer | Component::Consumer2 | Component::Consumer3 => {
                        consumer_task(&world, consumer_config.clone(), s.consumer_tick, s.leased.then_some(c as u8))
                    }
                });
                if let Poll::Ready(e) = task.as_mut().poll(&mut cx) {
                    if !is_crash(&e) {
                        return Err(format!("after action {i} ({action:?}): {c:?} stopped: {e:#}"));
                    }
                    *slot = None; // died at a crash point; restarts on its next step
                }
            }
            Action::Kill(c) => tasks[c as usize] = None,
            Action::Expire(c) => world.leases.borrow_mut().expire(c as u8),
            Action::Insert(n) => (0..n).for_each(|_| world.insert_row()),
            Action::CommitInsert(k) => world.table.borrow_mut().commit_insert(k as usize),
            Action::Update(k) => world.update_row(k),
            Action::Delete(k) => world.delete_row(k),
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
    world.drain(s.modes[0], producer_config, consumer_config, s.leased)?;
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
