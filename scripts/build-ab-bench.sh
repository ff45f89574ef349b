#!/usr/bin/env bash
# Builds tools/step_bench with another commit's engine/ (everything else as in the working tree),
# for a same-machine A/B of kernel changes with bench/gpu_ab.sh: the result,
# $LORAPLEX_GPU_BUILD/ab/step_bench.old.gz (about 3 MB, ignored by git), travels in the device
# tool's `carry` beside gpu-bundle.tgz. Only the files of engine/ that differ are swapped (written
# anew, so ninja sees them change), then put back and step_bench rebuilt from the working tree.
# Usage: scripts/build-ab-bench.sh COMMIT   Env: LORAPLEX_GPU_BUILD (default build-cuda), JOBS (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:?usage: scripts/build-ab-bench.sh COMMIT}
build=${LORAPLEX_GPU_BUILD:-build-cuda}
git rev-parse --verify -q "$commit^{commit}" >/dev/null || { echo "build-ab-bench: no commit $commit" >&2; exit 2; }
[ -f "$build/build.ninja" ] || { echo "build-ab-bench: $build is not configured (scripts/build-gpu.sh first)" >&2; exit 2; }
# Files of engine/ that differ between COMMIT and the working tree; added or deleted ones would
# need the build files regenerated, which this script does not do.
mapfile -t changed < <(git diff --name-only --diff-filter=M "$commit" -- engine)
if [ -n "$(git diff --name-only --diff-filter=ADR "$commit" -- engine)" ]; then
  echo "build-ab-bench: files were added, deleted or renamed under engine/ since $commit; build that commit apart" >&2
  exit 2
fi
[ ${#changed[@]} -gt 0 ] || { echo "build-ab-bench: engine/ is the same at $commit" >&2; exit 2; }
keep=$(mktemp -d)
restore() {
  for f in "${changed[@]}"; do cat "$keep/$f" >"$f"; done  # rewritten, so ninja rebuilds them
  rm -rf "$keep"
}
for f in "${changed[@]}"; do mkdir -p "$keep/$(dirname "$f")" && cp "$f" "$keep/$f"; done
trap restore EXIT
for f in "${changed[@]}"; do git show "$commit:$f" >"$f"; done
ninja -C "$build" -j "${JOBS:-1}" step_bench
mkdir -p "$build/ab"
strip --strip-debug -o "$build/ab/step_bench.old" "$build/bench/step_bench"
gzip -9nf "$build/ab/step_bench.old"
restore
trap - EXIT
ninja -C "$build" -j "${JOBS:-1}" step_bench
echo "build-ab-bench: $build/ab/step_bench.old.gz is step_bench with engine/ at $(git rev-parse --short "$commit"):" \
  "${changed[*]} ($(du -h "$build/ab/step_bench.old.gz" | cut -f1))"
