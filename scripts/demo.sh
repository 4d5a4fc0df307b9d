#!/usr/bin/env bash
# The demo: stack up, init, seed 100,000 rows, run --once, verify, report.
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${DEMO_ROWS:-100000}"
scripts/stack.sh up
cargo build --release --quiet --bin pg2ch
# shellcheck disable=SC1091
source target/stack.env
# A fresh topic per demo, so each demo starts from an empty log (the stack's
# broker keeps topics across restarts; compose's forgets them).
export KAFKA_TOPIC="pg2ch_demo_$(date +%s)"
bin=target/release/pg2ch

$bin init --partitions 4
$bin seed --rows "$rows"
start=$(date +%s.%N)
$bin run --once
end=$(date +%s.%N)
set +e
$bin verify
verified=$?
set -e
$bin status
python3 - "$rows" "$start" "$end" "$verified" <<'PY'
import sys
rows, start, end, verified = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
secs = end - start
print(f"\ndemo: {rows} rows seeded; run --once took {secs:.2f} s ({rows / secs:,.0f} rows/s); verify: {'OK' if verified == 0 else 'FAILED'}")
PY
echo "demo: the messages are in topic $KAFKA_TOPIC; look: kcat -b $KAFKA_BOOTSTRAP -C -t $KAFKA_TOPIC -e"
exit "$verified"
