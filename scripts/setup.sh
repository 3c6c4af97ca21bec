#!/usr/bin/env bash
# Install everything scdd needs on a fresh Debian machine: system packages, then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# redis-server: the job service's queue (later issues); dataset-fashion-mnist: the built-in demo data.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq redis-server dataset-fashion-mnist >/dev/null
# constraints.txt pins the torch/torchvision pair tested on CPU-only machines.
python -m pip install -q -c constraints.txt -e '.[test]'
