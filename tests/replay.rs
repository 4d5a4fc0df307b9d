//! The simulation's named crash points, injected into the real pipeline and
//! replayed against real PostgreSQL, the broker and ClickHouse. Each schedule
//! kills a component at the n-th time it reaches one crash point, restarts
//! from what the services kept, drains, and checks exactly-once by direct
//! queries.

mod common;

use std::cell::Cell;
use std::time::Duration;

use common::TestEnv;
use pg2ch::commands::{self, RunOptions};
use pg2ch::pipeline::{CrashPoint, Crashed, Faults, NoFaults, ProduceStep, is_crash};

/// Dies the (`skip` + 1)-th time `point` is reached.
struct CrashAt {
    point: CrashPoint,
    skip: Cell<u32>,
    fired: Cell<bool>,
}

impl Faults for CrashAt {
    fn at(&self, point: CrashPoint) -> Result<(), Crashed> {
        if point != self.point || self.fired.get() {
            return Ok(());
        }
        if self.skip.get() == 0 {
            self.fired.set(true);
            return Err(Crashed(point));
        }
        self.skip.set(self.skip.get() - 1);
        Ok(())
    }
}

fn options() -> RunOptions {
    // Small batches and inserts so every crash point is passed several times.
    RunOptions {
        batch_rows: 50,
        insert_rows: 40,
        fetch_max_bytes: 1024,
        poll: Duration::from_millis(20),
        ..RunOptions::default()
    }
}

/// Runs the producer, then the consumer, until they finish or `faults` kills one.
async fn run_until_crash(env: &TestEnv, faults: &CrashAt) {
    let o = options();
    let mut producer = commands::producer(&env.settings, &o).await.unwrap();
    loop {
        match producer.step(faults).await {
            Ok(ProduceStep::Moved(_)) => {}
            Ok(ProduceStep::Idle) => break,
            Err(e) if is_crash(&e) => return,
            Err(e) => panic!("producer failed: {e:#}"),
        }
    }
    let mut consumer = commands::consumer(&env.settings, &o).await.unwrap();
    let targets = consumer.high_watermarks().await.unwrap();
    while !consumer.reached(&targets) {
        match consumer.step(faults, o.poll).await {
            Ok(_) => {}
            Err(e) if is_crash(&e) => return,
            Err(e) => panic!("consumer failed: {e:#}"),
        }
    }
}

async fn drain_and_check(env: &TestEnv, schedule: &str) {
    let o = options();
    commands::producer(&env.settings, &o).await.unwrap().drain(&NoFaults).await.unwrap();
    commands::consumer(&env.settings, &o).await.unwrap().drain(&NoFaults, o.poll).await.unwrap();
    let report = commands::verify(&env.settings).await.unwrap();
    assert!(report.ok(), "{schedule}: {report}");
    assert_eq!(report.postgres_sent, report.postgres_rows, "{schedule}: every row flagged sent");
    assert_eq!(report.clickhouse_final_rows, report.postgres_rows, "{schedule}: one row per id");
}

async fn replay(point: CrashPoint) {
    let env = TestEnv::new(&format!("replay_{}", format!("{point:?}").to_lowercase())).await;
    env.ok(&["init", "--partitions", "3"]);
    let pool = env.pg().await;
    for skip in 0..3 {
        pg2ch::postgres::seed(&pool, 300, 300, |_| {}).await.unwrap();
        let faults = CrashAt { point, skip: Cell::new(skip), fired: Cell::new(false) };
        run_until_crash(&env, &faults).await;
        let schedule = format!("crash at {point:?} (occurrence {})", skip + 1);
        assert!(faults.fired.get(), "{schedule} was never reached");
        drain_and_check(&env, &schedule).await;
    }
}

macro_rules! replays {
    ($($name:ident => $point:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() {
            replay(CrashPoint::$point).await;
        }
    )*};
}

replays! {
    crash_after_claim => AfterClaim,
    crash_mid_publish => MidPublish,
    crash_after_ack_before_flag => AfterAck,
    crash_after_flag_before_commit => AfterMark,
    crash_after_commit => AfterCommit,
    crash_after_fetch => AfterFetch,
    crash_mid_write => MidWrite,
    crash_after_write_before_position => AfterWrite,
    crash_after_storing_position => AfterStorePosition,
}

#[test]
fn every_crash_point_has_a_real_service_replay() {
    // Keeps this file in step with the pipeline: a new crash point needs a replay above.
    assert_eq!(CrashPoint::ALL.len(), 9);
}
