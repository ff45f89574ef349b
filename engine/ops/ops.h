// The device seam: the primitive operations one forward step of a Llama model needs. The model
// (engine/model/llama.cc) is written once against this interface; engine/ops/cpu is the reference
// implementation and the oracle, engine/ops/cuda the GPU one.
// Contract for every op: tensors live on this Ops' device; nothing is allocated on the hot path;
// per-step counts that vary inside a captured CUDA graph (segments, sequences) are read from
// device memory through the metadata structs below. Engine thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/core/tensor.h"

namespace loraplex::ops {

class Ops;

// A recorded sequence of ops (a CUDA graph), replayable on its Ops' stream. Must not outlive
// its Ops. Engine thread only.
class Graph {
 public:
  virtual ~Graph() = default;
  // Enqueues one replay. Pointers, shapes and host-side parameters are those of the capture;
  // device memory the recorded ops read (step arrays, segment tables, counts) may change between
  // replays, written by copies enqueued before Replay on the same Ops.
  virtual absl::Status Replay() = 0;
};

// Device memory owned by an Ops; freed on destruction. Move-only.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(Ops* ops, void* ptr, size_t bytes) : ops_(ops), ptr_(ptr), bytes_(bytes) {}
  DeviceMemory(DeviceMemory&& o) noexcept { *this = std::move(o); }
  DeviceMemory& operator=(DeviceMemory&& o) noexcept;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory();

  void* data() const { return ptr_; }
  size_t size() const { return bytes_; }
  // A view of this memory as a tensor of `dtype` and `shape` starting at byte `offset`.
  TensorView View(DType dtype, Shape shape, size_t offset = 0) const;

 private:
  Ops* ops_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Where each new token's attention inputs are and where its K/V go. Device arrays.
struct AttentionMeta {
  const int32_t* positions = nullptr;     // [num_tokens] position of each token in its sequence
  const int32_t* slot_mapping = nullptr;  // [num_tokens] cache slot (block*block_size + offset); <0: skip
  const int32_t* token_seq = nullptr;     // [num_tokens] sequence row of each token; <0: padding
  const int32_t* context_lens = nullptr;  // [max_seqs] tokens in the cache for the seq after this step
  const int32_t* block_tables = nullptr;  // [max_seqs, max_blocks_per_seq] physical block ids
  int32_t num_tokens = 0;                 // rows of the activations (a captured bucket may pad)
  int32_t max_seqs = 0;
  int32_t max_blocks_per_seq = 0;
  int32_t block_size = 0;
  int32_t max_context_len = 0;            // upper bound of context_lens (sizing split-K work)
};

// The paged KV cache of one layer: [num_blocks, block_size, num_kv_heads, head_dim] each.
struct KvCacheView {
  TensorView k;
  TensorView v;
};

// One slice (q, k, v, gate, up, o or down) of a LoRA-wrapped layer for one adapter slot.
// Lives in device memory, written by the adapter manager when an adapter enters a slot.
struct LoraSliceWeights {
  const void* a = nullptr;  // [rank, in_features] compute dtype
  const void* b = nullptr;  // [slice_width, rank] compute dtype
  int32_t rank = 0;         // 0: this slot does not adapt this slice (nothing is read)
  float scale = 0.0f;       // lora_alpha / r (or / sqrt(r) with rsLoRA), applied once
};

// Inputs of a LoRA op that are fixed for a wrapped layer (host values), plus its slot table.
struct LoraModule {
  const LoraSliceWeights* table = nullptr;  // device [num_slots][num_slices]
  int32_t num_slots = 0;
  int32_t num_slices = 0;                   // 3 for qkv, 2 for gate_up, 1 otherwise
  int32_t in_features = 0;
  int32_t max_rank = 0;                     // column stride of a slice in the shrink output
  int32_t slice_offsets[4] = {};            // output column where slice i starts; [num_slices] = total
};

// Tokens of one step grouped by adapter slot. Device arrays; counts read on the device.
struct LoraSegments {
  const int32_t* token_rows = nullptr;    // [num_tokens] sorted order -> token row
  const int32_t* seg_starts = nullptr;    // [max_segments + 1] offsets into the sorted order
  const int32_t* seg_slots = nullptr;     // [max_segments] adapter slot of each segment
  const int32_t* num_segments = nullptr;  // [1]
  int32_t max_segments = 0;
  int32_t num_tokens = 0;                 // rows of x / shrink output
  // [1] optional: a bound on the rank any segment's slot has in any module this step (entries
  // above it are treated as that rank, so it must be a true bound). The CUDA kernels size their
  // work by it instead of module.max_rank; null: module.max_rank.
  const int32_t* max_rank = nullptr;
  // > 0: no step run with these arrays (eagerly, or any replay of a graph recorded with them) has
  // more live segments than this; 0: up to max_segments. Executors may run the LoRA work of steps
  // with few segments (kFewLoraSegments) or many differently (the CUDA one does).
  int32_t segments_bound = 0;
  // true: steps run with these arrays may have segments whose slots hold ranks above
  // kNarrowLoraRank (the model records their decode graphs apart); false: none has, or unknown.
  // Executors may run the LoRA work of the two classes differently (the CUDA expand streams
  // the wide ones).
  bool wide_ranks = false;
  // true: a guarantee that no segment's slot holds a rank above kNarrowLoraRank in any module in
  // any step run with these arrays (the model's narrow-rank graphs and steps). Executors may then
  // size per-adapter space by kNarrowLoraRank (the CUDA LoRA rows do; a broken promise gives
  // wrong LoRA results, never a fault).
  bool narrow_ranks = false;
  // [kLoraRankClasses] optional: the live segments are ordered by rank class (LoraRankClass of the
  // highest rank their slot holds in any module) and class_ends[c] is the end of class c's
  // (class_ends[kLoraRankClasses - 1] == the live count). Executors may run the classes' LoRA work
  // differently (the CUDA expand does). Like max_rank it must be true: a segment ranked above its
  // class gets wrong LoRA results (never a fault).
  const int32_t* class_ends = nullptr;
};

// Steps with at most this many adapter segments are few-adapter steps: the model records their
// decode graphs apart, with this segments_bound, and executors may tune their LoRA work for them.
inline constexpr int32_t kFewLoraSegments = 4;
// Steps whose segments' ranks are all at most this are narrow-rank steps (LoraSegments::wide_ranks).
inline constexpr int32_t kNarrowLoraRank = 16;
// Rank classes of segments (LoraSegments::class_ends): 0 up to kNarrowLoraRank, 1 up to 32, 2 up
// to 64, 3 above.
inline constexpr int kLoraRankClasses = 4;
inline constexpr int LoraRankClass(int32_t rank) {
  return rank <= kNarrowLoraRank ? 0 : rank <= 32 ? 1 : rank <= 64 ? 2 : 3;
}

// One logits row's sampling request. Device array element (the model uploads one per sampled row).
struct SamplingRow {
  uint64_t seed = 0;         // the request's seed
  int64_t step = 0;          // tokens the request has generated so far (0 for the first)
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // in (0, 1]
  int32_t top_k = 0;         // 0: no limit; 1: greedy
  int32_t top_n = 0;         // top log-probabilities wanted, in [0, kMaxSampleTopN]
};
inline constexpr int kMaxSampleTopN = 20;
// temperature >= 0 and finite, top_p in (0, 1], top_k >= 0, top_n in [0, kMaxSampleTopN].
bool IsValidSamplingRow(const SamplingRow& row);

// What sampling one row produced. Device array element, copied back to the host whole.
struct SampledToken {
  int32_t token = 0;
  float logprob = 0.0f;  // log-softmax of the raw logits (before temperature and filters)
  int32_t top_ids[kMaxSampleTopN] = {};        // [top_n] best first (higher logit, lower id on a tie)
  float top_logprobs[kMaxSampleTopN] = {};     // [top_n] their log-softmax values
};

class Ops {
 public:
  virtual ~Ops() = default;
  virtual Device device() const = 0;
  // The dtype activations and weights use on this device (F32 on CPU, BF16 on CUDA).
  virtual DType compute_dtype() const = 0;

  // --- memory ---------------------------------------------------------------------------
  virtual absl::StatusOr<DeviceMemory> Allocate(size_t bytes) = 0;
  virtual void Free(void* ptr) = 0;
  virtual absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status Memset(void* dst, int value, size_t bytes) = 0;
  // Waits until all queued work is done; reports asynchronous device errors.
  virtual absl::Status Synchronize() = 0;
  // Host memory to stage large copies to the device from: page-locked on the CUDA executor, so a
  // CopyToDevice from it runs at the bus's speed and returns before the copy has ended (do not
  // rewrite it before a Synchronize that follows the copy); plain memory here. 64-byte aligned.
  // Free it with FreeHostStaging on the same Ops.
  virtual absl::StatusOr<void*> AllocateHostStaging(size_t bytes);
  virtual void FreeHostStaging(void* ptr);

  // --- forward primitives ---------------------------------------------------------------
  // out[t] = table[ids[t]]. ids [T] I32; table [V, H]; out [T, H].
  virtual absl::Status Embed(const TensorView& ids, const TensorView& table, const TensorView& out) = 0;
  // out = rmsnorm(x) * weight. x, out [T, H]; weight [H].
  virtual absl::Status RmsNorm(const TensorView& x, const TensorView& weight, float eps,
                               const TensorView& out) = 0;
  // residual += x; out = rmsnorm(residual) * weight. x, residual, out [T, H].
  virtual absl::Status AddRmsNorm(const TensorView& x, const TensorView& residual,
                                  const TensorView& weight, float eps, const TensorView& out) = 0;
  // y = x · wᵀ + beta · y. x [M, K]; w [N, K] (same dtype as x); y [M, N] in x's dtype or F32.
  virtual absl::Status Gemm(const TensorView& x, const TensorView& w, float beta,
                            const TensorView& y) = 0;
  // Makes every later Gemm(x', w, beta, y') whose x' and y' are the first M <= x.shape[0] rows of
  // x and y as fast to start as the second call of its shape: an executor that chooses a GEMM
  // algorithm per shape does it now (the CUDA one: per row-count bucket) instead of on first use.
  // Runs nothing on the device and changes no result; an executor that prepares checks the
  // arguments as Gemm does. Default: nothing to prepare (no checks).
  virtual absl::Status PrepareGemm(const TensorView& /*x*/, const TensorView& /*w*/, const TensorView& /*y*/) {
    return absl::OkStatus();
  }
  // Rotates q and k of `qkv` in place (rotate-half RoPE with inv_freq) and writes k, v into the
  // cache at meta.slot_mapping. qkv [T, (Hq + 2·Hkv)·D] (q heads, then k heads, then v heads);
  // inv_freq [D/2] F32 (llama3 scaling already applied).
  virtual absl::Status RopeAndCacheKv(const TensorView& qkv, const TensorView& inv_freq,
                                      int num_q_heads, int num_kv_heads, int head_dim,
                                      const AttentionMeta& meta, const KvCacheView& cache) = 0;
  // Causal paged attention with GQA: each token attends to the cached positions 0..position of
  // its sequence. Reads q from the first Hq·D columns of qkv [T, (Hq + 2·Hkv)·D]; out [T, Hq·D].
  virtual absl::Status Attention(const TensorView& qkv, int num_q_heads, int num_kv_heads,
                                 int head_dim, float softmax_scale, const AttentionMeta& meta,
                                 const KvCacheView& cache, const TensorView& out) = 0;
  // out = silu(gate_up[:, :I]) * gate_up[:, I:]. gate_up [T, 2I]; out [T, I].
  virtual absl::Status SiluMul(const TensorView& gate_up, const TensorView& out) = 0;
  // out[i] = x[rows[i]]. x [T, H]; rows [S] I32 device; out [S, H].
  virtual absl::Status GatherRows(const TensorView& x, const TensorView& rows, const TensorView& out) = 0;

  // For every segment and every slice s with rank r > 0 in the segment's slot:
  //   y[row, s·max_rank + j] = Σ_k x[row, k] · A_s[j, k]   (j < r)
  // x [T, in_features] compute dtype; y [T, num_slices · max_rank] F32. Other columns untouched.
  virtual absl::Status LoraShrink(const TensorView& x, const LoraSegments& segments,
                                  const LoraModule& module, const TensorView& y) = 0;
  // For every segment and slice s with rank r > 0:
  //   out[row, off_s + n] += scale · Σ_j y[row, s·max_rank + j] · B_s[n, j]
  // y as LoraShrink's output; out [T, slice_offsets[num_slices]] compute dtype, updated in place.
  virtual absl::Status LoraExpand(const TensorView& y, const LoraSegments& segments,
                                  const LoraModule& module, const TensorView& out) = 0;
  // A whole LoRA-wrapped projection: y = x · wᵀ, then, when `segments` and `module` are given,
  // LoraShrink(x) into `lora_y` and LoraExpand(lora_y) into y. One call lets an executor run the
  // shrink concurrently with the GEMM (it needs only x). Shapes as in Gemm (beta 0) and LoraShrink.
  // The default runs the three ops in order. An executor may finish y lazily (the CUDA one adds
  // the LoRA part in the next op that reads y): every later op and copy sees the complete y.
  virtual absl::Status GemmWithLora(const TensorView& x, const TensorView& w, const TensorView& y,
                                    const LoraSegments* segments, const LoraModule* module,
                                    const TensorView& lora_y) {
    absl::Status s = Gemm(x, w, 0.0f, y);
    if (!s.ok() || segments == nullptr || module == nullptr) return s;
    s = LoraShrink(x, *segments, *module, lora_y);
    if (!s.ok()) return s;
    return LoraExpand(lora_y, *segments, *module, y);
  }

  // Picks one token per row of `logits` [R, V] F32 from rows[r] (device [R]) into out[r]
  // (device [R]); entries of top_ids/top_logprobs past rows[r].top_n are unspecified. Semantics
  // (both executors): temperature 0 or top_k 1 is greedy (argmax, lowest id on a tie). Otherwise
  // candidates are ranked by (logit desc, id asc); top_k keeps the first k, top_p then the shortest
  // prefix whose temperature-scaled probability mass (renormalised over those kept) reaches top_p;
  // the token is drawn from the kept ones with weights exp((logit - max) / temperature), walking
  // them in id order against u·total, u uniform in [0, 1) from (seed, step) alone. So a row's token
  // depends only on its logits and its SamplingRow, never on the other rows. The CUDA executor sums
  // weights in 2^-40 fixed point (a weight below 2^-40 of the largest is never drawn).
  virtual absl::Status Sample(const TensorView& logits, const SamplingRow* rows, SampledToken* out) = 0;

  // --- LoRA state an executor may keep (all optional; the defaults keep nothing) -----------
  // Rows an executor wants allocated right after a LoRA-wrapped projection's weight [N, K] of
  // `num_slices` slices, in the same allocation and zeroed, for RegisterLoraWeight; 0: none.
  virtual int64_t LoraWeightSpareRows(int /*num_slices*/) const { return 0; }
  // `weight` [N, K] is followed in its allocation by LoraWeightSpareRows(module.num_slices) rows
  // of K elements, and `module` is the slot table GemmWithLora gets with that weight: the
  // executor may keep copies of adapters' weights there until the weight's memory is freed (Free
  // of its allocation); the table must live as long. Called outside captures.
  virtual absl::Status RegisterLoraWeight(const TensorView& /*weight*/, const LoraModule& /*module*/) {
    return absl::OkStatus();
  }
  // Enqueued at the start of every step that has LoRA segments, before the step's first op, with
  // the segments every GemmWithLora of the step gets (it is part of a captured step too).
  virtual absl::Status BeginLoraStep(const LoraSegments& /*segments*/) { return absl::OkStatus(); }
  // An adapter slot's weights may have changed since the last call (an adapter entered a slot):
  // whatever the executor keeps of them is stale. Called outside captures, before the next step.
  virtual absl::Status LoraSlotsChanged() { return absl::OkStatus(); }

  // --- graphs ---------------------------------------------------------------------------
  // Records every op `body` enqueues into a Graph without running any of them. `body` may only
  // enqueue ops (no Allocate, CopyToHost or Synchronize). UNIMPLEMENTED where the executor has
  // no graphs (the CPU ops: callers run eagerly); `body`'s error, or INTERNAL, otherwise.
  virtual absl::StatusOr<std::unique_ptr<Graph>> Capture(const std::function<absl::Status()>& /*body*/) {
    return absl::UnimplementedError("Capture: this executor does not record graphs");
  }
};

// Creates the ops for `device`: CPU always; CUDA when built with it and a GPU is present.
absl::StatusOr<std::unique_ptr<Ops>> CreateOps(Device device);
// True when this build has the CUDA executor and a GPU is visible.
bool CudaAvailable();
// The device an `engine.executor` setting selects: "cpu", "cuda", or "auto" (CUDA when
// CudaAvailable()). INVALID_ARGUMENT for anything else.
absl::StatusOr<Device> ResolveExecutor(std::string_view executor);
// The dtype the ops of `device` compute and keep weights in (F32 on CPU, BF16 on CUDA).
DType ComputeDTypeOf(Device device);

}  // namespace loraplex::ops
