// Retrieval mixing products on tensor cores in split precision (bf16x3), for the fused op with
// fp16/bf16 inputs. The C x C retrieval weights P mix the fp32 chunk states F ([C, X] per head,
// X = ds * d):
//   mode 0:  S  = P F       S[c]  = sum_{j<c} P[c,j] F[j]       (k range [0, m0 + BM))
//   mode 1:  dF = P^T dS    dF[j] = sum_{c>j} P[c,j] dS[c]      (k range [m0, C))
//   mode 2:  dP = dS F^T    dP[c,j] = <dS[c], F[j]> for j < c, 0 elsewhere (optionally split-K
//            into partial sums, added in a fixed order by the softmax backward: deterministic)
// Every operand (P, F, dS) arrives as split-bf16 words (kernel_utils.cuh: hi = bf16(x) and
// lo = bf16(x - hi) in the 32 bits of one fp32 element), written once by the kernel that produced
// it. The product uses hi*hi + hi*lo + lo*hi on bf16 m16n8k16 tensor cores with fp32 accumulation:
// ~2^-17 relative error per product (the dropped lo*lo and lo's rounding), far below the
// bf16/fp16 rounding of the op's outputs, with fp32's exponent range (no overflow, no scaling).
// With kALo = false the A operand enters as its hi half only (hi*hi + hi*lo: a third fewer
// MMAs): the host does that for the retrieval weights P when the op's outputs are bf16, where
// P's bf16 rounding (2^-9 relative per weight, as FlashAttention rounds P before P V) stays at
// the outputs' own rounding while the states keep their ~2^-17. Outputs are plain fp32.
// Tiles: BM x BN per CTA (the host uses 128 x 64 for S and dF, 64 x 64 for dP), 4 warps of
// WM x WN, BK = 32, 2-stage cp.async pipeline; fragments are read straight from the 32-bit word
// tiles (two words per k pair, regrouped into hi and lo operand registers by two byte permutes),
// whose row pitches make every read conflict-free. P (and dP) are stored with a padded leading
// dim Cp (multiple of 4) whose padding columns hold zeros, so 16-byte loads never straddle the
// bound.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "kernel_utils.cuh"

namespace bsbr_cuda {
namespace mix {

constexpr int kBK = 32;

struct MixParams {
  const float* A = nullptr;  // stored [a_rows, lda] per head
  const float* B = nullptr;  // stored [b_rows, ldb] per head
  float* O = nullptr;        // [M, ldo] per head (mode 2: per split, o_split apart)
  int64_t a_bh = 0, b_bh = 0, o_bh = 0, o_split = 0;  // per-head (and per-split) strides
  int lda = 0, ldb = 0, ldo = 0;
  int a_rows = 0, a_cols = 0, b_rows = 0, b_cols = 0;  // bounds of the stored matrices
  int M = 0, N = 0, K = 0;  // output rows / cols written, reduction length
  int bh = 0, splits = 1, k_split = 0;  // mode 2: K is cut into `splits` pieces of k_split
};

// Shared-memory tiles of one pipeline stage. A fragment reads pairs of consecutive k: along a
// stored row (one 8-byte read per lane: pitch = 8 mod 32 floats keeps a half-warp on distinct
// banks) or across two stored rows (two 4-byte reads: pitch = 4 mod 32 keeps the warp on distinct
// banks). Pitches stay multiples of 4 floats for the 16-byte cp.async.
template <int MODE, int BM, int BN>
struct MixSmem {
  static constexpr bool kAmk = MODE != 1;  // A tile stored [m][k]
  static constexpr bool kBkn = MODE != 2;  // B tile stored [k][n]
  static constexpr int A_PITCH = kAmk ? kBK + 8 : BM + 4;
  static constexpr int A_SIZE = kAmk ? BM * A_PITCH : kBK * A_PITCH;
  static constexpr int B_PITCH = kBkn ? BN + 4 : kBK + 8;
  static constexpr int B_SIZE = kBkn ? kBK * B_PITCH : BN * B_PITCH;
  static constexpr size_t kBytes = 2 * (A_SIZE + B_SIZE) * sizeof(float);
  static_assert(A_PITCH % 32 == (kAmk ? 8 : 4) && B_PITCH % 32 == (kBkn ? 4 : 8),
                "pitches chosen for conflict-free fragment reads");
};

// Copies a ROWS x COLS tile of 32-bit words (global rows r0.., cols c0..) into smem with row
// pitch PITCH, 16 bytes per cp.async; pieces outside [rows, cols) are zero-filled. cols % 4 == 0.
template <int ROWS, int COLS, int PITCH, int NT>
__device__ __forceinline__ void load_tile(float* smem, const float* g, int ld, int rows, int cols,
                                          int r0, int c0) {
  constexpr int kPieces = ROWS * COLS / 4;
  static_assert(kPieces % NT == 0, "tile pieces must divide among the threads");
#pragma unroll
  for (int i = 0; i < kPieces / NT; ++i) {
    const int idx = i * NT + threadIdx.x;
    const int r = idx / (COLS / 4), c = (idx % (COLS / 4)) * 4;
    const bool ok = (r0 + r < rows) && (c0 + c < cols);
    const float* src = ok ? g + (int64_t)(r0 + r) * ld + (c0 + c) : g;
    cp_async16(smem + r * PITCH + c, src, ok);
  }
}

// Words of two consecutive k: along a stored row (one 8-byte read) or down two stored rows.
__device__ __forceinline__ uint2 pair_along(const float* base) {
  return *reinterpret_cast<const uint2*>(base);
}
__device__ __forceinline__ uint2 pair_down(const float* base, int pitch) {
  return make_uint2(__float_as_uint(base[0]), __float_as_uint(base[pitch]));
}

// The hi and lo A fragments of rows [r0, r0 + 16) and k [k0, k0 + 16) of an A tile of split
// words stored [m][k] (kAmk) or [k][m] with row pitch PITCH. The layout is mma.sync m16n8k16's,
// which is also a warp's share of wgmma's register A: fragment e holds rows r0 + g + 8 (e % 2),
// k pair k0 + 2t + 8 (e / 2).
template <bool kAmk, int PITCH>
__device__ __forceinline__ void load_a_split(const float* as, int r0, int k0, uint32_t (&hi)[4],
                                             uint32_t (&lo)[4]) {
  const int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int r = r0 + g + 8 * (e % 2), k = k0 + 2 * t + 8 * (e / 2);
    const uint2 x = kAmk ? pair_along(as + r * PITCH + k) : pair_down(as + k * PITCH + r, PITCH);
    regroup_words(x.x, x.y, hi[e], lo[e]);
  }
}

// A CTA's share of a mixing product: its output tile (m0, n0) of BM x BN, its head's operands,
// its k tiles [kb, ke) of kBK, and the loads of one stage of the 2-stage pipeline by its NT
// threads (stage s: A tile at smem + s * A_SIZE, B tile at smem + 2 * A_SIZE + s * B_SIZE; one
// commit group). Blocks map to (head, split, m tile, n tile), n fastest; mode 0 takes its
// heaviest row blocks (longest k range) first.
template <int MODE, int BM, int BN, int NT>
struct MixTile {
  using Smem = MixSmem<MODE, BM, BN>;
  const float* A;
  const float* B;
  float* O;
  int m0, n0, kb, ke;

  __device__ explicit MixTile(const MixParams& p) {
    const int tiles_n = (p.N + BN - 1) / BN, tiles_m = (p.M + BM - 1) / BM;
    int64_t blk = blockIdx.x;
    const int tn = static_cast<int>(blk % tiles_n);
    blk /= tiles_n;
    int tm = static_cast<int>(blk % tiles_m);
    if (MODE == 0) tm = tiles_m - 1 - tm;
    blk /= tiles_m;
    const int split = static_cast<int>(blk % p.splits);
    const int bh = static_cast<int>(blk / p.splits);
    m0 = tm * BM, n0 = tn * BN;
    A = p.A + (int64_t)bh * p.a_bh;
    B = p.B + (int64_t)bh * p.b_bh;
    O = p.O + (int64_t)bh * p.o_bh + (int64_t)split * p.o_split;
    int k_begin = 0, k_end = p.K;
    bool skip = false;
    if (MODE == 0) k_end = min(p.K, m0 + BM);
    if (MODE == 1) k_begin = m0;
    if (MODE == 2) {
      k_begin = split * p.k_split;
      k_end = min(p.K, k_begin + p.k_split);
      skip = n0 >= m0 + BM - 1;  // every (c, j) of the tile has j >= c
    }
    kb = k_begin / kBK;
    ke = skip ? kb : (k_end + kBK - 1) / kBK;
  }

  __device__ __forceinline__ void load(float* smem, const MixParams& p, int stage, int kt) const {
    const int k0 = kt * kBK;
    float* as = smem + stage * Smem::A_SIZE;
    float* bs = smem + 2 * Smem::A_SIZE + stage * Smem::B_SIZE;
    if constexpr (Smem::kAmk) {
      load_tile<BM, kBK, Smem::A_PITCH, NT>(as, A, p.lda, p.a_rows, p.a_cols, m0, k0);
    } else {
      load_tile<kBK, BM, Smem::A_PITCH, NT>(as, A, p.lda, p.a_rows, p.a_cols, k0, m0);
    }
    if constexpr (Smem::kBkn) {
      load_tile<kBK, BN, Smem::B_PITCH, NT>(bs, B, p.ldb, p.b_rows, p.b_cols, k0, n0);
    } else {
      load_tile<BN, kBK, Smem::B_PITCH, NT>(bs, B, p.ldb, p.b_rows, p.b_cols, n0, k0);
    }
    cp_async_commit();
  }
};

// MODE 0: A = P stored [m][k] (k contiguous), B = F stored [k][n].
// MODE 1: A(m, k) = P[k][m] stored [k][m],   B = dS stored [k][n].
// MODE 2: A = dS stored [m][k],               B(k, n) = F[n][k] stored [n][k].
// Three CTAs per SM (<= 168 registers; ptxas took 182 unbounded, which fits two): the kernel
// waits on its 2-stage pipeline's loads, and a third CTA keeps more of them in flight.
template <int MODE, int BM, int BN, int WM, int WN, bool kALo>
__global__ void __launch_bounds__(WM * WN * 32, 3) mix_kernel(const MixParams p) {
  using Smem = MixSmem<MODE, BM, BN>;
  constexpr int NT = WM * WN * 32;
  constexpr int BK = kBK;
  constexpr bool kAmk = Smem::kAmk, kBkn = Smem::kBkn;
  constexpr int A_PITCH = Smem::A_PITCH, A_SIZE = Smem::A_SIZE;
  constexpr int B_PITCH = Smem::B_PITCH, B_SIZE = Smem::B_SIZE;
  constexpr int WTM = BM / WM, WTN = BN / WN;
  constexpr int MT = WTM / 16, NTL = WTN / 8;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);

  const MixTile<MODE, BM, BN, NT> tile(p);
  const int m0 = tile.m0, n0 = tile.n0, kb = tile.kb, ke = tile.ke;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane / 4, t = lane % 4;

  float acc[MT][NTL][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTL; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  auto load = [&](int stage, int kt) { tile.load(smem, p, stage, kt); };
  if (kb < ke) load(0, kb);
  for (int kt = kb; kt < ke; ++kt) {
    const int st = (kt - kb) & 1;
    if (kt + 1 < ke) {
      load(st ^ 1, kt + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const float* as = smem + st * A_SIZE;
    const float* bs = smem + 2 * A_SIZE + st * B_SIZE;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t ahi[MT][4], alo[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        load_a_split<kAmk, A_PITCH>(as, wm * WTM + mt * 16, kk, ahi[mt], alo[mt]);
      }
      // B fragment e: column c, k pair kk + 2t + 8e.
      uint32_t bhi[NTL][2], blo[NTL][2];
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt) {
        const int c = wn * WTN + nt * 8 + g;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = kk + 2 * t + 8 * e;
          const uint2 y = kBkn ? pair_down(bs + k * B_PITCH + c, B_PITCH)
                               : pair_along(bs + c * B_PITCH + k);
          regroup_words(y.x, y.y, bhi[nt][e], blo[nt][e]);
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTL; ++nt) {
          if constexpr (kALo) mma16816<__nv_bfloat16>(acc[mt][nt], alo[mt], bhi[nt][0], bhi[nt][1]);
          mma16816<__nv_bfloat16>(acc[mt][nt], ahi[mt], blo[nt][0], blo[nt][1]);
          mma16816<__nv_bfloat16>(acc[mt][nt], ahi[mt], bhi[nt][0], bhi[nt][1]);
        }
    }
    __syncthreads();
  }

  // Epilogue: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at row g + 8. ldo and N are even.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = m0 + wm * WTM + mt * 16 + g + hh * 8;
        const int col = n0 + wn * WTN + nt * 8 + 2 * t;
        if (row >= p.M || col >= p.N) continue;
        float2 v = make_float2(acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1]);
        if (MODE == 2) {  // only j < c is kept (P is zero elsewhere; no garbage for 0 * x)
          if (col >= row) v.x = 0.f;
          if (col + 1 >= row) v.y = 0.f;
        }
        *reinterpret_cast<float2*>(tile.O + (int64_t)row * p.ldo + col) = v;
      }
}

template <int MODE, int BM, int BN, int WM, int WN, bool kALo = true>
inline void launch_mix(const MixParams& p, cudaStream_t stream) {
  const size_t smem = MixSmem<MODE, BM, BN>::kBytes;
  auto kernel = mix_kernel<MODE, BM, BN, WM, WN, kALo>;
  allow_dynamic_smem(kernel, smem);
  const int64_t tiles = (int64_t)((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN) * p.splits * p.bh;
  if (tiles == 0) return;
  kernel<<<static_cast<unsigned>(tiles), WM * WN * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mix
}  // namespace bsbr_cuda
