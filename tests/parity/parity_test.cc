// Parity of the CPU executor (F32) with Hugging Face transformers + PEFT on the trained fixture
// model and its four adapters (tests/fixtures/trained), and of the C++ tokenizer with HF
// tokenizers on the fixture's tokenizer goldens.
#include <catch2/catch.hpp>

#include "engine/text/tokenizer.h"
#include "tests/parity/parity_checks.h"
#include "tests/parity/parity_harness.h"

namespace loraplex::parity {
namespace {

// Both sides compute in fp32 on the same bf16-exact weights (the references upcast the BF16 files
// to float32, eager attention, matmul precision "highest"); they differ only in summation order
// (our plain loops against torch's blocked GEMMs and softmax). Measured: max 7.6e-5 (top-5
// logprobs; 6.0e-5 for the next token), mean 1.5e-6. The bounds keep >10x margin and still
// catch a real error: a wrong LoRA scale or a missing module moves that adapter's logprobs by
// 0.24-0.84 on average (measured by mutating a numpy emulation of the forward).
// Two logprobs each within 1e-3 of the reference can only trade places when they are < 2e-3
// apart, hence the decision margin (the smallest greedy margin in the references is 1.05e-2).
constexpr Tolerances kCpuTolerances{/*max_abs=*/1e-3, /*mean_abs=*/2e-5, /*decision_margin=*/2e-3};

TEST_CASE("CPU teacher-forced logprobs match transformers + PEFT for the base model and every adapter") {
  CheckTeacherForcedParity(Device::kCpu, Batching::kSolo, kCpuTolerances);
}

TEST_CASE("CPU teacher-forced logprobs match the references when all records share one mixed-adapter step") {
  CheckTeacherForcedParity(Device::kCpu, Batching::kMixed, kCpuTolerances);
}

TEST_CASE("CPU greedy continuations equal the references for the base model and every adapter") {
  CheckGreedyParity(Device::kCpu, Batching::kSolo, kCpuTolerances);
}

TEST_CASE("CPU greedy continuations equal the references when all prompts decode in one mixed batch") {
  CheckGreedyParity(Device::kCpu, Batching::kMixed, kCpuTolerances);
}

TEST_CASE("The tokenizer gives HF's ids with and without special tokens and decodes them back") {
  auto refs = LoadReferences();
  INFO(refs.status().message());
  REQUIRE(refs.ok());
  auto tok = text::Tokenizer::FromFile(FixtureDir() + "/model/tokenizer.json");
  INFO(tok.status().message());
  REQUIRE(tok.ok());
  REQUIRE(refs->tokenizer.size() >= 50);
  for (const TokenizerGolden& g : refs->tokenizer) {
    INFO("text: '" << g.text << "'");
    auto with = (*tok)->Encode(g.text, /*add_special_tokens=*/true);
    auto without = (*tok)->Encode(g.text, /*add_special_tokens=*/false);
    REQUIRE(with.ok());
    REQUIRE(without.ok());
    CHECK(*with == g.with_special);
    CHECK(*without == g.without_special);
    auto decoded = (*tok)->Decode(g.without_special, /*skip_special_tokens=*/false);
    REQUIRE(decoded.ok());
    CHECK(*decoded == g.decoded);
  }
}

}  // namespace
}  // namespace loraplex::parity
