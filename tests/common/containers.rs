//! Services from Docker containers (testcontainers), used when a Docker
//! engine answers and no endpoints are given in the environment.
//!
//! Not exercised on machines without a Docker engine (like the project's own
//! CI), where the local process stack is used instead.

use std::time::Duration;

use pg2ch::commands::Settings;
use pg2ch::config::{ChConfig, KafkaConfig, PgConfig, Secret, Timeouts};
use pg2ch::stack::wait_until;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// Whether `docker info` succeeds (the client alone is not enough).
pub fn docker_answers() -> bool {
    std::process::Command::new("docker")
        .arg("info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The running containers; kept for the life of the test process (the
/// testcontainers reaper removes them afterwards).
pub struct Containers {
    _postgres: ContainerAsync<GenericImage>,
    _clickhouse: ContainerAsync<GenericImage>,
    _redpanda: ContainerAsync<GenericImage>,
}

pub async fn start() -> anyhow::Result<(Containers, Settings)> {
    let postgres = GenericImage::new("postgres", "15")
        .with_exposed_port(5432.tcp())
        .with_wait_for(WaitFor::Nothing)
        .with_env_var("POSTGRES_USER", "pg2ch")
        .with_env_var("POSTGRES_PASSWORD", "pg2ch")
        .with_env_var("POSTGRES_DB", "pg2ch")
        .start()
        .await?;
    let clickhouse = GenericImage::new("clickhouse/clickhouse-server", "24.8")
        .with_exposed_port(8123.tcp())
        .with_wait_for(WaitFor::Nothing)
        .with_env_var("CLICKHOUSE_USER", "pg2ch")
        .with_env_var("CLICKHOUSE_PASSWORD", "pg2ch")
        .with_env_var("CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT", "1")
        .start()
        .await?;
    // The broker must advertise the port clients reach it on, so the host
    // port is chosen first and mapped explicitly.
    let kafka_port = super::free_port();
    let redpanda = GenericImage::new("docker.redpanda.com/redpandadata/redpanda", "v24.2.7")
        .with_wait_for(WaitFor::Nothing)
        .with_mapped_port(kafka_port, 9092.tcp())
        .with_cmd([
            "redpanda".to_owned(),
            "start".into(),
            "--mode".into(),
            "dev-container".into(),
            "--smp".into(),
            "1".into(),
            "--kafka-addr".into(),
            "0.0.0.0:9092".into(),
            "--advertise-kafka-addr".into(),
            format!("127.0.0.1:{kafka_port}"),
        ])
        .start()
        .await?;
    let settings = Settings {
        pg: PgConfig {
            host: "127.0.0.1".into(),
            port: postgres.get_host_port_ipv4(5432).await?,
            user: "pg2ch".into(),
            password: Secret::new("pg2ch"),
            database: "pg2ch".into(),
        },
        ch: ChConfig {
            host: "127.0.0.1".into(),
            port: clickhouse.get_host_port_ipv4(8123).await?,
            user: "pg2ch".into(),
            password: Secret::new("pg2ch"),
            database: "default".into(),
        },
        kafka: KafkaConfig {
            bootstrap: vec![format!("127.0.0.1:{kafka_port}")],
            topic: String::new(),
            group: "pg2ch".into(),
        },
        timeouts: Timeouts { call: Duration::from_secs(30) },
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
    wait_until("the Redpanda container", patience, || async {
        let client = pg2ch::kafka::connect(&settings.kafka, short).await?;
        pg2ch::kafka::partition_count(&client, "none", short).await.map(|_| ())
    })
    .await?;
    Ok((Containers { _postgres: postgres, _clickhouse: clickhouse, _redpanda: redpanda }, settings))
}
