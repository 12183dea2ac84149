#!/usr/bin/env bash
# Brings up (or down) the throwaway PostgreSQL and Redis that `make run` and
# `make test` use, and writes their URLs to .run/env.
#   scripts/env.sh up     install what is missing, start what is not running
#   scripts/env.sh down   stop what `up` started
#   scripts/env.sh restart-pg   crash-restart the throwaway PostgreSQL (chaos tests)
#   scripts/env.sh drop-test-dbs  drop the databases earlier test runs left behind
# Given DATABASE_URL / REDIS_URL in the environment, it uses those instead.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR="$PWD/.run"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_DIR="$RUN_DIR/pg"
mkdir -p "$RUN_DIR"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_missing() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v haproxy >/dev/null || missing+=(haproxy)
  [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
  command -v psql >/dev/null || missing+=(postgresql-client)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
      { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${missing[@]}" >/dev/null; }
  fi
}

start_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then echo "DATABASE_URL=$DATABASE_URL"; return; fi
  if [ -f "$PG_DIR/port" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    DATABASE_URL="postgres://postgres@127.0.0.1:$(cat "$PG_DIR/port")/trainingkeys"
    return
  fi
  local port="${PG_PORT:-$(free_port)}"
  mkdir -p "$PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w -t 30 start \
    -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=600 -c shared_buffers=256MB -c fsync=${PG_FSYNC:-on} -c synchronous_commit=${PG_SYNC_COMMIT:-on} -c max_wal_size=256MB -c checkpoint_timeout=60s" >/dev/null
  echo "$port" > "$PG_DIR/port"
  psql -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE DATABASE trainingkeys" >/dev/null 2>&1 || true
  DATABASE_URL="postgres://postgres@127.0.0.1:$port/trainingkeys"
  echo "PostgreSQL on 127.0.0.1:$port (data in $PG_DIR)"
}

start_redis() {
  if [ -n "${REDIS_URL:-}" ]; then echo "REDIS_URL=$REDIS_URL"; return; fi
  if [ -f "$RUN_DIR/redis.port" ] && redis-cli -p "$(cat "$RUN_DIR/redis.port")" ping >/dev/null 2>&1; then
    REDIS_URL="redis://127.0.0.1:$(cat "$RUN_DIR/redis.port")/"
    return
  fi
  local port="${REDIS_PORT:-$(free_port)}"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" --maxclients 10000
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
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
    if [ -f "$PG_DIR/port" ] && [[ "$DATABASE_URL" == *":$(cat "$PG_DIR/port")/"* ]]; then
      printf 'export TEST_PG_RESTART=%q\n' "$PWD/scripts/env.sh restart-pg" >> "$RUN_DIR/env"
    fi
    ;;
  drop-test-dbs)
    # Databases the test harness made (test_<uuid>) in earlier runs: without
    # this sweep they pile up run after run on a developer's machine.
    if [ -f "$PG_DIR/port" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
      port="$(cat "$PG_DIR/port")"
      psql -qAt -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c "SELECT datname FROM pg_database WHERE datname ~ '^test_[0-9a-f]{32}$'" |
        while read -r db; do
          psql -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "DROP DATABASE \"$db\" WITH (FORCE)" >/dev/null
        done
    fi
    ;;
  restart-pg)
    # For the chaos test "PostgreSQL restarted mid-herd": an immediate
    # (crash-like) restart of the throwaway server, same port and options.
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -m immediate -w -t 120 restart >/dev/null
    ;;
  down)
    if [ -f "$PG_DIR/data/PG_VERSION" ]; then as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true; fi
    if [ -f "$RUN_DIR/redis.pid" ]; then kill "$(cat "$RUN_DIR/redis.pid")" 2>/dev/null || true; rm -f "$RUN_DIR/redis.pid" "$RUN_DIR/redis.port"; fi
    rm -f "$RUN_DIR/env"
    ;;
  *) echo "usage: $0 up|down|restart-pg|drop-test-dbs" >&2; exit 2 ;;
esac
