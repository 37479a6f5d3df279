// CUDA implementations of the streaming-decode internal ops _decode_attention and
// _decode_retrieval (schemas and the decode contract in cpp/ops.cpp; kernels in
// decode_kernels.cuh). The public ops (cpp/public_ops.cpp) validate shapes, dtypes and devices
// and make every tensor contiguous; this file adds the limits of the CUDA kernels, picks the
// instantiation (dtype, 16-byte vector loads or scalar ones) and launches one kernel on the
// current stream. No allocation beyond the output, no host synchronisation.
//
// All three dtypes are compiled here whatever BSBR_DTYPES says: the decode kernels are small.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "bsbr_common.h"
#include "decode_kernels.cuh"

namespace bsbr_cuda {
namespace {

using at::Tensor;
using bsbr::message;  // error messages without iostream number formatting (see bsbr_common.h)
namespace dk = bsbr_cuda::decode;

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void check_decode_dtype(at::ScalarType st, const char* name, const char* op) {
  TORCH_CHECK_TYPE(st != at::kDouble,
                   message("bsbr CUDA kernels (", op, "): ", name,
                           " is float64, which CUDA does not support; use float16, bfloat16 or "
                           "float32 on CUDA, or run float64 on the CPU"));
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat,
                   message("bsbr CUDA kernels (", op, "): ", name,
                           " must be float16, bfloat16 or float32, got ", st));
}

void check_decode_on(const Tensor& t, const char* name, const Tensor& ref, const char* op) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == ref.device(),
                    message("bsbr CUDA kernels (", op, "): all tensors must be on one CUDA device; ",
                            name, " is on ", t.device(), ", expected ", ref.device()));
  TORCH_CHECK_VALUE(t.is_contiguous(),
                    message("bsbr CUDA kernels (", op, "): ", name,
                            " must be contiguous (the public op makes it so)"));
}

void check_dim_limit(int64_t x, const char* what, const char* op) {
  TORCH_CHECK_VALUE(x <= dk::kMaxDim, message("bsbr CUDA kernels (", op, "): ", what,
                                              " must be <= 256, got ", x));
}

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

// ------------------------------------------------------------------ _decode_attention

template <typename T, int VEC, int SVEC>
void launch_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& window_k,
                      Tensor& window_v, const Tensor& retrieved, const Tensor& position,
                      const Tensor& q_state, Tensor& out, int heads, int d, int ds, int chunk,
                      int overlap, float scale_log2, float state_scale, cudaStream_t stream) {
  const int64_t rows = q.size(0) * q.size(1);
  const size_t smem =
      sizeof(float) * dk::attention_smem_floats(d, ds, overlap + chunk, VEC, SVEC);
  dk::decode_attention_kernel<T, VEC, SVEC><<<static_cast<unsigned>(rows), dk::kThreads, smem, stream>>>(
      static_cast<const T*>(q.const_data_ptr()), static_cast<const T*>(k.const_data_ptr()),
      static_cast<const T*>(v.const_data_ptr()), static_cast<T*>(window_k.data_ptr()),
      static_cast<T*>(window_v.data_ptr()), retrieved.const_data_ptr<float>(),
      position.const_data_ptr<int64_t>(), static_cast<const T*>(q_state.const_data_ptr()),
      static_cast<T*>(out.data_ptr()), heads, d, ds, chunk, overlap, scale_log2, state_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& window_k,
                        Tensor& window_v, const Tensor& retrieved, const Tensor& position,
                        const Tensor& q_state, int64_t chunk_size, int64_t chunk_overlap,
                        double scale, double state_scale) {
  const char* op = "decode_attention";
  TORCH_CHECK_VALUE(q.is_cuda(), message("bsbr CUDA kernels (", op, "): q must be a CUDA tensor"));
  check_decode_dtype(q.scalar_type(), "q", op);
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"},
                         std::pair{&q_state, "q_state"}, std::pair{&retrieved, "retrieved"},
                         std::pair{&position, "position"}}) {
    check_decode_on(*t, name, q, op);
  }
  check_decode_on(window_k, "window_k", q, op);
  check_decode_on(window_v, "window_v", q, op);
  const Tensor& wk = window_k;
  const Tensor& wv = window_v;
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&q_state, "q_state"},
                         std::pair{&wk, "window_k"}, std::pair{&wv, "window_v"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(),
                     message("bsbr CUDA kernels (", op, "): ", name, " must have the dtype of q (",
                             q.scalar_type(), "), got ", t->scalar_type()));
  }
  TORCH_CHECK_TYPE(retrieved.scalar_type() == at::kFloat,
                   message("bsbr CUDA kernels (", op, "): retrieved must be float32, got ",
                           retrieved.scalar_type()));
  TORCH_CHECK_TYPE(position.scalar_type() == at::kLong,
                   message("bsbr CUDA kernels (", op, "): position must be int64, got ",
                           position.scalar_type()));
  TORCH_CHECK_VALUE(q.dim() == 3, message("bsbr CUDA kernels (", op, "): q must be [b, h, d]"));
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), ds = q_state.size(2);
  check_dim_limit(d, "head dim d (last dim of q, k, v)", op);
  check_dim_limit(ds, "state dim ds (last dim of q_state)", op);
  TORCH_CHECK_VALUE(chunk_size >= 1 && chunk_overlap >= 0 && chunk_overlap <= chunk_size,
                    message("bsbr CUDA kernels (", op, "): need chunk_size >= 1 and 0 <= "
                            "chunk_overlap <= chunk_size, got chunk_size = ", chunk_size,
                            ", chunk_overlap = ", chunk_overlap));
  TORCH_CHECK_VALUE(chunk_overlap + chunk_size <= dk::kMaxSlots,
                    message("bsbr CUDA kernels (", op, "): chunk_overlap + chunk_size (the window "
                            "slots) must be <= ", static_cast<int64_t>(dk::kMaxSlots), ", got ",
                            chunk_overlap + chunk_size));
  TORCH_CHECK_VALUE(b * h <= kIntMax, message("bsbr CUDA kernels (", op,
                                              "): batch * heads must be < 2^31, got ", b * h));

  c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty_like(q);
  if (b * h == 0 || d == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const float sscale = static_cast<float>(state_scale);
  const int64_t pack = 16 / q.element_size();
  const bool vec = d % pack == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
                   aligned16(window_k) && aligned16(window_v);
  const bool svec = d % 4 == 0 && aligned16(retrieved);
  const int H = static_cast<int>(h), D = static_cast<int>(d), DS = static_cast<int>(ds);
  const int B = static_cast<int>(chunk_size), W = static_cast<int>(chunk_overlap);
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = 16 / sizeof(T);
    if (vec && svec)
      launch_attention<T, P, 4>(q, k, v, window_k, window_v, retrieved, position, q_state, out, H,
                                D, DS, B, W, scale_log2, sscale, stream);
    else if (vec)
      launch_attention<T, P, 1>(q, k, v, window_k, window_v, retrieved, position, q_state, out, H,
                                D, DS, B, W, scale_log2, sscale, stream);
    else if (svec)
      launch_attention<T, 1, 4>(q, k, v, window_k, window_v, retrieved, position, q_state, out, H,
                                D, DS, B, W, scale_log2, sscale, stream);
    else
      launch_attention<T, 1, 1>(q, k, v, window_k, window_v, retrieved, position, q_state, out, H,
                                D, DS, B, W, scale_log2, sscale, stream);
  });
  return out;
}

// ------------------------------------------------------------------ _decode_retrieval

template <typename T, int VEC, int SVEC>
void launch_retrieval(const Tensor& meta_q, const Tensor& meta_k, const Tensor& states,
                      const Tensor& num_chunks, Tensor& out, int heads, int cap, int dm, int64_t E,
                      int cols, int ntiles, int64_t blocks, float ms_log2, cudaStream_t stream) {
  dk::decode_retrieval_kernel<T, VEC, SVEC><<<static_cast<unsigned>(blocks), dk::kThreads, 0, stream>>>(
      static_cast<const T*>(meta_q.const_data_ptr()), static_cast<const T*>(meta_k.const_data_ptr()),
      states.const_data_ptr<float>(), num_chunks.const_data_ptr<int64_t>(),
      out.data_ptr<float>(), heads, cap, dm, E, cols, ntiles, ms_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor decode_retrieval(const Tensor& meta_q, const Tensor& meta_k, const Tensor& states,
                        const Tensor& num_chunks, double meta_scale) {
  const char* op = "decode_retrieval";
  TORCH_CHECK_VALUE(meta_q.is_cuda(),
                    message("bsbr CUDA kernels (", op, "): meta_q must be a CUDA tensor"));
  check_decode_dtype(meta_q.scalar_type(), "meta_q", op);
  check_decode_on(meta_q, "meta_q", meta_q, op);
  check_decode_on(meta_k, "meta_k", meta_q, op);
  check_decode_on(states, "states", meta_q, op);
  check_decode_on(num_chunks, "num_chunks", meta_q, op);
  TORCH_CHECK_TYPE(meta_k.scalar_type() == meta_q.scalar_type(),
                   message("bsbr CUDA kernels (", op, "): meta_k must have the dtype of meta_q (",
                           meta_q.scalar_type(), "), got ", meta_k.scalar_type()));
  TORCH_CHECK_TYPE(states.scalar_type() == at::kFloat,
                   message("bsbr CUDA kernels (", op, "): states must be float32, got ",
                           states.scalar_type()));
  TORCH_CHECK_TYPE(num_chunks.scalar_type() == at::kLong,
                   message("bsbr CUDA kernels (", op, "): num_chunks must be int64, got ",
                           num_chunks.scalar_type()));
  TORCH_CHECK_VALUE(meta_k.dim() == 4 && states.dim() == 5,
                    message("bsbr CUDA kernels (", op, "): meta_k must be 4-D and states 5-D"));
  const int64_t b = states.size(0), h = states.size(1), cap = states.size(2);
  const int64_t ds = states.size(3), d = states.size(4), dm = meta_q.size(2);
  check_dim_limit(dm, "meta dim dm (last dim of meta_q, meta_k)", op);
  TORCH_CHECK_VALUE(cap <= kIntMax, message("bsbr CUDA kernels (", op,
                                            "): capacity (dim 2 of meta_k, states) must be < 2^31, got ",
                                            cap));

  c10::cuda::CUDAGuard guard(meta_q.device());
  Tensor out = at::empty({b, h, ds, d}, states.options());
  const int64_t E = ds * d;
  if (out.numel() == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t pack = 16 / meta_q.element_size();
  const bool vec = dm % pack == 0 && aligned16(meta_q) && aligned16(meta_k);
  const bool svec = E % 4 == 0 && aligned16(states);
  // Tile width (column packs per CTA): as wide as possible while the grid still has a few CTAs per
  // SM to stream the states at full bandwidth; narrower tiles put more chunk groups in a CTA.
  const int64_t ev = svec ? E / 4 : E;
  int64_t cols = 1;
  while (cols < ev && cols < dk::kThreads) cols <<= 1;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  while (cols > 32 && b * h * ((ev + cols - 1) / cols) < 4 * sms) cols >>= 1;
  const int64_t ntiles = (ev + cols - 1) / cols;
  const int64_t blocks = b * h * ntiles;
  TORCH_CHECK_VALUE(blocks <= kIntMax && ntiles <= kIntMax,
                    message("bsbr CUDA kernels (", op, "): batch * heads * state tiles must be < 2^31, got ",
                            blocks));
  const float ms_log2 = static_cast<float>(meta_scale * 1.4426950408889634);
  const int H = static_cast<int>(h), CAP = static_cast<int>(cap), DM = static_cast<int>(dm);
  const int C = static_cast<int>(cols), NT = static_cast<int>(ntiles);
  dispatch_dtype(meta_q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = 16 / sizeof(T);
    if (vec && svec)
      launch_retrieval<T, P, 4>(meta_q, meta_k, states, num_chunks, out, H, CAP, DM, E, C, NT,
                                blocks, ms_log2, stream);
    else if (vec)
      launch_retrieval<T, P, 1>(meta_q, meta_k, states, num_chunks, out, H, CAP, DM, E, C, NT,
                                blocks, ms_log2, stream);
    else if (svec)
      launch_retrieval<T, 1, 4>(meta_q, meta_k, states, num_chunks, out, H, CAP, DM, E, C, NT,
                                blocks, ms_log2, stream);
    else
      launch_retrieval<T, 1, 1>(meta_q, meta_k, states, num_chunks, out, H, CAP, DM, E, C, NT,
                                blocks, ms_log2, stream);
  });
  return out;
}

}  // namespace
}  // namespace bsbr_cuda

TORCH_LIBRARY_IMPL(bsbr, CUDA, m) {
  m.impl("_decode_attention", &bsbr_cuda::decode_attention);
  m.impl("_decode_retrieval", &bsbr_cuda::decode_retrieval);
}
