#!/usr/bin/env bash
# The Docker paths without Docker and without an image registry: Debian's
# podman (runc, cgroupfs) serves the Docker API on a socket of its own, and
# the images the tests and docker-compose.yml need are built here, once, from
# a Debian root filesystem made with debootstrap from the package mirror apt
# is configured with (cached in podman's storage afterwards):
#   localhost/pg2ch/postgres:15              PostgreSQL 15 (official image's variables)
#   localhost/pg2ch/clickhouse-server:18.16  Debian's ClickHouse (official image's variables)
#   localhost/pg2ch/nisshi:0.8.1-pg2ch.N     the nisshi broker, in place of Redpanda (N from vendor/nisshi/Cargo.toml)
# Usage: scripts/podman.sh up | down | env
#   up    installs what is missing, builds missing images, starts the API service
#   env   prints the environment for the Docker paths (DOCKER_HOST, image names)
#   down  removes the test containers and stops the API service
# Nothing here changes the machine's own container configuration: podman
# reads target/podman/containers.conf (CONTAINERS_CONF).
set -euo pipefail
cd "$(dirname "$0")/.."
action="${1:-up}"
state="$PWD/target/podman"
mkdir -p "$state"
export CONTAINERS_CONF="$state/containers.conf"
sock_dir=/run/pg2ch-podman
sock="$sock_dir/podman.sock"
base=localhost/pg2ch/debian:12
postgres_image=localhost/pg2ch/postgres:15
clickhouse_image=localhost/pg2ch/clickhouse-server:18.16
# The tag names the vendored build (0.8.1-pg2ch.N for version 0.8.1+pg2ch.N).
nisshi_version=$(scripts/nisshi_version.sh)
broker_image=$(scripts/nisshi_version.sh --image)

# Defaults below the machine's hard limits; crun fails on this cgroup layout.
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

print_env() {
  echo "export CONTAINERS_CONF=$CONTAINERS_CONF"
  echo "export DOCKER_HOST=unix://$sock"
  echo "export PG2CH_TEST_IMAGE_POSTGRES=$postgres_image"
  echo "export PG2CH_TEST_IMAGE_CLICKHOUSE=$clickhouse_image"
  echo "export PG2CH_TEST_IMAGE_BROKER=$broker_image"
}

api_answers() {
  [ -S "$sock" ] && python3 - "$sock" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(3); s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
sys.exit(0 if b"OK" in s.recv(4096) else 1)
PY
}

stop_service() {
  local pidfile="$state/service.pid" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  # Only a positive number whose process is our podman service gets a signal.
  if [[ "$pid" =~ ^[1-9][0-9]*$ ]] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "system service"; then
    kill "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

case "$action" in
  env) print_env; exit 0 ;;
  down)
    if command -v podman >/dev/null 2>&1; then
      ids=$(podman ps -aq --filter label=org.testcontainers.managed-by=testcontainers 2>/dev/null || true)
      [ -z "$ids" ] || podman rm -f $ids >/dev/null 2>&1 || true
    fi
    stop_service
    exit 0 ;;
  up) ;;
  *) echo "usage: $0 up | down | env" >&2; exit 2 ;;
esac

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
for tool in podman debootstrap runc podman-compose; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "podman: installing ${missing[*]} (apt)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! podman image exists "$base"; then
  # The mirror apt already uses for Debian's own packages (the only package
  # source this machine reaches), as apt itself reports it.
  arch=$(dpkg --print-architecture)
  mirror_of() { apt-cache policy 2>/dev/null | awk -v a="$arch" '$3 == "bookworm/main" && $4 == a { print $2; exit }'; }
  mirror=$(mirror_of)
  if [ -z "$mirror" ]; then $sudo apt-get update -qq; mirror=$(mirror_of); fi
  [ -n "$mirror" ] || { echo "podman: apt knows no mirror for bookworm/main" >&2; exit 1; }
  rootfs=$(mktemp -d /var/tmp/pg2ch-rootfs.XXXXXX)
  echo "podman: building the Debian base image (debootstrap, a few minutes, once)" >&2
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$state/debootstrap.log" 2>&1 \
    || { echo "podman: debootstrap failed, see $state/debootstrap.log" >&2; exit 1; }
  tar -C "$rootfs" -c . | podman import - "$base" >/dev/null
  rm -rf "$rootfs"
fi

build() { # image, context
  podman image exists "$1" && return 0
  echo "podman: building $1 (once)" >&2
  podman build -q --network host -t "$1" "$2" >"$state/build-$(basename "$2").log" 2>&1 \
    || { echo "podman: building $1 failed, see $state/build-$(basename "$2").log" >&2; exit 1; }
}
build "$postgres_image" containers/postgres
build "$clickhouse_image" containers/clickhouse
if ! podman image exists "$broker_image"; then
  nisshi=$(command -v nisshi || echo "$HOME/.cargo/bin/nisshi")
  [ -x "$nisshi" ] || { echo "podman: the nisshi binary is missing: run \`just setup\`" >&2; exit 1; }
  cargo install --list | grep -qF "nisshi v$nisshi_version (" \
    || { echo "podman: the installed nisshi is not $nisshi_version: run \`just setup\`" >&2; exit 1; }
  context="$state/nisshi"
  rm -rf "$context"; cp -r containers/nisshi "$context"; cp "$nisshi" "$context/nisshi"
  build "$broker_image" "$context"
fi

if ! api_answers; then
  stop_service
  mkdir -p "$sock_dir"; chmod 700 "$sock_dir"
  podman system service --time=0 "unix://$sock" >"$state/service.log" 2>&1 < /dev/null &
  echo $! > "$state/service.pid"
  for _ in $(seq 1 100); do api_answers && break; sleep 0.1; done
  api_answers || { echo "podman: the API service did not answer; see $state/service.log" >&2; exit 1; }
fi
echo "podman: Docker API on unix://$sock; images $postgres_image, $clickhouse_image, $broker_image" >&2
