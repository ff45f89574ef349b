#!/usr/bin/env bash
# The daemon end to end on the benchmark checkpoint (bench/make_bench_checkpoint.py: a random
# Llama-3-8B-shaped model with a byte-level tokenizer, rank-16 adapters r16_*): starts loraplexd
# with ADAPTERS of them registered (one slot each), then bench/loadgen.py measures generated
# tokens/s and latency over gRPC, greedy, NEW_TOKENS per request, at each concurrency in CONCURRENCY:
# the base model, 4 adapters, and ADAPTERS distinct adapters round robin (one per request at
# concurrency ADAPTERS). Set beside step_bench's decode rows of the same batch, this shows what the
# scheduler, sampling and gRPC cost on top of the model's steps.
# Usage: bench/gpu_daemon_bench.sh BENCH_DIR OUTDIR
# Env: LORAPLEX_GPU_BUILD (folder with gpu-bin/ and gpu-libs/ from scripts/build-gpu.sh, default
#      build-cuda); LORAPLEXD and STUBS override the binary and the Python stubs (e.g. a CPU build on
#      a --tiny checkpoint, as a smoke run); ADAPTERS (default 32), NEW_TOKENS (default 128),
#      CONCURRENCY (default "1 8 32"), PYTHON (one with grpcio, default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
bench_dir=$(realpath "${1:?usage: bench/gpu_daemon_bench.sh BENCH_DIR OUTDIR}")
out=${2:?usage: bench/gpu_daemon_bench.sh BENCH_DIR OUTDIR}
build=${LORAPLEX_GPU_BUILD:-build-cuda}
loraplexd=${LORAPLEXD:-$build/gpu-bin/tools/loraplexd}
stubs=${STUBS:-$build/gpu-bin/python}
adapters=${ADAPTERS:-32}
new_tokens=${NEW_TOKENS:-128}
concurrency=${CONCURRENCY:-1 8 32}
port=${PORT:-50061}
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/$build/gpu-libs:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for ((i = 0; i < adapters; ++i)); do
  [ -d "$bench_dir/adapters/r16_$i" ] || { echo "gpu_daemon_bench: $bench_dir/adapters/r16_$i is missing" >&2; exit 2; }
done

config=$out/bench.yaml
{
  echo "# Written by bench/gpu_daemon_bench.sh."
  echo "server: {address: 127.0.0.1:$port, max_new_tokens_limit: 4096, drain_timeout_s: 5}"
  echo "model: {path: $bench_dir/model, max_seq_len: 1024}"
  echo "engine: {executor: auto, max_running_seqs: 64}"
  echo "lora: {max_rank: 64, adapter_slots: $adapters}"
  echo "adapters:"
  for ((i = 0; i < adapters; ++i)); do echo "  - {name: r16_$i, path: $bench_dir/adapters/r16_$i}"; done
} >"$config"

"$loraplexd" --config "$config" >"$out/loraplexd.log" 2>&1 &
pid=$!
status=0
distinct=$(seq -s, -f 'r16_%g' 0 $((adapters - 1)))
four=$(seq -s, -f 'r16_%g' 0 $((adapters < 4 ? adapters - 1 : 3)))
first=1
for c in $concurrency; do
  for scenario in "base:" "4 adapters:$four" "$adapters distinct:$distinct"; do
    name=${scenario%%:*}
    list=${scenario#*:}
    # The first run waits for the model to load and the graphs to be recorded.
    wait_s=30
    [ $first = 1 ] && wait_s=600 && first=0
    line=$("${PYTHON:-python3}" bench/loadgen.py --server "127.0.0.1:$port" --stubs "$stubs" --wait-ready $wait_s \
      --concurrency "$c" --requests $((c * 3)) --adapters "$list" --prompt "copy: stressed =>" \
      --new-tokens "$new_tokens" | tail -n 1) || status=1
    echo "{\"scenario\": \"$name\", \"result\": ${line:-null}}" >>"$out/daemon_bench.jsonl"
    "${PYTHON:-python3}" - "$name" "$c" "$line" <<'PY' || status=1
import json, sys
name, c, line = sys.argv[1], sys.argv[2], sys.argv[3]
r = json.loads(line) if line else {}
print(f"daemon  {name:<14} concurrency {c:>3}: {r.get('tokens_per_s', 0):9.1f} tok/s  ttft p50 "
      f"{r.get('ttft_median_s', 0) * 1e3:7.1f} ms  itl p50 {r.get('itl_median_s', 0) * 1e3:6.2f} ms  "
      f"errors {r.get('num_errors', 'n/a')}")
sys.exit(0 if r and r.get("num_errors", 1) == 0 else 1)
PY
  done
done
kill -TERM $pid
wait $pid || status=1
grep -E "listening|executor|graph" "$out/loraplexd.log" | head -3
exit $status
