#!/usr/bin/env bash
# `make run`: starts every service against the PostgreSQL and Redis of
# scripts/env.sh, prints where they listen and grpcurl calls to paste, and
# stops them all on Ctrl-C.
#   ENROLLMENT_PORT (50051), KEY_ISSUANCE_PORT (50052), REDEMPTION_PORT (50053)
#   REPLICAS=N      run N redemption replicas behind haproxy (HTTP/2, balanced
#                   per request) on REDEMPTION_PORT; replicas on the ports after it
#   PROFILE=release use release binaries (make bench does)
set -euo pipefail
cd "$(dirname "$0")/.."
source .run/env
BIN="${CARGO_TARGET_DIR:-target}/${PROFILE:-debug}"
REPLICAS="${REPLICAS:-1}"
REDEMPTION_PORT="${REDEMPTION_PORT:-50053}"
export ENROLLMENT_LISTEN_ADDR="127.0.0.1:${ENROLLMENT_PORT:-50051}"
export KEY_ISSUANCE_LISTEN_ADDR="127.0.0.1:${KEY_ISSUANCE_PORT:-50052}"
export ENROLLMENT_URL="http://$ENROLLMENT_LISTEN_ADDR"
export KEY_ISSUANCE_URL="http://$KEY_ISSUANCE_LISTEN_ADDR"
export REDIS_URL
# Long-lived HTTP/2 clients re-balance when connections age out.
export MAX_CONNECTION_AGE_SECONDS="${MAX_CONNECTION_AGE_SECONDS:-30}"

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

wait_listening() { # host:port
  for _ in $(seq 150); do
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; return 1
}

"$BIN/enrollment" & pids+=($!)
wait_listening "$ENROLLMENT_LISTEN_ADDR"
"$BIN/key-issuance" & pids+=($!)

if [[ "$REPLICAS" -le 1 ]]; then
  REDEMPTION_LISTEN_ADDR="127.0.0.1:$REDEMPTION_PORT" "$BIN/redemption" & pids+=($!)
  wait_listening "127.0.0.1:$REDEMPTION_PORT"
  topology="redemption     127.0.0.1:$REDEMPTION_PORT   (trainingkeys.v1.RedemptionService)"
else
  command -v haproxy >/dev/null || {
    echo "installing haproxy"; apt-get install -y -q haproxy >/dev/null 2>&1 || sudo apt-get install -y -q haproxy >/dev/null
  }
  servers=""
  for i in $(seq 1 "$REPLICAS"); do
    port=$((REDEMPTION_PORT + 10 + i))
    REDEMPTION_LISTEN_ADDR="127.0.0.1:$port" "$BIN/redemption" & pids+=($!)
    servers+="  server r$i 127.0.0.1:$port proto h2 check"$'\n'
  done
  cat > .run/haproxy.cfg <<CFG
global
  maxconn 8000
defaults
  mode http
  option forwardfor
  timeout connect 2s
  timeout client 120s
  timeout server 120s
frontend redemption
  bind 127.0.0.1:$REDEMPTION_PORT proto h2
  default_backend redemption
backend redemption
  balance roundrobin
$servers
CFG
  for i in $(seq 1 "$REPLICAS"); do wait_listening "127.0.0.1:$((REDEMPTION_PORT + 10 + i))"; done
  haproxy -f .run/haproxy.cfg -db & pids+=($!)
  wait_listening "127.0.0.1:$REDEMPTION_PORT"
  topology="redemption     127.0.0.1:$REDEMPTION_PORT   haproxy (HTTP/2, per request) over $REPLICAS replicas on ports $((REDEMPTION_PORT + 11))-$((REDEMPTION_PORT + 10 + REPLICAS))"
fi
wait_listening "$KEY_ISSUANCE_LISTEN_ADDR"

E=$ENROLLMENT_LISTEN_ADDR K=$KEY_ISSUANCE_LISTEN_ADDR R=127.0.0.1:$REDEMPTION_PORT
cat <<MSG

Training Keys is running:
  enrollment     $E   (trainingkeys.v1.EnrollmentService)
  key-issuance   $K   (trainingkeys.v1.KeyIssuanceService)
  $topology
  PostgreSQL     $DATABASE_URL
  Redis          $REDIS_URL

Try (grpcurl uses server reflection; \`make demo\` seeds data and prints redeem calls):
  grpcurl -plaintext $R list
  grpcurl -plaintext $R grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{"organization_id":"acme","title":"Rust 101","course_id":"RUST-101","start_time":"2030-01-10T09:00:00Z","end_time":"2030-01-12T17:00:00Z","max_students":3,"lab_access_days":7}' \\
    $E trainingkeys.v1.EnrollmentService/CreateClass
  # then, with the class_id it returns:
  grpcurl -plaintext -d '{"class_id":"<class_id>","custom_code":"RUST-101-SPRING"}' \\
    $K trainingkeys.v1.KeyIssuanceService/SetEventKey
  grpcurl -plaintext -d '{"code":"RUST-101-SPRING","new_user":{"organization_id":"acme","email":"ada@example.com","display_name":"Ada"},"idempotency_key":"ada-1"}' \\
    $R trainingkeys.v1.RedemptionService/RedeemKey

Press Ctrl-C to stop.
MSG
wait
