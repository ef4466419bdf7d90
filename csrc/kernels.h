// Host entry points of the CUDA kernels (plain types only: bindings.cpp needs no CUDA headers).
//
// Every function takes device pointers as integers (torch's Tensor.data_ptr()), shapes, strides, the
// device the pointers live on and that device's CUDA stream to launch on
// (torch.cuda.current_stream(device).cuda_stream); it makes that device current for its launches, checks
// that every pointer lives there, checks every launch, and throws std::runtime_error /
// std::invalid_argument with the reason.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cusprun {

// out [n_docs, features] float32 = per-document sums over tokens of x[t, f]^2; x [tokens, features] with
// strides (stride_t, stride_f) in elements and dtype 0 float32, 1 float16, 2 bfloat16; offsets int64 [n_docs + 1].
void segment_sum_sq(std::uintptr_t x, int dtype, int64_t tokens, int64_t features, int64_t stride_t,
                    int64_t stride_f, std::uintptr_t offsets, int64_t n_docs, std::uintptr_t out,
                    int device, std::uintptr_t stream);

// The fused projection + energies pass (tensor cores, compute capability 8.0 or newer): y = x w^T (+ bias) in
// the dtype of x, w, bias and y (0 float32, 1 float16, 2 bfloat16; any strides, in elements); per row tile
// (int32 [n_tiles], at most kProjectionRows rows of one document) row_part [n_tiles, n] float32 = sums over the
// tile's rows of y^2 (y as stored) and col_part [n_tiles, k] float32 = sums of x^2. bias = 0: no bias.
void projection_energy(std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y, int dtype,
                       int64_t k, int64_t n, int64_t stride_xm, int64_t stride_xk, int64_t stride_wn,
                       int64_t stride_wk, int64_t stride_ym, int64_t stride_yn, std::uintptr_t row_part,
                       std::uintptr_t col_part, std::uintptr_t tile_start, std::uintptr_t tile_end, int64_t n_tiles,
                       int device, std::uintptr_t stream);

// Rows per tile that projection_energy expects (4 warps x 16 rows).
constexpr int kProjectionRows = 64;

// One flash-style causal attention pass per (query tile, query head h, ablated dimension j < chunk), with the
// scores perturbed by the rank-2 term of the removed row (see cusprun_kernels/qk_ablation.py):
//   S[t, s] = scale * (qr[t, h] . kr[s, g] - (r1[t, h, j] * c1[s, g, j] + r2[t, h, j] * c2[s, g, j]))
// out [chunk, heads, tokens, head_dim] = softmax(S) v - base (base [heads, tokens, head_dim]); perturb = false
// gives the unperturbed output itself (chunk 1). All float32, contiguous; tensor cores (mma.sync TF32, split to
// float32 accuracy), so compute capability 8.0 or newer. Tiles (int32 [n_tiles]) never span
// two documents; each tile's rows see keys [key_lo, row] (and row - key < window when window > 0).
void ablated_attention(std::uintptr_t qr, std::uintptr_t kr, std::uintptr_t v, std::uintptr_t r1,
                       std::uintptr_t r2, std::uintptr_t c1, std::uintptr_t c2, std::uintptr_t base,
                       std::uintptr_t out, std::uintptr_t tile_start, std::uintptr_t tile_end,
                       std::uintptr_t tile_key_lo, int64_t n_tiles, int64_t tokens, int heads, int kv_heads,
                       int head_dim, int n_rep, int chunk, float scale, int window, bool perturb,
                       int device, std::uintptr_t stream);

// Dynamic shared memory (bytes) one block of ablated_attention uses at this head_dim (checked against the
// device's opt-in limit before launch).
size_t ablated_attention_shared_bytes(int head_dim);

// Rows of queries per tile that ablated_attention expects (4 warps x 16 rows, the M of an mma).
constexpr int kAttentionRows = 64;

// Bumped whenever an entry point's signature changes (cusprun_kernels/cuda_ext.py expects this one).
constexpr int kInterfaceVersion = 2;

int device_count();           // 0 where the driver finds no GPU
int runtime_version();        // CUDART_VERSION the module was built with
int driver_version();         // the CUDA version the installed driver supports (0: no driver)
void require_device();        // throws the reason when no CUDA device is usable

}  // namespace cusprun
