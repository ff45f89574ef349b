// DeviceMemory and the ops factory. This file holds the tree's one CUDA `#if`: everything else
// reaches the GPU only through the Ops it returns.
#include "engine/ops/ops.h"

#include <algorithm>
#include <cmath>
#include <new>

#include "absl/strings/str_cat.h"

#include "engine/ops/cpu/cpu_ops.h"
#if LORAPLEX_WITH_CUDA
#include "engine/ops/cuda/cuda_ops.h"
#endif

namespace loraplex::ops {

DeviceMemory& DeviceMemory::operator=(DeviceMemory&& o) noexcept {
  if (this != &o) {
    if (ptr_ != nullptr && ops_ != nullptr) ops_->Free(ptr_);
    ops_ = o.ops_;
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ops_ = nullptr;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

DeviceMemory::~DeviceMemory() {
  if (ptr_ != nullptr && ops_ != nullptr) ops_->Free(ptr_);
}

absl::StatusOr<void*> Ops::AllocateHostStaging(size_t bytes) {
  void* p = ::operator new(std::max<size_t>(bytes, 1), std::align_val_t{64}, std::nothrow);
  if (p == nullptr) return absl::ResourceExhaustedError(absl::StrCat("host staging: ", bytes, " bytes not available"));
  return p;
}

void Ops::FreeHostStaging(void* ptr) {
  if (ptr != nullptr) ::operator delete(ptr, std::align_val_t{64});
}

bool IsValidSamplingRow(const SamplingRow& row) {
  return row.temperature >= 0.0f && std::isfinite(row.temperature) && row.top_p > 0.0f &&
         row.top_p <= 1.0f && row.top_k >= 0 && row.top_n >= 0 && row.top_n <= kMaxSampleTopN;
}

TensorView DeviceMemory::View(DType dtype, Shape shape, size_t offset) const {
  TensorView v;
  v.data = static_cast<char*>(ptr_) + offset;
  v.dtype = dtype;
  v.shape = shape;
  v.device = ops_ != nullptr ? ops_->device() : Device::kCpu;
  return v;
}

absl::StatusOr<std::unique_ptr<Ops>> CreateOps(Device device) {
  switch (device) {
    case Device::kCpu:
      return CreateCpuOps();
    case Device::kCuda:
#if LORAPLEX_WITH_CUDA
      if (!cuda::CudaDevicePresent())
        return absl::FailedPreconditionError("CreateOps: no CUDA device is visible");
      return cuda::CreateCudaOps();
#else
      return absl::FailedPreconditionError(
          "CreateOps: this build has no CUDA executor (configured with LORAPLEX_CUDA=OFF or "
          "without nvcc)");
#endif
  }
  return absl::InvalidArgumentError("CreateOps: unknown device");
}

bool CudaAvailable() {
#if LORAPLEX_WITH_CUDA
  return cuda::CudaDevicePresent();
#else
  return false;
#endif
}

absl::StatusOr<Device> ResolveExecutor(std::string_view executor) {
  if (executor == "cuda" || (executor == "auto" && CudaAvailable())) return Device::kCuda;
  if (executor == "cpu" || executor == "auto") return Device::kCpu;
  return absl::InvalidArgumentError(absl::StrCat("engine.executor must be cpu, cuda or auto, got '",
                                                 std::string(executor), "'"));
}

DType ComputeDTypeOf(Device device) { return device == Device::kCuda ? DType::kBF16 : DType::kF32; }

}  // namespace loraplex::ops
