#!/usr/bin/env bash
# One command for a machine with a GPU: builds nothing new; runs the whole test suite (CUDA tests included), the
# kernel tests under compute-sanitizer (memcheck, racecheck), the kernel benchmark and a generation benchmark, and
# prints a short report. Install first (pip install --no-build-isolation .), then: bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-bench/out/gpu_check}
mkdir -p "$out"
declare -A status
run() {  # run NAME CMD...: logs to $out/NAME.log, records pass/fail
  local name=$1; shift
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then status[$name]=pass; else status[$name]="FAIL (see $out/$name.log)"; fi
  tail -n 15 "$out/$name.log"
}
python - <<'PY' || exit 2
import torch, llada_rt._C as C
assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA GPU"
assert C.with_cuda, "gpu_check: llada_rt was built without CUDA kernels (reinstall with nvcc on PATH)"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
kernel_tests="tests/test_attention.py tests/test_confidence.py tests/test_remask.py"
run tests python -m pytest -q -rs tests
run cuda_tests python -m pytest -q -rs -k "cuda or probe" tests
if command -v compute-sanitizer >/dev/null; then
  run memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -x -k cuda $kernel_tests
  run racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python -m pytest -q -x -k cuda $kernel_tests
else
  status[memcheck]="skipped: compute-sanitizer not on PATH"; status[racecheck]=${status[memcheck]}
fi
run bench_kernels python bench/bench_kernels.py --device cuda
run bench_generate python bench/bench_generate.py --random --device cuda --dtype bfloat16 --num-prompts 1 \
  --cuda-graph both --json "$out/bench_generate.json"
echo; echo "== report"
for k in tests cuda_tests memcheck racecheck bench_kernels bench_generate; do printf '%-15s %s\n' "$k" "${status[$k]}"; done
for k in "${!status[@]}"; do [[ ${status[$k]} == pass || ${status[$k]} == skipped* ]] || exit 1; done
