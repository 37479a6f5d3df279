// Small dense building blocks for the CPU kernels: row-major C (+)= A @ B, transposes and row
// reductions on acc_t buffers that fit in cache. Each is compiled once per x86-64 ISA level and
// the best level the CPU runs is picked on first use (the environment variable BSBR_CPU_ISA can
// cap it), so the same binary uses AVX-512 or AVX2 where the CPU has them and stays correct on
// any x86-64; elsewhere the compiler's default target is used.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace bsbr::cpu {

// The ISA level the kernels run at: "avx512", "avx2" or "base" (the compiler's target).
const char* cpu_isa();

// The templates below are instantiated for T = float and double.

// C[i][j] = sum_k A(i, k) * B[k][j] for i < m, j < n, k < kdim, where A(i, k) is
// a[i * a_row + k * a_col] (so A may be stored transposed: no transposition copy needed) and B
// and C are row-major with leading dims ldb and ldc.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b,
          int64_t ldb, T* c, int64_t ldc);

// C[i][j] += sum_k A(i, k) * B[k][j], as gemm otherwise.
template <typename T>
void gemm_acc(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col,
              const T* b, int64_t ldb, T* c, int64_t ldc);

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
template <typename T>
T max_value(const T* x, int64_t n);

// sum_j x[j] * y[j]
template <typename T>
T dot(const T* x, const T* y, int64_t n);

// dst[j][i] = src[i][j] for i < rows, j < cols.
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd);

}  // namespace bsbr::cpu
