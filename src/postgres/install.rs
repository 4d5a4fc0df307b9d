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
//!   outbox (`_pg2ch."schema.table"`), which producers drain like the table;
//! - `pg2ch_notify`, per statement (not pg2ch's own), wakes idle producers on commit.
//!
//! Row triggers go on every inheritance child too (a declaratively
//! partitioned table passes its own to its partitions).

use anyhow::Context;
use sqlx::PgPool;

use super::catalogue::trigger_holders;
use super::{channel, outbox, own_name};
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
fn literal(s: &str) -> String {
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
fn trigger_statements(schema: &TableSchema, relation: &str, statement_level: bool) -> Vec<String> {
    let record = format!("_pg2ch.{}()", pg_ident(&own_name(schema, "")));
    let changed = schema
        .key_columns()
        .map(|c| format!("OLD.{0} IS DISTINCT FROM NEW.{0}", pg_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let mut out = vec![
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
    ];
    if statement_level {
        out.push(format!(
            "CREATE OR REPLACE TRIGGER pg2ch_notify AFTER INSERT OR DELETE OR UPDATE ON {relation} \
             FOR EACH STATEMENT WHEN ({NOT_OURS}) EXECUTE FUNCTION _pg2ch.notify({})",
            literal(&channel(schema))
        ));
    }
    out
}

/// Installs pg2ch on the table with this oid (see the module comment).
pub async fn install(pool: &PgPool, oid: u32, schema: &TableSchema) -> anyhow::Result<()> {
    let t = schema.pg_name();
    let index = pg_ident(&format!("{}_unsent_idx", schema.name).chars().take(63).collect::<String>());
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
    let mut statements = vec![
        "CREATE SCHEMA IF NOT EXISTS _pg2ch".to_owned(),
        "CREATE SEQUENCE IF NOT EXISTS _pg2ch.versions".to_owned(),
        // The consumer groups whose partition leases live here.
        super::lease::REGISTRY.to_owned(),
        format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} BOOLEAN NOT NULL DEFAULT FALSE", pg_ident(SENT)),
        // Why a row could not be sent; such rows are skipped by claims and reported.
        format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} TEXT", pg_ident(REJECTED)),
        // The version a row was last sent as (claims give versions).
        format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} BIGINT NOT NULL DEFAULT 0", pg_ident(VERSION)),
        // When the row last changed, for the lag in time (`status`). now()
        // is stable, so existing rows take init's time without a rewrite.
        format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} TIMESTAMPTZ NOT NULL DEFAULT now()", pg_ident(CHANGED_AT)),
        format!("CREATE INDEX IF NOT EXISTS {index} ON {t} ({}) WHERE NOT {}", order_by(schema, ""), pg_ident(SENT)),
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
        "CREATE OR REPLACE FUNCTION _pg2ch.unsent() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN NEW.sent_to_kafka := false; NEW.pg2ch_rejected := NULL; NEW.pg2ch_changed_at := now(); RETURN NEW; END $$"
            .to_owned(),
        // One notification per statement (and PostgreSQL folds a
        // transaction's equal ones into one), delivered at commit.
        "CREATE OR REPLACE FUNCTION _pg2ch.notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$"
            .to_owned(),
        format!(
            "CREATE OR REPLACE FUNCTION _pg2ch.{}() RETURNS trigger LANGUAGE plpgsql AS {tag} {record_body} {tag}",
            pg_ident(&own_name(schema, ""))
        ),
    ];
    statements.extend(triggers(pool, oid, schema).await?);
    for sql in &statements {
        sqlx::query(sql)
            .execute(pool)
            .await
            .with_context(|| format!("PostgreSQL init of {schema}: {}", sql.lines().next().unwrap_or(sql)))?;
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
        out.extend(trigger_statements(schema, &name, holder == oid));
    }
    Ok(out)
}

/// At start: fails, naming what is missing, unless `init` installed pg2ch
/// on the table; brings the triggers up to date when the table gained
/// columns (or inheritance children) since.
pub async fn check_installed(pool: &PgPool, oid: u32, schema: &TableSchema) -> anyhow::Result<()> {
    let present: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(pool)
    .await
    .with_context(|| format!("reading the columns of {schema}"))?;
    let missing: Vec<&str> = OWN_COLUMNS.into_iter().filter(|c| !present.iter().any(|p| p == c)).collect();
    let outbox_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(outbox(schema))
        .fetch_one(pool)
        .await
        .context("looking up the outbox of deleted keys")?;
    if !missing.is_empty() || !outbox_exists {
        let what = if missing.is_empty() {
            "its outbox of deleted keys".to_owned()
        } else {
            format!("column(s) {}", missing.join(", "))
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
        for sql in triggers(pool, oid, schema).await? {
            sqlx::query(&sql).execute(pool).await.with_context(|| {
                format!("updating pg2ch's triggers on {schema} (run `pg2ch init` as the table's owner)")
            })?;
        }
    }
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
        let sql = trigger_statements(&schema, "\"public\".\"Odd \"\"T\"\"\"", true);
        assert!(
            sql[0].contains("BEFORE UPDATE ON \"public\".\"Odd \"\"T\"\"\" FOR EACH ROW WHEN (current_setting"),
            "{}",
            sql[0]
        );
        assert!(sql[2].contains("WHEN (OLD.\"k\"\"1\" IS DISTINCT FROM NEW.\"k\"\"1\")"), "{}", sql[2]);
        assert!(sql[3].contains("_pg2ch.notify('pg2ch_Odd \"T\"')"), "{}", sql[3]);
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(dollar_tag("a $pg2ch0$ b"), "$pg2ch1$");
    }
}
