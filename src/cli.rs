//! Argument parsing for the `pg2ch` binary, and mapping outcomes to exit codes.
//!
//! Precedence: command-line flags, then environment variables, then a `.env`
//! file in the working directory. Exit codes: 0 success, 1 `verify` found a
//! mismatch, 2 any error (bad flag, unreachable service, wrong password, ...),
//! reported as one line on stderr.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::{self, RunOptions, Settings};
use crate::config::{ChConfig, KafkaConfig, PgConfig, Secret, Timeouts};

use crate::kafka::Compression;
use crate::stores::ClaimMode;

#[derive(Parser, Debug)]
#[command(name = "pg2ch", version, about = "Move rows from PostgreSQL to ClickHouse through Kafka, exactly once")]
pub struct Cli {
    #[command(flatten, next_help_heading = "Connection (flags override environment, which overrides .env)")]
    conn: Connection,
    #[command(flatten, next_help_heading = "Tables")]
    tables: Tables,
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct Connection {
    #[arg(long, global = true, env = "PG_HOST", default_value = "localhost")]
    pg_host: String,
    #[arg(long, global = true, env = "PG_PORT", default_value_t = 5432)]
    pg_port: u16,
    #[arg(long, global = true, env = "PG_USER", default_value = "pg2ch")]
    pg_user: String,
    /// File holding the PostgreSQL password (else env PG_PASS; passwords are never taken from flags).
    #[arg(long, global = true, env = "PG_PASS_FILE")]
    pg_pass_file: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "PG_DB", default_value = "pg2ch")]
    pg_db: String,
    #[arg(long, global = true, env = "CH_HOST", default_value = "localhost")]
    ch_host: String,
    /// ClickHouse HTTP port.
    #[arg(long, global = true, env = "CH_PORT", default_value_t = 8123)]
    ch_port: u16,
    #[arg(long, global = true, env = "CH_USER", default_value = "default")]
    ch_user: String,
    /// File holding the ClickHouse password (else env CH_PASS).
    #[arg(long, global = true, env = "CH_PASS_FILE")]
    ch_pass_file: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "CH_DB", default_value = "default")]
    ch_db: String,
    /// The ClickHouse cluster holding pg2ch's tables: created ON CLUSTER as
    /// replicated tables; inserts wait for every replica (insert_quorum);
    /// with several shards, each row goes to the shard owning its key.
    #[arg(long, global = true, env = "CH_CLUSTER")]
    ch_cluster: Option<String>,
    /// Each ClickHouse replica's HTTP address, comma-separated host:port
    /// (for `verify --each-replica`; on a sharded cluster, where each
    /// shard's rows are written: at least one per shard).
    #[arg(long = "ch-replica-addrs", global = true, env = "CH_REPLICAS", value_delimiter = ',')]
    ch_replica_addrs: Vec<String>,
    /// Comma-separated host:port list.
    #[arg(long, global = true, env = "KAFKA_BOOTSTRAP", default_value = "localhost:9092")]
    kafka_bootstrap: String,
    #[arg(long, global = true, env = "KAFKA_TOPIC", default_value = "user_events")]
    kafka_topic: String,
    /// Consumer group: names the positions stored in ClickHouse.
    #[arg(long, global = true, env = "KAFKA_GROUP", default_value = "pg2ch")]
    kafka_group: String,
    /// SASL mechanism for the brokers: PLAIN, SCRAM-SHA-256 or
    /// SCRAM-SHA-512 (unset: no authentication).
    #[arg(long, global = true, env = "KAFKA_SASL_MECHANISM")]
    kafka_sasl_mechanism: Option<crate::config::SaslMechanism>,
    /// SASL user name for the brokers.
    #[arg(long, global = true, env = "KAFKA_SASL_USER")]
    kafka_sasl_user: Option<String>,
    /// File holding the SASL password (else env KAFKA_SASL_PASS).
    #[arg(long, global = true, env = "KAFKA_SASL_PASS_FILE")]
    kafka_sasl_pass_file: Option<std::path::PathBuf>,
    /// Longest any single call to a service may take, in seconds.
    #[arg(long, global = true, env = "PG2CH_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=limits::TIMEOUT_SECS))]
    timeout_secs: u64,
}

#[derive(Args, Debug)]
struct Tables {
    /// A table to carry (`orders`, `public.orders`); repeat for several (each
    /// then on topic <KAFKA_TOPIC>.<table>).
    #[arg(long = "table", global = true, env = "PG2CH_TABLES", value_delimiter = ',', default_value = "user_logins")]
    tables: Vec<String>,
    /// What to do with a column of a type pg2ch does not know: refuse the
    /// table (naming the column), or carry the column's text form.
    #[arg(long, global = true, env = "PG2CH_OTHER_TYPES", value_enum, default_value_t = OtherTypes::Refuse)]
    other_types: OtherTypes,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OtherTypes {
    Refuse,
    Text,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Move everything there at start, then exit 0.
    #[arg(long)]
    once: bool,
    /// Most rows claimed, published and flagged per producer batch.
    #[arg(long, default_value_t = RunOptions::default().batch_rows, value_parser = within(1, limits::BATCH_ROWS))]
    batch_rows: usize,
    /// About how many bytes of messages one producer batch makes: batches
    /// of wide rows hold fewer rows, which bounds memory whatever the width.
    #[arg(long, default_value_t = RunOptions::default().batch_bytes, value_parser = within(1, limits::BYTES))]
    batch_bytes: usize,
    /// Producer lanes (PostgreSQL sessions) in this process.
    #[arg(long, default_value_t = RunOptions::default().producers, value_parser = within(1, limits::LANES))]
    producers: usize,
    /// Be the only producer at work and claim rows without locking them,
    /// which spares PostgreSQL the row locks. Other producers wait while
    /// this one runs, and it waits for those already running.
    #[arg(long)]
    exclusive: bool,
    /// Most rows per ClickHouse insert.
    #[arg(long, default_value_t = RunOptions::default().insert_rows, value_parser = within(1, limits::INSERT_ROWS))]
    insert_rows: usize,
    /// Most bytes fetched per partition per consumer step (bounds memory).
    #[arg(long, default_value_t = RunOptions::default().fetch_max_bytes,
          value_parser = clap::value_parser!(i32).range(1..=limits::BYTES as i64))]
    fetch_max_bytes: i32,
    /// Compression of produce requests. It saves network and broker disk at
    /// the cost of CPU here; with every service on one machine, none is
    /// fastest (see docs/performance.md). The consumer reads every codec.
    #[arg(long, value_enum, default_value_t = Codec::None)]
    compression: Codec,
    /// Partitions this consumer reads (comma-separated; default all). There is
    /// no consumer-group protocol: split partitions between consumers here.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(i32).range(0..limits::PARTITIONS))]
    partitions: Option<Vec<i32>>,
    /// Milliseconds to wait for new rows or records when idle.
    #[arg(long, default_value_t = RunOptions::default().poll.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..=limits::WAIT_MS))]
    poll_ms: u64,
    /// Milliseconds a busy producer gathers changes between passes: a row
    /// changed many times a second is published at most once per window,
    /// at the cost of up to this much more time to ClickHouse under load.
    #[arg(long, default_value_t = RunOptions::default().coalesce.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=limits::WAIT_MS))]
    coalesce_ms: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187), at /metrics.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// Starts the metrics endpoint if one was asked for.
    fn serve_metrics(&self) -> anyhow::Result<()> {
        if let Some(addr) = self.metrics_addr {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
            tracing::info!("metrics on http://{addr}/metrics");
        }
        Ok(())
    }
}

/// The bounds of every numeric setting: a value outside is refused with
/// one line naming the setting, before anything runs (and before any
/// arithmetic on it could overflow).
mod limits {
    /// A day: longer than any call should take.
    pub const TIMEOUT_SECS: u64 = 86_400;
    pub const BATCH_ROWS: u64 = 1_000_000;
    /// 1 GiB, for byte budgets.
    pub const BYTES: u64 = 1 << 30;
    pub const LANES: u64 = 256;
    pub const INSERT_ROWS: u64 = 10_000_000;
    /// Partitions of a topic, and partition numbers below it.
    pub const PARTITIONS: i64 = 100_000;
    /// An hour, for waits in milliseconds.
    pub const WAIT_MS: u64 = 3_600_000;
    pub const SEED_ROWS: u64 = 1_000_000_000;
    pub const STACK_SERVERS: u64 = 16;
    pub const REPLICATION: i64 = 1_000;
}

/// A parser of a `usize` setting between `low` and `high`.
fn within(low: u64, high: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(low..=high)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install pg2ch on the tables (flag columns, index, triggers), create their topics and ClickHouse tables (idempotent).
    Init {
        /// Partitions of the topic, when it is created.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=limits::PARTITIONS))]
        partitions: i32,
        /// Copies of each record, when a topic is created (default: 3, or
        /// every broker of a smaller cluster). With two or more, topics get
        /// `min.insync.replicas=2`.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i16).range(1..=limits::REPLICATION))]
        replication_factor: Option<i16>,
        /// Grant this role what `run`, `produce`, `consume`, `status` and
        /// `verify` need on the tables, and nothing more (repeatable).
        #[arg(long, value_name = "ROLE")]
        grant: Vec<String>,
    },
    /// Insert N synthetic login events into user_logins.
    Seed {
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=limits::SEED_ROWS))]
        rows: u64,
    },
    /// Publish unsent rows to Kafka and flag them sent.
    Produce(RunArgs),
    /// Write records from Kafka to ClickHouse.
    Consume(RunArgs),
    /// Produce and consume in one process.
    Run(RunArgs),
    /// Reconcile PostgreSQL and ClickHouse by key, every column; exit 1 on any mismatch.
    Verify {
        #[arg(long)]
        json: bool,
        /// Flag rows that are missing, different or deleted in ClickHouse
        /// unsent again, and record the deletion of keys ClickHouse holds and
        /// PostgreSQL lacks, so that the next `run` sends them (exit 1 still
        /// tells that something was found).
        #[arg(long)]
        repair: bool,
        /// Also compare each replica alone (CH_REPLICAS), naming any that lags or differs.
        #[arg(long)]
        each_replica: bool,
    },
    /// Unsent rows, per-partition end offset, position and lag, rows in ClickHouse.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Start, stop or describe the local service stack (no Docker needed).
    Stack {
        #[command(subcommand)]
        action: StackAction,
    },
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum StackAction {
    /// Start PostgreSQL, ClickHouse and a Kafka-API broker on loopback (idempotent) and print the environment.
    Up {
        #[command(flatten)]
        shape: ClusterShape,
    },
    /// Stop what `up` started.
    Down {
        /// Also delete the broker's stored topics and records (its SQLite file), which `down` keeps otherwise.
        #[arg(long)]
        forget_topics: bool,
    },
    /// Stop one service (postgres, clickhouse, broker, zookeeper, replica-N) to see how pg2ch meets an
    /// outage; `up` starts it again.
    Stop { service: crate::stack::Service },
    /// Print the environment for the stack.
    Env {
        #[command(flatten)]
        shape: ClusterShape,
    },
}

/// The local stack's ClickHouse: one server, or a cluster (with ZooKeeper).
#[derive(clap::Args, Debug, Clone, Copy)]
struct ClusterShape {
    /// Replicas of each shard.
    #[arg(long, default_value_t = 1, value_parser = within(1, limits::STACK_SERVERS))]
    ch_replicas: usize,
    /// Shards, each of `--ch-replicas` servers.
    #[arg(long, default_value_t = 1, value_parser = within(1, limits::STACK_SERVERS))]
    ch_shards: usize,
}

/// Kafka's record batch codecs, as `--compression` spells them.
#[derive(ValueEnum, Debug, Clone, Copy)]
enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl From<Codec> for Compression {
    fn from(codec: Codec) -> Self {
        match codec {
            Codec::None => Compression::NoCompression,
            Codec::Gzip => Compression::Gzip,
            Codec::Snappy => Compression::Snappy,
            Codec::Lz4 => Compression::Lz4,
            Codec::Zstd => Compression::Zstd,
        }
    }
}

impl RunArgs {
    fn options(&self) -> RunOptions {
        RunOptions {
            once: self.once,
            batch_rows: self.batch_rows.max(1),
            batch_bytes: self.batch_bytes.max(1),
            producers: self.producers.max(1),
            claim_mode: if self.exclusive { ClaimMode::Exclusive } else { ClaimMode::Shared },
            insert_rows: self.insert_rows.max(1),
            fetch_max_bytes: self.fetch_max_bytes.max(1),
            compression: self.compression.into(),
            partitions: self.partitions.clone(),
            poll: Duration::from_millis(self.poll_ms),
            coalesce: Duration::from_millis(self.coalesce_ms),
        }
    }
}

/// A password from its file (`*_PASS_FILE`, a trailing newline dropped) or
/// from the environment (`*_PASS`); never from a flag, so it is never in argv.
fn password(file: Option<&std::path::Path>, var: &str) -> anyhow::Result<Secret> {
    match file {
        Some(path) => {
            if let Some(warning) = std::fs::metadata(path).ok().and_then(|m| open_to_others(path, &m)) {
                tracing::warn!("{warning}");
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read the password file {}: {e}", path.display()))?;
            Ok(Secret::new(text.strip_suffix('\n').unwrap_or(&text).trim_end_matches('\r')))
        }
        None => Ok(Secret::new(std::env::var(var).unwrap_or_default())),
    }
}

impl Connection {
    /// The broker credentials: a mechanism and a user, or neither.
    fn kafka_sasl(&self) -> anyhow::Result<Option<crate::config::KafkaSasl>> {
        let user = self.kafka_sasl_user.clone().filter(|u| !u.is_empty());
        match (self.kafka_sasl_mechanism, user) {
            (None, None) => Ok(None),
            (Some(mechanism), Some(username)) => Ok(Some(crate::config::KafkaSasl {
                mechanism,
                username,
                password: password(self.kafka_sasl_pass_file.as_deref(), "KAFKA_SASL_PASS")?,
            })),
            (Some(_), None) => anyhow::bail!("KAFKA_SASL_MECHANISM is set but KAFKA_SASL_USER is not"),
            (None, Some(_)) => anyhow::bail!("KAFKA_SASL_USER is set but KAFKA_SASL_MECHANISM is not"),
        }
    }

    fn settings(&self, tables: &Tables) -> anyhow::Result<Settings> {
        Ok(Settings {
            tables: tables.tables.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect(),
            other_types_as_text: tables.other_types == OtherTypes::Text,
            pg: PgConfig {
                host: self.pg_host.clone(),
                port: self.pg_port,
                user: self.pg_user.clone(),
                password: password(self.pg_pass_file.as_deref(), "PG_PASS")?,
                database: self.pg_db.clone(),
            },
            ch: ChConfig {
                host: self.ch_host.clone(),
                port: self.ch_port,
                user: self.ch_user.clone(),
                password: password(self.ch_pass_file.as_deref(), "CH_PASS")?,
                database: self.ch_db.clone(),
                cluster: self.ch_cluster.clone().filter(|c| !c.is_empty()),
                replicas: self.ch_replica_addrs.iter().map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()).collect(),
            },
            kafka: KafkaConfig {
                bootstrap: self.kafka_bootstrap.split(',').map(|s| s.trim().to_owned()).collect(),
                topic: self.kafka_topic.clone(),
                group: self.kafka_group.clone(),
                sasl: self.kafka_sasl()?,
            },
            timeouts: Timeouts { call: Duration::from_secs(self.timeout_secs.max(1)) },
        })
    }
}

/// A warning when a password file can be read by its group or others.
fn open_to_others(path: &std::path::Path, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "the password file {} can be read by others (mode {mode:03o}); make it private: chmod 600 {}",
            path.display(),
            path.display()
        )
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // Drivers log every retry; their errors reach us as values anyway.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rskafka=off,sqlx=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A watch that turns true on SIGINT or SIGTERM.
fn shutdown_signal() -> commands::Shutdown {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping at the next safe point");
        let _ = tx.send(true);
    });
    rx
}

/// JSON of one item as an object, of several as an array.
fn one_or_all<T: serde::Serialize>(items: &[T]) -> serde_json::Result<String> {
    match items {
        [one] => serde_json::to_string_pretty(one),
        all => serde_json::to_string_pretty(all),
    }
}

/// Parses the arguments, runs the command, returns the process exit code.
pub fn main() -> i32 {
    // `.env` in the working directory only: never one found in a parent
    // directory, which may belong to something else.
    if let Err(e) = dotenvy::from_path(".env")
        && !e.not_found()
    {
        eprintln!("error: reading .env: {e}");
        return 2;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_logging(cli.log_format);
    // `verify` runs on one thread: the servers do its heavy work, and with
    // one thread every buffer is freed where it was allocated, which keeps
    // mimalloc from holding freed memory per thread (peak RSS at 10M rows:
    // 41-64 MB on two worker threads, measured).
    let runtime = match cli.command {
        Command::Verify { .. } => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        _ => tokio::runtime::Runtime::new(),
    }
    .expect("starting the tokio runtime");
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let s = cli.conn.settings(&cli.tables)?;
    if !matches!(cli.command, Command::Stack { .. }) {
        commands::check_names(&s)?;
    }
    match cli.command {
        Command::Init { partitions, replication_factor, grant } => {
            commands::init(&s, partitions, replication_factor, &grant).await?
        }
        Command::Seed { rows } => commands::seed(&s, rows).await?,
        Command::Produce(a) => {
            a.serve_metrics()?;
            commands::produce(&s, &a.options(), shutdown_signal()).await?
        }
        Command::Consume(a) => {
            a.serve_metrics()?;
            commands::consume(&s, &a.options(), shutdown_signal()).await?
        }
        Command::Run(a) => {
            a.serve_metrics()?;
            commands::run(&s, &a.options(), shutdown_signal()).await?;
        }
        Command::Verify { json, repair, each_replica } => {
            let reports = match each_replica {
                true => commands::verify_each_replica(&s, repair).await?,
                false => commands::verify(&s, repair).await?,
            };
            if json {
                println!("{}", one_or_all(&reports)?);
            } else {
                for report in &reports {
                    println!("{report}");
                }
            }
            return Ok(if reports.iter().all(|r| r.ok()) { 0 } else { 1 });
        }
        Command::Status { json } => {
            let statuses = commands::status(&s).await?;
            if json {
                println!("{}", one_or_all(&statuses)?);
            } else {
                for status in &statuses {
                    status.print(&mut std::io::stdout())?;
                }
            }
        }
        Command::Stack { action } => {
            let stack = crate::stack::Stack::from_env();
            match action {
                StackAction::Up { shape } => {
                    let env = stack.with_cluster(shape.ch_shards, shape.ch_replicas).up().await?;
                    print!("{}", env.shell_exports());
                }
                StackAction::Down { forget_topics } => {
                    stack.down()?;
                    if forget_topics {
                        stack.forget_topics()?;
                    }
                }
                StackAction::Stop { service } => stack.stop(service)?,
                StackAction::Env { shape } => {
                    print!("{}", stack.with_cluster(shape.ch_shards, shape.ch_replicas).env().shell_exports())
                }
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::Service;
    use proptest::prelude::*;

    #[test]
    fn a_password_file_others_can_read_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pg2ch-pwcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pg.pass");
        crate::stack::write_private(&path, "secret").unwrap();
        assert_eq!(open_to_others(&path, &std::fs::metadata(&path).unwrap()), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = open_to_others(&path, &std::fs::metadata(&path).unwrap()).expect("a warning");
        assert!(warning.contains("mode 644") && warning.contains("pg.pass"), "{warning}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every numeric setting, with the command that takes it and its bounds.
    const NUMERIC: [(&[&str], &str, i128, i128); 15] = [
        (&["run"], "--timeout-secs", 1, limits::TIMEOUT_SECS as i128),
        (&["run"], "--batch-rows", 1, limits::BATCH_ROWS as i128),
        (&["run"], "--batch-bytes", 1, limits::BYTES as i128),
        (&["run"], "--producers", 1, limits::LANES as i128),
        (&["run"], "--insert-rows", 1, limits::INSERT_ROWS as i128),
        (&["run"], "--fetch-max-bytes", 1, limits::BYTES as i128),
        (&["run"], "--partitions", 0, limits::PARTITIONS as i128 - 1),
        (&["run"], "--poll-ms", 1, limits::WAIT_MS as i128),
        (&["run"], "--coalesce-ms", 0, limits::WAIT_MS as i128),
        (&["init"], "--partitions", 1, limits::PARTITIONS as i128),
        (&["init"], "--replication-factor", 1, limits::REPLICATION as i128),
        (&["seed"], "--rows", 0, limits::SEED_ROWS as i128),
        (&["stack", "up"], "--ch-replicas", 1, limits::STACK_SERVERS as i128),
        (&["stack", "up"], "--ch-shards", 1, limits::STACK_SERVERS as i128),
        (&["run"], "--pg-port", 0, u16::MAX as i128),
    ];

    /// An integer anywhere in the range of any integer type a setting could
    /// be read as, its ends and the bounds' neighbours often.
    fn any_integer() -> impl Strategy<Value = i128> {
        prop_oneof![
            any::<i128>(),
            any::<i64>().prop_map(i128::from),
            any::<u64>().prop_map(i128::from),
            (-3i128..3),
            prop::sample::select(vec![
                i128::from(i32::MAX),
                i128::from(i32::MAX) + 1,
                i128::from(i32::MIN),
                i128::from(u32::MAX),
                i128::from(i64::MAX),
                i128::from(u64::MAX),
                i128::from(u64::MAX) + 1,
            ]),
        ]
    }

    proptest! {
        #![proptest_config(crate::types::strategies::config(512))]

        /// Any integer given to any numeric setting either parses to a value
        /// within the setting's bounds, from which the settings are built
        /// without a panic, or is refused with one line naming the setting.
        #[test]
        fn every_numeric_setting_takes_its_range_and_refuses_the_rest_by_name(
            which in 0..NUMERIC.len(),
            n in any_integer(),
            near in -2i128..=2,
        ) {
            let (command, flag, low, high) = NUMERIC[which];
            for n in [n, low + near, high + near] {
                let arg = format!("{flag}={n}");
                let argv: Vec<&str> = ["pg2ch"].into_iter().chain(command.iter().copied()).chain([arg.as_str()]).collect();
                match Cli::try_parse_from(&argv) {
                    Ok(cli) => {
                        prop_assert!((low..=high).contains(&n), "{argv:?} was taken");
                        cli.conn.settings(&cli.tables).unwrap();
                        if let Command::Run(args) = &cli.command {
                            let o = args.options();
                            let _ = std::time::Instant::now().checked_add(o.poll + o.coalesce).unwrap();
                        }
                    }
                    Err(e) => {
                        prop_assert!(!(low..=high).contains(&n), "{argv:?} was refused: {e}");
                        let first = e.to_string().lines().next().unwrap_or_default().to_owned();
                        prop_assert!(first.contains(flag), "{argv:?}: the error does not name {flag}: {first}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_service_to_stop_is_named_or_refused_by_name() {
        for (name, service) in [
            ("postgres", Service::Postgres),
            ("clickhouse", Service::ClickHouse),
            ("broker", Service::Broker),
            ("zookeeper", Service::ZooKeeper),
            ("replica-3", Service::Replica(3)),
        ] {
            assert_eq!(name.parse::<Service>(), Ok(service));
        }
        for bad in ["", "kafka", "replica-0", "replica-", "replica-x", "Postgres"] {
            let e = Cli::try_parse_from(["pg2ch", "stack", "stop", bad]).unwrap_err().to_string();
            assert!(e.contains(&format!("unknown service {bad:?}")), "{bad:?}: {e}");
        }
    }

    #[test]
    fn broker_credentials_come_as_a_mechanism_and_a_user_or_not_at_all() {
        let settings = |extra: &[&str]| {
            let argv: Vec<&str> = ["pg2ch", "status"].iter().chain(extra).copied().collect();
            Cli::try_parse_from(&argv)
                .map_err(|e| e.to_string())
                .and_then(|cli| cli.conn.settings(&cli.tables).map(|s| s.kafka.sasl).map_err(|e| e.to_string()))
        };
        assert!(settings(&[]).unwrap().is_none());
        let sasl = settings(&["--kafka-sasl-mechanism", "scram-sha-512", "--kafka-sasl-user", "u"]).unwrap().unwrap();
        assert_eq!((sasl.mechanism, sasl.username.as_str()), (crate::config::SaslMechanism::ScramSha512, "u"));
        let e = settings(&["--kafka-sasl-mechanism", "PLAIN"]).unwrap_err();
        assert_eq!(e, "KAFKA_SASL_MECHANISM is set but KAFKA_SASL_USER is not");
        let e = settings(&["--kafka-sasl-user", "u"]).unwrap_err();
        assert_eq!(e, "KAFKA_SASL_USER is set but KAFKA_SASL_MECHANISM is not");
        let e = settings(&["--kafka-sasl-mechanism", "GSSAPI", "--kafka-sasl-user", "u"]).unwrap_err();
        assert!(e.contains("unknown SASL mechanism \"GSSAPI\""), "{e}");
    }

    #[test]
    fn the_command_line_is_consistent_and_every_command_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        for argv in [
            &["pg2ch", "stack", "up", "--ch-replicas", "2"][..],
            &["pg2ch", "stack", "env", "--ch-replicas", "2"],
            &["pg2ch", "stack", "up", "--ch-shards", "2", "--ch-replicas", "2"],
            &["pg2ch", "verify", "--each-replica", "--ch-cluster", "c", "--ch-replica-addrs", "a:1,b:2"],
            &["pg2ch", "run", "--once", "--partitions", "0,2", "--table", "t"],
            &["pg2ch", "consume", "--exclusive"],
            &["pg2ch", "init", "--partitions", "3"],
            &["pg2ch", "status", "--json"],
            &["pg2ch", "stack", "stop", "replica-2"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            // Reading every value is where a clash between two arguments of one name panics.
            cli.conn.settings(&cli.tables).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        }
    }
}
