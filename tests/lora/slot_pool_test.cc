#include "lora/slot_pool.h"

#include <algorithm>

#include <catch2/catch.hpp>

#include "tests/lora/lora_test_util.h"

namespace loraplex::lora {
namespace {

using model::Proj;

constexpr WrappedLayer kAllWrapped[] = {WrappedLayer::kQkv, WrappedLayer::kO, WrappedLayer::kGateUp,
                                        WrappedLayer::kDown};

std::vector<Proj> SlicesOf(WrappedLayer w) {
  switch (w) {
    case WrappedLayer::kQkv: return {Proj::kQ, Proj::kK, Proj::kV};
    case WrappedLayer::kO: return {Proj::kO};
    case WrappedLayer::kGateUp: return {Proj::kGate, Proj::kUp};
    case WrappedLayer::kDown: return {Proj::kDown};
  }
  return {};
}

struct Fixture {
  std::unique_ptr<ops::Ops> ops;
  std::unique_ptr<SlotPool> pool;
  Fixture(int32_t num_slots, int32_t max_rank = 16) {
    auto created = ops::CreateOps(Device::kCpu);
    REQUIRE(created.ok());
    ops = std::move(*created);
    auto p = SlotPool::Create(ops.get(), test::Spec(), num_slots, max_rank);
    REQUIRE(p.ok());
    pool = std::move(*p);
  }
  std::vector<int32_t> Ensure(const std::vector<const LoadedAdapter*>& adapters, std::vector<bool> pinned = {}) {
    if (pinned.empty()) pinned.assign(adapters.size(), false);
    auto slots = pool->EnsureResident(adapters, pinned);
    INFO(slots.status().ToString());
    REQUIRE(slots.ok());
    return *slots;
  }
  // The slot's table entries of one wrapped layer, read back from "device" memory.
  std::vector<ops::LoraSliceWeights> Entries(int64_t layer, WrappedLayer w, int32_t slot) {
    const ops::LoraModule& m = pool->module(layer, w);
    std::vector<ops::LoraSliceWeights> out(static_cast<size_t>(m.num_slices));
    REQUIRE(ops->CopyToHost(out.data(), m.table + static_cast<ptrdiff_t>(slot) * m.num_slices,
                            out.size() * sizeof(ops::LoraSliceWeights))
                .ok());
    return out;
  }
  std::vector<float> Read(const void* device, int64_t count) {
    std::vector<float> out(static_cast<size_t>(count));
    REQUIRE(ops->CopyToHost(out.data(), device, out.size() * sizeof(float)).ok());
    return out;
  }
};

std::vector<float> Floats(const HostTensor& t) {
  return std::vector<float>(t.As<float>(), t.As<float>() + t.shape().NumElements());
}

std::shared_ptr<const LoadedAdapter> Adapter(const std::string& name, testing::TinyAdapterOptions o = {}) {
  return test::MustLoad(name, test::WriteAdapter(o));
}

// Checks every table entry of `slot` against `a`: the adapter's weights where it has a module,
// rank 0 and null pointers where it has none.
void CheckSlotHolds(Fixture& f, int32_t slot, const LoadedAdapter& a) {
  for (int64_t l = 0; l < 2; ++l) {
    for (WrappedLayer w : kAllWrapped) {
      const std::vector<Proj> slices = SlicesOf(w);
      const std::vector<ops::LoraSliceWeights> entries = f.Entries(l, w, slot);
      for (size_t s = 0; s < slices.size(); ++s) {
        INFO("layer " << l << " " << model::ProjName(slices[s]));
        const AdapterModule& m = a.module(l, slices[s]);
        CHECK(entries[s].rank == m.rank);
        CHECK(entries[s].scale == m.scale);
        if (m.rank == 0) {
          CHECK(entries[s].a == nullptr);
          CHECK(entries[s].b == nullptr);
          continue;
        }
        CHECK(f.Read(entries[s].a, m.a.shape().NumElements()) == Floats(m.a));
        CHECK(f.Read(entries[s].b, m.b.shape().NumElements()) == Floats(m.b));
      }
    }
  }
}

TEST_CASE("SlotPool module tables describe each wrapped layer's slices") {
  Fixture f(3, 16);
  const ops::LoraModule& qkv = f.pool->module(1, WrappedLayer::kQkv);
  CHECK(qkv.num_slots == 3);
  CHECK(qkv.num_slices == 3);
  CHECK(qkv.in_features == 32);
  CHECK(qkv.max_rank == 16);
  CHECK(std::vector<int32_t>(qkv.slice_offsets, qkv.slice_offsets + 4) == std::vector<int32_t>{0, 32, 48, 64});
  const ops::LoraModule& gate_up = f.pool->module(0, WrappedLayer::kGateUp);
  CHECK(gate_up.num_slices == 2);
  CHECK(std::vector<int32_t>(gate_up.slice_offsets, gate_up.slice_offsets + 3) == std::vector<int32_t>{0, 64, 128});
  CHECK(f.pool->module(0, WrappedLayer::kO).in_features == 32);
  CHECK(f.pool->module(0, WrappedLayer::kDown).in_features == 64);
  CHECK(f.pool->module(0, WrappedLayer::kDown).slice_offsets[1] == 32);
  // Fresh tables say "not adapted" for every slot.
  for (WrappedLayer w : kAllWrapped) {
    for (const ops::LoraSliceWeights& e : f.Entries(1, w, 2)) {
      CHECK(e.rank == 0);
      CHECK(e.a == nullptr);
    }
  }
}

TEST_CASE("SlotPool weights read back from a slot equal the adapter's") {
  Fixture f(2);
  testing::TinyAdapterOptions o;
  o.rank_pattern = {{"down_proj", 8}};
  o.layers_to_transform = {1};
  auto a = Adapter("a", o);
  const std::vector<int32_t> slots = f.Ensure({a.get()});
  REQUIRE(slots.size() == 1);
  CheckSlotHolds(f, slots[0], *a);
  CHECK(f.pool->uploads() == 1);
  CHECK(f.pool->used_slots() == 1);
  CHECK(f.Ensure({a.get(), a.get()}) == std::vector<int32_t>{slots[0], slots[0]});
  CHECK(f.pool->uploads() == 1);  // already resident: not copied again
}

TEST_CASE("SlotPool stages an upload over several threads and copies the same bytes") {
  // One staging thread per KiB: as many threads as the machine allows (at least 2 where it has
  // 2 cores), each staging its share of the pieces, conversions included.
  Fixture f(3);
  f.pool->set_staging_for_test(1024, 256u << 20);
  testing::TinyAdapterOptions o;
  o.rank_pattern = {{"down_proj", 8}, {"q_proj", 12}};
  auto a = Adapter("a", o);
  auto b = test::MustLoad("bf", test::WriteAdapter({}), DType::kBF16);
  auto c = Adapter("c");
  const std::vector<int32_t> slots = f.Ensure({a.get(), c.get()});
  CheckSlotHolds(f, slots[0], *a);
  CheckSlotHolds(f, slots[1], *c);
  const int32_t slot_b = f.Ensure({b.get()})[0];
  const ops::LoraSliceWeights e = f.Entries(1, WrappedLayer::kGateUp, slot_b)[1];
  const HostTensor& up = b->module(1, Proj::kUp).b;
  const std::vector<float> got = f.Read(e.b, up.shape().NumElements());
  for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Bf16ToFloat(up.As<uint16_t>()[i]));
  CHECK(f.pool->uploads() == 3);
}

TEST_CASE("SlotPool uploads in staging chunks, or without staging, copy the same bytes") {
  for (size_t max_bytes : {size_t{4096}, size_t{1}, size_t{0}}) {
    // 4 KiB: many chunks; 1 byte: a chunk a piece (staging holds the largest piece); 0: none.
    INFO("max staging bytes " << max_bytes);
    Fixture f(2);
    f.pool->set_staging_for_test(1024, max_bytes);
    testing::TinyAdapterOptions o;
    o.rank_pattern = {{"down_proj", 8}};
    auto a = Adapter("a", o);
    auto b = test::MustLoad("bf", test::WriteAdapter({}), DType::kBF16);
    const std::vector<int32_t> slots = f.Ensure({a.get(), b.get()});
    CheckSlotHolds(f, slots[0], *a);
    const ops::LoraSliceWeights e = f.Entries(0, WrappedLayer::kDown, slots[1])[0];
    const HostTensor& down = b->module(0, Proj::kDown).b;
    const std::vector<float> got = f.Read(e.b, down.shape().NumElements());
    for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Bf16ToFloat(down.As<uint16_t>()[i]));
  }
}

TEST_CASE("SlotPool converts BF16 host weights to the device compute dtype") {
  Fixture f(1);
  auto a = test::MustLoad("bf", test::WriteAdapter({}), DType::kBF16);
  const int32_t slot = f.Ensure({a.get()})[0];
  const ops::LoraSliceWeights e = f.Entries(0, WrappedLayer::kO, slot)[0];
  const HostTensor& b = a->module(0, Proj::kO).b;
  const std::vector<float> got = f.Read(e.b, b.shape().NumElements());
  for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Bf16ToFloat(b.As<uint16_t>()[i]));  // exact widening
}

TEST_CASE("SlotPool evicts the least recently used unpinned adapter") {
  Fixture f(2);
  auto a = Adapter("a");
  auto b = Adapter("b");
  auto c = Adapter("c");
  const int32_t slot_a = f.Ensure({a.get()})[0];
  const int32_t slot_b = f.Ensure({b.get()})[0];
  CHECK(slot_a != slot_b);
  f.Ensure({a.get()});  // a is now more recent than b
  CHECK(f.Ensure({c.get()})[0] == slot_b);
  CHECK(f.pool->resident_names() == std::vector<std::string>{"a", "c"});
  CHECK(f.pool->uploads() == 3);
  CheckSlotHolds(f, slot_b, *c);
  CheckSlotHolds(f, slot_a, *a);
}

TEST_CASE("SlotPool never evicts a pinned adapter") {
  Fixture f(2);
  auto a = Adapter("a");
  auto b = Adapter("b");
  auto c = Adapter("c");
  auto d = Adapter("d");
  const int32_t slot_a = f.Ensure({a.get()}, {true})[0];
  f.Ensure({b.get()});
  f.Ensure({c.get()});  // evicts b, the only unpinned one
  f.Ensure({d.get()});  // a is least recently used but pinned: c goes
  CHECK(f.pool->resident_names() == std::vector<std::string>{"a", "d"});
  CHECK(f.Ensure({a.get()}, {true})[0] == slot_a);
  CHECK(f.pool->uploads() == 4);
}

TEST_CASE("SlotPool is RESOURCE_EXHAUSTED when pinned or in-step adapters fill it, and changes nothing") {
  Fixture f(2);
  auto a = Adapter("a");
  auto b = Adapter("b");
  auto c = Adapter("c");
  SECTION("all slots pinned") {
    f.Ensure({a.get(), b.get()}, {true, true});
    auto r = f.pool->EnsureResident({c.get()}, {false});
    CHECK(r.status().code() == absl::StatusCode::kResourceExhausted);
    CHECK(f.pool->resident_names() == std::vector<std::string>{"a", "b"});
    CHECK(f.pool->uploads() == 2);
  }
  SECTION("more distinct adapters in one step than slots") {
    f.Ensure({a.get()});
    auto r = f.pool->EnsureResident({b.get(), c.get(), a.get()}, {false, false, false});
    CHECK(r.status().code() == absl::StatusCode::kResourceExhausted);
    CHECK(f.pool->resident_names() == std::vector<std::string>{"a"});
    CHECK(f.pool->uploads() == 1);
  }
}

TEST_CASE("A slot reused by an adapter with fewer targets has rank 0 entries for the others") {
  Fixture f(1);
  auto full = Adapter("full");
  testing::TinyAdapterOptions o;
  o.target_modules = {"q_proj"};
  o.layers_to_transform = {0};
  o.seed = 99;
  auto small = Adapter("small", o);
  const int32_t slot = f.Ensure({full.get()})[0];
  REQUIRE(f.Ensure({small.get()})[0] == slot);
  CheckSlotHolds(f, slot, *small);
  CHECK(f.Entries(1, WrappedLayer::kQkv, slot)[0].rank == 0);  // layer 1 q had full's weights
}

TEST_CASE("SlotPool slot_rank bounds every rank in the slot's table entries") {
  Fixture f(2);
  testing::TinyAdapterOptions o;
  o.r = 4;
  o.rank_pattern = {{"down_proj", 8}};  // one module type above the rest
  auto r8 = Adapter("r8", o);
  o.rank_pattern.clear();
  o.seed = 8;
  auto r4 = Adapter("r4", o);
  CHECK(f.pool->slot_rank(0) == 0);  // never written
  CHECK(f.pool->slot_rank(-1) == 0);
  CHECK(f.pool->slot_rank(2) == 0);
  const int32_t slot = f.Ensure({r8.get()})[0];
  CHECK(f.pool->slot_rank(slot) == 8);
  // Every entry of the slot is at most the bound, and some entry reaches it.
  int32_t largest = 0;
  for (int64_t l = 0; l < test::Spec().num_layers; ++l) {
    for (WrappedLayer w : kAllWrapped) {
      for (const ops::LoraSliceWeights& e : f.Entries(l, w, slot)) largest = std::max(largest, e.rank);
    }
  }
  CHECK(largest == 8);
  // Evicted: the entries stay until the next upload, and so does the bound.
  f.pool->Evict(r8->uid);
  CHECK(f.pool->slot_rank(slot) == 8);
  // Reused by a smaller adapter: every entry rewritten, the bound drops with them.
  Fixture g(1);
  g.Ensure({r8.get()});
  g.Ensure({r4.get()});
  CHECK(g.pool->slot_rank(0) == 4);
}

TEST_CASE("SlotPool Evict frees the adapter's slot") {
  Fixture f(2);
  auto a = Adapter("a");
  f.Ensure({a.get()});
  f.pool->Evict(a->uid);
  CHECK(f.pool->used_slots() == 0);
  CHECK(f.pool->resident_names().empty());
  f.Ensure({a.get()});
  CHECK(f.pool->uploads() == 2);
}

TEST_CASE("SlotPool refuses an adapter whose rank exceeds the pool's") {
  Fixture f(1, /*max_rank=*/4);
  testing::TinyAdapterOptions o;
  o.r = 8;
  auto a = Adapter("wide", o);
  auto r = f.pool->EnsureResident({a.get()}, {false});
  CHECK(r.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(f.pool->used_slots() == 0);
}

}  // namespace
}  // namespace loraplex::lora
