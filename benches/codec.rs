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

/// The pipeline bench's 20-column table (`benches/pipeline.rs`: `WIDE`).
fn wide() -> TableSchema {
    use pg2ch::schema::Column;
    use pg2ch::types::PgType::*;
    let columns = [
        ("id", Int8, false),
        ("account", Int8, false),
        ("region", Int2, false),
        ("status", Text, false),
        ("sku", Text, false),
        ("quantity", Int4, false),
        ("price", Numeric(Some((12, 2))), false),
        ("discount", Float4, true),
        ("total", Float8, false),
        ("currency", Bpchar, false),
        ("paid", Bool, false),
        ("ordered_on", Date, false),
        ("created_at", Timestamptz, false),
        ("updated_at", Timestamptz, true),
        ("customer", Uuid, false),
        ("email", Text, true),
        ("note", Text, true),
        ("tags", Array(Box::new(Text)), true),
        ("attributes", Jsonb, true),
        ("ip", Inet, true),
    ];
    let columns = columns.into_iter().map(|(name, ty, nullable)| Column { name: name.into(), ty, nullable }).collect();
    TableSchema::new("public", "wide", columns, vec![0])
}

/// Rows like the pipeline bench's `WIDE_ROWS`.
fn wide_batch(n: usize) -> Vec<Change> {
    let text = |s: String| Value::Text(s);
    (0..n as i64)
        .map(|i| {
            let tags = vec![text(format!("a{}", i % 7)), text(format!("b{}", i % 11))];
            Change::upsert(
                vec![
                    Value::Int(i),
                    Value::Int(i % 100_000),
                    Value::Int(i % 50),
                    text(["new", "paid", "shipped", "returned"][i as usize % 4].into()),
                    text(format!("SKU-{}", i % 9973)),
                    Value::Int(i % 17),
                    Value::Numeric(format!("{}.{:02}", i % 14_285, i % 100)),
                    if i % 5 == 0 { Value::Null } else { Value::Float4((i % 30) as f32) },
                    Value::Float8((i % 100_000) as f64 * 1.07),
                    text("EUR".into()),
                    Value::Bool(i % 3 == 0),
                    Value::Date(7_305 + (i % 2000) as i32),
                    Value::Timestamp(631_152_000_000_000 + i * 1_000_000),
                    if i % 2 == 0 { Value::Timestamp(910_000_000_000_000 + i) } else { Value::Null },
                    Value::Uuid((i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835).to_be_bytes()),
                    text(format!("user{i}@example.com")),
                    if i % 10 == 0 { text("note ".repeat(20)) } else { Value::Null },
                    Value::Array(pg2ch::types::Array::list(tags)),
                    text(format!(r#"{{"promo": {}, "channel": {}}}"#, i % 2 == 0, i % 3)),
                    text(format!("10.{}.0.1/32", i % 256)),
                ],
                42,
            )
        })
        .collect()
}

/// Wide rows. The baseline is serde_json's own untyped form of the same
/// messages (`serde_json::Value`): writing it, and parsing into it, without
/// any of the schema's typing and checks pg2ch does on top.
fn codec_wide(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_wide");
    let schema = wide();
    let n = 10_000usize;
    let rows = wide_batch(n);
    let encoded: Vec<Vec<u8>> = rows.iter().map(|r| change::encode(&schema, r)).collect();
    assert!(encoded.iter().zip(&rows).all(|(e, r)| change::decode(&schema, Some(e)).unwrap() == *r));
    let untyped: Vec<serde_json::Value> = encoded.iter().map(|e| serde_json::from_slice(e).unwrap()).collect();
    group.throughput(Throughput::Elements(n as u64));
    group.bench_with_input(BenchmarkId::new("encode (baseline: serde_json::Value)", n), &untyped, |b, rows| {
        b.iter(|| rows.iter().map(|r| serde_json::to_vec(r).unwrap()).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("encode", n), &rows, |b, rows| {
        b.iter(|| rows.iter().map(|r| change::encode(&schema, r)).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("decode (baseline: serde_json::Value)", n), &encoded, |b, values| {
        b.iter(|| values.iter().map(|v| serde_json::from_slice::<serde_json::Value>(v).unwrap()).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("decode", n), &encoded, |b, values| {
        b.iter(|| values.iter().map(|v| change::decode(&schema, Some(v)).unwrap()).collect::<Vec<_>>())
    });
    group.finish();
}

criterion_group!(benches, codec, codec_wide);
criterion_main!(benches);
