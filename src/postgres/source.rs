//! The [`SourceTable`] adapter: a producer lane's session on a table.
//!
//! A claim, on the lane's own connection, holds nothing once it returns:
//!
//! 1. it takes the table's *claim lock*, a session-level advisory lock held
//!    only for the next three steps, so that claims of one table happen one
//!    after another in every process;
//! 2. in one REPEATABLE READ transaction, it reads unsent rows and deleted
//!    keys above the cursor, in key order (text in the `C` collation), with
//!    each row's address and version (`tableoid`, `ctid`, `xmin`), and
//!    which deleted keys exist again;
//! 3. it draws the claim's version from `_pg2ch.versions`, lets go of the
//!    lock, reads the columns' fingerprint, and commits. No row lock and no
//!    snapshot is kept while the rows travel to the broker: a user's
//!    `UPDATE` or `DELETE` never waits for pg2ch's network calls.
//!
//! Claim order is then snapshot order and version order: a later claim sees
//! every change an earlier one saw, and gives it a higher version. That is
//! what makes ClickHouse's "highest version wins" right for updates, and
//! for a key deleted and inserted again: a deletion is claimed only while
//! its key does not exist (else it is dropped, superseded by the row), and
//! a row inserted after that claim is claimed later, with a higher version.
//!
//! Once the broker acknowledged, a short flag transaction locks the claimed
//! tuples that are still there with `FOR NO KEY UPDATE SKIP LOCKED` and
//! flags those whose `xmin` is still the one claimed: the tuple at an
//! address is the version published only if the transaction that wrote it
//! is the same (once a row is updated or deleted and VACUUM frees its slot,
//! another row can take that `ctid`, never with an `xmin` a claim saw
//! committed). A row changed since its claim, or locked by a user at that
//! moment, is skipped and stays unsent: it goes again with the next claim,
//! and the rest of the batch is flagged. pg2ch never waits for a user's
//! lock, so it never deadlocks with one. Deleted keys leave the outbox the
//! same way. Any error ends the session (its transaction goes with it); the
//! next claim reconnects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{ConnectOptions, Connection, PgConnection, Row};

use super::decode_column;
use super::install::order_by;
use super::{Tid, classify, outbox};
use crate::change::Change;
use crate::config::{bounded, bounded_store, pg_ident};
use crate::schema::{CHANGED_AT, OWN_COLUMNS, REJECTED, SENT, TableSchema, VERSION};
use crate::stores::{Claim, ClaimMode, Claimed, Outcome, SourceTable, StoreError, StoreResult};
use crate::types::postgres::{KeyParam, PgTimestamp, select_expr};
use crate::types::{Key, Value};

/// First key of the advisory locks pg2ch takes per table (the second is
/// the table's oid): "pg2c".
pub const CLAIM_LOCK_CLASS: i32 = 0x7067_3263;
/// First key of a table's producer lease: "pg2l".
pub const PRODUCER_LOCK_CLASS: i32 = 0x7067_326c;

/// The SQL a session of one table runs, built once from its schema.
#[derive(Debug)]
struct Statements {
    claim_rows: [String; 2],
    claim_deletes: [String; 2],
    live_deletes: String,
    lock_rows: String,
    mark_rows: String,
    reject_row: String,
    lock_deletes: String,
    drop_deletes: String,
    read_chunk: String,
}

/// Takes the table `$1`'s next chunk of its initial load that no live
/// session holds (one this session holds first: a chunk it rolled back).
/// The first take also records when the load began, for its rate.
const TAKE_CHUNK: &str = "WITH began AS (UPDATE _pg2ch.loads SET began = now() WHERE tab = $1 AND began IS NULL)
     UPDATE _pg2ch.load_chunks c SET taker = pg_backend_pid()
     FROM (SELECT x.relid, x.first FROM _pg2ch.load_chunks x
           WHERE x.tab = $1 AND (x.taker IS NULL OR x.taker = pg_backend_pid()
                 OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = x.taker))
           ORDER BY x.taker IS NOT DISTINCT FROM pg_backend_pid() DESC, x.relid, x.first
           LIMIT 1 FOR UPDATE SKIP LOCKED) f
     WHERE c.tab = $1 AND c.relid = f.relid AND c.first = f.first
     RETURNING c.relid, c.filenode, c.first, c.stop";

/// Records a chunk carried (if this session still holds it).
const FINISH_CHUNK: &str =
    "DELETE FROM _pg2ch.load_chunks WHERE tab = $1 AND relid = $2 AND first = $3 AND taker = pg_backend_pid()";

/// Records the load finished once no chunk is left: run when a take found
/// none, after the session's own last chunk committed (a chunk another
/// session is finishing is still there; that session's next take records it).
const FINISHED: &str = "UPDATE _pg2ch.loads SET finished = now()
     WHERE tab = $1 AND finished IS NULL AND NOT EXISTS (SELECT 1 FROM _pg2ch.load_chunks WHERE tab = $1)";

/// A chunk of the initial load being carried: its relation and first address.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    relid: u32,
    first: Tid,
}

impl Statements {
    fn new(schema: &TableSchema) -> Self {
        let t = schema.pg_name();
        let columns: Vec<String> =
            schema.columns.iter().map(|c| select_expr(&format!("s.{}", pg_ident(&c.name)), &c.ty)).collect();
        let keys: Vec<String> =
            schema.key_columns().map(|c| select_expr(&format!("d.{}", pg_ident(&c.name)), &c.ty)).collect();
        let n = schema.key.len();
        let params = (0..n).map(|i| format!("${}", i + 2)).collect::<Vec<_>>().join(", ");
        let after = |alias: &str| format!(" AND ({}) > ({params})", order_by(schema, &format!("{alias}.")));
        let rows = |cursor: &str| {
            format!(
                "SELECT {}, s.tableoid, s.ctid, s.{}, s.xmin::text::int8 FROM {t} s WHERE NOT s.{} AND s.{} IS NULL{cursor} \
                 ORDER BY {} LIMIT $1",
                columns.join(", "),
                pg_ident(CHANGED_AT),
                pg_ident(SENT),
                pg_ident(REJECTED),
                order_by(schema, "s.")
            )
        };
        let live =
            schema.key_columns().map(|c| format!("s.{0} = d.{0}", pg_ident(&c.name))).collect::<Vec<_>>().join(" AND ");
        let deletes = |cursor: &str| {
            let cursor = cursor.strip_prefix(" AND").map(|c| format!(" WHERE{c}")).unwrap_or_default();
            format!(
                "SELECT {}, d.ctid, d.deleted_at, d.xmin::text::int8 FROM {} d{cursor} ORDER BY {} LIMIT $1",
                keys.join(", "),
                outbox(schema),
                order_by(schema, "d.")
            )
        };
        Statements {
            claim_rows: [rows(""), rows(&after("s"))],
            claim_deletes: [deletes(""), deletes(&after("d"))],
            live_deletes: format!(
                "SELECT d.ctid FROM {} d WHERE d.ctid = ANY($1) AND EXISTS (SELECT 1 FROM {t} s WHERE {live})",
                outbox(schema)
            ),
            lock_rows: format!(
                "SELECT ctid, xmin::text::int8 FROM {t} WHERE tableoid = $1 AND ctid = ANY($2) FOR NO KEY UPDATE SKIP LOCKED"
            ),
            mark_rows: format!(
                "UPDATE {t} SET {} = TRUE, {} = $3 WHERE tableoid = $1 AND ctid = ANY($2)",
                pg_ident(SENT),
                pg_ident(VERSION)
            ),
            reject_row: format!(
                "UPDATE {t} SET {} = FALSE, {} = $3 WHERE tableoid = $1 AND ctid = $2",
                pg_ident(SENT),
                pg_ident(REJECTED)
            ),
            lock_deletes: format!(
                "SELECT ctid, xmin::text::int8 FROM {} WHERE ctid = ANY($1) FOR UPDATE SKIP LOCKED",
                outbox(schema)
            ),
            drop_deletes: format!("DELETE FROM {} WHERE ctid = ANY($1)", outbox(schema)),
            // Every row in the chunk's addresses, whatever its flag: the
            // rows already there read sent without having been carried.
            read_chunk: format!(
                "SELECT {}, s.tableoid, s.ctid, s.{}, s.xmin::text::int8 FROM ONLY {{relation}} s \
                 WHERE s.ctid >= $1 AND s.ctid < $2",
                columns.join(", "),
                pg_ident(CHANGED_AT),
            ),
        }
    }
}

/// Where a claimed item lives and which version of it was claimed (the
/// `xmin` of its tuple), for its flag update.
#[derive(Debug, Clone, Copy)]
enum Address {
    Row(u32, Tid, i64),
    Deleted(Tid, i64),
}

/// A producer lane's session on one table.
pub struct PgSource {
    schema: Arc<TableSchema>,
    oid: u32,
    options: PgConnectOptions,
    timeout: Duration,
    statements: Statements,
    /// The columns' fingerprint when the pipeline started.
    fingerprint: String,
    /// The lane's connection, `None` after an error until the next claim.
    conn: Option<PgConnection>,
    /// The open claim's version and each item's address; `None` without one.
    open: Option<(u64, Vec<Address>)>,
    /// Whether the claim's flag transaction is open on `conn`.
    flagging: bool,
    /// The chunk of the initial load the open claim is, if it is one.
    chunk: Option<Chunk>,
}

impl PgSource {
    pub fn new(
        schema: Arc<TableSchema>,
        oid: u32,
        options: PgConnectOptions,
        timeout: Duration,
        fingerprint: String,
    ) -> Self {
        let statements = Statements::new(&schema);
        PgSource {
            schema,
            oid,
            options,
            timeout,
            statements,
            fingerprint,
            conn: None,
            open: None,
            flagging: false,
            chunk: None,
        }
    }
}

/// Runs `f` on the session (connecting first if need be), bounded in time.
/// Any failure ends the session: the server rolls back its transaction and
/// releases its locks when the connection closes.
async fn on_session<T>(
    conn: &mut Option<PgConnection>,
    options: &PgConnectOptions,
    timeout: Duration,
    what: &str,
    f: impl AsyncFnOnce(&mut PgConnection) -> StoreResult<T>,
) -> StoreResult<T> {
    let result = bounded_store(|| format!("{what} in PostgreSQL"), timeout, async {
        if conn.is_none() {
            *conn = Some(
                options
                    .connect()
                    .await
                    .map_err(|e| StoreError::from(e).context("connecting the producer's session"))?,
            );
        }
        f(conn.as_mut().expect("connected above")).await
    })
    .await;
    if result.is_err() {
        *conn = None;
    }
    result
}

/// Binds a claim's cursor after its limit.
fn bind_cursor<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    schema: &'q TableSchema,
    after: Option<&'q Key>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    if let Some(key) = after {
        for (c, part) in schema.key_columns().zip(key) {
            q = q.bind(KeyParam { ty: &c.ty, part });
        }
    }
    q
}

/// Draws the claim's version, lets go of the claim lock, and reads the
/// columns' fingerprint, in one round trip.
fn version_sql() -> String {
    format!(
        "SELECT nextval('_pg2ch.versions'), pg_advisory_unlock($1, $2), ({})",
        super::catalogue::FINGERPRINT.replace("$2", "$4").replace("$1", "$3")
    )
}

/// Takes the table's claim lock and opens the claim's snapshot (the lock
/// comes first: claims' snapshots follow the order of their versions).
async fn begin_claim(conn: &mut PgConnection, oid: u32) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_lock($1, $2)").bind(CLAIM_LOCK_CLASS).bind(oid as i32).execute(&mut *conn).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ").execute(&mut *conn).await?;
    Ok(())
}

/// Ends a claim that draws no version (it found nothing, or must start
/// again): its snapshot and the table's claim lock go.
async fn abandon_claim(conn: &mut PgConnection, oid: u32) -> StoreResult<()> {
    sqlx::query("ROLLBACK").execute(&mut *conn).await?;
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(CLAIM_LOCK_CLASS)
        .bind(oid as i32)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// [`version_sql`] on the claim's session: the version and the fingerprint.
async fn draw_version(conn: &mut PgConnection, oid: u32) -> StoreResult<(i64, String)> {
    let (version, _, now): (i64, bool, String) = sqlx::query_as(&version_sql())
        .bind(CLAIM_LOCK_CLASS)
        .bind(oid as i32)
        .bind(Oid(oid))
        .bind(&OWN_COLUMNS[..])
        .fetch_one(&mut *conn)
        .await
        .map_err(classify)?;
    Ok((version, now))
}

impl SourceTable for PgSource {
    async fn load(&mut self) -> StoreResult<Option<Claim>> {
        if self.open.take().is_some() {
            let _ = self.rollback_session().await;
        }
        self.chunk = None;
        let (oid, statements, schema) = (self.oid, &self.statements, &self.schema);
        let read = on_session(
            &mut self.conn,
            &self.options,
            self.timeout,
            "reading a chunk of the initial load",
            async |conn| {
                loop {
                    let taken: Option<(Oid, Oid, Tid, Tid)> =
                        sqlx::query_as(TAKE_CHUNK).bind(Oid(oid)).fetch_optional(&mut *conn).await.map_err(classify)?;
                    let Some((relid, filenode, first, stop)) = taken else {
                        sqlx::query(FINISHED).bind(Oid(oid)).execute(&mut *conn).await.map_err(classify)?;
                        return Ok(None);
                    };
                    begin_claim(conn, oid).await?;
                    // The relation that holds the chunk's rows, read alone (a
                    // partitioned table's other partitions would each be scanned
                    // over the same addresses: PostgreSQL does not prune by
                    // `tableoid`).
                    let relation = if relid.0 == oid {
                        schema.pg_name()
                    } else {
                        sqlx::query_scalar::<_, String>("SELECT $1::regclass::text")
                            .bind(relid)
                            .fetch_one(&mut *conn)
                            .await
                            .map_err(classify)?
                    };
                    let rows = sqlx::query(&statements.read_chunk.replace("{relation}", &relation))
                        .bind(first)
                        .bind(stop)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(classify)?;
                    // Read under the lock the scan took: the file cannot change
                    // until the transaction ends.
                    let now: Option<Oid> = sqlx::query_scalar("SELECT pg_relation_filenode($1)")
                        .bind(relid)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(classify)?;
                    if now != Some(filenode) {
                        // The relation was rewritten (VACUUM FULL, CLUSTER, an
                        // ALTER that rewrites): its rows may be anywhere now,
                        // so all of it is carried again.
                        abandon_claim(conn, oid).await?;
                        tracing::info!(
                            "a relation of the table was rewritten during its initial load; carrying all of it again"
                        );
                        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                        sqlx::query("DELETE FROM _pg2ch.load_chunks WHERE tab = $1 AND relid = $2")
                            .bind(Oid(oid))
                            .bind(relid)
                            .execute(&mut *tx)
                            .await
                            .map_err(classify)?;
                        sqlx::query(super::install::MAKE_CHUNKS)
                            .bind(Oid(oid))
                            .bind(super::install::CHUNK_BLOCKS)
                            .bind(relid)
                            .execute(&mut *tx)
                            .await
                            .map_err(classify)?;
                        tx.commit().await?;
                        continue;
                    }
                    let (version, now) = draw_version(conn, oid).await?;
                    sqlx::query("COMMIT").execute(&mut *conn).await?;
                    return Ok(Some((rows, version as u64, now, Chunk { relid: relid.0, first })));
                }
            },
        )
        .await?;
        let Some((rows, version, now, chunk)) = read else { return Ok(None) };
        self.check_fingerprint(&now)?;
        let claim = self.build(rows, (Vec::new(), Vec::new()), version, usize::MAX);
        match &claim {
            Ok(_) => self.chunk = Some(chunk),
            Err(_) => self.conn = None,
        }
        claim.map(Some)
    }

    async fn claim(&mut self, after: Option<&Key>, limit: usize) -> StoreResult<Claim> {
        if self.open.take().is_some() {
            // An earlier claim of this session was abandoned: end its flags.
            let _ = self.rollback_session().await;
        }
        self.chunk = None;
        let which = usize::from(after.is_some());
        let k = self.schema.key.len();
        let (oid, schema, statements) = (self.oid, &self.schema, &self.statements);
        let (rows, deletes, version, now) =
            on_session(&mut self.conn, &self.options, self.timeout, "claiming unsent rows", async |conn| {
                begin_claim(conn, oid).await?;
                let rows = bind_cursor(sqlx::query(&statements.claim_rows[which]).bind(limit as i64), schema, after)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(classify)?;
                let deletes =
                    bind_cursor(sqlx::query(&statements.claim_deletes[which]).bind(limit as i64), schema, after)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(classify)?;
                // Which deleted keys are live again, in the same snapshot.
                let live: Vec<Tid> = if deletes.is_empty() {
                    Vec::new()
                } else {
                    let tids = deletes.iter().map(|d| d.try_get::<Tid, _>(k)).collect::<Result<Vec<_>, _>>()?;
                    sqlx::query_scalar(&statements.live_deletes)
                        .bind(tids)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(classify)?
                };
                if rows.is_empty() && deletes.is_empty() {
                    // An idle look (read-only): no version to draw, no
                    // columns to check (the next claim that finds rows does).
                    abandon_claim(conn, oid).await?;
                    return Ok((rows, (deletes, live), 0, None));
                }
                let (version, now) = draw_version(conn, oid).await?;
                // Nothing is held while the rows travel.
                sqlx::query("COMMIT").execute(&mut *conn).await?;
                Ok((rows, (deletes, live), version as u64, Some(now)))
            })
            .await?;
        if let Some(now) = now {
            self.check_fingerprint(&now)?;
        }
        let claim = self.build(rows, deletes, version, limit);
        if claim.is_err() {
            self.conn = None;
        }
        claim
    }

    async fn mark_sent(&mut self, items: &[usize]) -> StoreResult<()> {
        if self.chunk.is_some() && self.open.is_some() {
            // A chunk's rows already read sent: its commit records it carried.
            return Ok(());
        }
        let (version, addresses) =
            self.open.clone().ok_or_else(|| StoreError::transient("flagging rows sent without an open claim"))?;
        let (rows, deleted) = split(&addresses, items.iter().copied())?;
        let statements = &self.statements;
        let flagging = &mut self.flagging;
        let result = on_session(&mut self.conn, &self.options, self.timeout, "flagging rows sent", async |conn| {
            begin_flags(conn, flagging).await?;
            let mut skipped = 0;
            for (table, claimed) in rows {
                let still = lock_unchanged(conn, &statements.lock_rows, Some(table), &claimed).await?;
                skipped += claimed.len() - still.len();
                if still.is_empty() {
                    continue;
                }
                let expected = still.len() as u64;
                let flagged = sqlx::query(&statements.mark_rows)
                    .bind(Oid(table))
                    .bind(still)
                    .bind(version as i64)
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?
                    .rows_affected();
                if flagged != expected {
                    return Err(StoreError::transient(format!(
                        "flagging rows sent changed {flagged} rows, not the {expected} locked"
                    )));
                }
            }
            if !deleted.is_empty() {
                let still = lock_unchanged(conn, &statements.lock_deletes, None, &deleted).await?;
                skipped += deleted.len() - still.len();
                if !still.is_empty() {
                    sqlx::query(&statements.drop_deletes).bind(still).execute(&mut *conn).await.map_err(classify)?;
                }
            }
            metrics::counter!("pg2ch_rows_changed_since_claim_total").increment(skipped as u64);
            Ok(())
        })
        .await;
        if result.is_err() {
            self.open = None;
            self.flagging = false;
        }
        result
    }

    async fn reject(&mut self, items: &[(usize, String)]) -> StoreResult<()> {
        let (_, addresses) =
            self.open.clone().ok_or_else(|| StoreError::transient("flagging rows rejected without an open claim"))?;
        let statements = &self.statements;
        let flagging = &mut self.flagging;
        let result = on_session(&mut self.conn, &self.options, self.timeout, "flagging rows rejected", async |conn| {
            begin_flags(conn, flagging).await?;
            for (i, reason) in items {
                let (rows, deleted) = split(&addresses, [*i])?;
                for (table, claimed) in rows {
                    for tid in lock_unchanged(conn, &statements.lock_rows, Some(table), &claimed).await? {
                        sqlx::query(&statements.reject_row)
                            .bind(Oid(table))
                            .bind(tid)
                            .bind(reason)
                            .execute(&mut *conn)
                            .await
                            .map_err(classify)?;
                    }
                }
                // A deletion that cannot travel: no row of its key ever
                // could (the key is the same), so there is nothing in
                // ClickHouse to delete. It goes.
                if !deleted.is_empty() {
                    let still = lock_unchanged(conn, &statements.lock_deletes, None, &deleted).await?;
                    if !still.is_empty() {
                        sqlx::query(&statements.drop_deletes)
                            .bind(still)
                            .execute(&mut *conn)
                            .await
                            .map_err(classify)?;
                    }
                }
            }
            Ok(())
        })
        .await;
        if result.is_err() {
            self.open = None;
            self.flagging = false;
        }
        result
    }

    async fn commit(&mut self) -> StoreResult<()> {
        self.open.take().ok_or_else(|| StoreError::transient("commit without an open claim"))?;
        let chunk = self.chunk.take();
        if !std::mem::take(&mut self.flagging) && chunk.is_none() {
            return Ok(());
        }
        let (oid, flagging) = (self.oid, &mut self.flagging);
        on_session(&mut self.conn, &self.options, self.timeout, "committing", async |conn| {
            if let Some(chunk) = chunk {
                begin_flags(conn, flagging).await?;
                sqlx::query(FINISH_CHUNK)
                    .bind(Oid(oid))
                    .bind(Oid(chunk.relid))
                    .bind(chunk.first)
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
            }
            *flagging = false;
            Ok(sqlx::query("COMMIT").execute(&mut *conn).await.map(|_| ())?)
        })
        .await
    }

    async fn rollback(&mut self) -> StoreResult<()> {
        self.chunk = None;
        if self.open.take().is_some() {
            self.rollback_session().await?;
        }
        Ok(())
    }
}

/// The claimed rows (by partition) and deleted keys among `items`, each
/// with the `xmin` it was claimed at.
#[allow(clippy::type_complexity)]
fn split(
    addresses: &[Address],
    items: impl IntoIterator<Item = usize>,
) -> StoreResult<(BTreeMap<u32, Vec<(Tid, i64)>>, Vec<(Tid, i64)>)> {
    let mut rows: BTreeMap<u32, Vec<(Tid, i64)>> = BTreeMap::new();
    let mut deleted = Vec::new();
    for i in items {
        match addresses.get(i).ok_or_else(|| StoreError::transient("flagging an item the claim does not hold"))? {
            Address::Row(table, tid, xmin) => rows.entry(*table).or_default().push((*tid, *xmin)),
            Address::Deleted(tid, xmin) => deleted.push((*tid, *xmin)),
        }
    }
    Ok((rows, deleted))
}

/// Opens the claim's flag transaction unless it is open.
async fn begin_flags(conn: &mut PgConnection, flagging: &mut bool) -> StoreResult<()> {
    if !*flagging {
        sqlx::query("BEGIN").execute(&mut *conn).await?;
        *flagging = true;
    }
    Ok(())
}

/// Locks the claimed tuples that are still there and that no other session
/// holds (`SKIP LOCKED`), and returns the addresses of those still at the
/// version claimed: same `ctid`, same `xmin`.
async fn lock_unchanged(
    conn: &mut PgConnection,
    sql: &str,
    table: Option<u32>,
    claimed: &[(Tid, i64)],
) -> StoreResult<Vec<Tid>> {
    let tids: Vec<Tid> = claimed.iter().map(|(t, _)| *t).collect();
    let query = sqlx::query_as::<_, (Tid, i64)>(sql);
    let query = match table {
        Some(table) => query.bind(Oid(table)).bind(tids),
        None => query.bind(tids),
    };
    let locked: BTreeMap<Tid, i64> = query.fetch_all(&mut *conn).await.map_err(classify)?.into_iter().collect();
    Ok(claimed.iter().filter(|(tid, xmin)| locked.get(tid) == Some(xmin)).map(|(tid, _)| *tid).collect())
}

impl PgSource {
    /// Fails, for good, when the table's columns changed since the start.
    fn check_fingerprint(&mut self, now: &str) -> StoreResult<()> {
        if now == self.fingerprint {
            return Ok(());
        }
        self.conn = None;
        Err(StoreError::permanent(format!(
            "the columns of PostgreSQL table {} changed while pg2ch ran ({}); restart pg2ch, which adds new \
             columns to ClickHouse and refuses other changes by name",
            self.schema,
            describe_change(&self.fingerprint, now)
        )))
    }

    async fn rollback_session(&mut self) -> StoreResult<()> {
        if self.conn.is_none() || !std::mem::take(&mut self.flagging) {
            return Ok(());
        }
        on_session(&mut self.conn, &self.options, self.timeout, "rolling back", async |conn| {
            Ok(sqlx::query("ROLLBACK").execute(&mut *conn).await.map(|_| ())?)
        })
        .await
    }

    /// The claim from its two lists (each in key order): merged, a row
    /// before a deletion of the same key, cut at its horizon as
    /// [`Claim::horizon_of`] and [`Claim::keeps`] say. A deletion whose key
    /// is `live` again (the row was inserted again) is superseded: the row
    /// goes instead. Both lists and the liveness come from one snapshot.
    fn build(
        &mut self,
        rows: Vec<PgRow>,
        (deletes, live): (Vec<PgRow>, Vec<Tid>),
        version: u64,
        limit: usize,
    ) -> StoreResult<Claim> {
        let schema = &self.schema;
        let n = schema.columns.len();
        let mut items: Vec<(Key, Outcome, Address)> = Vec::with_capacity(rows.len() + deletes.len());
        // When the oldest change claimed was made (µs since 2000), for the lag metric.
        let mut oldest = i64::MAX;
        for row in &rows {
            let address =
                Address::Row(row.try_get::<Oid, _>(n)?.0, row.try_get::<Tid, _>(n + 1)?, row.try_get::<i64, _>(n + 3)?);
            oldest = oldest.min(row.try_get::<PgTimestamp, _>(n + 2)?.0);
            let (key, outcome) = row_outcome(schema, version, |i| decode_column(row, i, &schema.columns[i]))?;
            items.push((key, outcome, address));
        }
        let k = schema.key.len();
        let mut tombs = Vec::with_capacity(deletes.len());
        for row in &deletes {
            let key_values = schema
                .key_columns()
                .enumerate()
                .map(|(i, c)| decode_column(row, i, c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unreadable_key(schema, e))?;
            let tid = row.try_get::<Tid, _>(k)?;
            let address = Address::Deleted(tid, row.try_get::<i64, _>(k + 2)?);
            oldest = oldest.min(row.try_get::<PgTimestamp, _>(k + 1)?.0);
            let key = schema.key_of_key(&key_values);
            let outcome = if live.contains(&tid) {
                Outcome::Superseded
            } else {
                Outcome::Send(Change::delete(schema, key_values, version))
            };
            tombs.push((key, outcome, address));
        }
        // The outbox holds one deletion a key, so a full list of them ends
        // with all of its last key's.
        let horizon = Claim::horizon_of(
            limit,
            [(rows.len(), items.last().map(|(k, _, _)| k)), (deletes.len(), tombs.last().map(|(k, _, _)| k))],
        );
        items.extend(tombs);
        items.sort_by(|a, b| {
            a.0.cmp(&b.0).then(matches!(a.2, Address::Deleted(..)).cmp(&matches!(b.2, Address::Deleted(..))))
        });
        items.retain(|(k, _, _)| Claim::keeps(horizon.as_ref(), k));
        let mut claim = Claim { version, items: Vec::with_capacity(items.len()), horizon };
        let mut addresses = Vec::with_capacity(items.len());
        for (key, outcome, address) in items {
            claim.items.push(Claimed { key, outcome });
            addresses.push(address);
        }
        self.open = Some((version, addresses));
        if oldest != i64::MAX {
            let age = crate::types::time::now_pg_us().saturating_sub(oldest).max(0);
            metrics::gauge!("pg2ch_claimed_age_seconds").set(age as f64 / 1e6);
        }
        Ok(claim)
    }
}

/// A claimed row as it travels: its key, and its change or why it cannot
/// go. A value PostgreSQL sent in a form pg2ch cannot read rejects the row
/// (it stays in PostgreSQL with the reason, as a row ClickHouse cannot hold
/// does) instead of failing the claim, which every retry would repeat. A
/// row whose key cannot be read cannot even be named: that stops the table.
fn row_outcome(
    schema: &TableSchema,
    version: u64,
    column: impl Fn(usize) -> Result<Value, String>,
) -> StoreResult<(Key, Outcome)> {
    let key_values =
        schema.key.iter().map(|i| column(*i)).collect::<Result<Vec<_>, _>>().map_err(|e| unreadable_key(schema, e))?;
    let key = schema.key_of_key(&key_values);
    let values = (0..schema.columns.len()).map(&column).collect::<Result<Vec<_>, _>>();
    let outcome = match values.and_then(|values| schema.check_row(&values).map(|()| values)) {
        Ok(values) => Outcome::Send(Change::upsert(values, version)),
        Err(reason) => Outcome::Reject { reason, key: key_values },
    };
    Ok((key, outcome))
}

fn unreadable_key(schema: &TableSchema, why: String) -> StoreError {
    StoreError::permanent(format!("a key of PostgreSQL table {schema} cannot be read ({why}): please report this"))
}

/// What changed between two column fingerprints, in words naming the columns.
pub fn describe_change(before: &str, after: &str) -> String {
    let (before, key_before) = before.split_once(";key=").unwrap_or((before, ""));
    let (after, key_after) = after.split_once(";key=").unwrap_or((after, ""));
    if key_before != key_after {
        return format!("its primary key changed from ({key_before}) to ({key_after})");
    }
    let parse = |s: &str| -> BTreeMap<String, String> {
        s.split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once(':').map(|(n, rest)| (n.to_owned(), rest.to_owned())))
            .collect()
    };
    let (old, new) = (parse(before), parse(after));
    let mut changes = Vec::new();
    for name in new.keys().filter(|n| !old.contains_key(*n)) {
        changes.push(format!("column {name:?} was added"));
    }
    for (name, ty) in &old {
        match new.get(name) {
            None => changes.push(format!("column {name:?} was dropped or renamed")),
            Some(t) if t != ty => changes.push(format!("column {name:?} changed type or nullability")),
            _ => {}
        }
    }
    if changes.is_empty() { "its columns were reordered".into() } else { changes.join(", ") }
}

/// A producer process's standing with other producers of a table: one
/// exclusive producer, or any number of shared ones, never both. It is a
/// session-level advisory lock on a connection of its own, so it goes when
/// the process dies. Only efficiency rests on it: exclusive claims take no
/// row locks, and two producers claiming that way would publish the same
/// rows (harmless, but double work).
pub struct ProducerLease {
    session: PgConnection,
    oid: u32,
    mode: ClaimMode,
    timeout: Duration,
}

impl ProducerLease {
    pub async fn open(
        options: &PgConnectOptions,
        oid: u32,
        mode: ClaimMode,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let options = options.clone().application_name(&super::lease::session_name("producer"));
        let session = bounded_store(|| "opening the producer lease session".into(), timeout, async {
            Ok(options.connect().await?)
        })
        .await?;
        Ok(ProducerLease { session, oid, mode, timeout })
    }

    /// Takes the lease; false while a producer of a conflicting mode holds it.
    pub async fn try_take(&mut self) -> anyhow::Result<bool> {
        let statement = match self.mode {
            ClaimMode::Shared => "SELECT pg_try_advisory_lock_shared($1, $2)",
            ClaimMode::Exclusive => "SELECT pg_try_advisory_lock($1, $2)",
        };
        let (session, oid) = (&mut self.session, self.oid);
        bounded(|| "taking the producer lease".into(), self.timeout, async {
            Ok(sqlx::query_scalar(statement).bind(PRODUCER_LOCK_CLASS).bind(oid as i32).fetch_one(session).await?)
        })
        .await
    }

    /// Lets go of the lease by closing its session.
    pub async fn release(self) {
        let _ = self.session.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::schema::Column;
    use crate::types::PgType;

    /// A value that cannot be read rejects its row, named by its key; a
    /// key that cannot be read stops the table. Neither fails the claim
    /// for a retry that would fail the same way.
    #[test]
    fn an_unreadable_value_rejects_its_row_and_an_unreadable_key_stops() {
        let col = |name: &str, ty| Column { name: name.into(), ty, nullable: true };
        let schema = TableSchema::new("public", "t", vec![col("note", PgType::Text), col("id", PgType::Int8)], vec![1]);
        let read = |bad: Option<usize>| {
            move |i: usize| match (i, bad) {
                (i, Some(b)) if i == b => {
                    Err(format!("column {i}: PostgreSQL sent 3 bytes where pg2ch expected a bigint"))
                }
                (0, _) => Ok(Value::text(b"hi".to_vec())),
                _ => Ok(Value::Int(7)),
            }
        };
        let (key, outcome) = row_outcome(&schema, 9, read(None)).unwrap();
        assert_eq!(key, schema.key_of_key(&[Value::Int(7)]));
        assert!(matches!(outcome, Outcome::Send(ref c) if c.version == 9 && !c.deleted), "{outcome:?}");
        let (key, outcome) = row_outcome(&schema, 9, read(Some(0))).unwrap();
        assert_eq!(key, schema.key_of_key(&[Value::Int(7)]));
        match outcome {
            Outcome::Reject { reason, key } => {
                assert!(reason.contains("column 0: PostgreSQL sent 3 bytes"), "{reason}");
                assert_eq!(key, vec![Value::Int(7)]);
            }
            other => panic!("not rejected: {other:?}"),
        }
        let stopped = row_outcome(&schema, 9, read(Some(1))).unwrap_err();
        assert_eq!(stopped.kind(), ErrorKind::Permanent, "{stopped}");
        assert!(stopped.to_string().contains("a key of PostgreSQL table"), "{stopped}");
    }

    #[test]
    fn a_changed_primary_key_is_named() {
        assert_eq!(
            describe_change("id:20:-1:true;key=id", "id:20:-1:true;key=id,at"),
            "its primary key changed from (id) to (id,at)"
        );
    }

    #[test]
    fn a_changed_table_is_described_by_column() {
        let before = "id:20:-1:true,name:25:-1:false";
        assert_eq!(
            describe_change(before, "id:20:-1:true,name:25:-1:false,country:25:-1:false"),
            "column \"country\" was added"
        );
        assert_eq!(describe_change(before, "id:20:-1:true"), "column \"name\" was dropped or renamed");
        assert_eq!(
            describe_change(before, "id:23:-1:true,name:25:-1:false"),
            "column \"id\" changed type or nullability"
        );
    }

    #[test]
    fn claims_select_in_key_order_and_bind_the_cursor_after_the_limit() {
        let schema = crate::change::tests::logins();
        let s = Statements::new(&schema);
        assert!(s.claim_rows[1].contains("AND (s.\"id\") > ($2) ORDER BY s.\"id\" LIMIT $1"), "{}", s.claim_rows[1]);
        assert!(!s.claim_rows[0].contains("FOR UPDATE"), "claims lock nothing: {}", s.claim_rows[0]);
        assert!(s.lock_rows.ends_with("FOR NO KEY UPDATE SKIP LOCKED"), "{}", s.lock_rows);
        assert!(
            s.claim_deletes[0].contains("FROM _pg2ch.\"public.user_logins\" d ORDER BY d.\"id\" LIMIT $1"),
            "{}",
            s.claim_deletes[0]
        );
        assert!(s.claim_deletes[1].contains("d WHERE (d.\"id\") > ($2) ORDER BY"), "{}", s.claim_deletes[1]);
    }
}
