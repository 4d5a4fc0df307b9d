//! pg2ch moves rows from a PostgreSQL table to ClickHouse through Kafka,
//! exactly once.
//!
//! Module map:
//! - [`event`]: the row that travels and its JSON message format.
//! - [`stores`]: the three stores as small traits (source table, log, sink).
//! - [`pipeline`]: every decision (claim, publish, mark, fetch, write,
//!   remember position), written once against those traits, with named crash points.
//! - [`postgres`], [`kafka`], [`clickhouse`]: one adapter per outside system.
//! - [`verify`]: reconciliation of PostgreSQL against ClickHouse, range by range.
//! - [`checksum`]: row checksums PostgreSQL computes on the server and pg2ch reproduces.
//! - [`commands`]: what each CLI subcommand does, wiring adapters to the pipeline.
//! - [`stack`]: starts and stops a local PostgreSQL, ClickHouse and broker without Docker.
//! - [`config`]: connection settings, secrets, identifier checks, timeouts.
//! - [`cli`]: argument parsing for the `pg2ch` binary.
//! - `sim` (test builds only): simulated stores and the crash-replay harness
//!   that runs [`pipeline`] unchanged against them, with the property tests.

pub mod checksum;
pub mod cli;
pub mod clickhouse;
pub mod commands;
pub mod config;
pub mod event;
pub mod kafka;
pub mod pipeline;
pub mod postgres;
#[cfg(test)]
pub mod sim;
pub mod stack;
pub mod stores;
pub mod verify;
