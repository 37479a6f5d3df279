// CPU kernels of the streaming decode ops (_decode_attention, _decode_retrieval): one new token
// per row, each row at its own position. Parallel over batch*heads; a task owns one (row, head),
// so the in-place window write and the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bsbr_common.h"
#include "cpu/microkernels.h"

namespace bsbr::cpu {
namespace {

// out[j] += mul * sum_i x[i] * m[i][j] for x of length rows and a row-major m of cols columns.
template <typename acc_t>
void vec_mat_acc(const acc_t* x, int64_t rows, const acc_t* m, int64_t cols, acc_t* out) {
  gemm_acc(1, cols, rows, x, rows, 1, m, cols, out, cols);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& window_k, at::Tensor& window_v, const at::Tensor& retrieved,
                            const at::Tensor& position, const at::Tensor& q_state, int64_t chunk_size,
                            int64_t chunk_overlap, double scale, double state_scale) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), ds = q_state.size(2);
  const int64_t w = chunk_overlap, slots = chunk_overlap + chunk_size;
  const int64_t* pos = position.data_ptr<int64_t>();
  for (int64_t r = 0; r < batch; ++r) {
    TORCH_CHECK_VALUE(pos[r] >= 0, message("position must be >= 0, got ", pos[r], " in row ", r));
  }
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t *q_p = q.data_ptr<scalar_t>(), *k_p = k.data_ptr<scalar_t>(), *v_p = v.data_ptr<scalar_t>();
    const scalar_t* qs_p = q_state.data_ptr<scalar_t>();
    const acc_t* ret_p = retrieved.data_ptr<acc_t>();
    scalar_t *wk_p = window_k.data_ptr<scalar_t>(), *wv_p = window_v.data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qa(d), keys(slots * d), vals(slots * d), probs(slots), acc(d), qsa(ds);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t t = pos[bh / heads], c = t / chunk_size, slot = w + t % chunk_size;
        scalar_t* wk = wk_p + bh * slots * d;
        scalar_t* wv = wv_p + bh * slots * d;
        std::copy_n(k_p + bh * d, d, wk + slot * d);
        std::copy_n(v_p + bh * d, d, wv + slot * d);
        // The first chunk has no overlap: its window starts at the chunk's first slot.
        const int64_t lo = c == 0 ? w : 0, len = slot + 1 - lo;
        convert_scale(q_p + bh * d, qa.data(), d, static_cast<acc_t>(scale));
        convert_scale(wk + lo * d, keys.data(), len * d, acc_t(1));
        convert_scale(wv + lo * d, vals.data(), len * d, acc_t(1));
        for (int64_t u = 0; u < len; ++u) probs[u] = dot(qa.data(), keys.data() + u * d, d);
        const acc_t denom = exp_shift_sum(probs.data(), len, max_value(probs.data(), len));
        for (int64_t u = 0; u < len; ++u) probs[u] /= denom;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        vec_mat_acc(probs.data(), len, vals.data(), d, acc.data());
        if (c >= 1) {  // S_0 = 0: the first chunk has no long-range term
          convert_scale(qs_p + bh * ds, qsa.data(), ds, static_cast<acc_t>(state_scale));
          vec_mat_acc(qsa.data(), ds, ret_p + bh * ds * d, d, acc.data());
        }
        for (int64_t j = 0; j < d; ++j) out_p[bh * d + j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return out;
}

at::Tensor decode_retrieval(const at::Tensor& meta_q, const at::Tensor& meta_k, const at::Tensor& states,
                            const at::Tensor& num_chunks, double meta_scale) {
  const int64_t batch = meta_q.size(0), heads = meta_q.size(1), dm = meta_q.size(2);
  const int64_t capacity = states.size(2), state_numel = states.size(3) * states.size(4);
  const int64_t* count = num_chunks.data_ptr<int64_t>();
  auto out = at::zeros({batch, heads, states.size(3), states.size(4)}, states.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, meta_q.scalar_type(), "decode_retrieval_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t *mq_p = meta_q.data_ptr<scalar_t>(), *mk_p = meta_k.data_ptr<scalar_t>();
    const acc_t* st_p = states.data_ptr<acc_t>();
    acc_t* out_p = out.data_ptr<acc_t>();
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> query(dm), keys, weights;
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t n = std::clamp<int64_t>(count[bh / heads], 0, capacity);
        if (n == 0) continue;  // softmax over no chunk retrieves nothing
        keys.resize(n * dm);
        weights.resize(n);
        convert_scale(mq_p + bh * dm, query.data(), dm, static_cast<acc_t>(meta_scale));
        convert_scale(mk_p + bh * capacity * dm, keys.data(), n * dm, acc_t(1));
        for (int64_t j = 0; j < n; ++j) weights[j] = dot(query.data(), keys.data() + j * dm, dm);
        const acc_t denom = exp_shift_sum(weights.data(), n, max_value(weights.data(), n));
        for (int64_t j = 0; j < n; ++j) weights[j] /= denom;
        vec_mat_acc(weights.data(), n, st_p + bh * capacity * state_numel, state_numel,
                    out_p + bh * state_numel);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace bsbr::cpu

TORCH_LIBRARY_IMPL(bsbr, CPU, m) {
  m.impl("_decode_attention", &bsbr::cpu::decode_attention);
  m.impl("_decode_retrieval", &bsbr::cpu::decode_retrieval);
}
