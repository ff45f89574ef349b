// The whole model on the CUDA ops (BF16) against the same model on the CPU ops (F32, the oracle):
// mixed adapters of different ranks in one step, prefill + chunked prefill + decode, batch
// invariance, and an adapter slot reused by another adapter. Exits 77 (skipped) without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "engine/model/llama.h"
#include "engine/model/model_spec.h"
#include "engine/ops/cuda/cuda_ops.h"
#include "engine/ops/ops.h"
#include "lora/adapter.h"
#include "lora/lora_batch.h"
#include "lora/slot_pool.h"
#include "tests/testing/tiny_model.h"

namespace loraplex::model {
namespace {

constexpr int32_t kBlock = 16;
const ModelCapacity kCapacity{/*max_tokens=*/256, /*max_seqs=*/8, /*num_kv_blocks=*/64,
                              /*kv_block_size=*/kBlock, /*max_blocks_per_seq=*/16};

// A sequence being fed to both executors: its tokens, its KV blocks, how much is computed.
struct Seq {
  std::vector<int32_t> tokens;
  std::vector<int32_t> blocks;
  int32_t computed = 0;
  int32_t slot = -1;  // adapter slot, -1: base model
};

// A step that feeds `count[i]` new tokens of seqs[i] and asks for the last token's logits.
// max_segment_tokens (BuildLoraBatch): 1 gives every adapter token a segment of its own.
StepInput MakeStep(std::vector<Seq>& seqs, const std::vector<int32_t>& count, int32_t max_segment_tokens = 16) {
  StepInput in;
  std::vector<int32_t> token_slots;
  in.block_tables.assign(seqs.size() * kCapacity.max_blocks_per_seq, 0);
  for (size_t s = 0; s < seqs.size(); ++s) {
    Seq& q = seqs[s];
    for (int32_t i = 0; i < count[s]; ++i) {
      const int32_t pos = q.computed + i;
      in.token_ids.push_back(q.tokens[pos]);
      in.positions.push_back(pos);
      in.slot_mapping.push_back(q.blocks[pos / kBlock] * kBlock + pos % kBlock);
      in.token_seq.push_back(static_cast<int32_t>(s));
      token_slots.push_back(q.slot);
    }
    q.computed += count[s];
    in.context_lens.push_back(q.computed);
    std::copy(q.blocks.begin(), q.blocks.end(),
              in.block_tables.begin() + s * kCapacity.max_blocks_per_seq);
    in.logit_rows.push_back(static_cast<int32_t>(in.token_ids.size()) - 1);
  }
  in.lora = lora::BuildLoraBatch(token_slots, max_segment_tokens);
  return in;
}

double RelErr(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

// Rows of [rows, vocab] logits whose argmax agrees, counting only rows where the reference's top-2
// margin is clear of BF16 noise.
void CheckArgmax(const std::vector<float>& got, const std::vector<float>& ref, int64_t vocab) {
  for (size_t r = 0; r * vocab < ref.size(); ++r) {
    const float* g = got.data() + r * vocab;
    const float* f = ref.data() + r * vocab;
    std::vector<float> sorted(f, f + vocab);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
    if (sorted[0] - sorted[1] < 0.1f) continue;
    CHECK(std::max_element(g, g + vocab) - g == std::max_element(f, f + vocab) - f);
  }
}

struct Executor {
  std::unique_ptr<ops::Ops> ops;
  std::unique_ptr<lora::SlotPool> pool;
  std::unique_ptr<LlamaModel> model;
};

Executor MakeExecutor(Device device, const std::string& dir, const ModelSpec& spec, int32_t num_slots = 3,
                      const ModelCapacity& capacity = kCapacity) {
  Executor e;
  auto ops = ops::CreateOps(device);
  REQUIRE(ops.ok());
  e.ops = std::move(*ops);
  auto pool = lora::SlotPool::Create(e.ops.get(), spec, num_slots, /*max_rank=*/64);
  REQUIRE(pool.ok());
  e.pool = std::move(*pool);
  auto model = LlamaModel::Load(dir, spec, e.ops.get(), e.pool.get(), capacity);
  INFO(model.status().message());
  REQUIRE(model.ok());
  e.model = std::move(*model);
  return e;
}

std::shared_ptr<const lora::LoadedAdapter> LoadAdapter(const std::string& name, const std::string& dir,
                                                       const ModelSpec& spec, DType dtype) {
  lora::LoraLimits limits;
  limits.max_rank = 64;
  limits.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  auto a = lora::LoadPeftAdapter(name, dir, spec, limits, dtype);
  INFO(a.status().message());
  REQUIRE(a.ok());
  return *a;
}

std::vector<int32_t> RandomTokens(int n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& v : t) v = static_cast<int32_t>(rng() % vocab);
  return t;
}

// Writes adapters `names` (options `ao`, stored BF16) under dir and loads each into every
// executor of `all` (F32 for the CPU one): adapters[e][i] is names[i] in all[e].
std::vector<std::vector<std::shared_ptr<const lora::LoadedAdapter>>> WriteAndLoadAdapters(
    const std::string& dir, const ModelSpec& spec, std::vector<testing::TinyAdapterOptions> ao,
    const std::vector<std::string>& names, const std::vector<Executor*>& all) {
  REQUIRE(ao.size() == names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    ao[i].dtype = DType::kBF16;
    REQUIRE(testing::WriteTinyAdapter(dir + "/" + names[i], spec, ao[i]).ok());
  }
  std::vector<std::vector<std::shared_ptr<const lora::LoadedAdapter>>> adapters(all.size());
  for (size_t e = 0; e < all.size(); ++e) {
    const DType dtype = all[e]->ops->device() == Device::kCpu ? DType::kF32 : DType::kBF16;
    for (const std::string& name : names) adapters[e].push_back(LoadAdapter(name, dir + "/" + name, spec, dtype));
  }
  return adapters;
}

// Makes adapters `which` resident in every executor; all pools must pick the same slots.
std::vector<int32_t> MakeResident(const std::vector<Executor*>& all,
                                  const std::vector<std::vector<std::shared_ptr<const lora::LoadedAdapter>>>& adapters,
                                  const std::vector<int>& which) {
  std::vector<int32_t> first;
  for (size_t e = 0; e < all.size(); ++e) {
    std::vector<const lora::LoadedAdapter*> list;
    for (int w : which) list.push_back(adapters[e][static_cast<size_t>(w)].get());
    auto slots = all[e]->pool->EnsureResident(list, std::vector<bool>(list.size(), false));
    REQUIRE(slots.ok());
    if (e == 0) first = *slots;
    REQUIRE(*slots == first);
  }
  return first;
}

TEST_CASE("The CUDA model matches the CPU model with mixed-rank adapters over prefill, chunked prefill and decode") {
  testing::TinyModelOptions mo;
  mo.vocab = 512;
  mo.hidden = 256;
  mo.layers = 2;
  mo.heads = 4;
  mo.kv_heads = 2;
  mo.head_dim = 64;  // a head size the CUDA attention supports
  mo.intermediate = 512;
  mo.dtype = DType::kBF16;
  mo.llama3_rope = true;
  const std::string dir = testing::MakeTempDir("cuda-model");
  REQUIRE(testing::WriteTinyModel(dir, mo).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());

  // Three adapters: rank 4 attention-only, rank 16 all modules with rsLoRA, rank 64 MLP-only.
  testing::TinyAdapterOptions ao[3];
  ao[0].r = 4; ao[0].alpha = 8; ao[0].target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  ao[1].r = 16; ao[1].alpha = 16; ao[1].use_rslora = true; ao[1].seed = 9;
  ao[2].r = 64; ao[2].alpha = 32; ao[2].target_modules = {"gate_proj", "up_proj", "down_proj"}; ao[2].seed = 13;
  const char* names[3] = {"a4", "b16", "c64"};
  for (int i = 0; i < 3; ++i) {
    ao[i].dtype = DType::kBF16;
    REQUIRE(testing::WriteTinyAdapter(dir + "/" + names[i], *spec, ao[i]).ok());
  }

  Executor cpu = MakeExecutor(Device::kCpu, dir, *spec);
  Executor gpu = MakeExecutor(Device::kCuda, dir, *spec);
  std::vector<std::shared_ptr<const lora::LoadedAdapter>> cpu_ad, gpu_ad;
  for (int i = 0; i < 3; ++i) {
    cpu_ad.push_back(LoadAdapter(names[i], dir + "/" + names[i], *spec, DType::kF32));
    gpu_ad.push_back(LoadAdapter(names[i], dir + "/" + names[i], *spec, DType::kBF16));
  }
  auto cslots = cpu.pool->EnsureResident({cpu_ad[0].get(), cpu_ad[1].get(), cpu_ad[2].get()},
                                         {false, false, false});
  auto gslots = gpu.pool->EnsureResident({gpu_ad[0].get(), gpu_ad[1].get(), gpu_ad[2].get()},
                                         {false, false, false});
  REQUIRE(cslots.ok());
  REQUIRE(gslots.ok());
  REQUIRE(*cslots == *gslots);
  const auto& slot = *cslots;

  // Sequences: A on a4, B on the base model, C on b16 (chunked), D on c64 (joins later), E on a4.
  // Physical blocks are shuffled so paging is exercised; 6 blocks (96 tokens) per sequence.
  std::vector<int32_t> phys(30);
  for (int i = 0; i < 30; ++i) phys[i] = i;
  std::shuffle(phys.begin(), phys.end(), std::mt19937(7));
  int next_seq = 0;
  auto make = [&](int len, uint32_t seed, int32_t s) {
    Seq q;
    q.tokens = RandomTokens(len + 12, spec->vocab_size, seed);
    q.blocks.assign(phys.begin() + next_seq * 6, phys.begin() + next_seq * 6 + 6);
    ++next_seq;
    q.slot = s;
    return q;
  };
  std::vector<Seq> seqs = {make(37, 1, slot[0]), make(20, 2, -1), make(50, 3, slot[1]),
                           make(9, 4, slot[2]), make(5, 5, slot[0])};
  std::vector<Seq> cseqs = seqs, gseqs = seqs;

  auto step = [&](const std::vector<int>& which, const std::vector<int32_t>& count) {
    std::vector<Seq> cs, gs;
    for (int w : which) { cs.push_back(cseqs[w]); gs.push_back(gseqs[w]); }
    StepInput ci = MakeStep(cs, count), gi = MakeStep(gs, count);
    for (size_t i = 0; i < which.size(); ++i) { cseqs[which[i]] = cs[i]; gseqs[which[i]] = gs[i]; }
    auto cl = cpu.model->Forward(ci);
    auto gl = gpu.model->Forward(gi);
    INFO(gl.status().message());
    REQUIRE(cl.ok());
    REQUIRE(gl.ok());
    const double err = RelErr(*gl, *cl);
    std::printf("step seqs=%zu tokens=%zu segments=%d rel_err=%.3e\n", which.size(), ci.token_ids.size(),
                ci.lora.num_segments(), err);
    // BF16 weights are exact on both sides; BF16 activations through 2 layers give ~1e-2.
    CHECK(err < 3e-2);
    CheckArgmax(*gl, *cl, spec->vocab_size);
  };
  step({0, 1, 2}, {37, 20, 30});           // prefill A, B; first chunk of C
  step({0, 1, 2, 3}, {1, 1, 20, 9});       // decode A, B; rest of C; prefill D
  for (int i = 0; i < 6; ++i) step({0, 1, 2, 3}, {1, 1, 1, 1});  // decode all four
  step({0, 1, 2, 3, 4}, {1, 1, 1, 1, 5});  // E joins (same adapter as A)
}

TEST_CASE("A sequence's GPU logits do not depend on what else is in the batch") {
  testing::TinyModelOptions mo;
  mo.vocab = 512; mo.hidden = 256; mo.heads = 4; mo.kv_heads = 2; mo.head_dim = 64;
  mo.intermediate = 512; mo.dtype = DType::kBF16;
  const std::string dir = testing::MakeTempDir("cuda-invariance");
  REQUIRE(testing::WriteTinyModel(dir, mo).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  testing::TinyAdapterOptions ao;
  ao.r = 16; ao.dtype = DType::kBF16;
  REQUIRE(testing::WriteTinyAdapter(dir + "/x", *spec, ao).ok());
  Executor gpu = MakeExecutor(Device::kCuda, dir, *spec);
  auto ad = LoadAdapter("x", dir + "/x", *spec, DType::kBF16);
  auto slots = gpu.pool->EnsureResident({ad.get()}, {false});
  REQUIRE(slots.ok());

  Seq alone;
  alone.tokens = RandomTokens(24, spec->vocab_size, 3);
  alone.blocks = {5, 2};
  alone.slot = (*slots)[0];
  std::vector<Seq> s1 = {alone};
  auto solo = gpu.model->Forward(MakeStep(s1, {24}));
  REQUIRE(solo.ok());

  Seq other = alone;
  other.tokens = RandomTokens(24, spec->vocab_size, 4);
  other.blocks = {7, 9};
  other.slot = -1;
  Seq same = alone;
  same.blocks = {11, 12};
  std::vector<Seq> s3 = {other, same, other};
  s3[2].blocks = {13, 14};
  auto batched = gpu.model->Forward(MakeStep(s3, {24, 24, 24}));
  REQUIRE(batched.ok());
  std::vector<float> row(batched->begin() + spec->vocab_size, batched->begin() + 2 * spec->vocab_size);
  const double err = RelErr(row, *solo);
  std::printf("batch invariance rel_err=%.3e\n", err);
  // GEMM algorithms may differ by batch size; the result must stay within BF16 rounding.
  CHECK(err < 1e-2);
}

TEST_CASE("A slot reused by another adapter on the GPU gives that adapter's output, nothing of the previous one") {
  testing::TinyModelOptions mo;
  mo.vocab = 512; mo.hidden = 256; mo.heads = 4; mo.kv_heads = 2; mo.head_dim = 64;
  mo.intermediate = 512; mo.dtype = DType::kBF16;
  const std::string dir = testing::MakeTempDir("cuda-reuse");
  REQUIRE(testing::WriteTinyModel(dir, mo).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  testing::TinyAdapterOptions big, small;
  big.r = 64; big.dtype = DType::kBF16; big.seed = 21;                   // every module
  small.r = 8; small.dtype = DType::kBF16; small.seed = 22;
  small.target_modules = {"v_proj"};                                      // one module only
  REQUIRE(testing::WriteTinyAdapter(dir + "/big", *spec, big).ok());
  REQUIRE(testing::WriteTinyAdapter(dir + "/small", *spec, small).ok());

  // A one-slot GPU pool: `small` must take `big`'s slot.
  auto ops = ops::CreateOps(Device::kCuda);
  REQUIRE(ops.ok());
  auto pool = lora::SlotPool::Create(ops->get(), *spec, 1, 64);
  REQUIRE(pool.ok());
  auto model = LlamaModel::Load(dir, *spec, ops->get(), pool->get(), kCapacity);
  REQUIRE(model.ok());
  auto gbig = LoadAdapter("big", dir + "/big", *spec, DType::kBF16);
  auto gsmall = LoadAdapter("small", dir + "/small", *spec, DType::kBF16);
  REQUIRE((*pool)->EnsureResident({gbig.get()}, {false}).ok());
  Seq q;
  q.tokens = RandomTokens(16, spec->vocab_size, 8);
  q.blocks = {0};
  q.slot = 0;
  std::vector<Seq> s = {q};
  REQUIRE((*model)->Forward(MakeStep(s, {16})).ok());
  auto slots = (*pool)->EnsureResident({gsmall.get()}, {false});
  REQUIRE(slots.ok());
  REQUIRE((*slots)[0] == 0);
  s = {q};
  auto reused = (*model)->Forward(MakeStep(s, {16}));
  REQUIRE(reused.ok());

  // The reference: `small` in a fresh CPU executor.
  Executor cpu = MakeExecutor(Device::kCpu, dir, *spec);
  auto csmall = LoadAdapter("small", dir + "/small", *spec, DType::kF32);
  REQUIRE(cpu.pool->EnsureResident({csmall.get()}, {false}).ok());
  s = {q};
  auto ref = cpu.model->Forward(MakeStep(s, {16}));
  REQUIRE(ref.ok());
  const double err = RelErr(*reused, *ref);
  std::printf("slot reuse rel_err=%.3e\n", err);
  CHECK(err < 3e-2);
}

TEST_CASE("Decode steps replayed from CUDA graphs equal eager steps and the CPU model as sequences, adapters and slots change") {
  testing::TinyModelOptions mo;
  mo.vocab = 512; mo.hidden = 256; mo.layers = 2; mo.heads = 4; mo.kv_heads = 2; mo.head_dim = 64;
  mo.intermediate = 512; mo.dtype = DType::kBF16; mo.llama3_rope = true;
  const std::string dir = testing::MakeTempDir("cuda-graphs");
  REQUIRE(testing::WriteTinyModel(dir, mo).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());

  // Five adapters for a four-slot pool, so the last one must take another's slot mid-run.
  std::vector<testing::TinyAdapterOptions> ao(5);
  ao[0].r = 4; ao[0].alpha = 8; ao[0].target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  ao[1].r = 16; ao[1].alpha = 16; ao[1].use_rslora = true; ao[1].seed = 9;
  ao[2].r = 64; ao[2].alpha = 32; ao[2].target_modules = {"gate_proj", "up_proj", "down_proj"}; ao[2].seed = 13;
  ao[3].r = 8; ao[3].alpha = 16; ao[3].seed = 17;
  ao[4].r = 32; ao[4].alpha = 32; ao[4].seed = 19;

  ModelCapacity eager_cap = kCapacity;
  eager_cap.graphs = false;
  // kCapacity.max_seqs is 8: the buckets are 1, 2, 4 and 8.
  Executor cpu = MakeExecutor(Device::kCpu, dir, *spec, 4);
  Executor eager = MakeExecutor(Device::kCuda, dir, *spec, 4, eager_cap);
  Executor graphs = MakeExecutor(Device::kCuda, dir, *spec, 4, kCapacity);
  const std::vector<Executor*> all = {&cpu, &eager, &graphs};
  // Each way a GPU step can run its LoRA work, through the whole test: the executor's choice by
  // segment count (here: beside the GEMM), the chain in line before every GEMM (its default above
  // 64 segments), and the few-adapter GEMM for fewer SMs from one token on (its default from 32).
  const int lora_path = GENERATE(0, 1, 2);
  INFO("LoRA path " << lora_path);
  for (Executor* e : {&eager, &graphs}) {
    if (lora_path == 1) REQUIRE(ops::cuda::SetLoraInlineForTest(e->ops.get(), 0).ok());
    if (lora_path == 2) REQUIRE(ops::cuda::SetLoraFewTuningForTest(e->ops.get(), -1, -1, 1).ok());
  }
  const auto adapters = WriteAndLoadAdapters(dir, *spec, ao, {"a4", "b16", "c64", "d8", "e32"}, all);
  auto resident = [&](const std::vector<int>& which) { return MakeResident(all, adapters, which); };
  const std::vector<int32_t> slot = resident({0, 1, 2, 3});

  // Eight sequences: 0 and 5 on the base model, the others on a4, b16, c64, d8 (two share one).
  std::vector<int32_t> phys(48);
  for (int i = 0; i < 48; ++i) phys[i] = i;
  std::shuffle(phys.begin(), phys.end(), std::mt19937(11));
  const int32_t prompt[8] = {12, 7, 20, 3, 9, 15, 5, 11};
  const int32_t seq_slot[8] = {-1, slot[0], slot[1], slot[2], slot[0], -1, slot[3], slot[1]};
  std::vector<Seq> seqs(8);
  for (int i = 0; i < 8; ++i) {
    seqs[i].tokens = RandomTokens(prompt[i] + 16, spec->vocab_size, 100 + i);
    seqs[i].blocks.assign(phys.begin() + i * 6, phys.begin() + i * 6 + 6);
    seqs[i].slot = seq_slot[i];
  }
  std::vector<Seq> state[3] = {seqs, seqs, seqs};

  int decode_steps = 0;
  // One step of sequences `which` (count[i] new tokens each) on all three executors; base_only
  // runs every token on the base model.
  auto step = [&](const std::vector<int>& which, const std::vector<int32_t>& count, bool base_only = false,
                  int32_t max_segment_tokens = 16) {
    std::vector<float> logits[3];
    int segments = 0;
    for (int e = 0; e < 3; ++e) {
      std::vector<Seq> picked;
      for (int w : which) {
        picked.push_back(state[e][w]);
        if (base_only) picked.back().slot = -1;
      }
      StepInput in = MakeStep(picked, count, max_segment_tokens);
      segments = in.lora.num_segments();
      for (size_t i = 0; i < which.size(); ++i) state[e][which[i]].computed = picked[i].computed;
      auto out = all[e]->model->Forward(in);
      INFO(out.status().message());
      REQUIRE(out.ok());
      logits[e] = *std::move(out);
    }
    const bool decode = std::all_of(count.begin(), count.end(), [](int32_t c) { return c == 1; });
    decode_steps += decode ? 1 : 0;
    const double vs_eager = RelErr(logits[2], logits[1]);
    const double vs_cpu = RelErr(logits[2], logits[0]);
    std::printf("graph step seqs=%zu segments=%d decode=%d rel_err vs eager=%.3e vs cpu=%.3e\n", which.size(),
                segments, decode ? 1 : 0, vs_eager, vs_cpu);
    // The graph pads to its bucket (other GEMM shapes) and sizes the attention's context split
    // for the capacity: a different summation order, so BF16 rounding as in batch invariance.
    CHECK(vs_eager < 1e-2);
    // BF16 against the F32 oracle through 2 layers, as in the first test.
    CHECK(vs_cpu < 3e-2);
    CheckArgmax(logits[2], logits[0], spec->vocab_size);
    CHECK(graphs.model->graph_steps() == decode_steps);
  };

  step({0, 1, 2, 3, 4, 5, 6, 7}, {12, 7, 20, 3, 9, 15, 5, 11});  // prefill: eager
  step({0, 5}, {1, 1});                                         // bucket 2, no adapters
  step({0, 1, 5}, {1, 1, 1});                                   // bucket 4, one adapter
  step({0, 1, 2, 3, 5}, {1, 1, 1, 1, 1});                       // bucket 8, three adapters
  step({0, 1, 2, 3, 4, 5, 6, 7}, {1, 1, 1, 1, 1, 1, 1, 1});     // bucket 8 full, four adapters
  step({7, 6, 4, 3, 2, 1}, {1, 1, 1, 1, 1, 1});                 // bucket 8, other order
  step({1, 2, 3, 4, 5, 6, 7}, {1, 1, 1, 1, 1, 1, 1}, true);     // bucket 8, no adapters at all
  step({3}, {1});                                               // bucket 1, one adapter
  step({2, 0, 1}, {1, 1, 1});                                   // bucket 4, two adapters

  // e32 takes d8's slot; sequence 6 now runs on e32 through the same graphs.
  const std::vector<int32_t> reused = resident({0, 1, 2, 4});
  REQUIRE(reused[3] == slot[3]);
  for (auto& s : state) s[6].slot = reused[3];
  step({6, 0, 1}, {1, 1, 1});                                   // bucket 4, reused slot
  step({0, 1, 2, 3, 4, 5, 6, 7}, {1, 1, 1, 1, 1, 1, 1, 1});     // bucket 8, reused slot
  step({6, 2}, {2, 1});                                         // mixed: eager
  step({6, 2}, {1, 1});                                         // bucket 2, with adapters now
  // A segment per adapter token: more than the few-segment graphs take (model: 4), so bucket 8's
  // graph for any number of segments.
  step({0, 1, 2, 3, 4, 5, 6, 7}, {1, 1, 1, 1, 1, 1, 1, 1}, false, 1);

  // Captured once each: without adapters buckets 2 and 8; with few adapter segments of ranks up to
  // 16 bucket 4 (a4, b16); with few segments and a rank above 16 (c64 or e32: ops::kNarrowLoraRank)
  // buckets 1, 2, 4 and 8; with more segments (c64 among them) bucket 8.
  CHECK(graphs.model->num_graphs() == 8);
  CHECK(eager.model->graph_steps() == 0);
  CHECK(cpu.model->graph_steps() == 0);  // the CPU ops record no graphs
}

TEST_CASE("LoRA rows (few narrow-rank adapters, 32 to 128 tokens; up to 16 on the skinny GEMM) give the CPU model's logits, eager and from graphs, o and down from 64 tokens") {
  testing::TinyModelOptions mo;
  // hidden 512: a width AddRmsNorm's rows reader takes (a multiple of 8 blocks x 64 columns), so
  // o and down add their LoRA there; below it they would fall back to the flush.
  mo.vocab = 512; mo.hidden = 512; mo.layers = 2; mo.heads = 8; mo.kv_heads = 2; mo.head_dim = 64;
  mo.intermediate = 1024; mo.dtype = DType::kBF16; mo.llama3_rope = true;
  const std::string dir = testing::MakeTempDir("cuda-rows");
  REQUIRE(testing::WriteTinyModel(dir, mo).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  // Ranks up to 16 (narrow): rank 4 attention-only, 16 with rsLoRA, 8, 16 MLP-only; a fifth takes
  // the fourth's slot later.
  std::vector<testing::TinyAdapterOptions> ao(5);
  ao[0].r = 4; ao[0].alpha = 8; ao[0].target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  ao[1].r = 16; ao[1].alpha = 16; ao[1].use_rslora = true; ao[1].seed = 9;
  ao[2].r = 8; ao[2].alpha = 16; ao[2].seed = 13;
  ao[3].r = 16; ao[3].alpha = 32; ao[3].target_modules = {"gate_proj", "up_proj", "down_proj"}; ao[3].seed = 17;
  ao[4].r = 12; ao[4].alpha = 24; ao[4].target_modules = {"v_proj", "o_proj", "down_proj"}; ao[4].seed = 19;
  // 64 sequences: decode buckets up to 64. MakeStep lays block tables out for kCapacity.
  ModelCapacity cap = kCapacity;
  cap.max_seqs = 64;
  cap.num_kv_blocks = 80;
  Executor cpu = MakeExecutor(Device::kCpu, dir, *spec, 4, cap);
  Executor gpu = MakeExecutor(Device::kCuda, dir, *spec, 4, cap);
  Executor off = MakeExecutor(Device::kCuda, dir, *spec, 4, cap);  // LoRA rows off: the side chain
  REQUIRE(ops::cuda::SetLoraRowsForTest(off.ops.get(), -1, 0).ok());
  REQUIRE(ops::cuda::SetLoraRowsSkinnyForTest(off.ops.get(), 0).ok());
  // Skinny LoRA rows on every projection of the tiny model (its shapes are not ones the skinny
  // GEMM deals evenly over an H200's SMs), up to 16 tokens (the executor's default is 2).
  REQUIRE(ops::cuda::SetLoraRowsSkinnyForTest(gpu.ops.get(), 16, /*even=*/false).ok());
  const std::vector<Executor*> all = {&cpu, &gpu, &off};
  const auto adapters = WriteAndLoadAdapters(dir, *spec, ao, {"a4", "b16", "d8", "f16", "e12"}, all);
  auto resident = [&](const std::vector<int>& which) { return MakeResident(all, adapters, which); };
  const std::vector<int32_t> slot = resident({0, 1, 2, 3});
  // Sequences grouped by adapter (a step's segments stay at most 4): 0-15 a4, 16-31 b16, 32-47 d8,
  // 48-55 f16, 56-63 the base model. One KV block each.
  std::vector<Seq> seqs(64);
  for (int i = 0; i < 64; ++i) {
    seqs[i].tokens = RandomTokens(16, spec->vocab_size, 200 + i);
    seqs[i].blocks = {i};
    seqs[i].slot = i < 56 ? slot[i / 16 < 3 ? i / 16 : 3] : -1;
  }
  std::vector<Seq> state[3] = {seqs, seqs, seqs};

  // One step of sequences [first, first + n), `count` tokens each, on all three executors; the
  // GPU's rows GEMMs during it must be `rows_gemms` (eager steps; -1: not checked).
  auto step = [&](int first, int n, int32_t count, int64_t rows_gemms) {
    std::vector<float> logits[3];
    int64_t rows_before = 0;
    if (rows_gemms >= 0) {
      auto r = ops::cuda::LoraRowsGemmsForTest(gpu.ops.get());
      REQUIRE(r.ok());
      rows_before = *r;
    }
    int tokens = 0, segments = 0;
    for (int e = 0; e < 3; ++e) {
      std::vector<Seq> picked(state[e].begin() + first, state[e].begin() + first + n);
      // Segments as long as the step: each adapter's tokens in one.
      StepInput in = MakeStep(picked, std::vector<int32_t>(n, count), /*max_segment_tokens=*/256);
      tokens = static_cast<int>(in.token_ids.size());
      segments = in.lora.num_segments();
      std::copy(picked.begin(), picked.end(), state[e].begin() + first);
      auto out = all[e]->model->Forward(in);
      INFO(out.status().message());
      REQUIRE(out.ok());
      logits[e] = *std::move(out);
    }
    const double vs_cpu = RelErr(logits[1], logits[0]);
    const double vs_off = RelErr(logits[1], logits[2]);
    std::printf("rows step seqs=%d tokens=%d segments=%d rel_err vs cpu=%.3e vs side chain=%.3e\n", n, tokens,
                segments, vs_cpu, vs_off);
    CHECK(vs_cpu < 3e-2);
    CHECK(vs_off < 1e-2);
    CheckArgmax(logits[1], logits[0], spec->vocab_size);
    if (rows_gemms >= 0) {
      auto r = ops::cuda::LoraRowsGemmsForTest(gpu.ops.get());
      REQUIRE(r.ok());
      CHECK(*r - rows_before == rows_gemms);
    }
  };
  // Eager prefill. 16 sequences x 3 tokens of one adapter (48 tokens): qkv and gate_up as rows in
  // both layers (4 GEMMs), o and down beside; 32 x 3 of two adapters (96): all four (8 GEMMs);
  // 8 + 8 x 4 (f16, then the base model; 64 tokens): all four.
  step(0, 16, 3, 4);
  step(16, 32, 3, 8);
  step(48, 16, 4, 8);
  step(0, 16, 1, 8);  // decode, bucket 16 (recorded now): all four as skinny rows in both layers
  // Decode from graphs at up to 16 tokens (skinny rows): a4 and b16 (bucket 16), then d8, f16
  // and the base model (bucket 16 again), 3 tokens of a4 (bucket 4).
  step(8, 16, 1, -1);
  step(44, 16, 1, -1);
  step(0, 3, 1, -1);
  // Decode from graphs: 64 sequences (bucket 64, 4 adapters), 40 (bucket 64), 32 (bucket 32: o and
  // down beside), 20 (bucket 32), then a slot reused mid-run.
  for (int i = 0; i < 2; ++i) step(0, 64, 1, -1);
  step(8, 40, 1, -1);
  step(0, 32, 1, -1);
  step(30, 20, 1, -1);
  const std::vector<int32_t> reused = resident({0, 1, 2, 4});
  REQUIRE(reused[3] == slot[3]);
  for (auto& s : state) {
    for (int i = 48; i < 56; ++i) s[i].slot = reused[3];
  }
  step(0, 64, 1, -1);
  step(32, 32, 1, -1);
  step(40, 16, 2, 4);  // eager, 32 tokens of d8 and e12 (the reused slot): qkv and gate_up
  step(44, 12, 1, -1);  // bucket 16 from its graph again, with the reused slot
  CHECK(gpu.model->graph_steps() == 12);
}

TEST_CASE("WarmUp chooses every GEMM algorithm up front: prefill and decode steps of any length add none") {
  testing::TinyModelOptions mo;
  mo.vocab = 512; mo.hidden = 256; mo.layers = 2; mo.heads = 4; mo.kv_heads = 2; mo.head_dim = 64;
  mo.intermediate = 512; mo.dtype = DType::kBF16;
  const std::string dir = testing::MakeTempDir("cuda-prepare-gemm");
  REQUIRE(testing::WriteTinyModel(dir, mo).ok());
  auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  Executor e = MakeExecutor(Device::kCuda, dir, *spec);
  auto before = ops::cuda::GemmAlgorithmsForTest(e.ops.get());
  REQUIRE(before.ok());
  auto warmed = e.model->WarmUp();
  INFO(warmed.status().message());
  REQUIRE(warmed.ok());
  auto after = ops::cuda::GemmAlgorithmsForTest(e.ops.get());
  REQUIRE(after.ok());
  // Each projection at row buckets 1, 2, 4, ..., 256 (max_tokens) and the logits at 1..8
  // (max_seqs): the warm-up chose them (two projections share a shape here).
  std::printf("GEMM algorithms: %lld before WarmUp, %lld after\n", static_cast<long long>(*before),
              static_cast<long long>(*after));
  CHECK(*after >= *before + 3 * 9 + 4);
  // Prefill steps of lengths no step ran before, chunked and mixed with decode rows, choose none.
  uint32_t seed = 40;
  for (const std::vector<int32_t>& counts : std::vector<std::vector<int32_t>>{{37}, {129, 5}, {256}, {3, 1, 1}, {200, 33}}) {
    std::vector<Seq> seqs(counts.size());
    for (size_t s = 0; s < seqs.size(); ++s) {
      seqs[s].tokens = RandomTokens(counts[s], spec->vocab_size, ++seed);
      for (int32_t b = 0; b < kCapacity.max_blocks_per_seq; ++b) {
        seqs[s].blocks.push_back(static_cast<int32_t>(s) * kCapacity.max_blocks_per_seq + b);
      }
    }
    auto logits = e.model->Forward(MakeStep(seqs, counts));
    INFO(logits.status().message());
    REQUIRE(logits.ok());
    auto now = ops::cuda::GemmAlgorithmsForTest(e.ops.get());
    REQUIRE(now.ok());
    CHECK(*now == *after);
  }
}

}  // namespace
}  // namespace loraplex::model

int main(int argc, char** argv) {
  if (!loraplex::ops::CudaAvailable()) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
