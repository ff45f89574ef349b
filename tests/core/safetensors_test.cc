#include "engine/core/safetensors.h"

#include <catch2/catch.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace loraplex {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test case, removed at the end.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() /
            ("loraplex_core_test_" + std::to_string(::getpid()) + "_" + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string File(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string LengthPrefix(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A raw safetensors file: length prefix, header text as given, then `data_bytes` bytes.
std::string RawFile(const std::string& header, size_t data_bytes) {
  return LengthPrefix(header.size()) + header + std::string(data_bytes, '\x01');
}

// Opens a raw file and returns its status (OK or the error).
absl::Status OpenRaw(const TempDir& dir, const std::string& bytes) {
  const std::string path = dir.File("raw.safetensors");
  WriteBytes(path, bytes);
  return SafetensorsFile::Open(path).status();
}

void RequireInvalid(const absl::Status& status, const std::string& fragment) {
  INFO(status.ToString());
  REQUIRE(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(status.message()).find(fragment) != std::string::npos);
  CHECK(std::string(status.message()).find("raw.safetensors") != std::string::npos);
}

TEST_CASE("WriteSafetensors output is read back with dtypes, shapes, values and metadata") {
  TempDir dir;
  const std::vector<float> f32 = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 65504.0f};
  std::vector<uint16_t> bf16, f16;
  for (float v : f32) {
    bf16.push_back(FloatToBf16(v));
    f16.push_back(FloatToF16(v));
  }
  std::vector<int32_t> ids = {7, -8, 9};
  std::vector<NamedTensor> tensors = {
      {"z.f32", {const_cast<float*>(f32.data()), DType::kF32, Shape{2, 3}}},
      {"a.bf16", {bf16.data(), DType::kBF16, Shape{3, 2}}},
      {"m.f16", {f16.data(), DType::kF16, Shape{6}}},
      {"ids", {ids.data(), DType::kI32, Shape{1, 3}}},
  };
  const std::string path = dir.File("w.safetensors");
  REQUIRE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());

  const std::string bytes = ReadBytes(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  CHECK(header_len % 8 == 0);
  // Data in name order: "a.bf16" (12 bytes) comes first, right after the header.
  CHECK(std::memcmp(bytes.data() + 8 + header_len, bf16.data(), 12) == 0);

  auto file = SafetensorsFile::Open(path);
  REQUIRE(file.ok());
  const SafetensorsFile& f = **file;
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  REQUIRE(f.tensors().size() == 4);
  auto info = f.Find("a.bf16");
  REQUIRE(info.ok());
  CHECK((*info)->dtype == DType::kBF16);
  CHECK((*info)->shape == Shape{3, 2});
  CHECK((*info)->nbytes == 12);
  CHECK((*info)->offset == 8 + header_len);
  CHECK(f.Find("missing").status().code() == absl::StatusCode::kNotFound);

  SECTION("same dtype reads the exact bytes") {
    auto t = f.ReadAs("ids", DType::kI32);
    REQUIRE(t.ok());
    CHECK(t->shape() == Shape{1, 3});
    CHECK(std::vector<int32_t>(t->As<int32_t>(), t->As<int32_t>() + 3) == ids);
    std::vector<uint16_t> raw(6);
    REQUIRE(f.Read(**f.Find("m.f16"), raw.data(), 12).ok());
    CHECK(raw == f16);
    CHECK(f.Read(**f.Find("m.f16"), raw.data(), 10).code() == absl::StatusCode::kInvalidArgument);
  }
  SECTION("float dtypes convert to each other") {
    auto from_f32 = f.ReadAs("z.f32", DType::kBF16);
    REQUIRE(from_f32.ok());
    CHECK(std::vector<uint16_t>(from_f32->As<uint16_t>(), from_f32->As<uint16_t>() + 6) == bf16);
    auto from_f16 = f.ReadAs("m.f16", DType::kF32);
    REQUIRE(from_f16.ok());
    // All six values are exactly representable in fp16, so the round trip is exact.
    CHECK(std::vector<float>(from_f16->As<float>(), from_f16->As<float>() + 6) ==
          std::vector<float>{1.0f, -2.5f, 3.25f, 0.0f, F16ToFloat(FloatToF16(1e-3f)), 65504.0f});
    auto bf_to_f16 = f.ReadAs("a.bf16", DType::kF16);
    REQUIRE(bf_to_f16.ok());
    CHECK(bf_to_f16->shape() == Shape{3, 2});
    for (int i = 0; i < 6; ++i) {
      CHECK(bf_to_f16->As<uint16_t>()[i] == FloatToF16(Bf16ToFloat(bf16[i])));
    }
  }
  SECTION("non-float conversions are refused") {
    CHECK(f.ReadAs("ids", DType::kF32).status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(f.ReadAs("z.f32", DType::kI32).status().code() == absl::StatusCode::kInvalidArgument);
  }
}

TEST_CASE("WriteSafetensors refuses duplicate tensor names") {
  TempDir dir;
  float v = 1.0f;
  std::vector<NamedTensor> tensors = {{"x", {&v, DType::kF32, Shape{1}}},
                                      {"x", {&v, DType::kF32, Shape{1}}}};
  CHECK(WriteSafetensors(dir.File("d.safetensors"), tensors).code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A file with no tensors and empty tensors round trips") {
  TempDir dir;
  REQUIRE(WriteSafetensors(dir.File("empty.safetensors"), {}).ok());
  auto empty = SafetensorsFile::Open(dir.File("empty.safetensors"));
  REQUIRE(empty.ok());
  CHECK((*empty)->tensors().empty());

  float v = 2.0f;
  std::vector<NamedTensor> tensors = {{"a", {nullptr, DType::kF32, Shape{0, 4}}},
                                      {"b", {&v, DType::kF32, Shape{1}}},
                                      {"c", {nullptr, DType::kBF16, Shape{3, 0}}}};
  REQUIRE(WriteSafetensors(dir.File("zero.safetensors"), tensors).ok());
  auto file = SafetensorsFile::Open(dir.File("zero.safetensors"));
  REQUIRE(file.ok());
  CHECK((*file)->tensors().size() == 3);
  auto b = (*file)->ReadAs("b", DType::kF32);
  REQUIRE(b.ok());
  CHECK(b->As<float>()[0] == 2.0f);
}

TEST_CASE("Opening a missing file is NOT_FOUND") {
  TempDir dir;
  CHECK(SafetensorsFile::Open(dir.File("nope.safetensors")).status().code() ==
        absl::StatusCode::kNotFound);
}

TEST_CASE("Malformed safetensors files are rejected with INVALID_ARGUMENT naming the problem") {
  TempDir dir;
  const std::string good_header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"F16","shape":[2,1],"data_offsets":[8,12]}})";
  REQUIRE(OpenRaw(dir, RawFile(good_header, 12)).ok());

  SECTION("file shorter than the length prefix") {
    RequireInvalid(OpenRaw(dir, std::string(5, '\0')), "smaller than");
  }
  SECTION("truncated header") {
    RequireInvalid(OpenRaw(dir, RawFile(good_header, 12).substr(0, 30)), "exceeds file size");
  }
  SECTION("truncated data") { RequireInvalid(OpenRaw(dir, RawFile(good_header, 11)), "file size"); }
  SECTION("trailing bytes after the data") {
    RequireInvalid(OpenRaw(dir, RawFile(good_header, 13)), "file size");
  }
  SECTION("huge header length") {
    RequireInvalid(OpenRaw(dir, LengthPrefix(~0ull) + good_header), "exceeds the limit");
    RequireInvalid(OpenRaw(dir, LengthPrefix(SafetensorsFile::kMaxHeaderBytes + 1) + "{}"),
                   "exceeds the limit");
  }
  SECTION("header length larger than the file") {
    RequireInvalid(OpenRaw(dir, LengthPrefix(9999999) + good_header),
                   "header length 9999999 exceeds file size");
  }
  SECTION("header not starting with '{'") {
    RequireInvalid(OpenRaw(dir, RawFile(" " + good_header, 12)), "does not start with '{'");
    RequireInvalid(OpenRaw(dir, RawFile("[]", 0)), "does not start with '{'");
  }
  SECTION("trailing spaces in the header are allowed, other trailing text is not") {
    CHECK(OpenRaw(dir, RawFile(good_header + "    ", 12)).ok());
    RequireInvalid(OpenRaw(dir, RawFile(good_header + " x", 12)), "JSON parse error");
  }
  SECTION("invalid JSON") {
    RequireInvalid(OpenRaw(dir, RawFile(R"({"a":)", 0)), "JSON parse error");
  }
  SECTION("overlapping offsets") {
    RequireInvalid(OpenRaw(dir, RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                        8)),
                   "overlap previous tensor");
  }
  SECTION("hole between tensors") {
    RequireInvalid(OpenRaw(dir, RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                        12)),
                   "hole");
  }
  SECTION("data not starting at offset 0") {
    RequireInvalid(
        OpenRaw(dir, RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)),
        "hole");
  }
  SECTION("unknown and unsupported dtypes") {
    RequireInvalid(
        OpenRaw(dir, RawFile(R"({"x":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", 1)),
        "tensor 'x': unknown dtype 'Q4'");
    RequireInvalid(
        OpenRaw(dir, RawFile(R"({"x":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", 1)),
        "not supported");
    RequireInvalid(
        OpenRaw(dir, RawFile(R"({"x":{"dtype":7,"shape":[1],"data_offsets":[0,1]}})", 1)), "dtype");
  }
  SECTION("negative, fractional and non-numeric shapes") {
    for (const char* shape : {"[-1]", "[1.5]", "[\"2\"]", "[2.0]", "3", "[null]"}) {
      INFO(shape);
      RequireInvalid(OpenRaw(dir, RawFile(std::string(R"({"x":{"dtype":"U8","shape":)") + shape +
                                              R"(,"data_offsets":[0,2]}})",
                                          2)),
                     "shape");
    }
  }
  SECTION("more dimensions than a Shape holds") {
    RequireInvalid(OpenRaw(dir, RawFile(R"({"x":{"dtype":"U8","shape":[1,1,1,1,2],)"
                                        R"("data_offsets":[0,2]}})",
                                        2)),
                   "more than 4 dimensions");
  }
  SECTION("shape size that overflows") {
    RequireInvalid(OpenRaw(dir, RawFile(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],)"
                                        R"("data_offsets":[0,0]}})",
                                        0)),
                   "overflows");
  }
  SECTION("shape and offsets that disagree on the size") {
    RequireInvalid(
        OpenRaw(dir, RawFile(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)),
        "needs 12");
  }
  SECTION("malformed data_offsets") {
    for (const char* offsets : {"[8,0]", "[0]", "[0,8,9]", "[-1,7]", "[0,8.5]", "\"0,8\""}) {
      INFO(offsets);
      RequireInvalid(OpenRaw(dir, RawFile(std::string(R"({"x":{"dtype":"U8","shape":[8],)") +
                                              R"("data_offsets":)" + offsets + "}}",
                                          8)),
                     "data_offsets");
    }
  }
  SECTION("duplicate tensor name") {
    RequireInvalid(OpenRaw(dir, RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                        R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                        8)),
                   "duplicate key 'a'");
  }
  SECTION("metadata that is not a map of strings") {
    RequireInvalid(OpenRaw(dir, RawFile(R"({"__metadata__":{"format":1}})", 0)),
                   "__metadata__ value of 'format' is not a string");
    RequireInvalid(OpenRaw(dir, RawFile(R"({"__metadata__":["pt"]})", 0)),
                   "__metadata__ is not an object");
  }
  SECTION("deeply nested JSON is rejected without exhausting the stack") {
    const size_t depth = 1000000;
    const std::string nested = R"({"x":)" + std::string(depth, '[') + std::string(depth, ']') + "}";
    RequireInvalid(OpenRaw(dir, RawFile(nested, 0)), "tensor 'x'");
  }
  SECTION("tensor entry that is not an object") {
    RequireInvalid(OpenRaw(dir, RawFile(R"({"x":[1,2]})", 0)), "tensor 'x'");
  }
}

TEST_CASE("Reading a tensor from a file truncated after Open is DATA_LOSS") {
  TempDir dir;
  std::vector<float> v(16, 1.0f);
  const std::string path = dir.File("t.safetensors");
  REQUIRE(WriteSafetensors(path, {{"x", {v.data(), DType::kF32, Shape{16}}}}).ok());
  auto file = SafetensorsFile::Open(path);
  REQUIRE(file.ok());
  fs::resize_file(path, fs::file_size(path) - 4);
  CHECK((*file)->ReadAs("x", DType::kF32).status().code() == absl::StatusCode::kDataLoss);
}

TEST_CASE("Corrupted files never crash Open and readable tensors stay in bounds") {
  TempDir dir;
  std::vector<float> a(6, 0.5f);
  std::vector<uint16_t> b(5, 0x3c00);
  const std::string valid_path = dir.File("valid.safetensors");
  REQUIRE(WriteSafetensors(valid_path,
                           {{"a", {a.data(), DType::kF32, Shape{2, 3}}},
                            {"b", {b.data(), DType::kF16, Shape{5}}}},
                           {{"k", "v"}})
              .ok());
  const std::string valid = ReadBytes(valid_path);
  std::mt19937 rng(1234);  // fixed seed: failures reproduce
  const std::string path = dir.File("fuzz.safetensors");
  int opened = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::string bytes = valid;
    const int mutations = 1 + static_cast<int>(rng() % 4);
    for (int m = 0; m < mutations; ++m) {
      switch (rng() % 4) {
        case 0:  // flip bits of one byte
          bytes[rng() % bytes.size()] ^= static_cast<char>(1 + rng() % 255);
          break;
        case 1:  // set a byte to a JSON-significant character
          bytes[rng() % bytes.size()] = "{}[],:\"0-9. e"[rng() % 13];
          break;
        case 2:  // truncate
          bytes.resize(rng() % bytes.size());
          break;
        case 3:  // append
          bytes.append(1 + rng() % 8, static_cast<char>(rng()));
          break;
      }
      if (bytes.empty()) break;
    }
    WriteBytes(path, bytes);
    auto file = SafetensorsFile::Open(path);
    if (!file.ok()) {
      CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
      continue;
    }
    ++opened;
    for (const auto& [name, info] : (*file)->tensors()) {
      REQUIRE(info.offset + info.nbytes <= bytes.size());
      std::vector<char> buf(info.nbytes);
      CHECK((*file)->Read(info, buf.data(), buf.size()).ok());
    }
  }
  // Mutations that only touch tensor data keep the file valid: some must open.
  CHECK(opened > 0);
}

TEST_CASE("WeightSet reads a sharded model through its index") {
  TempDir dir;
  std::vector<float> x = {1, 2, 3, 4};
  std::vector<float> y = {5, 6};
  REQUIRE(WriteSafetensors(dir.File("model-00001-of-00002.safetensors"),
                           {{"layers.0.w", {x.data(), DType::kF32, Shape{2, 2}}}})
              .ok());
  REQUIRE(WriteSafetensors(dir.File("model-00002-of-00002.safetensors"),
                           {{"layers.1.w", {y.data(), DType::kF32, Shape{2}}},
                            {"unmapped", {y.data(), DType::kF32, Shape{2}}}})
              .ok());
  const std::string index_path = dir.File("model.safetensors.index.json");

  SECTION("every mapped tensor is found in its shard") {
    WriteBytes(index_path, R"({"metadata":{"total_size":24},"weight_map":{)"
                           R"("layers.0.w":"model-00001-of-00002.safetensors",)"
                           R"("layers.1.w":"model-00002-of-00002.safetensors"}})");
    auto set = WeightSet::Open(dir.path().string());
    REQUIRE(set.ok());
    CHECK((*set)->names() == std::vector<std::string>{"layers.0.w", "layers.1.w"});
    auto w1 = (*set)->ReadAs("layers.1.w", DType::kF32);
    REQUIRE(w1.ok());
    CHECK(std::vector<float>(w1->As<float>(), w1->As<float>() + 2) == y);
    auto w0 = (*set)->Find("layers.0.w");
    REQUIRE(w0.ok());
    CHECK((*w0)->shape == Shape{2, 2});
    CHECK((*set)->Find("nope").status().code() == absl::StatusCode::kNotFound);
  }
  SECTION("an index naming a tensor missing from its shard is rejected") {
    WriteBytes(index_path, R"({"weight_map":{"layers.0.w":"model-00001-of-00002.safetensors",)"
                           R"("layers.1.w":"model-00001-of-00002.safetensors"}})");
    auto set = WeightSet::Open(dir.path().string());
    REQUIRE(set.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(set.status().message()).find("layers.1.w") != std::string::npos);
  }
  SECTION("an index naming a file outside the directory is rejected") {
    for (const char* shard : {"../model-00001-of-00002.safetensors", "sub/x.safetensors", ".."}) {
      INFO(shard);
      WriteBytes(index_path, std::string(R"({"weight_map":{"layers.0.w":")") + shard + "\"}}");
      CHECK(WeightSet::Open(dir.path().string()).status().code() ==
            absl::StatusCode::kInvalidArgument);
    }
  }
  SECTION("an index naming a missing shard is NOT_FOUND") {
    WriteBytes(index_path, R"({"weight_map":{"layers.0.w":"model-00009.safetensors"}})");
    CHECK(WeightSet::Open(dir.path().string()).status().code() == absl::StatusCode::kNotFound);
  }
  SECTION("a malformed index is rejected") {
    WriteBytes(index_path, R"({"weight_map":["x"]})");
    CHECK(WeightSet::Open(dir.path().string()).status().code() ==
          absl::StatusCode::kInvalidArgument);
  }
}

TEST_CASE("WeightSet opens model.safetensors in a directory or a single file path") {
  TempDir dir;
  std::vector<uint16_t> w = {FloatToBf16(1.5f), FloatToBf16(-3.0f)};
  REQUIRE(
      WriteSafetensors(dir.File("model.safetensors"), {{"w", {w.data(), DType::kBF16, Shape{2}}}})
          .ok());
  for (const std::string& where : {dir.path().string(), dir.File("model.safetensors")}) {
    INFO(where);
    auto set = WeightSet::Open(where);
    REQUIRE(set.ok());
    auto t = (*set)->ReadAs("w", DType::kF32);
    REQUIRE(t.ok());
    CHECK(t->As<float>()[0] == 1.5f);
    CHECK(t->As<float>()[1] == -3.0f);
  }
  CHECK(WeightSet::Open(dir.File("absent")).status().code() == absl::StatusCode::kNotFound);
  TempDir empty;
  CHECK(WeightSet::Open(empty.path().string()).status().code() == absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace loraplex
