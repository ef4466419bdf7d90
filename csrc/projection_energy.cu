// The fused variant of projection_energies: Y = X W^T (+ b) on tensor cores with both energies in the
// same pass, the CUDA twin of the Triton kernel in cusprun_kernels/projection_energy.py.
//
// A block owns one row tile (at most 64 rows of one document, from cusprun_kernels/tiles.py) and 64 output
// columns; its 4 warps own 16 rows x 64 columns each and step through K 32 at a time: X and W tiles are
// staged in shared memory as float32 (the next ones are already loading into registers while the current
// ones are multiplied). Products use mma.sync m16n8k8 TF32: one mma for float16 / bfloat16 inputs (TF32
// holds them exactly), 3xTF32 for float32 inputs (float32-accurate). The epilogue adds the bias, rounds Y
// to its dtype and stores it, and sums the squares of the rounded Y over the tile's rows (row energies:
// the Y that goes on to the next op); the blocks of the first column block also sum X^2 over their rows
// (column energies). Each block writes its partial sums to its own slot and every reduction has a fixed
// order, so results are bit-identical run to run.
#include "common.cuh"
#include "kernels.h"
#include "tensor_core.cuh"

namespace cusprun {
namespace {

constexpr int kRows = kProjectionRows;  // 64: 4 warps x 16
constexpr int kCols = 64;               // 8 n-tiles of 8 per warp
constexpr int kDepth = 32;              // K per stage: 4 k-steps of 8
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps * 16 == kRows, "each warp owns the 16 rows of one mma");
constexpr int kStride = kDepth + 4;     // = 4 (mod 8): fragment reads (8 rows x 4 columns) are conflict-free
constexpr int kLoads = kRows * kDepth / kThreads;  // elements of X (and of W) each thread stages per step
static_assert(kRows == kCols, "one loading pattern serves the X and the W tile");

struct ProjectionArgs {
  const void* x;
  const void* w;
  const void* bias;  // nullptr: no bias
  void* y;
  float* row_part;   // [n_tiles, N]
  float* col_part;   // [n_tiles, K]
  const int32_t* tile_start;
  const int32_t* tile_end;
  int64_t n, k;
  int64_t stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn;
};

// Loads this thread's elements of the [kRows x kDepth] tile at (row0, k0) of a strided matrix; rows at
// or past row_end and columns at or past k_end are zeros.
template <typename T>
__device__ __forceinline__ void load_tile(float (&r)[kLoads], const T* m, int64_t row0, int64_t row_end,
                                          int64_t stride_r, int64_t stride_k, int64_t k0, int64_t k_end) {
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int e = threadIdx.x + i * kThreads, row = e / kDepth, col = e % kDepth;
    const bool in = row0 + row < row_end && k0 + col < k_end;
    r[i] = in ? to_float(m[(row0 + row) * stride_r + (k0 + col) * stride_k]) : 0.f;
  }
}

__device__ __forceinline__ void store_tile(float* tile, const float (&r)[kLoads]) {
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int e = threadIdx.x + i * kThreads;
    tile[(e / kDepth) * kStride + e % kDepth] = r[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) projection_energy_kernel(ProjectionArgs a) {
  constexpr bool kSplit = sizeof(T) == sizeof(float);  // float32 needs 3xTF32; 16-bit types are exact in TF32
  __shared__ float x_s[kRows * kStride];
  __shared__ float w_s[kCols * kStride];
  __shared__ float warp_sums[kWarps][kCols];
  const int tile = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int64_t m0 = a.tile_start[tile], m1 = a.tile_end[tile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);

  float acc[kCols / 8][4];
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float x_next[kLoads], w_next[kLoads];
  load_tile(x_next, x, m0, m1, a.stride_xm, a.stride_xk, 0, a.k);
  load_tile(w_next, w, n0, a.n, a.stride_wn, a.stride_wk, 0, a.k);
  for (int64_t k0 = 0; k0 < a.k; k0 += kDepth) {
    __syncthreads();  // the previous stage is consumed
    store_tile(x_s, x_next);
    store_tile(w_s, w_next);
    __syncthreads();
    if (k0 + kDepth < a.k) {  // the next stage's global loads overlap this stage's mma
      load_tile(x_next, x, m0, m1, a.stride_xm, a.stride_xk, k0 + kDepth, a.k);
      load_tile(w_next, w, n0, a.n, a.stride_wn, a.stride_wk, k0 + kDepth, a.k);
    }
    if (blockIdx.y == 0 && threadIdx.x < kDepth && k0 + threadIdx.x < a.k) {
      float sq = 0.f;  // column energy of X: padded rows are zeros
      for (int r = 0; r < kRows; ++r) sq = fmaf(x_s[r * kStride + threadIdx.x], x_s[r * kStride + threadIdx.x], sq);
      a.col_part[tile * a.k + k0 + threadIdx.x] = sq;
    }
#pragma unroll
    for (int kk = 0; kk < kDepth; kk += 8) {
      float xa[4];
      load_a(xa, x_s + warp * 16 * kStride, kStride, kk, group, quad);
#pragma unroll
      for (int n = 0; n < kCols / 8; ++n) {
        // B = W^T: b0 = W[n, k = quad], b1 = W[n, k = quad + 4] of this n-tile and k-step
        const float wb[2] = {w_s[(n * 8 + group) * kStride + kk + quad], w_s[(n * 8 + group) * kStride + kk + quad + 4]};
        if constexpr (kSplit) {
          mma_3xtf32(acc[n], xa, wb);
        } else {
          mma_exact_tf32(acc[n], xa, wb);
        }
      }
    }
  }

  // Epilogue: element e of n-tile n is row m0 + 16 warp + group + 8 (e / 2), column n0 + 8 n + 2 quad + e % 2.
  T* y = static_cast<T*>(a.y);
  const T* bias = static_cast<const T*>(a.bias);
  float y_sq[kCols / 8][2];
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) {
    y_sq[n][0] = y_sq[n][1] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = m0 + warp * 16 + group + 8 * (e / 2), col = n0 + n * 8 + 2 * quad + e % 2;
      if (row >= m1 || col >= a.n) continue;
      const T out = from_float<T>(acc[n][e] + (bias != nullptr ? to_float(bias[col]) : 0.f));
      y[row * a.stride_ym + col * a.stride_yn] = out;
      const float v = to_float(out);
      y_sq[n][e % 2] = fmaf(v, v, y_sq[n][e % 2]);
    }
  }
  // Sum over the 8 groups of the warp (lanes with the same quad), then over the warps, in a fixed order.
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float v = y_sq[n][c];
      for (int offset = 4; offset < 32; offset <<= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (group == 0) warp_sums[warp][n * 8 + 2 * quad + c] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x < kCols && n0 + threadIdx.x < a.n) {
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x];
    a.row_part[tile * a.n + n0 + threadIdx.x] = sum;
  }
}

}  // namespace

void projection_energy(std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y, int dtype,
                       int64_t k, int64_t n, int64_t stride_xm, int64_t stride_xk, int64_t stride_wn,
                       int64_t stride_wk, int64_t stride_ym, int64_t stride_yn, std::uintptr_t row_part,
                       std::uintptr_t col_part, std::uintptr_t tile_start, std::uintptr_t tile_end, int64_t n_tiles,
                       int device, std::uintptr_t stream) {
  if (k < 1 || n < 1 || n_tiles < 1 || (n + kCols - 1) / kCols > 65535) {
    throw std::invalid_argument("projection_energy: need k >= 1, 1 <= n <= 4194240 and at least one row tile");
  }
  for (auto [ptr, name] : {std::pair{x, "x"}, {w, "w"}, {y, "y"}, {row_part, "row_part"}, {col_part, "col_part"},
                           {tile_start, "tile_start"}, {tile_end, "tile_end"}}) {
    require_device_pointer(ptr, name, device);
  }
  if (bias != 0) require_device_pointer(bias, "bias", device);
  require_compute_capability(8, "projection_energy (mma.sync TF32)", device);
  const DeviceGuard guard(device);
  const ProjectionArgs args{reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(w),
                            reinterpret_cast<const void*>(bias), reinterpret_cast<void*>(y),
                            reinterpret_cast<float*>(row_part), reinterpret_cast<float*>(col_part),
                            reinterpret_cast<const int32_t*>(tile_start), reinterpret_cast<const int32_t*>(tile_end),
                            n, k, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn};
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>((n + kCols - 1) / kCols));
  dispatch_dtype(dtype, "projection_energy", [&](auto element) {
    projection_energy_kernel<decltype(element)><<<grid, kThreads, 0, as_stream(stream)>>>(args);
  });
  check_launch("projection_energy_kernel");
}

}  // namespace cusprun
