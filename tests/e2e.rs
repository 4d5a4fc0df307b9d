//! End to end against real PostgreSQL, broker and ClickHouse, driving the
//! `pg2ch` binary as another program would.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::TestEnv;
use pg2ch::types::Value;

fn tricky_names() -> Vec<String> {
    vec![
        "plain".into(),
        String::new(),
        "it's \"quoted\"".into(),
        "back\\slash \\N \\0 \\x00".into(),
        "new\nline\r\nand\ttab".into(),
        "emoji 🦀🚀 and ünïcödé 日本語".into(),
        "'; DROP TABLE user_logins; --".into(),
        "SELECT * FROM system.tables FORMAT JSON".into(),
        "x".repeat(10_000),
        "{\"json\": [1, 2]}".into(),
    ]
}

fn tricky_times() -> Vec<DateTime<Utc>> {
    [1_700_000_000_123_456i64, 946_684_800_000_001, 4_102_444_799_999_999, 1_234_567_890_000_000]
        .iter()
        .map(|us| DateTime::from_timestamp_micros(*us).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tricky_content_arrives_byte_for_byte() {
    let env = TestEnv::new("tricky").await;
    env.ok(&["init", "--partitions", "3"]);
    let names = tricky_names();
    let times: Vec<_> = tricky_times().into_iter().cycle().take(names.len()).collect();
    pg2ch::postgres::insert_events(&env.pg().await, &names, &times).await.unwrap();

    env.ok(&["run", "--once"]);
    let report = env.ok(&["verify"]);
    assert!(report.contains("verify: OK"), "{report}");

    let schema = env.logins().await;
    env.assert_same_rows(&schema, "tricky").await;
    let ch = env.ch_rows(&schema).await;
    let got: Vec<Value> = ch.values().map(|c| c.values[1].clone()).collect();
    assert_eq!(got, names.iter().map(|n| Value::Text(n.clone())).collect::<Vec<_>>());
    let first = ch.values().next().unwrap();
    assert_eq!(first.values[2], Value::Timestamp(1_700_000_000_123_456 - 946_684_800_000_000), "microseconds kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_resumes_from_the_stored_position() {
    let env = TestEnv::new("resume").await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "3000"]);
    env.ok(&["produce", "--once"]);
    env.ok(&["consume", "--once"]);
    let (ch, schema) = (env.ch().await, env.logins().await);
    assert_eq!(ch.stored_count(&schema).await.unwrap(), 3000);

    // The lag in time: how long the oldest unsent change has waited, and
    // how long the oldest unwritten record has been in the topic. Both are
    // under the time since the rows were made, and above zero (a process
    // start lies between).
    let before_seed = std::time::Instant::now();
    env.ok(&["seed", "--rows", "2000"]);
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    let waited = status["oldest_unsent_seconds"].as_f64().expect("unsent rows have an age");
    assert!(waited > 0.0 && waited <= before_seed.elapsed().as_secs_f64(), "{waited} s: {status}");
    let before_produce = std::time::Instant::now();
    env.ok(&["produce", "--once"]);
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert!(status["oldest_unsent_seconds"].is_null(), "{status}");
    for p in status["partitions"].as_array().unwrap() {
        let (lag, seconds) = (p["lag"].as_i64().unwrap(), p["lag_seconds"].as_f64().unwrap());
        assert!(lag > 0, "2000 rows over 2 partitions: {status}");
        assert!(seconds > 0.0 && seconds <= before_produce.elapsed().as_secs_f64(), "{seconds} s: {status}");
    }
    env.ok(&["consume", "--once"]);
    // Resumed, not replayed: nothing was written twice, even before merging.
    assert_eq!(ch.stored_count(&schema).await.unwrap(), 5000);
    assert_eq!(ch.final_count(&schema).await.unwrap(), 5000);
    let status = env.ok(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["unsent_rows"], 0);
    let lag: i64 = status["partitions"].as_array().unwrap().iter().map(|p| p["lag"].as_i64().unwrap()).sum();
    assert_eq!(lag, 0);
    assert!(status["partitions"].as_array().unwrap().iter().all(|p| p["lag_seconds"] == 0.0), "{status}");
    let ends: i64 = status["partitions"].as_array().unwrap().iter().map(|p| p["end_offset"].as_i64().unwrap()).sum();
    assert_eq!(ends, 5000, "end offsets come from the fetch high watermark");
    assert!(env.ok(&["verify"]).contains("verify: OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_in_every_compression_codec_reach_clickhouse() {
    let env = TestEnv::new("codecs").await;
    env.ok(&["init", "--partitions", "2"]);
    // One topic holding batches of every codec, as happens when producers
    // change `--compression`: the consumer must read them all.
    let codecs = ["gzip", "snappy", "lz4", "zstd", "none"];
    for codec in codecs {
        env.ok(&["seed", "--rows", "700"]);
        env.ok(&["produce", "--once", "--compression", codec]);
    }
    env.ok(&["consume", "--once"]);
    let ch = env.ch().await;
    let schema = env.logins().await;
    assert_eq!(ch.final_count(&schema).await.unwrap(), 700 * codecs.len() as u64);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    let bad = env.run(&["produce", "--once", "--compression", "brotli"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--compression"), "the error names the flag");
}

/// Topics get as many copies as the cluster allows (the local stack has one
/// broker), more than there are brokers is refused before anything is
/// written, and `status` shows the replication and `min.insync.replicas`.
#[tokio::test(flavor = "multi_thread")]
async fn topics_get_the_replication_the_cluster_allows() {
    let env = TestEnv::new("replicas").await;
    let refused = env.run(&["init", "--replication-factor", "2"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--replication-factor 2 needs 2 Kafka brokers; the cluster has 1"), "{stderr}");
    let client = pg2ch::kafka::connect(&env.settings.kafka, Duration::from_secs(10)).await.unwrap();
    let topic = env.settings.kafka.topic.clone();
    let timeout = Duration::from_secs(10);
    assert_eq!(pg2ch::kafka::partition_count(&client, &topic, timeout).await.unwrap(), None, "refused before writing");
    env.ok(&["init", "--partitions", "2"]);
    for topic in [topic.clone(), pg2ch::kafka::dead_letter_topic(&topic)] {
        let r = pg2ch::kafka::replication(&client, &topic, timeout).await.unwrap().expect("the topic exists");
        assert_eq!((r.brokers, r.replicas), (1, 1), "{topic}: {r:?}");
        assert!(r.under_replicated.is_empty(), "{topic}: {r:?}");
    }
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["replication"]["replicas"], 1, "{status}");
    // A topic created without configurations: Kafka answers its default
    // (1), nisshi answers only what was set, so pg2ch says "unknown".
    let shown = status["replication"]["min_insync"].as_u64().map_or("unknown".to_owned(), |m| m.to_string());
    assert!(shown == "1" || shown == "unknown", "{status}");
    let text = env.ok(&["status"]);
    let line = format!(
        "1 replicas per partition on 1 brokers, min.insync.replicas {shown}, under-replicated partitions: none"
    );
    assert!(text.contains(&line), "{text}");
    // The requests that carry and read topic configurations (the vendored
    // rskafka's additions) are ones the broker understands: what one sets,
    // the other reads back.
    let controller = client.controller_client().unwrap();
    for value in ["1", "3"] {
        let configured = format!("{topic}.configured{value}");
        controller
            .create_topic_with_configs(&configured, 1, 1, &[("min.insync.replicas", value)], 5_000)
            .await
            .unwrap();
        assert_eq!(pg2ch::kafka::partition_count(&client, &configured, timeout).await.unwrap(), Some(1));
        let r = pg2ch::kafka::replication(&client, &configured, timeout).await.unwrap().unwrap();
        assert_eq!(r.min_insync, Some(value.parse().unwrap()), "{configured}: {r:?}");
    }
}

/// A broker that requires SASL: without credentials the connection is cut
/// before any request; with SCRAM credentials pg2ch authenticates, and
/// the broker's answer (it holds no users) comes back in
/// one line that never shows the password, even with every log level on.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_requiring_sasl_gets_the_configured_credentials() {
    let broker = common::AuthenticatingBroker::start().await;
    let env = TestEnv::new("sasl").await;
    let mut settings = env.settings.clone();
    settings.kafka.bootstrap = vec![broker.bootstrap.clone()];
    let run = |env: &TestEnv| {
        let out = env.command(&["status"]).env("PG2CH_TIMEOUT_SECS", "3").env("RUST_LOG", "trace").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        let last = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_owned();
        assert!(last.starts_with("error: cannot reach Kafka broker") && last.contains(&broker.bootstrap), "{last}");
        (out, last)
    };
    let (_, anonymous) = run(&env.view(settings.clone()));
    assert!(!anonymous.contains("Sasl"), "no SASL without credentials: {anonymous}");
    let marker = format!("sasl-secret-{}", std::process::id());
    settings.kafka.sasl = Some(pg2ch::config::KafkaSasl {
        mechanism: pg2ch::config::SaslMechanism::ScramSha256,
        username: "pg2ch".into(),
        password: pg2ch::config::Secret::new(marker.clone()),
    });
    let (out, _) = run(&env.view(settings));
    // The last line may be the timeout; the retries before it say why.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SCRAM outcome error: unknown user"), "SCRAM ran and the broker judged it: {stderr}");
    for text in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(text).contains(&marker), "the SASL password was printed");
    }
}

/// Runs Debian's `kcat` (librdkafka, a client nobody here wrote) against
/// the test's broker, with `input` on its stdin; fails the test unless it
/// exits 0 within 30 s. Returns its stdout.
fn kcat(env: &TestEnv, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("timeout")
        .args(["30", "kcat", "-b", &env.settings.kafka.bootstrap.join(",")])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running `timeout 30 kcat`");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(127),
        "kcat is not installed: run `just setup` (or `apt-get install kcat`): {stderr}"
    );
    assert!(out.status.success(), "kcat {args:?} failed ({}): {stderr}", out.status);
    String::from_utf8(out.stdout).expect("kcat printed UTF-8")
}

/// What a user reaches for to look at a topic works against the broker:
/// `kcat -L` lists the table's topic and its dead letters, `kcat -C` reads
/// the topic to its end with keys, and a record written with `kcat -P`
/// (not a row) reaches the dead-letter topic, where `kcat -C` shows its
/// key, value and pg2ch's headers.
#[tokio::test(flavor = "multi_thread")]
async fn kcat_lists_reads_and_writes_the_topics() {
    let env = TestEnv::new("kcat").await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "40"]);
    env.ok(&["run", "--once"]);
    let dlq = pg2ch::kafka::dead_letter_topic(&env.name);

    let listing = kcat(&env, &["-L"], "");
    assert!(listing.contains(&format!("topic \"{}\" with 2 partitions", env.name)), "{listing}");
    assert!(listing.contains(&format!("topic \"{dlq}\" with 1 partitions")), "{listing}");

    let read =
        |topic: &str| kcat(&env, &["-C", "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%p|%k|%h|%s\\n"], "");
    let lines: Vec<String> = read(&env.name).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 40, "{lines:?}");
    let mut ids = std::collections::BTreeSet::new();
    for line in &lines {
        let [partition, key, _headers, value] = line.splitn(4, '|').collect::<Vec<_>>()[..] else { panic!("{line}") };
        assert!(["0", "1"].contains(&partition), "{line}");
        let value: serde_json::Value = serde_json::from_str(value).unwrap_or_else(|e| panic!("{e}: {line}"));
        let id = value["id"].as_i64().unwrap_or_else(|| panic!("no id: {line}"));
        assert_eq!(key, id.to_string(), "the key is the row's key: {line}");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 40, "every row once: {ids:?}");

    kcat(&env, &["-P", "-t", &env.name, "-p", "0", "-k", "kcat-key", "-H", "from=kcat"], "not a row\n");
    env.ok(&["run", "--once"]);
    let letters = read(&dlq);
    let letter = letters.lines().collect::<Vec<_>>();
    assert_eq!(letter.len(), 1, "{letters}");
    let [partition, key, headers, value] = letter[0].splitn(4, '|').collect::<Vec<_>>()[..] else {
        panic!("{letters}")
    };
    assert_eq!((partition, key, value), ("0", "kcat-key", "not a row"), "{letters}");
    assert!(
        headers.contains("pg2ch-reason=") && headers.contains(&format!("pg2ch-source-topic={}", env.name)),
        "{headers}"
    );
    assert!(env.ok(&["verify"]).contains("verify: OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_groups_fan_out_independently() {
    let env = TestEnv::new("fanout").await;
    let a = env.with_group("alpha");
    let b = env.with_group("beta");
    a.ok(&["init", "--partitions", "2"]);
    b.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "1500"]);
    a.ok(&["run", "--once"]);
    // Group beta has stored nothing yet and must get every event on its own.
    b.ok(&["consume", "--once"]);
    let schema = env.logins().await;
    for group in [&a, &b] {
        let ch = group.ch().await;
        assert_eq!(ch.final_count(&schema).await.unwrap(), 1500, "{}", group.settings.ch.database);
        assert!(group.ok(&["verify"]).contains("verify: OK"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn init_adds_the_flag_to_an_existing_table_without_rewriting_it() {
    let env = TestEnv::new("legacy").await;
    let pool = env.pg().await;
    // The original design's table: SERIAL ids, TIMESTAMP without zone, no flag.
    sqlx::query("CREATE TABLE user_logins (id SERIAL PRIMARY KEY, username VARCHAR(100) NOT NULL, event_time TIMESTAMP NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO user_logins (username, event_time) SELECT 'legacy_' || g, TIMESTAMP '2024-01-01 00:00:00.000001' + g * INTERVAL '1 second' FROM generate_series(1, 500) g")
        .execute(&pool)
        .await
        .unwrap();
    let file_before: i64 =
        sqlx::query_scalar("SELECT pg_relation_filenode('user_logins')::bigint").fetch_one(&pool).await.unwrap();

    env.ok(&["init"]);
    env.ok(&["init"]); // idempotent

    let file_after: i64 =
        sqlx::query_scalar("SELECT pg_relation_filenode('user_logins')::bigint").fetch_one(&pool).await.unwrap();
    assert_eq!(file_before, file_after, "adding the flag must not rewrite the table");
    // The rows there read sent without being written; the initial load's
    // chunks cover them.
    let unsent: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE NOT sent_to_kafka").fetch_one(&pool).await.unwrap();
    assert_eq!(unsent, 0);
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM _pg2ch.load_chunks").fetch_one(&pool).await.unwrap();
    assert_eq!(chunks, 1, "500 rows are one chunk");
    let index: Option<String> = sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE tablename = 'user_logins' AND indexdef LIKE '%WHERE (NOT sent_to_kafka)%'")
        .fetch_optional(&pool)
        .await
        .unwrap();
    assert!(index.is_some(), "a partial index finds unsent rows");

    env.ok(&["run", "--once"]);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    let schema = env.logins().await;
    let ch = env.ch_rows(&schema).await;
    assert_eq!(ch.len(), 500);
    let first = ch.values().next().unwrap();
    assert_eq!(
        first.values[2],
        Value::Timestamp(1_704_067_201_000_001 - 946_684_800_000_000),
        "TIMESTAMP read as UTC, microseconds kept"
    );
    // Its ClickHouse column, exact on every server.
    let us: i64 = env.ch().await.client.query("SELECT min(event_time_us) FROM user_logins").fetch_one().await.unwrap();
    assert_eq!(us, 1_704_067_201_000_001);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_fails_on_planted_extra_missing_and_altered_rows() {
    let env = TestEnv::new("planted").await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "200"]);
    env.ok(&["run", "--once"]);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    let pool = env.pg().await;
    let ch = env.ch().await;
    // A copy of the key's version (FINAL shows the later insert of a tie),
    // or of version 1 for a key ClickHouse lacks.
    let insert_ch = |id: i64, name: &str| {
        let sql = format!(
            "INSERT INTO user_logins (id, username, event_time_us, _pg2ch_version, _pg2ch_deleted) \
             SELECT {id}, '{name}', 0, greatest(1, (SELECT max(_pg2ch_version) FROM user_logins WHERE id = {id})), 0"
        );
        let client = ch.client.clone();
        async move { client.query(&sql).execute().await.unwrap() }
    };

    // Extra: an id PostgreSQL never had.
    insert_ch(999_999_999, "ghost").await;
    let out = env.run(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("keys in ClickHouse that PostgreSQL lacks: 1 (first: [999999999])"), "{text}");

    // Missing: a row flagged sent that never went anywhere.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO user_logins (username, event_time, sent_to_kafka) VALUES ('lost', now(), TRUE) RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&env.run(&["verify"]).stdout).into_owned();
    assert!(text.contains(&format!("sent rows missing from ClickHouse: 1 (first: [{id}])")), "{text}");

    // Altered: the newest copy of id 1 has other content, and FINAL keeps it.
    insert_ch(1, "tampered").await;
    let out = env.run(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("rows whose content differs: 1 (first: [1])"), "{text}");
    // ClickHouse may merge the two copies in the background at any time;
    // merges only remove copies, so if two are still there now, there were
    // two when verify looked.
    let copies: u64 = ch.client.query("SELECT count() FROM user_logins WHERE id = 1").fetch_one().await.unwrap();
    if copies > 1 {
        assert!(text.contains("keys stored more than once before merging"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_gives_one_line_and_exit_2_without_leaking_passwords() {
    let env = TestEnv::new("badcfg").await;
    env.ok(&["init"]); // so that each case below has exactly one thing wrong
    let secret = "s3cr3t-Pa55";
    let out = env.command(&["init"]).env("PG_PASS", secret).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(!err.contains(secret), "password leaked: {err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{err}");

    let out = env.command(&["status"]).env("CH_PASS", secret).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ClickHouse") && !err.contains(secret), "{err}");

    let out = env.command(&["init"]).env("CH_DB", "x; DROP DATABASE default").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("CH_DB"), "{err}");

    let out = env
        .command(&["run", "--once"])
        .env("KAFKA_BOOTSTRAP", "127.0.0.1:1")
        .env("PG2CH_TIMEOUT_SECS", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Kafka broker 127.0.0.1:1"), "{err}");

    let out = env.command(&["seed", "--rows", "many"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rows"));
}

/// Which ClickHouse this pass runs against, the DDL pg2ch picked for it and
/// the options its inserts carried: asserted, not assumed. `just test` runs
/// this against ClickHouse 18.16 (Debian's server) and 26.9 (chdb).
#[tokio::test(flavor = "multi_thread")]
async fn the_clickhouse_version_ddl_and_insert_options_are_the_expected_ones() {
    let env = TestEnv::new("chversion").await;
    env.ok(&["init", "--partitions", "1"]);
    env.ok(&["seed", "--rows", "10"]);
    env.ok(&["run", "--once"]);
    let ch = env.ch().await;
    let (major, minor) = ch.caps.version;
    let event_time: String = ch
        .client
        .query("SELECT type FROM system.columns WHERE database = currentDatabase() AND table = 'user_logins' AND name = 'event_time'")
        .fetch_one()
        .await
        .unwrap();
    // The DDL and settings follow the version pg2ch read.
    let expected_type = if (major, minor) >= (20, 5) { "DateTime64(6, 'UTC')" } else { "DateTime" };
    assert_eq!(event_time, expected_type, "server {major}.{minor}");
    assert_eq!(ch.caps.async_insert, (major, minor) >= (21, 11), "server {major}.{minor}");
    // The version this pass was meant to run against (scripts/test.sh says).
    if let Ok(expected) = std::env::var("PG2CH_TEST_CH_VERSION") {
        assert_eq!(format!("{major}.{minor}"), expected, "this pass runs ClickHouse {expected}");
    }
    if common::clickhouse_flavor() == "chdb" {
        assert!(major >= 26, "the chdb pass runs a current ClickHouse, got {major}.{minor}");
        // What the front end received, per insert: the pinned setting.
        let path = std::env::var("PG2CH_CHDB_PATH").expect("PG2CH_CHDB_PATH (exported by scripts/stack.sh)");
        let log = std::fs::read_to_string(format!("{path}/inserts.log")).unwrap();
        let ours: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["database"] == env.settings.ch.database.as_str())
            .collect();
        assert!(ours.len() >= 2, "rows and positions were inserted: {ours:?}");
        for insert in &ours {
            assert_eq!(insert["settings"]["async_insert"], "0", "{insert}");
        }
    }
    assert!(env.ok(&["verify"]).contains("verify: OK"));
}

/// An idle producer wakes when rows are committed (the statement trigger
/// `init` installs notifies it), not at its next poll: with a ten-minute
/// poll interval, a row inserted while `run` idles must still reach
/// ClickHouse within a minute. Without the wake it would wait ten minutes.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_producer_wakes_on_commit_not_on_its_poll() {
    use std::time::Duration;
    let env = TestEnv::new("wake").await;
    env.ok(&["init", "--partitions", "2"]);
    let pool = env.pg().await;
    let ch = env.ch().await;
    let mut child = env.command(&["run", "--poll-ms", "600000"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let in_ch = |name: &'static str| {
        let client = ch.client.clone();
        async move {
            client
                .query("SELECT count() FROM user_logins WHERE username = ?")
                .bind(name)
                .fetch_one::<u64>()
                .await
                .unwrap_or(0)
                == 1
        }
    };
    // The first row proves `run` is up; after it, the producer goes idle.
    sqlx::query("INSERT INTO user_logins (username) VALUES ('first')").execute(&pool).await.unwrap();
    common::eventually("the first row arrives", Duration::from_secs(60), || in_ch("first")).await;
    sqlx::query("INSERT INTO user_logins (username) VALUES ('woken')").execute(&pool).await.unwrap();
    common::eventually("a row inserted while the producer idles arrives", Duration::from_secs(60), || in_ch("woken"))
        .await;
    common::terminate(&mut child, Duration::from_secs(60));
    assert!(env.ok(&["verify"]).contains("verify: OK"));
}

/// The version sequence going back (a point-in-time restore, a failover
/// that lost its last WAL, `DROP SCHEMA _pg2ch` and `init` again): new
/// changes would carry versions below those ClickHouse holds and lose to
/// them, and `verify --repair` could not heal it. Every start moves the
/// sequence past ClickHouse's highest version, and says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_version_sequence_that_went_back_is_moved_past_clickhouse() {
    let env = TestEnv::new("seqback").await;
    let pool = env.pg().await;
    env.ok(&["init"]);
    pg2ch::postgres::insert_events(&pool, &["a".to_owned(), "b".to_owned()], &[chrono::Utc::now(); 2]).await.unwrap();
    for _ in 0..3 {
        sqlx::query("UPDATE user_logins SET username = username || '+'").execute(&pool).await.unwrap();
        env.ok(&["run", "--once"]);
    }
    sqlx::query("ALTER SEQUENCE _pg2ch.versions RESTART").execute(&pool).await.unwrap();
    sqlx::query("UPDATE user_logins SET username = 'after the restore'").execute(&pool).await.unwrap();
    let out = env.run(&["run", "--once"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("version sequence _pg2ch.versions was at 1, behind"), "the move is logged:\n{log}");
    let report = env.ok(&["verify"]);
    assert!(report.contains("verify: OK"), "{report}");
    let schema = env.logins().await;
    let ch = env.ch_rows(&schema).await;
    assert!(ch.values().all(|c| c.values[1] == Value::Text("after the restore".into())), "{ch:?}");
}

/// A producer alone starts while ClickHouse lacks a column PostgreSQL
/// gained (adding it is a consumer's start's work, or `init`'s): its check
/// of ClickHouse's versions reads the table's engine, not its columns.
#[tokio::test(flavor = "multi_thread")]
async fn a_producer_alone_starts_before_clickhouse_has_a_new_column() {
    let env = TestEnv::new("producecol").await;
    let pool = env.pg().await;
    env.ok(&["init"]);
    pg2ch::postgres::insert_events(&pool, &["a".to_owned()], &[chrono::Utc::now()]).await.unwrap();
    env.ok(&["run", "--once"]);
    sqlx::query("ALTER TABLE user_logins ADD COLUMN country text").execute(&pool).await.unwrap();
    sqlx::query("UPDATE user_logins SET country = 'NZ'").execute(&pool).await.unwrap();
    env.ok(&["produce", "--once"]);
    env.ok(&["consume", "--once"]);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
}
