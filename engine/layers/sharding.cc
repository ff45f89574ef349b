#include "engine/layers/sharding.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace loraplex::layers {
namespace {

absl::Status Check2d(const HostTensor& w, const char* op) {
  if (w.shape().rank != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": expected a 2-D tensor, got ", w.shape().ToString()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<HostTensor> SliceRows(const HostTensor& w, int64_t begin, int64_t count) {
  if (auto s = Check2d(w, "SliceRows"); !s.ok()) return s;
  if (begin < 0 || count < 0 || begin + count > w.shape()[0]) {
    return absl::InvalidArgumentError(absl::StrCat("SliceRows: rows [", begin, ",", begin + count,
                                                   ") outside ", w.shape().ToString()));
  }
  HostTensor out(w.dtype(), {count, w.shape()[1]});
  const size_t row_bytes = static_cast<size_t>(w.shape()[1]) * DTypeSize(w.dtype());
  if (count > 0) {
    std::memcpy(out.data(), static_cast<const char*>(w.data()) + begin * row_bytes,
                count * row_bytes);
  }
  return out;
}

absl::StatusOr<HostTensor> SliceCols(const HostTensor& w, int64_t begin, int64_t count) {
  if (auto s = Check2d(w, "SliceCols"); !s.ok()) return s;
  if (begin < 0 || count < 0 || begin + count > w.shape()[1]) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SliceCols: columns [", begin, ",", begin + count, ") outside ", w.shape().ToString()));
  }
  const int64_t rows = w.shape()[0];
  HostTensor out(w.dtype(), {rows, count});
  const size_t elem = DTypeSize(w.dtype());
  for (int64_t r = 0; r < rows && count > 0; ++r) {
    std::memcpy(static_cast<char*>(out.data()) + r * count * elem,
                static_cast<const char*>(w.data()) + (r * w.shape()[1] + begin) * elem,
                count * elem);
  }
  return out;
}

absl::StatusOr<HostTensor> ConcatRows(const std::vector<const HostTensor*>& parts) {
  if (parts.empty()) return absl::InvalidArgumentError("ConcatRows: no parts");
  int64_t rows = 0;
  for (const HostTensor* p : parts) {
    if (auto s = Check2d(*p, "ConcatRows"); !s.ok()) return s;
    if (p->dtype() != parts[0]->dtype() || p->shape()[1] != parts[0]->shape()[1]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ConcatRows: part ", p->shape().ToString(), " ", std::string(DTypeName(p->dtype())),
          " does not match ", parts[0]->shape().ToString(), " ",
          std::string(DTypeName(parts[0]->dtype()))));
    }
    rows += p->shape()[0];
  }
  HostTensor out(parts[0]->dtype(), {rows, parts[0]->shape()[1]});
  char* dst = static_cast<char*>(out.data());
  for (const HostTensor* p : parts) {
    std::memcpy(dst, p->data(), p->NumBytes());
    dst += p->NumBytes();
  }
  return out;
}

}  // namespace loraplex::layers
