//! Process level: the real `pg2ch run` binary is SIGKILLed at random moments
//! while new rows keep arriving, restarted each time, then drained; the
//! result must be exactly-once. The kill moments come from a seeded RNG
//! (printed, and settable with PG2CH_KILL_SEED) so a failing run can be replayed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestEnv, keep_inserting};
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let env = TestEnv::new("sigkill").await;
    env.ok(&["init", "--partitions", "3"]);
    env.ok(&["seed", "--rows", "20000"]);

    // New rows keep arriving during the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let inserter = keep_inserting(env.pg().await, 50, Duration::ZERO, stop.clone());

    let seed: u64 = std::env::var("PG2CH_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("PG2CH_KILL_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..20 {
        let mut child = env
            .command(&["run", "--batch-rows", "500", "--insert-rows", "700", "--poll-ms", "20"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting pg2ch run");
        // Not synchronisation: the point is to kill at an arbitrary moment.
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..700))).await;
        assert!(child.try_wait().unwrap().is_none(), "round {round}: pg2ch run exited on its own (seed {seed})");
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let batches = inserter.await.unwrap();
    assert!(batches > 0, "rows kept arriving");

    env.ok(&["run", "--once"]);
    let report = env.ok(&["verify"]);
    assert!(report.contains("verify: OK"), "seed {seed}: {report}");
    let schema = env.logins().await;
    env.assert_same_rows(&schema, &format!("seed {seed}")).await;
    let pg = env.pg_rows(&schema).await;
    let ch = env.ch().await;
    assert_eq!(ch.final_count(&schema).await.unwrap() as usize, pg.len(), "seed {seed}: one row per id");
    assert_eq!(pg.len(), 20_000 + 50 * batches as usize);
}
