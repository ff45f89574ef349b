// The LoRA delta add for when no consumer kernel folds the pending delta in (lora_delta.h).
#include "engine/ops/cuda/lora_delta.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kAddThreads = 256;

// One thread per 8 columns. The mark, delta and out loads are issued together (one round trip);
// rows the expand did not mark keep their bits.
__global__ void __launch_bounds__(kAddThreads) LoraDeltaAddKernel(LoraDeltaView d, bf16* __restrict__ out) {
  const int vecs_per_row = d.width / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kAddThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(d.rows) * vecs_per_row) return;
  const int64_t row = idx / vecs_per_row;
  const int64_t col = (idx - row * vecs_per_row) * 8;
  float delta[8];
  const bool marked = LoadLoraDelta8(d, row, col, delta);
  uint4* o = reinterpret_cast<uint4*>(out + row * d.width + col);
  const uint4 ov = *o;
  if (!marked) return;
  float f[8];
  Unpack8(ov, f);
  AddLoraDelta8(f, delta);
  *o = Pack8(f);
}

}  // namespace

cudaError_t LaunchLoraDeltaAdd(const LoraDeltaView& d, void* out, cudaStream_t stream) {
  if (d.empty()) return cudaSuccess;
  const int64_t threads = static_cast<int64_t>(d.rows) * (d.width / 8);
  if (threads == 0) return cudaSuccess;
  const int64_t blocks = (threads + kAddThreads - 1) / kAddThreads;
  LoraDeltaAddKernel<<<static_cast<unsigned>(blocks), kAddThreads, 0, stream>>>(d, static_cast<bf16*>(out));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
