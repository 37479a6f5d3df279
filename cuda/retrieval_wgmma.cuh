// Retrieval mixing products S = P F (mode 0) and dF = P^T dS (mode 1) on Hopper's warpgroup MMA
// (wgmma.mma_async, sm_90a), for the fused op with fp16/bf16 inputs: the same products as
// mix_kernel (retrieval_mma.cuh: hi*hi + hi*lo, and lo*hi unless kALo is false; fp32
// accumulation), computed transposed so that nothing is regrouped in shared memory:
//   mode 0:  S^T  = F^T P^T     A(x, j) = F[j][x],  B(j, c) = P[c][j]   (B K-major)
//   mode 1:  dF^T = dS^T P      A(x, c) = dS[c][x], B(c, j) = P[c][j]   (B MN-major)
// The states (F, dS: split words, [C][X] per head, X = ds * d) are the A operand: each thread
// turns the two words of a k pair into its hi and lo operand registers with two byte permutes,
// and a wgmma takes A from registers. The weights enter as bf16 planes of P's hi (and lo) halves
// (p_planes_kernel, bsbr_cuda.cu), copied by cp.async straight into wgmma's 128-byte swizzled layout. (The
// previous kernel had P as the register operand and split every stage's F tile into hi and lo
// planes in shared memory, between two barriers: its stalls were those barriers and shared-memory
// waits, and it moved P's unused lo halves through L2.)
//
// A CTA (two warpgroups) owns 128 x (rows of the state, x) by 128 output chunks (c in mode 0, j in
// mode 1): x is the wgmma's M, the chunks its N (two 64-wide blocks), the reduction runs over
// chunks in stages of 64 through a 2-stage cp.async pipeline. Inside a warp the 16 rows of x are
// permuted (fragment row g is x = 2g, row g + 8 is x = 2g + 1) so that A reads and output stores
// are 8 bytes wide.
//
// The device code exists only when compiling for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the host
// launches it only on a compute capability 9.0 GPU of a build that has sm_90a code (BSBR_WGMMA,
// bsbr_cuda.cu).
#pragma once

#include "retrieval_mma.cuh"

namespace bsbr_cuda {
namespace mix {

struct MixTParams {
  const float* W = nullptr;            // split words [bh][C][X]: F (mode 0) or dS (mode 1)
  const __nv_bfloat16* p_hi = nullptr;  // hi halves of P [bh][C][ldp] (p_planes_kernel, bsbr_cuda.cu)
  const __nv_bfloat16* p_lo = nullptr;  // lo halves of P, same layout (kALo only)
  float* O = nullptr;                   // [bh][C][X]: S (mode 0) or dF (mode 1)
  int C = 0, X = 0, ldp = 0, bh = 0;
};

constexpr int kTX = 128;          // rows of x per CTA (two warpgroups of 64)
constexpr int kTC = 128;          // output chunks per CTA
constexpr int kTK = 64;           // reduction chunks per stage
constexpr int kTThreads = 256;
constexpr int kWPitch = kTX + 4;  // words: rows 2t apart land 8t banks apart (conflict-free)

template <bool kALo>
struct MixTSmem {
  static constexpr int kB = kTC * kTK;         // bf16 elements of one plane tile
  static constexpr int kA = kTK * kWPitch;     // words of one A tile
  static constexpr int kPlanes = kALo ? 2 : 1;
  // 1 KiB of slack to align the swizzled tiles (first) to an atom; then the A tiles.
  static constexpr size_t kBytes =
      1024 + 2 * (kPlanes * kB * sizeof(__nv_bfloat16) + kA * sizeof(float));
};

// Async copy of a ROWS x COLS bf16 tile (global rows r0.., cols c0..) into the swizzled layout;
// pieces outside [rows, cols) are zero-filled.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_plane_tile(__nv_bfloat16* s, const __nv_bfloat16* g, int ld,
                                                int rows, int cols, int r0, int c0) {
  constexpr int CPR = COLS / 8;
  static_assert(ROWS * CPR % kTThreads == 0, "tile pieces must divide among the threads");
#pragma unroll
  for (int i = 0; i < ROWS * CPR / kTThreads; ++i) {
    const int idx = i * kTThreads + threadIdx.x, r = idx / CPR, c = idx % CPR;
    const bool ok = r0 + r < rows && c0 + c * 8 < cols;
    cp_async16(s + sw<ROWS>(r, c), ok ? g + (int64_t)(r0 + r) * ld + c0 + c * 8 : g, ok);
  }
}

// The hi and lo A fragments of reduction rows [k0, k0 + 16) for the warp's 16 rows of x starting
// at xr, from an A tile of words stored [k][x]: fragment row g is x = xr + 2g and row g + 8 is
// x = xr + 2g + 1, so one 8-byte read gives both rows of one k.
__device__ __forceinline__ void load_a_rows2(const float* as, int xr, int k0, uint32_t (&hi)[4],
                                             uint32_t (&lo)[4]) {
  const int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float* base = as + (k0 + 2 * t + 8 * half) * kWPitch + xr + 2 * g;
    const uint2 k_even = *reinterpret_cast<const uint2*>(base);
    const uint2 k_odd = *reinterpret_cast<const uint2*>(base + kWPitch);
    regroup_words(k_even.x, k_odd.x, hi[2 * half], lo[2 * half]);
    regroup_words(k_even.y, k_odd.y, hi[2 * half + 1], lo[2 * half + 1]);
  }
}

// Two CTAs per SM when P enters as its hi half only (99 KiB of shared memory, <= 128 registers);
// one with the lo plane as well.
template <int MODE, bool kALo>
__global__ void __launch_bounds__(kTThreads, kALo ? 1 : 2) mix_t_wgmma_kernel(const MixTParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(MODE == 0 || MODE == 1, "wgmma mixing covers S = P F and dF = P^T dS");
  using Smem = MixTSmem<kALo>;
  constexpr bool kTransB = MODE == 1;  // B stored [k][n]
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(
      smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024));  // [stage][plane][kB]
  float* sA = reinterpret_cast<float*>(sB + 2 * Smem::kPlanes * Smem::kB);  // [stage][kA]

  const int tiles_x = cdiv(p.X, kTX), tiles_c = cdiv(p.C, kTC);
  int64_t blk = blockIdx.x;
  const int x0 = static_cast<int>(blk % tiles_x) * kTX;
  blk /= tiles_x;
  int tc = static_cast<int>(blk % tiles_c);
  if (MODE == 0) tc = tiles_c - 1 - tc;  // heaviest (longest reduction) first
  const int bh = static_cast<int>(blk / tiles_c);
  const int n0 = tc * kTC;
  const float* W = p.W + (int64_t)bh * p.C * p.X;
  const int64_t p_off = (int64_t)bh * p.C * p.ldp;
  // Mode 0: S[c] sums j < c; mode 1: dF[j] sums c > j (P is zero elsewhere).
  const int kb = MODE == 0 ? 0 : n0 / kTK;
  const int ke = cdiv(MODE == 0 ? min(p.C, n0 + kTC) : p.C, kTK);

  // Stage loads: 8 pieces of the A tile (rows 8 apart) and 4 of each plane tile per thread.
  const int a_r = threadIdx.x / 32, a_c = (threadIdx.x % 32) * 4;
  const bool a_col_ok = x0 + a_c < p.X;
  const float* a_src = W + x0 + a_c;
  auto load = [&](int st, int kt) {
    const int k0 = kt * kTK;
    float* sa = sA + st * Smem::kA + a_r * kWPitch + a_c;
#pragma unroll
    for (int i = 0; i < kTK / 8; ++i) {
      const int k = k0 + a_r + 8 * i;
      const bool ok = a_col_ok && k < p.C;
      cp_async16(sa + 8 * i * kWPitch, ok ? a_src + (int64_t)k * p.X : W, ok);
    }
#pragma unroll
    for (int pl = 0; pl < Smem::kPlanes; ++pl) {
      __nv_bfloat16* s = sB + (st * Smem::kPlanes + pl) * Smem::kB;
      const __nv_bfloat16* g = (pl == 0 ? p.p_hi : p.p_lo) + p_off;
      if constexpr (MODE == 0) {
        load_plane_tile<kTC, kTK>(s, g, p.ldp, p.C, p.ldp, n0, k0);  // [c][j]
      } else {
        load_plane_tile<kTK, kTC>(s, g, p.ldp, p.C, p.ldp, k0, n0);  // [c][j]
      }
    }
    cp_async_commit();
  };

  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int xr = wg * 64 + warp * 16;
  float acc[2][32];
#pragma unroll
  for (int nb = 0; nb < 2; ++nb)
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[nb][i] = 0.f;

  if (kb < ke) load(0, kb);
  for (int kt = kb; kt < ke; ++kt) {
    const int st = (kt - kb) & 1;
    if (kt + 1 < ke) {
      load(st ^ 1, kt + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();
    __syncthreads();
    // A fragments in two register sets: the k step ks + 2 reuses the set of step ks once the
    // wgmma group that read it has completed, so its shared-memory reads overlap step ks + 1.
    const __nv_bfloat16* hi_tile = sB + st * Smem::kPlanes * Smem::kB;
    uint32_t a[2][2][4];  // [set][hi, lo][fragment]
#pragma unroll
    for (int ks = 0; ks < kTK / 16; ++ks) {
      uint32_t(&as)[2][4] = a[ks & 1];
      if (ks >= 2) {
        wgmma_wait<1>();
        fence_operands(as);
      }
      load_a_rows2(sA + st * Smem::kA, xr, ks * 16, as[0], as[1]);
      wgmma_fence();
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        // Both layouts put the 64-wide n block nb at 64 * 64 elements; a k step of 16 is 32
        // bytes along a swizzled row (K-major) or two 8-row atoms (MN-major).
        const uint64_t step = kTransB ? (2048 >> 4) * ks : 2 * ks;
        const uint64_t d_hi = sw_desc(hi_tile + nb * 64 * 64) + step;
        wgmma_rs<__nv_bfloat16, kTransB>(acc[nb], as[0], d_hi);
        wgmma_rs<__nv_bfloat16, kTransB>(acc[nb], as[1], d_hi);
        if constexpr (kALo) {
          wgmma_rs<__nv_bfloat16, kTransB>(acc[nb], as[0],
                                           sw_desc(hi_tile + Smem::kB + nb * 64 * 64) + step);
        }
      }
      wgmma_commit();
    }
    wgmma_wait<0>();
    fence_operands(acc[0]);
    fence_operands(acc[1]);
    fence_operands(a[0]);
    fence_operands(a[1]);
    __syncthreads();  // every read of this stage is done before it is refilled
  }

  // acc[nb][4j + e]: fragment row g (+8 for e >= 2), i.e. x = xr + 2g (+1); output chunk
  // n0 + 64 nb + 8j + 2t (+1 for odd e).
  const int g = lane / 4, t = lane % 4;
  const int x = x0 + xr + 2 * g;
  if (x < p.X) {
    float* O = p.O + (int64_t)bh * p.C * p.X + x;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int odd = 0; odd < 2; ++odd) {
          const int n = n0 + nb * 64 + j * 8 + 2 * t + odd;
          if (n < p.C) {
            *reinterpret_cast<float2*>(O + (int64_t)n * p.X) =
                make_float2(acc[nb][4 * j + odd], acc[nb][4 * j + 2 + odd]);
          }
        }
  }
#endif
}

template <int MODE, bool kALo>
inline void launch_mix_t_wgmma(const MixTParams& p, cudaStream_t stream) {
  const size_t smem = MixTSmem<kALo>::kBytes;
  auto kernel = mix_t_wgmma_kernel<MODE, kALo>;
  allow_dynamic_smem(kernel, smem);
  const int64_t tiles = (int64_t)cdiv(p.X, kTX) * cdiv(p.C, kTC) * p.bh;
  if (tiles == 0) return;
  kernel<<<static_cast<unsigned>(tiles), kTThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mix
}  // namespace bsbr_cuda
