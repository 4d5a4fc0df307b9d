//! A ClickHouse cluster: ZooKeeper and two ClickHouse servers forming one
//! shard of two replicas (a stack of the test's own, as `pg2ch stack up
//! --ch-replicas 2` starts it). Three consumer processes (two `run`, one
//! `consume`) and two producers share the work while rows keep arriving; a
//! consumer is SIGKILLed and restarted, and one replica is stopped and
//! started again. Every replica must end holding every row exactly once,
//! by direct queries to each, and `verify --each-replica` must pass.
//!
//! A sharded cluster (two shards of one server each, as `pg2ch stack up
//! --ch-shards 2` starts it): two `run` processes, one SIGKILLed, carry a
//! bigint-keyed and a composite-keyed table with updates and deletes; each
//! key must end on exactly the shard that owns it, the `Distributed` table
//! must read the whole table, and a row copied onto the wrong shard must be
//! named by `verify --each-replica`.

mod common;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{PrivateStack, TestEnv, eventually, keep_inserting};
use pg2ch::stack::Service;
use pg2ch::types::Key;

fn stop(mut child: Child) {
    common::terminate(&mut child, Duration::from_secs(60));
}

/// The engine of a table of the test's ClickHouse database.
async fn engine_of(env: &TestEnv, table: &str) -> String {
    let ch = env.ch().await;
    ch.client
        .query("SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(table)
        .fetch_one()
        .await
        .unwrap()
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
    let engine = engine_of(&env, "user_logins").await;
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

#[tokio::test(flavor = "multi_thread")]
async fn a_sharded_cluster_gets_each_key_on_the_shard_that_owns_it() {
    let private = PrivateStack::start_sharded("shards", 2).await;
    let env = TestEnv::on(private.settings.clone(), "shards").await;
    let pg = env.pg().await;
    sqlx::raw_sql(
        "CREATE TABLE orders (region text, id int, amount numeric(12,2), note text, PRIMARY KEY (region, id));
         INSERT INTO orders SELECT 'r' || (g % 7), g, g * 1.5, CASE WHEN g % 3 = 0 THEN NULL ELSE 'n' || g END
         FROM generate_series(1, 3000) g",
    )
    .execute(&pg)
    .await
    .unwrap();
    let tables = ["--table", "user_logins", "--table", "public.orders"];
    env.ok(&[&["init"][..], &tables].concat());
    env.ok(&["seed", "--rows", "20000"]);
    let distributed = engine_of(&env, "orders_distributed").await;
    assert_eq!(distributed, "Distributed", "init offers a Distributed table for reading");
    let ch = env.ch().await;

    let run = [&["run", "--batch-rows", "500", "--insert-rows", "700", "--poll-ms", "20"][..], &tables].concat();
    let start = || env.command(&run).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut processes = vec![start(), start()];
    let sent = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_logins WHERE sent_to_kafka")
            .fetch_one(&env.pg().await)
            .await
            .unwrap()
    };
    eventually("rows are being carried", Duration::from_secs(60), || async { sent().await > 2000 }).await;
    // One process dies mid-run; changes keep coming while the other runs.
    processes[0].kill().unwrap();
    processes[0].wait().unwrap();
    sqlx::raw_sql(
        "UPDATE orders SET amount = amount + 1, note = 'changed' WHERE id % 5 = 0;
         DELETE FROM orders WHERE id % 11 = 0;
         INSERT INTO orders VALUES ('r0', 11, 1.25, 'back');
         DELETE FROM user_logins WHERE id % 13 = 0",
    )
    .execute(&pg)
    .await
    .unwrap();
    processes[0] = start();
    let pid = processes[0].id();
    // Stopped once it is at work (its lease session is open), so SIGTERM
    // finds its handler.
    eventually("the restarted process holds a lease session", Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name LIKE $1)")
            .bind(format!("pg2ch % %:{pid}"))
            .fetch_one(&env.pg().await)
            .await
            .unwrap()
    })
    .await;
    for child in processes {
        stop(child);
    }
    env.ok(&[&["run", "--once"][..], &tables].concat());
    let report = env.ok(&[&["verify", "--each-replica"][..], &tables].concat());
    assert_eq!(report.matches("verify: OK").count(), 6, "two tables, over the cluster and on each shard: {report}");

    // Direct queries to each shard: each key on the shard that owns it, once.
    let ports: Vec<u16> = private.stack.cluster.as_ref().unwrap().replicas.iter().map(|r| r.http).collect();
    for table in ["user_logins", "orders"] {
        let schema = env.table(table).await;
        let expected: Vec<Key> = env.pg_rows(&schema).await.into_keys().collect();
        let mut seen: Vec<Key> = Vec::new();
        for (shard, port) in ports.iter().enumerate() {
            let rows = on_replica(&env, *port).ch_rows(&schema).await;
            assert!(!rows.is_empty(), "{table}: shard {} holds no rows", shard + 1);
            for (key, change) in rows {
                let owner = pg2ch::checksum::shard(&schema, &change.values, ports.len());
                assert_eq!(owner, shard, "{table}: key {key:?} is on shard {} but belongs to {}", shard + 1, owner + 1);
                seen.push(key);
            }
        }
        seen.sort();
        assert_eq!(seen, expected, "{table}: the shards together hold every live key once");
        let read: u64 = ch
            .client
            .query(&format!("SELECT count() FROM {table}_distributed FINAL WHERE _pg2ch_deleted = 0"))
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(read as usize, expected.len(), "{table}: the Distributed table reads every shard");
    }
    // The view of current rows reads every shard, also by a column other than the key.
    let pg_notes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE note IS NULL").fetch_one(&pg).await.unwrap();
    let view_notes: u64 =
        ch.client.query("SELECT count() FROM orders_current WHERE note IS NULL").fetch_one().await.unwrap();
    assert_eq!(view_notes as i64, pg_notes, "orders_current reads every shard");
    let ids: Vec<(String, i32)> =
        ch.client.query("SELECT region, id FROM orders_current ORDER BY region, id").fetch_all().await.unwrap();
    let pg_ids: Vec<(String, i32)> =
        sqlx::query_as("SELECT region, id FROM orders ORDER BY region COLLATE \"C\", id").fetch_all(&pg).await.unwrap();
    assert_eq!(ids, pg_ids, "orders_current holds every key of PostgreSQL once");

    // Teeth: a row copied onto the shard that does not own it is named.
    let (first, wrong) = (ports[0], ports[1]);
    let schema = env.logins().await;
    let (key, change) = on_replica(&env, first).ch_rows(&schema).await.into_iter().next().unwrap();
    let key = pg2ch::verify::key_json(&key);
    on_replica(&env, wrong).ch().await.write_changes(&schema, &[change]).await.unwrap();
    let out = env.run(&["verify", "--each-replica"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "a misplaced row fails verify: {text}");
    let header = format!("public.user_logins on replica 127.0.0.1:{wrong} (shard 2):");
    let block = &text[text.find(&header).unwrap_or_else(|| panic!("no report for shard 2: {text}"))..];
    let block = &block[..block.find("verify: ").unwrap() + "verify: FAILED".len()];
    assert!(
        block.contains(&format!("keys in ClickHouse that PostgreSQL lacks: 1 (first: [{key}])"))
            && block.ends_with("verify: FAILED"),
        "the report of shard 2 names the misplaced key {key}: {block}"
    );
}
