// GPU test of the CUDA executor: every op against the CPU reference (F32, fp64 accumulation) on
// random inputs, then a short timing section. Own main (not Catch2): one line per op/case with the
// relative error ‖out−ref‖/‖ref‖, and exit status 77 without a GPU, 1 on any failure.
//
// Inputs are drawn in float, rounded to bf16, and the same rounded values feed both executors, so
// differences come only from the CUDA ops' arithmetic and output rounding. CUDA outputs are
// poisoned with NaN (0xFF bytes) before each run, so an unwritten element shows as non-finite;
// elements an op must leave alone are compared bit for bit against their initial value.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/core/dtype.h"
#include "engine/core/status.h"
#include "engine/ops/cuda/cuda_ops.h"
#include "engine/ops/ops.h"

namespace loraplex::ops {
namespace {

// Tolerances on ‖out−ref‖/‖ref‖:
// - bf16 outputs: one rounding to bf16 (relative 2^-9 ≈ 2e-3 per element) plus fp32-vs-fp64
//   accumulation; 1e-2 leaves room for accumulated rounding while any real bug (wrong element,
//   missing term) gives O(1e-1) or more.
constexpr double kTolBf16 = 1e-2;
// - F32 outputs from bf16 operands: products are exact in fp32, only the fp32 summation order
//   (tensor-core tiles, split K, warp trees) differs from fp64: ~1e-6 observed in such sums, 1e-4 bound.
constexpr double kTolF32 = 1e-4;

Ops* g_gpu = nullptr;
Ops* g_cpu = nullptr;
int g_failures = 0;
std::mt19937 g_rng(20261129);

float RoundBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

std::vector<float> RandomVec(size_t n, float lo, float hi, bool bf16 = true) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = bf16 ? RoundBf16(dist(g_rng)) : dist(g_rng);
  return v;
}

int RandomInt(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g_rng); }

// --- device helpers ----------------------------------------------------------------------------

absl::StatusOr<DeviceMemory> Upload(const void* data, size_t bytes) {
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory mem, g_gpu->Allocate(bytes));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(mem.data(), data, bytes));
  return mem;
}
absl::StatusOr<DeviceMemory> UploadBf16(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = FloatToBf16(v[i]);
  return Upload(h.data(), h.size() * 2);
}
absl::Status WriteBf16(void* dst, const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = FloatToBf16(v[i]);
  return g_gpu->CopyToDevice(dst, h.data(), h.size() * 2);
}
absl::StatusOr<DeviceMemory> UploadF32(const std::vector<float>& v) { return Upload(v.data(), v.size() * 4); }
absl::StatusOr<DeviceMemory> UploadI32(const std::vector<int32_t>& v) { return Upload(v.data(), v.size() * 4); }
absl::StatusOr<DeviceMemory> Poisoned(size_t bytes) {
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory mem, g_gpu->Allocate(bytes));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(mem.data(), 0xFF, bytes));  // NaN in bf16 and F32
  return mem;
}
absl::StatusOr<std::vector<float>> DownloadBf16(const void* src, size_t n) {
  std::vector<uint16_t> h(n);
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToHost(h.data(), src, n * 2));
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = Bf16ToFloat(h[i]);
  return v;
}
absl::StatusOr<std::vector<float>> DownloadF32(const void* src, size_t n) {
  std::vector<float> v(n);
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToHost(v.data(), src, n * 4));
  return v;
}
TensorView Gpu(const DeviceMemory& m, DType dtype, Shape shape) { return m.View(dtype, shape); }
TensorView Host(std::vector<float>& v, Shape shape) { return {v.data(), DType::kF32, shape, Device::kCpu}; }
TensorView HostI32(std::vector<int32_t>& v, Shape shape) { return {v.data(), DType::kI32, shape, Device::kCpu}; }

// --- comparison --------------------------------------------------------------------------------

bool Same(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// mask[i] = 1: compared by norm and must be finite; 0: must equal ref (the untouched initial value).
void Compare(const std::string& name, const std::vector<float>& got, const std::vector<float>& ref, double tol,
             const std::vector<uint8_t>& mask = {}) {
  if (got.size() != ref.size()) {
    std::printf("%-64s size %zu != %zu  FAIL\n", name.c_str(), got.size(), ref.size());
    ++g_failures;
    return;
  }
  double num = 0.0, den = 0.0;
  int64_t nonfinite = 0, untouched_bad = 0, compared = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!mask.empty() && mask[i] == 0) {
      if (!Same(got[i], ref[i])) ++untouched_bad;
      continue;
    }
    ++compared;
    if (!std::isfinite(got[i])) {
      ++nonfinite;
      continue;
    }
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  const double err = den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
  const bool pass = err <= tol && nonfinite == 0 && untouched_bad == 0;
  std::printf("%-64s err=%.3e tol=%.0e n=%lld nonfinite=%lld untouched_bad=%lld  %s\n", name.c_str(), err, tol,
              static_cast<long long>(compared), static_cast<long long>(nonfinite),
              static_cast<long long>(untouched_bad), pass ? "PASS" : "FAIL");
  if (!pass) ++g_failures;
}

void Run(const std::string& name, const std::function<absl::Status()>& test) {
  const absl::Status s = test();
  if (!s.ok()) {
    std::printf("%-64s ERROR %s  FAIL\n", name.c_str(), s.ToString().c_str());
    ++g_failures;
  }
}

// --- Embed, GatherRows, norms, SiluMul -----------------------------------------------------------

absl::Status TestEmbed(int64_t vocab, int64_t hidden, int64_t tokens) {
  std::vector<float> table = RandomVec(vocab * hidden, -1, 1);
  std::vector<int32_t> ids(tokens);
  for (auto& id : ids) id = RandomInt(0, static_cast<int>(vocab) - 1);
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_table, UploadBf16(table));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_ids, UploadI32(ids));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, Poisoned(tokens * hidden * 2));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Embed(Gpu(d_ids, DType::kI32, {tokens}), Gpu(d_table, DType::kBF16, {vocab, hidden}),
                                        Gpu(d_out, DType::kBF16, {tokens, hidden})));
  std::vector<float> ref(tokens * hidden);
  LORAPLEX_RETURN_IF_ERROR(g_cpu->Embed(HostI32(ids, {tokens}), Host(table, {vocab, hidden}), Host(ref, {tokens, hidden})));
  LORAPLEX_ASSIGN_OR_RETURN(auto got, DownloadBf16(d_out.data(), ref.size()));
  Compare(absl::StrCat("Embed V=", vocab, " H=", hidden, " T=", tokens), got, ref, 0.0);  // a copy: exact
  return absl::OkStatus();
}

absl::Status TestGatherRows(DType dtype, int64_t rows, int64_t hidden, int64_t picks) {
  std::vector<float> x = RandomVec(rows * hidden, -1, 1, dtype == DType::kBF16);
  std::vector<int32_t> idx(picks);
  for (auto& i : idx) i = RandomInt(0, static_cast<int>(rows) - 1);
  const size_t es = DTypeSize(dtype);
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, dtype == DType::kBF16 ? UploadBf16(x) : UploadF32(x));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_idx, UploadI32(idx));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, Poisoned(picks * hidden * es));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->GatherRows(Gpu(d_x, dtype, {rows, hidden}), Gpu(d_idx, DType::kI32, {picks}),
                                             Gpu(d_out, dtype, {picks, hidden})));
  std::vector<float> ref(picks * hidden);
  LORAPLEX_RETURN_IF_ERROR(g_cpu->GatherRows(Host(x, {rows, hidden}), HostI32(idx, {picks}), Host(ref, {picks, hidden})));
  std::vector<float> got;
  if (dtype == DType::kBF16) {
    LORAPLEX_ASSIGN_OR_RETURN(got, DownloadBf16(d_out.data(), ref.size()));
  } else {
    LORAPLEX_ASSIGN_OR_RETURN(got, DownloadF32(d_out.data(), ref.size()));
  }
  Compare(absl::StrCat("GatherRows ", std::string(DTypeName(dtype)), " [", rows, ",", hidden, "] picks=", picks), got, ref, 0.0);
  return absl::OkStatus();
}

absl::Status TestRmsNorm(int64_t tokens, int64_t hidden, bool fused, bool alias_out_x) {
  std::vector<float> x = RandomVec(tokens * hidden, -2, 2);
  std::vector<float> residual = RandomVec(tokens * hidden, -2, 2);
  std::vector<float> weight = RandomVec(hidden, 0.5f, 1.5f);
  const float eps = 1e-5f;
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(x));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_res, UploadBf16(residual));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_w, UploadBf16(weight));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, Poisoned(tokens * hidden * 2));
  const Shape s{tokens, hidden};
  const TensorView gx = Gpu(d_x, DType::kBF16, s);
  const TensorView gout = alias_out_x ? gx : Gpu(d_out, DType::kBF16, s);
  std::vector<float> ref_out(x.size());
  std::vector<float> ref_x = x;
  const TensorView hout = alias_out_x ? Host(ref_x, s) : Host(ref_out, s);
  if (fused) {
    LORAPLEX_RETURN_IF_ERROR(g_gpu->AddRmsNorm(gx, Gpu(d_res, DType::kBF16, s), Gpu(d_w, DType::kBF16, {hidden}), eps, gout));
    LORAPLEX_RETURN_IF_ERROR(g_cpu->AddRmsNorm(Host(ref_x, s), Host(residual, s), Host(weight, {hidden}), eps, hout));
  } else {
    LORAPLEX_RETURN_IF_ERROR(g_gpu->RmsNorm(gx, Gpu(d_w, DType::kBF16, {hidden}), eps, gout));
    LORAPLEX_RETURN_IF_ERROR(g_cpu->RmsNorm(Host(ref_x, s), Host(weight, {hidden}), eps, hout));
  }
  const std::string name = absl::StrCat(fused ? "AddRmsNorm" : "RmsNorm", " T=", tokens, " H=", hidden,
                                        alias_out_x ? " out=x" : "");
  LORAPLEX_ASSIGN_OR_RETURN(auto got, DownloadBf16(gout.data, x.size()));
  Compare(name + " out", got, alias_out_x ? ref_x : ref_out, kTolBf16);
  if (fused) {
    LORAPLEX_ASSIGN_OR_RETURN(auto got_res, DownloadBf16(d_res.data(), x.size()));
    Compare(name + " residual", got_res, residual, kTolBf16);
  }
  return absl::OkStatus();
}

absl::Status TestSiluMul(int64_t tokens, int64_t inter) {
  std::vector<float> gu = RandomVec(tokens * 2 * inter, -4, 4);
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_gu, UploadBf16(gu));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, Poisoned(tokens * inter * 2));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->SiluMul(Gpu(d_gu, DType::kBF16, {tokens, 2 * inter}), Gpu(d_out, DType::kBF16, {tokens, inter})));
  std::vector<float> ref(tokens * inter);
  LORAPLEX_RETURN_IF_ERROR(g_cpu->SiluMul(Host(gu, {tokens, 2 * inter}), Host(ref, {tokens, inter})));
  LORAPLEX_ASSIGN_OR_RETURN(auto got, DownloadBf16(d_out.data(), ref.size()));
  Compare(absl::StrCat("SiluMul T=", tokens, " I=", inter), got, ref, kTolBf16);
  return absl::OkStatus();
}

// --- Gemm ----------------------------------------------------------------------------------------

// CPU reference of y_rows = x_rows·wᵀ + beta·y_rows, split over output columns on all cores (the
// fp64 reference of the 8B-wide shapes would take minutes on one).
absl::StatusOr<std::vector<float>> CpuGemmParallel(std::vector<float>& x, const std::vector<float>& w, int64_t m,
                                                   int64_t n, int64_t k, float beta, const std::vector<float>& y_init) {
  const int threads = static_cast<int>(std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, 16));
  std::vector<float> y(m * n);
  std::vector<absl::Status> status(threads);
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      const int64_t n0 = t * chunk, nc = std::min(chunk, n - n0);
      if (nc <= 0) return;
      auto cpu = CreateOps(Device::kCpu);
      if (!cpu.ok()) {
        status[t] = cpu.status();
        return;
      }
      std::vector<float> part(m * nc);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < nc; ++j) part[i * nc + j] = y_init[i * n + n0 + j];
      const TensorView wv{const_cast<float*>(w.data()) + n0 * k, DType::kF32, {nc, k}, Device::kCpu};
      status[t] = (*cpu)->Gemm(Host(x, {m, k}), wv, beta, Host(part, {m, nc}));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < nc; ++j) y[i * n + n0 + j] = part[i * nc + j];
    });
  }
  for (auto& th : pool) th.join();
  for (auto& s : status) LORAPLEX_RETURN_IF_ERROR(s);
  return y;
}

// x_offset_rows: x starts that many rows into its buffer, so its address is only
// (offset·K·2)-aligned (checks that the alignment the GEMM plan assumes is the real one).
absl::Status TestGemm(int64_t m, int64_t n, int64_t k, bool f32_out, float beta, int64_t x_offset_rows,
                      const std::vector<float>& w, const DeviceMemory& d_w) {
  std::vector<float> x = RandomVec((m + x_offset_rows) * k, -1, 1);
  std::vector<float> y_init = RandomVec(m * n, -1, 1, !f32_out);
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(x));
  const size_t es = f32_out ? 4 : 2;
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, beta != 0.0f ? (f32_out ? UploadF32(y_init) : UploadBf16(y_init))
                                                           : Poisoned(m * n * es));
  const TensorView gx = Gpu(d_x, DType::kBF16, {m + x_offset_rows, k}).Rows(x_offset_rows, m);
  const TensorView gy = Gpu(d_y, f32_out ? DType::kF32 : DType::kBF16, {m, n});
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Gemm(gx, Gpu(d_w, DType::kBF16, {n, k}), beta, gy));
  std::vector<float> got;
  if (f32_out) {
    LORAPLEX_ASSIGN_OR_RETURN(got, DownloadF32(d_y.data(), m * n));
  } else {
    LORAPLEX_ASSIGN_OR_RETURN(got, DownloadBf16(d_y.data(), m * n));
  }
  // Large M: the fp64 reference checks a sample of rows (first, last, middle, random); every
  // element of the output is still checked for being written.
  std::vector<int64_t> rows;
  if (m <= 64) {
    rows.resize(m);
    std::iota(rows.begin(), rows.end(), 0);
  } else {
    rows = {0, 1, m / 3, m / 2, m - 2, m - 1, RandomInt(0, static_cast<int>(m) - 1), RandomInt(0, static_cast<int>(m) - 1)};
  }
  const int64_t mr = static_cast<int64_t>(rows.size());
  std::vector<float> xs(mr * k), ys_init(mr * n), got_s(mr * n);
  for (int64_t i = 0; i < mr; ++i) {
    std::copy_n(x.begin() + (rows[i] + x_offset_rows) * k, k, xs.begin() + i * k);
    std::copy_n(y_init.begin() + rows[i] * n, n, ys_init.begin() + i * n);
    std::copy_n(got.begin() + rows[i] * n, n, got_s.begin() + i * n);
  }
  LORAPLEX_ASSIGN_OR_RETURN(auto ref, CpuGemmParallel(xs, w, mr, n, k, beta, ys_init));
  const int64_t unwritten = std::count_if(got.begin(), got.end(), [](float v) { return !std::isfinite(v); });
  const std::string name = absl::StrCat("Gemm M=", m, " N=", n, " K=", k, f32_out ? " F32" : " BF16", " beta=", beta,
                                        x_offset_rows ? absl::StrCat(" x+", x_offset_rows, "rows") : "",
                                        m > 64 ? absl::StrCat(" (", mr, " rows checked)") : "");
  Compare(name, got_s, ref, f32_out ? kTolF32 * 10 : kTolBf16);  // F32 out: K up to 14336 terms
  if (unwritten > 0) {
    std::printf("%-64s unwritten=%lld  FAIL\n", name.c_str(), static_cast<long long>(unwritten));
    ++g_failures;
  }
  return absl::OkStatus();
}

// SetSkinnyGemmForTest's mode, the executor's default (2) but while a check changes it.
int g_skinny_mode = 2;

// Gemm's own kernel for few rows (skinny_gemm.h): which shapes take it, and its results against
// the CPU at its edges (1 and 16 rows, ragged N, x not at its buffer's start, splits of K of 1 to
// 14), with cuBLASLt's on the same arguments for comparison.
void SkinnyGemmTests() {
  auto splits_of = [](int64_t m, int64_t n, int64_t k, DType y_dtype, float beta) -> absl::StatusOr<int> {
    const TensorView x{nullptr, DType::kBF16, Shape({m, k})};
    const TensorView w{nullptr, DType::kBF16, Shape({n, k})};
    return cuda::SkinnyGemmSplitsForTest(g_gpu, x, w, beta, TensorView{nullptr, y_dtype, Shape({m, n})});
  };
  // An 8B model's qkv, o and down at 1-16 rows take it; gate_up (224 column tiles, dealt unevenly
  // over the SMs), 17 rows, F32 or accumulated output and K not a multiple of 64 do not.
  Run("Gemm skinny: which shapes", [&]() -> absl::Status {
    for (auto [m, n, k, want] : std::vector<std::tuple<int64_t, int64_t, int64_t, bool>>{
             {1, 6144, 4096, true}, {16, 4096, 4096, true}, {8, 4096, 14336, true}, {17, 4096, 4096, false},
             {1, 28672, 4096, false}, {1, 4096, 4072, false}, {1, 256, 256, false}}) {
      LORAPLEX_ASSIGN_OR_RETURN(const int splits, splits_of(m, n, k, DType::kBF16, 0.0f));
      if ((splits > 0) != want) {
        return absl::InternalError(absl::StrCat("M=", m, " N=", n, " K=", k, ": ", splits, " splits, expected ",
                                                want ? "the skinny kernel" : "cuBLASLt"));
      }
    }
    LORAPLEX_ASSIGN_OR_RETURN(const int f32, splits_of(1, 4096, 4096, DType::kF32, 0.0f));
    LORAPLEX_ASSIGN_OR_RETURN(const int beta, splits_of(1, 4096, 4096, DType::kBF16, 1.0f));
    if (f32 != 0 || beta != 0) return absl::InternalError("F32 or beta != 0 output took the skinny kernel");
    return absl::OkStatus();
  });
  for (auto [m, n, k, off] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {1, 6144, 4096, 0}, {16, 4096 + 72, 4096, 1}, {3, 4096, 14336, 0}, {9, 16000, 1024, 2},
           {5, 2000, 8192, 0}}) {
    std::vector<float> w = RandomVec(n * k, -1, 1);
    auto d_w = UploadBf16(w);
    Run(absl::StrCat("Gemm skinny M=", m, " N=", n, " K=", k), [&]() -> absl::Status {
      LORAPLEX_RETURN_IF_ERROR(d_w.status());
      LORAPLEX_ASSIGN_OR_RETURN(const int splits, splits_of(m, n, k, DType::kBF16, 0.0f));
      if (splits == 0) return absl::InternalError("the shape does not take the skinny kernel");
      std::printf("  (%d splits of K)\n", splits);
      LORAPLEX_RETURN_IF_ERROR(TestGemm(m, n, k, false, 0.0f, off, w, *d_w));
      // The build without hoisted copy addresses (the default's is Gemm's), against the CPU too.
      LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmHoistForTest(g_gpu, 0));
      const absl::Status plain = TestGemm(m, n, k, false, 0.0f, off, w, *d_w);
      LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmHoistForTest(g_gpu, 1));
      LORAPLEX_RETURN_IF_ERROR(plain);
      LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmForTest(g_gpu, 0));
      const absl::Status lt = TestGemm(m, n, k, false, 0.0f, off, w, *d_w);
      LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmForTest(g_gpu, g_skinny_mode));
      return lt;
    });
  }
  // A chain as in a decode step, GEMM -> RmsNorm -> GEMM -> RmsNorm -> GEMM at one row: each GEMM
  // a programmatic dependent of the kernel before, the splits sharing one scratch and counters;
  // eagerly and replayed from a graph three times. The same bits every way (sums in split order),
  // and cuBLASLt's chain within bf16 rounding.
  Run("Gemm skinny chain, graph", [&]() -> absl::Status {
    constexpr int64_t kH = 4096, kD = 6144;
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_up, UploadBf16(RandomVec(kD * kH, -1, 1)));
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_down, UploadBf16(RandomVec(kH * kD, -1, 1)));
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_sq, UploadBf16(RandomVec(kH * kH, -1, 1)));
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_ones, UploadBf16(std::vector<float>(kD, 1.0f)));
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(RandomVec(kH, -1, 1)));
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_a, Poisoned(kD * 2));
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_b, Poisoned(kD * 2));
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, Poisoned(kH * 2));
    auto bf = [](const DeviceMemory& m, int64_t cols) { return Gpu(m, DType::kBF16, {1, cols}); };
    // x (1 x 4096) -> up (N 6144, K 4096: 8 splits) -> norm -> down (N 4096, K 6144: 12 splits) ->
    // norm -> square (4096 x 4096: 8 splits).
    auto body = [&]() -> absl::Status {
      LORAPLEX_RETURN_IF_ERROR(g_gpu->Gemm(bf(d_x, kH), Gpu(d_up, DType::kBF16, {kD, kH}), 0.0f, bf(d_a, kD)));
      LORAPLEX_RETURN_IF_ERROR(g_gpu->RmsNorm(bf(d_a, kD), Gpu(d_ones, DType::kBF16, {kD}), 1e-5f, bf(d_b, kD)));
      LORAPLEX_RETURN_IF_ERROR(g_gpu->Gemm(bf(d_b, kD), Gpu(d_down, DType::kBF16, {kH, kD}), 0.0f, bf(d_a, kH)));
      LORAPLEX_RETURN_IF_ERROR(g_gpu->RmsNorm(bf(d_a, kH), Gpu(d_ones, DType::kBF16, {kH}), 1e-5f, bf(d_b, kH)));
      return g_gpu->Gemm(bf(d_b, kH), Gpu(d_sq, DType::kBF16, {kH, kH}), 0.0f, bf(d_y, kH));
    };
    auto result = [&]() -> absl::StatusOr<std::vector<float>> {
      LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
      return DownloadBf16(d_y.data(), kH);
    };
    for (auto [n, k] : std::vector<std::pair<int64_t, int64_t>>{{kD, kH}, {kH, kD}, {kH, kH}}) {
      const TensorView x{nullptr, DType::kBF16, Shape({1, k})}, w{nullptr, DType::kBF16, Shape({n, k})};
      const TensorView y{nullptr, DType::kBF16, Shape({1, n})};
      LORAPLEX_ASSIGN_OR_RETURN(const int splits, cuda::SkinnyGemmSplitsForTest(g_gpu, x, w, 0.0f, y));
      if (splits < 2) {
        return absl::InternalError(absl::StrCat("N=", n, " K=", k, ": ", splits, " splits, expected 2 or more"));
      }
    }
    LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmForTest(g_gpu, 0));
    LORAPLEX_RETURN_IF_ERROR(body());
    LORAPLEX_ASSIGN_OR_RETURN(const std::vector<float> lt, result());
    LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmForTest(g_gpu, g_skinny_mode));
    LORAPLEX_RETURN_IF_ERROR(body());
    LORAPLEX_ASSIGN_OR_RETURN(const std::vector<float> eager, result());
    Compare("Gemm skinny chain vs cuBLASLt's", eager, lt, 3 * kTolBf16);
    // The default (hoisted) build and the other copy the same bytes to the same places: the same bits.
    LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmHoistForTest(g_gpu, 0));
    const absl::Status plain_run = body();
    LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmHoistForTest(g_gpu, 1));
    LORAPLEX_RETURN_IF_ERROR(plain_run);
    LORAPLEX_ASSIGN_OR_RETURN(const std::vector<float> plain, result());
    Compare("Gemm skinny chain, unhoisted copies vs default", plain, eager, 0.0, std::vector<uint8_t>(kH, 0));
    LORAPLEX_ASSIGN_OR_RETURN(auto graph, cuda::CaptureCudaGraph(g_gpu, body));
    for (int replay = 0; replay < 3; ++replay) {
      LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_y.data(), 0xFF, kH * 2));
      LORAPLEX_RETURN_IF_ERROR(graph->Launch());
      LORAPLEX_ASSIGN_OR_RETURN(const std::vector<float> got, result());
      const int64_t differ = std::inner_product(got.begin(), got.end(), eager.begin(), int64_t{0}, std::plus<>(),
                                                [](float a, float b) { return std::memcmp(&a, &b, 4) != 0 ? 1 : 0; });
      if (differ != 0) {
        return absl::InternalError(absl::StrCat("graph replay ", replay, ": ", differ, " of ", kH,
                                                " outputs differ from the eager chain's bits"));
      }
    }
    return absl::OkStatus();
  });
}

void GemmTests() {
  const std::vector<std::pair<int64_t, int64_t>> llama = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}};
  for (auto [n, k] : llama) {
    std::vector<float> w = RandomVec(n * k, -1, 1);
    auto d_w = UploadBf16(w);
    if (!d_w.ok()) {
      Run("Gemm upload", [&] { return d_w.status(); });
      continue;
    }
    for (int64_t m : {1, 7, 64, 300}) {
      Run(absl::StrCat("Gemm M=", m, " N=", n, " K=", k), [&] { return TestGemm(m, n, k, false, 0.0f, 0, w, *d_w); });
    }
    if (n == 4096 && k == 4096) {
      Run("Gemm F32 beta=1", [&] { return TestGemm(7, n, k, true, 1.0f, 0, w, *d_w); });
      Run("Gemm BF16 beta=1", [&] { return TestGemm(64, n, k, false, 1.0f, 0, w, *d_w); });
      Run("Gemm F32 M=300", [&] { return TestGemm(300, n, k, true, 0.0f, 0, w, *d_w); });
    }
  }
  // Algorithms chosen by timing cuBLASLt's candidates (SetGemmTimedForTest) give the same results.
  // (Shapes no timing case below uses: the choice stays with the ops.)
  for (auto [n, k] : std::vector<std::pair<int64_t, int64_t>>{{5120, 4096}, {12288, 2048}}) {
    std::vector<float> w = RandomVec(n * k, -1, 1);
    auto d_w = UploadBf16(w);
    Run(absl::StrCat("Gemm timed N=", n, " K=", k), [&]() -> absl::Status {
      LORAPLEX_RETURN_IF_ERROR(d_w.status());
      LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, g_gpu->Allocate(static_cast<size_t>(256) * k * 2));
      LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, g_gpu->Allocate(static_cast<size_t>(256) * n * 2));
      LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_x.data(), 0, static_cast<size_t>(256) * k * 2));
      LORAPLEX_RETURN_IF_ERROR(cuda::SetGemmTimedForTest(g_gpu, true));
      const absl::Status prepared = g_gpu->PrepareGemm(Gpu(d_x, DType::kBF16, {256, k}),
                                                       Gpu(*d_w, DType::kBF16, {n, k}), Gpu(d_y, DType::kBF16, {256, n}));
      LORAPLEX_RETURN_IF_ERROR(cuda::SetGemmTimedForTest(g_gpu, false));
      LORAPLEX_RETURN_IF_ERROR(prepared);
      for (int64_t m : {32, 64, 200}) LORAPLEX_RETURN_IF_ERROR(TestGemm(m, n, k, false, 0.0f, 0, w, *d_w));
      return absl::OkStatus();
    });
  }
  SkinnyGemmTests();
  for (auto [m, n, k, f32, beta, off] : std::vector<std::tuple<int64_t, int64_t, int64_t, bool, float, int64_t>>{
           {5, 100, 72, false, 0.0f, 1}, {33, 136, 200, true, 0.5f, 3}, {2, 8, 8, false, 1.0f, 0}}) {
    std::vector<float> w = RandomVec(n * k, -1, 1);
    auto d_w = UploadBf16(w);
    Run(absl::StrCat("Gemm small M=", m), [&]() -> absl::Status {
      LORAPLEX_RETURN_IF_ERROR(d_w.status());
      return TestGemm(m, n, k, f32, beta, off, w, *d_w);
    });
  }
}

// --- RoPE + cache ------------------------------------------------------------------------------

absl::Status TestRope(int hq, int hkv, int d, int tokens) {
  const int bs = 16, num_blocks = (tokens + 8 + bs - 1) / bs;
  const int64_t width = static_cast<int64_t>(hq + 2 * hkv) * d, kv_row = static_cast<int64_t>(hkv) * d;
  const int64_t slots = static_cast<int64_t>(num_blocks) * bs;
  std::vector<float> qkv = RandomVec(tokens * width, -2, 2);
  std::vector<float> inv_freq(d / 2);
  for (int i = 0; i < d / 2; ++i) inv_freq[i] = std::pow(500000.0f, -2.0f * i / d);  // llama3's theta
  std::vector<int32_t> all_slots(slots);
  std::iota(all_slots.begin(), all_slots.end(), 0);
  std::shuffle(all_slots.begin(), all_slots.end(), g_rng);
  std::vector<int32_t> positions(tokens), slot_mapping(tokens), token_seq(tokens, 0);
  for (int t = 0; t < tokens; ++t) {
    positions[t] = t == 0 ? 131071 : RandomInt(0, 9000);  // one very long position: large angles
    slot_mapping[t] = all_slots[t];
  }
  slot_mapping[1] = -1;  // not cached (e.g. a recomputed token)
  token_seq[2] = -1;     // padding row: left untouched, nothing cached
  std::vector<float> k_cache = RandomVec(slots * kv_row, -1, 1), v_cache = RandomVec(slots * kv_row, -1, 1);
  std::vector<uint8_t> cache_mask(k_cache.size(), 0), qkv_mask(qkv.size(), 1);
  for (int t = 0; t < tokens; ++t) {
    if (token_seq[t] < 0) std::fill_n(qkv_mask.begin() + t * width, width, 0);
    if (slot_mapping[t] < 0 || token_seq[t] < 0) continue;
    for (int64_t e = 0; e < kv_row; ++e) {
      const int64_t i = slot_mapping[t] * kv_row + e;
      k_cache[i] = v_cache[i] = NAN;  // written slots start as poison on both sides
      cache_mask[i] = 1;
    }
  }
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_qkv, UploadBf16(qkv));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_freq, UploadF32(inv_freq));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_pos, UploadI32(positions));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_slots, UploadI32(slot_mapping));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_seq, UploadI32(token_seq));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_k, UploadBf16(k_cache));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_v, UploadBf16(v_cache));
  AttentionMeta meta;
  meta.num_tokens = tokens;
  meta.block_size = bs;
  const Shape cs{num_blocks, bs, hkv, d};
  meta.positions = static_cast<const int32_t*>(d_pos.data());
  meta.slot_mapping = static_cast<const int32_t*>(d_slots.data());
  meta.token_seq = static_cast<const int32_t*>(d_seq.data());
  LORAPLEX_RETURN_IF_ERROR(g_gpu->RopeAndCacheKv(Gpu(d_qkv, DType::kBF16, {tokens, width}), Gpu(d_freq, DType::kF32, {d / 2}),
                                                 hq, hkv, d, meta,
                                                 {Gpu(d_k, DType::kBF16, cs), Gpu(d_v, DType::kBF16, cs)}));
  AttentionMeta hmeta = meta;
  hmeta.positions = positions.data();
  hmeta.slot_mapping = slot_mapping.data();
  hmeta.token_seq = token_seq.data();
  std::vector<float> ref_qkv = qkv, ref_k = k_cache, ref_v = v_cache;
  LORAPLEX_RETURN_IF_ERROR(g_cpu->RopeAndCacheKv(Host(ref_qkv, {tokens, width}), Host(inv_freq, {d / 2}), hq, hkv, d, hmeta,
                                                 {Host(ref_k, cs), Host(ref_v, cs)}));
  const std::string name = absl::StrCat("RopeAndCacheKv Hq=", hq, " Hkv=", hkv, " D=", d, " T=", tokens);
  LORAPLEX_ASSIGN_OR_RETURN(auto got_qkv, DownloadBf16(d_qkv.data(), qkv.size()));
  LORAPLEX_ASSIGN_OR_RETURN(auto got_k, DownloadBf16(d_k.data(), k_cache.size()));
  LORAPLEX_ASSIGN_OR_RETURN(auto got_v, DownloadBf16(d_v.data(), v_cache.size()));
  Compare(name + " qkv", got_qkv, ref_qkv, kTolBf16, qkv_mask);
  Compare(name + " k cache", got_k, ref_k, kTolBf16, cache_mask);
  Compare(name + " v cache", got_v, ref_v, 0.0, cache_mask);  // v is copied: exact
  return absl::OkStatus();
}

// --- Attention -----------------------------------------------------------------------------------

struct AttnCase {
  std::string name;
  int hq, hkv, d;
  std::vector<int> ctx;    // tokens in the cache per sequence after this step
  std::vector<int> q_len;  // new tokens per sequence (the last q_len positions)
  int padding = 0;
  cuda::AttentionSplitMode mode = cuda::AttentionSplitMode::kAuto;
};

absl::Status TestAttention(const AttnCase& c) {
  const int bs = 16, num_seqs = static_cast<int>(c.ctx.size()), max_seqs = num_seqs + 2;
  const int max_ctx = *std::max_element(c.ctx.begin(), c.ctx.end());
  const int mbps = (max_ctx + bs - 1) / bs + 1;
  int total_blocks = 5;  // spare blocks nobody owns
  for (int x : c.ctx) total_blocks += (x + bs - 1) / bs;
  std::vector<int32_t> phys(total_blocks);
  std::iota(phys.begin(), phys.end(), 0);
  std::shuffle(phys.begin(), phys.end(), g_rng);  // block tables point all over the cache
  std::vector<int32_t> tables(static_cast<size_t>(max_seqs) * mbps, -1), context_lens(max_seqs, 0);
  int next = 0;
  for (int s = 0; s < num_seqs; ++s) {
    for (int b = 0; b < (c.ctx[s] + bs - 1) / bs; ++b) tables[s * mbps + b] = phys[next++];
    context_lens[s] = c.ctx[s];
  }
  struct Tok { int seq, pos; };
  std::vector<Tok> toks;
  for (int s = 0; s < num_seqs; ++s)
    for (int i = c.ctx[s] - c.q_len[s]; i < c.ctx[s]; ++i) toks.push_back({s, i});
  for (int i = 0; i < c.padding; ++i) toks.push_back({-1, 0});
  std::shuffle(toks.begin(), toks.end(), g_rng);
  const int tokens = static_cast<int>(toks.size());
  std::vector<int32_t> positions(tokens), token_seq(tokens), slot_mapping(tokens);
  for (int t = 0; t < tokens; ++t) {
    positions[t] = toks[t].pos;
    token_seq[t] = toks[t].seq;
    slot_mapping[t] = toks[t].seq < 0 ? -1 : tables[toks[t].seq * mbps + toks[t].pos / bs] * bs + toks[t].pos % bs;
  }
  const int64_t width = static_cast<int64_t>(c.hq + 2 * c.hkv) * c.d;
  const int64_t q_width = static_cast<int64_t>(c.hq) * c.d;
  // q three times wider than k: scores of O(1) after the 1/sqrt(D) scale, so softmax is peaked
  // enough that a wrong key or a wrong max shows.
  std::vector<float> qkv(tokens * width);
  for (int t = 0; t < tokens; ++t)
    for (int64_t e = 0; e < width; ++e) qkv[t * width + e] = RoundBf16(std::uniform_real_distribution<float>(-1, 1)(g_rng) * (e < q_width ? 3.0f : 1.0f));
  const Shape cs{total_blocks, bs, c.hkv, c.d};
  std::vector<float> k_cache = RandomVec(cs.NumElements(), -1, 1), v_cache = RandomVec(cs.NumElements(), -1, 1);
  LORAPLEX_RETURN_IF_ERROR(cuda::SetAttentionSplitModeForTest(g_gpu, c.mode));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_qkv, UploadBf16(qkv));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_k, UploadBf16(k_cache));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_v, UploadBf16(v_cache));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_pos, UploadI32(positions));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_seq, UploadI32(token_seq));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_slot, UploadI32(slot_mapping));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_tables, UploadI32(tables));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_ctx, UploadI32(context_lens));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, Poisoned(tokens * q_width * 2));
  AttentionMeta meta;
  meta.positions = static_cast<const int32_t*>(d_pos.data());
  meta.slot_mapping = static_cast<const int32_t*>(d_slot.data());
  meta.token_seq = static_cast<const int32_t*>(d_seq.data());
  meta.context_lens = static_cast<const int32_t*>(d_ctx.data());
  meta.block_tables = static_cast<const int32_t*>(d_tables.data());
  meta.num_tokens = tokens;
  meta.max_seqs = max_seqs;
  meta.max_blocks_per_seq = mbps;
  meta.block_size = bs;
  meta.max_context_len = max_ctx;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  const absl::Status run = g_gpu->Attention(Gpu(d_qkv, DType::kBF16, {tokens, width}), c.hq, c.hkv, c.d, scale, meta,
                                            {Gpu(d_k, DType::kBF16, cs), Gpu(d_v, DType::kBF16, cs)},
                                            Gpu(d_out, DType::kBF16, {tokens, q_width}));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetAttentionSplitModeForTest(g_gpu, cuda::AttentionSplitMode::kAuto));
  LORAPLEX_RETURN_IF_ERROR(run);
  AttentionMeta hmeta = meta;
  hmeta.positions = positions.data();
  hmeta.slot_mapping = slot_mapping.data();
  hmeta.token_seq = token_seq.data();
  hmeta.context_lens = context_lens.data();
  hmeta.block_tables = tables.data();
  std::vector<float> ref(tokens * q_width);
  LORAPLEX_RETURN_IF_ERROR(g_cpu->Attention(Host(qkv, {tokens, width}), c.hq, c.hkv, c.d, scale, hmeta,
                                            {Host(k_cache, cs), Host(v_cache, cs)}, Host(ref, {tokens, q_width})));
  LORAPLEX_ASSIGN_OR_RETURN(auto got, DownloadBf16(d_out.data(), ref.size()));
  const char* mode = c.mode == cuda::AttentionSplitMode::kAuto ? "auto" : c.mode == cuda::AttentionSplitMode::kAlways ? "split" : "nosplit";
  Compare(absl::StrCat("Attention ", c.name, " Hq=", c.hq, " Hkv=", c.hkv, " D=", c.d, " T=", tokens, " ", mode), got, ref,
          kTolBf16);
  return absl::OkStatus();
}

void AttentionTests() {
  using M = cuda::AttentionSplitMode;
  std::vector<int> decode_ctx = {1, 2, 17, 64, 129, 300, 511, 700};
  for (int i = 0; i < 8; ++i) decode_ctx.push_back(RandomInt(1, 700));
  const std::vector<int> ones(decode_ctx.size(), 1);
  std::vector<AttnCase> cases;
  for (M mode : {M::kAuto, M::kNever, M::kAlways}) {
    cases.push_back({"decode", 32, 8, 128, decode_ctx, ones, 2, mode});
    cases.push_back({"decode", 8, 8, 64, decode_ctx, ones, 0, mode});
  }
  cases.push_back({"decode", 16, 2, 128, decode_ctx, ones, 1, M::kAuto});   // group 8
  cases.push_back({"decode", 28, 4, 128, decode_ctx, ones, 0, M::kAuto});   // group 7 (Qwen2-7B)
  cases.push_back({"decode", 8, 4, 256, decode_ctx, ones, 0, M::kAlways});  // head_dim 256
  // Prefill: a fresh 300-token prompt, 17 new tokens after a 500-token cached prefix, a 1-token
  // prompt, and padding rows.
  for (M mode : {M::kAuto, M::kAlways}) {
    cases.push_back({"prefill", 32, 8, 128, {300, 517, 1}, {300, 17, 1}, 3, mode});
    cases.push_back({"prefill", 8, 8, 128, {300, 517, 1}, {300, 17, 1}, 0, mode});
  }
  cases.push_back({"prefill", 4, 4, 256, {100, 700}, {100, 40}, 1, M::kAuto});
  for (const auto& c : cases) Run("Attention " + c.name, [&] { return TestAttention(c); });
}

// --- LoRA ----------------------------------------------------------------------------------------

// Adapter slots of one wrapped layer, on both executors: the device table points at bf16 copies
// on the GPU, the host table at the same (bf16-rounded) values in F32.
struct LoraWorld {
  int num_slots, num_slices, in, max_rank;
  int offsets[5] = {};
  std::vector<std::vector<float>> a, b;             // [slot * num_slices + slice]
  std::vector<DeviceMemory> d_a, d_b;
  std::vector<LoraSliceWeights> host_table, dev_table;
  DeviceMemory d_table;

  LoraModule Module(bool device) const {
    LoraModule m;
    m.table = device ? static_cast<const LoraSliceWeights*>(d_table.data()) : host_table.data();
    m.num_slots = num_slots;
    m.num_slices = num_slices;
    m.in_features = in;
    m.max_rank = max_rank;
    for (int s = 0; s <= num_slices; ++s) m.slice_offsets[s] = offsets[s];
    return m;
  }
  int width() const { return offsets[num_slices]; }

  // (Re)writes one slot's slice in place: same device memory, new rank and values.
  absl::Status SetSlice(int slot, int slice, int rank) {
    const int i = slot * num_slices + slice;
    const int w = offsets[slice + 1] - offsets[slice];
    a[i] = RandomVec(static_cast<size_t>(rank) * in, -1, 1);
    b[i] = RandomVec(static_cast<size_t>(w) * rank, -1, 1);
    if (d_a[i].data() == nullptr) {
      LORAPLEX_ASSIGN_OR_RETURN(d_a[i], g_gpu->Allocate(static_cast<size_t>(max_rank) * in * 2));
      LORAPLEX_ASSIGN_OR_RETURN(d_b[i], g_gpu->Allocate(static_cast<size_t>(w) * max_rank * 2));
    }
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_a[i].data(), a[i]));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_b[i].data(), b[i]));
    // y·B has rank terms of O(1/3) each: scale it back to O(1) so the delta is as large as the
    // base output it is added to and bf16 rounding of out does not hide it.
    const float scale = rank > 0 ? RoundBf16(1.5f / std::sqrt(static_cast<float>(rank))) : 0.0f;
    host_table[i] = {a[i].data(), b[i].data(), rank, scale};
    dev_table[i] = {d_a[i].data(), d_b[i].data(), rank, scale};
    return g_gpu->CopyToDevice(static_cast<char*>(d_table.data()) + i * sizeof(LoraSliceWeights), &dev_table[i],
                               sizeof(LoraSliceWeights));
  }

  static absl::StatusOr<std::unique_ptr<LoraWorld>> Create(int num_slots, int in, std::vector<int> widths, int max_rank,
                                                          const std::vector<std::vector<int>>& ranks) {
    auto w = std::make_unique<LoraWorld>();
    w->num_slots = num_slots;
    w->num_slices = static_cast<int>(widths.size());
    w->in = in;
    w->max_rank = max_rank;
    for (int s = 0; s < w->num_slices; ++s) w->offsets[s + 1] = w->offsets[s] + widths[s];
    const int n = num_slots * w->num_slices;
    w->a.resize(n);
    w->b.resize(n);
    w->d_a.resize(n);
    w->d_b.resize(n);
    w->host_table.resize(n);
    w->dev_table.resize(n);
    LORAPLEX_ASSIGN_OR_RETURN(w->d_table, g_gpu->Allocate(n * sizeof(LoraSliceWeights)));
    for (int slot = 0; slot < num_slots; ++slot)
      for (int s = 0; s < w->num_slices; ++s) LORAPLEX_RETURN_IF_ERROR(w->SetSlice(slot, s, ranks[slot][s]));
    return w;
  }
};

// Host segments as lora::BuildLoraBatch makes them: sorted by slot, stable, at most `max_len`
// tokens a segment, base-model tokens (slot -1) in none.
struct Segs {
  std::vector<int32_t> token_rows, seg_starts{0}, seg_slots;
  int32_t count() const { return static_cast<int32_t>(seg_slots.size()); }
};
Segs BuildSegs(const std::vector<int>& token_slots, int max_len) {
  Segs s;
  std::vector<int32_t> order(token_slots.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return token_slots[a] < token_slots[b]; });
  for (int32_t row : order) {
    const int slot = token_slots[row];
    if (slot < 0) continue;
    const bool new_seg = s.seg_slots.empty() || s.seg_slots.back() != slot ||
                         static_cast<int>(s.token_rows.size()) - s.seg_starts.back() >= max_len;
    if (new_seg && !s.seg_slots.empty()) s.seg_starts.push_back(static_cast<int32_t>(s.token_rows.size()));
    if (new_seg) s.seg_slots.push_back(slot);
    s.token_rows.push_back(row);
  }
  if (!s.seg_slots.empty()) s.seg_starts.push_back(static_cast<int32_t>(s.token_rows.size()));
  return s;
}

// Fixed-capacity device segment buffers, rewritten each step like the engine's.
struct DevSegs {
  DeviceMemory rows, starts, slots, count, rank_bound, class_ends;
  int max_segments, num_tokens;
  static absl::StatusOr<DevSegs> Create(int max_segments, int num_tokens) {
    DevSegs d;
    d.max_segments = max_segments;
    d.num_tokens = num_tokens;
    LORAPLEX_ASSIGN_OR_RETURN(d.rows, Poisoned(num_tokens * 4));
    LORAPLEX_ASSIGN_OR_RETURN(d.starts, Poisoned((max_segments + 1) * 4));
    LORAPLEX_ASSIGN_OR_RETURN(d.slots, Poisoned(max_segments * 4));
    LORAPLEX_ASSIGN_OR_RETURN(d.count, Poisoned(4));
    LORAPLEX_ASSIGN_OR_RETURN(d.rank_bound, Poisoned(4));
    LORAPLEX_ASSIGN_OR_RETURN(d.class_ends, Poisoned(4 * kLoraRankClasses));
    return d;
  }
  // Writes only the live entries: stale ones from a previous step stay behind the count.
  // `bound`: LoraSegments::max_rank for the step (the default bounds nothing). With `world`, the
  // segments go up ordered by rank class (LoraSegments::class_ends, as the model orders them);
  // without, all in the last class.
  absl::Status Write(const Segs& s, int32_t bound = INT32_MAX, const LoraWorld* world = nullptr);
  // with_bound false: no LoraSegments::max_rank (the kernels use the module's max rank).
  LoraSegments View(bool with_bound = true) const {
    LoraSegments v{static_cast<const int32_t*>(rows.data()), static_cast<const int32_t*>(starts.data()),
                   static_cast<const int32_t*>(slots.data()), static_cast<const int32_t*>(count.data()), max_segments,
                   num_tokens, with_bound ? static_cast<const int32_t*>(rank_bound.data()) : nullptr};
    v.class_ends = static_cast<const int32_t*>(class_ends.data());
    return v;
  }
};

// The tightest LoraSegments::max_rank of a step: the largest rank any of its segments' slots has.
int32_t StepRankBound(const LoraWorld& w, const Segs& s) {
  int32_t bound = 0;
  for (int slot : s.seg_slots) {
    for (int sl = 0; sl < w.num_slices; ++sl) bound = std::max(bound, w.host_table[slot * w.num_slices + sl].rank);
  }
  return bound;
}

absl::Status DevSegs::Write(const Segs& s, int32_t bound, const LoraWorld* world) {
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(rank_bound.data(), &bound, 4));
  if (s.count() > max_segments) return absl::InvalidArgumentError("test: too many segments");
  const int32_t n = s.count();
  // Each segment's class: that of the highest rank its slot has on any slice.
  std::vector<int> cls(static_cast<size_t>(n), kLoraRankClasses - 1);
  if (world != nullptr) {
    for (int32_t g = 0; g < n; ++g) {
      int32_t rank = 0;
      for (int sl = 0; sl < world->num_slices; ++sl) {
        rank = std::max(rank, world->host_table[s.seg_slots[g] * world->num_slices + sl].rank);
      }
      cls[g] = LoraRankClass(rank);
    }
  }
  Segs sorted;
  std::vector<int32_t> ends(kLoraRankClasses, 0);
  for (int c = 0; c < kLoraRankClasses; ++c) {
    for (int32_t g = 0; g < n; ++g) {
      if (cls[g] != c) continue;
      sorted.token_rows.insert(sorted.token_rows.end(), s.token_rows.begin() + s.seg_starts[g],
                               s.token_rows.begin() + s.seg_starts[g + 1]);
      sorted.seg_starts.push_back(static_cast<int32_t>(sorted.token_rows.size()));
      sorted.seg_slots.push_back(s.seg_slots[g]);
    }
    ends[c] = sorted.count();
  }
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(rows.data(), sorted.token_rows.data(), sorted.token_rows.size() * 4));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(starts.data(), sorted.seg_starts.data(), sorted.seg_starts.size() * 4));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(slots.data(), sorted.seg_slots.data(), sorted.seg_slots.size() * 4));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(class_ends.data(), ends.data(), ends.size() * 4));
  return g_gpu->CopyToDevice(count.data(), &n, 4);
}

LoraSegments HostSegs(Segs& s, int num_tokens, int32_t* count) {
  // The CPU ops reject null arrays, which empty vectors may give when no token has an adapter.
  static int32_t empty_array = 0;
  auto ptr = [](std::vector<int32_t>& v) { return v.empty() ? &empty_array : v.data(); };
  *count = s.count();
  return {ptr(s.token_rows), ptr(s.seg_starts), ptr(s.seg_slots), count, s.count(), num_tokens};
}

// Which y columns the shrink sets and which out columns the expand changes.
void LoraMasks(const LoraWorld& w, const Segs& s, int tokens, std::vector<uint8_t>* y_mask, std::vector<uint8_t>* out_mask) {
  const int yw = w.num_slices * w.max_rank;
  y_mask->assign(static_cast<size_t>(tokens) * yw, 0);
  out_mask->assign(static_cast<size_t>(tokens) * w.width(), 0);
  for (int g = 0; g < s.count(); ++g) {
    for (int i = s.seg_starts[g]; i < s.seg_starts[g + 1]; ++i) {
      const int row = s.token_rows[i];
      for (int sl = 0; sl < w.num_slices; ++sl) {
        const int r = w.host_table[s.seg_slots[g] * w.num_slices + sl].rank;
        for (int j = 0; j < r; ++j) (*y_mask)[row * yw + sl * w.max_rank + j] = 1;
        if (r > 0) std::fill_n(out_mask->begin() + row * w.width() + w.offsets[sl], w.offsets[sl + 1] - w.offsets[sl], 1);
      }
    }
  }
}

// One LoRA step on both executors: shrink alone (y poisoned), expand alone (same random y on
// both), and shrink→expand chained; optionally through a captured graph instead of direct calls.
struct LoraStep {
  LoraWorld* world;
  DevSegs* dsegs;
  int tokens;
  DeviceMemory d_x, d_y, d_out;
};

absl::Status CheckLoraStep(const std::string& name, LoraStep& st, const std::vector<int>& token_slots, int max_len,
                           cuda::CudaGraph* graph, bool wide_ranks = false) {
  LoraWorld& w = *st.world;
  const int T = st.tokens, yw = w.num_slices * w.max_rank, W = w.width();
  Segs segs = BuildSegs(token_slots, max_len);
  // The kernels size their work by the step's rank bound when there is one: alternate the
  // tightest bound, none (INT32_MAX) and, eagerly, no bound pointer at all.
  static int calls = 0;
  const int variant = calls++ % 3;
  LORAPLEX_RETURN_IF_ERROR(st.dsegs->Write(segs, variant == 0 ? StepRankBound(w, segs) : INT32_MAX, &w));
  std::vector<uint8_t> y_mask, out_mask;
  LoraMasks(w, segs, T, &y_mask, &out_mask);
  std::vector<float> x = RandomVec(static_cast<size_t>(T) * w.in, -1, 1);
  std::vector<float> base = RandomVec(static_cast<size_t>(T) * W, -1, 1);
  LORAPLEX_RETURN_IF_ERROR(WriteBf16(st.d_x.data(), x));
  LORAPLEX_RETURN_IF_ERROR(WriteBf16(st.d_out.data(), base));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(st.d_y.data(), 0xFF, static_cast<size_t>(T) * yw * 4));
  const LoraModule dm = w.Module(true), hm = w.Module(false);
  LoraSegments ds = st.dsegs->View(variant != 2);
  ds.wide_ranks = wide_ranks;  // as the model marks steps with ranks above 16 (eager steps only)
  const TensorView gx = Gpu(st.d_x, DType::kBF16, {T, w.in}), gy = Gpu(st.d_y, DType::kF32, {T, yw}),
                   gout = Gpu(st.d_out, DType::kBF16, {T, W});
  int32_t count = 0;
  const LoraSegments hs = HostSegs(segs, T, &count);

  // Chained shrink → expand (graph replay when given).
  if (graph != nullptr) {
    LORAPLEX_RETURN_IF_ERROR(graph->Launch());
  } else {
    LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraShrink(gx, ds, dm, gy));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraExpand(gy, ds, dm, gout));
  }
  std::vector<float> ref_y(static_cast<size_t>(T) * yw, NAN), ref_out = base;
  LORAPLEX_RETURN_IF_ERROR(g_cpu->LoraShrink(Host(x, {T, w.in}), hs, hm, Host(ref_y, {T, yw})));
  LORAPLEX_RETURN_IF_ERROR(g_cpu->LoraExpand(Host(ref_y, {T, yw}), hs, hm, Host(ref_out, {T, W})));
  LORAPLEX_ASSIGN_OR_RETURN(auto got_y, DownloadF32(st.d_y.data(), ref_y.size()));
  LORAPLEX_ASSIGN_OR_RETURN(auto got_out, DownloadBf16(st.d_out.data(), ref_out.size()));
  const std::string tag = absl::StrCat(name, " segs=", segs.count(),
                                       variant == 0                          ? " bound"
                                       : variant == 2 && graph == nullptr ? " no-bound-ptr"
                                                                          : "");
  Compare(tag + " shrink y", got_y, ref_y, kTolF32, y_mask);
  Compare(tag + " shrink+expand out", got_out, ref_out, kTolBf16, out_mask);
  if (graph != nullptr) return absl::OkStatus();

  // Expand alone from a y that is random everywhere (columns past a slot's rank hold garbage the
  // kernel must not read).
  std::vector<float> y_in = RandomVec(static_cast<size_t>(T) * yw, -1, 1, false);
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(st.d_y.data(), y_in.data(), y_in.size() * 4));
  LORAPLEX_RETURN_IF_ERROR(WriteBf16(st.d_out.data(), base));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraExpand(gy, ds, dm, gout));
  std::vector<float> ref_out2 = base;
  LORAPLEX_RETURN_IF_ERROR(g_cpu->LoraExpand(Host(y_in, {T, yw}), hs, hm, Host(ref_out2, {T, W})));
  LORAPLEX_ASSIGN_OR_RETURN(auto got_out2, DownloadBf16(st.d_out.data(), ref_out2.size()));
  Compare(tag + " expand alone", got_out2, ref_out2, kTolBf16, out_mask);
  return absl::OkStatus();
}

std::vector<int> RandomTokenSlots(int tokens, int num_slots, double base_fraction) {
  std::vector<int> v(tokens);
  for (auto& s : v) s = std::uniform_real_distribution<double>(0, 1)(g_rng) < base_fraction ? -1 : RandomInt(0, num_slots - 1);
  return v;
}

// The shrink's item shapes (SetLoraShrinkShapeForTest 0, and 2 with each row count), each with
// the plain and the balanced numbering, give y the same bits: same K steps in the same order a
// warp, same reduction tree.
absl::Status CheckShrinkShapesAgree(const std::string& name, LoraStep& st, const std::vector<int>& token_slots,
                                    int max_len) {
  LoraWorld& w = *st.world;
  const int T = st.tokens, yw = w.num_slices * w.max_rank;
  const Segs segs = BuildSegs(token_slots, max_len);
  LORAPLEX_RETURN_IF_ERROR(st.dsegs->Write(segs, StepRankBound(w, segs), &w));
  LORAPLEX_RETURN_IF_ERROR(WriteBf16(st.d_x.data(), RandomVec(static_cast<size_t>(T) * w.in, -1, 1)));
  const LoraModule dm = w.Module(true);
  const LoraSegments ds = st.dsegs->View();
  const TensorView gx = Gpu(st.d_x, DType::kBF16, {T, w.in}), gy = Gpu(st.d_y, DType::kF32, {T, yw});
  std::vector<float> general;
  for (int balanced : {0, 1}) {
    for (int rows : {-1, 0, 4, 8, 16}) {  // -1: the general items
      LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, rows < 0 ? 0 : 2, std::max(rows, 0), balanced));
      LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(st.d_y.data(), 0xFF, static_cast<size_t>(T) * yw * 4));
      LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraShrink(gx, ds, dm, gy));
      LORAPLEX_ASSIGN_OR_RETURN(auto got, DownloadF32(st.d_y.data(), static_cast<size_t>(T) * yw));
      if (rows < 0 && balanced == 0) {
        general = std::move(got);
        continue;
      }
      // Every element, written or poisoned, bit for bit (an empty mask compares nothing by norm).
      Compare(absl::StrCat(name, " rows=", rows, " balanced=", balanced, " segs=", segs.count()), got, general, 0.0,
              std::vector<uint8_t>(general.size(), 0));
    }
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, -1));
  return absl::OkStatus();
}

// The expand's pipelines (SetLoraExpandForTest 0: item by item; 2 and 3: streamed, with the
// step's grid and with `small_grid` blocks that walk many items; segments' tokens split over more
// or fewer items) give out the same bits: the same sums in the same order for every column.
absl::Status CheckExpandStagesAgree(const std::string& name, LoraStep& st, const std::vector<int>& token_slots,
                                    int max_len, int small_grid) {
  LoraWorld& w = *st.world;
  const int T = st.tokens, yw = w.num_slices * w.max_rank, W = w.width();
  const Segs segs = BuildSegs(token_slots, max_len);
  LORAPLEX_RETURN_IF_ERROR(st.dsegs->Write(segs, StepRankBound(w, segs), &w));
  const std::vector<float> y_in = RandomVec(static_cast<size_t>(T) * yw, -1, 1, false);
  const std::vector<float> base = RandomVec(static_cast<size_t>(T) * W, -1, 1);
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(st.d_y.data(), y_in.data(), y_in.size() * 4));
  const LoraModule dm = w.Module(true);
  const LoraSegments ds = st.dsegs->View();
  const TensorView gy = Gpu(st.d_y, DType::kF32, {T, yw}), gout = Gpu(st.d_out, DType::kBF16, {T, W});
  std::vector<float> item_by_item;
  // classes: the streamed expand's rank classes (-1: the default).
  struct Setting { int stages, blocks, tokens, classes; };
  for (const Setting& c : std::vector<Setting>{{0, 0, 0, -1}, {2, 0, 0, -1}, {3, 0, 0, -1}, {2, small_grid, 0, -1},
                                               {3, small_grid, 0, -1}, {0, small_grid, 0, -1}, {0, 0, 1, -1},
                                               {0, 0, 8, -1}, {2, 0, 4, 2}, {3, 0, 64, -1}, {2, 0, 0, 0},
                                               {2, 0, 0, 1}, {3, small_grid, 0, 2}, {2, small_grid, 0, 1},
                                               {3, 0, 4, 1}, {2, 0, 0, 2}}) {
    const int stages = c.stages, blocks = c.blocks;
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, stages, blocks, c.tokens, c.classes));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(st.d_out.data(), base));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraExpand(gy, ds, dm, gout));
    LORAPLEX_ASSIGN_OR_RETURN(auto got, DownloadBf16(st.d_out.data(), static_cast<size_t>(T) * W));
    if (item_by_item.empty()) {
      item_by_item = std::move(got);
      continue;
    }
    Compare(absl::StrCat(name, " stages=", stages, " blocks=", blocks, " tokens=", c.tokens, " classes=", c.classes,
                         " segs=", segs.count()),
            got, item_by_item, 0.0,
            std::vector<uint8_t>(item_by_item.size(), 0));
  }
  return cuda::SetLoraExpandForTest(g_gpu, -1);
}

// GemmWithLora (the whole wrapped projection; the shrink forked onto a side stream or not, the
// expand beside the GEMM into the delta buffer or in place after it, called directly or replayed
// from a graph) against the CPU's Gemm + LoraShrink + LoraExpand; elements no adapter changes must
// keep the bits of a plain GEMM. `steps` segment tables are used in turn on the same buffers (one
// capture, several replays); the third has only base-model tokens (no segment at all).
// segments_bound: LoraSegments::segments_bound of the call (a hint: the steps may have more).
absl::Status CheckGemmWithLora(const std::string& name, LoraWorld& w, int tokens, bool fork, bool graph, int steps,
                               bool in_place = false, int32_t segments_bound = 0) {
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTuningForTest(g_gpu, 0, true, fork));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraDeltaLimitForTest(g_gpu, in_place ? 0 : SIZE_MAX));
  const int T = tokens, W = w.width(), yw = w.num_slices * w.max_rank;
  // Base weights of size 1/sqrt(in): base outputs O(1), as large as the LoRA delta, so an error in
  // either part shows in the relative error.
  std::vector<float> wt = RandomVec(static_cast<size_t>(W) * w.in, -0.03f, 0.03f);
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_w, UploadBf16(wt));
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs, DevSegs::Create(T, T));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, g_gpu->Allocate(static_cast<size_t>(T) * w.in * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, g_gpu->Allocate(static_cast<size_t>(T) * yw * 4));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_plain, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  const LoraModule dm = w.Module(true), hm = w.Module(false);
  LoraSegments ds = dsegs.View();
  ds.segments_bound = segments_bound;
  const TensorView gx = Gpu(d_x, DType::kBF16, {T, w.in}), gy = Gpu(d_y, DType::kF32, {T, yw}),
                   gout = Gpu(d_out, DType::kBF16, {T, W}), gw = Gpu(d_w, DType::kBF16, {W, w.in});
  std::unique_ptr<cuda::CudaGraph> captured;
  for (int step = 0; step < steps; ++step) {
    Segs segs = BuildSegs(RandomTokenSlots(T, w.num_slots, step == 2 ? 1.0 : 0.2), step % 2 == 0 ? 2 : 1000);
    LORAPLEX_RETURN_IF_ERROR(dsegs.Write(segs, step % 2 == 0 ? StepRankBound(w, segs) : INT32_MAX, &w));
    std::vector<float> x = RandomVec(static_cast<size_t>(T) * w.in, -1, 1);
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_x.data(), x));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_out.data(), 0xFF, static_cast<size_t>(T) * W * 2));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_y.data(), 0xFF, static_cast<size_t>(T) * yw * 4));
    if (graph) {
      if (captured == nullptr) {
        LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
        LORAPLEX_ASSIGN_OR_RETURN(captured, cuda::CaptureCudaGraph(g_gpu, [&] {
          return g_gpu->GemmWithLora(gx, gw, gout, &ds, &dm, gy);
        }));
      }
      LORAPLEX_RETURN_IF_ERROR(captured->Launch());
    } else {
      LORAPLEX_RETURN_IF_ERROR(g_gpu->GemmWithLora(gx, gw, gout, &ds, &dm, gy));
    }
    LORAPLEX_ASSIGN_OR_RETURN(std::vector<float> ref, CpuGemmParallel(x, wt, T, W, w.in, 0.0f, std::vector<float>(T * W)));
    std::vector<float> ref_y(static_cast<size_t>(T) * yw, NAN);
    int32_t count = 0;
    const LoraSegments hs = HostSegs(segs, T, &count);
    LORAPLEX_RETURN_IF_ERROR(g_cpu->LoraShrink(Host(x, {T, w.in}), hs, hm, Host(ref_y, {T, yw})));
    LORAPLEX_RETURN_IF_ERROR(g_cpu->LoraExpand(Host(ref_y, {T, yw}), hs, hm, Host(ref, {T, W})));
    LORAPLEX_ASSIGN_OR_RETURN(auto got, DownloadBf16(d_out.data(), ref.size()));
    // Elements no adapter changes against a plain GEMM of the same inputs, bit for bit: the one
    // GemmWithLora runs (cuBLASLt's, or in skinny mode 2 the skinny kernel's where it applies).
    LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmForTest(g_gpu, g_skinny_mode == 2 ? 2 : 0));
    const absl::Status plain_status = g_gpu->Gemm(gx, gw, 0.0f, Gpu(d_plain, DType::kBF16, {T, W}));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmForTest(g_gpu, g_skinny_mode));
    LORAPLEX_RETURN_IF_ERROR(plain_status);
    LORAPLEX_ASSIGN_OR_RETURN(auto plain, DownloadBf16(d_plain.data(), ref.size()));
    std::vector<uint8_t> y_mask, out_mask;
    LoraMasks(w, segs, T, &y_mask, &out_mask);
    const std::string label = absl::StrCat(name, fork ? " fork" : " in order", fork && in_place ? " in-place" : "",
                                           graph ? " graph" : "", " segs=", segs.count());
    if (segments_bound == 0) {
      for (size_t i = 0; i < ref.size(); ++i) {
        if (out_mask[i] == 0) ref[i] = plain[i];
      }
      Compare(label, got, ref, kTolBf16, out_mask);
    } else {
      // The few-adapter tuning runs the GEMM with cuBLASLt's algorithm for fewer SMs: elements no
      // adapter changes match the plain GEMM within BF16 rounding, not bit for bit.
      Compare(label, got, ref, kTolBf16);
      std::vector<float> got_base, plain_base;
      for (size_t i = 0; i < ref.size(); ++i) {
        if (out_mask[i] != 0) continue;
        got_base.push_back(got[i]);
        plain_base.push_back(plain[i]);
      }
      Compare(label + " base elements", got_base, plain_base, kTolBf16);
    }
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraDeltaLimitForTest(g_gpu, SIZE_MAX));
  return cuda::SetLoraTuningForTest(g_gpu, 0, true, true);
}

// GemmWithLora's two expand paths, the delta beside the GEMM (added by its own kernel here) and the
// in-place expand after it, leave the same bits in the output, with the delta in BF16 (the
// product rounded to bf16 before the add, as PEFT rounds lora_B's output) and in F32; and the two
// formats differ only by that rounding (within BF16 tolerance of each other).
absl::Status CheckLoraDeltaPathsAgree(const std::string& name, LoraWorld& w, int tokens) {
  const int T = tokens, W = w.width(), yw = w.num_slices * w.max_rank;
  std::vector<float> wt = RandomVec(static_cast<size_t>(W) * w.in, -0.03f, 0.03f);
  std::vector<float> x = RandomVec(static_cast<size_t>(T) * w.in, -1, 1);
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_w, UploadBf16(wt));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(x));
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs, DevSegs::Create(T, T));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, g_gpu->Allocate(static_cast<size_t>(T) * yw * 4));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  const Segs segs = BuildSegs(RandomTokenSlots(T, w.num_slots, 0.2), 3);
  LORAPLEX_RETURN_IF_ERROR(dsegs.Write(segs, StepRankBound(w, segs), &w));
  const LoraModule dm = w.Module(true);
  const LoraSegments ds = dsegs.View();
  const TensorView gx = Gpu(d_x, DType::kBF16, {T, w.in}), gy = Gpu(d_y, DType::kF32, {T, yw}),
                   gout = Gpu(d_out, DType::kBF16, {T, W}), gw = Gpu(d_w, DType::kBF16, {W, w.in});
  auto run = [&](bool bf16, bool in_place) -> absl::StatusOr<std::vector<float>> {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraBf16DeltaForTest(g_gpu, bf16));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraDeltaLimitForTest(g_gpu, in_place ? 0 : SIZE_MAX));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraFoldForTest(g_gpu, false));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_out.data(), 0xFF, static_cast<size_t>(T) * W * 2));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->GemmWithLora(gx, gw, gout, &ds, &dm, gy));
    return DownloadBf16(d_out.data(), static_cast<size_t>(T) * W);
  };
  std::vector<std::vector<float>> got;
  for (bool bf16 : {true, false}) {
    for (bool in_place : {false, true}) {
      LORAPLEX_ASSIGN_OR_RETURN(auto v, run(bf16, in_place));
      got.push_back(std::move(v));
    }
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraBf16DeltaForTest(g_gpu, true));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraDeltaLimitForTest(g_gpu, SIZE_MAX));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraFoldForTest(g_gpu, true));
  const std::string tag = absl::StrCat(name, " T=", T, " segs=", segs.count());
  const std::vector<uint8_t> every(got[0].size(), 0);  // an all-zero mask compares every element
  Compare(tag + ": BF16 delta == in place", got[0], got[1], 0.0, every);
  Compare(tag + ": F32 delta == in place", got[2], got[3], 0.0, every);
  Compare(tag + ": BF16 delta ~ F32 delta", got[0], got[2], kTolBf16);
  return absl::OkStatus();
}

// A pending GemmWithLora delta folded into the op that reads the GEMM output next (AddRmsNorm,
// SiluMul, RopeAndCacheKv) against the same two ops with the delta added by its own kernel right
// after the GEMM: every output of the consumer, and the GEMM output it leaves in memory, bit for
// bit; eagerly and replayed from a graph. Some tokens have no adapter; for RoPE one row is padding
// (left as is, but its delta still lands) and one is not cached. kNone: no consumer, the delta (or
// a pending row expand) lands when the result is read back, or at the capture's end.
enum class FoldConsumer { kAddRmsNorm, kSiluMul, kRope, kNone };

// RoPE's device inputs for tokens at these positions, cache slots and sequences (llama3's theta
// for head_dim d), and the meta that points at them, for a cache of `bs`-slot blocks.
struct RopeInputs {
  DeviceMemory freq, pos, slots, seq;
  AttentionMeta meta;
  int d = 0;
  TensorView InvFreq() const { return Gpu(freq, DType::kF32, {d / 2}); }
};
absl::StatusOr<RopeInputs> UploadRope(int d, int bs, const std::vector<int32_t>& positions,
                                      const std::vector<int32_t>& slot_mapping, const std::vector<int32_t>& token_seq) {
  std::vector<float> inv_freq(d / 2);
  for (int i = 0; i < d / 2; ++i) inv_freq[i] = std::pow(500000.0f, -2.0f * i / d);
  RopeInputs r;
  r.d = d;
  LORAPLEX_ASSIGN_OR_RETURN(r.freq, UploadF32(inv_freq));
  LORAPLEX_ASSIGN_OR_RETURN(r.pos, UploadI32(positions));
  LORAPLEX_ASSIGN_OR_RETURN(r.slots, UploadI32(slot_mapping));
  LORAPLEX_ASSIGN_OR_RETURN(r.seq, UploadI32(token_seq));
  r.meta.num_tokens = static_cast<int32_t>(positions.size());
  r.meta.block_size = bs;
  r.meta.positions = static_cast<const int32_t*>(r.pos.data());
  r.meta.slot_mapping = static_cast<const int32_t*>(r.slots.data());
  r.meta.token_seq = static_cast<const int32_t*>(r.seq.data());
  return r;
}

absl::Status CheckLoraFold(FoldConsumer consumer, int tokens) {
  const int T = tokens, in = 1024, hq = 8, hkv = 2, d = 128, bs = 16, num_blocks = 8;
  std::vector<int> widths;
  std::string name;
  switch (consumer) {
    case FoldConsumer::kAddRmsNorm: widths = {2048}; name = "AddRmsNorm"; break;
    case FoldConsumer::kSiluMul: widths = {1536, 1536}; name = "SiluMul"; break;
    case FoldConsumer::kRope: widths = {hq * d, hkv * d, hkv * d}; name = "RopeAndCacheKv"; break;
    case FoldConsumer::kNone: widths = {2048}; name = "nothing"; break;
  }
  const int S = static_cast<int>(widths.size());
  // Rank 24 (and 12) take the expand's one-element-at-a-time sums; the others its LoraDot8 partials.
  std::vector<std::vector<int>> ranks = {{16, 16, 16}, {64, 0, 64}, {8, 8, 8}, {24, 12, 40}};
  for (auto& r : ranks) r.resize(S);
  LORAPLEX_ASSIGN_OR_RETURN(auto w, LoraWorld::Create(4, in, widths, 64, ranks));
  const int W = w->width(), yw = S * w->max_rank;
  std::vector<float> wt = RandomVec(static_cast<size_t>(W) * in, -0.03f, 0.03f);
  std::vector<float> x = RandomVec(static_cast<size_t>(T) * in, -1, 1);
  std::vector<float> residual = RandomVec(static_cast<size_t>(T) * W, -1, 1);
  std::vector<float> norm_w = RandomVec(W, 0.5f, 1.5f);
  const int64_t kv_row = static_cast<int64_t>(hkv) * d, cache_slots = static_cast<int64_t>(num_blocks) * bs;
  std::vector<float> k_cache = RandomVec(cache_slots * kv_row, -1, 1), v_cache = RandomVec(cache_slots * kv_row, -1, 1);
  std::vector<int32_t> positions(T), slot_mapping(T), token_seq(T, 0);
  for (int t = 0; t < T; ++t) {
    positions[t] = RandomInt(0, 9000);
    slot_mapping[t] = t;
  }
  if (T > 2) {
    slot_mapping[1] = -1;
    token_seq[2] = -1;
  }
  Segs segs = BuildSegs(RandomTokenSlots(T, w->num_slots, 0.25), 3);
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs, DevSegs::Create(T, T));
  LORAPLEX_RETURN_IF_ERROR(dsegs.Write(segs, StepRankBound(*w, segs), w.get()));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_w, UploadBf16(wt));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(x));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, g_gpu->Allocate(static_cast<size_t>(T) * yw * 4));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_res, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_hid, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_norm_w, UploadBf16(norm_w));
  LORAPLEX_ASSIGN_OR_RETURN(const RopeInputs rope, UploadRope(d, bs, positions, slot_mapping, token_seq));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_k, g_gpu->Allocate(k_cache.size() * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_v, g_gpu->Allocate(v_cache.size() * 2));
  const LoraModule dm = w->Module(true);
  const LoraSegments ds = dsegs.View();
  const TensorView gx = Gpu(d_x, DType::kBF16, {T, in}), gy = Gpu(d_y, DType::kF32, {T, yw}),
                   gout = Gpu(d_out, DType::kBF16, {T, W}), gw = Gpu(d_w, DType::kBF16, {W, in});
  const Shape cs{num_blocks, bs, hkv, d};
  auto body = [&]() -> absl::Status {
    LORAPLEX_RETURN_IF_ERROR(g_gpu->GemmWithLora(gx, gw, gout, &ds, &dm, gy));
    switch (consumer) {
      case FoldConsumer::kAddRmsNorm:
        return g_gpu->AddRmsNorm(gout, Gpu(d_res, DType::kBF16, {T, W}), Gpu(d_norm_w, DType::kBF16, {W}), 1e-5f,
                                 Gpu(d_hid, DType::kBF16, {T, W}));
      case FoldConsumer::kSiluMul:
        return g_gpu->SiluMul(gout, Gpu(d_hid, DType::kBF16, {T, W / 2}));
      case FoldConsumer::kRope:
        return g_gpu->RopeAndCacheKv(gout, rope.InvFreq(), hq, hkv, d, rope.meta,
                                     {Gpu(d_k, DType::kBF16, cs), Gpu(d_v, DType::kBF16, cs)});
      case FoldConsumer::kNone:
        break;
    }
    return absl::OkStatus();
  };
  // Runs the pair from the same starting state; returns every buffer it may write.
  auto run = [&](bool fold, bool graph) -> absl::StatusOr<std::vector<std::vector<float>>> {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraFoldForTest(g_gpu, fold));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_out.data(), 0xFF, static_cast<size_t>(T) * W * 2));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_hid.data(), 0xFF, static_cast<size_t>(T) * W * 2));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_res.data(), residual));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_k.data(), k_cache));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_v.data(), v_cache));
    if (graph) {
      LORAPLEX_ASSIGN_OR_RETURN(auto captured, cuda::CaptureCudaGraph(g_gpu, body));
      LORAPLEX_RETURN_IF_ERROR(captured->Launch());
      LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
    } else {
      LORAPLEX_RETURN_IF_ERROR(body());
    }
    std::vector<std::vector<float>> got;
    for (auto [mem, n] : std::vector<std::pair<const DeviceMemory*, size_t>>{
             {&d_out, static_cast<size_t>(T) * W}, {&d_hid, static_cast<size_t>(T) * W},
             {&d_res, static_cast<size_t>(T) * W}, {&d_k, k_cache.size()}, {&d_v, v_cache.size()}}) {
      LORAPLEX_ASSIGN_OR_RETURN(auto v, DownloadBf16(mem->data(), n));
      got.push_back(std::move(v));
    }
    return got;
  };
  LORAPLEX_ASSIGN_OR_RETURN(auto ref, run(false, false));
  for (bool graph : {false, true}) {
    LORAPLEX_ASSIGN_OR_RETURN(auto got, run(true, graph));
    const char* parts[] = {"gemm out", "out", "residual", "k cache", "v cache"};
    for (size_t i = 0; i < ref.size(); ++i) {
      // An all-zero mask: every element must equal the unfolded run's, NaN poison included.
      Compare(absl::StrCat("LoRA delta folded into ", name, graph ? " graph" : "", " T=", T, " segs=", segs.count(),
                           ": ", parts[i]),
              got[i], ref[i], 0.0, std::vector<uint8_t>(ref[i].size(), 0));
    }
  }
  return cuda::SetLoraFoldForTest(g_gpu, true);
}

// LoRA rows (cuda/lora_rows.h): in a step begun with BeginLoraStep, of at most 4 segments of
// ranks up to 16, GemmWithLora on a registered weight (spare rows after it) runs one GEMM over
// the weight and its spare rows, and the op that reads y next (RoPE for a 3-slice module, SiLU·up
// for a 2-slice one, AddRmsNorm for a 1-slice one (rows for o and down: min_slices 1), or nothing:
// the flush when y is read back) adds each row's LoRA. Against the side chain (rows off) within
// BF16 tolerance, every buffer either writes: y, the consumer's output, the residual, the KV cache. Steps change the adapter set (positions keep, swap and lose slots), a
// slot is rewritten in place (LoraSlotsChanged), and a captured step replays with new segments.
// one_slice_min_tokens: SetLoraRowsForTest's (-1: the executor's default, 64), below which a
// one-slice module keeps the side chain (in the GEMM-over-all-spare-rows range).
// Steps of up to 16 tokens run the skinny GEMM over the spare rows of the step's positions
// (SetLoraRowsSkinnyForTest), on any shape (even = false) for the small weights, or (llama: qkv's
// 4096/1024/1024 and o's 4096 over 4096 inputs) under the executor's own rule; `skinny` says
// whether the call must (1) or must not (0) have taken the skinny GEMM (-1: not checked).
absl::Status CheckLoraRows(FoldConsumer consumer, int tokens, int silu_inter = 1536, int one_slice_min_tokens = 1,
                           bool llama = false, int skinny = -1) {
  const int T = tokens, in = llama ? 4096 : 1024, hq = llama ? 32 : 8, hkv = llama ? 8 : 2, d = 128, bs = 16,
            num_blocks = 8;
  std::vector<int> widths;
  std::string name;
  switch (consumer) {
    case FoldConsumer::kSiluMul: widths = {silu_inter, silu_inter}; name = absl::StrCat("SiluMul/", silu_inter); break;
    case FoldConsumer::kRope: widths = {hq * d, hkv * d, hkv * d}; name = "RopeAndCacheKv"; break;
    case FoldConsumer::kAddRmsNorm: widths = {llama ? 4096 : 2048}; name = "AddRmsNorm"; break;
    default: widths = {1024, 512}; name = "nothing"; break;
  }
  if (llama) name += "/llama";
  const int S = static_cast<int>(widths.size());
  // min_slices 1 before the spare rows are asked for: one-slice weights get them only then.
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraRowsForTest(g_gpu, -1, -1, 1, 1));
  // Ranks up to 16 (narrow), some below 16 and some slices not adapted; 12 and 4 take the
  // element-wise sums.
  std::vector<std::vector<int>> ranks = {{16, 16, 16}, {8, 0, 16}, {16, 16, 8}, {12, 16, 4}, {16, 8, 16}, {0, 16, 16}};
  for (auto& r : ranks) r.resize(S);
  LORAPLEX_ASSIGN_OR_RETURN(auto w, LoraWorld::Create(6, in, widths, 16, ranks));
  const int W = w->width(), yw = S * w->max_rank;
  const int64_t spare = g_gpu->LoraWeightSpareRows(S);
  if (spare != 4LL * S * 16) return absl::InternalError(absl::StrCat("LoraWeightSpareRows(", S, ") = ", spare));
  std::vector<float> wt = RandomVec(static_cast<size_t>(W) * in, -0.03f, 0.03f);
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_w, g_gpu->Allocate(static_cast<size_t>(W + spare) * in * 2));
  LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_w.data(), wt));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(static_cast<char*>(d_w.data()) + static_cast<size_t>(W) * in * 2, 0,
                                         static_cast<size_t>(spare) * in * 2));
  const LoraModule dm = w->Module(true);
  const TensorView gw = Gpu(d_w, DType::kBF16, {W, in});
  LORAPLEX_RETURN_IF_ERROR(g_gpu->RegisterLoraWeight(gw, dm));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraSlotsChanged());

  std::vector<float> residual = RandomVec(static_cast<size_t>(T) * W, -1, 1);
  const int64_t kv_row = static_cast<int64_t>(hkv) * d, cache_slots = static_cast<int64_t>(num_blocks) * bs;
  std::vector<float> k_cache = RandomVec(cache_slots * kv_row, -1, 1), v_cache = RandomVec(cache_slots * kv_row, -1, 1);
  std::vector<int32_t> positions(T), slot_mapping(T), token_seq(T, 0);
  for (int t = 0; t < T; ++t) {
    positions[t] = RandomInt(0, 9000);
    slot_mapping[t] = t % cache_slots;
  }
  if (T > 1) slot_mapping[1] = -1;
  if (T > 2) token_seq[2] = -1;
  // Up to 4 segments (some empty when the step has fewer tokens).
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs, DevSegs::Create(std::max(T, 4), T));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, g_gpu->Allocate(static_cast<size_t>(T) * in * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, g_gpu->Allocate(static_cast<size_t>(T) * yw * 4));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_hid, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_res, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_norm_w, UploadBf16(RandomVec(static_cast<size_t>(W), 0.5f, 1.5f)));
  LORAPLEX_ASSIGN_OR_RETURN(const RopeInputs rope, UploadRope(d, bs, positions, slot_mapping, token_seq));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_k, g_gpu->Allocate(k_cache.size() * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_v, g_gpu->Allocate(v_cache.size() * 2));
  LoraSegments ds = dsegs.View();
  ds.segments_bound = 4;
  ds.narrow_ranks = true;
  const TensorView gx = Gpu(d_x, DType::kBF16, {T, in}), gy = Gpu(d_y, DType::kF32, {T, yw}),
                   gout = Gpu(d_out, DType::kBF16, {T, W});
  const Shape cs{num_blocks, bs, hkv, d};
  auto body = [&]() -> absl::Status {
    LORAPLEX_RETURN_IF_ERROR(g_gpu->BeginLoraStep(ds));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->GemmWithLora(gx, gw, gout, &ds, &dm, gy));
    switch (consumer) {
      case FoldConsumer::kSiluMul:
        return g_gpu->SiluMul(gout, Gpu(d_hid, DType::kBF16, {T, W / 2}));
      case FoldConsumer::kAddRmsNorm:
        return g_gpu->AddRmsNorm(gout, Gpu(d_res, DType::kBF16, {T, W}), Gpu(d_norm_w, DType::kBF16, {W}), 1e-5f,
                                 Gpu(d_hid, DType::kBF16, {T, W}));
      case FoldConsumer::kRope:
        return g_gpu->RopeAndCacheKv(gout, rope.InvFreq(), hq, hkv, d, rope.meta,
                                     {Gpu(d_k, DType::kBF16, cs), Gpu(d_v, DType::kBF16, cs)});
      default:
        return absl::OkStatus();
    }
  };
  const std::vector<float> x0 = RandomVec(static_cast<size_t>(T) * in, -1, 1);
  // Runs the step from the same starting state, rows on or off; returns every buffer it may write.
  auto run = [&](bool rows, cuda::CudaGraph* graph) -> absl::StatusOr<std::vector<std::vector<float>>> {
    // min_slices 1: o and down (one slice) run as rows too, from one_slice_min_tokens.
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraRowsForTest(g_gpu, rows ? 1 : -1, rows ? -1 : 0, 1, one_slice_min_tokens));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraRowsSkinnyForTest(g_gpu, rows ? 16 : 0, /*even=*/llama));
    const bool expect_rows =
        rows && (skinny == 1 || S > 1 || T >= (one_slice_min_tokens < 0 ? 64 : one_slice_min_tokens));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_out.data(), 0xFF, static_cast<size_t>(T) * W * 2));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_hid.data(), 0xFF, static_cast<size_t>(T) * W * 2));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_res.data(), residual));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_k.data(), k_cache));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_v.data(), v_cache));
    LORAPLEX_ASSIGN_OR_RETURN(const int64_t before, cuda::LoraRowsGemmsForTest(g_gpu));
    LORAPLEX_ASSIGN_OR_RETURN(const int64_t skinny_before, cuda::LoraSkinnyRowsGemmsForTest(g_gpu));
    if (graph != nullptr) {
      LORAPLEX_RETURN_IF_ERROR(graph->Launch());
    } else {
      LORAPLEX_RETURN_IF_ERROR(body());
      LORAPLEX_ASSIGN_OR_RETURN(const int64_t after, cuda::LoraRowsGemmsForTest(g_gpu));
      if ((after - before == 1) != expect_rows) {
        return absl::InternalError(absl::StrCat("rows ", rows ? "on" : "off", " (", expect_rows ? "expected" : "not expected",
                                                " at ", T, " tokens): ", after - before, " rows GEMMs"));
      }
      LORAPLEX_ASSIGN_OR_RETURN(const int64_t skinny_after, cuda::LoraSkinnyRowsGemmsForTest(g_gpu));
      if (rows && skinny >= 0 && (skinny_after - skinny_before == 1) != (skinny == 1)) {
        return absl::InternalError(absl::StrCat("skinny rows ", skinny == 1 ? "expected" : "not expected", " at ", T,
                                                " tokens: ", skinny_after - skinny_before, " skinny rows GEMMs"));
      }
    }
    std::vector<std::vector<float>> got;
    for (auto [mem, n] : std::vector<std::pair<const DeviceMemory*, size_t>>{
             {&d_out, static_cast<size_t>(T) * W}, {&d_hid, static_cast<size_t>(T) * W},
             {&d_res, static_cast<size_t>(T) * W},
             {&d_k, k_cache.size()}, {&d_v, v_cache.size()}}) {
      LORAPLEX_ASSIGN_OR_RETURN(auto v, DownloadBf16(mem->data(), n));
      got.push_back(std::move(v));
    }
    return got;
  };
  auto compare = [&](const std::string& tag, const std::vector<std::vector<float>>& got,
                     const std::vector<std::vector<float>>& ref) {
    const char* parts[] = {"y", "out", "residual", "k cache", "v cache"};
    const bool norm = consumer == FoldConsumer::kAddRmsNorm;
    const bool written[] = {true, consumer == FoldConsumer::kSiluMul || norm, norm, consumer == FoldConsumer::kRope,
                            consumer == FoldConsumer::kRope};
    for (size_t i = 0; i < ref.size(); ++i) {
      // Elements the step writes by norm; the rest must keep every bit (poison included). SiLU·up
      // writes the first half of its buffer ([T, W/2]).
      std::vector<uint8_t> mask(ref[i].size(), written[i] ? 1 : 0);
      if (i == 1 && consumer == FoldConsumer::kSiluMul) {
        std::fill(mask.begin() + static_cast<int64_t>(mask.size() / 2), mask.end(), 0);
      }
      Compare(absl::StrCat("LoRA rows ", name, " T=", T, " ", tag, ": ", parts[i]), got[i], ref[i],
              written[i] ? kTolBf16 : 0.0, mask);
    }
  };
  // (step label, the slots of the step's adapters; -1 tokens use the base model)
  auto step = [&](const std::string& tag, const std::vector<int>& set, cuda::CudaGraph* graph) -> absl::Status {
    std::vector<int> token_slots(T);
    for (int t = 0; t < T; ++t) {
      const int pick = RandomInt(0, static_cast<int>(set.size()));
      token_slots[t] = pick == static_cast<int>(set.size()) ? -1 : set[pick];
    }
    // The segments in the order given (not sorted by slot), one per adapter.
    Segs segs;
    for (int slot : set) {
      for (int t = 0; t < T; ++t) {
        if (token_slots[t] == slot) segs.token_rows.push_back(t);
      }
      segs.seg_slots.push_back(slot);
      segs.seg_starts.push_back(static_cast<int32_t>(segs.token_rows.size()));
    }
    LORAPLEX_RETURN_IF_ERROR(dsegs.Write(segs, 16));
    LORAPLEX_RETURN_IF_ERROR(WriteBf16(d_x.data(), RandomVec(static_cast<size_t>(T) * in, -1, 1)));
    LORAPLEX_ASSIGN_OR_RETURN(auto ref, run(false, nullptr));
    LORAPLEX_ASSIGN_OR_RETURN(auto got, run(true, graph));
    compare(absl::StrCat(tag, graph != nullptr ? " graph" : "", " segs=", segs.count()), got, ref);
    return absl::OkStatus();
  };
  LORAPLEX_RETURN_IF_ERROR(step("4 adapters", {0, 1, 2, 3}, nullptr));
  LORAPLEX_RETURN_IF_ERROR(step("same 4 adapters", {0, 1, 2, 3}, nullptr));
  LORAPLEX_RETURN_IF_ERROR(step("positions swapped", {2, 0, 5, 3}, nullptr));
  LORAPLEX_RETURN_IF_ERROR(step("1 adapter", {4}, nullptr));
  // Slot 2 rewritten in place (new values, new ranks): its A rows must be copied again.
  for (int s = 0; s < S; ++s) LORAPLEX_RETURN_IF_ERROR(w->SetSlice(2, s, s == 0 ? 4 : 16));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraSlotsChanged());
  LORAPLEX_RETURN_IF_ERROR(step("slot 2 rewritten", {2, 0, 5, 3}, nullptr));
  // A captured step: install and rows recorded once, replayed with new segments each time.
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraRowsForTest(g_gpu, 1, -1, 1, one_slice_min_tokens));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
  LORAPLEX_ASSIGN_OR_RETURN(auto graph, cuda::CaptureCudaGraph(g_gpu, body));
  LORAPLEX_RETURN_IF_ERROR(step("3 adapters", {1, 3, 4}, graph.get()));
  LORAPLEX_RETURN_IF_ERROR(step("4 other adapters", {5, 2, 0, 1}, graph.get()));
  LORAPLEX_RETURN_IF_ERROR(step("2 adapters", {0, 4}, graph.get()));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraRowsSkinnyForTest(g_gpu, -1));
  return cuda::SetLoraRowsForTest(g_gpu, -1, -1);
}

absl::Status LoraTests() {
  // qkv of Llama-3-8B: slices 4096/1024/1024 over in 4096; ranks {0, 8, 16, 64} mixed in one step,
  // some slots adapting only some slices.
  const std::vector<std::vector<int>> ranks = {{8, 8, 8}, {16, 16, 16}, {64, 64, 64}, {16, 0, 16}, {0, 0, 0}, {64, 8, 0}};
  LORAPLEX_ASSIGN_OR_RETURN(auto world, LoraWorld::Create(6, 4096, {4096, 1024, 1024}, 64, ranks));
  const int T = 48, max_segments = T;  // capacity: one segment per token at most
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs, DevSegs::Create(max_segments, T));
  LoraStep st{world.get(), &dsegs, T, {}, {}, {}};
  LORAPLEX_ASSIGN_OR_RETURN(st.d_x, g_gpu->Allocate(static_cast<size_t>(T) * world->in * 2));
  LORAPLEX_ASSIGN_OR_RETURN(st.d_y, g_gpu->Allocate(static_cast<size_t>(T) * world->num_slices * world->max_rank * 4));
  LORAPLEX_ASSIGN_OR_RETURN(st.d_out, g_gpu->Allocate(static_cast<size_t>(T) * world->width() * 2));

  // Segment count changes between calls on the same buffers: many short segments, then few long
  // ones (stale entries stay behind the count), then many again.
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA qkv mixed ranks", st, RandomTokenSlots(T, 6, 0.2), 2, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA qkv mixed ranks", st, RandomTokenSlots(T, 6, 0.2), 1000, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA qkv mixed ranks", st, RandomTokenSlots(T, 6, 0.0), 3, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA qkv all base tokens", st, std::vector<int>(T, -1), 4, nullptr));
  // Slot reuse: slot 2 (rank 64) gets a new adapter of rank 8 on q, none on k, 16 on v in the same
  // memory; stale rank-64 weights behind it must not be read.
  LORAPLEX_RETURN_IF_ERROR(world->SetSlice(2, 0, 8));
  LORAPLEX_RETURN_IF_ERROR(world->SetSlice(2, 1, 0));
  LORAPLEX_RETURN_IF_ERROR(world->SetSlice(2, 2, 16));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA qkv slot 2 reused", st, RandomTokenSlots(T, 6, 0.1), 4, nullptr));

  // Single-slice module with a large input (down_proj-like, in 14336) and prefill-sized segments.
  LORAPLEX_ASSIGN_OR_RETURN(auto down, LoraWorld::Create(3, 14336, {4096}, 64, {{16}, {64}, {8}}));
  const int T2 = 96;
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs2, DevSegs::Create(T2, T2));  // one-token segments below
  LoraStep st2{down.get(), &dsegs2, T2, {}, {}, {}};
  LORAPLEX_ASSIGN_OR_RETURN(st2.d_x, g_gpu->Allocate(static_cast<size_t>(T2) * down->in * 2));
  LORAPLEX_ASSIGN_OR_RETURN(st2.d_y, g_gpu->Allocate(static_cast<size_t>(T2) * down->max_rank * 4));
  LORAPLEX_ASSIGN_OR_RETURN(st2.d_out, g_gpu->Allocate(static_cast<size_t>(T2) * down->width() * 2));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA down prefill", st2, RandomTokenSlots(T2, 3, 0.1), 1000, nullptr));

  // Ranks off the register-held paths (12, 24, 40: not 8·{1,2,4,8}; 128: streamed rows) and long
  // segments, which the kernels split over tokens (mean length 300/4 > 16), then many short ones
  // (more work items than persistent blocks, so blocks loop).
  LORAPLEX_ASSIGN_OR_RETURN(auto odd, LoraWorld::Create(4, 4096, {4096, 1024, 1024}, 128,
                                                        {{16, 16, 16}, {64, 8, 0}, {12, 12, 24}, {128, 40, 128}}));
  const int T3 = 300;
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs3, DevSegs::Create(T3, T3));
  LoraStep st3{odd.get(), &dsegs3, T3, {}, {}, {}};
  LORAPLEX_ASSIGN_OR_RETURN(st3.d_x, g_gpu->Allocate(static_cast<size_t>(T3) * odd->in * 2));
  LORAPLEX_ASSIGN_OR_RETURN(st3.d_y, g_gpu->Allocate(static_cast<size_t>(T3) * odd->num_slices * odd->max_rank * 4));
  LORAPLEX_ASSIGN_OR_RETURN(st3.d_out, g_gpu->Allocate(static_cast<size_t>(T3) * odd->width() * 2));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA odd ranks long segments", st3, RandomTokenSlots(T3, 4, 0.05), 1000, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA odd ranks short segments", st3, RandomTokenSlots(T3, 4, 0.05), 2, nullptr));
  // T3 = 300 tokens runs the tensor-core kernels by default; the cases below are about the decode
  // kernels, so they take every step size until the end of this block.
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 1 << 30));
  // A shrink grid of 1 and of 7 blocks: blocks walk many items (and a 7-block grid splits them
  // unevenly).
  for (int blocks : {1, 7}) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTuningForTest(g_gpu, blocks, true, true));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(absl::StrCat("LoRA odd ranks ", blocks, " shrink blocks"), st3,
                                           RandomTokenSlots(T3, 4, 0.05), 3, nullptr));
  }
  // The shrink's other block size on each input width (16 warps on K = 4096, 8 on K = 14336),
  // with a small grid so blocks walk many items.
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTuningForTest(g_gpu, 5, true, true));
  for (int warps : {16, 8}) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkWarpsForTest(g_gpu, warps));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(absl::StrCat("LoRA odd ranks ", warps, "-warp shrink"), st3,
                                           RandomTokenSlots(T3, 4, 0.05), 3, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(absl::StrCat("LoRA down prefill ", warps, "-warp shrink"), st2,
                                           RandomTokenSlots(T2, 3, 0.1), 1000, nullptr));
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkWarpsForTest(g_gpu, 0));
  // The one-token item shape (SetLoraShrinkShapeForTest): forced (2) with each row count and by
  // the mean segment length (1), on one-token segments, long ones (tokens one at a time) and ranks
  // up to 128 (8 groups of 16 rows), with a 5-block grid (blocks walk many items); every shape
  // gives y the same bits, on both input widths.
  for (auto [shape, rows] : std::vector<std::pair<int, int>>{{2, 0}, {2, 4}, {2, 8}, {2, 16}, {1, 0}}) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, shape, rows));
    const std::string n = absl::StrCat("LoRA odd ranks shrink shape ", shape, " rows ", rows);
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " one-token segments", st3, RandomTokenSlots(T3, 4, 0.05), 1, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " long segments", st3, RandomTokenSlots(T3, 4, 0.05), 1000, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(absl::StrCat("LoRA down prefill shrink shape ", shape, " rows ", rows), st2,
                                           RandomTokenSlots(T2, 3, 0.1), 1, nullptr));
  }
  // The balanced numbering of the shrink's items (SetLoraShrinkShapeForTest's `balanced`) forced
  // on, with the general and the one-token items: short and long segments, one-token segments of
  // more (segment, slice) pairs than its prefix holds (300 x 3: the plain numbering then), and
  // 96 one-token segments of down.
  for (auto [shape, rows] : std::vector<std::pair<int, int>>{{0, 0}, {2, 0}, {2, 16}, {1, 0}}) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, shape, rows, 1));
    const std::string n = absl::StrCat("LoRA odd ranks balanced shrink shape ", shape, " rows ", rows);
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " one-token segments", st3, RandomTokenSlots(T3, 4, 0.05), 1, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " short segments", st3, RandomTokenSlots(T3, 4, 0.05), 3, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " long segments", st3, RandomTokenSlots(T3, 4, 0.05), 1000, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(absl::StrCat("LoRA down balanced shrink shape ", shape, " rows ", rows), st2,
                                           RandomTokenSlots(T2, 3, 0.1), 1, nullptr));
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, -1));
  LORAPLEX_RETURN_IF_ERROR(CheckShrinkShapesAgree("LoRA shrink shapes agree, odd ranks", st3, RandomTokenSlots(T3, 4, 0.05), 1));
  LORAPLEX_RETURN_IF_ERROR(CheckShrinkShapesAgree("LoRA shrink shapes agree, odd ranks", st3, RandomTokenSlots(T3, 4, 0.05), 3));
  LORAPLEX_RETURN_IF_ERROR(CheckShrinkShapesAgree("LoRA shrink shapes agree, down", st2, RandomTokenSlots(T2, 3, 0.1), 1));
  // The streamed expand (SetLoraExpandForTest): 2 and 3 stages, the step's grid and 5 blocks (each
  // walks hundreds of items, so its ring of resolved items refills many times), on one-token, short
  // and long segments (tokens past a stage's 4 loaded as it goes), odd ranks (12, 24, 40 and 128:
  // element-wise tiles) and K = 14336; against the CPU and bit for bit against the item-by-item
  // expand. Under each rank-class mode (-1: the default; the odd-rank slots fall in all four
  // classes, and DevSegs::Write orders the segments by class as the model does).
  struct StreamSetting { int stages, blocks, classes; };
  for (const StreamSetting& c : std::vector<StreamSetting>{{2, 0, -1}, {3, 0, 2}, {3, 5, -1}, {2, 7, 2}, {2, 0, 1},
                                                           {3, 5, 1}, {2, 0, 0}}) {
    const int stages = c.stages, blocks = c.blocks;
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, stages, blocks, 0, c.classes));
    const std::string n = absl::StrCat("LoRA odd ranks expand stages ", stages, " blocks ", blocks, " classes ",
                                       c.classes);
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " one-token segments", st3, RandomTokenSlots(T3, 4, 0.05), 1, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " short segments", st3, RandomTokenSlots(T3, 4, 0.05), 3, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " long segments", st3, RandomTokenSlots(T3, 4, 0.05), 1000, nullptr));
    const std::string setting = absl::StrCat(" expand stages ", stages, " blocks ", blocks, " classes ", c.classes);
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA down" + setting, st2, RandomTokenSlots(T2, 3, 0.1), 2, nullptr));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA qkv" + setting, st, RandomTokenSlots(T, 6, 0.2), 1, nullptr));
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, -1));
  LORAPLEX_RETURN_IF_ERROR(CheckExpandStagesAgree("LoRA expand stages agree, odd ranks", st3, RandomTokenSlots(T3, 4, 0.05), 1, 5));
  LORAPLEX_RETURN_IF_ERROR(CheckExpandStagesAgree("LoRA expand stages agree, odd ranks", st3, RandomTokenSlots(T3, 4, 0.05), 1000, 3));
  LORAPLEX_RETURN_IF_ERROR(CheckExpandStagesAgree("LoRA expand stages agree, odd ranks short segments", st3,
                                                  RandomTokenSlots(T3, 4, 0.05), 3, 5));
  LORAPLEX_RETURN_IF_ERROR(CheckExpandStagesAgree("LoRA expand stages agree, qkv", st, RandomTokenSlots(T, 6, 0.2), 2, 5));
  LORAPLEX_RETURN_IF_ERROR(CheckExpandStagesAgree("LoRA expand stages agree, qkv segments of 8", st, RandomTokenSlots(T, 6, 0.2), 8, 5));
  LORAPLEX_RETURN_IF_ERROR(CheckExpandStagesAgree("LoRA expand stages agree, down", st2, RandomTokenSlots(T2, 3, 0.1), 1, 5));
  // Expand launched as a plain kernel, after the shrink finished (both pipelines).
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTuningForTest(g_gpu, 0, false, true));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA odd ranks no overlap", st3, RandomTokenSlots(T3, 4, 0.05), 3, nullptr));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, 3));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA odd ranks no overlap stages 3", st3, RandomTokenSlots(T3, 4, 0.05), 3, nullptr));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, -1));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTuningForTest(g_gpu, 0, true, true));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 256));
  // Wide-rank steps as the model marks them (LoraSegments::wide_ranks: the streamed expand), with
  // the balanced shrink (the default for such steps from 128 tokens, forced here) on the executor's
  // own grids, under each wide-step grid rule (SetLoraWideShrinkGridForTest: 3/4, the smaller
  // grid, the default): 48 tokens of qkv on ranks {0, 8, 16, 64} in segments of 1-2 (many
  // segments, ranks that differ), all on slot 1 (rank 16 on every slice: with the tightest rank
  // bound every item is real), and 96 one-token segments of down.
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, -1, 0, 1));
  for (int mode : {0, 1, -1}) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraWideShrinkGridForTest(g_gpu, mode));
    const std::string n = absl::StrCat("LoRA wide-rank step, grid rule ", mode);
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " qkv segments of 2", st, RandomTokenSlots(T, 6, 0.0), 2, nullptr, true));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " qkv one-token segments", st, RandomTokenSlots(T, 6, 0.1), 1, nullptr, true));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " qkv one rank-16 adapter", st, std::vector<int>(T, 1), 2, nullptr, true));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep(n + " down one-token segments", st2, RandomTokenSlots(T2, 3, 0.1), 1, nullptr, true));
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraWideShrinkGridForTest(g_gpu, -1));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, -1));

  // CUDA graph: capture shrink+expand once, then replay with segment tables, counts and inputs
  // changed in device memory between replays (more segments than at capture, fewer, none).
  {
    LORAPLEX_RETURN_IF_ERROR(dsegs.Write(BuildSegs(RandomTokenSlots(T, 6, 0.2), 4)));
    const LoraModule dm = world->Module(true);
    const LoraSegments ds = dsegs.View();
    const TensorView gx = Gpu(st.d_x, DType::kBF16, {T, world->in});
    const TensorView gy = Gpu(st.d_y, DType::kF32, {T, world->num_slices * world->max_rank});
    const TensorView gout = Gpu(st.d_out, DType::kBF16, {T, world->width()});
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
    LORAPLEX_ASSIGN_OR_RETURN(auto graph, cuda::CaptureCudaGraph(g_gpu, [&]() -> absl::Status {
      LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraShrink(gx, ds, dm, gy));
      return g_gpu->LoraExpand(gy, ds, dm, gout);
    }));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA graph replay", st, RandomTokenSlots(T, 6, 0.2), 4, graph.get()));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA graph replay", st, RandomTokenSlots(T, 6, 0.0), 1, graph.get()));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA graph replay", st, RandomTokenSlots(T, 6, 0.3), 1000, graph.get()));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA graph replay", st, std::vector<int>(T, -1), 1, graph.get()));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA graph replay", st, RandomTokenSlots(T, 6, 0.0), 2, graph.get()));
  }

  for (bool fork : {true, false}) {
    for (bool graph : {false, true}) {
      LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora qkv", *world, T, fork, graph, 4));
    }
  }
  // The in-place expand a step whose delta does not fit the buffer falls back to.
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora qkv", *world, T, true, graph, 4, true));
  }
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora down", *down, 40, true, true, 2));
  // Odd ranks (general expand path, 128 = max) and long segments split over tokens.
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora odd ranks", *odd, 160, true, true, 4));
  // The delta's two formats, and against the in-place expand.
  for (int t : {1, 32}) LORAPLEX_RETURN_IF_ERROR(CheckLoraDeltaPathsAgree("GemmWithLora delta paths qkv", *world, t));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraDeltaPathsAgree("GemmWithLora delta paths odd ranks", *odd, 40));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraBf16DeltaForTest(g_gpu, false));
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[F32 delta] qkv", *world, T, true, true, 3));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraBf16DeltaForTest(g_gpu, true));
  // The experiment of a GEMM chosen for fewer SMs (SetLoraGemmSmsForTest).
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraGemmSmsForTest(g_gpu, 88));
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[GEMM for 88 SMs] qkv", *world, T, true, graph, 3));
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraGemmSmsForTest(g_gpu, 0));
  // And with the GEMM enqueued before the side chain (SetLoraGemmFirstForTest).
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraGemmFirstForTest(g_gpu, true));
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[GEMM first] qkv", *world, T, true, graph, 3));
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraGemmFirstForTest(g_gpu, false));
  // The chain in line before the GEMM (SetLoraInlineForTest), forced for every call: qkv, down
  // (K = 14336), odd ranks (general expand, rank 128), one token; eager and graph replays with
  // other segments.
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, 0));
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[in line] qkv", *world, T, true, graph, 4));
  }
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[in line] down", *down, 40, true, true, 3));
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[in line] odd ranks", *odd, 160, true, true, 4));
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[in line] one token", *world, 1, true, false, 2));
  // And with the shrink's balanced numbering forced (its prefetch of A follows it).
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, -1, 0, 1));
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[in line, balanced] qkv", *world, T, true, true, 4));
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[in line, balanced] odd ranks", *odd, 160, true, true, 4));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, -1));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, INT32_MAX));
  // Skinny mode 1: GemmWithLora's GEMM of calls of up to 16 rows on cuBLASLt (in mode 2, the
  // default, on the skinny kernel), beside the side chain and after the chain in line; eager and
  // graph replays.
  g_skinny_mode = 1;
  LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmForTest(g_gpu, 1));
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[skinny mode 1] one token", *world, 1, true, graph, 3));
  }
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[skinny mode 1] down", *down, 8, true, true, 3));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, 0));
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[skinny mode 1, in line] qkv", *world, 16, true, true, 3));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, INT32_MAX));
  g_skinny_mode = 2;
  LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmForTest(g_gpu, 2));
  // Hoist mode 2: GemmWithLora's skinny GEMM in the hoisted build too (by default only Gemm's).
  LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmHoistForTest(g_gpu, 2));
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[hoisted beside] one token", *world, 1, true, graph, 3));
  }
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[hoisted beside] down", *down, 8, true, true, 3));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetSkinnyGemmHoistForTest(g_gpu, 1));
  // The few-adapter tuning (a GEMM chosen for fewer SMs, a smaller shrink grid) for calls that
  // say they have at most 4 segments and 32 tokens or more (more segments still come right).
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[few adapters] qkv", *world, T, true, graph, 4, false, 4));
  }
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[few adapters] down", *down, 40, true, true, 3, false, 2));
  // The tensor-core kernels for few-segment calls (SetLoraTensorCoreMinTokensForTest's
  // few_min_tokens; by default from 128 tokens, here from 16): calls that say at most 4 segments
  // take them, others the decode kernels.
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 0, 16));
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[few adapters, tc] qkv", *world, T, true, graph, 4, false, 4));
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[many adapters, tc few] qkv", *world, T, true, graph, 4));
  }
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[few adapters, tc] down", *down, 40, true, true, 3, false, 2));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 0));
  // The streamed expand into the delta buffer (beside the GEMM and in line), eager and replayed.
  for (int stages : {2, 3}) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, stages));
    const std::string n = absl::StrCat("GemmWithLora[expand stages ", stages, "]");
    for (bool graph : {false, true}) {
      LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora(n + " qkv", *world, T, true, graph, 4));
    }
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora(n + " down", *down, 40, true, true, 3));
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora(n + " odd ranks", *odd, 160, true, true, 4));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, stages, 0, 0, 2));  // rank classes
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora(n + "[classes 2] odd ranks", *odd, 160, true, true, 4));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, stages));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, 0));
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora(n + "[in line] qkv", *world, T, true, true, 4));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, INT32_MAX));
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, -1));

  // The tensor-core kernels (steps of >= 256 tokens by default, so T3 above already ran them),
  // forced for every step size: many 1-token segments, mixed and odd ranks (12, 24, 40: B rows
  // not whole 16-byte vectors; 128: two rank passes), reused slots, graph replays with changing
  // segment counts, and GemmWithLora (in place after the join).
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 1));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] qkv mixed ranks", st, RandomTokenSlots(T, 6, 0.2), 2, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] qkv mixed ranks", st, RandomTokenSlots(T, 6, 0.2), 1000, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] qkv all base tokens", st, std::vector<int>(T, -1), 4, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] down prefill", st2, RandomTokenSlots(T2, 3, 0.1), 1000, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] odd ranks short segments", st3, RandomTokenSlots(T3, 4, 0.05), 2, nullptr));
  {
    LORAPLEX_RETURN_IF_ERROR(dsegs3.Write(BuildSegs(RandomTokenSlots(T3, 4, 0.05), 1000)));
    const LoraModule dm = odd->Module(true);
    const LoraSegments ds = dsegs3.View();
    const TensorView gx = Gpu(st3.d_x, DType::kBF16, {T3, odd->in});
    const TensorView gy = Gpu(st3.d_y, DType::kF32, {T3, odd->num_slices * odd->max_rank});
    const TensorView gout = Gpu(st3.d_out, DType::kBF16, {T3, odd->width()});
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
    LORAPLEX_ASSIGN_OR_RETURN(auto graph, cuda::CaptureCudaGraph(g_gpu, [&]() -> absl::Status {
      LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraShrink(gx, ds, dm, gy));
      return g_gpu->LoraExpand(gy, ds, dm, gout);
    }));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] graph replay", st3, RandomTokenSlots(T3, 4, 0.05), 1000, graph.get()));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] graph replay", st3, RandomTokenSlots(T3, 4, 0.1), 3, graph.get()));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] graph replay", st3, std::vector<int>(T3, -1), 1, graph.get()));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[tc] graph replay", st3, RandomTokenSlots(T3, 4, 0.0), 1000, graph.get()));
  }
  for (bool graph : {false, true}) {
    LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[tc] qkv", *world, T, true, graph, 4));
  }
  LORAPLEX_RETURN_IF_ERROR(CheckGemmWithLora("GemmWithLora[tc] odd ranks", *odd, 160, true, true, 4));
  // And the decode kernels on the long step the tensor cores take by default.
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 1 << 30));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[decode kernels] odd ranks long segments", st3, RandomTokenSlots(T3, 4, 0.05), 1000, nullptr));
  LORAPLEX_RETURN_IF_ERROR(CheckLoraStep("LoRA[decode kernels] odd ranks short segments", st3, RandomTokenSlots(T3, 4, 0.05), 2, nullptr));
  return cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 256);
}

// --- timing ----------------------------------------------------------------------------------------

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

absl::Status TimeGemm(int64_t m, int64_t n, int64_t k) {
  // Enough weight copies that each call streams from HBM, not the ~50 MB L2.
  const size_t w_bytes = static_cast<size_t>(n) * k * 2;
  const int copies = static_cast<int>(std::max<size_t>(2, (256u << 20) / w_bytes + 1));
  std::vector<DeviceMemory> ws;
  std::vector<float> w = RandomVec(static_cast<size_t>(n) * k, -1, 1);
  for (int i = 0; i < copies; ++i) {
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d, UploadBf16(w));
    ws.push_back(std::move(d));
  }
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(RandomVec(m * k, -1, 1)));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, Poisoned(m * n * 2));
  LORAPLEX_ASSIGN_OR_RETURN(auto samples, cuda::TimeOnStream(g_gpu, 10, 21, 20, [&](int call) {
    return g_gpu->Gemm(Gpu(d_x, DType::kBF16, {m, k}), Gpu(ws[call % copies], DType::kBF16, {n, k}), 0.0f,
                       Gpu(d_y, DType::kBF16, {m, n}));
  }));
  const double us = Median(samples);
  const double bytes = static_cast<double>(n) * k * 2 + m * k * 2 + m * n * 2;
  std::printf("TIME Gemm M=%-3lld N=%-6lld K=%-6lld %9.2f us  %7.1f GB/s  %7.1f TFLOP/s\n", static_cast<long long>(m),
              static_cast<long long>(n), static_cast<long long>(k), us, bytes / us * 1e-3, 2.0 * m * n * k / us * 1e-6);
  return absl::OkStatus();
}

// Random bf16 weights that timing cases carve adapter slices and GEMM weights from: 2 GiB, so
// rotating through copies of a case's weights streams them from HBM, not the 50 MB L2. Contents
// only need to be realistic (random, not zero); correctness is checked above.
struct WeightPool {
  DeviceMemory mem;
  size_t next = 0;
  static absl::StatusOr<WeightPool> Create(size_t bytes) {
    WeightPool pool;
    LORAPLEX_ASSIGN_OR_RETURN(pool.mem, g_gpu->Allocate(bytes));
    const size_t block = 16u << 20;
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory seed, UploadBf16(RandomVec(block / 2, -0.05f, 0.05f)));
    for (size_t at = 0; at < bytes; at += block) {
      LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyOnDevice(static_cast<char*>(pool.mem.data()) + at, seed.data(),
                                                   std::min(block, bytes - at)));
    }
    return pool;
  }
  // 256-byte aligned; wraps around when the pool is used up.
  void* Take(size_t bytes) {
    bytes = (bytes + 255) / 256 * 256;
    if (next + bytes > mem.size()) next = 0;
    void* p = static_cast<char*>(mem.data()) + next;
    next += bytes;
    return p;
  }
};

struct LoraTimingCase {
  std::string name;
  int in;
  std::vector<int> widths;
  std::vector<int> token_slots;  // [T] adapter slot of each token, -1 for the base model
  std::vector<int> slot_ranks;   // rank of every slice of each slot
  bool many_graph = false;       // the segments of a many-adapter graph even when they are few
};

// Times shrink, expand, both, the base GEMM of the module at M = T, GEMM + both as three ops,
// GemmWithLora (shrink and expand beside the GEMM, delta added after it), and GemmWithLora with
// the in-place expand after the GEMM. Bandwidth is adapter bytes (A and B of the slots the step
// uses) over time.
absl::Status TimeLoraCase(WeightPool& pool, const LoraTimingCase& c) {
  // LORAPLEX_TIME_LORA_ONLY=<text>: time only the cases whose name contains it (for a profiler).
  if (const char* only = std::getenv("LORAPLEX_TIME_LORA_ONLY"); only != nullptr && c.name.find(only) == std::string::npos) {
    return absl::OkStatus();
  }
  const int T = static_cast<int>(c.token_slots.size());
  const int S = static_cast<int>(c.widths.size());
  const int slots = static_cast<int>(c.slot_ranks.size());
  // Tables sized for rank 64 like a serving pool's, with the step's own rank bound.
  const int case_rank = *std::max_element(c.slot_ranks.begin(), c.slot_ranks.end());
  const int max_rank = std::max(64, case_rank);
  int width = 0;
  for (int w : c.widths) width += w;
  std::vector<bool> used(slots, false);
  for (int s : c.token_slots) if (s >= 0) used[s] = true;
  double a_bytes = 0, b_bytes = 0;
  for (int s = 0; s < slots; ++s) {
    if (!used[s]) continue;
    a_bytes += 2.0 * S * c.slot_ranks[s] * c.in;
    b_bytes += 2.0 * width * c.slot_ranks[s];
  }
  const double gemm_bytes = 2.0 * width * c.in;
  // Rotate through enough copies of the adapters (and of the GEMM weight) to exceed the L2 4x.
  const int sets = static_cast<int>(std::clamp(200e6 / (a_bytes + b_bytes), 4.0, 512.0));
  const int gemm_copies = static_cast<int>(std::clamp(200e6 / gemm_bytes, 2.0, 8.0));
  std::vector<DeviceMemory> tables;
  std::vector<LoraModule> modules;
  for (int set = 0; set < sets; ++set) {
    std::vector<LoraSliceWeights> table(static_cast<size_t>(slots) * S);
    for (int slot = 0; slot < slots; ++slot) {
      for (int s = 0; s < S; ++s) {
        const int r = c.slot_ranks[slot];
        // Unused slots keep their table entries but are never read; give them no memory.
        void* a = used[slot] ? pool.Take(static_cast<size_t>(r) * c.in * 2) : nullptr;
        void* b = used[slot] ? pool.Take(static_cast<size_t>(c.widths[s]) * r * 2) : nullptr;
        table[slot * S + s] = {a, b, used[slot] ? r : 0, 0.5f};
      }
    }
    LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d, Upload(table.data(), table.size() * sizeof(LoraSliceWeights)));
    LoraModule m;
    m.table = static_cast<const LoraSliceWeights*>(d.data());
    m.num_slots = slots;
    m.num_slices = S;
    m.in_features = c.in;
    m.max_rank = max_rank;
    for (int s = 0; s < S; ++s) m.slice_offsets[s + 1] = m.slice_offsets[s] + c.widths[s];
    tables.push_back(std::move(d));
    modules.push_back(m);
  }
  std::vector<TensorView> gemm_w;
  for (int i = 0; i < gemm_copies; ++i) {
    gemm_w.push_back({pool.Take(static_cast<size_t>(gemm_bytes)), DType::kBF16, {width, c.in}, Device::kCuda});
  }
  // Segment capacity as the model sizes it (its max_tokens), not the live count: the grid must
  // not grow with it.
  const Segs segs = BuildSegs(c.token_slots, 0x7fffffff);
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs, DevSegs::Create(2048, T));
  LORAPLEX_RETURN_IF_ERROR(dsegs.Write(segs, case_rank));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(RandomVec(static_cast<size_t>(T) * c.in, -1, 1)));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, Poisoned(static_cast<size_t>(T) * S * max_rank * 4));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, UploadBf16(RandomVec(static_cast<size_t>(T) * width, -1, 1)));
  const TensorView gx = Gpu(d_x, DType::kBF16, {T, c.in}), gy = Gpu(d_y, DType::kF32, {T, S * max_rank}),
                   gout = Gpu(d_out, DType::kBF16, {T, width});
  // As the model's decode graph for this step has it: a few-adapter graph's segment bound, and
  // whether a slot holds a rank above kNarrowLoraRank (the streamed expand).
  LoraSegments ds = dsegs.View();
  ds.segments_bound = segs.count() <= kFewLoraSegments && !c.many_graph ? kFewLoraSegments : 0;
  for (int s = 0; s < slots; ++s) ds.wide_ranks = ds.wide_ranks || (used[s] && c.slot_ranks[s] > kNarrowLoraRank);
  struct Variant { const char* name; bool gemm, shrink, expand, fused, in_place, in_line = false; };
  // Each variant timed twice: launched one call at a time from the host (eager, as the model runs
  // today), and as a CUDA graph of 20 calls replayed (device time, launch gaps mostly gone).
  constexpr int kGraphCalls = 20;
  double eager[8] = {}, graph[8] = {};
  int vi = 0;
  for (const Variant& v :
       {Variant{"gemm", true, false, false, false, false}, Variant{"shrink", false, true, false, false, false},
        Variant{"expand", false, false, true, false, false}, Variant{"lora", false, true, true, false, false},
        Variant{"gemm+lora", true, true, true, false, false}, Variant{"fused", false, false, false, true, false},
        Variant{"fused in-place", false, false, false, true, true},
        Variant{"fused in line", false, false, false, true, false, true}}) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraDeltaLimitForTest(g_gpu, v.in_place ? 0 : SIZE_MAX));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, v.in_line ? 0 : INT32_MAX));
    auto body = [&](int call) -> absl::Status {
      if (v.fused) return g_gpu->GemmWithLora(gx, gemm_w[call % gemm_copies], gout, &ds, &modules[call % sets], gy);
      if (v.gemm) LORAPLEX_RETURN_IF_ERROR(g_gpu->Gemm(gx, gemm_w[call % gemm_copies], 0.0f, gout));
      if (v.shrink) LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraShrink(gx, ds, modules[call % sets], gy));
      if (v.expand) LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraExpand(gy, ds, modules[call % sets], gout));
      return absl::OkStatus();
    };
    LORAPLEX_ASSIGN_OR_RETURN(auto samples, cuda::TimeOnStream(g_gpu, 10, 21, 20, body));
    eager[vi] = Median(samples);
    // Graphs rotate through as many weight sets as fit 20 calls: for the smallest cases those fit
    // the L2 and their numbers are partly L2 hits (marked "L2" below).
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
    LORAPLEX_ASSIGN_OR_RETURN(auto g, cuda::CaptureCudaGraph(g_gpu, [&]() -> absl::Status {
      for (int call = 0; call < kGraphCalls; ++call) LORAPLEX_RETURN_IF_ERROR(body(call));
      return absl::OkStatus();
    }));
    LORAPLEX_ASSIGN_OR_RETURN(auto gsamples, cuda::TimeOnStream(g_gpu, 3, 11, 1, [&](int) { return g->Launch(); }));
    graph[vi] = Median(gsamples) / kGraphCalls;
    ++vi;
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraDeltaLimitForTest(g_gpu, SIZE_MAX));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, INT32_MAX));
  const double ab = a_bytes + b_bytes;
  const bool l2_resident = std::min(sets, kGraphCalls) * ab < 100e6;  // < 2x the 50 MB L2
  std::printf("TIME LoRA %-34s T=%-4d segs=%-3d graph: shrink %6.2f us %5.0f GB/s, expand %6.2f us %5.0f GB/s, "
              "lora %6.2f us %5.0f GB/s (%5.2f MB%s), gemm %6.2f us, +lora %.3fx, GemmWithLora %.3fx (+%.2f us), "
              "in-place %.3fx (+%.2f us), in line %.3fx (+%.2f us) | eager: lora %6.2f us, +lora %.3fx, "
              "GemmWithLora %.3fx, in-place %.3fx, in line %.3fx\n",
              c.name.c_str(), T, segs.count(), graph[1], a_bytes / graph[1] * 1e-3, graph[2], b_bytes / graph[2] * 1e-3,
              graph[3], ab / graph[3] * 1e-3, ab * 1e-6, l2_resident ? ", L2" : "", graph[0], graph[4] / graph[0],
              graph[5] / graph[0], graph[5] - graph[0], graph[6] / graph[0], graph[6] - graph[0], graph[7] / graph[0],
              graph[7] - graph[0], eager[3], eager[4] / eager[0], eager[5] / eager[0], eager[6] / eager[0],
              eager[7] / eager[0]);
  return absl::OkStatus();
}

// Every LoRA knob a test may change back to the executor's default (the in-line chain stays off,
// as Main sets it), so timing after a failed check still times the defaults.
absl::Status ResetLoraKnobs() {
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTuningForTest(g_gpu, 0, true, true));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkWarpsForTest(g_gpu, 0));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, -1));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraWideShrinkGridForTest(g_gpu, -1));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, -1));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraGemmSmsForTest(g_gpu, 0));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraGemmFirstForTest(g_gpu, 0));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraInlineForTest(g_gpu, INT32_MAX));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraFewTuningForTest(g_gpu, -1, -1, -1));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraDeltaLimitForTest(g_gpu, SIZE_MAX));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraFoldForTest(g_gpu, true));
  return cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 256);
}

absl::Status TimeLora() {
  LORAPLEX_RETURN_IF_ERROR(ResetLoraKnobs());
  // LORAPLEX_TIME_SHRINK_SHAPE=SHAPE,ROWS[,BALANCED]: time the shrink's item shape and numbering
  // SetLoraShrinkShapeForTest gives (an experiment's per-op numbers).
  if (const char* shape = std::getenv("LORAPLEX_TIME_SHRINK_SHAPE"); shape != nullptr) {
    int s = 0, r = 0, b = -1;
    if (std::sscanf(shape, "%d,%d,%d", &s, &r, &b) < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("LORAPLEX_TIME_SHRINK_SHAPE '", shape, "' is not SHAPE,ROWS[,BALANCED]"));
    }
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraShrinkShapeForTest(g_gpu, s, r, b));
    std::printf("shrink shape %d rows %d balanced %d\n", s, r, b);
  }
  // LORAPLEX_TIME_EXPAND=STAGES: time the expand SetLoraExpandForTest gives.
  if (const char* expand = std::getenv("LORAPLEX_TIME_EXPAND"); expand != nullptr) {
    int stages = 0;
    if (std::sscanf(expand, "%d", &stages) != 1) {
      return absl::InvalidArgumentError(absl::StrCat("LORAPLEX_TIME_EXPAND '", expand, "' is not STAGES"));
    }
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraExpandForTest(g_gpu, stages));
    std::printf("expand stages %d\n", stages);
  }
  LORAPLEX_ASSIGN_OR_RETURN(WeightPool pool, WeightPool::Create(size_t{2} << 30));
  struct Shape3 { const char* name; int in; std::vector<int> widths; };
  const Shape3 shapes[] = {{"qkv", 4096, {4096, 1024, 1024}}, {"o", 4096, {4096}},
                           {"gate_up", 4096, {14336, 14336}}, {"down", 14336, {4096}}};
  std::vector<int> distinct32(32), four_by_8(32), eight_by_4(32), mixed_ranks(32);
  std::iota(distinct32.begin(), distinct32.end(), 0);
  for (int t = 0; t < 32; ++t) four_by_8[t] = t / 8;
  for (int t = 0; t < 32; ++t) eight_by_4[t] = t / 4;
  for (int s = 0; s < 32; ++s) mixed_ranks[s] = 8 << (s % 4);  // 8, 16, 32, 64
  for (const Shape3& sh : shapes) {
    const std::string n = sh.name;
    for (const LoraTimingCase& c : {
             LoraTimingCase{n + " 32 distinct r16", sh.in, sh.widths, distinct32, std::vector<int>(32, 16)},
             LoraTimingCase{n + " 32 distinct r{8,16,32,64}", sh.in, sh.widths, distinct32, mixed_ranks},
             LoraTimingCase{n + " 4 adapters x 8 tokens r16", sh.in, sh.widths, four_by_8, std::vector<int>(4, 16)},
             // step_bench's "8 mixed ranks" at batch 32
             LoraTimingCase{n + " 8 adapters x 4 tokens r{8,16,32,64}", sh.in, sh.widths, eight_by_4,
                            {8, 16, 32, 64, 8, 16, 32, 64}},
             // step_bench's "8 adapters r16" and "8 adapters r64" at batch 32, which the mixed
             // ranks' cost is compared with.
             LoraTimingCase{n + " 8 adapters x 4 tokens r16", sh.in, sh.widths, eight_by_4, std::vector<int>(8, 16)},
             LoraTimingCase{n + " 8 adapters x 4 tokens r64", sh.in, sh.widths, eight_by_4, std::vector<int>(8, 64)},
             // step_bench's "one adapter r16" at batch 32, and its few-adapter graph with no
             // token on an adapter: the side chain's fork, join and empty kernels beside the GEMM
             // chosen for fewer SMs, what any few-adapter step pays before its adapters' work.
             LoraTimingCase{n + " 1 adapter x 32 tokens r16", sh.in, sh.widths, std::vector<int>(32, 0), {16}},
             LoraTimingCase{n + " no adapter x 32 tokens (few graph)", sh.in, sh.widths, std::vector<int>(32, -1), {16}},
             // The same in a many-adapter graph: the GEMM on every SM beside the empty chain.
             LoraTimingCase{n + " no adapter x 32 tokens (many graph)", sh.in, sh.widths, std::vector<int>(32, -1), {16},
                            true},
             LoraTimingCase{n + " 1 adapter x 1 token r16", sh.in, sh.widths, {0}, {16}},
             LoraTimingCase{n + " 1 adapter x 1 token r64", sh.in, sh.widths, {0}, {64}}}) {
      LORAPLEX_RETURN_IF_ERROR(TimeLoraCase(pool, c));
    }
  }
  // Batches past 32 and a prefill step of 4 adapters x 512 tokens.
  std::vector<int> distinct128(128), prefill(2048);
  std::iota(distinct128.begin(), distinct128.end(), 0);
  for (int t = 0; t < 2048; ++t) prefill[t] = t / 512;
  LORAPLEX_RETURN_IF_ERROR(TimeLoraCase(pool, {"qkv 128 distinct r16", 4096, {4096, 1024, 1024}, distinct128,
                                               std::vector<int>(128, 16)}));
  LORAPLEX_RETURN_IF_ERROR(TimeLoraCase(pool, {"qkv prefill 4 x 512 tokens r16", 4096, {4096, 1024, 1024}, prefill,
                                               std::vector<int>(4, 16)}));
  LORAPLEX_RETURN_IF_ERROR(TimeLoraCase(pool, {"gate_up prefill 4 x 512 tokens r16", 4096, {14336, 14336}, prefill,
                                               std::vector<int>(4, 16)}));
  // The same prefill step on the decode kernels (what it ran before the tensor-core ones).
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 1 << 30));
  LORAPLEX_RETURN_IF_ERROR(TimeLoraCase(pool, {"qkv prefill 4 x 512 tokens r16 decode kernels", 4096, {4096, 1024, 1024},
                                               prefill, std::vector<int>(4, 16)}));
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraTensorCoreMinTokensForTest(g_gpu, 256));
  return cuda::SetLoraTuningForTest(g_gpu, 0, true, true);
}

// Every LoRA rows check: each consumer at 32, 77 and 128 tokens, then a SiLU·up width the
// tensor-core reader does not take.
void CheckLoraRowsAll() {
  for (int t : {32, 77, 128}) {
    for (auto c : {FoldConsumer::kRope, FoldConsumer::kSiluMul, FoldConsumer::kAddRmsNorm, FoldConsumer::kNone}) {
      Run("LoRA rows", [&] { return CheckLoraRows(c, t); });
    }
  }
  // A SiLU·up width the tensor-core reader does not take (inter 1540, not a multiple of 8): the
  // flush kernel, then plain SiLU·up.
  Run("LoRA rows[inter 1540]", [&] { return CheckLoraRows(FoldConsumer::kSiluMul, 32, 1540); });
  // The executor's own threshold for o and down (64 tokens): the side chain at 32, rows at 77.
  for (int t : {32, 77}) {
    Run(absl::StrCat("LoRA rows[one-slice default, T=", t, "]"), [&] { return CheckLoraRows(FoldConsumer::kAddRmsNorm, t, 1536, -1); });
  }
  // Skinny LoRA rows (up to 16 tokens): every consumer, with one token (positions beyond the
  // first empty: the step lists 4 segments, one holds the token), 5 and 16, on any shape; then
  // the 8B model's qkv and o under the executor's rule: one token takes it (qkv 6144 + 48 rows),
  // 5 tokens of up to 4 adapters keep qkv off it (6144 + 192 rows deal unevenly: the GEMM over all
  // spare rows, as min_tokens 1 allows here) and o on it (4096 + 64).
  for (int t : {1, 5, 16}) {
    for (auto c : {FoldConsumer::kRope, FoldConsumer::kSiluMul, FoldConsumer::kAddRmsNorm, FoldConsumer::kNone}) {
      Run(absl::StrCat("LoRA rows[skinny, T=", t, "]"), [&] { return CheckLoraRows(c, t, 1536, -1, false, 1); });
    }
  }
  Run("LoRA rows[skinny, 8B qkv, T=1]", [] { return CheckLoraRows(FoldConsumer::kRope, 1, 1536, -1, true, 1); });
  Run("LoRA rows[skinny, 8B o, T=1]", [] { return CheckLoraRows(FoldConsumer::kAddRmsNorm, 1, 1536, -1, true, 1); });
  Run("LoRA rows[skinny, 8B qkv, T=5]", [] { return CheckLoraRows(FoldConsumer::kRope, 5, 1536, -1, true, 0); });
  Run("LoRA rows[skinny, 8B o, T=5]", [] { return CheckLoraRows(FoldConsumer::kAddRmsNorm, 5, 1536, -1, true, 1); });
}

// LoRA rows against the side chain and the plain GEMM, each followed by the op that reads its
// output as in the model (RoPE after qkv, SiLU·up after gate_up), in a graph of 20 calls with
// weights rotated past the L2: the step's install kernel (BeginLoraStep, once a graph), the GEMM
// over the spare rows alone, and the three module + consumer pairs.
absl::Status TimeLoraRowsCase(const char* name, int in, const std::vector<int>& widths, int T, int adapters) {
  const int S = static_cast<int>(widths.size()), hq = 32, hkv = 8, d = 128;
  int W = 0;
  for (int w : widths) W += w;
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraRowsForTest(g_gpu, -1, -1, 1, 1));  // one-slice weights get spare rows
  const int64_t spare = g_gpu->LoraWeightSpareRows(S);
  LORAPLEX_ASSIGN_OR_RETURN(auto world, LoraWorld::Create(4, in, widths, 16, std::vector<std::vector<int>>(4, std::vector<int>(S, 16))));
  const LoraModule dm = world->Module(true);
  const size_t w_bytes = static_cast<size_t>(W) * in * 2, spare_bytes = static_cast<size_t>(spare) * in * 2;
  const int copies = static_cast<int>(std::clamp(200e6 / static_cast<double>(w_bytes), 2.0, 8.0));
  std::vector<DeviceMemory> d_w(copies);
  std::vector<TensorView> gw(copies);
  for (int i = 0; i < copies; ++i) {
    LORAPLEX_ASSIGN_OR_RETURN(d_w[i], g_gpu->Allocate(w_bytes + spare_bytes));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_w[i].data(), 0, w_bytes + spare_bytes));
    gw[i] = Gpu(d_w[i], DType::kBF16, {W, in});
    LORAPLEX_RETURN_IF_ERROR(g_gpu->RegisterLoraWeight(gw[i], dm));
  }
  LORAPLEX_RETURN_IF_ERROR(g_gpu->LoraSlotsChanged());
  std::vector<int> token_slots(T);
  for (int t = 0; t < T; ++t) token_slots[t] = t * adapters / T;
  const Segs segs = BuildSegs(token_slots, 1 << 30);
  LORAPLEX_ASSIGN_OR_RETURN(DevSegs dsegs, DevSegs::Create(T, T));
  LORAPLEX_RETURN_IF_ERROR(dsegs.Write(segs, 16));
  LoraSegments ds = dsegs.View();
  ds.segments_bound = kFewLoraSegments;
  ds.narrow_ranks = true;
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(RandomVec(static_cast<size_t>(T) * in, -1, 1)));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_y, g_gpu->Allocate(static_cast<size_t>(T) * S * 16 * 4));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_ext, g_gpu->Allocate(static_cast<size_t>(T) * (W + spare) * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_act, g_gpu->Allocate(static_cast<size_t>(T) * W * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_res, UploadBf16(RandomVec(static_cast<size_t>(T) * W, -1, 1)));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_norm_w, UploadBf16(RandomVec(static_cast<size_t>(W), 0.5f, 1.5f)));
  std::vector<int32_t> positions(T), slot_mapping(T), token_seq(T);
  for (int t = 0; t < T; ++t) {
    positions[t] = 100 + t;
    slot_mapping[t] = t;
    token_seq[t] = t;
  }
  const int bs = 16, blocks = (T + bs - 1) / bs;
  const Shape cs{blocks, bs, hkv, d};
  LORAPLEX_ASSIGN_OR_RETURN(const RopeInputs rope, UploadRope(d, bs, positions, slot_mapping, token_seq));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_k, g_gpu->Allocate(static_cast<size_t>(blocks) * bs * hkv * d * 2));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_v, g_gpu->Allocate(static_cast<size_t>(blocks) * bs * hkv * d * 2));
  const TensorView gx = Gpu(d_x, DType::kBF16, {T, in}), gy = Gpu(d_y, DType::kF32, {T, S * 16}),
                   gout = Gpu(d_out, DType::kBF16, {T, W});
  auto consume = [&]() -> absl::Status {
    if (S == 3) {
      return g_gpu->RopeAndCacheKv(gout, rope.InvFreq(), hq, hkv, d, rope.meta,
                                   {Gpu(d_k, DType::kBF16, cs), Gpu(d_v, DType::kBF16, cs)});
    }
    if (S == 2) return g_gpu->SiluMul(gout, Gpu(d_act, DType::kBF16, {T, W / 2}));
    return g_gpu->AddRmsNorm(gout, Gpu(d_res, DType::kBF16, {T, W}), Gpu(d_norm_w, DType::kBF16, {W}), 1e-5f,
                             Gpu(d_act, DType::kBF16, {T, W}));
  };
  constexpr int kCalls = 20;
  const char* labels[] = {"install", "gemm", "gemm+spare", "plain+consumer", "side+consumer", "rows+consumer"};
  const int variants = 6;
  double us[6] = {};
  for (int v = 0; v < variants; ++v) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraRowsForTest(g_gpu, -1, v == 4 ? 0 : -1, 1, 1));
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
    LORAPLEX_ASSIGN_OR_RETURN(auto g, cuda::CaptureCudaGraph(g_gpu, [&]() -> absl::Status {
      for (int call = 0; call < kCalls; ++call) {
        const TensorView& w = gw[call % copies];
        switch (v) {
          case 0: LORAPLEX_RETURN_IF_ERROR(g_gpu->BeginLoraStep(ds)); break;
          case 1: LORAPLEX_RETURN_IF_ERROR(g_gpu->Gemm(gx, w, 0.0f, gout)); break;
          case 2: {
            const TensorView ext{w.data, DType::kBF16, {W + spare, in}, Device::kCuda};
            LORAPLEX_RETURN_IF_ERROR(g_gpu->Gemm(gx, ext, 0.0f, Gpu(d_ext, DType::kBF16, {T, W + spare})));
            break;
          }
          case 3:
            LORAPLEX_RETURN_IF_ERROR(g_gpu->Gemm(gx, w, 0.0f, gout));
            LORAPLEX_RETURN_IF_ERROR(consume());
            break;
          default:
            if (call == 0) LORAPLEX_RETURN_IF_ERROR(g_gpu->BeginLoraStep(ds));
            LORAPLEX_RETURN_IF_ERROR(g_gpu->GemmWithLora(gx, w, gout, &ds, &dm, gy));
            LORAPLEX_RETURN_IF_ERROR(consume());
            break;
        }
      }
      return absl::OkStatus();
    }));
    LORAPLEX_ASSIGN_OR_RETURN(auto samples, cuda::TimeOnStream(g_gpu, 3, 11, 1, [&](int) { return g->Launch(); }));
    us[v] = Median(samples) / kCalls;
  }
  LORAPLEX_RETURN_IF_ERROR(cuda::SetLoraRowsForTest(g_gpu, -1, -1));
  std::printf("TIME LoRA rows %-8s T=%-4d adapters=%d graph:", name, T, adapters);
  for (int v = 0; v < variants; ++v) std::printf(" %s %.2f us%s", labels[v], us[v], v + 1 < variants ? "," : "");
  std::printf(" | side +%.2f us, rows +%.2f us over plain", us[4] - us[3], us[5] - us[3]);
  std::printf("\n");
  return absl::OkStatus();
}

absl::Status TimeLoraRows() {
  // The GEMM over N + spare rows against N, and N rounded further up.
  for (int64_t n : {6144, 6336, 6400, 6656, 28672, 28800, 28928, 29184}) LORAPLEX_RETURN_IF_ERROR(TimeGemm(32, n, 4096));
  for (int T : {32, 64}) {
    for (int adapters : {4, 1}) {
      LORAPLEX_RETURN_IF_ERROR(TimeLoraRowsCase("qkv", 4096, {4096, 1024, 1024}, T, adapters));
      LORAPLEX_RETURN_IF_ERROR(TimeLoraRowsCase("gate_up", 4096, {14336, 14336}, T, adapters));
      LORAPLEX_RETURN_IF_ERROR(TimeLoraRowsCase("o", 4096, {4096}, T, adapters));
      LORAPLEX_RETURN_IF_ERROR(TimeLoraRowsCase("down", 14336, {4096}, T, adapters));
    }
  }
  return absl::OkStatus();
}

// The bandwidth probe beside each decode GEMM (GemmBesideProbeForTest): blocks of one warp at
// most 32 registers and no shared memory, the only shape that fits on an SM beside one of
// cuBLASLt's decode CTAs. Does such work delay the GEMM, and how fast does it read there? The
// probe reads as many bytes as the module's LoRA weights for 4 adapters or 32 distinct r16 ones.
absl::Status TimeBesideCase(WeightPool& pool, const char* name, int in, int width, int T, double probe_mb,
                            int blocks) {
  const double gemm_bytes = 2.0 * width * in;
  const int gemm_copies = static_cast<int>(std::clamp(200e6 / gemm_bytes, 2.0, 8.0));
  const int64_t bytes = static_cast<int64_t>(probe_mb * 1e6) / 4096 * 4096;
  const int src_copies = static_cast<int>(std::clamp(200e6 / static_cast<double>(bytes), 2.0, 20.0));
  std::vector<TensorView> gemm_w;
  for (int i = 0; i < gemm_copies; ++i) {
    gemm_w.push_back({pool.Take(static_cast<size_t>(gemm_bytes)), DType::kBF16, {width, in}, Device::kCuda});
  }
  std::vector<const void*> src;
  for (int i = 0; i < src_copies; ++i) src.push_back(pool.Take(static_cast<size_t>(bytes)));
  auto* sink = static_cast<uint32_t*>(pool.Take(4096 * sizeof(uint32_t)));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_x, UploadBf16(RandomVec(static_cast<size_t>(T) * in, -1, 1)));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, UploadBf16(RandomVec(static_cast<size_t>(T) * width, -1, 1)));
  const TensorView gx = Gpu(d_x, DType::kBF16, {T, in}), gout = Gpu(d_out, DType::kBF16, {T, width});
  struct Mode { bool gemm; bool probe; bool probe_first; };
  constexpr int kGraphCalls = 20;
  double us[4] = {};
  int mi = 0;
  for (const Mode& m : {Mode{true, false, false}, Mode{false, true, false}, Mode{true, true, true},
                        Mode{true, true, false}}) {
    auto body = [&](int call) -> absl::Status {
      return cuda::GemmBesideProbeForTest(g_gpu, gx, gemm_w[call % gemm_copies], gout, src[call % src_copies],
                                          m.probe ? bytes : 0, blocks, sink, m.gemm, m.probe_first);
    };
    LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
    LORAPLEX_ASSIGN_OR_RETURN(auto g, cuda::CaptureCudaGraph(g_gpu, [&]() -> absl::Status {
      for (int call = 0; call < kGraphCalls; ++call) LORAPLEX_RETURN_IF_ERROR(body(call));
      return absl::OkStatus();
    }));
    LORAPLEX_ASSIGN_OR_RETURN(auto samples, cuda::TimeOnStream(g_gpu, 3, 11, 1, [&](int) { return g->Launch(); }));
    us[mi++] = Median(samples) / kGraphCalls;
  }
  std::printf("TIME beside %-8s T=%-3d probe %6.2f MB x %3d blocks: gemm %6.2f us, probe alone %6.2f us %5.0f GB/s, "
              "beside: probe first %6.2f us (+%5.2f), gemm first %6.2f us (+%5.2f)\n",
              name, T, bytes * 1e-6, blocks, us[0], us[1], bytes / us[1] * 1e-3, us[2], us[2] - us[0], us[3],
              us[3] - us[0]);
  return absl::OkStatus();
}

absl::Status TimeBeside() {
  LORAPLEX_ASSIGN_OR_RETURN(WeightPool pool, WeightPool::Create(size_t{2} << 30));
  struct Shape { const char* name; int in; int width; double lora4_mb; };
  // A + B of 4 r16 adapters: qkv 3·16·4096 + 6144·16, o 16·4096 + 4096·16, gate_up 2·16·4096 +
  // 28672·16, down 16·14336 + 4096·16 bf16 each.
  const Shape shapes[] = {{"qkv", 4096, 6144, 2.36}, {"o", 4096, 4096, 1.05}, {"gate_up", 4096, 28672, 4.72},
                          {"down", 14336, 4096, 2.36}};
  for (const Shape& sh : shapes) {
    for (int T : {1, 32}) {
      for (double mb : {sh.lora4_mb, 8 * sh.lora4_mb}) {
        for (int blocks : {120, 132, 264}) {
          LORAPLEX_RETURN_IF_ERROR(TimeBesideCase(pool, sh.name, sh.in, sh.width, T, mb, blocks));
        }
      }
    }
  }
  return absl::OkStatus();
}


int Main() {
  if (!cuda::CudaDevicePresent()) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  auto gpu = cuda::CreateCudaOps();
  auto cpu = CreateOps(Device::kCpu);
  if (!gpu.ok() || !cpu.ok()) {
    std::printf("setup failed: %s / %s\n", gpu.status().ToString().c_str(), cpu.status().ToString().c_str());
    return 1;
  }
  g_gpu = gpu->get();
  g_cpu = cpu->get();
  // The side chain for every GemmWithLora unless a case asks for the in-line one (by default
  // calls that may have more than 64 segments run in line).
  if (absl::Status st = cuda::SetLoraInlineForTest(g_gpu, INT32_MAX); !st.ok()) {
    std::printf("setup failed: %s\n", st.ToString().c_str());
    return 1;
  }
  if (std::getenv("LORAPLEX_TIME_BESIDE_ONLY") != nullptr) {  // the probe beside the GEMMs alone
    Run("TIME beside", [] { return TimeBeside(); });
    return g_failures == 0 ? 0 : 1;
  }
  if (std::getenv("LORAPLEX_TIME_ROWS_ONLY") != nullptr) {  // the LoRA rows' checks and timing alone
    CheckLoraRowsAll();
    Run("TIME LoRA rows", [] { return TimeLoraRows(); });
    return g_failures == 0 ? 0 : 1;
  }
  if (std::getenv("LORAPLEX_TIME_LORA_ONLY") != nullptr) {  // profiling run: the timing cases alone
    Run("TIME LoRA", [] { return TimeLora(); });
    return g_failures == 0 ? 0 : 1;
  }

  Run("Embed", [] { return TestEmbed(5000, 4096, 37); });
  Run("Embed", [] { return TestEmbed(1000, 68, 5); });  // rows not whole 16-byte vectors
  Run("GatherRows", [] { return TestGatherRows(DType::kBF16, 50, 4096, 20); });
  Run("GatherRows", [] { return TestGatherRows(DType::kF32, 50, 100, 7); });
  for (auto [t, h] : std::vector<std::pair<int64_t, int64_t>>{{1, 4096}, {7, 4096}, {300, 4096}, {3, 100}}) {
    Run("RmsNorm", [&] { return TestRmsNorm(t, h, false, false); });
    Run("AddRmsNorm", [&] { return TestRmsNorm(t, h, true, false); });
  }
  Run("RmsNorm aliased", [] { return TestRmsNorm(5, 4096, false, true); });
  Run("AddRmsNorm aliased", [] { return TestRmsNorm(5, 4096, true, true); });
  Run("SiluMul", [] { return TestSiluMul(1, 14336); });
  Run("SiluMul", [] { return TestSiluMul(33, 14336); });
  Run("SiluMul", [] { return TestSiluMul(3, 100); });
  Run("RopeAndCacheKv", [] { return TestRope(32, 8, 128, 24); });
  Run("RopeAndCacheKv", [] { return TestRope(8, 8, 64, 40); });
  GemmTests();
  AttentionTests();
  Run("LoRA", [] { return LoraTests(); });
  for (int t : {1, 5, 32}) {
    for (auto c : {FoldConsumer::kAddRmsNorm, FoldConsumer::kSiluMul, FoldConsumer::kRope, FoldConsumer::kNone}) {
      Run("LoRA delta fold", [&] { return CheckLoraFold(c, t); });
    }
  }
  // The F32 delta folds the same way.
  Run("LoRA F32 delta on", [] { return cuda::SetLoraBf16DeltaForTest(g_gpu, false); });
  for (auto c : {FoldConsumer::kAddRmsNorm, FoldConsumer::kSiluMul, FoldConsumer::kRope, FoldConsumer::kNone}) {
    Run("LoRA[F32 delta] delta fold", [&] { return CheckLoraFold(c, 32); });
  }
  Run("LoRA F32 delta off", [] { return cuda::SetLoraBf16DeltaForTest(g_gpu, true); });
  // The in-line chain's delta folds the same way (forced for every call).
  Run("LoRA in line on", [] { return cuda::SetLoraInlineForTest(g_gpu, 0); });
  for (int t : {1, 32}) {
    for (auto c : {FoldConsumer::kAddRmsNorm, FoldConsumer::kSiluMul, FoldConsumer::kRope}) {
      Run("LoRA[in line] delta fold", [&] { return CheckLoraFold(c, t); });
    }
  }
  Run("LoRA in line off", [] { return cuda::SetLoraInlineForTest(g_gpu, INT32_MAX); });
  CheckLoraRowsAll();
  Run("Synchronize", [] { return g_gpu->Synchronize(); });

  std::printf("\n-- timing (median of 21 samples of 20 calls; inputs rotated past L2) --\n");
  for (int64_t n : {4096, 14336})
    for (int64_t m : {1, 32}) Run("TIME Gemm", [&] { return TimeGemm(m, n, 4096); });
  Run("TIME LoRA rows", [] { return TimeLoraRows(); });
  Run("TIME LoRA", [] { return TimeLora(); });

  std::printf("\n%s: %d failure(s)\n", g_failures == 0 ? "ALL PASS" : "FAILED", g_failures);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace loraplex::ops

int main() { return loraplex::ops::Main(); }
