//! Micro benchmark: encoding and decoding a batch of records, the only CPU
//! work pg2ch itself does per row. The baseline, measured in the same run, is
//! the straightforward way: a serde derive with chrono formatting and parsing
//! the time, which is what pg2ch did before its hand-written codec.

use chrono::{DateTime, SecondsFormat, Utc};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pg2ch::event::LoginEvent;

fn batch(n: usize) -> Vec<LoginEvent> {
    (0..n as i64)
        .map(|i| LoginEvent {
            id: i,
            username: format!("user_{}", i % 100_000),
            event_time_us: 1_700_000_000_000_000 + i * 7_919,
        })
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Derived {
    id: i64,
    username: String,
    event_time: String,
}

fn encode_derived(e: &LoginEvent) -> Vec<u8> {
    let event_time = e.event_time().map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)).unwrap_or_default();
    serde_json::to_vec(&Derived { id: e.id, username: e.username.clone(), event_time }).unwrap()
}

fn decode_derived(v: &[u8]) -> LoginEvent {
    let d: Derived = serde_json::from_slice(v).unwrap();
    let t = DateTime::parse_from_rfc3339(&d.event_time).unwrap().with_timezone(&Utc);
    LoginEvent { id: d.id, username: d.username, event_time_us: t.timestamp_micros() }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let n = 10_000usize;
    let rows = batch(n);
    let encoded: Vec<Vec<u8>> = rows.iter().map(|r| r.encode()).collect();
    assert!(rows.iter().zip(&encoded).all(|(r, e)| encode_derived(r) == *e), "same bytes both ways");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_with_input(BenchmarkId::new("encode (baseline: serde derive + chrono)", n), &rows, |b, rows| {
        b.iter(|| rows.iter().map(encode_derived).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("encode", n), &rows, |b, rows| {
        b.iter(|| rows.iter().map(|r| r.encode()).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("decode (baseline: serde derive + chrono)", n), &encoded, |b, values| {
        b.iter(|| values.iter().map(|v| decode_derived(v)).collect::<Vec<_>>())
    });
    group.bench_with_input(BenchmarkId::new("decode", n), &encoded, |b, values| {
        b.iter(|| values.iter().map(|v| LoginEvent::decode(Some(v)).unwrap()).collect::<Vec<_>>())
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
