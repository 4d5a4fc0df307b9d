//! Kafka (Redpanda, nisshi, ...) through `rskafka`: the topic and the
//! [`EventLog`] adapter.
//!
//! rskafka retries without a deadline and has no request timeout of its own,
//! so every call here is bounded by [`bounded`] and the client's backoff is
//! given a deadline. There is no consumer-group protocol: the consumer's
//! partitions come from configuration and its positions live in ClickHouse.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rskafka::BackoffConfig;
use rskafka::client::partition::{PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;

use crate::change::MAX_MESSAGE_BYTES;
use crate::config::{KafkaConfig, KafkaSasl, SaslMechanism, bounded, bounded_store};
use crate::error::{ErrorKind, StoreError, StoreResult};
use crate::stores::{DeadLetter, EventLog, Fetched, FetchedRecord, LogRecord};

/// How produce requests are compressed. Fetches decode every codec whatever
/// this says, so producers may change it at any time.
pub use rskafka::client::partition::Compression;

/// The dead-letter topic of `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Most bytes of record data in one produce request. Kafka's default
/// `max.message.bytes` is 1 MiB; staying well under it needs no broker tuning.
/// A request is closed *before* a record would take it over this, so a
/// request only exceeds it when it holds a single record, and those are
/// bounded by [`crate::pipeline::MAX_MESSAGE_BYTES`] (rows) or by the broker's
/// own limit (dead letters, which were records of this size already).
const MAX_REQUEST_BYTES: usize = 512 * 1024;

/// Splits records into produce requests of at most [`MAX_REQUEST_BYTES`]
/// (`size` says what one record costs), keeping their order.
fn requests<T>(records: impl IntoIterator<Item = T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for r in records {
        let n = size(&r);
        match out.last_mut() {
            Some(open) if bytes + n <= MAX_REQUEST_BYTES => open.push(r),
            _ => {
                out.push(vec![r]);
                bytes = 0;
            }
        }
        bytes += n;
    }
    out
}

/// Longest a read of one known record waits for the broker's answer.
const RECORD_AT_WAIT: Duration = Duration::from_millis(500);

/// Overhead of one record in a batch besides key and value (varints,
/// attributes, header count), rounded up.
const RECORD_OVERHEAD: usize = 24;

/// A driver error's kind: what retrying cannot fix is permanent, with its
/// cause in plain words; anything else is `otherwise` (a produce that failed
/// may have been appended, a fetch has no effect).
fn classify(
    e: rskafka::client::error::Error,
    topic: &str,
    partition: i32,
    offset: Option<i64>,
    otherwise: ErrorKind,
) -> StoreError {
    use rskafka::client::error::{Error, ProtocolError};
    match &e {
        Error::ServerError { protocol_error: ProtocolError::OffsetOutOfRange, .. } => StoreError::permanent(format!(
            "offset {} is outside partition {partition} of Kafka topic {topic:?} (OffsetOutOfRange): the \
             topic was deleted and created again, the broker lost its data, or retention removed records \
             not yet read (use another KAFKA_GROUP or topic, see docs/failure-modes.md)",
            offset.unwrap_or(-1)
        )),
        Error::ServerError { protocol_error: ProtocolError::UnknownTopicOrPartition, .. } => StoreError::permanent(
            format!("Kafka topic {topic:?} (partition {partition}) does not exist (run `pg2ch init`)"),
        ),
        Error::ServerError {
            protocol_error: ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge,
            ..
        } => StoreError::permanent(format!("the broker refused a request to {topic:?} as too large: {e}")),
        _ => StoreError::new(otherwise, e),
    }
}

/// rskafka's form of the credentials. Its `Debug` shows the password: it
/// is made here, handed to the client builder and never kept or logged.
fn sasl_config(sasl: &KafkaSasl) -> rskafka::client::SaslConfig {
    use rskafka::client::{Credentials, SaslConfig};
    let credentials = Credentials::new(sasl.username.clone(), sasl.password.expose().to_owned());
    match sasl.mechanism {
        SaslMechanism::Plain => SaslConfig::Plain(credentials),
        SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(credentials),
        SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(credentials),
    }
}

/// Connects to the bootstrap brokers (with SASL when configured).
pub async fn connect(cfg: &KafkaConfig, timeout: Duration) -> anyhow::Result<Client> {
    let backoff = BackoffConfig { deadline: Some(timeout), ..BackoffConfig::default() };
    bounded(|| format!("connecting to {}", cfg.describe()), timeout, async {
        let mut builder = ClientBuilder::new(cfg.bootstrap.clone()).backoff_config(backoff);
        if let Some(sasl) = &cfg.sasl {
            builder = builder.sasl_config(sasl_config(sasl));
        }
        builder.build().await.map_err(anyhow::Error::from)
    })
    .await
    .with_context(|| format!("cannot reach {}", cfg.describe()))
}

/// The topic's partition count, or `None` when the topic does not exist.
pub async fn partition_count(client: &Client, topic: &str, timeout: Duration) -> anyhow::Result<Option<i32>> {
    let topics = bounded(|| "listing Kafka topics".into(), timeout, async {
        client.list_topics().await.map_err(anyhow::Error::from)
    })
    .await?;
    Ok(topics.into_iter().find(|t| t.name == topic).map(|t| t.partitions.len() as i32))
}

/// Whether the topic exists with `partitions` partitions (`false`: it does
/// not exist). Fails if it exists with another count.
pub async fn topic_matches(client: &Client, topic: &str, partitions: i32, timeout: Duration) -> anyhow::Result<bool> {
    match partition_count(client, topic, timeout).await? {
        Some(n) if n == partitions => Ok(true),
        Some(n) => anyhow::bail!(
            "Kafka topic {topic:?} exists with {n} partitions, not the {partitions} asked for (pass --partitions {n})"
        ),
        None => Ok(false),
    }
}

/// How many copies of each record `init` asks for when it is not told: three
/// (two may be lost), or every broker of a smaller cluster.
pub const DEFAULT_REPLICATION: i16 = 3;

/// The replication factor `init` creates topics with: `asked`, or
/// [`DEFAULT_REPLICATION`] capped by the cluster's broker count. Fails when
/// `asked` exceeds the brokers there are.
pub async fn replication_factor(client: &Client, asked: Option<i16>, timeout: Duration) -> anyhow::Result<i16> {
    let brokers = describe(client, timeout).await?.brokers;
    choose_replication(asked, brokers)
}

fn choose_replication(asked: Option<i16>, brokers: usize) -> anyhow::Result<i16> {
    let brokers = i16::try_from(brokers).unwrap_or(i16::MAX).max(1);
    match asked {
        None => Ok(DEFAULT_REPLICATION.min(brokers)),
        Some(n) if n <= brokers => Ok(n),
        Some(n) => anyhow::bail!("--replication-factor {n} needs {n} Kafka brokers; the cluster has {brokers}"),
    }
}

/// The topic configurations `init` creates topics with. A position is only
/// safe when the records behind it survive a broker: pg2ch always produces
/// with `acks=all`, and with two or more replicas a record counts as
/// written only once two of them hold it (`min.insync.replicas=2`), so a
/// record PostgreSQL flags sent is never on one disk alone.
pub fn topic_configs(replication: i16) -> &'static [(&'static str, &'static str)] {
    if replication >= 2 { &[("min.insync.replicas", "2")] } else { &[] }
}

/// How a topic's partitions are copied across the cluster's brokers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Replication {
    /// Brokers in the cluster.
    pub brokers: usize,
    /// The fewest replicas any partition of the topic has.
    pub replicas: usize,
    /// Partitions with fewer in-sync replicas than replicas.
    pub under_replicated: Vec<i32>,
    /// The topic's `min.insync.replicas`, when the broker tells it.
    pub min_insync: Option<usize>,
}

impl Replication {
    fn of(brokers: usize, topic: &rskafka::topic::TopicReplicas, min_insync: Option<usize>) -> Self {
        Replication {
            brokers,
            min_insync,
            replicas: topic.partitions.iter().map(|p| p.replicas.len()).min().unwrap_or(0),
            under_replicated: topic
                .partitions
                .iter()
                .filter(|p| p.in_sync.len() < p.replicas.len())
                .map(|p| p.partition)
                .collect(),
        }
    }

    /// Why a position on this topic is not safe, if it is not: several
    /// replicas, but a record counts as written (`acks=all`) once one of
    /// them holds it.
    pub fn unsafe_insync(&self, topic: &str) -> Option<String> {
        match self.min_insync {
            Some(min) if self.replicas >= 2 && min < 2 => Some(format!(
                "Kafka topic {topic:?} has {} replicas but min.insync.replicas={min}: a record counts as written once one \
                 broker holds it, so a record PostgreSQL flags sent may be on one disk alone (set min.insync.replicas=2 \
                 on the topic)",
                self.replicas
            )),
            _ => None,
        }
    }

    /// What puts records PostgreSQL already flags sent at risk, if anything.
    pub fn warning(&self, topic: &str) -> Option<String> {
        let wanted = usize::try_from(DEFAULT_REPLICATION).unwrap_or(3).min(self.brokers);
        if let Some(unsafe_insync) = self.unsafe_insync(topic) {
            Some(unsafe_insync)
        } else if !self.under_replicated.is_empty() {
            Some(format!(
                "partitions {:?} of Kafka topic {topic:?} have fewer in-sync replicas than replicas: a broker is down or behind",
                self.under_replicated
            ))
        } else if self.replicas < wanted {
            Some(format!(
                "Kafka topic {topic:?} keeps {} cop{} of each record on a cluster of {} brokers: losing one disk loses records PostgreSQL already flags sent (reassign its partitions to {wanted} replicas)",
                self.replicas,
                if self.replicas == 1 { "y" } else { "ies" },
                self.brokers
            ))
        } else {
            None
        }
    }
}

/// The topic's replication, or `None` when the topic does not exist.
pub async fn replication(client: &Client, topic: &str, timeout: Duration) -> anyhow::Result<Option<Replication>> {
    let cluster = describe(client, timeout).await?;
    let Some(described) = cluster.topics.iter().find(|t| t.name == topic) else { return Ok(None) };
    Ok(Some(Replication::of(cluster.brokers, described, min_insync(client, topic, timeout).await)))
}

/// The topic's `min.insync.replicas`, or `None` when the broker does not
/// say (it may not know DescribeConfigs; that is logged, not an error).
async fn min_insync(client: &Client, topic: &str, timeout: Duration) -> Option<usize> {
    const KEY: &str = "min.insync.replicas";
    let configs = bounded(|| format!("reading Kafka topic {topic:?}'s {KEY}"), timeout, async {
        client.controller_client()?.describe_topic_configs(topic, &[KEY]).await.map_err(anyhow::Error::from)
    })
    .await;
    match configs {
        Ok(configs) => configs.into_iter().find(|(name, _)| name == KEY).and_then(|(_, value)| value?.parse().ok()),
        Err(e) => {
            tracing::debug!("{e:#}");
            None
        }
    }
}

async fn describe(client: &Client, timeout: Duration) -> anyhow::Result<rskafka::topic::ClusterReplicas> {
    bounded(|| "reading the Kafka cluster's metadata".into(), timeout, async {
        client.describe_replicas().await.map_err(anyhow::Error::from)
    })
    .await
}

/// Creates the topic with `partitions` partitions and `replication`
/// replicas (and [`topic_configs`]) if it does not exist, and waits until
/// the broker lists it. Fails if it exists with another partition count,
/// or with several replicas and `min.insync.replicas` below 2; warns if it
/// exists with fewer replicas than the cluster allows.
pub async fn ensure_topic(
    client: &Client,
    topic: &str,
    partitions: i32,
    replication: i16,
    timeout: Duration,
) -> anyhow::Result<()> {
    if topic_matches(client, topic, partitions, timeout).await? {
        if let Some(r) = self::replication(client, topic, timeout).await? {
            if let Some(refusal) = r.unsafe_insync(topic) {
                anyhow::bail!("{refusal}");
            }
            if let Some(warning) = r.warning(topic) {
                tracing::warn!("{warning}");
            }
        }
        return Ok(());
    }
    let controller = client.controller_client()?;
    let created = bounded(|| format!("creating Kafka topic {topic:?}"), timeout, async {
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        controller
            .create_topic_with_configs(topic, partitions, replication, topic_configs(replication), timeout_ms)
            .await
            .map_err(anyhow::Error::from)
    })
    .await;
    if let Err(e) = created {
        // Another `init` may have created it meanwhile; the check below decides.
        tracing::debug!("create_topic: {e:#}");
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match partition_count(client, topic, timeout).await? {
            Some(n) if n == partitions => return Ok(()),
            Some(n) => anyhow::bail!("Kafka topic {topic:?} has {n} partitions, not {partitions}"),
            None if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("Kafka topic {topic:?} did not appear within {timeout:?}")
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Most bytes a fetch asks for per partition unless told otherwise.
pub const DEFAULT_FETCH_MAX_BYTES: i32 = 4 * 1024 * 1024;

/// The topic, one rskafka partition client per partition, and its dead-letter topic.
pub struct KafkaLog {
    topic: String,
    partitions: Vec<PartitionClient>,
    /// Partition 0 of `<topic>.dlq`, if that topic exists.
    dead_letters: Option<PartitionClient>,
    timeout: Duration,
    fetch_max_bytes: i32,
    compression: Compression,
}

impl KafkaLog {
    /// Opens every partition of an existing topic.
    pub async fn open(client: &Client, topic: &str, timeout: Duration) -> anyhow::Result<Self> {
        let count = partition_count(client, topic, timeout)
            .await?
            .with_context(|| format!("Kafka topic {topic:?} does not exist (run `pg2ch init`)"))?;
        let mut partitions = Vec::with_capacity(count as usize);
        for p in 0..count {
            let pc = bounded(|| format!("opening partition {p} of {topic:?}"), timeout, async {
                client.partition_client(topic, p, UnknownTopicHandling::Error).await.map_err(anyhow::Error::from)
            })
            .await?;
            partitions.push(pc);
        }
        let dlq = dead_letter_topic(topic);
        let dead_letters = match partition_count(client, &dlq, timeout).await? {
            Some(_) => Some(
                bounded(|| format!("opening {dlq:?}"), timeout, async {
                    client
                        .partition_client(dlq.as_str(), 0, UnknownTopicHandling::Error)
                        .await
                        .map_err(anyhow::Error::from)
                })
                .await?,
            ),
            None => None,
        };
        Ok(KafkaLog {
            topic: topic.to_owned(),
            partitions,
            dead_letters,
            timeout,
            fetch_max_bytes: DEFAULT_FETCH_MAX_BYTES,
            compression: Compression::NoCompression,
        })
    }

    /// Most bytes one fetch asks for per partition (the broker still returns
    /// at least one whole batch). Bounds the consumer's memory.
    pub fn with_fetch_max_bytes(mut self, bytes: i32) -> Self {
        self.fetch_max_bytes = bytes.max(1);
        self
    }

    /// Compresses produce requests with this codec (none by default).
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Records in the dead-letter topic (0 if it does not exist).
    pub async fn dead_letter_count(&self) -> anyhow::Result<i64> {
        let Some(client) = &self.dead_letters else { return Ok(0) };
        let (_, high_watermark) = bounded(|| "fetching the dead-letter topic".into(), self.timeout, async {
            client.fetch_records(0, 1..1024, 1).await.map_err(anyhow::Error::from)
        })
        .await?;
        Ok(high_watermark)
    }

    fn client(&self, partition: i32) -> StoreResult<&PartitionClient> {
        self.partitions
            .get(partition as usize)
            .ok_or_else(|| StoreError::permanent(format!("Kafka topic {:?} has no partition {partition}", self.topic)))
    }
}

impl EventLog for KafkaLog {
    fn partitions(&self) -> i32 {
        self.partitions.len() as i32
    }

    async fn append(&self, partition: i32, records: Vec<LogRecord>) -> StoreResult<()> {
        let client = self.client(partition)?;
        let now = chrono::Utc::now();
        let records = records.into_iter().map(|r| Record {
            key: Some(r.key),
            value: Some(r.value),
            headers: BTreeMap::new(),
            timestamp: now,
        });
        self.produce(client, &self.topic, partition, records, self.compression).await
    }

    async fn fetch(&self, partition: i32, offset: i64, max_wait: Duration) -> StoreResult<Fetched> {
        let (records, high_watermark) = self.fetch_raw(partition, offset, 1..self.fetch_max_bytes, max_wait).await?;
        Ok(Fetched { records, high_watermark })
    }

    async fn record_at(&self, partition: i32, offset: i64) -> StoreResult<Option<FetchedRecord>> {
        // The broker still sends the whole batch holding `offset`. The wait
        // costs nothing when the record is there (the answer comes at once);
        // with a near-zero one, nisshi sometimes answers empty under load.
        let (records, _) = self.fetch_raw(partition, offset, 1..2, RECORD_AT_WAIT).await?;
        Ok(records.into_iter().find(|r| r.offset == offset))
    }

    async fn dead_letter(&self, letters: Vec<DeadLetter>) -> StoreResult<()> {
        let dlq = dead_letter_topic(&self.topic);
        let client = self
            .dead_letters
            .as_ref()
            .ok_or_else(|| StoreError::permanent(format!("Kafka topic {dlq:?} does not exist (run `pg2ch init`)")))?;
        let now = chrono::Utc::now();
        let records = letters.into_iter().map(|d| letter_record(d, &self.topic, now));
        // In bounded requests: a fetch of poison can hold megabytes. lz4
        // whatever the producers' codec: letters are rare, and a foreign
        // record can be far bigger than its compressed batch was.
        self.produce(client, &dlq, 0, records, Compression::Lz4).await
    }
}

/// A dead letter as a record: its key and value as they came, with headers
/// naming why and where from. A letter over [`MAX_MESSAGE_BYTES`] (a
/// foreign record can be much bigger uncompressed than its compressed batch
/// was, and a broker refuses it for ever) is cut to fit, value first, and
/// says so in `pg2ch-truncated` with its original sizes.
fn letter_record(d: DeadLetter, topic: &str, now: chrono::DateTime<chrono::Utc>) -> Record {
    let mut headers = BTreeMap::from([
        ("pg2ch-reason".to_owned(), d.reason.into_bytes()),
        ("pg2ch-source-topic".to_owned(), topic.as_bytes().to_vec()),
        ("pg2ch-source-partition".to_owned(), d.partition.to_string().into_bytes()),
        ("pg2ch-source-offset".to_owned(), d.offset.to_string().into_bytes()),
    ]);
    let (mut key, mut value) = (d.key, d.value);
    let len = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
    // Room for the headers, the truncation header included.
    let room = MAX_MESSAGE_BYTES.saturating_sub(headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + 128);
    if len(&key) + len(&value) > room {
        let note = format!("key {} bytes, value {} bytes", len(&key), len(&value));
        if let Some(k) = key.as_mut() {
            k.truncate(room);
        }
        let left = room - len(&key);
        if let Some(v) = value.as_mut() {
            v.truncate(left);
        }
        headers.insert("pg2ch-truncated".to_owned(), note.into_bytes());
    }
    Record { key, value, headers, timestamp: now }
}

/// What a record costs in a produce request, near enough to bound it.
fn record_size(r: &Record) -> usize {
    let headers: usize = r.headers.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
    r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len) + headers + RECORD_OVERHEAD
}

impl KafkaLog {
    /// Produces `records` to one partition of `topic` in order, in requests
    /// of at most [`MAX_REQUEST_BYTES`], each bounded in time.
    async fn produce(
        &self,
        client: &PartitionClient,
        topic: &str,
        partition: i32,
        records: impl IntoIterator<Item = Record>,
        compression: Compression,
    ) -> StoreResult<()> {
        for batch in requests(records, record_size) {
            bounded_store(|| format!("producing to partition {partition} of {topic:?}"), self.timeout, async {
                client
                    .produce(batch, compression)
                    .await
                    .map_err(|e| classify(e, topic, partition, None, ErrorKind::Unknown))
            })
            .await?;
        }
        Ok(())
    }

    /// One fetch, bounded in time, its errors classified.
    async fn fetch_raw(
        &self,
        partition: i32,
        offset: i64,
        bytes: std::ops::Range<i32>,
        max_wait: Duration,
    ) -> StoreResult<(Vec<FetchedRecord>, i64)> {
        let client = self.client(partition)?;
        let wait_ms = i32::try_from(max_wait.as_millis()).unwrap_or(i32::MAX);
        let (records, high_watermark) = bounded_store(
            || format!("fetching partition {partition} at offset {offset}"),
            self.timeout + max_wait,
            async {
                client
                    .fetch_records(offset, bytes, wait_ms)
                    .await
                    .map_err(|e| classify(e, &self.topic, partition, Some(offset), ErrorKind::Transient))
            },
        )
        .await?;
        let records = records
            .into_iter()
            .map(|r| FetchedRecord {
                offset: r.offset,
                key: r.record.key,
                value: r.record.value,
                timestamp_ms: r.record.timestamp.timestamp_millis(),
            })
            .collect();
        Ok((records, high_watermark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_close_before_a_record_would_overflow_them() {
        let sizes = [100, MAX_REQUEST_BYTES - 100, 1, 900_000, 10, MAX_REQUEST_BYTES, 0];
        let split = requests(sizes, |n| *n);
        assert_eq!(split.concat(), sizes, "order and content kept");
        for r in &split {
            let total: usize = r.iter().sum();
            assert!(total <= MAX_REQUEST_BYTES || r.len() == 1, "{r:?} is over the limit with several records");
        }
        assert_eq!(split.len(), 5, "{split:?}");
        assert!(requests(Vec::<usize>::new(), |n| *n).is_empty());
    }

    #[test]
    fn replication_defaults_to_three_capped_by_brokers_and_refuses_more_than_there_are() {
        assert_eq!(choose_replication(None, 1).unwrap(), 1);
        assert_eq!(choose_replication(None, 2).unwrap(), 2);
        assert_eq!(choose_replication(None, 5).unwrap(), 3);
        assert_eq!(choose_replication(None, 0).unwrap(), 1, "a metadata answer without brokers");
        assert_eq!(choose_replication(Some(5), 5).unwrap(), 5);
        let e = choose_replication(Some(2), 1).unwrap_err().to_string();
        assert!(e.contains("--replication-factor 2") && e.contains("has 1"), "{e}");
        assert!(topic_configs(1).is_empty());
        assert_eq!(topic_configs(3), &[("min.insync.replicas", "2")]);
    }

    #[test]
    fn replication_names_under_replicated_partitions_and_single_copies() {
        use rskafka::topic::{PartitionReplicas, TopicReplicas};
        let partition = |partition, replicas: &[i32], in_sync: &[i32]| PartitionReplicas {
            partition,
            leader: replicas[0],
            replicas: replicas.to_vec(),
            in_sync: in_sync.to_vec(),
        };
        let topic = |partitions| TopicReplicas { name: "t".into(), partitions };
        let healthy = Replication::of(3, &topic(vec![partition(0, &[1, 2, 3], &[1, 2, 3])]), Some(2));
        assert_eq!(healthy.replicas, 3);
        assert_eq!(healthy.warning("t"), None);
        let behind = Replication::of(
            3,
            &topic(vec![partition(0, &[1, 2, 3], &[1, 2, 3]), partition(1, &[2, 3, 1], &[2])]),
            None,
        );
        assert_eq!(behind.under_replicated, vec![1]);
        assert!(behind.warning("t").unwrap().contains("[1]"));
        let single = Replication::of(3, &topic(vec![partition(0, &[1], &[1])]), Some(1));
        assert!(single.warning("t").unwrap().contains("1 copy"), "{:?}", single.warning("t"));
        assert_eq!(single.unsafe_insync("t"), None, "one replica: min.insync.replicas=1 is all there can be");
        assert_eq!(Replication::of(1, &topic(vec![partition(0, &[1], &[1])]), Some(1)).warning("t"), None);
        // Several replicas, but a record is acknowledged with one copy.
        let one_copy_acks = Replication::of(3, &topic(vec![partition(0, &[1, 2, 3], &[1, 2, 3])]), Some(1));
        let refusal = one_copy_acks.unsafe_insync("t").unwrap();
        assert!(refusal.contains("min.insync.replicas=1") && refusal.contains("3 replicas"), "{refusal}");
        assert_eq!(one_copy_acks.warning("t"), Some(refusal));
        assert_eq!(Replication::of(3, &topic(vec![partition(0, &[1, 2], &[1, 2])]), None).unsafe_insync("t"), None);
    }

    proptest::proptest! {
        #![proptest_config(crate::types::strategies::config(64))]
        /// Whatever its size, a dead letter fits a broker's default limit,
        /// keeps what fits unchanged, and says when it was cut.
        #[test]
        fn a_dead_letter_fits_the_broker_and_says_when_it_was_cut(
            key_len in proptest::option::of(0usize..1_200_000),
            value_len in proptest::option::of(0usize..3_000_000),
            reason in ".{0,300}",
        ) {
            let key = key_len.map(|n| vec![b'k'; n]);
            let value = value_len.map(|n| vec![b'v'; n]);
            let letter = DeadLetter { partition: 3, offset: 42, key: key.clone(), value: value.clone(), reason };
            let r = letter_record(letter, "t", chrono::Utc::now());
            proptest::prop_assert!(record_size(&r) <= MAX_MESSAGE_BYTES + RECORD_OVERHEAD, "{} bytes", record_size(&r));
            let cut = r.headers.get("pg2ch-truncated");
            let whole = r.key == key && r.value == value;
            proptest::prop_assert_eq!(cut.is_none(), whole);
            proptest::prop_assert_eq!(r.key.is_some(), key.is_some());
            proptest::prop_assert_eq!(r.value.is_some(), value.is_some());
            if let Some(note) = cut {
                let note = String::from_utf8(note.clone()).unwrap();
                proptest::prop_assert_eq!(note, format!("key {} bytes, value {} bytes", key_len.unwrap_or(0), value_len.unwrap_or(0)));
            }
            proptest::prop_assert_eq!(&r.headers["pg2ch-source-offset"], b"42");
        }
    }
}
