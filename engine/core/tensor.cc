#include "engine/core/tensor.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace loraplex {

std::string Shape::ToString() const {
  return absl::StrCat("[", absl::StrJoin(dims.begin(), dims.begin() + rank, ","), "]");
}

HostTensor::HostTensor(DType dtype, Shape shape)
    : dtype_(dtype),
      shape_(shape),
      storage_(static_cast<size_t>(shape.NumElements()) * DTypeSize(dtype)) {}

}  // namespace loraplex
