// Launcher of the fused RoPE + KV-cache write kernel. Raw device pointers; returns the launch
// error. Thread-safe (stateless); work runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/ops/cuda/lora_delta.h"
#include "engine/ops/cuda/lora_rows.h"

namespace loraplex::ops::cuda {

struct RopeParams {
  void* qkv = nullptr;               // [num_tokens, (Hq + 2·Hkv)·D] bf16, q and k rotated in place
  const float* inv_freq = nullptr;   // [D/2] F32
  const int32_t* positions = nullptr;     // [num_tokens]
  const int32_t* slot_mapping = nullptr;  // [num_tokens]; <0 or >= num_cache_slots: not cached
  const int32_t* token_seq = nullptr;     // [num_tokens] or null; <0: padding row, left as is
  void* k_cache = nullptr;           // [num_cache_slots, Hkv, D] bf16
  void* v_cache = nullptr;           // [num_cache_slots, Hkv, D] bf16
  int64_t num_cache_slots = 0;       // num_blocks · block_size
  int32_t num_tokens = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;              // even
  // A pending LoRA delta of qkv ([num_tokens, row width]; may be empty): added to q, k and v
  // before the rotation and the cache write, and written back to qkv (lora_delta.h).
  LoraDeltaView delta;
  // Or the GEMM output pending as LoRA rows (lora_rows.h; may be empty, never with a delta): every
  // row of qkv (all num_tokens of them) is read from it with its LoRA added, then rotated, cached
  // and written to qkv.
  LoraRowsView rows;
};

// Rotate-half RoPE on q and k (angle = position · inv_freq[i], fp32, precise sincos), then the
// rotated k and the unchanged v of each token go to its cache slot.
cudaError_t LaunchRopeAndCacheKv(const RopeParams& p, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
