#!/usr/bin/env bash
# On the GPU host: a same-machine A/B of two builds of step_bench, one process each, in the order
# new, old, new (so drift shows as the two new runs disagreeing): the working tree's build (from
# gpu-bundle.tgz) against $LORAPLEX_GPU_BUILD/ab/step_bench.old.gz (scripts/build-ab-bench.sh).
# Both load the same benchmark checkpoint. Logs and JSON under OUTDIR; a table of x-base ratios
# is printed last.
# Usage: bench/gpu_ab.sh OUTDIR   Env: LORAPLEX_GPU_BUILD (default build-cuda), AB_ARGS (step_bench
#        arguments, default "--steps 10 --batches 32,64"), BENCH_R16 (default 32), BENCH_DIR.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:?usage: bench/gpu_ab.sh OUTDIR}
mkdir -p "$out"
build=${LORAPLEX_GPU_BUILD:-build-cuda}
if [ -f "$build/gpu-bundle.tgz" ]; then tar xzf "$build/gpu-bundle.tgz" -C "$build" || exit 2; fi
[ -f "$build/ab/step_bench.old.gz" ] || { echo "gpu_ab: no $build/ab/step_bench.old.gz (scripts/build-ab-bench.sh)" >&2; exit 2; }
old=$(mktemp)
gunzip -c "$build/ab/step_bench.old.gz" >"$old" && chmod +x "$old" || exit 2
export LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64"
bench_dir=${BENCH_DIR:-/tmp/loraplex-bench}
if [ ! -f "$bench_dir/model/config.json" ]; then
  python3 bench/make_bench_checkpoint.py "$bench_dir" --r16 "${BENCH_R16:-32}" >"$out/make_checkpoint.log" 2>&1 ||
    { echo "gpu_ab: checkpoint generation failed" >&2; exit 1; }
fi
status=0
i=0
for bin in "$build/gpu-bin/tools/step_bench" "$old" "$build/gpu-bin/tools/step_bench"; do
  i=$((i + 1))
  # shellcheck disable=SC2086  # the argument list is split on purpose
  timeout 300 "$bin" "$bench_dir/model" "$bench_dir/adapters" "$out/ab$i.json" ${AB_ARGS:---steps 10 --batches 32,64} \
    >"$out/ab$i.log" 2>&1 || status=1
done
rm -f "$old"
echo "== x base step, one process each: new | old | new"
paste <(grep -E '^decode ' "$out/ab1.log") <(grep -E '^decode ' "$out/ab2.log") <(grep -E '^decode ' "$out/ab3.log") |
  grep -v eager | awk -F'\t' '{ split($1, a, / +/); split($2, b, / +/); split($3, c, / +/); n = length(a)
    name = a[2]; for (j = 3; j <= n - 6; ++j) name = name " " a[j]
    printf "%-34s b%-4s %s | %s | %s\n", name, a[n - 5], a[n - 1], b[length(b) - 1], c[length(c) - 1] }'
exit $status
