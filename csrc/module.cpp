// fastflow._C: build facts for the backend dispatcher and the CPU kernels (one file per op family).
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <atomic>
#include <stdexcept>
#include <string>

#include "spline_blocked.h"

namespace py = pybind11;

void bind_spline(py::module_& m);

namespace {

std::atomic<int> g_kernel_threads{0};  // 0: not set, OpenMP's default

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = fastflow::kernel_threads();
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
  g_kernel_threads.store(n, std::memory_order_relaxed);  // for every thread's kernels (`kernel_threads`)
}

int kernel_region_threads() {
  int team = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(fastflow::kernel_threads())
  {
#pragma omp single
    team = omp_get_num_threads();
  }
#endif
  return team;
}

}  // namespace

int fastflow::kernel_threads() {
  const int n = g_kernel_threads.load(std::memory_order_relaxed);
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  return n > 0 ? n : 1;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastflow C++/OpenMP kernels";
  m.def("build_info", &build_info, "How this module was built: OpenMP, its thread count, compiler, version.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Set the OpenMP thread count of the kernels, for calls from every thread.");
  m.def("kernel_region_threads", &kernel_region_threads,
        "The threads of a kernel's parallel region started from the calling thread (1 without OpenMP).");
  bind_spline(m);
}
