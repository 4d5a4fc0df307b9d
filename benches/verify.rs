//! `pg2ch verify` at size, when the two sides agree and when ten rows differ,
//! against the floor of each side measured in the same run: PostgreSQL
//! checksumming the whole table in one query, and ClickHouse's `FINAL` rows
//! streamed through pg2ch's checksum. Tables are loaded directly on both
//! sides with identical content (untimed), at `PG2CH_BENCH_VERIFY_ROWS`
//! (default 10,000,000) rows and a tenth of that; the peak RSS of every
//! `verify` process is reported for both sizes.
//!
//! Goals: at least 2M rows/s at 10M rows when the sides agree,
//! and at most 64 MB peak RSS at any size.
//!
//! Then, at the larger size, what reading the ClickHouse table through
//! `<table>_current` (`FINAL`, deleted keys left out) costs against a plain
//! `SELECT` of the table, for a scan and for a lookup by key: alternating
//! pairs, the median of each, first with the table merged into one part,
//! then with a tenth of the keys written again (a hundredth deleted) in a
//! part of their own, as a running pipeline leaves it between merges.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::TestEnv;
use criterion::{Criterion, SamplingMode, Throughput};
use pg2ch::clickhouse::verify::ChVerifySide;
use pg2ch::verify::{KeyRange, SinkSide};
use tokio::runtime::Runtime;

/// Per stage: rows and seconds, summed over the timed iterations.
static TOTALS: Mutex<BTreeMap<String, (f64, f64)>> = Mutex::new(BTreeMap::new());
/// Per table size: the peak RSS of each `verify` process, in MB.
static RSS_MB: Mutex<BTreeMap<u64, Vec<u64>>> = Mutex::new(BTreeMap::new());

const PG_FLOOR: &str = "PostgreSQL alone: checksum of the whole table, one query";
const CH_FLOOR: &str = "ClickHouse alone: FINAL rows streamed and checksummed by pg2ch";
const AGREE: &str = "pg2ch verify, sides agree";
const TEN_DIFFER: &str = "pg2ch verify, ten rows differ";

fn rows() -> u64 {
    std::env::var("PG2CH_BENCH_VERIFY_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000)
}

fn record(name: String, rows: u64, took: Duration) {
    let mut totals = TOTALS.lock().unwrap();
    let e = totals.entry(name).or_default();
    e.0 += rows as f64;
    e.1 += took.as_secs_f64();
}

/// The same `n` rows in PostgreSQL (flagged sent) and in ClickHouse (merged).
async fn load(n: u64) -> TestEnv {
    let env = TestEnv::new("benchverify").await;
    assert!(env.run(&["init", "--partitions", "4"]).status.success());
    let pool = env.pg().await;
    // `$1` binds the row count; the content is a function of the id on both sides.
    sqlx::query(
        "INSERT INTO user_logins (id, username, event_time, sent_to_kafka)
         SELECT g, 'user_' || g, timestamptz '2023-11-14 22:13:20+00' + g * interval '1 millisecond', TRUE
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(n as i64)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE user_logins").execute(&pool).await.unwrap();
    load_clickhouse(&env, n).await;
    env
}

/// The same `n` rows in ClickHouse alone, merged into one part.
async fn load_clickhouse(env: &TestEnv, n: u64) {
    let ch = env.ch().await;
    ch.client
        .query(
            "INSERT INTO user_logins (id, username, event_time_us, _pg2ch_version, _pg2ch_deleted)
             SELECT toInt64(number + 1), concat('user_', toString(number + 1)), toInt64(1700000000000000 + (number + 1) * 1000), 0, 0
             FROM system.numbers LIMIT ?",
        )
        .bind(n)
        .execute()
        .await
        .unwrap();
    ch.client.query("OPTIMIZE TABLE user_logins FINAL").execute().await.unwrap();
}

/// One `pg2ch verify` process; its exit code must be `expect`.
fn verify(env: &TestEnv, n: u64, expect: i32) -> Duration {
    let t = Instant::now();
    let out = env.run(&["verify"]);
    let took = t.elapsed();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(expect), "{}\n{log}", String::from_utf8_lossy(&out.stdout));
    let mb = log.split("peak RSS ").nth(1).and_then(|s| s.split(' ').next()).and_then(|s| s.parse().ok());
    RSS_MB.lock().unwrap().entry(n).or_default().push(mb.expect("verify logs its peak RSS"));
    took
}

fn bench_size(c: &mut Criterion, rt: &Runtime, n: u64) {
    let env = rt.block_on(load(n));
    let schema = rt.block_on(env.logins());
    let mut g = c.benchmark_group(format!("verify {n} rows"));
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(n));
    g.bench_function(PG_FLOOR, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let pool = env.pg().await;
                let mut conn = pool.acquire().await.unwrap();
                sqlx::query("SET jit = off").execute(&mut *conn).await.unwrap();
                let sql = format!("SELECT count(*), sum({})::text FROM user_logins", pg2ch::checksum::row_sql(&schema));
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let (count, _): (i64, String) = sqlx::query_as(&sql).fetch_one(&mut *conn).await.unwrap();
                    total += t.elapsed();
                    assert_eq!(count as u64, n);
                }
                record(format!("{n}: {PG_FLOOR}"), n * iters, total);
                total
            })
        })
    });
    g.bench_function(CH_FLOOR, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut ch = ChVerifySide { ch: env.ch().await, schema: schema.clone() };
                let all = [KeyRange::ALL];
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let summary = ch.summaries(&all).await.unwrap();
                    total += t.elapsed();
                    assert_eq!(summary[0].rows, n);
                }
                record(format!("{n}: {CH_FLOOR}"), n * iters, total);
                total
            })
        })
    });
    g.bench_function(AGREE, |b| {
        b.iter_custom(|iters| {
            let total = (0..iters).map(|_| verify(&env, n, 0)).sum();
            record(format!("{n}: {AGREE}"), n * iters, total);
            total
        })
    });
    // Ten rows changed in PostgreSQL after they were sent, behind pg2ch's
    // back (its trigger off), spread over the table.
    let planted: Vec<i64> = (0..10).map(|k| 1 + k * (n as i64 / 10)).collect();
    let set_names = |suffix: &'static str| {
        let pool = rt.block_on(env.pg());
        rt.block_on(async {
            sqlx::raw_sql("ALTER TABLE user_logins DISABLE TRIGGER pg2ch_unsent").execute(&pool).await.unwrap();
            sqlx::query("UPDATE user_logins SET username = 'user_' || id || $2 WHERE id = ANY($1)")
                .bind(&planted)
                .bind(suffix)
                .execute(&pool)
                .await
                .unwrap();
            sqlx::raw_sql("ALTER TABLE user_logins ENABLE TRIGGER pg2ch_unsent").execute(&pool).await.unwrap();
        });
    };
    set_names("+");
    g.bench_function(TEN_DIFFER, |b| {
        b.iter_custom(|iters| {
            let total = (0..iters).map(|_| verify(&env, n, 1)).sum();
            record(format!("{n}: {TEN_DIFFER}"), n * iters, total);
            total
        })
    });
    set_names("");
    g.finish();
}

/// Seconds of one query, run to the end; its first number is returned too.
async fn timed(ch: &pg2ch::clickhouse::ClickHouse, sql: &str) -> (f64, u64) {
    let t = Instant::now();
    let first: u64 = ch.client.query(sql).fetch_one().await.unwrap();
    (t.elapsed().as_secs_f64(), first)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The cost of reading through the view of current rows against a plain
/// `SELECT` and against `FINAL` on the table itself, per query shape,
/// merged and then with a part of newer rows; the three in turn, median.
fn reading(rt: &Runtime, n: u64) {
    const PAIRS: usize = 7;
    let env = rt.block_on(async {
        let env = TestEnv::new("benchreading").await;
        assert!(env.run(&["init", "--partitions", "1"]).status.success());
        load_clickhouse(&env, n).await;
        env
    });
    let ch = rt.block_on(env.ch());
    let key = format!("id = {}", n / 2);
    let shapes = [("scan: count(), sum(length(username))", None), ("lookup by key", Some(key.as_str()))];
    println!(
        "\n| reading {n} rows | table | plain SELECT ms | FINAL, deleted left out, ms | through user_logins_current ms \
         | view / plain | rows plain, FINAL, view |\n|---|---|---:|---:|---:|---:|---|"
    );
    for state in ["merged, one part", "a tenth of the keys newer in a second part"] {
        if state.starts_with("a tenth") {
            // Keys 1, 11, 21, ...: written again, every tenth of them deleted.
            rt.block_on(
                ch.client
                    .query(
                        "INSERT INTO user_logins (id, username, event_time_us, _pg2ch_version, _pg2ch_deleted)
                         SELECT toInt64(number * 10 + 1), concat('again_', toString(number)), toInt64(1700000000000000),
                                1, toUInt8(number % 10 = 0)
                         FROM system.numbers LIMIT ?",
                    )
                    .bind(n / 10)
                    .execute(),
            )
            .unwrap();
        }
        for (shape, filter) in &shapes {
            let select = "SELECT count() + sum(length(username)) * 0";
            let sqls = [
                format!("{select} FROM user_logins{}", filter.map_or(String::new(), |f| format!(" WHERE {f}"))),
                format!(
                    "{select} FROM user_logins FINAL WHERE _pg2ch_deleted = 0{}",
                    filter.map_or(String::new(), |f| format!(" AND {f}"))
                ),
                format!("{select} FROM user_logins_current{}", filter.map_or(String::new(), |f| format!(" WHERE {f}"))),
            ];
            let mut secs: [Vec<f64>; 3] = Default::default();
            let mut rows = [0; 3];
            for _ in 0..PAIRS {
                for (i, sql) in sqls.iter().enumerate() {
                    let (s, r) = rt.block_on(timed(&ch, sql));
                    secs[i].push(s);
                    rows[i] = r;
                }
            }
            let [plain, fin, view] = secs.map(|v| median(v) * 1000.0);
            println!(
                "| {shape} | {state} | {plain:.1} | {fin:.1} | {view:.1} | {:.1} | {}, {}, {} |",
                view / plain,
                rows[0],
                rows[1],
                rows[2]
            );
        }
    }
}

fn main() {
    let rt = Runtime::new().unwrap();
    let n = rows();
    // `PG2CH_BENCH_VERIFY_PART=reading` (or `verify`) runs one part alone.
    let part = std::env::var("PG2CH_BENCH_VERIFY_PART").unwrap_or_default();
    if part != "verify" {
        reading(&rt, n);
    }
    if part == "reading" {
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    for size in [n / 10, n] {
        bench_size(&mut c, &rt, size);
    }
    c.final_summary();

    let totals = TOTALS.lock().unwrap();
    let rate = |name: String| totals.get(&name).map_or(f64::NAN, |(rows, secs)| rows / secs);
    println!("\n| verify stage | rows/s | vs PostgreSQL alone |\n|---|---:|---:|");
    for size in [n / 10, n] {
        let floor = rate(format!("{size}: {PG_FLOOR}"));
        for stage in [PG_FLOOR, CH_FLOOR, AGREE, TEN_DIFFER] {
            let r = rate(format!("{size}: {stage}"));
            println!("| {size} rows: {stage} | {r:.0} | {:.2} |", r / floor);
        }
    }
    let rss = RSS_MB.lock().unwrap();
    for (size, mbs) in rss.iter() {
        println!(
            "| {size} rows: peak RSS of `pg2ch verify` (max of {}) | {} MB | |",
            mbs.len(),
            mbs.iter().max().unwrap()
        );
    }
    let agree = rate(format!("{n}: {AGREE}"));
    let peak = rss.values().flatten().copied().max().unwrap_or(0);
    println!(
        "goals: verify at {n} rows {agree:.0} rows/s (>= 2,000,000: {}); peak RSS {peak} MB (<= 64: {})",
        agree >= 2_000_000.0,
        peak <= 64
    );
}
