//! What pg2ch costs a busy source database: pgbench's TPC-B-like script on
//! two databases of one PostgreSQL, one whose three keyed tables
//! (`pgbench_accounts`, `pgbench_branches`, `pgbench_tellers`) a running
//! `pg2ch run` carries, one without pg2ch, run in alternating pairs
//! (without, then with). PostgreSQL, pgbench and every PostgreSQL session
//! run on CPU 0; pg2ch, the broker, ClickHouse and this program on CPU 1, so
//! the figures are the database's own cost, not a fight for cores.
//!
//! Per run: transactions per second and average latency (pgbench's own
//! figures), WAL per transaction (the cluster's WAL position before and
//! after, over the transactions pgbench counted). Over all runs: how much
//! the tables (with indexes, and pg2ch's outboxes) grew, and in which part
//! (the tables' own pages, their indexes, pg2ch's tables). The ratios (with
//! pg2ch over without) are the medians of the pairs. Freshness under that
//! load: every 100 ms during the runs with pg2ch, a marker is written into a
//! teller's `filler`, and ClickHouse is asked every 10 ms which marker it
//! holds (without waiting for the last answer; how long the answers took is
//! printed); a marker's time is from its commit to the sending of the first
//! query whose answer holds it (or a later marker), split at its publish: the timestamp of the first
//! record in the tellers' topic that holds it or a later marker.
//! Also printed: the share of the tables' updates that were HOT (no new
//! index entries), with pg2ch (its flag updates included) and without. At
//! the end, `pg2ch verify` must exit 0.
//!
//! Knobs: `PG2CH_BENCH_SCALE` (pgbench's scale, default 5),
//! `PG2CH_BENCH_PGBENCH_SECS` (each run, default 15), `PG2CH_BENCH_PAIRS`
//! (default 3), `PG2CH_BENCH_RUN_ARGS` (more arguments to `pg2ch run`, e.g.
//! `--coalesce-ms 50`).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/polls.rs"]
mod polls;
#[path = "support/topic.rs"]
mod topic;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::TestEnv;
use sqlx::PgPool;
use tokio::runtime::Runtime;

const TABLES: [&str; 3] = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers"];

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Pins every thread of `pid` to `cpus`.
fn pin(pid: u32, cpus: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset could not pin process {pid} (util-linux's taskset is needed)");
}

/// Pids of the processes whose command name is `name`.
fn pids(name: &str) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-x", name]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// PostgreSQL on CPU 0 (its postmaster first: new sessions inherit it);
/// the rest of the stack and this program on CPU 1.
fn pin_stack(cpus_pg: &str, cpus_rest: &str) {
    for pid in pids("postgres") {
        pin(pid, cpus_pg);
    }
    for name in ["clickhouse-serv", "clickhouse-server", "nisshi", "java"] {
        for pid in pids(name) {
            pin(pid, cpus_rest);
        }
    }
    pin(std::process::id(), cpus_rest);
}

/// One pgbench run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    tps: f64,
    latency_ms: f64,
    wal_per_tx: f64,
}

async fn wal_lsn(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8").fetch_one(pool).await.unwrap()
}

/// The three tables' size, in parts: (the tables themselves, their
/// indexes, pg2ch's own tables where it runs).
#[derive(Debug, Clone, Copy)]
struct Size {
    heap: i64,
    indexes: i64,
    own: i64,
}

impl Size {
    fn total(&self) -> i64 {
        self.heap + self.indexes + self.own
    }
}

async fn size(pool: &PgPool) -> Size {
    let (heap, indexes, own) = sqlx::query_as(
        "SELECT coalesce(sum(pg_table_size(c.oid)), 0)::int8, coalesce(sum(pg_indexes_size(c.oid)), 0)::int8,
                coalesce((SELECT sum(pg_total_relation_size(o.oid)) FROM pg_class o JOIN pg_namespace n
                          ON n.oid = o.relnamespace WHERE n.nspname = '_pg2ch' AND o.relkind = 'r'), 0)::int8
         FROM pg_class c WHERE c.relname = ANY($1) AND c.relkind = 'r'",
    )
    .bind(&TABLES[..])
    .fetch_one(pool)
    .await
    .unwrap();
    Size { heap, indexes, own }
}

fn pgbench(env: &TestEnv, args: &[&str]) -> String {
    let pg = &env.settings.pg;
    let out = Command::new("taskset")
        .args(["-c", "0", "pgbench", "-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user])
        .args(args)
        .arg(&pg.database)
        .env("PGPASSWORD", pg.password.expose())
        .output()
        .expect("pgbench (it ships with PostgreSQL)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

/// The number after `label` on the line that holds it.
fn figure(text: &str, label: &str) -> f64 {
    let line = text.lines().find(|l| l.contains(label)).unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
    let rest = &line[line.find(label).unwrap() + label.len()..];
    rest.split_whitespace().next().and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

async fn one_run(env: &TestEnv, pool: &PgPool, secs: u64) -> Run {
    let before = wal_lsn(pool).await;
    let env2 = env.view(env.settings.clone());
    let secs_s = secs.to_string();
    let text = tokio::task::spawn_blocking(move || pgbench(&env2, &["-n", "-c", "4", "-j", "1", "-T", &secs_s]))
        .await
        .unwrap();
    let after = wal_lsn(pool).await;
    let failed = text.lines().find(|l| l.contains("number of failed transactions")).map(|l| figure(l, ":"));
    assert!(failed.is_none_or(|f| f == 0.0), "pgbench transactions failed:\n{text}");
    let done = figure(&text, "number of transactions actually processed:");
    Run {
        tps: figure(&text, "tps = "),
        latency_ms: figure(&text, "latency average = "),
        wal_per_tx: (after - before) as f64 / done.max(1.0),
    }
}

/// A marker: its number, when its update committed, and its time from
/// commit to readable in ClickHouse.
struct Marker {
    n: i64,
    committed: SystemTime,
    latency: Duration,
}

/// Markers written into a teller's filler every 100 ms until `stop`, and
/// each one's time from commit to readable in ClickHouse (asked every
/// 10 ms, see [`polls`]). Numbered on from `after`, the last marker of an
/// earlier run: a marker counts as readable once ClickHouse holds it or a
/// later one. Also returns the polls' summary line.
async fn freshness(
    env: &TestEnv,
    pool: &PgPool,
    after: i64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<Marker>, String) {
    let ch = env.ch().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(i64, Instant, SystemTime)>();
    let writer = {
        let pool = pool.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut next = after;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tick.tick().await;
                next += 1;
                sqlx::query("UPDATE pgbench_tellers SET filler = $1 WHERE tid = 1")
                    .bind(format!("m{next}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                tx.send((next, Instant::now(), SystemTime::now())).unwrap();
            }
        }
    };
    let reader = async {
        let mut pending: Vec<(i64, Instant, SystemTime)> = Vec::new();
        let mut out = Vec::new();
        let mut writing = true;
        let mut polls = polls::Polls::every(Duration::from_millis(10));
        let mut deadline = None;
        while writing || !pending.is_empty() {
            match polls.next().await {
                polls::Event::Tick => {
                    loop {
                        match rx.try_recv() {
                            Ok(marker) => pending.push(marker),
                            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                                writing = false;
                                break;
                            }
                        }
                    }
                    if !writing
                        && *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(120)) < Instant::now()
                    {
                        break;
                    }
                    if pending.is_empty() {
                        continue;
                    }
                    let query = ch.client.query("SELECT filler FROM pgbench_tellers FINAL WHERE tid = 1");
                    polls.send(async move {
                        query.fetch_one::<Option<String>>().await.expect("reading the marker from ClickHouse")
                    });
                }
                polls::Event::Answer(sent, seen) => {
                    let seen: i64 =
                        seen.as_deref().map(str::trim).and_then(|s| s.strip_prefix('m')?.parse().ok()).unwrap_or(0);
                    // Only markers committed before the query was sent count.
                    pending.retain(|&(n, at, committed)| {
                        if n <= seen && at <= sent {
                            out.push(Marker { n, committed, latency: sent - at });
                            false
                        } else {
                            true
                        }
                    });
                }
            }
        }
        assert!(pending.is_empty(), "{} markers never reached ClickHouse", pending.len());
        (out, polls.summary())
    };
    let ((), found) = tokio::join!(writer, reader);
    found
}

/// When each marker was published: the timestamp (taken by the producer as
/// it publishes, in milliseconds since the epoch) of the first record of
/// the tellers' topic holding it or a later marker (a marker overwritten
/// before a claim saw it is published by the later one, as the probe reads
/// it), by marker number.
async fn published(env: &TestEnv, markers: &[Marker]) -> HashMap<i64, i64> {
    let client = pg2ch::kafka::connect(&env.settings.kafka, Duration::from_secs(10)).await.unwrap();
    let topic = format!("{}.pgbench_tellers", env.settings.kafka.topic);
    let log = pg2ch::kafka::KafkaLog::open(&client, &topic, Duration::from_secs(10)).await.unwrap();
    // The earliest publish of each marker value seen in the topic.
    let mut first: BTreeMap<i64, i64> = BTreeMap::new();
    topic::each_record(&log, |r| {
        let Some(value) = r.value.as_deref() else { return };
        let value: serde_json::Value = serde_json::from_slice(value).unwrap();
        let marker = value["filler"].as_str().map(str::trim).and_then(|f| f.strip_prefix('m')?.parse().ok());
        if let Some(m) = marker {
            let at = first.entry(m).or_insert(r.timestamp_ms);
            *at = (*at).min(r.timestamp_ms);
        }
    })
    .await;
    markers.iter().filter_map(|m| first.range(m.n..).map(|(_, at)| *at).min().map(|at| (m.n, at))).collect()
}

/// Each marker's time split at its publish: (commit to published, published
/// to readable), each sorted.
fn split(markers: &[Marker], published: &HashMap<i64, i64>) -> (Vec<Duration>, Vec<Duration>) {
    let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    let (mut produce, mut consume): (Vec<Duration>, Vec<Duration>) = markers
        .iter()
        .filter_map(|m| {
            let to_publish =
                Duration::from_millis((published.get(&m.n)? - ms(m.committed)).max(0) as u64).min(m.latency);
            Some((to_publish, m.latency - to_publish))
        })
        .unzip();
    produce.sort();
    consume.sort();
    (produce, consume)
}

/// Updates of the three tables since the statistics were reset, and how
/// many of them were HOT (no new index entries).
async fn hot_updates(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(sum(n_tup_upd), 0)::int8, coalesce(sum(n_tup_hot_upd), 0)::int8
         FROM pg_stat_user_tables WHERE relname = ANY($1)",
    )
    .bind(&TABLES[..])
    .fetch_one(pool)
    .await
    .unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rt = Runtime::new().unwrap();
    let scale = knob("PG2CH_BENCH_SCALE", 5);
    let secs = knob("PG2CH_BENCH_PGBENCH_SECS", 15);
    let pairs = knob("PG2CH_BENCH_PAIRS", 3) as usize;
    let extra: Vec<String> =
        std::env::var("PG2CH_BENCH_RUN_ARGS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
    rt.block_on(async {
        let with = TestEnv::new("costwith").await;
        let without = TestEnv::new("costwithout").await;
        let scale_s = scale.to_string();
        for env in [&with, &without] {
            pgbench(env, &["-i", "-q", "-s", &scale_s]);
        }
        let mut table_args = Vec::new();
        for t in TABLES {
            table_args.extend(["--table", t]);
        }
        let init: Vec<&str> = ["init"].into_iter().chain(table_args.iter().copied()).collect();
        with.ok(&init);
        let once: Vec<&str> = ["run", "--once"].into_iter().chain(table_args.iter().copied()).collect();
        with.ok(&once);
        let (pool_with, pool_without) = (with.pg().await, without.pg().await);
        for pool in [&pool_with, &pool_without] {
            sqlx::query("VACUUM ANALYZE").execute(pool).await.unwrap();
        }
        sqlx::query("CHECKPOINT").execute(&pool_with).await.unwrap();
        pin_stack("0", "1");
        // pg2ch on CPU 1, started through taskset so that every thread is there.
        let mut run = Command::new("taskset");
        run.args(["-c", "1", env!("CARGO_BIN_EXE_pg2ch"), "run"]).args(&table_args).args(&extra);
        for (k, v) in with.vars() {
            run.env(k, v);
        }
        run.env_remove("PG_PASS_FILE").env_remove("CH_PASS_FILE").stderr(Stdio::null());
        let mut child = run.spawn().expect("pg2ch run");
        let sizes_before = (size(&pool_with).await, size(&pool_without).await);
        for pool in [&pool_with, &pool_without] {
            sqlx::query("SELECT pg_stat_reset()").execute(pool).await.unwrap();
        }
        let mut rounds = Vec::new();
        let mut fresh = Vec::new();
        let mut polls_seen = Vec::new();
        for _ in 0..pairs {
            let base = one_run(&without, &pool_without, secs).await;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let last = fresh.iter().map(|m: &Marker| m.n).max().unwrap_or(0);
            let probe = freshness(&with, &pool_with, last, stop.clone());
            let measured = async {
                let r = one_run(&with, &pool_with, secs).await;
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                r
            };
            let (carried, (times, polled)) = tokio::join!(measured, probe);
            fresh.extend(times);
            polls_seen.push(polled);
            println!(
                "pair: without {:.0} tps {:.2} ms {:.0} B WAL/tx | with {:.0} tps {:.2} ms {:.0} B WAL/tx",
                base.tps, base.latency_ms, base.wal_per_tx, carried.tps, carried.latency_ms, carried.wal_per_tx
            );
            rounds.push((base, carried));
        }
        let sizes_after = (size(&pool_with).await, size(&pool_without).await);
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        let _ = child.wait();
        // Counted once pg2ch's sessions have ended (a session reports its
        // statistics when it ends, if not before).
        let hot = (hot_updates(&pool_with).await, hot_updates(&pool_without).await);
        pin_stack("0-1", "0-1");
        with.ok(&once);
        let verify: Vec<&str> = ["verify"].into_iter().chain(table_args.iter().copied()).collect();
        with.ok(&verify);

        let ratio = |f: fn(&Run) -> f64| median(rounds.iter().map(|(b, c)| f(c) / f(b)).collect());
        let published = published(&with, &fresh).await;
        let (to_publish, to_readable) = split(&fresh, &published);
        let mut fresh: Vec<Duration> = fresh.iter().map(|m| m.latency).collect();
        fresh.sort();
        let pct = |v: &[Duration], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        let p = |q: f64| pct(&fresh, q);
        let growth_with = (sizes_after.0.total() - sizes_before.0.total()) as f64;
        let growth_without = (sizes_after.1.total() - sizes_before.1.total()).max(1) as f64;
        let mb = |bytes: i64| bytes as f64 / 1e6;
        let parts = |before: Size, after: Size| {
            format!(
                "tables {:.1} MB, indexes {:.1} MB, pg2ch's own {:.1} MB",
                mb(after.heap - before.heap),
                mb(after.indexes - before.indexes),
                mb(after.own - before.own)
            )
        };
        println!("source cost, pgbench TPC-B-like, scale {scale}, 4 clients, {secs} s runs, {pairs} pairs:");
        println!("  transactions per second: {:.2}x of the database without pg2ch", ratio(|r| r.tps));
        println!("  average latency:         {:.2}x", ratio(|r| r.latency_ms));
        println!("  WAL per transaction:     {:.2}x", ratio(|r| r.wal_per_tx));
        println!(
            "  table growth:            {:.2}x ({:.1} MB with, {:.1} MB without)",
            growth_with / growth_without,
            growth_with / 1e6,
            growth_without / 1e6
        );
        println!(
            "    with: {}; without: {}",
            parts(sizes_before.0, sizes_after.0),
            parts(sizes_before.1, sizes_after.1)
        );
        let share = |(all, hot): (i64, i64)| hot as f64 * 100.0 / all.max(1) as f64;
        println!(
            "  HOT updates:             {:.0}% of {} updates with pg2ch (its flags included), {:.0}% of {} without",
            share(hot.0),
            hot.0.0,
            share(hot.1),
            hot.1.0
        );
        println!(
            "  freshness under load:    p50 {:?}, p99 {:?} ({} markers, commit to readable in ClickHouse)",
            p(0.5),
            p(0.99),
            fresh.len()
        );
        if !to_publish.is_empty() {
            println!(
                "    commit to published:   p50 {:?}, p99 {:?}; published to readable: p50 {:?}, p99 {:?} ({} markers found in the topic)",
                pct(&to_publish, 0.5),
                pct(&to_publish, 0.99),
                pct(&to_readable, 0.5),
                pct(&to_readable, 0.99),
                to_publish.len()
            );
        }
        for (i, line) in polls_seen.iter().enumerate() {
            println!("    polls of pair {}: {line}", i + 1);
        }
    });
}
