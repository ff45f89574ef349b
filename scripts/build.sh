#!/usr/bin/env bash
# Configures and builds loraplex into ./build: the CPU executor always, the CUDA executor too when
# nvcc is found (LORAPLEX_CUDA=AUTO, the default; ON requires it, OFF skips it).
# Usage: [LORAPLEX_CUDA=AUTO|ON|OFF] [JOBS=n] scripts/build.sh [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-$(nproc)}
# ccache hits across clones in different folders (CI builds a fresh clone each time).
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
cmake -S . -B build -G Ninja -DLORAPLEX_CUDA="${LORAPLEX_CUDA:-AUTO}" "$@" >/dev/null
cmake --build build -j "$jobs"
