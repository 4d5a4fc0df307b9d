#!/usr/bin/env bash
# Starts one nisshi broker, empty, on a loopback port of its own, measures it
# with scripts/broker_compare.py (kcat and kafka-python), stops it. For the
# comparison in docs/broker.md.
# Usage: scripts/broker_compare.sh NISSHI_BINARY STORAGE_URL [PORT]
#   e.g. scripts/broker_compare.sh ~/.cargo/bin/nisshi sqlite://broker.db
# Needs kcat (apt) and kafka-python (pip install kafka-python).
set -euo pipefail
binary=$1 storage=$2 port=${3:-19099}
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
url=tcp://127.0.0.1:$port
(cd "$dir" && exec "$binary" broker --listener-url "$url" --advertised-listener-url "$url" \
  --storage-engine "$storage" >"$dir/broker.log" 2>&1) &
pid=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
"$binary" --version
python3 "$here/broker_compare.py" "127.0.0.1:$port" "$pid"
