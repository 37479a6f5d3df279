// Chunk attention forward, dQ and dK/dV on Hopper's warpgroup MMA (wgmma.mma_async, sm_90a), head
// dims 64 and 128, fp16 / bf16. The forward: the same algorithm, tiles and numerics as
// mma::attn_fwd_kernel (attn_mma.cuh), with the products fed differently. Under mma.sync every
// warp read all of each K and V tile through ldmatrix (4 warps: 4x the tile in shared-memory
// reads) and held Q's fragments in registers. Here each 64 query rows are one warpgroup (a CTA
// has kFwdWarpgroups<D> of them): S = Q K^T takes both operands from shared memory, O += P V
// takes P from registers (the S accumulator, as in FlashAttention-2) and V from shared memory;
// each tile is read once per warpgroup and Q needs no registers.
//
// Tiles live in shared memory in wgmma's 128-byte swizzled layout: an [R][D] tile is D / 64
// column blocks of [R][64], rows of 64 elements (128 bytes), 16-byte chunk c of row r at chunk
// c ^ (r % 8), 8-row atoms of 1 KiB on 1 KiB boundaries. A cp.async of one global 128-byte row then
// fills one 128-byte smem row (a no-swizzle core-matrix layout would scatter it over 8 core
// matrices: Run 10).
//
// The wgmma accumulator of m64nNk16 gives warp w rows 16w .. 16w + 15 in mma.sync's m16n8
// fragment layout (d[4j + e]: row g (+8 for e >= 2), cols 8j + 2t (+1)), and the register A
// operand has mma.sync's A layout: the softmax and the epilogue are mma::attn_fwd_kernel's.
//
// Device code exists only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the host launches it only on a
// compute capability 9.0 GPU of a build with sm_90a code (AttnParams::wgmma, bsbr_cuda.cu).
#pragma once

#include "attn_mma.cuh"

namespace bsbr_cuda {
namespace wg {

constexpr int kThreads = 128;  // one warpgroup
constexpr int kBM = 64;        // query rows per CTA (the warpgroup's M)
constexpr int kBN = 64;        // keys per tile
// The forward's CTA: kFwdWarpgroups<D> warpgroups, one per 64 query rows, sharing the K / V
// tiles and the staged S_c. At D = 128 two warpgroups load 2 instead of 3 K / V tiles per chunk
// of 128 and stage S_c (64 KiB) once instead of twice: H200, 64k, 792 -> 719 us. At D = 64 one
// (257 us against 267 with two): 4 CTAs per SM interleave more than 2 CTAs of 2 warpgroups.
template <int D> constexpr int kFwdWarpgroups = D == 128 ? 2 : 1;
// The S_c the epilogue needs are fetched by bulk copies (TMA) into shared memory, so the
// epilogue converts them from there instead of waiting on their global loads. At D = 128 (one
// CTA per SM) they land in two buffers of their own, and the CTA is persistent (it walks tiles
// blockIdx.x, + gridDim.x, ...; the host launches one per SM) so that the next tile's S_c arrives
// while this tile computes. At D = 64 a 16 KiB buffer would cost a CTA per SM (and 4 CTAs per SM
// overlap each other's loads anyway), so it lands in the K / V stage that the last key tile
// does not use, issued as soon as that stage is free (a stage's K and V tiles are adjacent:
// together they are exactly one fp32 [64][64] S_c).
template <int D> constexpr bool kFwdOwnStatesBuffer = D == 128;
// Shared memory: Q ([64][D] per warpgroup), then 2 stages of K and V ([64][D] each, K then V),
// then with kFwdOwnStatesBuffer two fp32 S_c buffers ([D][D]), then the copies' mbarriers (one,
// or one per buffer); plus 1 KiB to align the start to an atom. D = 128: 225 KiB.
template <typename T, int D>
constexpr size_t kSmemBytes = (kFwdWarpgroups<D> + 4) * 64 * D * sizeof(T) +
                              (kFwdOwnStatesBuffer<D> ? 2 * D * D * sizeof(float) : 0) + 16 + 1024;
// CTAs per SM: at D = 64 shared memory allows 5, registers 4 (at 5, 96 each, it spilled and ran
// 3.6% slower on an H100: docs/cuda_notes.md, Run 27); at 128 (two warpgroups, 229 registers,
// 225 KiB of shared memory) one.
template <int D> constexpr int kMinBlocks = D == 64 ? 4 : 1;

// Async copy of rows [r0, r0 + 64) of a [n, D] strided matrix into a swizzled tile by a group of
// THREADS threads (the CTA, or one warpgroup of it); rows outside [0, n) read as 0.
template <typename T, int D, int THREADS = kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* base, int64_t stride_n, int r0, int n) {
  constexpr int CPR = D / 8;
#pragma unroll
  for (int i = 0; i < 64 * CPR / THREADS; ++i) {
    const int idx = i * THREADS + threadIdx.x % THREADS, r = idx / CPR, c = idx % CPR;
    const int t = r0 + r;
    const bool ok = t >= 0 && t < n;
    cp_async16(s + sw<64>(r, c), ok ? base + (int64_t)t * stride_n + c * 8 : base, ok);
  }
}


// The forward's and dQ's 2-stage K / V pipeline, before key tile j (keys from n0): issues the
// cp.async loads of tile j + 1 into the other stage, then waits until tile j's stage is filled
// and visible to wgmma (every thread of the CTA, of THREADS, calls it). STAGE: elements from one
// stage's K (and V) tile to the next's.
template <typename T, int D, int THREADS = kThreads, int STAGE = kBN * D>
__device__ __forceinline__ void kv_stage_ready(const AttnParams& p, T* sK, T* sV, const T* kb,
                                               const T* vb, int j, int nkv, int n0) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if (j + 1 < nkv) {
    const int st = (j + 1) & 1;
    load_tile<T, D, THREADS>(sK + st * STAGE, kb, p.k_st.n, n0 + kBN, p.n);
    load_tile<T, D, THREADS>(sV + st * STAGE, vb, p.v_st.n, n0 + kBN, p.n);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  fence_proxy_async();
  __syncthreads();
#endif
}

// A 64 x 64 fp32 block of an m16n8 accumulator array (o: columns 64 nb .., s: all of it) as the
// 32 registers of a warpgroup's m64n64 accumulator: the two layouts are the same.
template <int N>
__device__ __forceinline__ float (&acc64(float (&a)[N][4], int nb))[32] {
  return *reinterpret_cast<float(*)[32]>(&a[8 * nb][0]);
}

// acc (64 x D) += A V, with A the 64 x kBN register operand a (k steps of 16) and V a swizzled
// [kBN][D] tile read MN-major: a k step of 16 rows is two 8-row atoms (2048 bytes). Waits for the
// products.
template <typename T, int D>
__device__ __forceinline__ void add_frags_times_tile(float (&acc)[D / 8][4],
                                                     uint32_t (&a)[kBN / 16][4], const T* tile) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wgmma_fence();
#pragma unroll
  for (int nb = 0; nb < D / 64; ++nb)
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
      wgmma_rs<T, true>(acc64(acc, nb), a[kk], sw_desc(tile + nb * kBN * 64) + (2048 >> 4) * kk);
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int nb = 0; nb < D / 64; ++nb) fence_operands(acc64(acc, nb));
  fence_operands(a);
#endif
}

// acc (64 x D) += X V for the current tile, with X the 64 x kBN fp32 accumulator x (P in the
// forward, dS in dQ) rounded to T as the register A operand (add_frags_times_tile).
template <typename T, int D>
__device__ __forceinline__ void add_regs_times_tile(float (&acc)[D / 8][4],
                                                    const float (&x)[kBN / 8][4], const T* tile) {
  uint32_t a[kBN / 16][4];
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) mma::p_fragment<T>(a[kk], x, kk);
  add_frags_times_tile<T, D>(acc, a, tile);
}

// s = A1 B1^T and dp = A2 B2^T (64 x 64, fp32) summed over D, for swizzled [64][D] tiles read
// K-major: a k step of 16 of the D columns is 32 bytes along a swizzled row. The backward's two
// score products (dQ: Q K^T and dO V^T; dK/dV: K Q^T and V dO^T). Waits for the products.
template <typename T, int D>
__device__ __forceinline__ void two_products(float (&s)[8][4], float (&dp)[8][4], const T* a1,
                                             const T* b1, const T* a2, const T* b2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int blk = kk / 4, step = 2 * (kk % 4);
    wgmma_ss<T>(acc64(s, 0), sw_desc(a1 + blk * 64 * 64) + step, sw_desc(b1 + blk * 64 * 64) + step);
    wgmma_ss<T>(acc64(dp, 0), sw_desc(a2 + blk * 64 * 64) + step, sw_desc(b2 + blk * 64 * 64) + step);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc64(s, 0));
  fence_operands(acc64(dp, 0));
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(kFwdWarpgroups<D> * kThreads, kMinBlocks<D>) attn_fwd_kernel(AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NB = D / 64;  // 64-column blocks of the output
  constexpr int WGS = kFwdWarpgroups<D>, THREADS = WGS * kThreads, ROWS = WGS * kBM;
  constexpr bool kOwn = kFwdOwnStatesBuffer<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024));
  constexpr int STAGE = 2 * kBN * D;  // a stage: its K tile, then its V tile
  T* sK = sQ + ROWS * D;               // [2][K, V][64][D]
  T* sV = sK + kBN * D;
  float* sS_own = reinterpret_cast<float*>(sK + 2 * STAGE);  // [2][ds][D] (kFwdOwnStatesBuffer)
  uint64_t* s_ready = reinterpret_cast<uint64_t*>(sS_own + (kOwn ? 2 * D * D : 0));  // [1 or 2]

  const int n = p.n, B = p.chunk, w = p.overlap;
  const int g = threadIdx.x / kThreads;  // this thread's warpgroup
  const int warp = threadIdx.x % kThreads / 32, lane = threadIdx.x % 32;
  const T* sQg = sQ + g * kBM * D;  // the warpgroup's 64 rows of Q
  const int ntiles = cdiv(n, ROWS) * p.b * p.h;
  // The chunks [c_first, c_last] that rows [m0, m0 + ROWS) meet.
  auto chunks_of = [&](int m0, int& c_first, int& c_last) {
    c_first = m0 / B;
    c_last = (min(n, m0 + ROWS) - 1) / B;
  };
  const uint32_t states_bytes = p.ds * D * sizeof(float);

  // kOwn (D = 128, one CTA per SM): the CTA is persistent, tiles blockIdx.x, + gridDim.x, ...,
  // so that a tile's S_c copies are issued while the tile before it computes: the S_c of the
  // CTA's (tile, chunk) pairs stream through two buffers (copy k: buffer and mbarrier k % 2,
  // phase k / 2 % 2), copy k + 2 issued as soon as copy k is split. Without it a CTA's loads
  // and its compute did not overlap (one CTA per SM: 62% of DRAM bandwidth, Run 21). Thread 0
  // keeps the cursor of the next copy to issue (t_next < ntiles while there is one).
  int t_next = static_cast<int>(blockIdx.x), bh_next = 0, c_next = 0, c_next_last = 0;
  int copies_used = 0;
  auto seek_tile = [&] {  // the cursor's head and first chunk: tile t_next's
    const RowTile tile = row_tile(p, ROWS, t_next);
    bh_next = tile.bh;
    chunks_of(tile.m0, c_next, c_next_last);
  };
  auto issue_next_copy = [&](int k) {
    if (t_next >= ntiles) return;
    const float* S_c = chunk_state<D>(p, bh_next, c_next);
    bulk_copy_to_smem(sS_own + (k & 1) * D * D, S_c, states_bytes, s_ready + (k & 1));
    if (c_next < c_next_last) {
      ++c_next;
    } else {
      t_next += gridDim.x;
      if (t_next < ntiles) seek_tile();
    }
  };
  if (threadIdx.x == 0) {
    mbar_init(s_ready);
    if constexpr (kOwn) {
      mbar_init(s_ready + 1);
      seek_tile();
    }
  }

  for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {  // one tile without kOwn (break below)
    const auto [bh, bi, hi, m0] = row_tile(p, ROWS, t);
    const int r0g = m0 + g * kBM;
    const int tw = r0g + warp * 16;  // 16 | B, so a warp's rows share one chunk
    const bool warp_ok = tw < n;
    const int cw = min(tw, n - 1) / B;
    const int lo_w = max(0, cw * B - w);
    const int ra = tw + lane / 4;
    // Keys [lo_g, hi_g) are the warpgroup's: it skips the tiles outside them (all masked).
    const int lo_g = window_lo(min(r0g, n - 1), B, w), hi_g = min(n, r0g + kBM);

    const T* kb = mma::head_ptr<T>(p.k, p.k_st, bi, hi);
    const T* vb = mma::head_ptr<T>(p.v, p.v_st, bi, hi);
    const int kv_lo = window_lo(m0, B, w), kv_hi = min(n, m0 + ROWS);
    const int nkv = cdiv(kv_hi - kv_lo, kBN);
    // Without kOwn the S_c copies land in the stage of key tile nkv - 2 (free from key tile
    // nkv - 1 on; never used when nkv = 1).
    const bool states_copy_at_start = nkv == 1;

    if (t != static_cast<int>(blockIdx.x)) __syncthreads();  // the tile before is done with sQ, sK
    const T* qb = mma::head_ptr<T>(p.q, p.q_st, bi, hi);
#pragma unroll
    for (int i = 0; i < WGS; ++i) {
      load_tile<T, D, THREADS>(sQ + i * kBM * D, qb, p.q_st.n, m0 + i * kBM, n);
    }
    load_tile<T, D, THREADS>(sK, kb, p.k_st.n, kv_lo, n);
    load_tile<T, D, THREADS>(sV, vb, p.v_st.n, kv_lo, n);
    cp_async_commit();
    if (t == static_cast<int>(blockIdx.x)) {  // the CTA's first tile, its loads in flight
      // S may still be in the making (AttnParams::waits_for_previous): nothing reads it before.
      if (p.waits_for_previous) pdl_wait();
      if constexpr (kOwn) {
        if (threadIdx.x == 0) {
          issue_next_copy(0);
          issue_next_copy(1);
        }
      }
    }
    int c_first, c_last;
    chunks_of(m0, c_first, c_last);
    float* sS_stage = reinterpret_cast<float*>(sK + (nkv & 1) * STAGE);
    // One thread's bulk copy of chunk c's S_c into the stage (without kOwn).
    auto copy_states = [&](int c) {
      bulk_copy_to_smem(sS_stage, chunk_state<D>(p, bh, c), states_bytes, s_ready);
    };
    if constexpr (!kOwn) {
      if (threadIdx.x == 0 && states_copy_at_start) copy_states(c_first);
    }
    // A copy issued late (from the last key tile on) still finds its S_c in L2.
    mma::prefetch_states<D, THREADS>(p, bh, c_first + (kOwn ? 1 : 0), c_last);

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    const float sl2 = p.scale * kLog2e;

    for (int j = 0; j < nkv; ++j) {
      const int n0 = kv_lo + j * kBN;
      if constexpr (!kOwn) {
        if (!states_copy_at_start && j == nkv - 1 && threadIdx.x == 0) {
          // the stage of tile j - 1: every read of it ended at that tile's closing barrier
          copy_states(c_first);
        }
      }
      kv_stage_ready<T, D, THREADS, STAGE>(p, sK, sV, kb, vb, j, nkv, n0);
      const T* sKs = sK + (j & 1) * STAGE;
      const T* sVs = sV + (j & 1) * STAGE;

      if (r0g < n && n0 < hi_g && n0 + kBN > lo_g) {  // warpgroup-uniform
        // S = Q K^T. A k step of 16 dims is 32 bytes along a swizzled row (2 in the descriptor's
        // 16-byte units), 4 steps per 64-column block.
        float s[kBN / 8][4];
#pragma unroll
        for (int i = 0; i < kBN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const int blk = kk / 4, step = 2 * (kk % 4);
          wgmma_ss<T>(acc64(s, 0), sw_desc(sQg + blk * kBM * 64) + step,
                      sw_desc(sKs + blk * kBN * 64) + step);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(acc64(s, 0));

        mma::softmax_tile(s, o, m_r, l_r, n0, ra, lo_w, n, sl2);
        add_regs_times_tile<T, D>(o, s, sVs);  // O += P V
      }
      __syncthreads();  // every read of this stage is done before it is refilled
    }

    mma::normalize_rows(o, l_r);

    // Long-range term o += state_scale * qs S_c (mma::attn_fwd_kernel: S_c split hi + lo), with
    // S_c (copied into shared memory) split into halves as swizzled [D][D] tiles, hi then lo: in
    // the stage of the last key tile at D = 64, in both stages at 128; staged once for the CTA's
    // warpgroups. A warpgroup issues the product for every chunk its rows meet (several when B is
    // not a multiple of 64); a warp whose rows are in another chunk enters with A = 0.
    {
      const int ds = p.ds, dsp = (ds + 15) / 16 * 16;
      const T* qsb = mma::head_ptr<T>(p.qs, p.qs_st, bi, hi);
      T* sHi = sK + (kOwn ? 0 : ((nkv - 1) & 1) * STAGE);
      T* sLo = sHi + D * D;
      for (int c = c_first; c <= c_last; ++c) {
        __syncthreads();
        const int k = copies_used++;
        const float* sS = kOwn ? sS_own + (k & 1) * D * D : sS_stage;
        mbar_wait(s_ready + (kOwn ? k & 1 : 0), kOwn ? (k >> 1) & 1 : (c - c_first) & 1);
        mma::stage_split_at<T, D, D == 128 ? 16 : 8, THREADS>(
            sHi, sLo, sS, ds, dsp, p.state_scale,
            [](int r, int col) { return sw<D>(r, col / 8) + col % 8; });
        fence_proxy_async();
        __syncthreads();
        if (threadIdx.x == 0) {  // S_c is read: its buffer takes the next copy
          if constexpr (kOwn) {
            issue_next_copy(k);
          } else if (c < c_last) {
            copy_states(c + 1);
          }
        }
        if (r0g >= min(n, (c + 1) * B) || hi_g <= c * B) continue;  // no row of it in chunk c
        const bool mine = warp_ok && cw == c;
        uint32_t a[D / 16][4];
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          if (p.qs_is_q) {  // the Q tile is still in shared memory (zero past n)
            ldsm_x4(a[kk], sQg + sw<kBM>(warp * 16 + lane % 16, kk * 2 + lane / 16));
          } else {
            mma::load_a_global(a[kk], qsb, p.qs_st.n, ra, kk * 16, n, ds);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) a[kk][i] = mine ? a[kk][i] : 0u;
        }
        with_static_count<D / 16>(dsp / 16, [&](auto k_steps) {  // the state dims, 16 per step
          wgmma_fence();
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            const uint64_t hi_desc = sw_desc(sHi + nb * D * 64);
            const uint64_t lo_desc = sw_desc(sLo + nb * D * 64);
#pragma unroll
            for (int kk = 0; kk < k_steps; ++kk) {
              wgmma_rs<T, true>(acc64(o, nb), a[kk], hi_desc + (2048 >> 4) * kk);
              wgmma_rs<T, true>(acc64(o, nb), a[kk], lo_desc + (2048 >> 4) * kk);
            }
          }
          wgmma_commit();
        });
        wgmma_wait<0>();
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) fence_operands(acc64(o, nb));
        fence_operands(a);
      }
    }

    mma::store_rows<T>(p, o, m_r, l_r, bh, ra);
    if constexpr (!kOwn) break;
  }
#endif
}

// dQ on wgmma, laid out as attn_fwd_kernel (one warpgroup per 64 query rows, swizzled tiles, K/V
// in a 2-stage cp.async pipeline): S = Q K^T and dP = dO V^T take both operands from shared
// memory, dS = P (dP - delta) is formed in the accumulators (mma::ds_tile, shared with the
// mma.sync kernel), and dQ += dS K takes dS from registers and K as the MN-major operand (as V
// in O += P V). 3 CTAs per SM at D = 64 (49 KiB of shared memory each), 2 at 128.
template <typename T, int D>
constexpr size_t kDqSmemBytes = 6 * 64 * D * sizeof(T) + 1024;
template <int D> constexpr int kDqMinBlocks = D == 64 ? 3 : 2;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kDqMinBlocks<D>) attn_dq_kernel(AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024));
  T* sO = sQ + kBM * D;        // dO
  T* sK = sO + kBM * D;        // [2][64][D]
  T* sV = sK + 2 * kBN * D;    // [2][64][D]

  const auto [bh, bi, hi, m0] = row_tile(p, kBM);
  const int n = p.n, B = p.chunk, w = p.overlap;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tw = m0 + warp * 16;  // 16 | B, so a warp's rows share one chunk
  const int cw = min(tw, n - 1) / B;
  const int lo_w = max(0, cw * B - w);
  const int ra = tw + lane / 4;

  const T* kb = mma::head_ptr<T>(p.k, p.k_st, bi, hi);
  const T* vb = mma::head_ptr<T>(p.v, p.v_st, bi, hi);
  const int kv_lo = window_lo(m0, B, w), kv_hi = min(n, m0 + kBM);
  const int nkv = cdiv(kv_hi - kv_lo, kBN);

  load_tile<T, D>(sQ, mma::head_ptr<T>(p.q, p.q_st, bi, hi), p.q_st.n, m0, n);
  load_tile<T, D>(sO, mma::head_ptr<T>(p.dout, p.dout_st, bi, hi), p.dout_st.n, m0, n);
  load_tile<T, D>(sK, kb, p.k_st.n, kv_lo, n);
  load_tile<T, D>(sV, vb, p.v_st.n, kv_lo, n);
  cp_async_commit();

  float lse2[2], dlt[2];
  mma::row_stats(p, bh, ra, lse2, dlt);
  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  const float sl2 = p.scale * kLog2e;

  for (int j = 0; j < nkv; ++j) {
    const int n0 = kv_lo + j * kBN;
    kv_stage_ready<T, D>(p, sK, sV, kb, vb, j, nkv, n0);
    const T* sKs = sK + (j & 1) * kBN * D;
    const T* sVs = sV + (j & 1) * kBN * D;

    float s[kBN / 8][4], dp[kBN / 8][4];
    two_products<T, D>(s, dp, sQ, sKs, sO, sVs);  // S = Q K^T, dP = dO V^T
    mma::ds_tile(s, dp, n0, ra, lo_w, n, sl2, lse2, dlt);
    add_regs_times_tile<T, D>(dq, s, sKs);  // dQ += dS K
    __syncthreads();  // every read of this stage is done before it is refilled
  }

  mma::store_dq<T>(p, dq, bh, ra);
  wait_overlapped_kernel(p.overlap_previous);
#endif
}

// Waits for the dK/dV kernel's committed products into dk and dv (D / 64 column blocks each)
// and pins their A registers a and b until then.
template <int DT, int KA, int KB>
__device__ __forceinline__ void wait_dkv_products(float (&dk)[DT][4], float (&dv)[DT][4],
                                                  uint32_t (&a)[KA][4], uint32_t (&b)[KB][4]) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int nb = 0; nb < DT / 8; ++nb) {
    fence_operands(acc64(dv, nb));
    fence_operands(acc64(dk, nb));
  }
  fence_operands(a);
  fence_operands(b);
#endif
}

// A score tile's dK/dV products: dv += P^T dO and dk += dS^T Q, with P^T and dS^T (64 keys x 64
// queries) as the register A operands ap / ad and the queries' swizzled [64][D] tiles sO / sQ read
// MN-major (a k step of 16 queries is two 8-row atoms, 2048 bytes). Waits for the products.
template <typename T, int D>
__device__ __forceinline__ void add_dkv_products(float (&dk)[D / 8][4], float (&dv)[D / 8][4],
                                                 uint32_t (&ap)[4][4], uint32_t (&ad)[4][4],
                                                 const T* sO, const T* sQ) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wgmma_fence();
#pragma unroll
  for (int nb = 0; nb < D / 64; ++nb)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_rs<T, true>(acc64(dv, nb), ap[kk], sw_desc(sO + nb * 64 * 64) + (2048 >> 4) * kk);
      wgmma_rs<T, true>(acc64(dk, nb), ad[kk], sw_desc(sQ + nb * 64 * 64) + (2048 >> 4) * kk);
    }
  wait_dkv_products(dk, dv, ap, ad);
#endif
}

// The chunk-states backward of a CTA's keys [m0, m0 + rows), added to dk and dv before their one
// rounding (as in mma::attn_dkv_kernel): for each chunk c the keys touch, dF_c is staged hi/lo
// in sF_hi / sF_lo ([64][D] swizzled each), 64 of its rows at a time, and each warp adds
// dk += v dF_c^T (dF_c as a K-major operand) and dv += k dF_c (MN-major) for its 16 keys, with
// its rows of sK / sV (its warpgroup's [64][D] tiles) as register A operands (zero for a warp
// whose keys are in another chunk). uw: the warp's first key. Every thread of the CTA (THREADS)
// calls it.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void add_chunk_states_grad(const AttnParams& p, float (&dk)[D / 8][4],
                                                      float (&dv)[D / 8][4], const T* sK,
                                                      const T* sV, T* sF_hi, T* sF_lo, int bh,
                                                      int m0, int rows, int uw) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NB = D / 64;
  const int n = p.n, B = p.chunk;
  const int warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  const int c_first = m0 / B, c_last = (min(n, m0 + rows) - 1) / B;
  const int cw = min(uw, n - 1) / B;
  const bool warp_ok = uw < n;
#pragma unroll 1
  for (int c = c_first; c <= c_last; ++c) {
    const bool mine = warp_ok && cw == c;
    const float* dF = p.dF + ((int64_t)bh * p.num_chunks + c) * D * D;
#pragma unroll
    for (int r0 = 0; r0 < D; r0 += 64) {
      __syncthreads();
      mma::stage_split_at<T, D, 8, THREADS>(sF_hi, sF_lo, dF + r0 * D, 64, 64, 1.f,
                                            [](int r, int col) { return sw<64>(r, col / 8) + col % 8; });
      fence_proxy_async();
      __syncthreads();
      // The warp's rows of V (all D dims) and of K (the slab's 64 dims) as A fragments.
      uint32_t av[D / 16][4], ak[4][4];
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        ldsm_x4(av[kk], sV + sw<kBM>(warp * 16 + lane % 16, kk * 2 + lane / 16));
#pragma unroll
        for (int i = 0; i < 4; ++i) av[kk][i] = mine ? av[kk][i] : 0u;
      }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        ldsm_x4(ak[kk], sK + sw<kBM>(warp * 16 + lane % 16, r0 / 8 + kk * 2 + lane / 16));
#pragma unroll
        for (int i = 0; i < 4; ++i) ak[kk][i] = mine ? ak[kk][i] : 0u;
      }
      wgmma_fence();
      // dk[:, r0 + r] += sum_j v[:, j] dF[r0 + r, j]: B(j, r) = dF[r0 + r][j], K-major.
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int blk = kk / 4, step = 2 * (kk % 4);
        wgmma_rs<T, false>(acc64(dk, r0 / 64), av[kk], sw_desc(sF_hi + blk * 64 * 64) + step);
        wgmma_rs<T, false>(acc64(dk, r0 / 64), av[kk], sw_desc(sF_lo + blk * 64 * 64) + step);
      }
      // dv[:, j] += sum_i k[:, r0 + i] dF[r0 + i, j]: B(i, j) = dF[r0 + i][j], MN-major.
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          wgmma_rs<T, true>(acc64(dv, nb), ak[kk], sw_desc(sF_hi + nb * 64 * 64) + (2048 >> 4) * kk);
          wgmma_rs<T, true>(acc64(dv, nb), ak[kk], sw_desc(sF_lo + nb * 64 * 64) + (2048 >> 4) * kk);
        }
      wait_dkv_products(dk, dv, av, ak);
    }
  }
#endif
}

// dF_c of the chunks that keys [m0, m0 + rows) touch, fetched into L2 by the dK/dV kernels'
// THREADS threads when they start, so that their epilogue (add_chunk_states_grad) finds it there.
// With p.waits_for_previous the kernel writing dF may still run: the prefetch is only a hint (it
// binds no value, and L2 stays coherent), and the reads wait for that kernel (wait_for_dF).
template <int D, int THREADS>
__device__ __forceinline__ void prefetch_dF(const AttnParams& p, int bh, int m0, int rows) {
  const int c_first = m0 / p.chunk, c_last = (min(p.n, m0 + rows) - 1) / p.chunk;
  const int bytes = (c_last - c_first + 1) * D * D * static_cast<int>(sizeof(float));
  prefetch_l2_bytes<THREADS>(p.dF + ((int64_t)bh * p.num_chunks + c_first) * D * D, bytes);
}

// Before the dK/dV kernels read dF: with p.waits_for_previous the kernel that writes it may still
// run, and the next kernel may start only once it is done (attn_dkv_kernel's first lines).
__device__ __forceinline__ void wait_for_dF(const AttnParams& p) {
  if (p.waits_for_previous) {
    pdl_wait();
    pdl_launch_dependents();
  }
}

// dK/dV on wgmma (one warpgroup per 64 keys; K, V fixed in swizzled tiles, Q / dO tiles of 64
// queries in 2 stages): S^T = K Q^T and dP^T = V dO^T from shared memory, P^T and dS^T formed in
// the accumulators, then dV += P^T dO and dK += dS^T Q with Q / dO as MN-major operands. With
// p.dF (k_state = k) the chunk-states backward is added before the one rounding
// (add_chunk_states_grad, staging dF_c in the free Q stages).
// D = 64: 3 CTAs per SM; ptxas then fits it in 168 registers with 16 bytes of spill; at 2 CTAs
// (196 registers, no spill) it took 107.5 instead of 90.3 us per head group (64k, H200, Run 13).
// D = 128: the dk and dv accumulators are 128 registers per thread; the score tiles (64 more)
// die into their 32 registers of A fragments, so it fits 2 CTAs per SM (255 registers each).
template <int D> constexpr int kDkvMinBlocks = D == 64 ? 3 : 2;
template <typename T, int D>
constexpr size_t kDkvSmemBytes = 6 * 64 * D * sizeof(T) + 6 * 64 * sizeof(float) + 1024;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kDkvMinBlocks<D>) attn_dkv_kernel(AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int QN = 64, NT = QN / 8, DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024));
  T* sV = sK + kBM * D;
  T* sQ = sV + kBM * D;       // [2][QN][D]
  T* sO = sQ + 2 * QN * D;    // [2][QN][D] dO
  float* sL = reinterpret_cast<float*>(sO + 2 * QN * D);  // [2][QN] lse * log2e
  float* sD = sL + 2 * QN;                                  // [2][QN] delta
  int* sLo = reinterpret_cast<int*>(sD + 2 * QN);           // [2][QN] window start
  // The fused backward launches the next head group's chunk states next (GroupTail,
  // bsbr_cuda.cu), which read nothing this writes, to fill this grid's tail. With
  // waits_for_previous only once dF is complete (wait_for_dF): the states may be allocated in
  // memory that dF's kernel still reads.
  if (!p.waits_for_previous) pdl_launch_dependents();

  const auto [bh, bi, hi, m0] = row_tile(p, kBM);
  const int n = p.n, B = p.chunk, w = p.overlap;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int uw = m0 + warp * 16;  // 16 | B, so a warp's keys share one chunk
  const int ua = uw + lane / 4;

  const T* qb = mma::head_ptr<T>(p.q, p.q_st, bi, hi);
  const T* ob = mma::head_ptr<T>(p.dout, p.dout_st, bi, hi);
  const int q_lo = m0, q_hi = mma::query_end(min(n, m0 + kBM) - 1, B, w, n);
  const int nq = cdiv(q_hi - q_lo, QN);
  const float* lse = p.lse + (int64_t)bh * n;
  const float* dlt = p.delta + (int64_t)bh * n;

  auto load_stage = [&](int st, int t0) {
    load_tile<T, D>(sQ + st * QN * D, qb, p.q_st.n, t0, n);
    load_tile<T, D>(sO + st * QN * D, ob, p.dout_st.n, t0, n);
    mma::load_query_stats<QN>(sL + st * QN, sD + st * QN, sLo + st * QN, lse, dlt, t0, n, B, w);
  };

  load_tile<T, D>(sK, mma::head_ptr<T>(p.k, p.k_st, bi, hi), p.k_st.n, m0, n);
  load_tile<T, D>(sV, mma::head_ptr<T>(p.v, p.v_st, bi, hi), p.v_st.n, m0, n);
  load_stage(0, q_lo);
  cp_async_commit();
  if (p.dF != nullptr) prefetch_dF<D, kThreads>(p, bh, m0, kBM);

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const float sl2 = p.scale * kLog2e;

  for (int j = 0; j < nq; ++j) {
    const int n0 = q_lo + j * QN;
    if (j + 1 < nq) {
      load_stage((j + 1) & 1, n0 + QN);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();
    __syncthreads();
    const int st = j & 1;
    const T* sQs = sQ + st * QN * D;
    const T* sOs = sO + st * QN * D;
    const float* sLs = sL + st * QN;
    const float* sDs = sD + st * QN;
    const int* sLos = sLo + st * QN;

    float s[NT][4], dp[NT][4];
    two_products<T, D>(s, dp, sK, sQs, sV, sOs);  // S^T = K Q^T, dP^T = V dO^T

    mma::dst_tile(s, dp, n0, ua, n, sl2, sLs, sDs, sLos);
    uint32_t ap[QN / 16][4], ad[QN / 16][4];
#pragma unroll
    for (int kk = 0; kk < QN / 16; ++kk) {
      mma::p_fragment<T>(ap[kk], s, kk);
      mma::p_fragment<T>(ad[kk], dp, kk);
    }
    add_dkv_products<T, D>(dk, dv, ap, ad, sOs, sQs);
    __syncthreads();  // every read of this stage is done before it is refilled
  }

#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] *= p.scale;
  // dF_c's hi / lo slabs go to Q stages 0 and 1.
  if (p.dF != nullptr) {
    wait_for_dF(p);
    add_chunk_states_grad<T, D, kThreads>(p, dk, dv, sK, sV, sQ, sQ + QN * D, bh, m0, kBM, uw);
  }
  mma::store_dkv<T>(p, dk, dv, bh, ua);
  wait_overlapped_kernel(p.overlap_previous);
#endif
}

// dQ, dK and dV in one kernel, where no query's window reaches outside the CTA's rows: no
// overlap (w = 0) and chunks of 128 (WG = 2 warpgroups, a CTA per chunk) or of a size dividing 64
// (WG = 1). The CTA holds its R = 64 WG rows of K, V, Q and dO (warpgroup g loads rows
// [64 g, 64 g + 64) and starts on its diagonal tile as soon as they are in). Warpgroup g owns
// keys [64 g, 64 g + 64): for each query tile j >= g (tiles j < g are masked) it forms P^T and
// dS^T as attn_dkv_kernel does, accumulates dV and dK, and stores dS^T(j, g), rounded to T as
// the products use it, in shared memory. Warpgroup j then computes dQ_j = sum_{g <= j} dS(j, g)
// K_g, reading dS(j, g) transposed (ldmatrix.trans) into its register A operand, in the order of
// g as attn_dq_kernel sums its key tiles. Against attn_dkv_kernel + attn_dq_kernel this skips
// dQ's recomputation of S and dP (6 of its 9 products per chunk of 128) and a second read of q,
// k, v and dO.
template <typename T, int D, int WG>
constexpr size_t kDqkvSmemBytes = (4 * WG * D + WG * (WG + 1) / 2 * 64) * 64 * sizeof(T) +
                                  3 * WG * 64 * sizeof(float) + 1024;

template <typename T, int D, int WG>
__global__ void __launch_bounds__(WG * kThreads, WG == 2 ? 1 : kDkvMinBlocks<D>)
    attn_dqkv_kernel(AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int R = WG * 64, TILE = 64 * D, NT = 8, DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024));  // [WG][64][D]
  T* sV = sK + WG * TILE;
  T* sQ = sV + WG * TILE;
  T* sO = sQ + WG * TILE;  // dO
  T* sS = sO + WG * TILE;  // dS^T(j, g) at tile j (j + 1) / 2 + g: [64 keys][64 queries]
  float* sL = reinterpret_cast<float*>(sS + WG * (WG + 1) / 2 * 64 * 64);  // [R] lse * log2e
  float* sD = sL + R;                                                       // [R] delta
  int* sLo = reinterpret_cast<int*>(sD + R);                                // [R] window start
  if (!p.waits_for_previous) pdl_launch_dependents();  // as in attn_dkv_kernel

  const auto [bh, bi, hi, m0] = row_tile(p, R);
  const int n = p.n;
  const int g = threadIdx.x / kThreads, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  const int r0g = m0 + g * 64;          // the warpgroup's rows: its keys, then its dQ rows
  const int uw = r0g + warp * 16;       // 16 | B, so a warp's rows share one chunk
  const int ua = uw + lane / 4;
  const T* sKg = sK + g * TILE;
  const T* sVg = sV + g * TILE;

  load_tile<T, D>(sK + g * TILE, mma::head_ptr<T>(p.k, p.k_st, bi, hi), p.k_st.n, r0g, n);
  load_tile<T, D>(sV + g * TILE, mma::head_ptr<T>(p.v, p.v_st, bi, hi), p.v_st.n, r0g, n);
  load_tile<T, D>(sQ + g * TILE, mma::head_ptr<T>(p.q, p.q_st, bi, hi), p.q_st.n, r0g, n);
  load_tile<T, D>(sO + g * TILE, mma::head_ptr<T>(p.dout, p.dout_st, bi, hi), p.dout_st.n, r0g, n);
  cp_async_commit();
  if (p.dF != nullptr) prefetch_dF<D, WG * kThreads>(p, bh, m0, R);
  mma::load_query_stats<64>(sL + g * 64, sD + g * 64, sLo + g * 64, p.lse + (int64_t)bh * n,
                            p.delta + (int64_t)bh * n, r0g, n, p.chunk, 0);

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const float sl2 = p.scale * kLog2e;

  // Score tile (j, g): dV += P^T dO_j, dK += dS^T Q_j, and dS^T(j, g) into sS.
  auto score_tile = [&](int j) {
    const T* sQj = sQ + j * TILE;
    const T* sOj = sO + j * TILE;
    float s[NT][4], dp[NT][4];
    two_products<T, D>(s, dp, sKg, sQj, sVg, sOj);  // S^T = K_g Q_j^T, dP^T = V_g dO_j^T
    mma::dst_tile(s, dp, m0 + j * 64, ua, n, sl2, sL + j * 64, sD + j * 64, sLo + j * 64);
    uint32_t ap[4][4], ad[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma::p_fragment<T>(ap[kk], s, kk);
      mma::p_fragment<T>(ad[kk], dp, kk);
    }
    // ad[kk] holds keys (warp rows) r, r + 8 by queries c, c + 8 of 16 kk + [0, 16): 4-byte
    // stores into the swizzled [key][query] tile, conflict-free (8 rows: 8 distinct chunks).
    T* sSt = sS + (j * (j + 1) / 2 + g) * 64 * 64;
    const int r = warp * 16 + lane / 4;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int c = 16 * kk + 2 * (lane % 4);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int rr = r + 8 * (i % 2), cc = c + 8 * (i / 2);
        *reinterpret_cast<uint32_t*>(sSt + sw<64>(rr, cc / 8) + cc % 8) = ad[kk][i];
      }
    }
    add_dkv_products<T, D>(dk, dv, ap, ad, sOj, sQj);
  };

  cp_async_wait<0>();
  fence_proxy_async();
  if (WG == 1) {
    __syncthreads();
  } else {
    named_barrier_sync(1 + g, kThreads);  // the warpgroup's own rows are in
  }
  score_tile(g);
  if (WG > 1) {
    __syncthreads();  // every warpgroup's rows are in
#pragma unroll 1
    for (int j = g + 1; j < WG; ++j) score_tile(j);
  }
  __syncthreads();  // every dS^T tile is stored

#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] *= p.scale;
  // dF_c's hi / lo slabs go over Q (and dO when WG = 1), free from here.
  if (p.dF != nullptr) {
    wait_for_dF(p);
    add_chunk_states_grad<T, D, WG * kThreads>(p, dk, dv, sKg, sVg, sQ, sQ + TILE, bh, m0, R, uw);
  }
  mma::store_dkv<T>(p, dk, dv, bh, ua);

  // dQ_g: A = dS(g, gk) [query][key] is the transpose of the stored tile; ldmatrix.trans matrix
  // i (lanes 8 i ..) gives query rows 16 warp + 8 (i % 2) and key columns 16 kk + 8 (i / 2).
  float dq[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll 1
  for (int gk = 0; gk <= g; ++gk) {
    const T* sSt = sS + (g * (g + 1) / 2 + gk) * 64 * 64;
    uint32_t a[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      ldsm_x4_t(a[kk], sSt + sw<64>(16 * kk + 8 * (lane / 16) + lane % 8, 2 * warp + (lane / 8) % 2));
    add_frags_times_tile<T, D>(dq, a, sK + gk * TILE);
  }
  mma::store_dq<T>(p, dq, bh, ua);
  wait_overlapped_kernel(p.overlap_previous);
#endif
}

}  // namespace wg
}  // namespace bsbr_cuda
