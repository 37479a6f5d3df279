// Small dense building blocks for the CPU kernels: row-major C (+)= A @ B on acc_t buffers that
// fit in cache. Compiled once per x86-64 ISA level (target_clones) so the same binary uses
// AVX-512 or AVX2 where the CPU has them and stays correct on any x86-64; elsewhere the
// compiler's default target is used.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define BSBR_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BSBR_MULTIVERSION
#endif

namespace bsbr::cpu {

// C[i][j] += sum_k A[i][k] * B[k][j] for i < m, j < n, k < kdim (all row-major, leading dims).
void gemm_acc(int64_t m, int64_t n, int64_t kdim, const float* a, int64_t lda, const float* b,
              int64_t ldb, float* c, int64_t ldc);
void gemm_acc(int64_t m, int64_t n, int64_t kdim, const double* a, int64_t lda, const double* b,
              int64_t ldb, double* c, int64_t ldc);

// x[j] = exp(x[j] - shift) for j < n; returns the sum. Accurate to a few ulp (vectorisable
// polynomial exp instead of libm's scalar one, which would dominate the softmax).
float exp_shift_sum(float* x, int64_t n, float shift);
double exp_shift_sum(double* x, int64_t n, double shift);

// sum_j x[j] * y[j]
float dot(const float* x, const float* y, int64_t n);
double dot(const double* x, const double* y, int64_t n);

// dst[j][i] = src[i][j] for i < rows, j < cols.
template <typename T>
inline void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
}

}  // namespace bsbr::cpu
