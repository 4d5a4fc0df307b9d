//! Stage ceilings and end-to-end figures on the real services.
//!
//! Every figure is measured in this run, on this machine, against the same
//! table, so the ratios mean something: the end-to-end drain is reported as a
//! fraction of PostgreSQL's own bulk `UPDATE ... SET sent_to_kafka = TRUE`
//! of the same rows (in a session of pg2ch's own, which its triggers skip as
//! they skip the producers' flag updates), run just before each drain; the goal is judged on the
//! median of those pairs. The drain runs as `run --once --exclusive` (claims
//! without row locks); the default, shared claims, is measured beside it.
//! Rows per benchmark: `PG2CH_BENCH_ROWS` (default 1,000,000). Each timed
//! iteration starts from the same state (flags reset and the table rewritten
//! in id order, untimed); every end-to-end run must end with `verify` OK.
//! `PG2CH_BENCH_ONLY=consumers` runs only one versus two consumer processes;
//! `PG2CH_BENCH_ONLY=wide` only the 20-column drain.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::TestEnv;
use criterion::{Criterion, SamplingMode, Throughput};
use pg2ch::change::{self, Change};
use pg2ch::kafka::Compression;
use pg2ch::pipeline::{NoFaults, Producer, ProducerConfig};
use pg2ch::schema::TableSchema;
use pg2ch::stores::{EventLog, Fetched, LogRecord, Sink};
use pg2ch::types::Value;
use tokio::runtime::Runtime;

/// Per stage: rows moved and seconds taken, summed over the timed iterations.
static TOTALS: Mutex<BTreeMap<&'static str, (f64, f64)>> = Mutex::new(BTreeMap::new());
static RSS_MB: Mutex<Vec<u64>> = Mutex::new(Vec::new());
/// Per drain: its seconds and those of the bulk UPDATE run just before it.
static PAIRS: Mutex<Vec<(&'static str, f64, f64)>> = Mutex::new(Vec::new());

const DRAIN: &str = "end to end: drain backlog (run --once --exclusive, verify OK)";
const DRAIN_SHARED: &str = "end to end: drain backlog, shared claims (run --once, verify OK)";
const DRAIN_WIDE: &str = "end to end: drain backlog of 20-column rows (run --once, verify OK)";
const CONSUME_ONE: &str = "consumers: backlog in the topic, one `consume --once` process";
const CONSUME_TWO: &str = "consumers: the same backlog, two `consume --once` processes of one group";
const PAIRED_BULK: &str = "PostgreSQL bulk UPDATE, just before each drain";

fn rows() -> u64 {
    std::env::var("PG2CH_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}

fn record(name: &'static str, rows: u64, took: Duration) {
    let mut totals = TOTALS.lock().unwrap();
    let e = totals.entry(name).or_default();
    e.0 += rows as f64;
    e.1 += took.as_secs_f64();
}

/// Runs `iters` iterations of `work`, each after an untimed `prepare` whose
/// output it receives; records the timings as `name` and returns their sum.
fn timed<T>(
    rt: &Runtime,
    iters: u64,
    name: &'static str,
    rows: u64,
    mut prepare: impl AsyncFnMut() -> T,
    mut work: impl AsyncFnMut(T),
) -> Duration {
    rt.block_on(async {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let input = prepare().await;
            let t = Instant::now();
            work(input).await;
            let took = t.elapsed();
            record(name, rows, took);
            total += took;
        }
        total
    })
}

/// A log that accepts and forgets, to time PostgreSQL alone.
struct NullLog;
impl EventLog for NullLog {
    fn partitions(&self) -> i32 {
        4
    }
    async fn append(&self, _: i32, _: Vec<LogRecord>) -> pg2ch::stores::StoreResult<()> {
        Ok(())
    }
    async fn fetch(&self, _: i32, _: i64, _: Duration) -> pg2ch::stores::StoreResult<Fetched> {
        Ok(Fetched::default())
    }
    async fn record_at(&self, _: i32, _: i64) -> pg2ch::stores::StoreResult<Option<pg2ch::stores::FetchedRecord>> {
        Ok(None)
    }
    async fn dead_letter(&self, _: Vec<pg2ch::stores::DeadLetter>) -> pg2ch::stores::StoreResult<()> {
        Ok(())
    }
}

/// Every row unsent, and the table rewritten in id order with fresh
/// indexes: physically the table as it was just after seeding, every time.
/// (Resetting with a plain VACUUM instead leaves the heap a little different
/// after each round, and a bulk UPDATE's speed drifts with it by up to 20%.)
async fn reset_flags(env: &TestEnv, table: &str) {
    let pool = env.pg_own().await;
    for sql in [
        format!("UPDATE {table} SET sent_to_kafka = FALSE"),
        format!("CLUSTER {table} USING {table}_pkey"),
        format!("ANALYZE {table}"),
    ] {
        sqlx::query(&sql).execute(&pool).await.unwrap();
    }
}

/// The wide table: 20 columns of the types a typical business table has.
const WIDE: &str = "CREATE TABLE wide (
    id bigint PRIMARY KEY, account bigint NOT NULL, region smallint NOT NULL, status text NOT NULL,
    sku varchar(32) NOT NULL, quantity integer NOT NULL, price numeric(12,2) NOT NULL, discount real,
    total double precision NOT NULL, currency char(3) NOT NULL, paid boolean NOT NULL,
    ordered_on date NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz,
    customer uuid NOT NULL, email text, note text, tags text[], attributes jsonb, ip inet)";

/// Fills `wide` with `n` rows, on the server.
const WIDE_ROWS: &str = "INSERT INTO wide SELECT i, i % 100000, (i % 50)::smallint,
    (ARRAY['new','paid','shipped','returned'])[1 + i % 4], 'SKU-' || (i % 9973), (i % 17)::int,
    round((i % 100000) / 7.0, 2), CASE WHEN i % 5 = 0 THEN NULL ELSE (i % 30)::real END,
    (i % 100000) * 1.07, 'EUR', i % 3 = 0, DATE '2020-01-01' + (i % 2000)::int,
    TIMESTAMPTZ '2020-01-01 00:00:00+00' + i * INTERVAL '1 second',
    CASE WHEN i % 2 = 0 THEN now() END, md5(i::text)::uuid, 'user' || i || '@example.com',
    CASE WHEN i % 10 = 0 THEN repeat('note ', 20) END, ARRAY['a' || (i % 7), 'b' || (i % 11)],
    jsonb_build_object('channel', i % 3, 'promo', i % 2 = 0), ('10.' || (i % 256) || '.0.1')::inet
    FROM generate_series(1, $1) AS i";

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    n: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(n));
    g
}

fn postgres_stages(c: &mut Criterion, rt: &Runtime, env: &TestEnv, n: u64) {
    let mut g = group(c, "postgres", n);
    g.bench_function("bulk_update (reference ceiling)", |b| {
        b.iter_custom(|iters| {
            timed(
                rt,
                iters,
                "PostgreSQL bulk UPDATE (reference)",
                n,
                async || {
                    reset_flags(env, "user_logins").await;
                    env.pg_own().await
                },
                async |pool| {
                    sqlx::query("UPDATE user_logins SET sent_to_kafka = TRUE").execute(&pool).await.unwrap();
                },
            )
        })
    });
    // Claims take no row locks in either mode: one figure.
    let (bench, name) = ("claim_and_mark (10k batches, 1 lane, no broker)", "PostgreSQL claim + mark, 10k batches");
    {
        g.bench_function(bench, |b| {
            b.iter_custom(|iters| {
                timed(
                    rt,
                    iters,
                    name,
                    n,
                    async || {
                        reset_flags(env, "user_logins").await;
                        let (_, table) = pg2ch::commands::single_table(&env.settings).await.unwrap();
                        let options =
                            pg2ch::postgres::connect_options(&env.settings.pg, &pg2ch::postgres::PRODUCER_SETTINGS);
                        let source = pg2ch::postgres::PgSource::new(
                            table.schema.clone(),
                            table.oid,
                            options,
                            Duration::from_secs(60),
                            table.fingerprint.clone(),
                        );
                        Producer::new(table.schema, source, NullLog, ProducerConfig::default())
                    },
                    async |mut producer| assert_eq!(producer.drain(&NoFaults).await.unwrap() as u64, n),
                )
            })
        });
    }
    g.finish();
}

fn sample_rows(n: u64) -> Vec<Change> {
    (1..=n as i64)
        .map(|i| {
            Change::upsert(
                vec![
                    Value::Int(i),
                    Value::Text(format!("user_{}", i % 100_000)),
                    Value::Timestamp(753_315_200_000_000 + i),
                ],
                1,
            )
        })
        .collect()
}

/// The 4-partition topic `name` on the bench's broker (created if missing).
async fn open_topic(env: &TestEnv, name: &str) -> pg2ch::kafka::KafkaLog {
    let client = pg2ch::kafka::connect(&env.settings.kafka, Duration::from_secs(10)).await.unwrap();
    pg2ch::kafka::ensure_topic(&client, name, 4, 1, Duration::from_secs(10)).await.unwrap();
    pg2ch::kafka::KafkaLog::open(&client, name, Duration::from_secs(60)).await.unwrap()
}

fn broker_and_clickhouse_stages(
    c: &mut Criterion,
    rt: &Runtime,
    env: &TestEnv,
    schema: &std::sync::Arc<TableSchema>,
    n: u64,
) {
    let rows = sample_rows(n);
    let records: Vec<LogRecord> = rows
        .iter()
        .map(|r| LogRecord { key: change::key_bytes(schema, r), value: change::encode(schema, r) })
        .collect();
    let mut g = group(c, "broker", n);
    // Compressed requests cost CPU here and save bytes on the wire and in
    // the broker; on loopback only the cost shows, so each codec is measured
    // against no compression in the same run.
    for (codec, compression, produce, fetch) in [
        ("", Compression::NoCompression, "broker produce", "broker fetch"),
        (", lz4", Compression::Lz4, "broker produce, lz4", "broker fetch, lz4"),
        (", zstd", Compression::Zstd, "broker produce, zstd", "broker fetch, zstd"),
    ] {
        let topic = std::sync::Mutex::new(String::new());
        g.bench_function(format!("produce (4 partitions, 10k-record requests{codec})"), |b| {
            b.iter_custom(|iters| {
                timed(
                    rt,
                    iters,
                    produce,
                    n,
                    async || {
                        let name = format!("{}_produce_{}", env.name, rand::random::<u32>());
                        let log = open_topic(env, &name).await.with_compression(compression);
                        *topic.lock().unwrap() = name; // the fetch benchmark reads it back
                        log
                    },
                    async |log| {
                        let per_partition = records.chunks(records.len().div_ceil(4));
                        futures::future::try_join_all(per_partition.enumerate().map(|(p, part)| {
                            let log = &log;
                            async move {
                                for chunk in part.chunks(10_000) {
                                    log.append(p as i32, chunk.to_vec()).await?;
                                }
                                anyhow::Ok(())
                            }
                        }))
                        .await
                        .unwrap();
                    },
                )
            })
        });
        g.bench_function(format!("fetch (4 partitions from offset 0{codec})"), |b| {
            b.iter_custom(|iters| {
                timed(
                    rt,
                    iters,
                    fetch,
                    n,
                    async || {
                        let name = topic.lock().unwrap().clone();
                        open_topic(env, &name).await
                    },
                    async |log| {
                        let mut got = 0u64;
                        for p in 0..4 {
                            let mut offset = 0;
                            loop {
                                let f = log.fetch(p, offset, Duration::from_millis(1)).await.unwrap();
                                got += f.records.iter().filter(|r| r.offset >= offset).count() as u64;
                                offset = f.records.last().map_or(offset, |r| r.offset + 1);
                                if offset >= f.high_watermark {
                                    break;
                                }
                            }
                        }
                        assert_eq!(got, n);
                    },
                )
            })
        });
    }
    g.finish();

    let mut g = group(c, "clickhouse", n);
    g.bench_function("insert (100k-row RowBinary inserts)", |b| {
        b.iter_custom(|iters| {
            timed(
                rt,
                iters,
                "ClickHouse insert",
                n,
                async || pg2ch::clickhouse::ChSink {
                    ch: env.ch().await,
                    schema: schema.clone(),
                    group: "bench".into(),
                    topic: "bench".into(),
                },
                async |mut sink| {
                    for chunk in rows.chunks(100_000) {
                        sink.write(chunk).await.unwrap();
                    }
                },
            )
        })
    });
    g.finish();
}

fn end_to_end(c: &mut Criterion, rt: &Runtime, env: &TestEnv, n: u64, wide: u64) {
    let mut g = group(c, "end_to_end", n);
    g.bench_function("drain backlog (pg2ch run --once --exclusive)", |b| {
        b.iter_custom(|iters| (0..iters).map(|i| drain(rt, env, "user_logins", n, i, &["--exclusive"], DRAIN)).sum())
    });
    g.bench_function("drain backlog, shared claims (pg2ch run --once)", |b| {
        b.iter_custom(|iters| (0..iters).map(|i| drain(rt, env, "user_logins", n, i, &[], DRAIN_SHARED)).sum())
    });
    g.finish();
    end_to_end_wide(c, rt, env, wide);
}

fn end_to_end_wide(c: &mut Criterion, rt: &Runtime, env: &TestEnv, wide: u64) {
    let mut g = group(c, "end_to_end_wide", wide);
    g.bench_function("drain backlog of 20-column rows (pg2ch run --once --table wide)", |b| {
        b.iter_custom(|iters| (0..iters).map(|i| drain(rt, env, "wide", wide, i, &[], DRAIN_WIDE)).sum())
    });
    g.finish();
}

/// One timed `pg2ch run --once` over the whole backlog, on a fresh topic,
/// after an untimed bulk UPDATE that is its reference; checks `verify`.
fn drain(rt: &Runtime, env: &TestEnv, table: &str, n: u64, i: u64, args: &[&str], name: &'static str) -> Duration {
    // The reference for the drain goal is measured right before each drain,
    // from the same starting state: this machine's speed wanders by 20% over
    // minutes, so a reference taken long before would not compare like with
    // like. The goal is judged on the median of these per-pair ratios.
    let bulk = rt.block_on(async {
        reset_flags(env, table).await;
        let pool = env.pg_own().await;
        let t = Instant::now();
        sqlx::query(&format!("UPDATE {table} SET sent_to_kafka = TRUE")).execute(&pool).await.unwrap();
        t.elapsed()
    });
    if table == "user_logins" {
        record(PAIRED_BULK, n, bulk);
    }
    rt.block_on(reset_flags(env, table));
    // A fresh topic, so the consumer starts from offset 0.
    let topic = format!("{}_drain_{}_{i}", env.name, rand::random::<u32>());
    let out = env.command(&["init", "--table", table]).env("KAFKA_TOPIC", &topic).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = Instant::now();
    let out = env
        .command(&[&["run", "--once", "--table", table], args].concat())
        .env("KAFKA_TOPIC", &topic)
        .output()
        .unwrap();
    let took = t.elapsed();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    if let Some(mb) = log.split("peak RSS ").nth(1).and_then(|s| s.split(' ').next()).and_then(|s| s.parse().ok()) {
        RSS_MB.lock().unwrap().push(mb);
    }
    let verify = env.command(&["verify", "--table", table]).env("KAFKA_TOPIC", &topic).output().unwrap();
    assert!(verify.status.success(), "verify after the drain: {}", String::from_utf8_lossy(&verify.stdout));
    record(name, n, took);
    PAIRS.lock().unwrap().push((name, bulk.as_secs_f64(), took.as_secs_f64()));
    took
}

/// Median, lowest and highest of drain rate / bulk UPDATE rate over the
/// pairs of one drain benchmark.
fn paired_ratio(name: &str) -> (f64, f64, f64, usize) {
    let mut ratios: Vec<f64> =
        PAIRS.lock().unwrap().iter().filter(|(n, ..)| *n == name).map(|(_, bulk, drain)| bulk / drain).collect();
    if ratios.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, 0);
    }
    ratios.sort_by(f64::total_cmp);
    (ratios[ratios.len() / 2], ratios[0], ratios[ratios.len() - 1], ratios.len())
}

/// The same backlog of records in one topic (published once, untimed),
/// written to ClickHouse by one `pg2ch consume --once` process, then by two
/// processes of one group sharing the partitions through their leases; each
/// round on a fresh group, so both start from offset 0. Returns the median
/// of the rounds' ratios (two processes' rate over one's), with the rounds.
fn consumer_scaling(rt: &Runtime, env: &TestEnv, n: u64) -> (f64, Vec<(Duration, Duration)>) {
    let topic = format!("{}_scale_{}", env.name, rand::random::<u32>());
    let init = env.command(&["init", "--partitions", "4"]).env("KAFKA_TOPIC", &topic).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    rt.block_on(reset_flags(env, "user_logins"));
    let produce = env.command(&["produce", "--once", "--exclusive"]).env("KAFKA_TOPIC", &topic).output().unwrap();
    assert!(produce.status.success(), "{}", String::from_utf8_lossy(&produce.stderr));
    let consume = |group: &str, processes: usize| {
        let t = Instant::now();
        let children: Vec<_> = (0..processes)
            .map(|_| {
                env.command(&["consume", "--once"])
                    .env("KAFKA_TOPIC", &topic)
                    .env("KAFKA_GROUP", group)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let took = t.elapsed();
        record(if processes == 1 { CONSUME_ONE } else { CONSUME_TWO }, n, took);
        took
    };
    let rounds: Vec<(Duration, Duration)> = (0..3)
        .map(|i| {
            let one = consume(&format!("scale_one_{i}"), 1);
            let two = consume(&format!("scale_two_{i}"), 2);
            (one, two)
        })
        .collect();
    let mut ratios: Vec<f64> = rounds.iter().map(|(one, two)| one.as_secs_f64() / two.as_secs_f64()).collect();
    ratios.sort_by(f64::total_cmp);
    (ratios[ratios.len() / 2], rounds)
}

/// Rows inserted at a constant 2,000/s while `pg2ch run` runs; the latency
/// of a batch is from its INSERT's commit to its ids being visible in ClickHouse.
fn steady_state_latency(rt: &Runtime, env: &TestEnv) -> (Duration, Duration, usize) {
    rt.block_on(async {
        let topic = format!("{}_steady", env.name);
        assert!(env.command(&["init"]).env("KAFKA_TOPIC", &topic).output().unwrap().status.success());
        let mut child = env
            .command(&["run", "--poll-ms", "50"])
            .env("KAFKA_TOPIC", &topic)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pool = env.pg().await;
        let ch = env.ch().await;
        let mut sent: Vec<(i64, Instant)> = Vec::new();
        let mut latencies = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let started = Instant::now();
        let mut seen_max = 0i64;
        while started.elapsed() < Duration::from_secs(10) || (!sent.is_empty() && started.elapsed() < Duration::from_secs(30)) {
            if started.elapsed() < Duration::from_secs(10) {
                tick.tick().await;
                let max: i64 = sqlx::query_scalar(
                    "WITH ins AS (INSERT INTO user_logins (username, event_time) SELECT 'steady', now() FROM generate_series(1, 100) RETURNING id) SELECT max(id) FROM ins",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                sent.push((max, Instant::now()));
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen_max = seen_max.max(ch.client.query("SELECT max(id) FROM user_logins").fetch_one::<i64>().await.unwrap());
            sent.retain(|(id, at)| {
                if *id <= seen_max {
                    latencies.push(at.elapsed());
                    false
                } else {
                    true
                }
            });
        }
        let _ = std::process::Command::new("kill").arg(child.id().to_string()).status();
        let _ = child.wait();
        assert!(sent.is_empty(), "{} batches never reached ClickHouse", sent.len());
        latencies.sort();
        let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        (pct(0.5), pct(0.99), latencies.len())
    })
}

fn main() {
    let rt = Runtime::new().unwrap();
    let n = rows();
    let wide = n / 4;
    let only = std::env::var("PG2CH_BENCH_ONLY").ok();
    let env = rt.block_on(async {
        let env = TestEnv::new("bench").await;
        assert!(env.run(&["init", "--partitions", "4"]).status.success());
        let pool = env.pg().await;
        if only.as_deref() != Some("wide") {
            pg2ch::postgres::seed(&pool, n, 10_000, |_| {}).await.unwrap();
        }
        if only.as_deref() != Some("consumers") {
            sqlx::query(WIDE).execute(&pool).await.unwrap();
            sqlx::query(WIDE_ROWS).bind(wide as i64).execute(&pool).await.unwrap();
            assert!(env.run(&["init", "--table", "wide", "--partitions", "4"]).status.success());
        }
        env
    });
    if only.as_deref() == Some("consumers") {
        // Just the consumer scaling figure (a minute or two at 1M rows).
        let (scaling, rounds) = consumer_scaling(&rt, &env, n);
        println!("consumers of one group, two processes' rate over one's on {n} records: {scaling:.2} ({rounds:.1?})");
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    if only.as_deref() == Some("wide") {
        // Just the 20-column drain against its paired bulk UPDATEs.
        end_to_end_wide(&mut c, &rt, &env, wide);
        let (ratio, low, high, pairs) = paired_ratio(DRAIN_WIDE);
        println!(
            "{wide} 20-column rows: drain / bulk UPDATE just before it {ratio:.2} ({low:.2} to {high:.2}, {pairs} pairs)"
        );
        return;
    }
    let schema = rt.block_on(env.logins());
    postgres_stages(&mut c, &rt, &env, n);
    broker_and_clickhouse_stages(&mut c, &rt, &env, &schema, n);
    end_to_end(&mut c, &rt, &env, n, wide);
    let (p50, p99, batches) = steady_state_latency(&rt, &env);
    let (scaling, rounds) = consumer_scaling(&rt, &env, n);
    c.final_summary();

    let figures: BTreeMap<&str, f64> =
        TOTALS.lock().unwrap().iter().map(|(k, (rows, secs))| (*k, rows / secs)).collect();
    let reference = figures.get("PostgreSQL bulk UPDATE (reference)").copied().unwrap_or(f64::NAN);
    println!("\n| stage ({n} rows) | rows/s | vs PostgreSQL bulk UPDATE |\n|---|---:|---:|");
    for (name, rate) in figures.iter() {
        if *name == DRAIN || *name == DRAIN_SHARED || *name == DRAIN_WIDE {
            // Judged against the bulk UPDATE just before each drain, not the
            // reference measured minutes earlier (see `drain`).
            println!("| {name} | {:.0} | {:.2} (median of pairs) |", rate, paired_ratio(name).0);
        } else {
            println!("| {name} | {:.0} | {:.2} |", rate, rate / reference);
        }
    }
    let rss = RSS_MB.lock().unwrap().iter().copied().max().unwrap_or(0);
    println!("| peak RSS of `pg2ch run --once` | {rss} MB | |");
    println!("| steady state, 2,000 rows/s: latency p50 / p99 ({batches} batches of 100) | {p50:.0?} / {p99:.0?} | |");
    let (drain, low, high, pairs) = paired_ratio(DRAIN);
    let (shared, shared_low, shared_high, shared_pairs) = paired_ratio(DRAIN_SHARED);
    let (wide_ratio, wide_low, wide_high, wide_pairs) = paired_ratio(DRAIN_WIDE);
    println!(
        "\ndrain / bulk UPDATE just before it, median over pairs: exclusive {drain:.2} ({low:.2} to {high:.2}, \
         {pairs} pairs), shared claims {shared:.2} ({shared_low:.2} to {shared_high:.2}, {shared_pairs} pairs), \
         {wide} 20-column rows {wide_ratio:.2} ({wide_low:.2} to {wide_high:.2}, {wide_pairs} pairs)"
    );
    println!(
        "consumers of one group, two processes' rate over one's on the same backlog (median of {} rounds, \
         this machine has two cores for pg2ch, the broker and ClickHouse together): {scaling:.2} ({rounds:.1?})",
        rounds.len()
    );
    println!(
        "goals: default (shared) drain/bulk {shared:.2} >= 0.9: {}; exclusive {drain:.2} at least that: {}; \
         peak RSS {rss} MB (< 150: {}); p99 {p99:.0?} (< 1 s: {})",
        shared >= 0.9,
        drain >= shared.min(0.9),
        rss < 150,
        p99 < Duration::from_secs(1)
    );
}
