// The LoRA-wrapped parallel linear layers on the CPU ops against dense x·(W + s·B·A)ᵀ, and the
// tensor-parallel slicing of their weights. LoRA tables are built by hand with host pointers
// (CPU "device" memory is host memory).
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "engine/layers/linear_with_lora.h"
#include "engine/layers/sharding.h"
#include "engine/ops/ops.h"
#include "lora/lora_batch.h"

namespace loraplex::layers {
namespace {

// Double-accumulated on both sides; only fp32 rounding of stored values differs.
constexpr double kRel = 1e-5;

HostTensor RandomTensor(Shape shape, uint32_t seed) {
  HostTensor t(DType::kF32, shape);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1, 1);
  for (int64_t i = 0; i < shape.NumElements(); ++i) t.As<float>()[i] = dist(gen);
  return t;
}

model::ModelSpec SmallSpec() {
  model::ModelSpec spec;
  spec.hidden_size = 16;
  spec.intermediate_size = 12;
  spec.num_heads = 4;
  spec.num_kv_heads = 2;
  spec.head_dim = 4;
  spec.vocab_size = 10;
  spec.num_layers = 1;
  return spec;
}

// One ops for the whole binary: layers free their weights through it, so it outlives them all.
ops::Ops& Cpu() {
  static std::unique_ptr<ops::Ops> ops = std::move(ops::CreateOps(Device::kCpu)).value();
  return *ops;
}

// Per-slot, per-slice LoRA weights of a layer plus the table the ops read.
struct HandTable {
  std::vector<HostTensor> a, b;  // [slot * slices + slice]
  std::vector<ops::LoraSliceWeights> table;
  ops::LoraModule module;
};

HandTable MakeTable(const LinearWithLora& layer, const std::vector<std::vector<int>>& ranks,
                    int max_rank) {
  HandTable h;
  const int slices = layer.num_slices();
  for (size_t slot = 0; slot < ranks.size(); ++slot)
    for (int s = 0; s < slices; ++s) {
      const int r = ranks[slot][static_cast<size_t>(s)];
      const uint32_t seed = static_cast<uint32_t>(100 + slot * 10 + static_cast<size_t>(s));
      h.a.push_back(RandomTensor({std::max(r, 1), layer.in_features()}, seed));
      h.b.push_back(RandomTensor({layer.slice_width(s), std::max(r, 1)}, seed + 1000));
    }
  for (size_t i = 0; i < h.a.size(); ++i) {
    const int r = ranks[i / static_cast<size_t>(slices)][i % static_cast<size_t>(slices)];
    h.table.push_back({h.a[i].data(), h.b[i].data(), r, 0.5f + 0.25f * static_cast<float>(i)});
  }
  h.module.table = h.table.data();
  h.module.num_slots = static_cast<int32_t>(ranks.size());
  h.module.num_slices = slices;
  h.module.in_features = static_cast<int32_t>(layer.in_features());
  h.module.max_rank = max_rank;
  int64_t off = 0;
  for (int s = 0; s < slices; ++s) {
    h.module.slice_offsets[s] = static_cast<int32_t>(off);
    off += layer.slice_width(s);
  }
  h.module.slice_offsets[slices] = static_cast<int32_t>(off);
  return h;
}

// Runs `layer` on random x where token t uses adapter slot token_slots[t] (-1: base) and checks
// every output against x·(W + s·B·A)ᵀ with W the layer's own (sharded, fused) weight.
void ExpectMatchesDense(LinearWithLora& layer, const HostTensor& weight,
                        const std::vector<std::vector<int>>& ranks,
                        const std::vector<int32_t>& token_slots) {
  ops::Ops& ops = Cpu();
  REQUIRE(layer.SetWeight(ops, weight).ok());
  HandTable h = MakeTable(layer, ranks, 4);
  REQUIRE(layer.SetLora(&h.module).ok());
  const int64_t t = static_cast<int64_t>(token_slots.size()), in = layer.in_features(),
                out = layer.out_features();
  HostTensor x = RandomTensor({t, in}, 7);
  HostTensor y(DType::kF32, {t, out});
  std::vector<float> scratch(static_cast<size_t>(t * layer.num_slices() * 4), NAN);
  lora::LoraBatch batch = lora::BuildLoraBatch(token_slots);
  std::vector<int32_t> num_segments = {batch.num_segments()};
  ops::LoraSegments seg{batch.token_rows.data(), batch.seg_starts.data(), batch.seg_slots.data(),
                        num_segments.data(),     batch.num_segments(),    static_cast<int32_t>(t)};
  const TensorView scratch_view{
      scratch.data(), DType::kF32, {static_cast<int64_t>(scratch.size())}, Device::kCpu};
  REQUIRE(layer.Forward(ops, x.view(), &seg, scratch_view, y.view()).ok());

  for (int64_t row = 0; row < t; ++row) {
    const int32_t slot = token_slots[static_cast<size_t>(row)];
    for (int s = 0, col = 0; s < layer.num_slices(); ++s) {
      for (int64_t n = 0; n < layer.slice_width(s); ++n, ++col) {
        double want = 0;
        for (int64_t k = 0; k < in; ++k) {
          double w = weight.As<float>()[col * in + k];
          if (slot >= 0) {
            const size_t i = static_cast<size_t>(slot * layer.num_slices() + s);
            const int r = ranks[static_cast<size_t>(slot)][static_cast<size_t>(s)];
            double ba = 0;
            for (int j = 0; j < r; ++j)
              ba += static_cast<double>(h.b[i].As<float>()[n * r + j]) *
                    h.a[i].As<float>()[j * in + k];
            w += h.table[i].scale * ba;
          }
          want += x.As<float>()[row * in + k] * w;
        }
        INFO("token " << row << " slot " << slot << " slice " << s << " column " << n);
        CHECK(y.As<float>()[row * out + col] == Approx(want).epsilon(kRel).margin(1e-5));
      }
    }
  }
}

TEST_CASE(
    "QkvParallelLinearWithLora equals x·(W + s·B·A)ᵀ per token for mixed adapters and ranks") {
  const auto spec = SmallSpec();
  auto layer = QkvParallelLinearWithLora::Create(spec, {});
  REQUIRE(layer.ok());
  CHECK(layer->out_features() == 16 + 8 + 8);
  auto w = layer->ShardWeight(RandomTensor({16, 16}, 1), RandomTensor({8, 16}, 2),
                              RandomTensor({8, 16}, 3));
  REQUIRE(w.ok());
  // Slot 0 adapts q and k, slot 1 everything at other ranks, slot 2 nothing (rank 0 throughout).
  ExpectMatchesDense(*layer, *w, {{4, 2, 0}, {1, 3, 4}, {0, 0, 0}}, {-1, 0, 1, 0, 2, 1, -1});
}

TEST_CASE("MergedColumnParallelLinearWithLora equals x·(W + s·B·A)ᵀ for gate and up") {
  auto layer = MergedColumnParallelLinearWithLora::Create(SmallSpec(), {});
  REQUIRE(layer.ok());
  auto w = layer->ShardWeight(RandomTensor({12, 16}, 4), RandomTensor({12, 16}, 5));
  REQUIRE(w.ok());
  ExpectMatchesDense(*layer, *w, {{2, 4}, {3, 0}}, {1, 1, 0, -1, 0});
}

TEST_CASE("RowParallelLinearWithLora equals x·(W + s·B·A)ᵀ at tp 1") {
  auto layer = RowParallelLinearWithLora::Create(12, 16, {});
  REQUIRE(layer.ok());
  auto w = layer->ShardWeight(RandomTensor({16, 12}, 6));
  REQUIRE(w.ok());
  ExpectMatchesDense(*layer, *w, {{4}, {1}}, {0, 1, -1, 1});
}

TEST_CASE("Qkv sharding at tp 2 slices q, k and v separately by head") {
  const auto spec = SmallSpec();  // 4 q heads, 2 kv heads, head_dim 4
  const HostTensor q = RandomTensor({16, 16}, 1), k = RandomTensor({8, 16}, 2),
                   v = RandomTensor({8, 16}, 3);
  auto layer = QkvParallelLinearWithLora::Create(spec, {2, 1});
  REQUIRE(layer.ok());
  CHECK(layer->num_q_heads() == 2);
  CHECK(layer->num_kv_heads() == 1);
  CHECK(layer->slice_width(0) == 8);
  CHECK(layer->slice_width(1) == 4);
  CHECK(layer->slice_width(2) == 4);
  auto w = layer->ShardWeight(q, k, v);
  REQUIRE(w.ok());
  REQUIRE(w->shape() == Shape{16, 16});
  // Rank 1 holds q rows 8..15, then k rows 4..7, then v rows 4..7.
  auto row = [&](int r) { return w->As<float>() + r * 16; };
  for (int c = 0; c < 16; ++c) {
    CHECK(row(0)[c] == q.As<float>()[8 * 16 + c]);
    CHECK(row(7)[c] == q.As<float>()[15 * 16 + c]);
    CHECK(row(8)[c] == k.As<float>()[4 * 16 + c]);
    CHECK(row(11)[c] == k.As<float>()[7 * 16 + c]);
    CHECK(row(12)[c] == v.As<float>()[4 * 16 + c]);
    CHECK(row(15)[c] == v.As<float>()[7 * 16 + c]);
  }
}

TEST_CASE("Qkv sharding replicates each kv head when tp exceeds the kv heads") {
  const auto spec = SmallSpec();
  const HostTensor q = RandomTensor({16, 16}, 1), k = RandomTensor({8, 16}, 2),
                   v = RandomTensor({8, 16}, 3);
  for (int rank = 0; rank < 4; ++rank) {
    auto layer = QkvParallelLinearWithLora::Create(spec, {4, rank});
    REQUIRE(layer.ok());
    CHECK(layer->num_q_heads() == 1);
    CHECK(layer->num_kv_heads() == 1);
    CHECK(layer->slice_row_begin(0) == rank * 4);
    CHECK(layer->slice_row_begin(1) == (rank / 2) * 4);  // ranks 0,1 share kv head 0; 2,3 head 1
    auto w = layer->ShardWeight(q, k, v);
    REQUIRE(w.ok());
    CHECK(w->As<float>()[4 * 16] == k.As<float>()[(rank / 2) * 4 * 16]);
  }
  CHECK(QkvParallelLinearWithLora::Create(spec, {3, 0}).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Merged sharding at tp 2 takes this rank's gate rows, then its up rows") {
  const HostTensor gate = RandomTensor({12, 16}, 4), up = RandomTensor({12, 16}, 5);
  auto layer = MergedColumnParallelLinearWithLora::Create(SmallSpec(), {2, 1});
  REQUIRE(layer.ok());
  auto w = layer->ShardWeight(gate, up);
  REQUIRE(w.ok());
  REQUIRE(w->shape() == Shape{12, 16});
  CHECK(w->As<float>()[0] == gate.As<float>()[6 * 16]);
  CHECK(w->As<float>()[5 * 16 + 3] == gate.As<float>()[11 * 16 + 3]);
  CHECK(w->As<float>()[6 * 16] == up.As<float>()[6 * 16]);
  CHECK(w->As<float>()[11 * 16 + 3] == up.As<float>()[11 * 16 + 3]);
}

TEST_CASE("Row-parallel partial outputs at tp 2, LoRA delta included, sum to the tp 1 output") {
  ops::Ops& ops = Cpu();
  const int64_t in = 12, out = 16, t = 3;
  const HostTensor w_full = RandomTensor({out, in}, 8), x = RandomTensor({t, in}, 9);
  const HostTensor a_full = RandomTensor({2, in}, 10), b = RandomTensor({out, 2}, 11);
  std::vector<int32_t> rows = {0, 1, 2}, starts = {0, 3}, slots = {0}, count = {1};
  ops::LoraSegments seg{rows.data(), starts.data(),          slots.data(), count.data(),
                        1,           static_cast<int32_t>(t)};
  std::vector<float> scratch(static_cast<size_t>(t * 2));
  const TensorView scratch_view{scratch.data(), DType::kF32, {t * 2}, Device::kCpu};
  std::vector<double> sum(static_cast<size_t>(t * out), 0.0), full(static_cast<size_t>(t * out));
  for (int tp : {1, 2}) {
    for (int rank = 0; rank < tp; ++rank) {
      auto layer = RowParallelLinearWithLora::Create(in, out, {tp, rank});
      REQUIRE(layer.ok());
      auto w = layer->ShardWeight(w_full);
      REQUIRE(w.ok());
      REQUIRE(layer->SetWeight(ops, *w).ok());
      // A is cut by the same input columns as the base weight; B stays whole.
      auto a = SliceCols(a_full, layer->in_begin(), layer->in_features());
      REQUIRE(a.ok());
      auto xs = SliceCols(x, layer->in_begin(), layer->in_features());
      REQUIRE(xs.ok());
      const ops::LoraSliceWeights table{a->data(), b.data(), 2, 0.75f};
      ops::LoraModule module;
      module.table = &table;
      module.num_slots = 1;
      module.num_slices = 1;
      module.in_features = static_cast<int32_t>(layer->in_features());
      module.max_rank = 2;
      module.slice_offsets[1] = static_cast<int32_t>(out);
      REQUIRE(layer->SetLora(&module).ok());
      HostTensor y(DType::kF32, {t, out});
      REQUIRE(layer->Forward(ops, xs->view(), &seg, scratch_view, y.view()).ok());
      for (int64_t i = 0; i < t * out; ++i)
        (tp == 1 ? full : sum)[static_cast<size_t>(i)] += y.As<float>()[i];
    }
  }
  for (size_t i = 0; i < sum.size(); ++i)
    CHECK(sum[i] == Approx(full[i]).epsilon(kRel).margin(1e-5));
}

TEST_CASE("SetLora refuses a table whose slices differ from the layer's partition sizes") {
  auto layer = QkvParallelLinearWithLora::Create(SmallSpec(), {});
  REQUIRE(layer.ok());
  ops::LoraModule module;
  module.num_slots = 1;
  module.num_slices = 3;
  module.in_features = 16;
  module.max_rank = 4;
  module.slice_offsets[1] = 16;
  module.slice_offsets[2] = 20;  // k cut as if it were 4 wide: the layer's k slice is 8
  module.slice_offsets[3] = 28;
  CHECK(layer->SetLora(&module).code() == absl::StatusCode::kInvalidArgument);
  module.slice_offsets[2] = 24;
  module.slice_offsets[3] = 32;
  CHECK(layer->SetLora(&module).ok());
}

TEST_CASE("Layers refuse partitions that do not split evenly and bad ranks") {
  CHECK(MergedColumnParallelLinearWithLora::Create(SmallSpec(), {5, 0}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(RowParallelLinearWithLora::Create(12, 16, {2, 2}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(ColumnParallelLinearWithLora::Create(10, 16, {4, 0}).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace loraplex::layers
