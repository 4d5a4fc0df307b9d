//! Micro benchmark: encoding and decoding a batch of records, the only CPU
//! work pg2ch itself does per row.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pg2ch::event::LoginEvent;

fn batch(n: usize) -> Vec<LoginEvent> {
    (0..n as i64)
        .map(|i| LoginEvent {
            id: i,
            username: format!("user_{}", i % 100_000),
            event_time_us: 1_700_000_000_000_000 + i,
        })
        .collect()
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for n in [10_000usize] {
        let rows = batch(n);
        let encoded: Vec<Vec<u8>> = rows.iter().map(|r| r.encode()).collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("encode", n), &rows, |b, rows| {
            b.iter(|| rows.iter().map(|r| r.encode()).collect::<Vec<_>>())
        });
        group.bench_with_input(BenchmarkId::new("decode", n), &encoded, |b, values| {
            b.iter(|| values.iter().map(|v| LoginEvent::decode(Some(v)).unwrap()).collect::<Vec<_>>())
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
