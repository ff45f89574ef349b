#!/usr/bin/env bash
# Configures and builds loraplex into ./build (CPU executor; CUDA when LORAPLEX_CUDA=ON/AUTO finds
# nvcc). Usage: scripts/build.sh [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-$(nproc)}
cmake -S . -B build -G Ninja -DLORAPLEX_CUDA="${LORAPLEX_CUDA:-OFF}" "$@" >/dev/null
cmake --build build -j "$jobs"
