//! `verify` at size on the real services: a million rows, ten planted
//! differences on either side, found exactly by the range walk; `--repair`
//! and one `run --once` make the two sides agree again.

mod common;

use common::TestEnv;
use serde_json::Value;

fn ids(v: &Value) -> Vec<i64> {
    v["first_ids"].as_array().unwrap().iter().map(|i| i.as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_differences_in_a_million_rows_are_found_and_repaired() {
    let env = TestEnv::new("verify1m").await;
    env.ok(&["init", "--partitions", "4"]);
    env.ok(&["seed", "--rows", "1000000"]);
    env.ok(&["run", "--once"]);
    assert!(env.ok(&["verify"]).contains("verify: OK"));
    let pool = env.pg().await;
    let ch = env.ch().await;

    // Missing: rows flagged sent that never went anywhere, at ids spread
    // beyond the seeded ones (negative, far above).
    let missing = [-42i64, 1_234_567, 2_000_000, 9_000_000_000];
    sqlx::query(
        "INSERT INTO user_logins (id, username, event_time, sent_to_kafka)
         SELECT i, 'never sent', now(), TRUE FROM unnest($1::bigint[]) AS i",
    )
    .bind(&missing[..])
    .execute(&pool)
    .await
    .unwrap();
    // Changed in PostgreSQL after they were sent.
    let changed_pg = [17i64, 500_000, 999_999];
    // Behind pg2ch's back: with its trigger off, the rows stay flagged sent.
    sqlx::raw_sql("ALTER TABLE user_logins DISABLE TRIGGER pg2ch_unsent").execute(&pool).await.unwrap();
    sqlx::query("UPDATE user_logins SET username = username || '+' WHERE id = ANY($1)")
        .bind(&changed_pg[..])
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql("ALTER TABLE user_logins ENABLE TRIGGER pg2ch_unsent").execute(&pool).await.unwrap();
    // Changed in ClickHouse: a later copy of the same version (FINAL takes
    // the later insert of a tie) with a time one microsecond off.
    let changed_ch = [1i64, 250_000, 750_001];
    ch.client
        .query(
            "INSERT INTO user_logins (id, username, event_time_us, _pg2ch_version, _pg2ch_deleted)
             SELECT id, username, event_time_us + 1, _pg2ch_version, 0 FROM user_logins WHERE has(?, id)",
        )
        .bind(&changed_ch[..])
        .execute()
        .await
        .unwrap();

    let out = env.run(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["missing"]["count"], 4, "{report:#}");
    assert_eq!(ids(&report["missing"]), missing);
    let mut differing: Vec<i64> = changed_pg.iter().chain(&changed_ch).copied().collect();
    differing.sort();
    assert_eq!(report["differing"]["count"], 6, "{report:#}");
    assert_eq!(ids(&report["differing"]), differing[..5]);
    assert_eq!(report["extra"]["count"], 0);
    assert_eq!(report["deleted_but_present"]["count"], 0);
    assert_eq!(report["unmerged_copies"]["count"], 3, "the newer copies in ClickHouse await a merge");
    assert_eq!(report["postgres_sent"], 1_000_004);
    // Only the ranges around the ten ids were compared row by row.
    let by_row = report["ranges_compared_by_row"].as_u64().unwrap();
    assert!((1..=10).contains(&by_row), "{report:#}");

    let out = env.run(&["verify", "--repair"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("repair: flagged 10 rows unsent again"), "{text}");
    let unsent: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE NOT sent_to_kafka").fetch_one(&pool).await.unwrap();
    assert_eq!(unsent, 10);

    env.ok(&["run", "--once"]);
    let text = env.ok(&["verify"]);
    assert!(text.contains("verify: OK"), "{text}");
    assert!(
        text.contains("PostgreSQL rows: 1000004 (1000004 flagged sent); ClickHouse rows (FINAL): 1000004"),
        "{text}"
    );
}
