#!/usr/bin/env bash
# Installs dependencies, builds, and runs the CPU test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
cd build
ctest -L cpu --output-on-failure -j "${JOBS:-$(nproc)}" --timeout 900
