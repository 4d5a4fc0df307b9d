//! The exactly-once properties, searched over thousands of crash schedules.
//!
//! `PG2CH_SIM_CASES` (or `PROPTEST_CASES`) sets the number of cases (default
//! 1000); `PROPTEST_RNG_SEED=N` makes a whole run repeatable. A failure
//! prints the shrunk scenario (seed, fault rates and schedule) and proptest
//! records it under `proptest-regressions/`, where it is replayed first on
//! every later run.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestError, TestRunner};

use super::*;
use crate::pipeline::ProduceStep;

fn cases() -> u32 {
    ["PG2CH_SIM_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(1000)
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        ..Config::default()
    }
}

fn component() -> impl Strategy<Value = Component> {
    prop_oneof![
        Just(Component::Producer1),
        Just(Component::Producer2),
        Just(Component::Consumer),
        Just(Component::Consumer2)
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        12 => Just(Action::Step(Component::Producer1)),
        6 => Just(Action::Step(Component::Producer2)),
        14 => Just(Action::Step(Component::Consumer)),
        3 => Just(Action::Step(Component::Consumer2)),
        2 => component().prop_map(Action::Kill),
        4 => (1u8..6).prop_map(Action::Insert),
        5 => any::<u8>().prop_map(Action::CommitInsert),
        1 => Just(Action::Merge),
        1 => any::<u8>().prop_map(Action::Poison),
    ]
}

fn claim_mode() -> impl Strategy<Value = ClaimMode> {
    prop_oneof![Just(ClaimMode::Shared), Just(ClaimMode::Exclusive)]
}

/// Every shape of source table `init` accepts: ids starting anywhere in
/// `i64` (negative, zero, its very ends) and stepping by any amount, in a
/// plain table or one split into partitions.
fn table_shape() -> impl Strategy<Value = TableShape> {
    let first_id = prop_oneof![
        Just(1i64),
        Just(0),
        -1000..1000i64,
        any::<i64>(),
        Just(i64::MIN),
        (0..200i64).prop_map(|k| i64::MAX - k),
    ];
    let id_step = prop_oneof![4 => Just(1i64), 1 => 1..10i64, 1 => 1i64..=i64::MAX];
    (first_id, id_step, prop_oneof![Just(1i64), 2..5i64]).prop_map(|(first_id, id_step, partitions)| TableShape {
        first_id,
        id_step,
        partitions,
    })
}

pub fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        (0.0..0.25f64, 0.0..0.2f64, 0.0..0.15f64),
        1..4i32,
        1..8usize,
        1..6usize,
        (any::<bool>(), [claim_mode(), claim_mode()]),
        table_shape(),
        proptest::collection::vec(action(), 1..160),
    )
        .prop_map(
            |(
                seed,
                (fail, lost, crash),
                partitions,
                batch_rows,
                insert_rows,
                (shared_cursor, modes),
                table,
                actions,
            )| {
                Scenario {
                    seed,
                    rates: FaultRates { fail, lost, crash },
                    partitions,
                    batch_rows,
                    insert_rows,
                    shared_cursor,
                    modes,
                    table,
                    actions,
                }
            },
        )
}

proptest! {
    #![proptest_config(config(cases()))]

    /// Whatever crashes and faults happen, in whatever order: nothing in the
    /// sink that the table lacks, every sent row in the log, and after
    /// draining the sink's FINAL view equals the table with every row sent.
    #[test]
    fn exactly_once_whatever_crashes(s in scenario()) {
        run(&s, Orderings::default()).map_err(TestCaseError::fail)?;
    }
}

/// Searches for a counterexample with a wrong ordering; returns it.
fn counterexample(orderings: Orderings) -> Option<Scenario> {
    let mut runner = TestRunner::new(Config { failure_persistence: None, ..config(cases().max(2000)) });
    match runner.run(&scenario(), |s| run(&s, orderings).map(|_| ()).map_err(TestCaseError::fail)) {
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
    let found = counterexample(Orderings { blind_flags: true, ..Orderings::default() });
    let s = found.expect("the property search must catch flags set by slot alone in a partitioned table");
    assert!(s.table.partitions > 1, "only a partitioned table can show it: {s:?}");
    assert!(run(&s, Orderings::default()).is_ok(), "the same schedule passes with flags by (partition, slot)");
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

#[test]
fn keyset_cursor_finds_ids_that_commit_out_of_order() {
    // Ids 1..=3 allocated; 3 commits first and is published, moving the
    // cursor past 1 and 2. The same producer must still find them.
    let world = World::new(1, FaultRates::NONE, 1);
    for _ in 0..3 {
        world.table.borrow_mut().insert(Some(b"alice".to_vec()), Some(PgTimestamp(0)));
    }
    world.table.borrow_mut().commit_insert(2);
    let mut producer = Producer::new(
        world.source(1, ClaimMode::Shared),
        world.event_log(),
        ProducerConfig { batch_rows: 1, ..Default::default() },
    );
    assert_eq!(futures::executor::block_on(producer.drain(&NoFaults)).unwrap(), 1);
    world.table.borrow_mut().commit_insert(0);
    world.table.borrow_mut().commit_insert(0);
    assert_eq!(futures::executor::block_on(producer.drain(&NoFaults)).unwrap(), 2);
    assert!(world.table.borrow().committed.values().all(|row| row.sent));
}

#[test]
fn one_pass_of_lanes_sharing_a_cursor_claims_every_committed_row() {
    // What `--once` relies on: lanes stop as soon as the shared cursor has
    // wrapped once, and by then every row committed before they started has
    // been published and flagged (or rejected), whatever the interleaving,
    // with or without row locks, and no lane fails on a sibling's rows.
    for seed in 0..400u64 {
        let mode = if seed % 2 == 0 { ClaimMode::Shared } else { ClaimMode::Exclusive };
        let world = World::new(seed, FaultRates::NONE, 3);
        let rows = 1 + (seed % 40) as usize;
        for _ in 0..rows {
            world.insert_row();
        }
        for k in 0..rows {
            world.table.borrow_mut().commit_insert(k * 7);
        }
        let config = ProducerConfig { batch_rows: 1 + (seed % 7) as usize, ..Default::default() };
        let cursor = Cursor::default();
        let lane = |session| {
            let mut p = Producer::new(world.source(session, mode), world.event_log(), config.clone())
                .with_cursor(cursor.clone());
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
        let left: Vec<i64> = table
            .committed
            .iter()
            .filter(|(id, row)| !row.sent && !table.rejected.contains_key(id))
            .map(|(id, _)| *id)
            .collect();
        assert!(left.is_empty(), "seed {seed} ({mode:?}): rows {left:?} were left after one pass");
    }
}

/// Drains `rows` fresh rows through a producer and a consumer of `world`.
fn produce_and_consume(world: &World, consumer: &mut Consumer<log::SimLog, sink::SimSink>, rows: usize) {
    for _ in 0..rows {
        world.table.borrow_mut().insert(Some(b"bob".to_vec()), Some(PgTimestamp(0)));
        world.table.borrow_mut().commit_insert(0);
    }
    let mut producer = Producer::new(world.source(1, ClaimMode::Shared), world.event_log(), ProducerConfig::default());
    futures::executor::block_on(producer.drain(&NoFaults)).unwrap();
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
        let mut consumer = Consumer::new(world.event_log(), world.sink_store(), ConsumerConfig::all_partitions(2));
        produce_and_consume(&world, &mut consumer, 10);
        let written = world.sink.borrow().final_rows();
        assert_eq!(written.len(), 10);

        world.log.borrow_mut().recreate();
        // New rows in the new log, more than the old positions (or none).
        for _ in 0..grow {
            world.table.borrow_mut().insert(Some(b"carol".to_vec()), Some(PgTimestamp(0)));
            world.table.borrow_mut().commit_insert(0);
        }
        let mut producer =
            Producer::new(world.source(1, ClaimMode::Shared), world.event_log(), ProducerConfig::default());
        futures::executor::block_on(producer.drain(&NoFaults)).unwrap();
        if restart {
            consumer = Consumer::new(world.event_log(), world.sink_store(), ConsumerConfig::all_partitions(2));
        }
        let mut outcome = Ok(());
        for _ in 0..20 {
            if let Err(e) = futures::executor::block_on(consumer.step(&NoFaults, Duration::ZERO)) {
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

/// The simulated stores tag their errors as the real adapters do: a call
/// that failed without effect is transient, one that acted and lost its
/// answer has an unknown outcome, a position past the end is permanent.
#[test]
fn store_errors_say_what_kind_they_are() {
    use crate::stores::{EventLog, LogRecord};
    let record = || vec![LogRecord { key: b"1".to_vec(), value: b"{}".to_vec() }];
    let world = World::new(1, FaultRates { fail: 0.0, lost: 1.0, crash: 0.0 }, 1);
    let lost = futures::executor::block_on(world.event_log().append(0, record())).unwrap_err();
    assert_eq!(kind(&lost), ErrorKind::Unknown, "{lost:#}");
    world.chaos.rates.set(FaultRates { fail: 1.0, lost: 0.0, crash: 0.0 });
    let failed = futures::executor::block_on(world.event_log().append(0, record())).unwrap_err();
    assert_eq!(kind(&failed), ErrorKind::Transient, "{failed:#}");
    world.chaos.rates.set(FaultRates::NONE);
    let mut consumer = Consumer::new(world.event_log(), world.sink_store(), ConsumerConfig::all_partitions(1));
    futures::executor::block_on(consumer.drain(&NoFaults, Duration::ZERO)).unwrap();
    world.log.borrow_mut().recreate();
    let past = futures::executor::block_on(consumer.drain(&NoFaults, Duration::ZERO)).unwrap_err();
    assert_eq!(kind(&past), ErrorKind::Permanent, "{past:#}");
}

/// A difference planted after a clean drain; `usize`s pick a row that
/// travelled, `i64` an id the table lacks (searched from there).
#[derive(Debug, Clone)]
enum Plant {
    /// Every copy of the row is gone from the sink.
    Missing(usize),
    /// The sink holds an id the table never had.
    Extra(i64),
    /// The sink's newest copy has other content (a name or a time).
    ChangedInSink(usize, bool),
    /// The table's row changed after it was sent.
    ChangedInSource(usize),
    /// The sink holds the same row twice, awaiting a merge (not an error).
    Duplicate(usize),
}

fn plant() -> impl Strategy<Value = Plant> {
    prop_oneof![
        any::<usize>().prop_map(Plant::Missing),
        any::<i64>().prop_map(Plant::Extra),
        (any::<usize>(), any::<bool>()).prop_map(|(i, name)| Plant::ChangedInSink(i, name)),
        any::<usize>().prop_map(Plant::ChangedInSource),
        any::<usize>().prop_map(Plant::Duplicate),
    ]
}

/// Any walk: top ranges, fan-out and leaf size from their smallest up.
fn plan() -> impl Strategy<Value = Plan> {
    (1..30u64, 2..6u64, 1..12u64).prop_map(|(chunk_rows, fan_out, leaf_rows)| Plan {
        chunk_rows,
        fan_out,
        leaf_rows,
        repair: false,
    })
}

/// The first ids of a set, as a finding lists them.
fn first(ids: &BTreeSet<i64>) -> Vec<i64> {
    ids.iter().take(crate::verify::SAMPLE).copied().collect()
}

proptest! {
    #![proptest_config(config(cases() / 4))]

    /// After a clean drain of rows from the whole domain, in any table shape,
    /// differences are planted on either side. The range walk (whatever its
    /// sizes) reports exactly the planted ids, and `repair` then a drain
    /// leaves only what repair cannot fix without deletes: the extra ids.
    #[test]
    fn verify_finds_exactly_the_planted_differences_and_repair_heals_them(
        seed in any::<u64>(),
        shape in table_shape(),
        rows in 0..60usize,
        plants in proptest::collection::vec(plant(), 0..8),
        plan in plan(),
    ) {
        let world = World::with_table(seed, FaultRates::NONE, 2, shape);
        for _ in 0..rows {
            world.insert_row();
            world.table.borrow_mut().commit_insert(0);
        }
        let (producer, consumer) = (ProducerConfig::default(), ConsumerConfig::all_partitions(2));
        world.drain(ClaimMode::Shared, producer.clone(), consumer.clone()).map_err(TestCaseError::fail)?;
        world.sink.borrow_mut().merge();
        let sent: Vec<i64> = {
            let table = world.table.borrow();
            table.committed.iter().filter(|(_, r)| r.sent).map(|(id, _)| *id).collect()
        };
        let (mut missing, mut extra, mut differing, mut twice) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let mut used = BTreeSet::new();
        for p in &plants {
            let pick = |i: usize| (!sent.is_empty()).then(|| sent[i % sent.len()]).filter(|id| !used.contains(id));
            let newest = |id: i64| world.sink.borrow().final_rows().into_iter().find(|r| r.id == id).unwrap();
            match *p {
                Plant::Missing(i) => if let Some(id) = pick(i) {
                    world.sink.borrow_mut().parts.iter_mut().for_each(|part| part.retain(|r| r.id != id));
                    missing.insert(id);
                    used.insert(id);
                },
                Plant::Extra(from) => {
                    let id = (0..).map(|k: i64| from.wrapping_add(k)).find(|id| {
                        !world.table.borrow().committed.contains_key(id) && !used.contains(id)
                    }).unwrap();
                    let ghost = LoginEvent { id, username: "ghost".into(), event_time_us: 0 };
                    world.sink.borrow_mut().parts.push(vec![ghost]);
                    extra.insert(id);
                    used.insert(id);
                }
                Plant::ChangedInSink(i, name) => if let Some(id) = pick(i) {
                    let mut row = newest(id);
                    if name { row.username.push('!') } else { row.event_time_us ^= 1 }
                    world.sink.borrow_mut().parts.push(vec![row]);
                    differing.insert(id);
                    twice.insert(id);
                    used.insert(id);
                },
                Plant::ChangedInSource(i) => if let Some(id) = pick(i) {
                    let name = format!("changed {id}").into_bytes();
                    world.table.borrow_mut().committed.get_mut(&id).unwrap().raw.username = Some(name);
                    differing.insert(id);
                    used.insert(id);
                },
                Plant::Duplicate(i) => if let Some(id) = pick(i) {
                    let row = newest(id);
                    world.sink.borrow_mut().parts.push(vec![row]);
                    twice.insert(id);
                    used.insert(id);
                },
            }
        }

        let report = world.verify(plan).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        let seen = |f: &crate::verify::Finding| (f.count, f.first_ids.clone());
        prop_assert_eq!(seen(&report.missing), (missing.len() as u64, first(&missing)), "missing\n{}", report);
        prop_assert_eq!(seen(&report.extra), (extra.len() as u64, first(&extra)), "extra\n{}", report);
        prop_assert_eq!(seen(&report.differing), (differing.len() as u64, first(&differing)), "differing\n{}", report);
        prop_assert_eq!(seen(&report.unmerged_copies), (twice.len() as u64, first(&twice)), "copies\n{}", report);
        prop_assert_eq!(report.repeated_after_final.count, 0);
        prop_assert_eq!(report.ok(), missing.is_empty() && extra.is_empty() && differing.is_empty());
        prop_assert_eq!(report.postgres_sent, sent.len() as u64);

        let repaired = world.verify(Plan { repair: true, ..plan }).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        let repair = repaired.repair.clone().unwrap();
        let resent: BTreeSet<i64> = missing.union(&differing).copied().collect();
        prop_assert_eq!(seen(&repair.flagged_unsent), (resent.len() as u64, first(&resent)), "{}", repaired);
        prop_assert_eq!(repair.extra_left, extra.len() as u64);
        world.drain(ClaimMode::Shared, producer, consumer).map_err(TestCaseError::fail)?;
        let after = world.verify(plan).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        prop_assert_eq!(after.missing.count + after.differing.count, 0, "after repair and a drain\n{}", after);
        prop_assert_eq!(seen(&after.extra), (extra.len() as u64, first(&extra)));
    }
}
