//! Partition leases for the consumers of a group ([`Leases`]), as
//! PostgreSQL session-level advisory locks: no component beyond the
//! database pg2ch already needs.
//!
//! Each consumer process keeps one session of its own for its leases. A
//! lock lives as long as that session: a process that exits or is killed
//! closes it at once; one that hangs or is paused stops the heartbeat,
//! and the server ends the session after [`LEASE_LIFE`] idle
//! (`idle_session_timeout`), which releases its locks. A process that wakes
//! after that finds it holds nothing ([`Leases::held`] checks its session
//! still lives: while it does, what it took is held) and joins again.
//!
//! Lock keys are single `bigint`s (a space apart from the two-`int4` keys
//! of claims and producer leases): the group's number from
//! `_pg2ch.consumer_groups` (one per consumer group and topic) in the high
//! 32 bits, and in the low ones a partition, or `2^31 +` a member slot for
//! membership.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::Mutex;

use crate::config::{bounded, bounded_store};
use crate::error::{StoreError, StoreResult};
use crate::stores::{Leases, Members};

/// How long a lease outlives its holder's last sign of life.
pub const LEASE_LIFE: Duration = Duration::from_secs(8);
/// How often a holder shows it lives.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// The low half of a membership key.
const MEMBER_BIT: i64 = 1 << 31;

/// The statements that create the registry of groups (`init` runs them too).
pub const REGISTRY: &str = "CREATE TABLE IF NOT EXISTS _pg2ch.consumer_groups (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group text NOT NULL,
    topic text NOT NULL,
    UNIQUE (consumer_group, topic))";

/// The settings of a lease session: a peer gone from the network is noticed
/// within seconds. (Its idle timeout is set once connected, by
/// `connect_session`: servers before 14 do not know it.)
pub const SESSION_SETTINGS: [(&str, &str); 3] =
    [("tcp_keepalives_idle", "2"), ("tcp_keepalives_interval", "1"), ("tcp_keepalives_count", "3")];

/// Opens a lease session that the server ends after [`LEASE_LIFE`] idle.
/// A server before PostgreSQL 14 has no `idle_session_timeout`: the session
/// then lives as long as its connection, so a paused (not exited) process
/// keeps its partitions until it resumes; said once, in a warning.
async fn connect_session(options: &PgConnectOptions) -> StoreResult<PgConnection> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let mut conn =
        options.connect().await.map_err(|e| StoreError::from(e).context("opening the consumer's lease session"))?;
    let set = sqlx::query("SELECT set_config('idle_session_timeout', $1, false)")
        .bind(LEASE_LIFE.as_millis().to_string())
        .execute(&mut conn)
        .await;
    match set {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42704") => WARNED.call_once(|| {
            tracing::warn!(
                "PostgreSQL before 14 has no idle_session_timeout: a consumer that is paused, not stopped, keeps \
                 its partitions until it resumes"
            )
        }),
        Err(e) => return Err(StoreError::from(e).context("setting the lease session's idle timeout")),
    }
    Ok(conn)
}

/// How this process names a lease session of `role` (`status` shows it).
pub fn session_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("pg2ch {role} {}:{}", host.trim(), std::process::id())
}

/// Whether the registry of consumer groups exists.
async fn registry_exists(conn: &mut PgConnection) -> anyhow::Result<bool> {
    sqlx::query_scalar("SELECT to_regclass('_pg2ch.consumer_groups') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .context("looking up _pg2ch.consumer_groups")
}

/// The number of a consumer group on a topic, if it was ever registered.
async fn registered(conn: &mut PgConnection, group: &str, topic: &str) -> anyhow::Result<Option<i32>> {
    if !registry_exists(conn).await? {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT id FROM _pg2ch.consumer_groups WHERE consumer_group = $1 AND topic = $2")
        .bind(group)
        .bind(topic)
        .fetch_optional(&mut *conn)
        .await
        .context("reading the consumer group's number")
}

/// Who holds the leases of a group on a topic now: each partition's holder
/// and the producers' lease holders of the table with oid `table`, by the
/// name of their session ([`session_name`]).
pub async fn holders(
    pool: &sqlx::PgPool,
    group: &str,
    topic: &str,
    table: u32,
) -> anyhow::Result<(std::collections::BTreeMap<i32, String>, Vec<String>)> {
    let mut conn = pool.acquire().await.context("PostgreSQL: a connection for reading the leases")?;
    let number = registered(&mut conn, group, topic).await?;
    let mut partitions = std::collections::BTreeMap::new();
    if let Some(number) = number {
        let rows: Vec<(i64, String)> = sqlx::query_as(&format!(
            "SELECT h.objid, coalesce(a.application_name, 'pid ' || h.pid) FROM ({}) h(objid, pid)
             LEFT JOIN pg_stat_activity a ON a.pid = h.pid",
            HELD_SQL
        ))
        .bind(i64::from(number))
        .fetch_all(&mut *conn)
        .await
        .context("reading who holds the partition leases")?;
        partitions.extend(rows.into_iter().filter(|(low, _)| *low < MEMBER_BIT).map(|(low, name)| (low as i32, name)));
    }
    let producers: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(a.application_name, 'pid ' || l.pid) FROM pg_locks l
         LEFT JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
           AND l.classid::bigint = $1 AND l.objid::bigint = $2
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY 1",
    )
    .bind(i64::from(super::PRODUCER_LOCK_CLASS))
    .bind(i64::from(table))
    .fetch_all(&mut *conn)
    .await
    .context("reading who holds the producer lease")?;
    Ok((partitions, producers))
}

/// The number of a consumer group on a topic, registering it if new (and
/// the registry too, where an `init` older than leases did not make it).
pub async fn group_number(conn: &mut PgConnection, group: &str, topic: &str) -> anyhow::Result<i64> {
    if let Some(id) = registered(conn, group, topic).await? {
        return Ok(i64::from(id));
    }
    // Created only where missing: a role with the grants `init --grant`
    // gives may not create, even with IF NOT EXISTS.
    if !registry_exists(conn).await? {
        sqlx::query(REGISTRY).execute(&mut *conn).await.context(
            "creating _pg2ch.consumer_groups (run `pg2ch init` as the owner of schema _pg2ch, or grant this user CREATE on it)",
        )?;
    }
    sqlx::query("INSERT INTO _pg2ch.consumer_groups (consumer_group, topic) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(group)
        .bind(topic)
        .execute(&mut *conn)
        .await
        .context("registering the consumer group")?;
    let id = registered(conn, group, topic).await?.context("the consumer group vanished as it was registered")?;
    Ok(i64::from(id))
}

/// The advisory locks of a group's leases that live sessions hold now, as
/// (low half of the key, holder's pid).
const HELD_SQL: &str = "SELECT objid::bigint, pid FROM pg_locks
    WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND classid::bigint = $1
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// Takes a lock if free. Advisory locks count how often a session took
/// them (one release would then not free a lock taken twice), so a lock is
/// asked for only when [`Session`] says this session does not hold it.
const TAKE_SQL: &str = "SELECT pg_try_advisory_lock($1)";

/// One consumer's lease session.
pub struct PgLeases {
    options: PgConnectOptions,
    timeout: Duration,
    group: i64,
    state: Arc<Mutex<Session>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

/// The lease session and what it holds: session-level locks last as long
/// as the session, so while this connection lives, what it took is held.
#[derive(Default)]
struct Session {
    conn: Option<PgConnection>,
    /// This member's slot while the session lives.
    slot: Option<i64>,
    /// The partitions whose locks this session took.
    held: BTreeSet<i32>,
}

impl Drop for PgLeases {
    fn drop(&mut self) {
        // The session closes with the last reference: the locks go with it.
        self.heartbeat.abort();
    }
}

impl PgLeases {
    /// Opens the lease session of a consumer of `group` on `topic`.
    /// `options` name this process (`application_name`), which `status` shows.
    pub async fn open(options: PgConnectOptions, timeout: Duration, group: &str, topic: &str) -> anyhow::Result<Self> {
        let mut conn =
            bounded(|| "opening the consumer's lease session".into(), timeout, connect_session(&options)).await?;
        let number =
            bounded(|| "registering the consumer group".into(), timeout, group_number(&mut conn, group, topic)).await?;
        let state = Arc::new(Mutex::new(Session { conn: Some(conn), ..Session::default() }));
        let heartbeat = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    let mut s = state.lock().await;
                    if let Some(conn) = s.conn.as_mut() {
                        let alive = tokio::time::timeout(timeout, conn.ping()).await;
                        if !matches!(alive, Ok(Ok(()))) {
                            *s = Session::default();
                        }
                    }
                }
            }
        });
        Ok(PgLeases { options, timeout, group: number << 32, state, heartbeat })
    }

    /// Runs `f` on the session, opening a new one if the last one ended
    /// (its locks, and its slot, are gone then). A failure ends the session.
    async fn on_session<T>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(&mut PgConnection, &mut Option<i64>, &mut BTreeSet<i32>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut s = self.state.lock().await;
        let Session { conn, slot, held } = &mut *s;
        let result = bounded_store(|| format!("PostgreSQL: {what}"), self.timeout, async {
            if conn.is_none() {
                *slot = None;
                held.clear();
                *conn = Some(connect_session(&self.options).await?);
            }
            f(conn.as_mut().expect("connected above"), slot, held).await
        })
        .await;
        if result.is_err() {
            // Dropping the connection ends the session and its locks: what
            // it held is then known (nothing), whatever the failed call did.
            *s = Session::default();
        }
        result
    }

    async fn locks(conn: &mut PgConnection, group: i64) -> StoreResult<Vec<i64>> {
        let rows: Vec<(i64, i32)> = sqlx::query_as(HELD_SQL).bind(group >> 32).fetch_all(&mut *conn).await?;
        Ok(rows.into_iter().map(|(low, _)| low).collect())
    }
}

impl Leases for PgLeases {
    async fn members(&mut self) -> StoreResult<Members> {
        let group = self.group;
        self.on_session("renewing the consumer's membership", async |conn, slot, _| {
            if slot.is_none() {
                // The lowest free slot; another process may take it first.
                let taken = Self::locks(conn, group).await?;
                for candidate in (0..).filter(|s| !taken.contains(&(MEMBER_BIT + s))).take(64) {
                    let got: bool = sqlx::query_scalar(TAKE_SQL)
                        .bind(group | (MEMBER_BIT + candidate))
                        .fetch_one(&mut *conn)
                        .await?;
                    if got {
                        *slot = Some(candidate);
                        break;
                    }
                }
            }
            let me =
                slot.ok_or_else(|| StoreError::transient("no free member slot among the first 64 past those taken"))?;
            let mut all: Vec<u32> = Self::locks(conn, group)
                .await?
                .into_iter()
                .filter(|low| *low >= MEMBER_BIT)
                .map(|low| (low - MEMBER_BIT) as u32)
                .collect();
            all.sort_unstable();
            all.dedup();
            Ok(Members { me: me as u32, all })
        })
        .await
    }

    async fn take(&mut self, p: i32) -> StoreResult<bool> {
        let key = self.group | i64::from(p);
        self.on_session("taking a partition lease", async |conn, _, held| {
            if held.contains(&p) {
                return Ok(true);
            }
            let got: bool = sqlx::query_scalar(TAKE_SQL).bind(key).fetch_one(&mut *conn).await?;
            if got {
                held.insert(p);
            }
            Ok(got)
        })
        .await
    }

    async fn release(&mut self, p: i32) -> StoreResult<()> {
        let key = self.group | i64::from(p);
        self.on_session("releasing a partition lease", async |conn, _, held| {
            sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut *conn).await?;
            held.remove(&p);
            Ok(())
        })
        .await
    }

    /// What the session took, if the session still lives (one round trip
    /// proves it): a session that ended (the process was paused past
    /// [`LEASE_LIFE`]) holds nothing, and neither does one that cannot be
    /// reached now.
    async fn held(&mut self) -> StoreResult<BTreeSet<i32>> {
        let mut s = self.state.lock().await;
        let Some(conn) = s.conn.as_mut() else { return Ok(BTreeSet::new()) };
        let alive = bounded_store(|| "PostgreSQL: checking the consumer's lease session".into(), self.timeout, async {
            Ok(conn.ping().await?)
        })
        .await;
        match alive {
            Ok(()) => Ok(s.held.clone()),
            Err(e) => {
                if !s.held.is_empty() {
                    tracing::warn!("{e:#}: this consumer's partition leases are lost");
                }
                *s = Session::default();
                Ok(BTreeSet::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_heartbeats_may_be_late_before_the_lease_dies() {
        assert!(HEARTBEAT * 3 < LEASE_LIFE);
    }
}
