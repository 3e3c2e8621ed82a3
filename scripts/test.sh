#!/usr/bin/env bash
# Install everything the tests need, then run the linters and the test suite.
# Works on a fresh Debian machine (as root it installs missing Debian packages itself).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'

# Debian packages the tests use: node (a real Node upstream).
need=()
command -v node >/dev/null 2>&1 || need+=(nodejs)
# systemd-analyze verifies the shipped units; logrotate checks and runs the generated rules,
# and rotates a log under the tail while a writer appends (tests/test_rotation.py).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v logrotate >/dev/null 2>&1 || need+=(logrotate)
# Headless Chromium renders the dashboard; promtool (Debian's prometheus) checks the alert rules.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# mount/umount put the journal on a size-limited tmpfs, then remount it read-only
# (tests/test_storage_faults.py: disk full and read-only state directory, as root).
command -v mount >/dev/null 2>&1 || need+=(mount)
# The benchmarks (bench/run.py --quick, below): wrk is the load generator, nginx the reference
# reverse proxy, taskset (util-linux) pins the processes compared to their cores.
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}" </dev/null
  else
    echo "missing: ${need[*]} (install them, or run this script as root)" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip </dev/null
.venv/bin/python -m pip install -q -e '.[test]' </dev/null

.venv/bin/ruff check supervisor tests bench
.venv/bin/mypy
# pytest exits 5 when it collects no test: set -e turns that into a failure too.
.venv/bin/pytest -p no:cacheprovider "$@"
# The benchmarks in their short mode (no thresholds): they must keep running.
.venv/bin/python bench/run.py --quick --json "${TMPDIR:-/tmp}/blast-supervisor-bench.json"
