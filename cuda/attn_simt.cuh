// SIMT (CUDA-core, true fp32) kernels for the local window attention: forward, dQ and dK/dV.
// Used for fp32 inputs (the issue forbids TF32) and, behind BSBR_CUDA_SIMT=1, for every dtype as a
// cross-check of the tensor-core path.
//
// Layout: a CTA owns 64 rows of the "M side" (queries for fwd/dQ, keys for dK/dV); G = 4 threads
// share a row, thread g holding dims g, g+G, g+2G, ... so that the 4 threads of a row read 4
// consecutive smem words of a broadcast K/V row (no bank conflicts). The "N side" is streamed
// through shared memory in tiles of 32 rows converted to fp32.
#pragma once

#include "kernel_utils.cuh"

namespace bsbr_cuda {
namespace simt {

constexpr int kBM = 64, kG = 4, kBN = 32, kThreads = kBM * kG;

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const Strides& s, int bi, int hi,
                                            int64_t t) {
  return static_cast<const T*>(base) + bi * s.b + hi * s.h + t * s.n;
}

// Loads rows [r0, r0 + kBN) of a [n, D] strided matrix as fp32, zero past n.
template <typename T, int D>
__device__ __forceinline__ void load_tile(float (*dst)[D], const T* base, int64_t stride_n,
                                          int r0, int n) {
  for (int idx = threadIdx.x; idx < kBN * D; idx += kThreads) {
    int r = idx / D, c = idx % D;
    dst[r][c] = (r0 + r < n) ? to_f(base[(int64_t)(r0 + r) * stride_n + c]) : 0.f;
  }
}

__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(AttnParams p) {
  constexpr int DP = D / kG;
  __shared__ float sK[kBN][D];
  __shared__ float sV[kBN][D];
  const auto [bh, bi, hi, m0] = row_tile(p, kBM);
  const int r = threadIdx.x / kG, g = threadIdx.x % kG;
  const int t = m0 + r;
  const bool row_ok = t < p.n;
  const int B = p.chunk;
  const int lo = window_lo(min(t, p.n - 1), B, p.overlap);

  const T* kb = row_ptr<T>(p.k, p.k_st, bi, hi, 0);
  const T* vb = row_ptr<T>(p.v, p.v_st, bi, hi, 0);
  float qv[DP], acc[DP];
  const float qscale = p.scale * kLog2e;  // scores in log2 units: exp2 is one instruction
#pragma unroll
  for (int e = 0; e < DP; ++e) {
    qv[e] = row_ok ? to_f(row_ptr<T>(p.q, p.q_st, bi, hi, t)[g + kG * e]) * qscale : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int kv_lo = window_lo(m0, B, p.overlap);
  const int kv_hi = min(p.n, m0 + kBM);
  for (int n0 = kv_lo; n0 < kv_hi; n0 += kBN) {
    __syncthreads();
    load_tile<T, D>(sK, kb, p.k_st.n, n0, p.n);
    load_tile<T, D>(sV, vb, p.v_st.n, n0, p.n);
    __syncthreads();
    float s[kBN];
    float mt = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBN; ++j) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < DP; ++e) dot += qv[e] * sK[j][g + kG * e];
      dot = group_sum(dot);
      const int u = n0 + j;
      s[j] = (row_ok && u <= t && u >= lo) ? dot : -INFINITY;
      mt = fmaxf(mt, s[j]);
    }
    const float m_new = fmaxf(m, mt);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: keep zeros
    const float alpha = exp2f(m - m_use);
    l *= alpha;
#pragma unroll
    for (int e = 0; e < DP; ++e) acc[e] *= alpha;
#pragma unroll
    for (int j = 0; j < kBN; ++j) {
      const float pj = exp2f(s[j] - m_use);
      l += pj;
#pragma unroll
      for (int e = 0; e < DP; ++e) acc[e] += pj * sV[j][g + kG * e];
    }
    m = m_new;
  }
  if (!row_ok) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int e = 0; e < DP; ++e) acc[e] *= inv;
  // Long-range term, fp32 throughout.
  const int c = t / B;
  const float* S = chunk_state<D>(p, bh, c);
  const T* qsr = row_ptr<T>(p.qs, p.qs_st, bi, hi, t);
  for (int kk = 0; kk < p.ds; ++kk) {
    const float a = to_f(qsr[kk]) * p.state_scale;
#pragma unroll
    for (int e = 0; e < DP; ++e) acc[e] += a * S[(int64_t)kk * D + g + kG * e];
  }
  T* o = static_cast<T*>(p.o) + ((int64_t)bh * p.n + t) * D;
#pragma unroll
  for (int e = 0; e < DP; ++e) o[g + kG * e] = from_f<T>(acc[e]);
  if (g == 0) p.lse[(int64_t)bh * p.n + t] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
}

// dQ: query-block owner, recomputes P from the saved lse (no atomics, deterministic).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_dq_kernel(AttnParams p) {
  constexpr int DP = D / kG;
  __shared__ float sK[kBN][D];
  __shared__ float sV[kBN][D];
  const auto [bh, bi, hi, m0] = row_tile(p, kBM);
  const int r = threadIdx.x / kG, g = threadIdx.x % kG;
  const int t = m0 + r;
  const bool row_ok = t < p.n;
  const int B = p.chunk;
  const int lo = window_lo(min(t, p.n - 1), B, p.overlap);
  const T* kb = row_ptr<T>(p.k, p.k_st, bi, hi, 0);
  const T* vb = row_ptr<T>(p.v, p.v_st, bi, hi, 0);
  float qv[DP], dov[DP], dq[DP];
  const float qscale = p.scale * kLog2e;
#pragma unroll
  for (int e = 0; e < DP; ++e) {
    qv[e] = row_ok ? to_f(row_ptr<T>(p.q, p.q_st, bi, hi, t)[g + kG * e]) * qscale : 0.f;
    dov[e] = row_ok ? to_f(row_ptr<T>(p.dout, p.dout_st, bi, hi, t)[g + kG * e]) : 0.f;
    dq[e] = 0.f;
  }
  const float lse2 = row_ok ? p.lse[(int64_t)bh * p.n + t] * kLog2e : 0.f;
  const float Dt = row_ok ? p.delta[(int64_t)bh * p.n + t] : 0.f;
  const int kv_lo = window_lo(m0, B, p.overlap);
  const int kv_hi = min(p.n, m0 + kBM);
  for (int n0 = kv_lo; n0 < kv_hi; n0 += kBN) {
    __syncthreads();
    load_tile<T, D>(sK, kb, p.k_st.n, n0, p.n);
    load_tile<T, D>(sV, vb, p.v_st.n, n0, p.n);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kBN; ++j) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int e = 0; e < DP; ++e) {
        s += qv[e] * sK[j][g + kG * e];
        dp += dov[e] * sV[j][g + kG * e];
      }
      s = group_sum(s);
      dp = group_sum(dp);
      const int u = n0 + j;
      const float pj = (row_ok && u <= t && u >= lo) ? exp2f(s - lse2) : 0.f;
      const float dsj = pj * (dp - Dt);
#pragma unroll
      for (int e = 0; e < DP; ++e) dq[e] += dsj * sK[j][g + kG * e];
    }
  }
  if (!row_ok) return;
  T* o = static_cast<T*>(p.dq) + ((int64_t)bh * p.n + t) * D;
#pragma unroll
  for (int e = 0; e < DP; ++e) {
    const float add = p.dq_accumulate ? to_f(o[g + kG * e]) : 0.f;
    o[g + kG * e] = from_f<T>(dq[e] * p.scale + add);
  }
}

// Last query (exclusive) that can see a key of chunk c: the end of chunk c, or of chunk c+1 when
// the window overlaps into the previous chunk.
__device__ __forceinline__ int last_query_end(int u_last, int B, int w, int n) {
  const int c = u_last / B;
  return min(n, (c + 1 + (w > 0 ? 1 : 0)) * B);
}

// dK, dV: key-block owner, loops over the queries that see its keys.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_dkv_kernel(AttnParams p) {
  constexpr int DP = D / kG;
  __shared__ float sQ[kBN][D];
  __shared__ float sO[kBN][D];
  __shared__ float sL[kBN], sD[kBN];
  __shared__ int sLo[kBN];
  const auto [bh, bi, hi, m0] = row_tile(p, kBM);
  const int r = threadIdx.x / kG, g = threadIdx.x % kG;
  const int u = m0 + r;
  const bool row_ok = u < p.n;
  const int B = p.chunk;
  const T* qb = row_ptr<T>(p.q, p.q_st, bi, hi, 0);
  const T* ob = row_ptr<T>(p.dout, p.dout_st, bi, hi, 0);
  float kv[DP], vv[DP], dk[DP], dv[DP];
  const float kscale = p.scale * kLog2e;
#pragma unroll
  for (int e = 0; e < DP; ++e) {
    kv[e] = row_ok ? to_f(row_ptr<T>(p.k, p.k_st, bi, hi, u)[g + kG * e]) * kscale : 0.f;
    vv[e] = row_ok ? to_f(row_ptr<T>(p.v, p.v_st, bi, hi, u)[g + kG * e]) : 0.f;
    dk[e] = 0.f;
    dv[e] = 0.f;
  }
  const int q_lo = m0;
  const int q_hi = last_query_end(min(p.n, m0 + kBM) - 1, B, p.overlap, p.n);
  for (int n0 = q_lo; n0 < q_hi; n0 += kBN) {
    __syncthreads();
    load_tile<T, D>(sQ, qb, p.q_st.n, n0, p.n);
    load_tile<T, D>(sO, ob, p.dout_st.n, n0, p.n);
    if (threadIdx.x < kBN) {
      const int t = n0 + threadIdx.x;
      const bool ok = t < p.n;
      sL[threadIdx.x] = ok ? p.lse[(int64_t)bh * p.n + t] * kLog2e : 0.f;
      sD[threadIdx.x] = ok ? p.delta[(int64_t)bh * p.n + t] : 0.f;
      sLo[threadIdx.x] = ok ? window_lo(t, B, p.overlap) : p.n;  // p.n: sees nothing
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kBN; ++j) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int e = 0; e < DP; ++e) {
        s += kv[e] * sQ[j][g + kG * e];
        dp += vv[e] * sO[j][g + kG * e];
      }
      s = group_sum(s);
      dp = group_sum(dp);
      const int t = n0 + j;
      const float pj = (row_ok && u <= t && u >= sLo[j]) ? exp2f(s - sL[j]) : 0.f;
      const float dsj = pj * (dp - sD[j]);
#pragma unroll
      for (int e = 0; e < DP; ++e) {
        dv[e] += pj * sO[j][g + kG * e];
        dk[e] += dsj * sQ[j][g + kG * e];
      }
    }
  }
  if (!row_ok) return;
  T* okp = static_cast<T*>(p.dk) + ((int64_t)bh * p.n + u) * D;
  T* ovp = static_cast<T*>(p.dv) + ((int64_t)bh * p.n + u) * D;
#pragma unroll
  for (int e = 0; e < DP; ++e) {
    okp[g + kG * e] = from_f<T>(dk[e] * p.scale);
    ovp[g + kG * e] = from_f<T>(dv[e]);
  }
}

}  // namespace simt
}  // namespace bsbr_cuda
