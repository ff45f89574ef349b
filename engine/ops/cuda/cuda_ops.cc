// CudaOps: validates every op's tensors on the host (errors name the op, the tensor and the bad
// value), then enqueues the kernels of this folder or cuBLASLt on the ops' stream.
#include "engine/ops/cuda/cuda_ops.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <string>
#include <unordered_map>
#include <vector>
#include "absl/strings/string_view.h"

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/ops/cuda/attention.h"
#include "engine/ops/cuda/beside_probe.h"
#include "engine/ops/cuda/cublaslt_gemm.h"
#include "engine/ops/cuda/elementwise.h"
#include "engine/ops/cuda/lora_delta.h"
#include "engine/ops/cuda/lora_kernels.h"
#include "engine/ops/cuda/lora_prefill.h"
#include "engine/ops/cuda/lora_rows.h"
#include "engine/ops/cuda/norm.h"
#include "engine/ops/cuda/rope.h"
#include "engine/ops/cuda/sampling.h"
#include "engine/ops/cuda/skinny_gemm.h"

namespace loraplex::ops::cuda {
namespace {

static_assert(kLoraNarrowRank == kNarrowLoraRank);
static_assert(cuda::kLoraRankClasses == ops::kLoraRankClasses);
static_assert(LoraRankClass(LoraRankClassBound(0)) == 0 && LoraRankClass(LoraRankClassBound(0) + 1) == 1 &&
              LoraRankClass(LoraRankClassBound(1)) == 1 && LoraRankClass(LoraRankClassBound(1) + 1) == 2 &&
              LoraRankClass(LoraRankClassBound(2)) == 2 && LoraRankClass(LoraRankClassBound(2) + 1) == 3 &&
              LoraRankClassBound(3) == kLoraMaxRank);
static_assert(sizeof(SamplingRow) == sizeof(SamplingRowDev));
static_assert(offsetof(SamplingRow, seed) == offsetof(SamplingRowDev, seed));
static_assert(offsetof(SamplingRow, step) == offsetof(SamplingRowDev, step));
static_assert(offsetof(SamplingRow, temperature) == offsetof(SamplingRowDev, temperature));
static_assert(offsetof(SamplingRow, top_p) == offsetof(SamplingRowDev, top_p));
static_assert(offsetof(SamplingRow, top_k) == offsetof(SamplingRowDev, top_k));
static_assert(offsetof(SamplingRow, top_n) == offsetof(SamplingRowDev, top_n));
static_assert(sizeof(SampledToken) == sizeof(SampledTokenDev));
static_assert(offsetof(SampledToken, top_ids) == offsetof(SampledTokenDev, top_ids));
static_assert(offsetof(SampledToken, top_logprobs) == offsetof(SampledTokenDev, top_logprobs));
static_assert(kMaxSampleTopN == kSampleMaxTopN);
static_assert(sizeof(LoraSliceWeights) == sizeof(LoraSliceWeightsDev));
static_assert(offsetof(LoraSliceWeights, a) == offsetof(LoraSliceWeightsDev, a));
static_assert(offsetof(LoraSliceWeights, b) == offsetof(LoraSliceWeightsDev, b));
static_assert(offsetof(LoraSliceWeights, rank) == offsetof(LoraSliceWeightsDev, rank));
static_assert(offsetof(LoraSliceWeights, scale) == offsetof(LoraSliceWeightsDev, scale));

constexpr size_t kGemmWorkspaceBytes = 32u << 20;      // cuBLASLt's recommendation on Hopper
constexpr size_t kAttentionScratchBytes = 32u << 20;   // split-context partials
// The tensor-core LoRA shrink's split-K partials: [splits, tokens, slices·max_rank] F32.
constexpr size_t kLoraPartialBytes = 64u << 20;
// GemmWithLora's expand-to-delta buffer, [tokens, out width] BF16 (or F32), and its (row, slice)
// marks: a decode or small prefill step fits (gate_up: 1170 tokens, 585 in F32); larger steps use
// the in-place expand.
constexpr size_t kLoraDeltaBytes = 64u << 20;
constexpr size_t kLoraDeltaMaskBytes = 1u << 20;
// The decode expand rounds scale·y·Bᵀ to bf16 before adding it (LoraParams::bf16_delta), so the
// delta GemmWithLora leaves for the next op is BF16: half the bytes written beside the GEMM and
// read back by its consumer (batch 32: 5.5 MB a layer as F32).
constexpr bool kLoraBf16Delta = true;
// Persistent expand blocks per SM, all resident at once (124 registers a thread).
constexpr int kLoraExpandBlocksPerSm = 2;
constexpr int kLoraTensorCoreBlocksPerSm = 4;  // 128 threads, ~37 KB of shared memory each
// Steps of this many tokens or more (prefill chunks) run the tensor-core LoRA kernels, which read
// each adapter's weights once per 64 tokens of a segment; smaller ones (decode) the
// bandwidth-bound kernels of lora_kernels.cu.
constexpr int kLoraTensorCoreMinTokens = 256;
// Steps of at most kFewLoraSegments segments take the tensor-core kernels from this many tokens:
// batch 128 with 4 adapters 1.306x -> 1.247x the base step, one adapter unchanged (1.293x vs
// 1.291x); from 64 tokens batch 64 got much slower (one adapter 1.126x -> 1.444x). Same process,
// bench/runs/2026-11-29-tenth/4-final.
constexpr int kLoraTensorCoreFewMinTokens = 128;
// GemmWithLora calls whose steps may have more live segments than this run the LoRA chain in
// line before the GEMM (prefetching A while the kernel before finishes) instead of beside it: at
// batch 128 with 128 distinct adapters 1.61x the base step instead of 1.75x; at 8-64 segments
// the side chain is as fast or faster (bench/runs/2026-11-29-sixth/inline).
constexpr int kLoraInlineMinSegments = 64;
// The decode shrink's item shape (LoraParams::shrink_shape): one-token items when a step's
// segments hold one token (32-128 distinct adapters at one token each: bench/RESULTS.md, seventh
// session).
constexpr int kLoraShrinkShape = 1;
// Steps with ranks above kNarrowLoraRank (LoraSegments::wide_ranks) of at least
// kLoraShrinkBalancedMinTokens tokens number only the shrink's real items
// (LoraParams::shrink_balanced). With mixed ranks the plain numbering gives some blocks several
// items up to the step's rank bound while others idle: alone, the shrink of 8 adapters of ranks
// 8..64 at batch 32 took about as long as that of 8 rank-64 adapters, and the balanced one 25-35%
// less (qkv 12.2 -> 9.1 us, down 15.2 -> 9.9 us). In whole steps the prefix each block builds
// first (dependent loads of the slots' ranks, two barriers) costs about as much as beside the GEMM
// the balance saves, except at batch 128: same process, three runs (bench/runs/2026-11-30-
// seventeenth/2-wide-grid, 5-wide-grid-ab, 6-final), 8 mixed-rank adapters at batch 128
// 1.465-1.475x the base step against 1.519-1.524x, 8 rank-64 adapters 1.611-1.616x against
// 1.598-1.609x; at batch 8 both lost (mixed 1.173x vs 1.157x, rank 64 1.285x vs 1.231x), at 32 and
// 64 mixed gained 0-1% and rank 64 lost 1-2%. Narrow steps keep the plain numbering: their ranks
// are alike. A prefix the host writes with the step's segments would drop the device-side cost.
constexpr int kLoraShrinkBalancedMinTokens = 128;
// The decode expand's pipeline (LoraParams::expand_stages) for steps whose ranks are all at most
// kNarrowLoraRank: 0, item by item; for the others (LoraSegments::wide_ranks): 2, streamed. Measured
// on the whole step (bench/RESULTS.md, eighth session): streaming took batch 32 with 8 adapters of
// ranks 8..64 from 1.337x to 1.236x the base step (b8 1.217x -> 1.193x, b64 1.452x -> 1.359x, b128
// 1.624x -> 1.574x) but batch 32 with 32 distinct r16 adapters from 1.225x to 1.256x and batch 1
// with one from 1.063x to 1.085x.
constexpr int kLoraExpandStages = 0;
constexpr int kLoraWideExpandStages = 2;
// The streamed expand's rank classes (LoraParams::expand_classes) in wide-rank steps: 0, none.
// With 2 (the narrow segments item by item, the others grouped by rank, each at its own tile
// width; the model orders segments by class), 8 adapters of ranks 8..64 ran 2% faster at batch
// 128 (1.445-1.450x the base step against 1.472-1.477x) and 0-1% at batch 64, but 2% slower at
// batch 8 and 4% at 32; steps of one class (8 rank-64 adapters) ran 2-4.6% slower at every batch.
// The kernel's build with classes costs that even where the step uses none (its rank-64 rows
// with classes 0 read as slow), and loading class_ends beside the segment count did not change
// it (same process, bench/runs/2026-11-30-nineteenth/4-final, 5-class-ends-early).
constexpr int kLoraWideExpandClasses = 0;
// Tokens of a segment an item of the streamed expand takes (LoraParams::expand_tokens): 4, what a
// stage holds, so segments of 4-8 tokens read each tile of B once or twice instead of 2-4 times
// (the item-by-item expand keeps kLoraExpandTokens, 2). Same process, tenth session
// (bench/runs/2026-11-29-tenth/1-expand-tokens): batch 32 with 8 adapters of ranks 8..64 1.247x ->
// 1.228x, batch 64 1.367x -> 1.320x; for the item-by-item expand, 4 or more tokens an item made
// batch 32 with one or 4 adapters slower (1.083x -> 1.096-1.413x).
constexpr int kLoraWideExpandTokens = 4;
// Steps of at most kFewLoraSegments segments (ops.h; the model's few-adapter graphs) and at least
// kLoraFewMinTokens tokens run GemmWithLora's GEMM as cuBLASLt chooses it for 2/3 of the SMs, with
// the shrink beside it on at most kLoraFewShrinkBlocks blocks, so the side chain's blocks keep SMs
// the GEMM does not wait for: batch 32 with 4 adapters 1.08x the base step instead of 1.10-1.12x.
// Fewer tokens lose with it (batch 8: 1.15x vs 1.10x), and so do many segments.
constexpr int kLoraFewMinTokens = 32;
constexpr int kLoraFewShrinkBlocks = 44;
// Steps of more than kFewLoraSegments segments and at least kLoraManyMinTokens tokens run
// the shrink beside the GEMM on at most half the SMs instead of 3/4: batch 32 with 32 distinct r16
// adapters 1.212-1.224x the base step instead of 1.232-1.244x (three same-process pairs; 55, 77
// and 88 blocks in between; bench/runs/2026-11-29-ninth). Wider ranks lost with it (8 adapters of
// ranks 8..64: 1.262x -> 1.280x at batch 32).
// Wide-rank steps (LoraSegments::wide_ranks) among those keep the whole 3/4 grid when their shrink
// numbers items plainly, and take the smaller grid with the balanced numbering
// (kLoraShrinkBalancedMinTokens): with the balanced numbering forced on, 8 adapters of ranks
// 8..64 ran 1.207-1.213x the base step at batch 32 on the smaller grid instead of 1.224-1.225x
// (plain, 3/4), batch 128 1.465-1.474x instead of 1.521-1.524x, but 8 rank-64 adapters
// 1.346-1.348x instead of 1.318-1.319x (batch 64: 1.475-1.479x against 1.457-1.459x; same process,
// bench/runs/2026-11-30-seventeenth/5-wide-grid-ab). At batch 128, where the balanced numbering
// runs, rank 64 lost nothing with the smaller grid against 3/4 cut to it only when ranks differ
// (1.610x against 1.616x, 6-final). SetLoraWideShrinkGridForTest forces either grid.
constexpr int kLoraManyShrinkSmShare = 2;  // 1/2 of the SMs
constexpr int kLoraManyMinTokens = 32;
// gate_up (the module of 2 slices, whose GEMM is the longest beside the fewest bytes of A) takes a
// quarter of the SMs in such steps below kLoraGateUpQuarterMaxTokens tokens: batch 32 with 32
// distinct r16 adapters 1.196-1.201x the base step against 1.197-1.222x with half (three against
// four same-process runs); at batch 64 a quarter lost (1.367x vs 1.344-1.351x), and 22 or 44
// blocks were no better at batch 32 (bench/runs/2026-11-30-thirteenth/4-gate-up-shrink).
constexpr int kLoraManyGateUpSmShare = 4;
constexpr int kLoraGateUpQuarterMaxTokens = 64;
// Few-adapter narrow-rank steps of kLoraRowsMinTokens to kLoraRowsMaxTokens tokens run qkv's and
// gate_up's LoRA as LoRA rows (lora_rows.h): the shrink as extra output rows of the full-GPU
// GEMM (spare rows after the weight, holding the step's adapters' A) and the expand in RoPE or
// SiLU·up, so those GemmWithLora calls fork nothing. Same process (bench/runs/2026-11-30-fifteenth/
// 5-final), against the side chain: 4 adapters at batch 32 1.096x -> 1.061x the base step, 64
// 1.155x -> 1.111x, 128 1.248x -> 1.174x; one adapter 1.086x -> 1.050x, 1.135x -> 1.106x,
// 1.302x -> 1.224x. qkv alone (kLoraRowsMinSlices 3) was no better at 32 and worse at 64 and 128
// (2026-11-30-fourteenth/3-rows-v3). Below 32 tokens rows lost (batch 1 one adapter 1.075x
// against 1.062x, batch 8 4 adapters 1.094x against 1.057x: 2026-11-30-fifteenth/4-rows-below-32).
// o and down (one slice, read by AddRmsNorm) run as rows from kLoraRowsOneSliceMinTokens tokens,
// the expand in AddRmsNorm (LaunchAddRmsNormRows). At 32 tokens their side chain is cheaper (o's
// costs ~0.4 us there): batch 32 one adapter 1.062x -> 1.069x, 4 adapters 1.067x -> 1.075x
// (2026-11-30-fifteenth/6-o-down-rows); from 64 they win. Same process, one-slice rows off -> from
// 64 tokens: batch 64 one adapter 1.108x -> 1.095x, 4 adapters 1.112x -> 1.095x; batch 128
// 1.226x -> 1.082x, 1.176x -> 1.080x (bench/runs/2026-11-30-sixteenth/2-one-slice-rows). Their
// spare rows cost batch 32 nothing (3-registered: 1.047-1.050x / 1.053-1.055x with them, 1.054-
// 1.060x / 1.064-1.068x without, two processes each).
constexpr int kLoraRowsMinTokens = 32;
constexpr int kLoraRowsMaxTokens = 128;
constexpr int kLoraRowsMinSlices = 1;
constexpr int kLoraRowsOneSliceMinTokens = 64;
constexpr size_t kLoraRowsMaxEntries = 1024;  // registered weights (four a decoder layer)
// Few-adapter narrow-rank steps of at most kLoraRowsSkinnyMaxTokens tokens run GemmWithLora as
// LoRA rows through the skinny GEMM (skinny_gemm.h) over the weight and the spare rows of the
// step's positions only (min(segments bound, tokens) of them: one adapter at batch 1 adds 48 rows
// to qkv's 6144), where that shape is one the skinny GEMM takes (qkv, o and down of an 8B model
// with up to 2 positions; o and down with up to 4); the others (gate_up) keep the side chain. No
// kernel runs beside the GEMM, and the expand is done by the op that reads its output. Same
// process, against the side chain (bench/runs/2026-11-30-eighteenth/2-skinny-tokens): one r16
// adapter at batch 1 1.050-1.054x the base step -> 1.027-1.030x, batch 2 1.059-1.066x ->
// 1.038-1.049x. From 4 tokens (4 positions in the few-adapter graphs) qkv's 6336 rows no longer
// deal evenly and only o and down took it, which lost: batch 4 one adapter 1.053-1.056x ->
// 1.073x, batch 8 4 adapters 1.049-1.052x -> 1.111-1.114x.
constexpr int kLoraRowsSkinnyMaxTokens = 2;
// SetGemmTimedForTest: the row buckets PrepareGemm times (below, steps of up to 16 rows run the
// skinny GEMM; above, prefill chunks would make start-up slow).
constexpr int64_t kGemmTimedMinRows = 32;
constexpr int64_t kGemmTimedMaxRows = 256;

absl::Status CudaStatus(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

absl::Status Invalid(absl::string_view op, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", message));
}

// Checks that `t` is a CUDA tensor of `dtype` and rank `rank`.
absl::Status CheckTensor(absl::string_view op, absl::string_view name, const TensorView& t, DType dtype,
                         int rank) {
  if (t.device != Device::kCuda) return Invalid(op, absl::StrCat(name, " is not a CUDA tensor"));
  if (t.dtype != dtype) {
    return Invalid(op, absl::StrCat(name, " has dtype ", std::string(DTypeName(t.dtype)), ", expected ", std::string(DTypeName(dtype))));
  }
  if (t.shape.rank != rank) {
    return Invalid(op, absl::StrCat(name, " has shape ", t.shape.ToString(), ", expected rank ", rank));
  }
  if (t.data == nullptr && t.NumElements() > 0) return Invalid(op, absl::StrCat(name, " has no data"));
  return absl::OkStatus();
}

absl::Status CheckDim(absl::string_view op, absl::string_view name, const TensorView& t, int dim,
                      int64_t expected) {
  if (t.shape[dim] == expected) return absl::OkStatus();
  return Invalid(op, absl::StrCat(name, " has shape ", t.shape.ToString(), ", expected dim ", dim, " = ",
                                  expected));
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

class CudaOps final : public Ops {
 public:
  static absl::StatusOr<std::unique_ptr<CudaOps>> Create() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();  // clear the sticky "no device" error
      return absl::UnavailableError("CUDA executor: no CUDA device is visible");
    }
    std::unique_ptr<CudaOps> ops(new CudaOps());
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(0), "CUDA executor: select device 0"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(
        cudaDeviceGetAttribute(&ops->num_sms_, cudaDevAttrMultiProcessorCount, 0), "CUDA executor: query SMs"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&ops->stream_, cudaStreamNonBlocking),
                                        "CUDA executor: create stream"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&ops->side_stream_, cudaStreamNonBlocking),
                                        "CUDA executor: create side stream"));
    for (cudaEvent_t* e : {&ops->fork_event_, &ops->join_event_}) {
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(e, cudaEventDisableTiming),
                                          "CUDA executor: create event"));
    }
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&ops->gemm_workspace_, kGemmWorkspaceBytes),
                                        "CUDA executor: allocate GEMM workspace"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&ops->attention_scratch_, kAttentionScratchBytes),
                                        "CUDA executor: allocate attention scratch"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&ops->lora_partials_, kLoraPartialBytes),
                                        "CUDA executor: allocate LoRA partials"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&ops->lora_delta_, kLoraDeltaBytes),
                                        "CUDA executor: allocate LoRA delta"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(reinterpret_cast<void**>(&ops->lora_delta_mask_), kLoraDeltaMaskBytes),
                                        "CUDA executor: allocate LoRA delta marks"));
    // How many rows the sampler runs at once with 1-8 blocks a row; should the query fail, every
    // row takes one block (the same results, only slower for few rows).
    if (QuerySampleWave(&ops->sample_wave_) != cudaSuccess) {
      ops->sample_wave_ = SampleWave{};
      (void)cudaGetLastError();
    }
    // Enough for the sampler's first pass split over blocks on up to 4096 rows; past that it
    // reads each row in one block.
    ops->sample_scratch_bytes_ = SampleScratchBytes(4096);
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&ops->sample_scratch_, ops->sample_scratch_bytes_),
                                        "CUDA executor: allocate sampling scratch"));
    // LoRA rows: the install state and the registered weights' entries (fixed: graphs hold them).
    const size_t rows_state_bytes = (kRowsStateRowPos + kLoraRowsMaxTokens) * sizeof(int32_t);
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(reinterpret_cast<void**>(&ops->rows_state_), rows_state_bytes),
                                        "CUDA executor: allocate LoRA rows state"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMemset(ops->rows_state_, 0xff, kLoraRowsPositions * sizeof(int32_t)),
                                        "CUDA executor: clear LoRA rows state"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMemset(ops->rows_state_ + kRowsStateDone, 0, 2 * sizeof(int32_t)),
                                        "CUDA executor: clear LoRA rows state"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(reinterpret_cast<void**>(&ops->rows_entries_dev_),
                                                   kLoraRowsMaxEntries * sizeof(LoraRowsEntry)),
                                        "CUDA executor: allocate LoRA rows entries"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(reinterpret_cast<void**>(&ops->rows_info_),
                                                   kLoraRowsMaxEntries * kLoraRowsPositions * kLoraMaxSlices *
                                                       sizeof(LoraSliceWeightsDev)),
                                        "CUDA executor: allocate LoRA rows positions"));
    LORAPLEX_ASSIGN_OR_RETURN(ops->gemm_, CublasLtGemm::Create(ops->gemm_workspace_, kGemmWorkspaceBytes));
    LORAPLEX_RETURN_IF_ERROR(ops->set_lora_few(-1, -1, -1));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(InitSkinnyGemm(), "CUDA executor: set up the skinny GEMM"));
    SkinnyGemmScratch& sk = ops->skinny_scratch_;
    sk.partial_bytes = SkinnyGemmMaxPartialBytes(ops->num_sms_);
    sk.num_counters = SkinnyGemmMaxTiles(ops->num_sms_);
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(reinterpret_cast<void**>(&sk.partial), sk.partial_bytes),
                                        "CUDA executor: allocate skinny GEMM partials"));
    const size_t counter_bytes = static_cast<size_t>(sk.num_counters) * sizeof(unsigned);
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(reinterpret_cast<void**>(&sk.counters), counter_bytes),
                                        "CUDA executor: allocate skinny GEMM counters"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMemset(sk.counters, 0, counter_bytes),
                                        "CUDA executor: clear skinny GEMM counters"));
    return ops;
  }

  ~CudaOps() override {
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    if (side_stream_ != nullptr) cudaStreamDestroy(side_stream_);
    if (fork_event_ != nullptr) cudaEventDestroy(fork_event_);
    if (join_event_ != nullptr) cudaEventDestroy(join_event_);
    gemm_.reset();
    gemm_beside_lora_.reset();
    if (lora_partials_ != nullptr) cudaFree(lora_partials_);
    if (skinny_scratch_.partial != nullptr) cudaFree(skinny_scratch_.partial);
    if (skinny_scratch_.counters != nullptr) cudaFree(skinny_scratch_.counters);
    if (sample_scratch_ != nullptr) cudaFree(sample_scratch_);
    if (lora_delta_ != nullptr) cudaFree(lora_delta_);
    if (lora_delta_mask_ != nullptr) cudaFree(lora_delta_mask_);
    if (rows_state_ != nullptr) cudaFree(rows_state_);
    if (rows_entries_dev_ != nullptr) cudaFree(rows_entries_dev_);
    if (rows_info_ != nullptr) cudaFree(rows_info_);
    if (rows_out_ != nullptr) cudaFree(rows_out_);
    if (attention_scratch_ != nullptr) cudaFree(attention_scratch_);
    if (gemm_workspace_ != nullptr) cudaFree(gemm_workspace_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  cudaStream_t stream() const { return stream_; }
  void set_split_mode(AttentionSplitMode mode) { split_mode_ = mode; }
  void set_sample_blocks_per_row(int blocks) { sample_blocks_per_row_ = blocks; }
  void set_lora_tensor_core_min_tokens(int tokens, int few_tokens) {
    lora_tc_min_tokens_ = tokens > 0 ? tokens : kLoraTensorCoreMinTokens;
    lora_tc_few_min_tokens_ = few_tokens >= 0 ? few_tokens : kLoraTensorCoreFewMinTokens;
  }
  void set_lora_delta_limit(size_t bytes) { lora_delta_limit_ = std::min(bytes, kLoraDeltaBytes); }
  void set_lora_fold(bool fold) { lora_fold_ = fold; }
  void set_lora_bf16_delta(bool bf16) { lora_bf16_delta_ = bf16; }
  void set_skinny_hoist(int mode) { skinny_hoist_ = mode; }
  void set_lora_shrink_warps(int warps) { lora_shrink_warps_ = warps; }

  void set_lora_tuning(int shrink_blocks, bool overlap, bool fork) {
    lora_shrink_blocks_ = shrink_blocks;
    lora_overlap_ = overlap;
    lora_fork_ = fork;
  }

  Device device() const override { return Device::kCuda; }
  DType compute_dtype() const override { return DType::kBF16; }

  absl::StatusOr<DeviceMemory> Allocate(size_t bytes) override {
    void* ptr = nullptr;
    if (bytes == 0) return DeviceMemory(this, nullptr, 0);
    const cudaError_t err = cudaMalloc(&ptr, bytes);
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // out of memory is not sticky; clear it so later checks stay clean
      return absl::ResourceExhaustedError(absl::StrCat("Allocate: ", bytes, " bytes: out of device memory"));
    }
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(err, absl::StrCat("Allocate ", bytes, " bytes")));
    return DeviceMemory(this, ptr, bytes);
  }

  void Free(void* ptr) override {
    if (ptr == nullptr) return;
    // The pending delta may belong to this memory; cudaFree waits for the add. Free cannot
    // report; the next Synchronize does.
    for (const cudaError_t err : {AddPendingLoraDelta(), cudaFree(ptr)}) {
      if (err != cudaSuccess && deferred_error_ == cudaSuccess) deferred_error_ = err;
    }
    // A registered weight's memory: the install kernel must not write there any more.
    if (rows_weights_.erase(ptr) > 0) {
      const cudaError_t err = UploadRowsEntries();
      if (err != cudaSuccess && deferred_error_ == cudaSuccess) deferred_error_ = err;
    }
  }

  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    if (bytes == 0) return absl::OkStatus();
    // From pageable memory the call returns once `src` is staged, so the caller may reuse it.
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "CopyToDevice");
  }

  absl::StatusOr<void*> AllocateHostStaging(size_t bytes) override {
    void* p = nullptr;
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocDefault),
                                        absl::StrCat("AllocateHostStaging (", bytes, " bytes)")));
    return p;
  }
  void FreeHostStaging(void* ptr) override {
    if (ptr == nullptr) return;
    // Waits for copies from it. Free cannot report; the next Synchronize does.
    const cudaError_t err = cudaFreeHost(ptr);
    if (err != cudaSuccess && deferred_error_ == cudaSuccess) deferred_error_ = err;
  }

  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    if (bytes == 0) return absl::OkStatus();
    LORAPLEX_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "CopyToHost"));
    return CudaStatus(cudaStreamSynchronize(stream_), "CopyToHost: synchronize");
  }

  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    if (bytes == 0) return absl::OkStatus();
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "CopyOnDevice");
  }

  absl::Status Memset(void* dst, int value, size_t bytes) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    if (bytes == 0) return absl::OkStatus();
    return CudaStatus(cudaMemsetAsync(dst, value, bytes, stream_), "Memset");
  }

  absl::Status Synchronize() override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    if (deferred_error_ != cudaSuccess) {
      const cudaError_t err = deferred_error_;
      deferred_error_ = cudaSuccess;
      return CudaStatus(err, "Free (reported at Synchronize)");
    }
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "Synchronize"));
    return CudaStatus(cudaGetLastError(), "Synchronize");
  }

  absl::Status Embed(const TensorView& ids, const TensorView& table, const TensorView& out) override {
    constexpr absl::string_view kOp = "Embed";
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "ids", ids, DType::kI32, 1));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "table", table, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "out", out, 0, ids.shape[0]));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "out", out, 1, table.shape[1]));
    return CudaStatus(LaunchGatherRows(table.data, table.shape[0], table.shape[1] * 2, ids.As<int32_t>(),
                                       ids.shape[0], out.data, stream_),
                      kOp);
  }

  absl::Status RmsNorm(const TensorView& x, const TensorView& weight, float eps,
                       const TensorView& out) override {
    constexpr absl::string_view kOp = "RmsNorm";
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "weight", weight, DType::kBF16, 1));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "weight", weight, 0, x.shape[1]));
    if (!(out.shape == x.shape)) return Invalid(kOp, absl::StrCat("out has shape ", out.shape.ToString(),
                                                                  ", expected x's ", x.shape.ToString()));
    return CudaStatus(LaunchRmsNorm(x.data, weight.data, x.shape[0], x.shape[1], eps, out.data, stream_), kOp);
  }

  absl::Status AddRmsNorm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                          float eps, const TensorView& out) override {
    constexpr absl::string_view kOp = "AddRmsNorm";
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "residual", residual, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "weight", weight, DType::kBF16, 1));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "weight", weight, 0, x.shape[1]));
    if (!(residual.shape == x.shape) || !(out.shape == x.shape)) {
      return Invalid(kOp, absl::StrCat("residual ", residual.shape.ToString(), " and out ", out.shape.ToString(),
                                       " must have x's shape ", x.shape.ToString()));
    }
    LoraRowsView rows;
    if (TakeLoraRows(x, &rows)) {
      const cudaError_t err = LaunchAddRmsNormRows(rows, x.data, residual.data, weight.data, x.shape[0], x.shape[1],
                                                   eps, out.data, stream_);
      if (err != cudaErrorInvalidValue) return CudaStatus(err, kOp);
      // Not a layout the rows kernel takes (nothing was launched): x first, then as usual.
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(LaunchLoraRowsFlush(rows, x.data, stream_), kOp));
    }
    LORAPLEX_ASSIGN_OR_RETURN(const LoraDeltaView delta, TakeLoraDelta(x));
    return CudaStatus(LaunchAddRmsNorm(x.data, residual.data, weight.data, x.shape[0], x.shape[1], eps,
                                       out.data, delta, stream_),
                      kOp);
  }

  absl::Status Gemm(const TensorView& x, const TensorView& w, float beta, const TensorView& y) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    const int splits = SkinnySplits(x, w, beta, y);
    if (splits > 0) return RunSkinnyGemm(x, w, y, splits, /*hoisted=*/skinny_hoist_ >= 1);
    return RunGemm(*gemm_, x, w, beta, y);
  }

  absl::Status RunSkinnyGemm(const TensorView& x, const TensorView& w, const TensorView& y, int splits, bool hoisted) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemm("Gemm", x, w, y));
    return CudaStatus(LaunchSkinnyGemm(x.data, w.data, static_cast<int>(x.shape[0]), static_cast<int>(w.shape[0]),
                                       static_cast<int>(x.shape[1]), splits, skinny_scratch_, y.data, stream_,
                                       hoisted),
                      "Gemm (skinny)");
  }

  // The splits of K the skinny kernel takes for these arguments, or 0: cuBLASLt's GEMM (more than
  // kSkinnyGemmMaxRows rows, F32 or accumulated output, unaligned rows, a shape the kernel does not
  // deal evenly over the SMs, or SetSkinnyGemmForTest mode 0). Gemm takes it in modes 1 and 2,
  // GemmWithLora's GEMM beside or after its LoRA kernels in mode 2 (the default: one rank-16
  // adapter at batch 1 1.051x -> 1.019x the base step, bench/runs/2026-11-29-eleventh). The
  // few-adapter GEMM for fewer SMs (32 tokens or more) stays cuBLASLt's.
  // The kernel reads its first tiles of w before it waits for the kernel ahead of it, so w must
  // not be that kernel's output: the model's weights, the only w a step passes, never are. It
  // uses one scratch (skinny_scratch_), so it runs on stream_ only.
  int SkinnySplits(const TensorView& x, const TensorView& w, float beta, const TensorView& y) const {
    if (skinny_mode_ == 0 || beta != 0.0f || x.dtype != DType::kBF16 || w.dtype != DType::kBF16 ||
        y.dtype != DType::kBF16 || x.shape.rank != 2 || w.shape.rank != 2 || x.shape[1] != w.shape[1]) {
      return 0;
    }
    const uintptr_t addresses =
        reinterpret_cast<uintptr_t>(x.data) | reinterpret_cast<uintptr_t>(w.data) | reinterpret_cast<uintptr_t>(y.data);
    if (addresses % 16 != 0) return 0;
    // Its blocks all run at once, so its partials and counters fit the scratch sized for num_sms_.
    return SkinnyGemmSplits(x.shape[0], w.shape[0], x.shape[1], num_sms_);
  }
  void set_skinny_mode(int mode) { skinny_mode_ = mode; }

  // Gemm's checks and launch on `gemm` (no delta flush).
  absl::Status RunGemm(CublasLtGemm& gemm, const TensorView& x, const TensorView& w, float beta,
                       const TensorView& y) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemm("Gemm", x, w, y));
    return Annotate(gemm.Run(x.data, w.data, y.data, y.dtype == DType::kF32, x.shape[0], w.shape[0], x.shape[1],
                             beta, stream_),
                    "Gemm");
  }

  // GemmWithLora's GEMM (its delta already flushed): the executor's, or (SetLoraGemmSmsForTest)
  // cuBLASLt's choice for fewer SMs, so its CTAs need not wait for the SMs the side chain holds.
  absl::Status GemmBesideLora(const TensorView& x, const TensorView& w, const TensorView& y) {
    if (skinny_mode_ == 2) {
      const int splits = SkinnySplits(x, w, 0.0f, y);
      if (splits > 0) return RunSkinnyGemm(x, w, y, splits, /*hoisted=*/skinny_hoist_ >= 2);
    }
    return RunGemm(gemm_beside_lora_ != nullptr ? *gemm_beside_lora_ : *gemm_, x, w, 0.0f, y);
  }

  void set_lora_gemm_first(int min_slices) { lora_gemm_first_min_slices_ = min_slices; }
  void set_lora_module_shrink_blocks(int num_slices, int blocks) { lora_module_shrink_blocks_[num_slices] = blocks; }
  void set_lora_wide_shrink_grid(int mode) { lora_wide_shrink_grid_ = mode; }
  void set_lora_shrink_shape(int shape, int rows, int balanced) {
    lora_shrink_shape_ = shape < 0 ? kLoraShrinkShape : shape;
    lora_shrink_rows_ = rows;
    lora_shrink_balanced_ = balanced;
  }
  void set_lora_expand(int stages, int blocks, int tokens, int classes) {
    lora_expand_stages_ = stages;
    lora_expand_blocks_ = blocks;
    lora_expand_tokens_ = tokens;
    lora_expand_classes_ = classes;
  }
  void set_lora_inline(int min_segments) {
    lora_inline_min_segments_ = min_segments < 0 ? kLoraInlineMinSegments : min_segments;
  }
  // Negative: that field's default; gemm_sms 0: no few-adapter tuning.
  absl::Status set_lora_few(int gemm_sms, int shrink_blocks, int min_tokens) {
    LORAPLEX_ASSIGN_OR_RETURN(lora_few_gemm_, GemmForSms(gemm_sms < 0 ? std::max(1, num_sms_ * 2 / 3) : gemm_sms));
    lora_few_shrink_blocks_ = shrink_blocks < 0 ? kLoraFewShrinkBlocks : std::max(1, shrink_blocks);
    lora_few_min_tokens_ = min_tokens < 0 ? kLoraFewMinTokens : min_tokens;
    return absl::OkStatus();
  }

  // GemmBesideProbeForTest: Gemm(x, w, y) with the probe on the side stream beside it (forked and
  // joined like GemmWithLora's side chain); without the GEMM, the probe alone on the stream.
  absl::Status GemmBesideProbe(const TensorView& x, const TensorView& w, const TensorView& y, const void* src,
                               int64_t bytes, int blocks, uint32_t* sink, bool gemm, bool probe_first) {
    if (!gemm) return CudaStatus(LaunchBesideProbe(src, bytes, blocks, sink, stream_), "GemmBesideProbe: probe");
    if (bytes <= 0) return Gemm(x, w, 0.0f, y);
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(fork_event_, stream_), "GemmBesideProbe: fork"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(side_stream_, fork_event_, 0), "GemmBesideProbe: fork"));
    absl::Status gemm_status = probe_first ? absl::OkStatus() : Gemm(x, w, 0.0f, y);
    const absl::Status probe =
        CudaStatus(LaunchBesideProbe(src, bytes, blocks, sink, side_stream_), "GemmBesideProbe: probe");
    const absl::Status recorded = CudaStatus(cudaEventRecord(join_event_, side_stream_), "GemmBesideProbe: join");
    if (probe_first && gemm_status.ok()) gemm_status = Gemm(x, w, 0.0f, y);
    LORAPLEX_RETURN_IF_ERROR(recorded);
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(stream_, join_event_, 0), "GemmBesideProbe: join"));
    LORAPLEX_RETURN_IF_ERROR(probe);
    return gemm_status;
  }

  absl::Status set_lora_gemm_sms(int sms) {
    LORAPLEX_ASSIGN_OR_RETURN(gemm_beside_lora_, GemmForSms(sms));
    return absl::OkStatus();
  }

  // A GEMM whose algorithms cuBLASLt chooses for `sms` SMs (null for 0). Synchronizes first: the
  // stream must be done with the GEMM the caller replaces.
  absl::StatusOr<std::unique_ptr<CublasLtGemm>> GemmForSms(int sms) {
    LORAPLEX_RETURN_IF_ERROR(Synchronize());
    if (sms <= 0) return std::unique_ptr<CublasLtGemm>();
    return CublasLtGemm::Create(gemm_workspace_, kGemmWorkspaceBytes, sms);
  }

  absl::Status PrepareGemm(const TensorView& x, const TensorView& w, const TensorView& y) override {
    constexpr absl::string_view kOp = "PrepareGemm";
    LORAPLEX_RETURN_IF_ERROR(CheckGemm(kOp, x, w, y));
    LORAPLEX_RETURN_IF_ERROR(Annotate(
        gemm_->Prepare(x.data, w.data, y.data, y.dtype == DType::kF32, x.shape[0], w.shape[0], x.shape[1]),
        "PrepareGemm"));
    // SetGemmTimedForTest: the decode buckets cuBLASLt runs (32 to 256 rows) by timing its
    // candidates, as the LoRA rows' GEMMs are chosen. Never inside a capture.
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (gemm_timed_ && y.dtype == DType::kBF16 && x.shape[0] >= kGemmTimedMinRows &&
        cudaStreamIsCapturing(stream_, &capturing) == cudaSuccess && capturing == cudaStreamCaptureStatusNone) {
      LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
      LORAPLEX_RETURN_IF_ERROR(Annotate(gemm_->PrepareTimed(x.data, w.data, y.data, kGemmTimedMinRows,
                                                            std::min<int64_t>(x.shape[0], kGemmTimedMaxRows),
                                                            w.shape[0], x.shape[1], stream_),
                                        "PrepareGemm (timed)"));
    }
    // The few-adapter GEMM of GemmWithLora too (bf16 projections only: the logits never carry LoRA).
    if (lora_few_gemm_ == nullptr || y.dtype == DType::kF32 || x.shape[0] < lora_few_min_tokens_) {
      return absl::OkStatus();
    }
    return Annotate(lora_few_gemm_->Prepare(x.data, w.data, y.data, false, x.shape[0], w.shape[0], x.shape[1]),
                    "PrepareGemm (few-adapter GEMM)");
  }

  int64_t gemm_algorithms() const { return gemm_->num_algorithms(); }
  void set_gemm_timed(bool timed) { gemm_timed_ = timed; }
  void set_gemm_timed_l2_cold(bool cold) { gemm_->set_timed_l2_cold(cold); }

  // Gemm's and PrepareGemm's argument checks (kOp names the op in the message).
  absl::Status CheckGemm(absl::string_view kOp, const TensorView& x, const TensorView& w, const TensorView& y) {
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "w", w, DType::kBF16, 2));
    if (y.dtype != DType::kBF16 && y.dtype != DType::kF32) {
      return Invalid(kOp, absl::StrCat("y has dtype ", std::string(DTypeName(y.dtype)), ", expected BF16 or F32"));
    }
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "y", y, y.dtype, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "w", w, 1, x.shape[1]));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "y", y, 0, x.shape[0]));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "y", y, 1, w.shape[0]));
    if (x.shape[1] == 0) return Invalid(kOp, "K is 0");
    return absl::OkStatus();
  }

  absl::Status RopeAndCacheKv(const TensorView& qkv, const TensorView& inv_freq, int num_q_heads,
                              int num_kv_heads, int head_dim, const AttentionMeta& meta,
                              const KvCacheView& cache) override {
    constexpr absl::string_view kOp = "RopeAndCacheKv";
    LORAPLEX_RETURN_IF_ERROR(CheckQkvAndCache(kOp, qkv, num_q_heads, num_kv_heads, head_dim, meta, cache));
    if (head_dim % 2 != 0) return Invalid(kOp, absl::StrCat("head_dim ", head_dim, " is odd"));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "inv_freq", inv_freq, DType::kF32, 1));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "inv_freq", inv_freq, 0, head_dim / 2));
    RopeParams p;
    p.qkv = qkv.data;
    p.inv_freq = inv_freq.As<float>();
    p.positions = meta.positions;
    p.slot_mapping = meta.slot_mapping;
    p.token_seq = meta.token_seq;
    p.k_cache = cache.k.data;
    p.v_cache = cache.v.data;
    p.num_cache_slots = cache.k.shape[0] * cache.k.shape[1];
    p.num_tokens = meta.num_tokens;
    p.num_q_heads = num_q_heads;
    p.num_kv_heads = num_kv_heads;
    p.head_dim = head_dim;
    if (TakeLoraRows(qkv, &p.rows)) {
      // The rows kernel takes a head's columns from one slice, and writes every row it has a block
      // for: other layouts, and rows past meta.num_tokens, get theirs from the flush first.
      bool heads = head_dim >= 16;
      for (int s = 0; s <= p.rows.num_slices; ++s) heads = heads && p.rows.slice_offsets[s] % head_dim == 0;
      if (!heads || p.num_tokens < p.rows.rows) {
        LORAPLEX_RETURN_IF_ERROR(CudaStatus(LaunchLoraRowsFlush(p.rows, qkv.data, stream_), kOp));
        p.rows = LoraRowsView{};
      }
      return CudaStatus(LaunchRopeAndCacheKv(p, stream_), kOp);
    }
    LORAPLEX_ASSIGN_OR_RETURN(p.delta, TakeLoraDelta(qkv));
    if (!p.delta.empty() && p.num_tokens < p.delta.rows) {
      // Rows past meta.num_tokens get no block: add the delta to them first.
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(LaunchLoraDeltaAdd(p.delta, qkv.data, stream_), kOp));
      p.delta = LoraDeltaView{};
    }
    return CudaStatus(LaunchRopeAndCacheKv(p, stream_), kOp);
  }

  absl::Status Attention(const TensorView& qkv, int num_q_heads, int num_kv_heads, int head_dim,
                         float softmax_scale, const AttentionMeta& meta, const KvCacheView& cache,
                         const TensorView& out) override {
    constexpr absl::string_view kOp = "Attention";
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    LORAPLEX_RETURN_IF_ERROR(CheckQkvAndCache(kOp, qkv, num_q_heads, num_kv_heads, head_dim, meta, cache));
    if (!AttentionSupported(head_dim, num_q_heads, num_kv_heads)) {
      return absl::UnimplementedError(absl::StrCat(kOp, ": no kernel for head_dim ", head_dim, " with ",
                                                   num_q_heads, " q heads / ", num_kv_heads,
                                                   " kv heads (head_dim 32/64/128/256, group 1..8)"));
    }
    if (!Aligned16(cache.k.data) || !Aligned16(cache.v.data)) {
      return Invalid(kOp, "cache tensors must be 16-byte aligned");
    }
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "out", out, 1, static_cast<int64_t>(num_q_heads) * head_dim));
    if (out.shape[0] < meta.num_tokens) {
      return Invalid(kOp, absl::StrCat("out has ", out.shape[0], " rows, meta.num_tokens is ", meta.num_tokens));
    }
    if (meta.token_seq == nullptr || meta.block_tables == nullptr || meta.max_seqs <= 0 ||
        meta.max_blocks_per_seq <= 0) {
      return Invalid(kOp, absl::StrCat("meta needs token_seq, block_tables, max_seqs (", meta.max_seqs,
                                       ") and max_blocks_per_seq (", meta.max_blocks_per_seq, ")"));
    }
    AttentionParams p;
    p.qkv = qkv.data;
    p.qkv_row = qkv.shape[1];
    p.k_cache = cache.k.data;
    p.v_cache = cache.v.data;
    p.num_cache_slots = cache.k.shape[0] * cache.k.shape[1];
    p.out = out.data;
    p.positions = meta.positions;
    p.token_seq = meta.token_seq;
    p.block_tables = meta.block_tables;
    p.num_tokens = meta.num_tokens;
    p.num_q_heads = num_q_heads;
    p.num_kv_heads = num_kv_heads;
    p.head_dim = head_dim;
    p.max_seqs = meta.max_seqs;
    p.max_blocks_per_seq = meta.max_blocks_per_seq;
    p.block_size = meta.block_size;
    p.softmax_scale = softmax_scale;
    p.partial = static_cast<float*>(attention_scratch_);
    // The test modes pretend the GPU is huge (always split) or has no SMs (never split).
    const int sms = split_mode_ == AttentionSplitMode::kAuto     ? num_sms_
                    : split_mode_ == AttentionSplitMode::kAlways ? (1 << 20)
                                                                 : 0;
    ChooseAttentionSplits(sms, kAttentionScratchBytes, meta.max_context_len, &p);
    return CudaStatus(LaunchAttention(p, stream_), kOp);
  }

  absl::Status SiluMul(const TensorView& gate_up, const TensorView& out) override {
    constexpr absl::string_view kOp = "SiluMul";
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "gate_up", gate_up, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "out", out, 0, gate_up.shape[0]));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "gate_up", gate_up, 1, 2 * out.shape[1]));
    LoraRowsView rows;
    if (TakeLoraRows(gate_up, &rows)) {
      const cudaError_t err =
          LaunchSiluMulRows(rows, gate_up.data, out.shape[0], out.shape[1], out.data, stream_);
      if (err != cudaErrorInvalidValue) return CudaStatus(err, kOp);
      // Not a layout the rows kernel takes (nothing was launched): gate_up first, then as usual.
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(LaunchLoraRowsFlush(rows, gate_up.data, stream_), kOp));
    }
    LORAPLEX_ASSIGN_OR_RETURN(const LoraDeltaView delta, TakeLoraDelta(gate_up));
    return CudaStatus(LaunchSiluMul(gate_up.data, out.shape[0], out.shape[1], out.data, delta, stream_), kOp);
  }

  absl::Status GatherRows(const TensorView& x, const TensorView& rows, const TensorView& out) override {
    constexpr absl::string_view kOp = "GatherRows";
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, x.dtype, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "rows", rows, DType::kI32, 1));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, x.dtype, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "out", out, 0, rows.shape[0]));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "out", out, 1, x.shape[1]));
    const int64_t row_bytes = x.shape[1] * static_cast<int64_t>(DTypeSize(x.dtype));
    return CudaStatus(LaunchGatherRows(x.data, x.shape[0], row_bytes, rows.As<int32_t>(), rows.shape[0],
                                       out.data, stream_),
                      kOp);
  }

  // rows live on the device, so their values are not checked here (the model checks them on the
  // host before it uploads them).
  absl::Status Sample(const TensorView& logits, const SamplingRow* rows, SampledToken* out) override {
    constexpr absl::string_view kOp = "Sample";
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "logits", logits, DType::kF32, 2));
    if (rows == nullptr || out == nullptr) return Invalid(kOp, "rows and out must not be null");
    return CudaStatus(LaunchSample(logits.As<float>(), logits.shape[0], logits.shape[1],
                                   reinterpret_cast<const SamplingRowDev*>(rows),
                                   reinterpret_cast<SampledTokenDev*>(out), sample_scratch_,
                                   sample_scratch_bytes_, sample_wave_, sample_blocks_per_row_, stream_),
                      kOp);
  }

  absl::Status LoraShrink(const TensorView& x, const LoraSegments& segments, const LoraModule& module,
                          const TensorView& y) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    LORAPLEX_ASSIGN_OR_RETURN(LoraParams p, PrepareLoraShrink(x, segments, module, y));
    return LaunchShrink(p, x.data, y.As<float>(), stream_, "LoraShrink");
  }

  absl::Status LoraExpand(const TensorView& y, const LoraSegments& segments, const LoraModule& module,
                          const TensorView& out) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    LORAPLEX_ASSIGN_OR_RETURN(LoraParams p, PrepareLoraExpand(y, segments, module, out));
    return LaunchExpand(p, y.As<float>(), out.data, stream_, "LoraExpand");
  }

  // The tensor-core kernels: for steps of lora_tc_min_tokens_ tokens or more, and for steps of at
  // most kFewLoraSegments segments from lora_tc_few_min_tokens_ (0: never).
  bool UseTensorCores(const LoraParams& p) const {
    if (p.num_tokens >= lora_tc_min_tokens_) return true;
    return lora_tc_few_min_tokens_ > 0 && p.num_tokens >= lora_tc_few_min_tokens_ && p.segments_bound > 0 &&
           p.segments_bound <= kFewLoraSegments;
  }

  absl::Status LaunchShrink(const LoraParams& p, const void* x, float* y, cudaStream_t stream, absl::string_view op) {
    if (UseTensorCores(p)) {
      return CudaStatus(LaunchLoraShrinkTc(p, num_sms_ * kLoraTensorCoreBlocksPerSm, kLoraPartialBytes, x, y, stream), op);
    }
    return CudaStatus(LaunchLoraShrink(p, x, y, stream), op);
  }

  absl::Status LaunchExpand(const LoraParams& p, const float* y, void* out, cudaStream_t stream, absl::string_view op) {
    if (UseTensorCores(p)) {
      return CudaStatus(LaunchLoraExpandTc(p, num_sms_ * kLoraTensorCoreBlocksPerSm, y, out, stream), op);
    }
    return CudaStatus(LaunchLoraExpand(p, y, out, stream), op);
  }

  // The shrink runs on a side stream concurrently with the GEMM (both need only x, which the work
  // already on the stream produces). When the step's [rows, out width] F32 delta fits the delta
  // buffer, the expand runs there too, writing scale·y·Bᵀ into it, and the delta is left pending:
  // the next op that reads y whole (AddRmsNorm's x, RopeAndCacheKv's qkv, SiluMul's gate_up: what
  // follows every wrapped projection of the model) adds it while it loads y, and any other op
  // first adds it with one elementwise kernel (FlushLoraDelta). Either way y ends up with the
  // same bits as the in-place expand gives, and the GEMM's critical path gains no kernel.
  // Otherwise (and for the tensor-core kernels of long steps) the expand follows both on the ops'
  // stream, in place.
  absl::Status GemmWithLora(const TensorView& x, const TensorView& w, const TensorView& y,
                            const LoraSegments* segments, const LoraModule* module,
                            const TensorView& lora_y) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());  // its delta buffer is about to be rewritten
    if (segments == nullptr || module == nullptr || !lora_fork_) {
      return Ops::GemmWithLora(x, w, y, segments, module, lora_y);
    }
    if (const RowsCall call = RowsCallFor(x, w, y, *segments, *module); call.rw != nullptr) {
      return GemmWithLoraRows(x, w, y, call);
    }
    // Everything is checked before anything is enqueued: a failure must not leave the side
    // stream forked (an open fork also breaks a graph capture).
    LORAPLEX_ASSIGN_OR_RETURN(LoraParams shrink, PrepareLoraShrink(x, *segments, *module, lora_y));
    LORAPLEX_ASSIGN_OR_RETURN(LoraParams expand, PrepareLoraExpand(lora_y, *segments, *module, y));
    if (segments->max_segments == 0) return Gemm(x, w, 0.0f, y);  // no segment can exist
    const bool delta = !UseTensorCores(shrink) && LoraDeltaFits(*module, y);
    if (delta) {
      const int32_t rows = static_cast<int32_t>(y.shape[0]);
      for (LoraParams* p : {&shrink, &expand}) {
        p->delta_mask = lora_delta_mask_;
        p->delta_rows = rows;
      }
      expand.delta = lora_delta_;
    } else {
      expand.overlap_shrink = false;  // the kernel before it is the GEMM; the shrink joins by event
    }
    if (delta && lora_inline_min_segments_ >= 0 && SegmentsBound(*segments) > lora_inline_min_segments_) {
      // In line, before the GEMM: the shrink (a programmatic dependent of the kernel before it,
      // whose tail it overlaps with its metadata reads and L2 prefetch of A) on a grid of up to
      // 2 blocks an SM, the expand beside it as usual, then the GEMM alone on the SMs.
      shrink.num_blocks = ShrinkBlocks(*segments, *module, /*beside_gemm=*/false);
      shrink.prefetch_a = true;
      LORAPLEX_RETURN_IF_ERROR(LaunchShrink(shrink, x.data, lora_y.As<float>(), stream_, "GemmWithLora: shrink"));
      LORAPLEX_RETURN_IF_ERROR(
          CudaStatus(LaunchLoraExpand(expand, lora_y.As<float>(), y.data, stream_), "GemmWithLora: expand"));
      LORAPLEX_RETURN_IF_ERROR(GemmBesideLora(x, w, y));
      return LeaveLoraDelta(expand, y);
    }
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(fork_event_, stream_), "GemmWithLora: fork"));
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(side_stream_, fork_event_, 0), "GemmWithLora: fork"));
    // Few adapters and enough tokens: the GEMM chosen for fewer SMs beside a smaller shrink grid.
    const bool few = lora_few_gemm_ != nullptr && segments->segments_bound > 0 &&
                     segments->segments_bound <= kFewLoraSegments && segments->num_tokens >= lora_few_min_tokens_;
    if (few) shrink.num_blocks = std::min(shrink.num_blocks, lora_few_shrink_blocks_);
    // The side chain is enqueued first: the GEMM enqueued first made steps slower (its CTAs take
    // every SM they can; the LoRA blocks then wait or delay its tail). bench/runs/2026-11-29-rows.
    // (SetLoraGemmFirstForTest reverses the order, for A/B runs with a GEMM for fewer SMs.)
    const bool gemm_first = lora_gemm_first_min_slices_ > 0 && module->num_slices >= lora_gemm_first_min_slices_;
    auto run_gemm = [&] { return few ? RunGemm(*lora_few_gemm_, x, w, 0.0f, y) : GemmBesideLora(x, w, y); };
    absl::Status gemm = gemm_first ? run_gemm() : absl::OkStatus();
    absl::Status side = gemm.ok() ? LaunchShrink(shrink, x.data, lora_y.As<float>(), side_stream_,
                                                 "GemmWithLora: shrink")
                                  : absl::OkStatus();
    if (gemm.ok() && side.ok() && delta) {
      side = CudaStatus(LaunchLoraExpand(expand, lora_y.As<float>(), y.data, side_stream_), "GemmWithLora: expand");
    }
    const absl::Status recorded = CudaStatus(cudaEventRecord(join_event_, side_stream_), "GemmWithLora: join");
    if (gemm.ok() && side.ok() && !gemm_first) gemm = run_gemm();
    // Always join, so later work on the stream (and a capture's end) sees the side stream's.
    LORAPLEX_RETURN_IF_ERROR(recorded);
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(stream_, join_event_, 0), "GemmWithLora: join"));
    LORAPLEX_RETURN_IF_ERROR(side);
    LORAPLEX_RETURN_IF_ERROR(gemm);
    if (delta) return LeaveLoraDelta(expand, y);
    return LaunchExpand(expand, lora_y.As<float>(), y.data, stream_, "GemmWithLora: expand");
  }

  // GemmWithLora's delta (written by `expand`) left pending for the op that reads `y` next, or
  // added right away when folding is off.
  absl::Status LeaveLoraDelta(const LoraParams& expand, const TensorView& y) {
    pending_.view = LoraDeltaOf(expand);
    pending_.out = y.data;
    pending_.active = true;
    return lora_fold_ ? absl::OkStatus() : FlushLoraDelta();
  }

  // The most live segments any step of this call has (LoraSegments::segments_bound).
  static int32_t SegmentsBound(const LoraSegments& segments) {
    return segments.segments_bound > 0 ? std::min(segments.segments_bound, segments.max_segments) : segments.max_segments;
  }

  // Whether GemmWithLora's delta path can take this call: the delta and its marks fit their
  // buffers, and the add kernel's 8-column vectors neither straddle slices nor miss alignment.
  bool LoraDeltaFits(const LoraModule& module, const TensorView& y) const {
    const int64_t rows = y.shape[0];
    const int64_t width = module.slice_offsets[module.num_slices];
    const int64_t element = lora_bf16_delta_ ? 2 : 4;
    if (rows * width * element > static_cast<int64_t>(lora_delta_limit_)) return false;
    if (rows * module.num_slices > static_cast<int64_t>(kLoraDeltaMaskBytes)) return false;
    if (!Aligned16(y.data)) return false;
    for (int s = 0; s <= module.num_slices; ++s) {
      if (module.slice_offsets[s] % 8 != 0) return false;
    }
    return true;
  }

  absl::StatusOr<std::unique_ptr<Graph>> Capture(const std::function<absl::Status()>& body) override;

  // --- LoRA rows (lora_rows.h) ------------------------------------------------------------
  int64_t LoraWeightSpareRows(int num_slices) const override {
    constexpr int kMaxSlices = static_cast<int>(sizeof(LoraModule::slice_offsets) / sizeof(int32_t)) - 1;
    // Modules of one slice (o, down) only while SetLoraRowsForTest's min_slices is 1 (the
    // default): 64 rows each, 75 MB for the 8B model.
    const int min_slices = std::max(1, lora_rows_min_slices_);
    return num_slices >= min_slices && num_slices <= kMaxSlices
               ? static_cast<int64_t>(kLoraRowsPositions) * num_slices * kLoraRowsRank
               : 0;
  }

  absl::Status RegisterLoraWeight(const TensorView& w, const LoraModule& module) override {
    constexpr absl::string_view kOp = "RegisterLoraWeight";
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "weight", w, DType::kBF16, 2));
    const int64_t spare = LoraWeightSpareRows(module.num_slices);
    if (spare == 0) return Invalid(kOp, absl::StrCat("no spare rows for a module of ", module.num_slices, " slices"));
    const int64_t n = w.shape[0], k = w.shape[1];
    if (module.table == nullptr || module.in_features != k || module.slice_offsets[module.num_slices] != n) {
      return Invalid(kOp, absl::StrCat("module (", module.num_slices, " slices ending at ",
                                       module.slice_offsets[module.num_slices], ", ", module.in_features,
                                       " inputs) does not match weight ", w.shape.ToString()));
    }
    // A weight the kernels' 16-byte loads cannot take, or past the entries' capacity, is not
    // registered: it keeps the side chain.
    if (k % 8 != 0 || n % 8 != 0 || !Aligned16(w.data)) return absl::OkStatus();
    if (rows_weights_.size() >= kLoraRowsMaxEntries && rows_weights_.count(w.data) == 0) return absl::OkStatus();
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "RegisterLoraWeight: synchronize"));
    RowsWeight rw;
    if (auto it = rows_weights_.find(w.data); it != rows_weights_.end()) {
      rw.index = it->second.index;  // registered again: same entry
    } else {
      // The first entry no weight holds: an entry keeps its index while its weight lives, since
      // recorded steps address it by index.
      std::vector<bool> used(kLoraRowsMaxEntries, false);
      for (const auto& [weight, other] : rows_weights_) used[static_cast<size_t>(other.index)] = true;
      rw.index = static_cast<int>(std::find(used.begin(), used.end(), false) - used.begin());
    }
    rw.n = n;
    rw.k = k;
    rw.spare = spare;
    rw.table = module.table;
    rw.num_slots = module.num_slots;
    rw.num_slices = module.num_slices;
    for (int s = 0; s <= module.num_slices; ++s) rw.slice_offsets[s] = module.slice_offsets[s];
    rows_weights_[w.data] = rw;
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(UploadRowsEntries(), "RegisterLoraWeight: upload entries"));
    // The new weight's spare rows hold no adapter yet: every position installs again.
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMemset(rows_state_, 0xff, kLoraRowsPositions * sizeof(int32_t)),
                                        "RegisterLoraWeight: reset installs"));
    // An output buffer for the widest GEMM (load time: no graph can hold the old one yet).
    const size_t out_bytes = static_cast<size_t>(kLoraRowsMaxTokens * (n + spare) * 2);
    if (out_bytes > rows_out_bytes_) {
      if (rows_out_ != nullptr) cudaFree(rows_out_);
      rows_out_ = nullptr;
      rows_out_bytes_ = 0;
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&rows_out_, out_bytes), "RegisterLoraWeight: allocate output"));
      rows_out_bytes_ = out_bytes;
    }
    // The GEMM over the weight and its spare rows is chosen now, not in a step, for the row counts
    // LoRA rows run, by timing cuBLASLt's candidates (the heuristic's choice for gate_up's 28800
    // rows at M = 32 ran 12% slower than for its 28672).
    return Annotate(gemm_->PrepareTimed(w.data, w.data, rows_out_, kLoraRowsMinTokens, kLoraRowsMaxTokens, n + spare, k,
                                        stream_),
                    "RegisterLoraWeight: time the GEMM");
  }

  absl::Status BeginLoraStep(const LoraSegments& segments) override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    rows_step_ = RowsStep{};
    // Skinny LoRA rows (kLoraRowsSkinnyMaxTokens), or the GEMM over all spare rows.
    const bool skinny = skinny_mode_ == 2 && segments.num_tokens >= 1 &&
                        segments.num_tokens <= std::min(lora_rows_skinny_max_tokens_, kSkinnyGemmMaxRows);
    const bool full = lora_rows_max_tokens_ > 0 && segments.num_tokens >= std::max(1, lora_rows_min_tokens_) &&
                      segments.num_tokens <= lora_rows_max_tokens_;
    if (rows_weights_.empty() || !(skinny || full) || !segments.narrow_ranks || segments.segments_bound <= 0 ||
        segments.segments_bound > kLoraRowsPositions || segments.max_segments <= 0 ||
        segments.token_rows == nullptr || segments.seg_starts == nullptr || segments.seg_slots == nullptr ||
        segments.num_segments == nullptr) {
      return absl::OkStatus();
    }
    LoraRowsInstall p;
    p.entries = rows_entries_dev_;
    p.num_entries = rows_state_ + kRowsStateCount;
    p.token_rows = segments.token_rows;
    p.seg_starts = segments.seg_starts;
    p.seg_slots = segments.seg_slots;
    p.num_segments = segments.num_segments;
    p.num_tokens = segments.num_tokens;
    p.installed = rows_state_;
    p.done = reinterpret_cast<unsigned*>(rows_state_ + kRowsStateDone);
    p.row_pos = rows_state_ + kRowsStateRowPos;
    p.info = rows_info_;
    p.num_blocks = num_sms_ * 2;
    LORAPLEX_RETURN_IF_ERROR(CudaStatus(LaunchLoraRowsInstall(p, stream_), "BeginLoraStep: install"));
    rows_step_ = RowsStep{true, segments.seg_slots, segments.num_tokens};
    rows_step_.full = full;
    // Positions are the segments that hold tokens (LoraRowsInstall): no more than either bound.
    if (skinny) rows_step_.skinny_positions = std::min({SegmentsBound(segments), segments.num_tokens, kLoraRowsPositions});
    return absl::OkStatus();
  }

  absl::Status LoraSlotsChanged() override {
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    return CudaStatus(cudaMemsetAsync(rows_state_, 0xff, kLoraRowsPositions * sizeof(int32_t), stream_),
                      "LoraSlotsChanged");
  }

  int64_t rows_gemms() const { return rows_gemms_; }
  int64_t skinny_rows_gemms() const { return skinny_rows_gemms_; }
  void set_lora_rows_skinny(int max_tokens, bool even) {
    lora_rows_skinny_max_tokens_ = max_tokens < 0 ? kLoraRowsSkinnyMaxTokens : max_tokens;
    lora_rows_skinny_even_ = even;
  }
  void set_lora_rows(int min_tokens, int max_tokens, int min_slices, int one_slice_min_tokens) {
    lora_rows_min_slices_ = min_slices < 0 ? kLoraRowsMinSlices : min_slices;
    lora_rows_min_tokens_ = min_tokens < 0 ? kLoraRowsMinTokens : min_tokens;
    lora_rows_max_tokens_ = max_tokens < 0 ? kLoraRowsMaxTokens : std::min(max_tokens, kLoraRowsMaxTokens);
    lora_rows_one_slice_min_tokens_ = one_slice_min_tokens < 0 ? kLoraRowsOneSliceMinTokens : one_slice_min_tokens;
  }

  // A registered weight with its spare rows.
  struct RowsWeight {
    int index = 0;  // its entry (LoraRowsInstall::entries, ::info)
    int64_t n = 0, k = 0, spare = 0;
    const LoraSliceWeights* table = nullptr;
    int32_t num_slots = 0, num_slices = 0;
    int32_t slice_offsets[kLoraMaxSlices + 1] = {};
  };

  // How GemmWithLora runs a call as LoRA rows (RowsCallFor).
  struct RowsCall {
    const RowsWeight* rw = nullptr;
    int64_t rows = 0;     // GEMM rows: rw->n and the spare rows it covers
    int skinny_splits = 0;  // > 0: the skinny GEMM with these splits; 0: cuBLASLt's
  };

  // How GemmWithLora runs this call as LoRA rows (rw null: not as rows): a step begun with these
  // segments (BeginLoraStep installed its adapters), w registered with this module's table, and
  // x, y exactly the step's rows; the skinny GEMM over the step's positions' spare rows when it
  // takes that shape, else the GEMM over all of them in its token range.
  RowsCall RowsCallFor(const TensorView& x, const TensorView& w, const TensorView& y,
                         const LoraSegments& segments, const LoraModule& module) const {
    if (!rows_step_.active || segments.seg_slots != rows_step_.seg_slots ||
        segments.num_tokens != rows_step_.num_tokens) {
      return {};
    }
    auto it = rows_weights_.find(w.data);
    if (it == rows_weights_.end() || it->second.table != module.table || module.num_slices < lora_rows_min_slices_) {
      return {};
    }
    const RowsWeight& rw = it->second;
    if (x.dtype != DType::kBF16 || y.dtype != DType::kBF16 || w.dtype != DType::kBF16 || x.shape.rank != 2 ||
        y.shape.rank != 2 || w.shape.rank != 2 || w.shape[0] != rw.n || w.shape[1] != rw.k ||
        x.shape[0] != segments.num_tokens || y.shape[0] != segments.num_tokens || y.shape[1] != rw.n ||
        x.shape[1] != rw.k || !Aligned16(x.data) || !Aligned16(y.data)) {
      return {};
    }
    if (rows_step_.skinny_positions > 0) {
      const int64_t rows = rw.n + static_cast<int64_t>(rows_step_.skinny_positions) * rw.num_slices * kLoraRowsRank;
      const int splits = SkinnyGemmSplits(segments.num_tokens, rows, rw.k, num_sms_, lora_rows_skinny_even_);
      if (splits > 0) return {&rw, rows, splits};
    }
    if (!rows_step_.full || (module.num_slices == 1 && segments.num_tokens < lora_rows_one_slice_min_tokens_)) {
      return {};
    }
    return {&rw, rw.n + rw.spare, 0};
  }

  // GemmWithLora as LoRA rows: one GEMM over the weight and its spare rows into the rows buffer,
  // left pending for the op that reads y (TakeLoraRows) or FlushLoraDelta.
  absl::Status GemmWithLoraRows(const TensorView& x, const TensorView& w, const TensorView& y, const RowsCall& call) {
    const RowsWeight& rw = *call.rw;
    const int64_t t = x.shape[0];
    if (call.skinny_splits > 0) {
      // Nothing runs beside it: the build a plain Gemm takes. The spare rows are the install
      // kernel's output, so only the weight's own rows are fetched before the wait.
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(
          LaunchSkinnyGemm(x.data, w.data, static_cast<int>(t), static_cast<int>(call.rows), static_cast<int>(rw.k),
                           call.skinny_splits, skinny_scratch_, rows_out_, stream_, /*hoisted=*/skinny_hoist_ >= 1,
                           /*prefetch_rows=*/static_cast<int>(rw.n)),
          "GemmWithLora (skinny rows)"));
    } else {
      LORAPLEX_RETURN_IF_ERROR(Annotate(gemm_->Run(x.data, w.data, rows_out_, false, t, call.rows, rw.k, 0.0f, stream_),
                                        "GemmWithLora (rows)"));
    }
    ++rows_gemms_;
    if (call.skinny_splits > 0) ++skinny_rows_gemms_;
    LoraRowsView& v = pending_rows_.view;
    v = LoraRowsView{};
    v.src = rows_out_;
    v.stride = call.rows;
    v.u_col = static_cast<int32_t>(rw.n);
    v.rows = static_cast<int32_t>(t);
    v.row_pos = rows_state_ + kRowsStateRowPos;
    v.info = rows_info_ + static_cast<size_t>(rw.index) * kLoraRowsPositions * kLoraMaxSlices;
    v.num_slices = rw.num_slices;
    for (int s = 0; s <= rw.num_slices; ++s) v.slice_offsets[s] = rw.slice_offsets[s];
    pending_rows_.out = y.data;
    pending_rows_.active = true;
    return lora_fold_ ? absl::OkStatus() : FlushLoraDelta();
  }

  // Rewrites the install kernel's entries from rows_weights_ (synchronous: registration and Free
  // only, never in a capture).
  cudaError_t UploadRowsEntries() {
    std::vector<LoraRowsEntry> entries;
    for (const auto& [weight, rw] : rows_weights_) {
      entries.resize(std::max(entries.size(), static_cast<size_t>(rw.index) + 1));  // gaps: unused
      LoraRowsEntry& e = entries[static_cast<size_t>(rw.index)];
      e.spare = static_cast<char*>(const_cast<void*>(weight)) + rw.n * rw.k * 2;
      e.table = reinterpret_cast<const LoraSliceWeightsDev*>(rw.table);
      e.num_slots = rw.num_slots;
      e.num_slices = rw.num_slices;
      e.in_features = static_cast<int32_t>(rw.k);
    }
    // The count goes first, so a recorded install kernel never reads an entry dropped since.
    const int32_t count = static_cast<int32_t>(entries.size());
    cudaError_t err = cudaMemcpy(rows_state_ + kRowsStateCount, &count, sizeof(count), cudaMemcpyHostToDevice);
    if (err != cudaSuccess || count == 0) return err;
    return cudaMemcpy(rows_entries_dev_, entries.data(), count * sizeof(LoraRowsEntry), cudaMemcpyHostToDevice);
  }

  // The pending LoRA rows for a kernel about to read `t` whole, which then owns finishing it:
  // only when `t` is exactly the GEMM output they belong to. Otherwise nothing is taken.
  bool TakeLoraRows(const TensorView& t, LoraRowsView* out) {
    if (!pending_rows_.active || t.data != pending_rows_.out || t.dtype != DType::kBF16 || t.shape.rank != 2 ||
        t.shape[0] != pending_rows_.view.rows || t.shape[1] != pending_rows_.view.u_col) {
      return false;
    }
    pending_rows_.active = false;
    *out = pending_rows_.view;
    return true;
  }

  // Adds the pending LoRA delta (if any) to its GEMM output with the add kernel. Every op that
  // does not fold it calls this first, and so do graph capture, replay and stream timing, so work
  // enqueued later (or a host copy) never sees y without it.
  absl::Status FlushLoraDelta() { return CudaStatus(AddPendingLoraDelta(), "GemmWithLora: add delta"); }

  // The pending LoRA delta for a kernel about to read `t` whole, which then owns adding it: only
  // when `t` is exactly the GEMM output the delta belongs to (same memory and shape). Otherwise
  // the delta is flushed and the view is empty.
  absl::StatusOr<LoraDeltaView> TakeLoraDelta(const TensorView& t) {
    if (pending_.active && t.data == pending_.out && t.dtype == DType::kBF16 && t.shape.rank == 2 &&
        t.shape[0] == pending_.view.rows && t.shape[1] == pending_.view.width) {
      pending_.active = false;
      return pending_.view;
    }
    LORAPLEX_RETURN_IF_ERROR(FlushLoraDelta());
    return LoraDeltaView{};
  }

 private:
  CudaOps() = default;

  // FlushLoraDelta's launch (nothing when no delta is pending).
  cudaError_t AddPendingLoraDelta() {
    if (pending_rows_.active) {
      pending_rows_.active = false;
      return LaunchLoraRowsFlush(pending_rows_.view, pending_rows_.out, stream_);
    }
    if (!pending_.active) return cudaSuccess;
    pending_.active = false;
    return LaunchLoraDeltaAdd(pending_.view, pending_.out, stream_);
  }

  absl::Status CheckQkvAndCache(absl::string_view op, const TensorView& qkv, int num_q_heads, int num_kv_heads,
                                int head_dim, const AttentionMeta& meta, const KvCacheView& cache) {
    if (num_q_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || num_q_heads % num_kv_heads != 0) {
      return Invalid(op, absl::StrCat("bad heads: ", num_q_heads, " q heads, ", num_kv_heads,
                                      " kv heads, head_dim ", head_dim));
    }
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(op, "qkv", qkv, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(
        CheckDim(op, "qkv", qkv, 1, static_cast<int64_t>(num_q_heads + 2 * num_kv_heads) * head_dim));
    if (meta.num_tokens < 0 || meta.num_tokens > qkv.shape[0]) {
      return Invalid(op, absl::StrCat("meta.num_tokens ", meta.num_tokens, " outside [0, qkv rows ", qkv.shape[0], "]"));
    }
    if (meta.positions == nullptr || meta.slot_mapping == nullptr) {
      return Invalid(op, "meta.positions and meta.slot_mapping are required");
    }
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(op, "cache.k", cache.k, DType::kBF16, 4));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(op, "cache.v", cache.v, DType::kBF16, 4));
    if (!(cache.k.shape == cache.v.shape)) {
      return Invalid(op, absl::StrCat("cache.k ", cache.k.shape.ToString(), " and cache.v ",
                                      cache.v.shape.ToString(), " differ"));
    }
    if (meta.block_size <= 0) return Invalid(op, absl::StrCat("meta.block_size ", meta.block_size, " must be > 0"));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(op, "cache.k", cache.k, 1, meta.block_size));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(op, "cache.k", cache.k, 2, num_kv_heads));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(op, "cache.k", cache.k, 3, head_dim));
    return absl::OkStatus();
  }

  absl::StatusOr<LoraParams> PrepareLoraShrink(const TensorView& x, const LoraSegments& segments,
                                               const LoraModule& module, const TensorView& y) {
    constexpr absl::string_view kOp = "LoraShrink";
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckLora(kOp, segments, module, y, x.shape[0]));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "x", x, 1, module.in_features));
    if (module.in_features % 8 != 0 || !Aligned16(x.data)) {
      return Invalid(kOp, absl::StrCat("in_features ", module.in_features,
                                       " must be a multiple of 8 and x 16-byte aligned"));
    }
    // No more blocks than the step can have items (a few tokens cannot use a large grid; its
    // idle blocks would only hold SMs the GEMM beside the shrink needs).
    const bool balanced = lora_shrink_balanced_ < 0
                              ? segments.wide_ranks && segments.num_tokens >= kLoraShrinkBalancedMinTokens
                              : lora_shrink_balanced_ == 1;
    LoraParams p = MakeLoraParams(segments, module, ShrinkBlocks(segments, module, /*beside_gemm=*/true, balanced));
    p.shrink_warps = lora_shrink_warps_;
    // The one-token items need 16-row items to fill a quarter of the grid (OneTokenShape), which
    // steps of a few segments hardly do; they take the build without that shape, whose general
    // items ran 0.5-1% faster whole steps (bench/runs/2026-11-29-seventh).
    const bool few = SegmentsBound(segments) <= kFewLoraSegments;
    p.shrink_shape = lora_shrink_shape_ == 1 && few ? 0 : lora_shrink_shape_;
    p.shrink_rows = lora_shrink_rows_;
    p.shrink_balanced = balanced;
    return p;
  }

  // The decode shrink's grid (LoraShrinkBlocks), under the test cap when one is set, else under
  // kLoraManyShrinkSmShare's for the steps it names. Wide-rank steps among those keep the whole
  // grid unless their shrink is `balanced` (or SetLoraWideShrinkGridForTest says otherwise).
  int ShrinkBlocks(const LoraSegments& segments, const LoraModule& module, bool beside_gemm,
                   bool balanced = false) const {
    const int blocks = LoraShrinkBlocks(num_sms_, segments.num_tokens, module.num_slices, module.max_rank, beside_gemm);
    if (lora_shrink_blocks_ > 0) return std::min(blocks, lora_shrink_blocks_);  // the test cap replaces the rule below
    // SetLoraModuleShrinkBlocksForTest: the grid beside the GEMM of a many-adapter step for
    // modules of this many slices, in place of the rules.
    const int by_module =
        module.num_slices >= 1 && module.num_slices <= 3 ? lora_module_shrink_blocks_[module.num_slices] : 0;
    if (beside_gemm && by_module > 0 && SegmentsBound(segments) > kFewLoraSegments) return by_module;
    if (beside_gemm && SegmentsBound(segments) > kFewLoraSegments && segments.num_tokens >= kLoraManyMinTokens) {
      const bool quarter = module.num_slices == 2 && segments.num_tokens < kLoraGateUpQuarterMaxTokens;
      const int share = quarter ? kLoraManyGateUpSmShare : kLoraManyShrinkSmShare;
      const int many = std::min(blocks, std::max(1, num_sms_ / share));
      const bool wide_many = lora_wide_shrink_grid_ >= 0 ? lora_wide_shrink_grid_ == 1 : balanced;
      if (!segments.wide_ranks || wide_many) return many;
    }
    return blocks;
  }

  absl::StatusOr<LoraParams> PrepareLoraExpand(const TensorView& y, const LoraSegments& segments,
                                               const LoraModule& module, const TensorView& out) {
    constexpr absl::string_view kOp = "LoraExpand";
    LORAPLEX_RETURN_IF_ERROR(CheckLora(kOp, segments, module, y, out.shape[0]));
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, DType::kBF16, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckDim(kOp, "out", out, 1, module.slice_offsets[module.num_slices]));
    // No more blocks than the most work items the step can have (every token its own segment,
    // every tile of every slice at the narrowest width): each block is launched early beside the
    // shrink (PDL) and takes an SM's registers from the GEMM running beside them.
    const int tw = LoraExpandTileWidth(module.max_rank);  // the narrowest tiles a step can have
    const int64_t tiles = LoraExpandTiles(module.slice_offsets, module.num_slices, tw);
    const int64_t want = std::max<int64_t>(1, tiles) * std::max(1, segments.num_tokens);
    int64_t cap = static_cast<int64_t>(num_sms_) * kLoraExpandBlocksPerSm;
    if (lora_expand_blocks_ > 0) cap = std::min<int64_t>(cap, lora_expand_blocks_);
    LoraParams p = MakeLoraParams(segments, module, static_cast<int>(std::min(cap, want)));
    p.expand_stages = lora_expand_stages_ >= 0 ? lora_expand_stages_
                      : segments.wide_ranks      ? kLoraWideExpandStages
                                                 : kLoraExpandStages;
    p.expand_classes = lora_expand_classes_ >= 0 ? lora_expand_classes_ : kLoraWideExpandClasses;
    p.expand_tokens = lora_expand_tokens_ > 0 ? lora_expand_tokens_
                      : p.expand_stages >= 2  ? kLoraWideExpandTokens
                                              : kLoraExpandTokens;
    p.bf16_delta = lora_bf16_delta_;
    return p;
  }

  absl::Status CheckLora(absl::string_view op, const LoraSegments& segments, const LoraModule& module,
                         const TensorView& y, int64_t num_tokens) {
    // slice_offsets holds num_slices + 1 entries.
    constexpr int kMaxSlices = static_cast<int>(sizeof(module.slice_offsets) / sizeof(module.slice_offsets[0])) - 1;
    if (module.num_slices < 1 || module.num_slices > kMaxSlices) {
      return Invalid(op, absl::StrCat("module.num_slices ", module.num_slices, " not in 1..", kMaxSlices));
    }
    if (module.max_rank < 1 || module.max_rank > kLoraMaxRank) {
      return Invalid(op, absl::StrCat("module.max_rank ", module.max_rank, " not in 1..", kLoraMaxRank));
    }
    if (module.table == nullptr || module.num_slots < 0) return Invalid(op, "module has no slot table");
    if (segments.num_tokens > kLoraMaxStepTokens) {
      return Invalid(op, absl::StrCat("segments.num_tokens ", segments.num_tokens, " above the most a step may have, ",
                                      kLoraMaxStepTokens));
    }
    if (segments.num_tokens < 0 || segments.num_tokens > num_tokens) {
      return Invalid(op, absl::StrCat("segments.num_tokens ", segments.num_tokens, " outside [0, activation rows ",
                                      num_tokens, "]"));
    }
    if (segments.max_segments < 0 || (segments.max_segments > 0 &&
        (segments.token_rows == nullptr || segments.seg_starts == nullptr || segments.seg_slots == nullptr ||
         segments.num_segments == nullptr))) {
      return Invalid(op, "segments arrays are missing");
    }
    for (int s = 0; s < module.num_slices; ++s) {
      if (module.slice_offsets[s + 1] < module.slice_offsets[s]) {
        return Invalid(op, absl::StrCat("module.slice_offsets decrease at slice ", s));
      }
    }
    LORAPLEX_RETURN_IF_ERROR(CheckTensor(op, "y", y, DType::kF32, 2));
    if (y.shape[0] < segments.num_tokens) {
      return Invalid(op, absl::StrCat("y has ", y.shape[0], " rows, segments.num_tokens is ", segments.num_tokens));
    }
    return CheckDim(op, "y", y, 1, static_cast<int64_t>(module.num_slices) * module.max_rank);
  }

  // Kernel parameters of a checked call (CheckLora).
  LoraParams MakeLoraParams(const LoraSegments& segments, const LoraModule& module, int num_blocks) const {
    LoraParams p;
    p.table = reinterpret_cast<const LoraSliceWeightsDev*>(module.table);
    p.num_slots = module.num_slots;
    p.num_slices = module.num_slices;
    p.in_features = module.in_features;
    p.max_rank = module.max_rank;
    for (int s = 0; s <= module.num_slices; ++s) p.slice_offsets[s] = module.slice_offsets[s];
    p.token_rows = segments.token_rows;
    p.seg_starts = segments.seg_starts;
    p.seg_slots = segments.seg_slots;
    p.num_segments = segments.num_segments;
    p.live_max_rank = segments.max_rank;
    p.class_ends = segments.class_ends;
    p.max_segments = segments.max_segments;
    p.segments_bound = SegmentsBound(segments);
    p.num_tokens = segments.num_tokens;
    p.partials = static_cast<float*>(lora_partials_);
    p.num_blocks = num_blocks;
    p.overlap_shrink = lora_overlap_;
    return p;
  }

  cudaStream_t stream_ = nullptr;
  int num_sms_ = 0;
  void* gemm_workspace_ = nullptr;
  void* attention_scratch_ = nullptr;
  void* lora_partials_ = nullptr;
  int lora_shrink_blocks_ = 0;  // a cap on the shrink's grid (tests); 0: LoraShrinkBlocks alone
  int lora_module_shrink_blocks_[4] = {0, 0, 0, 0};  // SetLoraModuleShrinkBlocksForTest, by slices
  int lora_shrink_warps_ = 0;   // SetLoraShrinkWarpsForTest; 0: by in_features
  int lora_shrink_shape_ = kLoraShrinkShape;  // SetLoraShrinkShapeForTest (LoraParams::shrink_shape)
  int lora_shrink_rows_ = 0;    // SetLoraShrinkShapeForTest (LoraParams::shrink_rows)
  int lora_shrink_balanced_ = -1;  // SetLoraShrinkShapeForTest (LoraParams::shrink_balanced; -1: the default)
  int lora_wide_shrink_grid_ = -1;  // SetLoraWideShrinkGridForTest (-1: by the shrink's numbering)
  int lora_expand_stages_ = -1;  // SetLoraExpandForTest (LoraParams::expand_stages); -1: by rank class
  int lora_expand_blocks_ = 0;  // SetLoraExpandForTest: a cap on the expand's grid (0: none)
  int lora_expand_tokens_ = 0;  // SetLoraExpandForTest (LoraParams::expand_tokens; 0: the default)
  int lora_expand_classes_ = -1;  // SetLoraExpandForTest (LoraParams::expand_classes); -1: the default
  bool lora_overlap_ = true;
  bool lora_fork_ = true;
  void* sample_scratch_ = nullptr;  // LaunchSample's first-pass partials
  size_t sample_scratch_bytes_ = 0;
  int sample_blocks_per_row_ = 0;  // SetSampleBlocksForTest (0: by the launch's rows)
  int skinny_mode_ = 2;              // SetSkinnyGemmForTest
  int skinny_hoist_ = 1;             // SetSkinnyGemmHoistForTest
  SkinnyGemmScratch skinny_scratch_;  // the skinny GEMM's split partials and counters
  SampleWave sample_wave_;          // QuerySampleWave at Create
  int lora_tc_min_tokens_ = kLoraTensorCoreMinTokens;
  int lora_tc_few_min_tokens_ = kLoraTensorCoreFewMinTokens;  // SetLoraTensorCoreMinTokensForTest (0: off)
  void* lora_delta_ = nullptr;                  // [rows, out width] BF16 or F32, kLoraDeltaBytes
  bool lora_bf16_delta_ = kLoraBf16Delta;        // SetLoraBf16DeltaForTest (LoraParams::bf16_delta)
  uint8_t* lora_delta_mask_ = nullptr;          // [rows, slices], kLoraDeltaMaskBytes
  size_t lora_delta_limit_ = kLoraDeltaBytes;   // tests lower it to force the in-place expand
  cudaStream_t side_stream_ = nullptr;  // GemmWithLora's side chain
  cudaEvent_t fork_event_ = nullptr;
  cudaEvent_t join_event_ = nullptr;
  // GemmWithLora's delta, not yet added to its output `out` (see FlushLoraDelta).
  struct PendingLoraDelta {
    bool active = false;
    void* out = nullptr;
    LoraDeltaView view;
  };
  PendingLoraDelta pending_;
  // LoRA rows (lora_rows.h): registered weights, the install state, the GEMM's output buffer.
  std::unordered_map<const void*, RowsWeight> rows_weights_;
  LoraRowsEntry* rows_entries_dev_ = nullptr;  // [kLoraRowsMaxEntries]
  LoraSliceWeightsDev* rows_info_ = nullptr;   // [kLoraRowsMaxEntries][positions][kLoraMaxSlices]
  // installed[kLoraRowsPositions], done, the entries' count, row_pos[kLoraRowsMaxTokens]
  static constexpr int kRowsStateDone = kLoraRowsPositions, kRowsStateCount = kLoraRowsPositions + 1,
                       kRowsStateRowPos = kLoraRowsPositions + 2;
  int32_t* rows_state_ = nullptr;
  void* rows_out_ = nullptr;
  size_t rows_out_bytes_ = 0;
  int lora_rows_min_tokens_ = kLoraRowsMinTokens;  // SetLoraRowsForTest
  int lora_rows_max_tokens_ = kLoraRowsMaxTokens;  // 0: off
  int lora_rows_min_slices_ = kLoraRowsMinSlices;
  int lora_rows_one_slice_min_tokens_ = kLoraRowsOneSliceMinTokens;
  int lora_rows_skinny_max_tokens_ = kLoraRowsSkinnyMaxTokens;  // SetLoraRowsSkinnyForTest (0: off)
  bool lora_rows_skinny_even_ = true;  // SetLoraRowsSkinnyForTest: the skinny GEMM's even-deal rule
  struct RowsStep {  // the step BeginLoraStep began as LoRA rows
    bool active = false;
    const int32_t* seg_slots = nullptr;
    int32_t num_tokens = 0;
    bool full = false;             // in the GEMM-over-all-spare-rows range (lora_rows_min/max_tokens_)
    int32_t skinny_positions = 0;  // > 0: skinny LoRA rows over this many positions' spare rows
  };
  RowsStep rows_step_;
  struct PendingLoraRows {  // GemmWithLora's output as LoRA rows, not yet written to `out`
    bool active = false;
    void* out = nullptr;
    LoraRowsView view;
  };
  PendingLoraRows pending_rows_;
  int64_t rows_gemms_ = 0;  // GemmWithLora calls run as LoRA rows (LoraRowsGemmsForTest)
  int64_t skinny_rows_gemms_ = 0;  // those of them on the skinny GEMM (LoraSkinnyRowsGemmsForTest)
  bool gemm_timed_ = false;  // SetGemmTimedForTest
  bool lora_fold_ = true;  // tests turn folding off to compare both ways
  std::unique_ptr<CublasLtGemm> gemm_;
  std::unique_ptr<CublasLtGemm> gemm_beside_lora_;  // SetLoraGemmSmsForTest; null: gemm_
  int lora_gemm_first_min_slices_ = 0;              // SetLoraGemmFirstForTest
  int lora_inline_min_segments_ = kLoraInlineMinSegments;  // SetLoraInlineForTest
  // The few-adapter tuning (kFewLoraSegments; SetLoraFewTuningForTest): null GEMM: off.
  std::unique_ptr<CublasLtGemm> lora_few_gemm_;
  int lora_few_shrink_blocks_ = kLoraFewShrinkBlocks;
  int lora_few_min_tokens_ = kLoraFewMinTokens;
  cudaError_t deferred_error_ = cudaSuccess;
  AttentionSplitMode split_mode_ = AttentionSplitMode::kAuto;
};

class CudaGraphImpl final : public CudaGraph {
 public:
  CudaGraphImpl(CudaOps* ops, cudaGraph_t graph, cudaGraphExec_t exec)
      : ops_(ops), graph_(graph), exec_(exec) {}
  ~CudaGraphImpl() override {
    cudaGraphExecDestroy(exec_);
    cudaGraphDestroy(graph_);
  }
  absl::Status Launch() override {
    LORAPLEX_RETURN_IF_ERROR(ops_->FlushLoraDelta());  // an eager op's delta lands before the replay reads
    return CudaStatus(cudaGraphLaunch(exec_, ops_->stream()), "CudaGraph::Launch");
  }

 private:
  CudaOps* ops_;
  cudaGraph_t graph_;
  cudaGraphExec_t exec_;
};

absl::StatusOr<CudaOps*> AsCudaOps(Ops* ops, absl::string_view what) {
  auto* cuda = dynamic_cast<CudaOps*>(ops);
  if (cuda == nullptr) return Invalid(what, "ops were not created by CreateCudaOps");
  return cuda;
}

}  // namespace

bool CudaDevicePresent() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

absl::StatusOr<std::unique_ptr<Ops>> CreateCudaOps() {
  LORAPLEX_ASSIGN_OR_RETURN(std::unique_ptr<CudaOps> ops, CudaOps::Create());
  return std::unique_ptr<Ops>(std::move(ops));
}

absl::StatusOr<std::unique_ptr<CudaGraph>> CaptureCudaGraph(Ops* ops,
                                                            const std::function<absl::Status()>& record) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "CaptureCudaGraph"));
  cudaStream_t stream = cuda->stream();
  LORAPLEX_RETURN_IF_ERROR(cuda->FlushLoraDelta());  // eager work stays out of the graph
  LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                                      "CaptureCudaGraph: begin"));
  absl::Status recorded = record();
  // The graph's last op may have left a delta pending: it is added inside the graph.
  if (recorded.ok()) recorded = cuda->FlushLoraDelta();
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);  // always end, even after an error
  if (!recorded.ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return Annotate(recorded, "CaptureCudaGraph");
  }
  LORAPLEX_RETURN_IF_ERROR(CudaStatus(end, "CaptureCudaGraph: end"));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  if (inst != cudaSuccess) {
    cudaGraphDestroy(graph);
    return CudaStatus(inst, "CaptureCudaGraph: instantiate");
  }
  return std::unique_ptr<CudaGraph>(new CudaGraphImpl(cuda, graph, exec));
}

absl::StatusOr<std::unique_ptr<Graph>> CudaOps::Capture(const std::function<absl::Status()>& body) {
  LORAPLEX_ASSIGN_OR_RETURN(std::unique_ptr<CudaGraph> graph, CaptureCudaGraph(this, body));
  return std::unique_ptr<Graph>(std::move(graph));
}

absl::StatusOr<std::vector<double>> TimeOnStream(Ops* ops, int warmup, int repetitions, int calls_per_sample,
                                                 const std::function<absl::Status(int call)>& body) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "TimeOnStream"));
  cudaEvent_t start = nullptr, stop = nullptr;
  LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&start), "TimeOnStream: event"));
  LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&stop), "TimeOnStream: event"));
  auto run = [&]() -> absl::StatusOr<std::vector<double>> {
    int call = 0;
    for (int i = 0; i < warmup; ++i) LORAPLEX_RETURN_IF_ERROR(body(call++));
    std::vector<double> samples;
    for (int r = 0; r < repetitions; ++r) {
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(start, cuda->stream()), "TimeOnStream: record"));
      for (int c = 0; c < calls_per_sample; ++c) LORAPLEX_RETURN_IF_ERROR(body(call++));
      LORAPLEX_RETURN_IF_ERROR(cuda->FlushLoraDelta());  // the last call's delta counts too
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(stop, cuda->stream()), "TimeOnStream: record"));
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(stop), "TimeOnStream: wait"));
      float ms = 0.0f;
      LORAPLEX_RETURN_IF_ERROR(CudaStatus(cudaEventElapsedTime(&ms, start, stop), "TimeOnStream: elapsed"));
      samples.push_back(1000.0 * ms / calls_per_sample);
    }
    return samples;
  };
  auto result = run();
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return result;
}

absl::Status SetLoraTuningForTest(Ops* ops, int shrink_blocks, bool overlap_shrink, bool fork_shrink) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraTuningForTest"));
  if (shrink_blocks < 0) {
    return Invalid("SetLoraTuningForTest", absl::StrCat("shrink_blocks ", shrink_blocks, " must be >= 0"));
  }
  cuda->set_lora_tuning(shrink_blocks, overlap_shrink, fork_shrink);
  return absl::OkStatus();
}

absl::Status SetLoraShrinkWarpsForTest(Ops* ops, int warps) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraShrinkWarpsForTest"));
  if (warps != 0 && warps != 8 && warps != 16) {
    return Invalid("SetLoraShrinkWarpsForTest", absl::StrCat("warps ", warps, " not 0, 8 or 16"));
  }
  cuda->set_lora_shrink_warps(warps);
  return absl::OkStatus();
}

absl::Status SetLoraRowsForTest(Ops* ops, int min_tokens, int max_tokens, int min_slices, int one_slice_min_tokens) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraRowsForTest"));
  LORAPLEX_RETURN_IF_ERROR(cuda->FlushLoraDelta());
  cuda->set_lora_rows(min_tokens, max_tokens, min_slices, one_slice_min_tokens);
  return absl::OkStatus();
}

absl::Status SetLoraRowsSkinnyForTest(Ops* ops, int max_tokens, bool even) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraRowsSkinnyForTest"));
  if (max_tokens > kSkinnyGemmMaxRows) {
    return Invalid("SetLoraRowsSkinnyForTest", absl::StrCat("max_tokens ", max_tokens, " above ", kSkinnyGemmMaxRows));
  }
  LORAPLEX_RETURN_IF_ERROR(cuda->FlushLoraDelta());
  cuda->set_lora_rows_skinny(max_tokens, even);
  return absl::OkStatus();
}

absl::Status SetGemmTimedL2ColdForTest(Ops* ops, bool cold) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetGemmTimedL2ColdForTest"));
  cuda->set_gemm_timed_l2_cold(cold);
  return absl::OkStatus();
}

absl::Status SetGemmTimedForTest(Ops* ops, bool timed) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetGemmTimedForTest"));
  cuda->set_gemm_timed(timed);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> LoraRowsGemmsForTest(Ops* ops) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "LoraRowsGemmsForTest"));
  return cuda->rows_gemms();
}

absl::StatusOr<int64_t> LoraSkinnyRowsGemmsForTest(Ops* ops) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "LoraSkinnyRowsGemmsForTest"));
  return cuda->skinny_rows_gemms();
}

absl::Status SetLoraGemmSmsForTest(Ops* ops, int sms) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraGemmSmsForTest"));
  if (sms < 0) return Invalid("SetLoraGemmSmsForTest", absl::StrCat("sms ", sms, " must be >= 0"));
  return cuda->set_lora_gemm_sms(sms);
}

absl::Status GemmBesideProbeForTest(Ops* ops, const TensorView& x, const TensorView& w, const TensorView& y,
                                    const void* src, int64_t bytes, int blocks, uint32_t* sink, bool gemm,
                                    bool probe_first) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "GemmBesideProbeForTest"));
  if (bytes < 0 || bytes % 16 != 0 || blocks < 0 || (bytes > 0 && (src == nullptr || sink == nullptr))) {
    return Invalid("GemmBesideProbeForTest", absl::StrCat("bytes ", bytes, " (a multiple of 16), blocks ", blocks));
  }
  return cuda->GemmBesideProbe(x, w, y, src, bytes, blocks, sink, gemm, probe_first);
}

absl::Status SetLoraModuleShrinkBlocksForTest(Ops* ops, int num_slices, int blocks) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraModuleShrinkBlocksForTest"));
  if (num_slices < 1 || num_slices > 3 || blocks < 0 || blocks > 4096) {
    return Invalid("SetLoraModuleShrinkBlocksForTest",
                   absl::StrCat(num_slices, " slices, ", blocks, " blocks: want 1-3 slices and 0-4096 blocks"));
  }
  cuda->set_lora_module_shrink_blocks(num_slices, blocks);
  return absl::OkStatus();
}

absl::Status SetLoraWideShrinkGridForTest(Ops* ops, int mode) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraWideShrinkGridForTest"));
  if (mode < -1 || mode > 1) {
    return Invalid("SetLoraWideShrinkGridForTest", absl::StrCat("mode ", mode, " not -1, 0 or 1"));
  }
  cuda->set_lora_wide_shrink_grid(mode);
  return absl::OkStatus();
}

absl::Status SetLoraShrinkShapeForTest(Ops* ops, int shape, int rows, int balanced) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraShrinkShapeForTest"));
  if (shape < -1 || shape > 2) {
    return Invalid("SetLoraShrinkShapeForTest", absl::StrCat("shape ", shape, " not -1, 0, 1 or 2"));
  }
  if (rows != 0 && rows != 4 && rows != 8 && rows != 16) {
    return Invalid("SetLoraShrinkShapeForTest", absl::StrCat("rows ", rows, " not 0, 4, 8 or 16"));
  }
  if (balanced < -1 || balanced > 1) {
    return Invalid("SetLoraShrinkShapeForTest", absl::StrCat("balanced ", balanced, " not -1, 0 or 1"));
  }
  cuda->set_lora_shrink_shape(shape, rows, balanced);
  return absl::OkStatus();
}

absl::Status SetLoraExpandForTest(Ops* ops, int stages, int blocks, int tokens, int classes) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraExpandForTest"));
  if (stages < -1 || stages == 1 || stages > 3) {
    return Invalid("SetLoraExpandForTest", absl::StrCat("stages ", stages, " not -1, 0, 2 or 3"));
  }
  if (blocks < 0) return Invalid("SetLoraExpandForTest", absl::StrCat("blocks ", blocks, " < 0"));
  if (tokens < 0) return Invalid("SetLoraExpandForTest", absl::StrCat("tokens ", tokens, " < 0"));
  if (classes < -1 || classes > 2) {
    return Invalid("SetLoraExpandForTest", absl::StrCat("classes ", classes, " not -1, 0, 1 or 2"));
  }
  cuda->set_lora_expand(stages, blocks, tokens, classes);
  return absl::OkStatus();
}

absl::Status SetLoraInlineForTest(Ops* ops, int min_segments) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraInlineForTest"));
  cuda->set_lora_inline(min_segments);
  return absl::OkStatus();
}

absl::Status SetLoraFewTuningForTest(Ops* ops, int gemm_sms, int shrink_blocks, int min_tokens) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraFewTuningForTest"));
  return cuda->set_lora_few(gemm_sms, shrink_blocks, min_tokens);
}

absl::Status SetLoraGemmFirstForTest(Ops* ops, int min_slices) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraGemmFirstForTest"));
  if (min_slices < 0) return Invalid("SetLoraGemmFirstForTest", absl::StrCat("min_slices ", min_slices, " must be >= 0"));
  cuda->set_lora_gemm_first(min_slices);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> GemmAlgorithmsForTest(Ops* ops) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "GemmAlgorithmsForTest"));
  return cuda->gemm_algorithms();
}

absl::Status SetLoraDeltaLimitForTest(Ops* ops, size_t bytes) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraDeltaLimitForTest"));
  cuda->set_lora_delta_limit(bytes);
  return absl::OkStatus();
}

absl::Status SetLoraBf16DeltaForTest(Ops* ops, bool bf16) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraBf16DeltaForTest"));
  LORAPLEX_RETURN_IF_ERROR(cuda->FlushLoraDelta());  // a pending delta was written in the old format
  cuda->set_lora_bf16_delta(bf16);
  return absl::OkStatus();
}

absl::Status SetLoraFoldForTest(Ops* ops, bool fold) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraFoldForTest"));
  LORAPLEX_RETURN_IF_ERROR(cuda->FlushLoraDelta());
  cuda->set_lora_fold(fold);
  return absl::OkStatus();
}

absl::Status SetLoraTensorCoreMinTokensForTest(Ops* ops, int min_tokens, int few_min_tokens) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetLoraTensorCoreMinTokensForTest"));
  if (min_tokens < 0 || few_min_tokens < -1) {
    return Invalid("SetLoraTensorCoreMinTokensForTest",
                   absl::StrCat("min_tokens ", min_tokens, " (>= 0) or few_min_tokens ", few_min_tokens, " (>= -1) out of range"));
  }
  cuda->set_lora_tensor_core_min_tokens(min_tokens, few_min_tokens);
  return absl::OkStatus();
}

absl::Status SetSkinnyGemmHoistForTest(Ops* ops, int mode) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetSkinnyGemmHoistForTest"));
  if (mode < 0 || mode > 2) return Invalid("SetSkinnyGemmHoistForTest", absl::StrCat("mode ", mode, " not 0 to 2"));
  cuda->set_skinny_hoist(mode);
  return absl::OkStatus();
}

absl::Status SetSkinnyGemmForTest(Ops* ops, int mode) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetSkinnyGemmForTest"));
  if (mode < 0 || mode > 2) return Invalid("SetSkinnyGemmForTest", absl::StrCat("mode ", mode, " not 0, 1 or 2"));
  cuda->set_skinny_mode(mode);
  return absl::OkStatus();
}

absl::StatusOr<int> SkinnyGemmSplitsForTest(Ops* ops, const TensorView& x, const TensorView& w, float beta,
                                            const TensorView& y) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SkinnyGemmSplitsForTest"));
  return cuda->SkinnySplits(x, w, beta, y);
}

absl::Status SetSampleBlocksForTest(Ops* ops, int blocks_per_row) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetSampleBlocksForTest"));
  if (blocks_per_row != 0 && blocks_per_row != 1 && blocks_per_row != 2 && blocks_per_row != 4 && blocks_per_row != 8) {
    return Invalid("SetSampleBlocksForTest", absl::StrCat("blocks_per_row ", blocks_per_row, " not 0, 1, 2, 4 or 8"));
  }
  cuda->set_sample_blocks_per_row(blocks_per_row);
  return absl::OkStatus();
}

absl::Status SetAttentionSplitModeForTest(Ops* ops, AttentionSplitMode mode) {
  LORAPLEX_ASSIGN_OR_RETURN(CudaOps * cuda, AsCudaOps(ops, "SetAttentionSplitModeForTest"));
  cuda->set_split_mode(mode);
  return absl::OkStatus();
}

}  // namespace loraplex::ops::cuda
