// Typed calls of the internal ops through the dispatcher, so the autograd layer reaches the
// kernel of whatever device (or Meta/fake tensor) the inputs live on.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace bsbr::internal {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using T = at::Tensor;
using T2 = std::tuple<T, T>;
using T3 = std::tuple<T, T, T>;
using T5 = std::tuple<T, T, T, T, T>;
using T7 = std::tuple<T, T, T, T, T, T, T>;
using OptT = std::optional<T>;

inline T2 bsbr_attention_fwd(const T& q, const T& k, const T& v, const T& mq, const T& mk,
                             const OptT& qs, const OptT& ks, int64_t chunk, int64_t overlap,
                             double scale, double meta_scale, double state_scale) {
  static auto h = op<T2(const T&, const T&, const T&, const T&, const T&, const OptT&, const OptT&,
                        int64_t, int64_t, double, double, double)>("bsbr::_bsbr_attention_fwd");
  return h.call(q, k, v, mq, mk, qs, ks, chunk, overlap, scale, meta_scale, state_scale);
}

inline T7 bsbr_attention_bwd(const T& g, const T& q, const T& k, const T& v, const T& mq,
                             const T& mk, const OptT& qs, const OptT& ks, const T& out, const T& lse,
                             int64_t chunk, int64_t overlap, double scale, double meta_scale,
                             double state_scale) {
  static auto h = op<T7(const T&, const T&, const T&, const T&, const T&, const T&, const OptT&,
                        const OptT&, const T&, const T&, int64_t, int64_t, double, double, double)>(
      "bsbr::_bsbr_attention_bwd");
  return h.call(g, q, k, v, mq, mk, qs, ks, out, lse, chunk, overlap, scale, meta_scale, state_scale);
}

inline T chunk_states_fwd(const T& ks, const T& v, int64_t chunk) {
  static auto h = op<T(const T&, const T&, int64_t)>("bsbr::_chunk_states_fwd");
  return h.call(ks, v, chunk);
}

inline T2 chunk_states_bwd(const T& g, const T& ks, const T& v, int64_t chunk) {
  static auto h = op<T2(const T&, const T&, const T&, int64_t)>("bsbr::_chunk_states_bwd");
  return h.call(g, ks, v, chunk);
}

inline T block_retrieval_fwd(const T& mq, const T& mk, const T& states, double meta_scale) {
  static auto h = op<T(const T&, const T&, const T&, double)>("bsbr::_block_retrieval_fwd");
  return h.call(mq, mk, states, meta_scale);
}

inline T3 block_retrieval_bwd(const T& g, const T& mq, const T& mk, const T& states,
                              double meta_scale) {
  static auto h =
      op<T3(const T&, const T&, const T&, const T&, double)>("bsbr::_block_retrieval_bwd");
  return h.call(g, mq, mk, states, meta_scale);
}

inline T2 chunk_attention_fwd(const T& q, const T& k, const T& v, const T& qs, const T& retrieved,
                              int64_t chunk, int64_t overlap, double scale, double state_scale) {
  static auto h = op<T2(const T&, const T&, const T&, const T&, const T&, int64_t, int64_t, double,
                        double)>("bsbr::_chunk_attention_fwd");
  return h.call(q, k, v, qs, retrieved, chunk, overlap, scale, state_scale);
}

inline T5 chunk_attention_bwd(const T& g, const T& q, const T& k, const T& v, const T& qs,
                              const T& retrieved, const T& out, const T& lse, int64_t chunk,
                              int64_t overlap, double scale, double state_scale) {
  static auto h = op<T5(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                        const T&, int64_t, int64_t, double, double)>("bsbr::_chunk_attention_bwd");
  return h.call(g, q, k, v, qs, retrieved, out, lse, chunk, overlap, scale, state_scale);
}

inline T decode_attention(const T& q, const T& k, const T& v, T& window_k, T& window_v,
                         const T& retrieved, const T& position, const T& qs, int64_t chunk,
                         int64_t overlap, double scale, double state_scale) {
  static auto h = op<T(const T&, const T&, const T&, T&, T&, const T&, const T&, const T&, int64_t,
                       int64_t, double, double)>("bsbr::_decode_attention");
  return h.call(q, k, v, window_k, window_v, retrieved, position, qs, chunk, overlap, scale,
                state_scale);
}

inline T decode_retrieval(const T& mq, const T& mk, const T& states, const T& num_chunks,
                          double meta_scale) {
  static auto h = op<T(const T&, const T&, const T&, const T&, double)>("bsbr::_decode_retrieval");
  return h.call(mq, mk, states, num_chunks, meta_scale);
}

}  // namespace bsbr::internal
