// pybind11 module cusprun_kernels._cuda: the CUDA kernels' host entry points (see kernels.h).
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "cusprun CUDA C++ kernels: device pointers, shapes, strides and a CUDA stream in; errors raise.";
  m.def("segment_sum_sq", &cusprun::segment_sum_sq, py::arg("x"), py::arg("dtype"), py::arg("tokens"),
        py::arg("features"), py::arg("stride_t"), py::arg("stride_f"), py::arg("offsets"), py::arg("n_docs"),
        py::arg("out"), py::arg("device"), py::arg("stream"),
        "out[d, f] = sum over document d's tokens of x[t, f]^2 (float32; x float32, float16 or bfloat16)");
  m.def("projection_energy", &cusprun::projection_energy, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"),
        py::arg("dtype"), py::arg("k"), py::arg("n"), py::arg("stride_xm"), py::arg("stride_xk"),
        py::arg("stride_wn"), py::arg("stride_wk"), py::arg("stride_ym"), py::arg("stride_yn"),
        py::arg("row_part"), py::arg("col_part"), py::arg("tile_start"), py::arg("tile_end"), py::arg("n_tiles"),
        py::arg("device"), py::arg("stream"),
        "fused y = x w^T (+ bias) with per-row-tile sums of y^2 (row_part) and of x^2 (col_part), on tensor cores");
  m.def("ablated_attention", &cusprun::ablated_attention, py::arg("qr"), py::arg("kr"), py::arg("v"), py::arg("r1"),
        py::arg("r2"), py::arg("c1"), py::arg("c2"), py::arg("base"), py::arg("out"), py::arg("tile_start"),
        py::arg("tile_end"), py::arg("tile_key_lo"), py::arg("n_tiles"), py::arg("tokens"), py::arg("heads"),
        py::arg("kv_heads"), py::arg("head_dim"), py::arg("n_rep"), py::arg("chunk"), py::arg("scale"),
        py::arg("window"), py::arg("perturb"), py::arg("device"), py::arg("stream"),
        "flash-style causal attention with a rank-2 score perturbation per ablated dimension (float32)");
  m.def("ablated_attention_shared_bytes", &cusprun::ablated_attention_shared_bytes, py::arg("head_dim"),
        "dynamic shared memory (bytes) per block of ablated_attention at this head_dim");
  m.def("device_count", &cusprun::device_count, "CUDA devices the driver reports (0 without a GPU)");
  m.def("require_device", &cusprun::require_device, "raise RuntimeError naming why no CUDA device is usable");
  m.def("driver_version", &cusprun::driver_version, "the CUDA version the NVIDIA driver supports (0: no driver)");
  m.attr("cuda_runtime_version") = cusprun::runtime_version();
  // The Python launchers check this: a module built from other sources (e.g. left by an earlier editable
  // install) has other entry-point signatures and is refused instead of called wrongly.
  m.attr("interface_version") = cusprun::kInterfaceVersion;
  m.attr("attention_rows") = cusprun::kAttentionRows;
  m.attr("projection_rows") = cusprun::kProjectionRows;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
}
