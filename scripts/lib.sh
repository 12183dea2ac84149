# shellcheck shell=bash
# Helpers the other scripts source (run from the repository root).

# pick_ports N: prints N distinct ports, one a line, that nothing on
# 127.0.0.1 is bound to now, for servers the scripts are about to start.
#
# They are chosen below the kernel's ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), from
# 20000 up: the kernel hands ports in that range to outgoing connections (to
# PostgreSQL, Redis, a peer service), so a port chosen there, as binding to
# port 0 does, can be taken by a connection between the choice and the
# server's bind. Below it only another listener can take one, and the
# callers retry on a failed bind.
pick_ports() {
  python3 - "$1" <<'PY'
import random, socket, sys

want = int(sys.argv[1])
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
except OSError:
    low = 32768
top = low - 1
bottom = 20000 if top - 20000 >= 1000 else 1024
picked = []
candidates = list(range(bottom, top + 1))
random.shuffle(candidates)
for port in candidates:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    picked.append(port)
    if len(picked) == want:
        break
if len(picked) < want:
    sys.exit(f"no {want} free ports between {bottom} and {top}")
print("\n".join(map(str, picked)))
PY
}

# port_in_use PORT: true when something on this machine holds PORT on
# 127.0.0.1 (a listener, or an outgoing connection's local end).
port_in_use() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
finally:
    s.close()
sys.exit(1)
PY
}

# listening PORT: true when a server listens on PORT. It asks the kernel
# (ss) rather than connecting: a probe connection leaves its own end in
# TIME_WAIT for a minute on some port of the ephemeral range, perhaps on
# one a server of ours is about to bind (50051-50053 lie in that range).
listening() {
  if command -v ss >/dev/null; then
    [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# as_root CMD...: runs CMD as root (directly, or through sudo).
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_install PKG...: installs Debian packages, updating the lists once if
# the first try fails (a fresh machine has none).
apt_install() {
  echo "installing: $*"
  as_root apt-get install -y -q "$@" >/dev/null 2>&1 ||
    { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q "$@" >/dev/null; }
}

# VENV: the Python virtual environment under .run/ that `make interop` and
# `make smoke` install into (system Pythons such as Debian 12's refuse
# `pip install`, PEP 668).
VENV="$PWD/.run/venv"

# venv_install MODULE PACKAGE...: makes sure the virtual environment exists
# and can import MODULE, else pip-installs PACKAGE... into it.
venv_install() {
  local module="$1"; shift
  if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    # Debian's python3 needs its python3-venv package for this.
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
      rm -rf "$VENV"
      apt_install python3-venv
      python3 -m venv "$VENV"
    fi
  fi
  "$VENV/bin/python" -c "import $module" 2>/dev/null ||
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
