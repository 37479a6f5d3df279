#include "bsbr_common.h"

#include <sstream>

namespace bsbr {

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(
      t.dim() == rank, message(name, " must be a ", rank, "-D tensor ", layout, ", got shape ",
      t.sym_sizes()));
  TORCH_CHECK_TYPE(
      at::isFloatingType(t.scalar_type()), message(name, " must be a floating-point tensor, got ",
      t.scalar_type()));
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == ref.scalar_type(), message(name, " must have the same dtype as ", ref_name,
      " (", ref.scalar_type(), "), got ", t.scalar_type()));
  check_device(t, name, ref, ref_name);
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(
      t.device() == ref.device(), message(name, " must be on the same device as ", ref_name, " (",
      ref.device(), "), got ", t.device()));
}

void check_dims(
    const at::Tensor& t, const char* name, c10::SymIntArrayRef expected, const char* layout,
    const char* rule) {
  bool same = true;
  for (size_t i = 0; i < expected.size(); ++i) {
    same = same && t.sym_size(static_cast<int64_t>(i)) == expected[i];
  }
  TORCH_CHECK_VALUE(
      same, message(name, " must have shape ", layout, " with ", rule, " = ", expected, ", got shape ",
      t.sym_sizes()));
}

void check_state_tensor(const at::Tensor& t, const char* name, int64_t rank, const char* layout,
                        const at::Tensor& ref, const char* ref_name) {
  check_rank(t, name, rank, layout);
  const at::ScalarType expected = state_dtype(ref.scalar_type());
  TORCH_CHECK_TYPE(
      t.scalar_type() == expected, message(name, " must be ", expected,
      " (states are kept in fp32, fp64 for fp64 inputs), got ", t.scalar_type()));
  check_device(t, name, ref, ref_name);
}

void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.dim() == 1, message(name, " must be a 1-D tensor [batch], got shape ", t.sym_sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, message(name, " must be int64, got ", t.scalar_type()));
  check_device(t, name, ref, ref_name);
  check_dims(t, name, ref.sym_sizes().slice(0, 1), "[batch]", message("the batch of ", ref_name).c_str());
}

std::string piece(const c10::SymInt& s) {
  if (auto v = s.maybe_as_int()) return std::to_string(*v);
  return s.toSymNodeImplUnowned()->str();
}

std::string piece(c10::SymIntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + piece(sizes[i]);
  return s + "]";
}

void check_chunking(int64_t chunk_size, int64_t chunk_overlap) {
  TORCH_CHECK_VALUE(chunk_size >= 1, message("chunk_size must be >= 1, got ", chunk_size));
  TORCH_CHECK_VALUE(
      chunk_overlap >= 0 && chunk_overlap <= chunk_size,
      message("chunk_overlap must be in [0, chunk_size=", chunk_size, "], got ", chunk_overlap));
}

void check_inputs(const Inputs& in, int64_t chunk_size, int64_t chunk_overlap) {
  check_chunking(chunk_size, chunk_overlap);

  // The first defined token tensor fixes batch, heads and seq_len for the others.
  const at::Tensor& first = in.q.defined() ? in.q : (in.k_state.defined() ? in.k_state : in.meta_q);
  const char* first_name = in.q.defined() ? "q" : (in.k_state.defined() ? "k_state" : "meta_q");
  const char* token_layout = "[batch, heads, seq_len, head_dim]";
  const char* state_layout = "[batch, heads, seq_len, state_dim]";
  const char* meta_layout = "[batch, heads, num_chunks, meta_dim]";
  check_rank(first, first_name, 4, in.meta_q.is_same(first) ? meta_layout : token_layout);

  if (in.q.defined()) {
    for (auto [t, name] : {std::pair{in.k, "k"}, std::pair{in.v, "v"}}) {
      if (!t.defined()) continue;
      check_rank(t, name, 4, token_layout);
      check_like(t, name, in.q, "q");
      check_dims(t, name, in.q.sym_sizes(), token_layout, "the shape of q");
    }
  } else if (in.v.defined()) {  // chunk_states(k_state, v)
    check_rank(in.v, "v", 4, token_layout);
    check_like(in.v, "v", first, first_name);
    check_dims(in.v, "v", first.sym_sizes().slice(0, 3), token_layout, "[batch, heads, seq_len] of k_state");
  }
  for (auto [t, name] : {std::pair{in.q_state, "q_state"}, std::pair{in.k_state, "k_state"}}) {
    if (!t.defined() || t.is_same(first)) continue;
    check_rank(t, name, 4, state_layout);
    check_like(t, name, first, first_name);
    check_dims(t, name, first.sym_sizes().slice(0, 3), state_layout, "[batch, heads, seq_len] of q");
  }
  if (in.q_state.defined() && in.k_state.defined() && !in.q_state.is_same(in.k_state)) {
    TORCH_CHECK_VALUE(
        in.q_state.sym_size(3) == in.k_state.sym_size(3),
        message("q_state and k_state must have the same state_dim, got ", in.q_state.sym_size(3),
                " and ", in.k_state.sym_size(3)));
  }

  // Chunk-level tensors: meta queries/keys and states, C = ceil(seq_len / chunk_size).
  std::vector<c10::SymInt> chunked;
  if (first.is_same(in.meta_q)) {
    chunked = {first.sym_size(0), first.sym_size(1), first.sym_size(2)};
  } else {
    chunked = {first.sym_size(0), first.sym_size(1), num_chunks(first.sym_size(2), chunk_size)};
  }
  const char* chunk_rule = "[batch, heads, ceil(seq_len / chunk_size)]";
  for (auto [t, name] : {std::pair{in.meta_q, "meta_q"}, std::pair{in.meta_k, "meta_k"}}) {
    if (!t.defined()) continue;
    check_rank(t, name, 4, meta_layout);
    check_like(t, name, first, first_name);
    check_dims(t, name, chunked, meta_layout, chunk_rule);
  }
  if (in.meta_q.defined() && in.meta_k.defined()) {
    TORCH_CHECK_VALUE(
        in.meta_q.sym_size(3) == in.meta_k.sym_size(3),
        message("meta_q and meta_k must have the same meta_dim, got ", in.meta_q.sym_size(3),
                " and ", in.meta_k.sym_size(3)));
  }
  if (in.states.defined()) {
    const char* name = in.q.defined() ? "retrieved" : "states";
    check_state_tensor(in.states, name, 5, "[batch, heads, num_chunks, state_dim, head_dim]", first,
                       first_name);
    check_dims(in.states, name, chunked, "[batch, heads, num_chunks, state_dim, head_dim]", chunk_rule);
    if (in.q_state.defined()) {
      TORCH_CHECK_VALUE(
          in.states.sym_size(3) == in.q_state.sym_size(3) && in.states.sym_size(4) == in.q.sym_size(3),
          message(name, " must have [state_dim, head_dim] = [", in.q_state.sym_size(3), ", ",
                  in.q.sym_size(3), "], got shape ", in.states.sym_sizes()));
    }
  }
}

Scales resolve_scales(
    const at::Tensor& q,
    const at::Tensor& meta_q,
    const at::Tensor& q_state,
    int64_t chunk_size,
    std::optional<double> scale,
    std::optional<double> meta_scale,
    std::optional<double> state_scale) {
  // Feature dims are static in every model; reading them specialises a dynamic-shape trace.
  auto dim = [](const at::Tensor& t) {
    return static_cast<double>(t.sym_size(-1).guard_int(__FILE__, __LINE__));
  };
  Scales s{};
  s.scale = scale.has_value() ? *scale : (q.defined() ? 1.0 / std::sqrt(dim(q)) : 1.0);
  s.meta_scale =
      meta_scale.has_value() ? *meta_scale : (meta_q.defined() ? 1.0 / std::sqrt(dim(meta_q)) : 1.0);
  s.state_scale = state_scale.has_value()
      ? *state_scale
      : (q_state.defined() ? 1.0 / (static_cast<double>(chunk_size) * std::sqrt(dim(q_state))) : 1.0);
  return s;
}

}  // namespace bsbr
