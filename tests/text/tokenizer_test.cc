#include "engine/text/tokenizer.h"

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/text/byte_level.h"
#include "nlohmann/json.hpp"

namespace loraplex::text {
namespace {

const std::string kFixtureDir = std::string(LORAPLEX_SOURCE_DIR) + "/tests/fixtures/tokenizer/";
const char* const kVariants[] = {"tokenizer.json", "tokenizer_strings.json", "tokenizer_gpt2.json"};

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  REQUIRE(file.good());
  std::stringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

const nlohmann::json& Golden() {
  static const nlohmann::json golden = nlohmann::json::parse(ReadFile(kFixtureDir + "golden.json"));
  return golden;
}

std::unique_ptr<Tokenizer> Load(const std::string& name) {
  auto tokenizer = Tokenizer::FromFile(kFixtureDir + name);
  INFO(tokenizer.status().ToString());
  REQUIRE(tokenizer.ok());
  return std::move(tokenizer).value();
}

// The id of the single-byte token for `byte` (every byte has one in a byte-level vocabulary).
int32_t ByteId(const Tokenizer& tokenizer, char byte) {
  auto id = tokenizer.TokenToId(BytesToByteLevel(std::string(1, byte)));
  REQUIRE(id.has_value());
  return *id;
}

nlohmann::json FixtureJson() {
  return nlohmann::json::parse(ReadFile(kFixtureDir + "tokenizer.json"));
}

TEST_CASE("Encode matches Hugging Face ids for every golden text in every variant") {
  const auto& texts = Golden()["texts"];
  REQUIRE(texts.size() >= 50);
  for (const char* variant : kVariants) {
    auto tokenizer = Load(variant);
    const auto& expected = Golden()["variants"][variant];
    for (size_t i = 0; i < texts.size(); ++i) {
      const std::string text = texts[i].get<std::string>();
      INFO(variant << " text #" << i << ": " << text);
      auto with_special = tokenizer->Encode(text, true);
      REQUIRE(with_special.ok());
      CHECK(*with_special == expected["with_special"][i].get<std::vector<int32_t>>());
      auto without_special = tokenizer->Encode(text, false);
      REQUIRE(without_special.ok());
      CHECK(*without_special == expected["without_special"][i].get<std::vector<int32_t>>());
    }
  }
}

TEST_CASE("Split patterns with POSIX classes, literal brackets and case folding match HF") {
  // Covers the \s rewriting and class parsing on constructs the Llama 3 pattern lacks.
  const auto& cases = Golden()["custom_patterns"];
  REQUIRE(cases.size() >= 3);
  for (const auto& c : cases) {
    nlohmann::json j = FixtureJson();
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", c["pattern"]}};
    INFO("pattern " << c["pattern"].get<std::string>());
    auto tokenizer = Tokenizer::FromJson(j.dump());
    REQUIRE(tokenizer.ok());
    CHECK((*tokenizer)->Encode(c["text"].get<std::string>(), false).value() ==
          c["ids"].get<std::vector<int32_t>>());
  }
}

TEST_CASE("Merges written as strings and as pairs give the same tokenizer") {
  const nlohmann::json pairs = FixtureJson();
  REQUIRE(pairs["model"]["merges"][0].is_array());
  const nlohmann::json strings =
      nlohmann::json::parse(ReadFile(kFixtureDir + "tokenizer_strings.json"));
  REQUIRE(strings["model"]["merges"][0].is_string());
  auto a = Load("tokenizer.json");
  auto b = Load("tokenizer_strings.json");
  for (const auto& text : Golden()["texts"]) {
    CHECK(a->Encode(text.get<std::string>()).value() == b->Encode(text.get<std::string>()).value());
  }
}

TEST_CASE("Decode inverts Encode for every golden text") {
  const auto& texts = Golden()["texts"];
  for (const char* variant : kVariants) {
    auto tokenizer = Load(variant);
    for (size_t i = 0; i < texts.size(); ++i) {
      const std::string text = texts[i].get<std::string>();
      INFO(variant << " text #" << i << ": " << text);
      auto ids = tokenizer->Encode(text, true);
      REQUIRE(ids.ok());
      // Special tokens written in the text come back only when they are not skipped.
      auto decoded = tokenizer->Decode(*ids, /*skip_special_tokens=*/false);
      REQUIRE(decoded.ok());
      const std::string bos = tokenizer->bos_id().has_value() ? "<|begin_of_text|>" : "";
      CHECK(*decoded == bos + text);
      CHECK(*decoded ==
            Golden()["variants"][variant]["decoded"][i].get<std::string>().insert(0, bos));
    }
  }
}

TEST_CASE("Special tokens are recognised in text, added as BOS and skipped on decode") {
  auto tokenizer = Load("tokenizer.json");
  REQUIRE(tokenizer->bos_id() == std::optional<int32_t>(0));
  REQUIRE(tokenizer->TokenToId("<|end_of_text|>") == std::optional<int32_t>(1));
  CHECK(tokenizer->IsSpecial(0));
  CHECK(tokenizer->IsSpecial(1));
  const int32_t a = tokenizer->TokenToId("A").value();
  CHECK_FALSE(tokenizer->IsSpecial(a));
  CHECK(tokenizer->vocab_size() == 1000);

  auto ids = tokenizer->Encode("A<|end_of_text|><|begin_of_text|>A", true);
  REQUIRE(ids.ok());
  CHECK(*ids == std::vector<int32_t>{0, a, 1, 0, a});
  CHECK(tokenizer->Decode(*ids, true).value() == "AA");
  CHECK(tokenizer->Decode(*ids, false).value() ==
        "<|begin_of_text|>A<|end_of_text|><|begin_of_text|>A");
  CHECK(tokenizer->TokenBytes(1, true).empty());
  CHECK(tokenizer->TokenBytes(1, false) == "<|end_of_text|>");
  // "Ġ" is the byte-level spelling of the space byte.
  const int32_t space = tokenizer->TokenToId("\xC4\xA0").value();
  CHECK(tokenizer->TokenBytes(space) == " ");

  auto gpt2 = Load("tokenizer_gpt2.json");
  CHECK_FALSE(gpt2->bos_id().has_value());
  CHECK(gpt2->Encode("A", true).value() == std::vector<int32_t>{a});
}

TEST_CASE("Encode refuses invalid UTF-8 with INVALID_ARGUMENT") {
  auto tokenizer = Load("tokenizer.json");
  for (const std::string& bad :
       {std::string("abc\xFF"), std::string("\xC3"), std::string("\xED\xA0\x80"),
        std::string("\xC0\xAF"), std::string("ok \xF4\x90\x80\x80")}) {
    auto ids = tokenizer->Encode(bad);
    INFO(ids.status().ToString());
    REQUIRE_FALSE(ids.ok());
    CHECK(ids.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(ids.status().message()).find("UTF-8") != std::string::npos);
  }
}

TEST_CASE("Decode refuses ids outside the vocabulary and replaces broken UTF-8") {
  auto tokenizer = Load("tokenizer.json");
  for (int32_t bad : {-1, 1000, 1 << 30}) {
    auto text = tokenizer->Decode({5, bad});
    REQUIRE_FALSE(text.ok());
    CHECK(text.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(text.status().message()).find(std::to_string(bad)) != std::string::npos);
  }
  // U+4F60 is E4 BD A0; without its last byte it is one ill-formed subpart: one U+FFFD.
  const std::vector<int32_t> broken = {ByteId(*tokenizer, '\xE4'), ByteId(*tokenizer, '\xBD'),
                                       ByteId(*tokenizer, 'a')};
  CHECK(tokenizer->Decode(broken).value() ==
        "\xEF\xBF\xBD"
        "a");
  // A lone continuation byte and a byte that never starts a sequence: one U+FFFD each.
  CHECK(tokenizer->Decode({ByteId(*tokenizer, '\xBD'), ByteId(*tokenizer, '\xFF')}).value() ==
        "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST_CASE("Long inputs encode in reasonable time and round-trip") {
  auto tokenizer = Load("tokenizer.json");
  // A single 200k-letter pre-token exercises the merge heap; quadratic merging would take
  // minutes here.
  const std::string run(200000, 'x');
  auto ids = tokenizer->Encode(run, false);
  REQUIRE(ids.ok());
  CHECK(tokenizer->Decode(*ids).value() == run);
  std::string prose;
  for (int i = 0; i < 2000; ++i)
    prose += "The model server answers each request, café 🙂 123.\n";
  ids = tokenizer->Encode(prose, false);
  REQUIRE(ids.ok());
  CHECK(tokenizer->Decode(*ids).value() == prose);
}

TEST_CASE("Invalid tokenizer files are refused with the field named") {
  const nlohmann::json good = FixtureJson();
  auto expect_error = [](const nlohmann::json& j, const std::string& needle) {
    auto tokenizer = Tokenizer::FromJson(j.dump());
    INFO("expected error containing: " << needle);
    REQUIRE_FALSE(tokenizer.ok());
    INFO(tokenizer.status().ToString());
    CHECK(tokenizer.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(tokenizer.status().message()).find(needle) != std::string::npos);
  };
  SECTION("missing model") {
    nlohmann::json j = good;
    j.erase("model");
    expect_error(j, "model: missing");
  }
  SECTION("empty merges beside a multi-character vocabulary") {
    nlohmann::json j = good;
    j["model"]["merges"] = nlohmann::json::array();
    expect_error(j, "model.merges: empty");
  }
  SECTION("unknown model type") {
    nlohmann::json j = good;
    j["model"]["type"] = "Unigram";
    expect_error(j, "model.type: 'Unigram' is not supported");
  }
  SECTION("merge naming a token outside the vocabulary") {
    nlohmann::json j = good;
    j["model"]["merges"].push_back({"zz", "q"});
    expect_error(j, "is not in model.vocab");
  }
  SECTION("malformed merge string") {
    nlohmann::json j = nlohmann::json::parse(ReadFile(kFixtureDir + "tokenizer_strings.json"));
    j["model"]["merges"][3] = "abc";
    expect_error(j, "model.merges[3]");
  }
  SECTION("unsupported normalizer") {
    nlohmann::json j = good;
    j["normalizer"] = {{"type", "NFC"}};
    expect_error(j, "normalizer.type: 'NFC' is not supported");
  }
  SECTION("unsupported pre-tokenizer step") {
    nlohmann::json j = good;
    j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Digits"}, {"individual_digits", true}};
    expect_error(j, "pre_tokenizer.pretokenizers[0].type: 'Digits' is not supported");
  }
  SECTION("regex that does not compile") {
    nlohmann::json j = good;
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
    expect_error(j, "pre_tokenizer.pretokenizers[0].pattern");
  }
  SECTION("unsupported post-processor") {
    nlohmann::json j = good;
    j["post_processor"] = {{"type", "BertProcessing"}};
    expect_error(j, "post_processor.type: 'BertProcessing' is not supported");
  }
  SECTION("template naming an unknown special token") {
    nlohmann::json j = good;
    j["post_processor"]["processors"][1]["special_tokens"].erase("<|begin_of_text|>");
    expect_error(j, "special_tokens['<|begin_of_text|>'].ids");
  }
  SECTION("wrong JSON type is reported, not thrown") {
    nlohmann::json j = good;
    j["added_tokens"][0]["special"] = "yes";
    expect_error(j, "added_tokens[0].special");
  }
  SECTION("not JSON at all") {
    auto tokenizer = Tokenizer::FromJson("{\"model\": ");
    REQUIRE_FALSE(tokenizer.ok());
    CHECK(tokenizer.status().code() == absl::StatusCode::kInvalidArgument);
  }
}

TEST_CASE("A missing tokenizer file is NOT_FOUND and a bad one names the file") {
  const auto dir = std::filesystem::temp_directory_path() / "loraplex_text_test_files";
  std::filesystem::create_directories(dir);
  auto missing = Tokenizer::FromFile((dir / "nope.json").string());
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);

  const std::string bad_path = (dir / "bad.json").string();
  std::ofstream(bad_path) << R"({"model": {"type": "WordPiece"}, "decoder": {"type": "ByteLevel"},
      "pre_tokenizer": {"type": "ByteLevel"}})";
  auto bad = Tokenizer::FromFile(bad_path);
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find(bad_path) != std::string::npos);
  CHECK(std::string(bad.status().message()).find("'WordPiece'") != std::string::npos);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace loraplex::text
