//! A ClickHouse cluster: ZooKeeper and two ClickHouse servers forming one
//! shard of two replicas (a stack of the test's own, as `pg2ch stack up
//! --ch-replicas 2` starts it). Three consumer processes (two `run`, one
//! `consume`) and two producers share the work while rows keep arriving; a
//! consumer is SIGKILLed and restarted, and one replica is stopped and
//! started again. Every replica must end holding every row exactly once,
//! by direct queries to each, and `verify --each-replica` must pass.

mod common;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{PrivateStack, TestEnv, eventually, keep_inserting};
use pg2ch::stack::Service;

fn stop(mut child: Child) {
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "a pg2ch process stopped on SIGTERM with {status}");
}

/// The same namespace, seen through one replica alone (its HTTP port).
fn on_replica(env: &TestEnv, port: u16) -> TestEnv {
    let ch = pg2ch::config::ChConfig { port, cluster: None, ..env.settings.ch.clone() };
    env.view(pg2ch::commands::Settings { ch, ..env.settings.clone() })
}

#[tokio::test(flavor = "multi_thread")]
async fn three_consumers_over_two_replicas_survive_a_killed_consumer_and_a_stopped_replica() {
    let mut private = PrivateStack::start_cluster("cluster", 2).await;
    let env = TestEnv::on(private.settings.clone(), "cluster").await;
    env.ok(&["init", "--partitions", "3"]);
    env.ok(&["seed", "--rows", "20000"]);
    let ch = env.ch().await;
    let engine: String = ch
        .client
        .query("SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = 'user_logins'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(engine, "ReplicatedReplacingMergeTree", "init --ch-cluster makes replicated tables");

    let stop_rows = Arc::new(AtomicBool::new(false));
    let inserter = keep_inserting(env.pg().await, 20, Duration::from_millis(20), stop_rows.clone());
    let start = |args: &[&str]| env.command(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let run = ["run", "--batch-rows", "500", "--insert-rows", "700", "--poll-ms", "20"];
    let consume = ["consume", "--insert-rows", "700", "--poll-ms", "20"];
    let mut processes = vec![start(&run), start(&run), start(&consume)];
    let sent = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_logins WHERE sent_to_kafka")
            .fetch_one(&env.pg().await)
            .await
            .unwrap()
    };
    let written = |port: u16| {
        let replica = on_replica(&env, port);
        async move {
            let ch = replica.ch().await;
            ch.client.query("SELECT count() FROM user_logins").fetch_one::<u64>().await.unwrap_or(0)
        }
    };
    let ports: Vec<u16> = private.stack.cluster.as_ref().unwrap().replicas.iter().map(|r| r.http).collect();
    eventually("rows reach the second replica", Duration::from_secs(60), || async { written(ports[1]).await > 0 })
        .await;

    // A consumer dies and comes back.
    processes[2].kill().unwrap();
    processes[2].wait().unwrap();
    processes[2] = start(&consume);

    // A replica stops: inserts wait for it (every replica must have a row
    // before its position is stored), then go on once it is back.
    let before = sent().await;
    private.stop(Service::Replica(2));
    // The outage lasts a few seconds: that is what is being tested.
    tokio::time::sleep(Duration::from_secs(3)).await;
    private.up().await;
    eventually("the pipeline moves on after the replica is back", Duration::from_secs(60), || async {
        sent().await > before + 1000
    })
    .await;

    stop_rows.store(true, Ordering::SeqCst);
    assert!(inserter.await.unwrap() > 0);
    for child in processes {
        stop(child);
    }
    env.ok(&["run", "--once"]);
    let report = env.ok(&["verify", "--each-replica"]);
    assert_eq!(report.matches("verify: OK").count(), 3, "the cluster and each replica: {report}");

    // Direct queries to each replica: every row, once, as PostgreSQL has it.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins").fetch_one(&env.pg().await).await.unwrap();
    for port in ports {
        let replica = on_replica(&env, port);
        let ch = replica.ch().await;
        let live: u64 = ch.client.query("SELECT count() FROM user_logins FINAL").fetch_one().await.unwrap();
        assert_eq!(live as i64, rows, "replica on port {port}");
        let schema = replica.logins().await;
        replica.assert_same_rows(&schema, &format!("replica on port {port}")).await;
    }
}
