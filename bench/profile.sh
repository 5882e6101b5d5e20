#!/usr/bin/env bash
# Profiles bench_generate.py under Nsight Systems (CUDA + NVTX ranges refresh/step/confidence/remask) and prints
# the nsys stats tables. Arguments go to bench_generate.py, e.g.:
#   bench/profile.sh --model /models/LLaDA-8B-Instruct --device cuda --modes exact,dual+thr --repeat 1
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${PROFILE_OUT:-$here/out/profile}
mkdir -p "$(dirname "$out")"
command -v nsys >/dev/null || { echo "profile.sh: nsys (Nsight Systems) is not on PATH" >&2; exit 2; }
nsys profile -t cuda,nvtx -s none --cpuctxsw=none -f true -o "$out" \
  python "$here/bench_generate.py" --json "$out.json" "$@"
nsys stats --report nvtx_sum,cuda_gpu_kern_sum,cuda_api_sum --format table "$out.nsys-rep"
