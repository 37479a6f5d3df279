// Launchers: grid shapes, dynamic shared memory, and the choice between the tensor-core path
// (fp16/bf16) and the SIMT path (fp32, or any dtype when p.simt). Included only by the
// instantiation files, each of which instantiates one launcher for one (dtype, head dim).
#pragma once

#include <c10/cuda/CUDAException.h>

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

template <typename T, int D> void run_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T> && (D == 64 || D == 128)) {
    if (!p.simt && p.wgmma) {
      const size_t smem = wg::kSmemBytes<T, D>;
      auto kernel = wg::attn_fwd_kernel<T, D>;
      allow_dynamic_smem(kernel, smem);
      kernel<<<grid_rows(p, wg::kBM), wg::kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  if constexpr (kHasMma<T>) {
    if (!p.simt) {
      constexpr int SD = mma::Cfg<D>::SD, BN = mma::Cfg<D>::BN_FWD;
      const size_t smem = (mma::kBM + 4 * BN) * SD * sizeof(T);
      auto kernel = mma::attn_fwd_kernel<T, D>;
      allow_dynamic_smem(kernel, smem);
      kernel<<<grid_rows(p, mma::kBM), mma::kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  simt::attn_fwd_kernel<T, D><<<grid_rows(p, simt::kBM), simt::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D> void run_attn_bwd(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    if (!p.simt) {
      constexpr int SD = mma::Cfg<D>::SD, BN = mma::Cfg<D>::BN_BWD;
      const size_t smem = (2 * mma::kBM + 4 * BN) * SD * sizeof(T) + 6 * BN * sizeof(float);
      auto kdkv = mma::attn_dkv_kernel<T, D>;
      allow_dynamic_smem(kdkv, smem);
      kdkv<<<grid_rows(p, mma::kBM), mma::kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if constexpr (D == 64 || D == 128) {
        if (p.wgmma) {
          const size_t smem_dq = wg::kDqSmemBytes<T, D>;
          auto kdq = wg::attn_dq_kernel<T, D>;
          allow_dynamic_smem(kdq, smem_dq);
          kdq<<<grid_rows(p, wg::kBM), wg::kThreads, smem_dq, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      auto kdq = mma::attn_dq_kernel<T, D>;
      allow_dynamic_smem(kdq, smem);
      kdq<<<grid_rows(p, mma::kBM), mma::kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(p.dF == nullptr, "the chunk-states backward fuses into the tensor-core dK/dV only");
  simt::attn_dkv_kernel<T, D><<<grid_rows(p, simt::kBM), simt::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  simt::attn_dq_kernel<T, D><<<grid_rows(p, simt::kBM), simt::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


template <typename T, int D> void run_states_fwd(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    if (!p.simt) {
      mma::states_fwd_kernel<T, D><<<grid_chunks(p), mma::kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  aux::states_fwd_kernel<T, D><<<grid_chunks(p), aux::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kPrep, int D> void run_tokmat(const AttnParams& p, cudaStream_t stream) {
  constexpr int SD = mma::Cfg<D>::SD;
  const size_t smem = (2 * D + 2 * 64) * SD * sizeof(T);
  auto kernel = mma::tokmat_kernel<T, D, kPrep>;
  allow_dynamic_smem(kernel, smem);
  const unsigned grid = static_cast<unsigned>(cdiv(p.chunk, 64)) * grid_chunks(p);
  kernel<<<grid, mma::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D> void run_states_bwd(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    if (!p.simt) return run_tokmat<T, false, D>(p, stream);
  }
  const size_t smem = (p.ds * (D + 1) + 2 * aux::kTok * D) * sizeof(float);
  auto kernel = aux::states_bwd_kernel<T, D>;
  allow_dynamic_smem(kernel, smem);
  kernel<<<grid_chunks(p), aux::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D> void run_attn_bwd_prep(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    if (!p.simt) return run_tokmat<T, true, D>(p, stream);
  }
  const size_t smem = (p.ds * (D + 1) + aux::kTok * D) * sizeof(float);
  auto kernel = aux::bwd_prep_kernel<T, D>;
  allow_dynamic_smem(kernel, smem);
  kernel<<<grid_chunks(p), aux::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bsbr_cuda
