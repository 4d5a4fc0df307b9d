//! What each `pg2ch` subcommand does: find the tables, connect the
//! adapters, hand them to the pipeline, report. The decisions themselves are
//! in [`crate::pipeline`].
//!
//! Every table has a pipeline of its own (producer lanes and a consumer, on
//! its own topic), so a table that fails (its columns changed, its
//! ClickHouse table is wrong) stops alone while the others go on; the
//! command reports it and exits 2 when the others are done.

mod init;
mod run;
mod status;
mod verify;
mod waits;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::{ChConfig, KafkaConfig, PgConfig, Timeouts};
use crate::kafka;
use crate::pipeline::{ConsumerConfig, ProducerConfig, loops};
use crate::postgres;
use crate::schema::{DEFAULT_TABLE, TableSchema};
use crate::stores::ClaimMode;

pub use init::{init, seed};
pub use run::{ProducerStores, consume, consumer, consumer_of, leased_consumer_of, produce, producer, run};
pub use status::{PartitionStatus, Status, status};
pub use verify::{verify, verify_each_replica};

/// Everything needed to reach the three systems, and which tables to carry.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pg: PgConfig,
    pub ch: ChConfig,
    pub kafka: KafkaConfig,
    pub timeouts: Timeouts,
    /// Source tables as named by the user (`orders`, `public.orders`).
    pub tables: Vec<String>,
    /// Carry columns of types pg2ch does not know as their text form.
    pub other_types_as_text: bool,
}

/// Tunables of `produce`, `consume` and `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Move what is there, then exit.
    pub once: bool,
    pub batch_rows: usize,
    pub batch_bytes: usize,
    /// Producer lanes per table: one claims and publishes while another
    /// flags its batch, which is where PostgreSQL spends its time.
    pub producers: usize,
    /// Row locks and side-by-side producers, or one producer without locks.
    pub claim_mode: ClaimMode,
    pub insert_rows: usize,
    /// Most bytes fetched per partition per step.
    pub fetch_max_bytes: i32,
    /// Codec of the producer's requests to the broker.
    pub compression: kafka::Compression,
    /// Partitions this consumer reads; `None` means all.
    pub partitions: Option<Vec<i32>>,
    /// The longest wait when there is nothing to do (an idle producer
    /// looks sooner after recent work: see [`loops::IdleWait`]).
    pub poll: Duration,
    /// How long a busy producer gathers changes between passes.
    pub coalesce: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            once: false,
            batch_rows: ProducerConfig::default().batch_rows,
            batch_bytes: ProducerConfig::default().batch_bytes,
            producers: 2,
            claim_mode: ClaimMode::Shared,
            insert_rows: ConsumerConfig::INSERT_ROWS,
            fetch_max_bytes: kafka::DEFAULT_FETCH_MAX_BYTES,
            compression: kafka::Compression::NoCompression,
            partitions: None,
            poll: loops::DEFAULT_POLL,
            coalesce: loops::DEFAULT_COALESCE,
        }
    }
}

/// Set to true to ask a running command to stop at its next safe point.
pub type Shutdown = watch::Receiver<bool>;

/// A source table, found and read.
#[derive(Debug, Clone)]
pub struct Table {
    pub oid: u32,
    pub schema: Arc<TableSchema>,
    /// Its topic: `KAFKA_TOPIC` for one table, `<KAFKA_TOPIC>.<name>` for several.
    pub topic: String,
    /// Its columns' fingerprint when read (see `postgres::catalogue::FINGERPRINT`).
    pub fingerprint: String,
}

/// Whether `name` names the default table (which `init` creates when absent).
fn is_default(name: &str) -> bool {
    name == DEFAULT_TABLE
}

/// Finds and reads the tables of `s`. With `create_default`, the default
/// table is created when it is asked for and absent (`init`).
pub async fn tables(s: &Settings, pool: &PgPool, create_default: bool) -> anyhow::Result<Vec<Table>> {
    let mut found: Vec<(u32, Arc<TableSchema>)> = Vec::new();
    for name in &s.tables {
        let oid = match postgres::resolve(pool, name).await? {
            Some(oid) => oid,
            None if create_default && is_default(name) => {
                postgres::install::create_default(pool).await?;
                postgres::resolve(pool, name).await?.context("user_logins was just created")?
            }
            None => anyhow::bail!(
                "PostgreSQL table {name} does not exist{}",
                if is_default(name) { " (run `pg2ch init`)" } else { "" }
            ),
        };
        let schema = Arc::new(postgres::read_table(pool, oid, s.other_types_as_text).await?);
        if let Some((_, other)) = found.iter().find(|(_, t)| t.name == schema.name) {
            anyhow::bail!(
                "tables {other} and {schema} have the same name, which names their ClickHouse table and topic; carry \
                 them with different CH_DB or KAFKA_TOPIC settings, in two processes"
            );
        }
        found.push((oid, schema));
    }
    let several = found.len() > 1;
    let mut out = Vec::with_capacity(found.len());
    for (oid, schema) in found {
        let topic = if several { format!("{}.{}", s.kafka.topic, schema.name) } else { s.kafka.topic.clone() };
        crate::config::topic_name(&topic).with_context(|| format!("the topic of table {schema}"))?;
        if !create_default {
            postgres::install::check_table(pool, oid, &schema, None).await?;
        }
        let fingerprint = postgres::catalogue::fingerprint(pool, oid).await?;
        out.push(Table { oid, schema, topic, fingerprint });
    }
    Ok(out)
}

/// The one table of `s`, read, with its pool (for the tests' single-table helpers).
pub async fn single_table(s: &Settings) -> anyhow::Result<(PgPool, Table)> {
    let pool = postgres::connect(&s.pg, 4, s.timeouts.call).await?;
    let mut tables = tables(s, &pool, false).await?;
    anyhow::ensure!(tables.len() == 1, "this needs exactly one table, got {}", tables.len());
    Ok((pool, tables.remove(0)))
}

/// This process's peak resident memory, from /proc (Linux only).
pub fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// Checks the names from configuration before anything connects.
pub fn check_names(s: &Settings) -> anyhow::Result<()> {
    crate::config::identifier("ClickHouse database (CH_DB)", &s.ch.database)?;
    if let Some(cluster) = &s.ch.cluster {
        crate::config::identifier("ClickHouse cluster (CH_CLUSTER)", cluster)?;
    }
    crate::config::topic_name(&s.kafka.topic).context("KAFKA_TOPIC")?;
    anyhow::ensure!(!s.kafka.group.is_empty(), "KAFKA_GROUP must not be empty");
    anyhow::ensure!(!s.tables.is_empty(), "no table to carry: --table (or PG2CH_TABLES) is empty");
    Ok(())
}
