//! What each `pg2ch` subcommand does: find the tables, connect the
//! adapters, hand them to the pipeline, report. The decisions themselves are
//! in [`crate::pipeline`].
//!
//! Every table has a pipeline of its own (producer lanes and a consumer, on
//! its own topic), so a table that fails (its columns changed, its
//! ClickHouse table is wrong) stops alone while the others go on; the
//! command reports it and exits 2 when the others are done.

use std::cell::Cell;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::clickhouse::verify::ChVerifySide;
use crate::clickhouse::{ChSink, ClickHouse};
use crate::config::{ChConfig, KafkaConfig, PgConfig, Timeouts, pg_ident};
use crate::kafka::{self, KafkaLog};
use crate::pipeline::{Consumer, ConsumerConfig, NoFaults, Producer, ProducerConfig, loops};
use crate::postgres::lease::{self, PgLeases};
use crate::postgres::source::IdleRegistry;
use crate::postgres::{self, PgSource, ProducerLease, RowsCommitted};
use crate::schema::{DEFAULT_TABLE, SENT, TableSchema};
use crate::stores::{ClaimMode, EventLog};
use crate::verify::{self, Report};

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
    /// How long to wait when there is nothing to do.
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
    /// Its columns' fingerprint when read (see [`postgres::catalogue::FINGERPRINT`]).
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

pub async fn init(s: &Settings, partitions: i32, grant: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(partitions >= 1, "--partitions must be at least 1, got {partitions}");
    // Two sessions: one builds an index while the other reads its progress.
    let pool = postgres::connect(&s.pg, 2, s.timeouts.call).await?;
    let ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    let client = kafka::connect(&s.kafka, s.timeouts.call).await?;
    let tables = tables(s, &pool, true).await?;
    // Every check that can fail comes before the first write.
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
        kafka::ensure_topic(&client, &t.topic, partitions, s.timeouts.call).await?;
        kafka::ensure_topic(&client, &kafka::dead_letter_topic(&t.topic), 1, s.timeouts.call).await?;
        ch.create_table(&t.schema).await?;
        let added = ch.sync_table(&t.schema).await?;
        keep_versions_ahead(&pool, &ch, &t.schema).await?;
        resend_for_added_columns(&pool, &t.schema, &added).await?;
        tracing::info!(
            "initialised: PostgreSQL {}, topic {:?} ({partitions} partitions), ClickHouse {}.{} (server {}.{})",
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
async fn keep_versions_ahead(pool: &PgPool, ch: &ClickHouse, schema: &TableSchema) -> anyhow::Result<()> {
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
async fn resend_for_added_columns(pool: &PgPool, schema: &TableSchema, added: &[String]) -> anyhow::Result<()> {
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

/// What producers of one table need from the real services: the topic, and
/// one PostgreSQL session per lane.
pub struct ProducerStores {
    pub table: Table,
    pub log: KafkaLog,
    pub sources: Vec<PgSource>,
    pool: PgPool,
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
        Ok(ProducerStores { table, log, sources, pool: pool.clone(), options, config })
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

    /// Notifications of changed rows for idle producers to wait on; none
    /// with `--once`, which never waits.
    pub async fn wakeups(&self, o: &RunOptions) -> anyhow::Result<Option<RowsCommitted>> {
        if o.once {
            Ok(None)
        } else {
            RowsCommitted::listen(&self.pool, postgres::channel(&self.table.schema)).await.map(Some)
        }
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

/// The one table of `s`, read, with its pool (for the tests' single-table helpers).
pub async fn single_table(s: &Settings) -> anyhow::Result<(PgPool, Table)> {
    let pool = postgres::connect(&s.pg, 4, s.timeouts.call).await?;
    let mut tables = tables(s, &pool, false).await?;
    anyhow::ensure!(tables.len() == 1, "this needs exactly one table, got {}", tables.len());
    Ok((pool, tables.remove(0)))
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
async fn open_consumer(
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

/// How long a step may go on after shutdown was asked.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Resolves [`STOP_GRACE`] after shutdown was asked. A step still running
/// then is abandoned: that is exactly what a crash does, which the pipeline
/// is built (and tested) to survive, so stopping never waits on a hung call.
async fn grace(mut shutdown: Shutdown) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
    tokio::time::sleep(STOP_GRACE).await;
}

/// Sleeps for `d` or until shutdown is asked, whichever comes first.
async fn pause(d: Duration, shutdown: &mut Shutdown) {
    if !*shutdown.borrow() {
        let _ = tokio::time::timeout(d, shutdown.changed()).await;
    }
}

/// Time and shutdown for the pipeline's loops ([`loops::Waits`]) in a real
/// process: tokio's timers, SIGINT/SIGTERM, and PostgreSQL's notifications.
struct RealWaits {
    poll: Duration,
    wake: Option<(watch::Receiver<u64>, Arc<IdleRegistry>)>,
    shutdown: Shutdown,
    origin: Instant,
}

impl RealWaits {
    fn new(poll: Duration, wake: Option<&RowsCommitted>, shutdown: Shutdown) -> Self {
        let wake = wake.map(|w| (w.count.clone(), w.registry.clone()));
        RealWaits { poll, wake, shutdown, origin: Instant::now() }
    }
}

impl loops::Waits for RealWaits {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn step<T>(&mut self, step: impl Future<Output = T>) -> Option<T> {
        // Notifications from here on wake the idle wait after this step,
        // even those that arrive while it runs.
        if let Some((w, _)) = self.wake.as_mut() {
            w.borrow_and_update();
        }
        tokio::select! {
            out = step => Some(out),
            () = grace(self.shutdown.clone()) => None,
        }
    }

    /// Registers idle and returns, for one more look; registered, waits
    /// until PostgreSQL notifies that rows changed, the poll interval passes
    /// (the fallback for lost notifications), or shutdown.
    async fn idle(&mut self) {
        let Some((wake, registry)) = self.wake.as_mut() else { return pause(self.poll, &mut self.shutdown).await };
        if !registry.waiting() {
            match registry.register().await {
                Ok(()) => return,
                Err(e) => tracing::debug!("{e:#}; waiting the poll interval instead"),
            }
        }
        let mut sleeping = self.shutdown.clone();
        tokio::select! {
            changed = wake.changed() => if changed.is_err() {
                pause(self.poll, &mut self.shutdown).await;
            },
            () = pause(self.poll, &mut sleeping) => {}
        }
    }

    async fn busy(&mut self) {
        if let Some((_, registry)) = self.wake.as_ref()
            && registry.waiting()
            && let Err(e) = registry.unregister().await
        {
            tracing::debug!("{e:#}");
        }
    }

    async fn pause(&mut self, d: Duration) {
        pause(d, &mut self.shutdown).await;
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// Runs every lane until done (with `once`) or shutdown; returns rows moved.
async fn produce_lanes<L: crate::stores::EventLog>(
    producers: &mut [Producer<PgSource, L>],
    what: &str,
    once: bool,
    (poll, coalesce): (Duration, Duration),
    wake: Option<&RowsCommitted>,
    shutdown: &Shutdown,
) -> anyhow::Result<usize> {
    let moved = futures::future::try_join_all(producers.iter_mut().map(|p| async {
        let mut waits = RealWaits::new(poll, wake, shutdown.clone());
        loops::produce(p, &NoFaults, format!("{what} producer"), once, coalesce, &mut waits).await
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
        let mut waits = RealWaits::new(o.poll, None, shutdown);
        return Ok((
            0,
            loops::consume(c, &NoFaults, format!("{what} consumer"), done.as_ref(), o.poll, &mut waits).await?,
        ));
    }
    let table_oid = table.oid;
    let mut stores = ProducerStores::connect(s, o, pool, table).await?;
    let Some(lease) = stores.lease(o, s.timeouts.call, shutdown.clone()).await? else { return Ok((0, 0)) };
    let wake = stores.wakeups(o).await?;
    let mut producers = stores.producers();
    let work = async {
        match consumer.as_mut() {
            None => produce_lanes(&mut producers, &what, o.once, (o.poll, o.coalesce), wake.as_ref(), &shutdown)
                .await
                .map(|n| (n, 0)),
            Some(c) if o.once => {
                // Either half failing for good ends both: the other is abandoned
                // where it stands, as a crash would leave it.
                let done: Cell<Option<bool>> = Cell::new(None);
                let produce = async {
                    let r = produce_lanes(&mut producers, &what, true, (o.poll, o.coalesce), None, &shutdown).await;
                    done.set(Some(r.is_ok()));
                    r
                };
                let mut waits = RealWaits::new(o.poll, None, shutdown.clone());
                let consume = loops::consume(c, &NoFaults, format!("{what} consumer"), Some(&done), o.poll, &mut waits);
                tokio::try_join!(produce, consume)
            }
            Some(c) => {
                let mut waits = RealWaits::new(o.poll, None, shutdown.clone());
                tokio::try_join!(
                    produce_lanes(&mut producers, &what, false, (o.poll, o.coalesce), wake.as_ref(), &shutdown),
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

/// Reconciles each table's PostgreSQL and ClickHouse sides range by range
/// ([`verify::verify`]); with `repair`, flags what is missing or different
/// unsent again and records the deletion of what ClickHouse holds and
/// PostgreSQL lacks. A progress bar shows on a terminal.
pub async fn verify(s: &Settings, repair: bool) -> anyhow::Result<Vec<Report>> {
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    let ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    verify_on(s, &pool, &ch, repair, None).await
}

/// [`verify()`] against the configured ClickHouse, then against each replica
/// in `CH_REPLICAS` alone (without repairing), each report naming its
/// replica. On a sharded cluster a replica is compared with the rows its
/// shard owns.
pub async fn verify_each_replica(s: &Settings, repair: bool) -> anyhow::Result<Vec<Report>> {
    anyhow::ensure!(
        !s.ch.replicas.is_empty(),
        "--each-replica needs the replicas' HTTP addresses in CH_REPLICAS (host:port,host:port)"
    );
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    let main = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    let mut reports = verify_on(s, &pool, &main, repair, None).await?;
    let sharded = main.cluster.as_ref().filter(|c| c.shards() > 1);
    for replica in &s.ch.replicas {
        let ch = ClickHouse::connect(&s.ch.at(replica)?, s.timeouts.call).await?;
        let (shard, label) = match sharded {
            None => (None, format!("replica {replica}")),
            Some(c) => {
                let index = c.shard_of(&ch.client, replica, s.timeouts.call).await?;
                (Some((index, c.shards())), format!("replica {replica} (shard {})", index + 1))
            }
        };
        for mut report in verify_on(s, &pool, &ch, false, shard).await.with_context(|| label.clone())? {
            report.table = format!("{} on {label}", report.table);
            reports.push(report);
        }
    }
    Ok(reports)
}

/// [`verify`] against the ClickHouse `ch`; with `shard` (index, shards),
/// against the rows that shard owns.
async fn verify_on(
    s: &Settings,
    pool: &PgPool,
    ch: &ClickHouse,
    repair: bool,
    shard: Option<(usize, usize)>,
) -> anyhow::Result<Vec<Report>> {
    let mut reports = Vec::new();
    for table in tables(s, pool, false).await? {
        ch.check_table(&table.schema).await?;
        if repair {
            // What repair flags goes again, and must outrank what is there.
            keep_versions_ahead(pool, ch, &table.schema).await?;
        }
        let disabled = postgres::disabled_triggers(pool, table.oid).await?;
        if !disabled.is_empty() {
            tracing::warn!("{}: {}", table.schema, postgres::disabled_warning(&disabled));
        }
        let mut pg = postgres::PgVerifySide::open(pool, table.schema.clone()).await?;
        if let Some((index, shards)) = shard {
            pg = pg.only_shard(index, shards);
        }
        let mut sink = ChVerifySide { ch: ch.clone(), schema: table.schema.clone() };
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("verify: {bar:30} {pos}/{len} key ranges, {elapsed} (eta {eta})")
                .expect("a fixed template"),
        );
        let plan = verify::Plan { repair, ..verify::Plan::default() };
        let started = Instant::now();
        let report = verify::verify(&table.schema, &mut pg, &mut sink, plan, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .await;
        bar.finish_and_clear();
        tracing::info!(
            "verify {}: took {:.1?} (peak RSS {} MB)",
            table.schema,
            started.elapsed(),
            peak_rss_mb().map_or("?".into(), |m| m.to_string())
        );
        reports.push(report?);
    }
    Ok(reports)
}

/// One partition in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    pub end_offset: i64,
    pub position: i64,
    pub lag: i64,
    /// How long the oldest record this group has not written yet has been
    /// in the topic (seconds, by the broker's record timestamp); 0 when
    /// there is none.
    pub lag_seconds: f64,
    /// The session holding the partition's lease (`pg2ch consumer host:pid`).
    pub holder: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub table: String,
    pub topic: String,
    pub group: String,
    /// Rows changed and not sent yet, and deletions not sent yet.
    pub unsent_rows: i64,
    /// How long the oldest of them has waited (seconds); `None` when none does.
    pub oldest_unsent_seconds: Option<f64>,
    /// Rows flagged `pg2ch_rejected` (never sent).
    pub rejected_rows: u64,
    pub partitions: Vec<PartitionStatus>,
    /// The sessions holding the table's producer lease.
    pub producers: Vec<String>,
    /// Records in `<topic>.dlq`.
    pub dead_letters: i64,
    pub clickhouse_rows_final: u64,
    pub clickhouse_rows_stored: u64,
    /// The initial load of the rows there were at `init`, if there was one.
    pub initial_load: Option<postgres::LoadProgress>,
    /// pg2ch's triggers that are disabled (changes made meanwhile are lost).
    pub disabled_triggers: Vec<String>,
}

pub async fn status(s: &Settings) -> anyhow::Result<Vec<Status>> {
    let pool = postgres::connect(&s.pg, 2, s.timeouts.call).await?;
    let mut out = Vec::new();
    for table in tables(s, &pool, false).await? {
        // Read-only: nothing is added to ClickHouse nor flagged here.
        let mut c = open_consumer(s, &RunOptions::default(), None, &table).await?;
        let positions = c.positions().await?.clone();
        let ends = c.high_watermarks().await?;
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let (mut holders, producers) = lease::holders(&pool, &s.kafka.group, &table.topic, table.oid).await?;
        let mut partitions = Vec::new();
        for (&p, position) in &positions {
            let end_offset = ends.get(&p).copied().unwrap_or(0);
            let position = position.next;
            let lag = (end_offset - position).max(0);
            let lag_seconds = match lag {
                0 => 0.0,
                _ => c.log.record_at(p, position).await?.map_or(0.0, |r| (now_ms - r.timestamp_ms).max(0) as f64 / 1e3),
            };
            let holder = holders.remove(&p);
            partitions.push(PartitionStatus { partition: p, end_offset, position, lag, lag_seconds, holder });
        }
        let unsent = postgres::unsent(&pool, &table.schema).await?;
        out.push(Status {
            table: table.schema.to_string(),
            topic: table.topic.clone(),
            group: s.kafka.group.clone(),
            unsent_rows: unsent.changes,
            oldest_unsent_seconds: unsent.oldest_seconds,
            rejected_rows: postgres::rejected_count(&pool, &table.schema).await?,
            partitions,
            producers,
            dead_letters: c.log.dead_letter_count().await?,
            clickhouse_rows_final: c.sink.ch.final_count(&table.schema).await?,
            clickhouse_rows_stored: c.sink.ch.stored_count(&table.schema).await?,
            initial_load: postgres::load_progress(&pool, table.oid).await?,
            disabled_triggers: postgres::disabled_triggers(&pool, table.oid).await?,
        });
    }
    Ok(out)
}

impl Status {
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "table {}: topic {:?}, consumer group {:?}", self.table, self.topic, self.group)?;
        let waiting = self.oldest_unsent_seconds.map_or(String::new(), |s| format!(", the oldest waiting {s:.3} s"));
        writeln!(
            out,
            "unsent changes in PostgreSQL: {}{waiting} (plus {} rows rejected as not representable)",
            self.unsent_rows, self.rejected_rows
        )?;
        if !self.disabled_triggers.is_empty() {
            writeln!(out, "WARNING: {}", postgres::disabled_warning(&self.disabled_triggers))?;
        }
        if let Some(load) = &self.initial_load {
            writeln!(out, "initial load of the rows there were at init: {}", load.describe())?;
        }
        let producers = if self.producers.is_empty() { "none".to_owned() } else { self.producers.join(", ") };
        writeln!(out, "producers at work: {producers}")?;
        writeln!(
            out,
            "{:>9} {:>12} {:>12} {:>10} {:>10}  held by",
            "partition", "end offset", "position", "lag", "lag (s)"
        )?;
        for p in &self.partitions {
            writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>10} {:>10.3}  {}",
                p.partition,
                p.end_offset,
                p.position,
                p.lag,
                p.lag_seconds,
                p.holder.as_deref().unwrap_or("nobody")
            )?;
        }
        writeln!(out, "dead letters in {:?}: {}", kafka::dead_letter_topic(&self.topic), self.dead_letters)?;
        writeln!(
            out,
            "ClickHouse rows: {} (FINAL, deleted keys left out), {} stored before merging",
            self.clickhouse_rows_final, self.clickhouse_rows_stored
        )
    }
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
