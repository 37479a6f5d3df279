// Device helpers: element conversions, mma.sync / ldmatrix / cp.async wrappers; and the one
// launch helper every kernel family shares (allow_dynamic_smem).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "bsbr_cuda.h"

namespace bsbr_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ inline int cdiv(int a, int b) { return (a + b - 1) / b; }

// A kernel launched with over 48 KiB of dynamic shared memory must first be allowed it, per
// function and device. cudaFuncSetAttribute costs microseconds of host time, and the small-n
// fused backward is bound by host time, so allow once per (kernel, device): the largest size
// allowed so far is remembered, and the attribute only ever grows (no thread can shrink it
// under another's launch).
template <typename Kernel> inline void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  const void* key = reinterpret_cast<const void*>(kernel);
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  size_t& done = allowed[{key, device}];
  if (bytes <= done) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(key, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  done = bytes;
}

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats packed into one 32-bit register of the 16-bit type (low half = first).
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Stores the pair (v0, v1) at dst[off], dst[off + 1].
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, int64_t off, float v0, float v1) {
  *reinterpret_cast<uint32_t*>(dst + off) = pack2<T>(v0, v1);
}

// Adds what a [rows, ld] output already holds to an mma accumulator fragment (fp32 sum before the
// one rounding): acc[t][0..1] at row ra, acc[t][2..3] at row ra + 8, cols t * 8 + 2 * (lane % 4)
// (+1); rows >= row_end and cols >= col_end are left alone. All loads are issued before any add:
// a load placed after a store to the same array stays behind it, so loading inside the store
// loop cost one memory round trip per pair. The read-only path is safe: only this thread writes
// these elements, and only after this read.
template <typename T, int NT>
__device__ __forceinline__ void add_existing(float (&acc)[NT][4], const T* src, int64_t ld, int ra,
                                             int row_end, int col_end) {
  const int lane = threadIdx.x % 32;
  uint32_t old[2][NT];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = ra + 8 * i;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int col = t * 8 + (lane % 4) * 2;
      old[i][t] = row < row_end && col < col_end
                      ? __ldg(reinterpret_cast<const unsigned int*>(src + (int64_t)row * ld + col))
                      : 0u;
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const T* e = reinterpret_cast<const T*>(&old[i][t]);
      acc[t][2 * i] += to_f(e[0]);
      acc[t][2 * i + 1] += to_f(e[1]);
    }
}

// Split-bf16 words. An fp32 value x is kept as hi = bf16(x) (low 16 bits) and lo = bf16(x - hi)
// (high 16 bits) in one 32-bit word, so a buffer of fp32 size holds it element for element. hi + lo
// carries ~16 significant bits with fp32's exponent range. The producers of the retrieval's mixing
// operands write these words once, so the tensor-core mixing (bf16x3: hi*hi + hi*lo + lo*hi)
// only regroups halves instead of splitting every fragment it reads.
__device__ __forceinline__ uint32_t split_word(float x) {
  const __nv_bfloat16 h = __float2bfloat16_rn(x);
  const __nv_bfloat16 l = __float2bfloat16_rn(x - __bfloat162float(h));
  return static_cast<uint32_t>(__bfloat16_as_ushort(h)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(l)) << 16);
}
__device__ __forceinline__ float unsplit_word(uint32_t w) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w & 0xffffu))) +
         __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> 16)));
}
// Split words of two consecutive k -> the bf16x2 operand registers {hi0, hi1} and {lo0, lo1}.
__device__ __forceinline__ void regroup_words(uint32_t w0, uint32_t w1, uint32_t& hi,
                                              uint32_t& lo) {
  hi = __byte_perm(w0, w1, 0x5410);
  lo = __byte_perm(w0, w1, 0x7632);
}

// D += A(16x16, row) * B(16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Hopper warpgroup MMA (wgmma, sm_90a only): the ordering around a batch of wgmma.mma_async.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes (st.shared, cp.async) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Pins registers that an in-flight wgmma reads or writes: the compiler sees them used here, so it
// neither reads the accumulators nor reuses the A registers before this point (after the wait).
template <int N> __device__ __forceinline__ void fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_operands(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}
#endif

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// acc0, acc1 (the two 8-column halves of a 16-wide n tile) += a * (hi + lo), where hi and lo
// point at the same 16 x 16 B tile of an fp32 matrix staged as two halves of the input type
// (stage_split in attn_mma.cuh): ~16 significant bits of the matrix for bf16 instead of 8.
// kTrans: the tile is stored [k][n] and read through ldmatrix.trans; else [n][k].
template <typename T, bool kTrans>
__device__ __forceinline__ void mma_split_b(float* acc0, float* acc1, const uint32_t* a,
                                            const T* hi, const T* lo) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const T* tile = half == 0 ? hi : lo;
    uint32_t b[4];
    if constexpr (kTrans) {
      ldsm_x4_t(b, tile);
    } else {
      ldsm_x4(b, tile);
    }
    mma16816<T>(acc0, a, b[0], b[1]);
    mma16816<T>(acc1, a, b[2], b[3]);
  }
}

// ldmatrix.x4 lane addresses (element offsets into a shared tile of row pitch SD elements).
// A operand (16 rows x 16 cols) at (row0, col0) of a row-major tile.
template <int SD>
__device__ __forceinline__ int a_off(int lane, int row0, int col0) {
  return (row0 + (lane % 16)) * SD + col0 + (lane / 16) * 8;
}
// B operand for two n8 tiles from a tile stored [n][k] (rows = n): regs {0,1} n-tile 0, {2,3} 1.
template <int SD>
__device__ __forceinline__ int bnk_off(int lane, int n0, int k0) {
  return (n0 + (lane / 16) * 8 + lane % 8) * SD + k0 + ((lane / 8) % 2) * 8;
}
// B operand for two n8 tiles from a tile stored [k][n] (rows = k), with ldmatrix.trans.
template <int SD>
__device__ __forceinline__ int bkn_off(int lane, int k0, int n0) {
  return (k0 + ((lane / 8) % 2) * 8 + lane % 8) * SD + n0 + (lane / 16) * 8;
}

// 16-byte async copy; when !pred the destination is zero-filled (rows past n must be zero, not
// stale: a NaN there would survive a multiplication by a zero probability).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  int bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Hint: fetch the 128-byte line at p into L2 (no register result, never faults the kernel).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// First token of the local window of token t: max(0, chunk(t)*B - w).
__device__ __forceinline__ int window_lo(int t, int chunk, int overlap) {
  return max(0, (t / chunk) * chunk - overlap);
}

}  // namespace bsbr_cuda
