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

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return version;  // 0 where no driver is installed
}

namespace {
std::string cuda_version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }
}  // namespace

void require_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaSuccess && count > 0) return;
  cudaGetLastError();
  const int driver = driver_version();
  if (driver > 0 && driver < CUDART_VERSION) {  // the runtime is linked statically: the driver must be as new
    throw std::runtime_error("cusprun CUDA: the NVIDIA driver supports CUDA " + cuda_version_text(driver) +
                             ", older than the CUDA " + cuda_version_text(CUDART_VERSION) +
                             " runtime this extension was built with; update the driver or rebuild with an older "
                             "CUDA toolkit");
  }
  throw std::runtime_error(std::string("cusprun CUDA: no CUDA device is available (") +
                           (status != cudaSuccess ? cudaGetErrorName(status) : "0 devices") + ")");
}

void require_device_pointer(std::uintptr_t ptr, const char* name, int device) {
  require_device();
  cudaPointerAttributes attr{};
  check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)), name);
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument(std::string("cusprun CUDA: ") + name + " is not in CUDA device memory");
  }
  if (attr.type == cudaMemoryTypeDevice && attr.device != device) {
    throw std::invalid_argument(std::string("cusprun CUDA: ") + name + " is on cuda:" + std::to_string(attr.device) +
                                ", but the kernel is launched on cuda:" + std::to_string(device));
  }
}

void require_compute_capability(int major, const char* what, int device) {
  int have = 0, minor = 0;
  check(cudaDeviceGetAttribute(&have, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  if (have < major) {
    throw std::runtime_error(std::string("cusprun CUDA: ") + what + " needs compute capability " +
                             std::to_string(major) + ".0 or newer; device " + std::to_string(device) + " is " +
                             std::to_string(have) + "." + std::to_string(minor));
  }
}

DeviceGuard::DeviceGuard(int device) {
  check(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

}  // namespace cusprun
