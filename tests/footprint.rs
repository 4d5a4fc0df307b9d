//! What pg2ch costs the source database's users, against real services:
//! an application role with nothing but DML rights keeps every DML after
//! `init`; `init` never queues the table's writers behind a long
//! transaction and rebuilds an index an interrupted build left invalid;
//! a user's statement fires none of pg2ch's statement triggers (an older
//! pg2ch's are dropped by `init` and by a start).

mod common;

use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestEnv, eventually};
use sqlx::{Connection, PgPool};

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A new login role of this test, `<test>_<what>`, with a random password.
async fn login_role(env: &TestEnv, pool: &PgPool, what: &str) -> (String, String) {
    let role = format!("{}_{what}", env.name);
    let password = format!("pw{}", rand::random::<u64>());
    // PostgreSQL quotes the name and the password itself.
    let create: String = sqlx::query_scalar("SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)")
        .bind(&role)
        .bind(&password)
        .fetch_one(pool)
        .await
        .unwrap();
    exec(pool, &create).await;
    (role, password)
}

/// Runs `pg2ch args` as `role` (name, password); it must succeed. Its output.
fn as_role(env: &TestEnv, (role, password): (&str, &str), args: &[&str]) -> String {
    let out = env.command(args).env("PG_USER", role).env("PG_PASS", password).output().unwrap();
    assert!(out.status.success(), "pg2ch {args:?} as role {role} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The table the tests carry: a key, a value, a few hundred rows.
async fn accounts(env: &TestEnv, name: &str) -> PgPool {
    let pool = env.pg().await;
    exec(&pool, &format!("CREATE TABLE {name} (id int PRIMARY KEY, balance int NOT NULL)")).await;
    exec(&pool, &format!("INSERT INTO {name} SELECT g, g * 10 FROM generate_series(1, 300) g")).await;
    pool
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_role_with_only_dml_rights_keeps_every_dml_after_init() {
    let env = TestEnv::new("dmlrole").await;
    let pool = accounts(&env, "accounts").await;
    env.ok(&["init", "--table", "accounts"]);
    // A role with DML on the table and nothing else: no right on `_pg2ch`.
    let role = format!("{}_app", env.name);
    exec(&pool, &format!("CREATE ROLE {role} NOLOGIN")).await;
    exec(&pool, &format!("GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO {role}")).await;
    let mut app = pool.acquire().await.unwrap();
    sqlx::query(&format!("SET ROLE {role}")).execute(&mut *app).await.unwrap();
    for sql in [
        "INSERT INTO accounts VALUES (1001, 5)",
        "UPDATE accounts SET balance = balance + 1 WHERE id <= 50",
        // The key changes: the old key goes to pg2ch's outbox.
        "UPDATE accounts SET id = id + 2000 WHERE id BETWEEN 51 AND 60",
        "DELETE FROM accounts WHERE id BETWEEN 61 AND 80",
    ] {
        sqlx::query(sql)
            .execute(&mut *app)
            .await
            .unwrap_or_else(|e| panic!("the application role's {sql:?} failed after init: {e}"));
    }
    sqlx::query("RESET ROLE").execute(&mut *app).await.unwrap();
    drop(app);
    let outbox = scalar(&pool, "SELECT count(*) FROM _pg2ch.\"public.accounts\"").await;
    assert_eq!(outbox, 30, "the deleted and re-keyed keys are in the outbox");
    env.ok(&["run", "--once", "--table", "accounts"]);
    env.ok(&["verify", "--table", "accounts"]);
    let schema = env.table("accounts").await;
    env.assert_same_rows(&schema, "after the application role's changes").await;
    exec(&pool, &format!("REVOKE ALL ON accounts FROM {role}")).await;
    exec(&pool, &format!("DROP ROLE {role}")).await;
}

/// Lines a child process writes to stderr, collected as they come.
fn stderr_lines(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr piped");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn init_behind_a_long_transaction_never_queues_the_tables_writers() {
    let env = TestEnv::new("onlineinit").await;
    let pool = accounts(&env, "busy").await;
    // A long reader: its lock conflicts with every ALTER TABLE and CREATE TRIGGER.
    let mut long = sqlx::PgConnection::connect_with(&pool.connect_options()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut long).await.unwrap();
    sqlx::query("SELECT count(*) FROM busy").execute(&mut long).await.unwrap();
    let mut init =
        env.command(&["init", "--table", "busy"]).stderr(std::process::Stdio::piped()).spawn().expect("pg2ch init");
    let log = stderr_lines(&mut init);
    eventually("init says the table is locked and retries", Duration::from_secs(60), || {
        let found = log.lock().unwrap().iter().any(|l| l.contains("locked by other sessions"));
        async move { found }
    })
    .await;
    // Writers go on: none waits behind init for longer than a second
    // (without a lock timeout, init's ALTER would queue every one of them
    // behind the long transaction).
    let mut writer = pool.acquire().await.unwrap();
    sqlx::query("SET lock_timeout = '1s'").execute(&mut *writer).await.unwrap();
    for i in 0..20 {
        sqlx::query("UPDATE busy SET balance = balance + 1 WHERE id = $1")
            .bind(i % 300 + 1)
            .execute(&mut *writer)
            .await
            .unwrap_or_else(|e| panic!("a writer queued behind init: {e}"));
    }
    sqlx::query("COMMIT").execute(&mut long).await.unwrap();
    let status = tokio::task::spawn_blocking(move || init.wait()).await.unwrap().unwrap();
    assert!(status.success(), "init failed once the long transaction ended:\n{}", log.lock().unwrap().join("\n"));
    let valid =
        scalar(&pool, "SELECT count(*) FROM pg_index WHERE indexrelid = 'busy_unsent_idx'::regclass AND indisvalid")
            .await;
    assert_eq!(valid, 1, "the partial index of unsent rows is built and valid");
    env.ok(&["run", "--once", "--table", "busy"]);
    env.ok(&["verify", "--table", "busy"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_left_invalid_by_an_interrupted_build_is_built_again() {
    let env = TestEnv::new("invalididx").await;
    let pool = accounts(&env, "ledger").await;
    exec(&pool, "UPDATE ledger SET balance = 7 WHERE id <= 2").await;
    // A concurrent build that fails leaves its index behind, invalid, under
    // the name pg2ch uses.
    let failed =
        sqlx::raw_sql("CREATE UNIQUE INDEX CONCURRENTLY ledger_unsent_idx ON ledger (balance)").execute(&pool).await;
    assert!(failed.is_err(), "the unique build fails on duplicate balances");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pg_index WHERE indexrelid = 'ledger_unsent_idx'::regclass AND NOT indisvalid"
        )
        .await,
        1
    );
    env.ok(&["init", "--table", "ledger"]);
    let definition: String = sqlx::query_scalar(
        "SELECT pg_get_indexdef(x.indexrelid) FROM pg_index x
         WHERE x.indexrelid = 'ledger_unsent_idx'::regclass AND x.indisvalid",
    )
    .fetch_one(&pool)
    .await
    .expect("a valid index after init");
    assert!(
        definition.contains("(id)") && definition.contains("WHERE (NOT sent_to_kafka)"),
        "the index is pg2ch's: {definition}"
    );
    env.ok(&["run", "--once", "--table", "ledger"]);
    env.ok(&["verify", "--table", "ledger"]);
}

/// pg2ch's triggers on `table`: (per row, per statement).
async fn own_triggers(pool: &PgPool, table: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE tgtype & 1 = 1), count(*) FILTER (WHERE tgtype & 1 = 0) FROM pg_trigger
         WHERE tgrelid = $1::regclass AND tgname LIKE 'pg2ch%'",
    )
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// What an older pg2ch installed to wake idle producers: a statement
/// trigger on each table, its function and the registry it read.
async fn older_wake_objects(pool: &PgPool, tables: &[&str]) {
    exec(
        pool,
        "CREATE UNLOGGED TABLE IF NOT EXISTS _pg2ch.waiting (channel text, pid int, PRIMARY KEY (channel, pid))",
    )
    .await;
    exec(
        pool,
        "CREATE OR REPLACE FUNCTION _pg2ch.notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF EXISTS (SELECT 1 FROM _pg2ch.waiting WHERE channel = TG_ARGV[0]) THEN PERFORM pg_notify(TG_ARGV[0], ''); \
         END IF; RETURN NULL; END $$",
    )
    .await;
    for t in tables {
        exec(
            pool,
            &format!(
                "CREATE TRIGGER pg2ch_notify AFTER INSERT OR DELETE OR UPDATE ON {t} FOR EACH STATEMENT \
                 EXECUTE FUNCTION _pg2ch.notify('pg2ch_{t}')"
            ),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn user_statements_fire_no_statement_trigger_and_older_ones_are_dropped() {
    let env = TestEnv::new("nonotify").await;
    env.ok(&["init"]);
    let pool = env.pg().await;
    assert_eq!(own_triggers(&pool, "user_logins").await, (3, 0), "row triggers only");
    let gone =
        "SELECT (to_regprocedure('_pg2ch.notify()') IS NULL AND to_regclass('_pg2ch.waiting') IS NULL)::int::int8";
    // An upgrade: the next start drops the older trigger and, no table
    // using them any more, its function and registry.
    older_wake_objects(&pool, &["user_logins"]).await;
    assert_eq!(own_triggers(&pool, "user_logins").await, (3, 1));
    exec(&pool, "INSERT INTO user_logins (username) VALUES ('across the upgrade')").await;
    env.ok(&["run", "--once"]);
    assert_eq!(own_triggers(&pool, "user_logins").await, (3, 0), "the start dropped it");
    assert_eq!(scalar(&pool, gone).await, 1, "nothing uses them: dropped");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM user_logins WHERE NOT sent_to_kafka").await, 0);
    // `init` drops it too, and keeps the function while another table,
    // not started since, still fires it.
    exec(&pool, "CREATE TABLE other (id int PRIMARY KEY)").await;
    older_wake_objects(&pool, &["user_logins", "other"]).await;
    env.ok(&["init"]);
    assert_eq!(own_triggers(&pool, "user_logins").await, (3, 0), "init dropped it");
    assert_eq!(scalar(&pool, gone).await, 0, "still in use by the other table");
    exec(&pool, "INSERT INTO other VALUES (1)").await;
    exec(&pool, "DROP TRIGGER pg2ch_notify ON other").await;
    env.ok(&["init"]);
    assert_eq!(scalar(&pool, gone).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_as_a_role_holding_only_the_grants_init_gives() {
    let env = TestEnv::new("leastpriv").await;
    let pool = accounts(&env, "accounts").await;
    let (role, password) = login_role(&env, &pool, "runner").await;
    env.ok(&["init", "--table", "accounts", "--grant", &role]);
    let as_runner = |args: &[&str]| as_role(&env, (&role, &password), args);
    as_runner(&["run", "--once", "--table", "accounts"]);
    exec(&pool, "UPDATE accounts SET balance = balance - 1 WHERE id % 7 = 0").await;
    exec(&pool, "DELETE FROM accounts WHERE id % 11 = 0").await;
    as_runner(&["run", "--once", "--table", "accounts"]);
    as_runner(&["verify", "--table", "accounts"]);
    as_runner(&["status", "--table", "accounts"]);
    // The role holds nothing beyond the grants: it cannot change the table's rows.
    let mut runner = pool.acquire().await.unwrap();
    sqlx::query(&format!("SET ROLE {role}")).execute(&mut *runner).await.unwrap();
    let refused = sqlx::query("UPDATE accounts SET balance = 0 WHERE id = 1").execute(&mut *runner).await;
    assert!(refused.is_err(), "the runner may write pg2ch's columns only");
    sqlx::query("RESET ROLE").execute(&mut *runner).await.unwrap();
    drop(runner);
    let schema = env.table("accounts").await;
    env.assert_same_rows(&schema, "carried by the least-privileged role").await;
    exec(&pool, &format!("DROP OWNED BY {role}")).await;
    exec(&pool, &format!("DROP ROLE {role}")).await;
}

/// `status` and `verify` (without `--repair`) write nothing: they work as a
/// role that can only read, and `status` neither adds a column PostgreSQL
/// gained to ClickHouse nor flags the rows holding it unsent (a running
/// pipeline's start does that).
#[tokio::test(flavor = "multi_thread")]
async fn status_and_verify_only_read() {
    let env = TestEnv::new("readonly").await;
    let pool = accounts(&env, "accounts").await;
    env.ok(&["init", "--table", "accounts"]);
    env.ok(&["run", "--once", "--table", "accounts"]);
    let (role, password) = login_role(&env, &pool, "reader").await;
    for sql in [
        format!("GRANT USAGE ON SCHEMA public, _pg2ch TO {role}"),
        format!("GRANT SELECT ON accounts TO {role}"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA _pg2ch TO {role}"),
    ] {
        exec(&pool, &sql).await;
    }
    let as_reader = |args: &[&str]| as_role(&env, (&role, &password), args);
    assert!(as_reader(&["verify", "--table", "accounts"]).contains("verify: OK"));
    // A column whose default every row reads: a start would resend them all.
    exec(&pool, "ALTER TABLE accounts ADD COLUMN extra int DEFAULT 7").await;
    let status = as_reader(&["status", "--table", "accounts"]);
    assert!(status.contains("unsent changes in PostgreSQL: 0"), "{status}");
    let ch = env.ch().await;
    let columns: u64 = ch
        .client
        .query("SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = 'accounts' AND name = 'extra'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(columns, 0, "status added a column to ClickHouse");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM accounts WHERE NOT sent_to_kafka").await, 0, "status flagged rows");
    exec(&pool, &format!("DROP OWNED BY {role}")).await;
    exec(&pool, &format!("DROP ROLE {role}")).await;
}

/// A producer whose claim waits behind a user's lock gives up after its
/// call timeout, and so does the server: the waiting statement ends there
/// too (a backend waiting for a lock does not notice its client left, and
/// would wait, and queue others behind it, as long as the lock is held).
#[tokio::test(flavor = "multi_thread")]
async fn a_producer_statement_waiting_behind_a_lock_ends_on_the_server_too() {
    let env = TestEnv::new("stmttimeout").await;
    let pool = accounts(&env, "held").await;
    env.ok(&["init", "--table", "held"]);
    env.ok(&["run", "--once", "--table", "held"]);
    exec(&pool, "UPDATE held SET balance = balance + 1 WHERE id = 1").await;
    let mut user = pool.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *user).await.unwrap();
    sqlx::query("LOCK TABLE held IN ACCESS EXCLUSIVE MODE").execute(&mut *user).await.unwrap();
    let out = env.run(&["produce", "--once", "--table", "held", "--timeout-secs", "1"]);
    assert!(!out.status.success(), "the claim cannot get past the lock");
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND application_name = 'pg2ch' AND wait_event_type = 'Lock'";
    eventually("no pg2ch statement waits on the server any more", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move { scalar(&pool, waiting).await == 0 }
    })
    .await;
    sqlx::query("ROLLBACK").execute(&mut *user).await.unwrap();
    drop(user);
    env.ok(&["run", "--once", "--table", "held"]);
    env.ok(&["verify", "--table", "held"]);
}

/// Changes made while pg2ch's triggers are disabled are never sent:
/// `status` and `verify` say so, naming the triggers, and `verify
/// --repair` heals what was missed once they are enabled again.
#[tokio::test(flavor = "multi_thread")]
async fn disabled_triggers_are_reported() {
    let env = TestEnv::new("disabledtrg").await;
    let pool = accounts(&env, "quiet").await;
    env.ok(&["init", "--table", "quiet"]);
    env.ok(&["run", "--once", "--table", "quiet"]);
    assert!(!env.ok(&["status", "--table", "quiet"]).contains("WARNING"));
    exec(&pool, "ALTER TABLE quiet DISABLE TRIGGER pg2ch_unsent").await;
    exec(&pool, "UPDATE quiet SET balance = -1 WHERE id = 7").await;
    let status = env.ok(&["status", "--table", "quiet"]);
    assert!(status.contains("WARNING: pg2ch's triggers are disabled (quiet.pg2ch_unsent)"), "{status}");
    let out = env.run(&["verify", "--table", "quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pg2ch's triggers are disabled (quiet.pg2ch_unsent)"), "{err}");
    assert_eq!(out.status.code(), Some(1), "the missed change is a difference: {err}");
    exec(&pool, "ALTER TABLE quiet ENABLE TRIGGER pg2ch_unsent").await;
    env.run(&["verify", "--table", "quiet", "--repair"]);
    env.ok(&["run", "--once", "--table", "quiet"]);
    env.ok(&["verify", "--table", "quiet"]);
}

/// `pgbench` (it ships with PostgreSQL) on the test's database.
fn pgbench(env: &TestEnv, args: &[&str]) -> std::process::Command {
    let pg = &env.settings.pg;
    let mut cmd = std::process::Command::new("pgbench");
    cmd.args(["-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user])
        .args(args)
        .arg(&pg.database)
        .env("PGPASSWORD", pg.password.expose());
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_runs_while_the_pipeline_is_killed_and_clickhouse_ends_with_postgres_balances() {
    let env = TestEnv::new("pgbench").await;
    let init = pgbench(&env, &["-i", "-q", "-s", "1"]).output().expect("pgbench (it ships with PostgreSQL)");
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    let tables = ["--table", "pgbench_accounts", "--table", "pgbench_branches", "--table", "pgbench_tellers"];
    env.ok(&[&["init"][..], &tables].concat());
    let run = [&["run"][..], &tables].concat();
    let start = || env.command(&run).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn();
    let mut pipeline = start().expect("pg2ch run");
    let workload = pgbench(&env, &["-n", "-c", "4", "-j", "2", "-T", "12"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench");
    let pool = env.pg().await;
    let ch = env.ch().await;
    let tellers = env.table("pgbench_tellers").await;
    // Killed once the load's changes are flowing into ClickHouse.
    eventually("pgbench's changes reach ClickHouse", Duration::from_secs(60), || {
        let (ch, tellers) = (&ch, &tellers);
        async move {
            let moved: i64 = ch
                .client
                .query(&format!("SELECT toInt64(count()) FROM {} WHERE tbalance <> 0", tellers.name))
                .fetch_one()
                .await
                .unwrap_or(0);
            moved > 0
        }
    })
    .await;
    pipeline.kill().unwrap();
    pipeline.wait().unwrap();
    let mut pipeline = start().expect("pg2ch run again");
    let out = tokio::task::spawn_blocking(move || workload.wait_with_output()).await.unwrap().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !report.lines().any(|l| l.starts_with("number of failed transactions") && !l.contains(": 0 ")),
        "no pgbench transaction fails:\n{report}"
    );
    let _ = std::process::Command::new("kill").arg(pipeline.id().to_string()).status();
    pipeline.wait().unwrap();
    env.ok(&[&["run", "--once"][..], &tables].concat());
    env.ok(&[&["verify"][..], &tables].concat());
    for (table, column) in
        [("pgbench_accounts", "abalance"), ("pgbench_branches", "bbalance"), ("pgbench_tellers", "tbalance")]
    {
        let pg = scalar(&pool, &format!("SELECT coalesce(sum({column}), 0)::int8 FROM {table}")).await;
        let clickhouse: i64 = ch
            .client
            .query(&format!("SELECT toInt64(ifNull(sum({column}), 0)) FROM {table} FINAL WHERE _pg2ch_deleted = 0"))
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(clickhouse, pg, "{table}: ClickHouse's balances are PostgreSQL's");
    }
}
