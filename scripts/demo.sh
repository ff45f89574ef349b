#!/usr/bin/env bash
# Installs dependencies, builds, starts loraplexd on the trained demo model with its four adapters
# (deploy/demo.yaml), sends one batch mixing every adapter, prints what each did, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
mkdir -p build/demo
log=build/demo/loraplexd.log
build/server/loraplexd --config deploy/demo.yaml >"$log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
/usr/bin/python3 examples/demo.py --server 127.0.0.1:50051 --wait-ready 60 || {
  echo "demo failed; daemon log: $log" >&2; tail -n 20 "$log" >&2; exit 1; }
