#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what bench/device_check.py needs on a lent GPU machine, which has no
# package index: manylinux x86_64 wheels for CPython 3.11, 3.12 and 3.13 of every package the device image
# lacks (bench/device_check.py --wheel-list: pyproject's dependencies and theirs, at the versions installed
# here, less the big ones the image has), and the real MiniLM's tokenizer files and config (not its weights).
# Then, on the device: `python3 bench/device_check.py --out $OUT` with carry [".whl"] (docs/gpu.md).
#
#   bash bench/device_wheels.sh                  # PYTHON=.venv/bin/python, PYVERSIONS="3.11 3.12 3.13"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVERSIONS=${PYVERSIONS:-"3.11 3.12 3.13"}
mkdir -p .whl
"$PY" bench/device_check.py --wheel-list > .whl/requirements.txt
echo "carrying: $(tr '\n' ' ' < .whl/requirements.txt)"
# glibc 2.28 at most (manylinux_2_28): older than any image a current torch wheel runs on
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
for v in $PYVERSIONS; do
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$v" \
        --implementation cp "${platforms[@]}" -d .whl -r .whl/requirements.txt 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
done
# one version of each name: drop wheels of versions no longer listed (an older run's)
"$PY" - <<'PY'
from pathlib import Path
from packaging.utils import canonicalize_name, parse_wheel_filename
want = {canonicalize_name(line.split("==")[0]): line.split("==")[1]
        for line in Path(".whl/requirements.txt").read_text().split()}
for f in Path(".whl").glob("*.whl"):
    name, version, _, _ = parse_wheel_filename(f.name)
    if str(version) != want.get(name):
        print(f"removing {f.name} (not in requirements.txt)")
        f.unlink()
PY
"$PY" bench/device_check.py --copy-tokenizer .whl/minilm
ls .whl
du -sh .whl
