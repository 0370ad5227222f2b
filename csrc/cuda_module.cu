// fastflow._C_cuda: CUDA side of the extension. Links the CUDA runtime statically, so it imports
// wherever a driver exists, and reports zero devices (never throws) where none does.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

namespace {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error
    return 0;
  }
  return count;
}

py::dict build_info() {
  py::dict info;
  info["cuda_runtime_version"] = CUDART_VERSION;
  info["version"] = std::string(FASTFLOW_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastflow CUDA kernels";
  m.def("cuda_device_count", &cuda_device_count, "Number of visible CUDA devices (0 without a driver).");
  m.def("build_info", &build_info, "CUDA runtime version this module was compiled against.");
}
