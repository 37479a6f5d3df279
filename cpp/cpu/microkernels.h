// Small dense building blocks for the CPU kernels: row-major C (+)= A @ B on acc_t buffers that
// fit in cache. Compiled once per x86-64 ISA level (target_clones) so the same binary uses
// AVX-512 or AVX2 where the CPU has them and stays correct on any x86-64; elsewhere the
// compiler's default target is used.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define BSBR_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BSBR_MULTIVERSION
#endif

namespace bsbr::cpu {

// C[i][j] += sum_k A(i, k) * B[k][j] for i < m, j < n, k < kdim, where A(i, k) is
// a[i * a_row + k * a_col] (so A may be stored transposed: no transposition copy needed) and B
// and C are row-major with leading dims ldb and ldc.
void gemm_acc(int64_t m, int64_t n, int64_t kdim, const float* a, int64_t a_row, int64_t a_col,
              const float* b, int64_t ldb, float* c, int64_t ldc);
void gemm_acc(int64_t m, int64_t n, int64_t kdim, const double* a, int64_t a_row, int64_t a_col,
              const double* b, int64_t ldb, double* c, int64_t ldc);

// x[j] = exp(x[j] - shift) for j < n; returns the sum. Accurate to a few ulp (vectorisable
// polynomial exp instead of libm's scalar one, which would dominate the softmax).
float exp_shift_sum(float* x, int64_t n, float shift);
double exp_shift_sum(double* x, int64_t n, double shift);

// dst[j] = mul * src[j], converting to the accumulation type (src == dst is allowed).
void convert_scale(const float* src, float* dst, int64_t n, float mul);
void convert_scale(const double* src, double* dst, int64_t n, double mul);
void convert_scale(const c10::BFloat16* src, float* dst, int64_t n, float mul);
void convert_scale(const c10::Half* src, float* dst, int64_t n, float mul);

// max_j x[j] for n >= 1
float max_value(const float* x, int64_t n);
double max_value(const double* x, int64_t n);

// sum_j x[j] * y[j]
float dot(const float* x, const float* y, int64_t n);
double dot(const double* x, const double* y, int64_t n);

// dst[j][i] = src[i][j] for i < rows, j < cols, in 16 x 16 blocks so that both the reads and the
// writes of a block stay within a few cache lines.
template <typename T>
inline void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = i0 + kBlock < rows ? i0 + kBlock : rows;
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t j1 = j0 + kBlock < cols ? j0 + kBlock : cols;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ldd + i] = src[i * lds + j];
    }
  }
}

}  // namespace bsbr::cpu
