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
use pg2ch::pipeline::{CrashPoint, Crashed, Faults, NoFaults, ProduceStep, Store, is_crash};
use pg2ch::stores::{ClaimMode, SourceTable};

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
    // Inserts of 4 rows: a fetch of 1024 bytes brings about 9 records from
    // a broker that sizes fetches by record (nisshi on SQLite), a whole
    // batch of 50 from one that returns whole batches, so a write always
    // spans several inserts and the mid-write crash is reached.
    RunOptions {
        batch_rows: 50,
        insert_rows: 4,
        fetch_max_bytes: 1024,
        poll: Duration::from_millis(20),
        ..RunOptions::default()
    }
}

/// Runs the producer, then the consumer, until they finish or `faults` kills one.
async fn run_until_crash(env: &TestEnv, faults: &CrashAt, o: &RunOptions) {
    let mut producer = commands::producer(&env.settings, o).await.unwrap();
    loop {
        match producer.step(faults).await {
            Ok(ProduceStep::Moved(_)) => {}
            Ok(ProduceStep::Idle) => break,
            Err(e) if is_crash(&e) => return,
            Err(e) => panic!("producer failed: {e:#}"),
        }
    }
    let mut consumer = commands::consumer(&env.settings, o).await.unwrap();
    let targets = consumer.high_watermarks().await.unwrap();
    while !consumer.reached(&targets) {
        match consumer.step(faults, o.poll, Store::Now).await {
            Ok(_) => {}
            Err(e) if is_crash(&e) => return,
            Err(e) => panic!("consumer failed: {e:#}"),
        }
    }
}

async fn drain_and_check(env: &TestEnv, schedule: &str, o: &RunOptions) {
    commands::producer(&env.settings, o).await.unwrap().drain(&NoFaults).await.unwrap();
    commands::consumer(&env.settings, o).await.unwrap().drain(&NoFaults, o.poll).await.unwrap();
    let report = commands::verify(&env.settings, false).await.unwrap().remove(0);
    assert!(report.ok(), "{schedule}: {report}");
    assert_eq!(report.postgres_sent, report.postgres_rows, "{schedule}: every row flagged sent");
    assert_eq!(report.clickhouse_final_rows, report.postgres_rows, "{schedule}: one row per id");
}

async fn replay(point: CrashPoint) {
    let env = TestEnv::new(&format!("replay_{}", format!("{point:?}").to_lowercase())).await;
    env.ok(&["init", "--partitions", "3"]);
    let pool = env.pg().await;
    for skip in 0..3 {
        // Both claim modes, the crash and the restart in the same one.
        let claim_mode = if skip == 1 { ClaimMode::Exclusive } else { ClaimMode::Shared };
        let o = RunOptions { claim_mode, ..options() };
        pg2ch::postgres::seed(&pool, 300, 300, |_| {}).await.unwrap();
        let faults = CrashAt { point, skip: Cell::new(skip), fired: Cell::new(false) };
        run_until_crash(&env, &faults, &o).await;
        let schedule = format!("crash at {point:?} (occurrence {}, {claim_mode:?} claims)", skip + 1);
        assert!(faults.fired.get(), "{schedule} was never reached");
        drain_and_check(&env, &schedule, &o).await;
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

/// A claim holds no lock and no snapshot while its rows travel, so others
/// may change its rows, and VACUUM may free the slot of a row deleted since
/// and give it to a new row, before the claim flags them. The flag must hit
/// only the rows still at the version claimed: not the row someone else
/// changed (it goes again), not the new row in the deleted one's slot
/// (flagged by `ctid` alone it would be, and it was never published), and
/// every other row of the batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_flags_only_the_rows_still_at_the_version_it_claimed() {
    for mode in [ClaimMode::Shared, ClaimMode::Exclusive] {
        let env = TestEnv::new("snapshot").await;
        env.ok(&["init", "--partitions", "1"]);
        let pool = env.pg().await;
        pg2ch::postgres::seed(&pool, 10, 10, |_| {}).await.unwrap();
        let o = RunOptions { claim_mode: mode, ..options() };
        let mut source = commands::producer(&env.settings, &o).await.unwrap().source;
        let claim = source.claim(None, 10).await.unwrap();
        let ids: Vec<pg2ch::types::Key> = claim.items.iter().map(|i| i.key.clone()).collect();
        assert_eq!(ids, (1..=10).map(|i| vec![pg2ch::types::KeyPart::Int(i)]).collect::<Vec<_>>());
        let slot_of_1: String =
            sqlx::query_scalar("SELECT ctid::text FROM user_logins WHERE id = 1").fetch_one(&pool).await.unwrap();

        for statement in [
            "DELETE FROM user_logins WHERE id = 1",
            "UPDATE user_logins SET username = 'changed since the claim' WHERE id = 2",
            "VACUUM user_logins",
            "INSERT INTO user_logins (id, username) VALUES (11, 'arrived after the claim')",
        ] {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        let slot_of_11: String =
            sqlx::query_scalar("SELECT ctid::text FROM user_logins WHERE id = 11").fetch_one(&pool).await.unwrap();
        assert_eq!(slot_of_11, slot_of_1, "VACUUM freed row 1's slot and the new row took it");
        let all: Vec<usize> = (0..ids.len()).collect();
        source.mark_sent(&all).await.expect("flags skip what changed, they do not fail");
        source.commit().await.unwrap();

        let sent: Vec<i64> = sqlx::query_scalar("SELECT id FROM user_logins WHERE sent_to_kafka ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(sent, (3..=10).collect::<Vec<i64>>(), "{mode:?}: exactly the rows still as claimed are flagged");
    }
}

/// A deletion is dropped as superseded only when its key is live once the
/// claim holds the deletion. Each round: key `K` is live (sent) and also has
/// a pending deletion (a delete and an insert again, not yet claimed), and
/// `DELETE` of `K` races a shared claim of the deletions. The claim's
/// statement takes its snapshot, then walks thousands of deletions before
/// locking `K`'s; a `DELETE` committing in that window rewrites `K`'s
/// deletion (the trigger's `ON CONFLICT DO UPDATE`), the claim follows the
/// rewrite and locks it. Judged by the statement's snapshot, `K` was still
/// live and the deletion is dropped: the key then stays in ClickHouse for
/// ever. Whatever the timing, after the claim commits `K`'s deletion was
/// either published or is still pending.
#[tokio::test(flavor = "multi_thread")]
async fn a_deletion_racing_a_shared_claim_is_sent_or_kept() {
    use pg2ch::stores::Outcome;
    use rand::{Rng, SeedableRng};
    let env = TestEnv::new("delrace").await;
    env.ok(&["init", "--partitions", "1"]);
    let pool = env.pg().await;
    let outbox = "_pg2ch.\"public.user_logins\"";
    const K: i64 = 20_000;
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let o = RunOptions { claim_mode: ClaimMode::Shared, ..options() };
    let mut source = commands::producer(&env.settings, &o).await.unwrap().source;
    let mut dropped_while_live = 0;
    for round in 0..40 {
        for sql in [
            format!("DELETE FROM {outbox}"),
            format!("INSERT INTO {outbox} (id) SELECT g FROM generate_series(1, {}) g", K - 1),
            format!("INSERT INTO {outbox} (id) VALUES ({K})"),
            format!("INSERT INTO user_logins (id, username, sent_to_kafka) VALUES ({K}, 'k', true)"),
        ] {
            sqlx::query(&sql).execute(&pool).await.unwrap();
        }
        // Jitter, not synchronisation: the DELETE should land at different
        // moments of the claim's statement.
        let delay = Duration::from_micros(rng.random_range(0..3000));
        let delete = async {
            tokio::time::sleep(delay).await;
            sqlx::query(&format!("DELETE FROM user_logins WHERE id = {K}")).execute(&pool).await.unwrap();
        };
        let claim = async {
            let claim = source.claim(None, K as usize + 10).await.unwrap();
            let all: Vec<usize> = (0..claim.items.len()).collect();
            source.mark_sent(&all).await.unwrap();
            source.commit().await.unwrap();
            claim
        };
        let (claim, ()) = tokio::join!(claim, delete);
        let k = claim.items.iter().find(|i| i.key == vec![pg2ch::types::KeyPart::Int(K)]);
        let sent = matches!(k.map(|i| &i.outcome), Some(Outcome::Send(c)) if c.deleted);
        dropped_while_live += usize::from(matches!(k.map(|i| &i.outcome), Some(Outcome::Superseded)));
        let pending: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {outbox} WHERE id = {K}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(
            sent || pending == 1,
            "seed {seed} round {round}: key {K} was deleted, yet its deletion was neither published nor kept \
             (claimed as {:?})",
            k.map(|i| &i.outcome)
        );
    }
    println!("rounds where the claim found the key live: {dropped_while_live}");
}
