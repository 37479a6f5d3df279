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
#include <type_traits>
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

// Programmatic dependent launch (compute capability 9.0+; no-ops below it and in a grid launched
// without cudaLaunchAttributeProgrammaticStreamSerialization). pdl_launch_dependents lets the
// next kernel on the stream, if launched with that attribute, start before this grid ends;
// pdl_wait blocks until the grid this one overlaps has completed and its writes are visible.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// In a kernel that may be launched to overlap the one before it (`overlap_previous`, e.g.
// AttnParams::overlap_previous): the grid must not complete before that kernel does, so its last
// CTA (the one dispatched last, which waits least) waits for it.
__device__ __forceinline__ void wait_overlapped_kernel(bool overlap_previous) {
  if (overlap_previous && blockIdx.x == gridDim.x - 1) pdl_wait();
}

// Launches kernel(args...) with `smem` bytes of dynamic shared memory; with `overlap_previous`,
// as a programmatic dependent launch (it may start before the kernel before it on the stream
// ends, once that one calls pdl_launch_dependents).
template <typename Kernel, typename... Args>
inline void launch_kernel(Kernel kernel, unsigned grid, int threads, size_t smem,
                          cudaStream_t stream, bool overlap_previous, Args... args) {
  if (overlap_previous) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
  } else {
    kernel<<<grid, threads, smem, stream>>>(args...);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// The inverse of pack2: the register's two 16-bit values (low half first) as floats.
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w) {
  const T* e = reinterpret_cast<const T*>(&w);
  return make_float2(to_f(e[0]), to_f(e[1]));
}

// Stores the pair (v0, v1) at dst[off], dst[off + 1].
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, int64_t off, float v0, float v1) {
  *reinterpret_cast<uint32_t*>(dst + off) = pack2<T>(v0, v1);
}

// Calls f(i, t, offset) for each element pair of an mma accumulator fragment acc[NT][4] in a
// [rows, ld] matrix: acc[t][2i], acc[t][2i + 1] at row ra + 8i, cols t * 8 + 2 * (lane % 4) (+1),
// offset = row * ld + col; pairs at rows >= row_end or cols >= col_end are skipped.
template <int NT, typename F>
__device__ __forceinline__ void for_each_frag_pair(int64_t ld, int ra, int row_end, int col_end,
                                                   F&& f) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = ra + 8 * i;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int col = t * 8 + (lane % 4) * 2;
      if (row < row_end && col < col_end) f(i, t, (int64_t)row * ld + col);
    }
  }
}

// Adds what a [rows, ld] output already holds to an mma accumulator fragment (fp32 sum before the
// one rounding), in for_each_frag_pair's layout; pairs it skips are left alone. All loads are
// issued before any add: a load placed after a store to the same array stays behind it, so
// loading inside the store loop cost one memory round trip per pair. The read-only path is safe:
// only this thread writes these elements, and only after this read.
template <typename T, int NT>
__device__ __forceinline__ void add_existing(float (&acc)[NT][4], const T* src, int64_t ld, int ra,
                                             int row_end, int col_end) {
  uint32_t old[2][NT] = {};
  for_each_frag_pair<NT>(ld, ra, row_end, col_end, [&](int i, int t, int64_t offset) {
    old[i][t] = __ldg(reinterpret_cast<const unsigned int*>(src + offset));
  });
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const T* e = reinterpret_cast<const T*>(&old[i][t]);
      acc[t][2 * i] += to_f(e[0]);
      acc[t][2 * i + 1] += to_f(e[1]);
    }
}

// Stores an mma accumulator fragment, rounded to T, into a [rows, ld] output, in
// for_each_frag_pair's layout; pairs it skips are left alone.
template <typename T, int NT>
__device__ __forceinline__ void store_frag(T* dst, const float (&acc)[NT][4], int64_t ld, int ra,
                                           int row_end, int col_end) {
  for_each_frag_pair<NT>(ld, ra, row_end, col_end, [&](int i, int t, int64_t offset) {
    store_pair<T>(dst, offset, acc[t][2 * i], acc[t][2 * i + 1]);
  });
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

// wgmma's 128-byte swizzled layout of an [R][D] tile of 16-bit elements: D / 64 column blocks of
// [R][64], rows of 64 elements (128 bytes), 16-byte chunk c of row r at chunk c ^ (r % 8), 8-row
// atoms of 1 KiB on 1 KiB boundaries. The element offset of 8-element chunk c (counted across the
// D columns) of row r:
template <int R>
__device__ __forceinline__ int sw(int r, int c) {
  return (c / 8) * R * 64 + r * 64 + (((c % 8) ^ (r & 7)) << 3);
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
// Barrier `id` (1..15; 0 is __syncthreads) among `threads` threads: one warpgroup of a larger CTA.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Generic-proxy shared-memory writes (st.shared, cp.async) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// A 1-D bulk copy (cp.async.bulk, the TMA unit) of `bytes` (a multiple of 16; both addresses
// 16-byte aligned) from global to shared memory that completes on an mbarrier: no registers, no
// load instructions. One thread initialises the barrier (count 1) and issues the copies; every
// thread waits for the barrier's phase 0, 1, 0, ... once per copy.
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void bulk_copy_to_smem(void* dst, const void* src, uint32_t bytes,
                                                  uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes) : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_addr(bar)), "r"(phase) : "memory");
}
// Calls f(std::integral_constant<int, n>{}) for a runtime n in [1, MAX], so that a loop of
// wgmmas up to n has a bound the compiler sees: a runtime test between two wgmmas makes ptxas
// inject a warpgroup.arrive there (C7519), serialising the batch.
template <int MAX, typename F>
__device__ __forceinline__ void with_static_count(int n, F&& f) {
  if constexpr (MAX > 1) {
    if (n < MAX) return with_static_count<MAX - 1>(n, f);
  }
  f(std::integral_constant<int, MAX>{});
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

// Descriptor of a swizzled tile at `p` (128-byte swizzle): 8-row groups 1024 bytes apart. The
// other offset only matters for operands wider than one swizzle row, which these are not; it is
// set to the same 1024 so that either reading of the two fields gives the 8-row stride.
__device__ __forceinline__ uint64_t sw_desc(const void* p) {
  const uint32_t a = smem_addr(p);
  return static_cast<uint64_t>((a & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1024 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (uint64_t{1} << 62);
}

#define BSBR_WG_D32                                                                             \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),           \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),   \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),             \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),             \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define BSBR_WG_OUT32                                                                           \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"

// d (64 x 64 fp32) += A (64 x 16, K-major tile at desc_a) * B (16 x 64, K-major tile at desc_b):
// S = Q K^T with Q and K both stored [row][dim].
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " BSBR_WG_OUT32
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : BSBR_WG_D32
                 : "l"(desc_a), "l"(desc_b), "n"(1));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " BSBR_WG_OUT32
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : BSBR_WG_D32
                 : "l"(desc_a), "l"(desc_b), "n"(1));
  }
}

// d (64 x 64 fp32) += a (64 x 16, registers in mma.sync's A layout) * B (16 x 64 at desc_b):
// kTransB, B is MN-major (stored [k][n]: V as [key][dim], the states as [state dim][dim]); else
// K-major (stored [n][k]).
template <typename T, bool kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " BSBR_WG_OUT32
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : BSBR_WG_D32
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1),
                   "n"(kTransB ? 1 : 0));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " BSBR_WG_OUT32
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : BSBR_WG_D32
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1),
                   "n"(kTransB ? 1 : 0));
  }
}
#undef BSBR_WG_D32
#undef BSBR_WG_OUT32

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

// prefetch_l2 of bytes [0, bytes) from p, a line per thread at a time, by THREADS threads.
template <int THREADS>
__device__ __forceinline__ void prefetch_l2_bytes(const void* p, int bytes) {
  const char* c = static_cast<const char*>(p);
  for (int off = threadIdx.x * 128; off < bytes; off += THREADS * 128) prefetch_l2(c + off);
}

// Where a CTA of the row-tiled attention kernels works (index = bh * cdiv(n, rows) + tile; the
// CTA's blockIdx.x unless the kernel is persistent): head bh of the b * h heads (batch element
// bi, head hi), rows [m0, m0 + rows) of it.
struct RowTile {
  int bh, bi, hi, m0;
};
__device__ __forceinline__ RowTile row_tile(const AttnParams& p, int rows,
                                            int index = static_cast<int>(blockIdx.x)) {
  const int ntile = cdiv(p.n, rows);
  const int tile = index % ntile, bh = index / ntile;
  return {bh, bh / p.h, bh % p.h, tile * rows};
}

// The fp32 [ds][D] state of chunk c of head bh in p.S (the retrieved states, chunk states or
// their gradients, by kernel).
template <int D>
__device__ __forceinline__ const float* chunk_state(const AttnParams& p, int bh, int c) {
  return p.S + ((int64_t)bh * p.num_chunks + c) * p.ds * D;
}

// First token of the local window of token t: max(0, chunk(t)*B - w).
__device__ __forceinline__ int window_lo(int t, int chunk, int overlap) {
  return max(0, (t / chunk) * chunk - overlap);
}

}  // namespace bsbr_cuda
