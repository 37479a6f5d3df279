// CPU kernels of the internal ops. Each kernel is parallel over (batch*head, chunk) with
// at::parallel_for; a task copies its chunk's tiles into acc_t scratch (fp32, fp64 for fp64
// inputs), runs the register-tiled microkernels on them and writes its own rows only, so results
// do not depend on the thread count. Gradients are accumulated in acc_t and cast once at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "bsbr_common.h"
#include "cpu/microkernels.h"

namespace bsbr::cpu {
namespace {

// Score rows are processed in blocks of kRowBlock queries; each block multiplies only the key
// columns its last query can see (rounded up to kColAlign), which skips the masked upper half.
constexpr int64_t kRowBlock = 16;
constexpr int64_t kColAlign = 32;
// Softmax rows are exponentiated in whole groups of kSoftmaxAlign keys (an AVX-512 vector of
// fp32) so no row ends in a scalar loop: the padding keys are set to -inf first, which exp maps
// to 0.
constexpr int64_t kSoftmaxAlign = 16;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Token range of chunk c and of its local window.
struct Chunk {
  int64_t start, end, window_start;
  int64_t rows() const { return end - start; }
  int64_t window() const { return end - window_start; }
  int64_t overlap() const { return start - window_start; }  // window rows before the chunk
};

Chunk chunk_at(int64_t c, int64_t n, int64_t chunk_size, int64_t overlap) {
  const int64_t start = c * chunk_size;
  return {start, std::min(start + chunk_size, n), std::max<int64_t>(0, start - overlap)};
}

// dst = mul * src for `rows` contiguous rows of `cols` elements, in acc_t.
template <typename scalar_t, typename acc_t>
void load(const scalar_t* src, int64_t rows, int64_t cols, acc_t* dst, acc_t mul = acc_t(1)) {
  convert_scale(src, dst, rows * cols, mul);
}

// Contiguous rows as acc_t: the input itself when it already is acc_t, else a converted copy.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t rows, int64_t cols, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    convert_scale(src, buf.data(), rows * cols, acc_t(1));
    return buf.data();
  }
}

// dst[j][i] = src[i][j] for contiguous rows: the transposed tile, for products with a
// transposed right operand; `buf` holds the rows converted to acc_t when they are not.
template <typename scalar_t, typename acc_t>
void load_transposed(const scalar_t* src, int64_t rows, int64_t cols, acc_t* dst, int64_t ldd,
                     std::vector<acc_t>& buf) {
  transpose(rows, cols, rows_as_acc(src, rows, cols, buf), cols, dst, ldd);
}

template <typename scalar_t>
const scalar_t* ptr(const at::Tensor& t) { return t.const_data_ptr<scalar_t>(); }

template <typename scalar_t>
scalar_t* mut(at::Tensor& t) { return t.mutable_data_ptr<scalar_t>(); }

// Problem sizes shared by the chunk-attention kernels; tensors are contiguous [BH, n, ...].
struct Dims {
  int64_t bh, n, d, ds, chunk_size, overlap, num_chunks;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& q_state, int64_t chunk_size, int64_t overlap) {
  const int64_t n = q.size(2);
  return {q.size(0) * q.size(1), n, q.size(3), q_state.size(3), chunk_size, overlap,
          (n + chunk_size - 1) / chunk_size};
}

// Scratch of one task: tiles of its chunk and window, sized for the largest chunk.
template <typename acc_t>
struct AttentionScratch {
  int64_t cols;  // window width rounded up to kColAlign: the most score columns computed
  int64_t ld;    // leading dim of window-wide tiles; padded so their rows do not alias in L1
  // out: the chunk's output rows (forward: accumulated here; backward: the saved output in acc_t)
  std::vector<acc_t> q, kt, k, vt, v, scores, dscores, out, dout, qs, st, dqs;
  AttentionScratch(const Dims& s, bool backward) {
    const int64_t rows = s.chunk_size, window = s.chunk_size + s.overlap;
    cols = round_up(window, kColAlign);
    ld = cols + 16;
    q.resize(rows * s.d);
    kt.resize(s.d * ld);
    k.resize(window * s.d);
    v.resize(window * s.d);
    scores.resize(rows * ld);
    out.resize(rows * s.d);
    qs.resize(rows * s.ds);
    if (backward) {
      vt.resize(s.d * ld);
      dscores.resize(rows * ld);
      dout.resize(rows * s.d);
      st.resize(s.d * s.ds);
      dqs.resize(rows * s.ds);
    }
  }
};

// out[i][j] = <a_i, b_j> over the causal window of each row block, with a [rows, d] and b given
// transposed ([d, w.ld]): the scores q k^T (q already scaled) and, in the backward, dO v^T.
template <typename acc_t>
void window_scores(const Chunk& ch, int64_t d, const AttentionScratch<acc_t>& w, const acc_t* a,
                   const acc_t* b_t, acc_t* out) {
  for (int64_t i0 = 0; i0 < ch.rows(); i0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, ch.rows() - i0);
    const int64_t cols = std::min(round_up(ch.overlap() + i0 + rows, kColAlign), w.cols);
    gemm(rows, cols, d, a + i0 * d, d, 1, b_t, w.ld, out + i0 * w.ld, w.ld);
  }
}

// Number of keys row i of the chunk sees: the overlap plus itself and the rows before it.
inline int64_t visible(const Chunk& ch, int64_t i) { return ch.overlap() + i + 1; }

// out[i] = p[i] @ v over the row blocks; p is zero past each row's visible keys.
template <typename acc_t>
void window_product(const Chunk& ch, int64_t cols_total, int64_t d, const acc_t* p, int64_t ldp,
                    const acc_t* v, acc_t* out) {
  for (int64_t i0 = 0; i0 < ch.rows(); i0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, ch.rows() - i0);
    const int64_t keys = std::min(visible(ch, i0 + rows - 1), cols_total);
    gemm(rows, d, keys, p + i0 * ldp, ldp, 1, v, d, out + i0 * d, d);
  }
}

// Row j of sum_i p[i][j] x[i] for the window keys j (p read transposed in place), written to
// `overlap_rows` for the keys before the chunk and to `own_rows` for the chunk's own. Key j is
// seen only by rows i >= j - overlap, so each key block skips the rows before that.
template <typename acc_t>
void window_product_transposed(const Chunk& ch, int64_t d, const acc_t* p, int64_t ldp, const acc_t* x,
                               acc_t* overlap_rows, acc_t* own_rows) {
  for (int64_t j0 = 0; j0 < ch.window();) {
    const bool before = j0 < ch.overlap();  // blocks do not straddle the chunk's start
    const int64_t j1 = std::min(j0 + kRowBlock, before ? ch.overlap() : ch.window());
    const int64_t first = std::max<int64_t>(0, j0 - ch.overlap());
    acc_t* dst = before ? overlap_rows + j0 * d : own_rows + (j0 - ch.overlap()) * d;
    gemm(j1 - j0, d, ch.rows() - first, p + first * ldp + j0, 1, ldp, x + first * d, d, dst, d);
    j0 = j1;
  }
}

template <typename scalar_t>
void chunk_attention_fwd_kernel(const Dims& s, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& q_state,
                                const at::Tensor& retrieved, double scale, double state_scale,
                                at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *qp = ptr<scalar_t>(q), *kp = ptr<scalar_t>(k), *vp = ptr<scalar_t>(v),
                 *qsp = ptr<scalar_t>(q_state);
  const acc_t* sp = ptr<acc_t>(retrieved);
  scalar_t* op = mut<scalar_t>(out);
  acc_t* lp = mut<acc_t>(lse);
  at::parallel_for(0, s.bh * s.num_chunks, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch<acc_t> w(s, /*backward=*/false);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / s.num_chunks, c = task % s.num_chunks;
      const Chunk ch = chunk_at(c, s.n, s.chunk_size, s.overlap);
      const int64_t tok = bh * s.n;
      load(qp + (tok + ch.start) * s.d, ch.rows(), s.d, w.q.data(), acc_t(scale));
      load_transposed(kp + (tok + ch.window_start) * s.d, ch.window(), s.d, w.kt.data(), w.ld, w.k);
      const acc_t* vb = rows_as_acc(vp + (tok + ch.window_start) * s.d, ch.window(), s.d, w.v);
      window_scores(ch, s.d, w, w.q.data(), w.kt.data(), w.scores.data());
      for (int64_t i = 0; i < ch.rows(); ++i) {
        acc_t* row = w.scores.data() + i * w.ld;
        const int64_t keys = visible(ch, i), padded = round_up(keys, kSoftmaxAlign);
        std::fill(row + keys, row + padded, -std::numeric_limits<acc_t>::infinity());
        const acc_t mx = max_value(row, padded);
        const acc_t sum = exp_shift_sum(row, padded, mx);
        convert_scale(row, row, padded, acc_t(1) / sum);
        // The row block's product reads up to the keys of its last row.
        const int64_t block_keys = std::min(visible(ch, i | (kRowBlock - 1)), w.cols);
        if (padded < block_keys) std::fill(row + padded, row + block_keys, acc_t(0));
        lp[tok + ch.start + i] = mx + std::log(sum);
      }
      window_product(ch, w.cols, s.d, w.scores.data(), w.ld, vb, w.out.data());
      // Long-range term: state_scale * q_state @ S_c.
      load(qsp + (tok + ch.start) * s.ds, ch.rows(), s.ds, w.qs.data(), acc_t(state_scale));
      gemm_acc(ch.rows(), s.d, s.ds, w.qs.data(), s.ds, 1, sp + (bh * s.num_chunks + c) * s.ds * s.d, s.d,
               w.out.data(), s.d);
      scalar_t* dst = op + (tok + ch.start) * s.d;
      for (int64_t x = 0; x < ch.rows() * s.d; ++x) dst[x] = static_cast<scalar_t>(w.out[x]);
    }
  });
}

// Gradients of the chunk attention in acc_t: [BH, n, d] for q, k, v, [BH, n, ds] for q_state
// (undefined when folded into q's), [BH, C, ds, d] for the retrieved states.
struct AttentionGrads {
  at::Tensor q, k, v, q_state, retrieved;
};

// fold_q_state: q_state is q (the fused op's default), so its gradient is added to q's instead
// of being returned.
template <typename scalar_t>
AttentionGrads chunk_attention_bwd_kernel(
    const Dims& s, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& q_state, const at::Tensor& retrieved,
    const at::Tensor& out, const at::Tensor& lse, double scale, double state_scale, bool fold_q_state) {
  using acc_t = at::opmath_type<scalar_t>;
  TORCH_INTERNAL_ASSERT(!fold_q_state || s.ds == s.d, "a folded q_state is q");
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  AttentionGrads g;
  g.q = at::empty({s.bh, s.n, s.d}, acc_opts);
  g.k = at::empty({s.bh, s.n, s.d}, acc_opts);
  g.v = at::empty({s.bh, s.n, s.d}, acc_opts);
  if (!fold_q_state) g.q_state = at::empty({s.bh, s.n, s.ds}, acc_opts);
  g.retrieved = at::empty({s.bh, s.num_chunks, s.ds, s.d}, acc_opts);
  // Window rows before a chunk belong to the previous chunk: their k/v gradients go to a
  // per-chunk buffer that a second pass adds in a fixed order (deterministic, no races).
  auto spill_k = at::empty({s.bh, s.num_chunks, s.overlap, s.d}, acc_opts);
  auto spill_v = at::empty({s.bh, s.num_chunks, s.overlap, s.d}, acc_opts);

  const scalar_t *qp = ptr<scalar_t>(q), *kp = ptr<scalar_t>(k), *vp = ptr<scalar_t>(v),
                 *qsp = ptr<scalar_t>(q_state), *op = ptr<scalar_t>(out), *gp = ptr<scalar_t>(grad_out);
  const acc_t *sp = ptr<acc_t>(retrieved), *lp = ptr<acc_t>(lse);
  acc_t *dq = mut<acc_t>(g.q), *dk = mut<acc_t>(g.k), *dv = mut<acc_t>(g.v),
        *dqs = fold_q_state ? nullptr : mut<acc_t>(g.q_state), *dsp = mut<acc_t>(g.retrieved),
        *spk = mut<acc_t>(spill_k), *spv = mut<acc_t>(spill_v);

  at::parallel_for(0, s.bh * s.num_chunks, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch<acc_t> w(s, /*backward=*/true);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / s.num_chunks, c = task % s.num_chunks;
      const Chunk ch = chunk_at(c, s.n, s.chunk_size, s.overlap);
      const int64_t tok = bh * s.n, rows = ch.rows(), win = ch.window();
      const acc_t* state = sp + (bh * s.num_chunks + c) * s.ds * s.d;
      load(qp + (tok + ch.start) * s.d, rows, s.d, w.q.data(), acc_t(scale));
      const acc_t* kb = rows_as_acc(kp + (tok + ch.window_start) * s.d, win, s.d, w.k);
      transpose(win, s.d, kb, s.d, w.kt.data(), w.ld);
      load_transposed(vp + (tok + ch.window_start) * s.d, win, s.d, w.vt.data(), w.ld, w.v);
      const acc_t* dout = rows_as_acc(gp + (tok + ch.start) * s.d, rows, s.d, w.dout);
      const acc_t* o = rows_as_acc(op + (tok + ch.start) * s.d, rows, s.d, w.out);
      const acc_t* qs = rows_as_acc(qsp + (tok + ch.start) * s.ds, rows, s.ds, w.qs);
      transpose(s.ds, s.d, state, s.d, w.st.data(), s.ds);

      // dq_state = state_scale * dO @ S_c^T
      gemm(rows, s.ds, s.d, dout, s.d, 1, w.st.data(), s.ds, w.dqs.data(), s.ds);
      convert_scale(w.dqs.data(), w.dqs.data(), rows * s.ds, acc_t(state_scale));
      // dS_c = state_scale * q_state^T @ dO
      acc_t* dstate = dsp + (bh * s.num_chunks + c) * s.ds * s.d;
      gemm(s.ds, s.d, rows, qs, 1, s.ds, dout, s.d, dstate, s.d);
      convert_scale(dstate, dstate, s.ds * s.d, acc_t(state_scale));

      // P from the saved lse; dP = dO @ V^T over the same causal blocks.
      window_scores(ch, s.d, w, w.q.data(), w.kt.data(), w.scores.data());
      window_scores(ch, s.d, w, dout, w.vt.data(), w.dscores.data());
      for (int64_t i = 0; i < rows; ++i) {
        acc_t* p = w.scores.data() + i * w.ld;
        acc_t* dp = w.dscores.data() + i * w.ld;
        const int64_t keys = visible(ch, i), padded = round_up(keys, kSoftmaxAlign);
        std::fill(p + keys, p + padded, -std::numeric_limits<acc_t>::infinity());
        exp_shift_sum(p, padded, lp[tok + ch.start + i]);
        // D_i = <dO_i, O_local_i> = <dO_i, out_i> - <q_state_i, dq_state_i>
        const acc_t delta = dot(dout + i * s.d, o + i * s.d, s.d) -
                            dot(qs + i * s.ds, w.dqs.data() + i * s.ds, s.ds);
        for (int64_t j = 0; j < keys; ++j) dp[j] = p[j] * (dp[j] - delta);
        // Whole rows: the transposed products below read every window column.
        if (padded < win) std::fill(p + padded, p + win, acc_t(0));
        std::fill(dp + keys, dp + win, acc_t(0));
      }
      // dq = scale * dS @ K
      acc_t* dq_rows = dq + (tok + ch.start) * s.d;
      window_product(ch, w.cols, s.d, w.dscores.data(), w.ld, kb, dq_rows);
      convert_scale(dq_rows, dq_rows, rows * s.d, acc_t(scale));
      if (fold_q_state) {
        for (int64_t x = 0; x < rows * s.d; ++x) dq_rows[x] += w.dqs[x];
      } else {
        std::copy(w.dqs.begin(), w.dqs.begin() + rows * s.ds, dqs + (tok + ch.start) * s.ds);
      }
      // dK_window = dS^T @ (scale * Q), dV_window = P^T @ dO (A read transposed in place)
      window_product_transposed(ch, s.d, w.dscores.data(), w.ld, w.q.data(), spk + task * s.overlap * s.d,
                                dk + (tok + ch.start) * s.d);
      window_product_transposed(ch, s.d, w.scores.data(), w.ld, dout, spv + task * s.overlap * s.d,
                                dv + (tok + ch.start) * s.d);
    }
  });
  if (s.overlap > 0) {
    at::parallel_for(0, s.bh * s.num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / s.num_chunks, c = task % s.num_chunks;
        if (c == 0) continue;
        const Chunk ch = chunk_at(c, s.n, s.chunk_size, s.overlap);
        const int64_t first = (bh * s.n + ch.window_start) * s.d, count = ch.overlap() * s.d;
        for (int64_t x = 0; x < count; ++x) {
          dk[first + x] += spk[task * s.overlap * s.d + x];
          dv[first + x] += spv[task * s.overlap * s.d + x];
        }
      }
    });
  }
  return g;
}

// F_j = k_state[j]^T v[j], [BH, C, ds, d] in acc_t.
template <typename scalar_t>
void chunk_states_fwd_kernel(const at::Tensor& k_state, const at::Tensor& v, int64_t chunk_size,
                             at::Tensor& states) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bh = k_state.size(0) * k_state.size(1), n = k_state.size(2), ds = k_state.size(3),
                d = v.size(3), num_chunks = states.size(2);
  const scalar_t *kp = ptr<scalar_t>(k_state), *vp = ptr<scalar_t>(v);
  acc_t* fp = mut<acc_t>(states);
  at::parallel_for(0, bh * num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kb(chunk_size * ds), vb(chunk_size * d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_chunks, c = task % num_chunks;
      const Chunk ch = chunk_at(c, n, chunk_size, 0);
      const int64_t tok = b * n + ch.start, rows = ch.rows();
      const acc_t* ks = rows_as_acc(kp + tok * ds, rows, ds, kb);
      const acc_t* vs = rows_as_acc(vp + tok * d, rows, d, vb);
      acc_t* f = fp + task * ds * d;
      gemm(ds, d, rows, ks, 1, ds, vs, d, f, d);
    }
  });
}

// dk_state = v @ dF^T and dv = k_state @ dF per chunk, written to (with `accumulate`, added to)
// acc_t buffers [BH, n, ds] and [BH, n, d].
template <typename scalar_t>
void chunk_states_bwd_kernel(const at::Tensor& grad_states, const at::Tensor& k_state, const at::Tensor& v,
                             int64_t chunk_size, bool accumulate, at::Tensor& dk_state, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bh = k_state.size(0) * k_state.size(1), n = k_state.size(2), ds = k_state.size(3),
                d = v.size(3), num_chunks = grad_states.size(2);
  const scalar_t *kp = ptr<scalar_t>(k_state), *vp = ptr<scalar_t>(v);
  const acc_t* gp = ptr<acc_t>(grad_states);
  acc_t *dkp = mut<acc_t>(dk_state), *dvp = mut<acc_t>(dv);
  at::parallel_for(0, bh * num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kb(chunk_size * ds), vb(chunk_size * d), gt(d * ds);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_chunks, c = task % num_chunks;
      const Chunk ch = chunk_at(c, n, chunk_size, 0);
      const int64_t tok = b * n + ch.start, rows = ch.rows();
      const acc_t* g = gp + task * ds * d;
      const acc_t* ks = rows_as_acc(kp + tok * ds, rows, ds, kb);
      const acc_t* vs = rows_as_acc(vp + tok * d, rows, d, vb);
      transpose(ds, d, g, d, gt.data(), ds);
      if (accumulate) {
        gemm_acc(rows, ds, d, vs, d, 1, gt.data(), ds, dkp + tok * ds, ds);
        gemm_acc(rows, d, ds, ks, ds, 1, g, d, dvp + tok * d, d);
      } else {
        gemm(rows, ds, d, vs, d, 1, gt.data(), ds, dkp + tok * ds, ds);
        gemm(rows, d, ds, ks, ds, 1, g, d, dvp + tok * d, d);
      }
    }
  });
}

// Retrieval weights of chunk c over chunks j < c into p[0..c) (meta rows in acc_t); returns
// nothing for c == 0.
template <typename acc_t>
void retrieval_row(const acc_t* mq, const acc_t* mk, int64_t c, int64_t dm, double meta_scale, acc_t* p) {
  if (c == 0) return;
  for (int64_t j = 0; j < c; ++j) p[j] = dot(mq + c * dm, mk + j * dm, dm) * acc_t(meta_scale);
  const acc_t sum = exp_shift_sum(p, c, max_value(p, c));
  convert_scale(p, p, c, acc_t(1) / sum);
}

// Retrieval works on blocks of kRowBlock chunks so that mixing states (C x C weights times
// C x ds*d states) runs as register-tiled products instead of one streaming pass per chunk.
int64_t row_blocks(int64_t num_chunks) { return (num_chunks + kRowBlock - 1) / kRowBlock; }

// Weights of chunks [c0, c1) of one (batch, head) over all C chunks: row c - c0 of `rows`
// (leading dim C); entries j >= c are zero.
template <typename acc_t>
void retrieval_block(const acc_t* mq, const acc_t* mk, int64_t c0, int64_t c1, int64_t num_chunks,
                     int64_t dm, double meta_scale, acc_t* rows) {
  for (int64_t c = c0; c < c1; ++c) {
    acc_t* row = rows + (c - c0) * num_chunks;
    std::fill(row, row + num_chunks, acc_t(0));
    retrieval_row(mq, mk, c, dm, meta_scale, row);
  }
}

template <typename scalar_t>
void block_retrieval_fwd_kernel(const at::Tensor& meta_q, const at::Tensor& meta_k,
                                const at::Tensor& states, double meta_scale, at::Tensor& retrieved) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bh = states.size(0) * states.size(1), num_chunks = states.size(2),
                width = states.size(3) * states.size(4), dm = meta_q.size(3), blocks = row_blocks(num_chunks);
  const scalar_t *mqp = ptr<scalar_t>(meta_q), *mkp = ptr<scalar_t>(meta_k);
  const acc_t* fp = ptr<acc_t>(states);
  acc_t* sp = mut<acc_t>(retrieved);
  at::parallel_for(0, bh * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(kRowBlock * num_chunks), mq_buf(num_chunks * dm), mk_buf(num_chunks * dm);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = task % blocks * kRowBlock;
      const int64_t c1 = std::min(c0 + kRowBlock, num_chunks);
      retrieval_block(rows_as_acc(mqp + b * num_chunks * dm, num_chunks, dm, mq_buf),
                      rows_as_acc(mkp + b * num_chunks * dm, num_chunks, dm, mk_buf), c0, c1,
                      num_chunks, dm, meta_scale, p.data());
      acc_t* out = sp + (b * num_chunks + c0) * width;
      // Chunks [c0, c1) read only chunks before c1 - 1.
      gemm(c1 - c0, width, c1 - 1, p.data(), num_chunks, 1, fp + b * num_chunks * width, width, out, width);
    }
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_retrieval_bwd_kernel(
    const at::Tensor& grad_retrieved, const at::Tensor& meta_q, const at::Tensor& meta_k,
    const at::Tensor& states, double meta_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bh = states.size(0) * states.size(1), num_chunks = states.size(2),
                width = states.size(3) * states.size(4), dm = meta_q.size(3), blocks = row_blocks(num_chunks);
  const auto acc_opts = states.options();
  auto dmq = at::empty({bh, num_chunks, dm}, acc_opts), dmk = at::empty({bh, num_chunks, dm}, acc_opts);
  auto dstates = at::empty({bh, num_chunks, width}, acc_opts);
  // p and the logit gradient da of every (batch, head), kept for the column pass.
  auto p_all = at::empty({bh, num_chunks, num_chunks}, acc_opts), da_all = at::empty_like(p_all);
  const scalar_t *mqp = ptr<scalar_t>(meta_q), *mkp = ptr<scalar_t>(meta_k);
  const acc_t *fp = ptr<acc_t>(states), *gp = ptr<acc_t>(grad_retrieved);
  acc_t *dmqp = mut<acc_t>(dmq), *dmkp = mut<acc_t>(dmk), *dfp = mut<acc_t>(dstates),
        *pp = mut<acc_t>(p_all), *dap = mut<acc_t>(da_all);
  const int64_t cc = num_chunks * num_chunks;
  // Row blocks: dP = dS @ F^T, da = p * (dP - <p, dP>), dmeta_q = meta_scale * da @ meta_k.
  at::parallel_for(0, bh * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mq_buf(num_chunks * dm), mk_buf(num_chunks * dm);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = task % blocks * kRowBlock;
      const int64_t c1 = std::min(c0 + kRowBlock, num_chunks);
      const acc_t* mq = rows_as_acc(mqp + b * num_chunks * dm, num_chunks, dm, mq_buf);
      const acc_t* mk = rows_as_acc(mkp + b * num_chunks * dm, num_chunks, dm, mk_buf);
      acc_t *p = pp + b * cc, *da = dap + b * cc;
      retrieval_block(mq, mk, c0, c1, num_chunks, dm, meta_scale, p + c0 * num_chunks);
      for (int64_t c = c0; c < c1; ++c) {
        acc_t *prow = p + c * num_chunks, *darow = da + c * num_chunks;
        // dP[c][j] = <dS_c, F_j>: long dot products over the ds * d state (only j < c matter,
        // and a product of c x width by width x c would be too narrow to tile).
        const acc_t* dsc = gp + (b * num_chunks + c) * width;
        for (int64_t j = 0; j < c; ++j) darow[j] = dot(dsc, fp + (b * num_chunks + j) * width, width);
        const acc_t weighted = dot(prow, darow, c);
        for (int64_t j = 0; j < num_chunks; ++j) {
          darow[j] = j < c ? acc_t(meta_scale) * prow[j] * (darow[j] - weighted) : acc_t(0);
        }
      }
      // da holds meta_scale * dlogits from here on.
      acc_t* g = dmqp + (b * num_chunks + c0) * dm;
      gemm(c1 - c0, dm, c1 - 1, da + c0 * num_chunks, num_chunks, 1, mk, dm, g, dm);
    }
  });
  // Column blocks: dF = p^T @ dS and dmeta_k = meta_scale * da^T @ meta_q, over rows c > j.
  at::parallel_for(0, bh * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mq_buf(num_chunks * dm);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, j0 = task % blocks * kRowBlock;
      const int64_t j1 = std::min(j0 + kRowBlock, num_chunks);
      // Rows c > j0 can weigh chunks of this block (none for the last chunk, whose empty products
      // write zeros); p is read transposed in place.
      const int64_t first = j0 + 1, later = num_chunks - first;
      const acc_t* mq = rows_as_acc(mqp + b * num_chunks * dm, num_chunks, dm, mq_buf);
      gemm(j1 - j0, width, later, pp + b * cc + first * num_chunks + j0, 1, num_chunks,
           gp + (b * num_chunks + first) * width, width, dfp + (b * num_chunks + j0) * width, width);
      gemm(j1 - j0, dm, later, dap + b * cc + first * num_chunks + j0, 1, num_chunks, mq + first * dm, dm,
           dmkp + (b * num_chunks + j0) * dm, dm);
    }
  });
  return {dmq, dmk, dstates};
}

// ---- Op entry points: contiguous inputs, [b, h, ...] shapes, dtype dispatch. -----------------

#define BSBR_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

at::Tensor states_like(const at::Tensor& t, int64_t num_chunks, int64_t ds, int64_t d) {
  return at::empty({t.size(0), t.size(1), num_chunks, ds, d}, t.options().dtype(state_dtype(t.scalar_type())));
}

at::Tensor chunk_states_fwd(const at::Tensor& k_state_, const at::Tensor& v_, int64_t chunk_size) {
  const auto k_state = k_state_.contiguous(), v = v_.contiguous();
  auto states = states_like(v, (v.size(2) + chunk_size - 1) / chunk_size, k_state.size(3), v.size(3));
  BSBR_DISPATCH(v.scalar_type(), "chunk_states_fwd", [&] {
    chunk_states_fwd_kernel<scalar_t>(k_state, v, chunk_size, states);
  });
  return states;
}

std::tuple<at::Tensor, at::Tensor> chunk_states_bwd(const at::Tensor& grad_states,
                                                    const at::Tensor& k_state_, const at::Tensor& v_,
                                                    int64_t chunk_size) {
  const auto k_state = k_state_.contiguous(), v = v_.contiguous();
  const auto g = grad_states.contiguous().to(state_dtype(v.scalar_type()));
  const auto acc_opts = g.options();  // fp32 (fp64 for fp64 inputs), like the states
  auto dks = at::empty(k_state.sizes(), acc_opts), dv = at::empty(v.sizes(), acc_opts);
  BSBR_DISPATCH(v.scalar_type(), "chunk_states_bwd", [&] {
    chunk_states_bwd_kernel<scalar_t>(g, k_state, v, chunk_size, /*accumulate=*/false, dks, dv);
  });
  return {dks.to(k_state.scalar_type()), dv.to(v.scalar_type())};
}

at::Tensor block_retrieval_fwd(const at::Tensor& meta_q_, const at::Tensor& meta_k_,
                               const at::Tensor& states_, double meta_scale) {
  const auto meta_q = meta_q_.contiguous(), meta_k = meta_k_.contiguous(), states = states_.contiguous();
  auto retrieved = at::empty_like(states);
  BSBR_DISPATCH(meta_q.scalar_type(), "block_retrieval_fwd", [&] {
    block_retrieval_fwd_kernel<scalar_t>(meta_q, meta_k, states, meta_scale, retrieved);
  });
  return retrieved;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_retrieval_bwd(
    const at::Tensor& grad_retrieved, const at::Tensor& meta_q_, const at::Tensor& meta_k_,
    const at::Tensor& states_, double meta_scale) {
  const auto meta_q = meta_q_.contiguous(), meta_k = meta_k_.contiguous(), states = states_.contiguous();
  const auto g = grad_retrieved.contiguous().to(states.scalar_type());
  at::Tensor dmq, dmk, dstates;
  BSBR_DISPATCH(meta_q.scalar_type(), "block_retrieval_bwd", [&] {
    std::tie(dmq, dmk, dstates) = block_retrieval_bwd_kernel<scalar_t>(g, meta_q, meta_k, states, meta_scale);
  });
  return {dmq.view(meta_q.sizes()).to(meta_q.scalar_type()),
          dmk.view(meta_k.sizes()).to(meta_k.scalar_type()), dstates.view(states.sizes())};
}

std::tuple<at::Tensor, at::Tensor> chunk_attention_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& q_state_,
    const at::Tensor& retrieved_, int64_t chunk_size, int64_t chunk_overlap, double scale,
    double state_scale) {
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(),
             q_state = q_state_.contiguous(), retrieved = retrieved_.contiguous();
  const Dims s = dims_of(q, q_state, chunk_size, chunk_overlap);
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, retrieved.options());
  BSBR_DISPATCH(q.scalar_type(), "chunk_attention_fwd", [&] {
    chunk_attention_fwd_kernel<scalar_t>(s, q, k, v, q_state, retrieved, scale, state_scale, out, lse);
  });
  return {out, lse};
}

AttentionGrads chunk_attention_bwd_acc(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_state, const at::Tensor& retrieved, const at::Tensor& out,
    const at::Tensor& lse, int64_t chunk_size, int64_t chunk_overlap, double scale, double state_scale,
    bool fold_q_state) {
  const Dims s = dims_of(q, q_state, chunk_size, chunk_overlap);
  AttentionGrads g;
  BSBR_DISPATCH(q.scalar_type(), "chunk_attention_bwd", [&] {
    g = chunk_attention_bwd_kernel<scalar_t>(
        s, grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), q_state.contiguous(),
        retrieved.contiguous(), out.contiguous(), lse.contiguous(), scale, state_scale, fold_q_state);
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_state, const at::Tensor& retrieved, const at::Tensor& out,
    const at::Tensor& lse, int64_t chunk_size, int64_t chunk_overlap, double scale, double state_scale) {
  const auto g = chunk_attention_bwd_acc(grad_out, q, k, v, q_state, retrieved, out, lse, chunk_size,
                                         chunk_overlap, scale, state_scale, /*fold_q_state=*/false);
  const auto dtype = q.scalar_type();
  return {g.q.view(q.sizes()).to(dtype), g.k.view(k.sizes()).to(dtype), g.v.view(v.sizes()).to(dtype),
          g.q_state.view(q_state.sizes()).to(dtype), g.retrieved.view(retrieved.sizes())};
}

std::tuple<at::Tensor, at::Tensor> bsbr_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& meta_q,
    const at::Tensor& meta_k, const std::optional<at::Tensor>& q_state,
    const std::optional<at::Tensor>& k_state, int64_t chunk_size, int64_t chunk_overlap, double scale,
    double meta_scale, double state_scale) {
  const auto states = chunk_states_fwd(k_state.value_or(k), v, chunk_size);
  const auto retrieved = block_retrieval_fwd(meta_q, meta_k, states, meta_scale);
  return chunk_attention_fwd(q, k, v, q_state.value_or(q), retrieved, chunk_size, chunk_overlap, scale,
                             state_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bsbr_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& meta_q, const at::Tensor& meta_k,
                   const std::optional<at::Tensor>& q_state_, const std::optional<at::Tensor>& k_state_,
                   const at::Tensor& out, const at::Tensor& lse, int64_t chunk_size,
                   int64_t chunk_overlap, double scale, double meta_scale, double state_scale) {
  const at::Tensor& q_state = q_state_.has_value() ? *q_state_ : q;
  const at::Tensor& k_state = k_state_.has_value() ? *k_state_ : k;
  // An omitted state's gradient is added to q's / k's (summed before the one rounding) instead of
  // being returned; each intermediate is released once used, which sets the backward's peak memory.
  const bool fold_q_state = !q_state_.has_value(), fold_k_state = !k_state_.has_value();
  at::Tensor states = chunk_states_fwd(k_state, v, chunk_size);
  at::Tensor retrieved = block_retrieval_fwd(meta_q, meta_k, states, meta_scale);
  AttentionGrads g = chunk_attention_bwd_acc(grad_out, q, k, v, q_state, retrieved, out, lse, chunk_size,
                                             chunk_overlap, scale, state_scale, fold_q_state);
  retrieved.reset();
  auto [dmq, dmk, dstates] = block_retrieval_bwd(g.retrieved.view(states.sizes()), meta_q, meta_k, states,
                                                 meta_scale);
  states.reset();
  g.retrieved.reset();
  at::Tensor dk_state = fold_k_state ? g.k : at::zeros({g.k.size(0), g.k.size(1), k_state.size(3)}, g.k.options());
  BSBR_DISPATCH(v.scalar_type(), "chunk_states_bwd", [&] {
    chunk_states_bwd_kernel<scalar_t>(dstates, k_state.contiguous(), v.contiguous(), chunk_size,
                                      /*accumulate=*/true, dk_state, g.v);
  });
  const auto dtype = q.scalar_type();
  return {g.q.view(q.sizes()).to(dtype),
          g.k.view(k.sizes()).to(dtype),
          g.v.view(v.sizes()).to(dtype),
          dmq,
          dmk,
          fold_q_state ? at::empty({0}, q.options()) : g.q_state.view(q_state.sizes()).to(dtype),
          fold_k_state ? at::empty({0}, q.options()) : dk_state.view(k_state.sizes()).to(dtype)};
}

}  // namespace
}  // namespace bsbr::cpu

TORCH_LIBRARY_IMPL(bsbr, CPU, m) {
  using namespace bsbr::cpu;
  m.impl("_bsbr_attention_fwd", &bsbr_attention_fwd);
  m.impl("_bsbr_attention_bwd", &bsbr_attention_bwd);
  m.impl("_chunk_states_fwd", &chunk_states_fwd);
  m.impl("_chunk_states_bwd", &chunk_states_bwd);
  m.impl("_block_retrieval_fwd", &block_retrieval_fwd);
  m.impl("_block_retrieval_bwd", &block_retrieval_bwd);
  m.impl("_chunk_attention_fwd", &chunk_attention_fwd);
  m.impl("_chunk_attention_bwd", &chunk_attention_bwd);
}
