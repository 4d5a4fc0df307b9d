//! pg2ch moves rows of PostgreSQL tables to ClickHouse through Kafka,
//! exactly once: inserts, updates and deletes, every type exactly.
//!
//! Module map:
//! - [`types`]: the type mapping, in one place: each PostgreSQL type's
//!   values, read from PostgreSQL, in the message, in ClickHouse, checksummed.
//! - [`schema`]: a table as pg2ch carries it (columns, key, ClickHouse columns).
//! - [`change`]: what travels (a row's new content or its deletion, with a
//!   version) and its message on the topic.
//! - [`stores`]: the three stores as small traits (source table, log, sink).
//! - [`pipeline`]: every decision (claim, publish, mark, fetch, write,
//!   remember position), written once against those traits, with named crash
//!   points; and the loop policy around them (backoff, `--once`, waits) in
//!   [`pipeline::loops`].
//! - [`postgres`], [`kafka`], [`clickhouse`]: one adapter per outside system.
//! - [`verify`]: reconciliation of PostgreSQL against ClickHouse, range by range.
//! - [`checksum`]: row checksums PostgreSQL computes on the server and pg2ch reproduces.
//! - [`commands`]: what each CLI subcommand does, wiring adapters to the pipeline.
//! - [`stack`]: starts and stops a local PostgreSQL, ClickHouse and broker without Docker.
//! - [`config`]: connection settings, secrets, identifier checks and quoting, timeouts.
//! - [`cli`]: argument parsing for the `pg2ch` binary.
//! - `sim` (test builds only): simulated stores and the crash-replay harness
//!   that runs [`pipeline`] unchanged against them, with the property tests.

pub mod change;
pub mod checksum;
pub mod cli;
pub mod clickhouse;
pub mod commands;
pub mod config;
pub mod kafka;
pub mod pipeline;
pub mod postgres;
pub mod schema;
#[cfg(test)]
pub mod sim;
pub mod stack;
pub mod stores;
pub mod types;
pub mod verify;
