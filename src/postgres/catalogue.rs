//! A table's shape from PostgreSQL's catalogue, and the checks that refuse,
//! in one line naming the table or column, what pg2ch cannot carry safely:
//! a relation that is not a table, a table without a primary key, a
//! partition or inheritance child without a unique index on that key (the
//! sink keeps one row per key, so two rows with one key would collapse), a
//! key column of a type pg2ch cannot order as PostgreSQL does, a column of
//! a type it does not carry (unless `--other-types text`), column names
//! that would collide in ClickHouse.

use anyhow::Context;
use sqlx::PgPool;

use crate::schema::{Column, OWN_COLUMNS, TableSchema};
use crate::types::postgres::CatalogueType;

/// A table as the user named it (`orders`, `public.orders`, `"Odd Name"`),
/// resolved through the search path: its oid.
pub async fn resolve(pool: &PgPool, name: &str) -> anyhow::Result<Option<u32>> {
    let oid: Option<sqlx::postgres::types::Oid> = sqlx::query_scalar("SELECT to_regclass($1)::oid")
        .bind(name)
        .fetch_one(pool)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("table name {name:?} is not a valid PostgreSQL name"))?;
    Ok(oid.map(|o| o.0))
}

/// What `pg_type` says of a type.
struct TypeFacts {
    kind: String,
    base: u32,
    typmod: i32,
    element: u32,
    category: String,
}

async fn type_facts(pool: &PgPool, oid: u32) -> anyhow::Result<TypeFacts> {
    let (kind, base, typmod, element, category): (String, i64, i32, i64, String) = sqlx::query_as(
        "SELECT typtype::text, typbasetype::int8, typtypmod, typelem::int8, typcategory::text FROM pg_type WHERE oid = $1",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_one(pool)
    .await
    .with_context(|| format!("reading type {oid} from the catalogue"))?;
    Ok(TypeFacts { kind, base: base as u32, typmod, element: element as u32, category })
}

/// A type with its domains resolved: (oid, typtype, typmod, category, element oid).
async fn base_type(pool: &PgPool, mut oid: u32, mut typmod: i32) -> anyhow::Result<(u32, TypeFacts, i32)> {
    for _ in 0..32 {
        let facts = type_facts(pool, oid).await?;
        if facts.kind != "d" {
            return Ok((oid, facts, typmod));
        }
        if typmod == -1 {
            typmod = facts.typmod;
        }
        oid = facts.base;
    }
    anyhow::bail!("type {oid} is a domain nested more than 32 deep")
}

/// The catalogue's facts about a column's type.
async fn column_type(pool: &PgPool, oid: u32, typmod: i32, name: String) -> anyhow::Result<CatalogueType> {
    let (base, facts, typmod) = base_type(pool, oid, typmod).await?;
    let element = if facts.category == "A" && facts.element != 0 {
        let (element, element_facts, _) = base_type(pool, facts.element, -1).await?;
        Some((element, element_facts.kind))
    } else {
        None
    };
    Ok(CatalogueType { oid: base, kind: facts.kind, element, typmod, name })
}

/// The catalogue's fingerprint of a table's columns (pg2ch's own left out):
/// what must not change under a running pipeline.
pub const FINGERPRINT: &str = "SELECT coalesce(string_agg(attname || ':' || atttypid || ':' || atttypmod || ':' || attnotnull, ',' \
     ORDER BY attnum), '') || ';key=' || coalesce((SELECT string_agg(a.attname, ',' ORDER BY k.n) \
     FROM pg_index x CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY k(attnum, n) \
     JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum \
     WHERE x.indrelid = $1 AND x.indisprimary), '') FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 \
     AND NOT attisdropped AND attname <> ALL($2)";

/// The primary key's columns, in order, as the table has them now.
pub async fn primary_key(pool: &PgPool, oid: u32) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index x CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY k(attnum, n)
         JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
         WHERE x.indrelid = $1 AND x.indisprimary ORDER BY k.n",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(pool)
    .await
    .context("reading the primary key")
}

pub async fn fingerprint<'c>(db: impl sqlx::PgExecutor<'c>, oid: u32) -> anyhow::Result<String> {
    sqlx::query_scalar(FINGERPRINT)
        .bind(sqlx::postgres::types::Oid(oid))
        .bind(&OWN_COLUMNS[..])
        .fetch_one(db)
        .await
        .context("reading the columns' fingerprint")
}

/// Reads the table with this oid and checks that pg2ch can carry it.
/// `other_as_text` carries types pg2ch does not know as their text form.
pub async fn read_table(pool: &PgPool, oid: u32, other_as_text: bool) -> anyhow::Result<TableSchema> {
    let oid_param = sqlx::postgres::types::Oid(oid);
    let (namespace, name, kind): (String, String, String) = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, c.relkind::text FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
    )
    .bind(oid_param)
    .fetch_one(pool)
    .await
    .context("reading the table from the catalogue")?;
    let display = format!("{namespace}.{name}");
    if kind != "r" && kind != "p" {
        anyhow::bail!("PostgreSQL relation {display} is not a table (relkind {kind:?}); pg2ch needs a table");
    }
    let attributes: Vec<(String, i64, i32, bool, String)> = sqlx::query_as(
        "SELECT attname::text, atttypid::int8, atttypmod, attnotnull, format_type(atttypid, atttypmod)
         FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(oid_param)
    .fetch_all(pool)
    .await
    .with_context(|| format!("reading the columns of {display}"))?;
    let key_names: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index x
         CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
         WHERE x.indrelid = $1 AND x.indisprimary ORDER BY k.ord",
    )
    .bind(oid_param)
    .fetch_all(pool)
    .await
    .with_context(|| format!("reading the primary key of {display}"))?;
    if key_names.is_empty() {
        anyhow::bail!(
            "PostgreSQL table {display} has no primary key; pg2ch keeps one row per primary key in ClickHouse, \
             so it needs one (ALTER TABLE ... ADD PRIMARY KEY)"
        );
    }
    let mut columns = Vec::new();
    for (column, type_oid, typmod, not_null, type_name) in attributes {
        if OWN_COLUMNS.contains(&column.as_str()) {
            continue;
        }
        let facts = column_type(pool, type_oid as u32, typmod, type_name.clone()).await?;
        let Some(ty) = facts.pg_type(other_as_text) else {
            anyhow::bail!(
                "PostgreSQL column {display}.{column} has type {type_name}, which pg2ch does not carry \
                 (pass --other-types text to carry its text form)"
            );
        };
        columns.push(Column { name: column, ty, nullable: !not_null });
    }
    let mut key = Vec::new();
    for k in &key_names {
        let i = columns.iter().position(|c| &c.name == k).with_context(|| format!("key column {k} of {display}"))?;
        if !columns[i].ty.can_be_key() {
            anyhow::bail!(
                "primary key column {display}.{k} has type {}; a key pg2ch carries is made of integers, text \
                 (text, varchar, char), uuid, bytea, boolean, date and timestamp columns",
                columns[i].ty
            );
        }
        key.push(i);
    }
    let schema = TableSchema::new(namespace, name, columns, key);
    schema.check_names().map_err(anyhow::Error::msg)?;
    check_holders(pool, oid, &schema, &key_names).await?;
    Ok(schema)
}

/// Every relation that holds rows of the table (itself, its partitions, its
/// inheritance children, at any depth) is a plain table with a unique index
/// on exactly the primary key's columns.
async fn check_holders(pool: &PgPool, oid: u32, schema: &TableSchema, key: &[String]) -> anyhow::Result<()> {
    let holders: Vec<(String, String, bool)> = sqlx::query_as(
        "WITH RECURSIVE tree(oid) AS (
             SELECT $1::oid
             UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid)
         SELECT c.oid::regclass::text, c.relkind::text,
                EXISTS (SELECT 1 FROM pg_index x
                        WHERE x.indrelid = c.oid AND x.indisunique AND x.indpred IS NULL AND x.indexprs IS NULL
                          AND x.indnkeyatts = cardinality($2::text[])
                          AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a
                               WHERE a.attrelid = c.oid AND a.attnum = ANY(x.indkey[0:x.indnkeyatts - 1]))
                              = (SELECT array_agg(k ORDER BY k) FROM unnest($2::text[]) k))
         FROM tree t JOIN pg_class c ON c.oid = t.oid WHERE c.relkind <> 'p' ORDER BY 1",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .bind(key)
    .fetch_all(pool)
    .await
    .with_context(|| format!("reading the partitions of {schema}"))?;
    for (name, kind, unique) in &holders {
        if kind != "r" {
            anyhow::bail!("PostgreSQL table {schema} has {name} (relkind {kind:?}), which is not a plain table");
        }
        if !unique {
            anyhow::bail!(
                "PostgreSQL table {name} (holding rows of {schema}) has no primary key or unique index on ({}); \
                 pg2ch keeps one row per key, so keys must be unique in every table holding rows",
                key.join(", ")
            );
        }
    }
    Ok(())
}

/// The relations that hold rows of the table and need pg2ch's row
/// triggers of their own: the table, and its inheritance children (the
/// partitions of a partitioned table get its triggers by themselves).
pub async fn trigger_holders(pool: &PgPool, oid: u32) -> anyhow::Result<Vec<u32>> {
    let oids: Vec<sqlx::postgres::types::Oid> = sqlx::query_scalar(
        "WITH RECURSIVE tree(oid) AS (
             SELECT $1::oid
             UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid
             JOIN pg_class p ON p.oid = t.oid WHERE p.relkind <> 'p')
         SELECT oid FROM tree ORDER BY oid",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(pool)
    .await
    .context("reading the inheritance children")?;
    Ok(oids.into_iter().map(|o| o.0).collect())
}
