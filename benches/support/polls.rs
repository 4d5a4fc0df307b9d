//! Asking ClickHouse on a fixed beat, for the benches that time how soon a
//! change is readable there (included with `#[path]`).
//!
//! A query is sent every tick whether or not the last one answered: a loop
//! that waited for each answer would ask every tick plus the query's time,
//! and be late by that much. At most [`MAX_IN_FLIGHT`] are out at once; a
//! tick finding that many sends none, and is counted as skipped.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;

/// Most queries in flight at once.
pub const MAX_IN_FLIGHT: usize = 4;

/// What [`Polls::next`] waited for.
pub enum Event<T> {
    /// A tick: time to send a query (with [`Polls::send`]), if one is due.
    Tick,
    /// A query answered: when it was sent, and its answer. Only what was
    /// committed before it was sent can count as seen by it.
    Answer(Instant, T),
}

type Pending<T> = Pin<Box<dyn Future<Output = (Instant, T)>>>;

pub struct Polls<T> {
    tick: tokio::time::Interval,
    queries: FuturesUnordered<Pending<T>>,
    /// Ticks that sent nothing because [`MAX_IN_FLIGHT`] queries were out.
    pub skipped: usize,
    /// How long each query took, from sent to answered.
    pub took: Vec<Duration>,
}

impl<T: 'static> Polls<T> {
    pub fn every(period: Duration) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Polls { tick, queries: FuturesUnordered::new(), skipped: 0, took: Vec::new() }
    }

    /// The next tick or answer, whichever comes first.
    pub async fn next(&mut self) -> Event<T> {
        tokio::select! {
            _ = self.tick.tick() => Event::Tick,
            Some((sent, answer)) = self.queries.next() => {
                self.took.push(sent.elapsed());
                Event::Answer(sent, answer)
            }
        }
    }

    /// Sends `query` now, unless [`MAX_IN_FLIGHT`] are out.
    pub fn send(&mut self, query: impl Future<Output = T> + 'static) {
        if self.queries.len() >= MAX_IN_FLIGHT {
            self.skipped += 1;
            return;
        }
        let sent = Instant::now();
        self.queries.push(Box::pin(async move { (sent, query.await) }));
    }

    /// One line on the polls: how many were skipped, how long they took.
    pub fn summary(&self) -> String {
        let mut took = self.took.clone();
        took.sort();
        let at = |q: f64| took.get(((took.len() as f64 * q) as usize).min(took.len().saturating_sub(1))).copied();
        format!(
            "{} queries, each answered in p50 {:?}, p99 {:?}; {} ticks skipped with {MAX_IN_FLIGHT} in flight",
            took.len(),
            at(0.5).unwrap_or_default(),
            at(0.99).unwrap_or_default(),
            self.skipped
        )
    }
}
