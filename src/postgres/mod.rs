//! PostgreSQL: the source tables. Reading a table's shape from the
//! catalogue (`catalogue.rs`), what `init` installs (`install.rs`), the
//! [`SourceTable`](crate::stores::SourceTable) adapter producers claim
//! through ([`PgSource`]), the consumers' leases ([`lease`]), and the side
//! `verify` reads ([`PgVerifySide`]). Only what the tests and benches reach
//! is public.
//!
//! Every statement binds its values; the SQL text built at run time holds
//! only identifiers from the catalogue, quoted ([`crate::config::pg_ident`]).
//! pg2ch's own objects live in schema `_pg2ch` (a name no role takes, so it
//! never lands on anyone's `search_path` as `"$user"`): the sequence claims
//! draw versions from, the trigger functions, and per source table an outbox
//! of deleted keys.

/// The SQL of a CTE `tree(relid)`: the table `$1` and every relation below
/// it (partitions at any depth, inheritance children), for the queries
/// about the relations that hold a table's rows.
macro_rules! table_tree {
    () => {
        "WITH RECURSIVE tree(relid) AS (
             SELECT $1::oid UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.relid) "
    };
}

pub(crate) mod catalogue;
pub(crate) mod install;
pub mod lease;
pub(crate) mod source;
pub(crate) mod verify;

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::{PgConfig, bounded, pg_ident};
use crate::error::{ErrorKind, StoreError};
use crate::schema::{CHANGED_AT, REJECTED, SENT, TableSchema};

pub use catalogue::{read_table, resolve};
pub use source::{PRODUCER_LOCK_CLASS, PgSource, ProducerLease};
pub use verify::PgVerifySide;

/// The options every pg2ch session runs with.
pub fn connect_options(cfg: &PgConfig, settings: &[(&str, &str)]) -> PgConnectOptions {
    PgConnectOptions::new()
        .host(&cfg.host)
        .port(cfg.port)
        .username(&cfg.user)
        .password(cfg.password.expose())
        .database(&cfg.database)
        .application_name("pg2ch")
        .options([
            // A peer gone from the network is noticed by the server within
            // about half a minute, not the kernel's two hours: its locks and
            // its transaction go then.
            ("tcp_keepalives_idle", "15"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
            // Timestamps without a zone are read as UTC, whatever the server's default.
            ("timezone", "UTC"),
            // An interval's text (how it travels) is ISO 8601.
            ("intervalstyle", "iso_8601"),
            // pg2ch's own updates (flags, rejections, repairs) are not
            // changes to send: its triggers skip sessions that say so.
            ("pg2ch.own", "on"),
            // Our statements are prepared once per connection and take arrays
            // of 10k values. PostgreSQL's first five "custom" plans see the
            // array's size and turn the flag update's TID scan into a full
            // sequential scan (measured: 95-130 ms against 24 ms per 10k rows);
            // the generic plan is right for every statement pg2ch runs.
            ("plan_cache_mode", "force_generic_plan"),
        ])
        .options(settings.iter().copied())
}

/// The settings of a producer's sessions, which never scan a table. Their
/// statements keep the generic plan made at first use; made on an empty
/// table (a new outbox, a drained one), that plan is a sequential scan, and
/// it stays one as the table grows: at 20,000 rows/s the flag updates of
/// 10,000 rows then took 1.5-6 s of CPU each, and claims read the whole
/// table (measured: 2,167 sequential scans reading 16M rows in a 40 s run).
/// Without sequential scans the plans are the partial index and TID scans
/// whatever the table's size when they were made.
pub const PRODUCER_SETTINGS: [(&str, &str); 1] = [("enable_seqscan", "off")];

/// [`PRODUCER_SETTINGS`], and server-side bounds of `timeout` (the call
/// timeout): a producer's statement (a claim waiting behind a user's lock,
/// say) and an open transaction left idle end on the server too, not only
/// in pg2ch, which gives up on the call and drops the connection: a server
/// backend waiting for a lock does not notice its client is gone.
pub fn producer_settings(timeout: Duration) -> Vec<(&'static str, String)> {
    let ms = timeout.as_millis().max(1).to_string();
    let mut out: Vec<(&'static str, String)> = PRODUCER_SETTINGS.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    out.push(("statement_timeout", ms.clone()));
    out.push(("idle_in_transaction_session_timeout", ms));
    out
}

/// Opens a pool and proves the server answers and the password is right.
pub async fn connect(cfg: &PgConfig, max_connections: u32, timeout: Duration) -> anyhow::Result<PgPool> {
    connect_with(cfg, max_connections, timeout, &[]).await
}

pub async fn connect_with(
    cfg: &PgConfig,
    max_connections: u32,
    timeout: Duration,
    settings: &[(&str, &str)],
) -> anyhow::Result<PgPool> {
    let options = connect_options(cfg, settings);
    let pool = PgPoolOptions::new().max_connections(max_connections).acquire_timeout(timeout).connect_with(options);
    bounded(|| format!("connecting to {}", cfg.describe()), timeout, async { pool.await.map_err(anyhow::Error::from) })
        .await
        .with_context(|| format!("cannot connect to {}", cfg.describe()))
}

/// A driver error's kind: what retrying cannot fix (a table or column is
/// gone, no privilege, a type changed) is permanent; a statement cut by the
/// server's `statement_timeout` or a connection lost mid-call may have
/// acted; anything else failed without effect.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
        match code.as_deref() {
            // undefined_table, undefined_column, insufficient_privilege,
            // datatype_mismatch, undefined_function, feature_not_supported
            // ("cached plan must not change result type": the table changed).
            Some(code @ ("42P01" | "42703" | "42501" | "42804" | "42883" | "0A000")) => {
                StoreError::permanent(format!("PostgreSQL refused the statement ({code}): {e}"))
            }
            _ if matches!(e, sqlx::Error::Io(_) | sqlx::Error::Protocol(_)) => StoreError::new(ErrorKind::Unknown, e),
            _ => StoreError::new(ErrorKind::Transient, e),
        }
    }
}

/// [`StoreError::from`] a driver error, for `map_err`.
pub fn classify(e: sqlx::Error) -> StoreError {
    e.into()
}

/// The schema holding pg2ch's own objects.
pub const OWN_SCHEMA: &str = "_pg2ch";

/// A stable 64-bit hash of a name: XXH64 with seed 0, whose values its
/// specification fixes (pinned in a test), unlike the standard library's
/// `DefaultHasher`, which may change between Rust releases.
pub fn stable_hash(text: &str) -> u64 {
    twox_hash::XxHash64::oneshot(0, text.as_bytes())
}

/// `text` cut to at most `bytes` bytes, at a character boundary.
fn cut(text: &str, bytes: usize) -> &str {
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A name in schema `_pg2ch` derived from a source table: `schema.table`
/// (with `suffix`, which sets objects of one table apart). When that would
/// pass PostgreSQL's 63 bytes, or be ambiguous (a dot in the schema's or
/// the table's name: `"a.b".c` and `a."b.c"` would both read `a.b.c`), it is
/// cut and suffixed with a stable hash of the quoted, unambiguous name.
pub fn own_name(schema: &TableSchema, suffix: &str) -> String {
    let base = format!("{}.{}", schema.namespace, schema.name);
    let dotted = schema.namespace.contains('.') || schema.name.contains('.');
    let name = if !dotted && base.len() + suffix.len() <= 63 {
        base
    } else {
        let quoted = format!("{}.{}", pg_ident(&schema.namespace), pg_ident(&schema.name));
        format!("{}_{:016x}", cut(&base, 40), stable_hash(&quoted))
    };
    format!("{name}{suffix}")
}

/// The name an older pg2ch gave a table's objects when `schema.table` was
/// too long (hashed with `DefaultHasher`), when it differs from today's:
/// `init` renames what it finds under it.
pub fn legacy_own_name(schema: &TableSchema, suffix: &str) -> Option<String> {
    let base = format!("{}.{}", schema.namespace, schema.name);
    if base.len() + suffix.len() <= 63 {
        return None;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&base, &mut h);
    let legacy = format!("{}_{:016x}{suffix}", cut(&base, 40), std::hash::Hasher::finish(&h));
    (legacy != own_name(schema, suffix)).then_some(legacy)
}

/// The outbox of a table's deleted keys, quoted: `_pg2ch."public.orders"`.
pub fn outbox(schema: &TableSchema) -> String {
    format!("{OWN_SCHEMA}.{}", pg_ident(&own_name(schema, "")))
}

/// Inserts `rows` synthetic login events into `user_logins` in batches of
/// `chunk`, calling `progress` with the number inserted after each batch.
pub async fn seed(pool: &PgPool, rows: u64, chunk: usize, mut progress: impl FnMut(u64)) -> anyhow::Result<()> {
    use rand::Rng;
    let mut rng = rand::rng();
    let now = Utc::now().timestamp_micros();
    let mut done = 0u64;
    while done < rows {
        let n = (rows - done).min(chunk as u64) as usize;
        let mut names = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            names.push(format!("user_{}", rng.random_range(0..100_000)));
            let t = now - rng.random_range(0..30 * 86_400 * 1_000_000i64);
            times.push(DateTime::from_timestamp_micros(t).expect("recent time is in range"));
        }
        insert_events(pool, &names, &times).await?;
        done += n as u64;
        progress(done);
    }
    Ok(())
}

/// Inserts rows into `user_logins` with the given usernames and times (ids from the sequence).
pub async fn insert_events(pool: &PgPool, names: &[String], times: &[DateTime<Utc>]) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO user_logins (username, event_time) SELECT * FROM UNNEST($1::text[], $2::timestamptz[])")
        .bind(names)
        .bind(times)
        .execute(pool)
        .await
        .context("inserting into user_logins")?;
    Ok(())
}

/// Changes waiting to be sent: rows and deletions.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Unsent {
    pub changes: i64,
    /// How long the oldest has waited (seconds), by PostgreSQL's clock.
    pub oldest_seconds: Option<f64>,
}

/// Counts the unsent changes and the age of the oldest.
pub async fn unsent(pool: &PgPool, schema: &TableSchema) -> anyhow::Result<Unsent> {
    let rows: (i64, Option<f64>) = sqlx::query_as(&format!(
        "SELECT count(*), extract(epoch FROM now() - min({}))::float8 FROM {} WHERE NOT {} AND {} IS NULL",
        pg_ident(CHANGED_AT),
        schema.pg_name(),
        pg_ident(SENT),
        pg_ident(REJECTED)
    ))
    .fetch_one(pool)
    .await
    .with_context(|| format!("counting unsent rows of {schema}"))?;
    let deletes: (i64, Option<f64>) = sqlx::query_as(&format!(
        "SELECT count(*), extract(epoch FROM now() - min(deleted_at))::float8 FROM {}",
        outbox(schema)
    ))
    .fetch_one(pool)
    .await
    .with_context(|| format!("counting unsent deletions of {schema}"))?;
    let oldest = [rows.1, deletes.1].into_iter().flatten().reduce(f64::max).map(|s| s.max(0.0));
    Ok(Unsent { changes: rows.0 + deletes.0, oldest_seconds: oldest })
}

/// How far past a version seen downstream the version sequence is moved
/// when it is behind: more than any number of versions claims could draw
/// between reading the sequence and moving it, so that no version is
/// handed out twice.
pub const VERSION_MARGIN: i64 = 1_000_000;

/// Makes the next version drawn exceed `highest` (the highest version a
/// table's rows carry downstream): when the sequence is behind it (`DROP
/// SCHEMA _pg2ch` and `init` again, a point-in-time restore, a failover
/// that lost the sequence's last WAL, a logical-replication upgrade, which
/// does not copy sequences), it is moved to [`VERSION_MARGIN`] past it, and
/// the value before is returned.
pub async fn keep_versions_above(pool: &PgPool, highest: u64) -> anyhow::Result<Option<i64>> {
    let highest = i64::try_from(highest).context("ClickHouse holds a version beyond PostgreSQL's bigint")?;
    let target = highest.checked_add(VERSION_MARGIN).context("ClickHouse holds a version at the end of bigint")?;
    let moved: Option<(i64, i64)> =
        sqlx::query_as("SELECT last_value, setval('_pg2ch.versions', $2) FROM _pg2ch.versions WHERE last_value < $1")
            .bind(highest)
            .bind(target)
            .fetch_optional(pool)
            .await
            .context("moving the version sequence past the versions ClickHouse holds")?;
    Ok(moved.map(|(before, _)| before))
}

/// How far a table's initial load is (the rows that were there when `init`
/// added pg2ch, carried in chunks).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LoadProgress {
    /// The rows there were at `init`, as PostgreSQL's statistics estimated them.
    pub rows_estimate: i64,
    pub chunks: i64,
    pub chunks_left: i64,
    /// Seconds since a producer took its first chunk (to the end, once it
    /// is finished); 0 before.
    pub seconds: f64,
    pub finished: bool,
}

impl LoadProgress {
    /// The share of the chunks carried (0 to 1).
    pub fn done(&self) -> f64 {
        if self.chunks == 0 { 1.0 } else { (self.chunks - self.chunks_left) as f64 / self.chunks as f64 }
    }

    /// The figures in words, with a bar: share, rows, rate and time to go.
    pub fn describe(&self) -> String {
        let done = self.done();
        let rows = (self.rows_estimate as f64 * done) as i64;
        let rate = if self.seconds > 0.0 { rows as f64 / self.seconds } else { 0.0 };
        let filled = (done * 20.0).round() as usize;
        let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled.min(20)));
        if self.rows_estimate <= 0 {
            // A table never analysed: no row count to go by.
            return match self.finished {
                true => format!("{bar} done: {} chunks in {:.1} s", self.chunks, self.seconds),
                false => format!("{bar} {:.0}%: {} of {} chunks left", done * 100.0, self.chunks_left, self.chunks),
            };
        }
        if self.finished {
            return format!("{bar} done: about {} rows in {:.1} s", self.rows_estimate, self.seconds);
        }
        let eta = if rate > 0.0 {
            format!(", about {:.0} s to go", (self.rows_estimate - rows).max(0) as f64 / rate)
        } else {
            String::new()
        };
        format!(
            "{bar} {:.0}%: about {rows} of {} rows, {} of {} chunks left, {rate:.0} rows/s{eta}",
            done * 100.0,
            self.rows_estimate,
            self.chunks_left,
            self.chunks
        )
    }
}

/// The table's initial load, if `init` registered one.
pub async fn load_progress(pool: &PgPool, oid: u32) -> anyhow::Result<Option<LoadProgress>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_pg2ch.loads') IS NOT NULL")
        .fetch_one(pool)
        .await
        .context("looking up the initial loads")?;
    if !exists {
        return Ok(None);
    }
    let row: Option<(i64, i64, i64, f64, bool)> = sqlx::query_as(
        "SELECT l.rows_estimate, l.chunks, (SELECT count(*) FROM _pg2ch.load_chunks c WHERE c.tab = l.tab),
                coalesce(extract(epoch FROM coalesce(l.finished, now()) - l.began)::float8, 0),
                l.finished IS NOT NULL
         FROM _pg2ch.loads l WHERE l.tab = $1",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_optional(pool)
    .await
    .context("reading the initial load's progress")?;
    Ok(row.map(|(rows_estimate, chunks, chunks_left, seconds, finished)| LoadProgress {
        rows_estimate,
        chunks,
        chunks_left,
        seconds: seconds.max(0.0),
        // No chunk left is done, whether or not a producer recorded it yet.
        finished: finished || chunks_left == 0,
    }))
}

/// pg2ch's row triggers that are disabled on the table or its inheritance
/// children (`ALTER TABLE … DISABLE TRIGGER`): changes made meanwhile are
/// never sent. As `relation.trigger`.
pub async fn disabled_triggers(pool: &PgPool, oid: u32) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar(concat!(
        table_tree!(),
        "SELECT t.relid::regclass::text || '.' || g.tgname FROM tree t JOIN pg_trigger g ON g.tgrelid = t.relid
         WHERE g.tgname LIKE 'pg2ch\\_%' AND g.tgenabled = 'D' ORDER BY 1"
    ))
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(pool)
    .await
    .context("reading whether pg2ch's triggers are enabled")
}

/// What to tell about `disabled` triggers ([`disabled_triggers`]).
pub fn disabled_warning(disabled: &[String]) -> String {
    format!(
        "pg2ch's triggers are disabled ({}): changes made while they are are never sent; enable them, then \
         `pg2ch verify --repair`",
        disabled.join(", ")
    )
}

/// How many rows are flagged rejected.
pub async fn rejected_count<'c>(db: impl sqlx::PgExecutor<'c>, schema: &TableSchema) -> anyhow::Result<u64> {
    let count: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE {} IS NOT NULL",
        schema.pg_name(),
        pg_ident(REJECTED)
    ))
    .fetch_one(db)
    .await
    .with_context(|| format!("counting rejected rows of {schema}"))?;
    Ok(count as u64)
}

/// A row's physical address, PostgreSQL's `tid`, in its binary wire form
/// (block number, line pointer), so claiming and flagging by ctid costs no
/// text formatting or parsing on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tid {
    block: u32,
    offset: u16,
}

impl sqlx::Type<sqlx::Postgres> for Tid {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(sqlx::postgres::types::Oid(27))
    }
}

impl sqlx::postgres::PgHasArrayType for Tid {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(sqlx::postgres::types::Oid(1010))
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Tid {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        buf.extend_from_slice(&self.block.to_be_bytes());
        buf.extend_from_slice(&self.offset.to_be_bytes());
        Ok(sqlx::encode::IsNull::No)
    }
}

impl sqlx::Decode<'_, sqlx::Postgres> for Tid {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        let bytes: [u8; 6] = <&[u8] as sqlx::Decode<sqlx::Postgres>>::decode(value)?
            .try_into()
            .map_err(|_| "a tid is 6 bytes in binary form")?;
        Ok(Tid {
            block: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            offset: u16::from_be_bytes([bytes[4], bytes[5]]),
        })
    }
}

/// The values of the first columns of `row`, as `columns` type them.
pub fn decode_row<'a>(
    row: &sqlx::postgres::PgRow,
    columns: impl Iterator<Item = &'a crate::schema::Column>,
) -> anyhow::Result<Vec<crate::types::Value>> {
    columns.enumerate().map(|(i, c)| decode_column(row, i, c).map_err(anyhow::Error::msg)).collect()
}

/// The value of column `c` at position `i` of `row`, or why it cannot be
/// read, in words naming the column.
pub fn decode_column(
    row: &sqlx::postgres::PgRow,
    i: usize,
    c: &crate::schema::Column,
) -> Result<crate::types::Value, String> {
    use sqlx::Row;
    let raw = row.try_get_raw(i).map_err(|e| format!("column {}: {e}", c.name))?;
    let bytes = if sqlx::ValueRef::is_null(&raw) {
        None
    } else {
        Some(raw.as_bytes().map_err(|e| format!("column {}: {e}", c.name))?)
    };
    crate::types::postgres::decode(&c.ty, bytes).map_err(|e| format!("column {}: {e}", c.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Column;
    use crate::types::PgType;

    #[test]
    fn own_names_fit_postgres_and_stay_apart() {
        let t = |ns: &str, name: &str| {
            TableSchema::new(ns, name, vec![Column { name: "id".into(), ty: PgType::Int8, nullable: false }], vec![0])
        };
        assert_eq!(outbox(&t("public", "orders")), "_pg2ch.\"public.orders\"");
        let long = "x".repeat(60);
        let a = own_name(&t("public", &long), "_keys");
        let b = own_name(&t("sales", &long), "_keys");
        assert!(a.len() <= 63 && b.len() <= 63 && a != b, "{a} {b}");
        // Names a dot would make one: apart, and still short ones stay as they were.
        let (x, y) = (own_name(&t("a.b", "c"), ""), own_name(&t("a", "b.c"), ""));
        assert!(x != y && x.starts_with("a.b.c_") && y.starts_with("a.b.c_"), "{x} {y}");
        assert_eq!(own_name(&t("public", "orders"), "_keys"), "public.orders_keys");
        // Multi-byte characters are cut at a boundary.
        let wide = own_name(&t("public", &"é".repeat(40)), "");
        assert!(wide.len() <= 63, "{wide}");
    }

    #[test]
    fn the_hash_in_long_names_is_pinned() {
        // Deletions wait in an outbox named with this hash: it must never
        // change, whatever the toolchain. XXH64's reference values:
        assert_eq!(stable_hash(""), 0xef46_db37_51d8_e999);
        let t = TableSchema::new(
            "public",
            "x".repeat(60),
            vec![Column { name: "id".into(), ty: PgType::Int8, nullable: false }],
            vec![0],
        );
        assert_eq!(own_name(&t, ""), format!("public.{}_{:016x}", "x".repeat(33), PINNED_LONG));
    }

    /// The hash of `"public"."xxx…"` (60 x), as pg2ch names its objects.
    const PINNED_LONG: u64 = 0x1085_cfe8_95d4_b762;
}
