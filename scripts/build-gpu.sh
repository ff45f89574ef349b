#!/usr/bin/env bash
# Builds the CUDA configuration (build-cuda, sm_90a) on a development machine without a GPU and
# stages what the GPU host needs: the GPU test binaries in build-cuda/gpu-bin, the benchmark
# tools (step_bench, the daemon loraplexd) in build-cuda/gpu-bin/tools, the Python stubs in
# build-cuda/gpu-bin/python, and the non-system shared libraries they link
# (gRPC, abseil, ...) in build-cuda/gpu-libs, via ../shared/gpu/bundle-libs.sh, and both packed
# in build-cuda/gpu-bundle.tgz. Carry the archive (or the two folders, while they fit the device
# tool's 64 MiB) to the GPU host, unpack it there and run scripts/gpu-run.sh.
# Usage: scripts/build-gpu.sh [target...]   (default: every test labelled gpu)
# Env: LORAPLEX_GPU_BUILD (build folder, default build-cuda); LORAPLEX_GPU_TOOLS (default
# "step_bench loraplexd skinny_gemm_probe"; empty: none); JOBS (ninja jobs, default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LORAPLEX_GPU_BUILD:-build-cuda}
tools=${LORAPLEX_GPU_TOOLS-step_bench loraplexd skinny_gemm_probe}
bundle=${LORAPLEX_BUNDLE_LIBS:-../shared/gpu/bundle-libs.sh}
cmake -S . -B "$build" -G Ninja -DLORAPLEX_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a >/dev/null

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  # The tests CTest labels gpu; their names are their executables' names.
  mapfile -t targets < <(ctest --test-dir "$build" -L gpu -N | sed -n 's/^ *Test *#[0-9]*: //p')
fi
[ ${#targets[@]} -gt 0 ] || { echo "build-gpu: no gpu targets found" >&2; exit 1; }
# nvcc is slow and development machines are shared: one job unless told otherwise.
read -r -a tool_targets <<<"$tools"
# The Python gRPC stubs travel in gpu-bin/python for bench/gpu_daemon_run.sh's clients.
ninja -C "$build" -j "${JOBS:-1}" "${targets[@]}" "${tool_targets[@]}" loraplex_proto_python

# The build's one executable named $1, outside staged copies (gpu-bin and any other gpu-* folder):
# a stray copy elsewhere must not be staged in place of what ninja just built.
locate_exe() {
  local found
  mapfile -t found < <(find "$build" \( -name 'gpu-*' -o -name CMakeFiles \) -prune -o -type f -name "$1" -perm -u+x -print)
  [ ${#found[@]} -eq 1 ] || { echo "build-gpu: ${#found[@]} executables named $1 under $build: ${found[*]}" >&2; return 1; }
  echo "${found[0]}"
}

rm -rf "$build/gpu-bin"
mkdir -p "$build/gpu-bin"
exes=()
for t in "${targets[@]}"; do
  exe=$(locate_exe "$t") || exit 1
  cp "$exe" "$build/gpu-bin/"
  exes+=("$exe")
done
mkdir -p "$build/gpu-bin/tools"
for t in "${tool_targets[@]}"; do
  exe=$(locate_exe "$t") || exit 1
  cp "$exe" "$build/gpu-bin/tools/"
  exes+=("$exe")
done
cp -r "$build/python" "$build/gpu-bin/python"
# Debug info would push the carried folders past the device tool's 64 MiB; line tables stay.
find "$build/gpu-bin" -type f -perm -u+x -exec strip --strip-debug {} +
rm -rf "$build/gpu-libs"
"$bundle" "$build/gpu-libs" "${exes[@]}"
echo "staged ${#exes[@]} binaries in $build/gpu-bin ($(du -sh "$build/gpu-bin" | cut -f1))"
# Both folders in one gzip archive (a third of their size): the device tool carries at most 64 MiB
# with the tracked files, which the two folders alone now nearly fill. Carry $build/gpu-bundle.tgz
# and start the command with `tar xzf $build/gpu-bundle.tgz -C $build`.
tar czf "$build/gpu-bundle.tgz" -C "$build" gpu-bin gpu-libs
echo "packed both into $build/gpu-bundle.tgz ($(du -sh "$build/gpu-bundle.tgz" | cut -f1))"
