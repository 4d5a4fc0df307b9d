//! Any table, against real services: a table with a column of every type
//! pg2ch carries (and arrays of them) under a composite key of a uuid and an
//! integer, filled with values drawn from each type's whole domain, carried
//! exactly or rejected per row with the reason; updated, deleted and
//! inserted again while `pg2ch run` is SIGKILLed and restarted; columns
//! added, dropped and retyped with other tables running beside; several
//! tables in one process; types pg2ch does not know, carried as text on
//! request; names that need quoting on both sides.
//!
//! Draws are seeded and the seed printed (`PG2CH_TABLES_SEED=N` replays).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use common::{TestEnv, eventually};
use pg2ch::types::{KeyPart, Value};
use pg2ch::verify::RowState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn seed() -> u64 {
    let seed = std::env::var("PG2CH_TABLES_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("PG2CH_TABLES_SEED={seed}");
    seed
}

/// The table with every type. The key is a uuid and an integer; one
/// column name needs quoting everywhere.
const EVERYTHING: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'with space', 'it''s');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE everything (
    id uuid NOT NULL,
    part integer NOT NULL,
    b boolean, i2 smallint, i4 integer, i8 bigint, pos positive, f4 real, f8 double precision,
    n numeric(12,3), nbig numeric(50,10), nu numeric,
    t text, vc varchar(20), ch char(5), by bytea, u uuid,
    d date, ts timestamp, tz timestamptz, tm time, iv interval,
    js json, jb jsonb, ip inet, net cidr, m mood,
    ai integer[], atx text[], an numeric(10,2)[], atz timestamptz[], ad date[], au uuid[], ajb jsonb[], aip inet[],
    "We""ird col" text NOT NULL DEFAULT 'x',
    PRIMARY KEY (id, part)
)"#;

/// Each column's type as written in `EVERYTHING`, for casting text inputs.
const COLUMNS: [(&str, &str); 34] = [
    ("b", "boolean"),
    ("i2", "smallint"),
    ("i4", "integer"),
    ("i8", "bigint"),
    ("pos", "positive"),
    ("f4", "real"),
    ("f8", "double precision"),
    ("n", "numeric(12,3)"),
    ("nbig", "numeric(50,10)"),
    ("nu", "numeric"),
    ("t", "text"),
    ("vc", "varchar(20)"),
    ("ch", "char(5)"),
    ("by", "bytea"),
    ("u", "uuid"),
    ("d", "date"),
    ("ts", "timestamp"),
    ("tz", "timestamptz"),
    ("tm", "time"),
    ("iv", "interval"),
    ("js", "json"),
    ("jb", "jsonb"),
    ("ip", "inet"),
    ("net", "cidr"),
    ("m", "mood"),
    ("ai", "integer[]"),
    ("atx", "text[]"),
    ("an", "numeric(10,2)[]"),
    ("atz", "timestamptz[]"),
    ("ad", "date[]"),
    ("au", "uuid[]"),
    ("ajb", "jsonb[]"),
    ("aip", "inet[]"),
    ("We\"ird col", "text"),
];

fn digits(rng: &mut StdRng, n: usize) -> String {
    (0..n).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect()
}

fn digits_in(rng: &mut StdRng, lengths: impl rand::distr::uniform::SampleRange<usize>) -> String {
    let n = rng.random_range(lengths);
    digits(rng, n)
}

fn uuid(rng: &mut StdRng) -> String {
    pg2ch::types::uuid_text(&rng.random())
}

/// Any text PostgreSQL admits in a UTF-8 database: any character but NUL,
/// control characters and quotes and backslashes often.
fn text(rng: &mut StdRng, max: usize) -> String {
    let len = rng.random_range(0..=max);
    (0..len)
        .map(|_| match rng.random_range(0..4) {
            0 => ['"', '\\', '\'', '{', '}', ',', ' ', '\n', '\u{1}', '\u{7f}'][rng.random_range(0..10)],
            1 => char::from(rng.random_range(b'a'..=b'z')),
            _ => char::from_u32(rng.random_range(1..0x11_0000)).unwrap_or('?'),
        })
        .collect()
}

/// A date as PostgreSQL reads it, from its days since 2000 (BC written as such).
fn date_text(pg_days: i32) -> String {
    let (y, m, d) = pg2ch::types::time::civil_from_days(i64::from(pg_days) + 10_957);
    if y <= 0 { format!("{:04}-{m:02}-{d:02} BC", 1 - y) } else { format!("{y:04}-{m:02}-{d:02}") }
}

/// A timestamp as PostgreSQL reads it, from its microseconds since 2000.
fn timestamp_text(pg_us: i64, zone: bool) -> String {
    let unix = i128::from(pg_us) + 946_684_800_000_000;
    let days = unix.div_euclid(86_400_000_000) as i64;
    let in_day = unix.rem_euclid(86_400_000_000) as i64;
    let (y, m, d) = pg2ch::types::time::civil_from_days(days);
    let (s, us) = (in_day / 1_000_000, in_day % 1_000_000);
    let z = if zone { "+00" } else { "" };
    let time = format!("{:02}:{:02}:{:02}.{us:06}{z}", s / 3600, s / 60 % 60, s % 60);
    if y <= 0 { format!("{:04}-{m:02}-{d:02} {time} BC", 1 - y) } else { format!("{y:04}-{m:02}-{d:02} {time}") }
}

fn float_text(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        format!("{x:e}")
    }
}

fn json_text(rng: &mut StdRng, depth: u32) -> String {
    match rng.random_range(0..if depth > 2 { 4 } else { 6 }) {
        0 => "null".into(),
        1 => ["true", "false", "0", "-1.50", "1e300", "123456789012345678901234567890"][rng.random_range(0..6)].into(),
        2 | 3 => serde_json::to_string(&text(rng, 8)).unwrap(),
        4 => {
            let items: Vec<String> = (0..rng.random_range(0..4)).map(|_| json_text(rng, depth + 1)).collect();
            format!("[{}]", items.join(", "))
        }
        _ => {
            let items: Vec<String> = (0..rng.random_range(0..4))
                .map(|_| format!("{} : {}", serde_json::to_string(&text(rng, 5)).unwrap(), json_text(rng, depth + 1)))
                .collect();
            format!(" {{{}}} ", items.join(","))
        }
    }
}

fn inet_text(rng: &mut StdRng, cidr: bool) -> String {
    if rng.random_bool(0.5) {
        let bits = rng.random_range(0..=32u32);
        let mut addr: u32 = rng.random();
        if cidr {
            addr &= if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
        }
        format!("{}/{bits}", std::net::Ipv4Addr::from(addr))
    } else {
        let bits = rng.random_range(0..=128u32);
        let mut addr: u128 = rng.random();
        if cidr {
            addr &= if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
        }
        format!("{}/{bits}", std::net::Ipv6Addr::from(addr))
    }
}

/// A value of a scalar type as text PostgreSQL reads, drawn from the whole
/// domain (its ends, infinities, NaN, negative zero, huge numerics).
fn scalar_text(rng: &mut StdRng, ty: &str) -> String {
    match ty {
        "boolean" => ["true", "false"][rng.random_range(0..2)].into(),
        "smallint" => [i64::from(i16::MIN), i64::from(i16::MAX), 0, rng.random::<i16>().into()][rng.random_range(0..4)]
            .to_string(),
        "integer" => [i64::from(i32::MIN), i64::from(i32::MAX), -1, rng.random::<i32>().into()][rng.random_range(0..4)]
            .to_string(),
        "positive" => rng.random_range(1..=i32::MAX).to_string(),
        "bigint" => [i64::MIN, i64::MAX, 0, rng.random::<i64>()][rng.random_range(0..4)].to_string(),
        "real" => match rng.random_range(0..5) {
            0 => float_text(f64::from(
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, f32::MIN_POSITIVE / 4.0][rng.random_range(0..5)],
            )),
            _ => {
                let x = f32::from_bits(rng.random());
                if x.is_finite() { format!("{x:e}") } else { float_text(f64::from(x)) }
            }
        },
        "double precision" => match rng.random_range(0..5) {
            0 => {
                float_text([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 5e-324, f64::MAX][rng.random_range(0..6)])
            }
            _ => float_text(f64::from_bits(rng.random())),
        },
        "numeric(12,3)" => match rng.random_range(0..8) {
            0 => "NaN".into(),
            _ => format!("{}{}.{}", ["", "-"][rng.random_range(0..2)], digits_in(rng, 1..=9), digits(rng, 3)),
        },
        "numeric(10,2)" => format!("{}{}.{}", ["", "-"][rng.random_range(0..2)], digits_in(rng, 1..=8), digits(rng, 2)),
        "numeric(50,10)" => {
            format!("{}{}.{}", ["", "-"][rng.random_range(0..2)], digits_in(rng, 1..=40), digits(rng, 10))
        }
        "numeric" => match rng.random_range(0..8) {
            0 => ["NaN", "Infinity", "-Infinity", "0"][rng.random_range(0..4)].into(),
            1 => format!("{}.{}", digits(rng, 900), digits(rng, 300)),
            _ => format!("{}{}.{}", ["", "-"][rng.random_range(0..2)], digits_in(rng, 1..30), digits_in(rng, 0..30)),
        },
        "text" => text(rng, 30),
        "varchar(20)" => text(rng, 20),
        "char(5)" => text(rng, 5),
        "bytea" => format!(
            "\\x{}",
            (0..rng.random_range(0..24)).map(|_| format!("{:02x}", rng.random::<u8>())).collect::<String>()
        ),
        "uuid" => uuid(rng),
        "date" => match rng.random_range(0..10) {
            0 => ["infinity", "-infinity"][rng.random_range(0..2)].into(),
            1 => date_text([pg2ch::types::time::PG_DATE_MIN, pg2ch::types::time::PG_DATE_MAX][rng.random_range(0..2)]),
            _ => date_text(rng.random_range(pg2ch::types::time::PG_DATE_MIN..=pg2ch::types::time::PG_DATE_MAX)),
        },
        "timestamp" | "timestamptz" => {
            let zone = ty == "timestamptz";
            match rng.random_range(0..10) {
                0 => ["infinity", "-infinity"][rng.random_range(0..2)].into(),
                1 => timestamp_text(
                    [
                        pg2ch::types::time::PG_TIMESTAMP_MIN,
                        pg2ch::types::time::PG_TIMESTAMP_MAX,
                        i64::MAX - 946_684_800_000_000,
                        i64::MAX - 946_684_800_000_000 + 1,
                    ][rng.random_range(0..4)],
                    zone,
                ),
                _ => timestamp_text(
                    rng.random_range(pg2ch::types::time::PG_TIMESTAMP_MIN..=pg2ch::types::time::PG_TIMESTAMP_MAX),
                    zone,
                ),
            }
        }
        "time" => match rng.random_range(0..10) {
            0 => "24:00:00".into(),
            _ => format!(
                "{:02}:{:02}:{:02}.{:06}",
                rng.random_range(0..24),
                rng.random_range(0..60),
                rng.random_range(0..60),
                rng.random_range(0..1_000_000)
            ),
        },
        "interval" => format!(
            "{} months {} days {} microseconds",
            rng.random_range(-100_000..100_000),
            rng.random_range(-100_000..100_000),
            rng.random_range(-1_000_000_000_000_000i64..1_000_000_000_000_000)
        ),
        "json" | "jsonb" => json_text(rng, 0),
        "inet" => inet_text(rng, false),
        "cidr" => inet_text(rng, true),
        "mood" => ["sad", "ok", "happy", "with space", "it's"][rng.random_range(0..5)].into(),
        other => panic!("no generator for {other}"),
    }
}

/// A row of `everything`: each column's text input, NULL one time in eight
/// (arrays as their elements' texts, elements NULL now and then).
enum Input {
    Null,
    Scalar(String),
    Array(Vec<Option<String>>),
}

fn draw_row(rng: &mut StdRng) -> Vec<Input> {
    COLUMNS
        .iter()
        .map(|(name, ty)| {
            if *name != "We\"ird col" && rng.random_range(0..8) == 0 {
                return Input::Null;
            }
            match ty.strip_suffix("[]") {
                Some(element) => Input::Array(
                    (0..rng.random_range(0..5))
                        .map(|_| (rng.random_range(0..6) > 0).then(|| scalar_text(rng, element)))
                        .collect(),
                ),
                None => Input::Scalar(scalar_text(rng, ty)),
            }
        })
        .collect()
}

/// Inserts a row of `everything` with the given key.
async fn insert(pool: &sqlx::PgPool, id: &str, part: i32, row: &[Input]) {
    let names: Vec<String> = COLUMNS.iter().map(|(n, _)| pg2ch::config::pg_ident(n)).collect();
    let params: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| match ty.strip_suffix("[]") {
            Some(_) => format!("${}::text[]::{ty}", i + 3),
            None => format!("${}::text::{ty}", i + 3),
        })
        .collect();
    let sql =
        format!("INSERT INTO everything (id, part, {}) VALUES ($1::uuid, $2, {})", names.join(", "), params.join(", "));
    let mut q = sqlx::query(&sql).bind(id).bind(part);
    for (input, (_, ty)) in row.iter().zip(COLUMNS) {
        q = match input {
            Input::Null if ty.ends_with("[]") => q.bind(None::<Vec<Option<String>>>),
            Input::Null => q.bind(None::<String>),
            Input::Scalar(s) => q.bind(Some(s.clone())),
            Input::Array(a) => q.bind(a.clone()),
        };
    }
    q.execute(pool).await.unwrap_or_else(|e| panic!("inserting ({id}, {part}): {e}"));
}

/// Whether a row of the table would be sent: the shared decision, then the size limit.
fn travels(schema: &pg2ch::schema::TableSchema, values: &[Value]) -> Result<(), String> {
    schema.check_row(values)?;
    let size = pg2ch::change::encode(schema, &pg2ch::change::Change::upsert(values.to_vec(), 1)).len();
    pg2ch::change::oversize(&vec![0; size], 1).map_or(Ok(()), Err)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_travels_exactly_or_is_rejected_and_both_sides_checksum_alike() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let env = TestEnv::new("everytype").await;
    let pool = env.pg().await;
    exec(&pool, EVERYTHING).await;
    env.ok(&["init", "--table", "everything", "--partitions", "3"]);
    let mut keys = BTreeSet::new();
    for i in 0..300 {
        let id = uuid(&mut rng);
        let part = [i32::MIN, -1, 0, i32::MAX, i][rng.random_range(0..5)];
        if !keys.insert((id.clone(), part)) {
            continue;
        }
        insert(&pool, &id, part, &draw_row(&mut rng)).await;
    }
    // Shapes only a declared array column can still hold, and NULLs everywhere.
    exec(
        &pool,
        "INSERT INTO everything (id, part, ai, atx) VALUES
             ('00000000-0000-0000-0000-000000000001', 1, '{{1,2},{3,4}}', NULL),
             ('00000000-0000-0000-0000-000000000002', 1, NULL, '[0:1]={a,b}'),
             ('00000000-0000-0000-0000-000000000003', 1, '{}', '{}'),
             ('00000000-0000-0000-0000-000000000004', 1, NULL, NULL)",
    )
    .await;
    let schema = env.table("everything").await;
    assert_eq!(schema.key.len(), 2);

    // PostgreSQL's checksum of every row, computed on the server, equals
    // pg2ch's of the values it reads: each type's hash has its twin.
    let key_text = "id::text || '/' || part::text";
    // In a session of pg2ch's own settings (UTC, ISO 8601 intervals), as `verify` runs it.
    let ours = pg2ch::postgres::connect(&env.settings.pg, 1, Duration::from_secs(10)).await.unwrap();
    let sql = format!("SELECT {key_text}, {} FROM everything", pg2ch::checksum::row_sql(&schema));
    let server: BTreeMap<String, i64> = sqlx::query_as(&sql).fetch_all(&ours).await.unwrap().into_iter().collect();
    let stored = env.pg_rows(&schema).await;
    let text_of = |key: &pg2ch::types::Key| match key.as_slice() {
        [KeyPart::Uuid(u), KeyPart::Int(p)] => format!("{}/{p}", pg2ch::types::uuid_text(u)),
        other => panic!("{other:?}"),
    };
    for (key, (values, _)) in &stored {
        assert_eq!(
            server[&text_of(key)],
            pg2ch::checksum::row(&schema, values),
            "seed {seed}: checksum of row {key:?}"
        );
    }

    env.ok(&["run", "--once", "--table", "everything"]);
    let report = env.ok(&["verify", "--table", "everything"]);
    assert!(report.contains("verify: OK"), "seed {seed}: {report}");
    let in_ch = env.ch_rows(&schema).await;
    let after = env.pg_rows(&schema).await;
    let (mut carried, mut rejected) = (0, 0);
    for (key, (values, state)) in &after {
        match (travels(&schema, values), state) {
            (Ok(()), RowState::Sent(_)) => {
                let got = in_ch.get(key).map(|c| &c.values);
                assert!(got == Some(values), "seed {seed}: row {key:?} differs in ClickHouse:\n{got:?}\n{values:?}");
                carried += 1;
            }
            (Err(why), RowState::Rejected) => {
                let flagged: Option<String> = sqlx::query_scalar(
                    "SELECT pg2ch_rejected FROM everything WHERE id::text || '/' || part::text = $1",
                )
                .bind(text_of(key))
                .fetch_one(&pool)
                .await
                .unwrap();
                assert_eq!(flagged.as_deref(), Some(why.as_str()), "seed {seed}: row {key:?}");
                assert!(!in_ch.contains_key(key), "seed {seed}: rejected row {key:?} is in ClickHouse");
                rejected += 1;
            }
            (outcome, state) => panic!("seed {seed}: row {key:?}: decision {outcome:?}, state {state:?}"),
        }
    }
    assert!(carried > 30 && rejected > 30, "seed {seed}: both outcomes drawn ({carried} carried, {rejected} rejected)");
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT pg2ch_rejected FROM everything WHERE pg2ch_rejected IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();
    for expected in ["2-dimensional array", "starting at index 0", "is infinity", "Decimal"] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "seed {seed}: no row rejected for {expected:?}: {reasons:?}"
        );
    }

    // Direct queries: the same keys live on both sides, and columns whose
    // text both servers write alike agree.
    let ch = env.ch().await;
    let pg_keys: Vec<String> =
        sqlx::query_scalar("SELECT id::text || '/' || part::text FROM everything WHERE sent_to_kafka ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    let ch_keys: Vec<String> = ch
        .client
        .query("SELECT concat(toString(id), '/', toString(part)) AS k FROM everything FINAL WHERE _pg2ch_deleted = 0 ORDER BY k")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(ch_keys, pg_keys, "seed {seed}: the live keys");
    /// Key, bigint, bytea as hex, timestamptz as Unix microseconds.
    type Columns = Vec<(String, Option<i64>, Option<String>, Option<i64>)>;
    let pg_cols: Columns = sqlx::query_as(
        "SELECT id::text || '/' || part::text, i8, encode(by, 'hex'),
                CASE WHEN isfinite(tz) THEN ('x' || encode(timestamptz_send(tz), 'hex'))::bit(64)::bigint + 946684800000000 END
         FROM everything WHERE sent_to_kafka ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let ch_cols: Columns = ch
        .client
        .query(
            "SELECT concat(toString(id), '/', toString(part)) AS k, i8, lower(hex(by)), tz_us
             FROM everything FINAL WHERE _pg2ch_deleted = 0 ORDER BY k",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(ch_cols, pg_cols, "seed {seed}: bigint, bytea and timestamptz by direct queries");

    // The convenience columns follow the server's version.
    let types: BTreeMap<String, String> = ch
        .client
        .query("SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'everything'")
        .fetch_all::<(String, String)>()
        .await
        .unwrap()
        .into_iter()
        .collect();
    let new = ch.caps.datetime64;
    assert_eq!(types["tz"], if new { "Nullable(DateTime64(6, 'UTC'))" } else { "Nullable(DateTime)" });
    assert_eq!(types["d"], if ch.caps.date32 { "Nullable(Date32)" } else { "Nullable(Date)" });
    assert_eq!(types["b"], if ch.caps.bool_type { "Nullable(Bool)" } else { "Nullable(UInt8)" });
    assert_eq!(types["n"], "Nullable(Decimal(12, 3))");
    assert_eq!(types["nu"], "Nullable(String)");
    assert_eq!(types["an"], "Array(Nullable(Decimal(10, 2)))");
    assert_eq!(types["an_null"], "UInt8");
    assert_eq!(types["atz_us"], "Array(Nullable(Int64))");
    assert_eq!(types["We\"ird col"], "String");
}

/// The outcome every writer below must leave: nothing unsent, and
/// ClickHouse's live rows equal PostgreSQL's rows, value for value.
async fn assert_converged(env: &TestEnv, table: &str, what: &str) {
    env.ok(&["run", "--once", "--table", table]);
    let report = env.ok(&["verify", "--table", table]);
    assert!(report.contains("verify: OK"), "{what}: {report}");
    let schema = env.table(table).await;
    env.assert_same_rows(&schema, what).await;
}

/// Changes rows of `everything` until `stop`: one step at a time, drawn
/// from a seeded RNG, updates (content, or key), deletes and inserts again.
/// Returns the steps made.
fn churn(
    pool: sqlx::PgPool,
    mut live: Vec<(String, i32)>,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    tokio::spawn(async move {
        let mut gone: Vec<(String, i32)> = Vec::new();
        let mut steps = 0u32;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let pick = rng.random_range(0..live.len().max(1));
            match rng.random_range(0..10) {
                0..=4 if !live.is_empty() => {
                    let (id, part) = &live[pick];
                    let value = scalar_text(&mut rng, "text");
                    sqlx::query("UPDATE everything SET t = $3, i4 = coalesce(i4, 0) / 2, tz = now() WHERE id = $1::uuid AND part = $2")
                        .bind(id)
                        .bind(part)
                        .bind(value)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                5 if !live.is_empty() => {
                    let (id, part) = live.swap_remove(pick);
                    let moved = part.wrapping_add(1_000_000);
                    let done = sqlx::query("UPDATE everything SET part = $3 WHERE id = $1::uuid AND part = $2")
                        .bind(&id)
                        .bind(part)
                        .bind(moved)
                        .execute(&pool)
                        .await;
                    if done.is_ok() {
                        gone.retain(|k| *k != (id.clone(), moved));
                        gone.push((id.clone(), part));
                        live.push((id, moved));
                    } else {
                        live.push((id, part));
                    }
                }
                6 | 7 if !live.is_empty() => {
                    let (id, part) = live.swap_remove(pick);
                    sqlx::query("DELETE FROM everything WHERE id = $1::uuid AND part = $2")
                        .bind(&id)
                        .bind(part)
                        .execute(&pool)
                        .await
                        .unwrap();
                    gone.push((id, part));
                }
                _ if !gone.is_empty() => {
                    let (id, part) = gone.swap_remove(rng.random_range(0..gone.len()));
                    insert(&pool, &id, part, &draw_row(&mut rng)).await;
                    live.push((id, part));
                }
                _ => {}
            }
            steps += 1;
            tokio::task::yield_now().await;
        }
        steps
    })
}

/// Starts `pg2ch run` on `everything` and SIGKILLs it at an arbitrary
/// moment, `rounds` times.
async fn kill_rounds(env: &TestEnv, seed: u64, rounds: u32) {
    let mut kill_rng = StdRng::seed_from_u64(seed ^ 0xdead);
    for round in 0..rounds {
        let mut child = env
            .command(&["run", "--table", "everything", "--batch-rows", "50", "--insert-rows", "70", "--poll-ms", "20"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Not synchronisation: the point is to kill at an arbitrary moment.
        tokio::time::sleep(Duration::from_millis(kill_rng.random_range(100..1500))).await;
        assert!(child.try_wait().unwrap().is_none(), "seed {seed} round {round}: pg2ch run exited on its own");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The rows a table holds when `init` adds pg2ch are carried by the
/// initial load without a write to any of them: their `xmin` is unchanged,
/// the table and its indexes do not grow, no chunk is left, and `verify`
/// agrees.
#[tokio::test(flavor = "multi_thread")]
async fn rows_there_at_init_are_loaded_without_writing_to_them() {
    let env = TestEnv::new("initquiet").await;
    let pool = env.pg().await;
    exec(
        &pool,
        "CREATE TABLE quiet (id bigint PRIMARY KEY, n int NOT NULL, v text);
         INSERT INTO quiet SELECT g, g % 1000, md5(g::text) FROM generate_series(1, 100000) g;
         CREATE INDEX ON quiet (n);
         CREATE TABLE quiet_at_init AS SELECT id, xmin::text::int8 AS x FROM quiet",
    )
    .await;
    exec(&pool, "VACUUM ANALYZE quiet").await;
    let size = || scalar(&pool, "SELECT pg_total_relation_size('quiet')");
    let before = size().await;
    env.ok(&["init", "--table", "quiet"]);
    let chunks = scalar(&pool, "SELECT count(*) FROM _pg2ch.load_chunks").await;
    assert!(chunks > 1, "100,000 rows make {chunks} chunk(s); the test needs several");
    let status = env.ok(&["status", "--table", "quiet"]);
    assert!(status.contains(&format!("{chunks} of {chunks} chunks left")), "{status}");
    env.ok(&["run", "--once", "--table", "quiet"]);
    let rewritten = "SELECT count(*) FROM quiet q JOIN quiet_at_init i USING (id) WHERE q.xmin::text::int8 <> i.x";
    assert_eq!(scalar(&pool, rewritten).await, 0, "the load wrote to rows of the table");
    let after = size().await;
    assert!(after as f64 <= before as f64 * 1.05, "the table and its indexes grew from {before} to {after} bytes");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM _pg2ch.load_chunks").await, 0, "no chunk is left");
    let status = env.ok(&["status", "--table", "quiet"]);
    assert!(status.contains("initial load of the rows there were at init: [####################] done"), "{status}");
    let report = env.ok(&["verify", "--table", "quiet"]);
    assert!(report.contains("verify: OK") && report.contains("100000 flagged sent"), "{report}");
    let ch = env.ch().await;
    let live: u64 =
        ch.client.query("SELECT count() FROM quiet FINAL WHERE _pg2ch_deleted = 0").fetch_one().await.unwrap();
    assert_eq!(live, 100_000);
}

/// The rows of every type there at `init` are carried by the initial load
/// while they are updated (content and key), deleted and inserted again
/// and `pg2ch run` is SIGKILLed mid-load; at the end `verify` and direct
/// queries agree, and no chunk is left.
#[tokio::test(flavor = "multi_thread")]
async fn rows_there_at_init_are_loaded_while_they_change_and_run_is_killed() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let env = TestEnv::new("initload").await;
    let pool = env.pg().await;
    exec(&pool, EVERYTHING).await;
    let mut live: Vec<(String, i32)> = Vec::new();
    for i in 0..300 {
        let key = (uuid(&mut rng), i);
        insert(&pool, &key.0, key.1, &draw_row(&mut rng)).await;
        live.push(key);
    }
    // Copies under other keys, so that the load has several chunks.
    exec(
        &pool,
        "INSERT INTO everything SELECT gen_random_uuid(), part + 1000 * g, b, i2, i4, i8, pos, f4, f8, n, nbig, nu, t, vc,
             ch, by, u, d, ts, tz, tm, iv, js, jb, ip, net, m, ai, atx, an, atz, ad, au, ajb, aip, \"We\"\"ird col\"
         FROM everything, generate_series(1, 40) g",
    )
    .await;
    exec(&pool, "VACUUM ANALYZE everything").await;
    let rows = scalar(&pool, "SELECT count(*) FROM everything").await;
    env.ok(&["init", "--table", "everything", "--partitions", "3"]);
    let chunks = scalar(&pool, "SELECT count(*) FROM _pg2ch.load_chunks").await;
    assert!(chunks > 1, "seed {seed}: {rows} rows make {chunks} chunk(s); the test needs several");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM everything WHERE NOT sent_to_kafka").await, 0, "they read sent");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = churn(pool.clone(), live, seed, stop.clone());
    kill_rounds(&env, seed, 4).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let steps = writer.await.unwrap();
    assert!(steps > 20, "seed {seed}: the writer made {steps} changes");
    assert_converged(&env, "everything", &format!("seed {seed}")).await;
    assert_eq!(scalar(&pool, "SELECT count(*) FROM _pg2ch.load_chunks").await, 0, "seed {seed}: chunks left");
    let ch = env.ch().await;
    let live_ch: u64 =
        ch.client.query("SELECT count() FROM everything FINAL WHERE _pg2ch_deleted = 0").fetch_one().await.unwrap();
    let live_pg = scalar(&pool, "SELECT count(*) FROM everything WHERE pg2ch_rejected IS NULL").await;
    assert_eq!(live_ch as i64, live_pg, "seed {seed}");
}

/// Rows of every type updated (content and key), deleted and inserted
/// again while `pg2ch run` is SIGKILLed at random moments and restarted.
#[tokio::test(flavor = "multi_thread")]
async fn updates_deletes_and_reinserts_of_every_type_survive_sigkill() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let env = TestEnv::new("churn").await;
    let pool = env.pg().await;
    exec(&pool, EVERYTHING).await;
    env.ok(&["init", "--table", "everything", "--partitions", "3"]);
    let mut live: Vec<(String, i32)> = Vec::new();
    for i in 0..400 {
        let key = (uuid(&mut rng), i);
        insert(&pool, &key.0, key.1, &draw_row(&mut rng)).await;
        live.push(key);
    }

    // The writer: one change per step, drawn from a seeded RNG.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = churn(pool.clone(), live, seed, stop.clone());
    kill_rounds(&env, seed, 8).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let steps = writer.await.unwrap();
    assert!(steps > 50, "seed {seed}: the writer made {steps} changes");
    assert_converged(&env, "everything", &format!("seed {seed}")).await;
    // Direct queries: deleted keys are gone from ClickHouse's live rows, and
    // both sides hold the same number of live keys.
    let ch = env.ch().await;
    let live_ch: u64 =
        ch.client.query("SELECT count() FROM everything FINAL WHERE _pg2ch_deleted = 0").fetch_one().await.unwrap();
    let rows = scalar(&pool, "SELECT count(*) FROM everything WHERE pg2ch_rejected IS NULL").await;
    assert_eq!(live_ch as i64, rows, "seed {seed}");
    let deletions: u64 =
        ch.client.query("SELECT count() FROM everything WHERE _pg2ch_deleted = 1").fetch_one().await.unwrap();
    assert!(deletions > 0, "seed {seed}: deletions reached ClickHouse");
}

/// `<table>_current` reads the table as PostgreSQL has it: each live row's
/// current values and no deleted key, also when an older live version sits
/// in another part and the reader filters on a value only that version
/// holds; no `_pg2ch_deleted`; the columns PostgreSQL gained once `run`
/// added them. A ClickHouse table of that name that is not a view is
/// refused by name and left alone. And the table checks that read
/// `system.tables` keep working while another table of the database is
/// dropped and created (ClickHouse 18.16 failed them).
#[tokio::test(flavor = "multi_thread")]
async fn the_current_view_reads_the_table_as_postgresql_has_it() {
    let env = TestEnv::new("currentview").await;
    let pool = env.pg().await;
    exec(
        &pool,
        "CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric(10,2) NOT NULL, note text);
         INSERT INTO orders SELECT g, g * 1.5, 'n' || g FROM generate_series(1, 300) g;",
    )
    .await;
    let orders = ["--table", "orders"];
    env.ok(&[&["init"][..], &orders].concat());
    env.ok(&[&["run", "--once"][..], &orders].concat());
    // Newer versions in parts of their own: updates, then deletions.
    exec(&pool, "UPDATE orders SET note = 'changed' WHERE id % 3 = 0").await;
    env.ok(&[&["run", "--once"][..], &orders].concat());
    exec(&pool, "DELETE FROM orders WHERE id % 5 = 0").await;
    env.ok(&[&["run", "--once"][..], &orders].concat());

    let ch = env.ch().await;
    let in_pg: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT id, note FROM orders ORDER BY id").fetch_all(&pool).await.unwrap();
    let in_view: Vec<(i64, Option<String>)> =
        ch.client.query("SELECT id, note FROM orders_current ORDER BY id").fetch_all().await.unwrap();
    assert_eq!(in_view.len(), 240);
    assert_eq!(in_view, in_pg, "the view reads what PostgreSQL has");
    for (note, what) in [("n3", "updated"), ("n5", "deleted"), ("n15", "updated, then deleted")] {
        let n: u64 =
            ch.client.query("SELECT count() FROM orders_current WHERE note = ?").bind(note).fetch_one().await.unwrap();
        assert_eq!(n, 0, "a filter matching only the old version of a row {what} finds nothing");
    }
    let columns = |table: &'static str| {
        let client = ch.client.clone();
        let db = env.name.clone();
        async move {
            client
                .query("SELECT name FROM system.columns WHERE database = ? AND table = ?")
                .bind(db)
                .bind(table)
                .fetch_all::<String>()
                .await
                .unwrap()
        }
    };
    let names = columns("orders_current").await;
    assert!(names.iter().any(|c| c == "_pg2ch_version") && !names.iter().any(|c| c == "_pg2ch_deleted"), "{names:?}");

    exec(&pool, "ALTER TABLE orders ADD COLUMN country text DEFAULT 'NZ'").await;
    env.ok(&[&["run", "--once"][..], &orders].concat());
    assert!(columns("orders_current").await.iter().any(|c| c == "country"), "the view gains the added column");
    let nz: u64 = ch.client.query("SELECT count() FROM orders_current WHERE country = 'NZ'").fetch_one().await.unwrap();
    assert_eq!(nz, 240);

    // A table of the view's name that is not a view: refused, left alone.
    exec(&pool, "CREATE TABLE other (id int PRIMARY KEY)").await;
    ch.client.query("CREATE TABLE other_current (x UInt8) ENGINE = Memory").execute().await.unwrap();
    let out = env.run(&["init", "--table", "other"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let fatal = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{err}"));
    assert!(fatal.contains("other_current") && fatal.contains("not the View"), "{fatal}");
    assert_eq!(columns("other_current").await, ["x"], "the table is left as it was");

    // Table checks while another table of the database is dropped and created.
    let schema = env.table("orders").await;
    let churn = {
        let client = ch.client.clone();
        tokio::spawn(async move {
            for _ in 0..150 {
                client.query("DROP TABLE IF EXISTS churn").execute().await.unwrap();
                client.query("CREATE VIEW churn AS SELECT 1 AS one").execute().await.unwrap();
            }
        })
    };
    let mut checks = 0;
    while !churn.is_finished() {
        ch.check_table(&schema).await.unwrap_or_else(|e| panic!("check {checks} while a table is dropped: {e:#}"));
        checks += 1;
    }
    churn.await.unwrap();
    assert!(checks > 0);
}

/// Two tables in one process: a column added while pg2ch is stopped is
/// added to ClickHouse at start and its rows sent again; a column added
/// while it runs stops that table's pipeline, naming the column, and the
/// other table goes on; a dropped or retyped column stops its table by name.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_are_carried_or_stop_their_table_by_name() {
    let env = TestEnv::new("schemachange").await;
    let pool = env.pg().await;
    exec(
        &pool,
        "CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric(10,2) NOT NULL, note text);
         CREATE TABLE accounts (name text PRIMARY KEY, balance bigint);
         INSERT INTO orders SELECT g, g * 1.5, 'n' || g FROM generate_series(1, 200) g;
         INSERT INTO accounts SELECT 'acct ' || g, g FROM generate_series(1, 50) g;",
    )
    .await;
    let both = ["--table", "orders", "--table", "accounts"];
    env.ok(&[&["init", "--partitions", "2"][..], &both].concat());
    env.ok(&[&["run", "--once"][..], &both].concat());
    // Several tables: each on its own topic.
    let client = pg2ch::kafka::connect(&env.settings.kafka, Duration::from_secs(10)).await.unwrap();
    for t in ["orders", "accounts"] {
        let topic = format!("{}.{t}", env.name);
        let n = pg2ch::kafka::partition_count(&client, &topic, Duration::from_secs(10)).await.unwrap();
        assert_eq!(n, Some(2), "topic {topic}");
    }
    let with_tables = |args: &[&str]| {
        let mut cmd = env.command(args);
        cmd.env("PG2CH_TABLES", "orders,accounts");
        cmd
    };
    let out = with_tables(&["verify"]).output().unwrap();
    assert!(out.status.success(), "PG2CH_TABLES names both: {}", String::from_utf8_lossy(&out.stdout));

    // Added while stopped: ClickHouse gains it at start, rows holding a value are sent again.
    exec(&pool, "ALTER TABLE orders ADD COLUMN country text DEFAULT 'NZ'").await;
    env.ok(&[&["run", "--once"][..], &both].concat());
    let report = env.ok(&[&["verify"][..], &both].concat());
    assert!(report.contains("verify: OK"), "{report}");
    let ch = env.ch().await;
    let nz: u64 = ch.client.query("SELECT count() FROM orders FINAL WHERE country = 'NZ'").fetch_one().await.unwrap();
    assert_eq!(nz, 200, "the old rows, sent again with the new column");

    // Added while running: that table stops, naming the column; the other goes on.
    let running =
        with_tables(&["run", "--poll-ms", "50"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    exec(&pool, "INSERT INTO accounts VALUES ('warm up', 1)").await;
    eventually("run is at work", Duration::from_secs(30), || async {
        ch.client
            .query("SELECT count() FROM accounts FINAL WHERE name = 'warm up'")
            .fetch_one::<u64>()
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    exec(&pool, "ALTER TABLE orders ADD COLUMN priority int").await;
    exec(&pool, "INSERT INTO orders (id, amount, priority) VALUES (1000, 1, 7)").await;
    exec(&pool, "INSERT INTO accounts VALUES ('after the change', 2)").await;
    eventually("the other table goes on", Duration::from_secs(30), || async {
        ch.client
            .query("SELECT count() FROM accounts FINAL WHERE name = 'after the change'")
            .fetch_one::<u64>()
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    let _ = std::process::Command::new("kill").arg(running.id().to_string()).status();
    let out = running.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a stopped table is reported at exit: {err}");
    let fatal = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{err}"));
    assert!(fatal.contains("public.orders") && fatal.contains("\"priority\" was added"), "{fatal}");
    // At the next start it is carried.
    env.ok(&[&["run", "--once"][..], &both].concat());
    let seven: u64 = ch.client.query("SELECT count() FROM orders FINAL WHERE priority = 7").fetch_one().await.unwrap();
    assert_eq!(seven, 1);

    // Retyped: the same, by name (a type that maps to the same ClickHouse type is no change).
    exec(&pool, "ALTER TABLE orders ALTER COLUMN note TYPE varchar(50)").await;
    env.ok(&[&["run", "--once"][..], &both].concat());
    exec(&pool, "ALTER TABLE orders ALTER COLUMN priority TYPE bigint").await;
    exec(&pool, "INSERT INTO accounts VALUES ('while orders is stopped', 3)").await;
    let out = env.run(&[&["run", "--once"][..], &both].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let fatal = err.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(fatal.contains("priority") && fatal.contains("type or nullability changed"), "{fatal}");
    let moved: u64 = ch
        .client
        .query("SELECT count() FROM accounts FINAL WHERE name = 'while orders is stopped'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(moved, 1, "the other table went on: {err}");
    exec(&pool, "ALTER TABLE orders ALTER COLUMN priority TYPE integer").await;
    env.ok(&[&["run", "--once"][..], &both].concat());

    // Dropped: its table stops by name; the other table's rows still move.
    exec(&pool, "ALTER TABLE accounts DROP COLUMN balance").await;
    exec(&pool, "INSERT INTO orders (id, amount) VALUES (2000, 2)").await;
    let out = env.run(&[&["run", "--once"][..], &both].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let fatal = err.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(fatal.contains("balance") && fatal.contains("dropped or renamed"), "{fatal}");
    let moved: u64 = ch.client.query("SELECT count() FROM orders FINAL WHERE id = 2000").fetch_one().await.unwrap();
    assert_eq!(moved, 1, "the other table went on: {err}");
}

/// A type pg2ch does not know is refused by name, or carried as its text
/// form on request; tables and columns whose names need quoting work on
/// both sides; two tables of one name in different schemas are refused.
#[tokio::test(flavor = "multi_thread")]
async fn other_types_opt_in_and_names_that_need_quoting() {
    let env = TestEnv::new("othertypes").await;
    let pool = env.pg().await;
    exec(
        &pool,
        r#"CREATE TABLE "Odd ""Place""" ("the key" int PRIMARY KEY, "a`b\c" point, "when" timestamptz);
           INSERT INTO "Odd ""Place""" VALUES (1, '(1,2)', now()), (2, NULL, NULL), (3, '(-1.5,1e300)', 'infinity');"#,
    )
    .await;
    let table = r#"public."Odd ""Place""""#;
    let out = env.run(&["init", "--table", table]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("has type point, which pg2ch does not carry") && err.contains("--other-types text"), "{err}");

    env.ok(&["init", "--table", table, "--other-types", "text"]);
    env.ok(&["run", "--once", "--table", table, "--other-types", "text"]);
    let report = env.ok(&["verify", "--table", table, "--other-types", "text"]);
    assert!(report.contains("verify: OK") && report.contains("rejected as not representable"), "{report}");
    let ch = env.ch().await;
    let points: Vec<Option<String>> = ch
        .client
        .query("SELECT `a\\`b\\\\c` FROM `Odd \"Place\"` FINAL WHERE _pg2ch_deleted = 0 ORDER BY `the key`")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(points, [Some("(1,2)".to_owned()), None], "row 3 holds infinity: rejected, and deleted downstream");

    exec(&pool, r#"CREATE SCHEMA other; CREATE TABLE other."Odd ""Place""" (k int PRIMARY KEY);"#).await;
    let out = env.run(&["init", "--table", table, "--table", r#"other."Odd ""Place""""#, "--other-types", "text"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("have the same name"), "{err}");
    let out = env.run(&["init", "--table", "no_such_table"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("PostgreSQL table no_such_table does not exist"));
}

/// One `run --once` pass moves every change committed before it, however
/// the claims fall: with two lanes, a claim whose rows end below the
/// deletions it locked once left those deletions for the next pass (a
/// sibling's claim above the rows' end skipped them while they were locked).
#[tokio::test(flavor = "multi_thread")]
async fn one_pass_moves_every_change_whatever_the_claims_cut() {
    let env = TestEnv::new("onepass").await;
    let pool = env.pg().await;
    exec(&pool, "CREATE TABLE pairs (id integer PRIMARY KEY, v text NOT NULL)").await;
    env.ok(&["init", "--table", "pairs", "--partitions", "2"]);
    for round in 0..3 {
        exec(&pool, "INSERT INTO pairs SELECT i, 'new' FROM generate_series(1, 400) i ON CONFLICT DO NOTHING").await;
        env.ok(&["run", "--once", "--table", "pairs"]);
        // Even keys deleted, odd keys changed: each claim's lists of rows
        // and of deletions interleave, and both come back full.
        exec(&pool, "DELETE FROM pairs WHERE id % 2 = 0").await;
        exec(&pool, "UPDATE pairs SET v = v || '!'").await;
        let producers = ["1", "2", "2"][round];
        env.ok(&["run", "--once", "--table", "pairs", "--batch-rows", "10", "--producers", producers]);
        let unsent = scalar(&pool, "SELECT count(*) FROM pairs WHERE NOT sent_to_kafka").await;
        let outbox = scalar(&pool, r#"SELECT count(*) FROM _pg2ch."public.pairs""#).await;
        assert_eq!((unsent, outbox), (0, 0), "round {round}, {producers} lane(s): one pass left changes behind");
        let schema = env.table("pairs").await;
        env.assert_same_rows(&schema, &format!("round {round}")).await;
    }
}

/// Two tables whose names join into one with a dot (`"a.b".c` and
/// `a."b.c"`) get outboxes and record functions of their own: a deletion in
/// one is published for that one only.
#[tokio::test(flavor = "multi_thread")]
async fn tables_whose_dotted_names_read_alike_keep_their_deletions_apart() {
    let env = TestEnv::new("dotted").await;
    let pool = env.pg().await;
    exec(
        &pool,
        r#"CREATE SCHEMA "a.b"; CREATE SCHEMA a;
           CREATE TABLE "a.b".c (id int PRIMARY KEY, v text); CREATE TABLE a."b.c" (id int PRIMARY KEY, v text);
           INSERT INTO "a.b".c SELECT g, 'one' FROM generate_series(1, 3) g;
           INSERT INTO a."b.c" SELECT g, 'two' FROM generate_series(1, 3) g;"#,
    )
    .await;
    let tables = ["--table", r#""a.b".c"#, "--table", r#"a."b.c""#];
    env.ok(&[&["init"][..], &tables].concat());
    let outboxes =
        scalar(&pool, "SELECT count(*) FROM pg_tables WHERE schemaname = '_pg2ch' AND tablename LIKE 'a.b.c%'").await;
    assert_eq!(outboxes, 2, "one outbox each");
    env.ok(&[&["run", "--once"][..], &tables].concat());
    exec(&pool, r#"DELETE FROM "a.b".c WHERE id = 2"#).await;
    env.ok(&[&["run", "--once"][..], &tables].concat());
    let report = env.ok(&[&["verify"][..], &tables].concat());
    assert!(report.matches("verify: OK").count() >= 1 && !report.contains("FAILED"), "{report}");
    let ch = env.ch().await;
    let ids = |table: &'static str| {
        let ch = ch.clone();
        async move {
            ch.client
                .query(&format!("SELECT id FROM `{table}` FINAL WHERE _pg2ch_deleted = 0 ORDER BY id"))
                .fetch_all::<i32>()
                .await
                .unwrap()
        }
    };
    assert_eq!(ids("c").await, [1, 3], "the deletion reached its own table");
    assert_eq!(ids("b.c").await, [1, 2, 3], "and not the other");
}

/// A primary key changed in PostgreSQL (ClickHouse keeps one row per the
/// old key): a running pipeline stops that table at its next claim, and a
/// start refuses it, each with one line naming the old key and the new.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_primary_key_stops_its_table_by_name() {
    let env = TestEnv::new("pkchange").await;
    let pool = env.pg().await;
    exec(
        &pool,
        "CREATE TABLE keyed (id int PRIMARY KEY, v text NOT NULL); INSERT INTO keyed VALUES (1, 'a'), (2, 'b')",
    )
    .await;
    env.ok(&["init", "--table", "keyed"]);
    let mut running = env
        .command(&["run", "--table", "keyed", "--poll-ms", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ch = env.ch().await;
    eventually("the rows reach ClickHouse", Duration::from_secs(30), || {
        let ch = ch.clone();
        async move { ch.client.query("SELECT count() FROM keyed FINAL").fetch_one::<u64>().await.unwrap_or(0) == 2 }
    })
    .await;
    exec(
        &pool,
        "ALTER TABLE keyed DROP CONSTRAINT keyed_pkey, ADD PRIMARY KEY (id, v); UPDATE keyed SET v = 'c' WHERE id = 1",
    )
    .await;
    let out = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            if running.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(60) {
                let _ = running.kill();
                return running.wait_with_output().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "run stops the table:\n{err}");
    assert!(err.contains("primary key changed from (id) to (id,v)"), "{err}");
    let out = env.run(&["run", "--once", "--table", "keyed"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the primary key of PostgreSQL table public.keyed changed from (id) to (id, v)"), "{err}");
}

/// A table's topic depends on how many tables run together, so a run of
/// another set than `init`'s would carry a table on another topic (and its
/// consumers would read another log): such a run is refused for that
/// table, naming both topics; `init` with the new set moves it.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_would_move_a_table_to_another_topic_is_refused() {
    let env = TestEnv::new("topicset").await;
    let pool = env.pg().await;
    exec(
        &pool,
        "CREATE TABLE one (id int PRIMARY KEY); CREATE TABLE two (id int PRIMARY KEY); INSERT INTO one VALUES (1)",
    )
    .await;
    env.ok(&["init", "--table", "one", "--table", "two"]);
    let out = env.run(&["run", "--once", "--table", "one"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let topic = &env.settings.kafka.topic;
    assert!(
        err.contains(&format!(
            "set up by `pg2ch init` on topic \"{topic}.one\", but this run would carry it on topic \"{topic}\""
        )),
        "{err}"
    );
    // verify of one table of the set reads no topic: allowed.
    env.ok(&["run", "--once", "--table", "one", "--table", "two"]);
    assert!(env.ok(&["verify", "--table", "one"]).contains("verify: OK"));
    // init with the new set moves the table, saying so.
    let out = env.run(&["init", "--table", "one"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("moves from topic"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.ok(&["run", "--once", "--table", "one"]);
}
