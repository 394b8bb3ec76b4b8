#!/usr/bin/env bash
# What one device-tool `run` does (bench/README.md, "On the device machine"): the wheels that
# bench/gpu_prepare.sh put in .whl/ (carried) installed into /tmp/site, tests/test_cuda.py (CUDA_TESTS: all,
# none, or a pytest -k expression), then bench/bench_gpu.py with the arguments given here (default: every
# workload and policy), the report and logs into $OUT. Example, as the device command (600 s limit):
#   bash bench/gpu_run.sh --time-budget 470 --policies none compiled model block-chunk --diffusers plain --profile 15
set -uo pipefail
# bench_gpu.py's --time-budget counts from here, the wheels and the tests included
export KINEMA_BENCH_STARTED=${KINEMA_BENCH_STARTED:-$(date +%s)}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_run.sh: installing .whl/ failed: run bench/gpu_prepare.sh here and carry .whl" >&2; exit 2; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
CUDA_TESTS=${CUDA_TESTS:-all}  # all, none, or a pytest -k expression (e.g. compiled)
if [ "$CUDA_TESTS" != none ]; then
  select=(); [ "$CUDA_TESTS" != all ] && select=(-k "$CUDA_TESTS")
  timeout 240 python3 -m pytest -q -rs -p no:cacheprovider ${select[@]+"${select[@]}"} tests/test_cuda.py 2>&1 \
    | tee "$OUT/cuda_tests.log"
fi
python3 bench/bench_gpu.py --output "$OUT/gpu_report.md" "$@" 2>&1 | tee "$OUT/log"
