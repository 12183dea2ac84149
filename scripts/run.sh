#!/usr/bin/env bash
# `make run`: starts every service against the PostgreSQL and Redis of
# scripts/env.sh, prints where they listen and a grpcurl call to paste, and
# stops them all on Ctrl-C. Ports: ENROLLMENT_PORT (50051),
# KEY_ISSUANCE_PORT (50052), REDEMPTION_PORT (50053).
set -euo pipefail
cd "$(dirname "$0")/.."
source .run/env
BIN="${CARGO_TARGET_DIR:-target}/debug"
export ENROLLMENT_LISTEN_ADDR="127.0.0.1:${ENROLLMENT_PORT:-50051}"

pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping services..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
  echo "stopped. (PostgreSQL and Redis keep running; \`make down\` stops them.)"
}
trap stop INT TERM EXIT

start() { # name binary
  "$BIN/$2" &
  pids+=($!)
}
start enrollment enrollment

wait_healthy() { # addr
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "service at $1 did not start" >&2; return 1
}
wait_healthy "$ENROLLMENT_LISTEN_ADDR"

cat <<MSG

Training Keys is running:
  enrollment     $ENROLLMENT_LISTEN_ADDR   (trainingkeys.v1.EnrollmentService)
  PostgreSQL     $DATABASE_URL
  Redis          $REDIS_URL

Try (grpcurl uses server reflection):
  grpcurl -plaintext $ENROLLMENT_LISTEN_ADDR list
  grpcurl -plaintext $ENROLLMENT_LISTEN_ADDR grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{"organization_id":"acme","title":"Rust 101","course_id":"RUST-101","start_time":"2030-01-10T09:00:00Z","end_time":"2030-01-12T17:00:00Z","max_students":3,"lab_access_days":7}' \\
    $ENROLLMENT_LISTEN_ADDR trainingkeys.v1.EnrollmentService/CreateClass

Press Ctrl-C to stop.
MSG
wait
