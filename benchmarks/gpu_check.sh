#!/usr/bin/env bash
# GPU check for impl="triton", on one CUDA GPU, in under 8 minutes:
#   1. the CUDA tests of tests/kernels/test_triton_interpreter.py (tiny shapes plus N = 8192, V = 128256 in bf16 and fp32),
#   2. benchmarks/bench_loss_gpu.py: triton, triton:inplace, liger (Liger-Kernel's cross entropy), torch, reference
#      and compile (in that order: the slowest last) side by side in one process at N = 8192, V = 128256, bf16,
#      k = 20, lam = 0.2, plus copy bandwidth, forget_logprobs alone and a sweep of the Triton forward kernels
#      (bucket, per-lane, and on 256-2048 rows at k = 20 and k = 0 the launcher's choice beside the per-lane and the
#      split-vocabulary forwards forced),
#   3. benchmarks/bench_linear_gpu.py: bs_linear_loss vs Liger's fused linear cross entropy (N = 8192, H = 4096).
# Both scripts use benchmarks/harness.py and benchmarks/providers.py (provider names as there).
# Results: benchmarks/results/<gpu name>/ (bench.md, bench.json and the logs), or $OUT itself when that is set, so
# that whatever a timeout cuts short keeps every number measured before it (bench_loss_gpu.py rewrites bench.md and
# bench.json after each provider). The machine has no network: when liger_kernel is not importable, the wheel is
# installed from $WHEELS or benchmarks/wheels/ (pip download --no-deps liger-kernel==0.8.5 -d benchmarks/wheels); with
# no wheel, a loud "!!! LIGER-KERNEL IS MISSING" line opens the output and bench.md, and everything else still runs.
# Extra arguments go to bench_loss_gpu.py (e.g. --repeat 20, --providers triton,liger, --no-sweep).
#   bash benchmarks/gpu_check.sh --dry-run   # CPU: the same steps at tiny shapes under the Triton interpreter, the
#                                            # launcher-choice test instead of the CUDA tests (checks the script only)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PYTHON=${PYTHON:-python3}
dry_run=""
if [ "${1:-}" = "--dry-run" ]; then
  dry_run="--dry-run"
  shift
fi

echo "== device"
if [ -z "$dry_run" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
    --format=csv || echo "nvidia-smi not available"
fi
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

if ! "$PYTHON" -c "import liger_kernel" 2>/dev/null; then
  wheel=$(ls "${WHEELS:-benchmarks/wheels}"/liger_kernel-*.whl 2>/dev/null | head -n 1)
  if [ -n "$wheel" ]; then
    echo "== installing $wheel (no network, no dependencies: torch and triton are already there)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/bs_kernels_liger "$wheel" \
      && export PYTHONPATH="$PYTHONPATH:/tmp/bs_kernels_liger"
  else
    echo "!!! LIGER-KERNEL IS MISSING: not importable and no liger_kernel-*.whl under ${WHEELS:-benchmarks/wheels}:"
    echo "!!! no liger rows and no 'vs liger' targets in this run"
  fi
fi

if [ -n "$dry_run" ]; then
  gpu="dry-run-cpu"
  test_files=(tests/kernels/test_triton_sass.py)
  tests=(-k "launcher_choice or listed")
else
  gpu=$("$PYTHON" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9._-]+', '-', torch.cuda.get_device_name()).strip('-'))")
  test_files=(tests/kernels/test_triton_interpreter.py)
  tests=(-k "not subprocess")
fi
results="${OUT:-benchmarks/results/$gpu}"
mkdir -p "$results"
echo "== results go to $results"

echo "== tests (${test_files[*]})"
# Kernel variants compile for seconds each: spread the tests over 4 workers when pytest-xdist is there.
parallel=()
"$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 4)
timeout 120 "$PYTHON" -m pytest "${test_files[@]}" -q -rs -p no:cacheprovider "${tests[@]}" \
  "${parallel[@]}" 2>&1 | tee "$results/tests.log"
tests_status=${PIPESTATUS[0]}

echo "== benchmark"
timeout 210 "$PYTHON" benchmarks/bench_loss_gpu.py $dry_run --out "$results" "$@" 2>&1 | tee "$results/bench.log"
bench_status=${PIPESTATUS[0]}

echo "== fused linear + BS-T (bs_linear_loss vs Liger's fused linear cross entropy)"
timeout 120 "$PYTHON" benchmarks/bench_linear_gpu.py $dry_run 2>&1 | tee "$results/bench_linear.log"
linear_status=${PIPESTATUS[0]}
echo "== exit status: tests $tests_status, benchmark $bench_status, linear $linear_status (results in $results)"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$linear_status" -eq 0 ]
