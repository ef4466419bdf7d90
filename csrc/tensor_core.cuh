// Tensor-core building blocks shared by the CUDA kernels: mma.sync m16n8k8 TF32 and its float32-accurate
// 3xTF32 form (compute capability 8.0 or newer).
//
// Fragment layouts of mma.m16n8k8 .tf32 (PTX ISA), lane = 4 * group + quad:
//   A 16x8 (row-major): a0 (group, quad), a1 (group + 8, quad), a2 (group, quad + 4), a3 (group + 8, quad + 4)
//   B 8x8 (k x n, "col"): b0 (k = quad, n = group), b1 (k = quad + 4, n = group)
//   C 16x8:              c0 (group, 2 quad), c1 (group, 2 quad + 1), c2 (group + 8, 2 quad), c3 (group + 8, 2 quad + 1)
#pragma once

#include <cstdint>

namespace cusprun {

__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(hi) : "f"(x));
  const float rest = x - __uint_as_float(hi);  // exact in float32
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(lo) : "f"(rest));
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a b in 3xTF32; the small cross terms go first so they are not lost against the large one.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  uint32_t a_hi[4], a_lo[4], b_hi[2], b_lo[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) split_tf32(a[i], a_hi[i], a_lo[i]);
#pragma unroll
  for (int i = 0; i < 2; ++i) split_tf32(b[i], b_hi[i], b_lo[i]);
  mma_tf32(d, a_lo, b_hi);
  mma_tf32(d, a_hi, b_lo);
  mma_tf32(d, a_hi, b_hi);
}

// d += a b for operands that TF32 holds exactly (widened float16 or bfloat16 values: 11 and 8 significant
// bits, the low 13 bits of the float32 mantissa are zero), so one mma is exact in the products.
__device__ __forceinline__ void mma_exact_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  const uint32_t ai[4] = {__float_as_uint(a[0]), __float_as_uint(a[1]), __float_as_uint(a[2]), __float_as_uint(a[3])};
  const uint32_t bi[2] = {__float_as_uint(b[0]), __float_as_uint(b[1])};
  mma_tf32(d, ai, bi);
}

// The A fragment of the 16 x 8 block at (row 0, column k0) of a row-major tile with the given stride.
__device__ __forceinline__ void load_a(float (&a)[4], const float* tile, int stride, int k0, int group, int quad) {
  a[0] = tile[group * stride + k0 + quad];
  a[1] = tile[(group + 8) * stride + k0 + quad];
  a[2] = tile[group * stride + k0 + quad + 4];
  a[3] = tile[(group + 8) * stride + k0 + quad + 4];
}

}  // namespace cusprun
