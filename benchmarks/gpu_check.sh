#!/usr/bin/env bash
# The GPU check, one command: on one H200 (within 8 minutes) it runs
#   1. tests/gpu           the kernel case lists compiled (interpret=False), Mosaic GPU included;
#   2. bench_kernels.py    dequantize and nf4_matmul timings, each result checked against XLA's;
#   3. gpu_train_step.py   a Llama-3-8B-shaped QLoRA step (1x2048, 4x512): step time, tokens/s,
#                          peak device memory.
# JSON goes to $OUT if set, else benchmarks/results/gpu/. Needs an environment with a CUDA jax
# (jax[cuda13]) and the test extra; PYTHON picks the interpreter (default .venv/bin/python).
#
#   benchmarks/gpu_check.sh --dry-run   the same code on the CPU with tiny shapes, into a temporary
#                                       folder (or $OUT): committed results are never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "${1:-}" = "--dry-run" ]; then
  export JAX_PLATFORMS=cpu
  dest=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
  bench=(--quick --repeats 1 --backend interpret)
  train=(--dry-run --steps 1)
  limits=(600 600 600)  # the CPU is slow; the 8-minute budget is the GPU run's
elif [ -z "${1:-}" ]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
  dest=${OUT:-benchmarks/results/gpu}
  bench=(--repeats 10)
  train=(--steps 5)
  limits=(120 120 240)  # 8 minutes in all
else
  echo "usage: $0 [--dry-run]" >&2
  exit 2
fi
platform=$("$PYTHON" -c 'import jax; d = jax.devices()[0]; print(jax.__version__, d.platform, d.device_kind)' 2>/dev/null) || platform="(no device: jax.devices() failed)"
echo "gpu_check: jax $platform, results in $dest"
if [ "$JAX_PLATFORMS" != cpu ] && [[ "$platform" != *" gpu "* ]]; then
  echo "gpu_check: JAX sees no GPU (JAX_PLATFORMS=$JAX_PLATFORMS); install a CUDA jax, e.g. jax[cuda13]" >&2
  exit 1
fi
mkdir -p "$dest"

status=0
run() {  # run LIMIT_S NAME CMD...: a stage under a time limit; a failure is reported, the rest still run
  local limit=$1 name=$2
  shift 2
  local start=$SECONDS
  if timeout "$limit" "$@"; then
    echo "gpu_check: $name passed ($((SECONDS - start)) s)"
  else
    echo "gpu_check: $name FAILED (exit $?, $((SECONDS - start)) s; limit $limit s)"
    status=1
  fi
}
run "${limits[0]}" tests/gpu "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu --junitxml="$dest/tests_gpu.xml"
run "${limits[1]}" bench_kernels "$PYTHON" benchmarks/bench_kernels.py "${bench[@]}" --out "$dest/bench_kernels.json"
run "${limits[2]}" train_step "$PYTHON" benchmarks/gpu_train_step.py "${train[@]}" --out "$dest/train_step.json"
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED); JSON in $dest"
exit $status
