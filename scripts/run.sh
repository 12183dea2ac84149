#!/usr/bin/env bash
# `make run`: starts every service against the PostgreSQL and Redis of
# scripts/env.sh, prints where they listen and grpcurl calls to paste, and
# stops them all on Ctrl-C.
#   ENROLLMENT_PORT (50051), KEY_ISSUANCE_PORT (50052), REDEMPTION_PORT (50053)
#   REPLICAS=N      run N redemption replicas behind haproxy (HTTP/2, balanced
#                   per request) on REDEMPTION_PORT; the replicas on free ports
#                   below the kernel's ephemeral range (scripts/lib.sh pick_ports)
#   PROFILE=release use release binaries (make bench does)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
source .run/env
BIN="${CARGO_TARGET_DIR:-target}/${PROFILE:-debug}"
REPLICAS="${REPLICAS:-1}"
REDEMPTION_PORT="${REDEMPTION_PORT:-50053}"
export ENROLLMENT_LISTEN_ADDR="127.0.0.1:${ENROLLMENT_PORT:-50051}"
export KEY_ISSUANCE_LISTEN_ADDR="127.0.0.1:${KEY_ISSUANCE_PORT:-50052}"
export ENROLLMENT_URL="https://$ENROLLMENT_LISTEN_ADDR"
export KEY_ISSUANCE_URL="https://$KEY_ISSUANCE_LISTEN_ADDR"
export REDIS_URL
# Long-lived HTTP/2 clients re-balance when connections age out.
export MAX_CONNECTION_AGE_SECONDS="${MAX_CONNECTION_AGE_SECONDS:-30}"
# Each service applies its migrations as it starts (in production a
# migration Job does: deploy/k8s).
export MIGRATE_ON_START=true
# Prometheus metrics: one port per process, listed in .run/metrics.
mapfile -t metrics_ports < <(pick_ports $((2 + REPLICAS)))
metrics_at() { export METRICS_ADDR="127.0.0.1:${metrics_ports[$1]}"; echo "$2 http://$METRICS_ADDR/metrics" >> .run/metrics; }
: > .run/metrics

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

# TLS and caller authentication: a development CA with a certificate per
# service, and a signing key whose JWKS the services trust, made once into
# .run/dev (mode 700) by tk-dev; tokens for every role in organization
# acme, re-minted on each start, in .run/dev/tokens/<role>.
DEV=.run/dev
"$BIN/tk-dev" init --dir "$DEV"
export TLS_CA_FILE="$DEV/ca.pem" JWKS_FILE="$DEV/jwks.json"
mkdir -p "$DEV/tokens"
for role in site_administrator operations_manager instructor provisioning_service redemption_front student; do
  sub=$role; [ "$role" = student ] && sub=00000000-0000-0000-0000-000000000000
  (umask 077; "$BIN/tk-dev" token --dir "$DEV" --role "$role" --org acme --sub "$sub" > "$DEV/tokens/$role")
done
tls_as() { export TLS_CERT_FILE="$DEV/$1.pem" TLS_KEY_FILE="$DEV/$1-key.pem"; }

# The fixed ports must be free before anything starts. The defaults
# 50051-50053 lie inside Linux's ephemeral range (32768-60999), so an
# outgoing connection can hold one, or leave it in TIME_WAIT for a minute
# after it closes (a test run just before does that now and then): wait for
# such a port to be released; a server on it is an error at once.
held_by() { ss -tanp "( sport = :$1 )" 2>/dev/null || true; }
for port in "${ENROLLMENT_LISTEN_ADDR##*:}" "${KEY_ISSUANCE_LISTEN_ADDR##*:}" "$REDEMPTION_PORT"; do
  for waited in $(seq 0 75); do
    port_in_use "$port" || continue 2
    if listening "$port"; then
      echo "port $port is taken by a server:" >&2; held_by "$port" >&2
      break
    fi
    if [ "$waited" = 0 ]; then
      echo "port $port is held by a connection; waiting up to 75 s for it to be released:" >&2
      held_by "$port" >&2
    fi
    sleep 1
  done
  echo "stop what holds port $port, or choose other ports: ENROLLMENT_PORT, KEY_ISSUANCE_PORT, REDEMPTION_PORT" >&2
  exit 1
done

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
    listening "${1##*:}" && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; return 1
}

(tls_as enrollment; metrics_at 0 enrollment; exec "$BIN/enrollment") & pids+=($!)
wait_listening "$ENROLLMENT_LISTEN_ADDR"
(tls_as key-issuance; metrics_at 1 key-issuance; exec "$BIN/key-issuance") & pids+=($!)
tls_as redemption

if [[ "$REPLICAS" -le 1 ]]; then
  (metrics_at 2 redemption; REDEMPTION_LISTEN_ADDR="127.0.0.1:$REDEMPTION_PORT" exec "$BIN/redemption") & pids+=($!)
  wait_listening "127.0.0.1:$REDEMPTION_PORT"
  topology="redemption     127.0.0.1:$REDEMPTION_PORT   (trainingkeys.v1.RedemptionService)"
else
  command -v haproxy >/dev/null || apt_install haproxy
  mapfile -t replica_ports < <(pick_ports "$REPLICAS")
  servers=""
  for i in $(seq 1 "$REPLICAS"); do
    port="${replica_ports[$((i - 1))]}"
    # haproxy (on this host) adds x-forwarded-for: believe it, and only it.
    (metrics_at $((1 + i)) "redemption-r$i"
     TRUSTED_PROXIES=127.0.0.1 REDEMPTION_LISTEN_ADDR="127.0.0.1:$port" exec "$BIN/redemption") & pids+=($!)
    servers+="  server r$i 127.0.0.1:$port ssl verify required ca-file $PWD/$DEV/ca.pem alpn h2 check"$'\n'
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
  bind 127.0.0.1:$REDEMPTION_PORT ssl crt $PWD/$DEV/load-balancer-bundle.pem alpn h2
  default_backend redemption
backend redemption
  balance roundrobin
$servers
CFG
  for port in "${replica_ports[@]}"; do wait_listening "127.0.0.1:$port"; done
  haproxy -f .run/haproxy.cfg -db & pids+=($!)
  wait_listening "127.0.0.1:$REDEMPTION_PORT"
  topology="redemption     127.0.0.1:$REDEMPTION_PORT   haproxy (TLS, HTTP/2, per request) over $REPLICAS replicas on ports ${replica_ports[*]}"
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

Prometheus metrics (also in .run/metrics; e.g. curl -s <url> | grep rpc_server_call):
$(sed 's/^/  /' .run/metrics)

Every service speaks TLS (CA: $DEV/ca.pem) and wants a bearer token.
Ready tokens for organization acme, one per role, valid 12 hours (also in
$DEV/tokens/<role>; \`make token ROLE=... ORG=... SUB=...\` mints others):
$(for f in "$DEV"/tokens/*; do printf '  %s:\n    %s\n' "$(basename "$f")" "$(cat "$f")"; done)

Try, in another terminal (grpcurl uses server reflection, no proto files):
  make smoke     # runs every call of the README's "Calling it", in order
  make demo      # seeds a class, an event key and a subscription pool, prints redeem calls
  grpcurl -cacert $DEV/ca.pem $R list   # (make smoke puts grpcurl in .run/bin)

Press Ctrl-C to stop.
MSG
wait
