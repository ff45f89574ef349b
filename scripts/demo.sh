#!/usr/bin/env bash
# Installs dependencies, builds, generates the demo model, starts loraplexd on it, sends one batch
# that mixes every adapter, prints what each answered, and stops the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
if [ ! -f build/demo/model/config.json ]; then
  /usr/bin/python3 scripts/make_demo_model.py build/demo >/dev/null
fi
port=${LORAPLEX_DEMO_PORT:-50151}
log=build/demo/loraplexd.log
build/server/loraplexd --config deploy/demo.yaml --address "127.0.0.1:${port}" >"$log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
/usr/bin/python3 examples/client.py --address "127.0.0.1:${port}" --wait-ready 60 --demo
