#include "lora/registry.h"

#include <filesystem>
#include <thread>

#include <catch2/catch.hpp>

#include "tests/lora/lora_test_util.h"

namespace loraplex::lora {
namespace {

AdapterRegistry MakeRegistry(int64_t max_adapters = 16) {
  return AdapterRegistry(test::Spec(), test::Limits(), DType::kF32, max_adapters);
}

std::vector<std::string> Names(const AdapterRegistry& r) {
  std::vector<std::string> names;
  for (const AdapterInfo& info : r.List()) names.push_back(info.name);
  return names;
}

TEST_CASE("AdapterRegistry lists loaded adapters sorted by name") {
  AdapterRegistry registry = MakeRegistry();
  testing::TinyAdapterOptions o;
  o.r = 8;
  o.alpha = 16.0;
  o.target_modules = {"q_proj", "v_proj"};
  const std::string dir = test::WriteAdapter(o);
  REQUIRE(registry.Load("zeta", dir).ok());
  REQUIRE(registry.Load("alpha", dir, /*pinned=*/true).ok());
  const std::vector<AdapterInfo> list = registry.List();
  REQUIRE(list.size() == 2);
  CHECK(list[0].name == "alpha");
  CHECK(list[0].pinned);
  CHECK(list[1].name == "zeta");
  CHECK_FALSE(list[1].pinned);
  CHECK(list[1].rank == 8);
  CHECK(list[1].alpha == 16.0f);
  CHECK(list[1].target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK(list[1].weight_bytes > 0);
}

TEST_CASE("AdapterRegistry refuses a duplicate name") {
  AdapterRegistry registry = MakeRegistry();
  const std::string dir = test::WriteAdapter({});
  REQUIRE(registry.Load("a", dir).ok());
  const absl::Status st = registry.Load("a", dir);
  CHECK(st.code() == absl::StatusCode::kAlreadyExists);
  CHECK(std::string(st.message()) == "adapter 'a' already exists");
}

TEST_CASE("AdapterRegistry refuses names outside [A-Za-z0-9._-]{1,128}") {
  AdapterRegistry registry = MakeRegistry();
  const std::string dir = test::WriteAdapter({});
  for (const std::string& bad : {std::string(), std::string("a/b"), std::string("a b"), std::string(129, 'x')}) {
    INFO(bad);
    CHECK(registry.Load(bad, dir).code() == absl::StatusCode::kInvalidArgument);
  }
  CHECK(registry.Load("Sql-v2.1_x", dir).ok());
  CHECK(registry.Load(std::string(128, 'y'), dir).ok());
}

TEST_CASE("AdapterRegistry refuses to unload an adapter in use until its refs are released") {
  AdapterRegistry registry = MakeRegistry();
  REQUIRE(registry.Load("x", test::WriteAdapter({})).ok());
  auto first = registry.Acquire("x");
  auto second = registry.Acquire("x");
  REQUIRE(first.ok());
  REQUIRE(second.ok());
  CHECK((*first)->name == "x");
  {
    AdapterRef copy = *first;  // copies share one use
    CHECK(registry.List()[0].active_requests == 2);
  }
  const absl::Status busy = registry.Unload("x");
  CHECK(busy.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(busy.message()) == "adapter 'x' is in use by 2 requests");
  *first = AdapterRef();
  CHECK(std::string(registry.Unload("x").message()) == "adapter 'x' is in use by 1 request");
  *second = AdapterRef();
  CHECK(registry.Unload("x").ok());
  CHECK(registry.Acquire("x").status().code() == absl::StatusCode::kNotFound);
  CHECK(registry.Unload("x").code() == absl::StatusCode::kNotFound);
}

TEST_CASE("Reloading a name gives a new uid") {
  AdapterRegistry registry = MakeRegistry();
  const std::string dir = test::WriteAdapter({});
  REQUIRE(registry.Load("x", dir).ok());
  const uint64_t uid = (*registry.Acquire("x"))->uid;
  REQUIRE(registry.Unload("x").ok());
  REQUIRE(registry.Load("x", dir).ok());
  CHECK((*registry.Acquire("x"))->uid != uid);
}

TEST_CASE("A failed load leaves the registry unchanged") {
  AdapterRegistry registry = MakeRegistry();
  const std::string good = test::WriteAdapter({});
  REQUIRE(registry.Load("a", good).ok());
  testing::TinyAdapterOptions bad;
  bad.config_overrides_json = R"({"use_dora": true})";
  const absl::Status st = registry.Load("b", test::WriteAdapter(bad));
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()) == "adapter 'b': DoRA (use_dora: true) is not supported");
  CHECK(Names(registry) == std::vector<std::string>{"a"});
  CHECK(registry.Load("b", good).ok());  // the name was not taken by the failed load
}

TEST_CASE("Concurrent loads of one name register it exactly once") {
  AdapterRegistry registry = MakeRegistry();
  const std::string dir = test::WriteAdapter({});
  constexpr int kThreads = 4;
  std::vector<absl::Status> results(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] { results[i] = registry.Load("same", dir); });
  }
  for (std::thread& t : threads) t.join();
  int ok = 0;
  for (const absl::Status& st : results) {
    if (st.ok()) {
      ++ok;
    } else {
      CHECK(st.code() == absl::StatusCode::kAlreadyExists);
    }
  }
  CHECK(ok == 1);
  CHECK(Names(registry) == std::vector<std::string>{"same"});
}

TEST_CASE("AdapterRegistry refuses loads past max_adapters") {
  AdapterRegistry registry = MakeRegistry(/*max_adapters=*/1);
  const std::string dir = test::WriteAdapter({});
  REQUIRE(registry.Load("a", dir).ok());
  CHECK(registry.Load("b", dir).code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(registry.Unload("a").ok());
  CHECK(registry.Load("b", dir).ok());
}

TEST_CASE("Acquire reports the adapter's pinned flag") {
  AdapterRegistry registry = MakeRegistry();
  const std::string dir = test::WriteAdapter({});
  REQUIRE(registry.Load("p", dir, /*pinned=*/true).ok());
  REQUIRE(registry.Load("u", dir).ok());
  CHECK(registry.Acquire("p")->pinned());
  CHECK_FALSE(registry.Acquire("u")->pinned());
  CHECK(registry.Acquire("nope").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("AdapterRegistry refuses a pinned load past max_pinned but still takes unpinned ones") {
  LoraLimits limits = test::Limits();
  limits.max_pinned = 1;
  AdapterRegistry registry(test::Spec(), limits, DType::kF32, 16);
  const std::string dir = test::WriteAdapter({});
  REQUIRE(registry.Load("p1", dir, /*pinned=*/true).ok());
  const absl::Status second = registry.Load("p2", dir, /*pinned=*/true);
  CHECK(second.code() == absl::StatusCode::kResourceExhausted);
  CHECK(second.message().find("adapter 'p2'") != std::string_view::npos);
  CHECK(registry.Load("u", dir).ok());
  CHECK(Names(registry) == std::vector<std::string>{"p1", "u"});
  REQUIRE(registry.Unload("p1").ok());
  CHECK(registry.Load("p2", dir, /*pinned=*/true).ok());
}


// --- host byte budget --------------------------------------------------------------------------

size_t WeightBytes(const std::string& dir) { return test::MustLoad("probe", dir)->weight_bytes; }

bool Resident(const AdapterRegistry& r, const std::string& name) {
  for (const AdapterInfo& info : r.List()) {
    if (info.name == name) return info.host_resident;
  }
  FAIL("no adapter " << name);
  return false;
}

TEST_CASE("Under a host budget the least recently used idle adapter's weights leave host memory") {
  const std::string dir = test::WriteAdapter({});
  const size_t bytes = WeightBytes(dir);
  AdapterRegistry registry(test::Spec(), test::Limits(), DType::kF32, 16, 2 * bytes);  // room for two
  REQUIRE(registry.Load("a", dir).ok());
  REQUIRE(registry.Load("b", dir).ok());
  CHECK(registry.host_bytes() == 2 * bytes);
  REQUIRE(registry.Acquire("a").ok());  // a is now more recent than b
  REQUIRE(registry.Load("c", dir).ok());
  CHECK(registry.host_bytes() == 2 * bytes);
  CHECK(Resident(registry, "a"));
  CHECK_FALSE(Resident(registry, "b"));
  CHECK(Resident(registry, "c"));
  // Still registered and listed with its metadata; using it parses it again (a new uid, as any
  // reload), and the least recent other one goes instead.
  const std::vector<AdapterInfo> list = registry.List();
  REQUIRE(list.size() == 3);
  CHECK(list[1].name == "b");
  CHECK(list[1].weight_bytes == bytes);
  CHECK(list[1].rank == 4);
  auto b = registry.Acquire("b");
  REQUIRE(b.ok());
  CHECK((*b)->name == "b");
  CHECK((*b)->weight_bytes == bytes);
  CHECK(Resident(registry, "b"));
  CHECK_FALSE(Resident(registry, "a"));
  CHECK(registry.host_bytes() == 2 * bytes);
}

TEST_CASE("Pinned and in-use adapters keep their host weights past the budget") {
  const std::string dir = test::WriteAdapter({});
  const size_t bytes = WeightBytes(dir);
  AdapterRegistry registry(test::Spec(), test::Limits(), DType::kF32, 16, bytes);  // room for one
  REQUIRE(registry.Load("pinned", dir, /*pinned=*/true).ok());
  REQUIRE(registry.Load("busy", dir).ok());
  auto busy = registry.Acquire("busy");
  REQUIRE(busy.ok());
  REQUIRE(registry.Load("idle", dir).ok());
  CHECK(Resident(registry, "pinned"));
  CHECK(Resident(registry, "busy"));
  CHECK_FALSE(Resident(registry, "idle"));  // over budget as soon as loaded: validated, then dropped
  CHECK(registry.host_bytes() == 2 * bytes);
  // Released: the next trim may drop it; in use again, it is parsed again.
  *busy = AdapterRef();
  REQUIRE(registry.Acquire("idle").ok());
  CHECK(Resident(registry, "idle") != Resident(registry, "busy"));
  CHECK(Resident(registry, "pinned"));
  // Unloading a dropped adapter works like any other.
  const std::string dropped = Resident(registry, "idle") ? "busy" : "idle";
  CHECK(registry.Unload(dropped).ok());
  CHECK(registry.host_bytes() == 2 * bytes);
}

TEST_CASE("A dropped adapter whose files became invalid fails its use, not the registry") {
  const std::string dir = test::WriteAdapter({});
  const size_t bytes = WeightBytes(dir);
  AdapterRegistry registry(test::Spec(), test::Limits(), DType::kF32, 16, bytes);
  REQUIRE(registry.Load("gone", dir).ok());
  REQUIRE(registry.Load("other", test::WriteAdapter({})).ok());
  REQUIRE_FALSE(Resident(registry, "gone"));
  std::filesystem::remove_all(dir);
  const auto st = registry.Acquire("gone");
  CHECK(st.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(st.status().message()).find("adapter 'gone': reloading its weights from ") == 0);
  CHECK(Names(registry) == std::vector<std::string>{"gone", "other"});  // still registered
  CHECK(registry.Acquire("other").ok());
  CHECK(registry.Unload("gone").ok());
}

TEST_CASE("Without a budget every adapter stays in host memory") {
  AdapterRegistry registry = MakeRegistry();
  const std::string dir = test::WriteAdapter({});
  for (const char* name : {"a", "b", "c"}) REQUIRE(registry.Load(name, dir).ok());
  for (const AdapterInfo& info : registry.List()) CHECK(info.host_resident);
  CHECK(registry.host_bytes() == 3 * WeightBytes(dir));
}

}  // namespace
}  // namespace loraplex::lora
