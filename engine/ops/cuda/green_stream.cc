#include "engine/ops/cuda/green_stream.h"

#include <cuda.h>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace loraplex::ops::cuda {
namespace {

// The driver functions used, resolved once per process at the ABI of the toolkit built against
// (green contexts need a CUDA 12.4 or newer driver).
struct GreenApi {
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*get_dev_resource)(CUdevice, CUdevResource*, CUdevResourceType) = nullptr;
  CUresult (*split_by_count)(CUdevResource*, unsigned int*, const CUdevResource*, CUdevResource*, unsigned int,
                             unsigned int) = nullptr;
  CUresult (*generate_desc)(CUdevResourceDesc*, CUdevResource*, unsigned int) = nullptr;
  CUresult (*create)(CUgreenCtx*, CUdevResourceDesc, CUdevice, unsigned int) = nullptr;
  CUresult (*destroy)(CUgreenCtx) = nullptr;
  CUresult (*stream_create)(CUstream*, CUgreenCtx, unsigned int, int) = nullptr;
  CUresult (*stream_destroy)(CUstream) = nullptr;
  absl::Status status;
};

template <typename F>
absl::Status Resolve(const char* name, F* fn) {
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion(name, reinterpret_cast<void**>(fn), CUDA_VERSION, cudaEnableDefault, &found);
  if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || *fn == nullptr) {
    cudaGetLastError();
    return absl::UnimplementedError(absl::StrCat("green contexts: the driver has no ", name));
  }
  return absl::OkStatus();
}

const GreenApi& Api() {
  static const GreenApi api = [] {
    GreenApi a;
    a.status.Update(Resolve("cuDeviceGet", &a.device_get));
    a.status.Update(Resolve("cuDeviceGetDevResource", &a.get_dev_resource));
    a.status.Update(Resolve("cuDevSmResourceSplitByCount", &a.split_by_count));
    a.status.Update(Resolve("cuDevResourceGenerateDesc", &a.generate_desc));
    a.status.Update(Resolve("cuGreenCtxCreate", &a.create));
    a.status.Update(Resolve("cuGreenCtxDestroy", &a.destroy));
    a.status.Update(Resolve("cuGreenCtxStreamCreate", &a.stream_create));
    a.status.Update(Resolve("cuStreamDestroy", &a.stream_destroy));
    return a;
  }();
  return api;
}

absl::Status Check(CUresult r, absl::string_view what) {
  if (r == CUDA_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("green contexts: ", what, " failed with CUDA driver error ", r));
}

}  // namespace

absl::StatusOr<std::unique_ptr<GreenStream>> GreenStream::Create(int ordinal, int min_sms) {
  const GreenApi& api = Api();
  LORAPLEX_RETURN_IF_ERROR(api.status);
  CUdevice dev = 0;
  LORAPLEX_RETURN_IF_ERROR(Check(api.device_get(&dev, ordinal), "cuDeviceGet"));
  CUdevResource all{};
  LORAPLEX_RETURN_IF_ERROR(Check(api.get_dev_resource(dev, &all, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource"));
  if (min_sms < 1 || static_cast<unsigned int>(min_sms) > all.sm.smCount) {
    return absl::InvalidArgumentError(
        absl::StrCat("green stream: ", min_sms, " SMs asked for, the device has ", all.sm.smCount));
  }
  CUdevResource part{};
  unsigned int groups = 1;
  LORAPLEX_RETURN_IF_ERROR(Check(api.split_by_count(&part, &groups, &all, nullptr, 0, static_cast<unsigned int>(min_sms)),
                                 "cuDevSmResourceSplitByCount"));
  if (groups < 1) return absl::InternalError("green stream: the SM split gave no group");
  CUdevResourceDesc desc = nullptr;
  LORAPLEX_RETURN_IF_ERROR(Check(api.generate_desc(&desc, &part, 1), "cuDevResourceGenerateDesc"));
  std::unique_ptr<GreenStream> g(new GreenStream());
  CUgreenCtx ctx = nullptr;
  LORAPLEX_RETURN_IF_ERROR(Check(api.create(&ctx, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate"));
  g->context_ = ctx;
  CUstream stream = nullptr;
  LORAPLEX_RETURN_IF_ERROR(Check(api.stream_create(&stream, ctx, CU_STREAM_NON_BLOCKING, 0), "cuGreenCtxStreamCreate"));
  g->stream_ = reinterpret_cast<cudaStream_t>(stream);
  g->sms_ = static_cast<int>(part.sm.smCount);
  return g;
}

GreenStream::~GreenStream() {
  const GreenApi& api = Api();
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    api.stream_destroy(reinterpret_cast<CUstream>(stream_));
  }
  if (context_ != nullptr) api.destroy(static_cast<CUgreenCtx>(context_));
}

}  // namespace loraplex::ops::cuda
