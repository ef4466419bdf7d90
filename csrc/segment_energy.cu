// Per-document sums of squares over token segments: out[d, f] = sum_{t in doc d} x[t, f]^2 (float32).
//
// The row energies (of a projection's output Y, computed by cuBLAS through torch) and the column
// energies (of its input X) of the projection_energies op. One block per (document, 32-feature
// tile): threadIdx.x runs over features (coalesced when the feature stride is 1), threadIdx.y over a
// fixed stride of tokens; the 8 partial sums are added in a fixed order in shared memory, so the
// result is bit-identical run to run (no atomics), as score files require.
#include "common.cuh"
#include "kernels.h"

namespace cusprun {
namespace {

constexpr int kFeatures = 32;
constexpr int kTokenLanes = 8;

template <typename T>
__global__ void segment_sum_sq_kernel(const T* __restrict__ x, int64_t stride_t, int64_t stride_f,
                                      const int64_t* __restrict__ offsets, int64_t features,
                                      float* __restrict__ out) {
  __shared__ float partial[kTokenLanes][kFeatures];
  const int64_t doc = blockIdx.x;
  const int64_t f = static_cast<int64_t>(blockIdx.y) * kFeatures + threadIdx.x;
  const int64_t begin = offsets[doc], end = offsets[doc + 1];
  float acc = 0.f;
  if (f < features) {
    for (int64_t t = begin + threadIdx.y; t < end; t += kTokenLanes) {
      const float v = to_float(x[t * stride_t + f * stride_f]);
      acc = fmaf(v, v, acc);
    }
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && f < features) {
    float sum = 0.f;
    for (int lane = 0; lane < kTokenLanes; ++lane) sum += partial[lane][threadIdx.x];
    out[doc * features + f] = sum;
  }
}

}  // namespace

void segment_sum_sq(std::uintptr_t x, int dtype, int64_t tokens, int64_t features, int64_t stride_t,
                    int64_t stride_f, std::uintptr_t offsets, int64_t n_docs, std::uintptr_t out,
                    int device, std::uintptr_t stream) {
  if (tokens < 0 || features <= 0 || n_docs <= 0) throw std::invalid_argument("segment_sum_sq: empty shape");
  require_device_pointer(x, "x", device);
  require_device_pointer(offsets, "offsets", device);
  require_device_pointer(out, "out", device);
  // The module holds sm_80 and sm_90a images only (CMakeLists.txt): say so instead of "no kernel image".
  require_compute_capability(8, "segment_sum_sq (built for sm_80 and newer)", device);
  const DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>(n_docs), static_cast<unsigned>((features + kFeatures - 1) / kFeatures));
  const dim3 block(kFeatures, kTokenLanes);
  const auto* off = reinterpret_cast<const int64_t*>(offsets);
  auto* o = reinterpret_cast<float*>(out);
  dispatch_dtype(dtype, "segment_sum_sq", [&](auto element) {
    using T = decltype(element);
    segment_sum_sq_kernel<<<grid, block, 0, as_stream(stream)>>>(reinterpret_cast<const T*>(x), stride_t, stride_f,
                                                                 off, features, o);
  });
  check_launch("segment_sum_sq_kernel");
}

}  // namespace cusprun
