#!/usr/bin/env bash
# The test suite against real services: stack up, then cargo test with the
# stack's environment, so every service-backed test runs (none is skipped).
# Passes:
#   1. everything against the stack's ClickHouse server (Debian's 18.16);
#   2. every service-backed test against a current ClickHouse (26.9, chdb
#      behind the test front end scripts/chdb_http.py);
#   3. with PG2CH_TEST_CONTAINERS=1 (CI sets it): the end-to-end and
#      crash-replay tests with services from testcontainers, on podman's
#      Docker API and images built here (scripts/podman.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/stack.sh up
# shellcheck disable=SC1091
source target/stack.env
docker_engine=0
docker info >/dev/null 2>&1 && docker_engine=1
echo "test: pass 1: ClickHouse server on port $CH_PORT" >&2
if [ "$docker_engine" = 0 ]; then export PG2CH_TEST_CH_VERSION=18.16; fi
cargo test "$@"
if [ "$docker_engine" = 0 ]; then
  echo "test: pass 2: current ClickHouse (chdb) on port $PG2CH_CHDB_PORT" >&2
  CH_PORT="$PG2CH_CHDB_PORT" PG2CH_TEST_CLICKHOUSE=chdb PG2CH_TEST_CH_VERSION=26.9 cargo test --test '*' "$@"
fi
if [ "${PG2CH_TEST_CONTAINERS:-0}" = 1 ]; then
  echo "test: pass 3: end-to-end and crash replays with testcontainers on podman" >&2
  scripts/podman.sh up
  trap 'scripts/podman.sh down' EXIT
  (
    eval "$(scripts/podman.sh env)"
    # No endpoints: the tests must start their services as containers.
    unset PG_HOST PG_PORT PG_USER PG_PASS PG_PASS_FILE PG_DB CH_HOST CH_PORT CH_USER CH_PASS CH_PASS_FILE CH_DB KAFKA_BOOTSTRAP
    PG2CH_TEST_CH_VERSION=18.16 cargo test --test e2e --test replay "$@"
  )
fi
