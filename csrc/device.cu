// Device checks shared by the launchers: a clear error instead of a crash when no GPU is present or a
// pointer is not device memory.
#include <string>

#include "common.cuh"
#include "kernels.h"

namespace cusprun {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error so later calls report afresh
    return 0;
  }
  return count;
}

int runtime_version() { return CUDART_VERSION; }

void require_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cusprun CUDA: no CUDA device is available (") +
                             (status != cudaSuccess ? cudaGetErrorName(status) : "0 devices") + ")");
  }
}

void require_device_pointer(std::uintptr_t ptr, const char* name) {
  require_device();
  cudaPointerAttributes attr{};
  check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)), name);
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument(std::string("cusprun CUDA: ") + name + " is not in CUDA device memory");
  }
}

void require_compute_capability(int major, const char* what) {
  int device = 0, have = 0, minor = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&have, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  if (have < major) {
    throw std::runtime_error(std::string("cusprun CUDA: ") + what + " needs compute capability " +
                             std::to_string(major) + ".0 or newer; device " + std::to_string(device) + " is " +
                             std::to_string(have) + "." + std::to_string(minor));
  }
}

}  // namespace cusprun
