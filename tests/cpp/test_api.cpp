// ctest: the C++ API of libbsbr (bsbr/bsbr.h) against a dense O(n^2) computation of SPEC §1
// written with ATen ops, in fp64: the fused op, the three stages composed, and the gradients.
#include <bsbr/bsbr.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check_close(const at::Tensor& got, const at::Tensor& want, const std::string& what,
                 double rtol = 1e-7, double atol = 1e-9) {
  const bool shape_ok = got.sizes().equals(want.sizes());
  const bool ok = shape_ok && at::allclose(got, want, rtol, atol);
  const double err = shape_ok ? (got - want).abs().max().item<double>() : INFINITY;
  std::printf("%-58s %s (max abs err %.3g)\n", what.c_str(), ok ? "ok" : "FAILED", err);
  if (!ok) ++failures;
}

// Dense form of SPEC §1: O = softmax(scale QK^T masked by L) V + (A ⊙ (Qs Ks^T)) V with
// L[t,u] = max(0, chunk(t) B - w) <= u <= t and A[t,u] = state_scale p[chunk(t), chunk(u)] for
// chunk(u) < chunk(t), p_c = softmax_{j<c}(meta_scale <meta_q[c], meta_k[j]>), p_0 = 0.
at::Tensor dense_bsbr(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& mq, const at::Tensor& mk, const at::Tensor& qs,
                      const at::Tensor& ks, int64_t B, int64_t w) {
  const int64_t n = q.size(2), d = q.size(3), dm = mq.size(3), ds = qs.size(3);
  const int64_t C = (n + B - 1) / B;
  const double scale = 1.0 / std::sqrt(double(d)), meta_scale = 1.0 / std::sqrt(double(dm));
  const double state_scale = 1.0 / (double(B) * std::sqrt(double(ds)));
  const auto opts = at::TensorOptions().dtype(at::kLong).device(q.device());
  const auto t = at::arange(n, opts).unsqueeze(1), u = at::arange(n, opts).unsqueeze(0);
  const auto ct = at::floor_divide(t, B), cu = at::floor_divide(u, B);
  const auto local = (u <= t).logical_and(u >= at::clamp_min(ct * B - w, 0));

  auto scores = at::matmul(q, k.transpose(-1, -2)) * scale;
  scores = scores.masked_fill(local.logical_not(), -INFINITY);
  const auto local_out = at::matmul(at::softmax(scores, -1), v);

  const auto c = at::arange(C, opts);
  const auto earlier = c.unsqueeze(0) < c.unsqueeze(1);  // [c, j]: j < c
  auto a = at::matmul(mq, mk.transpose(-1, -2)) * meta_scale;
  a = a.masked_fill(earlier.logical_not(), -INFINITY);
  // Chunk 0 retrieves nothing: its row is all -inf; softmax would give NaN, the SPEC says 0.
  auto p = at::softmax(a, -1);
  p = at::where(earlier.any(-1, true), p, at::zeros_like(p));
  // A[t, u] = state_scale * p[chunk(t), chunk(u)] (zero unless chunk(u) < chunk(t)).
  const auto A = p.index_select(2, ct.squeeze(1)).index_select(3, cu.squeeze(0)) * state_scale;
  const auto long_out = at::matmul(A * at::matmul(qs, ks.transpose(-1, -2)), v);
  return local_out + long_out;
}

at::Tensor randn(at::IntArrayRef sizes, bool grad = false) {
  return at::randn(sizes, at::kDouble).set_requires_grad(grad);
}

void run_case(int64_t b, int64_t h, int64_t n, int64_t d, int64_t dm, int64_t ds, int64_t B,
              int64_t w) {
  const std::string tag = "b" + std::to_string(b) + " h" + std::to_string(h) + " n" +
                          std::to_string(n) + " d" + std::to_string(d) + " ds" +
                          std::to_string(ds) + " B" + std::to_string(B) + " w" + std::to_string(w);
  const int64_t C = (n + B - 1) / B;
  const bool separate_state = ds != d;
  auto q = randn({b, h, n, d}, true), k = randn({b, h, n, d}, true), v = randn({b, h, n, d}, true);
  auto mq = randn({b, h, C, dm}, true), mk = randn({b, h, C, dm}, true);
  std::optional<at::Tensor> qs, ks;
  if (separate_state) {
    qs = randn({b, h, n, ds}, true);
    ks = randn({b, h, n, ds}, true);
  }

  // Fused op, with default scales.
  const auto out = bsbr::bsbr_attention(q, k, v, mq, mk, B, w, qs, ks);
  const auto want = dense_bsbr(q, k, v, mq, mk, qs.value_or(q), ks.value_or(k), B, w);
  check_close(out, want, "bsbr_attention  " + tag);

  // The three stages composed give the same output.
  const auto qstate = qs.value_or(q), kstate = ks.value_or(k);
  const auto states = bsbr::chunk_states(kstate, v, B);
  if (states.sizes().vec() != std::vector<int64_t>{b, h, C, ds, d}) {
    std::printf("chunk_states shape FAILED\n");
    ++failures;
  }
  const auto retrieved = bsbr::block_retrieval(mq, mk, states);
  const auto staged = bsbr::chunk_attention(q, k, v, qstate, retrieved, B, w);
  check_close(staged, want, "stages composed " + tag);

  // Gradients of the fused op against autograd through the dense computation.
  std::vector<at::Tensor> inputs{q, k, v, mq, mk};
  if (separate_state) {
    inputs.push_back(*qs);
    inputs.push_back(*ks);
  }
  const auto go = at::randn_like(out);
  const auto g_got = torch::autograd::grad({out}, inputs, {go});
  const auto g_want = torch::autograd::grad({want}, inputs, {go});
  const char* names[] = {"q", "k", "v", "meta_q", "meta_k", "q_state", "k_state"};
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_close(g_got[i], g_want[i], std::string("grad ") + names[i] + " " + tag);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  if (!bsbr::ensure_registered()) return 1;
  run_case(2, 3, 45, 8, 4, 8, 16, 3);   // partial last chunk, overlap, q_state = q
  run_case(1, 2, 70, 6, 5, 3, 16, 16);  // separate (compressed) state dim, full overlap
  run_case(1, 1, 9, 5, 4, 5, 16, 0);    // n < B: plain causal attention
  run_case(2, 1, 64, 7, 7, 7, 8, 0);    // n a multiple of B, odd d

  // Bad input raises a c10::Error naming the argument.
  try {
    bsbr::bsbr_attention(randn({1, 1, 8, 4}), randn({1, 1, 8, 4}), randn({1, 1, 8, 4}),
                         randn({1, 1, 1, 4}), randn({1, 1, 1, 4}), /*chunk_size=*/0);
    std::printf("chunk_size=0 did not raise: FAILED\n");
    ++failures;
  } catch (const c10::Error& e) {
    const bool names_it = std::string(e.what()).find("chunk_size") != std::string::npos;
    std::printf("%-58s %s\n", "chunk_size=0 raises naming chunk_size", names_it ? "ok" : "FAILED");
    if (!names_it) ++failures;
  }

  if (failures == 0) {
    std::printf("ALL PASSED\n");
  } else {
    std::printf("%d FAILED\n", failures);
  }
  return failures == 0 ? 0 : 1;
}
