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
export KEY_ISSUANCE_LISTEN_ADDR="127.0.0.1:${KEY_ISSUANCE_PORT:-50052}"
export ENROLLMENT_URL="http://$ENROLLMENT_LISTEN_ADDR"

# Key issuance's code secrets: taken from the environment when set, else
# throwaway ones generated once into .run/secrets (mode 600) and reused, so
# keys issued in one `make run` still resolve in the next.
random_hex() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
if [[ -z "${KEY_HMAC_SECRET:-}" || -z "${KEY_ENCRYPTION_KEY:-}" ]]; then
  if [[ ! -f .run/secrets ]]; then
    (umask 077; printf 'RUN_KEY_HMAC_SECRET=%s\nRUN_KEY_ENCRYPTION_KEY=%s\n' "$(random_hex)" "$(random_hex)" > .run/secrets)
    echo "generated throwaway key secrets in .run/secrets"
  fi
  source .run/secrets
  export KEY_HMAC_SECRET="${KEY_HMAC_SECRET:-$RUN_KEY_HMAC_SECRET}"
  export KEY_ENCRYPTION_KEY="${KEY_ENCRYPTION_KEY:-$RUN_KEY_ENCRYPTION_KEY}"
fi

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
start key-issuance key-issuance

wait_healthy() { # addr
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "service at $1 did not start" >&2; return 1
}
wait_healthy "$ENROLLMENT_LISTEN_ADDR"
wait_healthy "$KEY_ISSUANCE_LISTEN_ADDR"

cat <<MSG

Training Keys is running:
  enrollment     $ENROLLMENT_LISTEN_ADDR   (trainingkeys.v1.EnrollmentService)
  key-issuance   $KEY_ISSUANCE_LISTEN_ADDR   (trainingkeys.v1.KeyIssuanceService)
  PostgreSQL     $DATABASE_URL
  Redis          $REDIS_URL

Try (grpcurl uses server reflection):
  grpcurl -plaintext $ENROLLMENT_LISTEN_ADDR list
  grpcurl -plaintext $ENROLLMENT_LISTEN_ADDR grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{"organization_id":"acme","title":"Rust 101","course_id":"RUST-101","start_time":"2030-01-10T09:00:00Z","end_time":"2030-01-12T17:00:00Z","max_students":3,"lab_access_days":7}' \\
    $ENROLLMENT_LISTEN_ADDR trainingkeys.v1.EnrollmentService/CreateClass
  # then, with the class_id it returns:
  grpcurl -plaintext -d '{"class_id":"<class_id>","custom_code":"RUST-101-SPRING"}' \\
    $KEY_ISSUANCE_LISTEN_ADDR trainingkeys.v1.KeyIssuanceService/SetEventKey
  grpcurl -plaintext -d '{"class_id":"<class_id>","count":3}' \\
    $KEY_ISSUANCE_LISTEN_ADDR trainingkeys.v1.KeyIssuanceService/GenerateClassEnrollmentKeys

Press Ctrl-C to stop.
MSG
wait
