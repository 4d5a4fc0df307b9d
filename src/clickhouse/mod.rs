//! ClickHouse: the client and what the server can do ([`Capabilities`]),
//! the tables pg2ch creates and checks (`ddl.rs`), the [`Sink`](crate::stores::Sink)
//! adapter and the consumer positions ([`ChSink`]), and the rows `verify`
//! reads ([`verify`]).
//!
//! Each source table has a `ReplacingMergeTree` of the same name ordered by
//! its primary key, keeping per key the row of the highest `_pg2ch_version`
//! (a replay or an older change arriving late is two parts until a merge,
//! and `SELECT ... FINAL` shows the newest); on servers that have it the
//! engine also knows `_pg2ch_deleted` as its `is_deleted` column, and
//! `FINAL` leaves deleted keys out. Inserts are pinned synchronous
//! (`async_insert=0` where the server has the setting), so a position is
//! stored only after its rows are in the table.
//!
//! On a cluster (`CH_CLUSTER`) inserts wait for every replica of their
//! shard (`insert_quorum`). On a cluster of several shards each row goes to
//! the shard that owns its key ([`crate::checksum::shard`]), through a
//! client per shard at a replica `CH_REPLICAS` lists for it.

pub(crate) mod ddl;
pub(crate) mod sink;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clickhouse::{Client, Compression};

use crate::config::{ChConfig, bounded, bounded_store, ch_ident};
use crate::error::{ErrorKind, StoreError, StoreResult};

pub use crate::types::clickhouse::Capabilities;
pub use sink::ChSink;

/// The server's error code in an error answer.
fn code(e: &clickhouse::error::Error) -> Option<u32> {
    let clickhouse::error::Error::BadResponse(text) = e else { return None };
    // Old servers write `Code: 47, e.displayText()`, new ones `Code: 47. DB::Exception`.
    let (_, rest) = text.split_once("Code: ")?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Runs a quorum insert again while the server refuses it because another
/// insert's quorum is still pending (UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE,
/// 286: servers before 20.10 take one quorum insert at a time per table, so
/// consumers of one group take turns). Such a refusal did nothing; other
/// errors are returned, classified. The caller bounds the whole in time.
pub async fn taking_turns<T, F: Future<Output = Result<T, clickhouse::error::Error>>>(
    mut insert: impl FnMut() -> F,
) -> StoreResult<T> {
    loop {
        match insert().await {
            Err(e) if code(&e) == Some(286) => {
                use rand::Rng;
                let wait = rand::rng().random_range(2..30);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            other => return other.map_err(classify),
        }
    }
}

/// Runs a read of ClickHouse's catalogue (`system.tables`,
/// `system.columns`) again while it fails with UNKNOWN_TABLE (60) or
/// FILE_DOESNT_EXIST (107, "Cannot open file" naming the table's metadata file):
/// 18.16 fails such a read when any table of the database is dropped while
/// it runs, even one the read filters out (a table the read asks about being
/// absent is no row, not an error). Immediately, a few times: the race is
/// that drop's moment. Other errors are returned, classified.
pub async fn reading_catalogue<T, F: Future<Output = Result<T, clickhouse::error::Error>>>(
    mut read: impl FnMut() -> F,
) -> StoreResult<T> {
    let mut attempts = 1;
    loop {
        match read().await {
            Err(e) if matches!(code(&e), Some(60 | 107)) && attempts < 10 => attempts += 1,
            other => return other.map_err(classify),
        }
    }
}

/// A driver error's kind: server answers that retrying cannot change (a
/// missing table or column, a type mismatch, a wrong password) are
/// permanent; a request whose answer was lost or cut may have acted (an
/// insert landed); other failures had no effect.
impl From<clickhouse::error::Error> for StoreError {
    fn from(e: clickhouse::error::Error) -> Self {
        use clickhouse::error::Error;
        if let Error::BadResponse(text) = &e {
            // UNKNOWN_IDENTIFIER, NO_SUCH_COLUMN_IN_TABLE, TYPE_MISMATCH,
            // UNKNOWN_TABLE, UNKNOWN_DATABASE, UNKNOWN_USER, AUTHENTICATION_FAILED,
            // CANNOT_PARSE_INPUT_ASSERTION_FAILED (a row shape the table rejects),
            // SYNTAX_ERROR, THERE_IS_NO_COLUMN, ILLEGAL_TYPE_OF_ARGUMENT.
            const PERMANENT: [u32; 12] = [47, 16, 53, 60, 81, 192, 516, 27, 62, 8, 43, 10];
            if code(&e).is_some_and(|c| PERMANENT.contains(&c)) {
                return StoreError::permanent(format!("ClickHouse refused: {}", text.lines().next().unwrap_or(text)));
            }
        }
        let kind = match &e {
            Error::Network(_) | Error::TimedOut => ErrorKind::Unknown,
            _ => ErrorKind::Transient,
        };
        StoreError::new(kind, e)
    }
}

/// [`StoreError::from`] a driver error, for `map_err`.
pub fn classify(e: clickhouse::error::Error) -> StoreError {
    e.into()
}

/// A client for the configured database, with the server's capabilities.
#[derive(Clone)]
pub struct ClickHouse {
    pub client: Client,
    pub caps: Capabilities,
    pub database: String,
    /// The cluster pg2ch's tables live on (`CH_CLUSTER`), if any.
    pub cluster: Option<Cluster>,
    /// On a cluster of several shards, a client per shard (in shard order)
    /// at one of its replicas; empty otherwise.
    shards: Arc<Vec<Client>>,
    timeout: Duration,
}

/// A ClickHouse cluster as `system.clusters` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    /// Replicas of each shard, in shard order.
    pub replicas: Vec<usize>,
}

impl Cluster {
    pub fn shards(&self) -> usize {
        self.replicas.len()
    }

    /// The shard (index from 0) of the server `probe` talks to, which
    /// `CH_REPLICAS` lists as `addr`: it must be in this cluster.
    pub async fn shard_of(&self, probe: &Client, addr: &str, timeout: Duration) -> anyhow::Result<usize> {
        let shard = local_shard(probe, &self.name, timeout)
            .await
            .with_context(|| format!("asking replica {addr} (CH_REPLICAS) for its shard"))?
            .with_context(|| format!("replica {addr} (CH_REPLICAS) is not in cluster {:?}", self.name))?;
        let index = (shard as usize).checked_sub(1).filter(|i| *i < self.shards());
        index.with_context(|| format!("replica {addr} says it is shard {shard} of {}", self.shards()))
    }
}

/// A client over an HTTP client like the crate's default, but with
/// `TCP_NODELAY`: an insert goes out as its headers and then its body, and
/// with Nagle's algorithm on, the body waited for the server's delayed ACK
/// of the headers, about 40 ms, on one insert in ten (measured on the local
/// stack: inserts of 20 rows took 2 ms at p50 and 44 ms at p90).
fn base_client(cfg: &ChConfig) -> Client {
    use hyper_util::client::legacy::{Client as HyperClient, connect::HttpConnector};
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // ClickHouse closes idle connections after 3 s by default (10 s since
    // 23.11); the pool lets go of them before that.
    let http = HyperClient::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build(connector);
    Client::with_http_client(http)
        .with_url(cfg.url())
        .with_user(&cfg.user)
        .with_password(cfg.password.expose())
        .with_validation(false)
}

/// Makes inserts through `client` return only once `replicas` replicas
/// have them, so a position stored after them covers rows no single
/// replica's loss takes away. A replica down stops inserts (retried) until
/// it is back.
fn with_quorum(client: Client, replicas: usize, timeout: Duration) -> Client {
    if replicas < 2 {
        return client;
    }
    client
        .with_setting("insert_quorum", replicas.to_string())
        .with_setting("insert_quorum_timeout", timeout.as_millis().to_string())
}

impl ClickHouse {
    /// Connects, checks the password, and reads the server version.
    /// Does not require the database to exist (see [`ClickHouse::init`]).
    pub async fn connect(cfg: &ChConfig, timeout: Duration) -> anyhow::Result<Self> {
        let probe = base_client(cfg).with_compression(Compression::None);
        let version: String = bounded_store(|| format!("connecting to {}", cfg.describe()), timeout, async {
            Ok(probe.query("SELECT version()").fetch_one::<String>().await?)
        })
        .await
        .with_context(|| format!("cannot connect to {}", cfg.describe()))?;
        let caps = Capabilities::from_version(&version)?;
        let mut client = base_client(cfg)
            .with_database(&cfg.database)
            .with_validation(caps.validation)
            .with_compression(if caps.datetime64 { Compression::Lz4 } else { Compression::None });
        if caps.async_insert {
            // A position is stored once the insert returned: the rows must
            // be in the table by then, not in a buffer.
            client = client.with_setting("async_insert", "0");
        }
        let (cluster, shards) = match &cfg.cluster {
            None => (None, Vec::new()),
            Some(name) => {
                let cluster = Self::cluster(&probe, cfg, name, timeout).await?;
                let mine = local_shard(&probe, name, timeout).await?.unwrap_or(1);
                let shards = if cluster.shards() > 1 {
                    Self::shard_clients(&client, cfg, &cluster, timeout).await?
                } else {
                    Vec::new()
                };
                // Positions go to the configured server's own shard.
                let replicas = cluster.replicas.get(mine.saturating_sub(1) as usize).copied().unwrap_or(1);
                client = with_quorum(client, replicas, timeout);
                (Some(cluster), shards)
            }
        };
        Ok(ClickHouse { client, caps, database: cfg.database.clone(), cluster, shards: Arc::new(shards), timeout })
    }

    /// Reads the cluster `name` from `system.clusters`: it must exist.
    async fn cluster(probe: &Client, cfg: &ChConfig, name: &str, timeout: Duration) -> anyhow::Result<Cluster> {
        let shards: Vec<(u32, u64)> = bounded_store(|| format!("reading cluster {name:?}"), timeout, async {
            Ok(probe
                .query(
                    "SELECT shard_num, count() FROM system.clusters WHERE cluster = ? GROUP BY shard_num \
                     ORDER BY shard_num",
                )
                .bind(name)
                .fetch_all::<(u32, u64)>()
                .await?)
        })
        .await?;
        if shards.is_empty() {
            return Err(StoreError::permanent(format!(
                "ClickHouse cluster {name:?} (CH_CLUSTER) is not in system.clusters of {}: check the name and the \
                 servers' remote_servers",
                cfg.describe()
            ))
            .into());
        }
        Ok(Cluster { name: name.to_owned(), replicas: shards.iter().map(|(_, n)| *n as usize).collect() })
    }

    /// A client per shard of a sharded cluster, at the first replica of
    /// that shard listed in `CH_REPLICAS` (system.clusters names the
    /// servers' native ports, not their HTTP ones), with the shard's quorum.
    async fn shard_clients(
        client: &Client,
        cfg: &ChConfig,
        cluster: &Cluster,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Client>> {
        let mut at: Vec<Option<Client>> = vec![None; cluster.shards()];
        for addr in &cfg.replicas {
            let replica = cfg.at(addr)?;
            let probe = base_client(&replica).with_compression(Compression::None);
            let i = cluster.shard_of(&probe, addr, timeout).await?;
            if at[i].is_none() {
                at[i] = Some(with_quorum(client.clone().with_url(replica.url()), cluster.replicas[i], timeout));
            }
        }
        Ok(at
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                c.ok_or_else(|| {
                    StoreError::permanent(format!(
                        "ClickHouse cluster {:?} has {} shards and pg2ch writes each row to the shard of its key over \
                         HTTP: list every shard's replicas' HTTP addresses in CH_REPLICAS (--ch-replica-addrs); none \
                         of shard {} is listed",
                        cluster.name,
                        cluster.shards(),
                        i + 1
                    ))
                })
            })
            .collect::<StoreResult<_>>()?)
    }

    /// Whether rows are spread over several shards.
    pub fn sharded(&self) -> bool {
        !self.shards.is_empty()
    }

    /// ` ON CLUSTER <name>` for DDL when pg2ch's tables live on a cluster.
    pub fn on_cluster(&self) -> String {
        self.cluster.as_ref().map_or(String::new(), |c| format!(" ON CLUSTER {}", ch_ident(&c.name)))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs a statement that returns nothing, bounded by the call timeout.
    pub async fn run(&self, what: &str, sql: &str) -> anyhow::Result<()> {
        bounded(|| format!("ClickHouse: {what}"), self.timeout, async {
            self.client.query(sql).execute().await.map_err(classify)
        })
        .await
        .with_context(|| format!("ClickHouse: {what}"))
    }

    /// A count from a query returning one number.
    pub async fn scalar(&self, sql: &str) -> StoreResult<u64> {
        bounded(|| format!("ClickHouse: {sql}"), self.timeout, async {
            self.client.query(sql).fetch_one::<u64>().await.map_err(classify)
        })
        .await
    }
}

/// The shard (`shard_num`, from 1) of cluster `name` that the server
/// `probe` talks to belongs to, if it is in the cluster.
async fn local_shard(probe: &Client, name: &str, timeout: Duration) -> StoreResult<Option<u32>> {
    bounded(|| format!("reading cluster {name:?}"), timeout, async {
        probe
            .query("SELECT shard_num FROM system.clusters WHERE cluster = ? AND is_local = 1 LIMIT 1")
            .bind(name)
            .fetch_optional::<u32>()
            .await
            .map_err(classify)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_follow_the_server_version() {
        let old = Capabilities::from_version("18.16.1").unwrap();
        assert!(!old.datetime64 && !old.bool_type && !old.date32 && !old.is_deleted && !old.async_insert);
        let new = Capabilities::from_version("26.9.2.1").unwrap();
        assert!(new.datetime64 && new.bool_type && new.date32 && new.is_deleted && new.async_insert && new.validation);
        assert!(Capabilities::from_version("20.4.1").is_ok_and(|c| !c.datetime64));
        assert!(Capabilities::from_version("23.2").unwrap().is_deleted);
        assert!(Capabilities::from_version("x").is_err());
    }
}
