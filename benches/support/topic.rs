//! Reading a topic back whole, for the benches that time records by the
//! timestamp the producer gave them (included with `#[path]`).

use std::time::Duration;

use pg2ch::kafka::KafkaLog;
use pg2ch::stores::{EventLog, FetchedRecord};

/// Calls `f` with every record of every partition of `log`, up to each
/// partition's end as it is when that partition is read.
pub async fn each_record(log: &KafkaLog, mut f: impl FnMut(&FetchedRecord)) {
    for p in 0..log.partitions() {
        let mut next = 0;
        loop {
            let batch = log.fetch(p, next, Duration::from_millis(1)).await.unwrap();
            for r in &batch.records {
                f(r);
                next = r.offset + 1;
            }
            if next >= batch.high_watermark {
                break;
            }
        }
    }
}
