// Every schema of the bsbr library, in one place.
//
// Public ops (differentiable, what users and modules call):
//   bsbr_attention, chunk_states, block_retrieval, chunk_attention.
// Internal ops (one forward/backward pair per public op; the autograd layer calls them and every
// device provides them):
//   _bsbr_attention_fwd/_bwd, _chunk_states_fwd/_bwd, _block_retrieval_fwd/_bwd,
//   _chunk_attention_fwd/_bwd.
// A public op validates its inputs and resolves default scales (cpp/bsbr_common.h), then calls its
// _fwd op; its Autograd kernel also saves what the _bwd op needs. Device kernels (CPU, CUDA, Meta)
// implement only the internal ops and may assume validated inputs.
//
// Shapes (per SPEC §1): q, k, v [b, h, n, d]; q_state, k_state [b, h, n, ds];
// meta_q, meta_k [b, h, C, dm] with C = ceil(n / chunk_size); chunk states and retrieved states
// [b, h, C, ds, d] in the state dtype (fp64 for fp64 inputs, fp32 otherwise); lse [b, h, n] fp32
// (fp64 for fp64 inputs), the log-sum-exp of the scaled local scores of each query.
// Internal ops take resolved scales; public ops take optional ones (None = SPEC default).
//
// Streaming decode (inference only, no autograd; python/bsbr_ext/cache.py drives them), one new
// token per row, each row at its own position:
//   decode_attention: q, k, v, q_state [b, h, d|ds] of the new token; window_k/window_v
//     [b, h, chunk_overlap + chunk_size, d] hold the overlap (slots [0, w), the last w tokens of
//     the previous chunk) and the current chunk (slot w + p for its p-th token); retrieved
//     [b, h, ds, d] is S_c of the row's current chunk; position [b] int64 is the index t of the
//     new token in its row. Writes k, v into slot w + t % chunk_size, then returns o_t [b, h, d].
//   decode_retrieval: S = sum_{j < num_chunks} softmax_j(meta_scale <meta_q, meta_k[j]>) states[j]
//     per row, for meta_q [b, h, dm], meta_k [b, h, capacity, dm], states [b, h, capacity, ds, d],
//     num_chunks [b] int64 (clamped to [0, capacity]; 0 gives S = 0). Returns [b, h, ds, d].
#include <torch/library.h>

TORCH_LIBRARY(bsbr, m) {
  m.def(
      "bsbr_attention(Tensor q, Tensor k, Tensor v, Tensor meta_q, Tensor meta_k, "
      "Tensor? q_state=None, Tensor? k_state=None, *, int chunk_size, int chunk_overlap=0, "
      "float? scale=None, float? meta_scale=None, float? state_scale=None) -> Tensor");
  m.def("chunk_states(Tensor k_state, Tensor v, int chunk_size) -> Tensor");
  m.def(
      "block_retrieval(Tensor meta_q, Tensor meta_k, Tensor states, float? meta_scale=None) "
      "-> Tensor");
  m.def(
      "chunk_attention(Tensor q, Tensor k, Tensor v, Tensor q_state, Tensor retrieved, *, "
      "int chunk_size, int chunk_overlap=0, float? scale=None, float? state_scale=None) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) window_k, Tensor(b!) window_v, "
      "Tensor retrieved, Tensor position, Tensor? q_state=None, *, int chunk_size, "
      "int chunk_overlap=0, float? scale=None, float? state_scale=None) -> Tensor");
  m.def(
      "decode_retrieval(Tensor meta_q, Tensor meta_k, Tensor states, Tensor num_chunks, *, "
      "float? meta_scale=None) -> Tensor");

  // Fused forward: returns the output and the lse of the local softmax. Saves nothing else, so
  // the backward recomputes chunk states and retrieval (cheap: O(n ds d) and O(C^2 ds d)).
  // q_state / k_state None means q / k. The backward then folds the state path's gradient into
  // grad_q / grad_k (no separate token-sized buffer) and returns grad_q_state / grad_k_state
  // empty (shape [0]).
  m.def(
      "_bsbr_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor meta_q, Tensor meta_k, "
      "Tensor? q_state, Tensor? k_state, int chunk_size, int chunk_overlap, float scale, "
      "float meta_scale, float state_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "_bsbr_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor meta_q, "
      "Tensor meta_k, Tensor? q_state, Tensor? k_state, Tensor out, Tensor lse, int chunk_size, "
      "int chunk_overlap, float scale, float meta_scale, float state_scale) -> (Tensor grad_q, "
      "Tensor grad_k, Tensor grad_v, Tensor grad_meta_q, Tensor grad_meta_k, "
      "Tensor grad_q_state, Tensor grad_k_state)");
  m.def("_chunk_states_fwd(Tensor k_state, Tensor v, int chunk_size) -> Tensor");
  m.def(
      "_chunk_states_bwd(Tensor grad_states, Tensor k_state, Tensor v, int chunk_size) "
      "-> (Tensor grad_k_state, Tensor grad_v)");
  m.def(
      "_block_retrieval_fwd(Tensor meta_q, Tensor meta_k, Tensor states, float meta_scale) "
      "-> Tensor");
  m.def(
      "_block_retrieval_bwd(Tensor grad_retrieved, Tensor meta_q, Tensor meta_k, Tensor states, "
      "float meta_scale) -> (Tensor grad_meta_q, Tensor grad_meta_k, Tensor grad_states)");
  m.def(
      "_chunk_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor q_state, Tensor retrieved, "
      "int chunk_size, int chunk_overlap, float scale, float state_scale) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "_chunk_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor q_state, "
      "Tensor retrieved, Tensor out, Tensor lse, int chunk_size, int chunk_overlap, float scale, "
      "float state_scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_q_state, "
      "Tensor grad_retrieved)");
  m.def(
      "_decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) window_k, Tensor(b!) window_v, "
      "Tensor retrieved, Tensor position, Tensor q_state, int chunk_size, int chunk_overlap, "
      "float scale, float state_scale) -> Tensor");
  m.def(
      "_decode_retrieval(Tensor meta_q, Tensor meta_k, Tensor states, Tensor num_chunks, "
      "float meta_scale) -> Tensor");
}
