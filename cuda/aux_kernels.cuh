// Chunk-level kernels, fp32 accumulation: chunk states (and the same GEMM shape for the gradient of
// the retrieved states), their backward, and the attention-backward preprocess.
#pragma once

#include "kernel_utils.cuh"

namespace bsbr_cuda {
namespace aux {

constexpr int kThreads = 256;
constexpr int kTok = 32;  // tokens staged per step

// F[c] = out_scale * sum_{t in chunk c} x[t]^T y[t], x = p.qs ([n, ds]), y = p.v ([n, D]).
// One CTA per (bh, chunk); thread (ty, tx) of a 16x16 grid owns F[ty + 16a][tx + 16b]. Summation
// order is fixed by the token loop: deterministic.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) states_fwd_kernel(AttnParams p) {
  constexpr int KA = D / 16;
  __shared__ float sX[kTok][D];
  __shared__ float sY[kTok][D];
  const int c = blockIdx.x % p.num_chunks, bh = blockIdx.x / p.num_chunks;
  const int bi = bh / p.h, hi = bh % p.h;
  const int ds = p.ds;
  const int t0 = c * p.chunk, t1 = min(p.n, t0 + p.chunk);
  const T* xb = static_cast<const T*>(p.qs) + bi * p.qs_st.b + hi * p.qs_st.h;
  const T* yb = static_cast<const T*>(p.v) + bi * p.v_st.b + hi * p.v_st.h;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float acc[KA][KA];
#pragma unroll
  for (int a = 0; a < KA; ++a)
#pragma unroll
    for (int b = 0; b < KA; ++b) acc[a][b] = 0.f;
  for (int s0 = t0; s0 < t1; s0 += kTok) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTok * D; idx += kThreads) {
      const int r = idx / D, col = idx % D;
      const int t = s0 + r;
      const bool ok = t < t1;
      sY[r][col] = ok ? to_f(yb[(int64_t)t * p.v_st.n + col]) : 0.f;
      sX[r][col] = (ok && col < ds) ? to_f(xb[(int64_t)t * p.qs_st.n + col]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int r = 0; r < kTok; ++r) {
      float xr[KA], yr[KA];
#pragma unroll
      for (int a = 0; a < KA; ++a) xr[a] = sX[r][ty + 16 * a];
#pragma unroll
      for (int b = 0; b < KA; ++b) yr[b] = sY[r][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < KA; ++a)
#pragma unroll
        for (int b = 0; b < KA; ++b) acc[a][b] += xr[a] * yr[b];
    }
  }
  float* F = p.states + ((int64_t)bh * p.num_chunks + c) * ds * D;
#pragma unroll
  for (int a = 0; a < KA; ++a) {
    const int kk = ty + 16 * a;
    if (kk < ds) {
#pragma unroll
      for (int b = 0; b < KA; ++b) F[(int64_t)kk * D + tx + 16 * b] = acc[a][b] * p.out_scale;
    }
  }
}

// Backward of the chunk states: dx[t] = y[t] dF_c^T (-> p.dqs, [n, ds], added to it with
// p.dqs_accumulate) and dy[t] = x[t] dF_c (-> p.dv, [n, D], added with p.dv_accumulate). dF (p.S)
// is staged in shared memory with rows padded by one word so that threads walking different rows
// hit different banks.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) states_bwd_kernel(AttnParams p) {
  extern __shared__ float smem[];
  constexpr int SP = D + 1;
  const int ds = p.ds;
  float* sF = smem;                   // [ds][SP]
  float* sX = sF + ds * SP;           // [kTok][D]
  float* sY = sX + kTok * D;          // [kTok][D]
  const int c = blockIdx.x % p.num_chunks, bh = blockIdx.x / p.num_chunks;
  const int bi = bh / p.h, hi = bh % p.h;
  const int t0 = c * p.chunk, t1 = min(p.n, t0 + p.chunk);
  const T* xb = static_cast<const T*>(p.qs) + bi * p.qs_st.b + hi * p.qs_st.h;
  const T* yb = static_cast<const T*>(p.v) + bi * p.v_st.b + hi * p.v_st.h;
  const float* F = chunk_state<D>(p, bh, c);
  for (int idx = threadIdx.x; idx < ds * D; idx += kThreads) sF[(idx / D) * SP + idx % D] = F[idx];
  // 8 threads per token: thread j of a token owns output columns j, j+8, ...
  const int tok = threadIdx.x / 8, j = threadIdx.x % 8;
  T* dx = static_cast<T*>(p.dqs);
  T* dy = static_cast<T*>(p.dv);
  for (int s0 = t0; s0 < t1; s0 += kTok) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTok * D; idx += kThreads) {
      const int r = idx / D, col = idx % D;
      const int t = s0 + r;
      const bool ok = t < t1;
      sY[r * D + col] = ok ? to_f(yb[(int64_t)t * p.v_st.n + col]) : 0.f;
      sX[r * D + col] = (ok && col < ds) ? to_f(xb[(int64_t)t * p.qs_st.n + col]) : 0.f;
    }
    __syncthreads();
    const int t = s0 + tok;
    if (t < t1) {
      const int64_t row = (int64_t)bh * p.n + t;
      for (int i = j; i < D; i += 8) {  // dy[t][i] = sum_k x[t][k] dF[k][i]
        float acc = 0.f;
        for (int kk = 0; kk < ds; ++kk) acc += sX[tok * D + kk] * sF[kk * SP + i];
        if (p.dv_accumulate) acc += to_f(dy[row * D + i]);
        dy[row * D + i] = from_f<T>(acc);
      }
      for (int kk = j; kk < ds; kk += 8) {  // dx[t][k] = sum_i y[t][i] dF[k][i]
        float acc = 0.f;
#pragma unroll 8
        for (int i = 0; i < D; ++i) acc += sY[tok * D + i] * sF[kk * SP + i];
        if (p.dqs_accumulate) acc += to_f(dx[row * ds + kk]);
        dx[row * ds + kk] = from_f<T>(acc);
      }
    }
  }
}

// Attention-backward preprocess, per token t of chunk c:
//   dqs[t] = state_scale * dO[t] S_c^T          (grad of q_state, written in T)
//   delta[t] = dO[t].out[t] - qs[t].dqs[t]      (= rowsum(dO * O_local), fp32)
// One CTA per (bh, chunk); S_c staged in padded shared memory as in states_bwd_kernel.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_prep_kernel(AttnParams p) {
  extern __shared__ float smem[];
  constexpr int SP = D + 1;
  const int ds = p.ds;
  float* sS = smem;           // [ds][SP]
  float* sO = sS + ds * SP;   // [kTok][D]  dO
  const int c = blockIdx.x % p.num_chunks, bh = blockIdx.x / p.num_chunks;
  const int bi = bh / p.h, hi = bh % p.h;
  const int t0 = c * p.chunk, t1 = min(p.n, t0 + p.chunk);
  const float* S = chunk_state<D>(p, bh, c);
  for (int idx = threadIdx.x; idx < ds * D; idx += kThreads) sS[(idx / D) * SP + idx % D] = S[idx];
  const T* dob = static_cast<const T*>(p.dout) + bi * p.dout_st.b + hi * p.dout_st.h;
  const T* ob = static_cast<const T*>(p.out) + bi * p.out_st.b + hi * p.out_st.h;
  const T* qsb = static_cast<const T*>(p.qs) + bi * p.qs_st.b + hi * p.qs_st.h;
  const int tok = threadIdx.x / 8, j = threadIdx.x % 8;
  T* dqs = static_cast<T*>(p.dqs);
  for (int s0 = t0; s0 < t1; s0 += kTok) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTok * D; idx += kThreads) {
      const int r = idx / D, col = idx % D;
      const int t = s0 + r;
      sO[r * D + col] = t < t1 ? to_f(dob[(int64_t)t * p.dout_st.n + col]) : 0.f;
    }
    __syncthreads();
    const int t = s0 + tok;
    float part = 0.f;  // this thread's share of delta
    if (t < t1) {
      const int64_t row = (int64_t)bh * p.n + t;
      for (int kk = j; kk < ds; kk += 8) {
        float acc = 0.f;
#pragma unroll 8
        for (int i = 0; i < D; ++i) acc += sO[tok * D + i] * sS[kk * SP + i];
        acc *= p.state_scale;
        dqs[row * ds + kk] = from_f<T>(acc);
        part -= to_f(qsb[(int64_t)t * p.qs_st.n + kk]) * acc;
      }
      for (int i = j; i < D; i += 8) part += sO[tok * D + i] * to_f(ob[(int64_t)t * p.out_st.n + i]);
    }
    // The 8 threads of a token are 8 consecutive lanes.
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    part += __shfl_xor_sync(0xffffffffu, part, 4);
    if (t < t1 && j == 0) p.delta[(int64_t)bh * p.n + t] = part;
  }
}

}  // namespace aux
}  // namespace bsbr_cuda
