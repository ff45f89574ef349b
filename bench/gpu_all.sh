#!/usr/bin/env bash
# On the GPU host, in one call: every GPU test binary and the step benchmark
# (scripts/gpu-run.sh --bench), the daemon on the GPU (bench/gpu_daemon_run.sh), and optionally
# the per-op profile (PROFILE=1) and transformers + PEFT (HF_BENCH=1). Logs go to OUTDIR/logs and
# are packed into OUTDIR/logs.tgz (the device tool brings back few files); a short summary is
# printed last.
# Usage: bench/gpu_all.sh OUTDIR   Env: LORAPLEX_GPU_BUILD, STEP_BENCH_ARGS, TESTS (default 1), HF_BENCH (default 0),
#        HF_BENCH_ARGS, PROFILE (default 1), DAEMON (default 1: the demo model), DAEMON_BENCH (default
#        1: bench/gpu_daemon_bench.sh on the benchmark checkpoint), STEP_BENCH_VARIANTS (';'-separated
#        extra step_bench argument lists, each run after the main one in its own process, e.g.
#        "--batches 1,32 --lora-overlap 0"), PROBE (default 0: 1 runs bench/skinny_gemm_probe).
#        LoRA tuning A/Bs are cheaper inside the main run:
#        STEP_BENCH_TUNINGS="--lora-gemm-sms 88;--lora-overlap 0" (scripts/gpu-run.sh) loads the
#        model once (step_bench --variants).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_all.sh OUTDIR}
logs=$out/logs
mkdir -p "$logs"
build=${LORAPLEX_GPU_BUILD:-build-cuda}
export LORAPLEX_GPU_BUILD=$build
status=0
pack() { tar czf "$out/logs.tgz" -C "$out" logs; }  # after each phase: a run cut short keeps what it did
# TESTS=0: the benchmarks only (A/B runs of step_bench variants on code the suite has checked).
bench_mode=--bench
[ "${TESTS:-1}" = 0 ] && bench_mode=--bench-only
# gpu-run.sh first: it also unpacks a carried gpu-bundle.tgz, which the rest of this script uses.
HF_BENCH=${HF_BENCH:-0} scripts/gpu-run.sh "$logs" "$bench_mode" >"$logs/gpu-run.log" 2>&1 || status=1
pack
variant=0
IFS=';' read -r -a variants <<<"${STEP_BENCH_VARIANTS:-}"
for args in "${variants[@]}"; do
  variant=$((variant + 1))
  echo "args: $args" >"$logs/step_bench_variant$variant.log"
  # shellcheck disable=SC2086  # the argument list is split on purpose
  LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64" timeout 300 "$build/gpu-bin/tools/step_bench" \
    "${BENCH_DIR:-/tmp/loraplex-bench}/model" "${BENCH_DIR:-/tmp/loraplex-bench}/adapters" \
    "$logs/step_bench_variant$variant.json" $args >>"$logs/step_bench_variant$variant.log" 2>&1 || status=1
  pack
done
# The daemon on the benchmark checkpoint (8B shape, 32 adapters) over gRPC, next to the step rows.
if [ "${DAEMON_BENCH:-1}" = 1 ] && [ -f "${BENCH_DIR:-/tmp/loraplex-bench}/model/tokenizer.json" ]; then
  bench/gpu_daemon_bench.sh "${BENCH_DIR:-/tmp/loraplex-bench}" "$logs/daemon_bench" >"$logs/daemon_bench.log" 2>&1 ||
    status=1
  pack
fi
if [ "${DAEMON:-1}" = 1 ]; then
  bench/gpu_daemon_run.sh "$logs/daemon" >"$logs/daemon.log" 2>&1 || status=1
  pack
fi
# PROBE=1: bench/skinny_gemm_probe (our own decode GEMM, with LoRA inside it, against cuBLASLt).
if [ "${PROBE:-0}" = 1 ]; then
  LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64" timeout 300 "$build/gpu-bin/tools/skinny_gemm_probe" \
    >"$logs/skinny_gemm_probe.log" 2>&1 || status=1
  pack
fi
if [ "${PROFILE:-1}" = 1 ]; then
  LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64" timeout 300 "$build/gpu-bin/tools/step_bench" \
    "${BENCH_DIR:-/tmp/loraplex-bench}/model" "${BENCH_DIR:-/tmp/loraplex-bench}/adapters" "$logs/profile.json" \
    --profile 1 --batches 1,32 --steps 5 >"$logs/profile.log" 2>&1 || status=1
fi
pack
echo "== tests"; sed -n '/== summary/,$p' "$logs/gpu-run.log" | sed -n '1,12p'
echo "== failing checks"; grep -h ' FAIL$' "$logs"/*.log | head -n 20
echo "== sampling"; grep -h '^TIME Sample' "$logs/sampling_cuda_test.log" 2>/dev/null
echo "== LoRA kernels (graph; all in logs/ops_cuda_test.log)"
grep -h '^TIME LoRA' "$logs/ops_cuda_test.log" 2>/dev/null | grep -E 'qkv|prefill' | grep -v blk | cut -c11-200
echo "== step bench"; grep -E '^(roofline|decode|prefill|ranks) ' "$logs/step_bench.log" | grep -v '\[v[0-9]*\]'
grep -h '^ranks:' "$logs/step_bench.log"
# --variants rows (STEP_BENCH_TUNINGS), compact: the base step's ms, then x base per scenario and
# batch (a variant can move the base step too, which the ratios alone hide).
if grep -q '^variant v' "$logs/step_bench.log" 2>/dev/null; then
  echo "== step bench variants (base ms, x base)"; grep '^variant v' "$logs/step_bench.log"
  grep -E '^decode .*\[v[0-9]+\]' "$logs/step_bench.log" |
    awk '{ n = NF; key = $(n - 6) " b" $(n - 5); if (key != last) { printf "%s%s:", (NR > 1 ? "\n" : ""), key; last = key }
           name = $2; for (i = 3; i <= n - 7; ++i) name = name " " $i
           if (name == "base") printf "  base %s ms", $(n - 3); else printf "  %s %s", name, $(n - 1) } END { print "" }'
fi
for f in "$logs"/step_bench_variant*.log; do
  [ -f "$f" ] && { echo "== step bench variant: $(head -n 1 "$f")"; grep -E '^decode ' "$f" | grep -v eager; }
done
[ -f "$logs/hf_peft.log" ] && { echo "== hf+peft"; grep '^hf+peft' "$logs/hf_peft.log"; }
[ -f "$logs/daemon_bench.log" ] && { echo "== daemon on the benchmark checkpoint"; grep '^daemon ' "$logs/daemon_bench.log"; }
[ -f "$logs/daemon.log" ] && { echo "== daemon"; tail -n 3 "$logs/daemon/demo.txt" 2>/dev/null; cut -c1-200 "$logs/daemon/loadgen.jsonl" 2>/dev/null; }
[ -f "$logs/skinny_gemm_probe.log" ] && { echo "== skinny GEMM probe"; cut -c1-230 "$logs/skinny_gemm_probe.log"; }
[ -f "$logs/profile.log" ] && { echo "== profile"; grep -E '^== profile|^(Gemm|GemmWithLora|Attention|AddRmsNorm|RmsNorm|RopeAndCacheKv|SiluMul|Sample|Embed|GatherRows|sum of ops|host between|profiled step)' "$logs/profile.log" | cut -c1-80; }
exit $status
