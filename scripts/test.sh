#!/usr/bin/env bash
# The test suite against real services: stack up, then cargo test with the
# stack's environment, so every service-backed test runs (none is skipped).
# Two passes: everything against ClickHouse 18.16 (Debian's clickhouse-server),
# then every service-backed test again against a current ClickHouse (26.9,
# chdb behind the test front end scripts/chdb_http.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/stack.sh up
# shellcheck disable=SC1091
source target/stack.env
echo "test: pass 1 of 2: ClickHouse server on port $CH_PORT" >&2
cargo test "$@"
echo "test: pass 2 of 2: current ClickHouse (chdb) on port $PG2CH_CHDB_PORT" >&2
CH_PORT="$PG2CH_CHDB_PORT" PG2CH_TEST_CLICKHOUSE=chdb cargo test --test '*' "$@"
