#include "tests/parity/parity_harness.h"

#include <cstdlib>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/model/model_spec.h"
#include "lora/lora_batch.h"
#include "nlohmann/json.hpp"

namespace loraplex::parity {
namespace {

constexpr int32_t kBlockSize = 16;
constexpr int32_t kBlocksPerSeq = 4;  // 64 tokens: the longest record is 46, prompt + 16 new < 64
constexpr int32_t kMaxSeqs = 64;      // references.json has 40 records
// Every token of every record in one step asks for its logits, so a step's logit rows (bounded by
// max_seqs) must cover all ~1000 tokens of the 40 records.
constexpr int32_t kMaxTokens = 1280;

template <typename T>
std::vector<T> Vec(const nlohmann::json& j) {
  return j.get<std::vector<T>>();
}

absl::StatusOr<References> ParseReferences(const nlohmann::json& doc) {
  References refs;
  // nlohmann throws on a missing key or a wrong type; the test reports it as the bad field.
  try {
    refs.eos_id = doc.at("eos_id").get<int32_t>();
    refs.max_new_tokens = doc.at("max_new_tokens").get<int32_t>();
    for (const auto& [name, value] : doc.at("adapters").items()) refs.adapters.push_back(name);
    std::sort(refs.adapters.begin(), refs.adapters.end());
    for (const nlohmann::json& r : doc.at("records")) {
      Record rec;
      rec.model = r.at("model").get<std::string>();
      rec.prompt = r.at("prompt").get<std::string>();
      rec.prompt_ids = Vec<int32_t>(r.at("prompt_ids"));
      rec.continuation_ids = Vec<int32_t>(r.at("continuation_ids"));
      rec.target_ids = Vec<int32_t>(r.at("target_ids"));
      rec.target_logprobs = Vec<float>(r.at("target_logprobs"));
      rec.top5_ids = r.at("top5_ids").get<std::vector<std::vector<int32_t>>>();
      rec.top5_logprobs = r.at("top5_logprobs").get<std::vector<std::vector<float>>>();
      rec.greedy_margins = Vec<float>(r.at("greedy_margins"));
      const size_t n = rec.prompt_ids.size() + rec.continuation_ids.size() - 1;
      if (rec.target_ids.size() != n || rec.target_logprobs.size() != n || rec.top5_ids.size() != n ||
          rec.top5_logprobs.size() != n || rec.greedy_margins.size() != rec.continuation_ids.size()) {
        return absl::InvalidArgumentError(absl::StrCat("references.json: record (", rec.model, ", '",
                                                       rec.prompt, "') has inconsistent lengths"));
      }
      refs.records.push_back(std::move(rec));
    }
    const nlohmann::json& tok = doc.at("tokenizer");
    const auto& texts = tok.at("texts");
    for (size_t i = 0; i < texts.size(); ++i) {
      TokenizerGolden g;
      g.text = texts.at(i).get<std::string>();
      g.with_special = Vec<int32_t>(tok.at("with_special").at(i));
      g.without_special = Vec<int32_t>(tok.at("without_special").at(i));
      g.decoded = tok.at("decoded").at(i).get<std::string>();
      refs.tokenizer.push_back(std::move(g));
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("references.json: ", e.what()));
  }
  return refs;
}

// Log-softmax of one row of F32 logits, in double so our side adds no rounding of its own.
std::vector<double> LogSoftmax(const float* logits, int64_t vocab) {
  const double mx = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(logits[i] - mx);
  const double lse = mx + std::log(sum);
  std::vector<double> out(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) out[static_cast<size_t>(i)] = logits[i] - lse;
  return out;
}

}  // namespace

// The source tree is where the build put it unless LORAPLEX_SOURCE_DIR says otherwise (a GPU host
// runs the binaries from a copy of the tree in another folder).
std::string FixtureDir() {
  const char* env = std::getenv("LORAPLEX_SOURCE_DIR");
  return std::string(env != nullptr && *env != '\0' ? env : LORAPLEX_SOURCE_DIR) +
         "/tests/fixtures/trained";
}

std::vector<int32_t> Record::Sequence() const {
  std::vector<int32_t> s = prompt_ids;
  s.insert(s.end(), continuation_ids.begin(), continuation_ids.end());
  return s;
}

absl::StatusOr<References> LoadReferences() {
  const std::string path = FixtureDir() + "/references.json";
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  const nlohmann::json doc = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, " is not valid JSON"));
  return ParseReferences(doc);
}

absl::StatusOr<std::unique_ptr<Runner>> Runner::Create(Device device,
                                                       const std::vector<std::string>& adapter_names) {
  std::unique_ptr<Runner> r(new Runner());
  const std::string model_dir = FixtureDir() + "/model";
  LORAPLEX_ASSIGN_OR_RETURN(r->spec_, model::LoadModelSpec(model_dir));
  LORAPLEX_ASSIGN_OR_RETURN(r->ops_, ops::CreateOps(device));
  const int32_t num_slots = static_cast<int32_t>(adapter_names.size());
  LORAPLEX_ASSIGN_OR_RETURN(r->pool_, lora::SlotPool::Create(r->ops_.get(), r->spec_, num_slots,
                                                             /*max_rank=*/32));
  model::ModelCapacity cap;
  cap.max_tokens = kMaxTokens;
  cap.max_seqs = kMaxTokens;
  cap.kv_block_size = kBlockSize;
  cap.max_blocks_per_seq = kBlocksPerSeq;
  cap.num_kv_blocks = kMaxSeqs * kBlocksPerSeq;
  LORAPLEX_ASSIGN_OR_RETURN(r->model_, model::LlamaModel::Load(model_dir, r->spec_, r->ops_.get(),
                                                               r->pool_.get(), cap));
  lora::LoraLimits limits;
  limits.max_rank = 32;
  limits.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  std::vector<const lora::LoadedAdapter*> ptrs;
  for (const std::string& name : adapter_names) {
    LORAPLEX_ASSIGN_OR_RETURN(auto a, lora::LoadPeftAdapter(name, FixtureDir() + "/adapters/" + name,
                                                            r->spec_, limits, r->ops_->compute_dtype()));
    ptrs.push_back(a.get());
    r->adapters_.push_back(std::move(a));
  }
  LORAPLEX_ASSIGN_OR_RETURN(std::vector<int32_t> slots,
                            r->pool_->EnsureResident(ptrs, std::vector<bool>(ptrs.size(), true)));
  for (size_t i = 0; i < slots.size(); ++i) r->slots_[adapter_names[i]] = slots[i];
  return r;
}

absl::StatusOr<int32_t> Runner::SlotOf(const std::string& model) const {
  if (model == "base") return -1;
  auto it = slots_.find(model);
  if (it == slots_.end()) return absl::NotFoundError(absl::StrCat("no adapter '", model, "' loaded"));
  return it->second;
}

namespace {

// Sequence i owns KV blocks [i * kBlocksPerSeq, (i + 1) * kBlocksPerSeq).
struct StepBuilder {
  model::StepInput in;
  std::vector<int32_t> token_slots;

  void Add(int32_t seq_index, const std::vector<int32_t>& tokens, int32_t first_pos, int32_t count,
           int32_t slot, bool all_logits) {
    const int32_t row = static_cast<int32_t>(in.context_lens.size());
    for (int32_t i = 0; i < count; ++i) {
      const int32_t pos = first_pos + i;
      in.token_ids.push_back(tokens[static_cast<size_t>(pos)]);
      in.positions.push_back(pos);
      in.slot_mapping.push_back((seq_index * kBlocksPerSeq + pos / kBlockSize) * kBlockSize +
                                pos % kBlockSize);
      in.token_seq.push_back(row);
      token_slots.push_back(slot);
      if (all_logits || i == count - 1) in.logit_rows.push_back(static_cast<int32_t>(in.token_ids.size()) - 1);
    }
    in.context_lens.push_back(first_pos + count);
    for (int32_t b = 0; b < kBlocksPerSeq; ++b) in.block_tables.push_back(seq_index * kBlocksPerSeq + b);
  }

  model::StepInput Finish() {
    in.lora = lora::BuildLoraBatch(token_slots);
    return std::move(in);
  }
};

absl::Status CheckFits(const std::vector<SeqSpec>& seqs, size_t extra_tokens) {
  if (seqs.size() > static_cast<size_t>(kMaxSeqs))
    return absl::InvalidArgumentError(absl::StrCat(seqs.size(), " sequences, at most ", kMaxSeqs));
  for (const SeqSpec& s : seqs) {
    if (s.tokens.empty() || s.tokens.size() + extra_tokens > static_cast<size_t>(kBlockSize * kBlocksPerSeq))
      return absl::InvalidArgumentError(absl::StrCat("a sequence of ", s.tokens.size(), " tokens (+",
                                                     extra_tokens, ") does not fit its KV blocks"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::vector<std::vector<double>>>> Runner::TeacherForce(
    const std::vector<SeqSpec>& seqs) {
  LORAPLEX_RETURN_IF_ERROR(CheckFits(seqs, 0));
  StepBuilder b;
  for (size_t i = 0; i < seqs.size(); ++i) {
    LORAPLEX_ASSIGN_OR_RETURN(const int32_t slot, SlotOf(seqs[i].model));
    b.Add(static_cast<int32_t>(i), seqs[i].tokens, 0, static_cast<int32_t>(seqs[i].tokens.size()), slot,
          /*all_logits=*/true);
  }
  LORAPLEX_ASSIGN_OR_RETURN(const std::vector<float> logits, model_->Forward(b.Finish()));  // [T, V] F32
  const int64_t v = spec_.vocab_size;
  std::vector<std::vector<std::vector<double>>> out(seqs.size());
  size_t row = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (size_t t = 0; t < seqs[i].tokens.size(); ++t, ++row)
      out[i].push_back(LogSoftmax(logits.data() + row * v, v));
  }
  return out;
}

absl::StatusOr<std::vector<std::vector<int32_t>>> Runner::Greedy(const std::vector<SeqSpec>& prompts,
                                                                 int32_t eos_id, int32_t max_new_tokens) {
  LORAPLEX_RETURN_IF_ERROR(CheckFits(prompts, static_cast<size_t>(max_new_tokens)));
  std::vector<int32_t> slots;
  for (const SeqSpec& p : prompts) {
    LORAPLEX_ASSIGN_OR_RETURN(const int32_t slot, SlotOf(p.model));
    slots.push_back(slot);
  }
  std::vector<std::vector<int32_t>> tokens, generated(prompts.size());
  for (const SeqSpec& p : prompts) tokens.push_back(p.tokens);
  std::vector<int32_t> computed(prompts.size(), 0);
  std::vector<size_t> active(prompts.size());
  std::iota(active.begin(), active.end(), 0);
  const int64_t v = spec_.vocab_size;
  while (!active.empty()) {
    StepBuilder b;
    for (size_t i : active) {
      const int32_t len = static_cast<int32_t>(tokens[i].size());
      b.Add(static_cast<int32_t>(i), tokens[i], computed[i], len - computed[i], slots[i], false);
      computed[i] = len;
    }
    LORAPLEX_ASSIGN_OR_RETURN(const std::vector<float> logits, model_->Forward(b.Finish()));  // [S, V]
    std::vector<size_t> still;
    for (size_t k = 0; k < active.size(); ++k) {
      const size_t i = active[k];
      const float* row = logits.data() + static_cast<int64_t>(k) * v;
      // The first maximum, as torch.argmax picks it.
      const int32_t next = static_cast<int32_t>(std::max_element(row, row + v) - row);
      generated[i].push_back(next);
      tokens[i].push_back(next);
      if (next != eos_id && static_cast<int32_t>(generated[i].size()) < max_new_tokens) still.push_back(i);
    }
    active = std::move(still);
  }
  return generated;
}

LogprobStats CompareLogprobs(const Record& ref, const std::vector<std::vector<double>>& ours,
                             double decision_margin) {
  LogprobStats st;
  for (size_t t = 0; t < ref.target_ids.size(); ++t) {
    const std::vector<double>& lp = ours[t];
    ++st.positions;
    const double diff = std::abs(lp[static_cast<size_t>(ref.target_ids[t])] - ref.target_logprobs[t]);
    st.max_target_diff = std::max(st.max_target_diff, diff);
    st.sum_target_diff += diff;
    const std::vector<int32_t>& rid = ref.top5_ids[t];
    const std::vector<float>& rlp = ref.top5_logprobs[t];
    for (size_t k = 0; k < rid.size(); ++k)
      st.max_top5_diff = std::max(st.max_top5_diff, std::abs(lp[static_cast<size_t>(rid[k])] - rlp[k]));

    // Our ids ranked by logprob (ties: lower id first, as torch.topk keeps them in practice).
    std::vector<int32_t> order(lp.size());
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + 6, order.end(), [&](int32_t a, int32_t b) {
      return lp[static_cast<size_t>(a)] > lp[static_cast<size_t>(b)] ||
             (lp[static_cast<size_t>(a)] == lp[static_cast<size_t>(b)] && a < b);
    });
    for (size_t k = 0; k < rid.size(); ++k) {
      const double above = k == 0 ? INFINITY : rlp[k - 1] - rlp[k];
      // The reference's 6th logprob is not stored; ours stands in for it.
      const double below = k + 1 < rid.size() ? rlp[k] - rlp[k + 1]
                                              : rlp[k] - lp[static_cast<size_t>(order[rid.size()])];
      if (above <= decision_margin || below <= decision_margin) continue;
      ++st.top5_checked;
      if (order[k] != rid[k]) {
        ++st.top5_mismatches;
        if (st.first_mismatch.empty()) {
          st.first_mismatch = absl::StrCat("(", ref.model, ", '", ref.prompt, "') position ", t, " rank ", k,
                                           ": ours ", order[k], ", reference ", rid[k]);
        }
      }
    }
  }
  return st;
}

GreedyStats CompareGreedy(const Record& ref, const std::vector<int32_t>& ours, double decision_margin) {
  GreedyStats st;
  st.full_match = ours == ref.continuation_ids;
  for (size_t i = 0; i < ref.continuation_ids.size(); ++i) {
    // Below the decision margin our top-2 may legitimately swap; from such a step on the
    // continuations may part ways, so the rest of the record is not compared.
    if (ref.greedy_margins[i] <= decision_margin) {
      st.stopped_early = true;
      break;
    }
    ++st.compared;
    if (i >= ours.size() || ours[i] != ref.continuation_ids[i]) break;
    ++st.agreed;
  }
  return st;
}

}  // namespace loraplex::parity
