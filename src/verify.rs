//! Reconciliation of a PostgreSQL table against its ClickHouse table, by
//! key, at any size, every column compared.
//!
//! [`verify`] walks a coordinate of the key in ranges: the key itself when
//! it is one integer column, else a 64-bit hash of it ([`crate::checksum::walk`]),
//! which spreads any key evenly. For each range PostgreSQL computes a count
//! and a checksum on the server, ClickHouse's live rows (`FINAL`, deleted
//! keys left out) stream through pg2ch and get the same checksum, and only
//! ranges whose figures differ are split further, down to ranges small
//! enough to compare row by row with [`compare`]. Memory is bounded by the
//! leaf size whatever the table's, and the sides agree in one pass over each.
//!
//! The walk is written against two small traits ([`SourceSide`],
//! [`SinkSide`]), so the simulation's verify runs this code unchanged.
//! The rules: every row flagged sent must be in ClickHouse, live, with the
//! same content (every column; versions are not compared: two claims of an
//! unchanged row can leave ClickHouse the later one's version while
//! PostgreSQL records the earlier one's); a key ClickHouse holds live must
//! exist in PostgreSQL (or be a deletion still to be sent) and be a row
//! that can travel (a row flagged `pg2ch_rejected` is deleted downstream);
//! a row changed and not yet sent, rows that cannot be sent, and copies
//! awaiting a merge are reported, not failed.
//!
//! With `repair`, rows flagged sent that are missing, different or deleted
//! in ClickHouse are flagged unsent again, and keys ClickHouse holds that
//! PostgreSQL lacks get a deletion recorded, so the next `run` sends both
//! through the normal exactly-once path; nothing is written to ClickHouse.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::change::Change;
use crate::schema::TableSchema;
use crate::types::{Key, Value};

/// How many keys (or ranges) each finding lists.
pub const SAMPLE: usize = 5;

/// A count and the first few keys, each as its message key's JSON (a
/// number for an integer key).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Finding {
    pub count: u64,
    pub first_ids: Vec<serde_json::Value>,
}

impl Finding {
    pub fn add(&mut self, key: &Key) {
        self.count += 1;
        if self.first_ids.len() < SAMPLE {
            self.first_ids.push(key_json(key));
        }
    }

    /// Appends findings from a range after those already held.
    fn absorb(&mut self, other: Finding) {
        self.count += other.count;
        let room = SAMPLE.saturating_sub(self.first_ids.len());
        self.first_ids.extend(other.first_ids.into_iter().take(room));
    }
}

/// A key as JSON: a number or string for one column, an array for several.
pub fn key_json(key: &Key) -> serde_json::Value {
    use crate::types::KeyPart;
    let part = |p: &KeyPart| match p {
        KeyPart::Int(i) => serde_json::Value::from(*i),
        KeyPart::Bool(b) => serde_json::Value::from(*b),
        other => serde_json::Value::from(other.to_string().trim_matches('"').to_owned()),
    };
    match key.as_slice() {
        [one] => part(one),
        parts => serde_json::Value::Array(parts.iter().map(part).collect()),
    }
}

/// A range of the walk coordinate, both ends included.
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
    pub const ALL: KeyRange = KeyRange { first: i64::MIN, last: i64::MAX };

    /// How many coordinates the range can hold (up to 2^64).
    pub fn width(&self) -> u128 {
        (self.last as i128 - self.first as i128 + 1) as u128
    }

    pub fn contains(&self, w: i64) -> bool {
        self.first <= w && w <= self.last
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

    /// Which of `parts` (adjacent, ascending) holds `w`.
    pub fn part_of(parts: &[KeyRange], w: i64) -> Option<usize> {
        let i = parts.partition_point(|r| r.last < w);
        parts.get(i).filter(|r| r.contains(w)).map(|_| i)
    }
}

/// PostgreSQL's figures for a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceSummary {
    /// Rows not flagged rejected.
    pub rows: u64,
    /// Of those, rows flagged sent: what ClickHouse must hold live.
    pub sent: u64,
    /// Sum of the sent rows' checksums.
    pub checksum: i128,
    /// Rows flagged rejected (at the top level, summed into whether
    /// [`SourceSide::rejected`] needs asking: it is a pass over the table).
    pub rejected: u64,
}

/// ClickHouse's figures for a range: its live rows as `FINAL` reads them.
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

/// Where a PostgreSQL row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    /// Flagged sent, with the version it was sent as.
    Sent(u64),
    /// Changed (or new) and not sent yet.
    Pending,
    /// Flagged `pg2ch_rejected`: its content cannot travel.
    Rejected,
}

/// A PostgreSQL row as a leaf compares it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    /// Its walk coordinate.
    pub walk: i64,
    pub key: Key,
    pub values: Vec<Value>,
    pub state: RowState,
}

/// A ClickHouse key's newest change, as a leaf compares it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRow {
    pub walk: i64,
    pub key: Key,
    pub change: Change,
}

/// The source (PostgreSQL, or the simulated table) as `verify` reads it.
#[allow(async_fn_in_trait)]
pub trait SourceSide {
    /// The smallest and largest walk coordinate of any row; `None` for an empty table.
    async fn bounds(&mut self) -> anyhow::Result<Option<KeyRange>>;
    /// Counts and checksum of each range (adjacent, ascending), computed where the rows are.
    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SourceSummary>>;
    /// The range's rows, in any order.
    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<SourceRow>>;
    /// The range's deleted keys not yet sent, with their walk coordinates.
    async fn pending_deletes(&mut self, range: KeyRange) -> anyhow::Result<Vec<(i64, Key)>>;
    /// How many rows are flagged rejected, and the first few.
    async fn rejected(&mut self) -> anyhow::Result<Finding>;
    /// Flags these rows unsent (and not rejected) if they are flagged sent
    /// or rejected and no claim holds them, so that the next claim sends them
    /// or deletes them downstream; returns the keys it flagged.
    async fn flag_unsent(&mut self, keys: &[Key]) -> anyhow::Result<Vec<Key>>;
    /// Records the deletion of these keys (their values in key order, as
    /// ClickHouse holds them; absent from the table), for the next run to
    /// send; returns the keys it recorded.
    async fn record_deletes(&mut self, keys: &[Vec<Value>]) -> anyhow::Result<Vec<Key>>;
}

/// The sink (ClickHouse, or the simulated one) as `verify` reads it.
#[allow(async_fn_in_trait)]
pub trait SinkSide {
    /// The smallest and largest walk coordinate stored, and how many rows
    /// are stored counting unmerged copies (an estimate of the work).
    async fn bounds(&mut self) -> anyhow::Result<(Option<KeyRange>, u64)>;
    /// Counts and checksum of each range (adjacent, ascending) over the
    /// live rows as `FINAL` reads them, in one pass over their span.
    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SinkSummary>>;
    /// The range's keys with their newest change (a deletion included), in any order.
    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<SinkRow>>;
    /// Keys stored more than once (awaiting a merge): count and first few.
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
    /// Top-level ranges compared in one go (their figures come from one
    /// query on each side).
    pub top_batch: usize,
    /// Flag missing and differing rows unsent, and record deletions of
    /// extra keys, so that the next run makes the sides agree.
    pub repair: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan { chunk_rows: 10_000_000, fan_out: 16, leaf_rows: 10_000, top_batch: 2, repair: false }
    }
}

/// What `--repair` changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Repair {
    /// Rows flagged unsent again (missing, different or deleted in ClickHouse).
    pub flagged_unsent: Finding,
    /// Keys ClickHouse holds that PostgreSQL lacks, whose deletion was recorded.
    pub deletes_recorded: Finding,
    /// Rows that should have been flagged but were not (held by an open
    /// claim, or changed meanwhile): verify again after the run.
    pub skipped: u64,
}

/// Ranges whose figures differed and held a finding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RangeFinding {
    pub count: u64,
    pub first: Vec<KeyRange>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub table: String,
    pub postgres_rows: u64,
    pub postgres_sent: u64,
    pub clickhouse_final_rows: u64,
    /// Sent in PostgreSQL, absent from ClickHouse.
    pub missing: Finding,
    /// Live in ClickHouse, absent from PostgreSQL (and no deletion pending).
    pub extra: Finding,
    /// In both, with different content.
    pub differing: Finding,
    /// Sent in PostgreSQL, deleted in ClickHouse.
    pub deleted_but_present: Finding,
    /// Stored more than once before merging (fine: `FINAL` and merges collapse them).
    pub unmerged_copies: Finding,
    /// Changed or new in PostgreSQL and not sent yet (fine: the next run sends them).
    pub ahead_of_flag: Finding,
    /// Deleted in PostgreSQL, the deletion not sent yet (fine: the next run sends it).
    pub deletes_pending: Finding,
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
            && self.deleted_but_present.count == 0
    }

    /// Adds a leaf's findings (ranges are visited in order, so the
    /// samples stay the first ones).
    fn absorb(&mut self, leaf: Report) {
        self.missing.absorb(leaf.missing);
        self.extra.absorb(leaf.extra);
        self.differing.absorb(leaf.differing);
        self.deleted_but_present.absorb(leaf.deleted_but_present);
        self.ahead_of_flag.absorb(leaf.ahead_of_flag);
        self.deletes_pending.absorb(leaf.deletes_pending);
    }
}

/// One key's fate in a row-by-row comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Missing,
    Extra,
    Differing,
    DeletedButPresent,
    AheadOfFlag,
    DeletePending,
}

/// Compares one range's rows from both sides, telling `on` about every key
/// that is not simply equal on both sides, in walk order (then key order).
pub fn compare(source: &[SourceRow], sink: &[SinkRow], pending_deletes: &[(i64, Key)], mut on: impl FnMut(Seen, &Key)) {
    type Sides<'a> = (Option<&'a SourceRow>, Option<&'a Change>);
    let mut keys: BTreeMap<(i64, &Key), Sides> = BTreeMap::new();
    for row in source {
        keys.entry((row.walk, &row.key)).or_default().0 = Some(row);
    }
    for row in sink {
        keys.entry((row.walk, &row.key)).or_default().1 = Some(&row.change);
    }
    let pending: std::collections::BTreeSet<(i64, &Key)> = pending_deletes.iter().map(|(w, k)| (*w, k)).collect();
    for ((walk, key), (pg, ch)) in keys {
        let deletion_pending = pending.contains(&(walk, key));
        let live = ch.filter(|c| !c.deleted);
        match (pg, ch) {
            (Some(pg), _) => match pg.state {
                RowState::Sent(_) => match (live, ch) {
                    (Some(c), _) if c.values == pg.values => {}
                    (Some(_), _) => on(Seen::Differing, key),
                    (None, Some(_)) => on(Seen::DeletedButPresent, key),
                    (None, None) => on(Seen::Missing, key),
                },
                RowState::Pending => on(Seen::AheadOfFlag, key),
                // A row that cannot travel must not be live downstream.
                RowState::Rejected if live.is_some() => on(Seen::Differing, key),
                RowState::Rejected => {}
            },
            (None, Some(_)) if live.is_some() => {
                on(if deletion_pending { Seen::DeletePending } else { Seen::Extra }, key);
            }
            (None, _) => {
                if deletion_pending {
                    on(Seen::DeletePending, key);
                }
            }
        }
    }
}

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
    schema: &TableSchema,
    source: &mut S,
    sink: &mut K,
    plan: Plan,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Report> {
    let (pg_bounds, (ch_bounds, stored)) = futures::try_join!(source.bounds(), sink.bounds())?;
    let mut report = Report { table: schema.to_string(), ..Report::default() };
    let mut repair = plan.repair.then(Repair::default);
    // Rejected rows the top-level ranges counted: every row is in one.
    let mut rejected = 0;
    let whole = match (pg_bounds, ch_bounds) {
        (Some(a), Some(b)) => Some(a.union(b)),
        (a, b) => a.or(b),
    };
    if let Some(whole) = whole {
        let chunks = whole.split(stored.div_ceil(plan.chunk_rows.max(1)).clamp(1, 10_000));
        let total = chunks.len() as u64;
        progress(0, total);
        // Depth first, in order, so that the samples are the first keys.
        // Top-level ranges go in batches: each side then works through a
        // batch without waiting for the other after every range.
        let mut work: Vec<Work> = chunks
            .chunks(plan.top_batch.max(1))
            .rev()
            .map(|c| Work::Figures { ranges: c.to_vec(), top: true })
            .collect();
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
                        rejected += pg.iter().map(|s| s.rejected).sum::<u64>();
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
                    let deletes = source.pending_deletes(range).await?;
                    let mut leaf = Report::default();
                    let (mut resend, mut delete) = (Vec::new(), Vec::new());
                    compare(&pg, &ch, &deletes, |seen, key| {
                        let finding = match seen {
                            Seen::Missing => &mut leaf.missing,
                            Seen::Extra => &mut leaf.extra,
                            Seen::Differing => &mut leaf.differing,
                            Seen::DeletedButPresent => &mut leaf.deleted_but_present,
                            Seen::AheadOfFlag => &mut leaf.ahead_of_flag,
                            Seen::DeletePending => &mut leaf.deletes_pending,
                        };
                        finding.add(key);
                        match seen {
                            Seen::Missing | Seen::Differing | Seen::DeletedButPresent => resend.push(key.clone()),
                            Seen::Extra => delete.push(key.clone()),
                            _ => {}
                        }
                    });
                    if !leaf.ok() {
                        report.differing_ranges.count += 1;
                        if report.differing_ranges.first.len() < SAMPLE {
                            report.differing_ranges.first.push(range);
                        }
                    }
                    if let Some(repair) = repair.as_mut() {
                        if !resend.is_empty() {
                            let flagged = source.flag_unsent(&resend).await?;
                            repair.skipped += resend.len().saturating_sub(flagged.len()) as u64;
                            flagged.iter().for_each(|k| repair.flagged_unsent.add(k));
                        }
                        if !delete.is_empty() {
                            // The keys' values as ClickHouse holds them, in the order found.
                            let values: Vec<Vec<Value>> = delete
                                .iter()
                                .filter_map(|k| ch.iter().find(|r| r.key == *k))
                                .map(|r| schema.key.iter().map(|i| r.change.values[*i].clone()).collect())
                                .collect();
                            let recorded = source.record_deletes(&values).await?;
                            repair.skipped += delete.len().saturating_sub(recorded.len()) as u64;
                            recorded.iter().for_each(|k| repair.deletes_recorded.add(k));
                        }
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
    if rejected > 0 {
        report.rejected = source.rejected().await?;
    }
    Ok(report)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: PostgreSQL rows: {} ({} flagged sent); ClickHouse rows (FINAL): {}",
            self.table, self.postgres_rows, self.postgres_sent, self.clickhouse_final_rows
        )?;
        let lines = [
            ("sent rows missing from ClickHouse", &self.missing),
            ("keys in ClickHouse that PostgreSQL lacks", &self.extra),
            ("rows whose content differs", &self.differing),
            ("sent rows that ClickHouse shows deleted", &self.deleted_but_present),
            ("keys stored more than once before merging (not an error)", &self.unmerged_copies),
            ("rows changed in PostgreSQL and not sent yet (not an error)", &self.ahead_of_flag),
            ("deletions not sent yet (not an error)", &self.deletes_pending),
            ("rows rejected as not representable (see pg2ch_rejected; not sent)", &self.rejected),
        ];
        for (what, finding) in lines {
            if finding.count > 0 {
                let first: Vec<String> = finding.first_ids.iter().map(|k| k.to_string()).collect();
                writeln!(f, "{what}: {} (first: [{}])", finding.count, first.join(", "))?;
            }
        }
        let ranges = &self.differing_ranges;
        if ranges.count > 0 {
            let first: Vec<String> = ranges.first.iter().map(KeyRange::to_string).collect();
            writeln!(f, "key ranges holding them: {} (first: {})", ranges.count, first.join(", "))?;
        }
        writeln!(
            f,
            "ranges checked: {} by count and checksum, {} row by row",
            self.ranges_checked, self.ranges_compared_by_row
        )?;
        if let Some(repair) = &self.repair {
            let flagged = &repair.flagged_unsent;
            let list = |f: &Finding| f.first_ids.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
            writeln!(f, "repair: flagged {} rows unsent again (first: [{}])", flagged.count, list(flagged))?;
            let recorded = &repair.deletes_recorded;
            if recorded.count > 0 {
                writeln!(
                    f,
                    "repair: recorded the deletion of {} keys ClickHouse holds and PostgreSQL lacks (first: [{}])",
                    recorded.count,
                    list(recorded)
                )?;
            }
            if repair.skipped > 0 {
                writeln!(
                    f,
                    "repair: {} rows left as they were (held by an open claim, or changed meanwhile)",
                    repair.skipped
                )?;
            }
            if flagged.count + recorded.count > 0 {
                writeln!(f, "repair: `pg2ch run --once` sends them; verify after it")?;
            }
        }
        write!(f, "verify: {}", if self.ok() { "OK" } else { "FAILED" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::KeyPart;

    fn pg(id: i64, name: &str, state: RowState) -> SourceRow {
        SourceRow {
            walk: id,
            key: vec![KeyPart::Int(id)],
            values: vec![Value::Int(id), Value::Text(name.into())],
            state,
        }
    }

    fn ch(id: i64, name: &str, version: u64, deleted: bool) -> SinkRow {
        SinkRow {
            walk: id,
            key: vec![KeyPart::Int(id)],
            change: Change { values: vec![Value::Int(id), Value::Text(name.into())], version, deleted },
        }
    }

    #[test]
    fn finds_missing_extra_altered_and_deleted_rows() {
        let source = vec![
            pg(1, "a", RowState::Sent(1)),
            pg(2, "b", RowState::Sent(1)),
            pg(3, "c", RowState::Pending),
            pg(4, "d", RowState::Sent(1)),
            pg(5, "e", RowState::Sent(2)),
            pg(6, "f", RowState::Rejected),
            pg(7, "g", RowState::Sent(3)),
        ];
        let sink = vec![
            ch(1, "a", 1, false),
            ch(2, "B", 1, false),
            ch(3, "old c", 1, false),
            ch(5, "e", 2, true),
            ch(6, "f", 1, true),
            ch(7, "g", 2, false),
            ch(9, "z", 1, false),
            ch(10, "y", 4, false),
            ch(11, "x", 4, true),
        ];
        let mut seen = Vec::new();
        compare(&source, &sink, &[(10, vec![KeyPart::Int(10)])], |s, k| seen.push((s, k.clone())));
        let k = |i| vec![KeyPart::Int(i)];
        assert_eq!(
            seen,
            vec![
                (Seen::Differing, k(2)),
                (Seen::AheadOfFlag, k(3)),
                (Seen::Missing, k(4)),
                (Seen::DeletedButPresent, k(5)),
                (Seen::Extra, k(9)),
                (Seen::DeletePending, k(10)),
            ],
            "7 has another version, the same content; 6 is rejected and deleted downstream; 11 is deleted on both sides"
        );
    }

    #[test]
    fn keys_show_as_their_message_key() {
        assert_eq!(key_json(&vec![KeyPart::Int(42)]), serde_json::json!(42));
        assert_eq!(key_json(&vec![KeyPart::Int(1), KeyPart::Text(b"a".to_vec())]), serde_json::json!([1, "a"]));
    }
}
