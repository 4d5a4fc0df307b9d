#!/usr/bin/env bash
# Brings the services up and writes their environment to target/stack.env:
# Docker Compose when an engine answers, local processes otherwise.
# Usage: scripts/stack.sh up | down
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
action="${1:-up}"

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

cargo build --release --quiet --bin pg2ch
if [ "$action" = up ]; then
  target/release/pg2ch stack up > target/stack.env
  echo "stack: environment in target/stack.env (source it)" >&2
else
  target/release/pg2ch stack down
fi
