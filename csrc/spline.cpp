// Rational-quadratic spline (Durkan et al. 2019) on [-B, B] with identity tails: forward/inverse
// with log|det J|, and the backward pass w.r.t. inputs and the raw (unnormalized) parameters.
// Mirrors fastflow/ops/spline.py::rq_spline_ref exactly (same parametrization and constants).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

constexpr int kMaxBins = 128;
constexpr double kMinBinWidth = 1e-3;
constexpr double kMinBinHeight = 1e-3;
constexpr double kMinDerivative = 1e-3;

// exp(x) for x <= 0, branch-free so that loops over it vectorize (std::exp does not): 2^n · e^r with
// n = round(x / ln 2) by the 1.5·2^52 trick, |r| <= ln2/2, and a degree-11 Taylor polynomial
// (truncation < 1e-16 relative); 2^n is assembled in the exponent bits. Below -700 it returns ~1e-304.
inline double exp_nonpositive(double x) {
  x = x < -700.0 ? -700.0 : x;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double kd = x * 1.4426950408889634 + shifter;
  const double n = kd - shifter;
  const double r = (x - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
  double p = 2.505210838544172e-08;  // 1/11!
  p = p * r + 2.755731922398589e-07;
  p = p * r + 2.7557319223985893e-06;
  p = p * r + 2.48015873015873e-05;
  p = p * r + 0.0001984126984126984;
  p = p * r + 0.001388888888888889;
  p = p * r + 0.008333333333333333;
  p = p * r + 0.041666666666666664;
  p = p * r + 0.16666666666666666;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const uint64_t bits = (__builtin_bit_cast(uint64_t, kd) + 1023) << 52;
  return p * __builtin_bit_cast(double, bits);
}

// log(x) for finite x > 0 (normal), branch-free: x = 2^e · m with m in [√½, √2), and
// log m = 2 atanh(z), z = (m-1)/(m+1), |z| <= 0.172, by its odd series to z^23 (error < 1e-17).
inline double log_positive(double x) {
  const uint64_t bits = __builtin_bit_cast(uint64_t, x);
  // shift the mantissa range from [1, 2) to [√½, √2) by borrowing from the exponent
  const uint64_t shifted = bits - 0x3FE6A09E667F3BCDULL;  // bits of √½
  const int64_t exponent = static_cast<int64_t>(shifted) >> 52;
  const double m = __builtin_bit_cast(double, bits - (static_cast<uint64_t>(exponent) << 52));
  const double z = (m - 1.0) / (m + 1.0), z2 = z * z;
  double p = 1.0 / 23;
  p = p * z2 + 1.0 / 21;
  p = p * z2 + 1.0 / 19;
  p = p * z2 + 1.0 / 17;
  p = p * z2 + 1.0 / 15;
  p = p * z2 + 1.0 / 13;
  p = p * z2 + 1.0 / 11;
  p = p * z2 + 1.0 / 9;
  p = p * z2 + 1.0 / 7;
  p = p * z2 + 1.0 / 5;
  p = p * z2 + 1.0 / 3;
  p = p * z2 + 1.0;
  return static_cast<double>(exponent) * 0.6931471805599453 + 2.0 * z * p;
}

// softplus(v) = max(v, 0) + log(1 + e^{-|v|}); absolute error ~1e-16.
inline double softplus(double v) {
  const double a = v < 0.0 ? -v : v;
  return (v > 0.0 ? v : 0.0) + log_positive(1.0 + exp_nonpositive(-a));
}

// sigmoid(v) with e = e^{-|v|}: 1 / (1 + e) for v >= 0, e / (1 + e) otherwise.
inline double sigmoid(double v) {
  const double e = exp_nonpositive(v < 0.0 ? v : -v);
  return (v < 0.0 ? e : 1.0) / (1.0 + e);
}

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
  T y(T Yk) const { return Yk + H * A / den; }
  T derivative() const { return s * s * G / (den * den); }
  T ladj() const { return log_positive(derivative()); }
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
void forward_kernel(const S* x, const S* params, S* out, S* ladj, int64_t n, int K, T bound, bool inverse, T shift) {
  const int P = 3 * K - 1;
#pragma omp parallel for schedule(static) if (n > 8192)
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    if (!(v >= -bound && v <= bound)) {
      out[i] = x[i];
      ladj[i] = S(0);
      continue;
    }
    Spline<T> sp(params + i * P, K, bound, shift);
    int k;
    const Local<T> L = locate(sp, v, inverse, k);
    out[i] = S(inverse ? sp.X[k] + L.t * L.W : L.y(sp.Y[k]));
    ladj[i] = S(inverse ? -L.ladj() : L.ladj());
  }
}

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

template <typename T>
void forward(Array<T> x, Array<T> params, Array<T> out, Array<T> ladj, double bound, bool inverse, double shift) {
  const int K = bins_of(x, params);
  check(out.size() == x.size() && ladj.size() == x.size(), "output buffers must match inputs");
  const int64_t n = x.shape(0);
  const T* px = x.data();
  const T* pp = params.data();
  T* po = out.mutable_data();
  T* pl = ladj.mutable_data();
  py::gil_scoped_release release;
  forward_kernel<T>(px, pp, po, pl, n, K, bound, inverse, shift);
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
  const char* fwd_doc = "rq_spline_forward(x (n,), params (n, 3K-1), out (n,), ladj (n,), bound, inverse, derivative_shift)";
  const char* bwd_doc =
      "rq_spline_backward(x, params, grad_out, grad_ladj, grad_x, grad_params, bound, inverse, derivative_shift)";
  m.def("rq_spline_forward", &forward<float>, fwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("out").noconvert(), py::arg("ladj").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"));
  m.def("rq_spline_forward", &forward<double>, fwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("out").noconvert(), py::arg("ladj").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"));
  m.def("rq_spline_backward", &backward<float>, bwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("grad_out").noconvert(), py::arg("grad_ladj").noconvert(), py::arg("grad_x").noconvert(),
        py::arg("grad_params").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"));
  m.def("rq_spline_backward", &backward<double>, bwd_doc, py::arg("x").noconvert(), py::arg("params").noconvert(),
        py::arg("grad_out").noconvert(), py::arg("grad_ladj").noconvert(), py::arg("grad_x").noconvert(),
        py::arg("grad_params").noconvert(), py::arg("bound"), py::arg("inverse"), py::arg("derivative_shift"));
}
