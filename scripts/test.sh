#!/usr/bin/env bash
# The test suite against real services: stack up, then cargo test with the
# stack's environment, so every service-backed test runs (none is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/stack.sh up
# shellcheck disable=SC1091
source target/stack.env
cargo test "$@"
