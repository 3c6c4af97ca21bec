#!/usr/bin/env bash
# Install everything scdd needs on a fresh Debian/Ubuntu machine: system packages, then the project into
# its own virtual environment (.venv) from the lock file — no dependency resolution at install time, and no
# system-wide pip install (which PEP 668 refuses on current Debian and Ubuntu).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# redis-server: the job service's queue and store; dataset-fashion-mnist: the built-in demo data;
# chromium + chromium-driver: the headless browser of the web console's tests (tests/test_console.py);
# python3-venv: `python3 -m venv` on Debian's own Python.
PY="${PYTHON:-python3}"
APT_PKGS="redis-server dataset-fashion-mnist chromium chromium-driver"
"$PY" -c 'import ensurepip, venv' 2>/dev/null || APT_PKGS="$APT_PKGS python3-venv"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq $APT_PKGS >/dev/null
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# uv installs the locked set in parallel; the lock pins every package with hashes (see requirements/README.md).
.venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements/uv.lock
# --compile-bytecode: every process (each Ray worker, each CLI run) then imports torch and ray from .pyc files
# instead of compiling them from source again, which matters where PYTHONDONTWRITEBYTECODE is set.
.venv/bin/uv pip install -q --python .venv/bin/python --require-hashes --no-deps --compile-bytecode -r requirements/cpu.lock
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps --no-build-isolation -e .
echo "scdd installed in $(pwd)/.venv (run .venv/bin/scdd, or activate with: source .venv/bin/activate)"
