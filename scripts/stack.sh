#!/usr/bin/env bash
# Brings the services up and writes their environment to target/stack.env:
# Docker Compose when an engine answers, local processes otherwise.
# Next to the local stack it starts the test front end for a current
# ClickHouse engine (chdb, ClickHouse 26.9; scripts/chdb_http.py, test
# support only) on PG2CH_STACK_CHDB_PORT (8124), for the second test pass.
# Usage: scripts/stack.sh up [--ch-replicas N] [--ch-shards S] | down
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
action="${1:-up}"

# docker-compose.yml under podman, with the images built here (no registry).
if [ "${PG2CH_COMPOSE:-}" = podman ]; then
  /usr/bin/python3 scripts/compose_local.py target/compose.podman.yml
  compose=(podman-compose -p pg2ch -f target/compose.podman.yml)
  if [ "$action" = up ]; then
    scripts/podman.sh up
    export CONTAINERS_CONF="$PWD/target/podman/containers.conf"
    "${compose[@]}" up -d >target/compose.log 2>&1 || { cat target/compose.log >&2; exit 1; }
    sed -n 's/^\([A-Z_]*=\)/export \1/p' .env.example > target/stack.env
    # podman-compose cannot wait for health: probe the three services.
    for _ in $(seq 1 300); do
      pg_isready -q -h 127.0.0.1 -p 5432 \
        && python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8123/ping', timeout=2)" 2>/dev/null \
        && bash -c '</dev/tcp/127.0.0.1/9092' 2>/dev/null && break
      sleep 0.2
    done
    echo "stack: docker-compose.yml up under podman (local images)" >&2
  else
    export CONTAINERS_CONF="$PWD/target/podman/containers.conf"
    "${compose[@]}" down >/dev/null 2>&1 || true
  fi
  exit 0
fi

if docker info >/dev/null 2>&1; then
  if [ "$action" = up ]; then
    docker compose up -d --wait
    # The compose ports and passwords are the ones in .env.example.
    sed -n 's/^\([A-Z_]*=\)/export \1/p' .env.example > target/stack.env
  else
    docker compose down
  fi
  exit 0
fi

dir="${PG2CH_STACK_DIR:-/tmp/pg2ch-stack}"
chdb_port="${PG2CH_STACK_CHDB_PORT:-8124}"
chdb_dir="$dir/chdb"

ping() { python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$1/ping', timeout=2)" 2>/dev/null; }

chdb_up() {
  if ! ping "$chdb_port"; then
    python3 -c "import chdb, lz4" 2>/dev/null || {
      echo "stack: chdb is not installed: run \`just setup\` (pip install chdb-core lz4)" >&2
      exit 1
    }
    mkdir -p -m 700 "$chdb_dir"
    python3 scripts/chdb_http.py --port "$chdb_port" --path "$chdb_dir" --user pg2ch \
      --password-file "$dir/secrets/ch.pass" > "$chdb_dir/server.log" 2>&1 < /dev/null &
    echo $! > "$chdb_dir/server.pid"
    for _ in $(seq 1 300); do ping "$chdb_port" && break; sleep 0.2; done
    ping "$chdb_port" || { echo "stack: the chdb front end did not answer; see $chdb_dir/server.log" >&2; exit 1; }
  fi
  echo "stack: current ClickHouse (chdb, test front end) on 127.0.0.1:$chdb_port" >&2
  echo "export PG2CH_CHDB_PORT=$chdb_port PG2CH_CHDB_PATH=$chdb_dir" >> target/stack.env
}

chdb_down() {
  local pidfile="$chdb_dir/server.pid" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  # Only a positive number whose process is the front end gets a signal.
  if [[ "$pid" =~ ^[1-9][0-9]*$ ]] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q chdb_http.py; then
    kill "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

cargo build --release --quiet --bin pg2ch
if [ "$action" = up ]; then
  target/release/pg2ch stack up "${@:2}" > target/stack.env
  # PG2CH_STACK_CHDB=off (benchmarks): no chdb front end, whose background
  # work would compete for the CPU with the services being measured.
  if [ "${PG2CH_STACK_CHDB:-on}" = off ]; then chdb_down; else chdb_up; fi
  echo "stack: environment in target/stack.env (source it)" >&2
else
  chdb_down
  target/release/pg2ch stack down
fi
