//! ClickHouse as `verify` reads it. ClickHouse has none of PostgreSQL's hash
//! functions, so its rows stream through pg2ch in `RowBinary` and get their
//! checksums here ([`crate::checksum`]): live rows as `FINAL` reads them for
//! a range's figures; for a leaf, the rows `FINAL` shows and, for keys it
//! does not show, their deletion (`FINAL` hides deleted keys on servers with
//! `is_deleted`).
//!
//! A stream has no overall deadline (its length is the table's); each
//! block of rows must come within the call timeout.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;

use super::{ClickHouse, classify};
use crate::change::Change;
use crate::checksum;
use crate::config::{bounded, ch_ident};
use crate::schema::{CH_DELETED, TableSchema};
use crate::stores::StoreError;
use crate::types::clickhouse::{ReadError, Reader, value_column};
use crate::types::{Key, Value};
use crate::verify::{Finding, KeyRange, SAMPLE, SinkRow, SinkSide, SinkSummary};

/// One table of ClickHouse as `verify` reads it.
pub struct ChVerifySide {
    pub ch: ClickHouse,
    pub schema: Arc<TableSchema>,
}

impl ChVerifySide {
    /// `WHERE` over the walk coordinate: the key itself for an integer key
    /// (the sorting key), nothing otherwise (the hash is computed here).
    fn range_filter(&self, range: KeyRange) -> String {
        if self.schema.integer_key() {
            let c = &self.schema.columns[self.schema.key[0]];
            format!("{} BETWEEN {} AND {}", ch_ident(&value_column(&c.name, &c.ty)), range.first, range.last)
        } else {
            "1".into()
        }
    }

    /// Streams `sql`'s rows as changes, telling `each` about every one.
    async fn stream(&self, sql: &str, each: impl FnMut(Change)) -> anyhow::Result<()> {
        let schema = self.schema.clone();
        self.stream_with(sql, |r| read_change(r, &schema), each).await
    }

    /// Streams `sql`'s rows, each read by `read`, telling `each` about every one.
    async fn stream_with<T>(
        &self,
        sql: &str,
        read: impl Fn(&mut Reader<'_>) -> Result<T, ReadError>,
        mut each: impl FnMut(T),
    ) -> anyhow::Result<()> {
        let what = || format!("ClickHouse: reading {}", self.schema.name);
        let mut cursor = self.ch.client.query(sql).fetch_bytes("RowBinary").map_err(classify).with_context(what)?;
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::time::timeout(self.ch.timeout(), cursor.next())
                .await
                .map_err(|_| StoreError::unknown(format!("no rows within {:?}", self.ch.timeout())))
                .with_context(what)?
                .map_err(classify)
                .with_context(what)?;
            let Some(chunk) = chunk else { break };
            pending.extend_from_slice(&chunk);
            let mut reader = Reader::new(&pending);
            let mut used = 0;
            loop {
                match read(&mut reader) {
                    Ok(row) => {
                        used = pending.len() - reader.input.len();
                        each(row);
                    }
                    Err(ReadError::Truncated) => break,
                    Err(e) => return Err(anyhow::Error::new(e)).with_context(what),
                }
                if reader.is_empty() {
                    break;
                }
            }
            pending.drain(..used);
        }
        anyhow::ensure!(pending.is_empty(), "ClickHouse: {} bytes of a row were left over", pending.len());
        Ok(())
    }

    fn select(&self) -> String {
        format!("SELECT {} FROM {}", self.schema.ch_written(&self.ch.caps), self.ch.readable(&self.schema.name))
    }
}

/// One stored row's walk coordinate and checksum ([`checksum::walk`],
/// [`checksum::row`]), its values hashed as they are read; for a single
/// integer key only (the key's value is the coordinate), the others build
/// the row. Its version and deletion flag are read past.
fn read_figures(r: &mut Reader<'_>, schema: &TableSchema) -> Result<(i64, i64), ReadError> {
    if !schema.integer_key() {
        let change = read_change(r, schema)?;
        return Ok((checksum::walk(schema, &change.values), checksum::row(schema, &change.values)));
    }
    let key = schema.key[0];
    let mut walk = 0;
    let sum = checksum::row_with(schema, |i, c, seed| {
        if i != key {
            return r.hash_value(&c.ty, c.nullable, seed);
        }
        let value = r.value(&c.ty, c.nullable)?;
        walk = checksum::walk_of_key(&value);
        Ok(crate::types::checksum::hash(&c.ty, &value, seed))
    })?;
    r.u64()?;
    r.u8()?;
    Ok((walk, sum))
}

/// One stored row: its PostgreSQL columns' values, version and deletion flag.
fn read_change(r: &mut Reader<'_>, schema: &TableSchema) -> Result<Change, ReadError> {
    let mut values = Vec::with_capacity(schema.columns.len());
    for c in &schema.columns {
        values.push(r.value(&c.ty, c.nullable)?);
    }
    let version = r.u64()?;
    let deleted = r.u8()? != 0;
    Ok(Change { values, version, deleted })
}

impl SinkSide for ChVerifySide {
    async fn bounds(&mut self) -> anyhow::Result<(Option<KeyRange>, u64)> {
        let t = self.ch.readable(&self.schema.name);
        if self.schema.integer_key() {
            let c = &self.schema.columns[self.schema.key[0]];
            let k = ch_ident(&value_column(&c.name, &c.ty));
            let (first, last, stored) =
                bounded(|| "ClickHouse: reading the key range".into(), self.ch.timeout(), async {
                    self.ch
                        .client
                        .query(&format!("SELECT toInt64(min({k})), toInt64(max({k})), count() FROM {t}"))
                        .fetch_one::<(i64, i64, u64)>()
                        .await
                        .map_err(classify)
                })
                .await?;
            return Ok(((stored > 0).then_some(KeyRange { first, last }), stored));
        }
        let stored = self.ch.scalar(&format!("SELECT count() FROM {t}")).await?;
        Ok(((stored > 0).then_some(KeyRange::ALL), stored))
    }

    async fn summaries(&mut self, ranges: &[KeyRange]) -> anyhow::Result<Vec<SinkSummary>> {
        let mut out = vec![SinkSummary::default(); ranges.len()];
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else { return Ok(out) };
        let span = KeyRange { first: first.first, last: last.last };
        let sql = format!(
            "SELECT {} FROM {} FINAL WHERE {} = 0 AND {}",
            self.schema.ch_written(&self.ch.caps),
            self.ch.readable(&self.schema.name),
            ch_ident(CH_DELETED),
            self.range_filter(span)
        );
        let schema = self.schema.clone();
        self.stream_with(
            &sql,
            |r| read_figures(r, &schema),
            |(walk, sum)| {
                if let Some(i) = KeyRange::part_of(ranges, walk) {
                    out[i].add(sum);
                }
            },
        )
        .await?;
        Ok(out)
    }

    async fn rows(&mut self, range: KeyRange) -> anyhow::Result<Vec<SinkRow>> {
        // FINAL is ClickHouse's own answer (a tie of versions goes to the
        // later insert, which a plain read cannot tell); deletions come from
        // a plain read, for the keys FINAL does not show (servers with
        // `is_deleted` leave deleted keys out of FINAL).
        let schema = self.schema.clone();
        let mut rows: BTreeMap<Key, (i64, Change)> = BTreeMap::new();
        let live = format!(
            "SELECT {} FROM {} FINAL WHERE {}",
            schema.ch_written(&self.ch.caps),
            self.ch.readable(&schema.name),
            self.range_filter(range)
        );
        self.stream(&live, |change| {
            let walk = checksum::walk(&schema, &change.values);
            if range.contains(walk) {
                rows.insert(change.key(&schema), (walk, change));
            }
        })
        .await?;
        let deleted = format!("{} WHERE {} = 1 AND {}", self.select(), ch_ident(CH_DELETED), self.range_filter(range));
        let mut gone: BTreeMap<Key, (i64, Change)> = BTreeMap::new();
        self.stream(&deleted, |change| {
            let walk = checksum::walk(&schema, &change.values);
            let key = change.key(&schema);
            if range.contains(walk)
                && !rows.contains_key(&key)
                && gone.get(&key).is_none_or(|(_, kept)| kept.version < change.version)
            {
                gone.insert(key, (walk, change));
            }
        })
        .await?;
        rows.extend(gone);
        Ok(rows.into_iter().map(|(key, (walk, change))| SinkRow { walk, key, change }).collect())
    }

    async fn unmerged_copies(&mut self) -> anyhow::Result<Finding> {
        let keys =
            self.schema.key_columns().map(|c| ch_ident(&value_column(&c.name, &c.ty))).collect::<Vec<_>>().join(", ");
        let t = self.ch.readable(&self.schema.name);
        let count = self
            .ch
            .scalar(&format!("SELECT count() FROM (SELECT {keys} FROM {t} GROUP BY {keys} HAVING count() > 1)"))
            .await?;
        let sql = format!("SELECT {keys} FROM {t} GROUP BY {keys} HAVING count() > 1 ORDER BY {keys} LIMIT {SAMPLE}");
        let bytes = bounded(|| "ClickHouse: sampling copies".into(), self.ch.timeout(), async {
            let mut cursor = self.ch.client.query(&sql).fetch_bytes("RowBinary").map_err(classify)?;
            cursor.collect().await.map_err(classify)
        })
        .await?;
        let mut finding = Finding::default();
        let mut reader = Reader::new(&bytes);
        while !reader.is_empty() {
            let key: Vec<Value> =
                self.schema.key_columns().map(|c| reader.value(&c.ty, false)).collect::<Result<_, _>>()?;
            finding.add(&self.schema.key_of_key(&key));
        }
        finding.count = count;
        Ok(finding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::types::strategies::config(2048))]

        /// A stored row's figures read with its values hashed as they are
        /// read equal those of the row read whole, for any table shape
        /// (single integer keys take the hashing path, others the whole row).
        #[test]
        fn figures_read_as_hashes_equal_those_of_the_row(
            (schema, values) in crate::change::tests::table_and_row(),
            version in any::<u64>(),
            deleted in any::<bool>(),
        ) {
            prop_assume!(schema.columns.iter().zip(&values).all(|(c, v)| crate::types::check(&c.ty, v).is_ok()));
            let mut buf = Vec::new();
            for (c, v) in schema.columns.iter().zip(&values) {
                crate::types::clickhouse::write(&mut buf, &c.ty, c.nullable, v);
            }
            buf.extend_from_slice(&version.to_le_bytes());
            buf.push(u8::from(deleted));
            let mut r = Reader::new(&buf);
            let figures = read_figures(&mut r, &schema).unwrap();
            prop_assert!(r.is_empty(), "{} bytes left over", r.input.len());
            prop_assert_eq!(figures, (checksum::walk(&schema, &values), checksum::row(&schema, &values)));
        }
    }
}
