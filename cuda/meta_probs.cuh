// Retrieval weights of the fused op on tensor cores (mma.sync m16n8k16, fp32 accumulate):
//   P[bh, c, j] = softmax_{j<c}(meta_scale * <mq[bh, c], mk[bh, j]>)   for j < c,
//   P[bh, c, j] = 0 for j >= c (row c = 0 is all zeros) and in the padding columns [C, ldp).
// mq, mk: contiguous [bh, C, dm] fp16/bf16. P is written in one of the tensor-core mixing's
// operand forms (ProbsOut), so no later pass re-splits it.
// A CTA of 4 warps owns 64 rows c of one head (16 per warp, FlashAttention-style: the mq tile is
// the A operand, mk streams through a 2-stage cp.async pipeline in tiles of up to 256 rows j,
// each used as sub-tiles of 64: the kernel is latency-bound, 8 CTAs of one head's C = 512 rows
// each walk their row's tiles twice, so few large stages beat many small ones). The
// normalisation needs the whole row before any weight can be written, so pass 1 keeps the online
// row max and sum and pass 2 recomputes the logits and writes the weights: recomputing a 64-wide
// tile is cheaper than a round trip of the logits through global memory.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "kernel_utils.cuh"

namespace bsbr_cuda {
namespace mix {

namespace meta {

constexpr int kThreads = 128;
constexpr int kRows = 64;  // rows c per CTA
constexpr int kCols = 64;  // rows j per mk sub-tile (one pass of the warp's logits)

// Meta dim padded to a multiple of 16 for the k steps; DMP is one of a few compiled widths.
template <int DMP> struct Cfg {
  static constexpr int SD = DMP + 8;  // +16 bytes: ldmatrix's 8 row reads hit distinct banks
  static constexpr int kLoadRows = DMP <= 64 ? 256 : DMP == 128 ? 128 : 64;  // mk rows per stage
  static constexpr size_t kSmemElems = (kRows + 2 * kLoadRows) * SD;  // mq tile + 2 mk stages
  // CTAs per SM for __launch_bounds__: what shared memory allows (46-101 KiB per CTA).
  static constexpr int kMinBlocks = DMP == 32 ? 4 : 2;
};

// Async copy of rows [r0, r0 + ROWS) of a contiguous [n, dm] matrix into a [ROWS, DMP] tile; rows
// past n and columns [dm, DMP) are zero-filled, so the padded products are exact.
template <typename T, int DMP, int ROWS>
__device__ __forceinline__ void load_rows(T* s, const T* base, int r0, int n, int dm) {
  constexpr int CPR = DMP / 8;  // 16-byte pieces per padded row
  constexpr int SD = Cfg<DMP>::SD;
  static_assert(ROWS * CPR % kThreads == 0, "tile pieces must divide among the threads");
#pragma unroll
  for (int i = 0; i < ROWS * CPR / kThreads; ++i) {
    const int idx = i * kThreads + threadIdx.x;
    const int r = idx / CPR, c = (idx % CPR) * 8;
    const bool ok = r0 + r < n && c < dm;
    const T* src = ok ? base + (int64_t)(r0 + r) * dm + c : base;
    cp_async16(s + r * SD + c, src, ok);
  }
}

}  // namespace meta

// Where meta_probs_mma_kernel writes P: split-bf16 words [bh, C, ld] (split_word in
// kernel_utils.cuh; what the mma.sync mixing and the backward read), or, when words is null,
// bf16 planes [bh * C, ld] of the words' hi halves and, unless lo is null, their lo halves (what
// the wgmma mixing reads: the forward then needs neither the words nor a pass that regroups them).
struct ProbsOut {
  uint32_t* words = nullptr;
  __nv_bfloat16* hi = nullptr;
  __nv_bfloat16* lo = nullptr;
  int ld = 0;
};

// Every row of P starts 16-byte aligned (ld % 4 == 0 for words, % 8 for planes): the zero tail
// uses 16-byte stores.
// The A fragments of the warp's 16 mq rows stay in registers for the whole kernel (DMP / 4 regs,
// 64 at DMP = 256): reloading them per k step would add a fifth ldmatrix to every four.
template <typename T, int DMP>
__global__ void __launch_bounds__(meta::kThreads, meta::Cfg<DMP>::kMinBlocks)
    meta_probs_mma_kernel(const T* __restrict__ mq, const T* __restrict__ mk,
                          ProbsOut out, int C, int dm, float scale_log2) {
  constexpr int SD = meta::Cfg<DMP>::SD, BM = meta::kRows, BN = meta::kCols;
  constexpr int BL = meta::Cfg<DMP>::kLoadRows;
  constexpr int NT = BN / 8, KT = DMP / 16;
  extern __shared__ float4 meta_smem[];
  T* sQ = reinterpret_cast<T*>(meta_smem);  // [BM][SD]
  T* sK = sQ + BM * SD;                     // [2][BL][SD]

  // Row block rb needs rb + 1 mk tiles: a head's heaviest blocks first (as mix_kernel mode 0);
  // the head stays the slow index so concurrent CTAs share their mk tiles in L2.
  const int nrb = cdiv(C, BM);
  const int rb = nrb - 1 - static_cast<int>(blockIdx.x % nrb);
  const int64_t bh = blockIdx.x / nrb;
  const int r0 = rb * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rw = r0 + warp * 16;   // first row of this warp
  const bool warp_ok = rw < C;
  const int ra = rw + lane / 4, rbw = ra + 8;  // accumulator rows g and g + 8
  const T* qb = mq + bh * C * dm;
  const T* kb = mk + bh * C * dm;
  const int ldp = out.ld;
  const int64_t p_head = bh * C * ldp;  // offset of this head's rows in out's arrays
  // The fused op launches the chunk-states kernel next, which does not read P, to overlap this
  // latency-bound kernel (one CTA per SM at 64k) from its start.
  pdl_launch_dependents();

  // j < c <= r0 + 63 < r0 + BN: sub-tiles j0 = 0, BN, ..., r0, in load tiles of BL rows. The
  // pipeline runs through them twice (pass 1, then pass 2), so pass 2's first tile loads while
  // pass 1's last one is in use.
  const int nt = cdiv(r0 + BN, BL), steps = 2 * nt;
  meta::load_rows<T, DMP, BM>(sQ, qb, r0, C, dm);
  meta::load_rows<T, DMP, BL>(sK, kb, 0, C, dm);
  cp_async_commit();

  // Columns [r0 + BN, ldp) of this CTA's rows are all zero (torch.empty gives garbage): written
  // now, while the first tiles are in flight.
  if (warp_ok) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const int step = out.words != nullptr ? 4 : 8;  // columns per 16-byte store
    for (int r = rw; r < min(rw + 16, C); ++r) {
      const int64_t row = p_head + (int64_t)r * ldp;
      for (int col = r0 + BN + lane * step; col < ldp; col += 32 * step) {
        if (out.words != nullptr) {
          *reinterpret_cast<uint4*>(out.words + row + col) = zero;
        } else {
          *reinterpret_cast<uint4*>(out.hi + row + col) = zero;
          if (out.lo != nullptr) *reinterpret_cast<uint4*>(out.lo + row + col) = zero;
        }
      }
    }
  }

  uint32_t qf[KT][4];
  // Statistics of rows (ra, rbw) in log2 units: max over the quad, this lane's share of the sum.
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  float mu[2] = {0.f, 0.f}, inv[2] = {0.f, 0.f};  // pass 2: final max (0 if none) and 1 / sum

  for (int it = 0; it < steps; ++it) {
    if (it + 1 < steps) {
      meta::load_rows<T, DMP, BL>(sK + ((it + 1) & 1) * BL * SD, kb, ((it + 1) % nt) * BL, C, dm);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk)
        ldsm_x4(qf[kk], sQ + a_off<SD>(lane, warp * 16, kk * 16));
    }
    const bool pass2 = it >= nt;
    if (it == nt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 1);
        l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 2);
        inv[i] = l_r[i] > 0.f ? 1.f / l_r[i] : 0.f;  // row c = 0: no weight, all zeros
      }
    }
#pragma unroll 1
    for (int sub = 0; sub < BL / BN; ++sub) {
      const int j0 = (pass2 ? it - nt : it) * BL + sub * BN;
      if (j0 > r0) break;  // columns from r0 + BN on were zeroed above
      const T* sKs = sK + (it & 1) * BL * SD + sub * BN * SD;
      // s = logits * scale_log2 for j < c, -inf elsewhere. Column groups entirely at or right of
      // the warp's last row (only on the diagonal tile j0 = r0) are masked out without an mma.
      float s[NT][4];
#pragma unroll
      for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      if (warp_ok) {
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
          for (int nn = 0; nn < BN / 16; ++nn) {
            if (j0 + nn * 16 < rw + 15) {
              uint32_t b[4];
              ldsm_x4(b, sKs + bnk_off<SD>(lane, nn * 16, kk * 16));
              mma16816<T>(s[2 * nn], qf[kk], b[0], b[1]);
              mma16816<T>(s[2 * nn + 1], qf[kk], b[2], b[3]);
            }
          }
        }
      }
#pragma unroll
      for (int jj = 0; jj < NT; ++jj) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = e < 2 ? ra : rbw;
          const int col = j0 + jj * 8 + (lane % 4) * 2 + (e & 1);
          s[jj][e] = col < row ? s[jj][e] * scale_log2 : -INFINITY;  // row < C implies col < C
        }
      }

      if (!pass2) {
        if (warp_ok) {
          float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
          for (int jj = 0; jj < NT; ++jj) {
#pragma unroll
            for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], s[jj][e]);
          }
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            // No valid entry yet: keep max -inf and sum 0 (subtracting 0 avoids -inf - -inf).
            const float base = mx[i] == -INFINITY ? 0.f : mx[i];
            l_r[i] *= exp2f(m_r[i] - base);
            m_r[i] = mx[i];
            mu[i] = base;
          }
#pragma unroll
          for (int jj = 0; jj < NT; ++jj) {
#pragma unroll
            for (int e = 0; e < 4; ++e) l_r[e / 2] += exp2f(s[jj][e] - mu[e / 2]);
          }
        }
      } else {
        // Masked entries give exp2(-inf) = 0, so j >= c and the padding columns store word 0.
        // Pairs never straddle ldp: col and ldp are both even.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int row = i == 0 ? ra : rbw;
          if (row < C) {
            const int64_t prow = p_head + (int64_t)row * ldp;
#pragma unroll
            for (int jj = 0; jj < NT; ++jj) {
              const int col = j0 + jj * 8 + (lane % 4) * 2;
              if (col < ldp) {
                const uint32_t w0 = split_word(exp2f(s[jj][2 * i] - mu[i]) * inv[i]);
                const uint32_t w1 = split_word(exp2f(s[jj][2 * i + 1] - mu[i]) * inv[i]);
                if (out.words != nullptr) {
                  *reinterpret_cast<uint2*>(out.words + prow + col) = make_uint2(w0, w1);
                } else {
                  uint32_t hi, lo;
                  regroup_words(w0, w1, hi, lo);
                  *reinterpret_cast<uint32_t*>(out.hi + prow + col) = hi;
                  if (out.lo != nullptr) *reinterpret_cast<uint32_t*>(out.lo + prow + col) = lo;
                }
              }
            }
          }
        }
      }
    }
    __syncthreads();  // the stage read here is the one the next iteration's load overwrites
  }
}

// True when launch_meta_probs handles this meta dim (else the caller uses its cuBLAS fallback).
inline bool meta_probs_supported(int dm) { return dm >= 8 && dm <= 256 && dm % 8 == 0; }

template <typename T, int DMP>
inline void launch_meta_probs_dmp(const T* mq, const T* mk, const ProbsOut& out, int64_t bh, int C,
                                  int dm, float scale_log2, cudaStream_t stream) {
  const size_t smem = meta::Cfg<DMP>::kSmemElems * sizeof(T);
  auto kernel = meta_probs_mma_kernel<T, DMP>;
  allow_dynamic_smem(kernel, smem);
  const int64_t blocks = bh * cdiv(C, meta::kRows);  // <= b*h*n/16 < 2^31 (check_sizes)
  kernel<<<static_cast<unsigned>(blocks), meta::kThreads, smem, stream>>>(mq, mk, out, C, dm,
                                                                         scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// mq, mk: contiguous [bh, C, dm], 16-byte aligned, dm % 8 == 0, 8 <= dm <= 256.
// out (ProbsOut): 16-byte aligned arrays, out.ld >= C, a multiple of 4 (words) or 8 (planes).
// scale_log2 = meta_scale * log2(e).
template <typename T>
void launch_meta_probs(const T* mq, const T* mk, const ProbsOut& out, int64_t bh, int C, int dm,
                       float scale_log2, cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(meta_probs_supported(dm) && out.ld >= C &&
                        out.ld % (out.words != nullptr ? 4 : 8) == 0 &&
                        (out.words != nullptr || out.hi != nullptr));
  if (bh == 0 || C == 0) return;
  if (dm <= 32) {
    launch_meta_probs_dmp<T, 32>(mq, mk, out, bh, C, dm, scale_log2, stream);
  } else if (dm <= 64) {
    launch_meta_probs_dmp<T, 64>(mq, mk, out, bh, C, dm, scale_log2, stream);
  } else if (dm <= 128) {
    launch_meta_probs_dmp<T, 128>(mq, mk, out, bh, C, dm, scale_log2, stream);
  } else {
    launch_meta_probs_dmp<T, 256>(mq, mk, out, bh, C, dm, scale_log2, stream);
  }
}

// The meta tensors' gradients from da = meta_scale * d(logits) ([bh, C, ld] fp32, zero for j >= c
// and in the padding columns):
//   dmq[c] = sum_{j<c} da[c, j] mk[j],   dmk[j] = sum_{c>j} da[c, j] mq[c]
// in one launch (blockIdx.x also picks the product), fp32 accumulation in a fixed order
// (deterministic), written in T. A CTA owns 32 rows and 64 columns of one head's output and
// walks only the k tiles inside the triangle. It replaces fp32 copies of the meta tensors, two
// cuBLAS products and two conversions (six launches, the larger part of the host time of a
// short sequence's backward); at C = 512 its ~0.5 GFLOP are still small next to the mixing.
namespace meta_grads {
constexpr int kThreads = 256, kBM = 32, kBN = 64, kBK = 32;
static_assert(kBM == 32 && kBK == 32 && kThreads == 256, "the tile loads and the 2 x 4 thread tiles assume these");
}

template <typename T>
__global__ void __launch_bounds__(meta_grads::kThreads) meta_grads_kernel(
    const float* da, int ld, const T* mq, const T* mk, T* dmq, T* dmk, int C, int dm) {
  using namespace meta_grads;
  __shared__ float sA[kBK][kBM + 1];  // A^T: sA[k][m]; +1 keeps the transposed writes apart
  __shared__ float sB[kBK][kBN];
  const int tiles_m = cdiv(C, kBM), tiles_n = cdiv(dm, kBN);
  int64_t blk = blockIdx.x;
  const int tn = static_cast<int>(blk % tiles_n);
  blk /= tiles_n;
  const int tm = static_cast<int>(blk % tiles_m);
  blk /= tiles_m;
  const bool grad_k = blk % 2 == 1;
  const int64_t bh = blk / 2;
  const int m0 = tm * kBM, n0 = tn * kBN;
  const float* A = da + bh * C * ld;
  const T* Bm = (grad_k ? mq : mk) + bh * C * dm;
  T* out = (grad_k ? dmk : dmq) + bh * C * dm;
  // dmq rows c need j < c <= m0 + kBM - 1; dmk rows j need c > j >= m0.
  const int k_begin = grad_k ? m0 : 0, k_end = grad_k ? C : min(C, m0 + kBM);
  // The fused op launches the last head group's dK/dV next, which reads nothing this writes, to
  // run beside this latency-bound kernel.
  pdl_launch_dependents();

  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;  // rows 2tr, 2tr+1; cols tc + 16i
  float acc[2][4] = {};
  for (int k0 = k_begin; k0 < k_end; k0 += kBK) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kBM * kBK / kThreads; ++i) {
      const int idx = i * kThreads + tid;
      // Along the stored row of da in both cases (coalesced): (m, k) = da[m, k] for dmq,
      // da[k, m] for dmk.
      const int r = idx / 32, q = idx % 32;
      const int m = grad_k ? q : r, k = grad_k ? r : q;
      const int row = grad_k ? k0 + k : m0 + m, col = grad_k ? m0 + m : k0 + k;
      sA[k][m] = row < C && col < C ? A[(int64_t)row * ld + col] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kBK * kBN / kThreads; ++i) {
      const int idx = i * kThreads + tid, k = idx / kBN, n = idx % kBN;
      sB[k][n] = k0 + k < C && n0 + n < dm ? to_f(Bm[(int64_t)(k0 + k) * dm + n0 + n]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      const float a0 = sA[k][2 * tr], a1 = sA[k][2 * tr + 1];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float bv = sB[k][tc + 16 * i];
        acc[0][i] += a0 * bv;
        acc[1][i] += a1 * bv;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + 2 * tr + r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = n0 + tc + 16 * i;
      if (row < C && col < dm) out[(int64_t)row * dm + col] = from_f<T>(acc[r][i]);
    }
  }
}

// da: [bh, C, ld] fp32; mq, mk, dmq, dmk: contiguous [bh, C, dm].
template <typename T>
void launch_meta_grads(const float* da, int ld, const T* mq, const T* mk, T* dmq, T* dmk,
                       int64_t bh, int C, int dm, cudaStream_t stream) {
  using namespace meta_grads;
  const int64_t blocks = bh * 2 * cdiv(C, kBM) * cdiv(dm, kBN);
  if (blocks == 0) return;
  TORCH_CHECK_VALUE(blocks < (int64_t{1} << 31), "bsbr CUDA kernels: b * h * C * meta dim is too large");
  meta_grads_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(da, ld, mq, mk, dmq,
                                                                             dmk, C, dm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mix
}  // namespace bsbr_cuda
