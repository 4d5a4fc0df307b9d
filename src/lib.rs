//! pg2ch moves rows of PostgreSQL tables to ClickHouse through Kafka,
//! exactly once: inserts, updates and deletes, every type exactly.
//!
//! Module map, in layers: a module imports only from layers above it in
//! this list (and from its own submodules); `tests/layers.rs` checks it.
//!
//! 1. [`error`]: how a failed call should be met (transient, outcome
//!    unknown, permanent); a leaf.
//! 2. [`config`]: connection settings, secrets, identifier checks and
//!    quoting, timeouts.
//! 3. [`types`]: the type mapping, in one place: each PostgreSQL type's
//!    values, read from PostgreSQL, in the message, in ClickHouse,
//!    checksummed; and what a ClickHouse server can do ([`types::clickhouse::Capabilities`]).
//! 4. [`schema`]: a table as pg2ch carries it (columns, key, ClickHouse columns).
//! 5. [`change`]: what travels (a row's new content or its deletion, with a
//!    version) and its message on the topic; [`checksum`]: row checksums
//!    PostgreSQL computes on the server and pg2ch reproduces.
//! 6. [`verify`]: reconciliation of PostgreSQL against ClickHouse, range by range.
//! 7. [`stores`]: the three stores as small traits (source table, log, sink).
//! 8. [`pipeline`]: every decision (claim, publish, mark, fetch, write,
//!    remember position), written once against those traits, with named crash
//!    points; and the loop policy around them (backoff, `--once`, waits) in
//!    [`pipeline::loops`].
//! 9. [`postgres`], [`kafka`], [`clickhouse`]: one adapter per outside
//!    system (none imports another); `sim` (test builds only): simulated
//!    stores and the crash-replay harness that runs [`pipeline`] unchanged
//!    against them, with the property tests.
//! 10. [`stack`]: starts and stops a local PostgreSQL, ClickHouse and broker without Docker.
//! 11. [`commands`]: what each CLI subcommand does, wiring adapters to the pipeline.
//! 12. [`cli`]: argument parsing for the `pg2ch` binary.
//!
//! `ARCHITECTURE.md` at the repository's root has the invariants and where to start.

pub mod change;
pub mod checksum;
pub mod cli;
pub mod clickhouse;
pub mod commands;
pub mod config;
pub mod error;
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
