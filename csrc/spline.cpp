// Rational-quadratic spline (Durkan et al. 2019) on [-B, B] with identity tails: bindings of the
// forward/inverse with log|det J| and of the backward pass w.r.t. inputs and the raw (unnormalized)
// parameters, run by the blocked, vectorized kernels of spline_blocked.inc for the best instruction set.
// Mirrors fastflow/ops/spline.py::rq_spline_ref exactly (same parametrization and constants).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "spline_blocked.h"
#include "spline_math.h"

namespace py = pybind11;

namespace {

using namespace fastflow_spline;

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("rq_spline: " + message);
}

template <typename T>
int bins_of(const Array<T>& x, const Array<T>& params) {
  check(params.ndim() == 2, "params must be (n, 3K-1)");
  check(x.ndim() == 1 && x.shape(0) == params.shape(0), "inputs must be (n,) matching params (n, 3K-1)");
  check((params.shape(1) + 1) % 3 == 0, "params' last dimension must be 3K-1");
  const int K = static_cast<int>((params.shape(1) + 1) / 3);
  check(K >= 1 && K <= kMaxBins, "number of bins must be in [1, 128]");
  return K;
}

// The instruction sets the blocked kernels were compiled for, best first, that this CPU runs.
std::vector<std::string> cpu_isas() {
  std::vector<std::string> isas;
#ifdef FASTFLOW_HAVE_X86_64_V3
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("x86_64_v3");
#endif
  isas.push_back("generic");
  return isas;
}

// "auto": the best instruction set this CPU runs; otherwise the one named, when available.
std::string chosen_isa(const std::string& isa) {
  const std::vector<std::string> isas = cpu_isas();
  const std::string chosen = isa == "auto" ? isas.front() : isa;
  check(std::find(isas.begin(), isas.end(), chosen) != isas.end(), "instruction set '" + isa + "' is not available");
  return chosen;
}

template <typename T>
void forward(Array<T> x, Array<T> params, Array<T> out, Array<T> ladj, double bound, bool inverse, double shift,
             const std::string& isa) {
  const int K = bins_of(x, params);
  check(out.size() == x.size() && ladj.size() == x.size(), "output buffers must match inputs");
  const std::string chosen = chosen_isa(isa);
  const int64_t n = x.shape(0);
  const T* px = x.data();
  const T* pp = params.data();
  T* po = out.mutable_data();
  T* pl = ladj.mutable_data();
  py::gil_scoped_release release;
#ifdef FASTFLOW_HAVE_X86_64_V3
  if (chosen == "x86_64_v3") return x86_64_v3::forward(px, pp, po, pl, n, K, T(bound), inverse, T(shift));
#endif
  generic::forward(px, pp, po, pl, n, K, T(bound), inverse, T(shift));
}

template <typename T>
void forward_rows(Array<T> x, Array<T> params, Array<T> out, Array<T> row_ladj, int num_bins, double bound, bool inverse,
                  double shift, const std::string& isa) {
  check(num_bins >= 1 && num_bins <= kMaxBins, "number of bins must be in [1, 128]");
  check(x.ndim() == 2 && params.ndim() == 2 && params.shape(0) == x.shape(0),
        "rows: x must be (rows, count) and params (rows, row_stride)");
  const int64_t rows = x.shape(0), count = x.shape(1), row_stride = params.shape(1);
  check(count * (3 * num_bins - 1) <= row_stride, "rows: params' rows must hold count * (3K-1) values");
  check(out.ndim() == 2 && out.shape(0) == rows && out.shape(1) == count, "rows: out must match x");
  check(row_ladj.ndim() == 1 && row_ladj.shape(0) == rows, "rows: ladj must be (rows,)");
  const std::string chosen = chosen_isa(isa);
  const T *px = x.data(), *pp = params.data();
  T* po = out.mutable_data();
  T* pl = row_ladj.mutable_data();
  py::gil_scoped_release release;
#ifdef FASTFLOW_HAVE_X86_64_V3
  if (chosen == "x86_64_v3")
    return x86_64_v3::forward_rows(px, pp, po, pl, rows, count, row_stride, num_bins, T(bound), inverse, T(shift));
#endif
  generic::forward_rows(px, pp, po, pl, rows, count, row_stride, num_bins, T(bound), inverse, T(shift));
}

template <typename T>
void backward(Array<T> x, Array<T> params, Array<T> grad_out, Array<T> grad_ladj, Array<T> grad_x, Array<T> grad_params,
              double bound, bool inverse, double shift, const std::string& isa) {
  const int K = bins_of(x, params);
  check(grad_out.size() == x.size() && grad_ladj.size() == x.size() && grad_x.size() == x.size(),
        "gradient buffers must match inputs");
  check(grad_params.size() == params.size(), "grad_params must match params");
  const std::string chosen = chosen_isa(isa);
  const int64_t n = x.shape(0);
  const T *px = x.data(), *pp = params.data(), *pgo = grad_out.data(), *pgl = grad_ladj.data();
  T* pgx = grad_x.mutable_data();
  T* pgp = grad_params.mutable_data();
  py::gil_scoped_release release;
#ifdef FASTFLOW_HAVE_X86_64_V3
  if (chosen == "x86_64_v3") return x86_64_v3::backward(px, pp, pgo, pgl, pgx, pgp, n, K, T(bound), inverse, T(shift));
#endif
  generic::backward(px, pp, pgo, pgl, pgx, pgp, n, K, T(bound), inverse, T(shift));
}

}  // namespace

void bind_spline(py::module_& m) {
  m.def("spline_isas", &cpu_isas, "Instruction sets of the blocked spline kernels that this CPU runs, best first.");
  const char* fwd_doc =
      "rq_spline_forward(x (n,), params (n, 3K-1), out (n,), ladj (n,), bound, inverse, derivative_shift, isa='auto'): "
      "isa is 'auto' (the best of spline_isas()) or one of spline_isas()";
  const char* bwd_doc =
      "rq_spline_backward(x, params, grad_out, grad_ladj, grad_x, grad_params, bound, inverse, derivative_shift, "
      "isa='auto')";
  m.def("rq_spline_forward", &forward<float>, fwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("out").noconvert(), py::arg("ladj").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"), py::arg("isa") = "auto");
  m.def("rq_spline_forward", &forward<double>, fwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("out").noconvert(), py::arg("ladj").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"), py::arg("isa") = "auto");
  const char* rows_doc =
      "rq_spline_rows_forward(x (rows, count), params (rows, row_stride), out (rows, count), ladj (rows,), num_bins, "
      "bound, inverse, derivative_shift, isa='auto'): a coupling layer's spline; row r's count parameter vectors "
      "(3K-1 each) lead params' row r, and ladj gets each row's sum of log|det J|";
  m.def("rq_spline_rows_forward", &forward_rows<float>, rows_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("out").noconvert(), py::arg("ladj").noconvert(), py::arg("num_bins"), py::arg("bound"), py::arg("inverse"),
        py::arg("derivative_shift"), py::arg("isa") = "auto");
  m.def("rq_spline_rows_forward", &forward_rows<double>, rows_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("out").noconvert(), py::arg("ladj").noconvert(), py::arg("num_bins"), py::arg("bound"), py::arg("inverse"),
        py::arg("derivative_shift"), py::arg("isa") = "auto");
  m.def("rq_spline_backward", &backward<float>, bwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("grad_out").noconvert(), py::arg("grad_ladj").noconvert(), py::arg("grad_x").noconvert(),
        py::arg("grad_params").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"),
        py::arg("isa") = "auto");
  m.def("rq_spline_backward", &backward<double>, bwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("grad_out").noconvert(), py::arg("grad_ladj").noconvert(), py::arg("grad_x").noconvert(),
        py::arg("grad_params").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"),
        py::arg("isa") = "auto");
}
