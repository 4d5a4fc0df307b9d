//! Connection settings for the three systems, secrets that never print, and
//! the checks on names that come from configuration.
//!
//! Values come from flags, then environment variables, then a `.env` file in
//! the working directory (see `cli.rs`); this module only holds and checks them.

use std::fmt;
use std::time::Duration;

use crate::error::StoreError;

/// A password. Its `Debug` and `Display` never show the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for handing to a driver. Never log what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(empty)" } else { "Secret(***)" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// A configuration value that cannot be used; the message names it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {value:?}: {why}")]
pub struct ConfigError {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

/// Checks a database or table name that will be written into SQL text.
/// Only plain identifiers pass, so quoting can never be escaped.
pub fn identifier(what: &'static str, value: &str) -> Result<String, ConfigError> {
    let mut chars = value.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok_first && ok_rest && value.len() <= 63 {
        Ok(value.to_owned())
    } else {
        Err(ConfigError {
            what,
            value: value.to_owned(),
            why: "use 1 to 63 letters, digits or underscores, not starting with a digit",
        })
    }
}

/// An identifier quoted for PostgreSQL: in double quotes, any inside doubled.
pub fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An identifier quoted for ClickHouse: in backquotes, with backslashes and
/// backquotes escaped. Names holding control characters are refused before
/// they get here ([`crate::schema::TableSchema::check_names`]).
pub fn ch_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// Checks a Kafka topic name (the broker's own rule).
pub fn topic_name(value: &str) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 249
        && value != "."
        && value != ".."
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(ConfigError {
            what: "Kafka topic",
            value: value.to_owned(),
            why: "use 1 to 249 letters, digits, '.', '_' or '-'",
        })
    }
}

#[derive(Debug, Clone)]
pub struct PgConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub database: String,
}

impl PgConfig {
    pub fn describe(&self) -> String {
        format!("PostgreSQL at {}:{} (database {:?}, user {:?})", self.host, self.port, self.database, self.user)
    }
}

#[derive(Debug, Clone)]
pub struct ChConfig {
    pub host: String,
    /// The HTTP port.
    pub port: u16,
    pub user: String,
    pub password: Secret,
    /// Validated with [`identifier`].
    pub database: String,
    /// The cluster whose replicas hold pg2ch's tables (`CH_CLUSTER`):
    /// tables are created `ON CLUSTER`, replicated, and inserts wait for
    /// every replica of the shard. Validated with [`identifier`].
    pub cluster: Option<String>,
    /// Each replica's HTTP address (`host:port`): for `verify
    /// --each-replica`, and on a cluster of several shards, where each
    /// shard's rows are written.
    pub replicas: Vec<String>,
}

impl ChConfig {
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
    pub fn describe(&self) -> String {
        format!("ClickHouse at {} (database {:?}, user {:?})", self.url(), self.database, self.user)
    }

    /// The same settings at one server alone: `addr` is a `host:port` HTTP
    /// address as `CH_REPLICAS` lists them.
    pub fn at(&self, addr: &str) -> anyhow::Result<ChConfig> {
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("CH_REPLICAS entry {addr:?} is not host:port"))?;
        Ok(ChConfig { host, port, cluster: None, ..self.clone() })
    }
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub bootstrap: Vec<String>,
    /// Validated with [`topic_name`].
    pub topic: String,
    /// Names this consumer's positions; another group reads everything again.
    pub group: String,
    /// How to authenticate to the brokers; `None`: no authentication.
    pub sasl: Option<KafkaSasl>,
}

/// SASL credentials for the brokers.
#[derive(Debug, Clone)]
pub struct KafkaSasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

/// The SASL mechanisms pg2ch speaks to a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// `PLAIN`: the password crosses the network as it is (use it behind TLS
    /// or on a private network only).
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl std::str::FromStr for SaslMechanism {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "PLAIN" => Ok(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Ok(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(SaslMechanism::ScramSha512),
            _ => Err(format!("unknown SASL mechanism {s:?} (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")),
        }
    }
}

impl KafkaConfig {
    pub fn describe(&self) -> String {
        format!("Kafka broker {} (topic {:?})", self.bootstrap.join(","), self.topic)
    }
}

/// How long any single call to an outside system may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub call: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { call: Duration::from_secs(30) }
    }
}

/// Runs `fut`, failing with a message naming `what` if it takes longer than `limit`.
/// Every call to an outside system goes through this or [`bounded_store`]:
/// none of the drivers bounds all of its own calls. The call may have acted
/// before we stopped waiting for it: a timeout is an
/// [`ErrorKind::Unknown`](crate::error::ErrorKind) outcome.
pub async fn bounded<T, E: From<StoreError>>(
    what: impl FnOnce() -> String,
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    within(what, limit, fut).await
}

/// [`bounded`], for calls that fail with a [`StoreError`] (a driver's error
/// converts into one with `?`, classified).
pub async fn bounded_store<T>(
    what: impl FnOnce() -> String,
    limit: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    within(what, limit, fut).await
}

async fn within<T, E: From<StoreError>>(
    what: impl FnOnce() -> String,
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::unknown(format!("{} timed out after {:?} (outcome unknown)", what(), limit)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        let cfg = ChConfig {
            host: "h".into(),
            port: 1,
            user: "u".into(),
            password: s,
            database: "d".into(),
            cluster: None,
            replicas: vec![],
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn a_call_cut_by_its_timeout_has_an_unknown_outcome() {
        use crate::error::{ErrorKind, kind};
        let cut: anyhow::Error = bounded(|| "a slow call".into(), Duration::from_millis(1), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        })
        .await
        .unwrap_err();
        assert_eq!(kind(&cut), ErrorKind::Unknown, "{cut:#}");
        assert!(cut.to_string().contains("a slow call timed out"), "{cut:#}");
        let refused = bounded_store(|| "a refused call".into(), Duration::from_secs(1), async {
            Err::<(), _>(StoreError::transient("connection refused"))
        })
        .await
        .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Transient);
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(identifier("db", "analytics_2").is_ok());
        for bad in ["", "1abc", "a-b", "a;DROP", "a b", "`x`"] {
            let e = identifier("ClickHouse database", bad).unwrap_err();
            assert!(e.to_string().contains("ClickHouse database"), "{e}");
        }
        assert!(topic_name("user_events.v1-x").is_ok());
        assert!(topic_name("bad topic").is_err());
        assert_eq!(pg_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(ch_ident("a`b\\c"), "`a\\`b\\\\c`");
    }
}
