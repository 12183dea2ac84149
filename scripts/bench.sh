#!/usr/bin/env bash
# `make bench`: release build, then
#   1. keys-bench: 1,000,000 subscription keys generated in one call and
#      exported as CSV by the real binaries (keys/s, MB/s, peak memory);
#   2. loadgen bench: every redemption scenario beside its reference (no-op
#      RPC, redis-benchmark of the gate script, pgbench of the enrollment
#      transaction, the herd with the gate off), written to bench/results.md.
# The services run on ports of their own (free ones below the kernel's
# ephemeral range, scripts/lib.sh pick_ports) so a `make run` can go on.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
source .run/env
BIN="${CARGO_TARGET_DIR:-target}/release"
command -v pgbench >/dev/null || export PATH="$PATH:/usr/lib/postgresql/15/bin"

echo "== keys: generation and export =="
"$BIN/keys-bench"

echo "== redemption scenarios =="
mapfile -t ports < <(pick_ports 4)
export ENROLLMENT_PORT=${ports[0]} KEY_ISSUANCE_PORT=${ports[1]} REDEMPTION_PORT=${ports[2]} PROFILE=release
NO_GATE_PORT=${ports[3]}
export RUST_LOG="${RUST_LOG:-warn}" DATABASE_MAX_CONNECTIONS="${DATABASE_MAX_CONNECTIONS:-40}"
# TLS and tokens from the development CA and signing key (as make run).
DEV=.run/dev
"$BIN/tk-dev" init --dir "$DEV"
scripts/run.sh > .run/bench-services.log 2>&1 &
run_pid=$!
GATE_ENABLED=false REDEMPTION_LISTEN_ADDR=127.0.0.1:$NO_GATE_PORT ENROLLMENT_URL=https://127.0.0.1:$ENROLLMENT_PORT \
  KEY_ISSUANCE_URL=https://127.0.0.1:$KEY_ISSUANCE_PORT TLS_CERT_FILE=$DEV/redemption.pem TLS_KEY_FILE=$DEV/redemption-key.pem \
  TLS_CA_FILE=$DEV/ca.pem JWKS_FILE=$DEV/jwks.json "$BIN/redemption" >> .run/bench-services.log 2>&1 &
nogate_pid=$!
trap 'kill -TERM $run_pid $nogate_pid 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for port in "${ports[@]}"; do
  for _ in $(seq 150); do listening "$port" && break; sleep 0.1; done
done
"$BIN/loadgen" bench \
  --target "https://127.0.0.1:$REDEMPTION_PORT" --enrollment "https://127.0.0.1:$ENROLLMENT_PORT" \
  --keys "https://127.0.0.1:$KEY_ISSUANCE_PORT" --no-gate "https://127.0.0.1:$NO_GATE_PORT" --database-url "$DATABASE_URL" --redis-url "$REDIS_URL" \
  --out bench/results.md "$@"
