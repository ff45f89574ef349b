// TensorView: a non-owning view of a dense, row-major tensor on some device; HostTensor: an
// owning host tensor. Views are plain values (thread-compatible); HostTensor is move-only.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "engine/core/dtype.h"

namespace loraplex {

enum class Device : uint8_t { kCpu, kCuda };

inline constexpr int kMaxTensorDims = 4;

// Shape of up to kMaxTensorDims dimensions.
struct Shape {
  std::array<int64_t, kMaxTensorDims> dims{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> d) {
    for (int64_t v : d) dims[rank++] = v;
  }
  int64_t operator[](int i) const { return dims[i]; }
  int64_t& operator[](int i) { return dims[i]; }
  int64_t NumElements() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
  bool operator==(const Shape& o) const {
    if (rank != o.rank) return false;
    for (int i = 0; i < rank; ++i)
      if (dims[i] != o.dims[i]) return false;
    return true;
  }
  std::string ToString() const;  // "[4096,16]"
};

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Shape shape;
  Device device = Device::kCpu;

  int64_t NumElements() const { return shape.NumElements(); }
  size_t NumBytes() const { return static_cast<size_t>(NumElements()) * DTypeSize(dtype); }
  bool empty() const { return data == nullptr; }
  template <typename T>
  T* As() const { return static_cast<T*>(data); }
  // Rows [begin, begin+count) of the leading dimension.
  TensorView Rows(int64_t begin, int64_t count) const {
    TensorView v = *this;
    const int64_t row = shape.rank > 1 ? NumElements() / shape[0] : 1;
    v.data = static_cast<char*>(data) + begin * row * static_cast<int64_t>(DTypeSize(dtype));
    v.shape[0] = count;
    return v;
  }
};

// An owning, host-resident tensor.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, Shape shape);
  HostTensor(HostTensor&&) noexcept = default;
  HostTensor& operator=(HostTensor&&) noexcept = default;
  HostTensor(const HostTensor&) = delete;
  HostTensor& operator=(const HostTensor&) = delete;

  TensorView view() const { return {const_cast<std::byte*>(storage_.data()), dtype_, shape_, Device::kCpu}; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  size_t NumBytes() const { return storage_.size(); }
  void* data() { return storage_.data(); }
  const void* data() const { return storage_.data(); }
  template <typename T>
  T* As() { return reinterpret_cast<T*>(storage_.data()); }
  template <typename T>
  const T* As() const { return reinterpret_cast<const T*>(storage_.data()); }

 private:
  DType dtype_ = DType::kF32;
  Shape shape_;
  std::vector<std::byte> storage_;
};

}  // namespace loraplex
