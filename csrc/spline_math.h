// Shared by the rational-quadratic spline kernels (spline.cpp and the blocked forward): constants of
// the parametrization and branch-free exp/log/softplus/sigmoid that vectorize (std::exp does not).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastflow_spline {

constexpr int kMaxBins = 128;
constexpr double kMinBinWidth = 1e-3;
constexpr double kMinBinHeight = 1e-3;
constexpr double kMinDerivative = 1e-3;

// exp(x) for x <= 0, branch-free so that loops over it vectorize (std::exp does not): 2^n · e^r with
// n = round(x / ln 2) by the 1.5·2^52 trick, |r| <= ln2/2, and a degree-11 Taylor polynomial
// (truncation < 1e-16 relative); 2^n is assembled in the exponent bits. Below -700 it returns ~1e-304;
// NaN stays NaN.
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
// log m = 2 atanh(z), z = (m-1)/(m+1), |z| <= 0.172, by its odd series to z^23 (error < 1e-17). NaN stays NaN.
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
  const double log_x = static_cast<double>(exponent) * 0.6931471805599453 + 2.0 * z * p;
  return x == x ? log_x : x;
}

// float versions: the same constructions with polynomials sized for float (relative error ~1e-7),
// so that float32 inputs run 8 lanes per AVX register instead of 4 (double) and shorter polynomials.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float kd = x * 1.44269504f + shifter;
  const float n = kd - shifter;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-06f;
  float p = 1.98412698e-04f;  // 1/7!
  p = p * r + 1.38888889e-03f;
  p = p * r + 8.33333333e-03f;
  p = p * r + 4.16666667e-02f;
  p = p * r + 1.66666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = (__builtin_bit_cast(uint32_t, kd) + 127u) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float log_positive(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t shifted = bits - 0x3F3504F3u;  // bits of √½
  const int32_t exponent = static_cast<int32_t>(shifted) >> 23;
  const float m = __builtin_bit_cast(float, bits - (static_cast<uint32_t>(exponent) << 23));
  const float z = (m - 1.0f) / (m + 1.0f), z2 = z * z;
  float p = 1.0f / 11;
  p = p * z2 + 1.0f / 9;
  p = p * z2 + 1.0f / 7;
  p = p * z2 + 1.0f / 5;
  p = p * z2 + 1.0f / 3;
  p = p * z2 + 1.0f;
  const float log_x = static_cast<float>(exponent) * 0.693147181f + 2.0f * z * p;
  return x == x ? log_x : x;
}

// softplus(v) = max(v, 0) + log(1 + e^{-|v|}); absolute error ~1e-16.
template <typename T>
inline T softplus(T v) {
  const T a = v < T(0) ? -v : v;
  return (v > T(0) ? v : T(0)) + log_positive(T(1) + exp_nonpositive(-a));
}

// sigmoid(v) with e = e^{-|v|}: 1 / (1 + e) for v >= 0, e / (1 + e) otherwise.
template <typename T>
inline T sigmoid(T v) {
  const T e = exp_nonpositive(v < T(0) ? v : -v);
  return (v < T(0) ? e : T(1)) / (T(1) + e);
}

}  // namespace fastflow_spline
