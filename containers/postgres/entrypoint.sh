#!/bin/sh
# First start: initdb with the user and password from the environment, the
# database POSTGRES_DB, password logins from anywhere. Then the server in the
# foreground as the postgres user.
set -eu
bin=/usr/lib/postgresql/15/bin
data=/var/lib/postgresql/data
user="${POSTGRES_USER:-postgres}"
mkdir -p "$data" /var/run/postgresql
chown postgres "$data" /var/run/postgresql
if [ ! -s "$data/PG_VERSION" ]; then
  pw=$(mktemp)
  printf '%s' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" > "$pw"
  chown postgres "$pw"
  runuser -u postgres -- "$bin/initdb" -D "$data" -U "$user" --pwfile "$pw" -A scram-sha-256 -E UTF8 --no-locale >/dev/null
  rm -f "$pw"
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >> "$data/pg_hba.conf"
  if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != postgres ]; then
    echo "CREATE DATABASE \"$POSTGRES_DB\"" | runuser -u postgres -- "$bin/postgres" --single -D "$data" postgres >/dev/null
  fi
fi
exec runuser -u postgres -- "$bin/postgres" -D "$data" -c listen_addresses='*' -c max_connections=200 \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off
