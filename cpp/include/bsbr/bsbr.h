// C++ API of libbsbr: the BSBR ops (SPEC §1) callable from C++ programs. Each function calls the
// corresponding torch.ops.bsbr op through the dispatcher, so it runs on the inputs' device and is
// differentiable. Linking libbsbr registers the ops, also for TorchScript and AOTInductor models
// that use them (CMake: find_package(bsbr) + target_link_libraries(app PRIVATE bsbr::bsbr)).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#if defined(_WIN32)
#if defined(BSBR_BUILDING_LIBRARY)
#define BSBR_API __declspec(dllexport)
#else
#define BSBR_API __declspec(dllimport)
#endif
#else
#define BSBR_API __attribute__((visibility("default")))
#endif

namespace bsbr {

// Returns true once torch.ops.bsbr is registered in this process (always, when libbsbr is loaded;
// throws c10::Error otherwise). Registration itself happens when the library is loaded; calling
// this (or any function below) also makes the library a hard link dependency of the program,
// for build setups that do not use the bsbr::bsbr CMake target (which already keeps it linked).
BSBR_API bool ensure_registered();

// Block Sparse Attention with Block Retrieval, fused. q, k, v: [b, h, n, d]; meta_q, meta_k:
// [b, h, ceil(n / chunk_size), dm]; q_state, k_state: [b, h, n, ds] (both or neither; default
// q and k). Scales default to 1/sqrt(d), 1/sqrt(dm) and 1/(chunk_size*sqrt(ds)).
BSBR_API at::Tensor bsbr_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& meta_q, const at::Tensor& meta_k, int64_t chunk_size,
                                   int64_t chunk_overlap = 0,
                                   const std::optional<at::Tensor>& q_state = std::nullopt,
                                   const std::optional<at::Tensor>& k_state = std::nullopt,
                                   std::optional<double> scale = std::nullopt,
                                   std::optional<double> meta_scale = std::nullopt,
                                   std::optional<double> state_scale = std::nullopt);

// F_j = k_state[j]^T v[j] for every chunk j: [b, h, C, ds, d], fp32 (fp64 for fp64 inputs).
BSBR_API at::Tensor chunk_states(const at::Tensor& k_state, const at::Tensor& v, int64_t chunk_size);

// S_c = sum_{j<c} softmax_j(meta_scale <meta_q[c], meta_k[j]>) F_j; S_0 = 0.
BSBR_API at::Tensor block_retrieval(const at::Tensor& meta_q, const at::Tensor& meta_k,
                                    const at::Tensor& states,
                                    std::optional<double> meta_scale = std::nullopt);

// o_t = state_scale * q_state[t] @ S_chunk(t) + causal softmax attention over the chunk so far
// plus chunk_overlap earlier tokens.
BSBR_API at::Tensor chunk_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& q_state, const at::Tensor& retrieved,
                                    int64_t chunk_size, int64_t chunk_overlap = 0,
                                    std::optional<double> scale = std::nullopt,
                                    std::optional<double> state_scale = std::nullopt);

}  // namespace bsbr
