#!/usr/bin/env bash
# Installs everything kernelhub needs on a fresh Debian machine, idempotently:
#   - system packages (bubblewrap, util-linux's setpriv, e2fsprogs for workspace images, libseccomp2; Debian's
#     Chromium for the browser tests, which Playwright drives as /usr/bin/chromium: it never downloads a browser
#     of its own),
#   - the gateway's virtualenv in .venv, with the test extra (pytest, Jupyter Server, JupyterLab, Playwright),
#   - the kernels' runtime in $KERNELHUB_RUNTIME_DIR (default /opt/kernelhub/runtime), kept apart from the
#     gateway so that the sandbox's read-only view holds only what kernels need.
# It says one line per step it takes, with roughly how long that step takes the first time (measured on a 2-core
# machine with a fast network), and nothing else: each tool's own output goes to $LOG, shown when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME="${KERNELHUB_RUNTIME_DIR:-/opt/kernelhub/runtime}"
PY="${PYTHON:-python3}"
LOG="${KERNELHUB_INSTALL_LOG:-$PWD/.install.log}"
: >"$LOG"
did=0

# step "what it does" "how long": says what comes next.
step() { echo "install: $1 ($2)"; did=1; }
# quietly CMD...: runs CMD with its output in $LOG; on failure shows the end of it and stops.
quietly() {
  echo "+ $*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    echo "install: failed: $*; the last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

need_apt=()
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
command -v losetup >/dev/null || need_apt+=(mount)
# The sandboxes' system-call filter is compiled by the system's libseccomp (through pyseccomp in the venv).
ls /usr/lib/*/libseccomp.so.2 /lib/*/libseccomp.so.2 >/dev/null 2>&1 || need_apt+=(libseccomp2)
[ -x /usr/bin/python3 ] || need_apt+=(python3)
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# Sandboxes see /usr but not /usr/local (the host admin's): node and npm must be the ones in /usr/bin, whatever
# else the host's PATH finds first.
[ -x /usr/bin/node ] || need_apt+=(nodejs)
[ -x /usr/bin/npm ] || need_apt+=(npm)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# The egress tests reach their loopback servers from inside sandboxes with the system's curl.
[ -x /usr/bin/curl ] || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "install: need root to apt-get install ${need_apt[*]}" >&2; exit 1; fi
  step "system packages: apt-get install ${need_apt[*]}" "about a minute"
  quietly apt-get update -qq
  quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# The gateway.
stamp=.venv/.kernelhub-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "the gateway and its test tools (pytest, Jupyter Server, JupyterLab, Playwright) into .venv (pip)" \
    "1 to 3 minutes the first time"
  if [ ! -x .venv/bin/python ]; then quietly "$PY" -m venv .venv; fi
  quietly .venv/bin/pip install -q --upgrade pip
  quietly .venv/bin/pip install -q -e '.[server,test]'
  touch "$stamp"
fi

# The kernels' runtime: Debian's python (readable by unprivileged sandbox uids, unlike a python under /root).
# Sandboxes see it at this same path, so the absolute paths pip writes into its scripts' shebangs hold there.
mkdir -p "$RUNTIME"
chmod 755 "$RUNTIME"
rstamp="$RUNTIME/.python-installed"
if [ ! -f "$rstamp" ] || [ scripts/runtime-requirements.txt -nt "$rstamp" ]; then
  step "the kernels' Python runtime (ipykernel, bash_kernel, numpy, pandas, matplotlib) into $RUNTIME/python (pip)" \
    "1 to 3 minutes the first time"
  [ -x "$RUNTIME/python/bin/python" ] || quietly /usr/bin/python3 -m venv "$RUNTIME/python"
  quietly "$RUNTIME/python/bin/pip" install -q --upgrade pip
  quietly "$RUNTIME/python/bin/pip" install -q -r scripts/runtime-requirements.txt
  touch "$rstamp"
fi
nstamp="$RUNTIME/.node-installed"
if [ ! -f "$nstamp" ] || [ scripts/runtime-package.json -nt "$nstamp" ]; then
  step "the kernels' JavaScript/TypeScript runtime (tslab) into $RUNTIME/node (npm)" "about a minute the first time"
  mkdir -p "$RUNTIME/node"
  cp scripts/runtime-package.json "$RUNTIME/node/package.json"
  # With the node sandboxes run (/usr/bin), so that native add-ons are built for it.
  quietly env -C "$RUNTIME/node" PATH=/usr/bin:/bin npm install --no-audit --no-fund --loglevel=error
  touch "$nstamp"
fi
chmod -R a+rX "$RUNTIME"
if [ "$did" = 1 ]; then
  echo "install: ok: the gateway in .venv (.venv/bin/kernelhub), the kernels' runtime in $RUNTIME"
fi
