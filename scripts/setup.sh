#!/usr/bin/env bash
# Installs what the local service stack needs and is missing; idempotent.
# With a Docker engine, docker-compose.yml provides the services instead and
# nothing is installed.
set -euo pipefail

if docker info >/dev/null 2>&1; then
  echo "setup: a Docker engine answers; services come from docker-compose.yml"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

packages=()
command -v clickhouse-server >/dev/null 2>&1 || packages+=(clickhouse-server)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  packages+=(postgresql)
fi
command -v psql >/dev/null 2>&1 || packages+=(postgresql-client)
# pgbench drives the source-cost test and bench (it ships with PostgreSQL's
# server package); taskset and pgrep pin the bench's processes.
if ! command -v pgbench >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1; then
  packages+=(postgresql)
fi
command -v taskset >/dev/null 2>&1 || packages+=(util-linux)
command -v pgrep >/dev/null 2>&1 || packages+=(procps)
# ZooKeeper for a replicated ClickHouse (`stack up --ch-replicas 2`, tests/cluster.rs).
[ -f /usr/share/java/zookeeper.jar ] || packages+=(zookeeper)
# kcat (librdkafka) looks at topics as users do; the tests run it.
command -v kcat >/dev/null 2>&1 || packages+=(kcat)
if [ ${#packages[@]} -gt 0 ]; then
  echo "setup: installing ${packages[*]} (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# The broker: nisshi 0.8.1 built from vendor/nisshi (librdkafka clients such
# as kcat can talk to it, and its SQLite storage produces and fetches in
# bounded time; see vendor/nisshi/PG2CH.md), known by its version
# 0.8.1+pg2ch.N (read from vendor/nisshi/Cargo.toml). Any other nisshi
# (crates.io's, or 0.7) is replaced. Same command as
# pg2ch::stack::NISSHI_INSTALL.
nisshi_version=$(scripts/nisshi_version.sh)
if cargo install --list | grep -q "^nisshi v${nisshi_version//./\\.} (.*/vendor/nisshi):\$"; then
  :
else
  echo "setup: building the nisshi Kafka-API broker 0.8.1 (about 17 minutes, once; reused afterwards)"
  cargo install --path vendor/nisshi --locked --ignore-rust-version
fi
# A current ClickHouse engine for the second test pass (ClickHouse 26.9 as a
# Python extension, about 180 MB; served by scripts/chdb_http.py, test support).
if ! python3 -c "import chdb, lz4" >/dev/null 2>&1; then
  echo "setup: installing chdb-core (ClickHouse 26.9 engine) and lz4 from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "chdb-core==26.9.0" lz4
fi
echo "setup: PostgreSQL, ClickHouse (18.16 server, 26.9 engine), ZooKeeper and the broker are installed"
