// Shared by the CUDA kernels of cusprun: error checking that becomes a Python exception.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace cusprun {

// Every CUDA call and every launch is checked; pybind11 turns std::runtime_error into RuntimeError.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("cusprun CUDA: ") + what + ": " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
  }
}

// The launch itself and any asynchronous error already pending on the device.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Fails with the reason before any pointer is touched: no device, a pointer that is not device memory, or
// memory of another device than the one the kernel is launched on.
void require_device_pointer(std::uintptr_t ptr, const char* name, int device);

// Fails with the reason when `device` is older than compute capability major.0.
void require_compute_capability(int major, const char* what, int device);

// Makes `device` current for the launches of one entry point and restores the previous one after: a
// kernel runs on the current device, which must be the device of its pointers (and of its stream).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Element conversions of the three dtypes the kernels read and write (float32 arithmetic inside).
template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(T{}) with T the element type of a DType code, or throws naming `what`.
template <typename F>
void dispatch_dtype(int dtype, const char* what, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  throw std::invalid_argument(std::string(what) + ": dtype must be float32, float16 or bfloat16");
}

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace cusprun
