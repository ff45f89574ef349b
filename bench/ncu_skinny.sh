#!/usr/bin/env bash
# On the GPU host: Nsight Compute reports of the probe's skinny GEMM kernel (bench/skinny_gemm_probe)
# at several row counts with the same blocks an SM and split count, to see what holds back the
# 32-row kernel (1.12-1.25x cuBLASLt) where the 16-row one matches or beats it: stall reasons,
# issue slots, barriers, memory throughput. One launch each (the probe's correctness call, before
# its timing graphs), text into OUTDIR/ncu-skinny/.
# Usage: bench/ncu_skinny.sh OUTDIR   Env: LORAPLEX_GPU_BUILD (default build-cuda), NCU_SHAPE (default
#        qkv), NCU_ROWS (default "16 32"), NCU_CONFIG (the probe's PROBE_CONFIG; default b3:8, the
#        blocks an SM and splits the executor uses at up to 16 rows), NCU_SET (default full),
#        NCU_TIMEOUT (seconds a row count, default 120).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/ncu_skinny.sh OUTDIR}/ncu-skinny
mkdir -p "$out"
build=${LORAPLEX_GPU_BUILD:-build-cuda}
export LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
[ -n "$ncu" ] || { echo "ncu_skinny: no ncu" >&2; exit 2; }
status=0
for m in ${NCU_ROWS:-16 32}; do
  f="$out/${NCU_SHAPE:-qkv}-M$m.txt"
  PROBE_SHAPE="${NCU_SHAPE:-qkv}" PROBE_M="$m" PROBE_CONFIG="${NCU_CONFIG:-b3:8}" timeout "${NCU_TIMEOUT:-120}" "$ncu" \
    --clock-control none --set "${NCU_SET:-full}" -k "regex:SkinnyGemmKernel" --launch-count 1 \
    "$build/gpu-bin/tools/skinny_gemm_probe" >"$f" 2>&1 || status=1
done
for f in "$out"/*.txt; do
  echo "== $(basename "$f")"
  grep -E '^\s+(Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Executed Ipc Active|No Eligible|Achieved Occupancy|Registers Per Thread|Grid Size)\b' "$f" | head -n 12
  grep -E 'Stall|stall' "$f" | head -n 8
done
exit $status
