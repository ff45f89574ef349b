#include "engine/core/dtype.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>

namespace loraplex {
namespace {

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

TEST_CASE("Every finite bf16 value round trips through float exactly") {
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    const uint16_t h = static_cast<uint16_t>(v);
    const float f = Bf16ToFloat(h);
    if (std::isnan(f)) continue;
    REQUIRE(FloatToBf16(f) == h);
  }
}

TEST_CASE("Every finite fp16 value round trips through float exactly") {
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    const uint16_t h = static_cast<uint16_t>(v);
    const float f = F16ToFloat(h);
    if (std::isnan(f)) continue;
    INFO(v);
    REQUIRE(FloatToF16(f) == h);
  }
}

TEST_CASE("fp16 decodes known values") {
  CHECK(F16ToFloat(0x3c00) == 1.0f);
  CHECK(F16ToFloat(0xc000) == -2.0f);
  CHECK(F16ToFloat(0x7bff) == 65504.0f);
  CHECK(F16ToFloat(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(F16ToFloat(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(std::signbit(F16ToFloat(0x8000)));
}

TEST_CASE("FloatToBf16 rounds to nearest, ties to even") {
  // 1.0 = 0x3f800000; bf16 keeps the top 16 bits. Low half 0x8000 is exactly halfway.
  CHECK(FloatToBf16(FromBits(0x3f808000)) == 0x3f80);  // tie, 0x3f80 is even: down
  CHECK(FloatToBf16(FromBits(0x3f818000)) == 0x3f82);  // tie, 0x3f81 is odd: up
  CHECK(FloatToBf16(FromBits(0x3f808001)) == 0x3f81);  // above halfway: up
  CHECK(FloatToBf16(FromBits(0x3f807fff)) == 0x3f80);  // below halfway: down
  // The largest finite floats round up to infinity.
  CHECK(FloatToBf16(std::numeric_limits<float>::max()) == 0x7f80);
}

TEST_CASE("FloatToF16 rounds to nearest, ties to even, including subnormals and overflow") {
  // 1 + 2^-11 lies halfway between 1.0 (0x3c00, even) and the next half 0x3c01.
  CHECK(FloatToF16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);
  // 1 + 3*2^-11 lies halfway between 0x3c01 (odd) and 0x3c02 (even).
  CHECK(FloatToF16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
  CHECK(FloatToF16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)) == 0x3c01);
  // Subnormals: 2^-25 is halfway between 0 and the smallest subnormal 2^-24 -> 0 (even).
  CHECK(FloatToF16(std::ldexp(1.0f, -25)) == 0x0000);
  CHECK(FloatToF16(std::ldexp(1.0f, -25) * 1.0001f) == 0x0001);
  // 3 * 2^-25 is halfway between 0x0001 (odd) and 0x0002 (even).
  CHECK(FloatToF16(3 * std::ldexp(1.0f, -25)) == 0x0002);
  // Largest subnormal rounds up into the smallest normal.
  CHECK(FloatToF16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -26)) == 0x0400);
  // 65504 is the largest half; 65519.99 still rounds to it, 65520 (the tie) rounds to inf.
  CHECK(FloatToF16(65504.0f) == 0x7bff);
  CHECK(FloatToF16(65519.0f) == 0x7bff);
  CHECK(FloatToF16(65520.0f) == 0x7c00);
  CHECK(FloatToF16(-1e10f) == 0xfc00);
  CHECK(FloatToF16(-0.0f) == 0x8000);
}

TEST_CASE("NaN and infinity survive conversion to bf16 and fp16") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(FloatToBf16(inf) == 0x7f80);
  CHECK(FloatToBf16(-inf) == 0xff80);
  CHECK(std::isnan(Bf16ToFloat(FloatToBf16(nan))));
  // A signalling NaN whose payload lives only in the low 16 bits must not become infinity.
  CHECK(std::isnan(Bf16ToFloat(FloatToBf16(FromBits(0x7f800001)))));
  CHECK(std::isnan(Bf16ToFloat(FloatToBf16(FromBits(0xff800001)))));
  CHECK(FloatToF16(inf) == 0x7c00);
  CHECK(FloatToF16(-inf) == 0xfc00);
  CHECK(std::isnan(F16ToFloat(FloatToF16(nan))));
  CHECK(std::isnan(F16ToFloat(FloatToF16(FromBits(0x7f800001)))));
  CHECK(std::isinf(F16ToFloat(0x7c00)));
  CHECK(std::isnan(F16ToFloat(0x7c01)));
  CHECK(std::isnan(Bf16ToFloat(0x7fc0)));
  CHECK(Bits(Bf16ToFloat(0xff80)) == 0xff800000u);
}

TEST_CASE("ConvertToFloat and ConvertFromFloat handle the float dtypes and refuse others") {
  const float src[3] = {0.5f, -1.25f, 3.0f};
  uint16_t half[3];
  float back[3];
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) {
    INFO(DTypeName(d));
    uint32_t storage[3];
    REQUIRE(ConvertFromFloat(src, 3, d, storage).ok());
    REQUIRE(ConvertToFloat(d, storage, 3, back).ok());
    // These values are exact in every float dtype.
    CHECK(back[0] == 0.5f);
    CHECK(back[1] == -1.25f);
    CHECK(back[2] == 3.0f);
  }
  REQUIRE(ConvertFromFloat(src, 3, DType::kBF16, half).ok());
  CHECK(half[1] == FloatToBf16(-1.25f));
  CHECK(ConvertToFloat(DType::kI32, src, 3, back).code() == absl::StatusCode::kInvalidArgument);
  CHECK(ConvertFromFloat(src, 3, DType::kU8, half).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Safetensors dtype names parse and unknown ones are rejected by name") {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kI32, DType::kI64, DType::kU8,
                  DType::kBool, DType::kF64, DType::kI8, DType::kI16}) {
    auto parsed = ParseSafetensorsDType(DTypeName(d));
    REQUIRE(parsed.ok());
    CHECK(*parsed == d);
  }
  CHECK(DTypeSize(DType::kBF16) == 2);
  CHECK(DTypeSize(DType::kI64) == 8);
  auto bad = ParseSafetensorsDType("Q4");
  REQUIRE(bad.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.status().message()).find("Q4") != std::string::npos);
  CHECK(ParseSafetensorsDType("F8_E4M3").status().code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace loraplex
