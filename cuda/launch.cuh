// Launchers: grid shapes, dynamic shared memory, and the choice between the tensor-core path
// (fp16/bf16) and the SIMT path (fp32, or any dtype when p.simt). Included only by the
// instantiation files, each of which instantiates one launcher for one (dtype, head dim).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

#include "attn_mma.cuh"
#include "attn_wgmma.cuh"
#include "attn_simt.cuh"
#include "aux_kernels.cuh"

namespace bsbr_cuda {

inline unsigned grid_rows(const AttnParams& p, int rows_per_cta) {
  return static_cast<unsigned>(cdiv(p.n, rows_per_cta)) * static_cast<unsigned>(p.b * p.h);
}

inline unsigned grid_chunks(const AttnParams& p) {
  return static_cast<unsigned>(p.num_chunks) * static_cast<unsigned>(p.b * p.h);
}

template <typename T> constexpr bool kHasMma = !std::is_same<T, float>::value;

// Launches kernel(p) with `smem` bytes of dynamic shared memory (allowed first when over 48 KiB),
// with `overlap_previous` as a programmatic dependent launch (launch_kernel).
template <typename Kernel>
inline void launch_smem(Kernel kernel, unsigned grid, int threads, size_t smem,
                        cudaStream_t stream, const AttnParams& p, bool overlap_previous = false) {
  allow_dynamic_smem(kernel, smem);
  launch_kernel(kernel, grid, threads, smem, stream, overlap_previous, p);
}

template <typename T, int D> void run_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T> && (D == 64 || D == 128)) {
    if (!p.simt && p.wgmma) {
      constexpr int WGS = wg::kFwdWarpgroups<D>, THREADS = WGS * wg::kThreads;
      constexpr size_t smem = wg::kSmemBytes<T, D>;
      const auto kernel = wg::attn_fwd_kernel<T, D>;
      unsigned grid = grid_rows(p, WGS * wg::kBM);
      if constexpr (wg::kFwdOwnStatesBuffer<D>) {  // persistent: as many CTAs as fit at once
        static const int per_sm = [&] {
          allow_dynamic_smem(kernel, smem);  // the occupancy query counts only what is allowed
          int blocks = 0;
          C10_CUDA_CHECK(
              cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, THREADS, smem));
          return std::max(blocks, 1);
        }();
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        grid = std::min(grid, static_cast<unsigned>(per_sm * sms));
      }
      return launch_smem(kernel, grid, THREADS, smem, stream, p, p.waits_for_previous);
    }
  }
  if constexpr (kHasMma<T>) {
    if (!p.simt) {
      constexpr int SD = mma::Cfg<D>::SD, BN = mma::Cfg<D>::BN_FWD;
      return launch_smem(mma::attn_fwd_kernel<T, D>, grid_rows(p, mma::kBM), mma::kThreads,
                         (mma::kBM + 4 * BN) * SD * sizeof(T), stream, p);
    }
  }
  simt::attn_fwd_kernel<T, D><<<grid_rows(p, simt::kBM), simt::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// p.bwd_part (AttnParams) picks what this launches: 0 every kernel; 1 the Hopper dQ kernel where
// it is a kernel of its own (else nothing); 2 whatever part 1 left. With p.overlap_previous or
// p.waits_for_previous the first Hopper kernel launched overlaps the kernel before it.
template <typename T, int D> void run_attn_bwd(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    if (!p.simt) {
      constexpr int SD = mma::Cfg<D>::SD, BN = mma::Cfg<D>::BN_BWD;
      const size_t smem = (2 * mma::kBM + 4 * BN) * SD * sizeof(T) + 6 * BN * sizeof(float);
      if constexpr (D == 64 || D == 128) {
        if (p.wgmma) {
          const bool overlaps = p.overlap_previous || p.waits_for_previous;
          if (p.dqkv && p.overlap == 0 && p.chunk == 128) {
            if (p.bwd_part == 1) return;
            return launch_smem(wg::attn_dqkv_kernel<T, D, 2>, grid_rows(p, 2 * wg::kBM),
                               2 * wg::kThreads, wg::kDqkvSmemBytes<T, D, 2>, stream, p, overlaps);
          }
          if (p.dqkv && p.overlap == 0 && 64 % p.chunk == 0) {
            if (p.bwd_part == 1) return;
            return launch_smem(wg::attn_dqkv_kernel<T, D, 1>, grid_rows(p, wg::kBM), wg::kThreads,
                               wg::kDqkvSmemBytes<T, D, 1>, stream, p, overlaps);
          }
          if (p.bwd_part != 1) {
            launch_smem(wg::attn_dkv_kernel<T, D>, grid_rows(p, wg::kBM), wg::kThreads,
                        wg::kDkvSmemBytes<T, D>, stream, p, overlaps);
          }
          if (p.bwd_part == 2) return;
          return launch_smem(wg::attn_dq_kernel<T, D>, grid_rows(p, wg::kBM), wg::kThreads,
                             wg::kDqSmemBytes<T, D>, stream, p,
                             p.overlap_previous && p.bwd_part == 1);
        }
      }
      if (p.bwd_part == 1) return;
      launch_smem(mma::attn_dkv_kernel<T, D>, grid_rows(p, mma::kBM), mma::kThreads, smem, stream,
                  p);
      return launch_smem(mma::attn_dq_kernel<T, D>, grid_rows(p, mma::kBM), mma::kThreads, smem,
                         stream, p);
    }
  }
  if (p.bwd_part == 1) return;
  TORCH_INTERNAL_ASSERT(p.dF == nullptr, "the chunk-states backward fuses into the tensor-core dK/dV only");
  simt::attn_dkv_kernel<T, D><<<grid_rows(p, simt::kBM), simt::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  simt::attn_dq_kernel<T, D><<<grid_rows(p, simt::kBM), simt::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


template <typename T, int D> void run_states_fwd(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    if (!p.simt) {
      return launch_smem(mma::states_fwd_kernel<T, D>, grid_chunks(p), mma::kStatesThreads<D>,
                         mma::kStatesSmemBytes<T, D>, stream, p, p.overlap_previous);
    }
  }
  aux::states_fwd_kernel<T, D><<<grid_chunks(p), aux::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kPrep, int D> void run_tokmat(const AttnParams& p, cudaStream_t stream) {
  constexpr int rows = mma::kTokmatRows<D>;
  const unsigned grid = static_cast<unsigned>(cdiv(p.chunk, rows)) * grid_chunks(p);
  launch_smem(mma::tokmat_kernel<T, D, kPrep>, grid, mma::kTokmatThreads<D>,
              mma::kTokmatSmemBytes<T, D>, stream, p, kPrep && p.waits_for_previous);
}

template <typename T, int D> void run_states_bwd(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    if (!p.simt) return run_tokmat<T, false, D>(p, stream);
  }
  launch_smem(aux::states_bwd_kernel<T, D>, grid_chunks(p), aux::kThreads,
              (p.ds * (D + 1) + 2 * aux::kTok * D) * sizeof(float), stream, p);
}

template <typename T, int D> bool run_attn_bwd_prep(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    if (!p.simt) {
      run_tokmat<T, true, D>(p, stream);
      return mma::tokmat_prep_writes_states<D>(p);
    }
  }
  launch_smem(aux::bwd_prep_kernel<T, D>, grid_chunks(p), aux::kThreads,
              (p.ds * (D + 1) + aux::kTok * D) * sizeof(float), stream, p);
  return false;
}

}  // namespace bsbr_cuda
