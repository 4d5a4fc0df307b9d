//! The initial load of a big existing table: `pg2ch init`, then `pg2ch run
//! --once` carrying every row to ClickHouse, against reading the same table
//! once with `COPY … TO` (psql's `\copy` into `/dev/null`), in alternating
//! pairs (read, then load) on a fresh table each pair, for a narrow table
//! (a `bigserial` key, an integer with its own index, a text, a timestamptz)
//! and a 20-column one.
//!
//! Per pair: rows per second of each, the table's size with its indexes
//! after the load over before, the WAL written per carried row (the
//! cluster's WAL position before `init` and after `run --once`, so it holds
//! whatever else the cluster wrote meanwhile: run it on a quiet stack), and
//! the peak RSS `run` reports. The figures are the medians of the pairs; at
//! the end of each pair `pg2ch verify` must exit 0.
//!
//! Where the CPU goes: every process's CPU time around the COPY read and
//! around the load (`support/procs.rs`), by process name, and the rate the
//! machine's cores could reach if pg2ch itself cost nothing (the rows over
//! the other processes' CPU seconds shared by the cores), against COPY's.
//!
//! Knobs: `PG2CH_BENCH_LOAD_ROWS` (rows of the narrow table, default
//! 2,000,000), `PG2CH_BENCH_LOAD_WIDE_ROWS` (of the wide one, default
//! 1,000,000), `PG2CH_BENCH_PAIRS` (default 3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/procs.rs"]
mod procs;

use std::process::Command;
use std::time::Instant;

use common::TestEnv;
use sqlx::PgPool;
use tokio::runtime::Runtime;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The two shapes: (name, columns, how a row is made from `g`).
fn shapes() -> [(&'static str, String, String); 2] {
    let wide_columns: Vec<String> = (1..=18)
        .map(|i| match i % 3 {
            0 => format!("c{i} bigint"),
            1 => format!("c{i} text"),
            _ => format!("c{i} timestamptz"),
        })
        .collect();
    let wide_values: Vec<String> = (1..=18)
        .map(|i| match i % 3 {
            0 => format!("g * {i}"),
            1 => format!("md5((g + {i})::text)"),
            _ => format!("now() - g * interval '{i} second'"),
        })
        .collect();
    [
        (
            "narrow",
            "id bigserial PRIMARY KEY, n int NOT NULL, t text, at timestamptz DEFAULT now()".to_owned(),
            "g, g % 1000, md5(g::text), now()".to_owned(),
        ),
        (
            "wide",
            format!("id bigserial PRIMARY KEY, n int NOT NULL, {}", wide_columns.join(", ")),
            format!("g, g % 1000, {}", wide_values.join(", ")),
        ),
    ]
}

/// One pair's figures.
struct Pair {
    copy_rate: f64,
    load_rate: f64,
    size_ratio: f64,
    wal_per_row: f64,
    rss_mb: f64,
    /// CPU seconds per process name while COPY read the table.
    copy_cpu: Vec<(String, f64)>,
    /// The same while `init` and `run --once` loaded it.
    load_cpu: Vec<(String, f64)>,
}

impl Pair {
    /// CPU seconds of the load spent in pg2ch's own commands.
    fn pg2ch_cpu(&self) -> f64 {
        self.load_cpu.iter().filter(|(n, _)| n == procs::OWN_CHILDREN).map(|(_, s)| s).sum()
    }

    /// CPU seconds of the load spent by every other process.
    fn others_cpu(&self) -> f64 {
        self.load_cpu.iter().filter(|(n, _)| n != procs::OWN_CHILDREN).map(|(_, s)| s).sum()
    }

    /// The fastest `cores` could have loaded `rows` if pg2ch cost nothing:
    /// the other processes' CPU shared by them all (rows/s).
    fn bound(&self, rows: u64, cores: f64) -> f64 {
        rows as f64 / (self.others_cpu() / cores)
    }
}

/// `name 1.23 s` for the names that used at least 0.05 s.
fn cpu_line(cpu: &[(String, f64)]) -> String {
    let named: Vec<String> = cpu
        .iter()
        .filter(|(_, s)| *s >= 0.05)
        .map(|(n, s)| format!("{} {s:.2} s", if n == procs::OWN_CHILDREN { "pg2ch/psql" } else { n }))
        .collect();
    named.join(", ")
}

/// The number before " MB" on `run`'s "peak RSS" line.
fn peak_rss(stderr: &str) -> f64 {
    stderr
        .lines()
        .find_map(|l| l.split("peak RSS ").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn one_pair(env: &TestEnv, pool: &PgPool, table: &str, columns: &str, row: &str, rows: u64) -> Pair {
    exec(pool, &format!("DROP TABLE IF EXISTS {table}")).await;
    exec(pool, &format!("CREATE TABLE {table} ({columns})")).await;
    exec(pool, &format!("INSERT INTO {table} SELECT {row} FROM generate_series(1, {rows}) g")).await;
    exec(pool, &format!("CREATE INDEX ON {table} (n)")).await;
    exec(pool, &format!("VACUUM ANALYZE {table}")).await;
    exec(pool, "CHECKPOINT").await;
    let pg = &env.settings.pg;
    let cpu_before = procs::sample();
    let started = Instant::now();
    let out = Command::new("psql")
        .args(["-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user, "-d", &pg.database, "-q", "-c"])
        .arg(format!("\\copy {table} TO '/dev/null'"))
        .env("PGPASSWORD", pg.password.expose())
        .output()
        .expect("psql (it ships with PostgreSQL)");
    assert!(out.status.success(), "psql \\copy: {}", String::from_utf8_lossy(&out.stderr));
    let copy_rate = rows as f64 / started.elapsed().as_secs_f64();
    let copy_cpu = procs::cpu_seconds(&cpu_before, &procs::sample());

    let size = format!("SELECT pg_total_relation_size('{table}')");
    let wal = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8";
    let (size_before, wal_before) = (scalar(pool, &size).await, scalar(pool, wal).await);
    let cpu_before = procs::sample();
    let started = Instant::now();
    env.ok(&["init", "--table", table]);
    let out = env.run(&["run", "--once", "--table", table]);
    let load_rate = rows as f64 / started.elapsed().as_secs_f64();
    let load_cpu = procs::cpu_seconds(&cpu_before, &procs::sample());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pg2ch run --once failed:\n{stderr}");
    let (size_after, wal_after) = (scalar(pool, &size).await, scalar(pool, wal).await);
    let report = env.ok(&["verify", "--table", table]);
    assert!(report.contains("verify: OK"), "{report}");
    Pair {
        copy_rate,
        load_rate,
        size_ratio: size_after as f64 / size_before as f64,
        wal_per_row: (wal_after - wal_before) as f64 / rows as f64,
        rss_mb: peak_rss(&stderr),
        copy_cpu,
        load_cpu,
    }
}

fn main() {
    let rt = Runtime::new().unwrap();
    let pairs = knob("PG2CH_BENCH_PAIRS", 3) as usize;
    let rows = [knob("PG2CH_BENCH_LOAD_ROWS", 2_000_000), knob("PG2CH_BENCH_LOAD_WIDE_ROWS", 1_000_000)];
    rt.block_on(async {
        for ((name, columns, row), rows) in shapes().into_iter().zip(rows) {
            let env = TestEnv::new(&format!("load{name}")).await;
            let pool = env.pg().await;
            let mut done = Vec::new();
            for i in 0..pairs {
                // A table of its own each pair, in ClickHouse too.
                let p = one_pair(&env, &pool, &format!("{name}{i}"), &columns, &row, rows).await;
                println!(
                    "pair: COPY {:.0} rows/s | load {:.0} rows/s ({:.2}x), size {:.3}x, {:.1} B WAL/row, peak RSS {:.0} MB",
                    p.copy_rate,
                    p.load_rate,
                    p.load_rate / p.copy_rate,
                    p.size_ratio,
                    p.wal_per_row,
                    p.rss_mb
                );
                println!("  CPU of the COPY read: {}", cpu_line(&p.copy_cpu));
                println!("  CPU of the load:      {}", cpu_line(&p.load_cpu));
                done.push(p);
            }
            let m = |f: &dyn Fn(&Pair) -> f64| median(done.iter().map(f).collect());
            println!("initial load, {name} table, {rows} rows, {pairs} pairs (medians):");
            println!("  load rate:     {:.0} rows/s, {:.2}x reading it once with COPY ({:.0} rows/s)",
                m(&|p| p.load_rate), m(&|p| p.load_rate / p.copy_rate), m(&|p| p.copy_rate));
            println!("  size after:    {:.3}x the table and its indexes before", m(&|p| p.size_ratio));
            println!("  WAL:           {:.1} bytes per carried row", m(&|p| p.wal_per_row));
            println!("  peak RSS:      {:.0} MB (pg2ch run)", m(&|p| p.rss_mb));
            // The rest of the machine's CPU during the load bounds the rate
            // whatever pg2ch costs: even if pg2ch used none, the load could
            // not finish before the cores had done that work.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let per_million = |s: f64| s * 1e6 / rows as f64;
            let pg2ch = m(&|p| per_million(p.pg2ch_cpu()));
            let others = m(&|p| per_million(p.others_cpu()));
            let bound = m(&|p| p.bound(rows, cores));
            println!("  CPU:           pg2ch {pg2ch:.2} s per million rows; every other process {others:.2} s (PostgreSQL, broker, ClickHouse, kernel)");
            println!(
                "  bound:         without pg2ch's own CPU, {cores:.0} cores would still need that: at most {bound:.0} rows/s, {:.2}x COPY",
                m(&|p| p.bound(rows, cores) / p.copy_rate)
            );
        }
    });
}
