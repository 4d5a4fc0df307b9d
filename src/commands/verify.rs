//! `pg2ch verify`: reconciliation of each table, on the configured server
//! or on each replica of a cluster, with repair.

use std::time::Instant;

use anyhow::Context;
use sqlx::PgPool;

use crate::clickhouse::ClickHouse;
use crate::clickhouse::verify::ChVerifySide;
use crate::postgres;
use crate::verify::{self, Report};

use super::init::keep_versions_ahead;
use super::peak_rss_mb;
use super::{Settings, tables};

/// Reconciles each table's PostgreSQL and ClickHouse sides range by range
/// ([`verify::verify`]); with `repair`, flags what is missing or different
/// unsent again and records the deletion of what ClickHouse holds and
/// PostgreSQL lacks. A progress bar shows on a terminal.
pub async fn verify(s: &Settings, repair: bool) -> anyhow::Result<Vec<Report>> {
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    let ch = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    verify_on(s, &pool, &ch, repair, None).await
}

/// [`verify()`] against the configured ClickHouse, then against each replica
/// in `CH_REPLICAS` alone (without repairing), each report naming its
/// replica. On a sharded cluster a replica is compared with the rows its
/// shard owns.
pub async fn verify_each_replica(s: &Settings, repair: bool) -> anyhow::Result<Vec<Report>> {
    anyhow::ensure!(
        !s.ch.replicas.is_empty(),
        "--each-replica needs the replicas' HTTP addresses in CH_REPLICAS (host:port,host:port)"
    );
    let pool = postgres::connect(&s.pg, 1, s.timeouts.call).await?;
    let main = ClickHouse::connect(&s.ch, s.timeouts.call).await?;
    let mut reports = verify_on(s, &pool, &main, repair, None).await?;
    let sharded = main.cluster.as_ref().filter(|c| c.shards() > 1);
    for replica in &s.ch.replicas {
        let ch = ClickHouse::connect(&s.ch.at(replica)?, s.timeouts.call).await?;
        let (shard, label) = match sharded {
            None => (None, format!("replica {replica}")),
            Some(c) => {
                let index = c.shard_of(&ch.client, replica, s.timeouts.call).await?;
                (Some((index, c.shards())), format!("replica {replica} (shard {})", index + 1))
            }
        };
        for mut report in verify_on(s, &pool, &ch, false, shard).await.with_context(|| label.clone())? {
            report.table = format!("{} on {label}", report.table);
            reports.push(report);
        }
    }
    Ok(reports)
}

/// [`verify`] against the ClickHouse `ch`; with `shard` (index, shards),
/// against the rows that shard owns.
async fn verify_on(
    s: &Settings,
    pool: &PgPool,
    ch: &ClickHouse,
    repair: bool,
    shard: Option<(usize, usize)>,
) -> anyhow::Result<Vec<Report>> {
    let mut reports = Vec::new();
    for table in tables(s, pool, false).await? {
        ch.check_table(&table.schema).await?;
        if repair {
            // What repair flags goes again, and must outrank what is there.
            keep_versions_ahead(pool, ch, &table.schema).await?;
        }
        let disabled = postgres::disabled_triggers(pool, table.oid).await?;
        if !disabled.is_empty() {
            tracing::warn!("{}: {}", table.schema, postgres::disabled_warning(&disabled));
        }
        let mut pg = postgres::PgVerifySide::open(pool, table.schema.clone()).await?;
        if let Some((index, shards)) = shard {
            pg = pg.only_shard(index, shards);
        }
        let mut sink = ChVerifySide { ch: ch.clone(), schema: table.schema.clone() };
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("verify: {bar:30} {pos}/{len} key ranges, {elapsed} (eta {eta})")
                .expect("a fixed template"),
        );
        let plan = verify::Plan { repair, ..verify::Plan::default() };
        let started = Instant::now();
        let report = verify::verify(&table.schema, &mut pg, &mut sink, plan, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .await;
        bar.finish_and_clear();
        tracing::info!(
            "verify {}: took {:.1?} (peak RSS {} MB)",
            table.schema,
            started.elapsed(),
            peak_rss_mb().map_or("?".into(), |m| m.to_string())
        );
        reports.push(report?);
    }
    Ok(reports)
}
