//! What `init` installs on a source table, idempotently, and what every
//! start checks is there.
//!
//! On the table: the columns `sent_to_kafka`, `pg2ch_rejected` and
//! `pg2ch_version` (catalogue-only changes: no rewrite), a partial index on
//! the key over unsent rows (text in the `C` collation, the order pg2ch
//! claims in), and triggers:
//!
//! - `pg2ch_unsent`, `BEFORE UPDATE`, per row: a changed row becomes unsent
//!   and loses its rejection, and `pg2ch_changed_at` records when. pg2ch's own sessions set `pg2ch.own = on`, and
//!   the trigger's `WHEN` skips them, so its flag updates never fire it
//!   (no column list, so that dropping a column needs no `CASCADE`);
//! - `pg2ch_deleted`, `AFTER DELETE`, and `pg2ch_rekeyed`, `AFTER UPDATE OF`
//!   the key when it changed, per row: the old key goes into the table's
//!   outbox (`_pg2ch."schema.table"`), which producers drain like the table.
//!
//! No statement-level trigger: producers find new rows by looking at the
//! partial index (an idle one looks again after a wait that grows to the
//! poll interval), so a user's statement pays for no notification.
//! An older pg2ch's `pg2ch_notify` trigger is dropped by `init` and by the
//! next start (with its function and registry once no table uses them).
//!
//! The functions that write or read pg2ch's own tables run with the rights
//! of the role that ran `init` (`SECURITY DEFINER`, with a fixed
//! `search_path`), so an application role with nothing but DML rights on
//! the table keeps every DML after `init`.
//!
//! Online: `init` never makes the table's writers wait for long. pg2ch's
//! own objects come first (they lock nothing of the user's); the columns and
//! triggers are added in one short transaction under a `lock_timeout`,
//! retried when a long transaction holds the table, so that `init` never
//! queues the table's queries behind it; the partial index is built
//! `CONCURRENTLY` (partition by partition for a partitioned table), and an
//! invalid one left by an interrupted build is dropped and built again.
//!
//! Row triggers go on every inheritance child too (a declaratively
//! partitioned table passes its own to its partitions).

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;

use super::catalogue::trigger_holders;
use super::{outbox, own_name};
use crate::config::pg_ident;
use crate::schema::{CHANGED_AT, DEFAULT_TABLE, OWN_COLUMNS, REJECTED, SENT, TableSchema, VERSION};
use crate::types::PgType;

/// Creates `user_logins` when it is absent (`init` of the default table).
pub async fn create_default(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {DEFAULT_TABLE} (
             id BIGSERIAL PRIMARY KEY,
             username TEXT NOT NULL,
             event_time TIMESTAMPTZ NOT NULL DEFAULT now(),
             sent_to_kafka BOOLEAN NOT NULL DEFAULT FALSE)"
    ))
    .execute(pool)
    .await
    .context("creating user_logins")?;
    Ok(())
}

/// A string literal for SQL text (standard-conforming: only quotes double).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The key's columns as pg2ch orders them: text in the `C` collation.
pub fn order_by(schema: &TableSchema, prefix: &str) -> String {
    schema
        .key_columns()
        .map(|c| match c.ty {
            PgType::Text | PgType::Bpchar => format!("{prefix}{} COLLATE \"C\"", pg_ident(&c.name)),
            _ => format!("{prefix}{}", pg_ident(&c.name)),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_list(schema: &TableSchema) -> String {
    schema.key_columns().map(|c| pg_ident(&c.name)).collect::<Vec<_>>().join(", ")
}

/// A dollar-quoting tag the body does not contain.
fn dollar_tag(body: &str) -> String {
    (0..).map(|n| format!("$pg2ch{n}$")).find(|t| !body.contains(t.as_str())).expect("some tag is free")
}

/// The `WHEN` that leaves pg2ch's own sessions out.
const NOT_OURS: &str = "current_setting('pg2ch.own', true) IS DISTINCT FROM 'on'";

/// The statements that install pg2ch's triggers on one relation.
fn trigger_statements(schema: &TableSchema, relation: &str) -> Vec<String> {
    let record = format!("_pg2ch.{}()", pg_ident(&own_name(schema, "")));
    let changed = schema
        .key_columns()
        .map(|c| format!("OLD.{0} IS DISTINCT FROM NEW.{0}", pg_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(" OR ");
    vec![
        format!(
            "CREATE OR REPLACE TRIGGER pg2ch_unsent BEFORE UPDATE ON {relation} FOR EACH ROW WHEN ({NOT_OURS}) \
             EXECUTE FUNCTION _pg2ch.unsent()"
        ),
        format!(
            "CREATE OR REPLACE TRIGGER pg2ch_deleted AFTER DELETE ON {relation} FOR EACH ROW EXECUTE FUNCTION {record}"
        ),
        format!(
            "CREATE OR REPLACE TRIGGER pg2ch_rekeyed AFTER UPDATE OF {} ON {relation} FOR EACH ROW WHEN ({changed}) EXECUTE FUNCTION {record}",
            key_list(schema)
        ),
    ]
}

/// How long one attempt at a step that locks the user's table may wait for
/// its lock. Queries of the table that come meanwhile queue behind the
/// waiting step, so this bounds how long `init` can make them wait.
pub const LOCK_TIMEOUT_MS: u64 = 100;

/// How long `init` (or a start) keeps retrying a step whose lock a long
/// transaction holds, before it gives up naming the sessions that hold it.
pub const LOCK_PATIENCE: Duration = Duration::from_secs(300);

/// The initial loads: one row per table whose existing rows are still
/// being carried (`tab`, the table's oid), with what the progress figures
/// need (`began`: when a producer took its first chunk); and the chunks left to carry, each a range of one relation's
/// physical addresses (`first` to before `stop`) in the file it had when
/// the chunk was made (`filenode`: a rewrite moves every row), held by the
/// backend process carrying it (`taker`) until it is done.
pub const LOADS: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS _pg2ch.loads (
         tab oid PRIMARY KEY, rows_estimate int8 NOT NULL, chunks int8 NOT NULL,
         registered timestamptz NOT NULL DEFAULT now(), began timestamptz, finished timestamptz)",
    "CREATE TABLE IF NOT EXISTS _pg2ch.load_chunks (
         tab oid NOT NULL, relid oid NOT NULL, filenode oid NOT NULL, first tid NOT NULL, stop tid NOT NULL,
         taker int, PRIMARY KEY (tab, relid, first))",
];

/// What `init` last set each table up with: its primary key (ClickHouse
/// keeps one row per that key, its `ORDER BY`) and its topic. A start
/// refuses a table whose key changed since, or that it would carry on
/// another topic (one table runs on `KAFKA_TOPIC`, several each on
/// `<KAFKA_TOPIC>.<table>`: a run of another set of tables would move it).
pub const TABLES: &str =
    "CREATE TABLE IF NOT EXISTS _pg2ch.tables (tab oid PRIMARY KEY, key text[] NOT NULL, topic text NOT NULL)";

/// Records, at `init`, the table's primary key and topic: the key when
/// none is recorded, or, with `new_sink` (its ClickHouse table is made
/// now), whatever was; the topic always (saying so when it moves); then
/// checks the record ([`check_table`]).
pub async fn record_table(
    pool: &PgPool,
    oid: u32,
    schema: &TableSchema,
    topic: &str,
    new_sink: bool,
) -> anyhow::Result<()> {
    let key = super::catalogue::primary_key(pool, oid).await?;
    let before: Option<String> = sqlx::query_scalar("SELECT topic FROM _pg2ch.tables WHERE tab = $1")
        .bind(sqlx::postgres::types::Oid(oid))
        .fetch_optional(pool)
        .await
        .with_context(|| format!("reading what init recorded of {schema}"))?;
    if let Some(before) = before.filter(|b| b != topic) {
        tracing::warn!(
            "{schema}: moves from topic {before:?} to {topic:?}; records of the old topic not yet written to \
             ClickHouse are not read any more (drain it with `run --once` first)"
        );
    }
    let sql = if new_sink {
        "INSERT INTO _pg2ch.tables VALUES ($1, $2, $3) ON CONFLICT (tab) DO UPDATE SET key = EXCLUDED.key, topic = EXCLUDED.topic"
    } else {
        "INSERT INTO _pg2ch.tables VALUES ($1, $2, $3) ON CONFLICT (tab) DO UPDATE SET topic = EXCLUDED.topic"
    };
    sqlx::query(sql)
        .bind(sqlx::postgres::types::Oid(oid))
        .bind(&key)
        .bind(topic)
        .execute(pool)
        .await
        .with_context(|| format!("recording the primary key and topic of {schema}"))?;
    check_table(pool, oid, schema, Some(topic)).await
}

/// Fails, for good and naming both, when the table's primary key is not
/// the one `init` recorded, or `topic` (when given: a run that carries the
/// table) not its topic (an install before the record: nothing to check).
pub async fn check_table(pool: &PgPool, oid: u32, schema: &TableSchema, topic: Option<&str>) -> anyhow::Result<()> {
    let registry: bool = sqlx::query_scalar("SELECT to_regclass('_pg2ch.tables') IS NOT NULL")
        .fetch_one(pool)
        .await
        .context("looking up what init recorded")?;
    if !registry {
        return Ok(());
    }
    let recorded: Option<(Vec<String>, String)> = sqlx::query_as("SELECT key, topic FROM _pg2ch.tables WHERE tab = $1")
        .bind(sqlx::postgres::types::Oid(oid))
        .fetch_optional(pool)
        .await
        .context("reading what init recorded")?;
    let Some((was, recorded_topic)) = recorded else { return Ok(()) };
    let now = super::catalogue::primary_key(pool, oid).await?;
    if was != now {
        return Err(crate::error::StoreError::permanent(format!(
            "the primary key of PostgreSQL table {schema} changed from ({}) to ({}) since `pg2ch init`; ClickHouse \
             keeps one row per the old key, so pg2ch stops this table: drop its ClickHouse table, run `pg2ch init` \
             (which makes it anew by the new key) and `pg2ch verify --repair` (which sends every row again)",
            was.join(", "),
            now.join(", ")
        ))
        .into());
    }
    if let Some(topic) = topic.filter(|t| *t != recorded_topic) {
        return Err(crate::error::StoreError::permanent(format!(
            "PostgreSQL table {schema} was set up by `pg2ch init` on topic {recorded_topic:?}, but this run would \
             carry it on topic {topic:?} (one table runs on KAFKA_TOPIC, several each on <KAFKA_TOPIC>.<table>): \
             run the tables `init` was given, or `pg2ch init` this set (after `run --once` drained the old topic)"
        ))
        .into());
    }
    Ok(())
}

/// Heap blocks per chunk of an initial load (2 MB of table).
pub const CHUNK_BLOCKS: i64 = 256;

/// Makes the chunks of the table `$1`'s initial load that cover every block
/// of its relations holding rows (the table, its partitions, its inheritance
/// children), or of the one relation `$3` when it is not NULL; `$2` blocks
/// each, fewer where values stored out of line (TOAST) make the rows of a
/// block bigger, so that a chunk holds about `$2` blocks of data. Run under
/// a lock that keeps rows where they are (the `ALTER TABLE` of `init`), or
/// when a relation's file was replaced (its rows may be anywhere now: all
/// of it is carried again).
pub const MAKE_CHUNKS: &str = concat!(
    table_tree!(),
    "INSERT INTO _pg2ch.load_chunks (tab, relid, filenode, first, stop)
     SELECT $1, t.relid, pg_relation_filenode(t.relid), format('(%s,0)', b)::tid, format('(%s,0)', b + s.step)::tid
     FROM tree t JOIN pg_class c ON c.oid = t.relid AND c.relkind = 'r'
     CROSS JOIN LATERAL (SELECT pg_relation_size(t.relid) AS heap,
                                coalesce(pg_relation_size(nullif(c.reltoastrelid, 0)), 0) AS toast) z
     CROSS JOIN LATERAL (SELECT greatest(1, ($2 * z.heap / greatest(z.heap + z.toast, 1)))::int8 AS step) s
     CROSS JOIN LATERAL generate_series(0::int8, z.heap / current_setting('block_size')::int8 - 1, s.step) b
     WHERE $3::oid IS NULL OR t.relid = $3
     ON CONFLICT DO NOTHING"
);

/// Registers the table `$1`'s initial load once its chunks are made.
const REGISTER_LOAD: &str = "INSERT INTO _pg2ch.loads (tab, rows_estimate, chunks)
     SELECT $1, coalesce((SELECT sum(greatest(c.reltuples, 0))::int8 FROM pg_class c
                          WHERE c.oid IN (SELECT relid FROM _pg2ch.load_chunks WHERE tab = $1)), 0),
            (SELECT count(*) FROM _pg2ch.load_chunks WHERE tab = $1)
     ON CONFLICT (tab) DO NOTHING";

/// `SECURITY DEFINER` with a `search_path` no caller can change.
const DEFINER: &str = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp";

/// The function every table's `pg2ch_unsent` trigger runs. It touches only
/// the row: no rights needed, no `SET` (which would cost a configuration
/// save and restore in every row of every `UPDATE`).
const UNSENT_FUNCTION: &str = "CREATE OR REPLACE FUNCTION _pg2ch.unsent() RETURNS trigger LANGUAGE plpgsql AS $$ \
     BEGIN NEW.sent_to_kafka := false; NEW.pg2ch_rejected := NULL; NEW.pg2ch_changed_at := pg_catalog.now(); \
     RETURN NEW; END $$";

/// The statement-level trigger an older pg2ch put on every table to wake
/// idle producers, and what it used.
const RETIRED_TRIGGER: &str = "pg2ch_notify";
const RETIRED_OBJECTS: [&str; 2] = ["DROP FUNCTION IF EXISTS _pg2ch.notify()", "DROP TABLE IF EXISTS _pg2ch.waiting"];

/// Drops the function and registry an older pg2ch's `pg2ch_notify`
/// triggers used, once no table has such a trigger left (a table not yet
/// started again keeps them). Where they are gone, this is one lookup.
async fn drop_retired_objects(pool: &PgPool) -> anyhow::Result<()> {
    let unused: bool = sqlx::query_scalar(
        "SELECT to_regprocedure('_pg2ch.notify()') IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = $1)",
    )
    .bind(RETIRED_TRIGGER)
    .fetch_one(pool)
    .await
    .context("looking for an older pg2ch's statement triggers")?;
    if unused {
        for sql in RETIRED_OBJECTS {
            sqlx::query(sql).execute(pool).await.with_context(|| format!("PostgreSQL: {sql}"))?;
        }
    }
    Ok(())
}

/// Installs pg2ch on the table with this oid (see the module comment).
pub async fn install(pool: &PgPool, oid: u32, schema: &TableSchema) -> anyhow::Result<()> {
    let t = schema.pg_name();
    let key_types: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = $1 AND attname = ANY($2) ORDER BY attnum",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .bind(schema.key_columns().map(|c| c.name.clone()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
    .context("reading the key's types")?;
    let outbox_columns = key_types.iter().map(|(n, ty)| format!("{} {ty} NOT NULL", pg_ident(n))).collect::<Vec<_>>();
    let keys = key_list(schema);
    let record_body = format!(
        "BEGIN INSERT INTO {} ({keys}) VALUES ({}) ON CONFLICT ({keys}) DO UPDATE SET deleted_at = EXCLUDED.deleted_at; \
         RETURN NULL; END",
        outbox(schema),
        schema.key_columns().map(|c| format!("OLD.{}", pg_ident(&c.name))).collect::<Vec<_>>().join(", ")
    );
    let tag = dollar_tag(&record_body);
    rename_legacy_objects(pool, schema).await?;
    // pg2ch's own objects: nothing here locks the user's table.
    let mut own = vec![
        "CREATE SCHEMA IF NOT EXISTS _pg2ch".to_owned(),
        "CREATE SEQUENCE IF NOT EXISTS _pg2ch.versions".to_owned(),
        // The consumer groups whose partition leases live here.
        super::lease::REGISTRY.to_owned(),
        LOADS[0].to_owned(),
        LOADS[1].to_owned(),
        TABLES.to_owned(),
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({}, deleted_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY ({keys}))",
            outbox(schema),
            outbox_columns.join(", ")
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} ({})",
            pg_ident(&own_name(schema, "_keys")),
            outbox(schema),
            order_by(schema, "")
        ),
    ];
    own.push(UNSENT_FUNCTION.to_owned());
    own.push(format!(
        "CREATE OR REPLACE FUNCTION _pg2ch.{}() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS {tag} {record_body} {tag}",
        pg_ident(&own_name(schema, ""))
    ));
    for sql in &own {
        sqlx::query(sql)
            .execute(pool)
            .await
            .with_context(|| format!("PostgreSQL init of {schema}: {}", sql.lines().next().unwrap_or(sql)))?;
    }
    // The columns and triggers: one short step under a lock timeout.
    let present = columns(pool, oid, schema).await?;
    let added = [
        // The rows already there read sent without being written (a
        // catalogue-only default); the initial load carries them. Rows
        // written from now on take the default set below: unsent.
        format!("{} BOOLEAN NOT NULL DEFAULT TRUE", pg_ident(SENT)),
        // Why a row could not be sent; such rows are skipped by claims and reported.
        format!("{} TEXT", pg_ident(REJECTED)),
        // The version a row was last sent as (claims give versions).
        format!("{} BIGINT NOT NULL DEFAULT 0", pg_ident(VERSION)),
        // When the row last changed, for the lag in time (`status`). now()
        // is stable, so existing rows take init's time without a rewrite.
        format!("{} TIMESTAMPTZ NOT NULL DEFAULT now()", pg_ident(CHANGED_AT)),
    ];
    let missing: Vec<String> = OWN_COLUMNS
        .into_iter()
        .zip(added)
        .filter(|(name, _)| !present.iter().any(|p| p == name))
        .map(|(_, definition)| format!("ADD COLUMN IF NOT EXISTS {definition}"))
        .collect();
    let loads = !present.iter().any(|p| p == SENT);
    let mut locked = Vec::new();
    if !missing.is_empty() {
        locked.push(Step::Sql(format!("ALTER TABLE {t} {}", missing.join(", "))));
    }
    if loads {
        locked.push(Step::Sql(format!("ALTER TABLE {t} ALTER COLUMN {} SET DEFAULT FALSE", pg_ident(SENT))));
        locked.push(Step::Load);
    }
    locked.extend(triggers(pool, oid, schema).await?.into_iter().map(Step::Sql));
    briefly_locked_steps(pool, oid, schema, "adding pg2ch's columns and triggers", &locked).await?;
    if loads {
        tracing::info!(
            "{schema}: the rows already there are carried by the initial load of the next `run` or `produce`"
        );
    }
    drop_legacy_function(pool, schema).await?;
    drop_retired_objects(pool).await?;
    unsent_index(pool, oid, schema).await
}

/// One statement of a [`briefly_locked`] transaction.
pub enum Step {
    Sql(String),
    /// Makes and registers the table's initial load (its rows stay put
    /// while the transaction holds the table).
    Load,
}

/// Makes the chunks of the table's initial load and registers it.
async fn make_load(tx: &mut sqlx::PgConnection, oid: u32) -> Result<(), sqlx::Error> {
    let oid = sqlx::postgres::types::Oid(oid);
    sqlx::query(MAKE_CHUNKS)
        .bind(oid)
        .bind(CHUNK_BLOCKS)
        .bind(None::<sqlx::postgres::types::Oid>)
        .execute(&mut *tx)
        .await?;
    sqlx::query(REGISTER_LOAD).bind(oid).execute(&mut *tx).await?;
    Ok(())
}

/// Gives the objects an older pg2ch named differently (a long table name
/// hashed with `DefaultHasher`) today's names: the outbox (with the
/// deletions waiting in it) and its index. The old record function is
/// dropped once the triggers call the new one ([`drop_legacy_function`]).
async fn rename_legacy_objects(pool: &PgPool, schema: &TableSchema) -> anyhow::Result<()> {
    let (Some(old), Some(old_keys)) = (super::legacy_own_name(schema, ""), super::legacy_own_name(schema, "_keys"))
    else {
        return Ok(());
    };
    let (old_table, new_table) = (format!("_pg2ch.{}", pg_ident(&old)), outbox(schema));
    let (exists, taken): (bool, bool) =
        sqlx::query_as("SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL")
            .bind(&old_table)
            .bind(&new_table)
            .fetch_one(pool)
            .await
            .context("looking up an outbox an older pg2ch named")?;
    if !exists || taken {
        return Ok(());
    }
    tracing::info!("{schema}: renaming the outbox {old_table} an older pg2ch made to {new_table}");
    let new_keys = pg_ident(&own_name(schema, "_keys"));
    for sql in [
        format!("ALTER TABLE {old_table} RENAME TO {}", pg_ident(&own_name(schema, ""))),
        format!("ALTER INDEX IF EXISTS _pg2ch.{} RENAME TO {new_keys}", pg_ident(&old_keys)),
    ] {
        sqlx::query(&sql).execute(pool).await.with_context(|| format!("PostgreSQL init of {schema}: {sql}"))?;
    }
    Ok(())
}

/// Drops the record function an older pg2ch named differently, once no
/// trigger calls it.
async fn drop_legacy_function(pool: &PgPool, schema: &TableSchema) -> anyhow::Result<()> {
    if let Some(old) = super::legacy_own_name(schema, "") {
        let sql = format!("DROP FUNCTION IF EXISTS _pg2ch.{}()", pg_ident(&old));
        sqlx::query(&sql).execute(pool).await.with_context(|| format!("PostgreSQL init of {schema}: {sql}"))?;
    }
    Ok(())
}

/// The names of the table's columns.
async fn columns(pool: &PgPool, oid: u32, schema: &TableSchema) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar("SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped")
        .bind(sqlx::postgres::types::Oid(oid))
        .fetch_all(pool)
        .await
        .with_context(|| format!("reading the columns of {schema}"))
}

/// Whether a PostgreSQL error is a lock that was not granted in time.
fn lock_not_available(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "55P03")
}

/// Runs `statements` in one transaction that waits at most
/// [`LOCK_TIMEOUT_MS`] for each lock, so that queries of the table never
/// queue behind it for longer; when a lock is not granted in time (a long
/// transaction holds the table), the transaction is rolled back and tried
/// again after a growing pause, for up to [`LOCK_PATIENCE`].
pub async fn briefly_locked(
    pool: &PgPool,
    oid: u32,
    schema: &TableSchema,
    what: &str,
    statements: &[String],
) -> anyhow::Result<()> {
    let steps: Vec<Step> = statements.iter().cloned().map(Step::Sql).collect();
    briefly_locked_steps(pool, oid, schema, what, &steps).await
}

/// [`briefly_locked`] with steps that may make an initial load.
pub async fn briefly_locked_steps(
    pool: &PgPool,
    oid: u32,
    schema: &TableSchema,
    what: &str,
    statements: &[Step],
) -> anyhow::Result<()> {
    if statements.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let mut tx = pool.begin().await.with_context(|| format!("{what} on {schema}: opening a transaction"))?;
        sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("{what} on {schema}: setting a lock timeout"))?;
        let mut failed = None;
        for step in statements {
            let done = match step {
                Step::Sql(sql) => sqlx::query(sql).execute(&mut *tx).await.map(|_| ()),
                Step::Load => make_load(&mut tx, oid).await,
            };
            if let Err(e) = done {
                failed = Some((step, e));
                break;
            }
        }
        match failed {
            None => {
                tx.commit().await.with_context(|| format!("{what} on {schema}: committing"))?;
                if attempts > 1 {
                    tracing::info!("{schema}: {what}: done after {attempts} attempts");
                }
                return Ok(());
            }
            Some((_, e)) if lock_not_available(&e) => {
                let _ = tx.rollback().await;
                let holders: Vec<i32> = sqlx::query_scalar(
                    "SELECT DISTINCT pid FROM pg_locks WHERE relation = $1 AND granted AND pid <> pg_backend_pid() ORDER BY pid",
                )
                .bind(sqlx::postgres::types::Oid(oid))
                .fetch_all(pool)
                .await
                .unwrap_or_default();
                if started.elapsed() >= LOCK_PATIENCE {
                    anyhow::bail!(
                        "{what} on {schema}: the table stayed locked by other sessions (pids {holders:?}) for {:?}; \
                         pg2ch waited at most {LOCK_TIMEOUT_MS} ms at a time so as not to hold up their queries; \
                         run it again when they are done",
                        LOCK_PATIENCE
                    );
                }
                if attempts == 1 {
                    tracing::info!(
                        "{schema}: {what}: the table is locked by other sessions (pids {holders:?}); retrying, \
                         waiting at most {LOCK_TIMEOUT_MS} ms at a time so that their queries are not held up"
                    );
                }
                let jitter = Duration::from_millis(rand::random_range(0..=pause.as_millis() as u64 / 2));
                tokio::time::sleep(pause + jitter).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Some((step, e)) => {
                let sql = match step {
                    Step::Sql(sql) => sql.as_str(),
                    Step::Load => "making the initial load's chunks",
                };
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("{what} on {schema}: {}", sql.lines().next().unwrap_or(sql)));
            }
        }
    }
}

/// The name of a relation's partial index of unsent rows (in its schema):
/// `<relation>_unsent_idx`, or, when that would pass 63 bytes, the
/// relation's name cut and a stable hash of it (cut alone, two long names
/// with one beginning would share an index name, and the second table's
/// index would never be built).
fn index_name(relation: &str) -> String {
    let plain = format!("{relation}_unsent_idx");
    if plain.len() <= 63 {
        return plain;
    }
    let mut end = 30;
    while !relation.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}_{:016x}_unsent_idx", &relation[..end], super::stable_hash(relation))
}

/// The name an older pg2ch gave a long relation's index: cut at 63 characters.
fn legacy_index_name(relation: &str) -> Option<String> {
    let legacy: String = format!("{relation}_unsent_idx").chars().take(63).collect();
    (legacy != index_name(relation)).then_some(legacy)
}

/// One relation of a table's partition tree (the table itself at level 0).
#[derive(Debug)]
struct Node {
    oid: sqlx::postgres::types::Oid,
    parent: Option<sqlx::postgres::types::Oid>,
    leaf: bool,
    level: i32,
    namespace: String,
    name: String,
}

impl Node {
    /// The relation, schema-qualified and quoted.
    fn relation(&self) -> String {
        format!("{}.{}", pg_ident(&self.namespace), pg_ident(&self.name))
    }

    /// Its partial index of unsent rows, schema-qualified and quoted.
    fn index(&self) -> String {
        format!("{}.{}", pg_ident(&self.namespace), pg_ident(&index_name(&self.name)))
    }
}

/// Builds the partial index of unsent rows without blocking the table's
/// writers: `CREATE INDEX CONCURRENTLY` on a table; on a partitioned one,
/// an index `ON ONLY` each partitioned level, one built concurrently on each
/// leaf, attached level by level from the bottom (a partitioned table
/// cannot build its index concurrently). What is already there and valid
/// is kept; an invalid index (an interrupted build) is dropped and built again.
async fn unsent_index(pool: &PgPool, oid: u32, schema: &TableSchema) -> anyhow::Result<()> {
    type Row = (sqlx::postgres::types::Oid, Option<sqlx::postgres::types::Oid>, bool, i32, String, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT t.relid::oid AS oid, t.parentrelid::oid AS parent, t.isleaf AS leaf, t.level, n.nspname::text AS namespace,
                c.relname::text AS name
         FROM pg_partition_tree($1) t JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') ORDER BY t.level, t.relid",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(pool)
    .await
    .with_context(|| format!("reading the partitions of {schema}"))?;
    let mut tree: Vec<Node> = rows
        .into_iter()
        .map(|(oid, parent, leaf, level, namespace, name)| Node { oid, parent, leaf, level, namespace, name })
        .collect();
    if tree.is_empty() {
        // Not a partition tree member (pg_partition_tree answers nothing for
        // some relations): the table alone.
        tree.push(Node {
            oid: sqlx::postgres::types::Oid(oid),
            parent: None,
            leaf: true,
            level: 0,
            namespace: schema.namespace.clone(),
            name: schema.name.clone(),
        });
    }
    let predicate = format!("WHERE NOT {}", pg_ident(SENT));
    let columns = order_by(schema, "");
    if index_valid(pool, &tree[0].index()).await? == Some(true) {
        return Ok(());
    }
    // Partitioned levels first, top down: an index of their own only.
    for node in tree.iter().filter(|n| !n.leaf) {
        if index_valid(pool, &node.index()).await?.is_none() {
            let sql = format!(
                "CREATE INDEX IF NOT EXISTS {} ON ONLY {} ({columns}) {predicate}",
                pg_ident(&index_name(&node.name)),
                node.relation()
            );
            briefly_locked(pool, oid, schema, "creating the index of a partitioned level", &[sql]).await?;
        }
    }
    // Then each leaf's, concurrently, and attached from the bottom up. A
    // relation whose parent's index already has one of its indexes attached
    // (whatever its name) is covered.
    let mut by_level: Vec<&Node> = tree.iter().collect();
    by_level.sort_by_key(|n| std::cmp::Reverse(n.level));
    for node in by_level {
        let parent = node.parent.and_then(|p| tree.iter().find(|n| n.oid == p));
        let attached = match parent {
            Some(parent) => attached_index(pool, parent, node).await?,
            None => false,
        };
        if attached {
            continue;
        }
        if node.leaf {
            build_concurrently(pool, node, &columns, &predicate, schema).await?;
        }
        if let Some(parent) = parent {
            let sql = format!("ALTER INDEX {} ATTACH PARTITION {}", parent.index(), node.index());
            briefly_locked(pool, oid, schema, "attaching a partition's index", &[sql]).await?;
        }
    }
    Ok(())
}

/// Whether an index `name` exists, and is valid; `None` when absent.
async fn index_valid(pool: &PgPool, name: &str) -> anyhow::Result<Option<bool>> {
    sqlx::query_scalar("SELECT x.indisvalid FROM pg_index x WHERE x.indexrelid = to_regclass($1)")
        .bind(name)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("looking up index {name}"))
}

/// Whether pg2ch's index of `parent` has an index of `node` attached.
async fn attached_index(pool: &PgPool, parent: &Node, node: &Node) -> anyhow::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid
                        WHERE i.inhparent = to_regclass($1) AND x.indrelid = $2)",
    )
    .bind(parent.index())
    .bind(node.oid)
    .fetch_one(pool)
    .await
    .context("looking up a partition's index")
}

/// `CREATE INDEX CONCURRENTLY` on one table, after dropping an invalid
/// index of the same name; logs its progress while it runs.
async fn build_concurrently(
    pool: &PgPool,
    node: &Node,
    columns: &str,
    predicate: &str,
    schema: &TableSchema,
) -> anyhow::Result<()> {
    let index = node.index();
    if let Some(legacy) = legacy_index_name(&node.name) {
        let legacy = format!("{}.{}", pg_ident(&node.namespace), pg_ident(&legacy));
        let ours: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_index x WHERE x.indexrelid = to_regclass($1) AND x.indrelid = $2)",
        )
        .bind(&legacy)
        .bind(node.oid)
        .fetch_one(pool)
        .await
        .context("looking up an index an older pg2ch named")?;
        if ours && index_valid(pool, &index).await?.is_none() {
            let sql = format!("ALTER INDEX {legacy} RENAME TO {}", pg_ident(&index_name(&node.name)));
            briefly_locked(pool, node.oid.0, schema, "renaming the index an older pg2ch named", &[sql]).await?;
        }
    }
    match index_valid(pool, &index).await? {
        Some(true) => return Ok(()),
        Some(false) => {
            tracing::info!("{schema}: index {index} is invalid (an interrupted build); dropping and building it again");
            sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}"))
                .execute(pool)
                .await
                .with_context(|| format!("dropping the invalid index {index}"))?;
        }
        None => {}
    }
    let sql = format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({columns}) {predicate}",
        pg_ident(&index_name(&node.name)),
        node.relation()
    );
    let build = sqlx::raw_sql(&sql).execute(pool);
    tokio::pin!(build);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tokio::select! {
            done = &mut build => {
                done.with_context(|| format!("PostgreSQL init of {schema}: building index {index} concurrently"))?;
                return Ok(());
            }
            _ = tick.tick() => {
                let progress: Option<(String, i64, i64)> = sqlx::query_as(
                    "SELECT phase, blocks_done, blocks_total FROM pg_stat_progress_create_index WHERE relid = $1",
                )
                .bind(node.oid)
                .fetch_optional(pool)
                .await
                .unwrap_or(None);
                if let Some((phase, done, total)) = progress {
                    let share = if total > 0 { format!(", {}%", done * 100 / total) } else { String::new() };
                    tracing::info!("{schema}: building index {index}: {phase}{share}");
                }
            }
        }
    }
}

/// What a role needs to run pg2ch on this table (`run`, `produce`,
/// `consume`, `status`, `verify`, `verify --repair`) once `init` installed
/// it, and nothing more: read the table and write pg2ch's three columns of
/// it; draw versions; read and write the table's outbox, the registry of
/// idle producers and the consumer groups' registry.
pub fn grants(schema: &TableSchema, role: &str) -> Vec<String> {
    let r = pg_ident(role);
    vec![
        format!("GRANT USAGE ON SCHEMA {} TO {r}", pg_ident(&schema.namespace)),
        format!(
            "GRANT SELECT, UPDATE ({}, {}, {}) ON {} TO {r}",
            pg_ident(SENT),
            pg_ident(REJECTED),
            pg_ident(VERSION),
            schema.pg_name()
        ),
        format!("GRANT USAGE ON SCHEMA _pg2ch TO {r}"),
        // UPDATE: a start moves the sequence past ClickHouse's versions when behind.
        format!("GRANT USAGE, SELECT, UPDATE ON SEQUENCE _pg2ch.versions TO {r}"),
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON _pg2ch.consumer_groups, _pg2ch.loads, _pg2ch.load_chunks, {} TO {r}",
            outbox(schema)
        ),
        format!("GRANT SELECT ON _pg2ch.tables TO {r}"),
    ]
}

/// Grants `role` what [`grants`] lists, and reading the relations that
/// hold the table's rows (its partitions, its inheritance children), which
/// the initial load reads one by one.
pub async fn grant(pool: &PgPool, oid: u32, schema: &TableSchema, role: &str) -> anyhow::Result<()> {
    let mut statements = grants(schema, role);
    let holders: Vec<String> = sqlx::query_scalar(concat!(
        table_tree!(),
        "SELECT t.relid::regclass::text FROM tree t JOIN pg_class c ON c.oid = t.relid
         WHERE c.relkind = 'r' AND t.relid <> $1 ORDER BY t.relid"
    ))
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(pool)
    .await
    .context("reading the partitions")?;
    for name in holders {
        statements.push(format!("GRANT SELECT ON {name} TO {}", pg_ident(role)));
    }
    for sql in statements {
        sqlx::query(&sql).execute(pool).await.with_context(|| format!("granting {role} what pg2ch needs: {sql}"))?;
    }
    Ok(())
}

/// The trigger statements for the table and its inheritance children.
async fn triggers(pool: &PgPool, oid: u32, schema: &TableSchema) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for holder in trigger_holders(pool, oid).await? {
        let name: String = sqlx::query_scalar("SELECT $1::regclass::text")
            .bind(sqlx::postgres::types::Oid(holder))
            .fetch_one(pool)
            .await
            .context("naming a child table")?;
        out.extend(trigger_statements(schema, &name));
    }
    if let Some(drop) = retired_trigger(pool, oid).await? {
        out.push(drop);
    }
    Ok(out)
}

/// The `DROP TRIGGER` of an older pg2ch's `pg2ch_notify` on the table, if
/// it has one.
async fn retired_trigger(pool: &PgPool, oid: u32) -> anyhow::Result<Option<String>> {
    let found: Option<String> =
        sqlx::query_scalar("SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2")
            .bind(sqlx::postgres::types::Oid(oid))
            .bind(RETIRED_TRIGGER)
            .fetch_optional(pool)
            .await
            .context("looking for an older pg2ch's statement trigger")?;
    Ok(found.map(|relation| format!("DROP TRIGGER IF EXISTS {RETIRED_TRIGGER} ON {relation}")))
}

/// At start: fails, naming what is missing, unless `init` installed pg2ch
/// on the table; brings the triggers up to date when the table gained
/// columns (or inheritance children) since.
pub async fn check_installed(pool: &PgPool, oid: u32, schema: &TableSchema) -> anyhow::Result<()> {
    let present = columns(pool, oid, schema).await?;
    let missing: Vec<&str> = OWN_COLUMNS.into_iter().filter(|c| !present.iter().any(|p| p == c)).collect();
    let (outbox_exists, loads_exist): (bool, bool) =
        sqlx::query_as("SELECT to_regclass($1) IS NOT NULL, to_regclass('_pg2ch.load_chunks') IS NOT NULL")
            .bind(outbox(schema))
            .fetch_one(pool)
            .await
            .context("looking up the outbox of deleted keys")?;
    if !missing.is_empty() || !outbox_exists || !loads_exist {
        let what = if !missing.is_empty() {
            format!("column(s) {}", missing.join(", "))
        } else if !outbox_exists {
            "its outbox of deleted keys".to_owned()
        } else {
            "the registry of initial loads that an older pg2ch did not install".to_owned()
        };
        anyhow::bail!("PostgreSQL table {schema} lacks {what} (run `pg2ch init --table {schema}`)");
    }
    // Each holder's triggers (an inheritance child created since init has none).
    let mut stale = false;
    for holder in trigger_holders(pool, oid).await? {
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1
             AND tgname IN ('pg2ch_unsent', 'pg2ch_deleted', 'pg2ch_rekeyed')",
        )
        .bind(sqlx::postgres::types::Oid(holder))
        .fetch_one(pool)
        .await
        .context("reading pg2ch's triggers")?;
        stale |= found < 3;
    }
    if stale {
        tracing::info!(
            "{schema}: a table holding its rows lacks pg2ch's triggers (a child made since init); adding them"
        );
        let statements = triggers(pool, oid, schema).await?;
        let what = "adding pg2ch's triggers to a child made since init (run `pg2ch init` as the table's owner)";
        briefly_locked(pool, oid, schema, what, &statements).await?;
    } else if let Some(drop) = retired_trigger(pool, oid).await? {
        // Not fatal: the trigger costs the table's writers, it loses nothing.
        let what = "dropping the statement trigger an older pg2ch installed";
        match briefly_locked(pool, oid, schema, what, &[drop]).await {
            Ok(()) => tracing::info!("{schema}: dropped the statement trigger of an older pg2ch ({RETIRED_TRIGGER})"),
            Err(e) => tracing::warn!("{e:#} (run `pg2ch init --table {schema}` as the table's owner to drop it)"),
        }
    }
    drop_retired_objects(pool).await.unwrap_or_else(|e| tracing::debug!("{e:#}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_sql_quotes_every_name() {
        let schema = TableSchema::new(
            "public",
            "Odd \"T\"",
            vec![
                crate::schema::Column { name: "k\"1".into(), ty: PgType::Text, nullable: false },
                crate::schema::Column { name: "v".into(), ty: PgType::Int4, nullable: true },
            ],
            vec![0],
        );
        assert_eq!(order_by(&schema, "d."), "d.\"k\"\"1\" COLLATE \"C\"");
        let sql = trigger_statements(&schema, "\"public\".\"Odd \"\"T\"\"\"");
        assert!(
            sql[0].contains("BEFORE UPDATE ON \"public\".\"Odd \"\"T\"\"\" FOR EACH ROW WHEN (current_setting"),
            "{}",
            sql[0]
        );
        assert!(sql[2].contains("WHEN (OLD.\"k\"\"1\" IS DISTINCT FROM NEW.\"k\"\"1\")"), "{}", sql[2]);
        assert_eq!(sql.len(), 3, "row triggers only: {sql:?}");
        assert_eq!(literal("it's"), "'it''s'");
        let grants = grants(&schema, "app \"x\"");
        assert!(grants.iter().all(|g| g.ends_with("TO \"app \"\"x\"\"\"")), "{grants:?}");
        assert!(grants[1].starts_with("GRANT SELECT, UPDATE (\"sent_to_kafka\""), "{}", grants[1]);
        assert_eq!(dollar_tag("a $pg2ch0$ b"), "$pg2ch1$");
    }

    #[test]
    fn long_relations_get_index_names_of_their_own() {
        let (a, b) = (format!("{}_a", "p".repeat(60)), format!("{}_b", "p".repeat(60)));
        assert_ne!(index_name(&a), index_name(&b), "a cut alone would make them one");
        assert!(index_name(&a).len() <= 63);
        assert_eq!(index_name("orders"), "orders_unsent_idx");
        assert_eq!(legacy_index_name("orders"), None);
        assert_eq!(legacy_index_name(&a).map(|n| n.len()), Some(63));
    }
}
