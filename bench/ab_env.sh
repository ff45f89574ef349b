#!/usr/bin/env bash
# On the GPU host: the step benchmark once per environment variant, each in its own process on the
# same checkpoint, for same-run A/B comparisons of executor settings read from the environment.
# Usage: bench/ab_env.sh OUTDIR 'name1:VAR=1 VAR2=2;name2:VAR=0' [step_bench args...]
# Env: LORAPLEX_GPU_BUILD (default build-cuda), BENCH_DIR (default /tmp/loraplex-bench).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/ab_env.sh OUTDIR VARIANTS [step_bench args...]}
variants=${2:?variants}
shift 2
mkdir -p "$out"
build=${LORAPLEX_GPU_BUILD:-build-cuda}
bench_dir=${BENCH_DIR:-/tmp/loraplex-bench}
export LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64"
if [ ! -f "$bench_dir/model/config.json" ]; then
  python3 bench/make_bench_checkpoint.py "$bench_dir" >"$out/make_checkpoint.log" 2>&1 || exit 1
fi
status=0
IFS=';' read -r -a list <<<"$variants"
for v in "${list[@]}"; do
  name=${v%%:*}
  assigns=${v#*:}
  # shellcheck disable=SC2086  # the assignments are split on purpose
  env $assigns timeout 300 "$build/gpu-bin/tools/step_bench" "$bench_dir/model" "$bench_dir/adapters" \
    "$out/ab_$name.json" "$@" >"$out/ab_$name.log" 2>&1 || status=1
done
for v in "${list[@]}"; do
  name=${v%%:*}
  echo "== $name: ${v#*:}"
  grep -E '^decode ' "$out/ab_$name.log" | grep -v -E 'eager|paired' | cut -c1-90
done
exit $status
