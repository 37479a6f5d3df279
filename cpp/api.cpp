#include "bsbr/bsbr.h"

#include "internal_ops.h"

namespace bsbr {

using internal::op;
using T = at::Tensor;
using OptT = std::optional<at::Tensor>;
using OptD = std::optional<double>;

bool ensure_registered() {
  // Throws if the schemas are missing (they are registered when libbsbr or bsbr_ext._C loads).
  c10::Dispatcher::singleton().findSchemaOrThrow("bsbr::bsbr_attention", "");
  return true;
}

at::Tensor bsbr_attention(const T& q, const T& k, const T& v, const T& meta_q, const T& meta_k,
                          int64_t chunk_size, int64_t chunk_overlap, const OptT& q_state,
                          const OptT& k_state, OptD scale, OptD meta_scale, OptD state_scale) {
  static auto h = op<T(const T&, const T&, const T&, const T&, const T&, const OptT&, const OptT&,
                       int64_t, int64_t, OptD, OptD, OptD)>("bsbr::bsbr_attention");
  return h.call(q, k, v, meta_q, meta_k, q_state, k_state, chunk_size, chunk_overlap, scale,
                meta_scale, state_scale);
}

at::Tensor chunk_states(const T& k_state, const T& v, int64_t chunk_size) {
  static auto h = op<T(const T&, const T&, int64_t)>("bsbr::chunk_states");
  return h.call(k_state, v, chunk_size);
}

at::Tensor block_retrieval(const T& meta_q, const T& meta_k, const T& states, OptD meta_scale) {
  static auto h = op<T(const T&, const T&, const T&, OptD)>("bsbr::block_retrieval");
  return h.call(meta_q, meta_k, states, meta_scale);
}

at::Tensor chunk_attention(const T& q, const T& k, const T& v, const T& q_state, const T& retrieved,
                           int64_t chunk_size, int64_t chunk_overlap, OptD scale, OptD state_scale) {
  static auto h = op<T(const T&, const T&, const T&, const T&, const T&, int64_t, int64_t, OptD,
                       OptD)>("bsbr::chunk_attention");
  return h.call(q, k, v, q_state, retrieved, chunk_size, chunk_overlap, scale, state_scale);
}

}  // namespace bsbr
