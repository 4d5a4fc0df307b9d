//! Scaling out: several `pg2ch` processes of one consumer group share the
//! topic's partitions through leases held in PostgreSQL. Each partition has
//! one holder at a time; three consumers split four partitions; a consumer
//! that is SIGKILLed, or paused (SIGSTOP) past its lease, loses its
//! partitions to the others within the lease's life, and gets a share again
//! when it comes back. Two producers share the source meanwhile, rows keep
//! arriving, and at the end ClickHouse holds every row exactly once.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestEnv, eventually, keep_inserting};
use pg2ch::commands;

/// Who holds each partition's lease now (`None`: nobody), and the producers.
async fn holders(env: &TestEnv) -> (Vec<Option<String>>, Vec<String>) {
    let status = commands::status(&env.settings).await.expect("status").remove(0);
    (status.partitions.into_iter().map(|p| p.holder).collect(), status.producers)
}

/// The process ids behind the holders' session names (`pg2ch consumer host:pid`).
fn pids(holders: &[Option<String>]) -> Vec<Option<u32>> {
    holders.iter().map(|h| h.as_ref().and_then(|h| h.rsplit(':').next()?.parse().ok())).collect()
}

fn signal(child: &Child, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal}");
}

/// Every partition is held, each by one of `alive`, and each of them holds at
/// least one and at most its fair share rounded up.
fn fairly_split(holders: &[Option<String>], alive: &[u32]) -> bool {
    let pids = pids(holders);
    let most = holders.len().div_ceil(alive.len());
    pids.iter().all(|p| p.is_some_and(|p| alive.contains(&p)))
        && alive.iter().all(|a| (1..=most).contains(&pids.iter().filter(|p| **p == Some(*a)).count()))
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_processes_share_partitions_and_take_over_from_dead_and_paused_ones() {
    let env = TestEnv::new("scale").await;
    env.ok(&["init", "--partitions", "4"]);
    env.ok(&["seed", "--rows", "20000"]);

    let stop = Arc::new(AtomicBool::new(false));
    let inserter = keep_inserting(env.pg().await, 20, Duration::from_millis(20), stop.clone());
    let start = |args: &[&str]| env.command(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let consume = ["consume", "--insert-rows", "700", "--poll-ms", "20"];
    let producers = [0, 1].map(|_| start(&["produce", "--batch-rows", "500", "--poll-ms", "20"]));
    let mut consumers: Vec<Child> = (0..3).map(|_| start(&consume)).collect();
    let alive = |cs: &[Child], but: Option<usize>| -> Vec<u32> {
        cs.iter().enumerate().filter(|(i, _)| Some(*i) != but).map(|(_, c)| c.id()).collect()
    };
    let within = pg2ch::postgres::lease::LEASE_LIFE + Duration::from_secs(10);

    let all = alive(&consumers, None);
    eventually("three consumers split the four partitions", within, || async {
        let (h, producers) = holders(&env).await;
        fairly_split(&h, &all) && producers.len() == 2
    })
    .await;

    // SIGKILL: the session closes with the process, its leases at once.
    consumers[0].kill().unwrap();
    consumers[0].wait().unwrap();
    let rest = alive(&consumers, Some(0));
    eventually("the two left take over the killed consumer's partitions", within, || async {
        fairly_split(&holders(&env).await.0, &rest)
    })
    .await;
    consumers[0] = start(&consume);
    let all = alive(&consumers, None);
    eventually("the restarted consumer gets its share", within, || async {
        fairly_split(&holders(&env).await.0, &all)
    })
    .await;

    // SIGSTOP: a paused process renews nothing; its session ends after the
    // lease's life, and the others take over. Woken, it holds nothing until
    // it has joined again.
    signal(&consumers[1], "-STOP");
    let rest = alive(&consumers, Some(1));
    eventually("the others take over the paused consumer's partitions", within, || async {
        fairly_split(&holders(&env).await.0, &rest)
    })
    .await;
    signal(&consumers[1], "-CONT");
    eventually("the woken consumer joins again and gets its share", within, || async {
        fairly_split(&holders(&env).await.0, &all)
    })
    .await;
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        let (h, _) = holders(&env).await;
        assert!(h.iter().all(Option::is_some), "every partition has a holder: {h:?}");
        seen.extend(pids(&h).into_iter().flatten());
    }
    assert!(seen.iter().all(|p| all.contains(p)), "only live consumers hold partitions: {seen:?} of {all:?}");

    stop.store(true, Ordering::SeqCst);
    let batches = inserter.await.unwrap();
    assert!(batches > 0, "rows kept arriving");
    for mut child in producers.into_iter().chain(consumers) {
        common::terminate(&mut child, Duration::from_secs(60));
    }
    env.ok(&["run", "--once"]);
    let report = env.ok(&["verify"]);
    assert!(report.contains("verify: OK"), "{report}");
    let schema = env.logins().await;
    env.assert_same_rows(&schema, "three consumers, two producers").await;
}
