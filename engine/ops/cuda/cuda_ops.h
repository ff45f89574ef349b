// The CUDA executor: ops::Ops for one NVIDIA GPU with compute dtype BF16 (bf16 weights and
// activations, fp32 accumulation), plus CUDA-graph capture and stream timing for the ops' stream.
// Plain C++ (no CUDA headers), so the ops factory can include it. Engine thread only.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/ops/ops.h"

namespace loraplex::ops::cuda {

// True when the CUDA runtime sees at least one device; false (never a crash) without a driver.
bool CudaDevicePresent();

// Creates ops on device 0 with their own stream, a cuBLASLt handle, a 32 MiB GEMM workspace and
// an attention scratch buffer. UNAVAILABLE without a device; INTERNAL on CUDA errors.
// Every op enqueues on the ops' stream and returns without waiting, except CopyToHost and
// Synchronize. CopyToDevice may return before the copy lands but never reads `src` afterwards.
// Op-specific notes: Embed and GatherRows give zero rows for out-of-range indices; Attention
// gives zero rows for padding tokens (token_seq < 0); LoraShrink sets exactly the columns its
// contract names, so callers need not zero y. LoraExpand starts while the kernel just before it
// runs and reads the segment arrays, slot table and B early: that kernel (normally the LoraShrink
// of the same module) must not write them; it reads y and out only after that kernel finished.
absl::StatusOr<std::unique_ptr<Ops>> CreateCudaOps();

// A captured sequence of ops, replayable on the ops' stream. Must not outlive its ops.
class CudaGraph : public Graph {
 public:
  // Enqueues one replay; device memory the graph reads (segment tables, counts) may be changed
  // between replays.
  virtual absl::Status Launch() = 0;
  absl::Status Replay() override { return Launch(); }
};

// Captures everything `record` enqueues on `ops` (which must come from CreateCudaOps) into a
// graph (what Ops::Capture does for these ops). Nothing runs during capture; the side stream of
// GemmWithLora joins the capture through its fork/join events. INVALID_ARGUMENT for other ops;
// `record`'s error otherwise.
absl::StatusOr<std::unique_ptr<CudaGraph>> CaptureCudaGraph(Ops* ops,
                                                            const std::function<absl::Status()>& record);

// Device time of `body` on the ops' stream, in microseconds: after `warmup` untimed calls, each of
// `repetitions` samples times `calls_per_sample` back-to-back calls with CUDA events and reports
// their mean. `body` gets a running call index (e.g. to rotate inputs through more than the L2).
absl::StatusOr<std::vector<double>> TimeOnStream(Ops* ops, int warmup, int repetitions,
                                                 int calls_per_sample,
                                                 const std::function<absl::Status(int call)>& body);

// Attention splits a token's context over several blocks when few (token, kv head) pairs cannot
// fill the GPU (decode). Tests force either path on any shape; production keeps kAuto.
// The decode LoraShrink's grid is capped at `shrink_blocks` blocks (0: no cap beyond its own,
// 3/4 of the SMs; 1 makes one block walk every work item),
// LoraExpand overlaps the LoraShrink launched just before it (programmatic dependent launch:
// it loads B while the shrink runs; default on), and GemmWithLora runs the shrink on a side
// stream concurrently with the GEMM (`fork_shrink`, default on; off: the three ops in order).
// Tests and benchmarks sweep them. INVALID_ARGUMENT for a negative shrink_blocks.
absl::Status SetLoraTuningForTest(Ops* ops, int shrink_blocks, bool overlap_shrink, bool fork_shrink);
// The decode shrink's block size: 8 or 16 warps (0: the default, 16 only for inputs wider than
// 8192). An experiment: 16-warp blocks fill an SM's registers, so with a small grid
// (SetLoraTuningForTest's shrink_blocks) the shrink occupies that many SMs and no more.
// INVALID_ARGUMENT for other values.
absl::Status SetLoraShrinkWarpsForTest(Ops* ops, int warps);
// The decode shrink's item shape. 0: 4 rows of A x up to 4 of a segment's tokens; 2: `rows` rows x
// one token at a time (a segment of one token then does a quarter of the loads and math); 1 (the
// default; -1 restores it): the latter when a step's mean segment length is below 2 tokens and
// its segments are enough to fill a quarter of the grid. rows 4, 8 or 16; 0: the fewest that make
// no more items than blocks. balanced 1: number only the real items, evenly over the grid
// (LoraParams::shrink_balanced); 0: every (segment, slice) pair's items up to the step's rank
// bound; -1: the default (balanced for LoraSegments::wide_ranks steps of 128 tokens or more). y
// gets the same bits either way. INVALID_ARGUMENT for other values.
absl::Status SetLoraShrinkShapeForTest(Ops* ops, int shape, int rows = 0, int balanced = -1);
// The decode shrink's grid beside the GEMM in wide-rank steps (LoraSegments::wide_ranks) of more
// than kFewLoraSegments segments and at least 32 tokens: 0, 3/4 of the SMs; 1, the many-adapter
// steps' half (a quarter for gate_up below 64 tokens); -1 (the default), the latter for a
// balanced shrink (LoraParams::shrink_balanced), else the former. INVALID_ARGUMENT for other
// values.
absl::Status SetLoraWideShrinkGridForTest(Ops* ops, int mode);
// The decode shrink's grid beside the GEMM in steps of more than kFewLoraSegments segments, for
// modules of `num_slices` slices (3: qkv; 2: gate_up; 1: o and down), in place of the rules
// (0: the rules). An experiment: step_bench --lora-shrink-blocks-s1/-s2/-s3. INVALID_ARGUMENT
// outside 1-3 slices or 0-4096 blocks.
absl::Status SetLoraModuleShrinkBlocksForTest(Ops* ops, int num_slices, int blocks);
// The decode expand's pipeline: 0 takes a block's items one after another; 2 or 3 streams them,
// keeping that many items' B tiles and y in shared memory and copying the next while it
// multiplies the current (LoraParams::expand_stages); -1 restores the default (item by item for
// narrow-rank steps, 2 stages for LoraSegments::wide_ranks). blocks > 0 caps the expand's grid
// (tests: blocks then walk many items; step_bench --lora-expand-blocks); 0 sizes it to the step.
// tokens > 0: about that many of a segment's tokens an item (LoraParams::expand_tokens; step_bench
// --lora-expand-tokens); 0 the default. classes: the streamed expand's rank classes
// (LoraParams::expand_classes 0, 1 or 2; step_bench --lora-expand-classes); -1 the default (0).
// The same bits in every case. INVALID_ARGUMENT for other values.
absl::Status SetLoraExpandForTest(Ops* ops, int stages, int blocks = 0, int tokens = 0, int classes = -1);
// LoRA rows (lora_rows.h): steps begun by Ops::BeginLoraStep with at most 4 segments of narrow
// ranks (LoraSegments::narrow_ranks) and min_tokens to max_tokens tokens run qkv's and gate_up's
// GemmWithLora as one GEMM over the weight and its spare rows, the expand in the op that reads y.
// Negative: that bound's default (32, 128); max_tokens 0 turns it off; above 128 acts as 128.
// Only modules of at least `min_slices` slices take it (negative: the default, 1; 2: qkv and
// gate_up; 3: qkv alone). One-slice modules (o and down, their LoRA added in AddRmsNorm) take it
// from `one_slice_min_tokens` tokens (negative: the default, 64). One-slice weights get their
// spare rows (LoraWeightSpareRows) only while min_slices is 1, so set it before the model loads.
// Takes effect from the next BeginLoraStep (graphs keep what they recorded).
absl::Status SetLoraRowsForTest(Ops* ops, int min_tokens, int max_tokens, int min_slices = -1,
                                int one_slice_min_tokens = -1);
// LoRA rows through the skinny GEMM for few-adapter narrow-rank steps of 1 to `max_tokens` tokens
// (negative: the default, 2; 0: off; at most 16), over the spare rows of the step's positions
// only. even = false lets them take shapes the skinny GEMM cannot deal evenly over the SMs (tests
// with small weights). Takes effect from the next BeginLoraStep. INVALID_ARGUMENT above 16.
absl::Status SetLoraRowsSkinnyForTest(Ops* ops, int max_tokens, bool even = true);
// An experiment (off by default; no clear gain in 2026-11-30-fifteenth/3): PrepareGemm also chooses the
// algorithm of every row bucket from 32 to 256 of bf16 GEMMs by timing cuBLASLt's candidates on
// the ops' stream, as the LoRA rows' GEMMs are chosen (CublasLtGemm::PrepareTimed). It then runs
// GEMMs on PrepareGemm's x and y (their contents become unspecified) and synchronizes, outside
// captures only. Once per shape: set it before the model's WarmUp.
absl::Status SetGemmTimedForTest(Ops* ops, bool timed);
// Whether the timed algorithm choices (the LoRA rows' GEMMs at RegisterLoraWeight,
// SetGemmTimedForTest's) time each call after clearing the L2, as a step meets the weight (the
// default), or back to back. Acts on choices made after it: set it before the model loads.
absl::Status SetGemmTimedL2ColdForTest(Ops* ops, bool cold);
// How many GemmWithLora calls have run as LoRA rows so far (recorded ones count once, at capture).
absl::StatusOr<int64_t> LoraRowsGemmsForTest(Ops* ops);
// How many of those ran on the skinny GEMM (SetLoraRowsSkinnyForTest).
absl::StatusOr<int64_t> LoraSkinnyRowsGemmsForTest(Ops* ops);
// An experiment (off by default): GemmWithLora's GEMM uses the algorithms cuBLASLt chooses for
// `sms` SMs (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET), leaving the rest to the LoRA side chain beside
// it; 0 goes back to the executor's GEMM. Synchronizes; call it outside captures.
absl::Status SetLoraGemmSmsForTest(Ops* ops, int sms);
// An experiment (off by default): GemmWithLora enqueues its GEMM before the side chain instead of
// after it (the side chain still does not wait for the GEMM) for modules of at least `min_slices`
// slices: 0 for none, 1 for all, 3 for qkv alone (its GEMM leaves 36 of 132 SMs free). Takes
// effect for later calls and captures. INVALID_ARGUMENT below 0.
absl::Status SetLoraGemmFirstForTest(Ops* ops, int min_slices);
// A measurement (ops_cuda_test "TIME beside"): Gemm(x, w, 0, y) with a bandwidth probe on
// GemmWithLora's side stream beside it, forked and joined the same way. The probe reads `bytes`
// (a multiple of 16) from `src` with `blocks` blocks of one warp at most 32 registers a thread and
// no shared memory (what fits on an SM beside a decode GEMM CTA); `sink` holds `blocks` words.
// probe_first: the probe is enqueued before the GEMM. gemm false: the probe alone on the stream;
// bytes 0: the GEMM alone.
absl::Status GemmBesideProbeForTest(Ops* ops, const TensorView& x, const TensorView& w, const TensorView& y,
                                    const void* src, int64_t bytes, int blocks, uint32_t* sink, bool gemm,
                                    bool probe_first);
// GemmWithLora calls whose steps may have more than `min_segments` live segments
// (LoraSegments::segments_bound, else max_segments) run the LoRA chain in line before the GEMM
// instead of beside it: the shrink, launched as a programmatic dependent of the kernel before it,
// resolves its items and prefetches A into the L2 while that kernel finishes, on up to 2 blocks
// an SM; the expand follows it as usual; then the GEMM. The delta is left for the next op as in
// the side-chain path. Negative: the default (64); INT32_MAX: never; 0: always.
absl::Status SetLoraInlineForTest(Ops* ops, int min_segments);
// GemmWithLora calls of steps with at most kFewLoraSegments (4) live segments (segments_bound: the
// model's few-adapter graphs) and at least `min_tokens` tokens run the GEMM as cuBLASLt chooses it
// for `gemm_sms` SMs, with the shrink beside it on at most `shrink_blocks` blocks. Any negative
// value restores that field's default (2/3 of the SMs, 44 blocks, 32 tokens); gemm_sms 0 turns the
// tuning off. Synchronizes; call it outside captures.
absl::Status SetLoraFewTuningForTest(Ops* ops, int gemm_sms, int shrink_blocks, int min_tokens);
// How many GEMM algorithms the executor has chosen so far (one per cuBLASLt shape bucket): a
// step whose shapes were prepared (Ops::PrepareGemm) adds none.
absl::StatusOr<int64_t> GemmAlgorithmsForTest(Ops* ops);
// GemmWithLora (forked) runs the expand beside the GEMM into a delta buffer of 64 MiB when the
// call's rows x out width delta fits (2 bytes an element, 4 with SetLoraBf16DeltaForTest false),
// else in place after the GEMM. Tests lower the limit
// (0: always in place) to cover both paths; values above 64 MiB act as 64 MiB.
absl::Status SetLoraDeltaLimitForTest(Ops* ops, size_t bytes);
// The decode LoRA expand's product scale·y·Bᵀ rounded to bf16 before it is added or stored, and
// GemmWithLora's delta held in BF16 (true, the default), or kept in F32 until the add (false;
// step_bench --lora-bf16-delta 0 for A/B runs). Flushes a pending delta first.
absl::Status SetLoraBf16DeltaForTest(Ops* ops, bool bf16);
// That delta is left for the op that reads the GEMM output next: AddRmsNorm, RopeAndCacheKv and
// SiluMul add it as they load it (and write it back); every other op, a capture's end, a replay
// and TimeOnStream add it first with a separate kernel. `fold` false: always that kernel, right
// after the GEMM (tests compare both ways bit for bit). Default true.
absl::Status SetLoraFoldForTest(Ops* ops, bool fold);
// LoRA ops of steps with at least `min_tokens` tokens run the tensor-core kernels (0: the default,
// 256); tests force either kind at any size. Steps of at most kFewLoraSegments segments
// (LoraSegments::segments_bound) run them from `few_min_tokens` tokens (-1: the default, 128; 0:
// never; step_bench --lora-tc-few-min-tokens). INVALID_ARGUMENT for other negative values.
absl::Status SetLoraTensorCoreMinTokensForTest(Ops* ops, int min_tokens, int few_min_tokens = -1);

// The executor's own GEMM for few rows (skinny_gemm.h), where it applies: mode 2 (the default) for
// Gemm and GemmWithLora's GEMM, 1 for Gemm only, 0 never (every GEMM on cuBLASLt).
// step_bench --skinny-gemm. The same results within bf16 rounding. INVALID_ARGUMENT for others.
absl::Status SetSkinnyGemmForTest(Ops* ops, int mode);
// Where the skinny GEMM takes its build with copy addresses computed once before its pipeline
// (skinny_gemm.cu; the same bits as the other build): mode 1 (the default) in Gemm only, 2 also
// for GemmWithLora's GEMM, 0 never. On an H200 it makes base decode steps 1.1-1.4% faster at
// batches 1 and 8, and LoRA steps 0.6% slower where it runs beside the LoRA kernels, hence mode 1
// (bench/RESULTS.md, thirteenth session). step_bench --skinny-hoist. INVALID_ARGUMENT for others.
absl::Status SetSkinnyGemmHoistForTest(Ops* ops, int mode);
// The splits of K that Gemm(x, w, beta, y) takes in that kernel now, or 0 for cuBLASLt.
absl::StatusOr<int> SkinnyGemmSplitsForTest(Ops* ops, const TensorView& x, const TensorView& w, float beta,
                                            const TensorView& y);

// Sample's blocks a logits row: 1, 2, 4 or 8 forces that many; 0 (the default) takes as many as
// keep the launch within one wave of the SMs. The same results either way. INVALID_ARGUMENT for
// other values.
absl::Status SetSampleBlocksForTest(Ops* ops, int blocks_per_row);

enum class AttentionSplitMode { kAuto, kAlways, kNever };
absl::Status SetAttentionSplitModeForTest(Ops* ops, AttentionSplitMode mode);

}  // namespace loraplex::ops::cuda
