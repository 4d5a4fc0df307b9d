//! PostgreSQL: the source tables. Reading a table's shape from the
//! catalogue ([`catalogue`]), what `init` installs ([`install`]), the
//! [`SourceTable`](crate::stores::SourceTable) adapter producers claim
//! through ([`source`]), and the side `verify` reads ([`verify`]).
//!
//! Every statement binds its values; the SQL text built at run time holds
//! only identifiers from the catalogue, quoted ([`crate::config::pg_ident`]).
//! pg2ch's own objects live in schema `_pg2ch` (a name no role takes, so it
//! never lands on anyone's `search_path` as `"$user"`): the sequence claims
//! draw versions from, the trigger functions, and per source table an outbox
//! of deleted keys.

pub mod catalogue;
pub mod install;
pub mod lease;
pub mod source;
pub mod verify;

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::{PgConfig, bounded, pg_ident};
use crate::schema::{CHANGED_AT, REJECTED, SENT, TableSchema};
use crate::stores::Permanent;

pub use catalogue::{read_table, resolve};
pub use source::{PRODUCER_LOCK_CLASS, PgSource, ProducerLease, RowsCommitted};
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

/// Tags what retrying cannot fix (a table or column is gone, no privilege,
/// a type changed) as permanent; anything else stays retryable.
pub fn classify(e: sqlx::Error) -> anyhow::Error {
    let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
    match code.as_deref() {
        // undefined_table, undefined_column, insufficient_privilege,
        // datatype_mismatch, undefined_function, feature_not_supported
        // ("cached plan must not change result type": the table changed).
        Some(code @ ("42P01" | "42703" | "42501" | "42804" | "42883" | "0A000")) => {
            Permanent::error(format!("PostgreSQL refused the statement ({code}): {e}"))
        }
        _ => anyhow::Error::new(e),
    }
}

/// The schema holding pg2ch's own objects.
pub const OWN_SCHEMA: &str = "_pg2ch";

/// A name in schema `_pg2ch` derived from a source table: `schema.table`,
/// cut and suffixed with a hash when it would pass PostgreSQL's 63 bytes
/// (with `suffix`, which sets objects of one table apart).
pub fn own_name(schema: &TableSchema, suffix: &str) -> String {
    let base = format!("{}.{}", schema.namespace, schema.name);
    let name = if base.len() + suffix.len() <= 63 {
        base
    } else {
        let mut cut = 40;
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&base, &mut h);
        format!("{}_{:016x}", &base[..cut], std::hash::Hasher::finish(&h))
    };
    format!("{name}{suffix}")
}

/// The outbox of a table's deleted keys, quoted: `_pg2ch."public.orders"`.
pub fn outbox(schema: &TableSchema) -> String {
    format!("{OWN_SCHEMA}.{}", pg_ident(&own_name(schema, "")))
}

/// The channel a table's statement trigger notifies.
pub fn channel(schema: &TableSchema) -> String {
    let mut name = format!("pg2ch_{}", schema.name);
    while name.len() > 63 {
        name.pop();
    }
    name
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
        assert_eq!(channel(&t("public", "user_logins")), "pg2ch_user_logins");
    }
}
