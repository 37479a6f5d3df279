#include "cpu/microkernels.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

// x86-64 builds with GCC 12+ (which knows the x86-64-v3/v4 levels) compile every kernel three
// times (AVX-512, AVX2, baseline) and pick one when first called; other builds compile the
// baseline kernels for the compiler's target.
#if defined(__GNUC__) && __GNUC__ >= 12 && defined(__x86_64__) && !defined(__clang__) && \
    defined(__linux__)
#define BSBR_X86_LEVELS 1
#endif

namespace bsbr::cpu {
namespace {

// The register shape of an ISA level: vectors of kBytes bytes (GCC vector extensions, which the
// compiler maps onto that level's registers) and product tiles of kRows rows by two vectors, so
// that the 2 * kRows accumulators, two rows of B and a broadcast fit the register file: 8 x 2
// of 32 zmm (AVX-512), 6 x 2 of 16 ymm (AVX2), 4 x 2 of 16 xmm (SSE2, or other architectures'
// 128-bit units).
template <int kVectorBytes, int kTileRows>
struct Isa {
  static constexpr int kBytes = kVectorBytes;
  static constexpr int kRows = kTileRows;
};
using IsaAvx512 = Isa<64, 8>;
using IsaAvx2 = Isa<32, 6>;
using IsaBase = Isa<16, 4>;

template <typename T, int kBytes>
struct VectorOf {
  typedef T type __attribute__((vector_size(kBytes)));
};
template <typename T, int kBytes>
using Vector = typename VectorOf<T, kBytes>::type;

// Register tile: kRows rows of C by kVecs vectors, accumulated over the whole k loop so each
// element of C is loaded (kAccumulate) and stored once; B's row segment is shared by the kRows
// rows.
template <bool kAccumulate, typename T, int kBytes, int kRows, int kVecs>
inline __attribute__((always_inline)) void tile(
    int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
    int64_t ldc) {
  using V = Vector<T, kBytes>;
  constexpr int kLanes = kBytes / sizeof(T);
  V acc[kRows][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < kVecs; ++j) {
      if constexpr (kAccumulate) {
        std::memcpy(&acc[r][j], c + r * ldc + j * kLanes, kBytes);
      } else {
        acc[r][j] = V{};
      }
    }
  for (int64_t k = 0; k < kdim; ++k) {
    V brow[kVecs];
#pragma GCC unroll 2
    for (int j = 0; j < kVecs; ++j) std::memcpy(&brow[j], b + k * ldb + j * kLanes, kBytes);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const T ar = a[r * a_row + k * a_col];
#pragma GCC unroll 2
      for (int j = 0; j < kVecs; ++j) acc[r][j] += ar * brow[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < kVecs; ++j) std::memcpy(c + r * ldc + j * kLanes, &acc[r][j], kBytes);
}

// Columns narrower than a vector: plain loops, the inner one contiguous in C and B.
template <bool kAccumulate, typename T>
inline __attribute__((always_inline)) void edge(
    int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b,
    int64_t ldb, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* crow = c + i * ldc;
    if constexpr (!kAccumulate) std::fill(crow, crow + n, T(0));
    for (int64_t k = 0; k < kdim; ++k) {
      const T ai = a[i * a_row + k * a_col];
      const T* brow = b + k * ldb;
      for (int64_t j = 0; j < n; ++j) crow[j] += ai * brow[j];
    }
  }
}

// kRows rows of C, all n columns: two-vector tiles, then one vector, then half a vector (the
// state width ds = 8 in fp32 on AVX-512), then the edge.
template <bool kAccumulate, typename T, int kBytes, int kRows>
inline __attribute__((always_inline)) void row_block(
    int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
    T* c, int64_t ldc) {
  constexpr int64_t kLanes = kBytes / sizeof(T);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes)
    tile<kAccumulate, T, kBytes, kRows, 2>(kdim, a, a_row, a_col, b + j, ldb, c + j, ldc);
  if (j + kLanes <= n) {
    tile<kAccumulate, T, kBytes, kRows, 1>(kdim, a, a_row, a_col, b + j, ldb, c + j, ldc);
    j += kLanes;
  }
  if constexpr (kBytes > 16) {
    if (j + kLanes / 2 <= n) {
      tile<kAccumulate, T, kBytes / 2, kRows, 1>(kdim, a, a_row, a_col, b + j, ldb, c + j, ldc);
      j += kLanes / 2;
    }
  }
  if (j < n) edge<kAccumulate>(kRows, n - j, kdim, a, a_row, a_col, b + j, ldb, c + j, ldc);
}

// Rows in blocks of the ISA's tile height; the last m % kRows rows in blocks of 4, 2 and 1.
template <typename IsaT, bool kAccumulate, typename T>
inline __attribute__((always_inline)) void gemm_impl(
    int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b,
    int64_t ldb, T* c, int64_t ldc) {
  constexpr int kRows = IsaT::kRows, kBytes = IsaT::kBytes;
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    row_block<kAccumulate, T, kBytes, kRows>(n, kdim, a + i * a_row, a_row, a_col, b, ldb,
                                             c + i * ldc, ldc);
  }
  if constexpr (kRows > 4) {
    if (i + 4 <= m) {
      row_block<kAccumulate, T, kBytes, 4>(n, kdim, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc,
                                           ldc);
      i += 4;
    }
  }
  if (i + 2 <= m) {
    row_block<kAccumulate, T, kBytes, 2>(n, kdim, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc,
                                         ldc);
    i += 2;
  }
  if (i < m) {
    row_block<kAccumulate, T, kBytes, 1>(n, kdim, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc,
                                         ldc);
  }
}

// Round of the in-register transpose that swaps the off-diagonal kHalf x kHalf sub-blocks of
// every 2kHalf x 2kHalf block: rows p and p + kHalf (p & kHalf == 0) exchange the elements whose
// column has bit kHalf set with their partner's elements whose column has it clear. The rounds
// for kHalf = kLanes / 2, ..., 1 together swap every bit of the row index with the column's.
template <int kLanes, int kHalf, typename V, int... I>
inline __attribute__((always_inline)) void swap_sub_blocks(V* rows, std::integer_sequence<int, I...>) {
#pragma GCC unroll 16
  for (int p = 0; p < kLanes; ++p) {
    if (p & kHalf) continue;
    const V upper = rows[p], lower = rows[p + kHalf];
    rows[p] = __builtin_shufflevector(upper, lower, ((I & kHalf) ? kLanes + I - kHalf : I)...);
    rows[p + kHalf] = __builtin_shufflevector(upper, lower, ((I & kHalf) ? kLanes + I : I + kHalf)...);
  }
}

template <int kLanes, int kHalf, typename V>
inline __attribute__((always_inline)) void transpose_rounds(V* rows) {
  if constexpr (kHalf >= 1) {
    swap_sub_blocks<kLanes, kHalf>(rows, std::make_integer_sequence<int, kLanes>{});
    transpose_rounds<kLanes, kHalf / 2>(rows);
  }
}

// Blocks of kLanes x kLanes elements are transposed in registers; the ragged right and bottom
// edges element by element.
template <typename IsaT, typename T>
inline __attribute__((always_inline)) void transpose_impl(
    int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int kBytes = IsaT::kBytes, kLanes = kBytes / sizeof(T);
  using V = Vector<T, kBytes>;
  const int64_t rows_main = rows - rows % kLanes, cols_main = cols - cols % kLanes;
  for (int64_t i0 = 0; i0 < rows_main; i0 += kLanes) {
    for (int64_t j0 = 0; j0 < cols_main; j0 += kLanes) {
      V block[kLanes];
#pragma GCC unroll 16
      for (int r = 0; r < kLanes; ++r) std::memcpy(&block[r], src + (i0 + r) * lds + j0, kBytes);
      transpose_rounds<kLanes, kLanes / 2>(block);
#pragma GCC unroll 16
      for (int r = 0; r < kLanes; ++r) std::memcpy(dst + (j0 + r) * ldd + i0, &block[r], kBytes);
    }
    for (int64_t i = i0; i < i0 + kLanes; ++i)
      for (int64_t j = cols_main; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
  for (int64_t i = rows_main; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
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

// bf16 is the top half of an fp32: widen the bits (vectorises, unlike a per-element call).
inline __attribute__((always_inline)) void bf16_to_float_impl(const c10::BFloat16* src, float* dst,
                                                               int64_t n, float mul) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t wide = static_cast<uint32_t>(bits[j]) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    dst[j] = mul * value;
  }
}

inline __attribute__((always_inline)) float exp_shift_sum_impl(float* x, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_nonpositive(x[j] - shift);
  return sum_impl(x, n);
}

// One definition of every kernel for an ISA level, with the level's target attribute so that
// the always-inline templates above compile for its registers and instructions.
#define BSBR_LEVEL_KERNELS(ISA, TARGET)                                                          \
  template <typename T>                                                                          \
  TARGET void gemm(bool accumulate, int64_t m, int64_t n, int64_t kdim, const T* a,              \
                   int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc) {   \
    if (accumulate) gemm_impl<ISA, true>(m, n, kdim, a, a_row, a_col, b, ldb, c, ldc);           \
    else gemm_impl<ISA, false>(m, n, kdim, a, a_row, a_col, b, ldb, c, ldc);                     \
  }                                                                                              \
  template <typename T>                                                                          \
  TARGET void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst,           \
                        int64_t ldd) {                                                           \
    transpose_impl<ISA>(rows, cols, src, lds, dst, ldd);                                         \
  }                                                                                              \
  template <typename T>                                                                          \
  TARGET void convert_scale(const T* src, T* dst, int64_t n, T mul) {                            \
    convert_scale_impl(src, dst, n, mul);                                                        \
  }                                                                                              \
  TARGET void convert_scale(const c10::BFloat16* src, float* dst, int64_t n, float mul) {        \
    bf16_to_float_impl(src, dst, n, mul);                                                        \
  }                                                                                              \
  template <typename T>                                                                          \
  TARGET T max_value(const T* x, int64_t n) { return max_impl(x, n); }                           \
  TARGET float exp_shift_sum(float* x, int64_t n, float shift) {                                 \
    return exp_shift_sum_impl(x, n, shift);                                                      \
  }                                                                                              \
  template <typename T>                                                                          \
  TARGET T dot(const T* x, const T* y, int64_t n) { return dot_impl(x, y, n); }

namespace base {
BSBR_LEVEL_KERNELS(IsaBase, )
}  // namespace base
#ifdef BSBR_X86_LEVELS
namespace avx2 {
BSBR_LEVEL_KERNELS(IsaAvx2, __attribute__((target("arch=x86-64-v3"))))
}  // namespace avx2
namespace avx512 {
BSBR_LEVEL_KERNELS(IsaAvx512, __attribute__((target("arch=x86-64-v4"))))
}  // namespace avx512
#endif

enum class Level { kBase, kAvx2, kAvx512 };
constexpr const char* kLevelNames[] = {"base", "avx2", "avx512"};

// The best level this CPU runs, capped by BSBR_CPU_ISA (base | avx2 | avx512) so that tests can
// run every level's kernels on one machine.
Level detect_level() {
  Level level = Level::kBase;
#ifdef BSBR_X86_LEVELS
  if (__builtin_cpu_supports("x86-64-v4")) {
    level = Level::kAvx512;
  } else if (__builtin_cpu_supports("x86-64-v3")) {
    level = Level::kAvx2;
  }
#endif
  if (const char* cap = std::getenv("BSBR_CPU_ISA"); cap != nullptr && *cap != '\0') {
    const auto* names_end = std::end(kLevelNames);
    const auto* found = std::find_if(std::begin(kLevelNames), names_end,
                                     [&](const char* name) { return std::string(name) == cap; });
    TORCH_CHECK(found != names_end, "BSBR_CPU_ISA must be base, avx2 or avx512, got '", cap, "'");
    level = std::min(level, static_cast<Level>(found - std::begin(kLevelNames)));
  }
  return level;
}

Level level() {
  static const Level detected = detect_level();
  return detected;
}

}  // namespace

#ifdef BSBR_X86_LEVELS
#define BSBR_ON_LEVEL(call)                    \
  switch (level()) {                           \
    case Level::kAvx512: return avx512::call;  \
    case Level::kAvx2: return avx2::call;      \
    default: return base::call;                \
  }
#else
#define BSBR_ON_LEVEL(call) return base::call;
#endif

const char* cpu_isa() { return kLevelNames[static_cast<int>(level())]; }

template <typename T>
void gemm(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col, const T* b,
          int64_t ldb, T* c, int64_t ldc) {
  BSBR_ON_LEVEL(gemm(false, m, n, kdim, a, a_row, a_col, b, ldb, c, ldc))
}

template <typename T>
void gemm_acc(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_row, int64_t a_col,
              const T* b, int64_t ldb, T* c, int64_t ldc) {
  BSBR_ON_LEVEL(gemm(true, m, n, kdim, a, a_row, a_col, b, ldb, c, ldc))
}

template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  BSBR_ON_LEVEL(transpose(rows, cols, src, lds, dst, ldd))
}

template <typename T>
T max_value(const T* x, int64_t n) {
  BSBR_ON_LEVEL(max_value(x, n))
}

template <typename T>
T dot(const T* x, const T* y, int64_t n) {
  BSBR_ON_LEVEL(dot(x, y, n))
}

#define BSBR_INSTANTIATE(T)                                                                        \
  template void gemm<T>(int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, \
                        T*, int64_t);                                                              \
  template void gemm_acc<T>(int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*,      \
                            int64_t, T*, int64_t);                                                 \
  template void transpose<T>(int64_t, int64_t, const T*, int64_t, T*, int64_t);                    \
  template T max_value<T>(const T*, int64_t);                                                      \
  template T dot<T>(const T*, const T*, int64_t);
BSBR_INSTANTIATE(float)
BSBR_INSTANTIATE(double)

void convert_scale(const float* src, float* dst, int64_t n, float mul) {
  BSBR_ON_LEVEL(convert_scale(src, dst, n, mul))
}

void convert_scale(const double* src, double* dst, int64_t n, double mul) {
  BSBR_ON_LEVEL(convert_scale(src, dst, n, mul))
}

void convert_scale(const c10::BFloat16* src, float* dst, int64_t n, float mul) {
  BSBR_ON_LEVEL(convert_scale(src, dst, n, mul))
}

void convert_scale(const c10::Half* src, float* dst, int64_t n, float mul) {
  convert_scale_impl(src, dst, n, mul);
}

float exp_shift_sum(float* x, int64_t n, float shift) { BSBR_ON_LEVEL(exp_shift_sum(x, n, shift)) }

double exp_shift_sum(double* x, int64_t n, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

}  // namespace bsbr::cpu
