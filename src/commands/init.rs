//! `pg2ch init` and `pg2ch seed`: install what carrying a table needs on
//! every side (PostgreSQL's triggers and outbox, the topic, ClickHouse's
//! table), bring ClickHouse's columns up to PostgreSQL's, and seed the demo table.

use anyhow::Context;
use sqlx::PgPool;

use crate::clickhouse::ClickHouse;
use crate::config::pg_ident;
use crate::kafka;
use crate::postgres;
use crate::schema::{DEFAULT_TABLE, SENT, TableSchema};

use super::{Settings, tables};

pub async fn init(s: &Settings, partitions: i32, replication: Option<i16>, grant: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(partitions >= 1, "--partitions must be at least 1, got {partitions}");
    // Two sessions: one builds an index while the other reads its progress.
    let pool = postgres::connect(&s.pg, 2, s.timeouts.call).await?;
    let ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    let client = kafka::connect(&s.kafka, s.timeouts.call).await?;
    let tables = tables(s, &pool, true).await?;
    // Every check that can fail comes before the first write.
    let replication = kafka::replication_factor(&client, replication, s.timeouts.call).await?;
    for t in &tables {
        kafka::topic_matches(&client, &t.topic, partitions, s.timeouts.call).await?;
    }
    ch.init().await?;
    for t in &tables {
        // A ClickHouse table made now is made by the key the table has now.
        let new_in_clickhouse = !ch.table_exists(&t.schema).await?;
        postgres::install::install(&pool, t.oid, &t.schema).await?;
        postgres::install::record_table(&pool, t.oid, &t.schema, &t.topic, new_in_clickhouse).await?;
        for role in grant {
            postgres::install::grant(&pool, t.oid, &t.schema, role).await?;
        }
        kafka::ensure_topic(&client, &t.topic, partitions, replication, s.timeouts.call).await?;
        let dead_letters = kafka::dead_letter_topic(&t.topic);
        kafka::ensure_topic(&client, &dead_letters, 1, replication, s.timeouts.call).await?;
        ch.create_table(&t.schema).await?;
        let added = ch.sync_table(&t.schema).await?;
        keep_versions_ahead(&pool, &ch, &t.schema).await?;
        resend_for_added_columns(&pool, &t.schema, &added).await?;
        tracing::info!(
            "initialised: PostgreSQL {}, topic {:?} ({partitions} partitions, replication factor {replication} when created), ClickHouse {}.{} (server {}.{})",
            t.schema,
            t.topic,
            s.ch.database,
            t.schema.name,
            ch.caps.version.0,
            ch.caps.version.1
        );
    }
    Ok(())
}

/// Makes the version sequence exceed every version the table's rows carry
/// in ClickHouse (all shards), saying so when it had to move it: new
/// changes must outrank what is there, or they would lose to it.
pub(super) async fn keep_versions_ahead(pool: &PgPool, ch: &ClickHouse, schema: &TableSchema) -> anyhow::Result<()> {
    // A table that is not pg2ch's is refused by name before it is read (a
    // column PostgreSQL gained and ClickHouse not yet is the consumer's to add).
    ch.check_engine(schema).await?;
    let highest = ch.max_version(schema).await?;
    if let Some(before) = postgres::keep_versions_above(pool, highest).await? {
        tracing::warn!(
            "{schema}: the version sequence _pg2ch.versions was at {before}, behind the highest version ClickHouse \
             holds ({highest}; a restore, a failover or a new init?): moved it past, so that new changes win"
        );
    }
    Ok(())
}

/// After ClickHouse gained columns for PostgreSQL columns added since the
/// rows were sent, those rows lack them there: rows holding a value in one
/// are flagged unsent, so the next run sends them again (with a new
/// version, which ClickHouse prefers).
pub(super) async fn resend_for_added_columns(
    pool: &PgPool,
    schema: &TableSchema,
    added: &[String],
) -> anyhow::Result<()> {
    if added.is_empty() {
        return Ok(());
    }
    let any = added.iter().map(|c| format!("{} IS NOT NULL", pg_ident(c))).collect::<Vec<_>>().join(" OR ");
    let sent = pg_ident(SENT);
    let n = sqlx::query(&format!("UPDATE {} SET {sent} = FALSE WHERE {sent} AND ({any})", schema.pg_name()))
        .execute(pool)
        .await
        .with_context(|| format!("flagging rows of {schema} unsent for the added column(s)"))?
        .rows_affected();
    tracing::info!("{schema}: {n} rows hold values in the added column(s) {added:?}; they will be sent again");
    Ok(())
}

pub async fn seed(s: &Settings, rows: u64) -> anyhow::Result<()> {
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    let Some(oid) = postgres::resolve(&pool, DEFAULT_TABLE).await? else {
        anyhow::bail!("PostgreSQL table {DEFAULT_TABLE} does not exist (run `pg2ch init`)");
    };
    let schema = postgres::read_table(&pool, oid, false).await?;
    postgres::install::check_installed(&pool, oid, &schema).await?;
    let bar = indicatif::ProgressBar::new(rows);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows ({per_sec}, eta {eta})")
            .expect("static template"),
    );
    postgres::seed(&pool, rows, 10_000, |done| bar.set_position(done)).await?;
    bar.finish_and_clear();
    tracing::info!("seeded {rows} rows");
    Ok(())
}
