//! Micro benchmark: encoding and decoding a batch of messages, the only CPU
//! work pg2ch itself does per row. The baseline, measured in the same run, is
//! the straightforward way: a serde derive of the same message with chrono
//! formatting and parsing the time, which is what pg2ch did before its
//! hand-written codec (and before the codec was driven by a table's schema).

use chrono::{DateTime, SecondsFormat, Utc};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pg2ch::change::{self, Change};
use pg2ch::schema::TableSchema;
use pg2ch::types::Value;
use pg2ch::types::time::PG_EPOCH_UNIX_US;

fn logins() -> TableSchema {
    TableSchema::user_logins()
}

fn batch(n: usize) -> Vec<Change> {
    (0..n as i64)
        .map(|i| {
            Change::upsert(
                vec![
                    Value::Int(i),
                    Value::Text(format!("user_{}", i % 100_000)),
                    Value::Timestamp(1_700_000_000_000_000 + i * 7_919 - PG_EPOCH_UNIX_US),
                ],
                42,
            )
        })
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Derived {
    id: i64,
    username: String,
    event_time: String,
    _pg2ch_version: u64,
    _pg2ch_deleted: bool,
}

fn encode_derived(c: &Change) -> Vec<u8> {
    let (Value::Int(id), Value::Text(name), Value::Timestamp(t)) = (&c.values[0], &c.values[1], &c.values[2]) else {
        unreachable!()
    };
    let event_time =
        DateTime::from_timestamp_micros(t + PG_EPOCH_UNIX_US).unwrap().to_rfc3339_opts(SecondsFormat::Micros, true);
    let d =
        Derived { id: *id, username: name.clone(), event_time, _pg2ch_version: c.version, _pg2ch_deleted: c.deleted };
    serde_json::to_vec(&d).unwrap()
}

fn decode_derived(v: &[u8]) -> Change {
    let d: Derived = serde_json::from_slice(v).unwrap();
    let t = DateTime::parse_from_rfc3339(&d.event_time).unwrap().with_timezone(&Utc);
    Change {
        values: vec![
            Value::Int(d.id),
            Value::Text(d.username),
            Value::Timestamp(t.timestamp_micros() - PG_EPOCH_UNIX_US),
        ],
        version: d._pg2ch_version,
        deleted: d._pg2ch_deleted,
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let schema = logins();
    let n = 10_000usize;
    let rows = batch(n);
    let encoded: Vec<Vec<u8>> = rows.iter().map(|r| change::encode(&schema, r)).collect();
    assert!(rows.iter().zip(&encoded).all(|(r, e)| encode_derived(r) == *e), "same bytes both ways");
    assert!(encoded.iter().zip(&rows).all(|(e, r)| change::decode(&schema, Some(e)).unwrap() == *r));
    group.throughput(Throughput::Elements(n as u64));
    group.bench_with_input(BenchmarkId::new("encode (baseline: serde derive + chrono)", n), &rows, |b, rows| {
        b.iter(|| rows.iter().map(encode_derived).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("encode", n), &rows, |b, rows| {
        b.iter(|| rows.iter().map(|r| change::encode(&schema, r)).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("decode (baseline: serde derive + chrono)", n), &encoded, |b, values| {
        b.iter(|| values.iter().map(|v| decode_derived(v)).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("decode", n), &encoded, |b, values| {
        b.iter(|| values.iter().map(|v| change::decode(&schema, Some(v)).unwrap()).collect::<Vec<_>>())
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
