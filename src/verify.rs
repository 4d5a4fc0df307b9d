//! Reconciliation of PostgreSQL against ClickHouse, by id, at any size.
//!
//! [`verify`] walks the key space in ranges. For each range PostgreSQL
//! computes a count and a checksum on the server, ClickHouse's `FINAL` rows
//! stream through pg2ch and get the same checksum ([`crate::checksum`]), and
//! only ranges whose figures differ are split further, down to ranges small
//! enough to compare row by row with [`reconcile`]. Memory is bounded by the
//! leaf size whatever the table's, and the sides agree in one pass over each.
//!
//! The walk is written against two small traits ([`SourceSide`],
//! [`SinkSide`]), so the simulation's verify runs this code unchanged.
//! [`reconcile`] is a pure function over two id-ordered row lists with the
//! rules: every row flagged sent must be in ClickHouse exactly once as
//! `FINAL` reads it, with equal content, and nothing that PostgreSQL lacks
//! may be there. Copies awaiting a merge are reported, not failed.
//!
//! With `repair`, rows flagged sent that are missing or different in
//! ClickHouse are flagged unsent again, so the next `run` sends them through
//! the normal exactly-once path; nothing is written to ClickHouse.

use std::fmt;

use serde::Serialize;

use crate::event::LoginEvent;

/// How many ids (or ranges) each finding lists.
pub const SAMPLE: usize = 5;

/// A count and the first few ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub count: u64,
    pub first_ids: Vec<i64>,
}

impl Finding {
    fn add(&mut self, id: i64) {
        self.count += 1;
        if self.first_ids.len() < SAMPLE {
            self.first_ids.push(id);
        }
    }

    /// Appends findings from a range after those already held.
    fn absorb(&mut self, other: Finding) {
        self.count += other.count;
        let room = SAMPLE.saturating_sub(self.first_ids.len());
        self.first_ids.extend(other.first_ids.into_iter().take(room));
    }
}

/// A key range, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeyRange {
    pub first: i64,
    pub last: i64,
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.first, self.last)
    }
}

impl KeyRange {
    /// How many ids the range can hold (up to 2^64).
    pub fn width(&self) -> u128 {
        (self.last as i128 - self.first as i128 + 1) as u128
    }

    pub fn contains(&self, id: i64) -> bool {
        self.first <= id && id <= self.last
    }

    /// The smallest range holding both.
    pub fn union(self, other: KeyRange) -> KeyRange {
        KeyRange { first: self.first.min(other.first), last: self.last.max(other.last) }
    }

    /// Up to `parts` adjacent ranges of (nearly) equal width covering this one.
    pub fn split(&self, parts: u64) -> Vec<KeyRange> {
        let parts = (parts.max(1) as u128).min(self.width());
        let step = self.width() / parts;
        let extra = self.width() % parts;
        let mut first = self.first as i128;
        (0..parts)
            .map(|i| {
                let len = step + u128::from(i < extra);
                let last = first + len as i128 - 1;
                let range = KeyRange { first: first as i64, last: last as i64 };
                first = last + 1;
                range
            })
            .collect()
    }

    /// Which of `parts` (adjacent, ascending) holds `id`.
    pub fn part_of(parts: &[KeyRange], id: i64) -> Option<usize> {
        let i = parts.partition_point(|r| r.last < id);
        parts.get(i).filter(|r| r.contains(id)).map(|_| i)
    }
}

/// PostgreSQL's figures for a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceSummary {
    /// Rows not flagged rejected.
    pub rows: u64,
    /// Of those, rows flagged sent: what ClickHouse must hold.
    pub sent: u64,
    /// Sum of the sent rows' checksums.
    pub checksum: i128,
}

/// ClickHouse's figures for a range, as `FINAL` reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkSummary {
    pub rows: u64,
    pub checksum: i128,
}

impl SinkSummary {
    /// Counts one row as it streams by.
    pub fn add(&mut self, checksum: i64) {
        self.rows += 1;
        self.checksum += i128::from(checksum);
    }
}

/// The source (PostgreSQL, or the simulated table) as `verify` reads it.
#[allow(async_fn_in_trait)]
pub trait SourceSide {
    /// The smallest and largest id of any row; `None` for an empty table.
    async fn bounds(&mut self) -> anyhow::Result<Option<KeyRange>>;
    /// Counts and checksum of each range, computed where the rows are.
    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SourceSummary>>;
    /// The range's rows that can travel (not rejected, representable), with
    /// their sent flag, in id order.
    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<(LoginEvent, bool)>>;
    /// How many rows are flagged rejected, and the first few.
    async fn rejected(&mut self) -> anyhow::Result<Finding>;
    /// Flags these rows unsent if they are still flagged sent and no claim
    /// holds them; returns the ids it flagged.
    async fn flag_unsent(&mut self, ids: &[i64]) -> anyhow::Result<Vec<i64>>;
}

/// The sink (ClickHouse, or the simulated one) as `verify` reads it.
#[allow(async_fn_in_trait)]
pub trait SinkSide {
    /// The smallest and largest id stored, and how many rows are stored
    /// counting unmerged copies (an estimate of the work).
    async fn bounds(&mut self) -> anyhow::Result<(Option<KeyRange>, u64)>;
    /// Counts and checksum of each range (adjacent, ascending) as `FINAL`
    /// reads it, in one pass over their span.
    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SinkSummary>>;
    /// The range's rows as `FINAL` reads them, in id order.
    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<LoginEvent>>;
    /// Ids stored more than once (awaiting a merge): count and first few.
    async fn unmerged_copies(&mut self) -> anyhow::Result<Finding>;
}

/// How the key space is walked.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Rows per top-level range (about): the unit of progress. Large,
    /// because PostgreSQL scans a range that is most of a table sequentially
    /// and in parallel (10M rows: 1.1 s), and smaller ranges by index (ten
    /// ranges of 1M rows: 2.0 s), measured.
    pub chunk_rows: u64,
    /// Parts a differing range is split into.
    pub fan_out: u64,
    /// A differing range with at most this many rows on each side is
    /// compared row by row: the bound on memory.
    pub leaf_rows: u64,
    /// Flag missing and differing rows unsent so that the next run resends them.
    pub repair: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan { chunk_rows: 10_000_000, fan_out: 16, leaf_rows: 10_000, repair: false }
    }
}

/// What `--repair` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Repair {
    /// Rows flagged unsent again (missing or different in ClickHouse).
    pub flagged_unsent: Finding,
    /// Rows that should have been flagged but were not (held by an open claim,
    /// or changed meanwhile): verify again after the run.
    pub skipped: u64,
    /// Ids in ClickHouse that PostgreSQL lacks: left alone, since pg2ch
    /// carries no deletes yet.
    pub extra_left: u64,
}

/// Ranges whose figures differed and held a finding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RangeFinding {
    pub count: u64,
    pub first: Vec<KeyRange>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub postgres_rows: u64,
    pub postgres_sent: u64,
    pub clickhouse_final_rows: u64,
    /// Sent in PostgreSQL, absent from ClickHouse.
    pub missing: Finding,
    /// In ClickHouse, absent from PostgreSQL.
    pub extra: Finding,
    /// In both, with different content.
    pub differing: Finding,
    /// Shown more than once even by `FINAL` (should never happen).
    pub repeated_after_final: Finding,
    /// Stored more than once before merging (fine: `FINAL` and merges collapse them).
    pub unmerged_copies: Finding,
    /// In ClickHouse while the PostgreSQL row is not flagged sent yet (fine:
    /// a publish whose flag update is still to come).
    pub ahead_of_flag: Finding,
    /// Rows PostgreSQL holds that cannot be sent (flagged `pg2ch_rejected`);
    /// reported, not failed.
    pub rejected: Finding,
    /// Smallest ranges that held a failing finding.
    pub differing_ranges: RangeFinding,
    /// Ranges compared by checksum, and ranges compared row by row.
    pub ranges_checked: u64,
    pub ranges_compared_by_row: u64,
    /// Set by `--repair`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<Repair>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing.count == 0
            && self.extra.count == 0
            && self.differing.count == 0
            && self.repeated_after_final.count == 0
    }

    /// Adds a leaf's findings (ranges are visited in id order, so the
    /// samples stay the first ids).
    fn absorb(&mut self, leaf: Report) {
        self.missing.absorb(leaf.missing);
        self.extra.absorb(leaf.extra);
        self.differing.absorb(leaf.differing);
        self.repeated_after_final.absorb(leaf.repeated_after_final);
        self.ahead_of_flag.absorb(leaf.ahead_of_flag);
    }
}

/// One id's fate in a row-by-row comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Missing,
    Extra,
    Differing,
    RepeatedAfterFinal,
    AheadOfFlag,
}

/// Walks two id-ordered lists, telling `on` about every id that is not
/// simply equal on both sides.
pub fn compare(postgres: &[(LoginEvent, bool)], clickhouse: &[LoginEvent], mut on: impl FnMut(Seen, i64)) {
    let (mut i, mut j) = (0, 0);
    while i < postgres.len() || j < clickhouse.len() {
        match (postgres.get(i), clickhouse.get(j)) {
            (Some((pg, sent)), Some(ch)) if pg.id == ch.id => {
                if pg != ch {
                    on(Seen::Differing, pg.id);
                }
                if !sent {
                    on(Seen::AheadOfFlag, pg.id);
                }
                j += 1;
                while clickhouse.get(j).is_some_and(|next| next.id == pg.id) {
                    on(Seen::RepeatedAfterFinal, pg.id);
                    j += 1;
                }
                i += 1;
            }
            (Some((pg, sent)), ch) if ch.is_none_or(|ch| pg.id < ch.id) => {
                if *sent {
                    on(Seen::Missing, pg.id);
                }
                i += 1;
            }
            (_, Some(ch)) => {
                on(Seen::Extra, ch.id);
                j += 1;
            }
            (_, None) => unreachable!("loop condition"),
        }
    }
}

/// Compares PostgreSQL rows (with their sent flag) and ClickHouse `FINAL`
/// rows. Both must be ordered by id.
pub fn reconcile(postgres: &[(LoginEvent, bool)], clickhouse: &[LoginEvent]) -> Report {
    reconcile_noting(postgres, clickhouse, |_, _| {})
}

/// [`reconcile`], also telling `also` about every id it reports.
fn reconcile_noting(
    postgres: &[(LoginEvent, bool)],
    clickhouse: &[LoginEvent],
    mut also: impl FnMut(Seen, i64),
) -> Report {
    let mut report = Report {
        postgres_rows: postgres.len() as u64,
        postgres_sent: postgres.iter().filter(|(_, sent)| *sent).count() as u64,
        clickhouse_final_rows: clickhouse.len() as u64,
        ..Report::default()
    };
    compare(postgres, clickhouse, |seen, id| {
        also(seen, id);
        match seen {
            Seen::Missing => &mut report.missing,
            Seen::Extra => &mut report.extra,
            Seen::Differing => &mut report.differing,
            Seen::RepeatedAfterFinal => &mut report.repeated_after_final,
            Seen::AheadOfFlag => &mut report.ahead_of_flag,
        }
        .add(id)
    });
    report
}

/// Top-level ranges compared in one go.
const TOP_BATCH: usize = 2;

/// What is left to look at.
enum Work {
    /// Compare these adjacent ranges by their figures; `top` for the
    /// top-level ranges, whose figures are the report's totals.
    Figures { ranges: Vec<KeyRange>, top: bool },
    /// Compare this range row by row.
    Rows(KeyRange),
}

/// Reconciles the whole table range by range (see the module comment).
/// `progress` is told (top-level ranges done, their number) as it goes.
pub async fn verify<S: SourceSide, K: SinkSide>(
    source: &mut S,
    sink: &mut K,
    plan: Plan,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Report> {
    let (pg_bounds, (ch_bounds, stored)) = futures::try_join!(source.bounds(), sink.bounds())?;
    let mut report = Report::default();
    let mut repair = plan.repair.then(Repair::default);
    let whole = match (pg_bounds, ch_bounds) {
        (Some(a), Some(b)) => Some(a.union(b)),
        (a, b) => a.or(b),
    };
    if let Some(whole) = whole {
        let chunks = whole.split(stored.div_ceil(plan.chunk_rows.max(1)).clamp(1, 10_000));
        let total = chunks.len() as u64;
        progress(0, total);
        // Depth first, in id order, so that the samples are the first ids.
        // Top-level ranges go in batches: each side then works through a
        // batch without waiting for the other after every range.
        let mut work: Vec<Work> =
            chunks.chunks(TOP_BATCH).rev().map(|c| Work::Figures { ranges: c.to_vec(), top: true }).collect();
        let mut done = 0;
        while let Some(item) = work.pop() {
            match item {
                Work::Figures { ranges, top } => {
                    let (pg, ch) = futures::try_join!(source.summaries(&ranges), sink.summaries(&ranges))?;
                    anyhow::ensure!(
                        pg.len() == ranges.len() && ch.len() == ranges.len(),
                        "verify: a side answered for {} and {} of {} ranges",
                        pg.len(),
                        ch.len(),
                        ranges.len()
                    );
                    report.ranges_checked += ranges.len() as u64;
                    if top {
                        report.postgres_rows += pg.iter().map(|s| s.rows).sum::<u64>();
                        report.postgres_sent += pg.iter().map(|s| s.sent).sum::<u64>();
                        report.clickhouse_final_rows += ch.iter().map(|s| s.rows).sum::<u64>();
                    }
                    for ((range, pg), ch) in ranges.iter().zip(&pg).zip(&ch).rev() {
                        if pg.sent == ch.rows && pg.checksum == ch.checksum {
                            continue;
                        }
                        let small = pg.rows.max(ch.rows) <= plan.leaf_rows || range.width() <= 1;
                        work.push(if small {
                            Work::Rows(*range)
                        } else {
                            Work::Figures { ranges: range.split(plan.fan_out), top: false }
                        });
                    }
                    if top {
                        done += ranges.len() as u64;
                        progress(done, total);
                    }
                }
                Work::Rows(range) => {
                    report.ranges_compared_by_row += 1;
                    let (pg, ch) = futures::try_join!(source.rows(range), sink.rows(range))?;
                    // Rows that repair flags unsent: sent, and missing or different.
                    let mut resend = Vec::new();
                    let leaf = reconcile_noting(&pg, &ch, |seen, id| {
                        if plan.repair && matches!(seen, Seen::Missing | Seen::Differing) {
                            resend.push(id);
                        }
                    });
                    if !leaf.ok() {
                        report.differing_ranges.count += 1;
                        if report.differing_ranges.first.len() < SAMPLE {
                            report.differing_ranges.first.push(range);
                        }
                    }
                    if let Some(repair) = repair.as_mut() {
                        repair.extra_left += leaf.extra.count;
                        resend.dedup();
                        let flagged = source.flag_unsent(&resend).await?;
                        repair.skipped += resend.len().saturating_sub(flagged.len()) as u64;
                        flagged.into_iter().for_each(|id| repair.flagged_unsent.add(id));
                    }
                    report.absorb(leaf);
                }
            }
        }
    }
    report.repair = repair;
    if stored > report.clickhouse_final_rows {
        report.unmerged_copies = sink.unmerged_copies().await?;
    }
    report.rejected = source.rejected().await?;
    Ok(report)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "PostgreSQL rows: {} ({} flagged sent); ClickHouse rows (FINAL): {}",
            self.postgres_rows, self.postgres_sent, self.clickhouse_final_rows
        )?;
        let lines = [
            ("sent rows missing from ClickHouse", &self.missing),
            ("ids in ClickHouse that PostgreSQL lacks", &self.extra),
            ("rows whose content differs", &self.differing),
            ("ids shown twice by FINAL", &self.repeated_after_final),
            ("ids stored more than once before merging (not an error)", &self.unmerged_copies),
            ("rows in ClickHouse not yet flagged sent (not an error)", &self.ahead_of_flag),
            ("rows rejected as not representable (see pg2ch_rejected; not sent)", &self.rejected),
        ];
        for (what, finding) in lines {
            if finding.count > 0 {
                writeln!(f, "{what}: {} (first: {:?})", finding.count, finding.first_ids)?;
            }
        }
        let ranges = &self.differing_ranges;
        if ranges.count > 0 {
            let first: Vec<String> = ranges.first.iter().map(KeyRange::to_string).collect();
            writeln!(f, "id ranges holding them: {} (first: {})", ranges.count, first.join(", "))?;
        }
        writeln!(
            f,
            "ranges checked: {} by count and checksum, {} row by row",
            self.ranges_checked, self.ranges_compared_by_row
        )?;
        if let Some(repair) = &self.repair {
            let flagged = &repair.flagged_unsent;
            writeln!(f, "repair: flagged {} rows unsent again (first: {:?})", flagged.count, flagged.first_ids)?;
            if repair.skipped > 0 {
                writeln!(
                    f,
                    "repair: {} rows left as they were (held by an open claim, or changed meanwhile)",
                    repair.skipped
                )?;
            }
            if repair.extra_left > 0 {
                writeln!(
                    f,
                    "repair: {} ids in ClickHouse that PostgreSQL lacks left alone (pg2ch carries no deletes yet)",
                    repair.extra_left
                )?;
            }
            if flagged.count > 0 {
                writeln!(f, "repair: `pg2ch run --once` sends them again; verify after it")?;
            }
        }
        write!(f, "verify: {}", if self.ok() { "OK" } else { "FAILED" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, name: &str) -> LoginEvent {
        LoginEvent { id, username: name.into(), event_time_us: id * 1000 }
    }

    #[test]
    fn finds_missing_extra_and_altered_rows() {
        let pg = vec![(ev(1, "a"), true), (ev(2, "b"), true), (ev(3, "c"), false), (ev(4, "d"), true)];
        let ch = vec![ev(1, "a"), ev(2, "B"), ev(3, "c"), ev(9, "z")];
        let r = reconcile(&pg, &ch);
        assert_eq!(r.missing.first_ids, vec![4]);
        assert_eq!(r.extra.first_ids, vec![9]);
        assert_eq!(r.differing.first_ids, vec![2]);
        assert_eq!(r.ahead_of_flag.first_ids, vec![3]);
        assert!(!r.ok());
    }

    #[test]
    fn equal_sides_pass_and_unsent_rows_may_be_absent() {
        let pg = vec![(ev(1, "a"), true), (ev(2, "b"), false)];
        let r = reconcile(&pg, &[ev(1, "a")]);
        assert!(r.ok(), "{r}");
    }
}
