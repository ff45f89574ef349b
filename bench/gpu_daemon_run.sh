#!/usr/bin/env bash
# On the GPU host: starts the CUDA build of loraplexd on the trained demo model (deploy/demo.yaml,
# executor auto -> cuda), checks every adapter's answers in one mixed batch (examples/demo.py),
# then measures generated tokens/s with bench/loadgen.py at several concurrencies, mixed adapters.
# Usage: bench/gpu_daemon_run.sh OUTDIR   (LORAPLEX_GPU_BUILD=<folder>, default build-cuda, holding
# gpu-bin/ and gpu-libs/ as scripts/build-gpu.sh stages them: gpu-bin/tools/loraplexd, gpu-bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_daemon_run.sh OUTDIR}
build=${LORAPLEX_GPU_BUILD:-build-cuda}
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$build/gpu-bin/tools/loraplexd" --config deploy/demo.yaml >"$out/loraplexd.log" 2>&1 &
pid=$!
status=0
python3 examples/demo.py --stubs "$build/gpu-bin/python" --wait-ready 120 | tee "$out/demo.txt" || status=1
for c in 1 8 32 64; do
  python3 bench/loadgen.py --stubs "$build/gpu-bin/python" --concurrency $c --requests $((c * 3)) \
    --adapters reverse,upper,shift,sort --prompt "copy: stressed =>" --new-tokens 128 \
    | tee -a "$out/loadgen.jsonl" || status=1
done
kill -TERM $pid; wait $pid || status=1
grep -E "executor|cuda|graph" "$out/loraplexd.log" | head -5
exit $status
