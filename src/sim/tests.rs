//! The exactly-once properties, searched over thousands of crash schedules.
//!
//! `PG2CH_SIM_CASES` (or `PROPTEST_CASES`) sets the number of cases (default
//! 1000); `PROPTEST_RNG_SEED=N` makes a whole run repeatable. A failure
//! prints the shrunk scenario (seed, fault rates, table and schedule) and
//! proptest records it under `proptest-regressions/`, where it is replayed
//! first on every later run.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed, TestError, TestRunner};

use super::*;
use crate::pipeline::{ProduceStep, Store};
use crate::types::KeyPart;

fn cases() -> u32 {
    ["PG2CH_SIM_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(1000)
}

fn component() -> impl Strategy<Value = Component> {
    prop_oneof![
        Just(Component::Producer1),
        Just(Component::Producer2),
        Just(Component::Consumer),
        Just(Component::Consumer2),
        Just(Component::Consumer3)
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        12 => Just(Action::Step(Component::Producer1)),
        6 => Just(Action::Step(Component::Producer2)),
        14 => Just(Action::Step(Component::Consumer)),
        3 => Just(Action::Step(Component::Consumer2)),
        3 => Just(Action::Step(Component::Consumer3)),
        2 => component().prop_map(Action::Kill),
        1 => prop_oneof![Just(Component::Consumer), Just(Component::Consumer2), Just(Component::Consumer3)]
            .prop_map(Action::Expire),
        4 => (1u8..6).prop_map(Action::Insert),
        5 => any::<u8>().prop_map(Action::CommitInsert),
        3 => any::<u8>().prop_map(Action::Update),
        2 => any::<u8>().prop_map(Action::Delete),
        1 => Just(Action::Merge),
        1 => any::<u8>().prop_map(Action::Poison),
    ]
}

fn claim_mode() -> impl Strategy<Value = ClaimMode> {
    prop_oneof![Just(ClaimMode::Shared), Just(ClaimMode::Exclusive)]
}

/// Every table shape `init` accepts: any key (one to three columns of the
/// types a key may hold), any other columns, plain or partitioned.
fn table_shape() -> impl Strategy<Value = (Arc<TableSchema>, i64)> {
    (prop_oneof![2 => Just(change::tests::logins()), 5 => change::tests::table()], prop_oneof![Just(1i64), 2..5i64])
        .prop_map(|(t, physical)| (Arc::new(t), physical))
}

pub fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        (0.0..0.25f64, 0.0..0.2f64, 0.0..0.15f64),
        1..4i32,
        (1..8usize, prop_oneof![Just(usize::MAX), 1..2048usize]),
        (1..6usize, prop_oneof![Just(0u64), 0..1500u64, Just(5000u64)]),
        (any::<bool>(), [claim_mode(), claim_mode()], any::<bool>()),
        table_shape(),
        (prop_oneof![Just(0usize), 1..24usize], 1..6u64),
        proptest::collection::vec(action(), 1..160),
    )
        .prop_map(
            |(
                seed,
                (fail, lost, crash),
                partitions,
                (batch_rows, batch_bytes),
                (insert_rows, tick_ms),
                (shared_cursor, modes, leased),
                (table, physical),
                preloaded,
                actions,
            )| {
                Scenario {
                    seed,
                    rates: FaultRates { fail, lost, crash },
                    partitions,
                    batch_rows,
                    batch_bytes,
                    insert_rows,
                    consumer_tick: Duration::from_millis(tick_ms),
                    shared_cursor,
                    modes,
                    leased,
                    table,
                    physical,
                    preloaded,
                    actions,
                }
            },
        )
}

proptest! {
    #![proptest_config(crate::types::strategies::config(cases()))]

    /// Whatever crashes and faults happen, in whatever order, with rows
    /// inserted, updated, deleted and inserted again: the sink only ever
    /// holds changes a claim handed out, every row flagged sent is in the
    /// log as it is now, and after draining the sink's FINAL view without
    /// deleted keys equals the table, column by column.
    #[test]
    fn exactly_once_whatever_crashes(s in scenario()) {
        run(&s, Orderings::default()).map_err(TestCaseError::fail)?;
    }
}

/// Searches for a counterexample with a wrong ordering; returns it.
fn counterexample(orderings: Orderings) -> Option<Scenario> {
    counterexample_in(scenario(), orderings)
}

/// Searches scenarios of `strategy` for a counterexample; returns it.
fn counterexample_in(strategy: impl Strategy<Value = Scenario>, orderings: Orderings) -> Option<Scenario> {
    let mut runner =
        TestRunner::new(Config { failure_persistence: None, ..crate::types::strategies::config(cases().max(2000)) });
    match runner.run(&strategy, |s| run(&s, orderings).map(|_| ()).map_err(TestCaseError::fail)) {
        Err(TestError::Fail(why, s)) => {
            println!("counterexample found as expected: {why}\n{s:?}");
            Some(s)
        }
        _ => None,
    }
}

#[test]
fn teeth_flagging_sent_before_the_broker_acknowledged_is_caught() {
    let found = counterexample(Orderings { producer: Ordering::MarkBeforePublish, ..Orderings::default() });
    let s = found.expect("the property search must catch rows flagged sent before they were published");
    assert!(run(&s, Orderings::default()).is_ok(), "the same schedule passes with the correct ordering");
}

#[test]
fn teeth_flags_that_ignore_the_partition_are_caught() {
    // The flag update before the fix: `ctid = ANY(...)` without the table,
    // which flags rows in other partitions that share a slot number.
    let partitioned = scenario().prop_filter("a partitioned table", |s| s.physical > 1);
    let found = counterexample_in(partitioned, Orderings { blind_flags: true, ..Orderings::default() });
    let s = found.expect("the property search must catch flags set by slot alone in a partitioned table");
    assert!(s.physical > 1, "only a partitioned table can show it: {s:?}");
    assert!(run(&s, Orderings::default()).is_ok(), "the same schedule passes with flags by (partition, slot)");
}

#[test]
fn teeth_flags_that_do_not_check_the_row_is_still_the_version_published_lose_an_update() {
    // A flag update by key: a row changed while its claim was in flight
    // (updated, or deleted and inserted again under the same key) is
    // flagged sent although only its old content was published.
    let found = counterexample(Orderings { flags_by_key: true, ..Orderings::default() });
    let s = found.expect("the property search must catch a flag set on a row changed since its claim");
    let any = |f: fn(&Action) -> bool| s.actions.iter().any(f);
    assert!(
        any(|a| matches!(a, Action::Update(_)))
            || (any(|a| matches!(a, Action::Delete(_))) && any(|a| matches!(a, Action::Insert(_)))),
        "only a change of a claimed key (an update, or a delete and an insert again) can show it: {s:?}"
    );
    assert!(run(&s, Orderings::default()).is_ok(), "the same schedule passes with flags by address");
}

#[test]
fn teeth_flags_that_ignore_the_row_version_flag_the_row_that_took_a_freed_slot() {
    // A flag update by `(tableoid, ctid)` alone: claims hold no snapshot,
    // so VACUUM may free a claimed row's slot (it was updated or deleted
    // meanwhile) and another row may take it; the flag then hits that row,
    // which was never published, and it never reaches ClickHouse.
    let found = counterexample(Orderings { flags_by_slot: true, ..Orderings::default() });
    let s = found.expect("the property search must catch a flag that hits whatever row holds the slot now");
    assert!(run(&s, Orderings::default()).is_ok(), "the same schedule passes with flags by (partition, slot, xmin)");
}

#[test]
fn teeth_a_load_whose_chunks_outrank_later_changes_loses_them() {
    // A chunk read with a version above the claims that follow: a row of
    // the initial load changed after its chunk was read keeps the chunk's
    // old content in the sink, and a row deleted after it comes back.
    let found = counterexample(Orderings { load_outranks: true, ..Orderings::default() });
    let s = found.expect("the property search must catch a chunk whose version outranks later changes");
    assert!(s.preloaded.0 > 0, "only a table with rows at init has a load: {s:?}");
    assert!(run(&s, Orderings::default()).is_ok(), "the same schedule passes with chunk versions drawn in order");
}

#[test]
fn liveness_a_consumer_that_never_reads_its_last_record_fails_instead_of_spinning() {
    // Dropping the record at the stored position leaves a partition's last
    // record unread for ever; a bounded drain turns that into a failure
    // that names where it stuck, not a test that never ends.
    let found = counterexample(Orderings { consumer: Ordering::SkipRecordAtPosition, ..Orderings::default() });
    let s = found.expect("the property search must catch a consumer that skips the record at its position");
    assert!(run(&s, Orderings::default()).is_ok(), "the same schedule passes with the correct consumer");
}

#[test]
fn teeth_storing_the_position_before_the_write_is_caught() {
    let found = counterexample(Orderings { consumer: Ordering::PositionBeforeWrite, ..Orderings::default() });
    let s = found.expect("the property search must catch a position stored before the rows were written");
    assert!(run(&s, Orderings::default()).is_ok(), "the same schedule passes with the correct ordering");
}

/// A few scenarios drawn from a fixed seed.
fn sample(n: usize, seed: u64) -> Vec<Scenario> {
    let mut runner = TestRunner::new(Config { rng_seed: RngSeed::Fixed(seed), ..Config::default() });
    (0..n).map(|_| scenario().new_tree(&mut runner).expect("strategy").current()).collect()
}

#[test]
fn a_seed_replays_identically() {
    let scenarios = sample(50, 7);
    let first: Vec<_> = scenarios.iter().map(|s| run(s, Orderings::default()).expect("passes")).collect();
    let again: Vec<_> = scenarios.iter().map(|s| run(s, Orderings::default()).expect("passes")).collect();
    assert_eq!(first, again, "same scenario, same trace");
    let distinct: BTreeSet<u64> = first.iter().map(|o| o.trace).collect();
    assert!(distinct.len() > 40, "different scenarios take different paths");
}

#[test]
fn every_named_crash_point_is_reached() {
    let mut reached = BTreeSet::new();
    for s in sample(400, 11) {
        let s = Scenario { rates: FaultRates { crash: 0.2, ..s.rates }, batch_rows: s.batch_rows.max(2), ..s };
        reached.extend(run(&s, Orderings::default()).expect("passes").crashed_at);
    }
    let missing: Vec<_> = CrashPoint::ALL.iter().filter(|p| !reached.contains(p)).collect();
    assert!(missing.is_empty(), "crash points never reached: {missing:?}");
}

/// A row of `user_logins`.
fn login(id: i64, name: &str) -> Vec<Value> {
    vec![Value::Int(id), Value::Text(name.into()), Value::Timestamp(0)]
}

fn drain_producer(world: &World, mode: ClaimMode, batch_rows: usize) -> usize {
    let mut p = world.producer(1, mode, ProducerConfig { batch_rows, ..Default::default() });
    futures::executor::block_on(p.drain(&NoFaults)).unwrap()
}

#[test]
fn keyset_cursor_finds_keys_that_commit_out_of_order() {
    // Keys 1..=3 inserted; 3 commits first and is published, moving the
    // cursor past 1 and 2. The same producer must still find them.
    let world = World::new(1, FaultRates::NONE, 1);
    for id in 1..=3 {
        world.table.borrow_mut().pending.push(login(id, "alice"));
    }
    world.table.borrow_mut().commit_insert(2);
    let mut producer = world.producer(1, ClaimMode::Shared, ProducerConfig { batch_rows: 1, ..Default::default() });
    assert_eq!(futures::executor::block_on(producer.drain(&NoFaults)).unwrap(), 1);
    world.table.borrow_mut().commit_insert(0);
    world.table.borrow_mut().commit_insert(0);
    assert_eq!(futures::executor::block_on(producer.drain(&NoFaults)).unwrap(), 2);
    assert!(world.table.borrow().committed.values().all(|row| row.sent));
}

#[test]
fn one_pass_of_lanes_sharing_a_cursor_claims_every_committed_row_and_deletion() {
    // What `--once` relies on: lanes stop as soon as the shared cursor has
    // wrapped once, and by then every row and deletion committed before
    // they started has been published and flagged (or rejected), whatever
    // the interleaving, with or without row locks, and no lane fails on a
    // sibling's rows.
    let shapes = sample(60, 3);
    for seed in 0..400u64 {
        let mode = if seed % 2 == 0 { ClaimMode::Shared } else { ClaimMode::Exclusive };
        let shape = &shapes[seed as usize % shapes.len()];
        let world = World::with_table(seed, FaultRates::NONE, 3, shape.table.clone(), shape.physical);
        let rows = 1 + (seed % 40) as usize;
        for _ in 0..rows {
            world.insert_row();
        }
        for k in 0..rows {
            world.table.borrow_mut().commit_insert(k * 7);
        }
        for k in 0..(seed % 5) as u8 {
            world.delete_row(k * 3);
        }
        let config = ProducerConfig { batch_rows: 1 + (seed % 7) as usize, ..Default::default() };
        let cursor = Cursor::default();
        let lane = |session| {
            let mut p = world.producer(session, mode, config.clone()).with_cursor(cursor.clone());
            async move {
                loop {
                    match p.step(&NoFaults).await.unwrap_or_else(|e| panic!("seed {seed} ({mode:?}): {e:#}")) {
                        ProduceStep::Moved(_) if p.passes() == 0 => {}
                        _ => break,
                    }
                }
            }
        };
        futures::executor::block_on(futures::future::join(lane(1), lane(2)));
        let table = world.table.borrow();
        let left: Vec<String> = table
            .committed
            .iter()
            .filter(|(_, row)| !row.sent && row.rejected.is_none())
            .map(|(k, _)| key_text(k))
            .collect();
        assert!(left.is_empty(), "seed {seed} ({mode:?}): rows {left:?} were left after one pass");
        assert!(table.deletes.is_empty(), "seed {seed} ({mode:?}): deletions were left after one pass");
    }
}

#[test]
fn a_key_deleted_and_inserted_again_comes_back_whatever_the_order_of_sending() {
    // The deletion's claim comes after the row's first send and before the
    // new row's: versions come from claims, so the new row wins in the
    // sink, whichever reaches it last.
    for deletion_first in [false, true] {
        let world = World::new(1, FaultRates::NONE, 2);
        world.table.borrow_mut().pending.push(login(5, "first"));
        world.table.borrow_mut().commit_insert(0);
        drain_producer(&world, ClaimMode::Shared, 10);
        let key = vec![KeyPart::Int(5)];
        assert!(world.table.borrow_mut().delete(&key));
        if deletion_first {
            drain_producer(&world, ClaimMode::Shared, 10);
        }
        world.table.borrow_mut().pending.push(login(5, "again"));
        world.table.borrow_mut().commit_insert(0);
        drain_producer(&world, ClaimMode::Exclusive, 10);
        // The consumer reads the partitions in any order; the sink keeps the highest version.
        let mut c = world.consumer(ConsumerConfig::all_partitions(2));
        futures::executor::block_on(c.drain(&NoFaults, Duration::ZERO)).unwrap();
        world.check_quiescent().unwrap();
        let live = world.sink.borrow().final_rows();
        assert_eq!(live[&key].values, login(5, "again"), "deletion first: {deletion_first}");
    }
}

/// Drains `rows` fresh rows through a producer and a consumer of `world`.
fn produce_and_consume(world: &World, consumer: &mut Consumer<log::SimLog, sink::SimSink>, first: i64, rows: i64) {
    for id in first..first + rows {
        world.table.borrow_mut().pending.push(login(id, "bob"));
        world.table.borrow_mut().commit_insert(0);
    }
    drain_producer(world, ClaimMode::Shared, 10_000);
    futures::executor::block_on(consumer.drain(&NoFaults, Duration::ZERO)).unwrap();
}

/// The topic is deleted and created again under a consumer, then grows past
/// its stored positions: whether the consumer kept running or restarted from
/// the stored positions, it must stop with a permanent error naming the
/// cause, and write nothing from the new log.
#[test]
fn a_replaced_log_stops_the_consumer_instead_of_skipping_records() {
    for (seed, restart, grow) in [(1, false, 40), (2, true, 40), (3, false, 0), (4, true, 0), (5, true, 3)] {
        let world = World::new(seed, FaultRates::NONE, 2);
        let mut consumer = world.consumer(ConsumerConfig::all_partitions(2));
        produce_and_consume(&world, &mut consumer, 1, 10);
        let written = world.sink.borrow().final_rows();
        assert_eq!(written.len(), 10);

        world.log.borrow_mut().recreate();
        // New rows in the new log, more than the old positions (or none).
        for id in 100..100 + grow {
            world.table.borrow_mut().pending.push(login(id, "carol"));
            world.table.borrow_mut().commit_insert(0);
        }
        drain_producer(&world, ClaimMode::Shared, 10_000);
        if restart {
            consumer = world.consumer(ConsumerConfig::all_partitions(2));
        }
        let mut outcome = Ok(());
        for _ in 0..20 {
            if let Err(e) = futures::executor::block_on(consumer.step(&NoFaults, Duration::ZERO, Store::Now)) {
                outcome = Err(e);
                break;
            }
        }
        let e = outcome.expect_err(&format!("seed {seed}: the consumer went on reading a replaced log"));
        assert_eq!(kind(&e), ErrorKind::Permanent, "seed {seed}: {e:#}");
        let text = format!("{e:#}");
        assert!(text.contains("partition") && text.contains("created again"), "seed {seed}: {text}");
        assert_eq!(world.sink.borrow().final_rows(), written, "seed {seed}: nothing from the new log was written");
        let drained = futures::executor::block_on(consumer.drain(&NoFaults, Duration::ZERO));
        assert!(drained.is_err(), "seed {seed}: `consume --once` must fail too");
    }
}

/// A record with a column the consumer's table does not know (the source
/// table gained one) stops the consumer with a permanent error naming it,
/// before anything of that fetch is written; it is not dead-lettered.
#[test]
fn a_record_with_an_unknown_column_stops_the_consumer() {
    let world = World::new(1, FaultRates::NONE, 1);
    let mut consumer = world.consumer(ConsumerConfig::all_partitions(1));
    produce_and_consume(&world, &mut consumer, 1, 3);
    let value =
        br#"{"id":9,"username":"z","event_time":"2024-01-01T00:00:00.000000Z","country":"NZ","_pg2ch_version":99}"#;
    world.log.borrow_mut().append_poison(0, value.to_vec());
    let e = futures::executor::block_on(consumer.step(&NoFaults, Duration::ZERO, Store::Now)).unwrap_err();
    assert_eq!(kind(&e), ErrorKind::Permanent, "{e:#}");
    assert!(format!("{e:#}").contains("\"country\""), "{e:#}");
    assert!(world.log.borrow().dead_letters.is_empty());
    assert_eq!(world.sink.borrow().final_rows().len(), 3);
}

/// The simulated stores tag their errors as the real adapters do: a call
/// that failed without effect is transient, one that acted and lost its
/// answer has an unknown outcome, a position past the end is permanent.
#[test]
fn store_errors_say_what_kind_they_are() {
    use crate::stores::{EventLog, LogRecord};
    let record = || vec![LogRecord { key: b"1".to_vec(), value: b"{}".to_vec() }];
    let world = World::new(1, FaultRates { fail: 0.0, lost: 1.0, crash: 0.0 }, 1);
    let lost = futures::executor::block_on(world.event_log().append(0, record())).unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Unknown, "{lost:#}");
    world.chaos.rates.set(FaultRates { fail: 1.0, lost: 0.0, crash: 0.0 });
    let failed = futures::executor::block_on(world.event_log().append(0, record())).unwrap_err();
    assert_eq!(failed.kind(), ErrorKind::Transient, "{failed:#}");
    world.chaos.rates.set(FaultRates::NONE);
    let mut consumer = world.consumer(ConsumerConfig::all_partitions(1));
    futures::executor::block_on(consumer.drain(&NoFaults, Duration::ZERO)).unwrap();
    world.log.borrow_mut().recreate();
    let past = futures::executor::block_on(consumer.drain(&NoFaults, Duration::ZERO)).unwrap_err();
    assert_eq!(kind(&past), ErrorKind::Permanent, "{past:#}");
}

/// A difference planted after a clean drain; `usize`s pick a sent row.
#[derive(Debug, Clone)]
enum Plant {
    /// Every copy of the row is gone from the sink.
    Missing(usize),
    /// The sink holds a key the table never had.
    Extra,
    /// The sink's newest copy has another value in a column, or another version.
    ChangedInSink(usize),
    /// The table's row changed after it was sent, past pg2ch's trigger.
    ChangedInSource(usize),
    /// The sink shows the key deleted.
    DeletedInSink(usize),
    /// The sink holds the same row twice, awaiting a merge (not an error).
    Duplicate(usize),
    /// The row is updated the normal way and not sent yet (not an error).
    Updated(usize),
    /// The row is deleted the normal way and not sent yet (not an error).
    Deleted(usize),
}

fn plant() -> impl Strategy<Value = Plant> {
    prop_oneof![
        any::<usize>().prop_map(Plant::Missing),
        Just(Plant::Extra),
        any::<usize>().prop_map(Plant::ChangedInSink),
        any::<usize>().prop_map(Plant::ChangedInSource),
        any::<usize>().prop_map(Plant::DeletedInSink),
        any::<usize>().prop_map(Plant::Duplicate),
        any::<usize>().prop_map(Plant::Updated),
        any::<usize>().prop_map(Plant::Deleted),
    ]
}

/// Any walk: top ranges, fan-out and leaf size from their smallest up.
fn plan() -> impl Strategy<Value = Plan> {
    (1..30u64, 2..6u64, 1..12u64, 1..4usize).prop_map(|(chunk_rows, fan_out, leaf_rows, top_batch)| Plan {
        chunk_rows,
        fan_out,
        leaf_rows,
        top_batch,
        repair: false,
    })
}

/// The keys of a finding (with their walk coordinates), as a finding lists them.
fn first(keys: &BTreeSet<(i64, Key)>) -> Vec<serde_json::Value> {
    keys.iter().take(crate::verify::SAMPLE).map(|(_, k)| crate::verify::key_json(k)).collect()
}

/// A value of column `i` other than `current`, as verify compares them (by
/// PostgreSQL's hash: `-0.0` equals `0.0` there), if one can be drawn.
fn other_value(world: &World, i: usize, current: &Value) -> Option<Value> {
    let ty = world.table.borrow().schema.columns[i].ty.clone();
    let hash = |v: &Value| crate::types::checksum::hash(&ty, v, 0);
    (0..20).map(|_| world.rows.borrow_mut().draw(i)).find(|v| v != current && hash(v) != hash(current))
}

proptest! {
    #![proptest_config(crate::types::strategies::config(cases() / 4))]

    /// After a clean drain of rows from the whole domain, in any table shape,
    /// differences are planted on either side. The range walk (whatever its
    /// sizes) reports exactly the planted keys, and `repair` then a drain
    /// makes the sides agree.
    #[test]
    fn verify_finds_exactly_the_planted_differences_and_repair_heals_them(
        seed in any::<u64>(),
        (table, physical) in table_shape(),
        rows in 0..60usize,
        plants in proptest::collection::vec(plant(), 0..8),
        plan in plan(),
    ) {
        let world = World::with_table(seed, FaultRates::NONE, 2, table.clone(), physical);
        for _ in 0..rows {
            world.insert_row();
            world.table.borrow_mut().commit_insert(0);
        }
        let (producer, consumer) = (ProducerConfig::default(), ConsumerConfig::all_partitions(2));
        world.drain(ClaimMode::Shared, producer.clone(), consumer.clone(), false).map_err(TestCaseError::fail)?;
        world.sink.borrow_mut().merge();
        let sent: Vec<Key> = {
            let t = world.table.borrow();
            t.committed.iter().filter(|(_, r)| r.sent).map(|(k, _)| k.clone()).collect()
        };
        let (mut missing, mut extra, mut differing, mut deleted, mut twice) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let mut used = BTreeSet::new();
        let others: Vec<usize> = (0..table.columns.len()).filter(|i| !table.key.contains(i)).collect();
        let walk = |k: &Key| crate::checksum::walk(&table, &world.table.borrow().committed[k].values);
        for p in &plants {
            let pick = |i: usize| (!sent.is_empty()).then(|| sent[i % sent.len()].clone()).filter(|k| !used.contains(k));
            let newest = |k: &Key| world.sink.borrow().final_rows()[k].clone();
            match p {
                Plant::Missing(i) => if let Some(k) = pick(*i) {
                    let s = table.clone();
                    world.sink.borrow_mut().parts.iter_mut().for_each(|part| part.retain(|c| c.key(&s) != k));
                    missing.insert((walk(&k), k.clone()));
                    used.insert(k);
                },
                Plant::Extra => {
                    let values = world.new_row();
                    let k = table.key_of(&values);
                    if !world.table.borrow().committed.contains_key(&k) && !used.contains(&k)
                        && table.check_row(&values).is_ok()
                    {
                        extra.insert((crate::checksum::walk(&table, &values), k.clone()));
                        world.sink.borrow_mut().parts.push(vec![Change::upsert(values, 1)]);
                        used.insert(k);
                    }
                }
                Plant::ChangedInSink(i) => if let Some(k) = pick(*i) {
                    let mut c = newest(&k);
                    let Some(&col) = others.first() else { continue };
                    let Some(v) = other_value(&world, col, &c.values[col]) else { continue };
                    if crate::types::check(&table.columns[col].ty, &v).is_err() { continue }
                    c.values[col] = v;
                    world.sink.borrow_mut().parts.push(vec![c]);
                    differing.insert((walk(&k), k.clone()));
                    twice.insert((walk(&k), k.clone()));
                    used.insert(k);
                },
                Plant::ChangedInSource(i) => if let Some(k) = pick(*i) {
                    let Some(&col) = others.first() else { continue };
                    let current = world.table.borrow().committed[&k].values[col].clone();
                    let Some(v) = other_value(&world, col, &current) else { continue };
                    if crate::types::check(&table.columns[col].ty, &v).is_err() { continue }
                    world.table.borrow_mut().committed.get_mut(&k).unwrap().values[col] = v;
                    differing.insert((walk(&k), k.clone()));
                    used.insert(k);
                },
                Plant::DeletedInSink(i) => if let Some(k) = pick(*i) {
                    let c = newest(&k);
                    let key: Vec<Value> = table.key.iter().map(|i| c.values[*i].clone()).collect();
                    world.sink.borrow_mut().parts.push(vec![Change::delete(&table, key, c.version + 1)]);
                    world.table.borrow_mut().advance_versions(1);
                    deleted.insert((walk(&k), k.clone()));
                    twice.insert((walk(&k), k.clone()));
                    used.insert(k);
                },
                Plant::Duplicate(i) => if let Some(k) = pick(*i) {
                    let c = newest(&k);
                    world.sink.borrow_mut().parts.push(vec![c]);
                    twice.insert((walk(&k), k.clone()));
                    used.insert(k);
                },
                Plant::Updated(i) => if let Some(k) = pick(*i) {
                    let values = world.table.borrow().committed[&k].values.clone();
                    if world.table.borrow_mut().update(&k, values) {
                        used.insert(k);
                    }
                },
                Plant::Deleted(i) => if let Some(k) = pick(*i)
                    && world.table.borrow_mut().delete(&k)
                {
                    used.insert(k);
                },
            }
        }

        let report = world.verify(plan).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        let seen = |f: &crate::verify::Finding| (f.count, f.first_ids.clone());
        prop_assert_eq!(seen(&report.missing), (missing.len() as u64, first(&missing)), "missing\n{}", report);
        prop_assert_eq!(seen(&report.extra), (extra.len() as u64, first(&extra)), "extra\n{}", report);
        prop_assert_eq!(seen(&report.differing), (differing.len() as u64, first(&differing)), "differing\n{}", report);
        prop_assert_eq!(seen(&report.deleted_but_present), (deleted.len() as u64, first(&deleted)), "deleted\n{}", report);
        prop_assert_eq!(seen(&report.unmerged_copies), (twice.len() as u64, first(&twice)), "copies\n{}", report);
        prop_assert_eq!(report.ok(), missing.is_empty() && extra.is_empty() && differing.is_empty() && deleted.is_empty());

        let repaired = world.verify(Plan { repair: true, ..plan }).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        let repair = repaired.repair.clone().unwrap();
        let resent: BTreeSet<(i64, Key)> = missing.iter().chain(&differing).chain(&deleted).cloned().collect();
        prop_assert_eq!(seen(&repair.flagged_unsent), (resent.len() as u64, first(&resent)), "{}", repaired);
        prop_assert_eq!(seen(&repair.deletes_recorded), (extra.len() as u64, first(&extra)), "{}", repaired);
        world.drain(ClaimMode::Shared, producer, consumer, true).map_err(TestCaseError::fail)?;
        let after = world.verify(plan).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        prop_assert!(after.ok(), "after repair and a drain\n{}", after);
        world.check_quiescent().map_err(TestCaseError::fail)?;
    }
}

/// Consumers of one group split the partitions through their leases: a
/// member that joins gets its share, handed over with the stored position;
/// a member whose lease session ended (paused past it) reads nothing until
/// it joins again; the others take over its partitions meanwhile.
#[test]
fn consumers_of_a_group_share_the_partitions_and_take_over_from_one_that_stops() {
    use futures::executor::block_on;
    let world = World::new(11, FaultRates::NONE, 5);
    let member = |c: u8| world.consumer(ConsumerConfig::all_partitions(5)).with_leases(world.lease_session(c));
    let (mut a, mut b, mut c) = (member(1), member(2), member(3));
    let settle = |all: &mut [&mut Consumer<log::SimLog, sink::SimSink, leases::SimLeases>]| {
        for _ in 0..4 {
            for m in all.iter_mut() {
                block_on(m.rebalance(&NoFaults)).unwrap();
            }
        }
        all.iter().map(|m| m.partitions()).collect::<Vec<_>>()
    };
    // Alone, `a` reads everything; it drains what the producer published.
    assert_eq!(settle(&mut [&mut a]), [vec![0, 1, 2, 3, 4]]);
    for id in 1..=200 {
        world.table.borrow_mut().pending.push(login(id, "bob"));
        world.table.borrow_mut().commit_insert(0);
    }
    drain_producer(&world, ClaimMode::Shared, 10_000);
    block_on(a.drain(&NoFaults, Duration::ZERO)).unwrap();
    let read: BTreeMap<i32, crate::stores::Position> = block_on(a.positions()).unwrap().clone();
    assert!(read.values().all(|p| p.next > 0), "{read:?}");

    // `b` and `c` join: each partition has one reader, shares differ by one
    // at most, and whoever took a partition starts where `a` stopped.
    let split = settle(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(split, [vec![0, 3], vec![1, 4], vec![2]]);
    let holders = world.leases.borrow().holders().clone();
    assert_eq!(holders.len(), 5, "{holders:?}");
    for m in [&mut b, &mut c] {
        for (p, position) in block_on(m.positions()).unwrap().clone() {
            assert_eq!(position, read[&p], "partition {p} starts where the last holder stored it");
        }
    }

    // `c`'s session ends while it runs on: its next step reads nothing, and
    // the others take its partition; then it joins again.
    world.leases.borrow_mut().expire(3);
    block_on(c.step(&NoFaults, Duration::ZERO, Store::Now)).unwrap();
    assert_eq!(c.partitions(), Vec::<i32>::new());
    assert_eq!(settle(&mut [&mut a, &mut b]), [vec![0, 2, 4], vec![1, 3]]);
    assert_eq!(settle(&mut [&mut a, &mut b, &mut c]), [vec![0, 3], vec![1, 4], vec![2]]);

    // A member that stops lets go of everything; the rest split it.
    drop(a);
    assert_eq!(settle(&mut [&mut b, &mut c]), [vec![0, 2, 4], vec![1, 3]]);
}
