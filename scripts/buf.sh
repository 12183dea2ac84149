#!/usr/bin/env bash
# Runs buf (from the @bufbuild/buf npm package, installed into .tools/ on first
# use) on the proto/ module: `scripts/buf.sh lint`.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=.tools/node_modules/.bin/buf
if [ ! -x "$BUF" ]; then
  mkdir -p .tools
  npm install --silent --prefix .tools @bufbuild/buf@1 >/dev/null
fi
exec "$BUF" "$@"
