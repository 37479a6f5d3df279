// Streaming-decode kernels (one new token per row per step; host side in decode_cuda.cu).
//
// decode_attention_kernel: one CTA per (row, head). The CTA owns that row-head's window, so it
//   writes the new k, v into slot w + p and, for that slot, reads k, v straight from the inputs
//   (no cross-thread visibility question). Phases: scores (groups of lanes per slot, 16-byte
//   loads) -> softmax stats (fp32, exp2) -> P V (threads = column vector x slot group) plus the
//   long-range term q_state @ retrieved (threads = column vector x state-row group) -> fixed-order
//   reduction of the groups in smem. Deterministic.
// decode_retrieval_kernel: one CTA per (row, head, tile of the ds*d state elements). Each CTA
//   recomputes the (cheap) logits of its row-head in blocks of kRetrievalBlockJ chunks with an
//   online max (rescaling its accumulators), then streams the states of that block: threads =
//   column vector x chunk group, 8 chunks in flight per thread; groups are summed in a fixed order
//   in smem. No atomics: bitwise-deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_utils.cuh"

namespace bsbr_cuda {
namespace decode {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDim = 256;             // d, ds, dm
constexpr int kMaxSlots = 8192;          // chunk_overlap + chunk_size
constexpr int kRetrievalBlockJ = 1024;   // chunks whose weights are staged in smem at once
constexpr int kStreamUnroll = 8;         // state loads in flight per thread
constexpr int kRowsPerGroup = 4;         // rows a lane group dots at once (loads in flight)

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T x[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float* out) {
  const Pack<T, VEC> v = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_f<T>(v.x[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void copy_pack(T* dst, const T* src) {
  *reinterpret_cast<Pack<T, VEC>*>(dst) = *reinterpret_cast<const Pack<T, VEC>*>(src);
}

// Read-once fp32 data (the chunk states): streaming loads, so they do not evict meta_k from L2.
template <int VEC>
__device__ __forceinline__ void load_stream(const float* p, float* out);
template <>
__device__ __forceinline__ void load_stream<4>(const float* p, float* out) {
  const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
template <>
__device__ __forceinline__ void load_stream<1>(const float* p, float* out) {
  out[0] = __ldcs(p);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Lanes per row for a dot product over `ncols` packs: a power of two in [1, 32].
__device__ __forceinline__ int lanes_per_row(int ncols) {
  int g = 1;
  while (g < ncols && g < 32) g <<= 1;
  return g;
}

// Dot products <x, row(i)> for i in [0, count), x in smem (fp32, ncols * VEC elements), rows of T
// in global memory. Each row is split over a group of G lanes (16-byte packs); a group does
// kRowsPerGroup rows at once so that several loads are in flight. emit(i, dot) runs once per row
// (on the group's first lane). Every thread of the CTA must call it (warp-uniform trip counts).
template <typename T, int VEC, typename RowPtr, typename Emit>
__device__ __forceinline__ void group_dots(const float* x, int ncols, int count, RowPtr row_ptr,
                                           Emit emit) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int G = lanes_per_row(ncols);
  const int per_warp = 32 / G;
  const int gl = lane & (G - 1), grp = lane / G;
  const int step = kWarps * per_warp * kRowsPerGroup;
  for (int i0 = warp * per_warp * kRowsPerGroup; i0 < count; i0 += step) {
    float part[kRowsPerGroup];
#pragma unroll
    for (int r = 0; r < kRowsPerGroup; ++r) part[r] = 0.f;
    for (int c = gl; c < ncols; c += G) {
      float f[kRowsPerGroup][VEC];
#pragma unroll
      for (int r = 0; r < kRowsPerGroup; ++r) {
        const int i = i0 + r * per_warp + grp;
        if (i < count) {
          load_pack<T, VEC>(row_ptr(i) + static_cast<int64_t>(c) * VEC, f[r]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) f[r][e] = 0.f;
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerGroup; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) part[r] = fmaf(f[r][e], x[c * VEC + e], part[r]);
    }
#pragma unroll
    for (int r = 0; r < kRowsPerGroup; ++r)
      for (int o = G / 2; o > 0; o >>= 1) part[r] += __shfl_xor_sync(0xffffffffu, part[r], o);
#pragma unroll
    for (int r = 0; r < kRowsPerGroup; ++r) {
      const int i = i0 + r * per_warp + grp;
      if (i < count) emit(i, part[r], gl == 0);
    }
  }
}

// Dynamic smem (floats) of decode_attention_kernel; the host uses the same formula.
__host__ __device__ inline int attention_smem_floats(int d, int ds, int slots, int vec, int svec) {
  const int groups_pv = max(1, kThreads / (d / vec));
  const int groups_st = max(1, kThreads / (d / svec));
  return d + ds + slots + groups_pv * d + groups_st * d;
}

// VEC: elements per 16-byte pack of T (1 when d or a pointer is not aligned for it); SVEC: same
// for the fp32 retrieved state (4 or 1).
template <typename T, int VEC, int SVEC>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k,
                            const T* __restrict__ v, T* __restrict__ window_k,
                            T* __restrict__ window_v, const float* __restrict__ retrieved,
                            const int64_t* __restrict__ position, const T* __restrict__ q_state,
                            T* __restrict__ out, int heads, int d, int ds, int chunk, int overlap,
                            float scale_log2, float state_scale) {
  extern __shared__ float smem[];
  __shared__ float warp_red[kWarps];
  __shared__ float warp_red2[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slots = overlap + chunk;
  const int ncols = d / VEC, scols = d / SVEC;
  const int groups_pv = max(1, kThreads / ncols);
  const int groups_st = max(1, kThreads / scols);
  float* q_s = smem;                     // d
  float* qs_s = q_s + d;                 // ds
  float* p_s = qs_s + ds;                // slots: scores, then probabilities
  float* red_pv = p_s + slots;           // groups_pv x d
  float* red_st = red_pv + groups_pv * d;  // groups_st x d

  const int64_t rh = blockIdx.x;
  const int64_t row = rh / heads;
  const int64_t t = position[row];
  // Floor division, as the reference's tensor // and % (a negative t never reaches here in
  // practice, but must not index out of the window).
  int64_t c = t / chunk;
  if (t % chunk != 0 && t < 0) --c;
  const int p = static_cast<int>(t - c * chunk);
  const int hi = overlap + p;                 // slot of the new token
  const int lo = (c == 0) ? overlap : 0;      // first slot of the window W(t)
  const int count = hi - lo + 1;
  const bool has_state = c >= 1;

  const T* qr = q + rh * d;
  const T* kr = k + rh * d;
  const T* vr = v + rh * d;
  T* wk = window_k + rh * slots * d;
  T* wv = window_v + rh * slots * d;

  for (int i = tid; i < d; i += kThreads) q_s[i] = to_f<T>(qr[i]);
  if (has_state)
    for (int i = tid; i < ds; i += kThreads) qs_s[i] = to_f<T>(q_state[rh * ds + i]);
  for (int i = tid; i < ncols; i += kThreads) {
    copy_pack<T, VEC>(wk + static_cast<int64_t>(hi) * d + i * VEC, kr + i * VEC);
    copy_pack<T, VEC>(wv + static_cast<int64_t>(hi) * d + i * VEC, vr + i * VEC);
  }
  __syncthreads();

  // Scores (log2 domain) of the window slots lo..hi; the new slot is read from k itself.
  float mx = -INFINITY;
  group_dots<T, VEC>(
      q_s, ncols, count,
      [&](int i) { return (i == count - 1) ? kr : wk + static_cast<int64_t>(lo + i) * d; },
      [&](int i, float dot, bool leader) {
        const float s = dot * scale_log2;
        if (leader) p_s[i] = s;
        mx = fmaxf(mx, s);
      });
  mx = warp_max(mx);
  if (lane == 0) warp_red[warp] = mx;
  __syncthreads();
  float m = warp_red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, warp_red[w]);
  float psum = 0.f;
  for (int i = tid; i < count; i += kThreads) {
    const float e = exp2f(p_s[i] - m);
    p_s[i] = e;
    psum += e;
  }
  psum = warp_sum(psum);
  if (lane == 0) warp_red2[warp] = psum;
  __syncthreads();

  // Unnormalised P V, partial sums per slot group.
  for (int item = tid; item < groups_pv * ncols; item += kThreads) {
    const int col = item % ncols, g = item / ncols;
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
#pragma unroll 4
    for (int i = g; i < count; i += groups_pv) {
      const T* vrow = (i == count - 1) ? vr : wv + static_cast<int64_t>(lo + i) * d;
      float f[VEC];
      load_pack<T, VEC>(vrow + col * VEC, f);
      const float pw = p_s[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = fmaf(pw, f[e], acc[e]);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) red_pv[g * d + col * VEC + e] = acc[e];
  }
  // Long-range term q_state @ retrieved (ds x d, fp32), partial sums per state-row group.
  if (has_state) {
    const float* R = retrieved + rh * ds * d;
    for (int item = tid; item < groups_st * scols; item += kThreads) {
      const int col = item % scols, g = item / scols;
      float acc[SVEC];
#pragma unroll
      for (int e = 0; e < SVEC; ++e) acc[e] = 0.f;
#pragma unroll 4
      for (int s = g; s < ds; s += groups_st) {
        float f[SVEC];
        load_pack<float, SVEC>(R + static_cast<int64_t>(s) * d + col * SVEC, f);
        const float qv = qs_s[s];
#pragma unroll
        for (int e = 0; e < SVEC; ++e) acc[e] = fmaf(qv, f[e], acc[e]);
      }
#pragma unroll
      for (int e = 0; e < SVEC; ++e) red_st[g * d + col * SVEC + e] = acc[e];
    }
  }
  __syncthreads();

  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += warp_red2[w];
  const float inv = 1.f / total;  // total >= 1: the max slot contributes exp2(0)
  for (int e = tid; e < d; e += kThreads) {
    float o = 0.f;
    for (int g = 0; g < groups_pv; ++g) o += red_pv[g * d + e];
    o *= inv;
    if (has_state) {
      float st = 0.f;
      for (int g = 0; g < groups_st; ++g) st += red_st[g * d + e];
      o = fmaf(state_scale, st, o);
    }
    out[rh * d + e] = from_f<T>(o);
  }
}

// VEC: elements per 16-byte pack of meta_q/meta_k (or 1); SVEC: fp32 elements per state load
// (4 or 1). cols: column packs per tile (a power of two dividing kThreads); the CTA's
// kThreads / cols chunk groups split the chunks.
template <typename T, int VEC, int SVEC>
__global__ void __launch_bounds__(kThreads)
    decode_retrieval_kernel(const T* __restrict__ meta_q, const T* __restrict__ meta_k,
                            const float* __restrict__ states, const int64_t* __restrict__ num_chunks,
                            float* __restrict__ out, int heads, int cap, int dm, int64_t E,
                            int cols, int ntiles, float meta_scale_log2) {
  __shared__ float mq_s[kMaxDim];
  __shared__ float w_s[kRetrievalBlockJ];
  __shared__ float red[kThreads * 4];
  __shared__ float warp_red[kWarps];
  __shared__ float warp_red2[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t rh = blockIdx.x / ntiles;
  const int tile = static_cast<int>(blockIdx.x % ntiles);
  const int64_t row = rh / heads;
  const int64_t nn = num_chunks[row];
  const int n = static_cast<int>(nn < 0 ? 0 : (nn > cap ? cap : nn));
  const int ngroups = kThreads / cols;
  const int g = tid / cols, col = tid % cols;
  const int64_t e0 = (static_cast<int64_t>(tile) * cols + col) * SVEC;
  const bool col_ok = e0 < E;
  const int mcols = dm / VEC;

  const T* mk = meta_k + rh * cap * dm;
  const float* st = states + rh * cap * E + e0;

  for (int i = tid; i < dm; i += kThreads) mq_s[i] = to_f<T>(meta_q[rh * dm + i]);
  __syncthreads();

  float acc[SVEC];
#pragma unroll
  for (int e = 0; e < SVEC; ++e) acc[e] = 0.f;
  float m = -INFINITY, psum = 0.f;
  for (int j0 = 0; j0 < n; j0 += kRetrievalBlockJ) {
    const int nb = min(kRetrievalBlockJ, n - j0);
    float bmx = -INFINITY;
    group_dots<T, VEC>(
        mq_s, mcols, nb, [&](int i) { return mk + static_cast<int64_t>(j0 + i) * dm; },
        [&](int i, float dot, bool leader) {
          const float s = dot * meta_scale_log2;
          if (leader) w_s[i] = s;
          bmx = fmaxf(bmx, s);
        });
    bmx = warp_max(bmx);
    if (lane == 0) warp_red[warp] = bmx;
    __syncthreads();
    float m_new = m;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_new = fmaxf(m_new, warp_red[w]);
    // All logits -inf so far: weights 0 (the reference's softmax gives NaN -> 0 there).
    const bool dead = m_new == -INFINITY;
    const float alpha = dead ? 1.f : exp2f(m - m_new);
#pragma unroll
    for (int e = 0; e < SVEC; ++e) acc[e] *= alpha;
    psum *= alpha;
    m = m_new;
    for (int i = tid; i < nb; i += kThreads) {
      const float e = dead ? 0.f : exp2f(w_s[i] - m);
      w_s[i] = e;
      psum += e;
    }
    __syncthreads();
    if (col_ok) {
      for (int i0 = g; i0 < nb; i0 += ngroups * kStreamUnroll) {
        float x[kStreamUnroll][SVEC];
        float wj[kStreamUnroll];
#pragma unroll
        for (int u = 0; u < kStreamUnroll; ++u) {
          const int i = i0 + u * ngroups;
          if (i < nb) {
            load_stream<SVEC>(st + static_cast<int64_t>(j0 + i) * E, x[u]);
            wj[u] = w_s[i];
          } else {
#pragma unroll
            for (int e = 0; e < SVEC; ++e) x[u][e] = 0.f;
            wj[u] = 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < kStreamUnroll; ++u)
#pragma unroll
          for (int e = 0; e < SVEC; ++e) acc[e] = fmaf(wj[u], x[u][e], acc[e]);
      }
    }
    __syncthreads();  // w_s and warp_red are rewritten by the next block
  }

  psum = warp_sum(psum);
  if (lane == 0) warp_red2[warp] = psum;
#pragma unroll
  for (int e = 0; e < SVEC; ++e) red[(g * cols + col) * SVEC + e] = acc[e];
  __syncthreads();
  if (g == 0 && col_ok) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_red2[w];
    const float inv = total > 0.f ? 1.f / total : 0.f;  // n == 0: exactly 0
    float o[SVEC];
#pragma unroll
    for (int e = 0; e < SVEC; ++e) o[e] = 0.f;
    for (int gg = 0; gg < ngroups; ++gg)
#pragma unroll
      for (int e = 0; e < SVEC; ++e) o[e] += red[(gg * cols + col) * SVEC + e];
    float* dst = out + rh * E + e0;
#pragma unroll
    for (int e = 0; e < SVEC; ++e) dst[e] = o[e] * inv;
  }
}

}  // namespace decode
}  // namespace bsbr_cuda
