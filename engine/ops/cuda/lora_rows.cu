// The LoRA rows' install and flush kernels (lora_rows.h).
#include "engine/ops/cuda/lora_rows.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kInstallThreads = 256;
constexpr int kFlushThreads = 256;

// Positions are the step's segments that hold tokens, in order (empty segments take none), so a
// step of P adapters uses positions 0..P-1 whatever segments it lists: GEMMs over the weight and
// only the spare rows of those positions (the skinny LoRA rows) see every row a reader asks for.
// Each block reads which positions need their adapter's A rows (before any block may change
// `installed`), block 0 writes every row's position, and the copies are dealt out one spare row
// (K elements) at a time. The last block to finish records the installed slots.
__global__ void LoraRowsInstallKernel(LoraRowsInstall p) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  __shared__ int need[kLoraRowsPositions];     // slot to install at each position; -1: none
  __shared__ int slot_at[kLoraRowsPositions];  // slot at each position; -1: no segment there
  __shared__ int seg_pos[kLoraRowsPositions];  // position of each of the first segments; -1: empty
  __shared__ int live;                         // segments the step lists (up to kLoraRowsPositions)
  if (threadIdx.x == 0) {
    const int n = *p.num_segments;
    live = n < 0 ? 0 : n > kLoraRowsPositions ? kLoraRowsPositions : n;
    int next = 0;
    for (int q = 0; q < kLoraRowsPositions; ++q) {
      const bool tokens = q < live && p.seg_starts[q + 1] > p.seg_starts[q];
      seg_pos[q] = tokens ? next : -1;
      if (tokens) slot_at[next++] = p.seg_slots[q];
    }
    for (int q = next; q < kLoraRowsPositions; ++q) slot_at[q] = -1;
  }
  __syncthreads();
  if (threadIdx.x < kLoraRowsPositions) {
    const int q = threadIdx.x;
    const int slot = slot_at[q];
    need[q] = slot >= 0 && slot != p.installed[q] ? slot : -1;
  }
  __syncthreads();

  if (blockIdx.x == 0) {
    for (int r = threadIdx.x; r < p.num_tokens; r += blockDim.x) p.row_pos[r] = -1;
    __syncthreads();
    const int end = p.seg_starts[live];
    for (int i = threadIdx.x; i < end; i += blockDim.x) {
      int seg = 0;
      for (int q = 1; q < live; ++q) {
        if (i >= p.seg_starts[q]) seg = q;
      }
      const int row = p.token_rows[i];
      if (row >= 0 && row < p.num_tokens) p.row_pos[row] = seg_pos[seg];
    }
  }

  // Every entry's weights at each position, this step's (block 1, or 0 alone).
  if (blockIdx.x == (gridDim.x > 1 ? 1 : 0)) {
    const int items = *p.num_entries * kLoraRowsPositions * kLoraMaxSlices;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      const int s = it % kLoraMaxSlices, q = (it / kLoraMaxSlices) % kLoraRowsPositions;
      const int e = it / (kLoraMaxSlices * kLoraRowsPositions);
      const LoraRowsEntry& entry = p.entries[e];
      const int slot = slot_at[q];
      LoraSliceWeightsDev w{nullptr, nullptr, 0, 0.0f};
      if (entry.spare != nullptr && slot >= 0 && slot < entry.num_slots && s < entry.num_slices) {
        w = entry.table[static_cast<int64_t>(slot) * entry.num_slices + s];
      }
      p.info[it] = w;
    }
  }

  const bool any = need[0] >= 0 || need[1] >= 0 || need[2] >= 0 || need[3] >= 0;
  if (any) {
    // unit = ((entry · positions + q) · kLoraMaxSlices + s) · kLoraRowsRank + j
    const int64_t units = static_cast<int64_t>(*p.num_entries) * kLoraRowsPositions * kLoraMaxSlices * kLoraRowsRank;
    for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
      const int j = static_cast<int>(unit % kLoraRowsRank);
      const int s = static_cast<int>((unit / kLoraRowsRank) % kLoraMaxSlices);
      const int q = static_cast<int>((unit / (kLoraRowsRank * kLoraMaxSlices)) % kLoraRowsPositions);
      const int64_t e = unit / (kLoraRowsRank * kLoraMaxSlices * kLoraRowsPositions);
      const int slot = need[q];
      if (slot < 0) continue;
      const LoraRowsEntry entry = p.entries[e];
      if (entry.spare == nullptr || s >= entry.num_slices || slot >= entry.num_slots) continue;
      const LoraSliceWeightsDev w = entry.table[static_cast<int64_t>(slot) * entry.num_slices + s];
      const int64_t k_vecs = entry.in_features / 8;
      uint4* dst = reinterpret_cast<uint4*>(static_cast<bf16*>(entry.spare) +
                                            ((static_cast<int64_t>(q) * entry.num_slices + s) * kLoraRowsRank + j) *
                                                entry.in_features);
      if (j < w.rank && w.a != nullptr) {
        const uint4* src = reinterpret_cast<const uint4*>(static_cast<const bf16*>(w.a) +
                                                          static_cast<int64_t>(j) * entry.in_features);
        for (int64_t k = threadIdx.x; k < k_vecs; k += blockDim.x) dst[k] = src[k];
      } else {
        for (int64_t k = threadIdx.x; k < k_vecs; k += blockDim.x) dst[k] = make_uint4(0, 0, 0, 0);
      }
    }
  }

  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this block's copies before its count
    if (atomicAdd(p.done, 1u) == gridDim.x - 1) {
      // Every block has read `installed`: record what the positions hold now.
      for (int q = 0; q < kLoraRowsPositions; ++q) {
        if (need[q] >= 0) p.installed[q] = need[q];
      }
      *p.done = 0;
      __threadfence();
    }
  }
}

__global__ void LoraRowsFlushKernel(LoraRowsView v, bf16* __restrict__ y) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  const int64_t width = v.u_col;
  const int64_t total = static_cast<int64_t>(v.rows) * width;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / width;
    y[e] = LoraRowsValue1(v, r, e - r * width);
  }
}

}  // namespace

cudaError_t LaunchLoraRowsInstall(const LoraRowsInstall& p, cudaStream_t stream) {
  if (p.num_blocks <= 0) return cudaErrorInvalidValue;
  (void)LaunchDependent(LoraRowsInstallKernel, dim3(static_cast<unsigned>(p.num_blocks)), dim3(kInstallThreads), 0,
                        stream, p);
  return cudaGetLastError();
}

cudaError_t LaunchLoraRowsFlush(const LoraRowsView& v, void* y, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(v.rows) * v.u_col;
  if (total == 0 || v.empty()) return cudaSuccess;
  const int64_t blocks = (total + kFlushThreads - 1) / kFlushThreads;
  (void)LaunchDependent(LoraRowsFlushKernel, dim3(static_cast<unsigned>(blocks < 65536 ? blocks : 65536)),
                        dim3(kFlushThreads), 0, stream, v, static_cast<bf16*>(y));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
