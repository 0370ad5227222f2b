// fastflow._C: build facts for the backend dispatcher and the CPU kernels (one file per op family).
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <string>

namespace py = pybind11;

void bind_spline(py::module_& m);

namespace {

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["version"] = std::string(FASTFLOW_VERSION);
  return info;
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1");
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastflow C++/OpenMP kernels";
  m.def("build_info", &build_info, "How this module was built: OpenMP, its thread count, compiler, version.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Set the OpenMP thread count of the kernels.");
  bind_spline(m);
}
