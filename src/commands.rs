//! What each `pg2ch` subcommand does: connect the adapters, hand them to the
//! pipeline, report. The decisions themselves are in [`crate::pipeline`].

use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::watch;

use crate::clickhouse::{ChSink, ClickHouse};
use crate::config::{ChConfig, KafkaConfig, PgConfig, Timeouts};
use crate::kafka::{self, KafkaLog};
use crate::pipeline::{Consumer, ConsumerConfig, NoFaults, ProduceStep, Producer, ProducerConfig};
use crate::postgres::{self, PgSource, ProducerLease, RowsCommitted};
use crate::stores::{ClaimMode, ErrorKind, kind};
use crate::verify::{self, Report};

/// Everything needed to reach the three systems.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pg: PgConfig,
    pub ch: ChConfig,
    pub kafka: KafkaConfig,
    pub timeouts: Timeouts,
}

/// Tunables of `produce`, `consume` and `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Move what is there, then exit.
    pub once: bool,
    pub batch_rows: usize,
    /// Producer lanes in this process: one claims and publishes while another
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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            once: false,
            batch_rows: 10_000,
            producers: 2,
            claim_mode: ClaimMode::Shared,
            insert_rows: 100_000,
            fetch_max_bytes: 4 * 1024 * 1024,
            compression: kafka::Compression::NoCompression,
            partitions: None,
            poll: Duration::from_millis(200),
        }
    }
}

/// Set to true to ask a running command to stop at its next safe point.
pub type Shutdown = watch::Receiver<bool>;

pub async fn init(s: &Settings, partitions: i32) -> anyhow::Result<()> {
    anyhow::ensure!(partitions >= 1, "--partitions must be at least 1, got {partitions}");
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    let ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    let kafka = kafka::connect(&s.kafka, s.timeouts.call).await?;
    // Every check that can fail comes before the first write.
    kafka::topic_matches(&kafka, &s.kafka.topic, partitions, s.timeouts.call).await?;
    postgres::init(&pool).await?;
    kafka::ensure_topic(&kafka, &s.kafka.topic, partitions, s.timeouts.call).await?;
    kafka::ensure_topic(&kafka, &kafka::dead_letter_topic(&s.kafka.topic), 1, s.timeouts.call).await?;
    ch.init().await?;
    tracing::info!(
        "initialised: PostgreSQL user_logins, topic {:?} ({partitions} partitions), ClickHouse {}.user_logins (server {}.{})",
        s.kafka.topic,
        s.ch.database,
        ch.caps.version.0,
        ch.caps.version.1
    );
    Ok(())
}

pub async fn seed(s: &Settings, rows: u64) -> anyhow::Result<()> {
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    postgres::check_columns(&pool).await?;
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

/// What producers need from the real services: the topic, and one
/// PostgreSQL session per lane.
pub struct ProducerStores {
    pub log: KafkaLog,
    pub sources: Vec<PgSource>,
    pool: sqlx::PgPool,
    config: ProducerConfig,
}

impl ProducerStores {
    pub async fn connect(s: &Settings, o: &RunOptions) -> anyhow::Result<Self> {
        let lanes = o.producers.max(1);
        let pool = postgres::connect_producer(&s.pg, lanes as u32 + 1, s.timeouts.call).await?;
        postgres::check_columns(&pool).await?;
        let client = kafka::connect(&s.kafka, s.timeouts.call).await?;
        let log = KafkaLog::open(&client, &s.kafka.topic, s.timeouts.call).await?.with_compression(o.compression);
        let sources = (0..lanes).map(|_| PgSource::new(pool.clone(), s.timeouts.call, o.claim_mode)).collect();
        // Test builds have more fields (the deliberately broken orderings).
        #[allow(clippy::needless_update)]
        let config = ProducerConfig { batch_rows: o.batch_rows, ..ProducerConfig::default() };
        Ok(ProducerStores { log, sources, pool, config })
    }

    /// Waits until producers of the other claim mode are gone, then holds
    /// the lease for as long as the value lives. `None` if shutdown came first.
    pub async fn lease(
        &self,
        o: &RunOptions,
        timeout: Duration,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<Option<ProducerLease>> {
        let mut lease = ProducerLease::open(&self.pool, o.claim_mode, timeout).await?;
        let mut waiting = false;
        while !lease.try_take().await? {
            if !waiting {
                waiting = true;
                tracing::info!(
                    "waiting: {} producer is at work; this one starts when it stops",
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
            tracing::info!("the other producer stopped; starting");
        }
        Ok(Some(lease))
    }

    /// Notifications of inserted rows for idle producers to wait on; none
    /// with `--once`, which never waits.
    pub async fn wakeups(&self, o: &RunOptions) -> anyhow::Result<Option<RowsCommitted>> {
        if o.once { Ok(None) } else { RowsCommitted::listen(&self.pool).await.map(Some) }
    }

    /// One producer per lane, sharing the log and the keyset cursor.
    pub fn producers(&mut self) -> Vec<Producer<PgSource, &KafkaLog>> {
        let cursor = crate::pipeline::Cursor::default();
        std::mem::take(&mut self.sources)
            .into_iter()
            .map(|source| Producer::new(source, &self.log, self.config.clone()).with_cursor(cursor.clone()))
            .collect()
    }
}

/// A single producer on the real stores (the crash-replay tests use this).
pub async fn producer(s: &Settings, o: &RunOptions) -> anyhow::Result<Producer<PgSource, KafkaLog>> {
    let mut stores = ProducerStores::connect(s, &RunOptions { producers: 1, ..o.clone() }).await?;
    let source = stores.sources.pop().expect("one lane");
    Ok(Producer::new(source, stores.log, stores.config))
}

/// A consumer on the real stores, as `pg2ch consume` builds it.
pub async fn consumer(s: &Settings, o: &RunOptions) -> anyhow::Result<Consumer<KafkaLog, ChSink>> {
    let client = kafka::connect(&s.kafka, s.timeouts.call).await?;
    let log = KafkaLog::open(&client, &s.kafka.topic, s.timeouts.call).await?.with_fetch_max_bytes(o.fetch_max_bytes);
    let ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    ch.check_tables().await?;
    let count = crate::stores::EventLog::partitions(&log);
    let mut config = ConsumerConfig::all_partitions(count);
    if let Some(assigned) = &o.partitions {
        if let Some(bad) = assigned.iter().find(|p| !(0..count).contains(*p)) {
            anyhow::bail!(
                "--partitions names partition {bad}, but topic {:?} has partitions 0..{count}",
                s.kafka.topic
            );
        }
        config.partitions = assigned.clone();
    }
    config.insert_rows = o.insert_rows;
    let sink = ChSink { ch, group: s.kafka.group.clone(), topic: s.kafka.topic.clone() };
    Ok(Consumer::new(log, sink, config))
}

/// Capped exponential backoff that logs once when trouble starts and once
/// when it ends, not on every retry.
struct Backoff {
    what: &'static str,
    delay: Duration,
    failing: bool,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);

    fn new(what: &'static str) -> Self {
        Backoff { what, delay: Self::FIRST, failing: false }
    }
    fn ok(&mut self) {
        if self.failing {
            tracing::info!("{}: recovered", self.what);
        }
        self.failing = false;
        self.delay = Self::FIRST;
    }
    fn failed(&mut self, e: &anyhow::Error) -> Duration {
        metrics::counter!("pg2ch_retries_total", "component" => self.what).increment(1);
        if !self.failing {
            let kind = match kind(e) {
                ErrorKind::Unknown => " (it may have taken effect; the repeat is collapsed downstream)",
                _ => "",
            };
            tracing::warn!("{}: {e:#}{kind}; retrying with backoff", self.what);
        }
        self.failing = true;
        let now = self.delay;
        self.delay = (self.delay * 2).min(Self::CAP);
        now
    }
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

async fn produce_loop<L: crate::stores::EventLog>(
    p: &mut Producer<PgSource, L>,
    once: bool,
    poll: Duration,
    mut wake: Option<watch::Receiver<u64>>,
    mut shutdown: Shutdown,
) -> anyhow::Result<usize> {
    let mut moved = 0;
    let mut backoff = Backoff::new("producer");
    while !*shutdown.borrow() {
        // Notifications from here on wake the wait below, even those that
        // arrive while this step runs.
        if let Some(w) = wake.as_mut() {
            w.borrow_and_update();
        }
        let step = tokio::select! {
            step = p.step(&NoFaults) => step,
            () = grace(shutdown.clone()) => break,
        };
        match step {
            Ok(ProduceStep::Moved(n)) => {
                backoff.ok();
                moved += n;
                tracing::debug!("published and flagged {n} rows");
                // One pass finds every row committed before it began; a
                // second would only rescan what the first left behind.
                if once && p.passes() > 0 {
                    break;
                }
            }
            Ok(ProduceStep::Idle) => {
                backoff.ok();
                if once {
                    break;
                }
                wait_for_rows(poll, wake.as_mut(), &mut shutdown).await;
            }
            Err(e) if once || kind(&e) == ErrorKind::Permanent => return Err(e),
            Err(e) => {
                let d = backoff.failed(&e);
                pause(d, &mut shutdown).await;
            }
        }
    }
    Ok(moved)
}

/// An idle producer's wait: until PostgreSQL notifies that rows were
/// inserted, the poll interval passes (the fallback for lost
/// notifications), or shutdown.
async fn wait_for_rows(poll: Duration, wake: Option<&mut watch::Receiver<u64>>, shutdown: &mut Shutdown) {
    let Some(wake) = wake else { return pause(poll, shutdown).await };
    let mut sleeping = shutdown.clone();
    tokio::select! {
        changed = wake.changed() => if changed.is_err() {
            pause(poll, shutdown).await;
        },
        () = pause(poll, &mut sleeping) => {}
    }
}

/// How long a fetch may wait for records while they keep coming, and for how
/// long after the last ones. A Kafka broker answers a waiting fetch as soon
/// as records arrive, but nisshi (the local broker) answers after half the
/// wait whatever arrives, and serves one connection's requests in turn
/// (measured: a 200 ms wait returns after 100 ms with a record produced at
/// 20 ms), so a long wait would hold every row that long. Idle, the fetch
/// waits the poll interval up to [`COLD_WAIT`], so an idle consumer costs a
/// few requests a second and the first row after a pause waits at most that.
const HOT_WAIT: Duration = Duration::from_millis(4);
const HOT_FOR: Duration = Duration::from_secs(2);
const COLD_WAIT: Duration = Duration::from_millis(200);

fn fetch_wait(poll: Duration, last_records: Option<Instant>) -> Duration {
    match last_records {
        Some(at) if at.elapsed() < HOT_FOR => HOT_WAIT.min(poll),
        _ => poll.min(COLD_WAIT),
    }
}

/// Consumes until shutdown; when `done` says the producer finished, drains to
/// the partitions' ends as they are then, and returns.
async fn consume_loop(
    c: &mut Consumer<KafkaLog, ChSink>,
    done: Option<&Cell<Option<bool>>>,
    poll: Duration,
    mut shutdown: Shutdown,
) -> anyhow::Result<usize> {
    let mut records = 0;
    let mut targets = None;
    let mut backoff = Backoff::new("consumer");
    let mut last_records: Option<Instant> = None;
    while !*shutdown.borrow() {
        if let Some(done) = done {
            match done.get() {
                Some(false) => break, // the producer failed; it reports why
                Some(true) if targets.is_none() => targets = Some(c.high_watermarks().await?),
                _ => {}
            }
        }
        if let Some(t) = &targets
            && c.reached(t)
        {
            break;
        }
        let wait = fetch_wait(poll, last_records);
        let step = tokio::select! {
            step = c.step(&NoFaults, wait) => step,
            () = grace(shutdown.clone()) => break,
        };
        match step {
            Ok(step) => {
                backoff.ok();
                records += step.records;
                if step.records > 0 {
                    last_records = Some(Instant::now());
                }
            }
            Err(e) if done.is_some() || kind(&e) == ErrorKind::Permanent => return Err(e),
            Err(e) => {
                let d = backoff.failed(&e);
                pause(d, &mut shutdown).await;
            }
        }
    }
    Ok(records)
}

/// Runs every lane until done (with `once`) or shutdown; returns rows moved.
async fn produce_lanes<L: crate::stores::EventLog>(
    producers: &mut [Producer<PgSource, L>],
    once: bool,
    poll: Duration,
    wake: Option<&RowsCommitted>,
    shutdown: &Shutdown,
) -> anyhow::Result<usize> {
    let moved = futures::future::try_join_all(
        producers.iter_mut().map(|p| produce_loop(p, once, poll, wake.map(|w| w.count.clone()), shutdown.clone())),
    )
    .await?;
    Ok(moved.into_iter().sum())
}

pub async fn produce(s: &Settings, o: &RunOptions, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut stores = ProducerStores::connect(s, o).await?;
    let Some(_lease) = stores.lease(o, s.timeouts.call, shutdown.clone()).await? else { return Ok(()) };
    let wake = stores.wakeups(o).await?;
    let mut producers = stores.producers();
    let started = Instant::now();
    let moved = produce_lanes(&mut producers, o.once, o.poll, wake.as_ref(), &shutdown).await?;
    tracing::info!("producer: {moved} rows published and flagged in {:.1?}", started.elapsed());
    Ok(())
}

pub async fn consume(s: &Settings, o: &RunOptions, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut c = consumer(s, o).await?;
    let started = Instant::now();
    // With --once the producer is someone else, done before we start: drain
    // to the ends as they are now, still stopping on SIGINT/SIGTERM.
    let done = o.once.then(|| Cell::new(Some(true)));
    let records = consume_loop(&mut c, done.as_ref(), o.poll, shutdown).await?;
    tracing::info!("consumer: {records} records written in {:.1?}", started.elapsed());
    Ok(())
}

/// Producer and consumer in one process. With `once`, returns when every row
/// that was unsent at the start is in ClickHouse and its position stored.
pub async fn run(s: &Settings, o: &RunOptions, shutdown: Shutdown) -> anyhow::Result<usize> {
    let mut stores = ProducerStores::connect(s, o).await?;
    let Some(_lease) = stores.lease(o, s.timeouts.call, shutdown.clone()).await? else { return Ok(0) };
    let wake = stores.wakeups(o).await?;
    let mut producers = stores.producers();
    let mut c = consumer(s, o).await?;
    let started = Instant::now();
    let done: Cell<Option<bool>> = Cell::new(None);
    // Either half failing for good ends both: the other is abandoned where
    // it stands, as a crash would leave it, which the pipeline is built for.
    let (moved, written) = if o.once {
        let produce = async {
            let r = produce_lanes(&mut producers, true, o.poll, None, &shutdown).await;
            done.set(Some(r.is_ok()));
            r
        };
        tokio::try_join!(produce, consume_loop(&mut c, Some(&done), o.poll, shutdown.clone()))?
    } else {
        tokio::try_join!(
            produce_lanes(&mut producers, false, o.poll, wake.as_ref(), &shutdown),
            consume_loop(&mut c, None, o.poll, shutdown.clone())
        )?
    };
    tracing::info!(
        "run: {moved} rows published, {written} records written in {:.1?} (peak RSS {} MB)",
        started.elapsed(),
        peak_rss_mb().map_or("?".into(), |m| m.to_string())
    );
    Ok(moved)
}

/// Reconciles PostgreSQL and ClickHouse range by range ([`verify::verify`]);
/// with `repair`, flags what is missing or different unsent again. A
/// progress bar shows on a terminal.
pub async fn verify(s: &Settings, repair: bool) -> anyhow::Result<Report> {
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    let mut ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    let mut pg = postgres::PgVerifySide::open(&pool).await?;
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("verify: {bar:30} {pos}/{len} id ranges, {elapsed} (eta {eta})")
            .expect("a fixed template"),
    );
    let plan = verify::Plan { repair, ..verify::Plan::default() };
    let started = std::time::Instant::now();
    let report = verify::verify(&mut pg, &mut ch, plan, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await;
    bar.finish_and_clear();
    tracing::info!(
        "verify: took {:.1?} (peak RSS {} MB)",
        started.elapsed(),
        peak_rss_mb().map_or("?".into(), |m| m.to_string())
    );
    report
}

/// One partition in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    pub end_offset: i64,
    pub position: i64,
    pub lag: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub topic: String,
    pub group: String,
    pub unsent_rows: i64,
    /// Rows flagged `pg2ch_rejected` (never sent).
    pub rejected_rows: u64,
    pub partitions: Vec<PartitionStatus>,
    /// Records in `<topic>.dlq`.
    pub dead_letters: i64,
    pub clickhouse_rows_final: u64,
    pub clickhouse_rows_stored: u64,
}

pub async fn status(s: &Settings) -> anyhow::Result<Status> {
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    let mut c = consumer(s, &RunOptions::default()).await?;
    let positions = c.positions().await?.clone();
    let ends = c.high_watermarks().await?;
    let rejected_rows = postgres::rejected_count(&pool).await?;
    let partitions = positions
        .iter()
        .map(|(&p, position)| {
            let end_offset = ends.get(&p).copied().unwrap_or(0);
            let position = position.next;
            PartitionStatus { partition: p, end_offset, position, lag: (end_offset - position).max(0) }
        })
        .collect();
    Ok(Status {
        topic: s.kafka.topic.clone(),
        group: s.kafka.group.clone(),
        unsent_rows: postgres::unsent_count(&pool).await?,
        rejected_rows,
        partitions,
        dead_letters: c.log.dead_letter_count().await?,
        clickhouse_rows_final: c.sink.ch.final_count().await?,
        clickhouse_rows_stored: c.sink.ch.stored_count().await?,
    })
}

impl Status {
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "topic {:?}, consumer group {:?}", self.topic, self.group)?;
        writeln!(
            out,
            "unsent rows in PostgreSQL: {} (plus {} rejected as not representable)",
            self.unsent_rows, self.rejected_rows
        )?;
        writeln!(out, "{:>9} {:>12} {:>12} {:>10}", "partition", "end offset", "position", "lag")?;
        for p in &self.partitions {
            writeln!(out, "{:>9} {:>12} {:>12} {:>10}", p.partition, p.end_offset, p.position, p.lag)?;
        }
        writeln!(out, "dead letters in {:?}: {}", kafka::dead_letter_topic(&self.topic), self.dead_letters)?;
        writeln!(
            out,
            "ClickHouse rows: {} (FINAL), {} stored before merging",
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

/// Checks the ClickHouse settings before anything connects.
pub fn check_names(ch: &ChConfig, kafka: &KafkaConfig) -> anyhow::Result<()> {
    crate::config::identifier("ClickHouse database (CH_DB)", &ch.database)?;
    crate::config::topic_name(&kafka.topic).context("KAFKA_TOPIC")?;
    anyhow::ensure!(!kafka.group.is_empty(), "KAFKA_GROUP must not be empty");
    Ok(())
}
