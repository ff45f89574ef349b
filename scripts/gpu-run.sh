#!/usr/bin/env bash
# Runs on the GPU host: every binary in build-cuda/gpu-bin (staged by scripts/build-gpu.sh) with
# the bundled libraries, each one's full log teed into OUTDIR/<name>.log, a JSON summary in
# OUTDIR/summary.json, and a short table last (verdict per binary, failing lines, timings).
# With --bench, then the step benchmark: bench/make_bench_checkpoint.py writes a random
# Llama-3-8B checkpoint and adapters under $BENCH_DIR (default /tmp/loraplex-bench), tools/step_bench
# times the engine's steps (OUTDIR/step_bench.json), bench/hf_peft_baseline.py times transformers +
# PEFT on the same checkpoint (OUTDIR/hf_peft.json). --bench-only skips the test binaries.
# Exit status: 0 when every binary passed (or skipped) and the benchmark ran, 1 otherwise.
# Usage: scripts/gpu-run.sh OUTDIR [--bench | --bench-only]
# Env: LORAPLEX_GPU_BUILD (build folder, default build-cuda); STEP_BENCH_ARGS, HF_BENCH_ARGS;
#      BENCH_R16 (rank-16 adapters to write, default 128: one per request at batch 128);
#      STEP_BENCH_TUNINGS (step_bench --variants: ';'-separated lists of --lora-* flags, run after
#      the main rows in the same process).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-run.sh OUTDIR [--bench | --bench-only]}
mode=${2:-tests}
mkdir -p "$out"
build=${LORAPLEX_GPU_BUILD:-build-cuda}
bin=$build/gpu-bin
export LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Tests that read fixtures from the source tree find them in this copy of it.
export LORAPLEX_SOURCE_DIR="$PWD"
per_binary_timeout=${GPU_RUN_TIMEOUT:-500}

# Carried as one archive (scripts/build-gpu.sh, which rewrites it with every build): unpack it
# over whatever a warm machine kept from an earlier call.
if [ -f "$build/gpu-bundle.tgz" ]; then
  rm -rf "$bin" "$build/gpu-libs"
  tar xzf "$build/gpu-bundle.tgz" -C "$build" || exit 2
fi
[ -d "$bin" ] && [ -n "$(ls -A "$bin")" ] || { echo "gpu-run: no binaries in $bin (run scripts/build-gpu.sh, carry $build/gpu-bundle.tgz)" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$out/gpu.txt" 2>&1 || true
status=0
rows=()
json="["
for exe in "$bin"/*; do
  [ "$mode" = --bench-only ] && break
  [ -f "$exe" ] && [ -x "$exe" ] || continue
  name=$(basename "$exe")
  echo "=== $name"
  start_ns=$(date +%s%N)
  timeout "$per_binary_timeout" "$exe" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  ms=$((($(date +%s%N) - start_ns) / 1000000))
  secs=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))  # no bc on the GPU host
  case $rc in
    0) verdict=PASS ;;
    77) verdict=SKIP ;;
    124) verdict=TIMEOUT; status=1 ;;
    *) verdict=FAIL; status=1 ;;
  esac
  fails=$(grep -c ' FAIL$' "$out/$name.log")
  rows+=("$(printf '%-22s %-7s rc=%-3s %8ss  %s failing checks' "$name" "$verdict" "$rc" "$secs" "$fails")")
  json+="$( [ "$json" = "[" ] || echo ","){\"binary\":\"$name\",\"verdict\":\"$verdict\",\"rc\":$rc,\"seconds\":$secs,\"failing_checks\":$fails}"
done
json+="]"
echo "$json" >"$out/summary.json"

echo
echo "== failing checks (first 30) =="
grep -h ' FAIL$' "$out"/*.log 2>/dev/null | head -n 30
echo "== timings =="
grep -h '^TIME ' "$out"/*.log 2>/dev/null
echo "== summary ($(head -n 2 "$out/gpu.txt" | tail -n 1)) =="
[ ${#rows[@]} -gt 0 ] && printf '%s\n' "${rows[@]}"

if [ "$mode" = --bench ] || [ "$mode" = --bench-only ]; then
  bench_dir=${BENCH_DIR:-/tmp/loraplex-bench}
  echo "== benchmark (checkpoint in $bench_dir)"
  # A checkpoint left by an earlier call on a warm machine is kept only if it has as many rank-16
  # adapters (adapters/r16_*) as asked: another count would quietly change the "distinct" rows of
  # large batches. Only what make_bench_checkpoint.py writes is removed.
  r16=${BENCH_R16:-128}
  have=$(find "$bench_dir/adapters" -mindepth 1 -maxdepth 1 -name 'r16_*' 2>/dev/null | wc -l)
  if [ -f "$bench_dir/model/config.json" ] && [ "$have" != "$r16" ]; then
    echo "gpu-run: $bench_dir holds $have rank-16 adapters, not $r16: writing the checkpoint again"
    rm -rf "$bench_dir/model" "$bench_dir/adapters"
  fi
  if [ ! -f "$bench_dir/model/config.json" ]; then
    # As many rank-16 adapters as the largest batch has requests (step_bench: one per request).
    PYTHONUNBUFFERED=1 python3 bench/make_bench_checkpoint.py "$bench_dir" --r16 "$r16" 2>&1 | tee "$out/make_checkpoint.log" ||
      { echo "gpu-run: checkpoint generation failed"; exit 1; }
  fi
  # shellcheck disable=SC2086  # word splitting of the extra arguments is intended
  timeout "$per_binary_timeout" "$bin/tools/step_bench" "$bench_dir/model" "$bench_dir/adapters" \
    "$out/step_bench.json" ${STEP_BENCH_ARGS:-} ${STEP_BENCH_TUNINGS:+--variants "$STEP_BENCH_TUNINGS"} 2>&1 |
    tee "$out/step_bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  if [ "${HF_BENCH:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 timeout "$per_binary_timeout" python3 bench/hf_peft_baseline.py "$bench_dir" \
      "$out/hf_peft.json" ${HF_BENCH_ARGS:-} 2>&1 | tee "$out/hf_peft.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  fi
fi
exit $status
