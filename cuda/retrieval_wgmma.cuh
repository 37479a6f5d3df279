// Retrieval mixing products S = P F (mode 0), dF = P^T dS (mode 1) and dP = dS F^T on Hopper's
// warpgroup MMA (wgmma.mma_async, sm_90a), for the fused op with fp16/bf16 inputs: the same
// products as mix_kernel (retrieval_mma.cuh: hi*hi + hi*lo, and lo*hi unless kALo is false; fp32
// accumulation), computed transposed so that nothing is regrouped in shared memory:
//   mode 0:  S^T  = F^T P^T     A(x, j) = F[j][x],  B(j, c) = P[c][j]   (B K-major)
//   mode 1:  dF^T = dS^T P      A(x, c) = dS[c][x], B(c, j) = P[c][j]   (B MN-major)
// The states (F, dS: split words, [C][X] per head, X = ds * d) are the A operand: each thread
// turns the two words of a k pair into its hi and lo operand registers with two byte permutes,
// and a wgmma takes A from registers. The weights enter as bf16 planes of P's hi (and lo) halves
// (written by the weights kernel in the forward, by p_planes_kernel from P's split words in the
// backward: bsbr_cuda.cu, weight_planes), copied by cp.async straight into wgmma's 128-byte
// swizzled layout. (The previous kernel had P as the register operand and split every stage's
// F tile into hi and lo planes in shared memory, between two barriers: its stalls were those
// barriers and shared-memory waits, and it moved P's unused lo halves through L2.)
//
// A CTA (two warpgroups) owns 128 x (rows of the state, x) by 128 output chunks (c in mode 0, j in
// mode 1): x is the wgmma's M, the chunks its N (two 64-wide blocks), the reduction runs over
// chunks in stages of 64 through a 2-stage cp.async pipeline. Inside a warp the 16 rows of x are
// permuted (fragment row g is x = 2g, row g + 8 is x = 2g + 1) so that A reads and output stores
// are 8 bytes wide.
//
// dP = dS F^T (scores_wgmma_kernel, below) has both operands as split words. There F is the B
// operand read as bf16 straight from its words: with k' = 2x + s running over the halves s of
// element x, B(k', j) = half s of F[j][x] is K-major, so the words' tile is a swizzled B tile as
// it stands, and A(c, k') = (hi of dS[c][x], for both s) gives dS_hi (F_hi + F_lo); a second
// product with A = (lo of dS[c][x], 0) adds dS_lo F_hi: the same three products as mix_kernel.
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
  const __nv_bfloat16* p_hi = nullptr;  // hi halves of P [bh][C][ldp] (weight_planes)
  const __nv_bfloat16* p_lo = nullptr;  // lo halves of P, same layout (kALo only)
  float* O = nullptr;                   // [bh][C][X]: S (mode 0) or dF (mode 1)
  int C = 0, X = 0, ldp = 0, bh = 0;
  bool group_x = false;  // the CTA order of the kernel: see mix_t_wgmma_kernel
};

constexpr int kTX = 128;          // rows of x per CTA (two warpgroups of 64)
constexpr int kTC = 128;          // output chunks per CTA
constexpr int kTK = 64;           // reduction chunks per stage
constexpr int kTThreads = 256;
constexpr int kXGroup = 16;       // x tiles per group of the CTA order (group_x)
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

// CTAs per SM of mix_t_wgmma_kernel: two when P enters as its hi half only (99 KiB of shared
// memory, <= 128 registers), one with the lo plane as well.
constexpr int t_ctas_per_sm(bool a_lo) { return a_lo ? 1 : 2; }

// CTAs of one mix_t_wgmma_kernel launch.
inline int64_t t_tiles(const MixTParams& p) {
  return (int64_t)cdiv(p.X, kTX) * cdiv(p.C, kTC) * p.bh;
}

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

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The wgmma mixing kernels' cp.async pipeline of kStages stages over k tiles [kb, ke) (with two
// stages mix_kernel's, plus the fence that makes each landed stage visible to wgmma's async
// proxy): load(stage, kt) issues one commit group; body(stage, kt) runs once tile kt is in
// `stage`, with the next kStages - 1 tiles in flight; a stage is refilled only after every thread
// has left the body that read it.
template <int kStages, typename Load, typename Body>
__device__ __forceinline__ void cp_async_pipeline(int kb, int ke, Load&& load, Body&& body) {
  // Tiles past ke commit empty groups, so that group i is always tile kb + i.
  auto issue = [&](int st, int kt) {
    if (kt < ke) {
      load(st, kt);
    } else {
      cp_async_commit();
    }
  };
  for (int i = 0; i < kStages - 1; ++i) issue(i, kb + i);
  for (int kt = kb; kt < ke; ++kt) {
    const int st = (kt - kb) % kStages;
    issue((st + kStages - 1) % kStages, kt + kStages - 1);  // into the stage body kt - 1 read
    cp_async_wait<kStages - 1>();
    fence_proxy_async();
    __syncthreads();
    body(st, kt);
    __syncthreads();
  }
}
#endif

template <int MODE, bool kALo>
__global__ void __launch_bounds__(kTThreads, t_ctas_per_sm(kALo)) mix_t_wgmma_kernel(const MixTParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(MODE == 0 || MODE == 1, "wgmma mixing covers S = P F and dF = P^T dS");
  using Smem = MixTSmem<kALo>;
  constexpr bool kTransB = MODE == 1;  // B stored [k][n]
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(
      smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024));  // [stage][plane][kB]
  float* sA = reinterpret_cast<float*>(sB + 2 * Smem::kPlanes * Smem::kB);  // [stage][kA]

  const int tiles_x = cdiv(p.X, kTX), tiles_c = cdiv(p.C, kTC);
  const int64_t tiles_bh = (int64_t)tiles_x * tiles_c;
  const int bh = static_cast<int>(blockIdx.x / tiles_bh);
  int q = static_cast<int>(blockIdx.x % tiles_bh);
  // Per head: x tiles in groups (kXGroup with group_x, else all of them), each group's column
  // tiles heaviest first, its x tiles fastest. Small groups put the CTAs that read the same rows
  // of W in the same wave (read from DRAM once); one group starts every heaviest tile first.
  const int xg = p.group_x ? min(kXGroup, tiles_x) : tiles_x;
  const int g0 = q / (xg * tiles_c) * xg;
  const int group = min(xg, tiles_x - g0);
  q -= g0 * tiles_c;
  const int x0 = (g0 + q % group) * kTX;
  int tc = q / group;
  if (MODE == 0) tc = tiles_c - 1 - tc;  // heaviest (longest reduction) first
  const int n0 = tc * kTC;
  const float* W = p.W + (int64_t)bh * p.C * p.X;
  const int64_t p_off = (int64_t)bh * p.C * p.ldp;
  // Mode 0: S[c] sums j < c; mode 1: dF[j] sums c > j (P is zero elsewhere).
  const int kb = MODE == 0 ? 0 : n0 / kTK;
  const int ke = cdiv(MODE == 0 ? min(p.C, n0 + kTC) : p.C, kTK);
  // The fused op lets the kernel it launches next start beside this one (bsbr_cuda.cu): after
  // S = P F, the forward or the backward preprocess, which wait for S before they read it; after
  // dF = P^T dS, the softmax backward, which touches nothing this reads or writes.
  pdl_launch_dependents();

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

  // One stage over the 64-wide blocks [NB0, NB1) of output chunks.
  auto stage = [&](int st, auto nb0, auto nb1) {
    constexpr int NB0 = decltype(nb0)::value, NB1 = decltype(nb1)::value;
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
      for (int nb = NB0; nb < NB1; ++nb) {
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
  };
  using Nb0 = std::integral_constant<int, 0>;
  using Nb1 = std::integral_constant<int, 1>;
  using Nb2 = std::integral_constant<int, 2>;
  cp_async_pipeline<2>(kb, ke, load, [&](int st, int kt) {
    // In the diagonal tile one stage holds nothing for one 64-wide block of output chunks (P
    // is zero there), and skips its wgmmas: mode 0's stage of j >= n0 + 64 for block 0
    // (c < n0 + 64), mode 1's stage of c < n0 + 64 for block 1 (j >= n0 + 64).
    const int k0 = kt * kTK;
    if (MODE == 0 && k0 >= n0 + 64) {
      stage(st, Nb1{}, Nb2{});
    } else if (MODE == 1 && k0 + kTK <= n0 + 64) {
      stage(st, Nb0{}, Nb1{});
    } else {
      stage(st, Nb0{}, Nb2{});
    }
  });

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
  const int64_t tiles = t_tiles(p);
  if (tiles == 0) return;
  kernel<<<static_cast<unsigned>(tiles), kTThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dP = dS F^T for j < c as split-K partial sums (mix_kernel mode 2's output: [splits][bh][C][ldo]
// fp32, j >= c zero), see the top of this file. A CTA (two warpgroups) owns 128 rows c by 128
// columns j of a tile with some j < c, and x range `split`; stages of 32 words of x (64 bf16 k').
struct ScoresParams {
  const float* dS = nullptr;  // split words [bh][C][X]
  const float* F = nullptr;   // split words [bh][C][X]
  float* O = nullptr;         // [splits][bh][C][ldo]
  int C = 0, X = 0, ldo = 0, bh = 0, splits = 1, k_split = 0;
};

constexpr int kSBM = 128, kSBN = 128, kSKW = 32;  // tile rows c, cols j, words of x per stage
constexpr int kSPitch = kSKW + 4;  // A rows 4 banks apart: the fragment reads are conflict-free
// Three stages (103 KiB: still 2 CTAs per SM), so that two are in flight while one computes:
// with two the kernel stalled on its barriers, waiting for each stage's loads.
constexpr int kScoresStages = 3;
constexpr size_t kScoresSmem =
    1024 + kScoresStages * (kSBN * 2 * kSKW * sizeof(__nv_bfloat16) +
                            kSBM * kSPitch * sizeof(float));

static __global__ void __launch_bounds__(kTThreads, 2) scores_wgmma_kernel(const ScoresParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kB = kSBN * 2 * kSKW;  // bf16 elements of a B tile
  constexpr int kA = kSBM * kSPitch;   // words of an A tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(
      smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024));  // [stage][kB]
  float* sA = reinterpret_cast<float*>(sB + kScoresStages * kB);   // [stage][kA]

  // Tiles with some j < c: pairs (tc, tj <= tc), numbered row by row.
  const int tm = cdiv(p.C, kSBM);
  const int64_t active = (int64_t)tm * (tm + 1) / 2;
  int64_t blk = blockIdx.x;
  const int64_t q = blk % active;
  blk /= active;
  const int split = static_cast<int>(blk % p.splits);
  const int bh = static_cast<int>(blk / p.splits);
  int tc = static_cast<int>((sqrt(8.0 * q + 1.0) - 1.0) / 2.0);
  while ((int64_t)tc * (tc + 1) / 2 > q) --tc;
  while ((int64_t)(tc + 1) * (tc + 2) / 2 <= q) ++tc;
  const int tj = static_cast<int>(q - (int64_t)tc * (tc + 1) / 2);
  const int m0 = tc * kSBM, n0 = tj * kSBN;
  const int xb = split * p.k_split, xe = min(p.X, xb + p.k_split);
  const int kb = xb / kSKW, ke = cdiv(xe, kSKW);
  const float* dS = p.dS + (int64_t)bh * p.C * p.X;
  const float* F = p.F + (int64_t)bh * p.C * p.X;
  // The fused op launches the dQ kernel next, which reads nothing this writes, to run beside
  // this barrier-bound kernel (bsbr_cuda.cu).
  pdl_launch_dependents();

  // Per thread and stage: 4 pieces of the A tile and 4 of the B tile (rows 32 apart).
  const int r_ld = threadIdx.x / 8, c_ld = threadIdx.x % 8;
  auto load = [&](int st, int kt) {
    const int x = kt * kSKW + c_ld * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r_ld + 32 * i;
      const bool a_ok = m0 + r < p.C && x < xe;
      cp_async16(sA + st * kA + r * kSPitch + c_ld * 4,
                 a_ok ? dS + (int64_t)(m0 + r) * p.X + x : dS, a_ok);
      const bool b_ok = n0 + r < p.C && x < xe;
      cp_async16(sB + st * kB + sw<kSBN>(r, c_ld), b_ok ? F + (int64_t)(n0 + r) * p.X + x : F,
                 b_ok);
    }
    cp_async_commit();
  };

  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int rg = wg * 64 + warp * 16 + g;  // fragment rows rg and rg + 8 of the tile
  float acc[2][32];
#pragma unroll
  for (int nb = 0; nb < 2; ++nb)
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[nb][i] = 0.f;

  cp_async_pipeline<kScoresStages>(kb, ke, load, [&](int st, int) {
    const float* a_tile = sA + st * kA;
    const __nv_bfloat16* b_tile = sB + st * kB;
    // A fragments in two register sets, as in mix_t_wgmma_kernel. A k' step of 16 is 8 words
    // of x: fragment e covers x = 8 ks + t (+4 for e >= 2) of row rg (+8 for odd e).
    uint32_t a[2][2][4];  // [set][{hi, hi}, {lo, 0}][fragment]
#pragma unroll
    for (int ks = 0; ks < 2 * kSKW / 16; ++ks) {
      uint32_t(&set)[2][4] = a[ks & 1];
      if (ks >= 2) {
        wgmma_wait<1>();
        fence_operands(set);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float* w = a_tile + (rg + 8 * (e & 1)) * kSPitch + 8 * ks + t + 4 * (e / 2);
        const uint32_t word = __float_as_uint(*w);
        set[0][e] = __byte_perm(word, 0, 0x1010);
        set[1][e] = word >> 16;
      }
      wgmma_fence();
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        const uint64_t desc = sw_desc(b_tile + nb * 64 * 64) + 2 * ks;
        wgmma_rs<__nv_bfloat16, false>(acc[nb], set[0], desc);
        wgmma_rs<__nv_bfloat16, false>(acc[nb], set[1], desc);
      }
      wgmma_commit();
    }
    wgmma_wait<0>();
    fence_operands(acc[0]);
    fence_operands(acc[1]);
    fence_operands(a[0]);
    fence_operands(a[1]);
  });

  // acc[nb][4j + e]: row rg (+8 for e >= 2), column 64 nb + 8j + 2t (+1 for odd e).
  float* O = p.O + ((int64_t)split * p.bh + bh) * p.C * p.ldo;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int c = m0 + rg + 8 * hh;
    if (c >= p.C) continue;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = n0 + nb * 64 + j * 8 + 2 * t;
        if (col < p.ldo) {  // only j < c is kept (P is zero elsewhere; no garbage for 0 * x)
          *reinterpret_cast<float2*>(O + (int64_t)c * p.ldo + col) =
              make_float2(col < c ? acc[nb][4 * j + 2 * hh] : 0.f,
                          col + 1 < c ? acc[nb][4 * j + 2 * hh + 1] : 0.f);
        }
      }
  }
#endif
}

inline void launch_scores_wgmma(const ScoresParams& p, cudaStream_t stream) {
  auto kernel = scores_wgmma_kernel;
  allow_dynamic_smem(kernel, kScoresSmem);
  const int64_t tm = cdiv(p.C, kSBM);
  const int64_t blocks = tm * (tm + 1) / 2 * p.splits * p.bh;
  if (blocks == 0) return;
  kernel<<<static_cast<unsigned>(blocks), kTThreads, kScoresSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mix
}  // namespace bsbr_cuda
