#!/usr/bin/env bash
# On the GPU host: the launch configuration (grid, block, registers, shared memory) cuBLASLt
# picks for each decode projection's GEMM at T = 32 and T = 1 (ops_cuda_test's LoRA timing cases,
# first GEMM launch of each): what a LoRA kernel running beside it can still fit on an SM.
# Usage: bench/ncu_gemm_launch.sh OUTDIR   (reports in OUTDIR/ncu_gemm/, one line a case printed)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/ncu_gemm_launch.sh OUTDIR}/ncu_gemm
mkdir -p "$out"
build=${LORAPLEX_GPU_BUILD:-build-cuda}
export LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
[ -n "$ncu" ] || { echo "ncu_gemm_launch: no ncu" >&2; exit 2; }
for m in qkv o gate_up down; do
  for t in "4 adapters x 8 tokens r16" "1 adapter x 1 token r16"; do
    c="$m $t"
    tag=$(echo "$c" | tr -c 'a-zA-Z0-9\n' '_')
    LORAPLEX_TIME_LORA_ONLY="$c" timeout "${NCU_TIMEOUT:-60}" "$ncu" --clock-control none --section LaunchStats \
      --section Occupancy -k "regex:nvjet|gemm|Gemm" --launch-count 1 "$build/gpu-bin/ops_cuda_test" >"$out/$tag.txt" 2>&1
    printf '%-32s %s\n' "$c" "$(grep -m1 -oE '^ +[A-Za-z_][A-Za-z0-9_]* \([0-9]+, [0-9]+, [0-9]+\)x\([0-9]+, [0-9]+, [0-9]+\)' "$out/$tag.txt" | sed 's/^ *//') $(grep -E '^\s+(Registers Per Thread|Dynamic Shared Memory Per Block|Static Shared Memory Per Block|Block Limit Registers|Block Limit Shared Mem)\b' "$out/$tag.txt" | awk '{ printf "%s=%s ", $1 $2 $3, $NF }')"
  done
done
