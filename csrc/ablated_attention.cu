// Exact attention with one removed q or k row per program: the kernel behind qk_row_ablation.
//
// Mirrors the Triton kernel of cusprun_kernels/qk_ablation.py. A block owns kAttentionRows query rows of
// one document (one warp per row), one query head h and one ablated dimension j of the chunk. It streams
// the key tiles its rows can see (causal / sliding-window band of its own document) through shared memory:
// each lane scores one key of the tile (a dot product over head_dim), the warp keeps an online softmax,
// and each lane accumulates head_dim / 32 output dimensions. Nothing of size L x L is ever stored.
//
// Precision: float32 on CUDA cores with IEEE expf (no fast math, no TF32). The ablation delta is a small
// difference of two softmax outputs; the unperturbed output comes from this same kernel (perturb = false)
// with the identical tile and summation order, so rounding in S and in the online softmax cancels in the
// difference, as in the Triton kernel.
#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace cusprun {
namespace {

constexpr int kKeys = 32;             // keys per shared-memory tile: one lane each
constexpr int kMaxDimsPerLane = 8;    // head_dim <= 256
constexpr unsigned kFullMask = 0xffffffffu;

struct AttentionArgs {
  const float* qr;
  const float* kr;
  const float* v;
  const float* r1;
  const float* r2;
  const float* c1;
  const float* c2;
  const float* base;
  float* out;
  const int32_t* tile_start;
  const int32_t* tile_end;
  const int32_t* tile_key_lo;
  int64_t tokens;
  int heads, kv_heads, head_dim, n_rep, chunk, window;
  float scale;
};

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

size_t shared_bytes(int head_dim) {
  // q rows [rows][hd], K tile [keys][hd + 1] (padded: lane i reads K[i][d] from distinct banks),
  // V tile [keys][hd], perturbation columns c1, c2 [keys]
  return sizeof(float) * (kAttentionRows * head_dim + kKeys * (head_dim + 1) + kKeys * head_dim + 2 * kKeys);
}

template <bool kPerturb>
__global__ void __launch_bounds__(kAttentionRows * 32) ablated_attention_kernel(AttentionArgs a) {
  extern __shared__ float smem[];
  const int hd = a.head_dim, hdp = hd + 1;
  float* q_s = smem;
  float* k_s = q_s + kAttentionRows * hd;
  float* v_s = k_s + kKeys * hdp;
  float* c1_s = v_s + kKeys * hd;
  float* c2_s = c1_s + kKeys;

  const int tile = blockIdx.x, h = blockIdx.y, j = blockIdx.z;
  const int g = h / a.n_rep;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = a.tile_start[tile], m1 = a.tile_end[tile], lo = a.tile_key_lo[tile];
  const int t = m0 + warp;
  const bool row_valid = t < m1;

  for (int i = threadIdx.x; i < kAttentionRows * hd; i += blockDim.x) {
    const int row = m0 + i / hd;
    q_s[i] = row < m1 ? a.qr[(static_cast<int64_t>(row) * a.heads + h) * hd + i % hd] : 0.f;
  }
  float r1 = 0.f, r2 = 0.f;
  if (kPerturb && row_valid) {
    const int64_t at = (static_cast<int64_t>(t) * a.heads + h) * a.chunk + j;
    r1 = a.r1[at];
    r2 = a.r2[at];
  }
  float m = -INFINITY, l = 0.f;
  float acc[kMaxDimsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) acc[i] = 0.f;

  // Loop bounds are the same for every thread of the block, so every thread reaches every barrier.
  for (int s0 = lo; s0 < m1; s0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and q_s is written, on the first pass)
    for (int i = threadIdx.x; i < kKeys * hd; i += blockDim.x) {
      const int r = i / hd, d = i % hd, s = s0 + r;
      const bool in = s < m1;
      const int64_t at = (static_cast<int64_t>(s) * a.kv_heads + g) * hd + d;
      k_s[r * hdp + d] = in ? a.kr[at] : 0.f;
      v_s[r * hd + d] = in ? a.v[at] : 0.f;
    }
    if (kPerturb) {
      for (int i = threadIdx.x; i < kKeys; i += blockDim.x) {
        const int s = s0 + i;
        const int64_t at = (static_cast<int64_t>(s) * a.kv_heads + g) * a.chunk + j;
        c1_s[i] = s < m1 ? a.c1[at] : 0.f;
        c2_s[i] = s < m1 ? a.c2[at] : 0.f;
      }
    }
    __syncthreads();
    if (!row_valid) continue;
    const int s = s0 + lane;
    const bool visible = s < m1 && s <= t && (a.window <= 0 || t - s < a.window);
    float score = -INFINITY;
    if (visible) {
      float dot = 0.f;
      for (int d = 0; d < hd; ++d) dot = fmaf(q_s[warp * hd + d], k_s[lane * hdp + d], dot);
      score = dot * a.scale;
      if (kPerturb) score -= a.scale * (r1 * c1_s[lane] + r2 * c2_s[lane]);
    }
    const float m_new = fmaxf(m, warp_max(score));
    if (m_new == -INFINITY) continue;  // no visible key for this row yet (the same for every lane)
    const float alpha = expf(m - m_new);
    const float p = visible ? expf(score - m_new) : 0.f;
    l = l * alpha + warp_sum(p);
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) acc[i] *= alpha;
    for (int key = 0; key < kKeys; ++key) {
      const float pk = __shfl_sync(kFullMask, p, key);
      if (pk == 0.f) continue;  // a broadcast value: the whole warp skips together
#pragma unroll
      for (int i = 0; i < kMaxDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < hd) acc[i] = fmaf(pk, v_s[key * hd + d], acc[i]);
      }
    }
    m = m_new;
  }
  if (!row_valid) return;
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d >= hd) continue;
    float o = acc[i] / l;  // every valid row sees at least its own key: l > 0
    if (kPerturb) o -= a.base[(static_cast<int64_t>(h) * a.tokens + t) * hd + d];
    a.out[((static_cast<int64_t>(j) * a.heads + h) * a.tokens + t) * hd + d] = o;
  }
}

}  // namespace

void ablated_attention(std::uintptr_t qr, std::uintptr_t kr, std::uintptr_t v, std::uintptr_t r1,
                       std::uintptr_t r2, std::uintptr_t c1, std::uintptr_t c2, std::uintptr_t base,
                       std::uintptr_t out, std::uintptr_t tile_start, std::uintptr_t tile_end,
                       std::uintptr_t tile_key_lo, int64_t n_tiles, int64_t tokens, int heads, int kv_heads,
                       int head_dim, int n_rep, int chunk, float scale, int window, bool perturb,
                       std::uintptr_t stream) {
  if (head_dim < 1 || head_dim > 32 * kMaxDimsPerLane) {
    throw std::invalid_argument("ablated_attention: head_dim must be in [1, 256]");
  }
  if (n_tiles < 1 || heads < 1 || kv_heads < 1 || n_rep < 1 || heads != kv_heads * n_rep || chunk < 1 ||
      chunk > 65535 || heads > 65535) {
    throw std::invalid_argument("ablated_attention: inconsistent heads / kv_heads / n_rep / chunk");
  }
  for (auto [ptr, name] : {std::pair{qr, "qr"}, {kr, "kr"}, {v, "v"}, {out, "out"}, {tile_start, "tile_start"},
                           {tile_end, "tile_end"}, {tile_key_lo, "tile_key_lo"}}) {
    require_device_pointer(ptr, name);
  }
  if (perturb) {
    for (auto [ptr, name] : {std::pair{r1, "r1"}, {r2, "r2"}, {c1, "c1"}, {c2, "c2"}, {base, "base"}}) {
      require_device_pointer(ptr, name);
    }
  }
  AttentionArgs args{reinterpret_cast<const float*>(qr), reinterpret_cast<const float*>(kr),
                     reinterpret_cast<const float*>(v), reinterpret_cast<const float*>(r1),
                     reinterpret_cast<const float*>(r2), reinterpret_cast<const float*>(c1),
                     reinterpret_cast<const float*>(c2), reinterpret_cast<const float*>(base),
                     reinterpret_cast<float*>(out), reinterpret_cast<const int32_t*>(tile_start),
                     reinterpret_cast<const int32_t*>(tile_end), reinterpret_cast<const int32_t*>(tile_key_lo),
                     tokens, heads, kv_heads, head_dim, n_rep, chunk, window, scale};
  const size_t bytes = shared_bytes(head_dim);
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(heads), static_cast<unsigned>(chunk));
  const dim3 block(kAttentionRows * 32);
  auto launch = [&](auto kernel) {
    if (bytes > 48 * 1024) {  // above the default limit: opt in (Ampere and Hopper allow far more)
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
            "cudaFuncSetAttribute");
    }
    kernel<<<grid, block, bytes, as_stream(stream)>>>(args);
    check_launch("ablated_attention_kernel");
  };
  if (perturb) {
    launch(ablated_attention_kernel<true>);
  } else {
    launch(ablated_attention_kernel<false>);
  }
}

}  // namespace cusprun
