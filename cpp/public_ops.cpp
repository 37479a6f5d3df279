// The public ops: validation and SPEC defaults (once, here), then the internal _fwd op. Two
// registrations share that path: Autograd (a C++ autograd::Function saving what the _bwd op
// needs, so gradients also work from TorchScript and C++) and CompositeExplicitAutograd (every
// backend below autograd: inference mode, traced graphs, Meta).
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <vector>

#include "bsbr_common.h"
#include "internal_ops.h"

namespace bsbr {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using OptDouble = std::optional<double>;

// The public ops' inputs after validation, with default scales filled in. q_state/k_state stay
// None when omitted: the internal ops then use q/k and fold the state path's gradient into
// grad_q/grad_k themselves (one token-sized gradient each instead of two that autograd would add).
struct Attention {
  at::Tensor q, k, v, meta_q, meta_k;
  OptTensor q_state, k_state;
  Scales scales;
};

Attention prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& meta_q, const at::Tensor& meta_k,
                            const OptTensor& q_state, const OptTensor& k_state, int64_t chunk_size,
                            int64_t chunk_overlap, OptDouble scale, OptDouble meta_scale,
                            OptDouble state_scale) {
  TORCH_CHECK_VALUE(
      q_state.has_value() == k_state.has_value(),
      "q_state and k_state must be given together (or both omitted to use q and k)");
  check_inputs({q, k, v, meta_q, meta_k, q_state.value_or(at::Tensor()), k_state.value_or(at::Tensor()),
                at::Tensor()},
               chunk_size, chunk_overlap);
  return {q, k, v, meta_q, meta_k, q_state, k_state,
          resolve_scales(q, meta_q, q_state.value_or(q), chunk_size, scale, meta_scale, state_scale)};
}

// A saved tensor that was an omitted state (undefined) back to None.
OptTensor given(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// ---- bsbr_attention -----------------------------------------------------------------------

class BsbrAttentionFunction : public torch::autograd::Function<BsbrAttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& meta_q, const at::Tensor& meta_k,
                            const OptTensor& q_state, const OptTensor& k_state, int64_t chunk_size,
                            int64_t chunk_overlap, double scale, double meta_scale, double state_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = internal::bsbr_attention_fwd(q, k, v, meta_q, meta_k, q_state, k_state, chunk_size,
                                                   chunk_overlap, scale, meta_scale, state_scale);
    // An omitted state is saved as an undefined tensor.
    ctx->save_for_backward({q, k, v, meta_q, meta_k, q_state.value_or(at::Tensor()),
                            k_state.value_or(at::Tensor()), out, lse});
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->saved_data["chunk_overlap"] = chunk_overlap;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["meta_scale"] = meta_scale;
    ctx->saved_data["state_scale"] = state_scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv, dmq, dmk, dqs, dks] = internal::bsbr_attention_bwd(
        grads[0], s[0], s[1], s[2], s[3], s[4], given(s[5]), given(s[6]), s[7], s[8],
        ctx->saved_data["chunk_size"].toInt(), ctx->saved_data["chunk_overlap"].toInt(),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["meta_scale"].toDouble(),
        ctx->saved_data["state_scale"].toDouble());
    // An omitted state has no gradient of its own (dqs / dks are then empty: folded into dq / dk).
    if (!s[5].defined()) dqs = at::Tensor();
    if (!s[6].defined()) dks = at::Tensor();
    return {dq, dk, dv, dmq, dmk, dqs, dks, {}, {}, {}, {}, {}};
  }
};

at::Tensor bsbr_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& meta_q, const at::Tensor& meta_k,
                                   const OptTensor& q_state, const OptTensor& k_state,
                                   int64_t chunk_size, int64_t chunk_overlap, OptDouble scale,
                                   OptDouble meta_scale, OptDouble state_scale) {
  const auto a = prepare_attention(q, k, v, meta_q, meta_k, q_state, k_state, chunk_size, chunk_overlap,
                                   scale, meta_scale, state_scale);
  return BsbrAttentionFunction::apply(a.q, a.k, a.v, a.meta_q, a.meta_k, a.q_state, a.k_state, chunk_size,
                                      chunk_overlap, a.scales.scale, a.scales.meta_scale,
                                      a.scales.state_scale);
}

at::Tensor bsbr_attention_inference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& meta_q, const at::Tensor& meta_k,
                                    const OptTensor& q_state, const OptTensor& k_state,
                                    int64_t chunk_size, int64_t chunk_overlap, OptDouble scale,
                                    OptDouble meta_scale, OptDouble state_scale) {
  const auto a = prepare_attention(q, k, v, meta_q, meta_k, q_state, k_state, chunk_size, chunk_overlap,
                                   scale, meta_scale, state_scale);
  return std::get<0>(internal::bsbr_attention_fwd(a.q, a.k, a.v, a.meta_q, a.meta_k, a.q_state, a.k_state,
                                                  chunk_size, chunk_overlap, a.scales.scale,
                                                  a.scales.meta_scale, a.scales.state_scale));
}

// ---- chunk_states -------------------------------------------------------------------------

void check_chunk_states(const at::Tensor& k_state, const at::Tensor& v, int64_t chunk_size) {
  check_inputs({{}, {}, v, {}, {}, {}, k_state, {}}, chunk_size, 0);
}

class ChunkStatesFunction : public torch::autograd::Function<ChunkStatesFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& k_state, const at::Tensor& v,
                            int64_t chunk_size) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({k_state, v});
    ctx->saved_data["chunk_size"] = chunk_size;
    return internal::chunk_states_fwd(k_state, v, chunk_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dks, dv] = internal::chunk_states_bwd(grads[0], s[0], s[1], ctx->saved_data["chunk_size"].toInt());
    return {dks, dv, {}};
  }
};

at::Tensor chunk_states_autograd(const at::Tensor& k_state, const at::Tensor& v, int64_t chunk_size) {
  check_chunk_states(k_state, v, chunk_size);
  return ChunkStatesFunction::apply(k_state, v, chunk_size);
}

at::Tensor chunk_states_inference(const at::Tensor& k_state, const at::Tensor& v, int64_t chunk_size) {
  check_chunk_states(k_state, v, chunk_size);
  return internal::chunk_states_fwd(k_state, v, chunk_size);
}

// ---- block_retrieval ----------------------------------------------------------------------

double prepare_retrieval(const at::Tensor& meta_q, const at::Tensor& meta_k, const at::Tensor& states,
                         OptDouble meta_scale) {
  // Chunk count comes from the tensors themselves here, so chunk_size is only a placeholder.
  check_inputs({{}, {}, {}, meta_q, meta_k, {}, {}, states}, 1, 0);
  return resolve_scales({}, meta_q, {}, 1, std::nullopt, meta_scale, std::nullopt).meta_scale;
}

class BlockRetrievalFunction : public torch::autograd::Function<BlockRetrievalFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& meta_q, const at::Tensor& meta_k,
                            const at::Tensor& states, double meta_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({meta_q, meta_k, states});
    ctx->saved_data["meta_scale"] = meta_scale;
    return internal::block_retrieval_fwd(meta_q, meta_k, states, meta_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dmq, dmk, dstates] =
        internal::block_retrieval_bwd(grads[0], s[0], s[1], s[2], ctx->saved_data["meta_scale"].toDouble());
    return {dmq, dmk, dstates, {}};
  }
};

at::Tensor block_retrieval_autograd(const at::Tensor& meta_q, const at::Tensor& meta_k,
                                    const at::Tensor& states, OptDouble meta_scale) {
  const double ms = prepare_retrieval(meta_q, meta_k, states, meta_scale);
  return BlockRetrievalFunction::apply(meta_q, meta_k, states, ms);
}

at::Tensor block_retrieval_inference(const at::Tensor& meta_q, const at::Tensor& meta_k,
                                     const at::Tensor& states, OptDouble meta_scale) {
  return internal::block_retrieval_fwd(meta_q, meta_k, states,
                                       prepare_retrieval(meta_q, meta_k, states, meta_scale));
}

// ---- chunk_attention ----------------------------------------------------------------------

Scales prepare_chunk_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& q_state, const at::Tensor& retrieved,
                               int64_t chunk_size, int64_t chunk_overlap, OptDouble scale,
                               OptDouble state_scale) {
  check_inputs({q, k, v, {}, {}, q_state, {}, retrieved}, chunk_size, chunk_overlap);
  return resolve_scales(q, {}, q_state, chunk_size, scale, std::nullopt, state_scale);
}

class ChunkAttentionFunction : public torch::autograd::Function<ChunkAttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& q_state, const at::Tensor& retrieved,
                            int64_t chunk_size, int64_t chunk_overlap, double scale, double state_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = internal::chunk_attention_fwd(q, k, v, q_state, retrieved, chunk_size, chunk_overlap,
                                                    scale, state_scale);
    ctx->save_for_backward({q, k, v, q_state, retrieved, out, lse});
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->saved_data["chunk_overlap"] = chunk_overlap;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["state_scale"] = state_scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv, dqs, dret] = internal::chunk_attention_bwd(
        grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], ctx->saved_data["chunk_size"].toInt(),
        ctx->saved_data["chunk_overlap"].toInt(), ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["state_scale"].toDouble());
    return {dq, dk, dv, dqs, dret, {}, {}, {}, {}};
  }
};

at::Tensor chunk_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& q_state, const at::Tensor& retrieved,
                                    int64_t chunk_size, int64_t chunk_overlap, OptDouble scale,
                                    OptDouble state_scale) {
  const auto sc = prepare_chunk_attention(q, k, v, q_state, retrieved, chunk_size, chunk_overlap, scale,
                                          state_scale);
  return ChunkAttentionFunction::apply(q, k, v, q_state, retrieved, chunk_size, chunk_overlap, sc.scale,
                                       sc.state_scale);
}

at::Tensor chunk_attention_inference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& q_state, const at::Tensor& retrieved,
                                     int64_t chunk_size, int64_t chunk_overlap, OptDouble scale,
                                     OptDouble state_scale) {
  const auto sc = prepare_chunk_attention(q, k, v, q_state, retrieved, chunk_size, chunk_overlap, scale,
                                          state_scale);
  return std::get<0>(internal::chunk_attention_fwd(q, k, v, q_state, retrieved, chunk_size, chunk_overlap,
                                                   sc.scale, sc.state_scale));
}

// ---- streaming decode (inference only) ----------------------------------------------------

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& window_k, at::Tensor& window_v, const at::Tensor& retrieved,
                            const at::Tensor& position, const OptTensor& q_state, int64_t chunk_size,
                            int64_t chunk_overlap, OptDouble scale, OptDouble state_scale) {
  check_chunking(chunk_size, chunk_overlap);
  const char* token_layout = "[batch, heads, head_dim]";
  check_rank(q, "q", 3, token_layout);
  for (auto [t, name] : {std::pair{k, "k"}, std::pair{v, "v"}}) {
    check_rank(t, name, 3, token_layout);
    check_like(t, name, q, "q");
    check_dims(t, name, q.sym_sizes(), token_layout, "the shape of q");
  }
  const char* window_layout = "[batch, heads, chunk_overlap + chunk_size, head_dim]";
  const std::vector<c10::SymInt> window_shape = {q.sym_size(0), q.sym_size(1),
                                                 c10::SymInt(chunk_overlap + chunk_size), q.sym_size(2)};
  for (auto [t, name] : {std::pair{window_k, "window_k"}, std::pair{window_v, "window_v"}}) {
    check_rank(t, name, 4, window_layout);
    check_like(t, name, q, "q");
    check_dims(t, name, window_shape, window_layout, "[batch, heads, head_dim] of q");
    TORCH_CHECK_VALUE(t.is_contiguous(), message(name, " must be contiguous (it is written in place)"));
  }
  const at::Tensor qs = q_state.value_or(q);
  if (q_state.has_value()) {
    const char* state_layout = "[batch, heads, state_dim]";
    check_rank(qs, "q_state", 3, state_layout);
    check_like(qs, "q_state", q, "q");
    check_dims(qs, "q_state", q.sym_sizes().slice(0, 2), state_layout, "[batch, heads] of q");
  }
  const char* retrieved_layout = "[batch, heads, state_dim, head_dim]";
  check_state_tensor(retrieved, "retrieved", 4, retrieved_layout, q, "q");
  check_dims(retrieved, "retrieved", {q.sym_size(0), q.sym_size(1), qs.sym_size(2), q.sym_size(2)},
             retrieved_layout, "[batch, heads] of q, state_dim of q_state, head_dim of q");
  check_index_tensor(position, "position", q, "q");
  // A token tensor [b, h, d] reads like [b, h, n=d, ...] to resolve_scales: only its last dims
  // matter there.
  const auto sc = resolve_scales(q, {}, qs, chunk_size, scale, std::nullopt, state_scale);
  return internal::decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), window_k, window_v,
                                    retrieved.contiguous(), position.contiguous(), qs.contiguous(),
                                    chunk_size, chunk_overlap, sc.scale, sc.state_scale);
}

at::Tensor decode_retrieval(const at::Tensor& meta_q, const at::Tensor& meta_k, const at::Tensor& states,
                            const at::Tensor& num_chunks, OptDouble meta_scale) {
  check_rank(meta_q, "meta_q", 3, "[batch, heads, meta_dim]");
  const char* meta_layout = "[batch, heads, capacity, meta_dim]";
  check_rank(meta_k, "meta_k", 4, meta_layout);
  check_like(meta_k, "meta_k", meta_q, "meta_q");
  check_dims(meta_k, "meta_k", meta_q.sym_sizes().slice(0, 2), meta_layout, "[batch, heads] of meta_q");
  TORCH_CHECK_VALUE(meta_k.sym_size(3) == meta_q.sym_size(2),
                    message("meta_k must have the meta_dim of meta_q (", meta_q.sym_size(2),
                            "), got shape ", meta_k.sym_sizes()));
  const char* states_layout = "[batch, heads, capacity, state_dim, head_dim]";
  check_state_tensor(states, "states", 5, states_layout, meta_q, "meta_q");
  check_dims(states, "states", meta_k.sym_sizes().slice(0, 3), states_layout,
             "[batch, heads, capacity] of meta_k");
  check_index_tensor(num_chunks, "num_chunks", meta_q, "meta_q");
  const double ms = resolve_scales({}, meta_q, {}, 1, std::nullopt, meta_scale, std::nullopt).meta_scale;
  return internal::decode_retrieval(meta_q.contiguous(), meta_k.contiguous(), states.contiguous(),
                                    num_chunks.contiguous(), ms);
}

}  // namespace
}  // namespace bsbr

TORCH_LIBRARY_IMPL(bsbr, Autograd, m) {
  m.impl("bsbr_attention", &bsbr::bsbr_attention_autograd);
  m.impl("chunk_states", &bsbr::chunk_states_autograd);
  m.impl("block_retrieval", &bsbr::block_retrieval_autograd);
  m.impl("chunk_attention", &bsbr::chunk_attention_autograd);
  // The internal ops have no derivatives of their own (no double backward): differentiating
  // through one raises instead of silently returning wrong gradients.
  for (const char* name :
       {"_bsbr_attention_fwd", "_bsbr_attention_bwd", "_chunk_states_fwd", "_chunk_states_bwd",
        "_block_retrieval_fwd", "_block_retrieval_bwd", "_chunk_attention_fwd", "_chunk_attention_bwd",
        // Decoding is inference only: a gradient through it raises.
        "decode_attention", "decode_retrieval", "_decode_attention", "_decode_retrieval"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(bsbr, CompositeExplicitAutograd, m) {
  m.impl("bsbr_attention", &bsbr::bsbr_attention_inference);
  m.impl("chunk_states", &bsbr::chunk_states_inference);
  m.impl("block_retrieval", &bsbr::block_retrieval_inference);
  m.impl("chunk_attention", &bsbr::chunk_attention_inference);
  m.impl("decode_attention", &bsbr::decode_attention);
  m.impl("decode_retrieval", &bsbr::decode_retrieval);
}
