// Exact attention with one removed q or k row per program, on tensor cores: the kernel behind
// qk_row_ablation (cusprun_kernels/qk_ablation.py holds the torch reference and the Triton twin).
//
// A block owns kAttentionRows = 64 query rows of one document (4 warps x 16 rows), one query head h and
// one ablated dimension j of the chunk. It streams the key tiles its rows can see (the causal or sliding-
// window band of its own document) through shared memory, 32 keys at a time, and per warp computes
//   S = Q K^T (16 x 32) with mma.sync m16n8k8 TF32,  the rank-2 perturbation and the band mask on the
//   accumulator fragments,  an online softmax over the fragments' rows,  O += P V (16 x head_dim), mma again.
// P goes through a warp-private shared-memory tile because the accumulator layout of one mma is not the
// operand layout of the next. Nothing of size L x L is stored.
//
// Precision: float32-accurate "3xTF32". Every operand x is split x = hi + lo with hi = tf32(x) and
// lo = tf32(x - hi); a product takes hi*hi + hi*lo + lo*hi (the lo*lo term is below float32 rounding),
// which keeps about 21 bits where plain TF32 keeps 10. That matters here: an ablation delta is a small
// difference of two softmax outputs. The unperturbed output comes from this same kernel (kPerturb = false)
// with the identical tiles and mma order, so the rounding of Q K^T cancels exactly in the difference; the
// perturbation and the softmax run in IEEE float32 (expf, no fast math) on CUDA cores.
#include <cmath>
#include <string>

#include "common.cuh"
#include "kernels.h"
#include "tensor_core.cuh"

namespace cusprun {
namespace {

constexpr int kWarps = 4;
constexpr int kWarpRows = 16;  // the M of one mma: the query rows of a warp
static_assert(kWarps * kWarpRows == kAttentionRows, "a block's rows are its warps' rows");
constexpr int kKeys = 32;             // keys per shared-memory tile: 4 n-tiles of S, 4 k-steps of P V
constexpr int kKeyTiles = kKeys / 8;
constexpr int kPStride = kKeys + 4;   // = 4 (mod 8): A-fragment reads of P hit 32 distinct banks
constexpr int kMaxHeadDim = 256;
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

// Shared-memory geometry for a head_dim padded to a multiple of 8 (the k of an mma; pads are zeros).
struct Layout {
  int hdp;       // padded head_dim
  int qk_stride; // rows of Q and K: = 4 (mod 8), so A- and B-fragment reads (8 rows x 4 columns) are conflict-free
  int v_stride;  // rows of V: = 8 (mod 32), so B-fragment reads (4 rows x 8 columns) are conflict-free
  __host__ __device__ explicit Layout(int head_dim)
      : hdp((head_dim + 7) / 8 * 8), qk_stride(hdp + 4), v_stride((hdp + 23) / 32 * 32 + 8) {}
  __host__ __device__ size_t floats() const {
    return static_cast<size_t>(kAttentionRows + kKeys) * qk_stride + static_cast<size_t>(kKeys) * v_stride +
           kWarps * kWarpRows * kPStride + 2 * kKeys;
  }
};

__device__ __forceinline__ float quad_max(float x) {  // over the 4 lanes holding one row of a fragment
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// kDimTiles: head_dim / 8 rounded up to a size class (8, 16 or 32), so the output accumulator is a
// fully unrolled register array; tiles past the real head_dim are skipped at run time.
template <bool kPerturb, int kDimTiles>
__global__ void __launch_bounds__(kWarps * 32) ablated_attention_kernel(AttentionArgs a) {
  extern __shared__ float smem[];
  const Layout lay(a.head_dim);
  const int hd = a.head_dim, hdp = lay.hdp, qs = lay.qk_stride, vs = lay.v_stride;
  const int dim_tiles = hdp / 8;
  float* q_s = smem;                         // [kAttentionRows][qs]
  float* k_s = q_s + kAttentionRows * qs;    // [kKeys][qs]
  float* v_s = k_s + kKeys * qs;             // [kKeys][vs]
  float* p_s = v_s + kKeys * vs;             // [kWarps][kWarpRows][kPStride]
  float* c1_s = p_s + kWarps * kWarpRows * kPStride;
  float* c2_s = c1_s + kKeys;

  const int tile = blockIdx.x, h = blockIdx.y, j = blockIdx.z;
  const int g = h / a.n_rep;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const int m0 = a.tile_start[tile], m1 = a.tile_end[tile], lo = a.tile_key_lo[tile];
  const int warp_first = m0 + warp * kWarpRows;                  // the warp's rows: [warp_first, warp_last]
  const int warp_last = min(m1, warp_first + kWarpRows) - 1;     // < warp_first when the warp has none
  const int rows[2] = {warp_first + group, warp_first + group + 8};  // the two rows this lane holds

  for (int i = threadIdx.x; i < kAttentionRows * hdp; i += blockDim.x) {
    const int r = i / hdp, d = i % hdp, row = m0 + r;
    q_s[r * qs + d] = row < m1 && d < hd ? a.qr[(static_cast<int64_t>(row) * a.heads + h) * hd + d] : 0.f;
  }
  float r1[2] = {0.f, 0.f}, r2[2] = {0.f, 0.f};
  if (kPerturb) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (rows[e] < m1) {
        const int64_t at = (static_cast<int64_t>(rows[e]) * a.heads + h) * a.chunk + j;
        r1[e] = a.r1[at];
        r2[e] = a.r2[at];
      }
    }
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kDimTiles][4];
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  const float* q_w = q_s + warp * kWarpRows * qs;
  float* p_w = p_s + warp * kWarpRows * kPStride;

  // Loop bounds are the same for every thread of the block, so every thread reaches every barrier.
  for (int s0 = lo; s0 < m1; s0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and q_s is written, on the first pass)
    for (int i = threadIdx.x; i < kKeys * hdp; i += blockDim.x) {
      const int r = i / hdp, d = i % hdp, s = s0 + r;
      const bool in = s < m1 && d < hd;
      const int64_t at = (static_cast<int64_t>(s) * a.kv_heads + g) * hd + d;
      k_s[r * qs + d] = in ? a.kr[at] : 0.f;
      v_s[r * vs + d] = in ? a.v[at] : 0.f;
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
    // Warp-uniform skips, each a no-op of the online softmax: no rows, every key in the future of every
    // row, or every key older than the window of every row.
    if (warp_last < warp_first || s0 > warp_last) continue;
    if (a.window > 0 && warp_first - (s0 + kKeys - 1) >= a.window) continue;

    float s[kKeyTiles][4];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    for (int k0 = 0; k0 < hdp; k0 += 8) {
      float qa[4];
      load_a(qa, q_w, qs, k0, group, quad);
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        const float kb[2] = {k_s[(n * 8 + group) * qs + k0 + quad], k_s[(n * 8 + group) * qs + k0 + quad + 4]};
        mma_3xtf32(s[n], qa, kb);
      }
    }
    // Scores, perturbation and band mask on the accumulator: element e of key tile n sits at row
    // rows[e / 2], key s0 + 8 n + 2 quad + e % 2.
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = rows[e / 2], col = n * 8 + 2 * quad + e % 2, key = s0 + col;
        const bool visible = t < m1 && key < m1 && key <= t && (a.window <= 0 || t - key < a.window);
        float score = -INFINITY;
        if (visible) {
          // Explicitly rounded operations: a plain `s * scale - scale * x` lets ptxas contract the first
          // product into an FFMA in the perturbed pass only, so S would round differently from the
          // unperturbed pass and every delta would carry ~1/2 ulp of |S| of noise.
          score = __fmul_rn(s[n][e], a.scale);
          if (kPerturb) {
            const float delta = __fmaf_rn(r1[e / 2], c1_s[col], __fmul_rn(r2[e / 2], c2_s[col]));
            score = __fsub_rn(score, __fmul_rn(a.scale, delta));
          }
        }
        s[n][e] = score;
        row_max[e / 2] = fmaxf(row_max[e / 2], score);
      }
    }
    float alpha[2], row_sum[2] = {0.f, 0.f}, m_safe[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m[r], quad_max(row_max[r]));
      m_safe[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no visible key yet keeps p = 0
      alpha[r] = expf(m[r] - m_safe[r]);
      m[r] = m_new;
    }
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = s[n][e] == -INFINITY ? 0.f : expf(s[n][e] - m_safe[e / 2]);
        row_sum[e / 2] += p;
        p_w[(group + 8 * (e / 2)) * kPStride + n * 8 + 2 * quad + e % 2] = p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + quad_sum(row_sum[r]);
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    __syncwarp();  // P is written by the lanes of the C layout and read by those of the A layout
#pragma unroll
    for (int k = 0; k < kKeyTiles; ++k) {
      float pa[4];
      load_a(pa, p_w, kPStride, k * 8, group, quad);
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        if (n >= dim_tiles) break;
        const float vb[2] = {v_s[(k * 8 + quad) * vs + n * 8 + group], v_s[(k * 8 + quad + 4) * vs + n * 8 + group]};
        mma_3xtf32(o[n], pa, vb);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int t = rows[e / 2];
    if (t >= m1) continue;
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      const int d = n * 8 + 2 * quad + e % 2;
      if (d >= hd) continue;
      float out = __fdiv_rn(o[n][e], l[e / 2]);  // every valid row sees at least its own key: l > 0
      if (kPerturb) out = __fsub_rn(out, a.base[(static_cast<int64_t>(h) * a.tokens + t) * hd + d]);
      a.out[((static_cast<int64_t>(j) * a.heads + h) * a.tokens + t) * hd + d] = out;
    }
  }
}

template <bool kPerturb>
void launch_for_head_dim(const AttentionArgs& args, dim3 grid, size_t bytes, int device, cudaStream_t stream) {
  int allowed = 0;
  check(cudaDeviceGetAttribute(&allowed, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  if (bytes > static_cast<size_t>(allowed)) {  // e.g. head_dim 256 (143,104 B) on sm_86 / sm_89 (101,376 B)
    throw std::invalid_argument("ablated_attention: head_dim " + std::to_string(args.head_dim) + " needs " +
                                std::to_string(bytes) + " B of shared memory per block; device " +
                                std::to_string(device) + " allows " + std::to_string(allowed) + " B");
  }
  auto launch = [&](auto kernel) {
    if (bytes > 48 * 1024) {  // above the default limit: opt in (Ampere and Hopper allow far more)
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
            "cudaFuncSetAttribute");
    }
    kernel<<<grid, kWarps * 32, bytes, stream>>>(args);
    check_launch("ablated_attention_kernel");
  };
  const int dim_tiles = Layout(args.head_dim).hdp / 8;
  if (dim_tiles <= 8) {
    launch(ablated_attention_kernel<kPerturb, 8>);
  } else if (dim_tiles <= 16) {
    launch(ablated_attention_kernel<kPerturb, 16>);
  } else {
    launch(ablated_attention_kernel<kPerturb, kMaxHeadDim / 8>);
  }
}

}  // namespace

size_t ablated_attention_shared_bytes(int head_dim) { return sizeof(float) * Layout(head_dim).floats(); }

void ablated_attention(std::uintptr_t qr, std::uintptr_t kr, std::uintptr_t v, std::uintptr_t r1,
                       std::uintptr_t r2, std::uintptr_t c1, std::uintptr_t c2, std::uintptr_t base,
                       std::uintptr_t out, std::uintptr_t tile_start, std::uintptr_t tile_end,
                       std::uintptr_t tile_key_lo, int64_t n_tiles, int64_t tokens, int heads, int kv_heads,
                       int head_dim, int n_rep, int chunk, float scale, int window, bool perturb,
                       int device, std::uintptr_t stream) {
  if (head_dim < 1 || head_dim > kMaxHeadDim) {
    throw std::invalid_argument("ablated_attention: head_dim must be in [1, 256]");
  }
  if (n_tiles < 1 || heads < 1 || kv_heads < 1 || n_rep < 1 || heads != kv_heads * n_rep || chunk < 1 ||
      chunk > 65535 || heads > 65535) {
    throw std::invalid_argument("ablated_attention: inconsistent heads / kv_heads / n_rep / chunk");
  }
  for (auto [ptr, name] : {std::pair{qr, "qr"}, {kr, "kr"}, {v, "v"}, {out, "out"}, {tile_start, "tile_start"},
                           {tile_end, "tile_end"}, {tile_key_lo, "tile_key_lo"}}) {
    require_device_pointer(ptr, name, device);
  }
  if (perturb) {
    for (auto [ptr, name] : {std::pair{r1, "r1"}, {r2, "r2"}, {c1, "c1"}, {c2, "c2"}, {base, "base"}}) {
      require_device_pointer(ptr, name, device);
    }
  }
  require_compute_capability(8, "ablated_attention (mma.sync TF32)", device);
  const DeviceGuard guard(device);
  AttentionArgs args{reinterpret_cast<const float*>(qr), reinterpret_cast<const float*>(kr),
                     reinterpret_cast<const float*>(v), reinterpret_cast<const float*>(r1),
                     reinterpret_cast<const float*>(r2), reinterpret_cast<const float*>(c1),
                     reinterpret_cast<const float*>(c2), reinterpret_cast<const float*>(base),
                     reinterpret_cast<float*>(out), reinterpret_cast<const int32_t*>(tile_start),
                     reinterpret_cast<const int32_t*>(tile_end), reinterpret_cast<const int32_t*>(tile_key_lo),
                     tokens, heads, kv_heads, head_dim, n_rep, chunk, window, scale};
  const size_t bytes = ablated_attention_shared_bytes(head_dim);
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(heads), static_cast<unsigned>(chunk));
  if (perturb) {
    launch_for_head_dim<true>(args, grid, bytes, device, as_stream(stream));
  } else {
    launch_for_head_dim<false>(args, grid, bytes, device, as_stream(stream));
  }
}

}  // namespace cusprun
