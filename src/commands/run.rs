//! `pg2ch run`, `produce` and `consume`: the real stores wired to the
//! pipeline, one pipeline per table, lanes of producers and a consumer.

use std::cell::Cell;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::clickhouse::{ChSink, ClickHouse};
use crate::kafka::{self, KafkaLog};
use crate::pipeline::{Consumer, ConsumerConfig, NoFaults, Producer, ProducerConfig, loops};
use crate::postgres::lease::{self, PgLeases};
use crate::postgres::{self, PgSource, ProducerLease};
use crate::stores::ClaimMode;

use super::init::{keep_versions_ahead, resend_for_added_columns};
use super::peak_rss_mb;
use super::waits::{RealWaits, pause};
use super::{RunOptions, Settings, Shutdown, Table, single_table, tables};

/// What producers of one table need from the real services: the topic, and
/// one PostgreSQL session per lane.
pub struct ProducerStores {
    pub table: Table,
    pub log: KafkaLog,
    pub sources: Vec<PgSource>,
    options: sqlx::postgres::PgConnectOptions,
    config: ProducerConfig,
}

impl ProducerStores {
    pub async fn connect(s: &Settings, o: &RunOptions, pool: &PgPool, table: Table) -> anyhow::Result<Self> {
        postgres::install::check_installed(pool, table.oid, &table.schema).await?;
        let ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
        keep_versions_ahead(pool, &ch, &table.schema).await?;
        let client = kafka::connect(&s.kafka, s.timeouts.call).await?;
        let log = KafkaLog::open(&client, &table.topic, s.timeouts.call).await?.with_compression(o.compression);
        let settings = postgres::producer_settings(s.timeouts.call);
        let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let options = postgres::connect_options(&s.pg, &settings);
        let sources = (0..o.producers.max(1))
            .map(|_| {
                PgSource::new(
                    table.schema.clone(),
                    table.oid,
                    options.clone(),
                    s.timeouts.call,
                    table.fingerprint.clone(),
                )
            })
            .collect();
        // Test builds have more fields (the deliberately broken orderings).
        #[allow(clippy::needless_update)]
        let config =
            ProducerConfig { batch_rows: o.batch_rows, batch_bytes: o.batch_bytes, ..ProducerConfig::default() };
        Ok(ProducerStores { table, log, sources, options, config })
    }

    /// Waits until producers of the other claim mode are gone, then holds
    /// the lease for as long as the value lives. `None` if shutdown came first.
    pub async fn lease(
        &self,
        o: &RunOptions,
        timeout: Duration,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<Option<ProducerLease>> {
        let mut lease = ProducerLease::open(&self.options, self.table.oid, o.claim_mode, timeout).await?;
        let mut waiting = false;
        while !lease.try_take().await? {
            if !waiting {
                waiting = true;
                tracing::info!(
                    "{}: waiting: {} producer is at work; this one starts when it stops",
                    self.table.schema,
                    match o.claim_mode {
                        ClaimMode::Shared => "an exclusive",
                        ClaimMode::Exclusive => "another",
                    }
                );
            }
            pause(o.poll, &mut shutdown).await;
            if *shutdown.borrow() {
                return Ok(None);
            }
        }
        if waiting {
            tracing::info!("{}: the other producer stopped; starting", self.table.schema);
        }
        Ok(Some(lease))
    }

    /// One producer per lane, sharing the log and the keyset cursor.
    pub fn producers(&mut self) -> Vec<Producer<PgSource, &KafkaLog>> {
        let cursor = crate::pipeline::Cursor::default();
        std::mem::take(&mut self.sources)
            .into_iter()
            .map(|source| {
                Producer::new(self.table.schema.clone(), source, &self.log, self.config.clone())
                    .with_cursor(cursor.clone())
            })
            .collect()
    }
}

/// A single producer on the real stores (the crash-replay tests use this).
pub async fn producer(s: &Settings, o: &RunOptions) -> anyhow::Result<Producer<PgSource, KafkaLog>> {
    let (pool, table) = single_table(s).await?;
    let mut stores = ProducerStores::connect(s, &RunOptions { producers: 1, ..o.clone() }, &pool, table).await?;
    let source = stores.sources.pop().expect("one lane");
    Ok(Producer::new(stores.table.schema.clone(), source, stores.log, stores.config))
}

/// A consumer of one table on the real stores, as `pg2ch consume` builds
/// it: ClickHouse's table is brought up to date with PostgreSQL's first.
pub async fn consumer_of(
    s: &Settings,
    o: &RunOptions,
    pool: &PgPool,
    table: &Table,
) -> anyhow::Result<Consumer<KafkaLog, ChSink>> {
    open_consumer(s, o, Some(pool), table).await
}

/// A consumer of one table; with `sync` (the PostgreSQL pool to flag rows
/// in), the ClickHouse table first gains the columns PostgreSQL added and
/// their rows are sent again, as a consumer that writes needs; without, it
/// only reads (`status`).
pub(super) async fn open_consumer(
    s: &Settings,
    o: &RunOptions,
    sync: Option<&PgPool>,
    table: &Table,
) -> anyhow::Result<Consumer<KafkaLog, ChSink>> {
    let client = kafka::connect(&s.kafka, s.timeouts.call).await?;
    let log = KafkaLog::open(&client, &table.topic, s.timeouts.call).await?.with_fetch_max_bytes(o.fetch_max_bytes);
    let ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    if let Some(pool) = sync {
        let added = ch.sync_table(&table.schema).await?;
        resend_for_added_columns(pool, &table.schema, &added).await?;
    }
    ch.check_positions().await?;
    let count = crate::stores::EventLog::partitions(&log);
    let mut config = ConsumerConfig::all_partitions(count);
    if let Some(assigned) = &o.partitions {
        if let Some(bad) = assigned.iter().find(|p| !(0..count).contains(*p)) {
            anyhow::bail!("--partitions names partition {bad}, but topic {:?} has partitions 0..{count}", table.topic);
        }
        config.partitions = assigned.clone();
        config.by_hand = true;
    }
    config.insert_rows = o.insert_rows;
    let sink = ChSink { ch, schema: table.schema.clone(), group: s.kafka.group.clone(), topic: table.topic.clone() };
    Ok(Consumer::new(table.schema.clone(), log, sink, config))
}

/// A consumer of one table as `run` and `consume` run it: a member of its
/// group, reading its share of the partitions through leases.
pub async fn leased_consumer_of(
    s: &Settings,
    o: &RunOptions,
    pool: &PgPool,
    table: &Table,
) -> anyhow::Result<Consumer<KafkaLog, ChSink, PgLeases>> {
    let consumer = consumer_of(s, o, pool, table).await?;
    let options =
        postgres::connect_options(&s.pg, &lease::SESSION_SETTINGS).application_name(&lease::session_name("consumer"));
    let leases = PgLeases::open(options, s.timeouts.call, &s.kafka.group, &table.topic).await?;
    Ok(consumer.with_leases(leases))
}

/// A consumer of the one table of `s` (the tests use this).
pub async fn consumer(s: &Settings, o: &RunOptions) -> anyhow::Result<Consumer<KafkaLog, ChSink>> {
    let (pool, table) = single_table(s).await?;
    consumer_of(s, o, &pool, &table).await
}

/// Runs every lane until done (with `once`) or shutdown; returns rows moved.
async fn produce_lanes<L: crate::stores::EventLog>(
    producers: &mut [Producer<PgSource, L>],
    what: &str,
    once: bool,
    pace: loops::Pace,
    shutdown: &Shutdown,
) -> anyhow::Result<usize> {
    let moved = futures::future::try_join_all(producers.iter_mut().map(|p| async {
        let mut waits = RealWaits::new(shutdown.clone());
        loops::produce(p, &NoFaults, format!("{what} producer"), once, pace, &mut waits).await
    }))
    .await?;
    Ok(moved.into_iter().sum())
}

/// Shows the table's initial load's progress while it lasts: a bar (rows,
/// rate, time to go) on a terminal, else a log line every few seconds; and
/// a line when it is done. Returns then (at once without a load).
async fn report_load(pool: &PgPool, oid: u32, what: &str) {
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix}: initial load {bar:30} {pos}/{len} {msg}, {elapsed} (eta {eta})",
        )
        .expect("a fixed template"),
    );
    bar.set_prefix(what.to_owned());
    let every = if bar.is_hidden() { Duration::from_secs(2) } else { Duration::from_millis(250) };
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut first = true;
    let mut logged = std::time::Instant::now();
    loop {
        match postgres::load_progress(pool, oid).await {
            Ok(Some(load)) if load.finished => {
                bar.finish_and_clear();
                if !first {
                    tracing::info!("{what}: initial load {}", load.describe());
                }
                return;
            }
            Ok(Some(load)) if bar.is_hidden() => {
                if first || logged.elapsed() >= Duration::from_secs(2) {
                    tracing::info!("{what}: initial load {}", load.describe());
                    logged = std::time::Instant::now();
                }
            }
            // In rows as PostgreSQL's statistics count them, or in chunks
            // for a table never analysed.
            Ok(Some(load)) if load.rows_estimate > 0 => {
                let rate =
                    if load.seconds > 0.0 { load.rows_estimate as f64 * load.done() / load.seconds } else { 0.0 };
                bar.set_message(format!("rows, {rate:.0} rows/s"));
                bar.set_length(load.rows_estimate as u64);
                bar.set_position((load.rows_estimate as f64 * load.done()) as u64);
            }
            Ok(Some(load)) => {
                bar.set_message("chunks");
                bar.set_length(load.chunks.max(0) as u64);
                bar.set_position((load.chunks - load.chunks_left).max(0) as u64);
            }
            Ok(None) => return,
            Err(e) => tracing::debug!("{e:#}"),
        }
        first = false;
        tick.tick().await;
    }
}

/// Which halves of the pipeline a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halves {
    Produce,
    Consume,
    Both,
}

/// One table's pipeline, until done (with `--once`) or shutdown. Returns
/// the rows published and the records written.
async fn table_pipeline(
    s: &Settings,
    o: &RunOptions,
    pool: &PgPool,
    table: Table,
    halves: Halves,
    shutdown: Shutdown,
) -> anyhow::Result<(usize, usize)> {
    let what = table.schema.to_string();
    let mut consumer = match halves {
        Halves::Produce => None,
        _ => Some(leased_consumer_of(s, o, pool, &table).await?),
    };
    if halves == Halves::Consume {
        let c = consumer.as_mut().expect("built above");
        // With --once the producer is someone else, done before we start:
        // drain to the ends as they are now, still stopping on SIGINT/SIGTERM.
        let done = o.once.then(|| Cell::new(Some(true)));
        let mut waits = RealWaits::new(shutdown);
        return Ok((
            0,
            loops::consume(c, &NoFaults, format!("{what} consumer"), done.as_ref(), o.poll, &mut waits).await?,
        ));
    }
    let table_oid = table.oid;
    let mut stores = ProducerStores::connect(s, o, pool, table).await?;
    let Some(lease) = stores.lease(o, s.timeouts.call, shutdown.clone()).await? else { return Ok((0, 0)) };
    let pace = loops::Pace { poll: o.poll, coalesce: o.coalesce };
    let mut producers = stores.producers();
    let work = async {
        match consumer.as_mut() {
            None => produce_lanes(&mut producers, &what, o.once, pace, &shutdown).await.map(|n| (n, 0)),
            Some(c) if o.once => {
                // Either half failing for good ends both: the other is abandoned
                // where it stands, as a crash would leave it.
                let done: Cell<Option<bool>> = Cell::new(None);
                let produce = async {
                    let r = produce_lanes(&mut producers, &what, true, pace, &shutdown).await;
                    done.set(Some(r.is_ok()));
                    r
                };
                let mut waits = RealWaits::new(shutdown.clone());
                let consume = loops::consume(c, &NoFaults, format!("{what} consumer"), Some(&done), o.poll, &mut waits);
                tokio::try_join!(produce, consume)
            }
            Some(c) => {
                let mut waits = RealWaits::new(shutdown.clone());
                tokio::try_join!(
                    produce_lanes(&mut producers, &what, false, pace, &shutdown),
                    loops::consume(c, &NoFaults, format!("{what} consumer"), None, o.poll, &mut waits)
                )
            }
        }
    };
    let progress = async {
        report_load(pool, table_oid, &what).await;
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        r = work => r,
        () = progress => unreachable!("the progress report never ends"),
    };
    drop(producers);
    lease.release().await;
    result
}

/// Runs the pipelines of every table at once; a table that fails stops
/// alone. Returns the rows published, or the first table's error once the
/// others are done.
async fn pipelines(s: &Settings, o: &RunOptions, halves: Halves, shutdown: Shutdown) -> anyhow::Result<usize> {
    let pool = postgres::connect(&s.pg, 2 + 2 * s.tables.len() as u32, s.timeouts.call).await?;
    let tables = tables(s, &pool, false).await?;
    let started = Instant::now();
    let runs = tables.into_iter().map(|table| {
        let (pool, shutdown) = (&pool, shutdown.clone());
        async move {
            let name = table.schema.to_string();
            let result = match postgres::install::check_table(pool, table.oid, &table.schema, Some(&table.topic)).await
            {
                Ok(()) => table_pipeline(s, o, pool, table, halves, shutdown).await,
                Err(e) => Err(e),
            };
            match &result {
                Ok((moved, written)) => tracing::info!(
                    "{name}: {moved} rows published, {written} records written in {:.1?}",
                    started.elapsed()
                ),
                Err(e) => tracing::error!("{name}: stopped: {e:#}"),
            }
            result.map_err(|e| e.context(format!("table {name}")))
        }
    });
    let results = futures::future::join_all(runs).await;
    tracing::info!("peak RSS {} MB", peak_rss_mb().map_or("?".into(), |m| m.to_string()));
    let mut moved = 0;
    let mut first_error = None;
    for r in results {
        match r {
            Ok((n, _)) => moved += n,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(moved), Err)
}

pub async fn produce(s: &Settings, o: &RunOptions, shutdown: Shutdown) -> anyhow::Result<()> {
    pipelines(s, o, Halves::Produce, shutdown).await.map(|_| ())
}

pub async fn consume(s: &Settings, o: &RunOptions, shutdown: Shutdown) -> anyhow::Result<()> {
    pipelines(s, o, Halves::Consume, shutdown).await.map(|_| ())
}

/// Producer and consumer in one process, per table. With `once`, returns
/// when every change that was waiting at the start is in ClickHouse and its
/// position stored.
pub async fn run(s: &Settings, o: &RunOptions, shutdown: Shutdown) -> anyhow::Result<usize> {
    pipelines(s, o, Halves::Both, shutdown).await
}
