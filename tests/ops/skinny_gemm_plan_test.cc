// The skinny GEMM's plan (engine/ops/cuda/skinny_gemm.h): which shapes take it and with how many
// splits of K. Host arithmetic only, so it runs without a GPU (label cpu); ops_cuda_test runs the
// kernel itself on the GPU.
#include "engine/ops/cuda/skinny_gemm.h"

#include <catch2/catch.hpp>
#include <cstdint>

namespace loraplex::ops::cuda {
namespace {

constexpr int kH200Sms = 132;

TEST_CASE("An 8B model's small projections take the skinny GEMM at up to 16 rows on an H200") {
  for (int64_t m : {1, 8, 16}) {
    CHECK(SkinnyGemmSplits(m, 6144, 4096, kH200Sms) == 8);   // qkv: 48 tiles x 8 = 384 blocks
    CHECK(SkinnyGemmSplits(m, 4096, 4096, kH200Sms) == 8);   // o: 32 x 8 = 256
    CHECK(SkinnyGemmSplits(m, 4096, 14336, kH200Sms) == 8);  // down: 224 k steps; 14 would be 448 blocks
  }
}

TEST_CASE("Shapes the skinny GEMM would run slower or cannot run go to cuBLASLt") {
  CHECK(SkinnyGemmSplits(17, 4096, 4096, kH200Sms) == 0);       // more than one 16-row tile
  CHECK(SkinnyGemmSplits(1, 28672, 4096, kH200Sms) == 0);       // gate_up: 224 blocks, uneven over 132 SMs
  CHECK(SkinnyGemmSplits(1, 128256, 4096, kH200Sms) == 0);      // lm_head: more tiles than block slots
  CHECK(SkinnyGemmSplits(1, 4096, 4072, kH200Sms) == 0);        // K not a multiple of 64
  CHECK(SkinnyGemmSplits(1, 4096, 32, kH200Sms) == 0);          // K below one k step
  CHECK(SkinnyGemmSplits(1, 256, 256, kH200Sms) == 0);          // 8 blocks: most SMs idle
  CHECK(SkinnyGemmSplits(0, 4096, 4096, kH200Sms) == 0);
  CHECK(SkinnyGemmSplits(1, 0, 4096, kH200Sms) == 0);
  CHECK(SkinnyGemmSplits(1, 4096, 4096, 0) == 0);
  CHECK(SkinnyGemmSplits(1, int64_t{1} << 40, 4096, kH200Sms) == 0);
}

TEST_CASE("Every plan divides K into whole k steps and fits the scratch sized for the SMs") {
  int64_t planned = 0;
  for (int sms : {1, 16, 78, 114, 132, 144}) {
    for (int64_t n = 64; n <= 65536; n += n / 3 + 40) {
      for (int64_t k = 64; k <= 32768; k = k * 2 + (k % 3 == 0 ? 64 : 128)) {
        for (int64_t m : {1, 5, 16}) {
          const int splits = SkinnyGemmSplits(m, n, k, sms);
          if (splits == 0) continue;
          ++planned;
          INFO("m=" << m << " n=" << n << " k=" << k << " sms=" << sms << " splits=" << splits);
          REQUIRE(splits >= 1);
          REQUIRE((k / 64) % splits == 0);
          REQUIRE(SkinnyGemmPartialBytes(m, n, splits) <= SkinnyGemmMaxPartialBytes(sms));
          // Its blocks all run at once (3 an SM), so every column tile's counter exists.
          REQUIRE((n + 127) / 128 <= SkinnyGemmMaxTiles(sms));
        }
      }
    }
  }
  CHECK(planned > 100);  // the sweep reaches shapes that take the kernel
  CHECK(SkinnyGemmPartialBytes(16, 4096, 1) == 0);  // one split writes y directly
  CHECK(SkinnyGemmPartialBytes(16, 4096, 8) == 8u * 16 * 4096 * 4);
}

}  // namespace
}  // namespace loraplex::ops::cuda
