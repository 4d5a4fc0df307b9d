//! Services from Docker containers (testcontainers), used when a Docker
//! engine answers and no endpoints are given in the environment.
//!
//! The images are the registry ones by default (PostgreSQL 15, ClickHouse
//! 24.8, Redpanda); `PG2CH_TEST_IMAGE_POSTGRES`, `PG2CH_TEST_IMAGE_CLICKHOUSE`
//! and `PG2CH_TEST_IMAGE_BROKER` name others, as `scripts/podman.sh env` does
//! for the images it builds locally where no registry is reachable (its
//! broker image is nisshi, which takes its own command line).

use std::time::Duration;

use pg2ch::commands::Settings;
use pg2ch::config::{ChConfig, KafkaConfig, PgConfig, Secret, Timeouts};
use pg2ch::stack::wait_until;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// Whether a Docker API answers: `DOCKER_HOST`'s unix socket (podman's
/// service, say) or, without it, `docker info` (the client alone is not enough).
pub fn docker_answers() -> bool {
    if let Some(path) = std::env::var("DOCKER_HOST").ok().and_then(|h| h.strip_prefix("unix://").map(str::to_owned)) {
        use std::io::{Read, Write};
        let Ok(mut socket) = std::os::unix::net::UnixStream::connect(&path) else { return false };
        let _ = socket.set_read_timeout(Some(Duration::from_secs(3)));
        let mut answer = String::new();
        return socket.write_all(b"GET /_ping HTTP/1.0\r\n\r\n").is_ok()
            && socket.read_to_string(&mut answer).is_ok()
            && answer.contains("OK");
    }
    std::process::Command::new("docker")
        .arg("info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `name:tag` from the environment variable, else the default.
fn image(var: &str, default: &str) -> GenericImage {
    let reference = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    let (name, tag) = reference.rsplit_once(':').unwrap_or((reference.as_str(), "latest"));
    GenericImage::new(name, tag)
}

/// The running containers; kept for the life of the test process (the
/// testcontainers reaper removes them afterwards).
pub struct Containers {
    _postgres: ContainerAsync<GenericImage>,
    _clickhouse: ContainerAsync<GenericImage>,
    _redpanda: ContainerAsync<GenericImage>,
}

pub async fn start() -> anyhow::Result<(Containers, Settings)> {
    // Host ports are chosen here and mapped explicitly: podman's Docker API
    // reports published ports without a host address, which testcontainers
    // does not count as IPv4, and the broker must advertise its port anyway.
    let (pg_port, ch_port, kafka_port) = (super::free_port(), super::free_port(), super::free_port());
    let postgres = image("PG2CH_TEST_IMAGE_POSTGRES", "postgres:15")
        .with_wait_for(WaitFor::Nothing)
        .with_mapped_port(pg_port, 5432.tcp())
        .with_env_var("POSTGRES_USER", "pg2ch")
        .with_env_var("POSTGRES_PASSWORD", "pg2ch")
        .with_env_var("POSTGRES_DB", "pg2ch")
        .start()
        .await?;
    let clickhouse = image("PG2CH_TEST_IMAGE_CLICKHOUSE", "clickhouse/clickhouse-server:24.8")
        .with_wait_for(WaitFor::Nothing)
        .with_mapped_port(ch_port, 8123.tcp())
        .with_env_var("CLICKHOUSE_USER", "pg2ch")
        .with_env_var("CLICKHOUSE_PASSWORD", "pg2ch")
        .with_env_var("CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT", "1")
        .start()
        .await?;
    let broker = std::env::var("PG2CH_TEST_IMAGE_BROKER")
        .unwrap_or_else(|_| "docker.redpanda.com/redpandadata/redpanda:v24.2.7".into());
    let advertised = format!("127.0.0.1:{kafka_port}");
    let command: Vec<String> = if broker.contains("nisshi") {
        ["broker", "--listener-url", "tcp://0.0.0.0:9092", "--storage-engine", "memory://nisshi/"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--advertised-listener-url".into(), format!("tcp://{advertised}")])
            .collect()
    } else {
        ["redpanda", "start", "--mode", "dev-container", "--smp", "1", "--kafka-addr", "0.0.0.0:9092"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--advertise-kafka-addr".into(), advertised])
            .collect()
    };
    let redpanda = image("PG2CH_TEST_IMAGE_BROKER", &broker)
        .with_wait_for(WaitFor::Nothing)
        .with_mapped_port(kafka_port, 9092.tcp())
        .with_cmd(command)
        .start()
        .await?;
    let settings = Settings {
        pg: PgConfig {
            host: "127.0.0.1".into(),
            port: pg_port,
            user: "pg2ch".into(),
            password: Secret::new("pg2ch"),
            database: "pg2ch".into(),
        },
        ch: ChConfig {
            host: "127.0.0.1".into(),
            port: ch_port,
            user: "pg2ch".into(),
            password: Secret::new("pg2ch"),
            database: "default".into(),
            cluster: None,
            replicas: vec![],
        },
        kafka: KafkaConfig {
            bootstrap: vec![format!("127.0.0.1:{kafka_port}")],
            topic: String::new(),
            group: "pg2ch".into(),
            sasl: None,
        },
        timeouts: Timeouts { call: Duration::from_secs(30) },
        tables: vec!["user_logins".into()],
        other_types_as_text: false,
    };
    let short = Duration::from_secs(2);
    let patience = Duration::from_secs(120);
    wait_until("the PostgreSQL container", patience, || async {
        pg2ch::postgres::connect(&settings.pg, 1, short).await.map(|_| ())
    })
    .await?;
    wait_until("the ClickHouse container", patience, || async {
        pg2ch::clickhouse::ClickHouse::connect(&settings.ch, short).await.map(|_| ())
    })
    .await?;
    wait_until("the broker container", patience, || async {
        let client = pg2ch::kafka::connect(&settings.kafka, short).await?;
        pg2ch::kafka::partition_count(&client, "none", short).await.map(|_| ())
    })
    .await?;
    Ok((Containers { _postgres: postgres, _clickhouse: clickhouse, _redpanda: redpanda }, settings))
}
