// Launcher of paged causal GQA attention over the KV cache, with an optional split of each
// token's context across blocks (flash-decoding) for steps with few tokens. Raw device pointers;
// returns the launch error. Thread-safe (stateless); work runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace loraplex::ops::cuda {

struct AttentionParams {
  const void* qkv = nullptr;              // [num_tokens, qkv_row] bf16; q = first Hq·D columns
  int64_t qkv_row = 0;
  const void* k_cache = nullptr;          // [num_cache_slots, Hkv, D] bf16, 16-byte aligned
  const void* v_cache = nullptr;          // [num_cache_slots, Hkv, D] bf16, 16-byte aligned
  int64_t num_cache_slots = 0;
  void* out = nullptr;                    // [num_tokens, Hq·D] bf16
  const int32_t* positions = nullptr;     // [num_tokens]; the token sees cache positions 0..pos
  const int32_t* token_seq = nullptr;     // [num_tokens]; <0: padding, its output row is zeros
  const int32_t* block_tables = nullptr;  // [max_seqs, max_blocks_per_seq]
  int32_t num_tokens = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t max_seqs = 0;
  int32_t max_blocks_per_seq = 0;
  int32_t block_size = 0;
  float softmax_scale = 1.0f;
  // Context split (grid size, fixed at launch): each token's LIVE context ctx is cut into
  // ceil(ctx / k) splits of k = ceil(ctx / num_splits) keys rounded up to a multiple of 32;
  // the other splits exit at once and the merge ignores them. So any max_context_len (the
  // capacity under CUDA graphs, or an underestimate) stays correct and work follows ctx.
  int32_t num_splits = 1;
  float* partial = nullptr;               // [num_tokens, Hq, num_splits, D + 2] F32 when split
};

// True when a kernel is built for this head_dim (32, 64, 128, 256) and group size Hq/Hkv (1..8).
bool AttentionSupported(int head_dim, int num_q_heads, int num_kv_heads);

// Picks num_splits from launch-time values only (never live counts, so a captured graph stays
// valid): split when (tokens × kv heads) blocks cannot fill the GPU and contexts may be long,
// bounded by `scratch_bytes` of partial results.
void ChooseAttentionSplits(int num_sms, size_t scratch_bytes, int32_t max_context_len,
                           AttentionParams* p);

cudaError_t LaunchAttention(const AttentionParams& p, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
