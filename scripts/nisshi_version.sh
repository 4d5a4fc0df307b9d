#!/usr/bin/env bash
# Prints the vendored broker's version, 0.8.1+pg2ch.N, read from
# vendor/nisshi/Cargo.toml (the one place it is written), or with --image the
# name of the podman image built from it (localhost/pg2ch/nisshi:0.8.1-pg2ch.N;
# image tags cannot hold a '+'). Used by setup.sh, podman.sh and
# compose_local.py.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(0\.8\.1+pg2ch\.[0-9]*\)"$/\1/p' vendor/nisshi/Cargo.toml)
[ -n "$version" ] || { echo "no 0.8.1+pg2ch.N version in vendor/nisshi/Cargo.toml" >&2; exit 1; }
case "${1:-}" in
  --image) echo "localhost/pg2ch/nisshi:${version/+/-}" ;;
  "") echo "$version" ;;
  *) echo "usage: scripts/nisshi_version.sh [--image]" >&2; exit 2 ;;
esac
