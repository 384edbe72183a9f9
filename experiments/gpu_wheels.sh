#!/usr/bin/env bash
# Download, here (the GPU machine has no package index), the wheels that experiments/gpu_session.sh
# needs and the GPU machine lacks: experiments/gpu_wheels.txt, one name==version a line, each
# without its dependencies (the list names every one the session imports; the dry run checks it
# by hiding everything else). Into .whl/ (gitignored), for the machine's CPython 3.12 on x86-64.
# Usage: experiments/gpu_wheels.sh   (PY=python to use another interpreter's pip)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
sed 's/#.*//; /^\s*$/d' experiments/gpu_wheels.txt | while read -r pin; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$pin" 2>/dev/null ||
    # no wheel published (antlr4-python3-runtime 4.9.3, which omegaconf 2.3 pins, is an sdist):
    # build one from the sdist; fine for pure-Python packages, which such pins must be
    "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w .whl "$pin"
done
# Exactly one wheel per listed name: two versions of one package stop the whole install there.
ls .whl/*.whl | wc -l | xargs echo "wheels:"
du -sh .whl | cut -f1 | xargs echo "size:"
