// Shared by the CUDA kernels of cusprun: error checking that becomes a Python exception.
#pragma once

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

// Fails with the reason before any pointer is touched: no device, or a pointer that is not device memory.
void require_device_pointer(std::uintptr_t ptr, const char* name);

// Fails with the reason when the current device is older than compute capability major.minor.
void require_compute_capability(int major, const char* what);

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace cusprun
