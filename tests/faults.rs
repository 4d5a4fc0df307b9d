//! Faults, bad input and stopping, against real services: each outage is a
//! real service process stopped (or frozen) and restarted under a running
//! `pg2ch run`, on a private stack so other tests keep theirs.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use chrono::Utc;
use common::{PrivateStack, TestEnv, eventually};
use pg2ch::stack::Service;
use pg2ch::types::Value;

async fn sent_count(env: &TestEnv) -> i64 {
    match pg2ch::postgres::connect(&env.settings.pg, 1, Duration::from_secs(2)).await {
        Ok(pool) => sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE sent_to_kafka")
            .fetch_one(&pool)
            .await
            .unwrap_or(-1),
        Err(_) => -1,
    }
}

async fn insert_rows(env: &TestEnv, n: usize) {
    let names: Vec<String> = (0..n).map(|i| format!("late_{i}")).collect();
    pg2ch::postgres::insert_events(&env.pg().await, &names, &vec![Utc::now(); n]).await.unwrap();
}

/// Everything drained: nothing unsent, ClickHouse FINAL equals PostgreSQL.
async fn drained(env: &TestEnv) -> bool {
    let Ok(pool) = pg2ch::postgres::connect(&env.settings.pg, 1, Duration::from_secs(2)).await else { return false };
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE NOT sent_to_kafka")
        .fetch_one(&pool)
        .await
        .unwrap_or(1);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins").fetch_one(&pool).await.unwrap_or(-1);
    let Ok(ch) = pg2ch::clickhouse::ClickHouse::connect(&env.settings.ch, Duration::from_secs(2)).await else {
        return false;
    };
    let schema = env.logins().await;
    unsent == 0 && ch.final_count(&schema).await.map(|n| n as i64 == total).unwrap_or(false)
}

/// SIGTERM, then the process must exit 0 within `limit`; returns its stderr.
fn stop(mut child: Child, limit: Duration) -> String {
    common::terminate(&mut child, limit);
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    err
}

fn spawn_run(env: &TestEnv) -> Child {
    env.command(&["run", "--poll-ms", "50", "--batch-rows", "2000", "--timeout-secs", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `pg2ch run` through an outage of `service` (stopped for a few seconds, then started again).
async fn survives_outage(label: &str, service: Service) {
    let mut private = PrivateStack::start(label).await;
    let env = TestEnv::on(private.settings.clone(), label).await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "30000"]);
    let child = spawn_run(&env);
    eventually("first rows sent", Duration::from_secs(30), || async { sent_count(&env).await > 0 }).await;

    private.stop(service);
    if service != Service::Postgres {
        insert_rows(&env, 500).await; // rows keep arriving while it is down
    }
    // The outage lasts a few seconds: that is what is being tested, not a wait for something.
    tokio::time::sleep(Duration::from_secs(3)).await;
    private.up().await;
    insert_rows(&env, 500).await;

    eventually("drained after the outage", Duration::from_secs(60), || drained(&env)).await;
    let log = stop(child, Duration::from_secs(10));
    let report = env.ok(&["verify"]);
    assert!(report.contains("verify: OK"), "{report}");
    // One line when trouble starts and one when it ends, not one per retry.
    let warnings = log.lines().filter(|l| l.contains("retrying with backoff")).count();
    assert!((1..=4).contains(&warnings), "{warnings} warnings:\n{log}");
    assert!(log.contains("recovered"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_outage_is_survived() {
    survives_outage("pgdown", Service::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_outage_is_survived() {
    survives_outage("chdown", Service::ClickHouse).await;
}

/// The local broker keeps its topics on disk: restarted under a running
/// `run`, it hands back the same log, so `run` carries on (no replaced-log
/// stop) and loses nothing.
#[tokio::test(flavor = "multi_thread")]
async fn broker_restart_is_survived() {
    survives_outage("brokerdown", Service::Broker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_broker_is_cut_by_timeouts_and_survived() {
    let private = PrivateStack::start("brokerhang").await;
    let env = TestEnv::on(private.settings.clone(), "brokerhang").await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "30000"]);
    let child = spawn_run(&env);
    eventually("first rows sent", Duration::from_secs(30), || async { sent_count(&env).await > 0 }).await;
    private.freeze_broker(true);
    insert_rows(&env, 500).await;
    tokio::time::sleep(Duration::from_secs(5)).await; // longer than --timeout-secs 2: calls must be cut
    private.freeze_broker(false);
    eventually("drained after the hang", Duration::from_secs(60), || drained(&env)).await;
    let log = stop(child, Duration::from_secs(10));
    assert!(log.contains("timed out"), "a hung call must be cut by a timeout:\n{log}");
    assert!(env.ok(&["verify"]).contains("verify: OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_batch_stops_quickly_and_resumes() {
    let env = TestEnv::new("sigterm").await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "300000"]);
    let child =
        env.command(&["run", "--batch-rows", "50000"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    eventually("first batch sent", Duration::from_secs(30), || async { sent_count(&env).await > 0 }).await;
    stop(child, Duration::from_secs(5));
    assert!(sent_count(&env).await < 300_000, "stopped before the end, so the restart has work to do");
    env.ok(&["run", "--once"]);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    assert_eq!(sent_count(&env).await, 300_000);
}

/// An exclusive producer claims without row locks, so it must not work
/// while a shared one does: it waits, moving nothing, and starts when the
/// shared one is gone. The shared producer here is the test itself holding
/// the lease, so that rows can arrive meanwhile that nobody takes.
#[tokio::test(flavor = "multi_thread")]
async fn an_exclusive_producer_waits_for_shared_ones_then_drains() {
    use std::io::BufRead;
    let env = TestEnv::new("exclusive").await;
    env.ok(&["init", "--partitions", "3"]);
    env.ok(&["seed", "--rows", "5000"]);
    let mut shared = env.pg().await.acquire().await.unwrap().detach();
    let took: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock_shared($1, 'user_logins'::regclass::oid::int)")
        .bind(pg2ch::postgres::PRODUCER_LOCK_CLASS)
        .fetch_one(&mut shared)
        .await
        .unwrap();
    assert!(took);

    let mut exclusive =
        env.command(&["run", "--once", "--exclusive"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut log = std::io::BufReader::new(exclusive.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("waiting") {
        let mut line = String::new();
        assert!(log.read_line(&mut line).unwrap() > 0, "exited without waiting for the shared producer:\n{said}");
        said += &line;
    }
    insert_rows(&env, 3000).await;
    assert_eq!(sent_count(&env).await, 0, "nothing moves while a shared producer holds the lease");
    assert!(exclusive.try_wait().unwrap().is_none(), "still waiting");

    drop(shared); // the shared producer's session ends
    let status = exclusive.wait().unwrap();
    std::io::Read::read_to_string(&mut log, &mut said).unwrap();
    assert!(status.success(), "{said}");
    assert!(said.contains("starting"), "{said}");
    assert_eq!(sent_count(&env).await, 8000);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_records_go_to_the_dead_letter_topic_and_good_ones_land() {
    use rskafka::client::partition::Compression;
    use rskafka::record::Record;
    let env = TestEnv::new("poison").await;
    env.ok(&["init", "--partitions", "1"]);
    env.ok(&["seed", "--rows", "100"]);
    env.ok(&["produce", "--once"]);
    let partition = env.foreign_partition(&env.name, 0).await;
    let junk: Vec<Option<&[u8]>> = vec![
        Some(b"not json at all"),
        Some(br#"{"id":"seven","username":"x","event_time":"2024-01-01T00:00:00Z"}"#),
        Some(br#"{"username":"no id","event_time":"2024-01-01T00:00:00Z"}"#),
        Some(b""),
        None,
    ];
    let records: Vec<Record> = junk
        .iter()
        .map(|v| Record {
            key: Some(b"junk".to_vec()),
            value: v.map(|v| v.to_vec()),
            headers: Default::default(),
            timestamp: Utc::now(),
        })
        .collect();
    partition.produce(records, Compression::NoCompression).await.unwrap();
    // A foreign record small in its lz4 batch, 3 MB once read: forwarded as
    // it came, the broker would refuse it for ever.
    let huge: Vec<u8> = b"{\"not a row\": true} ".iter().copied().cycle().take(3_000_000).collect();
    let big = Record {
        key: Some(b"junk".to_vec()),
        value: Some(huge.clone()),
        headers: Default::default(),
        timestamp: Utc::now(),
    };
    partition.produce(vec![big], Compression::Lz4).await.unwrap();
    env.ok(&["seed", "--rows", "100"]); // good records after the poison
    env.ok(&["run", "--once"]);

    assert!(env.ok(&["verify"]).contains("verify: OK"), "the good records around the poison landed");
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["dead_letters"], 6, "{status}");
    assert_eq!(status["partitions"][0]["lag"], 0, "the position moved past the poison: {status}");

    let dlq = env.foreign_partition(&pg2ch::kafka::dead_letter_topic(&env.name), 0).await;
    let (letters, _) = dlq.fetch_records(0, 1..1_000_000, 1000).await.unwrap();
    assert_eq!(letters.len(), 6);
    let cut = &letters[5].record;
    let note = String::from_utf8(cut.headers["pg2ch-truncated"].clone()).unwrap();
    assert_eq!(note, "key 4 bytes, value 3000000 bytes");
    let kept = cut.value.as_deref().unwrap();
    assert!(kept.len() < 900_000 && huge.starts_with(kept), "cut to fit, the start kept: {} bytes", kept.len());
    for (letter, original) in letters.iter().zip(&junk) {
        assert!(!letter.record.headers.contains_key("pg2ch-truncated"), "a small letter is whole");
        assert_eq!(letter.record.value.as_deref(), *original, "forwarded unchanged");
        assert_eq!(letter.record.key.as_deref(), Some(&b"junk"[..]));
        let header = |k: &str| String::from_utf8(letter.record.headers[k].clone()).unwrap();
        assert_eq!(header("pg2ch-source-partition"), "0");
        assert_eq!(header("pg2ch-source-topic"), env.name);
        let offset: i64 = header("pg2ch-source-offset").parse().unwrap();
        assert!((100..105).contains(&offset), "{offset}");
        assert!(!header("pg2ch-reason").is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unrepresentable_rows_are_flagged_rejected_not_altered() {
    let env = TestEnv::new("rejected").await;
    let pool = env.pg().await;
    // A legacy table where username may be NULL.
    sqlx::query("CREATE TABLE user_logins (id BIGSERIAL PRIMARY KEY, username TEXT, event_time TIMESTAMPTZ NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    env.ok(&["init", "--partitions", "1"]);
    sqlx::query("INSERT INTO user_logins (username, event_time) VALUES ('ok1', now()), (NULL, now()), (repeat('x', 2000000), now()), ('ok2', now())")
        .execute(&pool)
        .await
        .unwrap();
    // Before any claim nothing is sent, so all is well.
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    env.ok(&["run", "--once"]);
    let rejected: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, pg2ch_rejected FROM user_logins WHERE pg2ch_rejected IS NOT NULL ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, 3);
    assert!(rejected[0].1.contains("over the 900000-byte limit"), "{rejected:?}");
    let report = env.ok(&["verify"]);
    assert!(
        report.contains("verify: OK")
            && report.contains("rows rejected as not representable (see pg2ch_rejected; not sent): 1 (first: [3])"),
        "{report}"
    );
    // A NULL in a column that admits it travels as NULL.
    let schema = env.logins().await;
    let names: Vec<Value> = env.ch_rows(&schema).await.into_values().map(|c| c.values[1].clone()).collect();
    assert_eq!(names, [Value::Text("ok1".into()), Value::Null, Value::Text("ok2".into())]);
    // The row made to fit is sent, with its new content.
    sqlx::query("UPDATE user_logins SET username = 'short now' WHERE id = 3").execute(&pool).await.unwrap();
    env.ok(&["run", "--once"]);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    assert_eq!(env.ch_rows(&schema).await.len(), 4);
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!((status["unsent_rows"].as_i64(), status["rejected_rows"].as_i64()), (Some(0), Some(0)));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_is_one_line_exit_2_and_writes_nothing() {
    let env = TestEnv::new("badcfg2").await;
    let err_of = |out: std::process::Output| {
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{err}");
        err
    };
    // Unknown host: nothing created anywhere.
    let err = err_of(env.command(&["init"]).env("PG_HOST", "no-such-host.invalid").output().unwrap());
    assert!(err.contains("PostgreSQL at no-such-host.invalid"), "{err}");
    let ch = env.ch().await;
    let dbs: u64 = ch
        .client
        .clone()
        .with_database("default")
        .query("SELECT count() FROM system.databases WHERE name = ?")
        .bind(env.name.as_str())
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(dbs, 0, "a failed init created the ClickHouse database");
    // Missing table.
    let err = err_of(env.run(&["produce", "--once"]));
    assert!(err.contains("user_logins does not exist"), "{err}");
    // Invalid identifier.
    let err = err_of(env.command(&["status"]).env("CH_DB", "bad-name").output().unwrap());
    assert!(err.contains("CH_DB") && err.contains("bad-name"), "{err}");
    // Partition count that does not match the topic.
    env.ok(&["init", "--partitions", "2"]);
    let err = err_of(env.run(&["init", "--partitions", "3"]));
    assert!(err.contains("exists with 2 partitions"), "{err}");
    let err = err_of(env.run(&["consume", "--once", "--partitions", "0,5"]));
    assert!(err.contains("partition 5"), "{err}");
    // Missing ClickHouse tables (a database init never ran against).
    let elsewhere = format!("{}_never_initialised", env.name);
    let err = err_of(env.command(&["consume", "--once"]).env("CH_DB", &elsewhere).output().unwrap());
    assert!(err.contains(&format!("{elsewhere}.user_logins does not exist")), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_in_prometheus_text() {
    let env = TestEnv::new("metrics").await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "1234"]);
    let addr = format!("127.0.0.1:{}", common::free_port());
    let child = env
        .command(&["run", "--poll-ms", "50", "--metrics-addr", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("drained", Duration::from_secs(30), || drained(&env)).await;
    let scrape = || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&addr).ok()?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).ok()?;
        Some(body)
    };
    let value = |body: &str, name: &str| -> Option<f64> {
        body.lines().find(|l| l.starts_with(name) && !l.starts_with('#'))?.rsplit(' ').next()?.parse().ok()
    };
    let mut body = String::new();
    eventually("metrics reflect the drained rows", Duration::from_secs(10), || {
        body = scrape().unwrap_or_default();
        let written = value(&body, "pg2ch_rows_written_total");
        async move { written == Some(1234.0) }
    })
    .await;
    assert_eq!(value(&body, "pg2ch_rows_published_total"), Some(1234.0), "{body}");
    assert_eq!(value(&body, "pg2ch_rows_marked_total"), Some(1234.0), "{body}");
    assert!(body.contains("pg2ch_produce_batch_seconds"), "{body}");
    assert!(body.contains("pg2ch_lag{partition=\"0\"} 0"), "{body}");
    // Lag in time: caught up, and the rows claimed had waited since the seed.
    assert!(body.contains("pg2ch_lag_seconds{partition=\"0\"} 0"), "{body}");
    let age = value(&body, "pg2ch_claimed_age_seconds").expect("the age of the claimed changes");
    assert!(age > 0.0 && age < 600.0, "{age}");
    // The stages' times: publishes acknowledged, records fetched back (how
    // long after their publish began, a time a clock could not make
    // negative or absurd).
    assert!(value(&body, "pg2ch_publish_seconds_count").is_some_and(|n| n >= 1.0), "{body}");
    let fetched = value(&body, "pg2ch_fetched_age_seconds_count").expect("records fetched back");
    let mean = value(&body, "pg2ch_fetched_age_seconds_sum").expect("their ages") / fetched;
    assert!(fetched >= 1.0 && (0.0..600.0).contains(&mean), "{body}");
    stop(child, Duration::from_secs(10));
}

/// A stack service that cannot start (here ClickHouse, its native port held
/// by someone else) fails `stack up` as soon as the process exits, not after
/// the minute it is given to answer, and the error quotes the server's own
/// log: a test's private stack directory, logs included, is removed when the
/// test fails, so a bare "see error.log" pointed at nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_stack_service_that_cannot_start_fails_at_once_quoting_its_log() {
    let taken = std::net::TcpListener::bind(("127.0.0.1", common::free_port())).unwrap();
    let held = taken.local_addr().unwrap().port();
    let stack = pg2ch::stack::Stack {
        dir: std::env::temp_dir().join(format!("pg2ch-portheld-{}", std::process::id())),
        pg_port: common::free_port(),
        ch_port: common::free_port(),
        ch_tcp_port: held,
        kafka_port: common::free_port(),
        cluster: None,
    };
    let result = stack.up().await;
    let _ = stack.down();
    let _ = std::fs::remove_dir_all(&stack.dir);
    let _ = std::fs::remove_dir_all(stack.pg_root());
    let _ = std::fs::remove_dir_all(stack.services_root());
    let err = format!("{:#}", result.expect_err("ClickHouse started on a port that was taken"));
    assert!(err.contains(&format!("ClickHouse on port {} exited", stack.ch_port)), "{err}");
    assert!(err.contains("error.log ends:") && err.contains(&held.to_string()), "{err}");
    drop(taken);
}
