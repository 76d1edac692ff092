#!/usr/bin/env bash
# Fetches, on a machine with registry access, the wheels bench/gpu_engine.sh installs on a lent GPU machine (which
# has none): Python 3.12 x86_64 builds of what that machine lacks or has too old (ENVIRONMENT.md: it has torch,
# numpy, safetensors, tokenizers and protobuf 7, and grpcio 1.84, older than the 1.85.1 our stubs need), pytest,
# and a wheel of this project (its `coexit` command entry points; the code itself runs from the checkout).
#
#   bash bench/gpu_wheels.sh            # into .whl/ (git-ignored; pass it to the device tool's `carry`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
    "grpcio==1.85.4" "grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1" "prometheus-client>=0.20" \
    "pyzmq>=26" "pytest>=8" "pluggy>=1.5" "iniconfig>=2" "packaging>=24"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl . && rm -rf build
ls -1 .whl
du -sh .whl
