#!/usr/bin/env bash
# Brings up (or down) the throwaway PostgreSQL and Redis that `make run` and
# `make test` use, and writes their URLs to .run/env.
#   scripts/env.sh up     install what is missing, start what is not running
#   scripts/env.sh down   stop what `up` started
#   scripts/env.sh clean  stop it, and delete the PostgreSQL data (make clean)
#   scripts/env.sh restart-pg   crash-restart the throwaway PostgreSQL (chaos tests)
#   scripts/env.sh drop-test-dbs  drop the databases earlier test runs left behind
# Given DATABASE_URL / REDIS_URL in the environment, it uses those instead.
#
# Where PostgreSQL lives: PostgreSQL refuses to run as root, so for root it
# runs as the `postgres` user, who cannot reach into a private home (a clone
# in /root, mode 0700). Root's cluster therefore lives in the postgres
# user's home, in a folder named after the clone's path (two clones never
# share one): /var/lib/postgresql/trainingkeys/<clone>-<hash of its path>,
# linked from .run/pg (a cluster an earlier version made in .run/pg, in an
# open folder, is used where it is). Any other user runs PostgreSQL as
# themselves, in .run/pg. Either way the server listens on 127.0.0.1 only (no Unix socket,
# so a long clone path cannot overflow a socket name) and .run/pg/log is its log.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
RUN_DIR="$PWD/.run"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_LINK="$RUN_DIR/pg"
mkdir -p "$RUN_DIR"

is_root() { [ "$(id -u)" = 0 ]; }

# Runs a PostgreSQL program as the user PostgreSQL runs as (from /, which
# that user can enter; every path it is given is absolute).
as_pg() {
  if is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# The folder of this clone's cluster (data/, log, port); nothing is made.
pg_home() {
  if ! is_root; then echo "$PG_LINK"; return; fi
  # A cluster made inside the clone by an earlier version of this script (it
  # worked where the clone is in an open folder): kept, and used, as it is.
  if [ -d "$PG_LINK" ] && [ ! -L "$PG_LINK" ] && [ -f "$PG_LINK/data/PG_VERSION" ]; then
    echo "$PG_LINK"; return
  fi
  local home base
  home="$(getent passwd postgres | cut -d: -f6 || true)"
  if [ -n "$home" ] && (cd / && runuser -u postgres -- test -w "$home") 2>/dev/null; then
    base="$home/trainingkeys"
  else
    base=/var/tmp/trainingkeys-pg
  fi
  echo "$base/$(basename "$PWD" | tr -c 'A-Za-z0-9._\n-' '_')-$(printf '%s' "$PWD" | sha256sum | cut -c1-12)"
}

# Makes the cluster's folder, reachable by the user PostgreSQL runs as.
make_pg_home() { # dir
  mkdir -p "$1"
  if is_root && [ "$1" != "$PG_LINK" ]; then
    chown postgres: "$(dirname "$1")" "$1"
    chmod 700 "$(dirname "$1")" "$1"
    printf '%s\n' "$PWD" > "$1/clone"  # whose it is, for a person looking
    ln -sfn "$1" "$PG_LINK"
  fi
}

# Where .run/pg points (root: a clone that moved still finds its old cluster).
linked_pg_home() {
  if [ -L "$PG_LINK" ]; then readlink "$PG_LINK"; fi
}

pg_running() { # dir
  [ -n "$1" ] && [ -f "$1/data/PG_VERSION" ] && [ -f "$1/port" ] &&
    as_pg "$PG_BIN/pg_ctl" -D "$1/data" status >/dev/null 2>&1
}

pg_stop() { # dir [mode]
  if [ -n "$1" ] && [ -f "$1/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$1/data" -m "${2:-fast}" stop >/dev/null 2>&1 || true
  fi
}

install_missing() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v haproxy >/dev/null || missing+=(haproxy)
  [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
  command -v psql >/dev/null || missing+=(postgresql-client)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

start_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then echo "DATABASE_URL=$DATABASE_URL"; return; fi
  if is_root && [ -d "$PG_LINK" ] && [ ! -L "$PG_LINK" ] && [ ! -f "$PG_LINK/data/PG_VERSION" ]; then
    # What a failed initdb of an earlier version left in a private home.
    rm -rf "$PG_LINK"
  fi
  local dir
  dir="$(pg_home)"
  make_pg_home "$dir"
  if pg_running "$dir"; then
    DATABASE_URL="postgres://postgres@127.0.0.1:$(cat "$dir/port")/trainingkeys"
    return
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  # TLS too (plain connections stay possible): a self-signed certificate for
  # 127.0.0.1, which the tests trust to prove the services' TLS to
  # PostgreSQL (sslmode=verify-full).
  if [ ! -f "$dir/data/server.key" ]; then
    local t="$dir/data"
    as_pg openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=Training Keys test PostgreSQL CA" -days 3650 \
      -keyout "$t/test-ca.key" -out "$t/test-ca.crt" >/dev/null 2>&1
    as_pg openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj /CN=127.0.0.1 -keyout "$t/server.key" -out "$t/server.csr" >/dev/null 2>&1
    as_pg sh -c "printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > '$t/server.ext'"
    as_pg openssl x509 -req -in "$t/server.csr" -CA "$t/test-ca.crt" -CAkey "$t/test-ca.key" \
      -CAcreateserial -days 3650 -extfile "$t/server.ext" -out "$t/server.crt" >/dev/null 2>&1
    as_pg chmod 600 "$t/server.key" "$t/test-ca.key"
  fi
  # A port below the ephemeral range; should another server take it between
  # the choice and the bind, try another (unless PG_PORT names one).
  local port tries=0
  while :; do
    port="${PG_PORT:-$(pick_ports 1)}"
    if as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 start \
      -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=600 -c shared_buffers=256MB -c fsync=${PG_FSYNC:-on} -c synchronous_commit=${PG_SYNC_COMMIT:-on} -c max_wal_size=256MB -c checkpoint_timeout=60s -c ssl=on -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all" >/dev/null; then
      break
    fi
    tries=$((tries + 1))
    if [ -n "${PG_PORT:-}" ] || [ "$tries" -ge 3 ]; then
      echo "PostgreSQL did not start; the end of its log ($PG_LINK/log):" >&2
      tail -n 20 "$dir/log" >&2 || true
      exit 1
    fi
    echo "PostgreSQL could not start on port $port; trying another" >&2
  done
  echo "$port" > "$dir/port"
  psql -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE DATABASE trainingkeys" >/dev/null 2>&1 || true
  DATABASE_URL="postgres://postgres@127.0.0.1:$port/trainingkeys"
  echo "PostgreSQL on 127.0.0.1:$port (data in $dir)"
}

start_redis() {
  if [ -n "${REDIS_URL:-}" ]; then echo "REDIS_URL=$REDIS_URL"; return; fi
  if [ -f "$RUN_DIR/redis.port" ] && redis-cli -p "$(cat "$RUN_DIR/redis.port")" ping >/dev/null 2>&1; then
    REDIS_URL="redis://127.0.0.1:$(cat "$RUN_DIR/redis.port")/"
    return
  fi
  local port tries=0 up
  while :; do
    port="${REDIS_PORT:-$(pick_ports 1)}"
    rm -f "$RUN_DIR/redis.pid"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
      --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" --maxclients 10000
    up=false
    for _ in $(seq 50); do
      if redis-cli -p "$port" ping >/dev/null 2>&1; then up=true; break; fi
      sleep 0.1
    done
    $up && break
    tries=$((tries + 1))
    if [ -n "${REDIS_PORT:-}" ] || [ "$tries" -ge 3 ]; then
      echo "Redis did not start; the end of its log (.run/redis.log):" >&2
      tail -n 20 "$RUN_DIR/redis.log" >&2 || true
      exit 1
    fi
    echo "Redis could not start on port $port; trying another" >&2
  done
  echo "$port" > "$RUN_DIR/redis.port"
  REDIS_URL="redis://127.0.0.1:$port/"
  echo "Redis on 127.0.0.1:$port"
}

case "${1:-up}" in
  up)
    install_missing
    start_postgres
    start_redis
    printf 'export DATABASE_URL=%q\nexport REDIS_URL=%q\n' "$DATABASE_URL" "$REDIS_URL" > "$RUN_DIR/env"
    # Chaos tests may crash-restart PostgreSQL only when it is our own.
    dir="$(pg_home)"
    if [ -f "$dir/port" ] && [[ "$DATABASE_URL" == *":$(cat "$dir/port")/"* ]]; then
      printf 'export TEST_PG_RESTART=%q\n' "$(printf '%q' "$PWD/scripts/env.sh") restart-pg" >> "$RUN_DIR/env"
      # Its TLS certificate, for the test of the services' TLS to PostgreSQL.
      if as_pg test -f "$dir/data/test-ca.crt"; then
        as_pg cat "$dir/data/test-ca.crt" > "$RUN_DIR/pg-ca.pem"
        printf 'export TEST_PG_CA=%q\n' "$RUN_DIR/pg-ca.pem" >> "$RUN_DIR/env"
      fi
    fi
    ;;
  drop-test-dbs)
    # Databases the test harness made (test_<uuid>) in earlier runs: without
    # this sweep they pile up run after run on a developer's machine.
    dir="$(pg_home)"
    if pg_running "$dir"; then
      port="$(cat "$dir/port")"
      psql -qAt -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c "SELECT datname FROM pg_database WHERE datname ~ '^test_[0-9a-f]{32}$'" |
        while read -r db; do
          psql -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "DROP DATABASE \"$db\" WITH (FORCE)" >/dev/null
        done
    fi
    ;;
  restart-pg)
    # For the chaos test "PostgreSQL restarted mid-herd" and the outage
    # test: an immediate (crash-like) restart of the throwaway server, same
    # port and options, after staying down for $2 seconds (default 0).
    dir="$(pg_home)"
    if [ "${2:-0}" = 0 ]; then
      as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -m immediate -w -t 120 restart >/dev/null
    else
      as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null
      sleep "$2"
      # restart on a stopped server starts it with its last options.
      as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 120 restart >/dev/null 2>&1
    fi
    ;;
  down | clean)
    dir="$(pg_home)"
    linked="$(linked_pg_home)"
    pg_stop "$dir"
    if [ -n "$linked" ] && [ "$linked" != "$dir" ]; then pg_stop "$linked"; fi
    if [ -f "$RUN_DIR/redis.pid" ]; then
      pid="$(cat "$RUN_DIR/redis.pid")"
      if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      fi
    fi
    rm -f "$RUN_DIR/redis.pid" "$RUN_DIR/redis.port" "$RUN_DIR/env"
    if [ "$1" = clean ]; then
      # Root's cluster lives outside the clone: it goes too. (.run/ itself,
      # and with it anyone else's .run/pg, is deleted by `make clean`.)
      if is_root; then
        rm -rf "$dir"
        if [ -n "$linked" ] && [ "$linked" != "$dir" ] && [ -f "$linked/clone" ]; then rm -rf "$linked"; fi
      fi
      rm -rf "$PG_LINK"
    fi
    ;;
  *) echo "usage: $0 up|down|clean|restart-pg|drop-test-dbs" >&2; exit 2 ;;
esac
