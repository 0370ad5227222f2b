// Rational-quadratic spline (Durkan et al. 2019) on [-B, B] with identity tails: the bindings of the
// forward/inverse with log|det J| (blocked and vectorized, spline_blocked.inc), and the backward pass
// w.r.t. inputs and the raw (unnormalized) parameters, per element in double.
// Mirrors fastflow/ops/spline.py::rq_spline_ref exactly (same parametrization and constants).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <algorithm>
#include <string>
#include <vector>

#include "spline_blocked.h"
#include "spline_math.h"

namespace py = pybind11;

namespace {

using namespace fastflow_spline;

// Knots and derivatives of one coordinate's spline, built from its 3K-1 raw parameters.
template <typename T>
struct Spline {
  int K;
  T bound;
  T sw[kMaxBins];      // softmax of raw widths
  T sh[kMaxBins];      // softmax of raw heights
  T X[kMaxBins + 1];   // x knots
  T Y[kMaxBins + 1];   // y knots
  T raw_derivatives[kMaxBins];  // interior derivative parameters, shifted; see derivative()

  static void softmax(const T* raw, int K, T* out) {
    T m = raw[0];
    for (int i = 1; i < K; ++i) m = raw[i] > m ? raw[i] : m;
#pragma omp simd
    for (int i = 0; i < K; ++i) out[i] = exp_nonpositive(raw[i] - m);
    T total = 0;
    for (int i = 0; i < K; ++i) total += out[i];
    const T inverse_total = T(1) / total;
#pragma omp simd
    for (int i = 0; i < K; ++i) out[i] *= inverse_total;
  }

  static void knots(const T* s, int K, T bound, T min_size, T* knot) {
    T cumulative = 0;
    knot[0] = -bound;
    for (int i = 0; i < K - 1; ++i) {
      cumulative += min_size + (T(1) - min_size * K) * s[i];
      knot[i + 1] = T(2) * bound * cumulative - bound;
    }
    knot[K] = bound;
  }

  template <typename S>
  Spline(const S* params, int K_, T bound_, T derivative_shift) : K(K_), bound(bound_) {
    T raw[2 * kMaxBins];
    for (int i = 0; i < 2 * K; ++i) raw[i] = T(params[i]);
    softmax(raw, K, sw);
    softmax(raw + K, K, sh);
    knots(sw, K, bound, T(kMinBinWidth), X);
    knots(sh, K, bound, T(kMinBinHeight), Y);
    for (int j = 1; j < K; ++j) raw_derivatives[j - 1] = T(params[2 * K + j - 1]) + derivative_shift;
  }

  // Derivative at knot j: 1 at the ends (linear tails), min + softplus(raw + shift) inside. Computed
  // on demand: an element only needs the two of its bin.
  T derivative(int j) const {
    return (j == 0 || j == K) ? T(1) : T(kMinDerivative) + softplus(raw_derivatives[j - 1]);
  }

  // Largest k in [0, K-1] with knot[k] <= v (torch.searchsorted(..., right=False) - 1, clamped).
  static int find_bin(const T* knot, int K, T v) {
    int lo = 0, hi = K;  // invariant: answer in [lo, hi)
    while (hi - lo > 1) {
      int mid = (lo + hi) / 2;
      if (knot[mid] < v) lo = mid; else hi = mid;
    }
    return lo;
  }
};

// Value, log-derivative and their partials at position t inside bin k.
template <typename T>
struct Local {
  T W, H, s, t, u, den, A, G;
  T D0, D1;
  Local(const Spline<T>& sp, int k, T t_) {
    W = sp.X[k + 1] - sp.X[k];
    H = sp.Y[k + 1] - sp.Y[k];
    s = H / W;
    D0 = sp.derivative(k);
    D1 = sp.derivative(k + 1);
    t = t_;
    u = t * (T(1) - t);
    den = s + (D1 + D0 - T(2) * s) * u;
    A = s * t * t + D0 * u;
    G = D1 * t * t + T(2) * s * u + D0 * (T(1) - t) * (T(1) - t);
  }
  T derivative() const { return s * s * G / (den * den); }
  T ladj_dt() const {
    T den_t = (D1 + D0 - T(2) * s) * (T(1) - T(2) * t);
    T G_t = T(2) * D1 * t + T(2) * s * (T(1) - T(2) * t) - T(2) * D0 * (T(1) - t);
    return G_t / G - T(2) * den_t / den;
  }
};

// Bin k and local position of input v inside [-B, B]: for the forward map v is x; for the inverse v
// is y, and the position solves the rational-quadratic equation (stable form of the quadratic root).
template <typename T>
Local<T> locate(const Spline<T>& sp, T v, bool inverse, int& k) {
  if (!inverse) {
    k = Spline<T>::find_bin(sp.X, sp.K, v);
    return Local<T>(sp, k, (v - sp.X[k]) / (sp.X[k + 1] - sp.X[k]));
  }
  k = Spline<T>::find_bin(sp.Y, sp.K, v);
  const T W = sp.X[k + 1] - sp.X[k], H = sp.Y[k + 1] - sp.Y[k], s = H / W;
  const T D0 = sp.derivative(k), D1 = sp.derivative(k + 1), dy = v - sp.Y[k], c = D1 + D0 - T(2) * s;
  const T a = H * (s - D0) + dy * c, b = H * D0 - dy * c, cc = -s * dy;
  T disc = b * b - T(4) * a * cc;
  disc = disc > T(0) ? disc : T(0);
  return Local<T>(sp, k, (T(2) * cc) / (-b - std::sqrt(disc)));
}

// Accumulates d(gy*y + gl*ladj)/d(raw params) of one coordinate at fixed input x (forward map).
template <typename T, typename S>
void param_backward(const Spline<T>& sp, const Local<T>& L, int k, T gy, T gl, S* grad) {
  const int K = sp.K;
  const T B2 = T(2) * sp.bound;
  const T den2 = L.den * L.den;
  const T one_m_2t = T(1) - T(2) * L.t;
  const T c = L.D1 + L.D0 - T(2) * L.s;
  const T A_t = T(2) * L.s * L.t + L.D0 * one_m_2t, A_s = L.t * L.t;
  const T den_t = c * one_m_2t, den_s = T(1) - T(2) * L.u;
  const T G_t = T(2) * L.D1 * L.t + T(2) * L.s * one_m_2t - T(2) * L.D0 * (T(1) - L.t);

  const T g_t = gy * L.H * (A_t * L.den - L.A * den_t) / den2 + gl * (G_t / L.G - T(2) * den_t / L.den);
  const T g_s = gy * L.H * (A_s * L.den - L.A * den_s) / den2 + gl * (T(2) / L.s + T(2) * L.u / L.G - T(2) * den_s / L.den);
  const T g_D0 = gy * L.H * L.u * (L.den - L.A) / den2 + gl * ((T(1) - L.t) * (T(1) - L.t) / L.G - T(2) * L.u / L.den);
  const T g_D1 = -gy * L.H * L.A * L.u / den2 + gl * (L.t * L.t / L.G - T(2) * L.u / L.den);
  const T g_H = gy * L.A / L.den + g_s / L.W;
  const T g_Y = gy;
  const T g_X = -g_t / L.W;
  const T g_W = -g_t * L.t / L.W - g_s * L.s / L.W;

  // Knots: X_k = -B + 2B Σ_{i<k} w_i, W_k = 2B w_k (same for heights), w = min + (1 - min K) softmax.
  T g_w[kMaxBins], g_h[kMaxBins];
  for (int i = 0; i < K; ++i) {
    g_w[i] = (i < k ? B2 * g_X : T(0)) + (i == k ? B2 * g_W : T(0));
    g_h[i] = (i < k ? B2 * g_Y : T(0)) + (i == k ? B2 * g_H : T(0));
  }
  const T scale_w = T(1) - T(kMinBinWidth) * K, scale_h = T(1) - T(kMinBinHeight) * K;
  T dot_w = 0, dot_h = 0;
  for (int i = 0; i < K; ++i) {
    dot_w += sp.sw[i] * g_w[i];
    dot_h += sp.sh[i] * g_h[i];
  }
  for (int i = 0; i < K; ++i) {
    grad[i] = S(scale_w * sp.sw[i] * (g_w[i] - dot_w));
    grad[K + i] = S(scale_h * sp.sh[i] * (g_h[i] - dot_h));
  }
  for (int j = 1; j < K; ++j) grad[2 * K + j - 1] = S(0);
  // D_j = min + softplus(raw + shift): d/draw = sigmoid(raw + shift).
  if (k >= 1) grad[2 * K + k - 1] = S(g_D0 * sigmoid(sp.raw_derivatives[k - 1]));
  if (k + 1 <= K - 1) grad[2 * K + k] = S(g_D1 * sigmoid(sp.raw_derivatives[k]));
}

// Storage type S (float or double); all arithmetic in double (T), so float32 costs no accuracy here.
template <typename S, typename T = double>
void backward_kernel(const S* x, const S* params, const S* grad_out, const S* grad_ladj, S* grad_x, S* grad_params,
                     int64_t n, int K, T bound, bool inverse, T shift) {
  const int P = 3 * K - 1;
#pragma omp parallel for schedule(static) if (n > 8192)
  for (int64_t i = 0; i < n; ++i) {
    S* grad = grad_params + i * P;
    const T v = x[i];
    if (!(v >= -bound && v <= bound)) {
      grad_x[i] = grad_out[i];
      for (int p = 0; p < P; ++p) grad[p] = S(0);
      continue;
    }
    Spline<T> sp(params + i * P, K, bound, shift);
    int k;
    const Local<T> L = locate(sp, v, inverse, k);
    const T df_dx = L.derivative();
    if (!inverse) {
      grad_x[i] = S(T(grad_out[i]) * df_dx + T(grad_ladj[i]) * L.ladj_dt() / L.W);
      param_backward(sp, L, k, T(grad_out[i]), T(grad_ladj[i]), grad);
    } else {
      // x = f^{-1}(v; θ), ladj_inv = -ladj_f(x; θ): implicit differentiation through f.
      const T upstream = (T(grad_out[i]) - T(grad_ladj[i]) * L.ladj_dt() / L.W) / df_dx;
      grad_x[i] = S(upstream);
      param_backward(sp, L, k, -upstream, -T(grad_ladj[i]), grad);
    }
  }
}

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

// The instruction sets the blocked forward was compiled for, best first, that this CPU runs.
std::vector<std::string> cpu_isas() {
  std::vector<std::string> isas;
#ifdef FASTFLOW_HAVE_X86_64_V3
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("x86_64_v3");
#endif
  isas.push_back("generic");
  return isas;
}

template <typename T>
void forward(Array<T> x, Array<T> params, Array<T> out, Array<T> ladj, double bound, bool inverse, double shift,
             const std::string& isa) {
  const int K = bins_of(x, params);
  check(out.size() == x.size() && ladj.size() == x.size(), "output buffers must match inputs");
  const std::vector<std::string> isas = cpu_isas();
  const std::string chosen = isa == "auto" ? isas.front() : isa;
  check(std::find(isas.begin(), isas.end(), chosen) != isas.end(), "instruction set '" + isa + "' is not available");
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
void backward(Array<T> x, Array<T> params, Array<T> grad_out, Array<T> grad_ladj, Array<T> grad_x, Array<T> grad_params,
              double bound, bool inverse, double shift) {
  const int K = bins_of(x, params);
  check(grad_out.size() == x.size() && grad_ladj.size() == x.size() && grad_x.size() == x.size(),
        "gradient buffers must match inputs");
  check(grad_params.size() == params.size(), "grad_params must match params");
  const int64_t n = x.shape(0);
  const T *px = x.data(), *pp = params.data(), *pgo = grad_out.data(), *pgl = grad_ladj.data();
  T* pgx = grad_x.mutable_data();
  T* pgp = grad_params.mutable_data();
  py::gil_scoped_release release;
  backward_kernel<T>(px, pp, pgo, pgl, pgx, pgp, n, K, bound, inverse, shift);
}

}  // namespace

void bind_spline(py::module_& m) {
  m.def("spline_isas", &cpu_isas, "Instruction sets of the blocked spline forward that this CPU runs, best first.");
  const char* fwd_doc =
      "rq_spline_forward(x (n,), params (n, 3K-1), out (n,), ladj (n,), bound, inverse, derivative_shift, isa='auto'): "
      "isa is 'auto' (the best of spline_isas()) or one of spline_isas()";
  const char* bwd_doc =
      "rq_spline_backward(x, params, grad_out, grad_ladj, grad_x, grad_params, bound, inverse, derivative_shift)";
  m.def("rq_spline_forward", &forward<float>, fwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("out").noconvert(), py::arg("ladj").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"), py::arg("isa") = "auto");
  m.def("rq_spline_forward", &forward<double>, fwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("out").noconvert(), py::arg("ladj").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"), py::arg("isa") = "auto");
  m.def("rq_spline_backward", &backward<float>, bwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("grad_out").noconvert(), py::arg("grad_ladj").noconvert(), py::arg("grad_x").noconvert(),
        py::arg("grad_params").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"));
  m.def("rq_spline_backward", &backward<double>, bwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("grad_out").noconvert(), py::arg("grad_ladj").noconvert(), py::arg("grad_x").noconvert(),
        py::arg("grad_params").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"));
}
