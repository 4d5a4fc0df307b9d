//! Freshness: each row's time from its INSERT's commit in PostgreSQL to the
//! moment it is readable in ClickHouse, while `pg2ch run` runs and rows are
//! inserted at a steady rate (2,000 and 20,000 rows/s), and, in the same run,
//! the floor of each stage a row passes through: one flag update, one produce
//! round trip, one fetch, one ClickHouse insert. The goal: p99 at
//! most 50 ms at 2,000 rows/s and 100 ms at 20,000 rows/s, or at most 1.5
//! times the sum of the floors where they make that impossible.
//!
//! Rows are inserted every 10 ms (20 or 200 per statement); ClickHouse is
//! asked every 10 ms, without waiting for its last answer, which of the
//! outstanding ids it holds (one thread per query: on two cores, each query
//! costs ClickHouse 2 to 3 ms of CPU, which the pipeline would lose), and a
//! row it returns counts as readable when the query was sent (ClickHouse
//! reads the parts that exist when a query starts), so a figure is late by
//! up to 10 ms (and early by no more than a query's way to ClickHouse: the
//! time is taken as it is sent). `PG2CH_BENCH_LATENCY_SECS` sets each rate's duration
//! (default 10); `PG2CH_BENCH_POLL_MS` the `--poll-ms` of `run` (default
//! 200).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/polls.rs"]
mod polls;
#[path = "support/procs.rs"]
mod procs;
#[path = "support/topic.rs"]
mod topic;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use common::TestEnv;
use pg2ch::stores::{EventLog, LogRecord};
use tokio::runtime::Runtime;

fn secs() -> u64 {
    std::env::var("PG2CH_BENCH_LATENCY_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

/// The `p` quantile of a sorted slice.
fn pct<T>(sorted: &[T], p: f64) -> &T {
    &sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// One row's journey: when its INSERT committed and how long it took to be
/// readable in ClickHouse.
struct Seen {
    id: i64,
    committed: SystemTime,
    latency: Duration,
}

/// One row inserted after `quiet` without changes: its time from commit
/// to readable in ClickHouse (asked every 5 ms). Producers find it by
/// their idle looks alone, which grow apart while the table is quiet.
async fn after_quiet(pool: &sqlx::PgPool, ch: &pg2ch::clickhouse::ClickHouse, id: i64, quiet: Duration) -> Duration {
    tokio::time::sleep(quiet).await;
    sqlx::query("INSERT INTO user_logins (id, username) VALUES ($1, 'quiet')").bind(id).execute(pool).await.unwrap();
    let committed = Instant::now();
    let deadline = committed + Duration::from_secs(30);
    loop {
        let seen: u64 =
            ch.client.query("SELECT count() FROM user_logins WHERE id = ?").bind(id).fetch_one().await.unwrap();
        if seen > 0 {
            return committed.elapsed();
        }
        assert!(Instant::now() < deadline, "row {id} never reached ClickHouse");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Inserts `rate` rows/s for `secs` seconds and returns each row's journey,
/// by latency.
async fn steady(env: &TestEnv, rate: u64, secs: u64) -> Vec<Seen> {
    let pool = env.pg().await;
    let ch = env.ch().await;
    let per_tick = (rate / 100) as i64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(i64, i64, Instant, SystemTime)>();
    let inserter = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(secs) {
            tick.tick().await;
            let (first, last): (i64, i64) = sqlx::query_as(
                "WITH ins AS (INSERT INTO user_logins (username, event_time)
                              SELECT 'steady', now() FROM generate_series(1, $1::bigint) RETURNING id)
                 SELECT min(id), max(id) FROM ins",
            )
            .bind(per_tick)
            .fetch_one(&pool)
            .await
            .unwrap();
            tx.send((first, last, Instant::now(), SystemTime::now())).unwrap();
        }
    });
    // id → commit time, for rows not seen in ClickHouse yet.
    let mut outstanding: BTreeMap<i64, (Instant, SystemTime)> = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut inserting = true;
    let deadline = Instant::now() + Duration::from_secs(secs + 90);
    let mut polls = polls::Polls::every(Duration::from_millis(10));
    while (inserting || !outstanding.is_empty()) && Instant::now() < deadline {
        match polls.next().await {
            polls::Event::Tick => {
                loop {
                    match rx.try_recv() {
                        Ok((first, last, at, wall)) => outstanding.extend((first..=last).map(|id| (id, (at, wall)))),
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                            inserting = false;
                            break;
                        }
                    }
                }
                let (Some((&low, _)), Some((&high, _))) = (outstanding.first_key_value(), outstanding.last_key_value())
                else {
                    continue;
                };
                let query = ch.client.query("SELECT id FROM user_logins WHERE id BETWEEN ? AND ?").bind(low).bind(high);
                polls.send(async move { query.with_setting("max_threads", "1").fetch_all::<i64>().await.unwrap() });
            }
            polls::Event::Answer(sent, seen) => {
                // Only ids committed before `sent` were asked for.
                for id in seen {
                    if let Some((at, committed)) = outstanding.remove(&id) {
                        latencies.push(Seen { id, committed, latency: sent - at });
                    }
                }
            }
        }
    }
    if polls.skipped > 0 {
        eprintln!("latency: {}", polls.summary());
    }
    inserter.await.unwrap();
    assert!(outstanding.is_empty(), "{} rows never reached ClickHouse", outstanding.len());
    latencies.sort_by_key(|s| s.latency);
    latencies
}

/// Each row's publish time (its record's timestamp, taken by the producer
/// as it publishes, in milliseconds) by id, read back from the topic.
async fn published(log: &pg2ch::kafka::KafkaLog) -> HashMap<i64, i64> {
    let mut at = HashMap::new();
    topic::each_record(log, |r| {
        let value: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        at.insert(value["id"].as_i64().unwrap(), r.timestamp_ms);
    })
    .await;
    at
}

/// Splits each row's latency into commit → published and published →
/// readable in ClickHouse; returns the (p50, p99) of each part.
fn split(rows: &[Seen], published: &HashMap<i64, i64>) -> ((Duration, Duration), (Duration, Duration)) {
    let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    let (mut produce, mut consume): (Vec<Duration>, Vec<Duration>) = rows
        .iter()
        .map(|s| {
            let to_publish = Duration::from_millis((published[&s.id] - ms(s.committed)).max(0) as u64).min(s.latency);
            (to_publish, s.latency - to_publish)
        })
        .unzip();
    produce.sort();
    consume.sort();
    ((*pct(&produce, 0.5), *pct(&produce, 0.99)), (*pct(&consume, 0.5), *pct(&consume, 0.99)))
}

/// Median of `n` timings of `op`.
async fn floor<F: AsyncFnMut()>(n: usize, mut op: F) -> Duration {
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        op().await;
        t.push(s.elapsed());
    }
    t.sort();
    t[n / 2]
}

fn main() {
    let rt = Runtime::new().unwrap();
    rt.block_on(async {
        let env = TestEnv::new("benchlatency").await;
        assert!(env.run(&["init", "--partitions", "4"]).status.success());
        let pool = env.pg().await;
        let ch = env.ch().await;

        // Floors, each the median of 200 on an idle pipeline.
        sqlx::query("INSERT INTO user_logins (id, username, sent_to_kafka) VALUES (-1, 'floor', TRUE)")
            .execute(&pool)
            .await
            .unwrap();
        let own = env.pg_own().await;
        let flag = floor(200, async || {
            sqlx::query("UPDATE user_logins SET sent_to_kafka = TRUE WHERE id = -1").execute(&own).await.unwrap();
        })
        .await;
        let client = pg2ch::kafka::connect(&env.settings.kafka, Duration::from_secs(10)).await.unwrap();
        let topic = format!("{}_floor", env.name);
        pg2ch::kafka::ensure_topic(&client, &topic, 1, 1, Duration::from_secs(10)).await.unwrap();
        let log = pg2ch::kafka::KafkaLog::open(&client, &topic, Duration::from_secs(10)).await.unwrap();
        let record = || vec![LogRecord { key: b"1".to_vec(), value: br#"{"id":1}"#.to_vec() }];
        let produce = floor(200, async || log.append(0, record()).await.unwrap()).await;
        // The records are there, so the broker answers at once whatever the wait.
        let fetch = floor(200, async || {
            assert!(!log.fetch(0, 0, Duration::from_millis(500)).await.unwrap().records.is_empty());
        })
        .await;
        // An idle consumer's fetch (a 200 ms wait) when a record comes 20 ms
        // into it, produced over a second connection: a Kafka broker answers
        // at about 20 ms; nisshi as released looked again only after half the
        // time left (100 ms).
        let producer = pg2ch::kafka::connect(&env.settings.kafka, Duration::from_secs(10)).await.unwrap();
        let producer = pg2ch::kafka::KafkaLog::open(&producer, &topic, Duration::from_secs(10)).await.unwrap();
        let woken = floor(21, async || {
            let end = log.fetch(0, 0, Duration::ZERO).await.unwrap().high_watermark;
            let (fetched, ()) = tokio::join!(log.fetch(0, end, Duration::from_millis(200)), async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                producer.append(0, record()).await.unwrap();
            });
            assert_eq!(fetched.unwrap().records.len(), 1, "the fetch returned the new record");
        })
        .await;
        let insert = floor(200, async || {
            ch.client
                .query("INSERT INTO user_logins (id, username, event_time_us) VALUES (-1, 'floor', 0)")
                .execute()
                .await
                .unwrap();
        })
        .await;
        let floors = flag + produce + fetch + insert;

        // A new file of this process's own name: never one planted there.
        let log = std::env::temp_dir().join(format!("pg2ch-latency-run-{}-{}.log", std::process::id(), env.name));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&log).unwrap();
        let poll = std::env::var("PG2CH_BENCH_POLL_MS").unwrap_or("200".into());
        let mut child = env.command(&["run", "--poll-ms", &poll]).stderr(file).spawn().unwrap();
        // Single rows after quiet spells: 50 ms (the producer's idle looks
        // still close together) and 3 s (looking once per poll interval).
        // The first waits for `run` to start.
        after_quiet(&pool, &ch, -999, Duration::ZERO).await;
        // What an idle `run` costs the source: its transactions (each an
        // empty look) over 10 quiet seconds, as PostgreSQL counts them
        // (statistics reach the counters within about a second).
        let transactions = "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = current_database()";
        let before: i64 = sqlx::query_scalar(transactions).fetch_one(&pool).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle_tps = (sqlx::query_scalar::<_, i64>(transactions).fetch_one(&pool).await.unwrap() - before) as f64 / 10.0;
        let mut quiet = Vec::new();
        for (i, spell) in [Duration::from_millis(50), Duration::from_secs(3)].into_iter().enumerate() {
            let mut took = Vec::new();
            for n in 0..9 {
                took.push(after_quiet(&pool, &ch, -1000 * (i as i64 + 1) - n, spell).await);
            }
            took.sort();
            quiet.push((spell, took[4], took[8]));
        }
        let mut runs = Vec::new();
        let mut cpu = Vec::new();
        for rate in [2_000u64, 20_000] {
            let before = procs::sample();
            let started = Instant::now();
            runs.push((rate, steady(&env, rate, secs()).await));
            cpu.push((rate, procs::cpu_share(&before, &procs::sample(), started.elapsed())));
        }
        let _ = std::process::Command::new("kill").arg(child.id().to_string()).status();
        let _ = child.wait();
        let pipeline_log = pg2ch::kafka::KafkaLog::open(&client, &env.settings.kafka.topic, Duration::from_secs(10))
            .await
            .unwrap();
        let at = published(&pipeline_log).await;
        // nisshi's fetch slows as a partition holds more batches; the
        // floor that matters is a fetch at the end of the pipeline's own log.
        let mut end_fetch = Duration::ZERO;
        for p in 0..pipeline_log.partitions() {
            let end = pipeline_log.fetch(p, 0, Duration::from_millis(1)).await.unwrap().high_watermark;
            let f = floor(50, async || {
                // A wait costs nothing when the record is there (nisshi
                // answers at once); with a near-zero one it sometimes
                // answers empty under load.
                assert!(!pipeline_log.fetch(p, end - 1, Duration::from_millis(500)).await.unwrap().records.is_empty());
            })
            .await;
            end_fetch = end_fetch.max(f);
        }
        let results: Vec<_> = runs
            .iter()
            .map(|(rate, l)| {
                let (to_publish, to_ch) = split(l, &at);
                (*rate, pct(l, 0.5).latency, pct(l, 0.99).latency, l.last().unwrap().latency, l.len(), to_publish, to_ch)
            })
            .collect();
        let slow = std::fs::read_to_string(&log).unwrap_or_default().matches("slow statement").count();

        println!("\n| stage floor (median of 200) | time |\n|---|---:|");
        for (name, d) in [
            ("PostgreSQL: flag update of one row, committed", flag),
            ("broker: produce one record, acknowledged", produce),
            ("broker: fetch one available record", fetch),
            ("ClickHouse: insert one row", insert),
        ] {
            println!("| {name} | {d:.1?} |");
        }
        println!("| sum of the floors | {floors:.1?} |");
        println!(
            "| broker: a 200 ms fetch answered after a record produced 20 ms into it (median of 21; 20 ms would be at once) | {woken:.1?} |"
        );
        println!(
            "| broker: fetch the newest record of the pipeline's own topic after the run (slowest partition) | {end_fetch:.1?} |"
        );
        println!("\nan idle `pg2ch run` (one table, two producer lanes, `--poll-ms {poll}`): about {idle_tps:.0} transactions/s on the source");
        println!("\n| one row after a quiet spell of | p50 of 9 | max of 9 |\n|---:|---:|---:|");
        for (spell, p50, max) in &quiet {
            println!("| {spell:?} | {p50:.1?} | {max:.1?} |");
        }
        println!("\n`pg2ch run` logged {slow} slow statements (over 1 s); its log: {}", log.display());
        println!(
            "\n| rate | rows | p50 | p99 | max | commit to published, p50 / p99 | published to readable, p50 / p99 |\n|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (rate, p50, p99, max, n, (pp50, pp99), (cp50, cp99)) in &results {
            println!(
                "| {rate} rows/s | {n} | {p50:.1?} | {p99:.1?} | {max:.1?} | {pp50:.0?} / {pp99:.0?} | {cp50:.0?} / {cp99:.0?} |"
            );
        }
        println!(
            "\nCPU while each rate ran (one core = 100%; this machine has 2), and how long each process's \
             threads waited, runnable, for a CPU (ms per second):\n"
        );
        for (rate, shares) in &cpu {
            let top: Vec<String> = shares
                .iter()
                .take(6)
                .map(|(name, pct, waited)| format!("{name} {pct:.0}% (waited {waited:.0} ms/s)"))
                .collect();
            let total: f64 = shares.iter().map(|(_, p, _)| p).sum();
            println!("- {rate} rows/s: {} (all processes: {total:.0}%)", top.join(", "));
        }
        for (rate, _, p99, ..) in &results {
            let goal = if *rate == 2_000 { Duration::from_millis(50) } else { Duration::from_millis(100) };
            println!(
                "goal at {rate} rows/s: p99 {p99:.1?} <= {goal:?}: {}; <= 1.5 x floors ({:.1?}): {}",
                *p99 <= goal,
                floors.mul_f64(1.5),
                *p99 <= floors.mul_f64(1.5)
            );
        }
    });
}
