//! A local PostgreSQL, ClickHouse and Kafka-API broker on loopback, for
//! machines without Docker: `pg2ch stack up | down | env`.
//!
//! The broker is nisshi when installed (`just setup` builds it), with its
//! topics and records in a SQLite file in the broker's directory, so a
//! restart keeps them; else a `redpanda` binary on PATH.
//!
//! `up` is idempotent: a service that already answers with the stack's
//! credentials is reused. PostgreSQL refuses to run as root, so when invoked
//! as root its server runs as the `postgres` user (or `nobody`). Passwords are
//! generated once per stack directory and kept in files created readable by
//! the owner only (mode 0600 from the start, never widened then narrowed);
//! the printed environment names the files (`PG_PASS_FILE`, `CH_PASS_FILE`),
//! so no password is ever printed or passed in argv. The stack directory is
//! created 0700 and refused if another user owns it; PostgreSQL's data, which
//! its server must reach as the `postgres` user when we are root, lives in a
//! sibling directory `<dir>-pg`, 0700 and owned by that user. A pid file is
//! trusted only if it holds a positive number whose process is the program
//! that file is for.
//!
//! With `--ch-replicas N` (N ≥ 2) or `--ch-shards S` (S ≥ 2) ClickHouse is
//! a cluster instead of one server: ZooKeeper (Debian's package, run
//! standalone) and S × N `clickhouse-server` processes forming cluster
//! `pg2ch`, S shards of N replicas (macros `{shard}` = `01`, `02`…,
//! `{replica}` = `r1`… numbered across the cluster, shard by shard), each in
//! `<dir>/ch-r<i>`; the environment then names the cluster (`CH_CLUSTER`)
//! and every replica (`CH_REPLICAS`).
//!
//! Environment knobs: `PG2CH_STACK_DIR` (default `/tmp/pg2ch-stack`),
//! `PG2CH_STACK_PG_PORT` (5432), `PG2CH_STACK_CH_PORT` (8123, HTTP),
//! `PG2CH_STACK_CH_TCP_PORT` (9000), `PG2CH_STACK_KAFKA_PORT` (9092);
//! for a cluster `PG2CH_STACK_ZK_PORT` (2181) and
//! `PG2CH_STACK_CH_REPLICA_PORT` (8131: replica i's HTTP port is this plus
//! i - 1, its native port 9031 + i - 1, its interserver port 9041 + i - 1).

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::config::{ChConfig, KafkaConfig, PgConfig, Secret};

const USER: &str = "pg2ch";

/// Where the stack lives and which ports it uses.
#[derive(Debug, Clone)]
pub struct Stack {
    pub dir: PathBuf,
    pub pg_port: u16,
    pub ch_port: u16,
    pub ch_tcp_port: u16,
    pub kafka_port: u16,
    /// A replicated ClickHouse instead of one server.
    pub cluster: Option<ClusterPorts>,
}

/// The name of the stack's ClickHouse cluster.
pub const CLUSTER: &str = "pg2ch";

/// How the local broker is installed, from the project's folder (`just
/// setup` runs the same): nisshi 0.8.1 with changes so librdkafka's
/// clients can talk to it and its SQLite storage produces and fetches in
/// bounded time (`vendor/nisshi/PG2CH.md`).
pub const NISSHI_INSTALL: &str = "cargo install --path vendor/nisshi --locked --ignore-rust-version";

/// The ports of a ClickHouse cluster: ZooKeeper's, and each replica's,
/// shard by shard.
#[derive(Debug, Clone)]
pub struct ClusterPorts {
    pub zk_port: u16,
    /// How many shards `replicas` is split into, in order, evenly.
    pub shards: usize,
    pub replicas: Vec<ReplicaPorts>,
}

impl ClusterPorts {
    /// The replicas of each shard, in order.
    pub fn by_shard(&self) -> impl Iterator<Item = &[ReplicaPorts]> {
        self.replicas.chunks(self.replicas.len() / self.shards)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ReplicaPorts {
    pub http: u16,
    pub tcp: u16,
    pub interserver: u16,
}

/// One service of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    ClickHouse,
    Broker,
    /// One replica of the stack's cluster, numbered from 1.
    Replica(usize),
    ZooKeeper,
}

impl std::str::FromStr for Service {
    type Err = String;

    /// `postgres`, `clickhouse`, `broker`, `zookeeper` or `replica-N`.
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "postgres" => Service::Postgres,
            "clickhouse" => Service::ClickHouse,
            "broker" => Service::Broker,
            "zookeeper" => Service::ZooKeeper,
            _ => match s.strip_prefix("replica-").and_then(|n| n.parse::<usize>().ok()).filter(|n| *n >= 1) {
                Some(n) => Service::Replica(n),
                None => {
                    return Err(format!(
                        "unknown service {s:?}: postgres, clickhouse, broker, zookeeper or replica-N (N from 1)"
                    ));
                }
            },
        })
    }
}

/// How to reach a running stack.
#[derive(Debug, Clone)]
pub struct StackEnv {
    pub pg: PgConfig,
    pub ch: ChConfig,
    pub kafka_bootstrap: String,
    dir: PathBuf,
}

impl StackEnv {
    /// `export` lines for a shell; passwords are read from their files.
    pub fn shell_exports(&self) -> String {
        let d = self.dir.display();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "export PG_HOST={} PG_PORT={} PG_USER={} PG_DB={}",
            self.pg.host, self.pg.port, self.pg.user, self.pg.database
        );
        let _ = writeln!(s, "export PG_PASS_FILE={d}/secrets/pg.pass");
        let _ = writeln!(
            s,
            "export CH_HOST={} CH_PORT={} CH_USER={} CH_DB={}",
            self.ch.host, self.ch.port, self.ch.user, self.ch.database
        );
        let _ = writeln!(s, "export CH_PASS_FILE={d}/secrets/ch.pass");
        if let Some(cluster) = &self.ch.cluster {
            let _ = writeln!(s, "export CH_CLUSTER={cluster} CH_REPLICAS={}", self.ch.replicas.join(","));
        }
        let _ = writeln!(s, "export KAFKA_BOOTSTRAP={}", self.kafka_bootstrap);
        s
    }
}

fn env_port(name: &str, default: u16) -> u16 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn find_binary(names: &[&str], extra_dirs: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(extra_dirs.iter().cloned());
    for dir in dirs {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

fn postgres_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse(); // newest version first
    dirs
}

fn cargo_bin_dir() -> Vec<PathBuf> {
    std::env::var_os("HOME").map(|h| vec![PathBuf::from(h).join(".cargo/bin")]).unwrap_or_default()
}

fn is_root() -> bool {
    my_uid() == 0
}

/// The unprivileged account PostgreSQL runs as when we are root.
fn service_user() -> &'static str {
    let has = |u: &str| {
        Command::new("id")
            .arg("-u")
            .arg(u)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has("postgres") { "postgres" } else { "nobody" }
}

/// Whether an environment variable's name says it holds a secret
/// (`PG_PASS`, `CH_PASS`, `PGPASSWORD`, `KAFKA_SASL_PASSWORD`, ...).
pub fn is_secret_var(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    name.ends_with("PASS") || ["PASSWORD", "SECRET", "TOKEN"].iter().any(|w| name.contains(w))
}

/// `cmd` without the secrets of our environment: a service started here
/// needs none of pg2ch's passwords (each reads its own from its
/// configuration), and a process's environment is readable by its user
/// and by root through `/proc`.
fn without_secrets(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if is_secret_var(&name.to_string_lossy()) {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// Runs `program args` (as the service user when root), failing with its output.
fn run_as_service_user(program: &Path, args: &[&str], what: &str) -> anyhow::Result<()> {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", service_user(), "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = without_secrets(&mut cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {}", program.display()))?;
    if !out.status.success() {
        bail!("{what} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn chown_to_service_user(path: &Path) -> anyhow::Result<()> {
    if is_root() {
        let status = Command::new("chown").arg("-R").arg(service_user()).arg(path).status()?;
        anyhow::ensure!(status.success(), "chown {} failed", path.display());
    }
    Ok(())
}

/// Writes `contents` to a new file readable by its owner only: created
/// with mode 0600, so there is no moment when others could read it. An old
/// file of that name is removed first.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Creates `dir` (and its parents) with mode 0700, or checks an existing one
/// belongs to `owner` and is closed to others (an older, wider one of ours
/// is narrowed). Refuses a directory someone else owns: it could be a trap.
fn private_dir(dir: &Path, owner: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory (a link?); refusing to use it for the stack", dir.display());
    }
    if meta.uid() != owner {
        bail!("{} belongs to uid {}, not {owner}; refusing to use it for the stack", dir.display(), meta.uid());
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn my_uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self exists"))
}

/// The uid of the account PostgreSQL runs as (ours unless we are root).
fn service_uid() -> anyhow::Result<u32> {
    if !is_root() {
        return Ok(my_uid());
    }
    service_id("-u")
}

/// The uid and gid of the account services run as when we are root.
fn service_ids() -> anyhow::Result<(u32, u32)> {
    Ok((service_uid()?, service_id("-g")?))
}

/// `id <flag> <service user>`: its uid (`-u`) or gid (`-g`).
fn service_id(flag: &str) -> anyhow::Result<u32> {
    let out = Command::new("id").args([flag, service_user()]).output().with_context(|| format!("running id {flag}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("reading `id {flag} {}`", service_user()))
}

/// Whether every directory above `path` lets others through (the service
/// user is neither their owner nor, usually, in their group).
fn others_can_reach(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().skip(1).all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// Reads the password in `file`, creating a random one on first use.
fn secret_file(file: &Path) -> anyhow::Result<Secret> {
    if let Ok(s) = std::fs::read_to_string(file) {
        return Ok(Secret::new(s.trim()));
    }
    use rand::Rng;
    let value: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect();
    private_dir(file.parent().expect("secret files live in a directory"), my_uid())?;
    write_private(file, &value)?;
    Ok(Secret::new(value))
}

/// Sends `request` to a service that answers once and closes (ZooKeeper's
/// four-letter words, HTTP/1.0), and returns the whole answer. Unbounded: a
/// service that takes the connection and never answers holds it for ever,
/// so callers bound it ([`crate::config::bounded`]).
pub async fn ask(addr: impl tokio::net::ToSocketAddrs, request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// Polls `probe` until it succeeds or `limit` passes: how anything that
/// starts a service waits for it to answer.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    poll(what, limit, probe, || Ok(None), String::new).await
}

/// [`wait_until`]'s loop, which also gives up as soon as `exited` reports
/// the process gone; either failure ends with `detail()`.
async fn poll<F, Fut>(
    what: &str,
    limit: Duration,
    mut probe: F,
    mut exited: impl FnMut() -> std::io::Result<Option<std::process::ExitStatus>>,
    detail: impl FnOnce() -> String,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    loop {
        let Err(e) = probe().await else { return Ok(()) };
        let why = match exited()? {
            Some(status) => format!("{what} exited ({status}) before it answered"),
            None if start.elapsed() > limit => format!("{what} did not answer within {limit:?}"),
            None => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        return Err(e.context(format!("{why}{}", detail())));
    }
}

/// Starts `cmd` in its own process group, detached from our terminal, with its
/// output in `log`, and records its pid in `pidfile`.
fn spawn_detached(mut cmd: Command, log: &Path, pidfile: &Path) -> anyhow::Result<Starting> {
    if is_root() {
        // Root gives its services away: as the service user (std drops
        // root's supplementary groups with it).
        use std::os::unix::process::CommandExt;
        let (uid, gid) = service_ids()?;
        cmd.uid(uid).gid(gid);
    }
    let out = std::fs::File::create(log)?;
    let child = without_secrets(&mut cmd)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    std::fs::write(pidfile, child.id().to_string())?;
    Ok(Starting { child, logs: vec![log.to_path_buf()], secrets: Vec::new() })
}

/// A service process we just started, watched until it answers.
struct Starting {
    child: std::process::Child,
    /// Where it writes what went wrong; their last lines go into the error.
    logs: Vec<PathBuf>,
    /// Text scrubbed from those lines (a password a configuration holds).
    secrets: Vec<String>,
}

impl Starting {
    /// Polls `probe` like [`wait_until`], but fails as soon as the process
    /// exits, and either failure carries the last lines of its logs: a test's
    /// private stack directory is removed when the test fails, taking the
    /// logs with it (a port taken between picking it and the server binding
    /// it showed up only as "did not answer within 60s").
    async fn ready<F, Fut>(mut self, what: &str, limit: Duration, probe: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let Starting { child, logs, secrets } = &mut self;
        poll(what, limit, probe, || child.try_wait(), || format!("; {}", log_tails(logs, secrets))).await
    }
}

/// The last lines of each of `logs`, `secrets` scrubbed, for an error.
fn log_tails(logs: &[PathBuf], secrets: &[String]) -> String {
    const LINES: usize = 8;
    const WIDTH: usize = 400;
    let mut out = Vec::new();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = &lines[lines.len().saturating_sub(LINES)..];
        let mut shown: Vec<String> = tail
            .iter()
            .map(|l| {
                let mut l = l.to_string();
                for secret in secrets.iter().filter(|s| !s.is_empty()) {
                    l = l.replace(secret.as_str(), "***");
                }
                l.chars().take(WIDTH).collect()
            })
            .collect();
        if shown.is_empty() {
            shown.push("(empty)".into());
        }
        out.push(format!("{} ends: {}", log.display(), shown.join(" | ")));
    }
    out.join("; ")
}

/// The pid in `pidfile`, if it is a positive number whose process runs
/// `program`: a stale or tampered file must not get a signal sent to
/// whatever now has that pid.
fn checked_pid(pidfile: &Path, program: &str) -> Option<String> {
    let text = std::fs::read_to_string(pidfile).ok()?;
    let pid: u32 = text.trim().parse().ok().filter(|p| *p > 0)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    let name = Path::new(std::str::from_utf8(argv0).ok()?).file_name()?.to_str()?;
    (name == program).then(|| pid.to_string())
}

fn stop_pidfile(pidfile: &Path, program: &str) {
    let Some(pid) = checked_pid(pidfile, program) else {
        let _ = std::fs::remove_file(pidfile);
        return;
    };
    let _ = Command::new("kill").arg(&pid).stderr(Stdio::null()).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    // Gone, or a zombie: stopped, only not yet reaped by its parent.
    let running = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    };
    while running(&pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if running(&pid) {
        let _ = Command::new("kill").args(["-9", &pid]).stderr(Stdio::null()).status();
    }
    let _ = std::fs::remove_file(pidfile);
}

impl Stack {
    pub fn from_env() -> Self {
        Stack {
            dir: std::env::var_os("PG2CH_STACK_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp/pg2ch-stack")),
            pg_port: env_port("PG2CH_STACK_PG_PORT", 5432),
            ch_port: env_port("PG2CH_STACK_CH_PORT", 8123),
            ch_tcp_port: env_port("PG2CH_STACK_CH_TCP_PORT", 9000),
            kafka_port: env_port("PG2CH_STACK_KAFKA_PORT", 9092),
            cluster: None,
        }
    }

    /// The same stack with a cluster of `shards` shards of `replicas`
    /// ClickHouse replicas each (one shard of one replica keeps the single
    /// server), on the ports the environment knobs give.
    pub fn with_cluster(self, shards: usize, replicas: usize) -> Self {
        let (shards, per_shard) = (shards.max(1), replicas.max(1));
        if shards * per_shard < 2 {
            return self;
        }
        let http = env_port("PG2CH_STACK_CH_REPLICA_PORT", 8131);
        let replicas = (0..(shards * per_shard) as u16)
            .map(|i| ReplicaPorts { http: http + i, tcp: 9031 + i, interserver: 9041 + i })
            .collect();
        let zk_port = env_port("PG2CH_STACK_ZK_PORT", 2181);
        Stack { cluster: Some(ClusterPorts { zk_port, shards, replicas }), ..self }
    }

    /// The environment of this stack (whether or not it is running).
    pub fn env(&self) -> StackEnv {
        let read = |name: &str| secret_file(&self.dir.join("secrets").join(name)).unwrap_or_default();
        StackEnv {
            pg: PgConfig {
                host: "127.0.0.1".into(),
                port: self.pg_port,
                user: USER.into(),
                password: read("pg.pass"),
                database: USER.into(),
            },
            ch: ChConfig {
                host: "127.0.0.1".into(),
                port: self.cluster.as_ref().map_or(self.ch_port, |c| c.replicas[0].http),
                user: USER.into(),
                password: read("ch.pass"),
                database: "default".into(),
                cluster: self.cluster.as_ref().map(|_| CLUSTER.to_owned()),
                replicas: self
                    .cluster
                    .iter()
                    .flat_map(|c| c.replicas.iter().map(|r| format!("127.0.0.1:{}", r.http)))
                    .collect(),
            },
            kafka_bootstrap: format!("127.0.0.1:{}", self.kafka_port),
            dir: self.dir.clone(),
        }
    }

    /// The program name the broker runs as (for checking its pid file).
    fn broker_program(&self) -> &'static str {
        if find_binary(&["nisshi"], &cargo_bin_dir()).is_some() { "nisshi" } else { "redpanda" }
    }

    /// PostgreSQL's directory: beside the stack directory, because its server
    /// runs as another user when we are root and cannot enter ours.
    pub fn pg_root(&self) -> PathBuf {
        self.beside("-pg")
    }

    /// The directory of ClickHouse, ZooKeeper and the broker: beside the
    /// stack directory, like PostgreSQL's, because they too run as the
    /// service user when we are root, and the stack directory (which holds
    /// the passwords) is ours alone.
    pub fn services_root(&self) -> PathBuf {
        self.beside("-services")
    }

    /// The stack directory's name with `suffix` appended.
    fn beside(&self, suffix: &str) -> PathBuf {
        let mut name = self.dir.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    }

    /// Where a service's directory `name` is: under `services_root()`, or
    /// in the stack directory itself for a stack an earlier version started.
    fn service_paths(&self, name: &str) -> [PathBuf; 2] {
        [self.services_root().join(name), self.dir.join(name)]
    }

    /// Stops the `program` whose pid `pidfile` (relative to a service
    /// directory) records, in either layout.
    fn stop_recorded(&self, pidfile: &str, program: &str) {
        for path in self.service_paths(pidfile) {
            stop_pidfile(&path, program);
        }
    }

    /// `services_root()/name`, created if missing; the root itself belongs
    /// to the service user and only to it.
    fn service_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let root = self.services_root();
        if !root.exists() {
            private_dir(&root, my_uid())?;
            chown_to_service_user(&root)?;
        }
        private_dir(&root, service_uid()?)?;
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// `program` where the service user can run it: a binary under a
    /// directory others cannot enter (`~/.cargo/bin` of root) is linked, or
    /// else copied, into the services' directory.
    fn runnable(&self, program: PathBuf) -> anyhow::Result<PathBuf> {
        if !is_root() || others_can_reach(&program) {
            return Ok(program);
        }
        let bin = self.service_dir("bin")?;
        let name = program.file_name().context("a program has a file name")?;
        let target = bin.join(name);
        let _ = std::fs::remove_file(&target);
        if std::fs::hard_link(&program, &target).is_err() {
            std::fs::copy(&program, &target)
                .with_context(|| format!("copying {} to {}", program.display(), target.display()))?;
        }
        chown_to_service_user(&bin)?;
        Ok(target)
    }

    /// Starts whatever is not already answering and waits until all three do.
    pub async fn up(&self) -> anyhow::Result<StackEnv> {
        private_dir(&self.dir, my_uid())?;
        let env = self.env();
        match &self.cluster {
            None => {
                tokio::try_join!(self.postgres_up(&env), self.clickhouse_up(&env), self.broker_up(&env))?;
            }
            Some(cluster) => {
                tokio::try_join!(self.postgres_up(&env), self.cluster_up(&env, cluster), self.broker_up(&env))?;
            }
        }
        Ok(env)
    }

    /// Stops what `up` started in this directory.
    pub fn down(&self) -> anyhow::Result<()> {
        let data = self.pg_root().join("data");
        if data.join("postmaster.pid").exists()
            && let Some(pg_ctl) = find_binary(&["pg_ctl"], &postgres_bin_dirs())
        {
            let data = data.to_string_lossy().into_owned();
            run_as_service_user(&pg_ctl, &["-D", &data, "-m", "fast", "-w", "stop"], "pg_ctl stop")?;
        }
        self.stop(Service::ClickHouse)?;
        self.stop(Service::Broker)?;
        // Whatever cluster an earlier `up --ch-replicas` started here.
        for i in 1.. {
            if !self.service_paths(&format!("ch-r{i}")).iter().any(|dir| dir.exists()) {
                break;
            }
            self.stop(Service::Replica(i))?;
        }
        self.stop(Service::ZooKeeper)?;
        tracing::info!("stack in {} stopped", self.dir.display());
        Ok(())
    }

    /// Deletes the local broker's stored topics and records (its SQLite
    /// file, with its write-ahead log and shared-memory index), in either
    /// layout; the broker must be stopped. Returns how many files went.
    pub fn forget_topics(&self) -> anyhow::Result<usize> {
        let mut gone = 0;
        for dir in self.service_paths("broker") {
            gone += remove_broker_files(&dir)?;
        }
        tracing::info!("the broker's stored topics deleted ({gone} {})", if gone == 1 { "file" } else { "files" });
        Ok(gone)
    }

    /// Stops one service of this stack (`pg2ch stack stop`; `up` starts it
    /// again): to see how pg2ch meets an outage.
    pub fn stop(&self, service: Service) -> anyhow::Result<()> {
        match service {
            Service::Postgres => {
                let pg_ctl = find_binary(&["pg_ctl"], &postgres_bin_dirs()).context("pg_ctl not found")?;
                let data = self.pg_root().join("data").to_string_lossy().into_owned();
                run_as_service_user(&pg_ctl, &["-D", &data, "-m", "fast", "-w", "stop"], "pg_ctl stop")?
            }
            Service::ClickHouse => self.stop_recorded("ch/server.pid", "clickhouse-server"),
            Service::Broker => self.stop_recorded("broker/broker.pid", self.broker_program()),
            Service::Replica(i) => self.stop_recorded(&format!("ch-r{i}/server.pid"), "clickhouse-server"),
            Service::ZooKeeper => self.stop_recorded("zk/zk.pid", "java"),
        };
        Ok(())
    }

    async fn postgres_up(&self, env: &StackEnv) -> anyhow::Result<()> {
        let admin = PgConfig { database: "postgres".into(), ..env.pg.clone() };
        let probe = || async { crate::postgres::connect(&admin, 1, Duration::from_secs(2)).await.map(|_| ()) };
        if probe().await.is_err() {
            let dirs = postgres_bin_dirs();
            let missing = "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql (apt-get install postgresql)";
            let initdb = find_binary(&["initdb"], &dirs).context(missing)?;
            let pg_ctl = find_binary(&["pg_ctl"], &dirs).context(missing)?;
            let root = self.pg_root();
            if !root.exists() {
                private_dir(&root, my_uid())?;
                chown_to_service_user(&root)?;
            }
            private_dir(&root, service_uid()?)?;
            let data = root.join("data");
            if !data.join("PG_VERSION").exists() {
                let pwfile = root.join("initdb.pw");
                write_private(&pwfile, env.pg.password.expose())?;
                chown_to_service_user(&pwfile)?;
                let (d, pw) = (data.to_string_lossy().into_owned(), pwfile.to_string_lossy().into_owned());
                let result = run_as_service_user(
                    &initdb,
                    &["-D", &d, "-U", USER, "--pwfile", &pw, "-A", "scram-sha-256", "-E", "UTF8", "--no-locale"],
                    "initdb",
                );
                let _ = std::fs::remove_file(&pwfile);
                result?;
            }
            let (d, log, sock) = (
                data.to_string_lossy().into_owned(),
                root.join("server.log").to_string_lossy().into_owned(),
                root.to_string_lossy().into_owned(),
            );
            // A throwaway development server: durability settings off for speed.
            let options = format!(
                "-p {} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                self.pg_port
            );
            run_as_service_user(
                &pg_ctl,
                &["-D", &d, "-l", &log, "-o", &options, "-w", "-t", "60", "start"],
                "pg_ctl start",
            )
            .with_context(|| format!("see {log}"))?;
            wait_until("PostgreSQL", Duration::from_secs(30), probe).await?;
        }
        let pool = crate::postgres::connect(&admin, 1, Duration::from_secs(10)).await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(USER)
            .fetch_one(&pool)
            .await?;
        if !exists {
            sqlx::query("CREATE DATABASE pg2ch").execute(&pool).await?;
        }
        tracing::info!("PostgreSQL ready on 127.0.0.1:{}", self.pg_port);
        Ok(())
    }

    async fn clickhouse_up(&self, env: &StackEnv) -> anyhow::Result<()> {
        self.clickhouse_server_up(env, &self.service_dir("ch")?, self.ch_port, self.ch_tcp_port, "").await
    }

    /// Starts one `clickhouse-server` in `root` unless one answers on
    /// `http` already; `extra` goes into its configuration.
    async fn clickhouse_server_up(
        &self,
        env: &StackEnv,
        root: &Path,
        http: u16,
        tcp: u16,
        extra: &str,
    ) -> anyhow::Result<()> {
        let ch = ChConfig { port: http, cluster: None, ..env.ch.clone() };
        let probe = || async { crate::clickhouse::ClickHouse::connect(&ch, Duration::from_secs(2)).await.map(|_| ()) };
        if probe().await.is_err() {
            let bin = find_binary(&["clickhouse-server"], &[])
                .context("clickhouse-server not found: run `just setup` (or apt-get install clickhouse-server)")?;
            for sub in ["data", "tmp", "user_files", "format_schemas"] {
                std::fs::create_dir_all(root.join(sub))?;
            }
            let r = root.display();
            let config = format!(
                r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{r}/server.log</log><errorlog>{r}/error.log</errorlog><console>0</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <path>{r}/data/</path>
  <tmp_path>{r}/tmp/</tmp_path>
  <user_files_path>{r}/user_files/</user_files_path>
  <format_schema_path>{r}/format_schemas/</format_schema_path>
  <users_config>{r}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>200</max_concurrent_queries>
{extra}</yandex>
"#
            );
            // A cluster's configuration holds the password replicas use.
            write_private(&root.join("config.xml"), &config)?;
            let users = format!(
                r#"<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users>
    <{USER}>
      <password>{}</password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </{USER}>
  </users>
  <quotas><default></default></quotas>
</yandex>
"#,
                env.ch.password.expose()
            );
            write_private(&root.join("users.xml"), &users)?;
            chown_to_service_user(root)?;
            let mut cmd = Command::new(self.runnable(bin)?);
            cmd.arg(format!("--config-file={r}/config.xml")).current_dir(root);
            let mut server = spawn_detached(cmd, &root.join("stdout.log"), &root.join("server.pid"))?;
            server.logs.push(root.join("error.log"));
            server.secrets.push(env.ch.password.expose().to_string());
            server.ready(&format!("ClickHouse on port {http}"), Duration::from_secs(60), probe).await?;
        }
        tracing::info!("ClickHouse ready on 127.0.0.1:{http}");
        Ok(())
    }

    /// ZooKeeper, then every replica of the cluster.
    async fn cluster_up(&self, env: &StackEnv, cluster: &ClusterPorts) -> anyhow::Result<()> {
        self.zookeeper_up(cluster.zk_port).await?;
        let password = env.ch.password.expose();
        let shards: String = cluster
            .by_shard()
            .map(|replicas| {
                let replicas: String = replicas
                    .iter()
                    .map(|r| {
                        format!(
                            "<replica><host>127.0.0.1</host><port>{}</port><user>{USER}</user><password>{password}</password></replica>",
                            r.tcp
                        )
                    })
                    .collect();
                format!("<shard><internal_replication>true</internal_replication>{replicas}</shard>")
            })
            .collect();
        let per_shard = cluster.replicas.len() / cluster.shards;
        let ups = cluster.replicas.iter().enumerate().map(|(i, r)| {
            let extra = format!(
                "  <interserver_http_port>{}</interserver_http_port>
  <interserver_http_host>127.0.0.1</interserver_http_host>
  <zookeeper><node><host>127.0.0.1</host><port>{}</port></node></zookeeper>
  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
  <macros><shard>{:02}</shard><replica>r{}</replica></macros>
  <remote_servers><{CLUSTER}>{shards}</{CLUSTER}></remote_servers>
",
                r.interserver,
                cluster.zk_port,
                i / per_shard + 1,
                i + 1
            );
            let name = format!("ch-r{}", i + 1);
            async move { self.clickhouse_server_up(env, &self.service_dir(&name)?, r.http, r.tcp, &extra).await }
        });
        futures::future::try_join_all(ups).await?;
        Ok(())
    }

    /// A standalone ZooKeeper on loopback, from Debian's `zookeeper` package.
    async fn zookeeper_up(&self, port: u16) -> anyhow::Result<()> {
        let probe = || async move {
            // `srvr`, not `ruok`: ZooKeeper answers `imok` as soon as it
            // listens, before it has loaded its data and serves sessions; a
            // ClickHouse server started then fails its handshake and exits.
            // Bounded, as every probe here: a ZooKeeper still starting can
            // take the connection and never answer nor close it.
            crate::config::bounded(
                || format!("asking ZooKeeper on port {port} for `srvr`"),
                Duration::from_secs(2),
                async {
                    let answer = ask(("127.0.0.1", port), b"srvr").await?;
                    anyhow::ensure!(answer.contains("\nMode: "), "ZooKeeper answered {answer:?}");
                    Ok(())
                },
            )
            .await
        };
        if probe().await.is_ok() {
            return Ok(());
        }
        let jar = Path::new("/usr/share/java/zookeeper.jar");
        anyhow::ensure!(jar.exists(), "ZooKeeper not found: run `just setup` (or apt-get install zookeeper)");
        let java = find_binary(&["java"], &[]).context("java not found (apt-get install default-jre-headless)")?;
        let root = self.service_dir("zk")?;
        std::fs::create_dir_all(root.join("data"))?;
        let r = root.display();
        std::fs::write(
            root.join("zoo.cfg"),
            format!(
                "tickTime=2000\ndataDir={r}/data\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=srvr\n"
            ),
        )?;
        chown_to_service_user(&root)?;
        let mut cmd = Command::new(java);
        cmd.args(["-Xmx256m", "-cp", "/usr/share/java/zookeeper.jar:/etc/zookeeper/conf_example"])
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(root.join("zoo.cfg"))
            .current_dir(&root);
        let zk = spawn_detached(cmd, &root.join("zk.log"), &root.join("zk.pid"))?;
        zk.ready(&format!("ZooKeeper on port {port}"), Duration::from_secs(60), probe).await?;
        tracing::info!("ZooKeeper ready on 127.0.0.1:{port}");
        Ok(())
    }

    async fn broker_up(&self, env: &StackEnv) -> anyhow::Result<()> {
        let kafka = KafkaConfig {
            bootstrap: vec![env.kafka_bootstrap.clone()],
            topic: String::new(),
            group: String::new(),
            sasl: None,
        };
        let probe = || async {
            let client = crate::kafka::connect(&kafka, Duration::from_secs(2)).await?;
            crate::config::bounded(|| "listing topics".into(), Duration::from_secs(2), async {
                Ok(client.list_topics().await?)
            })
            .await
            .map(|_| ())
        };
        if probe().await.is_err() {
            let root = self.service_dir("broker")?;
            let url = format!("tcp://127.0.0.1:{}", self.kafka_port);
            let cmd = if let Some(nisshi) = find_binary(&["nisshi"], &cargo_bin_dir()) {
                let mut c = Command::new(self.runnable(nisshi)?);
                c.args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                    "--storage-engine",
                    // SQLite in the broker's directory (its working
                    // directory): topics and records survive a restart.
                    &format!("sqlite://{BROKER_DB}"),
                ]);
                c
            } else if let Some(redpanda) = find_binary(&["redpanda"], &[]) {
                // Not exercised where the project's CI runs (no redpanda binary there).
                let r = root.display();
                let config = format!(
                    "redpanda:\n  data_directory: \"{r}/data\"\n  developer_mode: true\n  seed_servers: []\n  \
                     rpc_server: {{address: \"127.0.0.1\", port: 33145}}\n  \
                     kafka_api: [{{address: \"127.0.0.1\", port: {}}}]\n  \
                     admin: [{{address: \"127.0.0.1\", port: 9644}}]\n",
                    self.kafka_port
                );
                std::fs::write(root.join("redpanda.yaml"), config)?;
                let mut c = Command::new(self.runnable(redpanda)?);
                c.arg(format!("--redpanda-cfg={r}/redpanda.yaml")).args([
                    "--smp=1",
                    "--memory=1G",
                    "--overprovisioned",
                    "--unsafe-bypass-fsync=true",
                ]);
                c
            } else {
                bail!(
                    "no Kafka-API broker found: run `just setup` (or {NISSHI_INSTALL}), or point KAFKA_BOOTSTRAP at a running broker"
                );
            };
            chown_to_service_user(&root)?;
            let mut cmd = cmd;
            cmd.current_dir(&root);
            let broker = spawn_detached(cmd, &root.join("broker.log"), &root.join("broker.pid"))?;
            broker
                .ready(&format!("the Kafka broker on port {}", self.kafka_port), Duration::from_secs(30), probe)
                .await?;
        }
        tracing::info!("Kafka broker ready on {}", env.kafka_bootstrap);
        Ok(())
    }
}

/// The local broker's SQLite file, in its directory (its working directory).
const BROKER_DB: &str = "broker.db";

/// Deletes [`BROKER_DB`] and its SQLite companions (`-wal`, `-shm`,
/// `-journal`) from `dir`, nothing else; a missing directory or file is
/// fine. Returns how many files it deleted.
fn remove_broker_files(dir: &Path) -> anyhow::Result<usize> {
    let mut gone = 0;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let path = dir.join(format!("{BROKER_DB}{suffix}"));
        match std::fs::remove_file(&path) {
            Ok(()) => gone += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("cannot delete {}: {e}", path.display())),
        }
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pg2ch-stack-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn forgetting_topics_deletes_the_broker_files_and_nothing_else() {
        let dir = scratch("forget");
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["broker.db", "broker.db-wal", "broker.db-shm", "broker.pid", "broker.log", "other.db"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        assert_eq!(remove_broker_files(&dir).unwrap(), 3);
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["broker.log", "broker.pid", "other.db"]);
        // Again, and in a directory that does not exist: nothing to do, no error.
        assert_eq!(remove_broker_files(&dir).unwrap(), 0);
        assert_eq!(remove_broker_files(&dir.join("missing")).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pid_file_is_trusted_only_for_a_live_process_of_its_program() {
        let dir = scratch("pid");
        private_dir(&dir, my_uid()).unwrap();
        let file = dir.join("x.pid");
        let me = std::process::id().to_string();
        let my_name = std::env::current_exe().unwrap().file_name().unwrap().to_string_lossy().into_owned();
        for (content, program, trusted) in [
            (me.as_str(), my_name.as_str(), true),
            (me.as_str(), "clickhouse-server", false),
            ("-1", my_name.as_str(), false),
            ("0", my_name.as_str(), false),
            ("abc", my_name.as_str(), false),
            ("", my_name.as_str(), false),
            ("4294967296", my_name.as_str(), false),
        ] {
            std::fs::write(&file, content).unwrap();
            assert_eq!(checked_pid(&file, program).is_some(), trusted, "{content:?} for {program}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stack_directories_and_secret_files_are_private_from_the_start() {
        let dir = scratch("private");
        private_dir(&dir.join("a/b"), my_uid()).unwrap();
        assert_eq!(std::fs::metadata(dir.join("a/b")).unwrap().mode() & 0o777, 0o700);
        let secret = secret_file(&dir.join("secrets/pg.pass")).unwrap();
        let meta = std::fs::metadata(dir.join("secrets/pg.pass")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.join("secrets")).unwrap().mode() & 0o777, 0o700);
        assert_eq!(secret_file(&dir.join("secrets/pg.pass")).unwrap(), secret, "read back, not replaced");
        // A wider directory of ours is narrowed; someone else's is refused.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir, my_uid()).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let err = private_dir(&dir, my_uid() + 1).unwrap_err().to_string();
        assert!(err.contains("belongs to uid"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
