// Element types of tensors, their sizes and names, and bf16/fp16 <-> float conversion.
// Immutable; thread-safe.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace loraplex {

enum class DType : uint8_t { kF32, kF16, kBF16, kI32, kI64, kU8, kBool, kF64, kI8, kI16 };

// Bytes per element.
size_t DTypeSize(DType dtype);
// The safetensors spelling ("F32", "BF16", ...).
std::string_view DTypeName(DType dtype);
// Parses a safetensors dtype string. Known-but-unsupported types (F8_*, F4, ...) and unknown
// strings are INVALID_ARGUMENT naming the string.
absl::StatusOr<DType> ParseSafetensorsDType(std::string_view name);

inline float Bf16ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// Round to nearest even, NaN kept quiet.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
float F16ToFloat(uint16_t v);
uint16_t FloatToF16(float f);

// Converts `count` elements of `src` (F32, F16 or BF16) to float. Other dtypes: INVALID_ARGUMENT.
absl::Status ConvertToFloat(DType src_dtype, const void* src, size_t count, float* dst);
// Converts `count` floats to `dst_dtype` (F32, F16 or BF16).
absl::Status ConvertFromFloat(const float* src, size_t count, DType dst_dtype, void* dst);

}  // namespace loraplex
