#!/usr/bin/env bash
# What keeping the flag on the row costs pgbench's TPC-B-like workload,
# whatever pg2ch does around it: pg2ch's write path imitated in SQL alone (no
# broker, no pg2ch process), against the same workload untouched. Each mode
# is its own database; runs alternate base, then each mode, PAIRS times.
#   base     nothing installed;
#   trigger  the columns and the BEFORE UPDATE row trigger that marks a
#            changed row unsent, and nothing else (nobody flags rows);
#   index    trigger + the partial index on unsent rows (pg2ch's way today);
#            a flagger session flags every 100 ms what is unsent, locking the
#            rows FOR NO KEY UPDATE SKIP LOCKED as pg2ch's flag does;
#   queue    trigger + a queue table (no index) the trigger appends the key
#            to when a sent row becomes unsent; the flagger reads it past a
#            cursor and never deletes (as rotated queue tables emptied by
#            TRUNCATE would cost no WAL per row), then flags as above;
#   index_nolock, queue_nolock  the same, flagging without SKIP LOCKED (they
#            deadlock with pgbench: why pg2ch locks with SKIP LOCKED);
#   index_notify, index_notify_invoker  index + pg2ch's statement trigger
#            that notifies idle producers (none waits), its function run as
#            its owner with a fixed search_path (as pg2ch's) or as the caller.
# PostgreSQL and pgbench on CPU 0, the flagger's client on CPU 1 (its backend
# is PostgreSQL's, on CPU 0). Per run: TPS, latency, WAL per transaction and
# its largest record types (pg_walinspect), updates and HOT updates of the
# three tables; at the end, each database's growth.
# Usage: benches/source_designs.sh [PAIRS] [SECS], against the stack's
# PostgreSQL (source target/stack.env; PGUSER and PGPASSWORD as its role;
# the role creates databases and the pg_walinspect extension).
# MODES (default: base trigger index queue), SCALE (default 5).
set -euo pipefail
pairs=${1:-3}; secs=${2:-15}; scale=${SCALE:-5}
modes=${MODES:-base trigger index queue}
export PGHOST=127.0.0.1 PGPORT=${PG_PORT:-5432} PGUSER=${PGUSER:-${PG_USER:-postgres}}
[ -n "${PGPASSWORD:-}" ] || [ -z "${PG_PASS_FILE:-}" ] || PGPASSWORD=$(cat "$PG_PASS_FILE"); export PGPASSWORD
psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
for pid in $(pgrep -x postgres); do taskset -a -p -c 0 "$pid" >/dev/null; done
psql_q -d postgres -c "CREATE EXTENSION IF NOT EXISTS pg_walinspect"

setup() { # db mode
  local db=$1 mode=$2
  psql_q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  taskset -c 0 pgbench -q -i -s "$scale" "$db" >/dev/null 2>&1
  [ "$mode" = base ] && return
  for t in accounts:aid branches:bid tellers:tid; do
    local tab=pgbench_${t%%:*} key=${t##*:}
    psql_q -d "$db" <<SQL
ALTER TABLE $tab ADD COLUMN sent_to_kafka boolean NOT NULL DEFAULT true,
  ADD COLUMN pg2ch_changed_at timestamptz;
SQL
    if [ "$mode" = trigger ]; then
      psql_q -d "$db" <<SQL
CREATE FUNCTION ${tab}_unsent() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN NEW.sent_to_kafka := false; NEW.pg2ch_changed_at := now(); RETURN NEW; END \$\$;
SQL
    elif [ "${mode%_nolock}" = index ] || [ "${mode#index_notify}" != "$mode" ]; then
      psql_q -d "$db" <<SQL
CREATE INDEX ${tab}_unsent ON $tab ($key) WHERE NOT sent_to_kafka;
CREATE FUNCTION ${tab}_unsent() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN NEW.sent_to_kafka := false; NEW.pg2ch_changed_at := now(); RETURN NEW; END \$\$;
SQL
    else
      # Appended only when a sent row becomes unsent (an unsent row is queued
      # already); drained by a cursor, never deleted (as rotated queue tables
      # emptied by TRUNCATE cost no WAL per row).
      psql_q -d "$db" <<SQL
CREATE TABLE ${tab}_q (id bigserial, $key int NOT NULL);
CREATE TABLE ${tab}_cursor (last bigint NOT NULL); INSERT INTO ${tab}_cursor VALUES (0);
CREATE FUNCTION ${tab}_unsent() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN IF OLD.sent_to_kafka THEN INSERT INTO ${tab}_q ($key) VALUES (NEW.$key); END IF;
  NEW.sent_to_kafka := false; NEW.pg2ch_changed_at := now(); RETURN NEW; END \$\$;
SQL
    fi
    if [ "${mode#index_notify}" != "$mode" ]; then
      # pg2ch's statement trigger: notifies only while a producer waits idle
      # (nobody waits here), as the owner (definer) or as the caller.
      local rights="SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
      [ "$mode" = index_notify_invoker ] && rights=""
      psql_q -d "$db" <<SQL
CREATE UNLOGGED TABLE IF NOT EXISTS waiting (channel text NOT NULL, pid int NOT NULL, PRIMARY KEY (channel, pid));
CREATE OR REPLACE FUNCTION notify_idle() RETURNS trigger LANGUAGE plpgsql $rights AS \$\$
BEGIN IF EXISTS (SELECT 1 FROM public.waiting WHERE channel OPERATOR(pg_catalog.=) TG_ARGV[0]) THEN
  PERFORM pg_catalog.pg_notify(TG_ARGV[0], ''); END IF; RETURN NULL; END \$\$;
CREATE TRIGGER notify AFTER INSERT OR DELETE OR UPDATE ON $tab FOR EACH STATEMENT
  WHEN (current_setting('pg2ch.own', true) IS DISTINCT FROM 'on') EXECUTE FUNCTION notify_idle('$tab');
SQL
    fi
    psql_q -d "$db" -c "CREATE TRIGGER unsent BEFORE UPDATE ON $tab FOR EACH ROW
      WHEN (current_setting('pg2ch.own', true) IS DISTINCT FROM 'on') EXECUTE FUNCTION ${tab}_unsent()"
  done
  psql_q -d "$db" -c "VACUUM ANALYZE" -c CHECKPOINT
}

flag_sql() { # mode
  for t in accounts:aid branches:bid tellers:tid; do
    local tab=pgbench_${t%%:*} key=${t##*:}
    local lock="FOR NO KEY UPDATE SKIP LOCKED"
    [ "${1%_nolock}" = "$1" ] || lock=""
    if [ "${1%_nolock}" = index ] || [ "${1#index_notify}" != "$1" ]; then
      echo "UPDATE $tab SET sent_to_kafka = true WHERE ctid IN (SELECT ctid FROM $tab WHERE NOT sent_to_kafka LIMIT 5000 $lock);"
    else
      echo "WITH q AS (SELECT id, $key FROM ${tab}_q WHERE id > (SELECT last FROM ${tab}_cursor) ORDER BY id LIMIT 5000),"
      echo " c AS (UPDATE ${tab}_cursor SET last = (SELECT coalesce(max(id), last) FROM q))"
      echo "UPDATE $tab SET sent_to_kafka = true WHERE ctid IN (SELECT ctid FROM $tab WHERE $key IN (SELECT $key FROM q) AND NOT sent_to_kafka $lock);"
    fi
  done
}

stat() { # db -> n_tup_upd n_tup_hot_upd over the three tables
  psql_q -d "$1" -At -c "SELECT sum(n_tup_upd), sum(n_tup_hot_upd) FROM pg_stat_user_tables WHERE relname IN ('pgbench_accounts','pgbench_branches','pgbench_tellers')"
}
size() { psql_q -d "$1" -At -c "SELECT sum(pg_total_relation_size(oid)) FROM pg_class WHERE relname LIKE 'pgbench_%' AND relkind = 'r'"; }

run() { # db mode
  local db=$1 mode=$2 stop=/tmp/queue_exp.$$.run flagger=
  if [ "$mode" != base ] && [ "$mode" != trigger ]; then
    touch "$stop"
    ( while [ -f "$stop" ]; do echo "BEGIN;"; flag_sql "$mode"; echo "COMMIT; SELECT pg_sleep(0.1);"; done ) \
      | taskset -c 1 psql -X -q -o /dev/null -d "$db" -c "SET pg2ch.own = on" -f - &
    flagger=$!
  fi
  local lsn0 s0 out lsn1 s1
  sleep 1 # the flagger's session is up (measurement start, not synchronisation of results)
  lsn0=$(psql_q -d postgres -At -c "SELECT pg_current_wal_lsn()")
  s0=$(stat "$db")
  out=$(taskset -c 0 pgbench -n -c 4 -j 1 -T "$secs" "$db" 2>&1)
  lsn1=$(psql_q -d postgres -At -c "SELECT pg_current_wal_lsn()")
  [ -n "$flagger" ] && { rm -f "$stop"; wait "$flagger" || true; }
  sleep 0.5; s1=$(stat "$db")
  local tps lat tx wal
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
  lat=$(sed -n 's/^latency average = \([0-9.]*\).*/\1/p' <<<"$out")
  tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
  wal=$(psql_q -d postgres -At -c "SELECT pg_wal_lsn_diff('$lsn1', '$lsn0')")
  local rm
  rm=$(psql_q -d postgres -At -F= -c "SELECT \"resource_manager/record_type\" || ':' || (count::float / $tx)::numeric(5,2), (combined_size / $tx)::int FROM pg_get_wal_stats('$lsn0', '$lsn1', true) WHERE combined_size > 0 ORDER BY combined_size DESC LIMIT 9" | tr '\n' ' ')
  echo "$mode tps=$tps lat_ms=$lat wal_per_tx=$(( ${wal%.*} / tx )) upd=$(( ${s1%|*} - ${s0%|*} )) hot=$(( ${s1#*|} - ${s0#*|} )) by_rmgr_per_tx: $rm"
}

for m in $modes; do setup "exp_$m" "$m"; done
declare -A size0; for m in $modes; do size0[$m]=$(size "exp_$m"); done
for p in $(seq 1 "$pairs"); do
  for m in $modes; do echo "pair $p $(run "exp_$m" "$m")"; done
done
for m in $modes; do echo "growth $m $(( $(size "exp_$m") - ${size0[$m]} ))"; done
for m in $modes; do psql_q -d postgres -c "DROP DATABASE exp_$m"; done
