#!/usr/bin/env bash
# The device check with the device's python3 (docs/gpu.md): on the lent GPU machine, through the device
# tool's `run` with carry [".whl"] (filled here first by bench/device_wheels.sh):
#
#   bash bench/device_check.sh --out $OUT
#
# Any bench/device_check.py option passes through (--device cpu --quick for a dry run here).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/device_check.py "$@"
