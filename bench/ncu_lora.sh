#!/usr/bin/env bash
# On the GPU host: Nsight Compute reports of the decode LoRA kernels (and the GEMM beside them)
# for a few of ops_cuda_test's timing cases, one eager launch each, text into OUTDIR/ncu/.
# Usage: bench/ncu_lora.sh OUTDIR   Env: LORAPLEX_GPU_BUILD (default build-cuda),
#        NCU_CASES ('|'-separated case names, default below), NCU_SET (default full),
#        NCU_KERNELS (kernel name regexes, default "LoraShrink LoraExpandKernel"; empty: none), NCU_GEMM
#        (default 1). The launch shape of every decode GEMM alone (grid, registers, shared memory):
#        NCU_KERNELS= NCU_CASES="qkv 4 adapters x 8 tokens r16|o 4 adapters x 8 tokens r16|..." .
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/ncu_lora.sh OUTDIR}/ncu
mkdir -p "$out"
build=${LORAPLEX_GPU_BUILD:-build-cuda}
export LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
[ -n "$ncu" ] || { echo "ncu_lora: no ncu" >&2; exit 2; }
IFS='|' read -r -a cases <<<"${NCU_CASES:-qkv 4 adapters x 8 tokens r16|down 4 adapters x 8 tokens r16|qkv 32 distinct r16|qkv 1 adapter x 1 token r16}"
for c in "${cases[@]}"; do
  tag=$(echo "$c" | tr -c 'a-zA-Z0-9\n' '_')
  # Launch 5 of each kernel: eager launches of the variant that runs that kernel alone (past warm-up).
  for k in ${NCU_KERNELS-LoraShrink LoraExpandKernel}; do
    LORAPLEX_TIME_LORA_ONLY="$c" timeout 120 "$ncu" --clock-control none --set "${NCU_SET:-full}" \
      -k "regex:$k" --launch-skip 5 --launch-count 1 "$build/gpu-bin/ops_cuda_test" >"$out/$tag.$k.txt" 2>&1
  done
  # The base GEMM of the case: grid, registers, shared memory (can the LoRA kernels co-reside?).
  [ "${NCU_GEMM:-1}" = 1 ] || continue
  LORAPLEX_TIME_LORA_ONLY="$c" timeout 120 "$ncu" --clock-control none --section LaunchStats --section Occupancy \
    --section SpeedOfLight -k "regex:nvjet|gemm|Gemm" --launch-skip 5 --launch-count 1 "$build/gpu-bin/ops_cuda_test" \
    >"$out/$tag.gemm.txt" 2>&1
done
for f in "$out"/*.txt; do
  echo "== $(basename "$f")"
  grep -E '^\s+(Duration|Memory Throughput|DRAM Throughput|Registers Per Thread|Grid Size|Block Size|Dynamic Shared Memory Per Block|Static Shared Memory Per Block|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|L2 Hit Rate|Waves Per SM)\b' "$f" | head -n 14
  grep -m1 -E '^\s+[a-zA-Z_].*\(\d+, \d+, \d+\)x' "$f" || grep -m1 -E '\([0-9]+, [0-9]+, [0-9]+\)x\([0-9]+' "$f"
done
