#!/bin/sh
# Writes a server configuration listening on every address of the container
# and one user from the environment, then runs the server in the foreground.
set -eu
root=/var/lib/pg2ch-clickhouse
mkdir -p "$root/data" "$root/tmp" "$root/user_files" "$root/format_schemas"
user="${CLICKHOUSE_USER:-default}"
cat > "$root/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <listen_host>0.0.0.0</listen_host>
  <http_port>8123</http_port>
  <tcp_port>9000</tcp_port>
  <path>$root/data/</path>
  <tmp_path>$root/tmp/</tmp_path>
  <user_files_path>$root/user_files/</user_files_path>
  <format_schema_path>$root/format_schemas/</format_schema_path>
  <users_config>$root/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>200</max_concurrent_queries>
</yandex>
XML
umask 077
cat > "$root/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users>
    <$user>
      <password>${CLICKHOUSE_PASSWORD:-}</password>
      <networks><ip>::/0</ip><ip>0.0.0.0/0</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </$user>
  </users>
  <quotas><default></default></quotas>
</yandex>
XML
exec clickhouse-server --config-file="$root/config.xml"
