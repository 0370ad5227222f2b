// Rational-quadratic spline forward/inverse with log|det J| and its backward, vectorized across elements: each block of
// kLanes elements is transposed to structure-of-arrays (parameter j of every element contiguous), so
// every step — softmax, knots, bin search, the rational-quadratic formulas — is a unit-stride loop over
// the block that the compiler turns into SIMD. Arithmetic in the storage type (float32 inputs run in
// float, ~1e-6 relative error; float64 in double). Compiled once per instruction set
// (spline_blocked_*.cpp); spline.cpp picks the one the CPU supports at run time.
#pragma once

#include <cstdint>

namespace fastflow {
// The OpenMP thread count of every kernel's parallel regions, whichever Python thread calls the kernel
// (`set_num_threads`; omp_set_num_threads alone sets it for the calling thread only). Defined in module.cpp.
int kernel_threads();
}  // namespace fastflow

namespace fastflow_spline {

// Entry points, one set per instruction set: out/ladj `(n,)` from x `(n,)` and params `(n, 3K-1)`;
// forward_rows takes a coupling layer's x/out `(rows, count)` and padded params `(rows, row_stride)` (each row's
// count vectors of 3K-1 first) and sums log|det| per row into row_ladj `(rows,)`; the backward gives grad_x `(n,)` and grad_params `(n, 3K-1)` from grad_out, grad_ladj `(n,)`.
#define FASTFLOW_SPLINE_DECLARE(isa)                                                                            \
  namespace isa {                                                                                              \
  void forward(const float* x, const float* params, float* out, float* ladj, int64_t n, int K, float bound,     \
               bool inverse, float shift);                                                                     \
  void forward(const double* x, const double* params, double* out, double* ladj, int64_t n, int K,             \
               double bound, bool inverse, double shift);                                                      \
  void forward_rows(const float* x, const float* params, float* out, float* row_ladj, int64_t rows, int64_t count, \
                    int64_t row_stride, int K, float bound, bool inverse, float shift);                          \
  void forward_rows(const double* x, const double* params, double* out, double* row_ladj, int64_t rows,        \
                    int64_t count, int64_t row_stride, int K, double bound, bool inverse, double shift);         \
  void backward(const float* x, const float* params, const float* grad_out, const float* grad_ladj, float* grad_x, \
                float* grad_params, int64_t n, int K, float bound, bool inverse, float shift);                     \
  void backward(const double* x, const double* params, const double* grad_out, const double* grad_ladj,          \
                double* grad_x, double* grad_params, int64_t n, int K, double bound, bool inverse, double shift);  \
  }
FASTFLOW_SPLINE_DECLARE(generic)
FASTFLOW_SPLINE_DECLARE(x86_64_v3)
#undef FASTFLOW_SPLINE_DECLARE

}  // namespace fastflow_spline
