//! PostgreSQL as `verify` reads it: one session, planned per statement (a
//! range's size decides between an index and a parallel scan) and without
//! JIT (its compile time exceeds a range's run time).
//!
//! A range's figures come from one query on the server: rows not rejected,
//! rows flagged sent, and the sum of the sent rows' checksums
//! ([`crate::checksum::row_sql`]), per range by `width_bucket` over the walk
//! coordinate. For a single integer key the coordinate is the key, and a
//! range is an index range; otherwise it is the key's hash, computed once
//! per row behind an `OFFSET 0` fence.

use std::sync::Arc;

use anyhow::Context;
use sqlx::Postgres;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use super::decode_row;
use super::{classify, outbox};
use crate::checksum::{row_sql, walk_sql};
use crate::config::pg_ident;
use crate::schema::{REJECTED, SENT, TableSchema, VERSION};
use crate::types::postgres::{KeyParam, select_expr};
use crate::types::{Key, KeyPart, Value};
use crate::verify::{Finding, KeyRange, RowState, SAMPLE, SourceRow, SourceSide, SourceSummary};

pub struct PgVerifySide {
    conn: sqlx::pool::PoolConnection<Postgres>,
    schema: Arc<TableSchema>,
    /// Only the rows of one shard (index, shards) of a sharded cluster.
    shard: Option<(usize, usize)>,
    /// Whether the table's initial load has chunks left: their rows read
    /// sent without having been carried yet, and count as unsent.
    loading: bool,
}

impl PgVerifySide {
    pub async fn open(pool: &PgPool, schema: Arc<TableSchema>) -> anyhow::Result<Self> {
        let mut conn = pool.acquire().await.context("PostgreSQL: opening the verify session")?;
        for sql in ["SET plan_cache_mode = force_custom_plan", "SET jit = off"] {
            sqlx::query(sql).execute(&mut *conn).await.with_context(|| format!("PostgreSQL: {sql}"))?;
        }
        let registry: bool = sqlx::query_scalar("SELECT to_regclass('_pg2ch.load_chunks') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await
            .context("PostgreSQL: looking up the initial loads")?;
        let loading = registry
            && sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM _pg2ch.load_chunks WHERE tab = to_regclass($1))",
            )
            .bind(schema.pg_name())
            .fetch_one(&mut *conn)
            .await
            .context("PostgreSQL: looking up the table's initial load")?;
        Ok(PgVerifySide { conn, schema, shard: None, loading })
    }

    /// Whether a row counts as sent, given columns naming its relation and
    /// address: flagged, and not in a chunk of the initial load still to
    /// carry.
    fn sent_sql(&self, relation: &str, address: &str) -> String {
        let sent = pg_ident(SENT);
        if !self.loading {
            return sent;
        }
        format!(
            "({sent} AND NOT EXISTS (SELECT 1 FROM _pg2ch.load_chunks c WHERE c.tab = to_regclass({}) \
             AND c.relid = {relation} AND {address} >= c.first AND {address} < c.stop))",
            super::install::literal(&self.schema.pg_name())
        )
    }

    /// The same side restricted to the rows that shard `index` of `shards`
    /// owns ([`crate::checksum::shard`]): what one replica of it must hold.
    pub fn only_shard(self, index: usize, shards: usize) -> Self {
        PgVerifySide { shard: Some((index, shards)), ..self }
    }

    /// `table` (the source table or its outbox), or only the shard's rows of it.
    fn rows_of(&self, table: String) -> String {
        // While a load lasts, each row's relation and address as columns
        // (`sent_sql` reads them; a subquery's `*` leaves them out).
        let address = if self.loading { ", tableoid AS pg2ch_rel, ctid AS pg2ch_tid" } else { "" };
        match self.shard {
            None if self.loading => format!("(SELECT *{address} FROM {table}) AS s"),
            None => table,
            Some((index, shards)) => format!(
                "(SELECT *{address} FROM {table} WHERE {} = {index}) AS shard",
                crate::checksum::shard_sql(&self.schema, shards)
            ),
        }
    }

    /// [`Self::sent_sql`] for rows read from [`Self::rows_of`].
    fn sent_of_rows(&self) -> String {
        self.sent_sql("pg2ch_rel", "pg2ch_tid")
    }

    fn columns(&self) -> String {
        self.schema.columns.iter().map(|c| select_expr(&pg_ident(&c.name), &c.ty)).collect::<Vec<_>>().join(", ")
    }

    fn keys(&self) -> String {
        self.schema.key_columns().map(|c| select_expr(&pg_ident(&c.name), &c.ty)).collect::<Vec<_>>().join(", ")
    }

    /// The rows of `sql`, whose `$1` and `$2` are the range's ends.
    async fn in_range(&mut self, sql: &str, range: KeyRange, what: &str) -> anyhow::Result<Vec<PgRow>> {
        sqlx::query(sql)
            .bind(range.first)
            .bind(range.last)
            .fetch_all(&mut *self.conn)
            .await
            .map_err(classify)
            .with_context(|| format!("reading {what}{} in {range}", self.schema))
    }

    /// `(k1, k2) = ($1, $2)` for binding a key.
    fn key_match(&self, from: usize) -> String {
        let cols = self.schema.key_columns().map(|c| pg_ident(&c.name)).collect::<Vec<_>>().join(", ");
        let params = (0..self.schema.key.len()).map(|i| format!("${}", i + from)).collect::<Vec<_>>().join(", ");
        format!("({cols}) = ({params})")
    }
}

fn bind_key<'q>(
    mut q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    schema: &'q TableSchema,
    key: &'q [KeyPart],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    for (c, part) in schema.key_columns().zip(key) {
        q = q.bind(KeyParam { ty: &c.ty, part });
    }
    q
}

impl SourceSide for PgVerifySide {
    async fn bounds(&mut self) -> anyhow::Result<Option<KeyRange>> {
        let t = self.rows_of(self.schema.pg_name());
        if self.schema.integer_key() {
            let walk = walk_sql(&self.schema);
            let (first, last): (Option<i64>, Option<i64>) =
                sqlx::query_as(&format!("SELECT min({walk}), max({walk}) FROM {t}"))
                    .fetch_one(&mut *self.conn)
                    .await
                    .with_context(|| format!("reading the key range of {}", self.schema))?;
            return Ok(first.zip(last).map(|(first, last)| KeyRange { first, last }));
        }
        let any: bool = sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM {t})"))
            .fetch_one(&mut *self.conn)
            .await
            .with_context(|| format!("reading {}", self.schema))?;
        Ok(any.then_some(KeyRange::ALL))
    }

    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SourceSummary>> {
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else { return Ok(Vec::new()) };
        let t = self.rows_of(self.schema.pg_name());
        let (sent, rejected) = (self.sent_of_rows(), pg_ident(REJECTED));
        let from = if self.schema.integer_key() {
            format!(
                "(SELECT {} AS w, {} AS h, {sent} AS sent, {rejected} AS rejected FROM {t} WHERE {} BETWEEN $1 AND $2) x",
                walk_sql(&self.schema),
                row_sql(&self.schema),
                walk_sql(&self.schema)
            )
        } else {
            format!(
                "(SELECT {} AS w, {} AS h, {sent} AS sent, {rejected} AS rejected FROM {t} OFFSET 0) x \
                 WHERE w BETWEEN $1 AND $2",
                walk_sql(&self.schema),
                row_sql(&self.schema)
            )
        };
        let sql = format!(
            "SELECT width_bucket(w, $3::int8[]), count(*) FILTER (WHERE rejected IS NULL),
                    count(*) FILTER (WHERE sent AND rejected IS NULL),
                    coalesce(sum(h) FILTER (WHERE sent AND rejected IS NULL), 0)::text,
                    count(*) FILTER (WHERE rejected IS NOT NULL)
             FROM {from} GROUP BY 1"
        );
        let thresholds: Vec<i64> = ranges.iter().map(|r| r.first).collect();
        let what = || format!("checksumming {} in {}", self.schema, KeyRange { first: first.first, last: last.last });
        // The planner counts on as many buckets as rows (it cannot know
        // `width_bucket`'s few), so it would sort every row of the span by
        // bucket, spilling to disk: three times the CPU of a hash table of
        // the few buckets there are (10M rows: 15 s against 5 s).
        let mut tx = sqlx::Connection::begin(&mut *self.conn).await.map_err(classify).with_context(what)?;
        sqlx::query("SET LOCAL enable_sort = off").execute(&mut *tx).await.map_err(classify).with_context(what)?;
        let rows: Vec<(i32, i64, i64, String, i64)> = sqlx::query_as(&sql)
            .bind(first.first)
            .bind(last.last)
            .bind(thresholds)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)
            .with_context(what)?;
        tx.commit().await.map_err(classify).with_context(what)?;
        let mut out = vec![SourceSummary::default(); ranges.len()];
        for (bucket, rows, sent, checksum, rejected) in rows {
            let i =
                usize::try_from(bucket - 1).ok().filter(|i| *i < ranges.len()).context("a row outside the ranges")?;
            let checksum = checksum.parse().with_context(|| format!("PostgreSQL returned checksum {checksum:?}"))?;
            out[i] = SourceSummary { rows: rows as u64, sent: sent as u64, checksum, rejected: rejected as u64 };
        }
        Ok(out)
    }

    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<SourceRow>> {
        let walk = walk_sql(&self.schema);
        let sql = format!(
            "SELECT {}, {walk}, {}, {} IS NOT NULL, {} FROM {} WHERE {walk} BETWEEN $1 AND $2",
            self.columns(),
            self.sent_of_rows(),
            pg_ident(REJECTED),
            pg_ident(VERSION),
            self.rows_of(self.schema.pg_name())
        );
        let rows = self.in_range(&sql, range, "").await?;
        let n = self.schema.columns.len();
        rows.iter()
            .map(|row| {
                let values = decode_row(row, self.schema.columns.iter())?;
                let (sent, rejected, version): (bool, bool, i64) =
                    (row.try_get(n + 1)?, row.try_get(n + 2)?, row.try_get(n + 3)?);
                let state = match (rejected, sent) {
                    (true, _) => RowState::Rejected,
                    (false, true) => RowState::Sent(version as u64),
                    (false, false) => RowState::Pending,
                };
                Ok(SourceRow { walk: row.try_get(n)?, key: self.schema.key_of(&values), values, state })
            })
            .collect()
    }

    async fn pending_deletes(&mut self, range: KeyRange) -> anyhow::Result<Vec<(i64, Key)>> {
        let walk = walk_sql(&self.schema);
        let sql = format!(
            "SELECT {}, {walk} FROM {} WHERE {walk} BETWEEN $1 AND $2",
            self.keys(),
            self.rows_of(outbox(&self.schema))
        );
        let rows = self.in_range(&sql, range, "the deletions of ").await?;
        let k = self.schema.key.len();
        rows.iter()
            .map(|row| Ok((row.try_get(k)?, self.schema.key_of_key(&decode_row(row, self.schema.key_columns())?))))
            .collect()
    }

    async fn rejected(&mut self) -> anyhow::Result<Finding> {
        // The count and the first keys in one pass over the table (none
        // returned: none rejected).
        let sql = format!(
            "SELECT {}, count(*) OVER () FROM {} WHERE {} IS NOT NULL ORDER BY {} LIMIT $1",
            self.keys(),
            self.rows_of(self.schema.pg_name()),
            pg_ident(REJECTED),
            super::install::order_by(&self.schema, "")
        );
        let rows = sqlx::query(&sql)
            .bind(SAMPLE as i64)
            .fetch_all(&mut *self.conn)
            .await
            .map_err(classify)
            .with_context(|| format!("counting rejected rows of {}", self.schema))?;
        let mut finding = Finding::default();
        for row in &rows {
            finding.add(&self.schema.key_of_key(&decode_row(row, self.schema.key_columns())?));
        }
        if let Some(row) = rows.first() {
            finding.count = row.try_get::<i64, _>(self.schema.key.len())? as u64;
        }
        Ok(finding)
    }

    async fn flag_unsent(&mut self, keys: &[Key]) -> anyhow::Result<Vec<Key>> {
        // SKIP LOCKED: a row a claim holds is left to that claim.
        let sql = format!(
            "WITH free AS (SELECT tableoid, ctid FROM {t} WHERE {} AND ({counted} OR {rejected} IS NOT NULL)
                           FOR UPDATE SKIP LOCKED)
             UPDATE {t} u SET {sent} = FALSE, {rejected} = NULL FROM free
             WHERE u.tableoid = free.tableoid AND u.ctid = free.ctid RETURNING 1",
            self.key_match(1),
            t = self.schema.pg_name(),
            counted = self.sent_sql("tableoid", "ctid"),
            sent = pg_ident(SENT),
            rejected = pg_ident(REJECTED)
        );
        let mut flagged = Vec::new();
        for key in keys {
            let done = bind_key(sqlx::query(&sql), &self.schema, key)
                .fetch_all(&mut *self.conn)
                .await
                .map_err(classify)
                .context("flagging rows unsent for repair")?;
            if !done.is_empty() {
                flagged.push(key.clone());
            }
        }
        Ok(flagged)
    }

    async fn record_deletes(&mut self, keys: &[Vec<Value>]) -> anyhow::Result<Vec<Key>> {
        let cols = self.schema.key_columns().map(|c| pg_ident(&c.name)).collect::<Vec<_>>().join(", ");
        let params = (1..=self.schema.key.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "INSERT INTO {} ({cols}) SELECT {params} WHERE NOT EXISTS (SELECT 1 FROM {} WHERE {})
             ON CONFLICT ({cols}) DO UPDATE SET deleted_at = EXCLUDED.deleted_at RETURNING 1",
            outbox(&self.schema),
            self.schema.pg_name(),
            self.key_match(1)
        );
        let mut recorded = Vec::new();
        for values in keys {
            let key = self.schema.key_of_key(values);
            let done = bind_key(sqlx::query(&sql), &self.schema, &key)
                .fetch_all(&mut *self.conn)
                .await
                .map_err(classify)
                .context("recording deletions for repair")?;
            if !done.is_empty() {
                recorded.push(key);
            }
        }
        Ok(recorded)
    }
}
