// The CPU reference ops against naive formulas written out here, on random inputs.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "engine/ops/cpu/cpu_ops.h"
#include "engine/ops/ops.h"

namespace loraplex::ops {
namespace {

// Both sides accumulate in double over small sizes; what remains is fp32 rounding of inputs and
// outputs, so 1e-5 relative (with a 1e-6 floor) is generous and still catches any indexing bug.
constexpr double kRel = 1e-5;

std::vector<float> Random(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

TensorView View(std::vector<float>& v, Shape shape) {
  return {v.data(), DType::kF32, shape, Device::kCpu};
}
TensorView View(std::vector<int32_t>& v, Shape shape) {
  return {v.data(), DType::kI32, shape, Device::kCpu};
}

void ExpectNear(const std::vector<float>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("element " << i);
    REQUIRE(got[i] == Approx(want[i]).epsilon(kRel).margin(1e-6));
  }
}

std::unique_ptr<Ops> Cpu() {
  auto ops = CreateOps(Device::kCpu);
  REQUIRE(ops.ok());
  return std::move(ops).value();
}

TEST_CASE("CreateOps gives F32 host ops for the CPU and refuses CUDA in a CPU-only build") {
  auto ops = Cpu();
  CHECK(ops->device() == Device::kCpu);
  CHECK(ops->compute_dtype() == DType::kF32);
  if (!CudaAvailable()) CHECK(!CreateOps(Device::kCuda).ok());
}

TEST_CASE("Gemm computes x times w transposed plus beta times y") {
  auto ops = Cpu();
  const int m = 5, k = 19, n = 7;
  auto x = Random(m * k, 1), w = Random(n * k, 2), y0 = Random(m * n, 3);
  for (float beta : {0.0f, 0.5f}) {
    std::vector<float> y = y0;
    if (beta == 0.0f) std::fill(y.begin(), y.end(), NAN);  // beta 0 must not read y
    REQUIRE(ops->Gemm(View(x, {m, k}), View(w, {n, k}), beta, View(y, {m, n})).ok());
    std::vector<double> want(m * n);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double acc = beta * static_cast<double>(y0[i * n + j]);
        for (int p = 0; p < k; ++p) acc += static_cast<double>(x[i * k + p]) * w[j * k + p];
        want[i * n + j] = acc;
      }
    ExpectNear(y, want);
  }
}

TEST_CASE("Gemm refuses mismatched inner dimensions") {
  auto ops = Cpu();
  auto x = Random(6, 1), w = Random(6, 2), y = Random(4, 3);
  const auto status = ops->Gemm(View(x, {2, 3}), View(w, {3, 2}), 0.0f, View(y, {2, 2}));
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
}

std::vector<double> NaiveRmsNorm(const std::vector<float>& x, const std::vector<float>& w, int t,
                                 int h, float eps) {
  std::vector<double> out(t * h);
  for (int r = 0; r < t; ++r) {
    double ss = 0;
    for (int i = 0; i < h; ++i) ss += static_cast<double>(x[r * h + i]) * x[r * h + i];
    const double inv = 1.0 / std::sqrt(ss / h + eps);
    for (int i = 0; i < h; ++i) out[r * h + i] = x[r * h + i] * inv * w[i];
  }
  return out;
}

TEST_CASE("RmsNorm scales each row by its root mean square and the weight") {
  auto ops = Cpu();
  const int t = 3, h = 16;
  auto x = Random(t * h, 4, -3, 3), w = Random(h, 5, 0.5, 1.5), out = std::vector<float>(t * h);
  REQUIRE(ops->RmsNorm(View(x, {t, h}), View(w, {h}), 1e-5f, View(out, {t, h})).ok());
  ExpectNear(out, NaiveRmsNorm(x, w, t, h, 1e-5f));
}

TEST_CASE("AddRmsNorm adds x into the residual and normalises the sum") {
  auto ops = Cpu();
  const int t = 4, h = 12;
  auto x = Random(t * h, 6), res = Random(t * h, 7), w = Random(h, 8, 0.5, 1.5),
       out = std::vector<float>(t * h);
  std::vector<float> sum(t * h);
  for (int i = 0; i < t * h; ++i) sum[i] = x[i] + res[i];
  REQUIRE(
      ops->AddRmsNorm(View(x, {t, h}), View(res, {t, h}), View(w, {h}), 1e-6f, View(out, {t, h}))
          .ok());
  ExpectNear(res, std::vector<double>(sum.begin(), sum.end()));
  ExpectNear(out, NaiveRmsNorm(sum, w, t, h, 1e-6f));
}

TEST_CASE("RopeAndCacheKv rotates q and k rotate-half style and writes k and v to their slots") {
  auto ops = Cpu();
  const int hq = 4, hkv = 2, d = 8, t = 3, block_size = 4, num_blocks = 3;
  const int width = (hq + 2 * hkv) * d;
  auto qkv = Random(t * width, 9), inv_freq = Random(d / 2, 10, 0.01f, 1.0f);
  const auto original = qkv;
  std::vector<int32_t> positions = {0, 5, 11}, slots = {9, -1, 2}, token_seq = {0, 0, 1};
  std::vector<float> k_cache(num_blocks * block_size * hkv * d, 7.0f), v_cache = k_cache;
  AttentionMeta meta;
  meta.positions = positions.data();
  meta.slot_mapping = slots.data();
  meta.token_seq = token_seq.data();
  meta.num_tokens = t;
  meta.block_size = block_size;
  const KvCacheView cache{View(k_cache, {num_blocks, block_size, hkv, d}),
                          View(v_cache, {num_blocks, block_size, hkv, d})};
  REQUIRE(
      ops->RopeAndCacheKv(View(qkv, {t, width}), View(inv_freq, {d / 2}), hq, hkv, d, meta, cache)
          .ok());

  // Hugging Face: emb = cat(freqs, freqs); x·cos(emb) + rotate_half(x)·sin(emb), rotate_half =
  // cat(-x2, x1).
  std::vector<double> want(original.begin(), original.end());
  for (int r = 0; r < t; ++r) {
    for (int head = 0; head < hq + hkv; ++head) {
      const float* x = &original[r * width + head * d];
      for (int i = 0; i < d; ++i) {
        const double angle = static_cast<float>(positions[r]) * inv_freq[i % (d / 2)];
        const double rot = i < d / 2 ? -x[i + d / 2] : x[i - d / 2];
        want[r * width + head * d + i] = x[i] * std::cos(angle) + rot * std::sin(angle);
      }
    }
  }
  ExpectNear(qkv, want);
  for (int r = 0; r < t; ++r) {
    if (slots[r] < 0) continue;
    for (int i = 0; i < hkv * d; ++i) {
      CHECK(k_cache[slots[r] * hkv * d + i] == qkv[r * width + hq * d + i]);
      CHECK(v_cache[slots[r] * hkv * d + i] == original[r * width + (hq + hkv) * d + i]);
    }
  }
  // Only the two written slots changed.
  int changed = 0;
  for (size_t i = 0; i < k_cache.size(); ++i) changed += k_cache[i] != 7.0f;
  CHECK(changed == 2 * hkv * d);
}

TEST_CASE("Attention over a shuffled paged cache equals dense causal attention with GQA") {
  auto ops = Cpu();
  const int hq = 4, hkv = 2, d = 8, block_size = 4, num_blocks = 8, max_blocks = 4;
  const int width = (hq + 2 * hkv) * d;
  const std::vector<int> seq_len = {7, 10};
  // Blocks handed out out of order, as a free list would after churn.
  std::vector<int32_t> block_tables = {5, 0, 0, 0, 3, 7, 1, 0};
  // Dense K/V of every sequence, [len, Hkv, D].
  std::vector<std::vector<float>> dense_k, dense_v;
  std::vector<float> k_cache(num_blocks * block_size * hkv * d, NAN), v_cache = k_cache;
  for (int s = 0; s < 2; ++s) {
    dense_k.push_back(Random(seq_len[s] * hkv * d, 20 + s));
    dense_v.push_back(Random(seq_len[s] * hkv * d, 30 + s));
    for (int p = 0; p < seq_len[s]; ++p) {
      const int slot = block_tables[s * max_blocks + p / block_size] * block_size + p % block_size;
      std::copy_n(&dense_k[s][p * hkv * d], hkv * d, &k_cache[slot * hkv * d]);
      std::copy_n(&dense_v[s][p * hkv * d], hkv * d, &v_cache[slot * hkv * d]);
    }
  }
  // The step: all of sequence 0 (prefill), the last 3 tokens of sequence 1 (a later chunk).
  std::vector<int32_t> positions = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9},
                       token_seq = {0, 0, 0, 0, 0, 0, 0, 1, 1, 1};
  std::vector<int32_t> context_lens = {7, 10}, slots(10, -1);
  const int t = 10;
  auto qkv = Random(t * width, 40);
  std::vector<float> out(t * hq * d, NAN);
  AttentionMeta meta;
  meta.positions = positions.data();
  meta.slot_mapping = slots.data();
  meta.token_seq = token_seq.data();
  meta.context_lens = context_lens.data();
  meta.block_tables = block_tables.data();
  meta.num_tokens = t;
  meta.max_seqs = 2;
  meta.max_blocks_per_seq = max_blocks;
  meta.block_size = block_size;
  meta.max_context_len = 10;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const KvCacheView cache{View(k_cache, {num_blocks, block_size, hkv, d}),
                          View(v_cache, {num_blocks, block_size, hkv, d})};
  REQUIRE(
      ops->Attention(View(qkv, {t, width}), hq, hkv, d, scale, meta, cache, View(out, {t, hq * d}))
          .ok());

  std::vector<double> want(t * hq * d);
  for (int r = 0; r < t; ++r) {
    const int s = token_seq[r], pos = positions[r];
    for (int h = 0; h < hq; ++h) {
      const int kvh = h / (hq / hkv);
      std::vector<double> p(pos + 1);
      for (int j = 0; j <= pos; ++j) {
        double dot = 0;
        for (int i = 0; i < d; ++i)
          dot +=
              qkv[r * width + h * d + i] * static_cast<double>(dense_k[s][(j * hkv + kvh) * d + i]);
        p[j] = dot * scale;
      }
      const double mx = *std::max_element(p.begin(), p.end());
      double z = 0;
      for (double& e : p) z += (e = std::exp(e - mx));
      for (int i = 0; i < d; ++i) {
        double acc = 0;
        for (int j = 0; j <= pos; ++j) acc += p[j] / z * dense_v[s][(j * hkv + kvh) * d + i];
        want[r * hq * d + h * d + i] = acc;
      }
    }
  }
  ExpectNear(out, want);
}

TEST_CASE("SiluMul multiplies silu of the gate half by the up half") {
  auto ops = Cpu();
  const int t = 3, inter = 10;
  auto gu = Random(t * 2 * inter, 11, -4, 4);
  std::vector<float> out(t * inter);
  REQUIRE(ops->SiluMul(View(gu, {t, 2 * inter}), View(out, {t, inter})).ok());
  std::vector<double> want(t * inter);
  for (int r = 0; r < t; ++r)
    for (int i = 0; i < inter; ++i) {
      const double g = gu[r * 2 * inter + i];
      want[r * inter + i] = g / (1 + std::exp(-g)) * gu[r * 2 * inter + inter + i];
    }
  ExpectNear(out, want);
}

TEST_CASE("GatherRows and Embed copy the indexed rows and refuse out-of-range indices") {
  auto ops = Cpu();
  const int v = 6, h = 5;
  auto table = Random(v * h, 12);
  std::vector<int32_t> ids = {4, 0, 4, 5};
  std::vector<float> out(4 * h);
  REQUIRE(ops->Embed(View(ids, {4}), View(table, {v, h}), View(out, {4, h})).ok());
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < h; ++i) CHECK(out[r * h + i] == table[ids[r] * h + i]);
  std::vector<float> gathered(4 * h);
  REQUIRE(ops->GatherRows(View(table, {v, h}), View(ids, {4}), View(gathered, {4, h})).ok());
  CHECK(gathered == out);
  ids[2] = 6;
  CHECK(ops->Embed(View(ids, {4}), View(table, {v, h}), View(out, {4, h})).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(ops->GatherRows(View(table, {v, h}), View(ids, {4}), View(gathered, {4, h})).code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("LoraShrink and LoraExpand apply each segment's slot at its own ranks, rank 0 included") {
  auto ops = Cpu();
  const int in = 10, max_rank = 8, num_slices = 3, num_slots = 3, t = 7;
  const int widths[3] = {6, 4, 4};
  const int ranks[3][3] = {{8, 0, 4}, {0, 0, 0}, {2, 8, 1}};  // [slot][slice]
  std::vector<std::vector<float>> a_store, b_store;
  std::vector<LoraSliceWeights> table(num_slots * num_slices);
  for (int s = 0; s < num_slots; ++s)
    for (int sl = 0; sl < num_slices; ++sl) {
      const int r = ranks[s][sl];
      a_store.push_back(Random(std::max(r, 1) * in, 100 + s * 3 + sl));
      b_store.push_back(Random(widths[sl] * std::max(r, 1), 200 + s * 3 + sl));
      table[s * num_slices + sl] = {a_store.back().data(), b_store.back().data(), r,
                                    0.25f * (1 + s + sl)};
    }
  LoraModule module;
  module.table = table.data();
  module.num_slots = num_slots;
  module.num_slices = num_slices;
  module.in_features = in;
  module.max_rank = max_rank;
  module.slice_offsets[1] = 6;
  module.slice_offsets[2] = 10;
  module.slice_offsets[3] = 14;
  // Three segments over two slots (slot 2 twice, as a split prefill would give), slot 1 with rank
  // 0 everywhere, and row 2 left to the base model.
  std::vector<int32_t> token_rows = {1, 4, 0, 3, 5, 6}, seg_starts = {0, 2, 4, 5, 6},
                       seg_slots = {2, 0, 1, 2};
  std::vector<int32_t> num_segments = {4};
  std::vector<int32_t> slot_of_row = {0, 2, -1, 0, 2, 1, 2};
  LoraSegments seg{
      token_rows.data(), seg_starts.data(), seg_slots.data(), num_segments.data(), 4, t};

  auto x = Random(t * in, 13);
  std::vector<float> y(t * num_slices * max_rank, -99.0f);
  REQUIRE(ops->LoraShrink(View(x, {t, in}), seg, module, View(y, {t, num_slices * max_rank})).ok());
  for (int row = 0; row < t; ++row)
    for (int sl = 0; sl < num_slices; ++sl)
      for (int j = 0; j < max_rank; ++j) {
        const float got = y[(row * num_slices + sl) * max_rank + j];
        const int slot = slot_of_row[row];
        if (slot < 0 || j >= ranks[slot][sl]) {
          CHECK(got == -99.0f);  // outside the slot's rank: untouched
          continue;
        }
        double want = 0;
        for (int k = 0; k < in; ++k)
          want += x[row * in + k] * static_cast<double>(a_store[slot * 3 + sl][j * in + k]);
        CHECK(got == Approx(want).epsilon(kRel).margin(1e-6));
      }

  auto out = Random(t * 14, 14);
  const auto out0 = out;
  REQUIRE(
      ops->LoraExpand(View(y, {t, num_slices * max_rank}), seg, module, View(out, {t, 14})).ok());
  std::vector<double> want(out0.begin(), out0.end());
  for (int row = 0; row < t; ++row) {
    const int slot = slot_of_row[row];
    if (slot < 0) continue;
    for (int sl = 0; sl < num_slices; ++sl) {
      const int r = ranks[slot][sl];
      const LoraSliceWeights& w = table[slot * num_slices + sl];
      for (int n = 0; n < widths[sl]; ++n) {
        double acc = 0;
        for (int j = 0; j < r; ++j) {
          acc += static_cast<double>(y[(row * num_slices + sl) * max_rank + j]) *
                 b_store[slot * 3 + sl][n * r + j];
        }
        want[row * 14 + module.slice_offsets[sl] + n] += w.scale * acc;
      }
    }
  }
  ExpectNear(out, want);
}

TEST_CASE("LoRA ops refuse a segment whose slot is outside the table") {
  auto ops = Cpu();
  std::vector<LoraSliceWeights> table(1);
  LoraModule module;
  module.table = table.data();
  module.num_slots = 1;
  module.num_slices = 1;
  module.in_features = 2;
  module.max_rank = 1;
  module.slice_offsets[1] = 2;
  std::vector<int32_t> token_rows = {0}, seg_starts = {0, 1}, seg_slots = {1}, num_segments = {1};
  LoraSegments seg{
      token_rows.data(), seg_starts.data(), seg_slots.data(), num_segments.data(), 1, 1};
  std::vector<float> x(2), y(1);
  CHECK(ops->LoraShrink(View(x, {1, 2}), seg, module, View(y, {1, 1})).code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("DeviceMemory moves ownership and views its allocation at an offset") {
  auto ops = Cpu();
  auto mem = ops->Allocate(64);
  REQUIRE(mem.ok());
  DeviceMemory a = std::move(mem).value();
  void* p = a.data();
  DeviceMemory b = std::move(a);
  CHECK(a.data() == nullptr);
  CHECK(b.data() == p);
  const TensorView v = b.View(DType::kF32, {4, 2}, 32);
  CHECK(v.data == static_cast<char*>(p) + 32);
  CHECK(v.shape == Shape{4, 2});
}

}  // namespace
}  // namespace loraplex::ops
