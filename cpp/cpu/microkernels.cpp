#include "cpu/microkernels.h"

#include <cmath>
#include <cstring>

namespace bsbr::cpu {
namespace {

// Register tile: kRows rows of C by kCols columns, accumulated over the whole k loop so each
// element of C is loaded and stored once; B's row segment is shared by the kRows rows.
template <typename T, int kRows, int kCols>
inline __attribute__((always_inline)) void tile(
    int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
    int64_t ldc) {
  T acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kCols; ++j) acc[r][j] = c[r * ldc + j];
  for (int64_t k = 0; k < kdim; ++k) {
    const T* brow = b + k * ldb;
    for (int r = 0; r < kRows; ++r) {
      const T ar = a[r * a_row + k * a_col];
      for (int j = 0; j < kCols; ++j) acc[r][j] += ar * brow[j];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kCols; ++j) c[r * ldc + j] = acc[r][j];
}

// Edge rows/columns: plain loops, the inner one contiguous in C and B.
template <typename T>
inline __attribute__((always_inline)) void edge(
    int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b,
    int64_t ldb, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* crow = c + i * ldc;
    for (int64_t k = 0; k < kdim; ++k) {
      const T ai = a[i * a_row + k * a_col];
      const T* brow = b + k * ldb;
      for (int64_t j = 0; j < n; ++j) crow[j] += ai * brow[j];
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void gemm_impl(
    int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b,
    int64_t ldb, T* c, int64_t ldc) {
  constexpr int kRows = 4;
  constexpr int kCols = 64 / sizeof(T) * 2;  // two 64-byte vectors per row
  const int64_t m_main = m - m % kRows;
  const int64_t n_main = n - n % kCols;
  for (int64_t i = 0; i < m_main; i += kRows) {
    for (int64_t j = 0; j < n_main; j += kCols) {
      tile<T, kRows, kCols>(kdim, a + i * a_row, a_row, a_col, b + j, ldb, c + i * ldc + j, ldc);
    }
    if (n_main < n) {
      edge(kRows, n - n_main, kdim, a + i * a_row, a_row, a_col, b + n_main, ldb, c + i * ldc + n_main, ldc);
    }
  }
  if (m_main < m) edge(m - m_main, n, kdim, a + m_main * a_row, a_row, a_col, b, ldb, c + m_main * ldc, ldc);
}

// exp(x) for x <= 0 as 2^i * e^r with |r| <= ln2/2 and a degree-7 Taylor polynomial (relative
// error < 1e-7); inputs below -87 flush to 0 like expf's subnormal range. Plain arithmetic only
// (rounding by the 1.5*2^23 trick, no libm calls) so every ISA level vectorises it.
inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float round_magic = 12582912.0f;
  const float i = (clamped * 1.44269504088896341f + round_magic) - round_magic;
  float r = clamped - i * 0.693145751953125f;
  r = r - i * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(i) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

template <typename T>
inline __attribute__((always_inline)) T dot_impl(const T* x, const T* y, int64_t n) {
  constexpr int kLanes = 16;
  T partial[kLanes] = {};
  const int64_t main = n - n % kLanes;
  for (int64_t j = 0; j < main; j += kLanes)
    for (int l = 0; l < kLanes; ++l) partial[l] += x[j + l] * y[j + l];
  T sum = 0;
  for (int64_t j = main; j < n; ++j) sum += x[j] * y[j];
  for (int l = 0; l < kLanes; ++l) sum += partial[l];
  return sum;
}

template <typename T>
inline __attribute__((always_inline)) T sum_impl(const T* x, int64_t n) {
  constexpr int kLanes = 16;
  T partial[kLanes] = {};
  const int64_t main = n - n % kLanes;
  for (int64_t j = 0; j < main; j += kLanes)
    for (int l = 0; l < kLanes; ++l) partial[l] += x[j + l];
  T sum = 0;
  for (int64_t j = main; j < n; ++j) sum += x[j];
  for (int l = 0; l < kLanes; ++l) sum += partial[l];
  return sum;
}

template <typename T>
inline __attribute__((always_inline)) T max_impl(const T* x, int64_t n) {
  constexpr int kLanes = 16;
  T partial[kLanes];
  for (int l = 0; l < kLanes; ++l) partial[l] = x[0];
  const int64_t main = n - n % kLanes;
  for (int64_t j = 0; j < main; j += kLanes)
    for (int l = 0; l < kLanes; ++l) partial[l] = partial[l] > x[j + l] ? partial[l] : x[j + l];
  T mx = x[0];
  for (int64_t j = main; j < n; ++j) mx = mx > x[j] ? mx : x[j];
  for (int l = 0; l < kLanes; ++l) mx = mx > partial[l] ? mx : partial[l];
  return mx;
}

template <typename S, typename T>
inline __attribute__((always_inline)) void convert_scale_impl(const S* src, T* dst, int64_t n, T mul) {
  for (int64_t j = 0; j < n; ++j) dst[j] = mul * static_cast<T>(src[j]);
}

}  // namespace

BSBR_MULTIVERSION
void convert_scale(const float* src, float* dst, int64_t n, float mul) {
  convert_scale_impl(src, dst, n, mul);
}

BSBR_MULTIVERSION
void convert_scale(const double* src, double* dst, int64_t n, double mul) {
  convert_scale_impl(src, dst, n, mul);
}

BSBR_MULTIVERSION
void convert_scale(const c10::BFloat16* src, float* dst, int64_t n, float mul) {
  // bf16 is the top half of an fp32: widen the bits (vectorises, unlike a per-element call).
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t wide = static_cast<uint32_t>(bits[j]) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    dst[j] = mul * value;
  }
}

void convert_scale(const c10::Half* src, float* dst, int64_t n, float mul) {
  convert_scale_impl(src, dst, n, mul);
}

BSBR_MULTIVERSION
float max_value(const float* x, int64_t n) { return max_impl(x, n); }

BSBR_MULTIVERSION
double max_value(const double* x, int64_t n) { return max_impl(x, n); }

BSBR_MULTIVERSION
float exp_shift_sum(float* x, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_nonpositive(x[j] - shift);
  return sum_impl(x, n);
}

double exp_shift_sum(double* x, int64_t n, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

BSBR_MULTIVERSION
float dot(const float* x, const float* y, int64_t n) { return dot_impl(x, y, n); }

BSBR_MULTIVERSION
double dot(const double* x, const double* y, int64_t n) { return dot_impl(x, y, n); }

BSBR_MULTIVERSION
void gemm_acc(int64_t m, int64_t n, int64_t kdim, const float* a, int64_t a_row, int64_t a_col,
              const float* b, int64_t ldb, float* c, int64_t ldc) {
  gemm_impl(m, n, kdim, a, a_row, a_col, b, ldb, c, ldc);
}

BSBR_MULTIVERSION
void gemm_acc(int64_t m, int64_t n, int64_t kdim, const double* a, int64_t a_row, int64_t a_col,
              const double* b, int64_t ldb, double* c, int64_t ldc) {
  gemm_impl(m, n, kdim, a, a_row, a_col, b, ldb, c, ldc);
}

}  // namespace bsbr::cpu
