// Shared by every device: input validation (done once, at the public ops), SPEC defaults for the
// scales, and the dtype and shape rules of the internal ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>

namespace bsbr {

// Error messages are assembled from std::string pieces, never through an iostream: formatting an
// integer through c10::str (an ostringstream) from this library segfaulted on the GPU machine's
// image (torch 2.11; inside basic_ostream::_M_insert<long>), while plain strings work.
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
std::string piece(I v) { return std::to_string(v); }
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(const at::Device& d) { return d.str(); }
std::string piece(const c10::SymInt& s);
std::string piece(c10::SymIntArrayRef sizes);

template <typename... Pieces>
std::string message(const Pieces&... pieces) {
  std::string s;
  ((s += piece(pieces)), ...);
  return s;
}

// Chunk states and retrieved states are accumulated and kept in fp32 (fp64 for fp64 inputs, so
// that fp64 gradcheck is meaningful).
inline at::ScalarType state_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline c10::SymInt num_chunks(const c10::SymInt& n, int64_t chunk_size) {
  return (n + (chunk_size - 1)) / chunk_size;
}

struct Scales {
  double scale;        // local softmax: 1/sqrt(d)
  double meta_scale;   // chunk-level softmax: 1/sqrt(dm)
  double state_scale;  // long-range term: 1/(chunk_size*sqrt(ds))
};

// Validates the tensors of one public op. Any of them may be undefined when the op does not take
// it. Messages name the argument and the rule.
struct Inputs {
  at::Tensor q, k, v, meta_q, meta_k, q_state, k_state, states;
};
void check_inputs(const Inputs& in, int64_t chunk_size, int64_t chunk_overlap);
void check_chunking(int64_t chunk_size, int64_t chunk_overlap);  // chunk_size >= 1, 0 <= overlap <= it

// The pieces check_inputs is made of, for ops with other layouts (the decode ops):
// rank `rank` and a floating dtype;
void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout);
// ref's dtype and device;
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);
// ref's device;
void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);
// dims [0, expected.size()) equal `expected` (`rule` says where they come from);
void check_dims(const at::Tensor& t, const char* name, c10::SymIntArrayRef expected, const char* layout,
                const char* rule);
// a state tensor: rank `rank`, the state dtype of ref's dtype, ref's device;
void check_state_tensor(const at::Tensor& t, const char* name, int64_t rank, const char* layout,
                        const at::Tensor& ref, const char* ref_name);
// a per-row int64 tensor [batch] on ref's device (positions, chunk counts).
void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);

Scales resolve_scales(
    const at::Tensor& q,
    const at::Tensor& meta_q,
    const at::Tensor& q_state,
    int64_t chunk_size,
    std::optional<double> scale,
    std::optional<double> meta_scale,
    std::optional<double> state_scale);

}  // namespace bsbr
