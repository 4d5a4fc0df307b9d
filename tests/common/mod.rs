//! Test support: real services and an isolated namespace per test.
//!
//! Services come from, in order: endpoints in the environment (`PG_HOST`,
//! `CH_HOST`, `KAFKA_BOOTSTRAP`, ... as exported by `just test`); containers
//! started with testcontainers when a Docker engine answers; else the local
//! process stack, started here if needed. A test never skips: if no service
//! can be had, it fails with what to install.
#![allow(dead_code)]

mod containers;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::Arc;

use pg2ch::change::Change;
use pg2ch::commands::Settings;
use pg2ch::config::{ChConfig, KafkaConfig, PgConfig, Secret, Timeouts};
use pg2ch::schema::TableSchema;
use pg2ch::types::{Key, Value};
use pg2ch::verify::{KeyRange, RowState, SinkSide, SourceSide};
use sqlx::PgPool;
use tokio::sync::OnceCell;

static BASE: OnceCell<Settings> = OnceCell::const_new();
static CONTAINERS: std::sync::OnceLock<containers::Containers> = std::sync::OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A password from `<NAME>_FILE` (as `pg2ch stack up` exports it) or `<NAME>`.
fn password(name: &str) -> Secret {
    match var(&format!("{name}_FILE")) {
        Some(path) => Secret::new(
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}_FILE {path}: {e}")).trim_end().to_owned(),
        ),
        None => Secret::new(var(name).unwrap_or_default()),
    }
}

async fn base() -> Settings {
    BASE.get_or_init(|| async {
        let settings = services().await;
        sweep(&settings).await;
        settings
    })
    .await
    .clone()
}

/// The services the tests run on (see the module's doc).
async fn services() -> Settings {
    if let (Some(pg_host), Some(ch_host), Some(bootstrap)) = (var("PG_HOST"), var("CH_HOST"), var("KAFKA_BOOTSTRAP")) {
        let port = |n: &str, d: u16| var(n).and_then(|v| v.parse().ok()).unwrap_or(d);
        return Settings {
            pg: PgConfig {
                host: pg_host,
                port: port("PG_PORT", 5432),
                user: var("PG_USER").unwrap_or_else(|| "pg2ch".into()),
                password: password("PG_PASS"),
                database: var("PG_DB").unwrap_or_else(|| "pg2ch".into()),
            },
            ch: ChConfig {
                host: ch_host,
                port: port("CH_PORT", 8123),
                user: var("CH_USER").unwrap_or_else(|| "default".into()),
                password: password("CH_PASS"),
                database: "default".into(),
                cluster: None,
                replicas: vec![],
            },
            kafka: KafkaConfig { bootstrap: vec![bootstrap], topic: String::new(), group: "pg2ch".into(), sasl: None },
            timeouts: Timeouts { call: Duration::from_secs(30) },
            tables: vec!["user_logins".into()],
            other_types_as_text: false,
        };
    }
    if containers::docker_answers() {
        let (running, settings) = containers::start()
            .await
            .unwrap_or_else(|e| panic!("a Docker engine answers, but the containers did not start: {e:#}"));
        let _ = CONTAINERS.set(running);
        return settings;
    }
    let env = pg2ch::stack::Stack::from_env()
        .up()
        .await
        .unwrap_or_else(|e| panic!("no services for the tests and the local stack did not start: {e:#}\n(run `just setup`, or export PG_HOST/CH_HOST/KAFKA_BOOTSTRAP)"));
    settings_of(env)
}

/// A pool of ordinary user sessions on `cfg`, as an application has.
pub async fn user_pool(cfg: &PgConfig) -> PgPool {
    let options = sqlx::postgres::PgConnectOptions::new()
        .host(&cfg.host)
        .port(cfg.port)
        .username(&cfg.user)
        .password(cfg.password.expose())
        .database(&cfg.database);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .expect("PostgreSQL connection")
}

/// Settings for a running local stack.
pub fn settings_of(env: pg2ch::stack::StackEnv) -> Settings {
    Settings {
        pg: env.pg,
        ch: env.ch,
        kafka: KafkaConfig {
            bootstrap: vec![env.kafka_bootstrap],
            topic: String::new(),
            group: "pg2ch".into(),
            sasl: None,
        },
        timeouts: Timeouts { call: Duration::from_secs(30) },
        tables: vec!["user_logins".into()],
        other_types_as_text: false,
    }
}

/// SIGTERMs `child` and waits at most `limit` for it to exit, which it must
/// do successfully: a process that ignores the signal fails the test (and
/// is killed) instead of hanging it.
pub fn terminate(child: &mut std::process::Child, limit: Duration) {
    let asked = std::time::Instant::now();
    let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(sent.success(), "kill -TERM {} failed", child.id());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "pg2ch process {} exited with {status} after SIGTERM", child.id());
            return;
        }
        if asked.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pg2ch process {} did not stop within {limit:?} of SIGTERM", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `probe` until it returns true, failing after `limit`. Waiting for an
/// observable condition, not for time to pass.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !probe().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// New `user_logins` rows, `rows` per statement, until `stop` is set: the
/// rows that keep arriving while a test kills and restarts processes. The
/// task returns how many statements it made.
pub fn keep_inserting(
    pool: PgPool,
    rows: usize,
    pause: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut batches = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let names: Vec<String> = (0..rows).map(|i| format!("live_{batches}_{i}")).collect();
            let times = vec![chrono::Utc::now(); names.len()];
            pg2ch::postgres::insert_events(&pool, &names, &times).await.unwrap();
            batches += 1;
            // Pacing, not synchronisation.
            tokio::time::sleep(pause).await;
        }
        batches
    })
}

/// A free TCP port on loopback for a service a test starts.
///
/// The port is released before the service binds it, so it is picked below
/// the kernel's ephemeral range (`ip_local_port_range`, 32768-60999 by
/// default): a port from that range can meanwhile become the local end of
/// any outgoing connection (another test's consumers, say), and a cluster
/// test lost a ClickHouse replica that way. Ports are handed out in turn from
/// a start that differs per process, each checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Above the stack's fixed ports (5432, 8123-8124, 9000, 9031-9050, 9092).
    const LOW: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOW).min(u32::from(u16::MAX) - LOW);
    if span < 1_000 {
        // An unusual kernel setting: fall back to any port the kernel picks.
        return std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOW} and {}", LOW + span)
}

/// Which ClickHouse this test pass runs against: `server` (a clickhouse-server
/// process; Debian's 18.16 here) or `chdb` (ClickHouse 26.9 in-process, behind
/// the test front end `scripts/chdb_http.py`). `just test` runs both passes.
pub fn clickhouse_flavor() -> String {
    var("PG2CH_TEST_CLICKHOUSE").unwrap_or_else(|| "server".into())
}

/// The chdb front end as a process of this test (test support only).
pub struct ChdbFrontEnd {
    child: std::process::Child,
}

impl ChdbFrontEnd {
    /// Starts it on `port`, its data in `path`, the password read from `password_file`.
    pub async fn start(port: u16, path: &std::path::Path, password_file: &std::path::Path) -> ChdbFrontEnd {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chdb_http.py");
        let child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--user", "pg2ch", "--path"])
            .arg(path)
            .arg("--password-file")
            .arg(password_file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {script}: {e} (install python3; `just setup` installs chdb-core and lz4)")
            });
        let url = format!("127.0.0.1:{port}");
        pg2ch::stack::wait_until("the chdb front end", Duration::from_secs(60), || async {
            let answer = pg2ch::stack::ask(url.as_str(), b"GET /ping HTTP/1.0\r\n\r\n").await?;
            anyhow::ensure!(answer.contains("Ok."), "not ready");
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#} (is chdb installed? `just setup` runs pip install chdb-core lz4)"));
        ChdbFrontEnd { child }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChdbFrontEnd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A whole stack of its own, for tests that stop services. Stopped on drop.
/// In the chdb pass its ClickHouse is a chdb front end of its own.
pub struct PrivateStack {
    pub stack: pg2ch::stack::Stack,
    pub settings: Settings,
    chdb: Option<ChdbFrontEnd>,
}

impl PrivateStack {
    pub async fn start(label: &str) -> PrivateStack {
        PrivateStack::start_with(label, None).await
    }

    async fn start_with(label: &str, shape: Option<(usize, usize)>) -> PrivateStack {
        let cluster = shape.map(|(shards, per_shard)| pg2ch::stack::ClusterPorts {
            zk_port: free_port(),
            shards,
            replicas: (0..shards * per_shard)
                .map(|_| pg2ch::stack::ReplicaPorts { http: free_port(), tcp: free_port(), interserver: free_port() })
                .collect(),
        });
        let stack = pg2ch::stack::Stack {
            dir: std::env::temp_dir().join(format!("pg2ch-{label}-{}", std::process::id())),
            pg_port: free_port(),
            ch_port: free_port(),
            ch_tcp_port: free_port(),
            kafka_port: free_port(),
            cluster,
        };
        let mut private = PrivateStack { settings: settings_of(stack.env()), stack, chdb: None };
        private.up().await;
        private
    }

    /// A stack of its own whose ClickHouse is a cluster of `replicas`
    /// ClickHouse 18.16 servers with ZooKeeper (in every pass: chdb has no
    /// replication).
    pub async fn start_cluster(label: &str, replicas: usize) -> PrivateStack {
        PrivateStack::start_with(label, Some((1, replicas))).await
    }

    /// A stack of its own whose ClickHouse is a cluster of `shards` shards
    /// of one ClickHouse 18.16 server each, with ZooKeeper.
    pub async fn start_sharded(label: &str, shards: usize) -> PrivateStack {
        PrivateStack::start_with(label, Some((shards, 1))).await
    }

    fn chdb_path(&self) -> std::path::PathBuf {
        self.stack.dir.join("chdb")
    }

    /// Starts whatever of the stack is not running.
    pub async fn up(&mut self) {
        if clickhouse_flavor() == "chdb" && self.chdb.is_none() && self.stack.cluster.is_none() {
            // Before the stack: its ClickHouse then answers, and no server is started.
            let password = self.stack.dir.join("secrets/ch.pass");
            self.chdb = Some(ChdbFrontEnd::start(self.stack.ch_port, &self.chdb_path(), &password).await);
        }
        let env =
            self.stack.up().await.unwrap_or_else(|e| panic!("private stack in {}: {e:#}", self.stack.dir.display()));
        self.settings = settings_of(env);
    }

    /// Stops one service (for outage tests); `up` starts it again.
    pub fn stop(&mut self, service: pg2ch::stack::Service) {
        match (service, &mut self.chdb) {
            (pg2ch::stack::Service::ClickHouse, Some(front)) => {
                front.stop();
                self.chdb = None;
            }
            _ => self.stack.stop(service).unwrap(),
        }
    }

    /// Freezes (`true`) or thaws the broker process: connections stay open
    /// and nothing answers, the way a hung server behaves.
    pub fn freeze_broker(&self, frozen: bool) {
        let pidfile = self.stack.services_root().join("broker/broker.pid");
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
        let pid = pid.trim();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&cmdline).split('\0').next().is_some_and(|argv0| argv0.ends_with("nisshi")),
            "process {pid} of {} is not the broker",
            pidfile.display()
        );
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill").args([signal, pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid} failed");
    }
}

impl Drop for PrivateStack {
    fn drop(&mut self) {
        self.chdb = None;
        let _ = self.stack.down();
        let _ = std::fs::remove_dir_all(&self.stack.dir);
        let _ = std::fs::remove_dir_all(self.stack.pg_root());
        let _ = std::fs::remove_dir_all(self.stack.services_root());
    }
}

/// One test's own PostgreSQL database, ClickHouse database and topic.
///
/// Dropped at the end of a passing test (a failed test's are kept to look
/// at, and swept by the next run once its process has gone), so runs on a
/// long-lived stack do not fill the disk.
pub struct TestEnv {
    pub name: String,
    pub settings: Settings,
    owns: Owns,
}

/// What a [`TestEnv`] drops when it goes.
#[derive(Clone, Copy, PartialEq)]
enum Owns {
    /// The PostgreSQL and ClickHouse databases it created.
    Both,
    /// Only its ClickHouse database (another group's view of a namespace).
    ClickHouse,
    /// Nothing: a view of a namespace another `TestEnv` owns.
    Nothing,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.owns == Owns::Nothing || std::thread::panicking() {
            return;
        }
        let (settings, owns) = (self.settings.clone(), self.owns);
        // Drop may run inside a runtime: clean up on a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async {
                if let Some(ch) = ch_admin(&settings.ch).await {
                    drop_ch_database(&ch, &settings.ch.database).await;
                }
                if let (Owns::Both, Some(admin)) = (owns, pg_admin(&settings.pg).await) {
                    drop_pg_database(&admin, &settings.pg.database).await;
                }
                if owns == Owns::Both {
                    drop_topics(&settings.kafka, std::slice::from_ref(&settings.kafka.topic)).await;
                }
            })
        })
        .join();
    }
}

/// A ClickHouse client on database `default`, if the server answers:
/// cleaning up is best effort.
async fn ch_admin(cfg: &ChConfig) -> Option<pg2ch::clickhouse::ClickHouse> {
    let cfg = ChConfig { database: "default".into(), ..cfg.clone() };
    pg2ch::clickhouse::ClickHouse::connect(&cfg, Duration::from_secs(10)).await.ok()
}

/// A PostgreSQL session on database `postgres`, if the server answers.
async fn pg_admin(cfg: &PgConfig) -> Option<PgPool> {
    let cfg = PgConfig { database: "postgres".into(), ..cfg.clone() };
    pg2ch::postgres::connect(&cfg, 1, Duration::from_secs(10)).await.ok()
}

/// Drops a test's ClickHouse database, quietly.
async fn drop_ch_database(ch: &pg2ch::clickhouse::ClickHouse, name: &str) {
    // Test names are generated from [a-z0-9_].
    let _ = ch.run("drop a test database", &format!("DROP DATABASE IF EXISTS {name}")).await;
}

/// Drops a test's PostgreSQL database (and ends sessions left on it), quietly.
async fn drop_pg_database(admin: &PgPool, name: &str) {
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(admin).await;
}

/// Deletes the broker's topics of the namespaces `names` (a namespace's
/// topic, and those it names `<topic>.<table>`, `<topic>.dlq`, ...),
/// quietly: the stack's broker keeps its topics on disk, so without this
/// every run would add its records to it for good.
async fn drop_topics(cfg: &KafkaConfig, names: &[String]) {
    let Ok(client) = pg2ch::kafka::connect(cfg, Duration::from_secs(2)).await else { return };
    let (Ok(topics), Ok(controller)) = (client.list_topics().await, client.controller_client()) else { return };
    for topic in topics {
        if names.iter().any(|n| topic.name == *n || topic.name.starts_with(&format!("{n}."))) {
            let _ = tokio::time::timeout(Duration::from_secs(10), controller.delete_topic(topic.name, 5_000)).await;
        }
    }
}

/// The comment that marks a PostgreSQL database as a test's: the sweep
/// drops no other, whatever its name.
const TEST_MARK: &str = "pg2ch test database";

/// Drops the namespaces earlier runs left behind: test databases (and
/// their topics) whose process has gone (a failed test keeps its own until
/// then). Only
/// PostgreSQL databases a test created and marked ([`TEST_MARK`]) are
/// dropped, and only the ClickHouse databases of their names (a group's
/// view adds `_<group>`): a server the environment names that is not a
/// test server loses nothing it did not get from a test.
async fn sweep(settings: &Settings) {
    let Some(admin) = pg_admin(&settings.pg).await else { return };
    let gone: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 't\\_%' AND shobj_description(oid, 'pg_database') = $1",
    )
    .bind(TEST_MARK)
    .fetch_all(&admin)
    .await
    .unwrap_or_default()
    .into_iter()
    .filter(|n: &String| !process_alive(n))
    .collect();
    if gone.is_empty() {
        return;
    }
    if let Some(ch) = ch_admin(&settings.ch).await {
        let ch_names: Vec<String> = ch
            .client
            .query("SELECT name FROM system.databases WHERE startsWith(name, 't_')")
            .fetch_all::<String>()
            .await
            .unwrap_or_default();
        for name in ch_names {
            if gone.iter().any(|g| name == *g || name.starts_with(&format!("{g}_"))) {
                drop_ch_database(&ch, &name).await;
            }
        }
    }
    for name in &gone {
        drop_pg_database(&admin, name).await;
    }
    drop_topics(&settings.kafka, &gone).await;
}

/// Whether the process that created test database `name`
/// (`t_<label>_<pid>_<n>_<random>`) still runs.
fn process_alive(name: &str) -> bool {
    let pid = name.rsplit('_').nth(2).and_then(|p| p.parse::<u32>().ok());
    pid.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

impl TestEnv {
    pub async fn new(label: &str) -> TestEnv {
        Self::on(base().await, label).await
    }

    /// A namespace whose PostgreSQL database has this encoding (e.g.
    /// `SQL_ASCII`, which admits any byte but NUL in text).
    pub async fn with_encoding(label: &str, encoding: &str) -> TestEnv {
        Self::create(
            base().await,
            label,
            &format!("ENCODING '{encoding}' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"),
        )
        .await
    }

    /// A namespace on the services `base` points at.
    pub async fn on(base: Settings, label: &str) -> TestEnv {
        Self::create(base, label, "").await
    }

    async fn create(base: Settings, label: &str, options: &str) -> TestEnv {
        let name = format!(
            "t_{label}_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        );
        let admin =
            pg2ch::postgres::connect(&base.pg, 1, Duration::from_secs(10)).await.expect("PostgreSQL admin connection");
        // The name is generated above from [a-z0-9_]; CREATE DATABASE takes no bind parameters.
        sqlx::query(&format!("CREATE DATABASE {name} {options}"))
            .execute(&admin)
            .await
            .expect("creating the test database");
        sqlx::query(&format!("COMMENT ON DATABASE {name} IS '{TEST_MARK}'"))
            .execute(&admin)
            .await
            .expect("marking the test database");
        let mut settings = base.clone();
        settings.pg.database = name.clone();
        settings.ch.database = name.clone();
        settings.kafka.topic = name.clone();
        TestEnv { name, settings, owns: Owns::Both }
    }

    /// The same namespace, seen by another consumer group writing to another ClickHouse database.
    pub fn with_group(&self, group: &str) -> TestEnv {
        let mut settings = self.settings.clone();
        settings.kafka.group = group.into();
        settings.ch.database = format!("{}_{group}", self.name);
        TestEnv { name: self.name.clone(), settings, owns: Owns::ClickHouse }
    }

    /// The same namespace through other settings (another replica, say);
    /// it drops nothing.
    pub fn view(&self, settings: Settings) -> TestEnv {
        TestEnv { name: self.name.clone(), settings, owns: Owns::Nothing }
    }

    /// A pool of ordinary user sessions (not pg2ch's own: its triggers
    /// see their changes as changes to send).
    pub async fn pg(&self) -> PgPool {
        user_pool(&self.settings.pg).await
    }

    /// A pool of pg2ch's own sessions (`pg2ch.own = on`, UTC, ...): its
    /// triggers skip their changes, as they skip the producers' flag updates.
    pub async fn pg_own(&self) -> PgPool {
        pg2ch::postgres::connect(&self.settings.pg, 2, Duration::from_secs(10)).await.expect("PostgreSQL connection")
    }

    pub async fn ch(&self) -> pg2ch::clickhouse::ClickHouse {
        pg2ch::clickhouse::ClickHouse::connect(&self.settings.ch, Duration::from_secs(10))
            .await
            .expect("ClickHouse connection")
    }

    /// A table as pg2ch reads it (`user_logins` by default).
    pub async fn table(&self, name: &str) -> Arc<TableSchema> {
        let pool = pg2ch::postgres::connect(&self.settings.pg, 1, Duration::from_secs(10)).await.unwrap();
        let oid = pg2ch::postgres::resolve(&pool, name).await.unwrap().unwrap_or_else(|| panic!("no table {name}"));
        Arc::new(pg2ch::postgres::read_table(&pool, oid, true).await.unwrap())
    }

    /// `user_logins` as pg2ch reads it.
    pub async fn logins(&self) -> Arc<TableSchema> {
        self.table("user_logins").await
    }

    /// Every row of the table in PostgreSQL, by key, with where it stands.
    pub async fn pg_rows(&self, schema: &Arc<TableSchema>) -> BTreeMap<Key, (Vec<Value>, RowState)> {
        // Read as pg2ch reads (its sessions' settings: UTC, ISO 8601 intervals).
        let pool = pg2ch::postgres::connect(&self.settings.pg, 1, Duration::from_secs(10)).await.unwrap();
        let mut side = pg2ch::postgres::PgVerifySide::open(&pool, schema.clone()).await.unwrap();
        let rows = side.rows(KeyRange::ALL).await.unwrap();
        rows.into_iter().map(|r| (r.key, (r.values, r.state))).collect()
    }

    /// The live rows ClickHouse holds for the table (each key's newest
    /// change, deleted keys left out), by key.
    pub async fn ch_rows(&self, schema: &Arc<TableSchema>) -> BTreeMap<Key, Change> {
        let mut side = pg2ch::clickhouse::verify::ChVerifySide { ch: self.ch().await, schema: schema.clone() };
        let rows = side.rows(KeyRange::ALL).await.unwrap();
        rows.into_iter().filter(|r| !r.change.deleted).map(|r| (r.key, r.change)).collect()
    }

    /// ClickHouse's live rows equal PostgreSQL's rows flagged sent, value
    /// for value (and nothing is left unsent).
    pub async fn assert_same_rows(&self, schema: &Arc<TableSchema>, what: &str) {
        let pg = self.pg_rows(schema).await;
        let ch = self.ch_rows(schema).await;
        let unsent: Vec<&Key> =
            pg.iter().filter(|(_, (_, s))| matches!(s, RowState::Pending)).map(|(k, _)| k).collect();
        assert!(unsent.is_empty(), "{what}: rows still unsent: {unsent:?}");
        let sent: BTreeMap<&Key, &Vec<Value>> =
            pg.iter().filter(|(_, (_, s))| matches!(s, RowState::Sent(_))).map(|(k, (v, _))| (k, v)).collect();
        let live: BTreeMap<&Key, &Vec<Value>> = ch.iter().map(|(k, c)| (k, &c.values)).collect();
        let extra: Vec<(&&Key, Option<&RowState>)> =
            live.keys().filter(|k| !sent.contains_key(*k)).map(|k| (k, pg.get(*k).map(|(_, s)| s))).take(5).collect();
        assert_eq!(
            live.len(),
            sent.len(),
            "{what}: ClickHouse has {} live rows, PostgreSQL {} sent; first extra (with their state in PostgreSQL): {extra:?}",
            live.len(),
            sent.len()
        );
        for (key, values) in &sent {
            assert_eq!(live.get(key), Some(values), "{what}: row {key:?}");
        }
    }

    /// One partition of a topic, reached directly as a client other than
    /// pg2ch would (to write poison, to read the dead-letter topic).
    pub async fn foreign_partition(&self, topic: &str, partition: i32) -> rskafka::client::partition::PartitionClient {
        let client = pg2ch::kafka::connect(&self.settings.kafka, Duration::from_secs(10)).await.expect("Kafka client");
        client
            .partition_client(topic.to_owned(), partition, rskafka::client::partition::UnknownTopicHandling::Error)
            .await
            .expect("partition client")
    }

    /// The environment the binary reads, for this namespace.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let s = &self.settings;
        let mut vars = vec![
            ("PG_HOST", s.pg.host.clone()),
            ("PG_PORT", s.pg.port.to_string()),
            ("PG_USER", s.pg.user.clone()),
            ("PG_PASS", s.pg.password.expose().to_owned()),
            ("PG_DB", s.pg.database.clone()),
            ("CH_HOST", s.ch.host.clone()),
            ("CH_PORT", s.ch.port.to_string()),
            ("CH_USER", s.ch.user.clone()),
            ("CH_PASS", s.ch.password.expose().to_owned()),
            ("CH_DB", s.ch.database.clone()),
            ("CH_CLUSTER", s.ch.cluster.clone().unwrap_or_default()),
            ("CH_REPLICAS", s.ch.replicas.join(",")),
            ("KAFKA_BOOTSTRAP", s.kafka.bootstrap.join(",")),
            ("KAFKA_TOPIC", s.kafka.topic.clone()),
            ("KAFKA_GROUP", s.kafka.group.clone()),
            ("PG2CH_TIMEOUT_SECS", "10".into()),
        ];
        if let Some(sasl) = &s.kafka.sasl {
            let mechanism = match sasl.mechanism {
                pg2ch::config::SaslMechanism::Plain => "PLAIN",
                pg2ch::config::SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                pg2ch::config::SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            };
            vars.push(("KAFKA_SASL_MECHANISM", mechanism.into()));
            vars.push(("KAFKA_SASL_USER", sasl.username.clone()));
            vars.push(("KAFKA_SASL_PASS", sasl.password.expose().to_owned()));
        }
        vars
    }

    /// A `pg2ch` command with this namespace's environment (and nothing from the caller's).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pg2ch"));
        for key in [
            "PG_HOST",
            "PG_PORT",
            "PG_USER",
            "PG_PASS",
            "PG_PASS_FILE",
            "PG_DB",
            "CH_HOST",
            "CH_PORT",
            "CH_USER",
            "CH_PASS",
            "CH_PASS_FILE",
            "CH_DB",
            "CH_CLUSTER",
            "CH_REPLICAS",
            "KAFKA_BOOTSTRAP",
            "KAFKA_TOPIC",
            "KAFKA_GROUP",
            "KAFKA_SASL_MECHANISM",
            "KAFKA_SASL_USER",
            "KAFKA_SASL_PASS",
            "KAFKA_SASL_PASS_FILE",
            "PG2CH_TABLES",
            "PG2CH_OTHER_TYPES",
        ] {
            cmd.env_remove(key);
        }
        cmd.envs(self.vars()).args(args).current_dir(std::env::temp_dir());
        cmd
    }

    /// Runs `pg2ch args` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running pg2ch")
    }

    /// Runs `pg2ch args` and fails the test unless it exits 0.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "pg2ch {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A Kafka-API broker of its own that requires SASL authentication
/// (nisshi `--authentication`, SQLite storage holding no users), on a free
/// loopback port; stopped and its storage deleted when dropped.
pub struct AuthenticatingBroker {
    pub bootstrap: String,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl AuthenticatingBroker {
    pub async fn start() -> AuthenticatingBroker {
        let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let nisshi = std::env::split_paths(&path)
            .chain([home.join(".cargo/bin")])
            .map(|dir| dir.join("nisshi"))
            .find(|candidate| candidate.is_file())
            .unwrap_or_else(|| panic!("no nisshi broker: run `just setup` ({})", pg2ch::stack::NISSHI_INSTALL));
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        // nisshi requires storage that can hold users for `--authentication`.
        let dir = std::env::temp_dir().join(format!("pg2ch-sasl-broker-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(nisshi)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://broker.db", "--authentication"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting nisshi");
        let broker = AuthenticatingBroker { bootstrap: format!("127.0.0.1:{port}"), child, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&broker.bootstrap).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "nisshi did not listen on {} within 30 s", broker.bootstrap);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker
    }
}

impl Drop for AuthenticatingBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
