// step_bench: decode and prefill step time of the real model on the CUDA executor, with and without
// LoRA adapters, next to the roofline of the same GPU (a device-to-device copy and the cuBLASLt
// GEMMs of one decode step alone). Decode steps replay the model's per-bucket CUDA graphs (as the
// server runs them); rows marked "eager" run the same steps with graphs off, for comparison.
//
// Loads the checkpoint through LlamaModel::Load on CudaOps and the adapters through
// LoadPeftAdapter + SlotPool, exactly as the server does, then times LlamaModel::ForwardSample
// as the engine calls it (host clock around the whole call: it ends with the greedy picks on the
// host). Decode scenarios per batch: base, one r16 adapter, 4 r16 adapters (batch >= 8, batch/4
// requests each), one distinct r16 adapter per request (as many as ADAPTER_DIR has), the mixed
// adapters (ranks 8..64); their GB/s column is the adapters' bytes over the time LoRA adds to the
// base step. When ADAPTER_DIR also has as many rank-64 adapters as mixed ones, each batch of 8 or
// more also runs that many r16 and that many r64 adapters in the mixed scenario's shape (the
// same tokens an adapter), and a "ranks" row compares the time the mixed ranks add with what
// cost in proportion to the ranks predicts: the r16 and r64 batches' added times interpolated at
// the mixed adapters' bytes (x base column: actual over predicted; padding every adapter to the
// largest rank would cost the r64 batch's time). Rows marked "paired" repeat the
// one-adapter and one-per-request scenarios with each step right after a base step, and give the
// median of the per-pair ratios (insensitive to drift between rows). Writes a JSON file and
// prints a table. Single-threaded; run it alone on the GPU.
//
// Usage: step_bench MODEL_DIR ADAPTER_DIR OUT_JSON [--steps N] [--batches 1,8,32,64,128] [--cpu 1]
//                   [--graphs 0] [--profile 1|2] [--lora-shrink-blocks N]
//                   [--lora-overlap 0|1] [--lora-shrink-warps 8|16] [--lora-gemm-sms N]
//                   [--lora-gemm-first 0|1|3] [--lora-inline N] [--lora-shrink-shape 0|1|2] [--lora-shrink-rows 0|4|8|16] [--lora-shrink-balanced -1|0|1] [--lora-wide-shrink-grid -1|0|1] [--lora-expand-stages 0|2|3] [--lora-expand-blocks N] [--lora-expand-tokens N] [--lora-expand-classes -1|0|1|2] [--lora-tc-min-tokens N] [--lora-tc-few-min-tokens N]
//                   [--lora-few-gemm-sms N] [--lora-few-shrink-blocks N] [--lora-few-min-tokens N] [--skinny-gemm 0|1|2]
//                   [--lora-bf16-delta 0|1] [--skinny-hoist 0|1|2] [--lora-shrink-blocks-s1|-s2|-s3 N]
//                   [--lora-rows-min-tokens N] [--lora-rows-max-tokens N] [--lora-rows-min-slices 1|2|3]
//                   [--lora-rows-one-slice-min-tokens N] [--lora-rows-skinny N]
//                   [--gemm-timed 0|1] [--gemm-l2-cold 0|1] [--variants "FLAGS;FLAGS;..."]
//   --graphs 0: every step eager (no graph rows).
//   --lora-shrink-balanced 1: the decode shrink numbers only its real items, evenly over its grid,
//     in every step; 0: never (every adapter's items up to the step's rank bound); default -1:
//     in steps with ranks above 16 of at least 128 tokens.
//   --lora-wide-shrink-grid 0|1: the shrink's grid beside the GEMM in many-adapter steps of at
//     least 32 tokens with ranks above 16: 3/4 of the SMs; the narrow steps' half (gate_up a
//     quarter below 64 tokens); default -1: the latter for a balanced shrink, else the former.
//   --skinny-gemm 0: every projection on cuBLASLt (default 2: projections of up to 16 rows, plain
//     or LoRA-wrapped, on the executor's own kernel where it applies, skinny_gemm.h; 1: plain ones
//     only). The roofline rows time the step's GEMMs on cuBLASLt alone and, at up to 16 rows, as the
//     executor runs them.
//   --lora-bf16-delta 0: the decode expand's product kept in F32 until it is added, and
//     GemmWithLora's delta F32 (default 1: rounded to bf16, a BF16 delta).
//   --lora-shrink-blocks-s1/-s2/-s3 N: the shrink's grid beside the GEMM in many-adapter steps for
//     modules of 1 (o, down), 2 (gate_up) or 3 (qkv) slices (an experiment; 0: the rules).
//   --lora-rows-min-tokens/--lora-rows-max-tokens N: the steps whose qkv and gate_up run their
//     LoRA as LoRA rows (few-adapter narrow-rank steps of that many tokens; defaults 32 and 128;
//     max 0: off, the side chain beside a GEMM for fewer SMs as before); --lora-rows-min-slices 3:
//     qkv alone, 2: gate_up too (default 1: o and down too, their LoRA added in AddRmsNorm;
//     min slices 2 or 3 on the command line also leaves out their spare rows at load);
//     --lora-rows-one-slice-min-tokens N: o and down as rows from N tokens (default 64).
//   --lora-rows-skinny N: few-adapter narrow-rank steps of up to N tokens (at most 16; default 2;
//     0: off) run LoRA rows through the skinny GEMM, over the spare rows of the step's adapters
//     only, for the projections whose shape it takes.
//   --gemm-l2-cold 0: the timed algorithm choices (LoRA rows' GEMMs, --gemm-timed) time calls back
//     to back (default 1: the L2 cleared before each; load time only, like --gemm-timed).
//   --gemm-timed 1: the model's GEMMs of 32 to 256 rows on algorithms chosen by timing cuBLASLt's
//     candidates at warm-up (an experiment). It acts at load only: give it on the command line
//     (gpu_all.sh's STEP_BENCH_VARIANTS runs another process), not in --variants.
//   --skinny-hoist 0|1|2: where the skinny GEMM takes its build with copy addresses hoisted out of
//     its pipeline: never, plain GEMMs only (the default), also GemmWithLora's GEMM.
//   --lora-*: LoRA kernel tuning of the CUDA executor for this run (defaults: the executor's):
//     a cap on the decode shrink's grid (blocks), whether the expand starts beside the shrink
//     (programmatic dependent launch), and (an experiment) the shrink's block size in warps
//     (16: one block fills an SM), and (an experiment) GemmWithLora's GEMM chosen by cuBLASLt
//     for N SMs (the SM count target), so the side chain's blocks keep the rest, and (an
//     experiment) that GEMM enqueued before the side chain (1: every module; 3: modules of 3 or
//     more slices, i.e. qkv, whose GEMM leaves SMs free), and (an experiment) the LoRA chain in
//     line before the GEMM for steps of more than N segments (default 64; 1000000: never), and
//     the few-adapter tuning (steps of <= 4 segments, the model's few-adapter graphs, and at least
//     --lora-few-min-tokens tokens: GemmWithLora's GEMM chosen for --lora-few-gemm-sms SMs, 0: off,
//     beside a shrink on --lora-few-shrink-blocks blocks), and (an experiment) the shrink's item
//     shape (1: 16 rows x one token when segments average under 2 tokens; 2: always).
//   --variants: after the rows above, the decode rows (base and the LoRA scenarios) again for each
//     ';'-separated list of --lora-* flags ("default": the executor's defaults), tagged [v1], ...;
//     each variant drops the model's graphs, which the next steps record with its settings. One
//     process, one model load, for A/B runs on the GPU host.
//   --cpu 1: the CPU executor and no roofline (a smoke test on a toy checkpoint without a GPU).
//     A build without CUDA has only this mode.
//   --profile 1: instead of the rows above, a per-op breakdown of eager decode steps (base and
//     one distinct r16 per request): the model runs on ProfilingOps (bench/profiling_ops.h), which
//     synchronises around every op, and a table per scenario gives each op key's calls, ms and
//     share of the step. --profile 2: the same with GemmWithLora split into its Gemm, LoraShrink
//     and LoraExpand (no shrink/GEMM overlap). JSON: {"profile": [...]}.
//   ADAPTER_DIR holds r16_0..r16_31 (rank 16), mix_0..mix_7 (ranks 8,16,32,64,...) and optionally
//   r64_0..r64_7 (rank 64), as bench/make_bench_checkpoint.py writes them.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/profiling_ops.h"
#include "engine/core/dtype.h"
#include "engine/core/status.h"
#include "engine/model/llama.h"
#include "engine/model/model_spec.h"
#include "engine/ops/ops.h"
#if LORAPLEX_STEP_BENCH_CUDA
#include "engine/ops/cuda/cuda_ops.h"
#endif
#include "lora/adapter.h"
#include "lora/lora_batch.h"
#include "lora/slot_pool.h"
#include "nlohmann/json.hpp"

namespace loraplex::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kContext = 512;        // tokens already in each sequence's cache in decode
constexpr int kBlockSize = 16;
constexpr int kPrefillTokens = 2048;
// Adapters the benchmark reads from ADAPTER_DIR: r16_0, r16_1, ... (as many as the largest batch
// has requests, when there are that many; at least 4) and every mix_0, mix_1, ...
constexpr int kMinR16 = 4;

// How many of dir/prefix0, dir/prefix1, ... exist, counting up from 0.
int CountNumbered(const std::string& dir, const std::string& prefix) {
  int n = 0;
  while (std::filesystem::is_directory(absl::StrCat(dir, "/", prefix, n))) ++n;
  return n;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Result {
  std::string phase;     // decode | prefill | roofline | ranks
  std::string scenario;  // base | one adapter | N distinct | mixed ranks | ...
  int batch = 0;
  int tokens = 0;
  int adapters = 0;
  double ms = 0.0;
  double ratio_to_base = 0.0;  // step time over the base-model step of the same batch
  double gb_per_s = 0.0;       // roofline rows: bytes moved over time
  bool graphs = false;         // decode rows: the step replayed a CUDA graph
};

double TokensPerSecond(const Result& r) {
  return r.phase == "roofline" || r.phase == "ranks" || r.ms <= 0 ? 0.0 : r.tokens / (r.ms * 1e-3);
}

// LoRA kernel settings of the CUDA executor for one run (0 / -1: the executor's defaults).
struct LoraTuning {
  int shrink_blocks = 0;  // SetLoraTuningForTest's cap on the shrink's grid
  int overlap = -1;       // 0/1: the expand as a programmatic dependent of the shrink
  int shrink_warps = 0;   // SetLoraShrinkWarpsForTest
  int shrink_shape = -1;  // SetLoraShrinkShapeForTest (-1: the default)
  int shrink_rows = 0;
  int shrink_balanced = -1;  // SetLoraShrinkShapeForTest's balanced numbering (-1: the default)
  int wide_shrink_grid = -1;  // SetLoraWideShrinkGridForTest (-1: the default)
  int expand_stages = -1;  // SetLoraExpandForTest (-1: the default)
  int expand_blocks = 0;   // SetLoraExpandForTest's cap on the expand's grid (0: none)
  int expand_tokens = 0;   // SetLoraExpandForTest's tokens an item (0: the default)
  int expand_classes = -1;  // SetLoraExpandForTest's rank classes (-1: the default)
  int tc_min_tokens = 0;       // SetLoraTensorCoreMinTokensForTest (0: the default)
  int tc_few_min_tokens = -1;  // SetLoraTensorCoreMinTokensForTest's few-segment steps (-1: the default; 0: never)
  int gemm_sms = 0;       // SetLoraGemmSmsForTest
  int gemm_first = 0;     // SetLoraGemmFirstForTest
  int in_line = -1;       // SetLoraInlineForTest: min segments (-1: the default; 1000000: never)
  int few_gemm_sms = -1;  // SetLoraFewTuningForTest (-1: the defaults; gemm SMs 0: off)
  int few_shrink_blocks = -1;
  int few_min_tokens = -1;
  int skinny_gemm = 2;  // SetSkinnyGemmForTest's mode (0: cuBLASLt always; 1: plain projections only)
  int bf16_delta = 1;   // SetLoraBf16DeltaForTest (0: the F32 delta)
  int module_shrink_blocks[4] = {0, 0, 0, 0};  // SetLoraModuleShrinkBlocksForTest, by slices (0: the rules)
  int skinny_hoist = 1;  // SetSkinnyGemmHoistForTest (hoisted copy addresses: 0 never, 1 Gemm, 2 also beside LoRA)
  int rows_min_tokens = -1;  // SetLoraRowsForTest (-1: the defaults; max tokens 0: off)
  int rows_max_tokens = -1;
  int rows_min_slices = -1;
  int rows_one_slice_min_tokens = -1;
  int rows_skinny = -1;  // SetLoraRowsSkinnyForTest's max tokens (-1: the default; 0: off)
  int gemm_timed = 0;  // SetGemmTimedForTest (load time only)
  int gemm_l2_cold = 1;  // SetGemmTimedL2ColdForTest (load time only)
};

// Sets every LoRA knob of the CUDA executor to `t` (unset fields back to the defaults).
absl::Status ApplyLoraTuning(ops::Ops* ops, const LoraTuning& t) {
#if LORAPLEX_STEP_BENCH_CUDA
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraShrinkWarpsForTest(ops, t.shrink_warps));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraShrinkShapeForTest(ops, t.shrink_shape, t.shrink_rows, t.shrink_balanced));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraWideShrinkGridForTest(ops, t.wide_shrink_grid));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraExpandForTest(ops, t.expand_stages, t.expand_blocks, t.expand_tokens,
                                                                t.expand_classes));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraTensorCoreMinTokensForTest(ops, t.tc_min_tokens, t.tc_few_min_tokens));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraGemmSmsForTest(ops, t.gemm_sms));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraGemmFirstForTest(ops, t.gemm_first));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraInlineForTest(ops, t.in_line));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraFewTuningForTest(ops, t.few_gemm_sms, t.few_shrink_blocks, t.few_min_tokens));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetSkinnyGemmForTest(ops, t.skinny_gemm));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraBf16DeltaForTest(ops, t.bf16_delta != 0));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetSkinnyGemmHoistForTest(ops, t.skinny_hoist));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraRowsForTest(ops, t.rows_min_tokens, t.rows_max_tokens, t.rows_min_slices,
                                                         t.rows_one_slice_min_tokens));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraRowsSkinnyForTest(ops, t.rows_skinny));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetGemmTimedForTest(ops, t.gemm_timed != 0));
  LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetGemmTimedL2ColdForTest(ops, t.gemm_l2_cold != 0));
  for (int s = 1; s <= 3; ++s) {
    LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetLoraModuleShrinkBlocksForTest(ops, s, t.module_shrink_blocks[s]));
  }
  return ops::cuda::SetLoraTuningForTest(ops, t.shrink_blocks, t.overlap != 0, true);
#else
  (void)ops;
  (void)t;
  return absl::UnimplementedError("step_bench was built without CUDA: LoRA tuning needs the CUDA executor");
#endif
}

class Bench {
 public:
  // `profile` 1 or 2: the model runs on ProfilingOps over the executor (2: GemmWithLora split).
  absl::Status Setup(const std::string& model_dir, const std::string& adapter_dir, int max_batch, bool cpu,
                     int profile, const LoraTuning& lora) {
    if (cpu) {
      LORAPLEX_ASSIGN_OR_RETURN(ops_, ops::CreateOps(Device::kCpu));
    } else {
#if LORAPLEX_STEP_BENCH_CUDA
      LORAPLEX_ASSIGN_OR_RETURN(ops_, ops::cuda::CreateCudaOps());
      LORAPLEX_RETURN_IF_ERROR(ApplyLoraTuning(ops_.get(), lora));
      skinny_mode_ = lora.skinny_gemm;
#else
      (void)lora;
      return absl::UnimplementedError("step_bench was built without CUDA: run it with --cpu 1");
#endif
    }
    ops::Ops* model_ops = ops_.get();
    if (profile != 0) {
      profiling_ = std::make_unique<ProfilingOps>(ops_.get(), profile == 2);
      model_ops = profiling_.get();
    }
    LORAPLEX_ASSIGN_OR_RETURN(spec_, model::LoadModelSpec(model_dir));
    const int blocks_per_seq = (kContext + 1 + kBlockSize - 1) / kBlockSize;
    cap_.max_tokens = std::max(kPrefillTokens, max_batch);
    cap_.max_seqs = std::max(max_batch, 1);
    cap_.kv_block_size = kBlockSize;
    cap_.max_blocks_per_seq = std::max(blocks_per_seq, (kPrefillTokens + kBlockSize - 1) / kBlockSize);
    cap_.num_kv_blocks = std::max(max_batch * blocks_per_seq, cap_.max_blocks_per_seq);
    lora::LoraLimits limits;
    limits.max_rank = 64;
    limits.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    num_r16_ = std::min(CountNumbered(adapter_dir, "r16_"), std::max(max_batch, kMinR16));
    num_mixed_ = CountNumbered(adapter_dir, "mix_");
    num_r64_ = CountNumbered(adapter_dir, "r64_");
    if (num_r16_ < kMinR16 || num_mixed_ < 1) {
      return absl::NotFoundError(absl::StrCat(adapter_dir, " needs adapters r16_0..r16_", kMinR16 - 1,
                                              " and mix_0 at least (bench/make_bench_checkpoint.py)"));
    }
    auto t0 = Clock::now();
    for (int i = 0; i < num_r16_ + num_mixed_ + num_r64_; ++i) {
      const std::string name = i < num_r16_               ? absl::StrCat("r16_", i)
                               : i < num_r16_ + num_mixed_ ? absl::StrCat("mix_", i - num_r16_)
                                                          : absl::StrCat("r64_", i - num_r16_ - num_mixed_);
      LORAPLEX_ASSIGN_OR_RETURN(auto adapter, lora::LoadPeftAdapter(name, adapter_dir + "/" + name, spec_, limits,
                                                                    ops_->compute_dtype()));
      adapters_.push_back(std::move(adapter));
    }
    std::printf("loaded %zu adapters in %.1f s\n", adapters_.size(),
                std::chrono::duration<double>(Clock::now() - t0).count());
    LORAPLEX_ASSIGN_OR_RETURN(slots_,
                              lora::SlotPool::Create(ops_.get(), spec_, num_r16_ + num_mixed_ + num_r64_, 64));
    t0 = Clock::now();
    LORAPLEX_ASSIGN_OR_RETURN(model_, model::LlamaModel::Load(model_dir, spec_, model_ops, slots_.get(), cap_));
    std::printf("loaded the model in %.1f s\n", std::chrono::duration<double>(Clock::now() - t0).count());
    std::vector<const lora::LoadedAdapter*> all;
    for (const auto& a : adapters_) all.push_back(a.get());
    LORAPLEX_ASSIGN_OR_RETURN(adapter_slots_, slots_->EnsureResident(all, std::vector<bool>(all.size(), true)));
    return absl::OkStatus();
  }

  // Switches the executor's LoRA knobs and drops the model's graphs, so the next steps record
  // graphs with the new settings (--variants).
  absl::Status Retune(const LoraTuning& t) {
    LORAPLEX_RETURN_IF_ERROR(ops_->Synchronize());  // no replay in flight when its graph is dropped
    LORAPLEX_RETURN_IF_ERROR(ApplyLoraTuning(ops_.get(), t));
    skinny_mode_ = t.skinny_gemm;
    model_->DropGraphs();
    return absl::OkStatus();
  }

  // Decode: `batch` sequences of kContext cached tokens, one new token each. token_adapter[i] is an
  // index into adapters_ or -1. `graphs`: replay the model's graph of the batch's bucket (it must
  // then have run from one: INTERNAL otherwise, so a graph row never silently times eager steps).
  absl::StatusOr<double> DecodeStep(int batch, const std::vector<int>& token_adapter, int steps, bool graphs) {
    const model::StepInput in = DecodeInput(batch, token_adapter);
    model_->set_graphs(graphs);
    const int64_t replays_before = model_->graph_steps();
    LORAPLEX_ASSIGN_OR_RETURN(const double ms, TimeSteps(in, steps));
    const int64_t replays = model_->graph_steps() - replays_before;
    if (graphs && replays == 0) {
      return absl::InternalError(absl::StrCat("decode batch ", batch, ": no step replayed a graph"));
    }
    return ms;
  }

  // Base steps and steps with `token_adapter` of the same batch, alternated one by one after
  // their warm-ups, so that clock or thermal drift between two rows cannot move the ratio: the
  // median of the per-pair ratios, and the adapter steps' median time.
  struct Paired {
    double ms = 0.0;
    double ratio = 0.0;
  };
  absl::StatusOr<Paired> PairedDecode(int batch, const std::vector<int>& token_adapter, int steps, bool graphs) {
    const model::StepInput base = DecodeInput(batch, std::vector<int>(batch, -1));
    const model::StepInput lora = DecodeInput(batch, token_adapter);
    model_->set_graphs(graphs);
    for (int i = 0; i < 2; ++i) {
      LORAPLEX_RETURN_IF_ERROR(model_->ForwardSample(base).status());
      LORAPLEX_RETURN_IF_ERROR(model_->ForwardSample(lora).status());
    }
    std::vector<double> ms, ratios;
    for (int i = 0; i < steps; ++i) {
      const auto t0 = Clock::now();
      LORAPLEX_RETURN_IF_ERROR(model_->ForwardSample(base).status());
      const auto t1 = Clock::now();
      LORAPLEX_RETURN_IF_ERROR(model_->ForwardSample(lora).status());
      const auto t2 = Clock::now();
      const double base_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
      const double lora_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
      ms.push_back(lora_ms);
      ratios.push_back(lora_ms / base_ms);
    }
    return Paired{Median(ms), Median(ratios)};
  }

  // Eager decode steps of DecodeStep's shape on ProfilingOps (Setup with profile != 0): first
  // `steps` unprofiled steps (also the warm-up; their median is `eager_ms`), then `steps`
  // profiled ones.
  struct Profile {
    double eager_ms = 0.0;
    ProfilingOps::Report report;
  };
  absl::StatusOr<Profile> ProfileDecode(int batch, const std::vector<int>& token_adapter, int steps) {
    if (profiling_ == nullptr) return absl::FailedPreconditionError("ProfileDecode: Setup ran without profile");
    const model::StepInput in = DecodeInput(batch, token_adapter);
    model_->set_graphs(false);
    Profile p;
    LORAPLEX_ASSIGN_OR_RETURN(p.eager_ms, TimeSteps(in, steps));
    profiling_->Reset();
    profiling_->set_enabled(true);
    for (int i = 0; i < steps; ++i) {
      profiling_->BeginStep();
      const absl::Status s = model_->ForwardSample(in).status();
      profiling_->EndStep();
      if (!s.ok()) {
        profiling_->set_enabled(false);
        return s;
      }
    }
    profiling_->set_enabled(false);
    p.report = profiling_->GetReport();
    return p;
  }

  // Prefill: one sequence of `tokens` new tokens, all on `adapter` (-1: base).
  absl::StatusOr<double> PrefillStep(int tokens, int adapter, int steps) {
    model::StepInput in;
    in.block_tables.assign(cap_.max_blocks_per_seq, 0);
    for (int b = 0; b < cap_.max_blocks_per_seq; ++b) in.block_tables[b] = b;
    for (int t = 0; t < tokens; ++t) {
      in.token_ids.push_back((t * 7919) % static_cast<int>(spec_.vocab_size));
      in.positions.push_back(t);
      in.token_seq.push_back(0);
      in.slot_mapping.push_back(t);
    }
    in.context_lens.push_back(tokens);
    in.logit_rows.push_back(tokens - 1);
    in.sampling.emplace_back();  // greedy, as the engine samples a request without settings
    SetLora(std::vector<int>(tokens, adapter), &in);
    return TimeSteps(in, steps);
  }

  // The GEMMs of one decode step at M = batch (every layer's qkv, o, gate_up, down and the lm_head)
  // with SetSkinnyGemmForTest mode `skinny_mode` (0: cuBLASLt's alone; the run's mode: as the
  // executor runs them, on the skinny kernel for up to 16 rows where it applies), on weights of the
  // model's shapes that are not the model's own, timed back to back.
  absl::StatusOr<double> GemmOnlyStep(int batch, int skinny_mode) {
#if !LORAPLEX_STEP_BENCH_CUDA
    return absl::UnimplementedError(
        absl::StrCat("GemmOnlyStep(", batch, ", ", skinny_mode, "): step_bench was built without CUDA"));
#else
    const int64_t h = spec_.hidden_size, inter = spec_.intermediate_size;
    struct G { int64_t n, k; };
    const G layer[] = {{spec_.qkv_width(), h}, {h, spec_.q_width()}, {2 * inter, h}, {h, inter}};
    if (gemm_weights_.data() == nullptr) {
      int64_t elems = spec_.vocab_size * h;
      for (const G& g : layer) elems += g.n * g.k * spec_.num_layers;
      LORAPLEX_ASSIGN_OR_RETURN(gemm_weights_, ops_->Allocate(static_cast<size_t>(elems) * 2));
      LORAPLEX_RETURN_IF_ERROR(FillRandom(gemm_weights_));
      LORAPLEX_ASSIGN_OR_RETURN(gemm_x_, ops_->Allocate(static_cast<size_t>(kPrefillTokens) * inter * 2));
      LORAPLEX_RETURN_IF_ERROR(FillRandom(gemm_x_));
      LORAPLEX_ASSIGN_OR_RETURN(gemm_y_, ops_->Allocate(static_cast<size_t>(kPrefillTokens) * spec_.vocab_size * 4));
    }
    auto body = [&](int) -> absl::Status {
      size_t at = 0;
      for (int64_t l = 0; l < spec_.num_layers; ++l) {
        for (const G& g : layer) {
          LORAPLEX_RETURN_IF_ERROR(ops_->Gemm(gemm_x_.View(DType::kBF16, {batch, g.k}),
                                              gemm_weights_.View(DType::kBF16, {g.n, g.k}, at), 0.0f,
                                              gemm_y_.View(DType::kBF16, {batch, g.n})));
          at += static_cast<size_t>(g.n * g.k) * 2;
        }
      }
      return ops_->Gemm(gemm_x_.View(DType::kBF16, {batch, h}), gemm_weights_.View(DType::kBF16, {spec_.vocab_size, h}, at),
                        0.0f, gemm_y_.View(DType::kF32, {batch, spec_.vocab_size}));
    };
    LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetSkinnyGemmForTest(ops_.get(), skinny_mode));
    absl::StatusOr<std::vector<double>> us = ops::cuda::TimeOnStream(ops_.get(), 2, 7, 1, body);
    LORAPLEX_RETURN_IF_ERROR(ops::cuda::SetSkinnyGemmForTest(ops_.get(), skinny_mode_));
    LORAPLEX_RETURN_IF_ERROR(us.status());
    return Median(*us) * 1e-3;
#endif
  }

  // Milliseconds of a device-to-device copy of 2 GiB (4 GiB read + written).
  absl::StatusOr<double> CopyMs() {
#if !LORAPLEX_STEP_BENCH_CUDA
    return absl::UnimplementedError("CopyMs: step_bench was built without CUDA");
#else
    const size_t bytes = size_t{2} << 30;
    LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory a, ops_->Allocate(bytes));
    LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory b, ops_->Allocate(bytes));
    LORAPLEX_RETURN_IF_ERROR(FillRandom(a));
    LORAPLEX_ASSIGN_OR_RETURN(auto us, ops::cuda::TimeOnStream(ops_.get(), 2, 9, 1, [&](int) {
      return ops_->CopyOnDevice(b.data(), a.data(), bytes);
    }));
    return Median(us) * 1e-3;
#endif
  }

  int num_adapters() const { return static_cast<int>(adapters_.size()); }
  int num_r16() const { return num_r16_; }      // adapters_[0, num_r16): rank 16
  int num_mixed() const { return num_mixed_; }  // then these, ranks 8..64
  int num_r64() const { return num_r64_; }      // then these, rank 64
  // Bytes of the distinct adapters a step of `token_adapter` reads (A and B of every module).
  double AdapterBytes(const std::vector<int>& token_adapter) const {
    std::set<int> seen(token_adapter.begin(), token_adapter.end());
    double bytes = 0.0;
    for (int a : seen) {
      if (a >= 0) bytes += static_cast<double>(adapters_[static_cast<size_t>(a)]->weight_bytes);
    }
    return bytes;
  }
  const model::ModelSpec& spec() const { return spec_; }
  int skinny_mode() const { return skinny_mode_; }

 private:
  // `batch` sequences of kContext cached tokens, one new token each, on token_adapter's adapters.
  model::StepInput DecodeInput(int batch, const std::vector<int>& token_adapter) const {
    model::StepInput in;
    const int blocks_per_seq = (kContext + 1 + kBlockSize - 1) / kBlockSize;
    in.block_tables.assign(static_cast<size_t>(batch) * cap_.max_blocks_per_seq, 0);
    for (int s = 0; s < batch; ++s) {
      in.token_ids.push_back((s * 7919) % static_cast<int>(spec_.vocab_size));
      in.positions.push_back(kContext);
      in.token_seq.push_back(s);
      in.context_lens.push_back(kContext + 1);
      for (int b = 0; b < blocks_per_seq; ++b) in.block_tables[s * cap_.max_blocks_per_seq + b] = s * blocks_per_seq + b;
      in.slot_mapping.push_back((s * blocks_per_seq + kContext / kBlockSize) * kBlockSize + kContext % kBlockSize);
      in.logit_rows.push_back(s);
      in.sampling.emplace_back();  // greedy, picked on the device as the engine does
    }
    SetLora(token_adapter, &in);
    return in;
  }

  void SetLora(const std::vector<int>& token_adapter, model::StepInput* in) const {
    std::vector<int32_t> token_slots;
    bool any = false;
    for (int a : token_adapter) {
      token_slots.push_back(a < 0 ? -1 : adapter_slots_[static_cast<size_t>(a)]);
      any |= a >= 0;
    }
    if (any) in->lora = lora::BuildLoraBatch(token_slots);
  }

  absl::StatusOr<double> TimeSteps(const model::StepInput& in, int steps) {
    // ForwardSample, as the engine steps: the tokens are picked on the device.
    for (int i = 0; i < 2; ++i) LORAPLEX_RETURN_IF_ERROR(model_->ForwardSample(in).status());
    std::vector<double> ms;
    for (int i = 0; i < steps; ++i) {
      const auto t0 = Clock::now();
      LORAPLEX_RETURN_IF_ERROR(model_->ForwardSample(in).status());
      ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
    return Median(ms);
  }

  // Random bf16 in [-0.05, 0.05): a 16 MiB random block copied over the buffer.
  absl::Status FillRandom(const ops::DeviceMemory& mem) {
    const size_t block = 16u << 20;
    std::vector<uint16_t> host(block / 2);
    uint32_t state = 12345;
    for (auto& v : host) {
      state = state * 1664525u + 1013904223u;
      v = FloatToBf16((static_cast<float>(state >> 8) / 16777216.0f - 0.5f) * 0.1f);
    }
    LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory seed, ops_->Allocate(block));
    LORAPLEX_RETURN_IF_ERROR(ops_->CopyToDevice(seed.data(), host.data(), block));
    for (size_t at = 0; at < mem.size(); at += block) {
      LORAPLEX_RETURN_IF_ERROR(
          ops_->CopyOnDevice(static_cast<char*>(mem.data()) + at, seed.data(), std::min(block, mem.size() - at)));
    }
    return ops_->Synchronize();
  }

  std::unique_ptr<ops::Ops> ops_;
  int skinny_mode_ = 2;  // the run's SetSkinnyGemmForTest mode (LoraTuning::skinny_gemm)
  std::unique_ptr<ProfilingOps> profiling_;  // between ops_ and the model when profiling
  model::ModelSpec spec_;
  model::ModelCapacity cap_;
  std::vector<std::shared_ptr<const lora::LoadedAdapter>> adapters_;
  int num_r16_ = 0;
  int num_mixed_ = 0;
  int num_r64_ = 0;
  std::unique_ptr<lora::SlotPool> slots_;
  std::unique_ptr<model::LlamaModel> model_;
  std::vector<int32_t> adapter_slots_;
  ops::DeviceMemory gemm_weights_, gemm_x_, gemm_y_;
};

// Prints one scenario's per-op table and returns its JSON.
nlohmann::json PrintProfile(const std::string& scenario, int batch, const Bench::Profile& p) {
  const ProfilingOps::Report& r = p.report;
  const double steps = static_cast<double>(std::max<int64_t>(r.steps, 1));
  const double step_ms = r.step_ms / steps, ops_ms = r.ops_ms / steps;
  std::printf("\n== profile: decode batch %d, %s (%lld profiled steps; unprofiled eager step %.3f ms)\n", batch,
              scenario.c_str(), static_cast<long long>(r.steps), p.eager_ms);
  std::printf("%-36s %9s %10s %8s\n", "op", "calls", "ms/step", "% step");
  nlohmann::json ops = nlohmann::json::array();
  for (const ProfilingOps::OpStat& s : r.ops) {
    const double ms = s.ms / steps;
    std::printf("%-36s %9.1f %10.3f %7.1f%%\n", s.key.c_str(), s.calls / steps, ms,
                step_ms > 0 ? 100.0 * ms / step_ms : 0.0);
    ops.push_back({{"op", s.key}, {"calls_per_step", s.calls / steps}, {"ms_per_step", ms}});
  }
  const double calls = r.op_calls / steps;
  std::printf("%-36s %9.1f %10.3f %7.1f%%\n", "sum of ops", calls, ops_ms, step_ms > 0 ? 100.0 * ops_ms / step_ms : 0.0);
  std::printf("%-36s %9s %10.3f %7.1f%%\n", "host between ops (step - ops)", "", step_ms - ops_ms,
              step_ms > 0 ? 100.0 * (step_ms - ops_ms) / step_ms : 0.0);
  std::printf("%-36s %9s %10.3f\n", "profiled step (wall)", "", step_ms);
  // Each timed op waits for the device before and after, so each carries one launch plus one
  // synchronise of latency that a queued (eager or graph) step hides: subtract ~calls x that.
  std::printf("note: %.0f timed op calls per step; each includes its launch + sync latency (~5-10 us on a GPU),\n"
              "      i.e. ~%.2f ms at 5 us each that an unsynchronised step overlaps.\n",
              calls, calls * 5e-3);
  std::fflush(stdout);
  return {{"scenario", scenario},           {"batch", batch},
          {"steps", r.steps},               {"eager_step_ms", p.eager_ms},
          {"profiled_step_ms", step_ms},    {"ops_ms", ops_ms},
          {"host_ms", step_ms - ops_ms},    {"op_calls_per_step", calls},
          {"ops", ops}};
}

// A decode scenario of one batch: each request's adapter (an index into the bench's adapters).
enum class RankRole { kNone, kUniform16, kUniform64, kMixed };  // the "ranks" comparison's parts
struct DecodeScenario {
  std::string name;
  std::vector<int> adapters;
  int count = 0;  // distinct adapters
  RankRole role = RankRole::kNone;
};

// One r16 adapter for every request; 4 (batch >= 8, batch/4 consecutive requests each); at batch
// 8 and up, when there are enough r64 adapters, as many r16 and as many r64 adapters as the mixed
// scenario has, in its shape (request i on adapter i % count); one per request; the mixed-rank
// adapters in turn. The one-per-request scenario is always second to last.
std::vector<DecodeScenario> DecodeScenarios(const Bench& bench, int b) {
  const int n_distinct = std::min(b, bench.num_r16()), n_mixed = std::min(b, bench.num_mixed());
  std::vector<int> four(b), distinct(b), mixed(b), uniform16(b), uniform64(b);
  for (int i = 0; i < b; ++i) {
    four[i] = i * 4 / b;
    distinct[i] = i % bench.num_r16();
    mixed[i] = bench.num_r16() + i % n_mixed;
    uniform16[i] = i % n_mixed;
    uniform64[i] = bench.num_r16() + bench.num_mixed() + i % n_mixed;
  }
  std::vector<DecodeScenario> out = {{"one adapter r16", std::vector<int>(b, 0), 1}};
  if (b >= 8) out.push_back({"4 adapters r16", four, 4});
  if (b >= 8 && bench.num_r64() >= n_mixed && bench.num_r16() >= n_mixed) {
    out.push_back({absl::StrCat(n_mixed, " adapters r16"), uniform16, n_mixed, RankRole::kUniform16});
    out.push_back({absl::StrCat(n_mixed, " adapters r64"), uniform64, n_mixed, RankRole::kUniform64});
  }
  out.push_back({absl::StrCat(n_distinct, " distinct r16"), distinct, n_distinct});
  out.push_back({absl::StrCat(n_mixed, " mixed ranks"), mixed, n_mixed, RankRole::kMixed});
  return out;
}

// DecodeScenarios' one-adapter-per-request scenario.
const DecodeScenario& OnePerRequest(const std::vector<DecodeScenario>& scenarios) {
  return scenarios[scenarios.size() - 2];
}

// --profile: per batch, the base step and one distinct r16 per request, eager.
absl::Status RunProfile(Bench& bench, const std::vector<int>& batches, int steps, int profile, const char* out_path) {
  nlohmann::json profiles = nlohmann::json::array();
  for (int b : batches) {
    const std::vector<DecodeScenario> scenarios = DecodeScenarios(bench, b);
    const DecodeScenario& distinct = OnePerRequest(scenarios);
    LORAPLEX_ASSIGN_OR_RETURN(const Bench::Profile base, bench.ProfileDecode(b, std::vector<int>(b, -1), steps));
    profiles.push_back(PrintProfile("base", b, base));
    LORAPLEX_ASSIGN_OR_RETURN(const Bench::Profile lora, bench.ProfileDecode(b, distinct.adapters, steps));
    profiles.push_back(PrintProfile(distinct.name + (profile == 2 ? " (split)" : ""), b, lora));
  }
  std::ofstream f(out_path);
  f << nlohmann::json{{"profile", profiles}}.dump(2) << "\n";
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", out_path));
  return absl::OkStatus();
}

// An integer flag value in [lo, hi].
absl::Status ParseFlag(const std::string& flag, const char* text, int lo, int hi, int* value) {
  if (!absl::SimpleAtoi(text, value) || *value < lo || *value > hi) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", text, " (expected ", lo, "..", hi, ")"));
  }
  return absl::OkStatus();
}

// One --lora-* flag into `t`: INVALID_ARGUMENT for an unknown flag or a value out of range.
absl::Status ParseLoraFlag(const std::string& flag, const char* value, LoraTuning* t) {
  if (flag == "--lora-shrink-blocks") return ParseFlag(flag, value, 1, 1 << 20, &t->shrink_blocks);
  if (flag == "--lora-overlap") return ParseFlag(flag, value, 0, 1, &t->overlap);
  if (flag == "--lora-gemm-sms") return ParseFlag(flag, value, 1, 1 << 20, &t->gemm_sms);
  if (flag == "--lora-gemm-first") return ParseFlag(flag, value, 0, 4, &t->gemm_first);
  if (flag == "--lora-inline") return ParseFlag(flag, value, -1, 1 << 20, &t->in_line);
  if (flag == "--lora-shrink-shape") return ParseFlag(flag, value, -1, 2, &t->shrink_shape);
  if (flag == "--lora-shrink-rows") return ParseFlag(flag, value, 0, 16, &t->shrink_rows);
  if (flag == "--lora-shrink-balanced") return ParseFlag(flag, value, -1, 1, &t->shrink_balanced);
  if (flag == "--lora-wide-shrink-grid") return ParseFlag(flag, value, -1, 1, &t->wide_shrink_grid);
  if (flag == "--lora-expand-blocks") return ParseFlag(flag, value, 0, 1 << 20, &t->expand_blocks);
  if (flag == "--lora-expand-tokens") return ParseFlag(flag, value, 0, 64, &t->expand_tokens);
  if (flag == "--lora-expand-classes") return ParseFlag(flag, value, -1, 2, &t->expand_classes);
  if (flag == "--lora-tc-min-tokens") return ParseFlag(flag, value, 0, 1 << 20, &t->tc_min_tokens);
  if (flag == "--lora-tc-few-min-tokens") return ParseFlag(flag, value, -1, 1 << 20, &t->tc_few_min_tokens);
  if (flag == "--lora-expand-stages") {
    LORAPLEX_RETURN_IF_ERROR(ParseFlag(flag, value, -1, 3, &t->expand_stages));
    if (t->expand_stages == 1) return absl::InvalidArgumentError("--lora-expand-stages 1 (expected -1, 0, 2 or 3)");
    return absl::OkStatus();
  }
  if (flag == "--skinny-gemm") return ParseFlag(flag, value, 0, 2, &t->skinny_gemm);
  if (flag == "--lora-bf16-delta") return ParseFlag(flag, value, 0, 1, &t->bf16_delta);
  if (flag == "--lora-shrink-blocks-s1") return ParseFlag(flag, value, 0, 4096, &t->module_shrink_blocks[1]);
  if (flag == "--lora-shrink-blocks-s2") return ParseFlag(flag, value, 0, 4096, &t->module_shrink_blocks[2]);
  if (flag == "--lora-shrink-blocks-s3") return ParseFlag(flag, value, 0, 4096, &t->module_shrink_blocks[3]);
  if (flag == "--skinny-hoist") return ParseFlag(flag, value, 0, 2, &t->skinny_hoist);
  if (flag == "--lora-rows-min-tokens") return ParseFlag(flag, value, -1, 1 << 20, &t->rows_min_tokens);
  if (flag == "--lora-rows-max-tokens") return ParseFlag(flag, value, -1, 1 << 20, &t->rows_max_tokens);
  if (flag == "--lora-rows-min-slices") return ParseFlag(flag, value, -1, 3, &t->rows_min_slices);
  if (flag == "--lora-rows-one-slice-min-tokens") {
    return ParseFlag(flag, value, -1, 1 << 20, &t->rows_one_slice_min_tokens);
  }
  if (flag == "--lora-rows-skinny") return ParseFlag(flag, value, -1, 16, &t->rows_skinny);
  if (flag == "--gemm-timed") return ParseFlag(flag, value, 0, 1, &t->gemm_timed);
  if (flag == "--gemm-l2-cold") return ParseFlag(flag, value, 0, 1, &t->gemm_l2_cold);
  if (flag == "--lora-few-gemm-sms") return ParseFlag(flag, value, 0, 1 << 20, &t->few_gemm_sms);
  if (flag == "--lora-few-shrink-blocks") return ParseFlag(flag, value, 1, 1 << 20, &t->few_shrink_blocks);
  if (flag == "--lora-few-min-tokens") return ParseFlag(flag, value, 0, 1 << 20, &t->few_min_tokens);
  if (flag == "--lora-shrink-warps") {
    LORAPLEX_RETURN_IF_ERROR(ParseFlag(flag, value, 8, 16, &t->shrink_warps));
    if (t->shrink_warps != 8 && t->shrink_warps != 16) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " ", value, " (expected 8 or 16)"));
    }
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown flag ", flag));
}

// One --variants entry: --lora-* flags and values separated by spaces, or "default".
absl::StatusOr<LoraTuning> ParseVariant(absl::string_view spec) {
  if (absl::StripAsciiWhitespace(spec) == "default") return LoraTuning{};
  const std::vector<std::string> words = absl::StrSplit(spec, ' ', absl::SkipWhitespace());
  if (words.size() % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--variants entry '", spec, "': expected flag/value pairs"));
  }
  LoraTuning t;
  for (size_t i = 0; i < words.size(); i += 2) {
    const absl::Status st = ParseLoraFlag(words[i], words[i + 1].c_str(), &t);
    if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("--variants entry '", spec, "': ", st.message()));
  }
  return t;
}

absl::Status Run(int argc, char** argv) {
  if (argc < 4) {
    return absl::InvalidArgumentError("usage: step_bench MODEL_DIR ADAPTER_DIR OUT_JSON [--steps N] [--batches 1,8,...] [--cpu 1] [--graphs 0] [--profile 1|2] [--lora-shrink-blocks N] [--lora-overlap 0|1] [--lora-shrink-warps 8|16] [--lora-gemm-sms N] [--lora-gemm-first 0|1|3] [--lora-inline N] [--lora-shrink-shape 0|1|2] [--lora-shrink-rows 0|4|8|16] [--lora-shrink-balanced -1|0|1] [--lora-wide-shrink-grid -1|0|1] [--lora-expand-stages 0|2|3] [--lora-expand-blocks N] [--lora-expand-tokens N] [--lora-expand-classes -1|0|1|2] [--lora-tc-min-tokens N] [--lora-tc-few-min-tokens N] [--lora-few-gemm-sms N] [--lora-few-shrink-blocks N] [--lora-few-min-tokens N] [--skinny-gemm 0|1|2] [--lora-bf16-delta 0|1] [--skinny-hoist 0|1|2] [--lora-shrink-blocks-s1|-s2|-s3 N] [--lora-rows-min-tokens N] [--lora-rows-max-tokens N] [--lora-rows-min-slices 1|2|3] [--lora-rows-one-slice-min-tokens N] [--lora-rows-skinny N] [--gemm-timed 0|1] [--gemm-l2-cold 0|1] [--variants \"FLAGS;FLAGS...\"]");
  }
  int steps = 20;
  LoraTuning lora;
  std::vector<std::pair<std::string, LoraTuning>> variants;  // --variants
  int cpu = 0;
  int graphs = 1;
  int profile = 0;
  std::vector<int> batches = {1, 8, 32, 64, 128};
  for (int i = 4; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--steps") {
      if (!absl::SimpleAtoi(argv[i + 1], &steps) || steps < 1) return absl::InvalidArgumentError(absl::StrCat("--steps ", argv[i + 1]));
    } else if (flag == "--cpu") {
      if (!absl::SimpleAtoi(argv[i + 1], &cpu)) return absl::InvalidArgumentError(absl::StrCat("--cpu ", argv[i + 1]));
    } else if (flag == "--graphs") {
      if (!absl::SimpleAtoi(argv[i + 1], &graphs)) return absl::InvalidArgumentError(absl::StrCat("--graphs ", argv[i + 1]));
    } else if (flag == "--profile") {
      if (!absl::SimpleAtoi(argv[i + 1], &profile) || profile < 0 || profile > 2) {
        return absl::InvalidArgumentError(absl::StrCat("--profile ", argv[i + 1], " (expected 0, 1 or 2)"));
      }
    } else if (flag.rfind("--lora-", 0) == 0 || flag.rfind("--skinny-", 0) == 0 || flag == "--gemm-timed" ||
               flag == "--gemm-l2-cold") {
      LORAPLEX_RETURN_IF_ERROR(ParseLoraFlag(flag, argv[i + 1], &lora));
    } else if (flag == "--variants") {
      for (absl::string_view spec : absl::StrSplit(argv[i + 1], ';', absl::SkipWhitespace())) {
        LORAPLEX_ASSIGN_OR_RETURN(LoraTuning t, ParseVariant(spec));
        variants.push_back({std::string(absl::StripAsciiWhitespace(spec)), t});
      }
    } else if (flag == "--batches") {
      batches.clear();
      for (absl::string_view b : absl::StrSplit(argv[i + 1], ',')) {
        int v = 0;
        if (!absl::SimpleAtoi(b, &v) || v < 1) return absl::InvalidArgumentError(absl::StrCat("--batches ", argv[i + 1]));
        batches.push_back(v);
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", flag));
    }
  }
  if (!variants.empty() && (cpu != 0 || profile != 0)) {
    return absl::InvalidArgumentError("--variants needs the CUDA executor and no --profile");
  }
  Bench bench;
  LORAPLEX_RETURN_IF_ERROR(
      bench.Setup(argv[1], argv[2], *std::max_element(batches.begin(), batches.end()), cpu != 0, profile,
                  lora));
  if (profile != 0) return RunProfile(bench, batches, steps, profile, argv[3]);

  std::vector<Result> results;
  // Rows are printed as they are measured, so a run cut short still reports what it finished.
  std::printf("\n%-9s %-30s %6s %6s %9s %10s %8s %8s\n", "phase", "scenario", "batch", "tokens", "ms", "tok/s",
              "x base", "GB/s");
  auto add = [&results](const Result& r) {
    std::printf("%-9s %-30s %6d %6d %9.3f %10.0f %8.3f %8.0f\n", r.phase.c_str(), r.scenario.c_str(), r.batch, r.tokens,
                r.ms, TokensPerSecond(r), r.ratio_to_base, r.gb_per_s);
    std::fflush(stdout);
    results.push_back(r);
  };
  if (cpu == 0) {
    LORAPLEX_ASSIGN_OR_RETURN(const double copy_ms, bench.CopyMs());
    add({"roofline", "d2d copy 2 GiB (read+write)", 0, 0, 0, copy_ms, 0, 4.0 * (1 << 30) / copy_ms * 1e-6});
    const model::ModelSpec& sp = bench.spec();
    const double weight_bytes =
        2.0 * (sp.num_layers * (sp.qkv_width() * sp.hidden_size + sp.hidden_size * sp.q_width() +
                                3.0 * sp.intermediate_size * sp.hidden_size) +
               sp.vocab_size * sp.hidden_size);
    for (int b : batches) {
      LORAPLEX_ASSIGN_OR_RETURN(const double gemm_ms, bench.GemmOnlyStep(b, 0));
      add({"roofline", "cuBLASLt GEMMs of one step", b, b, 0, gemm_ms, 0, weight_bytes / gemm_ms * 1e-6});
      if (b <= 16 && bench.skinny_mode() != 0) {  // where the executor runs its own kernel
        LORAPLEX_ASSIGN_OR_RETURN(const double own_ms, bench.GemmOnlyStep(b, bench.skinny_mode()));
        add({"roofline", "the executor's GEMMs of one step", b, b, 0, own_ms, 0, weight_bytes / own_ms * 1e-6});
      }
    }
  }
  // The CPU ops record no graphs: their decode rows are eager whatever is asked.
  const bool use_graphs = graphs != 0 && cpu == 0;
  const std::string mode = use_graphs ? "" : ", eager";
  // The base step and every decode scenario of batch b, rows named with `suffix`; returns the
  // base step's ms and the scenarios.
  struct DecodeRows {
    double base_ms;
    std::vector<DecodeScenario> scenarios;
  };
  auto decode_rows = [&](int b, const std::string& suffix) -> absl::StatusOr<DecodeRows> {
    LORAPLEX_ASSIGN_OR_RETURN(const double base, bench.DecodeStep(b, std::vector<int>(b, -1), steps, use_graphs));
    add({"decode", "base" + suffix, b, b, 0, base, 1.0, 0, use_graphs});
    std::vector<DecodeScenario> scenarios = DecodeScenarios(bench, b);
    double added[4] = {}, bytes[4] = {};  // by RankRole
    bool seen[4] = {};
    for (const DecodeScenario& s : scenarios) {
      LORAPLEX_ASSIGN_OR_RETURN(const double ms, bench.DecodeStep(b, s.adapters, steps, use_graphs));
      // GB/s here: the adapters' bytes over the time LoRA adds to the base step.
      const double added_ms = ms - base;
      const double adapter_bytes = bench.AdapterBytes(s.adapters);
      add({"decode", s.name + suffix, b, b, s.count, ms, ms / base,
           added_ms > 0 ? adapter_bytes / added_ms * 1e-6 : 0.0, use_graphs});
      const int role = static_cast<int>(s.role);
      added[role] = added_ms;
      bytes[role] = adapter_bytes;
      seen[role] = true;
    }
    const int u16 = static_cast<int>(RankRole::kUniform16), u64 = static_cast<int>(RankRole::kUniform64),
              mix = static_cast<int>(RankRole::kMixed);
    if (seen[u16] && seen[u64] && seen[mix] && bytes[u64] > bytes[u16]) {
      // In proportion to the ranks: the uniform batches' added times interpolated at the mixed
      // adapters' bytes (bytes are proportional to the ranks). ms: the mixed batch's added time.
      const double predicted =
          added[u16] + (bytes[mix] - bytes[u16]) / (bytes[u64] - bytes[u16]) * (added[u64] - added[u16]);
      std::printf("ranks: batch %d%s, mixed ranks add %.3f ms; in proportion to the ranks %.3f ms (interpolated "
                  "between %d r16 adapters, %.3f ms, and %d r64, %.3f ms: what padding to rank 64 costs)\n",
                  b, suffix.c_str(), added[mix], predicted, scenarios.back().count, added[u16],
                  scenarios.back().count, added[u64]);
      add({"ranks", "mixed added / in proportion" + suffix, b, b, scenarios.back().count, added[mix],
           predicted > 0 ? added[mix] / predicted : 0.0, 0, use_graphs});
    }
    return DecodeRows{base, std::move(scenarios)};
  };
  for (int b : batches) {
    LORAPLEX_ASSIGN_OR_RETURN(const DecodeRows rows, decode_rows(b, mode));
    const double base = rows.base_ms;
    const std::vector<DecodeScenario>& scenarios = rows.scenarios;
    // One adapter and one per request again, each step paired with a base step (x base: the
    // median per-pair ratio), for targets within the rows' run-to-run drift.
    std::vector<DecodeScenario> paired = {scenarios.front()};
    if (b > 1) paired.push_back(OnePerRequest(scenarios));  // at batch 1 the same as the first
    const std::vector<int>& distinct = OnePerRequest(scenarios).adapters;
    const int n_distinct = OnePerRequest(scenarios).count;
    for (const DecodeScenario& s : paired) {
      LORAPLEX_ASSIGN_OR_RETURN(const Bench::Paired p, bench.PairedDecode(b, s.adapters, steps, use_graphs));
      add({"decode", s.name + mode + ", paired", b, b, s.count, p.ms, p.ratio, 0, use_graphs});
    }
    if (use_graphs) {
      // The same steps without graphs (x base: over the graph base row), to show the launch cost.
      LORAPLEX_ASSIGN_OR_RETURN(const double eager_base, bench.DecodeStep(b, std::vector<int>(b, -1), steps, false));
      add({"decode", "base, eager", b, b, 0, eager_base, eager_base / base, 0, false});
      LORAPLEX_ASSIGN_OR_RETURN(const double eager_lora, bench.DecodeStep(b, distinct, steps, false));
      add({"decode", absl::StrCat(n_distinct, " distinct r16, eager"), b, b, n_distinct, eager_lora,
           eager_lora / base, 0, false});
    }
  }
  LORAPLEX_ASSIGN_OR_RETURN(const double prefill_base, bench.PrefillStep(kPrefillTokens, -1, std::max(3, steps / 4)));
  add({"prefill", "base", 1, kPrefillTokens, 0, prefill_base, 1.0, 0});
  LORAPLEX_ASSIGN_OR_RETURN(const double prefill_lora, bench.PrefillStep(kPrefillTokens, 0, std::max(3, steps / 4)));
  add({"prefill", "one adapter r16", 1, kPrefillTokens, 1, prefill_lora, prefill_lora / prefill_base, 0});

  // --variants: the decode rows again (base, one, four, one per request, mixed) under other LoRA
  // settings, in this process, so an A/B pays for one model load; x base over the variant's own
  // base step.
  for (size_t v = 0; v < variants.size(); ++v) {
    const std::string tag = absl::StrCat(" [v", v + 1, "]");
    std::printf("variant v%zu: %s\n", v + 1, variants[v].first.c_str());
    std::fflush(stdout);
    LORAPLEX_RETURN_IF_ERROR(bench.Retune(variants[v].second));
    for (int b : batches) LORAPLEX_RETURN_IF_ERROR(decode_rows(b, mode + tag).status());
  }

  nlohmann::json out = nlohmann::json::array();
  for (const Result& r : results) {
    out.push_back({{"phase", r.phase}, {"scenario", r.scenario}, {"batch", r.batch}, {"tokens", r.tokens},
                   {"adapters", r.adapters}, {"ms", r.ms}, {"tokens_per_s", TokensPerSecond(r)},
                   {"ratio_to_base", r.ratio_to_base}, {"gb_per_s", r.gb_per_s}, {"graphs", r.graphs}});
  }
  std::ofstream f(argv[3]);
  f << out.dump(2) << "\n";
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", argv[3]));
  return absl::OkStatus();
}

}  // namespace
}  // namespace loraplex::bench

int main(int argc, char** argv) {
  const absl::Status s = loraplex::bench::Run(argc, argv);
  if (!s.ok()) {
    std::fprintf(stderr, "step_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
