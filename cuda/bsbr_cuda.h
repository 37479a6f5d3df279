// Plain parameter structs shared by the host code (bsbr_cuda.cu) and the kernels, plus the
// launcher declarations. Each launcher is a template over (element type, head dim) whose explicit
// instantiations live one per file in cuda/instantiations/, so that builds parallelise and the
// BSBR_HEAD_DIMS / BSBR_DTYPES filters of setup.py can drop whole files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace bsbr_cuda {

// Strides (in elements) of a [b, h, n, e] tensor whose last dim is contiguous.
struct Strides {
  int64_t b = 0, h = 0, n = 0;
};

// One struct for every token-level kernel; each kernel reads the fields it needs.
struct AttnParams {
  // Token tensors ([b, h, n, d] or [b, h, n, ds]); layout in the matching Strides.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* qs = nullptr;    // q_state (forward / chunk-attention backward) or k_state (states)
  const void* dout = nullptr;  // grad of the output
  const void* out = nullptr;   // forward output (backward preprocess)
  Strides q_st, k_st, v_st, qs_st, dout_st, out_st;
  // Forward: qs is q itself (the omitted q_state): the long-range term reads its A operand from
  // the Q tile the kernel holds in shared memory instead of loading q_state from global memory.
  bool qs_is_q = false;

  // fp32, contiguous [b, h, C, ds, d]: retrieved states (attention) or chunk-state grads.
  const float* S = nullptr;
  // fp32, contiguous [b, h, C, d, d]: the chunk-state gradients when k_state is k. Set for the
  // tensor-core dK/dV kernel, which then adds the chunk-states backward (v dF^T into dk, k dF
  // into dv) before its one rounding.
  const float* dF = nullptr;

  // Outputs, all contiguous. Token outputs are [b, h, n, e] in the input dtype.
  void* o = nullptr;
  float* lse = nullptr;    // [b, h, n]
  float* delta = nullptr;  // [b, h, n]: rowsum(dO * O_local)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dqs = nullptr;
  float* states = nullptr;       // [b, h, C, ds, d]
  bool states_split = false;     // states as split-bf16 words (kernel_utils.cuh), tensor-core kernel only
  // Add to what an output already holds (fp32 sum, one rounding) instead of overwriting it. The
  // fused backward uses them to sum the gradients of one tensor's two paths in place: the state
  // path's dv (states backward), and with q_state / k_state omitted (= q / k) their gradients in
  // dq (attention dQ after the preprocess wrote dqs there) and dk (states backward, into dqs = dk).
  bool dv_accumulate = false;
  bool dqs_accumulate = false;
  bool dq_accumulate = false;

  int b = 0, h = 0, n = 0, ds = 0, chunk = 0, overlap = 0, num_chunks = 0;
  float scale = 1.f, state_scale = 1.f;
  float out_scale = 1.f;  // states kernel: multiplies the result
  bool simt = false;      // force the SIMT (non tensor-core) path, for cross-checking
  bool wgmma = false;     // forward, dQ, dK/dV; fp16/bf16, d = 64 / 128: Hopper kernels (attn_wgmma.cuh)
  // With wgmma: dQ, dK and dV in one kernel where the windows allow it (overlap 0, chunk 128 or
  // a divisor of 64: wg::attn_dqkv_kernel); chosen by use_dqkv (bsbr_cuda.cu).
  bool dqkv = false;
  // Attention backward: which of its kernels run_attn_bwd launches (launch.cuh), so that the
  // fused op can issue the Hopper dQ kernel early, overlapping the dP product (bsbr_cuda.cu).
  int bwd_part = 0;
  // Launched to overlap the kernel just before it on the stream (programmatic dependent launch),
  // which writes nothing this kernel reads and reads nothing it writes: the chunk-states forward
  // after the retrieval weights, the Hopper dQ kernel after dP = dS F^T, the last head group's
  // Hopper dK/dV (or dQ/dK/dV) kernel after the meta gradients. Its last CTA then waits for that
  // kernel before exiting, so that the kernels launched after it, normally, find both complete.
  bool overlap_previous = false;
  // Launched to overlap the kernel just before it on the stream although it reads what that
  // kernel, or the one that kernel overlaps, writes (programmatic dependent launch): the
  // retrieved states S in the Hopper forward and in the backward preprocess, after S = P F on
  // wgmma; dF in the Hopper dK/dV (or dQ/dK/dV) kernel, after the softmax backward that overlaps
  // dF = P^T dS. A CTA may load token tensors and compute before it waits for that kernel
  // (pdl_wait); it reads S or dF, writes anything, or lets the next kernel start only after.
  bool waits_for_previous = false;
};

template <typename T, int D> void run_attn_fwd(const AttnParams& p, cudaStream_t stream);
template <typename T, int D> void run_attn_bwd(const AttnParams& p, cudaStream_t stream);
// Chunk states F_j = sum_t qs[t]^T v[t] (times out_scale), and its backward.
template <typename T, int D> void run_states_fwd(const AttnParams& p, cudaStream_t stream);
template <typename T, int D> void run_states_bwd(const AttnParams& p, cudaStream_t stream);
// Backward preprocess: dqs = state_scale dO S_c^T, delta = dO.out - qs.dqs. With p.states set,
// the kernel may also write the chunk-state gradients out_scale * qs_c^T dO_c there (as
// run_states_fwd with x = qs, y = dO would); returns whether it did.
template <typename T, int D> bool run_attn_bwd_prep(const AttnParams& p, cudaStream_t stream);

}  // namespace bsbr_cuda
