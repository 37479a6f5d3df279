// Tensor-core (mma.sync m16n8k16, fp32 accumulate) kernels for fp16 / bf16: local window attention
// forward (with the long-range state term fused in the epilogue), dQ, and dK/dV.
//
// All three share one shape: a CTA of 4 warps owns 64 "M-side" rows (queries for fwd/dQ, keys for
// dK/dV), one warp per 16 rows, and streams "N-side" tiles through a 2-stage cp.async pipeline.
// Because each warp's 16 rows are its M operand, every product keeps its accumulator in the layout
// that the next product needs as an A operand (the FlashAttention-2 register trick):
//   fwd:  S = Q K^T -> P -> O += P V
//   dQ:   S = Q K^T, dP = dO V^T -> dS -> dQ += dS K
//   dKV:  S^T = K Q^T, dP^T = V dO^T -> P^T, dS^T -> dV += P^T dO, dK += dS^T Q
// so no product goes through shared memory, and dK/dV (key-owned) and dQ (query-owned) are
// computed without atomics: the backward is bitwise deterministic.
//
// Shared-memory rows are padded by 8 elements (16 bytes): ldmatrix then reads 8 rows whose
// addresses fall in distinct bank groups.
#pragma once

#include "kernel_utils.cuh"

namespace bsbr_cuda {
namespace mma {

constexpr int kThreads = 128;
constexpr int kBM = 64;

template <int D> struct Cfg {
  static constexpr int SD = D + 8;           // padded smem row (elements)
  static constexpr int BN_FWD = 64;          // keys per tile, forward
  static constexpr int BN_BWD = D <= 64 ? 64 : 32;  // N tile, backward (register budget)
  // Forward CTAs per SM that shared memory allows (45 KiB at D = 64, 85 KiB at 128); asking the
  // register allocator for as many keeps loads of 4 CTAs in flight at D = 64 (ptxas otherwise
  // took 130 registers: 3 CTAs; the forward is latency-bound).
  static constexpr int kFwdMinBlocks = D <= 64 ? 4 : 2;
  // dK/dV at D = 64: 3 CTAs per SM instead of the 2 that ptxas's 181 registers allowed.
  static constexpr int kDkvMinBlocks = D <= 64 ? 3 : 1;
};

template <typename T>
__device__ __forceinline__ const T* head_ptr(const void* base, const Strides& s, int bi, int hi) {
  return static_cast<const T*>(base) + bi * s.b + hi * s.h;
}

// Async copy of rows [r0, r0 + ROWS) of a [n, D] strided matrix by a CTA of THREADS threads;
// rows outside [0, n) read as 0.
template <typename T, int D, int ROWS, int THREADS = kThreads>
__device__ __forceinline__ void load_rows(T* s, const T* base, int64_t stride_n, int r0, int n) {
  constexpr int CPR = D / 8;  // 16-byte pieces per row
  constexpr int SD = Cfg<D>::SD;
#pragma unroll
  for (int idx = threadIdx.x; idx < ROWS * CPR; idx += THREADS) {
    const int r = idx / CPR, c = idx % CPR;
    const int t = r0 + r;
    const bool ok = t >= 0 && t < n;
    const T* src = ok ? base + (int64_t)t * stride_n + c * 8 : base;
    cp_async16(s + r * SD + c * 8, src, ok);
  }
}

// Stages scale * M for an fp32 [ds, D] matrix M (rows [ds, dsp) as zeros) as hi + lo halves of T
// in shared memory (hi = round(x), lo = round(x - hi)); at(r, col) is the element offset of
// columns col .. col + 3 of row r in both tiles. Each of the CTA's THREADS threads issues kBatch
// 16-byte loads before it converts any: one load per step left the kernels waiting a full memory
// round trip per step (ncu: latency-bound, low occupancy).
template <typename T, int D, int kBatch, int THREADS = kThreads, typename At>
__device__ __forceinline__ void stage_split_at(T* sHi, T* sLo, const float* M, int ds, int dsp,
                                               float scale, At at) {
  constexpr int kPerRow = D / 4;
  const int total = dsp * kPerRow;
  for (int base = 0; base < total; base += kBatch * THREADS) {
    float4 val[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int idx = base + i * THREADS + threadIdx.x, r = idx / kPerRow;
      val[i] = idx < total && r < ds
                   ? *reinterpret_cast<const float4*>(M + (int64_t)r * D + (idx % kPerRow) * 4)
                   : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int idx = base + i * THREADS + threadIdx.x;
      if (idx >= total) continue;
      // 4 elements per thread: one 8-byte store per half (16-bit stores took 4x the wavefronts).
      const int off = at(idx / kPerRow, (idx % kPerRow) * 4);
      const float vs[4] = {val[i].x * scale, val[i].y * scale, val[i].z * scale, val[i].w * scale};
      float lo[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) lo[e] = vs[e] - to_f(from_f<T>(vs[e]));
      *reinterpret_cast<uint2*>(sHi + off) =
          make_uint2(pack2<T>(vs[0], vs[1]), pack2<T>(vs[2], vs[3]));
      *reinterpret_cast<uint2*>(sLo + off) =
          make_uint2(pack2<T>(lo[0], lo[1]), pack2<T>(lo[2], lo[3]));
    }
  }
}

// stage_split_at into [dsp][SD] tiles (rows padded as everywhere in this file).
template <typename T, int D, int THREADS = kThreads>
__device__ __forceinline__ void stage_split(T* sHi, T* sLo, const float* M, int ds, int dsp,
                                            float scale) {
  stage_split_at<T, D, 8, THREADS>(sHi, sLo, M, ds, dsp, scale,
                          [](int r, int col) { return r * Cfg<D>::SD + col; });
}

// The forward's epilogue reads the retrieved states S_c of the CTA's chunks (16 KiB per chunk at
// d = 64, 64 KiB at 128); fetching them into L2 when the CTA starts hides that DRAM latency
// behind the window loop.
template <int D, int THREADS = kThreads>
__device__ __forceinline__ void prefetch_states(const AttnParams& p, int bh, int c_first,
                                                int c_last) {
  const int bytes = (c_last - c_first + 1) * p.ds * D * static_cast<int>(sizeof(float));
  prefetch_l2_bytes<THREADS>(chunk_state<D>(p, bh, c_first), bytes);
}

// One key tile of the forward's online softmax for a warp's rows ra and ra + 8, with S = Q K^T in
// the m16n8 accumulator layout (s[j][e]: row ra (+8 for e >= 2), key n0 + 8 j + 2 (lane % 4)
// (+1 for odd e)): masks keys outside [lo_w, row] or past n, updates the running max m_r (log2
// units) and sum l_r, rescales o to the new max, and leaves P = exp2(s - max) in s.
template <int NT, int DT>
__device__ __forceinline__ void softmax_tile(float (&s)[NT][4], float (&o)[DT][4],
                                             float (&m_r)[2], float (&l_r)[2], int n0, int ra,
                                             int lo_w, int n, float sl2) {
  const int lane = threadIdx.x % 32, rb = ra + 8;
  float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
  for (int jj = 0; jj < NT; ++jj) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = e < 2 ? ra : rb;
      const int key = n0 + jj * 8 + (lane % 4) * 2 + (e & 1);
      const bool valid = key <= row && key >= lo_w && key < n;
      s[jj][e] = valid ? s[jj][e] * sl2 : -INFINITY;
      mx[e / 2] = fmaxf(mx[e / 2], s[jj][e]);
    }
  }
  float mu[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    mu[i] = mx[i] == -INFINITY ? 0.f : mx[i];  // row fully masked so far: stay at zero
    const float alpha = exp2f(m_r[i] - mu[i]);
    m_r[i] = mx[i];
    l_r[i] *= alpha;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][2 * i] *= alpha;
      o[dt][2 * i + 1] *= alpha;
    }
  }
#pragma unroll
  for (int jj = 0; jj < NT; ++jj) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[jj][e] = exp2f(s[jj][e] - mu[e / 2]);
      l_r[e / 2] += s[jj][e];
    }
  }
}

// P's A fragment for keys [16 kk, 16 kk + 16) of the tile (the FlashAttention-2 register trick).
template <typename T, int NT>
__device__ __forceinline__ void p_fragment(uint32_t (&a)[4], const float (&s)[NT][4], int kk) {
  a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// o /= the softmax sum of its row (0 for a row with no key).
template <int DT>
__device__ __forceinline__ void normalize_rows(float (&o)[DT][4], float (&l_r)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 1);
    l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 2);
    const float inv = l_r[i] > 0.f ? 1.f / l_r[i] : 0.f;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][2 * i] *= inv;
      o[dt][2 * i + 1] *= inv;
    }
  }
}

// The forward's outputs of rows ra and ra + 8 (those < n) of head bh: out (D = 8 DT columns) and
// the log-sum-exp.
template <typename T, int DT>
__device__ __forceinline__ void store_rows(const AttnParams& p, const float (&o)[DT][4],
                                           const float (&m_r)[2], const float (&l_r)[2], int bh,
                                           int ra) {
  constexpr int D = 8 * DT;
  const int n = p.n, lane = threadIdx.x % 32;
  store_frag<T>(static_cast<T*>(p.o) + (int64_t)bh * n * D, o, D, ra, n, D);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = ra + 8 * i;
    if (row < n && lane % 4 == 0)
      p.lse[(int64_t)bh * n + row] = l_r[i] > 0.f ? (m_r[i] + log2f(l_r[i])) * kLn2 : -INFINITY;
  }
}

// The dQ kernels' row statistics of rows ra and ra + 8: lse in log2 units and delta (0 past n).
__device__ __forceinline__ void row_stats(const AttnParams& p, int bh, int ra, float (&lse2)[2],
                                          float (&dlt)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = ra + 8 * i;
    lse2[i] = row < p.n ? p.lse[(int64_t)bh * p.n + row] * kLog2e : 0.f;
    dlt[i] = row < p.n ? p.delta[(int64_t)bh * p.n + row] : 0.f;
  }
}

// dS = P (dP - delta) in place of the logits s of keys [n0, n0 + 8 NT) for rows ra, ra + 8 (the
// accumulators' fragment layout), zero outside the window [lo_w, row] and past n.
template <int NT>
__device__ __forceinline__ void ds_tile(float (&s)[NT][4], const float (&dp)[NT][4], int n0, int ra,
                                        int lo_w, int n, float sl2, const float (&lse2)[2],
                                        const float (&dlt)[2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int jj = 0; jj < NT; ++jj) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = e < 2 ? ra : ra + 8;
      const int key = n0 + jj * 8 + (lane % 4) * 2 + (e & 1);
      const bool valid = row < n && key <= row && key >= lo_w;
      const float pr = valid ? exp2f(s[jj][e] * sl2 - lse2[e / 2]) : 0.f;
      s[jj][e] = pr * (dp[jj][e] - dlt[e / 2]);
    }
  }
}

// The dK/dV kernels' per-query columns of a stage of queries [t0, t0 + N): lse in log2 units,
// delta, and the window start (n for a query past the end: it sees no key). Loaded by one
// group of kThreads threads (a warpgroup of a larger CTA loads its own queries).
template <int N>
__device__ __forceinline__ void load_query_stats(float* sL, float* sD, int* sLo, const float* lse,
                                                 const float* dlt, int t0, int n, int B, int w) {
  for (int i = threadIdx.x % kThreads; i < N; i += kThreads) {
    const int t = t0 + i;
    const bool ok = t < n;
    sL[i] = ok ? lse[t] * kLog2e : 0.f;
    sD[i] = ok ? dlt[t] : 0.f;
    sLo[i] = ok ? window_lo(t, B, w) : n;
  }
}

// P^T and dS^T = P^T (dP^T - delta) in place of the transposed logits s and dp of keys ua,
// ua + 8 (the accumulators' rows) and queries [n0, n0 + 8 NT) (columns, with the stage's
// load_query_stats in sL, sD, sLo); zero where the query does not see the key.
template <int NT>
__device__ __forceinline__ void dst_tile(float (&s)[NT][4], float (&dp)[NT][4], int n0, int ua,
                                         int n, float sl2, const float* sL, const float* sD,
                                         const int* sLo) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int jj = 0; jj < NT; ++jj) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = e < 2 ? ua : ua + 8;
      const int jl = jj * 8 + (lane % 4) * 2 + (e & 1);
      const int t = n0 + jl;
      const bool valid = key < n && key <= t && key >= sLo[jl];
      const float pr = valid ? exp2f(s[jj][e] * sl2 - sL[jl]) : 0.f;
      s[jj][e] = pr;                        // P^T
      dp[jj][e] = pr * (dp[jj][e] - sD[jl]);  // dS^T
    }
  }
}

// The dQ kernels' epilogue: dq * scale (plus what p.dq holds when p.dq_accumulate) into rows ra
// and ra + 8 of p.dq (contiguous [bh, n, D]).
template <typename T, int DT>
__device__ __forceinline__ void store_dq(const AttnParams& p, float (&dq)[DT][4], int bh, int ra) {
  constexpr int D = DT * 8;
  const int n = p.n;
  T* ob = static_cast<T*>(p.dq) + (int64_t)bh * n * D;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] *= p.scale;
  if (p.dq_accumulate) add_existing<T, DT>(dq, ob, D, ra, n, D);
  store_frag<T>(ob, dq, D, ra, n, D);
}

// The A fragment (mma.sync layout) of rows ra, ra + 8 and columns [k0, k0 + 16) of a [n, ds]
// strided matrix, straight from global memory; outside [0, n) x [0, ds) reads as 0.
template <typename T>
__device__ __forceinline__ void load_a_global(uint32_t (&a)[4], const T* base, int64_t stride_n,
                                              int ra, int k0, int n, int ds) {
  const int col = k0 + (threadIdx.x % 4) * 2;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = ra + 8 * (i & 1), cc = col + (i / 2) * 8;
    a[i] = (row < n && cc < ds)
               ? *reinterpret_cast<const uint32_t*>(base + (int64_t)row * stride_n + cc)
               : 0u;
  }
}

// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, Cfg<D>::kFwdMinBlocks) attn_fwd_kernel(AttnParams p) {
  constexpr int SD = Cfg<D>::SD, BN = Cfg<D>::BN_FWD, NT = BN / 8, DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * SD;      // [2][BN][SD]
  T* sV = sK + 2 * BN * SD;   // [2][BN][SD]

  const auto [bh, bi, hi, m0] = row_tile(p, kBM);
  const int n = p.n, B = p.chunk, w = p.overlap;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tw = m0 + warp * 16;  // 16 | B, so a warp's rows share one chunk
  const bool warp_ok = tw < n;
  const int cw = min(tw, n - 1) / B;
  const int lo_w = max(0, cw * B - w);
  const int ra = tw + lane / 4;

  const T* qb = head_ptr<T>(p.q, p.q_st, bi, hi);
  const T* kb = head_ptr<T>(p.k, p.k_st, bi, hi);
  const T* vb = head_ptr<T>(p.v, p.v_st, bi, hi);
  const int kv_lo = window_lo(m0, B, w), kv_hi = min(n, m0 + kBM);
  const int nkv = cdiv(kv_hi - kv_lo, BN);

  load_rows<T, D, kBM>(sQ, qb, p.q_st.n, m0, n);
  load_rows<T, D, BN>(sK, kb, p.k_st.n, kv_lo, n);
  load_rows<T, D, BN>(sV, vb, p.v_st.n, kv_lo, n);
  cp_async_commit();
  const int c_first = m0 / B, c_last = (kv_hi - 1) / B;
  prefetch_states<D>(p, bh, c_first, c_last);

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];
  const float sl2 = p.scale * kLog2e;

  for (int j = 0; j < nkv; ++j) {
    const int n0 = kv_lo + j * BN;
    if (j + 1 < nkv) {
      const int st = (j + 1) & 1;
      load_rows<T, D, BN>(sK + st * BN * SD, kb, p.k_st.n, n0 + BN, n);
      load_rows<T, D, BN>(sV + st * BN * SD, vb, p.v_st.n, n0 + BN, n);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], sQ + a_off<SD>(lane, warp * 16, kk * 16));
    }
    const T* sKs = sK + (j & 1) * BN * SD;
    const T* sVs = sV + (j & 1) * BN * SD;
    const bool active = warp_ok && n0 <= tw + 15 && n0 + BN - 1 >= lo_w;
    if (active) {
      float s[NT][4];
#pragma unroll
      for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          uint32_t b[4];
          ldsm_x4(b, sKs + bnk_off<SD>(lane, nn * 16, kk * 16));
          mma16816<T>(s[2 * nn], qf[kk], b[0], b[1]);
          mma16816<T>(s[2 * nn + 1], qf[kk], b[2], b[3]);
        }
      }
      softmax_tile(s, o, m_r, l_r, n0, ra, lo_w, n, sl2);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        p_fragment<T>(a, s, kk);
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          uint32_t b[4];
          ldsm_x4_t(b, sVs + bkn_off<SD>(lane, kk * 16, dd * 16));
          mma16816<T>(o[2 * dd], a, b[0], b[1]);
          mma16816<T>(o[2 * dd + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();
  }

  normalize_rows(o, l_r);

  // Long-range term o += state_scale * qs S_c on tensor cores. S_c is fp32; it is split as
  // hi + lo in T (hi = round(S), lo = round(S - hi)) so the product keeps ~16 (bf16) / ~22 (fp16)
  // significant bits of S instead of 8 / 11, well under the output rounding. The K/V buffers
  // (4 * BN >= 2 * D rows) are free now and hold all of S_c; a CTA meets several chunks only
  // when B is not a multiple of 64.
  {
    static_assert(4 * BN >= 2 * D, "K/V buffers must hold S_c hi and lo");
    T* sHi = sK;
    T* sLo = sK + D * SD;
    const int ds = p.ds, dsp = (ds + 15) / 16 * 16;
    const T* qsb = head_ptr<T>(p.qs, p.qs_st, bi, hi);
    for (int c = c_first; c <= c_last; ++c) {
      __syncthreads();
      stage_split<T, D>(sHi, sLo, chunk_state<D>(p, bh, c), ds, dsp, p.state_scale);
      __syncthreads();
      if (warp_ok && cw == c) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          if (kk * 16 < dsp) {
            uint32_t a[4];
            if (p.qs_is_q) {  // the Q tile is still in shared memory (zero past n)
              ldsm_x4(a, sQ + a_off<SD>(lane, warp * 16, kk * 16));
            } else {
              load_a_global(a, qsb, p.qs_st.n, ra, kk * 16, n, ds);
            }
#pragma unroll
            for (int dd = 0; dd < D / 16; ++dd) {
              const int off = bkn_off<SD>(lane, kk * 16, dd * 16);
              mma_split_b<T, true>(o[2 * dd], o[2 * dd + 1], a, sHi + off, sLo + off);
            }
          }
        }
      }
    }
  }

  store_rows<T>(p, o, m_r, l_r, bh, ra);
}

// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_dq_kernel(AttnParams p) {
  constexpr int SD = Cfg<D>::SD, BN = Cfg<D>::BN_BWD, NT = BN / 8, DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sO = sQ + kBM * SD;      // dO
  T* sK = sO + kBM * SD;      // [2][BN][SD]
  T* sV = sK + 2 * BN * SD;   // [2][BN][SD]

  const auto [bh, bi, hi, m0] = row_tile(p, kBM);
  const int n = p.n, B = p.chunk, w = p.overlap;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tw = m0 + warp * 16;
  const bool warp_ok = tw < n;
  const int cw = min(tw, n - 1) / B;
  const int lo_w = max(0, cw * B - w);
  const int ra = tw + lane / 4;

  const T* kb = head_ptr<T>(p.k, p.k_st, bi, hi);
  const T* vb = head_ptr<T>(p.v, p.v_st, bi, hi);
  const int kv_lo = window_lo(m0, B, w), kv_hi = min(n, m0 + kBM);
  const int nkv = cdiv(kv_hi - kv_lo, BN);

  load_rows<T, D, kBM>(sQ, head_ptr<T>(p.q, p.q_st, bi, hi), p.q_st.n, m0, n);
  load_rows<T, D, kBM>(sO, head_ptr<T>(p.dout, p.dout_st, bi, hi), p.dout_st.n, m0, n);
  load_rows<T, D, BN>(sK, kb, p.k_st.n, kv_lo, n);
  load_rows<T, D, BN>(sV, vb, p.v_st.n, kv_lo, n);
  cp_async_commit();

  float lse2[2], dlt[2];
  row_stats(p, bh, ra, lse2, dlt);
  float dq[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  const float sl2 = p.scale * kLog2e;

  for (int j = 0; j < nkv; ++j) {
    const int n0 = kv_lo + j * BN;
    if (j + 1 < nkv) {
      const int st = (j + 1) & 1;
      load_rows<T, D, BN>(sK + st * BN * SD, kb, p.k_st.n, n0 + BN, n);
      load_rows<T, D, BN>(sV + st * BN * SD, vb, p.v_st.n, n0 + BN, n);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKs = sK + (j & 1) * BN * SD;
    const T* sVs = sV + (j & 1) * BN * SD;
    const bool active = warp_ok && n0 <= tw + 15 && n0 + BN - 1 >= lo_w;
    if (active) {
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t aq[4], ao[4];
        ldsm_x4(aq, sQ + a_off<SD>(lane, warp * 16, kk * 16));
        ldsm_x4(ao, sO + a_off<SD>(lane, warp * 16, kk * 16));
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          uint32_t b[4];
          ldsm_x4(b, sKs + bnk_off<SD>(lane, nn * 16, kk * 16));
          mma16816<T>(s[2 * nn], aq, b[0], b[1]);
          mma16816<T>(s[2 * nn + 1], aq, b[2], b[3]);
          ldsm_x4(b, sVs + bnk_off<SD>(lane, nn * 16, kk * 16));
          mma16816<T>(dp[2 * nn], ao, b[0], b[1]);
          mma16816<T>(dp[2 * nn + 1], ao, b[2], b[3]);
        }
      }
      ds_tile(s, dp, n0, ra, lo_w, n, sl2, lse2, dlt);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        p_fragment<T>(a, s, kk);
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          uint32_t b[4];
          ldsm_x4_t(b, sKs + bkn_off<SD>(lane, kk * 16, dd * 16));
          mma16816<T>(dq[2 * dd], a, b[0], b[1]);
          mma16816<T>(dq[2 * dd + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();
  }

  store_dq<T>(p, dq, bh, ra);
}

// The dK/dV kernels' epilogue: dk and dv (fp32, the accumulators' layout) into rows ua and
// ua + 8 of p.dk and p.dv (contiguous [bh, n, D]).
template <typename T, int DT>
__device__ __forceinline__ void store_dkv(const AttnParams& p, const float (&dk)[DT][4],
                                          const float (&dv)[DT][4], int bh, int ua) {
  constexpr int D = DT * 8;
  const int n = p.n;
  store_frag<T>(static_cast<T*>(p.dk) + (int64_t)bh * n * D, dk, D, ua, n, D);
  store_frag<T>(static_cast<T*>(p.dv) + (int64_t)bh * n * D, dv, D, ua, n, D);
}

// Exclusive end of the queries that can see a key of chunk(u_last): the end of that chunk, or of
// the next one when the window overlaps into the previous chunk.
__device__ __forceinline__ int query_end(int u_last, int B, int w, int n) {
  return min(n, (u_last / B + 1 + (w > 0 ? 1 : 0)) * B);
}

// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, Cfg<D>::kDkvMinBlocks) attn_dkv_kernel(AttnParams p) {
  constexpr int SD = Cfg<D>::SD, BN = Cfg<D>::BN_BWD, NT = BN / 8, DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBM * SD;
  T* sQ = sV + kBM * SD;      // [2][BN][SD]
  T* sO = sQ + 2 * BN * SD;   // [2][BN][SD] dO
  float* sL = reinterpret_cast<float*>(sO + 2 * BN * SD);  // [2][BN] lse * log2e
  float* sD = sL + 2 * BN;                                  // [2][BN] delta
  int* sLo = reinterpret_cast<int*>(sD + 2 * BN);           // [2][BN] window start

  const auto [bh, bi, hi, m0] = row_tile(p, kBM);
  const int n = p.n, B = p.chunk, w = p.overlap;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int uw = m0 + warp * 16;
  const bool warp_ok = uw < n;
  const int q_end_w = warp_ok ? query_end(min(n, uw + 16) - 1, B, w, n) : 0;
  const int ua = uw + lane / 4;

  const T* qb = head_ptr<T>(p.q, p.q_st, bi, hi);
  const T* ob = head_ptr<T>(p.dout, p.dout_st, bi, hi);
  const int q_lo = m0, q_hi = query_end(min(n, m0 + kBM) - 1, B, w, n);
  const int nq = cdiv(q_hi - q_lo, BN);
  const float* lse = p.lse + (int64_t)bh * n;
  const float* dlt = p.delta + (int64_t)bh * n;

  auto load_stage = [&](int st, int t0) {
    load_rows<T, D, BN>(sQ + st * BN * SD, qb, p.q_st.n, t0, n);
    load_rows<T, D, BN>(sO + st * BN * SD, ob, p.dout_st.n, t0, n);
    load_query_stats<BN>(sL + st * BN, sD + st * BN, sLo + st * BN, lse, dlt, t0, n, B, w);
  };

  load_rows<T, D, kBM>(sK, head_ptr<T>(p.k, p.k_st, bi, hi), p.k_st.n, m0, n);
  load_rows<T, D, kBM>(sV, head_ptr<T>(p.v, p.v_st, bi, hi), p.v_st.n, m0, n);
  load_stage(0, q_lo);
  cp_async_commit();

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const float sl2 = p.scale * kLog2e;

  for (int j = 0; j < nq; ++j) {
    const int n0 = q_lo + j * BN;
    if (j + 1 < nq) {
      load_stage((j + 1) & 1, n0 + BN);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int st = j & 1;
    const T* sQs = sQ + st * BN * SD;
    const T* sOs = sO + st * BN * SD;
    const float* sLs = sL + st * BN;
    const float* sDs = sD + st * BN;
    const int* sLos = sLo + st * BN;
    const bool active = warp_ok && n0 + BN - 1 >= uw && n0 < q_end_w;
    if (active) {
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ak[4], av[4];
        ldsm_x4(ak, sK + a_off<SD>(lane, warp * 16, kk * 16));
        ldsm_x4(av, sV + a_off<SD>(lane, warp * 16, kk * 16));
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          uint32_t b[4];
          ldsm_x4(b, sQs + bnk_off<SD>(lane, nn * 16, kk * 16));
          mma16816<T>(s[2 * nn], ak, b[0], b[1]);
          mma16816<T>(s[2 * nn + 1], ak, b[2], b[3]);
          ldsm_x4(b, sOs + bnk_off<SD>(lane, nn * 16, kk * 16));
          mma16816<T>(dp[2 * nn], av, b[0], b[1]);
          mma16816<T>(dp[2 * nn + 1], av, b[2], b[3]);
        }
      }
      dst_tile(s, dp, n0, ua, n, sl2, sLs, sDs, sLos);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t ap[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                          pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                          pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        uint32_t ad[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]),
                          pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                          pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                          pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          uint32_t b[4];
          ldsm_x4_t(b, sOs + bkn_off<SD>(lane, kk * 16, dd * 16));
          mma16816<T>(dv[2 * dd], ap, b[0], b[1]);
          mma16816<T>(dv[2 * dd + 1], ap, b[2], b[3]);
          ldsm_x4_t(b, sQs + bkn_off<SD>(lane, kk * 16, dd * 16));
          mma16816<T>(dk[2 * dd], ad, b[0], b[1]);
          mma16816<T>(dk[2 * dd + 1], ad, b[2], b[3]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] *= p.scale;

  // The chunk-states backward with k_state = k (p.dF set): dk += v dF_c^T, dv += k dF_c, added to
  // the fp32 accumulators before the one rounding. K and V of these rows are still in shared
  // memory, so this saves a pass that re-read k and v and read-modified-wrote dk and dv. dF_c is
  // split into hi + lo halves of T (as S_c in the forward) in the free Q / dO buffers, RS of its
  // rows at a time; a CTA meets several chunks only when B is not a multiple of 64.
  if (p.dF != nullptr) {
    constexpr int RS = D < 2 * BN ? D : 2 * BN;
    static_assert(D % RS == 0 && 2 * RS <= 4 * BN, "dF slabs must fit the Q / dO buffers");
    T* sHi = sQ;
    T* sLo = sQ + RS * SD;
    const int c_first = m0 / B, c_last = (min(n, m0 + kBM) - 1) / B;
    const int cw = min(uw, n - 1) / B;  // 16 | B: a warp's rows share one chunk
#pragma unroll 1
    for (int c = c_first; c <= c_last; ++c) {
      const float* dF = p.dF + ((int64_t)bh * p.num_chunks + c) * D * D;
#pragma unroll
      for (int r0 = 0; r0 < D; r0 += RS) {
        __syncthreads();
        stage_split<T, D>(sHi, sLo, dF + r0 * D, RS, RS, 1.f);
        __syncthreads();
        if (!warp_ok || cw != c) continue;
        // dk[:, r0 + i] += sum_j v[:, j] dF[r0 + i, j]
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t av[4];
          ldsm_x4(av, sV + a_off<SD>(lane, warp * 16, kk * 16));
#pragma unroll
          for (int nn = 0; nn < RS / 16; ++nn) {
            const int off = bnk_off<SD>(lane, nn * 16, kk * 16);
            mma_split_b<T, false>(dk[r0 / 8 + 2 * nn], dk[r0 / 8 + 2 * nn + 1], av, sHi + off,
                                  sLo + off);
          }
        }
        // dv[:, j] += sum_i k[:, r0 + i] dF[r0 + i, j]
#pragma unroll
        for (int kk = 0; kk < RS / 16; ++kk) {
          uint32_t ak[4];
          ldsm_x4(ak, sK + a_off<SD>(lane, warp * 16, r0 + kk * 16));
#pragma unroll
          for (int dd = 0; dd < D / 16; ++dd) {
            const int off = bkn_off<SD>(lane, kk * 16, dd * 16);
            mma_split_b<T, true>(dv[2 * dd], dv[2 * dd + 1], ak, sHi + off, sLo + off);
          }
        }
      }
    }
  }

  store_dkv<T>(p, dk, dv, bh, ua);
}

// ---------------------------------------------------------------------------------------------
// Chunk states on tensor cores: F_c = out_scale * X_c^T Y_c with X = p.qs [n, ds], Y = p.v [n, D]
// (also dS_c = state_scale * qs^T dO in the backward). One CTA per (bh, chunk); M = state dims
// (16-row tiles dealt round-robin to the warps), N = D, K = the chunk's tokens in steps of 64.
// X^T comes straight from the token-major tile through ldmatrix.trans; the steps run through a
// 2-stage cp.async pipeline (the load of a chunk's second step overlaps its first products). The
// partial last chunk and ds not a multiple of 16 are zero-padded in shared memory, so every
// product is exact in fp32.
// With p.states_split the result is stored as split-bf16 words, the operand format of the
// tensor-core retrieval mixing (retrieval_mma.cuh), which then never splits a fragment itself.
// 8 warps at D = 128, one m-tile each: with 4 warps of two m-tiles each the kernel took 194
// registers, ran 8 warps per SM and reached half of the DRAM bandwidth (ncu, Run 13).
template <int D> constexpr int kStatesThreads = D > 64 ? 256 : kThreads;
constexpr int kStatesRows = 64;  // tokens per step
// Shared memory: 2 stages of X and Y tiles, [kStatesRows][SD] each.
template <typename T, int D>
constexpr size_t kStatesSmemBytes = 4 * kStatesRows * Cfg<D>::SD * sizeof(T);

// acc += X^T Y over the 16 tokens [k0, k0 + 16) for state rows [16 mt, 16 mt + 16) and the
// columns [16 dd0, 16 (dd0 + ND)) of Y; X, Y are token-major [tokens][SD] tiles (X^T and Y both
// read through ldmatrix.trans).
template <typename T, int SD, int ND>
__device__ __forceinline__ void add_xty_step(float (&acc)[2 * ND][4], const T* sX, const T* sY,
                                             int k0, int mt, int dd0) {
  const int lane = threadIdx.x % 32;
  uint32_t a[4];
  ldsm_x4_t(a, sX + (k0 + (lane / 16) * 8 + lane % 8) * SD + mt * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
  for (int dd = 0; dd < ND; ++dd) {
    uint32_t b[4];
    ldsm_x4_t(b, sY + bkn_off<SD>(lane, k0, (dd0 + dd) * 16));
    mma16816<T>(acc[2 * dd], a, b[0], b[1]);
    mma16816<T>(acc[2 * dd + 1], a, b[2], b[3]);
  }
}

// Stores scale * acc, the m16n8 tiles of state rows [16 mt, 16 mt + 16) (those < ds) and columns
// [col0, col0 + 8 NT) of one chunk's [ds][D] block F, as fp32 or (split) as split-bf16 words.
template <int D, int NT>
__device__ __forceinline__ void store_state_rows(float* F, const float (&acc)[NT][4], int mt,
                                                 int col0, int ds, float scale, bool split) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int row = mt * 16 + lane / 4 + h2 * 8;
    if (row < ds) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int col = col0 + nt * 8 + (lane % 4) * 2;
        const float v0 = acc[nt][2 * h2] * scale, v1 = acc[nt][2 * h2 + 1] * scale;
        *reinterpret_cast<uint2*>(F + (int64_t)row * D + col) =
            split ? make_uint2(split_word(v0), split_word(v1))
                  : make_uint2(__float_as_uint(v0), __float_as_uint(v1));
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kStatesThreads<D>) states_fwd_kernel(AttnParams p) {
  constexpr int SD = Cfg<D>::SD, BT = kStatesRows, DT = D / 8;
  constexpr int THREADS = kStatesThreads<D>, WARPS = THREADS / 32;
  constexpr int MTW = (D / 16 + WARPS - 1) / WARPS;  // m-tiles per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sX0 = reinterpret_cast<T*>(smem_raw);  // [2][BT][SD], cols >= ds zero
  T* const sY0 = sX0 + 2 * BT * SD;               // [2][BT][SD]
  const int c = blockIdx.x % p.num_chunks, bh = blockIdx.x / p.num_chunks;
  const int bi = bh / p.h, hi = bh % p.h;
  const int ds = p.ds, dsp = (ds + 15) / 16 * 16;
  const int t0 = c * p.chunk, t1 = min(p.n, t0 + p.chunk);
  const int warp = threadIdx.x / 32;
  const T* xb = head_ptr<T>(p.qs, p.qs_st, bi, hi);
  const T* yb = head_ptr<T>(p.v, p.v_st, bi, hi);
  // Token rows [s0, s0 + BT) into stage st, one commit group.
  auto load = [&](int st, int s0) {
    const int cpr = ds / 8;
    for (int idx = threadIdx.x; idx < BT * cpr; idx += THREADS) {
      const int r = idx / cpr, cc = idx % cpr;
      const int t = s0 + r;
      const bool ok = t < t1;
      cp_async16(sX0 + st * BT * SD + r * SD + cc * 8,
                 ok ? xb + (int64_t)t * p.qs_st.n + cc * 8 : xb, ok);
    }
    load_rows<T, D, BT, THREADS>(sY0 + st * BT * SD, yb, p.v_st.n, s0, t1);
    cp_async_commit();
  };
  load(0, t0);
  for (int idx = threadIdx.x; idx < 2 * BT * (dsp - ds); idx += THREADS) {
    const int r = idx / (dsp - ds), col = ds + idx % (dsp - ds);
    sX0[r * SD + col] = from_f<T>(0.f);
  }
  float acc[MTW][DT][4];
#pragma unroll
  for (int i = 0; i < MTW; ++i)
#pragma unroll
    for (int j = 0; j < DT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
  const int steps = cdiv(t1 - t0, BT);
  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) {
      load((step + 1) & 1, t0 + (step + 1) * BT);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sX = sX0 + (step & 1) * BT * SD;
    const T* sY = sY0 + (step & 1) * BT * SD;
#pragma unroll
    for (int kk = 0; kk < BT / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < MTW; ++i) {
        const int mt = warp + WARPS * i;
        if (mt * 16 < dsp) add_xty_step<T, SD, D / 16>(acc[i], sX, sY, kk * 16, mt, 0);
      }
    }
    __syncthreads();  // every read of this stage is done before it is refilled
  }
  float* F = p.states + ((int64_t)bh * p.num_chunks + c) * ds * D;
#pragma unroll
  for (int i = 0; i < MTW; ++i) {
    store_state_rows<D>(F, acc[i], warp + WARPS * i, 0, ds, p.out_scale, p.states_split);
  }
  wait_overlapped_kernel(p.overlap_previous);
}

// ---------------------------------------------------------------------------------------------
// Per-token products with the fp32 matrix M_c [ds, D] of the token's chunk, on tensor cores:
//   kPrep = false (chunk-states backward, M = dF):
//       dx[t] = y[t] M_c^T -> p.dqs [n, ds],   dy[t] = x[t] M_c -> p.dv [n, D]
//       (each added to what the output holds with p.dqs_accumulate / p.dv_accumulate)
//       with x = p.qs (k_state), y = p.v
//   kPrep = true (attention-backward preprocess, M = S):
//       dqs[t] = state_scale * dO[t] S_c^T -> p.dqs,  delta[t] = dO[t].out[t] - qs[t].dqs[t]
//       with x = p.qs (q_state), y = p.dout
// M is fp32; it is split into hi + lo halves of T in shared memory (as in the forward epilogue),
// so the products keep ~16 (bf16) / ~22 (fp16) significant bits of M with fp32 accumulation.
// One CTA per (bh, chunk, block of kTokmatRows<D> tokens); warp w owns 16 tokens. At D >= 64
// the CTA is 8 warps, so M is staged once per 128 tokens (with 16 loads in flight per thread at
// D = 128): staging the 64 KiB of M per 64 tokens with 4 warps left the D = 128 kernel
// latency-bound (ncu, Run 13: 12% occupancy, 22% of DRAM bandwidth). H200, 64k, per head group:
// 75.5 -> 73.3 us at D = 128, 47.0 -> 45.7 us at D = 64.
// x is staged in shared memory below D = 128. At D = 128 a buffer of its own would leave 1 CTA
// per SM instead of 2 (104 KiB): the states backward reads its A fragments from global (after an
// L2 prefetch; H200, 64k, Run 14: 73.4 -> 63.0 us per head group against staging it), and the
// preprocess stages it over M once the products with M are done. The preprocess's delta also
// needs out, staged there too: both read as 16-byte row pieces. Reading them straight into
// fragments (4-byte loads of 16 bytes of a 32-byte sector per row) left 40% of the kernel's L2
// sectors excessive and long-scoreboard stalls on top (ncu, H100, Run 23).
template <int D> constexpr int kTokmatThreads = D >= 64 ? 256 : kThreads;
template <int D> constexpr int kTokmatRows = kTokmatThreads<D> / 2;  // 16 per warp
template <int D> constexpr bool kTokmatStageX = D < 128;
// CTAs per SM the registers must allow: 3 for the preprocess below D = 128 (given 1, ptxas took
// 120 registers there, i.e. 2 CTAs per SM); 2 otherwise (at D = 128 shared memory allows no
// more; the states backward below D = 128 spilled at 3).
template <int D, bool kPrep> constexpr int kTokmatMinBlocks = kPrep && D < 128 ? 3 : 2;
// Whether the preprocess also writes the chunk-state gradients dR_c = out_scale * qs_c^T dO_c
// into p.states (asked for by setting p.states): where a CTA holds all of its chunk's tokens,
// with y (dO) staged and x (q_state) staged or (D = 128) staged into M's hi half once the
// products are done, so the separate chunk-states pass that re-read q_state and dO is not
// needed. p.states may be p.S: the CTA is the only reader of S_c and has staged it by then.
template <int D>
__host__ __device__ constexpr bool tokmat_prep_writes_states(const AttnParams& p) {
  return p.states != nullptr && p.chunk <= kTokmatRows<D>;
}
// Shared memory: M's hi and lo halves ([D][SD] each), y, and x when staged ([rows][SD] each).
template <typename T, int D>
constexpr size_t kTokmatSmemBytes =
    (2 * D + (kTokmatStageX<D> ? 2 : 1) * kTokmatRows<D>) * Cfg<D>::SD * sizeof(T);

template <typename T, int D, bool kPrep>
__global__ void __launch_bounds__(kTokmatThreads<D>, kTokmatMinBlocks<D, kPrep>) tokmat_kernel(AttnParams p) {
  constexpr int SD = Cfg<D>::SD, BT = kTokmatRows<D>, DT = D / 8;
  constexpr int THREADS = kTokmatThreads<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sMhi = reinterpret_cast<T*>(smem_raw);  // [D][SD], rows >= ds zero
  T* sMlo = sMhi + D * SD;
  T* sY = sMlo + D * SD;                     // [BT][SD]
  T* sX = sY + BT * SD;                      // [BT][SD], cols >= ds zero (kTokmatStageX)
  const int nblk = cdiv(p.chunk, BT);
  const int blk = blockIdx.x % nblk;
  const int c = (blockIdx.x / nblk) % p.num_chunks;
  const int bh = blockIdx.x / nblk / p.num_chunks;
  const int bi = bh / p.h, hi = bh % p.h;
  const int n = p.n, ds = p.ds, dsp = (ds + 15) / 16 * 16;
  const int t0 = c * p.chunk + blk * BT;
  const int t1 = min(n, min((c + 1) * p.chunk, t0 + BT));
  if (t0 >= t1) return;  // CTA-uniform
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* xb = head_ptr<T>(p.qs, p.qs_st, bi, hi);
  const T* yb = kPrep ? head_ptr<T>(p.dout, p.dout_st, bi, hi) : head_ptr<T>(p.v, p.v_st, bi, hi);
  const int64_t ystride = kPrep ? p.dout_st.n : p.v_st.n;
  const T* ob = kPrep ? head_ptr<T>(p.out, p.out_st, bi, hi) : nullptr;
  load_rows<T, D, BT, THREADS>(sY, yb, ystride, t0, t1);
  // x's rows [t0, t1) into dst ([BT][SD], zero past ds and t1), by cp.async (not committed).
  auto stage_x = [&](T* dst) {
    const int cpr = ds / 8;
    for (int idx = threadIdx.x; idx < BT * cpr; idx += THREADS) {
      const int r = idx / cpr, cc = idx % cpr;
      const int t = t0 + r;
      const bool ok = t < t1;
      cp_async16(dst + r * SD + cc * 8, ok ? xb + (int64_t)t * p.qs_st.n + cc * 8 : xb, ok);
    }
    for (int idx = threadIdx.x; idx < BT * (dsp - ds); idx += THREADS) {
      const int r = idx / (dsp - ds), col = ds + idx % (dsp - ds);
      dst[r * SD + col] = from_f<T>(0.f);
    }
  };
  if constexpr (kTokmatStageX<D>) stage_x(sX);
  // What is read only after the products (x at D = 128, out for delta): its rows into L2 while
  // M is staged.
  for (int r = threadIdx.x; r < t1 - t0; r += THREADS) {
    if constexpr (!kTokmatStageX<D>)
      for (int off = 0; off < ds; off += 128 / static_cast<int>(sizeof(T)))
        prefetch_l2(xb + (int64_t)(t0 + r) * p.qs_st.n + off);
    if constexpr (kPrep)
      for (int off = 0; off < D; off += 128 / static_cast<int>(sizeof(T)))
        prefetch_l2(ob + (int64_t)(t0 + r) * p.out_st.n + off);
  }
  cp_async_commit();
  // S may still be in the making (AttnParams::waits_for_previous): nothing reads it before.
  if (kPrep && p.waits_for_previous) pdl_wait();
  const float mscale = kPrep ? p.state_scale : 1.f;
  stage_split_at<T, D, D == 128 ? 16 : 8, THREADS>(
      sMhi, sMlo, chunk_state<D>(p, bh, c), ds, dsp, mscale,
      [](int r, int col) { return r * SD + col; });
  cp_async_wait<0>();
  __syncthreads();

  // The preprocess's chunk-state gradients (tokmat_prep_writes_states), run by every warp last:
  // dR_c = out_scale * x^T y over the chunk's tokens (t0 = its first), in the warps' tiles of 16
  // state rows by 32 columns, from the staged x (sXs) and y; rows past t1 are zero.
  auto prep_states = [&](const T* sXs) {
    if constexpr (kPrep) {
      if (tokmat_prep_writes_states<D>(p)) {
        constexpr int kColBlocks = D / 32, kWarps = THREADS / 32;
        float* F = p.states + ((int64_t)bh * p.num_chunks + c) * ds * D;
        for (int tile = threadIdx.x / 32; tile < dsp / 16 * kColBlocks; tile += kWarps) {
          const int mt = tile / kColBlocks, col0 = tile % kColBlocks * 32;
          float acc[4][4] = {};
          for (int k0 = 0; k0 < t1 - t0; k0 += 16) add_xty_step<T, SD, 2>(acc, sXs, sY, k0, mt, col0 / 16);
          store_state_rows<D>(F, acc, mt, col0, ds, p.out_scale, p.states_split);
        }
      }
    }
  };

  const int r0 = warp * 16;
  // The preprocess's warps without tokens still reach its barriers.
  const bool has_rows = t0 + r0 < t1;
  if (!kPrep && !has_rows) return;  // the states backward has no barrier below
  const int ra = t0 + r0 + lane / 4, rb = ra + 8;
  // The A fragment of x's columns [k0, k0 + 16) for the warp's 16 tokens (zero past ds, t1),
  // from a staged [rows][SD] tile (4-byte reads: ldmatrix cost the D = 64 kernel a spill).
  auto load_x_staged = [&](uint32_t(&a)[4], const T* sXs, int k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      a[i] = *reinterpret_cast<const uint32_t*>(
          sXs + (r0 + lane / 4 + 8 * (i & 1)) * SD + k0 + (lane % 4) * 2 + (i / 2) * 8);
  };

  // dx = y M^T  [16 x dsp]
  float ax[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) ax[i][0] = ax[i][1] = ax[i][2] = ax[i][3] = 0.f;
  if (has_rows) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sY + a_off<SD>(lane, r0, kk * 16));
#pragma unroll
      for (int nn = 0; nn < D / 16; ++nn) {
        if (nn * 16 < dsp) {
          const int off = bnk_off<SD>(lane, nn * 16, kk * 16);
          mma_split_b<T, false>(ax[2 * nn], ax[2 * nn + 1], a, sMhi + off, sMlo + off);
        }
      }
    }
    T* dx = static_cast<T*>(p.dqs) + (int64_t)bh * n * ds;
    if (!kPrep && p.dqs_accumulate) add_existing<T, DT>(ax, dx, ds, ra, t1, ds);
    store_frag<T>(dx, ax, ds, ra, t1, ds);
  }

  if constexpr (kPrep) {
    // M is dead once every warp is past its products: out (and at D = 128 x) go over it.
    static_assert(kTokmatStageX<D> ? BT <= 2 * D : BT <= D, "out's tile fits over M");
    __syncthreads();
    T* sOut = kTokmatStageX<D> ? sMhi : sMlo;
    const T* sXs = kTokmatStageX<D> ? sX : sMhi;
    if constexpr (!kTokmatStageX<D>) stage_x(sMhi);
    load_rows<T, D, BT, THREADS>(sOut, ob, p.out_st.n, t0, t1);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (!has_rows) return prep_states(sXs);
    // delta = dO.out - qs.dqs, with qs in the A-fragment layout, whose k-step kk holds the
    // accumulator's column tiles 2 kk (registers 0, 1) and 2 kk + 1 (2, 3).
    float part[2] = {0.f, 0.f};  // this thread's share for rows ra, rb
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 < dsp) {
        uint32_t xa[4];
        load_x_staged(xa, sXs, kk * 16);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float2 x2 = unpack2<T>(xa[r]);
          const float* acc = ax[2 * kk + r / 2] + 2 * (r % 2);
          part[r % 2] -= x2.x * acc[0] + x2.y * acc[1];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = i == 0 ? ra : rb;
      if (row < t1) {
        const int rl = row - t0;
#pragma unroll
        for (int nt = 0; nt < DT; ++nt) {
          const int col = nt * 8 + (lane % 4) * 2;
          const float2 y2 = unpack2<T>(*reinterpret_cast<const uint32_t*>(sY + rl * SD + col));
          const float2 o2 = unpack2<T>(*reinterpret_cast<const uint32_t*>(sOut + rl * SD + col));
          part[i] += y2.x * o2.x + y2.y * o2.y;
        }
      }
      part[i] += __shfl_xor_sync(0xffffffffu, part[i], 1);
      part[i] += __shfl_xor_sync(0xffffffffu, part[i], 2);
      if (row < t1 && lane % 4 == 0) p.delta[(int64_t)bh * n + row] = part[i];
    }
    prep_states(sXs);
  } else {
    // dy = x M  [16 x D]
    float ay[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) ay[i][0] = ay[i][1] = ay[i][2] = ay[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 < dsp) {
        uint32_t a[4];
        if constexpr (kTokmatStageX<D>) {
          load_x_staged(a, sX, kk * 16);
        } else {
          load_a_global(a, xb, p.qs_st.n, ra, kk * 16, t1, ds);
        }
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          const int off = bkn_off<SD>(lane, kk * 16, dd * 16);
          mma_split_b<T, true>(ay[2 * dd], ay[2 * dd + 1], a, sMhi + off, sMlo + off);
        }
      }
    }
    T* dy = static_cast<T*>(p.dv) + (int64_t)bh * n * D;
    if (p.dv_accumulate) add_existing<T, DT>(ay, dy, D, ra, t1, D);
    store_frag<T>(dy, ay, D, ra, t1, D);
  }
}

}  // namespace mma
}  // namespace bsbr_cuda
