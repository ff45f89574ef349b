// LlamaModel on the CPU ops against a dense reference forward written here: plain loops over the
// same weights, one sequence at a time, no paging, no fused layers.
#include "engine/model/llama.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/core/safetensors.h"
#include "engine/core/status.h"
#include "engine/model/model_spec.h"
#include "engine/ops/cpu/cpu_ops.h"
#include "engine/ops/cpu/sampling.h"
#include "engine/ops/ops.h"
#include "lora/adapter.h"
#include "lora/lora_batch.h"
#include "lora/slot_pool.h"
#include "tests/testing/tiny_model.h"

namespace loraplex::model {
namespace {

using Matrix = std::vector<double>;  // row-major

// scale · B·A of every adapted (layer, projection): [out, in].
using DenseAdapter = std::map<std::pair<int64_t, int>, Matrix>;

class DenseReference {
 public:
  DenseReference(const std::string& dir, const ModelSpec& spec) : spec_(spec) {
    auto weights = WeightSet::Open(dir);
    REQUIRE(weights.ok());
    for (const std::string& name : (*weights)->names()) {
      auto t = (*weights)->ReadAs(name, DType::kF32);
      REQUIRE(t.ok());
      w_[name] = std::vector<float>(t->As<float>(), t->As<float>() + t->shape().NumElements());
    }
  }

  // Logits of every position of `tokens`: [L][V].
  std::vector<std::vector<double>> Logits(const std::vector<int32_t>& tokens,
                                          const DenseAdapter* adapter) const {
    const int64_t len = static_cast<int64_t>(tokens.size()), h = spec_.hidden_size;
    Matrix x(len * h);
    const auto& emb = w_.at("model.embed_tokens.weight");
    for (int64_t t = 0; t < len; ++t)
      for (int64_t i = 0; i < h; ++i) x[t * h + i] = emb[tokens[t] * h + i];
    const std::vector<double> inv_freq = InvFreq();
    for (int64_t l = 0; l < spec_.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Matrix n = Norm(x, len, p + "input_layernorm.weight");
      Matrix q = Linear(n, len, p + "self_attn.q_proj.weight", l, Proj::kQ, adapter);
      Matrix k = Linear(n, len, p + "self_attn.k_proj.weight", l, Proj::kK, adapter);
      Matrix v = Linear(n, len, p + "self_attn.v_proj.weight", l, Proj::kV, adapter);
      Rope(q, len, spec_.num_heads, inv_freq);
      Rope(k, len, spec_.num_kv_heads, inv_freq);
      Matrix attn = Attend(q, k, v, len);
      Matrix o = Linear(attn, len, p + "self_attn.o_proj.weight", l, Proj::kO, adapter);
      for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
      n = Norm(x, len, p + "post_attention_layernorm.weight");
      Matrix g = Linear(n, len, p + "mlp.gate_proj.weight", l, Proj::kGate, adapter);
      Matrix u = Linear(n, len, p + "mlp.up_proj.weight", l, Proj::kUp, adapter);
      for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
      Matrix d = Linear(g, len, p + "mlp.down_proj.weight", l, Proj::kDown, adapter);
      for (size_t i = 0; i < x.size(); ++i) x[i] += d[i];
    }
    Matrix n = Norm(x, len, "model.norm.weight");
    const char* head = spec_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    Matrix logits = Linear(n, len, head, -1, Proj::kQ, nullptr);
    std::vector<std::vector<double>> out;
    for (int64_t t = 0; t < len; ++t) {
      out.emplace_back(logits.begin() + t * spec_.vocab_size,
                       logits.begin() + (t + 1) * spec_.vocab_size);
    }
    return out;
  }

 private:
  // Hugging Face's default and llama3 inverse frequencies, from the spec's numbers.
  std::vector<double> InvFreq() const {
    const RopeSpec& r = spec_.rope;
    std::vector<double> f;
    for (int64_t i = 0; i < spec_.head_dim; i += 2) {
      double inv = 1.0 / std::pow(r.theta, static_cast<double>(i) / spec_.head_dim);
      if (r.rope_type == "llama3") {
        const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
        const double wavelen = 2 * M_PI / inv;
        if (wavelen > old_ctx / r.low_freq_factor) {
          inv /= r.factor;
        } else if (!(wavelen < old_ctx / r.high_freq_factor)) {
          const double smooth =
              (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
          inv = (1 - smooth) * inv / r.factor + smooth * inv;
        }
      }
      f.push_back(inv);
    }
    return f;
  }

  Matrix Norm(const Matrix& x, int64_t len, const std::string& name) const {
    const auto& w = w_.at(name);
    const int64_t h = spec_.hidden_size;
    Matrix out(x.size());
    for (int64_t t = 0; t < len; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < h; ++i) ss += x[t * h + i] * x[t * h + i];
      const double inv = 1.0 / std::sqrt(ss / h + spec_.rms_norm_eps);
      for (int64_t i = 0; i < h; ++i) out[t * h + i] = x[t * h + i] * inv * w[i];
    }
    return out;
  }

  // x [len, in] · (W + delta)ᵀ -> [len, out].
  Matrix Linear(const Matrix& x, int64_t len, const std::string& name, int64_t layer, Proj proj,
                const DenseAdapter* adapter) const {
    const auto& w = w_.at(name);
    const int64_t in = static_cast<int64_t>(x.size()) / len,
                  out = static_cast<int64_t>(w.size()) / in;
    const Matrix* delta = nullptr;
    if (adapter != nullptr) {
      auto it = adapter->find({layer, static_cast<int>(proj)});
      if (it != adapter->end()) delta = &it->second;
    }
    Matrix y(len * out);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double acc = 0;
        for (int64_t i = 0; i < in; ++i) {
          acc += x[t * in + i] * (w[o * in + i] + (delta != nullptr ? (*delta)[o * in + i] : 0.0));
        }
        y[t * out + o] = acc;
      }
    return y;
  }

  // HF rotate-half with cos/sin of cat(freqs, freqs) at positions 0..len-1.
  void Rope(Matrix& x, int64_t len, int64_t heads, const std::vector<double>& inv_freq) const {
    const int64_t d = spec_.head_dim, half = d / 2;
    for (int64_t t = 0; t < len; ++t)
      for (int64_t hd = 0; hd < heads; ++hd) {
        double* v = &x[(t * heads + hd) * d];
        const Matrix orig(v, v + d);
        for (int64_t i = 0; i < d; ++i) {
          const double angle =
              static_cast<double>(static_cast<float>(t) * static_cast<float>(inv_freq[i % half]));
          const double rot = i < half ? -orig[i + half] : orig[i - half];
          v[i] = orig[i] * std::cos(angle) + rot * std::sin(angle);
        }
      }
  }

  Matrix Attend(const Matrix& q, const Matrix& k, const Matrix& v, int64_t len) const {
    const int64_t hq = spec_.num_heads, hkv = spec_.num_kv_heads, d = spec_.head_dim;
    Matrix out(len * hq * d);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t hd = 0; hd < hq; ++hd) {
        const int64_t kvh = hd / (hq / hkv);
        std::vector<double> s(t + 1);
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t i = 0; i < d; ++i)
            dot += q[(t * hq + hd) * d + i] * k[(j * hkv + kvh) * d + i];
          s[j] = dot / std::sqrt(static_cast<double>(d));
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double z = 0;
        for (double& e : s) z += (e = std::exp(e - mx));
        for (int64_t i = 0; i < d; ++i) {
          double acc = 0;
          for (int64_t j = 0; j <= t; ++j) acc += s[j] / z * v[(j * hkv + kvh) * d + i];
          out[(t * hq + hd) * d + i] = acc;
        }
      }
    return out;
  }

  ModelSpec spec_;
  std::map<std::string, std::vector<float>> w_;
};

// A sequence being served: its tokens and the (deliberately scattered) KV blocks it owns.
struct Sequence {
  std::vector<int32_t> tokens;
  std::vector<int32_t> blocks;
  int32_t cached = 0;  // tokens already in the KV cache
  int32_t slot = -1;   // adapter slot, -1: base model
};

struct Chunk {
  int seq;
  int32_t count;  // new tokens of that sequence in this step
};

constexpr ModelCapacity kCapacity{/*max_tokens=*/32, /*max_seqs=*/16, /*num_kv_blocks=*/16,
                                  /*kv_block_size=*/4, /*max_blocks_per_seq=*/4};

// Builds the step for `chunks` (every row's logits requested) and advances the sequences.
StepInput MakeStep(std::vector<Sequence>& seqs, const std::vector<Chunk>& chunks) {
  StepInput in;
  std::vector<int32_t> token_slots;
  for (size_t row = 0; row < chunks.size(); ++row) {
    Sequence& s = seqs[static_cast<size_t>(chunks[row].seq)];
    for (int32_t i = 0; i < chunks[row].count; ++i) {
      const int32_t pos = s.cached + i;
      in.logit_rows.push_back(static_cast<int32_t>(in.token_ids.size()));
      in.token_ids.push_back(s.tokens[static_cast<size_t>(pos)]);
      in.positions.push_back(pos);
      in.slot_mapping.push_back(s.blocks[static_cast<size_t>(pos / kCapacity.kv_block_size)] *
                                    kCapacity.kv_block_size +
                                pos % kCapacity.kv_block_size);
      in.token_seq.push_back(static_cast<int32_t>(row));
      token_slots.push_back(s.slot);
    }
    s.cached += chunks[row].count;
    in.context_lens.push_back(s.cached);
    for (int32_t b = 0; b < kCapacity.max_blocks_per_seq; ++b) {
      in.block_tables.push_back(
          b < static_cast<int32_t>(s.blocks.size()) ? s.blocks[static_cast<size_t>(b)] : 0);
    }
  }
  if (std::any_of(token_slots.begin(), token_slots.end(), [](int32_t s) { return s >= 0; })) {
    in.lora = lora::BuildLoraBatch(token_slots);
  }
  return in;
}

std::vector<int32_t> RandomTokens(int n, int64_t vocab, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(gen() % static_cast<uint32_t>(vocab));
  return t;
}

// The logits are O(1..10); both sides are exact up to fp32 storage of activations between ops
// (~1e-7 relative per op over a few dozen ops), so 1e-4 absolute leaves room only for rounding.
constexpr double kLogitTol = 1e-4;

void CheckStep(const std::vector<float>& logits, const StepInput& in,
               const std::vector<Chunk>& chunks,
               const std::vector<std::vector<std::vector<double>>>& dense, int64_t vocab) {
  REQUIRE(logits.size() == in.logit_rows.size() * static_cast<size_t>(vocab));
  for (size_t r = 0; r < in.logit_rows.size(); ++r) {
    const int32_t row = in.logit_rows[r];
    const int seq = chunks[static_cast<size_t>(in.token_seq[static_cast<size_t>(row)])].seq;
    const int32_t pos = in.positions[static_cast<size_t>(row)];
    for (int64_t v = 0; v < vocab; ++v) {
      INFO("sequence " << seq << " position " << pos << " token " << v);
      REQUIRE(
          logits[r * vocab + v] ==
          Approx(dense[static_cast<size_t>(seq)][static_cast<size_t>(pos)][v]).margin(kLogitTol));
    }
  }
}

// Two steps over three sequences: step 1 prefills B (first chunk) and C; step 2 mixes B's second
// chunk, A's whole prefill and C's first decode token. Every row's logits must match the dense
// forward of its sequence at its position.
void ExpectBatchedStepsMatchDense(const testing::TinyModelOptions& options,
                                  const std::vector<int32_t>& adapter_slots = {},
                                  const lora::SlotPool* pool = nullptr,
                                  const std::vector<const DenseAdapter*>& dense_adapters = {},
                                  ops::Ops* ops_in = nullptr, const std::string& dir_in = "") {
  std::unique_ptr<ops::Ops> own_ops;
  ops::Ops* ops = ops_in;
  if (ops == nullptr) {
    auto created = ops::CreateOps(Device::kCpu);
    REQUIRE(created.ok());
    own_ops = std::move(created).value();
    ops = own_ops.get();
  }
  std::string dir = dir_in;
  if (dir.empty()) {
    dir = testing::MakeTempDir("llama");
    REQUIRE(testing::WriteTinyModel(dir, options).ok());
  }
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  auto model = LlamaModel::Load(dir, *spec, ops, pool, kCapacity);
  INFO(model.status().message());
  REQUIRE(model.ok());

  std::vector<Sequence> seqs(3);
  seqs[0] = {RandomTokens(6, spec->vocab_size, 1), {9, 2}, 0, -1};
  seqs[1] = {RandomTokens(9, spec->vocab_size, 2), {5, 14, 0}, 0, -1};
  seqs[2] = {RandomTokens(8, spec->vocab_size, 3), {7, 11}, 0, -1};
  for (size_t i = 0; i < adapter_slots.size(); ++i) seqs[i].slot = adapter_slots[i];

  const DenseReference ref(dir, *spec);
  std::vector<std::vector<std::vector<double>>> dense;
  for (size_t i = 0; i < seqs.size(); ++i) {
    dense.push_back(
        ref.Logits(seqs[i].tokens, i < dense_adapters.size() ? dense_adapters[i] : nullptr));
  }

  const std::vector<Chunk> step1 = {{1, 5}, {2, 7}};
  const StepInput in1 = MakeStep(seqs, step1);
  auto logits1 = (*model)->Forward(in1);
  INFO(logits1.status().message());
  REQUIRE(logits1.ok());
  CheckStep(*logits1, in1, step1, dense, spec->vocab_size);

  const std::vector<Chunk> step2 = {{1, 4}, {0, 6}, {2, 1}};
  const StepInput in2 = MakeStep(seqs, step2);
  auto logits2 = (*model)->Forward(in2);
  INFO(logits2.status().message());
  REQUIRE(logits2.ok());
  CheckStep(*logits2, in2, step2, dense, spec->vocab_size);
}

TEST_CASE("A batched step mixing prefill, chunked prefill and decode matches the dense forward") {
  ExpectBatchedStepsMatchDense(testing::TinyModelOptions{});
}

TEST_CASE("Tied embeddings use embed_tokens as the lm_head") {
  testing::TinyModelOptions options;
  options.tie_word_embeddings = true;
  ExpectBatchedStepsMatchDense(options);
}

TEST_CASE("A llama3 rope-scaled model matches the dense forward with Hugging Face's frequencies") {
  testing::TinyModelOptions options;
  options.llama3_rope = true;
  ExpectBatchedStepsMatchDense(options);
}

TEST_CASE("Sharded weights with an index load and match the dense forward") {
  testing::TinyModelOptions options;
  options.sharded = true;
  ExpectBatchedStepsMatchDense(options);
}

TEST_CASE("Decode steps on the CPU ops run eagerly, graphs requested or not, and match the dense forward") {
  const std::string dir = testing::MakeTempDir("llama-decode");
  REQUIRE(testing::WriteTinyModel(dir, testing::TinyModelOptions{}).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  auto ops = ops::CreateOps(Device::kCpu);
  REQUIRE(ops.ok());
  REQUIRE(kCapacity.graphs);  // the default: the model asks the ops for graphs, the CPU has none
  auto model = LlamaModel::Load(dir, *spec, ops->get(), nullptr, kCapacity);
  REQUIRE(model.ok());
  std::vector<Sequence> seqs(3);
  seqs[0] = {RandomTokens(10, spec->vocab_size, 4), {1, 3, 5}, 0, -1};
  seqs[1] = {RandomTokens(10, spec->vocab_size, 5), {8, 0, 12}, 0, -1};
  seqs[2] = {RandomTokens(10, spec->vocab_size, 6), {15, 4, 6}, 0, -1};
  const DenseReference ref(dir, *spec);
  std::vector<std::vector<std::vector<double>>> dense;
  for (const Sequence& s : seqs) dense.push_back(ref.Logits(s.tokens, nullptr));

  // Prefill (every row's logits: 15 of the 16 rows capacity allows), then decode steps of 3
  // sequences (a graph would pad them to 4), then of 1.
  const std::vector<std::vector<Chunk>> steps = {
      {{0, 5}, {1, 5}, {2, 5}}, {{0, 1}, {1, 1}, {2, 1}}, {{2, 1}, {0, 1}, {1, 1}}, {{1, 1}}};
  for (const auto& chunks : steps) {
    const StepInput in = MakeStep(seqs, chunks);
    auto logits = (*model)->Forward(in);
    INFO(logits.status().message());
    REQUIRE(logits.ok());
    CheckStep(*logits, in, chunks, dense, spec->vocab_size);
  }
  CHECK((*model)->graph_steps() == 0);
  CHECK((*model)->num_graphs() == 0);
}

TEST_CASE("ForwardSample picks each row's token from that row's logits with that row's settings") {
  const std::string dir = testing::MakeTempDir("llama-sample");
  REQUIRE(testing::WriteTinyModel(dir, testing::TinyModelOptions{}).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  auto ops = ops::CreateOps(Device::kCpu);
  REQUIRE(ops.ok());
  auto model = LlamaModel::Load(dir, *spec, ops->get(), nullptr, kCapacity);
  REQUIRE(model.ok());
  std::vector<Sequence> seqs(3);
  seqs[0] = {RandomTokens(10, spec->vocab_size, 4), {3}, 0, -1};
  seqs[1] = {RandomTokens(10, spec->vocab_size, 5), {5}, 0, -1};
  seqs[2] = {RandomTokens(10, spec->vocab_size, 6), {4}, 0, -1};
  StepInput in = MakeStep(seqs, {{0, 1}, {1, 1}, {2, 1}});
  REQUIRE(in.logit_rows.size() == 3);
  in.sampling.resize(3);
  in.sampling[0].top_n = 3;  // greedy with top log-probabilities
  in.sampling[1].temperature = 1.0f;
  in.sampling[1].top_k = 5;
  in.sampling[1].seed = 99;
  in.sampling[1].step = 4;
  in.sampling[2].temperature = 0.7f;
  in.sampling[2].top_p = 0.8f;
  in.sampling[2].seed = 7;

  // The rows' logits, from a plain Forward of the same step (the KV cache is rewritten alike).
  auto logits = (*model)->Forward(in);
  REQUIRE(logits.ok());
  auto picks = (*model)->ForwardSample(in);
  INFO(picks.status().message());
  REQUIRE(picks.ok());
  REQUIRE(picks->size() == 3);
  const int64_t v = spec->vocab_size;
  for (size_t i = 0; i < 3; ++i) {
    const ops::SampledToken want = ops::cpu::SampleRow(logits->data() + i * v, v, in.sampling[i]);
    CHECK((*picks)[i].token == want.token);
    CHECK((*picks)[i].logprob == want.logprob);
  }
  for (int j = 0; j < 3; ++j) CHECK((*picks)[0].top_ids[j] == ops::cpu::SampleRow(logits->data(), v, in.sampling[0]).top_ids[j]);
  // Greedy is the argmax.
  CHECK((*picks)[0].token == std::max_element(logits->begin(), logits->begin() + v) - logits->begin());

  SECTION("one sampling row per logit row is required") {
    StepInput bad = in;
    bad.sampling.pop_back();
    const absl::Status st = (*model)->ForwardSample(bad).status();
    CHECK(st.code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(st.message()).find("sampling has 2 rows") != std::string::npos);
  }
  SECTION("a bad row is named") {
    StepInput bad = in;
    bad.sampling[2].top_p = 0.0f;
    const absl::Status st = (*model)->ForwardSample(bad).status();
    CHECK(st.code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(st.message()).find("sampling[2]") != std::string::npos);
  }
}

TEST_CASE("BF16 weights are converted to the compute dtype at load") {
  testing::TinyModelOptions options;
  options.dtype = DType::kBF16;
  options.kv_heads = 4;  // also plain multi-head attention (no GQA)
  ExpectBatchedStepsMatchDense(options);
}

absl::Status LoadStatus(const testing::TinyModelOptions& options) {
  const std::string dir = testing::MakeTempDir("llama-bad");
  REQUIRE(testing::WriteTinyModel(dir, options).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  auto ops = ops::CreateOps(Device::kCpu);
  REQUIRE(ops.ok());
  return LlamaModel::Load(dir, *spec, ops->get(), nullptr, kCapacity).status();
}

TEST_CASE("Load names a missing tensor") {
  testing::TinyModelOptions options;
  options.omit_tensors = {"model.layers.1.mlp.down_proj.weight"};
  const absl::Status status = LoadStatus(options);
  CHECK(status.code() == absl::StatusCode::kNotFound);
  CHECK(std::string(status.message()).find("model.layers.1.mlp.down_proj.weight") !=
        std::string::npos);
}

TEST_CASE("Load names a tensor of the wrong shape, its file and both shapes") {
  testing::TinyModelOptions options;
  options.sharded = true;
  options.override_shapes = {{"model.layers.1.mlp.down_proj.weight", {32, 128}}};
  const absl::Status status = LoadStatus(options);
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  const std::string msg(status.message());
  INFO(msg);
  CHECK(msg.find("model.layers.1.mlp.down_proj.weight has shape [32,128], expected [32,64]") !=
        std::string::npos);
  CHECK(msg.find("model-0000") != std::string::npos);
}

TEST_CASE("Load refuses a tied model's missing lm_head only when embeddings are untied") {
  testing::TinyModelOptions options;
  options.omit_tensors = {"lm_head.weight"};
  const absl::Status status = LoadStatus(options);
  CHECK(status.code() == absl::StatusCode::kNotFound);
  CHECK(std::string(status.message()).find("lm_head.weight") != std::string::npos);
}

TEST_CASE("Forward refuses steps beyond its capacity or with inconsistent arrays") {
  const std::string dir = testing::MakeTempDir("llama-cap");
  REQUIRE(testing::WriteTinyModel(dir, testing::TinyModelOptions{}).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  auto ops = ops::CreateOps(Device::kCpu);
  REQUIRE(ops.ok());
  auto model = LlamaModel::Load(dir, *spec, ops->get(), nullptr, kCapacity);
  REQUIRE(model.ok());
  std::vector<Sequence> seqs = {{RandomTokens(8, spec->vocab_size, 4), {1, 2}, 0, -1}};
  StepInput good = MakeStep(seqs, {{0, 3}});
  SECTION("too many tokens") {
    StepInput in = good;
    in.token_ids.assign(kCapacity.max_tokens + 1, 0);
    CHECK((*model)->Forward(in).status().code() == absl::StatusCode::kInvalidArgument);
  }
  SECTION("a position outside its sequence's context") {
    StepInput in = good;
    in.positions[2] = 7;
    CHECK((*model)->Forward(in).status().code() == absl::StatusCode::kInvalidArgument);
  }
  SECTION("a token id outside the vocabulary") {
    StepInput in = good;
    in.token_ids[0] = static_cast<int32_t>(spec->vocab_size);
    CHECK((*model)->Forward(in).status().code() == absl::StatusCode::kInvalidArgument);
  }
  SECTION("LoRA segments without a slot pool") {
    StepInput in = good;
    in.lora = lora::BuildLoraBatch({0, 0, 0});
    CHECK((*model)->Forward(in).status().code() == absl::StatusCode::kInvalidArgument);
  }
  SECTION("the unchanged step runs") { CHECK((*model)->Forward(good).ok()); }
  SECTION("a step of prefill chunks only returns no logits") {
    StepInput in = good;
    in.logit_rows.clear();
    auto logits = (*model)->Forward(in);
    REQUIRE(logits.ok());
    CHECK(logits->empty());
  }
}

// scale · B·A for every module of an adapter file (no rank/alpha patterns).
DenseAdapter ReadDenseAdapter(const std::string& dir, const ModelSpec& spec, double scale) {
  auto file = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  REQUIRE(file.ok());
  DenseAdapter out;
  for (int64_t l = 0; l < spec.num_layers; ++l)
    for (int p = 0; p < kNumProj; ++p) {
      const auto proj = static_cast<Proj>(p);
      const std::string base = "base_model.model.model.layers." + std::to_string(l) +
                               (proj <= Proj::kO ? ".self_attn." : ".mlp.") + ProjName(proj);
      auto a = (*file)->ReadAs(base + ".lora_A.weight", DType::kF32);
      auto b = (*file)->ReadAs(base + ".lora_B.weight", DType::kF32);
      if (!a.ok() || !b.ok()) continue;
      const int64_t r = a->shape()[0], in = a->shape()[1], o = b->shape()[0];
      Matrix delta(o * in);
      for (int64_t i = 0; i < o; ++i)
        for (int64_t j = 0; j < in; ++j) {
          double acc = 0;
          for (int64_t k = 0; k < r; ++k)
            acc += static_cast<double>(b->As<float>()[i * r + k]) * a->As<float>()[k * in + j];
          delta[i * in + j] = scale * acc;
        }
      out[{l, p}] = std::move(delta);
    }
  return out;
}

// Adapter x (rank x_rank, every module) in slot 0 and y (rank y_rank, attention only, rsLoRA)
// in slot 1: sequence A uses y, B the base model, C uses x, in one step.
void ExpectTwoAdaptersMatchDense(const std::string& name, int x_rank, int y_rank) {
  testing::TinyModelOptions options;
  const std::string dir = testing::MakeTempDir(name);
  REQUIRE(testing::WriteTinyModel(dir, options).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  auto ops = ops::CreateOps(Device::kCpu);
  REQUIRE(ops.ok());

  testing::TinyAdapterOptions xo;
  xo.r = x_rank;
  xo.alpha = 8;
  testing::TinyAdapterOptions yo;
  yo.r = y_rank;
  yo.alpha = 4;
  yo.use_rslora = true;
  yo.seed = 11;
  yo.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  const std::string xdir = dir + "/x", ydir = dir + "/y";
  REQUIRE(testing::WriteTinyAdapter(xdir, *spec, xo).ok());
  REQUIRE(testing::WriteTinyAdapter(ydir, *spec, yo).ok());
  lora::LoraLimits limits;
  limits.target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                           "gate_proj", "up_proj", "down_proj"};
  limits.max_rank = std::max(x_rank, y_rank);
  auto x = lora::LoadPeftAdapter("x", xdir, *spec, limits, DType::kF32);
  INFO(x.status().message());
  REQUIRE(x.ok());
  auto y = lora::LoadPeftAdapter("y", ydir, *spec, limits, DType::kF32);
  REQUIRE(y.ok());
  auto pool = lora::SlotPool::Create(ops->get(), *spec, /*num_slots=*/3, std::max(x_rank, y_rank));
  REQUIRE(pool.ok());
  auto slots = (*pool)->EnsureResident({x->get(), y->get()}, {false, false});
  REQUIRE(slots.ok());

  const DenseAdapter dx = ReadDenseAdapter(xdir, *spec, 8.0 / x_rank);
  const DenseAdapter dy = ReadDenseAdapter(ydir, *spec, 4.0 / std::sqrt(static_cast<double>(y_rank)));
  ExpectBatchedStepsMatchDense(options, {(*slots)[1], -1, (*slots)[0]}, pool->get(),
                               {&dy, nullptr, &dx}, ops->get(), dir);
}

TEST_CASE(
    "Sequences with different adapters in one step each match the dense forward of their merged "
    "weights") {
  ExpectTwoAdaptersMatchDense("llama-lora", 4, 8);
}

TEST_CASE("Segments the model orders by rank class (x rank 24 in slot 0, y rank 8 in slot 1) still match the dense forward") {
  // ops::LoraSegments::class_ends: the model uploads y's segment (class 0) before x's (class 1).
  ExpectTwoAdaptersMatchDense("llama-lora-classes", 24, 8);
}

// The CPU ops with graphs the way the CUDA ops have them: Capture records each op with its
// arguments as they are at capture (by value, as a kernel launch keeps them) and runs nothing;
// Replay runs the recorded ops again, reading whatever the device memory holds then.
class RecordingCpuOps final : public ops::Ops {
 public:
  RecordingCpuOps() : cpu_(ops::CreateCpuOps()) {}
  int captures() const { return captures_; }

  Device device() const override { return cpu_->device(); }
  DType compute_dtype() const override { return cpu_->compute_dtype(); }
  absl::StatusOr<ops::DeviceMemory> Allocate(size_t bytes) override {
    if (recording_ != nullptr) return absl::FailedPreconditionError("Allocate during a capture");
    allocated_.push_back(bytes);
    return cpu_->Allocate(bytes);
  }
  const std::vector<size_t>& allocated() const { return allocated_; }
  void clear_allocated() { allocated_.clear(); }
  void Free(void* ptr) override { cpu_->Free(ptr); }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (recording_ != nullptr) return absl::FailedPreconditionError("CopyToDevice during a capture");
    return cpu_->CopyToDevice(dst, src, bytes);
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (recording_ != nullptr) return absl::FailedPreconditionError("CopyToHost during a capture");
    return cpu_->CopyToHost(dst, src, bytes);
  }
  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) override {
    return Run([=, this] { return cpu_->CopyOnDevice(dst, src, bytes); });
  }
  absl::Status Memset(void* dst, int value, size_t bytes) override {
    return Run([=, this] { return cpu_->Memset(dst, value, bytes); });
  }
  absl::Status Synchronize() override {
    if (recording_ != nullptr) return absl::FailedPreconditionError("Synchronize during a capture");
    return cpu_->Synchronize();
  }
  absl::Status Embed(const TensorView& ids, const TensorView& table, const TensorView& out) override {
    return Run([=, this] { return cpu_->Embed(ids, table, out); });
  }
  absl::Status RmsNorm(const TensorView& x, const TensorView& w, float eps, const TensorView& out) override {
    return Run([=, this] { return cpu_->RmsNorm(x, w, eps, out); });
  }
  absl::Status AddRmsNorm(const TensorView& x, const TensorView& residual, const TensorView& w, float eps,
                          const TensorView& out) override {
    return Run([=, this] { return cpu_->AddRmsNorm(x, residual, w, eps, out); });
  }
  absl::Status Gemm(const TensorView& x, const TensorView& w, float beta, const TensorView& y) override {
    return Run([=, this] { return cpu_->Gemm(x, w, beta, y); });
  }
  // Runs nothing on the device, so it is never recorded; the calls are kept for the test.
  absl::Status PrepareGemm(const TensorView& x, const TensorView& w, const TensorView& y) override {
    if (recording_ != nullptr) return absl::FailedPreconditionError("PrepareGemm during a capture");
    prepared_.push_back({x, w, y});
    return cpu_->PrepareGemm(x, w, y);
  }
  struct Prepared {
    TensorView x, w, y;
  };
  const std::vector<Prepared>& prepared() const { return prepared_; }
  absl::Status RopeAndCacheKv(const TensorView& qkv, const TensorView& inv_freq, int hq, int hkv, int d,
                              const ops::AttentionMeta& meta, const ops::KvCacheView& cache) override {
    return Run([=, this] { return cpu_->RopeAndCacheKv(qkv, inv_freq, hq, hkv, d, meta, cache); });
  }
  absl::Status Attention(const TensorView& qkv, int hq, int hkv, int d, float scale,
                         const ops::AttentionMeta& meta, const ops::KvCacheView& cache,
                         const TensorView& out) override {
    return Run([=, this] { return cpu_->Attention(qkv, hq, hkv, d, scale, meta, cache, out); });
  }
  absl::Status SiluMul(const TensorView& gate_up, const TensorView& out) override {
    return Run([=, this] { return cpu_->SiluMul(gate_up, out); });
  }
  absl::Status GatherRows(const TensorView& x, const TensorView& rows, const TensorView& out) override {
    return Run([=, this] { return cpu_->GatherRows(x, rows, out); });
  }
  absl::Status Sample(const TensorView& logits, const ops::SamplingRow* rows, ops::SampledToken* out) override {
    return Run([=, this] { return cpu_->Sample(logits, rows, out); });
  }
  absl::Status LoraShrink(const TensorView& x, const ops::LoraSegments& segments, const ops::LoraModule& module,
                          const TensorView& y) override {
    if (recording_ != nullptr) captured_bounds_.insert(segments.segments_bound);
    if (recording_ != nullptr) captured_wide_.insert(segments.wide_ranks);
    return Run([=, this] { return cpu_->LoraShrink(x, segments, module, y); });
  }
  // LoraSegments::segments_bound of every LoraShrink recorded into a graph.
  const std::set<int32_t>& captured_bounds() const { return captured_bounds_; }
  // LoraSegments::wide_ranks of every LoraShrink recorded into a graph.
  const std::set<bool>& captured_wide() const { return captured_wide_; }
  absl::Status LoraExpand(const TensorView& y, const ops::LoraSegments& segments, const ops::LoraModule& module,
                          const TensorView& out) override {
    return Run([=, this] { return cpu_->LoraExpand(y, segments, module, out); });
  }

  // The optional LoRA state hooks, used as the CUDA executor uses them (spare rows after 2- and
  // 3-slice weights, for 4 adapters of rank 16), and recorded for the tests.
  int64_t LoraWeightSpareRows(int num_slices) const override { return num_slices >= 2 ? 4 * num_slices * 16 : 0; }
  absl::Status RegisterLoraWeight(const TensorView& weight, const ops::LoraModule& module) override {
    if (recording_ != nullptr) return absl::FailedPreconditionError("RegisterLoraWeight during a capture");
    registered_.push_back({weight, module.num_slices});
    return absl::OkStatus();
  }
  absl::Status BeginLoraStep(const ops::LoraSegments& segments) override {
    begun_.push_back(segments.narrow_ranks);
    return absl::OkStatus();
  }
  absl::Status LoraSlotsChanged() override {
    if (recording_ != nullptr) return absl::FailedPreconditionError("LoraSlotsChanged during a capture");
    ++slots_changed_;
    return absl::OkStatus();
  }
  struct Registered {
    TensorView weight;
    int num_slices;
  };
  const std::vector<Registered>& registered() const { return registered_; }
  // LoraSegments::narrow_ranks of every BeginLoraStep call, eager or recorded.
  const std::vector<bool>& begun() const { return begun_; }
  int slots_changed() const { return slots_changed_; }

  absl::StatusOr<std::unique_ptr<ops::Graph>> Capture(const std::function<absl::Status()>& body) override {
    auto graph = std::make_unique<Recorded>();
    recording_ = &graph->steps;
    const absl::Status status = body();
    recording_ = nullptr;
    if (!status.ok()) return status;
    ++captures_;
    return std::unique_ptr<ops::Graph>(std::move(graph));
  }

 private:
  struct Recorded : ops::Graph {
    std::vector<std::function<absl::Status()>> steps;
    absl::Status Replay() override {
      for (const auto& step : steps) LORAPLEX_RETURN_IF_ERROR(step());
      return absl::OkStatus();
    }
  };
  absl::Status Run(std::function<absl::Status()> op) {
    if (recording_ == nullptr) return op();
    recording_->push_back(std::move(op));
    return absl::OkStatus();
  }

  std::unique_ptr<ops::Ops> cpu_;
  std::vector<std::function<absl::Status()>>* recording_ = nullptr;
  int captures_ = 0;
  std::vector<Prepared> prepared_;
  std::set<int32_t> captured_bounds_;
  std::set<bool> captured_wide_;
  std::vector<Registered> registered_;
  std::vector<size_t> allocated_;
  std::vector<bool> begun_;
  int slots_changed_ = 0;
};

// A tiny model on graph-recording CPU ops with adapter x resident in a 2-slot pool, and three
// sequences: A and C on x, B on the base model (B's second block is block 0), with their dense
// reference logits. Members are set up in declaration order.
struct GraphFixture {
  // pool_max_rank: the slot pool's; adapter_rank: adapter x's.
  explicit GraphFixture(const std::string& name, int32_t pool_max_rank = 8, int adapter_rank = 4)
      : dir(testing::MakeTempDir(name)) {
    REQUIRE(testing::WriteTinyModel(dir, testing::TinyModelOptions{}).ok());
    auto parsed = LoadModelSpec(dir);
    REQUIRE(parsed.ok());
    spec = *parsed;
    testing::TinyAdapterOptions xo;
    xo.r = adapter_rank;
    xo.alpha = 8;
    const std::string xdir = dir + "/x";
    REQUIRE(testing::WriteTinyAdapter(xdir, spec, xo).ok());
    lora::LoraLimits limits;
    limits.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    auto x = lora::LoadPeftAdapter("x", xdir, spec, limits, DType::kF32);
    REQUIRE(x.ok());
    adapter = *std::move(x);
    auto created = lora::SlotPool::Create(&ops, spec, /*num_slots=*/2, pool_max_rank);
    REQUIRE(created.ok());
    pool = *std::move(created);
    auto slots = pool->EnsureResident({adapter.get()}, {false});
    REQUIRE(slots.ok());
    auto loaded = LlamaModel::Load(dir, spec, &ops, pool.get(), kCapacity);
    REQUIRE(loaded.ok());
    model = *std::move(loaded);
    const DenseAdapter dx = ReadDenseAdapter(xdir, spec, 8.0 / adapter_rank);
    seqs.resize(3);
    seqs[0] = {RandomTokens(10, spec.vocab_size, 7), {1, 3, 5}, 0, (*slots)[0]};
    seqs[1] = {RandomTokens(10, spec.vocab_size, 8), {8, 0, 12}, 0, -1};
    seqs[2] = {RandomTokens(10, spec.vocab_size, 9), {15, 4, 6}, 0, (*slots)[0]};
    const DenseReference ref(dir, spec);
    dense = {ref.Logits(seqs[0].tokens, &dx), ref.Logits(seqs[1].tokens, nullptr), ref.Logits(seqs[2].tokens, &dx)};
  }

  // One forward of `chunks` of `seqs`, checked against the dense forward.
  void Run(const std::vector<Chunk>& chunks) {
    const StepInput in = MakeStep(seqs, chunks);
    auto logits = model->Forward(in);
    INFO(logits.status().message());
    REQUIRE(logits.ok());
    CheckStep(*logits, in, chunks, dense, spec.vocab_size);
  }

  std::string dir;
  ModelSpec spec;
  RecordingCpuOps ops;
  std::shared_ptr<const lora::LoadedAdapter> adapter;
  std::unique_ptr<lora::SlotPool> pool;
  std::unique_ptr<LlamaModel> model;
  std::vector<Sequence> seqs;
  std::vector<std::vector<std::vector<double>>> dense;
};

TEST_CASE("qkv and gate_up weights get the ops' spare rows, zeroed and registered; LoRA steps are begun and uploads reported") {
  GraphFixture f("llama-lora-state");
  // Every layer's qkv (3 slices) and gate_up (2), each once, with its spare rows right after the
  // weight and zero. (Every step below matches the dense forward: the spare rows change nothing.)
  REQUIRE(f.ops.registered().size() == static_cast<size_t>(2 * f.spec.num_layers));
  int qkv = 0, gate_up = 0;
  for (const auto& r : f.ops.registered()) {
    qkv += r.num_slices == 3;
    gate_up += r.num_slices == 2;
    const int64_t n = r.weight.shape[0], k = r.weight.shape[1];
    const float* spare = static_cast<const float*>(r.weight.data) + n * k;
    const int64_t count = f.ops.LoraWeightSpareRows(r.num_slices) * k;
    CHECK(std::all_of(spare, spare + count, [](float v) { return v == 0.0f; }));
  }
  CHECK(qkv == f.spec.num_layers);
  CHECK(gate_up == f.spec.num_layers);

  f.Run({{0, 4}, {1, 4}, {2, 4}});  // prefill with adapter x: the upload before it is reported
  CHECK(f.ops.slots_changed() == 1);
  REQUIRE(f.ops.begun().size() == 1);
  CHECK(f.ops.begun()[0]);  // x has rank 4: a narrow-rank step
  f.Run({{1, 1}});          // the base model only: no LoRA step to begin
  CHECK(f.ops.begun().size() == 1);
  f.Run({{0, 1}, {2, 1}});  // decode on x, recorded into a graph: begun inside it
  CHECK(f.ops.begun().size() == 2);
  CHECK(f.ops.slots_changed() == 1);  // nothing uploaded since

  // Adapter y enters the second slot: the next step reports it, once.
  testing::TinyAdapterOptions yo;
  yo.r = 2;
  yo.seed = 99;
  REQUIRE(testing::WriteTinyAdapter(f.dir + "/y", f.spec, yo).ok());
  lora::LoraLimits limits;
  limits.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  auto y = lora::LoadPeftAdapter("y", f.dir + "/y", f.spec, limits, DType::kF32);
  REQUIRE(y.ok());
  REQUIRE(f.pool->EnsureResident({f.adapter.get(), y->get()}, {false, false}).ok());
  f.Run({{0, 1}, {2, 1}});
  f.Run({{2, 1}, {0, 1}});
  CHECK(f.ops.slots_changed() == 2);
}

TEST_CASE("A model without a slot pool gets no spare rows after its weights") {
  const std::string dir = testing::MakeTempDir("llama-no-spare");
  REQUIRE(testing::WriteTinyModel(dir, testing::TinyModelOptions{}).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  // The qkv weight's allocation with and without the spare rows (F32 on the CPU ops). Other
  // tensors may have either size too: the two loads are compared.
  const size_t k = static_cast<size_t>(spec->hidden_size), n = static_cast<size_t>(spec->qkv_width());
  RecordingCpuOps ops;
  const size_t spare = static_cast<size_t>(ops.LoraWeightSpareRows(3));
  auto count = [&](size_t bytes) { return std::count(ops.allocated().begin(), ops.allocated().end(), bytes); };
  auto pool = lora::SlotPool::Create(&ops, *spec, /*num_slots=*/1, /*max_rank=*/8);
  REQUIRE(pool.ok());
  ops.clear_allocated();
  {
    auto model = LlamaModel::Load(dir, *spec, &ops, nullptr, kCapacity);
    REQUIRE(model.ok());
  }
  const auto plain = count(n * k * 4), spared = count((n + spare) * k * 4);
  CHECK(ops.registered().empty());
  ops.clear_allocated();
  auto model = LlamaModel::Load(dir, *spec, &ops, pool->get(), kCapacity);
  REQUIRE(model.ok());
  CHECK(count(n * k * 4) == plain - spec->num_layers);
  CHECK(count((n + spare) * k * 4) >= spared + spec->num_layers);
  CHECK(ops.registered().size() == static_cast<size_t>(2 * spec->num_layers));
}

TEST_CASE("A step whose slots hold ranks above 16 is begun as not narrow") {
  GraphFixture f("llama-lora-wide", /*pool_max_rank=*/32, /*adapter_rank=*/32);
  f.Run({{0, 4}, {2, 3}});
  REQUIRE(f.ops.begun().size() == 1);
  CHECK_FALSE(f.ops.begun()[0]);
}

TEST_CASE("Decode steps replayed from a recorded graph are padded to their bucket and match the dense forward") {
  GraphFixture f("llama-graph");
  LlamaModel& model = *f.model;

  struct Step {
    std::vector<Chunk> chunks;
    int64_t graph_steps;  // after the step
    int graphs;
  };
  const std::vector<Step> steps = {
      {{{0, 4}, {1, 4}, {2, 4}}, 0, 0},          // prefill: eager
      {{{1, 1}}, 1, 1},                          // bucket 1, no adapter (recorded without LoRA ops)
      {{{0, 1}, {1, 1}, {2, 1}}, 2, 2},          // bucket 4 with a padding row, one adapter
      {{{2, 1}, {0, 1}}, 3, 3},                  // bucket 2, adapter only
      {{{1, 1}, {2, 1}, {0, 1}}, 4, 3},          // bucket 4 again, other order
      {{{0, 2}, {1, 1}}, 4, 3},                  // mixed: eager
      {{{1, 1}}, 5, 3},                          // bucket 1 again
      {{{0, 1}, {2, 1}}, 6, 3},                  // bucket 2 again
  };
  for (const Step& step : steps) {
    f.Run(step.chunks);
    CHECK(model.graph_steps() == step.graph_steps);
    CHECK(model.num_graphs() == step.graphs);
  }
  CHECK(f.ops.captures() == 3);
}

TEST_CASE("WarmUp records every bucket's graphs once; later steps replay them and match the dense forward") {
  GraphFixture f("llama-warmup");
  LlamaModel& model = *f.model;

  // Buckets 1, 2, 4, 8 and 16 (the capacity's 16 sequences), each without adapters and with few
  // (<= 4) adapter segments, and 8 and 16 also with more segments than that.
  auto warmed = model.WarmUp();
  INFO(warmed.status().message());
  REQUIRE(warmed.ok());
  CHECK(*warmed == 12);
  CHECK(f.ops.captures() == 12);
  CHECK(model.graph_steps() == 12);  // each capture ran once as a replay
  // The few-segment graphs tell the ops their bound; the others say nothing (0: max_segments).
  CHECK(f.ops.captured_bounds() == std::set<int32_t>{0, 4});
  CHECK(f.ops.captured_wide() == std::set<bool>{false});  // a pool of rank 8: no wide-rank graphs

  // Every GEMM a step can run was prepared at its largest row count: each layer's qkv, o, gate_up
  // and down at max_tokens rows on distinct weights, then the logits at max_seqs rows.
  const auto& prepared = f.ops.prepared();
  REQUIRE(prepared.size() == 4 * static_cast<size_t>(f.spec.num_layers) + 1);
  std::set<const void*> weights;
  for (size_t i = 0; i < prepared.size(); ++i) {
    const auto& [x, w, y] = prepared[i];
    INFO("PrepareGemm call " << i << ": x " << x.shape.ToString() << " w " << w.shape.ToString() << " y "
                             << y.shape.ToString());
    const bool logits = i + 1 == prepared.size();
    CHECK(x.shape[0] == (logits ? kCapacity.max_seqs : kCapacity.max_tokens));
    CHECK(x.shape[1] == w.shape[1]);
    CHECK(y.shape == Shape{x.shape[0], w.shape[0]});
    CHECK(y.dtype == (logits ? DType::kF32 : x.dtype));
    weights.insert(w.data);
  }
  CHECK(weights.size() == prepared.size());
  const int64_t qkv_width = (f.spec.num_heads + 2 * f.spec.num_kv_heads) * f.spec.head_dim;
  CHECK(prepared[0].w.shape == Shape{qkv_width, f.spec.hidden_size});
  CHECK(prepared[3].w.shape == Shape{f.spec.hidden_size, f.spec.intermediate_size});
  CHECK(prepared.back().w.shape == Shape{f.spec.vocab_size, f.spec.hidden_size});

  // The warm-up wrote KV slot 0 (block 0, which sequence B uses from position 4 on): B writes it
  // before reading it, so every step still matches the dense forward, and nothing is recaptured.
  const std::vector<std::vector<Chunk>> steps = {
      {{0, 4}, {1, 4}, {2, 4}}, {{1, 1}}, {{0, 1}, {1, 1}, {2, 1}}, {{2, 1}, {0, 1}}, {{0, 2}, {1, 1}}, {{1, 1}}};
  for (const auto& chunks : steps) f.Run(chunks);
  CHECK(model.graph_steps() == 12 + 4);
  CHECK(model.num_graphs() == 12);
  CHECK(f.ops.captures() == 12);
  // A second warm-up captures nothing new.
  auto again = model.WarmUp();
  REQUIRE(again.ok());
  CHECK(*again == 0);

  // Dropped graphs are recorded again on their bucket's next step, which still matches. (Only
  // sequences A and C: the second warm-up rewrote KV slot 0, which B has read since.)
  const int64_t replays = model.graph_steps();
  model.DropGraphs();
  CHECK(model.num_graphs() == 0);
  f.Run({{0, 1}, {2, 1}});
  CHECK(model.num_graphs() == 1);
  CHECK(f.ops.captures() == 13);
  CHECK(model.graph_steps() == replays + 1);
}

TEST_CASE("A pool sized for ranks above 16 gets wide-rank graphs too; steps of a wide adapter replay them") {
  GraphFixture f("llama-wide", /*pool_max_rank=*/32, /*adapter_rank=*/24);
  LlamaModel& model = *f.model;
  // Buckets 1..16 without adapters (5), few segments narrow and wide (5 + 5), many segments narrow
  // and wide (buckets 8 and 16: 2 + 2).
  auto warmed = model.WarmUp();
  INFO(warmed.status().message());
  REQUIRE(warmed.ok());
  CHECK(*warmed == 19);
  CHECK(f.ops.captured_wide() == std::set<bool>{false, true});
  CHECK(f.ops.captured_bounds() == std::set<int32_t>{0, 4});
  // Adapter x (rank 24) makes every adapter step wide: they replay the wide graphs recorded above
  // (nothing new is captured) and match the dense forward.
  const std::vector<std::vector<Chunk>> steps = {
      {{0, 4}, {1, 4}, {2, 4}}, {{1, 1}}, {{0, 1}, {1, 1}, {2, 1}}, {{2, 1}, {0, 1}}, {{0, 1}}};
  for (const auto& chunks : steps) f.Run(chunks);
  CHECK(model.num_graphs() == 19);
  CHECK(f.ops.captures() == 19);
  CHECK(model.graph_steps() == 19 + 4);
}

}  // namespace
}  // namespace loraplex::model
