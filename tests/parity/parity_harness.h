// Parity harness: runs the trained fixture model (tests/fixtures/trained) with its four PEFT
// adapters on one Ops device and compares teacher-forced log-probabilities and greedy
// continuations with the transformers + PEFT references in references.json. Shared by the CPU
// and CUDA parity tests. A Runner is single-threaded; the comparison functions are pure.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/tensor.h"
#include "engine/model/llama.h"
#include "engine/ops/ops.h"
#include "lora/adapter.h"
#include "lora/slot_pool.h"

namespace loraplex::parity {

// The fixture directory: <source>/tests/fixtures/trained.
std::string FixtureDir();

// One references.json record: a (model, fixed prompt) pair; model is "base" or an adapter name.
struct Record {
  std::string model;
  std::string prompt;
  std::vector<int32_t> prompt_ids;        // with BOS
  std::vector<int32_t> continuation_ids;  // greedy, ends with EOS when it stopped there
  std::vector<int32_t> target_ids;        // [len - 1] the token at t + 1 of prompt + continuation
  std::vector<float> target_logprobs;     // [len - 1]
  std::vector<std::vector<int32_t>> top5_ids;     // [len - 1][5]
  std::vector<std::vector<float>> top5_logprobs;  // [len - 1][5]
  std::vector<float> greedy_margins;      // [continuation] top-1 minus top-2 of each greedy step

  std::vector<int32_t> Sequence() const;  // prompt_ids + continuation_ids
};

struct TokenizerGolden {
  std::string text;
  std::vector<int32_t> with_special;
  std::vector<int32_t> without_special;
  std::string decoded;  // HF decode of without_special, skip_special_tokens=False
};

struct References {
  std::vector<Record> records;
  std::vector<TokenizerGolden> tokenizer;
  std::vector<std::string> adapters;  // adapter names, sorted
  int32_t eos_id = -1;
  int32_t max_new_tokens = 0;
};

// Parses <FixtureDir()>/references.json. NOT_FOUND / INVALID_ARGUMENT naming the bad field.
absl::StatusOr<References> LoadReferences();

// A sequence to run: its tokens and its adapter ("base" for none).
struct SeqSpec {
  std::vector<int32_t> tokens;
  std::string model;
};

// The fixture model and all four adapters resident in a slot pool on one device.
class Runner {
 public:
  // Loads the model converted to ops->compute_dtype() and every adapter of `adapter_names`.
  static absl::StatusOr<std::unique_ptr<Runner>> Create(Device device,
                                                        const std::vector<std::string>& adapter_names);

  // Runs every sequence's tokens in ONE step (prefill of all of them together, adapters mixed
  // through BuildLoraBatch) and returns, per sequence, the log-softmax after each token:
  // [seq][position][vocab], computed in double from the F32 logits.
  absl::StatusOr<std::vector<std::vector<std::vector<double>>>> TeacherForce(
      const std::vector<SeqSpec>& seqs);

  // Greedy decoding of all prompts together: one prefill step, then decode steps of every
  // unfinished sequence until EOS or max_new_tokens. Returns each sequence's new tokens.
  absl::StatusOr<std::vector<std::vector<int32_t>>> Greedy(const std::vector<SeqSpec>& prompts,
                                                           int32_t eos_id, int32_t max_new_tokens);

  int64_t vocab_size() const { return spec_.vocab_size; }

 private:
  Runner() = default;
  absl::StatusOr<int32_t> SlotOf(const std::string& model) const;

  model::ModelSpec spec_;
  std::unique_ptr<ops::Ops> ops_;
  std::unique_ptr<lora::SlotPool> pool_;
  std::unique_ptr<model::LlamaModel> model_;
  std::vector<std::shared_ptr<const lora::LoadedAdapter>> adapters_;
  std::map<std::string, int32_t> slots_;
};

// How our teacher-forced log-probabilities compare with one record's references.
struct LogprobStats {
  double max_target_diff = 0;  // max |ours - ref| of the actual next token's logprob
  double sum_target_diff = 0;  // sum of the same over positions (for the mean)
  double max_top5_diff = 0;    // max |ours - ref| over the reference's top-5 ids
  int64_t positions = 0;
  int64_t top5_checked = 0;    // ranks whose neighbours are more than decision_margin away
  int64_t top5_mismatches = 0;
  std::string first_mismatch;  // describes the first top-5 mismatch, empty if none
};
// `ours`: [len][vocab] log-softmax (the last position, after the last token, is not compared).
// Top-5 ranks are compared where the reference's logprobs around them are more than
// `decision_margin` apart (closer ones may legitimately trade places).
LogprobStats CompareLogprobs(const Record& ref, const std::vector<std::vector<double>>& ours,
                             double decision_margin);

// How our greedy continuation compares with the reference's.
struct GreedyStats {
  int64_t compared = 0;    // steps compared (before the first step whose margin is <= decision_margin)
  int64_t agreed = 0;      // of those, steps where our token equals the reference's
  bool stopped_early = false;  // a low-margin step ended the comparison
  bool full_match = false;     // the whole continuation is identical
};
GreedyStats CompareGreedy(const Record& ref, const std::vector<int32_t>& ours, double decision_margin);

}  // namespace loraplex::parity
