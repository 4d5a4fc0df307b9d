//! Real-world input against real services: every table shape `init`
//! accepts (partitioned by range, list and hash, inheritance children), every
//! value PostgreSQL admits for each column (the ends of its time range,
//! `±infinity`, NULLs, control characters, text over the broker's limit,
//! invalid UTF-8 in a SQL_ASCII database, ids at the ends of `i64`), a topic
//! re-created under the consumer, poison too large for one request, and
//! stopping `consume --once`. Each ends with `verify` and direct queries.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{PrivateStack, TestEnv, eventually};
use pg2ch::types::Value;

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The table the original design had, as a partitioned or inherited table.
const COLUMNS: &str = "id BIGINT NOT NULL, username TEXT NOT NULL, event_time TIMESTAMPTZ NOT NULL DEFAULT now()";

/// Drains a table of this shape with two producer processes of two lanes
/// each, then a consumer; everything must be sent once, exactly.
async fn drains_exactly(label: &str, ddl: &[&str], insert: &str) {
    let env = TestEnv::new(label).await;
    let pool = env.pg().await;
    for sql in ddl {
        exec(&pool, sql).await;
    }
    env.ok(&["init", "--partitions", "3"]);
    exec(&pool, insert).await;
    let total = scalar(&pool, "SELECT count(*) FROM user_logins").await;
    assert!(total >= 6000, "{label}: {total} rows");
    let spawn = || {
        env.command(&["produce", "--once", "--producers", "2", "--batch-rows", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{label}: produce failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    env.ok(&["run", "--once"]); // whatever the two left (none), and the consumer
    let report = env.ok(&["verify"]);
    assert!(report.contains("verify: OK"), "{label}: {report}");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM user_logins WHERE NOT sent_to_kafka").await, 0, "{label}");
    let (ch, schema) = (env.ch().await, env.logins().await);
    assert_eq!(ch.final_count(&schema).await.unwrap() as i64, total, "{label}: one ClickHouse row per PostgreSQL row");
    // Each row in ClickHouse has its own content: no row was flagged for another.
    env.assert_same_rows(&schema, label).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn range_partitions_are_flagged_by_table_and_slot() {
    drains_exactly(
        "prange",
        &[
            &format!("CREATE TABLE user_logins ({COLUMNS}, PRIMARY KEY (id)) PARTITION BY RANGE (id)"),
            "CREATE TABLE user_logins_a PARTITION OF user_logins FOR VALUES FROM (MINVALUE) TO (3001)",
            "CREATE TABLE user_logins_b PARTITION OF user_logins FOR VALUES FROM (3001) TO (MAXVALUE)",
        ],
        "INSERT INTO user_logins (id, username) SELECT g, 'r_' || g FROM generate_series(1, 6000) g",
    )
    .await;
}

/// Partitioned by time, as event tables are: the primary key must then hold
/// the time, and that composite key is what ClickHouse keeps one row per.
#[tokio::test(flavor = "multi_thread")]
async fn time_partitions_with_a_composite_key_are_carried() {
    drains_exactly(
        "ptime",
        &[
            "CREATE TABLE user_logins (id BIGINT NOT NULL, username TEXT NOT NULL, event_time TIMESTAMPTZ NOT NULL, \
             PRIMARY KEY (id, event_time)) PARTITION BY RANGE (event_time)",
            "CREATE TABLE user_logins_old PARTITION OF user_logins FOR VALUES FROM (MINVALUE) TO ('2024-01-01')",
            "CREATE TABLE user_logins_new PARTITION OF user_logins FOR VALUES FROM ('2024-01-01') TO (MAXVALUE)",
        ],
        "INSERT INTO user_logins (id, username, event_time)
         SELECT g % 3000, 't_' || g, TIMESTAMPTZ '2023-12-31 23:00:00+00' + g * INTERVAL '1 second'
         FROM generate_series(1, 7200) g",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_partitions_are_flagged_by_table_and_slot() {
    drains_exactly(
        "phash",
        &[
            &format!("CREATE TABLE user_logins ({COLUMNS}, PRIMARY KEY (id)) PARTITION BY HASH (id)"),
            "CREATE TABLE user_logins_0 PARTITION OF user_logins FOR VALUES WITH (MODULUS 3, REMAINDER 0)",
            "CREATE TABLE user_logins_1 PARTITION OF user_logins FOR VALUES WITH (MODULUS 3, REMAINDER 1)",
            "CREATE TABLE user_logins_2 PARTITION OF user_logins FOR VALUES WITH (MODULUS 3, REMAINDER 2)",
        ],
        "INSERT INTO user_logins (id, username) SELECT g, 'h_' || g FROM generate_series(-3000, 5999) g",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_partitions_and_sub_partitions_are_flagged_by_table_and_slot() {
    drains_exactly(
        "plist",
        &[
            &format!("CREATE TABLE user_logins ({COLUMNS}, PRIMARY KEY (id)) PARTITION BY LIST (id)"),
            "CREATE TABLE user_logins_small PARTITION OF user_logins FOR VALUES IN (1, 2, 3, 4, 5)",
            // A default partition that is itself partitioned: two levels.
            "CREATE TABLE user_logins_rest PARTITION OF user_logins DEFAULT PARTITION BY RANGE (id)",
            "CREATE TABLE user_logins_rest_lo PARTITION OF user_logins_rest FOR VALUES FROM (MINVALUE) TO (4000)",
            "CREATE TABLE user_logins_rest_hi PARTITION OF user_logins_rest FOR VALUES FROM (4000) TO (MAXVALUE)",
        ],
        "INSERT INTO user_logins (id, username) SELECT g, 'l_' || g FROM generate_series(1, 7000) g",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inheritance_children_are_flagged_by_table_and_slot() {
    drains_exactly(
        "pinherit",
        &[
            &format!("CREATE TABLE user_logins ({COLUMNS}, PRIMARY KEY (id))"),
            "CREATE TABLE user_logins_2023 (PRIMARY KEY (id)) INHERITS (user_logins)",
            "CREATE TABLE user_logins_2024 (PRIMARY KEY (id)) INHERITS (user_logins)",
        ],
        "INSERT INTO user_logins_2023 (id, username) SELECT g, 'i_' || g FROM generate_series(1, 3000) g;
         INSERT INTO user_logins_2024 (id, username) SELECT g, 'i_' || g FROM generate_series(3001, 6000) g;
         INSERT INTO user_logins (id, username) SELECT g, 'i_' || g FROM generate_series(6001, 6500) g",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shapes_that_cannot_be_carried_safely_are_refused_by_name() {
    let cases: [(&str, &[&str], &str); 6] = [
        (
            "no primary key",
            &["CREATE TABLE user_logins (id BIGINT, username TEXT, event_time TIMESTAMPTZ)"],
            "PostgreSQL table public.user_logins has no primary key",
        ),
        (
            "an inheritance child without a key",
            &[
                "CREATE TABLE user_logins (id BIGINT PRIMARY KEY, username TEXT, event_time TIMESTAMPTZ)",
                "CREATE TABLE user_logins_child () INHERITS (user_logins)",
            ],
            "user_logins_child (holding rows of public.user_logins) has no primary key or unique index on (id)",
        ),
        (
            "a column of a type pg2ch does not carry",
            &["CREATE TABLE user_logins (id BIGINT PRIMARY KEY, username TEXT, event_time TIMESTAMPTZ, spot POINT)"],
            "column public.user_logins.spot has type point, which pg2ch does not carry",
        ),
        (
            "a key pg2ch cannot order as PostgreSQL does",
            &["CREATE TABLE user_logins (id DOUBLE PRECISION PRIMARY KEY, username TEXT, event_time TIMESTAMPTZ)"],
            "primary key column public.user_logins.id has type double precision",
        ),
        (
            "two columns that would be one in ClickHouse",
            &[
                "CREATE TABLE user_logins (id BIGINT PRIMARY KEY, username TEXT, event_time TIMESTAMPTZ, event_time_us BIGINT)",
            ],
            "columns \"event_time\" and \"event_time_us\" of public.user_logins would both be ClickHouse column",
        ),
        (
            "a view",
            &[
                "CREATE TABLE logins_base (id BIGINT PRIMARY KEY, username TEXT, event_time TIMESTAMPTZ)",
                "CREATE VIEW user_logins AS SELECT * FROM logins_base",
            ],
            "relation public.user_logins is not a table",
        ),
    ];
    for (what, ddl, expected) in cases {
        let env = TestEnv::new("refused").await;
        let pool = env.pg().await;
        for sql in ddl {
            exec(&pool, sql).await;
        }
        let out = env.run(&["init"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(expected), "{what}: {err}");
        assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{what}: {err}");
        let flag: i64 =
            scalar(&pool, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'sent_to_kafka'").await;
        assert_eq!(flag, 0, "{what}: a refused table is left as it was");
    }
}

/// One row per edge of the domain: (id, username SQL, event_time SQL, what
/// must happen: `None` carried exactly, `Some(reason)` rejected for it).
fn extremes() -> Vec<(i64, String, &'static str, Option<&'static str>)> {
    let controls: String = (1u8..=31).chain([127]).map(|b| format!("chr({b})")).collect::<Vec<_>>().join(" || ");
    vec![
        (i64::MIN, "'min id'".into(), "'2024-01-01 00:00:00.000001+00'", None),
        (-1, "''".into(), "'4714-11-24 00:00:00 BC'", None),
        (0, controls, "'0002-01-01 12:34:56.789012 BC'", None),
        (1, "'year 12000'".into(), "'12000-01-01'", None),
        (2, "'last µs Int64 holds'".into(), "'294247-01-10 04:00:54.775807+00'", None),
        (3, "'one µs later'".into(), "'294247-01-10 04:00:54.775808+00'", Some("event_time is later than")),
        (4, "'the end of PostgreSQL'".into(), "'294276-12-31 23:59:59.999999+00'", Some("event_time is later than")),
        (5, "'plus infinity'".into(), "'infinity'", Some("event_time is infinity")),
        (6, "'minus infinity'".into(), "'-infinity'", Some("event_time is -infinity")),
        (7, "NULL".into(), "now()", None),
        (8, "'no time'".into(), "NULL", None),
        (9, "repeat('x', 899800)".into(), "'1970-01-01 00:00:00+00'", None),
        (10, "repeat('y', 1100000)".into(), "'1970-01-01 00:00:00+00'", Some("over the 900000-byte limit")),
        (11, "'quote\" back\\slash 🦀 \u{2028}'".into(), "'9999-12-31 23:59:59.999999+00'", None),
        (12, "'ten thousand'".into(), "'10000-01-01 00:00:00+00'", None),
        (i64::MAX, "'max id'".into(), "'0001-01-01 00:00:00+00'", None),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_extreme_value_is_carried_exactly_or_rejected_with_its_reason() {
    let env = TestEnv::new("extremes").await;
    let pool = env.pg().await;
    // The columns admit NULL, as a user's table may.
    exec(&pool, "CREATE TABLE user_logins (id BIGINT PRIMARY KEY, username TEXT, event_time TIMESTAMPTZ)").await;
    env.ok(&["init", "--partitions", "3"]);
    let rows = extremes();
    for (id, name, time, _) in &rows {
        // Literals only from the fixed table above; the id is a number.
        exec(&pool, &format!("INSERT INTO user_logins (id, username, event_time) VALUES ({id}, {name}, {time})")).await;
    }
    env.ok(&["run", "--once"]);
    let again = env.run(&["run", "--once"]); // nothing left, and no row blocks a second start
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let report = env.ok(&["verify"]);
    assert!(report.contains("verify: OK"), "{report}");

    let schema = env.logins().await;
    let in_ch: std::collections::BTreeMap<i64, Vec<Value>> = env
        .ch_rows(&schema)
        .await
        .into_values()
        .map(|c| (if let Value::Int(id) = c.values[0] { id } else { panic!("{c:?}") }, c.values))
        .collect();
    for (id, _, time, outcome) in &rows {
        let (sent, rejected, name, exact_us): (bool, Option<String>, Option<Vec<u8>>, Option<String>) = sqlx::query_as(
            "SELECT sent_to_kafka, pg2ch_rejected, convert_to(username, 'UTF8'),
                    CASE WHEN isfinite(event_time) THEN
                        -- PostgreSQL's stored microseconds, from its binary form: its own
                        -- extract(epoch) goes through floating point near the end of Int64.
                        ((('x' || encode(timestamptz_send(event_time), 'hex'))::bit(64)::bigint)::numeric
                         + 946684800000000)::text END
             FROM user_logins WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        match outcome {
            None => {
                assert!(sent && rejected.is_none(), "row {id} ({time}) must be sent: rejected {rejected:?}");
                let e = in_ch.get(id).unwrap_or_else(|| panic!("row {id} ({time}) is not in ClickHouse"));
                let got_name = match &e[1] {
                    Value::Text(t) => Some(t.as_bytes().to_vec()),
                    Value::Null => None,
                    other => panic!("row {id}: {other:?}"),
                };
                assert_eq!(got_name, name, "row {id}: text byte for byte");
                let got_us = match &e[2] {
                    Value::Timestamp(pg) => Some((i128::from(*pg) + 946_684_800_000_000).to_string()),
                    Value::Null => None,
                    other => panic!("row {id}: {other:?}"),
                };
                assert_eq!(
                    got_us,
                    exact_us.map(|t| t.trim_end_matches(".000000").to_owned()),
                    "row {id} ({time}) to the µs"
                );
            }
            Some(reason) => {
                assert!(!sent, "row {id} ({time}) must not be flagged sent");
                let why = rejected.unwrap_or_else(|| panic!("row {id} ({time}) must be flagged rejected"));
                assert!(why.contains(reason), "row {id}: {why:?} should say {reason:?}");
                assert!(!in_ch.contains_key(id), "row {id} must not be in ClickHouse");
            }
        }
    }
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    let expected_rejected = rows.iter().filter(|r| r.3.is_some()).count();
    assert_eq!(status["rejected_rows"], expected_rejected, "{status}");
    assert_eq!(status["unsent_rows"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_in_a_sql_ascii_database_is_rejected_per_row() {
    let env = TestEnv::with_encoding("sqlascii", "SQL_ASCII").await;
    let pool = env.pg().await;
    env.ok(&["init", "--partitions", "2"]);
    // Any byte but NUL is admitted as text here.
    exec(
        &pool,
        r"INSERT INTO user_logins (username, event_time) VALUES
            ('plain', now()), (E'\xff\xfe invalid', now()), (E'caf\xc3\xa9', now()), (E'lone \x80 byte', now())",
    )
    .await;
    env.ok(&["run", "--once"]);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    let rejected: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, pg2ch_rejected FROM user_logins WHERE pg2ch_rejected IS NOT NULL ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected.iter().all(|(_, why)| why.starts_with("username is not valid UTF-8")), "{rejected:?}");
    let schema = env.logins().await;
    let names: Vec<Value> = env.ch_rows(&schema).await.into_values().map(|c| c.values[1].clone()).collect();
    assert_eq!(names, [Value::Text("plain".into()), Value::Text("café".into())]);
}

/// The broker loses its storage (stopped, its SQLite file deleted, started
/// again), `init` creates the topic again and it grows past the stored
/// positions. Every mode must stop with a named error instead of reading on
/// from the old positions.
#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_topic_stops_every_mode_instead_of_skipping_rows() {
    let mut private = PrivateStack::start("recreate").await;
    let env = TestEnv::on(private.settings.clone(), "recreate").await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "2000"]);
    env.ok(&["run", "--once"]);
    // A running `run`, through the broker's restart.
    let mut running = env
        .command(&["run", "--poll-ms", "50", "--timeout-secs", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // At work once it has moved a new row.
    env.ok(&["seed", "--rows", "1"]);
    let (ch, schema) = (env.ch().await, env.logins().await);
    eventually("the running `run` moved a new row", Duration::from_secs(30), || async {
        ch.final_count(&schema).await.unwrap_or(0) == 2001
    })
    .await;
    private.stop(pg2ch::stack::Service::Broker);
    let broker_dir = private.stack.services_root().join("broker");
    for file in std::fs::read_dir(&broker_dir).unwrap() {
        let path = file.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("broker.db") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    private.up().await;
    // `init` creates the topic again, unless the restarted producer's
    // request made the broker create one by itself first (nisshi does,
    // with its default partition count): either way a new, empty log.
    let _ = env.run(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "4000"]);
    env.ok(&["produce", "--once"]);
    // Waited for with a deadline: a `run` that reads on would never end.
    let mut stderr = running.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        err
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = running.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = running.kill();
            let _ = running.wait();
            panic!("the running `run` did not stop by itself within 60 s: {}", reader.join().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(2), "the running `run` must stop by itself: {err}");
    let fatal = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{err}"));
    assert!(
        fatal.contains("partition") && fatal.contains("created again") || fatal.contains("does not exist"),
        "{fatal}"
    );

    for args in [&["consume", "--once"][..], &["run", "--once"], &["consume"]] {
        let out = env.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("created again"), "{args:?}: {err}");
    }
    // Nothing of the new log was written under the old positions.
    assert_eq!(ch.final_count(&schema).await.unwrap(), 2001);
    // A new group reads the new log from its start (the old log's rows
    // are gone with the broker's storage, which pg2ch cannot know).
    let fresh = env.with_group("fresh");
    let client = pg2ch::kafka::connect(&env.settings.kafka, Duration::from_secs(10)).await.unwrap();
    let count = pg2ch::kafka::partition_count(&client, &env.name, Duration::from_secs(10)).await.unwrap().unwrap();
    fresh.ok(&["init", "--partitions", &count.to_string()]);
    fresh.ok(&["consume", "--once"]);
    assert_eq!(fresh.ch().await.final_count(&schema).await.unwrap(), 4000, "the new log holds the 4000 new rows");
}

/// A foreign producer writes records the consumer cannot decode, together
/// larger than one produce request may be: they reach the dead-letter topic
/// in bounded requests and the good rows around them land.
#[tokio::test(flavor = "multi_thread")]
async fn large_poison_goes_to_the_dead_letter_topic_in_bounded_requests() {
    let env = TestEnv::new("bigpoison").await;
    env.ok(&["init", "--partitions", "1"]);
    env.ok(&["seed", "--rows", "100"]);
    env.ok(&["produce", "--once"]);
    let partition = env.foreign_partition(&env.name, 0).await;
    for i in 0..5u8 {
        let record = rskafka::record::Record {
            key: None,
            value: Some(vec![b'a' + i; 300_000]),
            headers: Default::default(),
            timestamp: chrono::Utc::now(),
        };
        partition.produce(vec![record], rskafka::client::partition::Compression::NoCompression).await.unwrap();
    }
    env.ok(&["seed", "--rows", "100"]);
    env.ok(&["produce", "--once"]);
    env.ok(&["consume", "--once", "--fetch-max-bytes", "4000000"]);
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["dead_letters"], 5, "{status}");
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    let schema = env.logins().await;
    assert_eq!(env.ch().await.final_count(&schema).await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_stops_consume_once_at_a_safe_point() {
    let env = TestEnv::new("consumeint").await;
    env.ok(&["init", "--partitions", "2"]);
    env.ok(&["seed", "--rows", "200000"]);
    env.ok(&["produce", "--once"]);
    let child = env
        .command(&["consume", "--once", "--insert-rows", "5000", "--fetch-max-bytes", "100000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ch, schema) = (env.ch().await, env.logins().await);
    eventually("first rows written", Duration::from_secs(30), || async {
        ch.stored_count(&schema).await.unwrap_or(0) > 0
    })
    .await;
    let asked = Instant::now();
    assert!(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(asked.elapsed() < Duration::from_secs(5), "stopped in {:?}", asked.elapsed());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopping at the next safe point"));
    assert!(ch.final_count(&schema).await.unwrap() < 200_000, "stopped before the end");
    env.ok(&["consume", "--once"]);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    assert_eq!(ch.final_count(&schema).await.unwrap(), 200_000);
}

/// A sink table that would not collapse copies is refused, by name.
#[tokio::test(flavor = "multi_thread")]
async fn a_sink_table_that_does_not_collapse_copies_is_refused() {
    let env = TestEnv::new("plainmt").await;
    env.ok(&["init", "--partitions", "4"]);
    let ch = env.ch().await;
    ch.client.query("DROP TABLE user_logins").execute().await.unwrap();
    ch.client
        .query(
            "CREATE TABLE user_logins (id Int64, username String, event_time_us Int64) ENGINE = MergeTree ORDER BY id",
        )
        .execute()
        .await
        .unwrap();
    for args in [&["init"][..], &["consume", "--once"], &["run"]] {
        let out = env.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("has engine MergeTree, which does not keep one row per key"), "{args:?}: {err}");
    }
}

/// Passwords come from a file instead of the environment, and a `.env`
/// is read from the working directory only, never from a parent.
#[tokio::test(flavor = "multi_thread")]
async fn password_files_and_dot_env_from_the_working_directory_only() {
    let env = TestEnv::new("pwfile").await;
    env.ok(&["init", "--partitions", "1"]);
    let dir = std::env::temp_dir().join(format!("{}_dir", env.name));
    let child_dir = dir.join("child");
    std::fs::create_dir_all(&child_dir).unwrap();
    let pg_file = dir.join("pg.pass");
    let ch_file = dir.join("ch.pass");
    // Private from their first byte, as the stack writes its own.
    pg2ch::stack::write_private(&pg_file, &format!("{}\n", env.settings.pg.password.expose())).unwrap();
    pg2ch::stack::write_private(&ch_file, env.settings.ch.password.expose()).unwrap();
    let status = env
        .command(&["status"])
        .env_remove("PG_PASS")
        .env_remove("CH_PASS")
        .env("PG_PASS_FILE", &pg_file)
        .env("CH_PASS_FILE", &ch_file)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let missing = env.command(&["status"]).env("PG_PASS_FILE", dir.join("nope")).output().unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2));
    assert!(err.contains("password file") && err.contains("nope"), "{err}");

    std::fs::write(dir.join(".env"), "KAFKA_TOPIC=not/a/valid/topic\n").unwrap();
    let from_child = env.command(&["verify"]).env_remove("KAFKA_TOPIC").current_dir(&child_dir).output().unwrap();
    assert_ne!(from_child.status.code(), Some(2), "{}", String::from_utf8_lossy(&from_child.stderr));
    let from_dir = env.command(&["verify"]).env_remove("KAFKA_TOPIC").current_dir(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&from_dir.stderr);
    assert_eq!(from_dir.status.code(), Some(2), "{err}");
    assert!(err.contains("KAFKA_TOPIC"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Random rows from the whole domain PostgreSQL admits, through the real
/// adapter and services: ids anywhere in `bigint`, any non-NUL bytes as text
/// (a SQL_ASCII database), any time from 4714 BC to 294276 AD, the ends,
/// `±infinity`, NULLs, text around the message limit. Each row must arrive
/// exactly or be rejected with the reason the shared decision gives, and the
/// checksum PostgreSQL computes for `verify` must equal pg2ch's. The seed is
/// printed; `PG2CH_DOMAIN_SEED=N` replays a run.
#[tokio::test(flavor = "multi_thread")]
async fn random_rows_from_the_whole_domain_travel_exactly_or_are_rejected() {
    use pg2ch::types::time::{PG_EPOCH_UNIX_US, PG_TIMESTAMP_MAX, PG_TIMESTAMP_MIN};
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("PG2CH_DOMAIN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("PG2CH_DOMAIN_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let env = TestEnv::with_encoding("domainprop", "SQL_ASCII").await;
    let pool = env.pg().await;
    exec(&pool, "CREATE TABLE user_logins (id BIGINT PRIMARY KEY, username TEXT, event_time TIMESTAMPTZ)").await;
    env.ok(&["init", "--partitions", "3"]);

    let mut ids = std::collections::BTreeSet::new();
    let mut rows: Vec<(i64, Option<Vec<u8>>, Option<i64>)> = Vec::new();
    while rows.len() < 400 {
        let id = match rng.random_range(0..4) {
            0 => rng.random::<i64>(),
            1 => rng.random_range(-1000..1000),
            2 => [i64::MIN, i64::MAX, 0, -1][rng.random_range(0..4)],
            _ => rng.random_range(1..1_000_000),
        };
        if !ids.insert(id) {
            continue;
        }
        let len = rng.random_range(0..30);
        let username: Option<Vec<u8>> = match rng.random_range(0..100) {
            0..=39 => Some(
                (0..len)
                    .filter_map(|_| char::from_u32(rng.random_range(1..0x11_0000)))
                    .collect::<String>()
                    .into_bytes(),
            ),
            40..=64 => Some((0..len).map(|_| rng.random_range(1..=255u8)).collect()),
            65..=84 => Some((0..len).map(|_| rng.random_range(1..=127u8)).collect()),
            85..=96 => None,
            _ => Some(vec![b'x'; rng.random_range(899_800..900_000)]),
        };
        let time: Option<i64> = match rng.random_range(0..100) {
            0..=59 => Some(rng.random_range(PG_TIMESTAMP_MIN..=PG_TIMESTAMP_MAX)),
            60..=89 => Some(
                [
                    PG_TIMESTAMP_MIN,
                    PG_TIMESTAMP_MAX,
                    i64::MAX,
                    i64::MIN,
                    i64::MAX - PG_EPOCH_UNIX_US,
                    i64::MAX - PG_EPOCH_UNIX_US + 1,
                    0,
                ][rng.random_range(0..7)],
            ),
            _ => None,
        };
        rows.push((id, username, time));
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let names: Vec<Option<Vec<u8>>> = rows.iter().map(|r| r.1.clone()).collect();
    let times: Vec<Option<pg2ch::types::postgres::PgTimestamp>> =
        rows.iter().map(|r| r.2.map(pg2ch::types::postgres::PgTimestamp)).collect();
    sqlx::query(
        "INSERT INTO user_logins (id, username, event_time)
         SELECT i, convert_from(n, 'SQL_ASCII'), t FROM UNNEST($1::bigint[], $2::bytea[], $3::timestamptz[]) AS r(i, n, t)",
    )
    .bind(&ids)
    .bind(&names)
    .bind(&times)
    .execute(&pool)
    .await
    .unwrap();
    let schema = env.logins().await;
    // The values as PostgreSQL holds them, read back as pg2ch reads them.
    let stored = env.pg_rows(&schema).await;
    let values: std::collections::BTreeMap<i64, Vec<Value>> =
        stored.into_values().map(|(v, _)| (if let Value::Int(id) = v[0] { id } else { unreachable!() }, v)).collect();
    for (id, name, time) in &rows {
        let v = &values[id];
        assert_eq!(v[1].text_bytes().map(<[u8]>::to_vec), *name, "seed {seed}: row {id}'s text as stored");
        assert_eq!(v[2], time.map_or(Value::Null, Value::Timestamp), "seed {seed}: row {id}'s time as stored");
    }

    // The checksum `verify` has PostgreSQL compute equals pg2ch's own, for
    // every row, NULLs, invalid text and infinities included.
    let sql = format!("SELECT id, {} FROM user_logins", pg2ch::checksum::row_sql(&schema));
    let server: std::collections::BTreeMap<i64, i64> =
        sqlx::query_as::<_, (i64, i64)>(&sql).fetch_all(&pool).await.unwrap().into_iter().collect();
    for (id, v) in &values {
        assert_eq!(server[id], pg2ch::checksum::row(&schema, v), "seed {seed}: checksum of row {id}");
    }

    env.ok(&["run", "--once"]);
    let report = env.ok(&["verify"]);
    assert!(report.contains("verify: OK"), "seed {seed}: {report}");
    let in_ch = env.ch_rows(&schema).await;
    let flags: std::collections::BTreeMap<i64, (bool, Option<String>)> =
        sqlx::query_as::<_, (i64, bool, Option<String>)>("SELECT id, sent_to_kafka, pg2ch_rejected FROM user_logins")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, sent, why)| (id, (sent, why)))
            .collect();
    let (mut carried, mut rejected) = (0, 0);
    for (id, v) in &values {
        let (sent, why) = flags[id].clone();
        let key = vec![pg2ch::types::KeyPart::Int(*id)];
        let size = pg2ch::change::encode(&schema, &pg2ch::change::Change::upsert(v.clone(), 1)).len();
        match schema.check_row(v) {
            Ok(()) if pg2ch::change::counted_len(size, 1) <= pg2ch::change::MAX_MESSAGE_BYTES => {
                assert!(sent && why.is_none(), "seed {seed}: row {id} must be sent, got {why:?}");
                let got = in_ch.get(&key).map(|c| &c.values);
                // Compared whole, reported briefly: a name may be 900 kB.
                assert!(got == Some(v), "seed {seed}: row {id} in ClickHouse differs from PostgreSQL's");
                carried += 1;
            }
            Ok(()) => {
                let why = why.unwrap_or_default();
                assert!(!sent && why.contains("over the 900000-byte limit"), "seed {seed}: row {id}: {why}");
                assert!(!in_ch.contains_key(&key));
                rejected += 1;
            }
            Err(reason) => {
                assert!(!sent, "seed {seed}: row {id} cannot travel ({reason}) but was flagged sent");
                assert_eq!(why.as_deref(), Some(reason.as_str()), "seed {seed}: row {id}");
                assert!(!in_ch.contains_key(&key));
                rejected += 1;
            }
        }
    }
    assert!(carried > 50 && rejected > 50, "seed {seed}: the draw covers both outcomes ({carried}, {rejected})");
}

/// The services `pg2ch stack up` starts get none of the secrets in its
/// environment (`PG_PASS`, `CH_PASS` from a `.env`, `PGPASSWORD`): each
/// reads its own password from its configuration, and a process's
/// environment is readable through `/proc`.
#[test]
fn services_the_stack_starts_inherit_no_secret_and_run_unprivileged() {
    let dir = std::env::temp_dir().join(format!("pg2ch-scrub-{}", std::process::id()));
    let marker = format!("not-for-services-{}", std::process::id());
    let ports = [
        ("PG2CH_STACK_PG_PORT", common::free_port()),
        ("PG2CH_STACK_CH_PORT", common::free_port()),
        ("PG2CH_STACK_CH_TCP_PORT", common::free_port()),
        ("PG2CH_STACK_KAFKA_PORT", common::free_port()),
    ];
    let stack = |action: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pg2ch"));
        cmd.args(["stack", action]).env("PG2CH_STACK_DIR", &dir).stdin(Stdio::null());
        for (name, port) in ports {
            cmd.env(name, port.to_string());
        }
        for name in ["PG_PASS", "CH_PASS", "PGPASSWORD", "KAFKA_SASL_PASSWORD"] {
            cmd.env(name, &marker);
        }
        for name in ["PG_PASS_FILE", "CH_PASS_FILE"] {
            cmd.env_remove(name);
        }
        cmd.output().unwrap()
    };
    let up = stack("up");
    let pg_root = std::path::PathBuf::from(format!("{}-pg", dir.display()));
    let services = std::path::PathBuf::from(format!("{}-services", dir.display()));
    let pids: Vec<(&str, Option<String>)> = vec![
        ("ClickHouse", std::fs::read_to_string(services.join("ch/server.pid")).ok()),
        ("the broker", std::fs::read_to_string(services.join("broker/broker.pid")).ok()),
        (
            "PostgreSQL",
            std::fs::read_to_string(pg_root.join("data/postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next().map(str::to_owned)),
        ),
    ];
    // Each service's environment and the `Uid:` line of its status.
    type Seen = Result<(Vec<u8>, String), String>;
    let seen: Vec<(&str, Seen)> = pids
        .iter()
        .map(|(what, pid)| {
            let read = |pid: &str| -> Seen {
                let environ = std::fs::read(format!("/proc/{pid}/environ")).map_err(|e| e.to_string())?;
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
                let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default().to_owned();
                Ok((environ, uid))
            };
            (*what, pid.as_deref().map_or(Err("no pid file".to_owned()), |pid| read(pid.trim())))
        })
        .collect();
    let down = stack("down");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&pg_root);
    let _ = std::fs::remove_dir_all(&services);
    assert!(
        up.status.success(),
        "stack up: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(down.status.success(), "stack down: {}", String::from_utf8_lossy(&down.stderr));
    let we_are_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|ids| ids.split_whitespace().next() == Some("0"));
    for (what, seen) in seen {
        let (environ, uids) = seen.unwrap_or_else(|e| panic!("{what}'s process: {e}"));
        if we_are_root {
            // Real, effective, saved and file-system uid: none is root's.
            assert!(uids.split_whitespace().all(|uid| uid != "0"), "{what} runs as root (Uid: {uids})");
        }
        let leaked: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .filter(|v| v.contains(&marker))
            .map(|v| v.split('=').next().unwrap_or_default().to_owned())
            .collect();
        assert!(leaked.is_empty(), "{what} inherited {leaked:?}");
    }
}
