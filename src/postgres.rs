//! PostgreSQL: the source table `user_logins`, its schema, seeding, and the
//! [`SourceTable`] adapter the producer claims rows through.
//!
//! Every statement binds its values; the only SQL text built at run time is
//! fixed. Columns are cast on the way out (`id::bigint`, `event_time::timestamptz`)
//! so an existing table with `SERIAL` ids or `TIMESTAMP` times still works,
//! and read raw: the time as PostgreSQL's own microseconds (so `infinity` and
//! every year it admits arrive as they are), the text as its bytes (so a
//! `SQL_ASCII` database's invalid UTF-8 is rejected per row instead of
//! failing the claim). [`SourceRow::into_event`] decides what can travel.
//!
//! Rows are flagged by physical address, which in a partitioned table (or
//! one with inheritance children) is `(tableoid, ctid)`: a `ctid` alone is
//! unique only inside one partition.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

use crate::config::{PgConfig, bounded};
use crate::event::{LoginEvent, PgTimestamp, SourceRow};
use crate::stores::{Claim, ClaimMode, Permanent, Rejected, SourceTable};
use crate::verify::{Finding, KeyRange, SAMPLE, SourceSide, SourceSummary};

/// Opens a pool and proves the server answers and the password is right.
pub async fn connect(cfg: &PgConfig, max_connections: u32, timeout: Duration) -> anyhow::Result<PgPool> {
    connect_with(cfg, max_connections, timeout, &[]).await
}

/// [`connect`] for producers, whose sessions never scan the table. Their
/// statements keep the generic plan made at first use; made on an empty
/// table (a new outbox, a drained one), that plan is a sequential scan, and
/// it stays one as the table grows: at 20,000 rows/s the flag updates of
/// 10,000 rows then took 1.5-6 s of CPU each, and claims read the whole
/// table (measured: 2,167 sequential scans reading 16M rows in a 40 s run).
/// Without sequential scans the plans are the partial index and TID scans
/// whatever the table's size when they were made.
pub async fn connect_producer(cfg: &PgConfig, max_connections: u32, timeout: Duration) -> anyhow::Result<PgPool> {
    connect_with(cfg, max_connections, timeout, &[("enable_seqscan", "off")]).await
}

async fn connect_with(
    cfg: &PgConfig,
    max_connections: u32,
    timeout: Duration,
    settings: &[(&str, &str)],
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::new()
        .host(&cfg.host)
        .port(cfg.port)
        .username(&cfg.user)
        .password(cfg.password.expose())
        .database(&cfg.database)
        .application_name("pg2ch")
        // Timestamps without a zone are read as UTC, whatever the server's default.
        .options([
            ("timezone", "UTC"),
            // Our statements are prepared once per connection and take arrays
            // of 10k values. PostgreSQL's first five "custom" plans see the
            // array's size and turn the flag update's TID scan into a full
            // sequential scan (measured: 95-130 ms against 24 ms per 10k rows);
            // the generic plan is right for every statement pg2ch runs.
            ("plan_cache_mode", "force_generic_plan"),
        ])
        .options(settings.iter().copied());
    let pool = PgPoolOptions::new().max_connections(max_connections).acquire_timeout(timeout).connect_with(options);
    bounded(|| format!("connecting to {}", cfg.describe()), timeout, async { pool.await.map_err(anyhow::Error::from) })
        .await
        .with_context(|| format!("cannot connect to {}", cfg.describe()))
}

/// Creates `user_logins` if absent; on an existing table adds the flag column
/// (a catalogue-only change since PostgreSQL 11: no table rewrite) and the
/// partial index that makes finding unsent rows cheap.
pub async fn init(pool: &PgPool) -> anyhow::Result<()> {
    // An existing table is checked before anything is changed in it.
    if table_exists(pool).await? {
        check_shape(pool).await?;
    }
    let statements = [
        "CREATE TABLE IF NOT EXISTS user_logins (
             id BIGSERIAL PRIMARY KEY,
             username TEXT NOT NULL,
             event_time TIMESTAMPTZ NOT NULL DEFAULT now(),
             sent_to_kafka BOOLEAN NOT NULL DEFAULT FALSE)",
        "ALTER TABLE user_logins ADD COLUMN IF NOT EXISTS sent_to_kafka BOOLEAN NOT NULL DEFAULT FALSE",
        "CREATE INDEX IF NOT EXISTS user_logins_unsent_idx ON user_logins (id) WHERE NOT sent_to_kafka",
        // Why a row could not be sent (NULL where the message has no null,
        // too large); such rows are skipped by claims and reported.
        "ALTER TABLE user_logins ADD COLUMN IF NOT EXISTS pg2ch_rejected TEXT",
        // Wakes idle producers when an INSERT commits: one notification per
        // statement (and PostgreSQL folds a transaction's equal ones into
        // one), delivered at commit. The channel is the trigger's argument.
        "CREATE OR REPLACE FUNCTION pg2ch_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$",
        "CREATE OR REPLACE TRIGGER pg2ch_notify AFTER INSERT ON user_logins
         FOR EACH STATEMENT EXECUTE FUNCTION pg2ch_notify('pg2ch_user_logins')",
    ];
    for sql in statements {
        sqlx::query(sql).execute(pool).await.with_context(|| format!("PostgreSQL init: {}", first_line(sql)))?;
    }
    check_columns(pool).await
}

async fn table_exists(pool: &PgPool) -> anyhow::Result<bool> {
    let oid: Option<sqlx::postgres::types::Oid> = sqlx::query_scalar("SELECT to_regclass('user_logins')::oid")
        .fetch_one(pool)
        .await
        .context("looking up user_logins")?;
    Ok(oid.is_some())
}

/// Refuses, in one line naming what is wrong, a `user_logins` that pg2ch
/// cannot carry safely: not a table (a view, a foreign table), an `id` that
/// is not unique on its own in every table holding rows (the sink keeps one
/// row per id, so two rows with one id would collapse into one), or a
/// column whose type has no exact form in the message. Declaratively
/// partitioned tables and inheritance children are fine.
pub async fn check_shape(pool: &PgPool) -> anyhow::Result<()> {
    let kind: String = sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = 'user_logins'::regclass")
        .fetch_one(pool)
        .await
        .context("reading the kind of user_logins")?;
    if kind != "r" && kind != "p" {
        anyhow::bail!("PostgreSQL relation user_logins is not a table (relkind {kind:?}); pg2ch needs a table");
    }
    // Every relation that can hold rows: the table itself, its partitions
    // and inheritance children, at any depth.
    let holders: Vec<(String, String, bool)> = sqlx::query_as(
        "WITH RECURSIVE tree(oid) AS (
             SELECT 'user_logins'::regclass::oid
             UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid)
         SELECT c.oid::regclass::text, c.relkind::text,
                EXISTS (SELECT 1 FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
                        WHERE x.indrelid = c.oid AND x.indisunique AND x.indnkeyatts = 1 AND x.indpred IS NULL
                          AND a.attname = 'id')
         FROM tree t JOIN pg_class c ON c.oid = t.oid WHERE c.relkind <> 'p' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .context("reading the partitions of user_logins")?;
    for (name, kind, unique_id) in &holders {
        if kind != "r" {
            anyhow::bail!("PostgreSQL table user_logins has {name} (relkind {kind:?}), which is not a plain table");
        }
        if !unique_id {
            anyhow::bail!(
                "PostgreSQL table {name} has no primary key or unique index on id alone; pg2ch keeps one row per id, \
                 so ids must be unique (add PRIMARY KEY (id), or partition by id)"
            );
        }
    }
    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = 'user_logins'::regclass AND attnum > 0 AND NOT attisdropped
           AND attname IN ('id', 'username', 'event_time')",
    )
    .fetch_all(pool)
    .await
    .context("reading the column types of user_logins")?;
    for (column, ty) in &types {
        let ok = match column.as_str() {
            "id" => matches!(ty.as_str(), "smallint" | "integer" | "bigint"),
            // text, character varying(n), character(n), character
            "username" => ty == "text" || ty.starts_with("character"),
            _ => ty.starts_with("timestamp"),
        };
        if !ok {
            anyhow::bail!("PostgreSQL column user_logins.{column} has type {ty}, which pg2ch cannot carry exactly");
        }
    }
    Ok(())
}

fn first_line(sql: &str) -> &str {
    sql.lines().next().unwrap_or(sql)
}

/// Fails with the names of the columns pg2ch needs that `user_logins` lacks.
pub async fn check_columns(pool: &PgPool) -> anyhow::Result<()> {
    let present: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'user_logins'",
    )
    .fetch_all(pool)
    .await
    .context("reading the columns of user_logins")?;
    if present.is_empty() {
        anyhow::bail!("PostgreSQL table user_logins does not exist (run `pg2ch init`)");
    }
    let missing: Vec<&str> = ["id", "username", "event_time", "sent_to_kafka", "pg2ch_rejected"]
        .into_iter()
        .filter(|c| !present.iter().any(|p| p == c))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!("PostgreSQL table user_logins lacks column(s) {} (run `pg2ch init`)", missing.join(", "));
    }
    check_shape(pool).await
}

/// Inserts `rows` synthetic login events in batches of `chunk`, calling
/// `progress` with the number inserted after each batch.
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

/// Inserts rows with the given usernames and times (ids from the sequence).
pub async fn insert_events(pool: &PgPool, names: &[String], times: &[DateTime<Utc>]) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO user_logins (username, event_time) SELECT * FROM UNNEST($1::text[], $2::timestamptz[])")
        .bind(names)
        .bind(times)
        .execute(pool)
        .await
        .context("inserting into user_logins")?;
    Ok(())
}

/// Rows waiting to be sent (not flagged sent, not rejected).
pub async fn unsent_count(pool: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE NOT sent_to_kafka AND pg2ch_rejected IS NULL")
        .fetch_one(pool)
        .await
        .context("counting unsent rows")
}

/// Every row that can be sent (not rejected, not holding a NULL the claim
/// would reject), with its sent flag, in id order.
pub async fn all_rows(pool: &PgPool) -> anyhow::Result<Vec<(LoginEvent, bool)>> {
    rows_in(pool, KeyRange { first: i64::MIN, last: i64::MAX }).await
}

/// [`all_rows`] of one id range.
async fn rows_in<'c>(db: impl sqlx::PgExecutor<'c>, range: KeyRange) -> anyhow::Result<Vec<(LoginEvent, bool)>> {
    sqlx::query(
        "SELECT id::bigint, convert_to(username::text, 'SQL_ASCII'), event_time::timestamptz, sent_to_kafka
         FROM user_logins WHERE pg2ch_rejected IS NULL AND id BETWEEN $1 AND $2 ORDER BY id",
    )
    .bind(range.first)
    .bind(range.last)
    .fetch(db)
    .map_err(anyhow::Error::from)
    .try_filter_map(|row| async move {
        // A row the claim would reject cannot have been sent: nothing to compare.
        let Ok(event) = claimed_row(&row)? else { return Ok(None) };
        Ok(Some((event, row.try_get::<bool, _>(3)?)))
    })
    .try_collect()
    .await
    .with_context(|| format!("reading user_logins ids {range}"))
}

/// PostgreSQL as `verify` reads it: one session, planned per statement (a
/// range's size decides between an index and a parallel scan) and without
/// JIT (its compile time exceeds a range's run time).
pub struct PgVerifySide {
    conn: sqlx::pool::PoolConnection<Postgres>,
}

impl PgVerifySide {
    pub async fn open(pool: &PgPool) -> anyhow::Result<Self> {
        let mut conn = pool.acquire().await.context("PostgreSQL: opening the verify session")?;
        for sql in ["SET plan_cache_mode = force_custom_plan", "SET jit = off"] {
            sqlx::query(sql).execute(&mut *conn).await.with_context(|| format!("PostgreSQL: {sql}"))?;
        }
        Ok(PgVerifySide { conn })
    }
}

/// Counts and checksum of one id range: what ClickHouse must hold is the
/// rows flagged sent and not rejected.
const RANGE_SUMMARY: &str = concat!(
    "SELECT count(*) FILTER (WHERE pg2ch_rejected IS NULL),
            count(*) FILTER (WHERE sent_to_kafka AND pg2ch_rejected IS NULL),
            coalesce(sum(",
    crate::checksum::row_sql!(),
    ") FILTER (WHERE sent_to_kafka AND pg2ch_rejected IS NULL), 0)::text
     FROM user_logins WHERE id BETWEEN $1 AND $2"
);

impl SourceSide for PgVerifySide {
    async fn bounds(&mut self) -> anyhow::Result<Option<KeyRange>> {
        let (first, last): (Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT min(id)::bigint, max(id)::bigint FROM user_logins")
                .fetch_one(&mut *self.conn)
                .await
                .context("reading the id range of user_logins")?;
        Ok(first.zip(last).map(|(first, last)| KeyRange { first, last }))
    }

    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SourceSummary>> {
        let mut out = Vec::with_capacity(ranges.len());
        for range in ranges {
            let (rows, sent, checksum): (i64, i64, String) = sqlx::query_as(RANGE_SUMMARY)
                .bind(range.first)
                .bind(range.last)
                .fetch_one(&mut *self.conn)
                .await
                .map_err(classify)
                .with_context(|| format!("checksumming user_logins ids {range}"))?;
            let checksum = checksum.parse().with_context(|| format!("PostgreSQL returned checksum {checksum:?}"))?;
            out.push(SourceSummary { rows: rows as u64, sent: sent as u64, checksum });
        }
        Ok(out)
    }

    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<(LoginEvent, bool)>> {
        rows_in(&mut *self.conn, range).await
    }

    async fn rejected(&mut self) -> anyhow::Result<Finding> {
        let count = rejected_count(&mut *self.conn).await?;
        let first_ids = sqlx::query_scalar(
            "SELECT id::bigint FROM user_logins WHERE pg2ch_rejected IS NOT NULL ORDER BY id LIMIT $1",
        )
        .bind(SAMPLE as i64)
        .fetch_all(&mut *self.conn)
        .await?;
        Ok(Finding { count, first_ids })
    }

    async fn flag_unsent(&mut self, ids: &[i64]) -> anyhow::Result<Vec<i64>> {
        // SKIP LOCKED: a row a claim holds is left to that claim.
        let mut flagged: Vec<i64> = sqlx::query_scalar(
            "WITH free AS (SELECT id FROM user_logins WHERE id = ANY($1) AND sent_to_kafka FOR UPDATE SKIP LOCKED)
             UPDATE user_logins u SET sent_to_kafka = FALSE FROM free WHERE u.id = free.id RETURNING u.id::bigint",
        )
        .bind(ids)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(classify)
        .context("flagging rows unsent for repair")?;
        flagged.sort_unstable();
        Ok(flagged)
    }
}

/// The channel `init`'s trigger notifies when rows were inserted.
pub const ROWS_CHANNEL: &str = "pg2ch_user_logins";

/// Counts notifications on [`ROWS_CHANNEL`], for idle producers to wait on
/// instead of sleeping a whole poll interval. Lost notifications (a dropped
/// connection; inserts into a partition directly, which do not fire the
/// parent's statement trigger) cost at most the poll interval the producers
/// keep as a fallback. The listening task ends with this value.
pub struct RowsCommitted {
    pub count: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RowsCommitted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RowsCommitted {
    pub async fn listen(pool: &PgPool) -> anyhow::Result<Self> {
        let mut listener =
            sqlx::postgres::PgListener::connect_with(pool).await.context("PostgreSQL: opening the LISTEN session")?;
        listener.listen(ROWS_CHANNEL).await.with_context(|| format!("PostgreSQL: LISTEN {ROWS_CHANNEL}"))?;
        let (tx, count) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                // On error sqlx reconnects at the next call; notifications
                // sent meanwhile are gone, so waiters are woken to look.
                if let Err(e) = listener.recv().await {
                    tracing::debug!("LISTEN {ROWS_CHANNEL}: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                tx.send_modify(|n| *n += 1);
            }
        });
        Ok(RowsCommitted { count, task })
    }
}

/// How many rows are flagged rejected.
pub async fn rejected_count<'c>(db: impl sqlx::PgExecutor<'c>) -> anyhow::Result<u64> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE pg2ch_rejected IS NOT NULL")
        .fetch_one(db)
        .await
        .context("counting rejected rows")?;
    Ok(count as u64)
}

/// A claimed row, or why it cannot be sent. The first three columns are
/// the id, the text's bytes and the raw time.
fn claimed_row(row: &sqlx::postgres::PgRow) -> anyhow::Result<Result<LoginEvent, Rejected>> {
    let id: i64 = row.try_get(0)?;
    let raw = SourceRow { id, username: row.try_get(1)?, event_time: row.try_get(2)? };
    Ok(raw.into_event().map_err(|reason| Rejected { id, reason }))
}

/// The claim's query, one text for both modes so that they cannot drift
/// apart, followed by what a mode adds.
macro_rules! claim_query {
    ($tail:literal) => {
        concat!(
            "SELECT id::bigint, convert_to(username::text, 'SQL_ASCII'), event_time::timestamptz, tableoid, ctid
     FROM user_logins WHERE NOT sent_to_kafka AND pg2ch_rejected IS NULL AND id >= $1
     ORDER BY id LIMIT $2",
            $tail
        )
    };
}

/// Claims unsent rows, locking them: several producers can work at once.
const CLAIM_SHARED: &str = claim_query!("\n     FOR UPDATE SKIP LOCKED");

/// Claims unsent rows without locking them, for the one exclusive producer.
/// Locking is about a quarter of PostgreSQL's work in a claim-and-flag loop
/// (measured over 1M rows in 10k batches: 4.6-5.4 s with it, 3.5-4.2 s without).
const CLAIM_EXCLUSIVE: &str = claim_query!("");

/// A producer's session on the source table.
pub struct PgSource {
    pool: PgPool,
    timeout: Duration,
    mode: ClaimMode,
    claim: Option<Transaction<'static, Postgres>>,
    /// Id and physical address (table, ctid) of each claimed row, in id
    /// order. Flagging by ctid spares PostgreSQL one primary-key lookup per
    /// row (about a fifth of its time per batch, measured). The address
    /// cannot point at another row by the time we flag: a shared claim holds
    /// the row locks, and an exclusive claim's snapshot (REPEATABLE READ)
    /// keeps VACUUM from freeing the slot of any row version it saw; a row
    /// changed by someone else since makes the flag update fail with a
    /// serialization error instead of flagging the wrong row. The table is
    /// part of the address: each partition numbers its slots from zero.
    ctids: Vec<(i64, (u32, Tid))>,
}

impl PgSource {
    pub fn new(pool: PgPool, timeout: Duration, mode: ClaimMode) -> Self {
        PgSource { pool, timeout, mode, claim: None, ctids: Default::default() }
    }

    /// Runs one statement inside the open claim. A failure ends the claim:
    /// PostgreSQL refuses anything but a rollback in that transaction anyway.
    async fn in_claim(
        &mut self,
        what: &'static str,
        statement: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> anyhow::Result<u64> {
        let tx = self.claim.as_mut().with_context(|| format!("{what} without an open claim"))?;
        let result = bounded(|| format!("{what} in PostgreSQL"), self.timeout, async {
            Ok(statement.execute(&mut **tx).await.map_err(classify)?.rows_affected())
        })
        .await;
        if result.is_err() {
            self.claim = None;
        }
        result
    }

    /// The claimed rows' slots, grouped by the table (partition) holding them.
    fn addresses_of(&self, ids: &[i64]) -> anyhow::Result<BTreeMap<u32, Vec<Tid>>> {
        let mut by_table: BTreeMap<u32, Vec<Tid>> = BTreeMap::new();
        for id in ids {
            match self.ctids.binary_search_by_key(id, |(claimed, _)| *claimed) {
                Ok(at) => {
                    let (table, tid) = self.ctids[at].1;
                    by_table.entry(table).or_default().push(tid);
                }
                Err(_) => anyhow::bail!("row {id} is not in the open claim"),
            }
        }
        Ok(by_table)
    }
}

impl SourceTable for PgSource {
    async fn claim(&mut self, from_id: i64, limit: usize) -> anyhow::Result<Claim> {
        self.claim = None; // an abandoned claim rolls back when dropped
        let pool = &self.pool;
        let ctids = &mut self.ctids;
        let mode = self.mode;
        let (tx, rows) = bounded(|| "claiming unsent rows in PostgreSQL".into(), self.timeout, async {
            let (mut tx, statement) = match mode {
                ClaimMode::Shared => (pool.begin().await?, CLAIM_SHARED),
                ClaimMode::Exclusive => {
                    (pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ").await?, CLAIM_EXCLUSIVE)
                }
            };
            let rows = sqlx::query(statement).bind(from_id).bind(limit as i64).fetch_all(&mut *tx).await?;
            let mut claim = Claim::default();
            ctids.clear();
            for row in &rows {
                ctids.push((row.try_get::<i64, _>(0)?, (row.try_get::<Oid, _>(3)?.0, row.try_get::<Tid, _>(4)?)));
                match claimed_row(row)? {
                    Ok(event) => claim.rows.push(event),
                    Err(rejected) => claim.rejected.push(rejected),
                }
            }
            Ok((tx, claim))
        })
        .await?;
        self.claim = Some(tx);
        Ok(rows)
    }

    async fn mark_sent(&mut self, ids: &[i64]) -> anyhow::Result<()> {
        for (table, tids) in self.addresses_of(ids)? {
            let expected = tids.len() as u64;
            let statement =
                sqlx::query("UPDATE user_logins SET sent_to_kafka = TRUE WHERE tableoid = $1 AND ctid = ANY($2)")
                    .bind(Oid(table))
                    .bind(tids);
            let flagged = self.in_claim("flagging rows sent", statement).await?;
            if flagged != expected {
                // Nothing is committed: the claim ends and its rows go again.
                self.claim = None;
                anyhow::bail!(
                    "flagging rows sent changed {flagged} rows, not the {expected} claimed; nothing was committed"
                );
            }
        }
        Ok(())
    }

    async fn reject(&mut self, rows: &[Rejected]) -> anyhow::Result<()> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let reasons: Vec<String> = rows.iter().map(|r| r.reason.clone()).collect();
        let statement = sqlx::query(
            "UPDATE user_logins u SET pg2ch_rejected = r.reason
             FROM UNNEST($1::bigint[], $2::text[]) AS r(id, reason) WHERE u.id = r.id",
        )
        .bind(ids)
        .bind(reasons);
        self.in_claim("flagging rows rejected", statement).await.map(|_| ())
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        let tx = self.claim.take().context("commit without an open claim")?;
        bounded(|| "committing in PostgreSQL".into(), self.timeout, async { Ok(tx.commit().await?) }).await
    }

    async fn rollback(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.claim.take() {
            bounded(|| "rolling back in PostgreSQL".into(), self.timeout, async { Ok(tx.rollback().await?) }).await?;
        }
        Ok(())
    }
}

/// Advisory lock key that keeps exclusive and shared producers apart.
pub const PRODUCER_LOCK: i64 = 0x7067_3263_6820_7072; // "pg2ch pr"

/// A producer process's standing with other producers: one exclusive
/// producer, or any number of shared ones, never both. It is a session-level
/// advisory lock on a connection of its own, so it goes when the process
/// dies. Only efficiency rests on it: exclusive claims take no row locks, and
/// two producers claiming that way would publish the same rows (harmless,
/// but double work).
pub struct ProducerLease {
    /// Detached from the pool, so the lock never goes back into it with the
    /// connection: dropping the lease closes the session, which releases it.
    session: sqlx::PgConnection,
    mode: ClaimMode,
    timeout: Duration,
}

impl ProducerLease {
    pub async fn open(pool: &PgPool, mode: ClaimMode, timeout: Duration) -> anyhow::Result<Self> {
        let session = bounded(|| "opening the producer lease session".into(), timeout, async {
            Ok(pool.acquire().await?.detach())
        })
        .await?;
        Ok(ProducerLease { session, mode, timeout })
    }

    /// Takes the lease; false while a producer of a conflicting mode holds it.
    pub async fn try_take(&mut self) -> anyhow::Result<bool> {
        let statement = match self.mode {
            ClaimMode::Shared => "SELECT pg_try_advisory_lock_shared($1)",
            ClaimMode::Exclusive => "SELECT pg_try_advisory_lock($1)",
        };
        let session = &mut self.session;
        bounded(|| "taking the producer lease".into(), self.timeout, async {
            Ok(sqlx::query_scalar(statement).bind(PRODUCER_LOCK).fetch_one(session).await?)
        })
        .await
    }
}

/// Tags what retrying cannot fix (the table or a column is gone, no
/// privilege) as permanent; anything else stays retryable.
fn classify(e: sqlx::Error) -> anyhow::Error {
    let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
    match code.as_deref() {
        // undefined_table, undefined_column, insufficient_privilege, datatype_mismatch
        Some(code @ ("42P01" | "42703" | "42501" | "42804")) => {
            Permanent::error(format!("PostgreSQL refused the statement ({code}): {e}"))
        }
        _ => anyhow::Error::new(e),
    }
}

/// A `timestamptz` in its binary wire form: PostgreSQL's own microseconds.
impl sqlx::Type<Postgres> for PgTimestamp {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(Oid(1184))
    }
}

impl sqlx::postgres::PgHasArrayType for PgTimestamp {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(Oid(1185))
    }
}

/// Binds a raw time, `±infinity` included (tests write every value this way).
impl sqlx::Encode<'_, Postgres> for PgTimestamp {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        buf.extend_from_slice(&self.0.to_be_bytes());
        Ok(sqlx::encode::IsNull::No)
    }
}

impl sqlx::Decode<'_, Postgres> for PgTimestamp {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        let bytes: [u8; 8] = <&[u8] as sqlx::Decode<Postgres>>::decode(value)?
            .try_into()
            .map_err(|_| "a timestamptz is 8 bytes in binary form")?;
        Ok(PgTimestamp(i64::from_be_bytes(bytes)))
    }
}

/// A row's physical address, PostgreSQL's `tid`, in its binary wire form
/// (block number, line pointer), so claiming and flagging by ctid costs no
/// text formatting or parsing on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tid {
    block: u32,
    offset: u16,
}

impl sqlx::Type<Postgres> for Tid {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(Oid(27))
    }
}

impl sqlx::postgres::PgHasArrayType for Tid {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(Oid(1010))
    }
}

impl sqlx::Encode<'_, Postgres> for Tid {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        buf.extend_from_slice(&self.block.to_be_bytes());
        buf.extend_from_slice(&self.offset.to_be_bytes());
        Ok(sqlx::encode::IsNull::No)
    }
}

impl sqlx::Decode<'_, Postgres> for Tid {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        let bytes: [u8; 6] = <&[u8] as sqlx::Decode<Postgres>>::decode(value)?
            .try_into()
            .map_err(|_| "a tid is 6 bytes in binary form")?;
        Ok(Tid {
            block: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            offset: u16::from_be_bytes([bytes[4], bytes[5]]),
        })
    }
}
