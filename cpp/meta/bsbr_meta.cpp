// Meta kernels of the internal ops: output shapes and dtypes only, with symbolic sizes so that
// torch.compile and torch.export can trace with a dynamic sequence length. Outputs are contiguous,
// as on every device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bsbr_common.h"

namespace bsbr::meta {
namespace {

at::Tensor like(const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }

at::Tensor lse_for(const at::Tensor& q) {
  return at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)},
                          q.options().dtype(state_dtype(q.scalar_type())));
}

at::Tensor chunk_states_fwd(const at::Tensor& k_state, const at::Tensor& v, int64_t chunk_size) {
  return at::empty_symint(
      {v.sym_size(0), v.sym_size(1), num_chunks(v.sym_size(2), chunk_size), k_state.sym_size(3), v.sym_size(3)},
      v.options().dtype(state_dtype(v.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> chunk_states_bwd(const at::Tensor&, const at::Tensor& k_state,
                                                    const at::Tensor& v, int64_t) {
  return {like(k_state), like(v)};
}

at::Tensor block_retrieval_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor& states, double) {
  return like(states);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_retrieval_bwd(
    const at::Tensor&, const at::Tensor& meta_q, const at::Tensor& meta_k, const at::Tensor& states,
    double) {
  return {like(meta_q), like(meta_k), like(states)};
}

std::tuple<at::Tensor, at::Tensor> chunk_attention_fwd(
    const at::Tensor& q, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, int64_t, double, double) {
  return {like(q), lse_for(q)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_attention_bwd(
    const at::Tensor&, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_state, const at::Tensor& retrieved, const at::Tensor&, const at::Tensor&,
    int64_t, int64_t, double, double) {
  return {like(q), like(k), like(v), like(q_state), like(retrieved)};
}

std::tuple<at::Tensor, at::Tensor> bsbr_attention_fwd(
    const at::Tensor& q, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t, double,
    double, double) {
  return {like(q), lse_for(q)};
}

// grad of a state input: its shape, or empty when it was omitted (folded into grad_q / grad_k).
at::Tensor state_grad(const std::optional<at::Tensor>& state, const at::Tensor& fallback) {
  return state.has_value() ? like(*state) : at::empty({0}, fallback.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bsbr_attention_bwd(const at::Tensor&, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& meta_q, const at::Tensor& meta_k,
                   const std::optional<at::Tensor>& q_state, const std::optional<at::Tensor>& k_state,
                   const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double, double) {
  return {like(q), like(k), like(v), like(meta_q), like(meta_k), state_grad(q_state, q),
          state_grad(k_state, k)};
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor&, const at::Tensor&, at::Tensor&,
                            at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            int64_t, double, double) {
  return like(q);
}

at::Tensor decode_retrieval(const at::Tensor&, const at::Tensor&, const at::Tensor& states,
                            const at::Tensor&, double) {
  return at::empty_symint({states.sym_size(0), states.sym_size(1), states.sym_size(3), states.sym_size(4)},
                          states.options());
}

}  // namespace
}  // namespace bsbr::meta

TORCH_LIBRARY_IMPL(bsbr, Meta, m) {
  using namespace bsbr::meta;
  m.impl("_bsbr_attention_fwd", &bsbr_attention_fwd);
  m.impl("_bsbr_attention_bwd", &bsbr_attention_bwd);
  m.impl("_chunk_states_fwd", &chunk_states_fwd);
  m.impl("_chunk_states_bwd", &chunk_states_bwd);
  m.impl("_block_retrieval_fwd", &block_retrieval_fwd);
  m.impl("_block_retrieval_bwd", &block_retrieval_bwd);
  m.impl("_chunk_attention_fwd", &chunk_attention_fwd);
  m.impl("_chunk_attention_bwd", &chunk_attention_bwd);
  m.impl("_decode_attention", &decode_attention);
  m.impl("_decode_retrieval", &decode_retrieval);
}
