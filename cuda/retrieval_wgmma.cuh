// Retrieval mixing products S = P F (mode 0) and dF = P^T dS (mode 1) on Hopper's warpgroup
// MMA (wgmma.mma_async, sm_90a), for the fused op with fp16/bf16 inputs. Same operands (split
// words, retrieval_mma.cuh), same products (hi*hi + hi*lo, and lo*hi unless kALo is false), fp32
// accumulation; only the order of the fp32 additions inside the tensor cores differs from
// mix_kernel. What changes is how the tensor cores are fed: under mma.sync every warp read and
// regrouped its own B fragments and issued one m16n8k16 per 8 columns (tensor pipe 32-37%
// active, stall `wait`). Here a CTA of two warpgroups owns a 128 x 128 tile; each stage's B tile
// of split words is split once, by the whole CTA, into bf16 hi and lo planes in wgmma's
// no-swizzle N-major layout, and each warpgroup issues m64n128k16 wgmmas with its 64 rows of P
// from registers (the mma.sync A layout) and B from those planes.
//
// The device code exists only when compiling for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the host
// launches it only on a compute capability 9.0 GPU of a build that has sm_90a code (BSBR_WGMMA,
// bsbr_cuda.cu).
#pragma once

#include "retrieval_mma.cuh"

namespace bsbr_cuda {
namespace mix {

constexpr int kWgBM = 128, kWgBN = 128, kWgThreads = 256;

// Shared memory: mix_kernel's 2-stage cp.async words (MixSmem), then the hi and lo planes of one
// B tile (kBK x kWgBN bf16 each).
template <int MODE>
struct WgSmem {
  using Words = MixSmem<MODE, kWgBM, kWgBN>;
  static constexpr int kPlane = kBK * kWgBN;  // bf16 elements
  static constexpr size_t kBytes = Words::kBytes + 2 * kPlane * sizeof(__nv_bfloat16);
  static_assert(Words::kBytes % 16 == 0, "planes must start 16-byte aligned");
};

// The planes hold 8 x 8 core matrices (8 consecutive n = 16 bytes, times 8 consecutive k rows =
// 128 contiguous bytes), core matrix (k / 8, n / 8) at byte ((k / 8) * (BN / 8) + n / 8) * 128:
// n-adjacent core matrices are kSbo apart, k-adjacent ones kLbo.
constexpr uint32_t kSbo = 128, kLbo = (kWgBN / 8) * 128;

// wgmma shared-memory descriptor: start address, leading and stride byte offsets (all >> 4),
// base offset 0, no swizzle.
__device__ __forceinline__ uint64_t plane_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(kLbo >> 4) << 16) |
         (static_cast<uint64_t>(kSbo >> 4) << 32);
}

// One stage's B tile of split words ([kBK][BN] with row pitch PITCH) -> the hi and lo planes.
// Thread i takes row k = i % 8 of a k group and 4 columns: 8 threads read 8 rows (PITCH = 4 mod
// 32 words: distinct banks) and 16 threads write one core matrix's 128 bytes.
template <int BN, int PITCH, int NT>
__device__ __forceinline__ void split_b_tile(const float* bs, __nv_bfloat16* hi,
                                             __nv_bfloat16* lo) {
  constexpr int kQuads = BN / 4;
  static_assert(kBK * kQuads % NT == 0, "the tile's 4-word pieces must divide among the threads");
#pragma unroll
  for (int i = 0; i < kBK * kQuads / NT; ++i) {
    const int idx = i * NT + threadIdx.x;
    const int k = (idx / (8 * kQuads)) * 8 + idx % 8, q = (idx / 8) % kQuads;
    const uint4 w = *reinterpret_cast<const uint4*>(bs + k * PITCH + q * 4);
    const int off = ((k / 8) * (BN / 8) + q / 2) * 64 + (k % 8) * 8 + (q % 2) * 4;
    uint2 h, l;
    regroup_words(w.x, w.y, h.x, l.x);
    regroup_words(w.z, w.w, h.y, l.y);
    *reinterpret_cast<uint2*>(hi + off) = h;
    *reinterpret_cast<uint2*>(lo + off) = l;
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// d (64 x 128 fp32, the warpgroup's accumulator) += a (64 x 16 bf16, registers) * B (16 x 128
// bf16, N-major in shared memory at desc_b).
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], const uint32_t (&a)[4],
                                                 uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
#endif

// MODE 0: A = P stored [m][k], B = F stored [k][n]; MODE 1: A(m, k) = P[k][m], B = dS [k][n].
// Two CTAs per SM (82-89 KiB of shared memory and <= 128 registers each): one CTA's loads and plane
// split overlap the other's wgmmas. (Measured on an H200 against one CTA per SM with a 4-stage
// pipeline, split overlapped with the wgmmas: that was slower at d = 128 and no faster at 64.)
template <int MODE, bool kALo>
__global__ void __launch_bounds__(kWgThreads, 2) mix_wgmma_kernel(const MixParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(MODE == 0 || MODE == 1, "wgmma mixing covers S = P F and dF = P^T dS");
  using Smem = WgSmem<MODE>;
  using Words = typename Smem::Words;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  __nv_bfloat16* plane_hi = reinterpret_cast<__nv_bfloat16*>(smem + Words::kBytes / sizeof(float));
  __nv_bfloat16* plane_lo = plane_hi + Smem::kPlane;
  const uint32_t hi_addr = smem_addr(plane_hi), lo_addr = smem_addr(plane_lo);

  const MixTile<MODE, kWgBM, kWgBN, kWgThreads> tile(p);
  const int kb = tile.kb, ke = tile.ke;
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;

  if (kb < ke) tile.load(smem, p, 0, kb);
  for (int kt = kb; kt < ke; ++kt) {
    const int st = (kt - kb) & 1;
    if (kt + 1 < ke) {
      tile.load(smem, p, st ^ 1, kt + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // stage st landed; every wgmma of the previous tile has completed
    const float* as = smem + st * Words::A_SIZE;
    const float* bs = smem + 2 * Words::A_SIZE + st * Words::B_SIZE;
    uint32_t ahi[kBK / 16][4], alo[kBK / 16][4];
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      load_a_split<Words::kAmk, Words::A_PITCH>(as, wg * 64 + warp * 16, ks * 16, ahi[ks], alo[ks]);
    }
    split_b_tile<kWgBN, Words::B_PITCH, kWgThreads>(bs, plane_hi, plane_lo);
    fence_proxy_async();
    __syncthreads();
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      const uint32_t koff = ks * 2 * kLbo;  // 16 k rows = two core-matrix rows
      if constexpr (kALo) wgmma_m64n128k16(acc, alo[ks], plane_desc(hi_addr + koff));
      wgmma_m64n128k16(acc, ahi[ks], plane_desc(lo_addr + koff));
      wgmma_m64n128k16(acc, ahi[ks], plane_desc(hi_addr + koff));
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc);
    fence_operands(ahi);
    if constexpr (kALo) fence_operands(alo);
  }

  // Accumulator: d[4j + e] at row 16 * warp + g (+8 for e >= 2), cols 8j + 2t (+1).
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < kWgBN / 8; ++j)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = tile.m0 + wg * 64 + warp * 16 + g + hh * 8;
      const int col = tile.n0 + j * 8 + 2 * t;
      if (row < p.M && col < p.N) {
        *reinterpret_cast<float2*>(tile.O + (int64_t)row * p.ldo + col) =
            make_float2(acc[4 * j + 2 * hh], acc[4 * j + 2 * hh + 1]);
      }
    }
#endif
}

template <int MODE, bool kALo>
inline void launch_mix_wgmma(const MixParams& p, cudaStream_t stream) {
  const size_t smem = WgSmem<MODE>::kBytes;
  auto kernel = mix_wgmma_kernel<MODE, kALo>;
  allow_dynamic_smem(kernel, smem);
  const int64_t tiles = (int64_t)((p.M + kWgBM - 1) / kWgBM) * ((p.N + kWgBN - 1) / kWgBN) * p.bh;
  if (tiles == 0) return;
  kernel<<<static_cast<unsigned>(tiles), kWgThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mix
}  // namespace bsbr_cuda
