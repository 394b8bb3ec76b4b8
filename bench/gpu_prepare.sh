#!/usr/bin/env bash
# Wheels that bench_gpu.py and tests/test_cuda.py need and the GPU image lacks (diffusers and its
# importlib_metadata; pytest and its dependencies), for the device tool's `carry`: written to .whl/ (git-ignored),
# at the versions this checkout's tests use. Run it once here, in the repository root; bench/README.md ("On the
# device machine") gives the command to run there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-10.2.0}" \
  "pytest==9.0.3" "pluggy==1.6.0" "iniconfig==2.3.0" "packaging==26.2" "Pygments==2.20.0"
ls -l .whl
