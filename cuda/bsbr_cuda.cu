// CUDA implementations of the internal bsbr ops (schemas in cpp/ops.cpp), registered under the
// CUDA dispatch key. Inputs arrive validated by the public ops (shapes, matching dtypes, C); this
// file adds the limits of the CUDA kernels, picks the kernel instantiation, and composes the
// stages:
//   chunk states       own kernel (fp32 accumulation)                  aux_kernels.cuh
//   block retrieval    logits / mixing GEMMs through cuBLAS (ATen, fp32), masked softmax and its
//                      backward are the kernels below
//   chunk attention    tensor-core kernels for fp16/bf16, SIMT for fp32   attn_mma.cuh, attn_simt.cuh
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bsbr_common.h"
#include "bsbr_cuda.h"
#include "kernel_utils.cuh"
#include "meta_probs.cuh"
#include "retrieval_wgmma.cuh"

namespace bsbr_cuda {
namespace {

using at::Tensor;

using bsbr::message;  // error messages without iostream number formatting (see bsbr_common.h)

// ------------------------------------------------------------------ limits and dispatch

void check_dtype(at::ScalarType st, const char* name) {
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, message("bsbr CUDA kernels: ", name, " must be float16, bfloat16 or float32, got ", st,
                   " (float64 is supported by the CPU kernels only)"));
}

void check_head_dim(int64_t d) {
  TORCH_CHECK_VALUE(d == 32 || d == 64 || d == 128, message("bsbr CUDA kernels: head dim d (last dim of q, k, v) must be 32, 64 or 128, "
                    "got ", d));
}

void check_state_dim(int64_t ds, int64_t d) {
  TORCH_CHECK_VALUE(ds >= 8 && ds % 8 == 0 && ds <= d, message("bsbr CUDA kernels: state dim ds (last dim of q_state / k_state) must be a "
                    "multiple of 8 with 8 <= ds <= d = ", d, ", got ", ds));
}

void check_chunk(int64_t chunk_size, int64_t overlap) {
  TORCH_CHECK_VALUE(chunk_size >= 16 && chunk_size <= 256 && chunk_size % 16 == 0, message("bsbr CUDA kernels: chunk_size must be a multiple of 16 in [16, 256], got ",
                    chunk_size));
  TORCH_CHECK_VALUE(overlap >= 0 && overlap <= chunk_size, message("bsbr CUDA kernels: chunk_overlap must satisfy 0 <= chunk_overlap <= "
                    "chunk_size = ", chunk_size, ", got ", overlap));
}

void check_on(const Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.is_cuda(), message("bsbr CUDA kernels: all tensors must be on the same CUDA device; ",
                    name, " is on ", t.device(), ", expected ", dev));
  TORCH_CHECK_VALUE(t.device() == dev, message("bsbr CUDA kernels: all tensors must be on the same CUDA "
                    "device; ", name, " is on ", t.device(), ", expected ", dev));
}

void check_token(const Tensor& t, const char* name, const Tensor& q) {
  check_on(t, name, q.device());
  TORCH_CHECK_VALUE(t.dim() == 4, message("bsbr CUDA kernels: ", name, " must be 4-D [b, h, n, e], got ",
                    t.dim(), "-D"));
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), message("bsbr CUDA kernels: ", name,
                   " must have the dtype of the other token tensors (", q.scalar_type(), "), got ",
                   t.scalar_type()));
}

void check_fp32(const Tensor& t, const char* name, const Tensor& q) {
  check_on(t, name, q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, message("bsbr CUDA kernels: ", name,
                   " must be float32 (the state dtype for float16/bfloat16/float32 inputs), got ",
                   t.scalar_type()));
}

bool force_simt() {
  const char* e = std::getenv("BSBR_CUDA_SIMT");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

// Whether a Hopper wgmma kernel may run: the build has sm_90a code (BSBR_WGMMA:
// TORCH_CUDA_ARCH_LIST with 9.0a, which setup.py and CMake make of 9.0), the GPU has compute
// capability 9.0, and the environment variable `off_switch` (read per call) is not "0", which
// keeps the mma.sync kernels, for cross-checking and A/B timing.
bool use_wgmma(const char* off_switch) {
#ifdef BSBR_WGMMA
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const char* e = std::getenv(off_switch);
  return prop->major == 9 && prop->minor == 0 && !(e != nullptr && std::strcmp(e, "0") == 0);
#else
  (void)off_switch;
  return false;
#endif
}

// The tensor-core path loads 16-byte pieces of rows: base and row/head/batch strides must allow
// that. A view that does not (rare: an odd offset into a buffer) is copied once, into a fresh
// buffer (prep_token: contiguous() would return a contiguous view at an odd offset as it is).
bool vec_aligned(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  return true;
}

Tensor prep_token(const Tensor& t, bool need_vec) {
  if (t.numel() == 0) return t;
  if (t.stride(-1) != 1 && t.size(-1) > 1) return prep_token(t.contiguous(), need_vec);
  if (need_vec && !vec_aligned(t)) return t.clone(at::MemoryFormat::Contiguous);
  return t;
}

Strides strides_of(const Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2)}; }

// Calls f(T{}, std::integral_constant<int, D>{}) for the element type and head dim, or raises if
// that combination was not compiled (setup.py's BSBR_DTYPES / BSBR_HEAD_DIMS).
template <typename T, typename F> void dispatch_dim(int64_t d, F&& f) {
  switch (d) {
#ifdef BSBR_HDIM32
    case 32: return f(T{}, std::integral_constant<int, 32>{});
#endif
#ifdef BSBR_HDIM64
    case 64: return f(T{}, std::integral_constant<int, 64>{});
#endif
#ifdef BSBR_HDIM128
    case 128: return f(T{}, std::integral_constant<int, 128>{});
#endif
    default:
      check_head_dim(d);
      TORCH_CHECK_VALUE(false, message("bsbr CUDA kernels: head dim ", d, " is not compiled into this "
                        "build; rebuild with BSBR_HEAD_DIMS including ", d));
  }
}

template <typename F> void dispatch(at::ScalarType st, int64_t d, F&& f) {
  switch (st) {
#ifdef BSBR_FP16
    case at::kHalf: return dispatch_dim<__half>(d, f);
#endif
#ifdef BSBR_BF16
    case at::kBFloat16: return dispatch_dim<__nv_bfloat16>(d, f);
#endif
#ifdef BSBR_FP32
    case at::kFloat: return dispatch_dim<float>(d, f);
#endif
    default:
      check_dtype(st, "q");
      TORCH_CHECK_TYPE(false, message("bsbr CUDA kernels: dtype ", st, " is not compiled into this build; "
                       "rebuild with BSBR_DTYPES including ",
                       st == at::kHalf ? "fp16" : st == at::kBFloat16 ? "bf16" : "fp32"));
  }
}

// Calls f(T{}) for a meta tensor's element type (any of the three, whatever was compiled).
template <typename F> void dispatch_meta(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kFloat: return f(float{});
    default: check_dtype(st, "meta_q");
  }
}

void check_sizes(int64_t b, int64_t h, int64_t n, int64_t chunk) {
  const int64_t imax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(n < imax - 512, message("bsbr CUDA kernels: sequence length n must be < 2^31, got ", n));
  const int64_t tiles = (n + 15) / 16 * b * h;  // upper bound on the CTAs of any launch
  TORCH_CHECK_VALUE(tiles <= imax, message("bsbr CUDA kernels: b * h * n / 16 must be < 2^31, got b=", b,
                    " h=", h, " n=", n));
  (void)chunk;
}

// The fused backward runs its state pipeline (chunk states, retrieval and their gradients) on
// groups of heads whose fp32 state buffer stays under a budget, writing into views of the full
// gradients: the peak then holds two group-sized state buffers (F and R, later dF and dR)
// instead of two full-size ones. Small problems are one group. The split-K partial sums of dP
// stay under half of the budget. The budget is 24 MiB, or the states of 1536 (head, chunk)
// pairs (three heads of 64k tokens at chunk 128) where those are larger: 24 MiB keeps 64k
// tokens, d = 64, 16 heads under 600 MiB of peak extra memory (H100, e30a1f4: 16 MiB 2.76 ms
// forward+backward at 576 MiB; 24 MiB 2.62 ms at 596; 32 MiB 2.48 ms at 617), and at larger
// states a group of fewer heads leaves each kernel a grid too small for the GPU (d = 128: 7.93
// ms at 24 MiB, 7.07 ms at 96; docs/cuda_notes.md, Run 22).
// BSBR_GROUP_STATE_BYTES overrides it (tests use it to run many groups at small sizes).
// `state_size` is the elements of one chunk state, ds * d.
int64_t group_state_bytes(int64_t state_size) {
  const char* e = std::getenv("BSBR_GROUP_STATE_BYTES");
  if (e != nullptr) return std::max<int64_t>(1, std::atoll(e));
  return std::max<int64_t>(int64_t{24} << 20, 1536 * state_size * int64_t{sizeof(float)});
}

// ------------------------------------------------------------------ chunk states

// Params of the per-chunk state kernels over x [b, h, n, ds] (k_state, or q_state for dS) and
// y [b, h, n, d] (v, or dO); xx and yy keep the prepared views alive for the launch.
AttnParams state_params(const Tensor& x, const Tensor& y, int64_t chunk, Tensor& xx, Tensor& yy) {
  AttnParams p;
  p.simt = force_simt() || y.scalar_type() == at::kFloat;
  xx = prep_token(x, !p.simt);
  yy = prep_token(y, !p.simt);
  p.qs = xx.data_ptr();
  p.qs_st = strides_of(xx);
  p.v = yy.data_ptr();
  p.v_st = strides_of(yy);
  p.b = y.size(0), p.h = y.size(1), p.n = y.size(2), p.ds = x.size(3), p.chunk = chunk;
  p.num_chunks = (y.size(2) + chunk - 1) / chunk;
  return p;
}

void check_state_inputs(const Tensor& k_state, const Tensor& v, int64_t chunk_size) {
  check_dtype(v.scalar_type(), "v");
  check_token(v, "v", v);
  check_token(k_state, "k_state", v);
  check_head_dim(v.size(3));
  check_state_dim(k_state.size(3), v.size(3));
  check_chunk(chunk_size, 0);
  check_sizes(v.size(0), v.size(1), v.size(2), chunk_size);
}

// Whether a kernel may overlap an independent kernel launched just before it (programmatic
// dependent launch; the pairs: docs/cuda_notes.md, "Independent kernels overlapped on the one
// stream"), under the conditions of the wgmma kernels, whose sm_90a code has the
// griddepcontrol instructions the overlap relies on. BSBR_PDL=0 (read per call) launches them
// one after the other, for cross-checking and A/B timing.
bool use_pdl() { return use_wgmma("BSBR_PDL"); }

// `into`, when given, is a contiguous fp32 [b, h, C, ds, d] buffer to write (reused memory).
// `split` stores split-bf16 words instead of fp32 (the tensor-core mixing's operand format;
// fp16/bf16 inputs only). `overlap_previous`: the last kernel launched on the stream neither
// writes what this one reads nor reads what it writes, and everything it reads stays allocated
// until this launch is issued (probs_padded's `overlappable`; the fused backward's previous head
// group, GroupTail): the states kernel may then overlap it (use_pdl).
Tensor states_impl(const Tensor& x, const Tensor& y, int64_t chunk, double out_scale,
                   const Tensor& into = Tensor(), bool split = false,
                   bool overlap_previous = false) {
  const int64_t b = y.size(0), h = y.size(1), n = y.size(2), d = y.size(3), ds = x.size(3);
  const int64_t C = (n + chunk - 1) / chunk;
  Tensor out = into.defined() ? into : at::empty({b, h, C, ds, d}, y.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  Tensor xx, yy;
  AttnParams p = state_params(x, y, chunk, xx, yy);
  p.states = out.data_ptr<float>();
  p.out_scale = static_cast<float>(out_scale);
  p.states_split = split;
  TORCH_INTERNAL_ASSERT(!(split && p.simt), "split-word states come from the tensor-core kernel only");
  p.overlap_previous = overlap_previous && !p.simt && use_pdl();
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(y.scalar_type(), d, [&](auto t, auto dim) {
    run_states_fwd<decltype(t), decltype(dim)::value>(p, stream);
  });
  return out;
}

Tensor chunk_states_fwd(const Tensor& k_state, const Tensor& v, int64_t chunk_size) {
  check_state_inputs(k_state, v, chunk_size);
  c10::cuda::CUDAGuard guard(v.device());
  return states_impl(k_state, v, chunk_size, 1.0);
}

// grad_x = y gF^T into gx [b, h, n, ds] and grad_y = x gF into gy [b, h, n, d], both contiguous;
// add_x / add_y add to what they hold (fp32 sum before the one rounding).
void states_bwd_into(const Tensor& gF, const Tensor& x, const Tensor& y, int64_t chunk,
                     const Tensor& gx, bool add_x, const Tensor& gy, bool add_y) {
  const int64_t d = y.size(3);
  if (gx.numel() == 0 || gy.numel() == 0) {
    if (!add_x) gx.zero_();
    if (!add_y) gy.zero_();
    return;
  }
  Tensor F = gF.contiguous();
  if (reinterpret_cast<uintptr_t>(F.data_ptr()) % 16 != 0) F = F.clone();  // float4 loads
  Tensor xx, yy;
  AttnParams p = state_params(x, y, chunk, xx, yy);
  p.S = F.data_ptr<float>();
  p.dqs = gx.data_ptr();
  p.dv = gy.data_ptr();
  p.dqs_accumulate = add_x;
  p.dv_accumulate = add_y;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(y.scalar_type(), d, [&](auto t, auto dim) {
    run_states_bwd<decltype(t), decltype(dim)::value>(p, stream);
  });
}

std::tuple<Tensor, Tensor> chunk_states_bwd(const Tensor& grad_states, const Tensor& k_state,
                                            const Tensor& v, int64_t chunk_size) {
  check_state_inputs(k_state, v, chunk_size);
  check_fp32(grad_states, "grad_states", v);
  c10::cuda::CUDAGuard guard(v.device());
  Tensor gx = at::empty(k_state.sizes(), k_state.options()), gy = at::empty(v.sizes(), v.options());
  states_bwd_into(grad_states, k_state, v, chunk_size, gx, false, gy, false);
  return {gx, gy};
}

// ------------------------------------------------------------------ block retrieval

// One warp per row c of the [C, C] logits x: p_cj = softmax_{j<c}(meta_scale * a_cj), 0 for
// j >= c, written to y with leading dim ldy >= C (padding columns get 0), as fp32 or (kSplit)
// split-bf16 words. Row 0 has no earlier chunk and becomes all zeros (no NaN). May run in place
// (y == x, ldy == C).
template <bool kSplit>
__global__ void masked_softmax_fwd_kernel(const float* x, float* y, int64_t rows, int C, int ldy,
                                          float scale_log2) {
  const int64_t row = (int64_t)blockIdx.x * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int c = static_cast<int>(row % C);
  const float* r = x + row * C;
  float* o = y + row * ldy;
  float mx = -INFINITY;
  for (int j = lane; j < c; j += 32) mx = fmaxf(mx, r[j] * scale_log2);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float sum = 0.f;
  for (int j = lane; j < c; j += 32) sum += exp2f(r[j] * scale_log2 - mx);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float inv = c > 0 ? 1.f / sum : 0.f;
  for (int j = lane; j < ldy; j += 32) {
    const float pj = j < c ? exp2f(r[j] * scale_log2 - mx) * inv : 0.f;
    o[j] = kSplit ? __uint_as_float(split_word(pj)) : pj;
  }
}

// da = out_scale * P * (dP - rowsum(P * dP)), written into da (which may be P or dP: each lane
// reads an element before it writes it). dP may arrive as `splits` partial sums (split-K of the
// tensor-core product), `split_stride` apart, added here in a fixed order (deterministic). P, dP
// and da rows have leading dim ld; P is fp32 or (kSplitP) split-bf16 words. Row c reads only
// j < c (P is zero elsewhere) and writes zeros there. One warp per row; each lane owns kVec
// consecutive elements per 32 * kVec columns (kVec = 4: 16-byte loads, needs ld % 4 == 0 and
// 16-byte aligned rows) and keeps kSteps such pieces of P and of the summed dP in registers: a
// row of up to kSteps * 32 * kVec columns is read once, with all its loads in flight (with a
// single load per step the kernel waited on memory latency); longer rows are read twice.
// overlap_previous: launched to overlap the kernel before it (the fused backward's dF = P^T dS).
template <bool kSplitP, int kVec>
__global__ void masked_softmax_bwd_kernel(const float* P, const float* dP, float* da, int64_t rows,
                                          int C, int ld, int splits, int64_t split_stride,
                                          float out_scale, bool overlap_previous) {
  constexpr int kSteps = 4, kSeg = 32 * kVec * kSteps;
  using Vec = std::conditional_t<kVec == 4, float4, float>;
  const int64_t row = (int64_t)blockIdx.x * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // The fused backward's dK/dV (but the last group's) may start beside this and dF = P^T dS:
  // it waits for this grid before it reads dF.
  pdl_launch_dependents();
  wait_overlapped_kernel(overlap_previous);  // first: some of the last CTA's warps have no row
  if (row >= rows) return;
  const int c = static_cast<int>(row % C);
  const float* pr = P + row * ld;
  const float* dr = dP + row * ld;
  float* out = da + row * ld;
  auto elems = [](const Vec& v, int e) -> float {
    if constexpr (kVec == 4) return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
    else return v;
  };
  auto set = [](Vec& v, int e, float x) {
    if constexpr (kVec == 4) (e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w) = x;
    else v = x;
  };
  // P and the summed dP of the pieces of segment seg (zeros at j >= c).
  auto load = [&](int seg, float (&pv)[kSteps][kVec], float (&dv)[kSteps][kVec]) {
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int j = seg + (u * 32 + lane) * kVec;
      Vec p4{}, d4{};
      if (j < c) {
        p4 = *reinterpret_cast<const Vec*>(pr + j);
        d4 = *reinterpret_cast<const Vec*>(dr + j);
        for (int s = 1; s < splits; ++s) {
          const Vec x = *reinterpret_cast<const Vec*>(dr + s * split_stride + j);
#pragma unroll
          for (int e = 0; e < kVec; ++e) set(d4, e, elems(d4, e) + elems(x, e));
        }
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float pe = elems(p4, e);
        const bool ok = j + e < c;
        pv[u][e] = ok ? (kSplitP ? unsplit_word(__float_as_uint(pe)) : pe) : 0.f;
        dv[u][e] = ok ? elems(d4, e) : 0.f;
      }
    }
  };
  float pv[kSteps][kVec], dv[kSteps][kVec];
  float sum = 0.f;
  for (int seg = 0; seg < c; seg += kSeg) {
    load(seg, pv, dv);
#pragma unroll
    for (int u = 0; u < kSteps; ++u)
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum += pv[u][e] * dv[u][e];
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const int width = kVec == 4 ? ld : C;  // kVec = 4 also zeroes the padding columns [C, ld)
  for (int seg = 0; seg < width; seg += kSeg) {
    if (seg >= c) {
#pragma unroll
      for (int u = 0; u < kSteps; ++u)
#pragma unroll
        for (int e = 0; e < kVec; ++e) pv[u][e] = dv[u][e] = 0.f;
    } else if (c > kSeg) {  // the registers hold the last segment only
      load(seg, pv, dv);
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int j = seg + (u * 32 + lane) * kVec;
      if (j >= width) continue;
      Vec o4;
#pragma unroll
      for (int e = 0; e < kVec; ++e) set(o4, e, pv[u][e] * (dv[u][e] - sum) * out_scale);
      *reinterpret_cast<Vec*>(out + j) = o4;
    }
  }
}

// The C x C mixing products of the retrieval run through cuBLAS SGEMM in true fp32 (TF32 only if
// the user enabled it globally). P is strictly lower triangular, so each product is split into
// kTriBlocks row blocks that skip the all-zero part: 10/16 of the dense FLOPs for 4 blocks. (A
// bf16x3 split on tensor cores was tried: its ~1e-5 relative error is visible against the fp32
// reference of the fp32 states, and the split/concat traffic made it no faster at C = 512.)
// All operands are [bh, rows, cols] fp32; outputs are written in place through strided views.
constexpr int kTriBlocks = 4;
// Below this many chunks one dense product was faster on an H200 (fewer launches; measured
// 2026-11-27: blocked lost at C = 8..128, won at C = 512, docs/cuda_notes.md).
constexpr int64_t kTriMinChunks = 256;

int64_t tri_bound(int64_t C, int i) { return C * i / kTriBlocks; }

// S = P F, P [bh, C, C] zero on and above the diagonal, F [bh, C, X].
Tensor tri_mix(const Tensor& P, const Tensor& F) {
  const int64_t C = P.size(1);
  if (C < kTriMinChunks) return at::bmm(P, F);
  Tensor out = at::empty({F.size(0), C, F.size(2)}, F.options());
  for (int i = 0; i < kTriBlocks; ++i) {
    const int64_t r0 = tri_bound(C, i), r1 = tri_bound(C, i + 1);
    if (r1 <= r0) continue;
    Tensor o = out.narrow(1, r0, r1 - r0);  // row c needs F_j for j < c < r1 only
    at::bmm_out(o, P.narrow(1, r0, r1 - r0).narrow(2, 0, r1), F.narrow(1, 0, r1));
  }
  return out;
}

// dF = P^T dS: dF_j = sum_{c > j} P_cj dS_c.
Tensor tri_mix_t(const Tensor& P, const Tensor& dS) {
  const int64_t C = P.size(1);
  if (C < kTriMinChunks) return at::bmm(P.transpose(1, 2), dS);
  Tensor out = at::empty({dS.size(0), C, dS.size(2)}, dS.options());
  for (int i = 0; i < kTriBlocks; ++i) {
    const int64_t r0 = tri_bound(C, i), r1 = tri_bound(C, i + 1);
    if (r1 <= r0) continue;
    Tensor o = out.narrow(1, r0, r1 - r0);  // rows j in [r0, r1) need c > j >= r0
    at::bmm_out(o, P.narrow(1, r0, C - r0).narrow(2, r0, r1 - r0).transpose(1, 2),
                dS.narrow(1, r0, C - r0));
  }
  return out;
}

// dP = dS F^T where it is needed (j < c); zero elsewhere (P = 0 there, and a garbage value
// would turn into NaN through 0 * x).
Tensor tri_scores(const Tensor& dS, const Tensor& F) {
  const int64_t C = dS.size(1);
  if (C < kTriMinChunks) return at::bmm(dS, F.transpose(1, 2));
  Tensor out = at::zeros({dS.size(0), C, C}, dS.options());
  for (int i = 0; i < kTriBlocks; ++i) {
    const int64_t r0 = tri_bound(C, i), r1 = tri_bound(C, i + 1);
    if (r1 <= r0) continue;
    Tensor o = out.narrow(1, r0, r1 - r0).narrow(2, 0, r1);
    at::bmm_out(o, dS.narrow(1, r0, r1 - r0), F.narrow(1, 0, r1).transpose(1, 2));
  }
  return out;
}

Tensor retrieval_probs(const Tensor& mq32, const Tensor& mk32, double meta_scale) {
  Tensor logits = at::matmul(mq32, mk32.transpose(-1, -2)).contiguous();
  const int64_t C = logits.size(-1);
  const int64_t rows = logits.numel() / std::max<int64_t>(C, 1);
  if (rows == 0) return logits;
  const unsigned blocks = static_cast<unsigned>((rows + 7) / 8);
  masked_softmax_fwd_kernel<false><<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), logits.data_ptr<float>(), rows, static_cast<int>(C),
      static_cast<int>(C), static_cast<float>(meta_scale) * kLog2e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return logits;
}

void check_meta(const Tensor& mq, const Tensor& mk, const Tensor& states) {
  check_on(mq, "meta_q", states.device());
  check_on(mk, "meta_k", states.device());
  check_dtype(mq.scalar_type(), "meta_q");
  check_dtype(mk.scalar_type(), "meta_k");
  check_fp32(states, "states", states);
}

Tensor block_retrieval_fwd(const Tensor& meta_q, const Tensor& meta_k, const Tensor& states,
                           double meta_scale) {
  check_meta(meta_q, meta_k, states);
  c10::cuda::CUDAGuard guard(states.device());
  const int64_t b = states.size(0), h = states.size(1), C = states.size(2);
  const int64_t ds = states.size(3), d = states.size(4);
  if (states.numel() == 0) return at::zeros_like(states, at::MemoryFormat::Contiguous);
  Tensor P = retrieval_probs(meta_q.to(at::kFloat), meta_k.to(at::kFloat), meta_scale);
  return tri_mix(P.view({b * h, C, C}), states.contiguous().view({b * h, C, ds * d}))
      .view({b, h, C, ds, d});
}

std::tuple<Tensor, Tensor, Tensor> block_retrieval_bwd(const Tensor& grad_retrieved,
                                                       const Tensor& meta_q, const Tensor& meta_k,
                                                       const Tensor& states, double meta_scale) {
  check_meta(meta_q, meta_k, states);
  check_fp32(grad_retrieved, "grad_retrieved", states);
  c10::cuda::CUDAGuard guard(states.device());
  const int64_t b = states.size(0), h = states.size(1), C = states.size(2);
  const int64_t ds = states.size(3), d = states.size(4);
  if (states.numel() == 0 || meta_q.numel() == 0) {
    return {at::zeros_like(meta_q, at::MemoryFormat::Contiguous),
            at::zeros_like(meta_k, at::MemoryFormat::Contiguous),
            at::zeros_like(states, at::MemoryFormat::Contiguous)};
  }
  Tensor mq = meta_q.to(at::kFloat), mk = meta_k.to(at::kFloat);
  Tensor P = retrieval_probs(mq, mk, meta_scale);
  Tensor dS = grad_retrieved.contiguous().view({b * h, C, ds * d});
  Tensor F = states.contiguous().view({b * h, C, ds * d});
  Tensor da = tri_scores(dS, F).contiguous().view({b, h, C, C});  // dP, then da in place
  const int64_t rows = b * h * C;
  launch_kernel(masked_softmax_bwd_kernel<false, 1>, static_cast<unsigned>((rows + 7) / 8), 256, 0,
                at::cuda::getCurrentCUDAStream(), /*overlap_previous=*/false, P.data_ptr<float>(),
                da.data_ptr<float>(), da.data_ptr<float>(), rows, static_cast<int>(C),
                static_cast<int>(C), 1, int64_t{0}, 1.f, false);
  Tensor dmq = (at::matmul(da, mk) * meta_scale).to(meta_q.scalar_type());
  Tensor dmk = (at::matmul(da.transpose(-1, -2), mq) * meta_scale).to(meta_k.scalar_type());
  Tensor dF = tri_mix_t(P.view({b * h, C, C}), dS).view({b, h, C, ds, d});
  return {dmq, dmk, dF};
}

// ------------------------------------------------------------------ retrieval on tensor cores
// The fused op with fp16/bf16 inputs runs the three C x C mixing products as split-precision
// (bf16x3) tensor-core kernels (retrieval_mma.cuh): ~2^-17 relative error, invisible in its
// fp16/bf16 outputs. fp32 inputs and the standalone retrieval ops (whose fp32 outputs are
// compared at fp32 accuracy) keep the true-fp32 cuBLAS products above, and so do empty problems.
// BSBR_MIX_FP32=1 forces the cuBLAS path everywhere (cross-checking).
bool use_tc_mix(const Tensor& q, const Tensor& meta_q) {
  if (q.scalar_type() == at::kFloat || force_simt() || q.numel() == 0 || meta_q.numel() == 0) {
    return false;
  }
  const char* e = std::getenv("BSBR_MIX_FP32");
  return !(e != nullptr && std::strcmp(e, "1") == 0);
}

int64_t pad4(int64_t x) { return (x + 3) / 4 * 4; }

// Whether the meta-probs kernel (meta_probs.cuh) computes the retrieval weights of these meta
// tensors: fp16 / bf16 of one dtype, a meta dim it covers.
bool probs_kernel_applies(const Tensor& meta_q, const Tensor& meta_k) {
  const at::ScalarType st = meta_q.scalar_type();
  return (st == at::kHalf || st == at::kBFloat16) && meta_k.scalar_type() == st &&
         mix::meta_probs_supported(static_cast<int>(meta_q.size(3)));
}

// The meta-probs kernel into `out`, from the meta tensors as they are (no fp32 copies, no logits
// buffer); for probs_kernel_applies meta tensors of at least one row. `overlappable` as in
// probs_padded.
void launch_probs_kernel(const Tensor& meta_q, const Tensor& meta_k, double meta_scale,
                         const mix::ProbsOut& out, bool* overlappable) {
  Tensor mq = meta_q.contiguous(), mk = meta_k.contiguous();
  if (reinterpret_cast<uintptr_t>(mq.data_ptr()) % 16 != 0) mq = mq.clone();  // 16-byte loads
  if (reinterpret_cast<uintptr_t>(mk.data_ptr()) % 16 != 0) mk = mk.clone();
  const float sl2 = static_cast<float>(meta_scale) * kLog2e;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    mix::launch_meta_probs<T>(reinterpret_cast<const T*>(mq.data_ptr()),
                              reinterpret_cast<const T*>(mk.data_ptr()), out,
                              meta_q.size(0) * meta_q.size(1), static_cast<int>(meta_q.size(2)),
                              static_cast<int>(meta_q.size(3)), sl2,
                              at::cuda::getCurrentCUDAStream());
  };
  if (meta_q.scalar_type() == at::kHalf) {
    launch(__half{});
  } else {
    launch(__nv_bfloat16{});
  }
  if (overlappable != nullptr) *overlappable = mq.is_same(meta_q) && mk.is_same(meta_k);
}

// P = masked softmax of meta_scale * mq mk^T as [b*h, C, Cp] split-bf16 words (the tensor-core
// mixing's operand format), Cp = C rounded up to 4; the padding columns and j >= c hold zeros.
// `overlappable` (if given) tells whether the next kernel may overlap the last one launched here
// (states_impl's overlap_previous): only when that is the tensor-core kernel reading the caller's
// meta tensors, since a copy freed here could be reused by the next kernel's outputs while the
// kernel still reads it (the caching allocator assumes stream order, which the overlap breaks).
Tensor probs_padded(const Tensor& meta_q, const Tensor& meta_k, double meta_scale,
                    bool* overlappable = nullptr) {
  if (overlappable != nullptr) *overlappable = false;
  const int64_t bh = meta_q.size(0) * meta_q.size(1), C = meta_q.size(2);
  const int64_t Cp = pad4(C), rows = bh * C;
  Tensor P = at::empty({bh, C, Cp}, meta_q.options().dtype(at::kFloat));
  if (rows == 0) return P;
  if (probs_kernel_applies(meta_q, meta_k)) {
    mix::ProbsOut out;
    out.words = reinterpret_cast<uint32_t*>(P.data_ptr<float>());
    out.ld = static_cast<int>(Cp);
    launch_probs_kernel(meta_q, meta_k, meta_scale, out, overlappable);
    return P;
  }
  const float sl2 = static_cast<float>(meta_scale) * kLog2e;
  auto stream = at::cuda::getCurrentCUDAStream();
  // fp32 or mixed-dtype meta tensors, or a meta dim the kernel does not cover: fp32 logits
  // through cuBLAS, then the masked softmax.
  Tensor logits = at::matmul(meta_q.to(at::kFloat), meta_k.to(at::kFloat).transpose(-1, -2))
                      .contiguous();
  masked_softmax_fwd_kernel<true><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
      logits.data_ptr<float>(), P.data_ptr<float>(), rows, static_cast<int>(C),
      static_cast<int>(Cp), sl2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return P;
}

// Common fields: P [bh, C, Cp]; a state-shaped operand has X = ds * d columns (a multiple of
// 256 under check_state_dim, so whole tiles along X).
mix::MixParams mix_params(int64_t bh, int64_t C) {
  mix::MixParams mp;
  mp.bh = static_cast<int>(bh);
  mp.M = static_cast<int>(C);
  return mp;
}

// Whether the wgmma backward computes dQ, dK and dV in one kernel where the windows allow it
// (wg::attn_dqkv_kernel). BSBR_ATTN_DQKV (read per call): "0" never, any other value wherever it
// applies; unset: at d = 128 only, where it was faster than the dK/dV + dQ kernels (H100, 64k:
// docs/cuda_notes.md, Run 20).
bool use_dqkv(int64_t d) {
  const char* e = std::getenv("BSBR_ATTN_DQKV");
  if (e != nullptr) return std::strcmp(e, "0") != 0;
  return d == 128;
}

// S = P F and dF = P^T dS (retrieval_wgmma.cuh).
bool use_wgmma_mix() { return use_wgmma("BSBR_MIX_WGMMA"); }

// Whether the wgmma mixing of `tiles` CTAs (`per_sm` per SM) takes the grouped CTA order
// (MixTParams::group_x): where the launch is 4 waves or more, the tail is a small part, and at
// d = 128 the x-fastest order reads W about 1.5 times from DRAM; in fewer waves, starting every
// heaviest tile first gives the shorter tail (H100: docs/cuda_notes.md, Run 22).
// BSBR_MIX_GROUP_X (read per call): "0" never, any other value always.
bool mix_group_x(int64_t tiles, int per_sm) {
  const char* e = std::getenv("BSBR_MIX_GROUP_X");
  if (e != nullptr) return std::strcmp(e, "0") != 0;
  return tiles >= 4 * per_sm * int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount};
}

// P's split words [rows][Cp] -> its hi and lo halves as bf16 planes [rows][ldp] (ldp >= Cp, a
// multiple of 8 so that every row starts 16-byte aligned), zero in columns [Cp, ldp).
__global__ void p_planes_kernel(const uint32_t* __restrict__ P, __nv_bfloat16* __restrict__ hi,
                                __nv_bfloat16* __restrict__ lo, int64_t rows, int Cp, int ldp) {
  const int quads = ldp / 4;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * quads) return;
  const int64_t r = i / quads;
  const int c = static_cast<int>(i % quads) * 4;
  uint4 w = make_uint4(0, 0, 0, 0);
  if (c < Cp) w = *reinterpret_cast<const uint4*>(P + r * Cp + c);
  const int64_t o = r * ldp + c;
  *reinterpret_cast<uint2*>(hi + o) =
      make_uint2(__byte_perm(w.x, w.y, 0x5410), __byte_perm(w.z, w.w, 0x5410));
  if (lo != nullptr) {
    *reinterpret_cast<uint2*>(lo + o) =
        make_uint2(__byte_perm(w.x, w.y, 0x7632), __byte_perm(w.z, w.w, 0x7632));
  }
}

// The weights P of bh heads with C chunks as the wgmma mixing reads them: bf16 planes
// [1 or 2, bh * C, ldp] (ldp = C rounded up to 8) of their split words' hi halves, and their lo
// halves unless the outputs are bf16 (P then enters at bf16 precision, its hi half only:
// retrieval_mma.cuh); zero in the padding columns. Uninitialised here.
Tensor empty_planes(int64_t bh, int64_t C, at::ScalarType out_dtype, const at::TensorOptions& opts) {
  const bool hi_only = out_dtype == at::kBFloat16;
  return at::empty({hi_only ? 1 : 2, bh * C, (C + 7) / 8 * 8}, opts.dtype(at::kBFloat16));
}

// The planes' hi and lo halves (lo null for hi-only planes).
std::pair<__nv_bfloat16*, __nv_bfloat16*> plane_ptrs(const Tensor& planes) {
  auto* hi = reinterpret_cast<__nv_bfloat16*>(planes.data_ptr());
  return {hi, planes.size(0) == 2 ? hi + planes.stride(0) : nullptr};
}

// The weights P (split words [bh, C, Cp]) as empty_planes; undefined where the mixing runs on
// mma.sync, which reads the words.
Tensor weight_planes(const Tensor& P, at::ScalarType out_dtype) {
  if (!use_wgmma_mix()) return Tensor();
  Tensor planes = empty_planes(P.size(0), P.size(1), out_dtype, P.options());
  const int64_t rows = planes.size(1), ldp = planes.size(2);
  const auto [hi, lo] = plane_ptrs(planes);
  const int64_t quads = rows * (ldp / 4);
  if (quads > 0) {
    p_planes_kernel<<<static_cast<unsigned>((quads + 255) / 256), 256, 0,
                      at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint32_t*>(P.data_ptr<float>()), hi, lo, rows,
        static_cast<int>(P.size(2)), static_cast<int>(ldp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return planes;
}

// The retrieval weights straight into the wgmma mixing's planes (weight_planes(probs_padded(..),
// out_dtype), bit for bit), for the forward, which needs nothing else of them: where the
// meta-probs kernel applies it writes the planes, and the split words and the pass that regroups
// them are skipped. `overlappable` as in probs_padded.
Tensor probs_planes(const Tensor& meta_q, const Tensor& meta_k, double meta_scale,
                    at::ScalarType out_dtype, bool* overlappable) {
  *overlappable = false;
  const int64_t bh = meta_q.size(0) * meta_q.size(1), C = meta_q.size(2);
  if (!probs_kernel_applies(meta_q, meta_k)) {
    return weight_planes(probs_padded(meta_q, meta_k, meta_scale), out_dtype);
  }
  Tensor planes = empty_planes(bh, C, out_dtype, meta_q.options());
  if (bh * C == 0) return planes;
  mix::ProbsOut out;
  std::tie(out.hi, out.lo) = plane_ptrs(planes);
  out.ld = static_cast<int>(planes.size(2));
  launch_probs_kernel(meta_q, meta_k, meta_scale, out, overlappable);
  return planes;
}

// out = P F (mode 0) or P^T F (mode 1): P and F hold split-bf16 words, out is fp32; F and out
// are contiguous [b, h, C, ds, d] (X = ds * d). For bf16 outputs (out_dtype) P enters at bf16
// precision, its hi half only (retrieval_mma.cuh: a third fewer MMAs). planes (weight_planes(P,
// out_dtype)): the wgmma mixing (retrieval_wgmma.cuh), which reads nothing else of P (P may be
// undefined); undefined: mma.sync.
void mix_states(int mode, const Tensor& P, const Tensor& planes, const Tensor& F,
                const Tensor& out, at::ScalarType out_dtype) {
  const int64_t bh = F.size(0) * F.size(1), C = F.size(2);
  const int64_t X = F.numel() / std::max<int64_t>(bh * C, 1);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool p_hi_only = out_dtype == at::kBFloat16;
  using Mode0 = std::integral_constant<int, 0>;
  using Mode1 = std::integral_constant<int, 1>;
  auto dispatch_mode = [&](auto launch) {
    if (mode == 0 && p_hi_only) {
      launch(Mode0{}, std::false_type{});
    } else if (mode == 0) {
      launch(Mode0{}, std::true_type{});
    } else if (p_hi_only) {
      launch(Mode1{}, std::false_type{});
    } else {
      launch(Mode1{}, std::true_type{});
    }
  };
  if (planes.defined()) {
    TORCH_INTERNAL_ASSERT(planes.size(0) == (p_hi_only ? 1 : 2) && planes.size(1) == bh * C);
    mix::MixTParams mp;
    mp.W = F.data_ptr<float>();
    std::tie(mp.p_hi, mp.p_lo) = plane_ptrs(planes);
    mp.O = out.data_ptr<float>();
    mp.C = static_cast<int>(C), mp.X = static_cast<int>(X);
    mp.ldp = static_cast<int>(planes.size(2)), mp.bh = static_cast<int>(bh);
    mp.group_x = mix_group_x(mix::t_tiles(mp), mix::t_ctas_per_sm(/*a_lo=*/!p_hi_only));
    dispatch_mode([&](auto mode_tag, auto a_lo_tag) {
      mix::launch_mix_t_wgmma<decltype(mode_tag)::value, decltype(a_lo_tag)::value>(mp, stream);
    });
    return;
  }
  const int64_t Cp = P.size(2);
  mix::MixParams mp = mix_params(bh, C);
  mp.A = P.data_ptr<float>(), mp.a_bh = C * Cp, mp.lda = static_cast<int>(Cp);
  mp.a_rows = static_cast<int>(C), mp.a_cols = static_cast<int>(Cp);
  mp.B = F.data_ptr<float>(), mp.b_bh = C * X, mp.ldb = static_cast<int>(X);
  mp.b_rows = static_cast<int>(C), mp.b_cols = static_cast<int>(X);
  mp.O = out.data_ptr<float>(), mp.o_bh = C * X, mp.ldo = static_cast<int>(X);
  mp.N = static_cast<int>(X), mp.K = static_cast<int>(C);
  // 128 x 64 tiles, warps of 64 x 32: each fragment feeds more MMAs than with 64 x 64
  dispatch_mode([&](auto mode_tag, auto a_lo_tag) {
    mix::launch_mix<decltype(mode_tag)::value, 128, 64, 2, 2, decltype(a_lo_tag)::value>(mp,
                                                                                         stream);
  });
}

// The retrieved states R = P F (fp32) of the fused op with outputs of out_dtype: on tensor cores
// when the padded weights P or their planes are given (use_tc_mix; F then holds split-bf16
// words; P and planes as in mix_states), else through the cuBLAS retrieval from the meta tensors.
Tensor retrieve(const Tensor& F, const Tensor& P, const Tensor& planes, const Tensor& meta_q,
                const Tensor& meta_k, double meta_scale, at::ScalarType out_dtype) {
  if (!P.defined() && !planes.defined()) return block_retrieval_fwd(meta_q, meta_k, F, meta_scale);
  Tensor R = at::empty_like(F, at::MemoryFormat::Contiguous);
  mix_states(0, P, planes, F, R, out_dtype);
  return R;
}

// dP = dS F^T for j < c (0 elsewhere) as `splits` fp32 partial sums [splits, bh, C, Cp] from
// split-bf16 dS and F; returns the buffer and the split count. Split-K only when the j < c tiles
// alone cannot fill the GPU.
std::pair<Tensor, int> mix_scores(const Tensor& dS, const Tensor& F, int64_t C) {
  const int64_t bh = F.size(0) * F.size(1), Cp = pad4(C);
  const int64_t X = F.numel() / std::max<int64_t>(bh * C, 1);
  // wgmma: 128 x 128 tiles, 2 CTAs per SM; mma.sync: 64 x 64, 3 per SM. About 2 waves.
  const bool wgmma = use_wgmma_mix();
  const int64_t tile = wgmma ? mix::kSBM : 64;
  const int64_t tm = (C + tile - 1) / tile;
  const int64_t active = bh * tm * (tm + 1) / 2;  // tiles with some j < c
  const int64_t target =
      (wgmma ? 4 : 6) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t split_bytes = bh * C * Cp * int64_t{sizeof(float)};
  int64_t splits = std::min<int64_t>(std::max<int64_t>(X / 256, 1),
                                     std::max<int64_t>(1, (target + active - 1) / active));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, group_state_bytes(X) / 2 / split_bytes));
  static_assert(mix::kSKW == mix::kBK, "both kernels split x in multiples of their stage");
  int64_t k_split = (X + splits - 1) / splits;
  k_split = (k_split + mix::kBK - 1) / mix::kBK * mix::kBK;
  splits = (X + k_split - 1) / k_split;
  Tensor dP = at::empty({splits, bh, C, Cp}, F.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (wgmma) {
    mix::ScoresParams sp;
    sp.dS = dS.data_ptr<float>(), sp.F = F.data_ptr<float>(), sp.O = dP.data_ptr<float>();
    sp.C = static_cast<int>(C), sp.X = static_cast<int>(X), sp.ldo = static_cast<int>(Cp);
    sp.bh = static_cast<int>(bh), sp.splits = static_cast<int>(splits);
    sp.k_split = static_cast<int>(k_split);
    mix::launch_scores_wgmma(sp, stream);
    return {dP, static_cast<int>(splits)};
  }
  mix::MixParams mp = mix_params(bh, C);
  mp.A = dS.data_ptr<float>(), mp.a_bh = C * X, mp.lda = static_cast<int>(X);
  mp.a_rows = static_cast<int>(C), mp.a_cols = static_cast<int>(X);
  mp.B = F.data_ptr<float>(), mp.b_bh = C * X, mp.ldb = static_cast<int>(X);
  mp.b_rows = static_cast<int>(C), mp.b_cols = static_cast<int>(X);
  mp.O = dP.data_ptr<float>(), mp.o_bh = C * Cp, mp.o_split = bh * C * Cp;
  mp.ldo = static_cast<int>(Cp);
  mp.N = static_cast<int>(Cp), mp.K = static_cast<int>(X);
  mp.splits = static_cast<int>(splits), mp.k_split = static_cast<int>(k_split);
  mix::launch_mix<2, 64, 64, 2, 2>(mp, stream);
  return {dP, static_cast<int>(splits)};
}

// ------------------------------------------------------------------ chunk attention

struct AttnTensors {
  Tensor q, k, v, qs;
};

void check_attn(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qs,
                int64_t chunk, int64_t overlap) {
  check_dtype(q.scalar_type(), "q");
  check_token(q, "q", q);
  check_token(k, "k", q);
  check_token(v, "v", q);
  check_token(qs, "q_state", q);
  check_head_dim(q.size(3));
  check_state_dim(qs.size(3), q.size(3));
  check_chunk(chunk, overlap);
  check_sizes(q.size(0), q.size(1), q.size(2), chunk);
}

// S_from_previous: `retrieved` comes from the kernel launched last, S = P F on wgmma, which the
// Hopper forward may then overlap (AttnParams::waits_for_previous).
std::tuple<Tensor, Tensor> attn_fwd_impl(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                         const Tensor& qs_, const Tensor& retrieved,
                                         int64_t chunk, int64_t overlap, double scale,
                                         double state_scale, bool S_from_previous = false) {
  const int64_t b = q_.size(0), h = q_.size(1), n = q_.size(2), d = q_.size(3);
  const int64_t ds = qs_.size(3), C = (n + chunk - 1) / chunk;
  Tensor out = at::empty({b, h, n, d}, q_.options());
  Tensor lse = at::empty({b, h, n}, q_.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const bool simt = force_simt() || q_.scalar_type() == at::kFloat;
  Tensor q = prep_token(q_, !simt), k = prep_token(k_, !simt), v = prep_token(v_, !simt);
  Tensor qs = prep_token(qs_, !simt);
  Tensor S = retrieved.contiguous();
  if (reinterpret_cast<uintptr_t>(S.data_ptr()) % 16 != 0) S = S.clone();  // float4 loads
  AttnParams p;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.qs = qs.data_ptr();
  p.q_st = strides_of(q), p.k_st = strides_of(k), p.v_st = strides_of(v), p.qs_st = strides_of(qs);
  p.qs_is_q = qs.data_ptr() == q.data_ptr() && ds == d && qs.strides() == q.strides();
  p.S = S.data_ptr<float>();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.b = b, p.h = h, p.n = n, p.ds = ds, p.chunk = chunk, p.overlap = overlap, p.num_chunks = C;
  p.scale = static_cast<float>(scale), p.state_scale = static_cast<float>(state_scale);
  p.simt = simt;
  p.wgmma = !simt && (d == 64 || d == 128) && use_wgmma("BSBR_ATTN_WGMMA");  // attn_wgmma.cuh
  p.waits_for_previous = S_from_previous && p.wgmma && use_pdl();
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), d, [&](auto t, auto dim) {
    run_attn_fwd<decltype(t), decltype(dim)::value>(p, stream);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> chunk_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& q_state, const Tensor& retrieved,
                                               int64_t chunk_size, int64_t chunk_overlap,
                                               double scale, double state_scale) {
  check_attn(q, k, v, q_state, chunk_size, chunk_overlap);
  check_fp32(retrieved, "retrieved", q);
  c10::cuda::CUDAGuard guard(q.device());
  return attn_fwd_impl(q, k, v, q_state, retrieved, chunk_size, chunk_overlap, scale, state_scale);
}

// Token-sized gradients of the attention backward, preallocated by the caller: contiguous
// [b, h, n, d] (dqs: [b, h, n, ds]). With dqs_into_dq (q_state is q) dqs is not used: the
// preprocess writes q_state's gradient into dq and the dQ kernel adds to it.
struct TokenGrads {
  Tensor dq, dk, dv, dqs;
  bool dqs_into_dq = false;
};

// The attention backward in two steps, so that the fused op can compute the chunk-state
// gradients dF in between and hand them to dK/dV: preprocess() writes q_state's gradient and
// delta and returns dR, the gradient of the retrieved states; finish() runs dK/dV and dQ into g.
// The prepared views live here until both steps are issued.
class AttnBackward {
 public:
  AttnBackward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
               const Tensor& qs, const Tensor& retrieved, const Tensor& out, const Tensor& lse,
               int64_t chunk, int64_t overlap, double scale, double state_scale,
               const TokenGrads& g)
      : chunk_(chunk), state_scale_(state_scale), empty_(g.dq.numel() == 0) {
    const int64_t b = q.size(0), h = q.size(1), n = q.size(2);
    if (empty_) {
      dR_shape_ = {b, h, (n + chunk - 1) / chunk, qs.size(3), q.size(3)};
      opts_ = q.options().dtype(at::kFloat);
      return;
    }
    const bool simt = force_simt() || q.scalar_type() == at::kFloat;
    q_ = prep_token(q, !simt), k_ = prep_token(k, !simt), v_ = prep_token(v, !simt);
    dout_ = prep_token(dout, !simt), qs_ = prep_token(qs, !simt), out_ = prep_token(out, !simt);
    S_ = retrieved.contiguous();
    if (reinterpret_cast<uintptr_t>(S_.data_ptr()) % 16 != 0) S_ = S_.clone();  // float4 loads
    lse_ = lse.contiguous();
    delta_ = at::empty({b, h, n}, q.options().dtype(at::kFloat));
    p_.q = q_.data_ptr(), p_.k = k_.data_ptr(), p_.v = v_.data_ptr(), p_.qs = qs_.data_ptr();
    p_.dout = dout_.data_ptr(), p_.out = out_.data_ptr();
    p_.q_st = strides_of(q_), p_.k_st = strides_of(k_), p_.v_st = strides_of(v_);
    p_.qs_st = strides_of(qs_), p_.dout_st = strides_of(dout_), p_.out_st = strides_of(out_);
    p_.S = S_.data_ptr<float>();
    p_.lse = lse_.data_ptr<float>();
    p_.delta = delta_.data_ptr<float>();
    p_.dq = g.dq.data_ptr(), p_.dk = g.dk.data_ptr(), p_.dv = g.dv.data_ptr();
    p_.dqs = g.dqs_into_dq ? g.dq.data_ptr() : g.dqs.data_ptr();
    p_.dq_accumulate = g.dqs_into_dq;
    p_.b = b, p_.h = h, p_.n = n, p_.ds = qs.size(3), p_.chunk = chunk, p_.overlap = overlap;
    p_.num_chunks = (n + chunk - 1) / chunk;
    p_.scale = static_cast<float>(scale), p_.state_scale = static_cast<float>(state_scale);
    p_.simt = simt;
    p_.wgmma = !simt && (q.size(3) == 64 || q.size(3) == 128) && use_wgmma("BSBR_ATTN_WGMMA");
    p_.dqkv = p_.wgmma && use_dqkv(q.size(3));
    st_ = q.scalar_type();
    d_ = q.size(3);
  }

  // Whether finish() can take the chunk-state gradients (tensor-core dK/dV; k_state must be k).
  bool fuses_states() const { return !empty_ && !p_.simt; }

  // dS_c = state_scale * sum_{t in c} qs[t]^T dO[t]: the chunk-states product of (qs, dO). With
  // dR_into_S it overwrites the retrieved states once the preprocess (their only reader) has
  // read them: one fp32 state buffer less at the backward's peak; the tensor-core preprocess
  // then computes it itself where its CTAs hold whole chunks (run_attn_bwd_prep), else the
  // chunk-states kernel runs after it. dR_split writes split-bf16 words (the tensor-core
  // mixing's operand format). S_from_previous (with dR_into_S): the kernel launched last is
  // S = P F on wgmma, which the tensor-core preprocess may then overlap
  // (AttnParams::waits_for_previous).
  Tensor preprocess(bool dR_into_S = false, bool dR_split = false, bool S_from_previous = false) {
    if (empty_) return at::zeros(dR_shape_, opts_);
    Tensor dR;
    if (dR_into_S) {
      p_.states = S_.data_ptr<float>();
      p_.out_scale = static_cast<float>(state_scale_);
      p_.states_split = dR_split;
    } else {
      dR = states_impl(qs_, dout_, chunk_, state_scale_, Tensor(), dR_split);
    }
    auto stream = at::cuda::getCurrentCUDAStream();
    bool wrote_dR = false;
    p_.waits_for_previous = S_from_previous && dR_into_S && !p_.simt && use_pdl();
    dispatch(st_, d_, [&](auto t, auto dim) {
      wrote_dR = run_attn_bwd_prep<decltype(t), decltype(dim)::value>(p_, stream);
    });
    p_.waits_for_previous = false;
    if (dR_into_S) dR = wrote_dR ? S_ : states_impl(qs_, dout_, chunk_, state_scale_, S_, dR_split);
    p_.S = nullptr;  // dead from here (and overwritten with dR_into_S)
    p_.states = nullptr;
    return dR;
  }

  // Where dQ is a Hopper kernel of its own, launch it now, overlapping the kernel just launched,
  // which must neither write what dQ reads nor read dq (dP = dS F^T); finish() then skips it.
  void dq_overlapping_previous() {
    if (empty_ || !use_pdl()) return;
    p_.bwd_part = 1;
    p_.overlap_previous = true;
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(st_, d_, [&](auto t, auto dim) {
      run_attn_bwd<decltype(t), decltype(dim)::value>(p_, stream);
    });
    p_.bwd_part = 2;
    p_.overlap_previous = false;
  }

  // dK/dV and dQ. dF (only where fuses_states(), k_state = k): fp32 contiguous [b, h, C, d, d]
  // chunk-state gradients that dK/dV add as v dF^T to dk and k dF to dv. overlap_previous: the
  // kernel just launched neither writes what these read nor reads what they write, so the first
  // Hopper kernel may overlap it. dF_from_previous: the kernel just launched is the softmax
  // backward that overlaps dF's kernel, so the Hopper dK/dV may overlap it, waiting before it
  // reads dF (AttnParams::waits_for_previous).
  void finish(const Tensor& dF = Tensor(), bool overlap_previous = false,
              bool dF_from_previous = false) {
    if (empty_) return;
    TORCH_INTERNAL_ASSERT(!dF.defined() || (fuses_states() && dF.is_contiguous()));
    TORCH_INTERNAL_ASSERT(!(overlap_previous && dF_from_previous));
    p_.dF = dF.defined() ? dF.data_ptr<float>() : nullptr;
    p_.overlap_previous = overlap_previous && use_pdl();
    p_.waits_for_previous = dF_from_previous && dF.defined() && p_.wgmma && use_pdl();
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(st_, d_, [&](auto t, auto dim) {
      run_attn_bwd<decltype(t), decltype(dim)::value>(p_, stream);
    });
    p_.overlap_previous = false;
    p_.waits_for_previous = false;
  }

  // Everything the kernels read that this object keeps allocated (prepared views, lse, delta).
  std::vector<Tensor> operands() const { return {q_, k_, v_, dout_, qs_, out_, lse_, delta_}; }

 private:
  int64_t chunk_;
  double state_scale_;
  bool empty_;
  std::vector<int64_t> dR_shape_;
  at::TensorOptions opts_;
  Tensor q_, k_, v_, dout_, qs_, out_, S_, lse_, delta_;
  AttnParams p_;
  at::ScalarType st_ = at::kFloat;
  int64_t d_ = 0;
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> chunk_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& q_state, const Tensor& retrieved, const Tensor& out, const Tensor& lse,
    int64_t chunk_size, int64_t chunk_overlap, double scale, double state_scale) {
  check_attn(q, k, v, q_state, chunk_size, chunk_overlap);
  check_token(grad_out, "grad_out", q);
  check_token(out, "out", q);
  check_fp32(retrieved, "retrieved", q);
  check_fp32(lse, "lse", q);
  c10::cuda::CUDAGuard guard(q.device());
  TokenGrads g{at::empty(q.sizes(), q.options()), at::empty(q.sizes(), q.options()),
               at::empty(q.sizes(), q.options()), at::empty(q_state.sizes(), q.options())};
  AttnBackward bwd(grad_out, q, k, v, q_state, retrieved, out, lse, chunk_size, chunk_overlap,
                   scale, state_scale, g);
  Tensor dR = bwd.preprocess();
  bwd.finish();
  return {g.dq, g.dk, g.dv, g.dqs, dR};
}

// ------------------------------------------------------------------ fused op

std::tuple<Tensor, Tensor> bsbr_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const Tensor& meta_q, const Tensor& meta_k,
                                              const std::optional<Tensor>& q_state_,
                                              const std::optional<Tensor>& k_state_,
                                              int64_t chunk_size, int64_t chunk_overlap,
                                              double scale, double meta_scale,
                                              double state_scale) {
  const Tensor& q_state = q_state_.has_value() ? *q_state_ : q;
  const Tensor& k_state = k_state_.has_value() ? *k_state_ : k;
  check_attn(q, k, v, q_state, chunk_size, chunk_overlap);
  check_token(k_state, "k_state", q);
  TORCH_CHECK_VALUE(k_state.size(3) == q_state.size(3), message("bsbr CUDA kernels: k_state and q_state "
                    "must have the same state dim, got ", k_state.size(3), " and ", q_state.size(3)));
  c10::cuda::CUDAGuard guard(q.device());
  check_on(meta_q, "meta_q", q.device());
  check_on(meta_k, "meta_k", q.device());
  Tensor R;
  bool R_from_wgmma = false;
  {  // the chunk states die before the attention allocates its output (lower peak)
    const bool tc = use_tc_mix(q, meta_q);
    // The weights first: the chunk states, which do not read them, overlap their kernel. The
    // wgmma mixing needs only their planes; mma.sync reads the split words.
    const bool wgmma = tc && use_wgmma_mix();
    bool overlappable = false;
    const Tensor P =
        tc && !wgmma ? probs_padded(meta_q, meta_k, meta_scale, &overlappable) : Tensor();
    const Tensor planes =
        wgmma ? probs_planes(meta_q, meta_k, meta_scale, q.scalar_type(), &overlappable)
              : Tensor();
    Tensor states = states_impl(k_state, v, chunk_size, 1.0, Tensor(), /*split=*/tc,
                                /*overlap_previous=*/overlappable);
    R = retrieve(states, P, planes, meta_q, meta_k, meta_scale, q.scalar_type());
    R_from_wgmma = planes.defined();
  }
  return attn_fwd_impl(q, k, v, q_state, R, chunk_size, chunk_overlap, scale, state_scale,
                       /*S_from_previous=*/R_from_wgmma);
}

// Heads [h0, h0 + nh) of batch elements [b0, b0 + nb): whole batch elements while they fit,
// else head ranges of one element, so that narrowing a contiguous [b, h, ...] tensor to a group
// stays contiguous (the kernels' outputs must be).
struct HeadGroup {
  int64_t b0, nb, h0, nh;
};

std::vector<HeadGroup> head_groups(int64_t b, int64_t h, int64_t C, int64_t state_size) {
  const int64_t per_head = std::max<int64_t>(1, C * state_size * int64_t{sizeof(float)});
  const int64_t per = std::max<int64_t>(1, group_state_bytes(state_size) / per_head);
  // As many groups as the budget needs, of sizes that differ by at most one: a last group of
  // a few heads would leave its kernels a fraction of the GPU.
  std::vector<HeadGroup> groups;
  auto split = [](int64_t total, int64_t most, auto&& add) {
    const int64_t count = (total + most - 1) / most;
    for (int64_t i = 0; i < count; ++i) add(i * total / count, (i + 1) * total / count);
  };
  if (per >= h) {
    split(b, per / h, [&](int64_t b0, int64_t b1) { groups.push_back({b0, b1 - b0, 0, h}); });
  } else {
    for (int64_t b0 = 0; b0 < b; ++b0) {
      split(h, per, [&](int64_t h0, int64_t h1) { groups.push_back({b0, 1, h0, h1 - h0}); });
    }
  }
  return groups;
}

// What the kernel launched before a head group of the fused backward leaves for the group's
// chunk states: whether they may overlap it (the two read nothing the other writes), and the
// tensors it reads, kept allocated until the overlapping launch is issued: freed earlier, the
// caching allocator could hand their memory to the states while that kernel still reads them.
// Before the first group that kernel is probs_padded's (its `overlappable`; it reads the
// caller's meta tensors); before a later one, the group before's dK/dV (or dQ/dK/dV), where
// k_state is k (the Hopper kernels call pdl_launch_dependents, the others never let the next
// kernel start early).
struct GroupTail {
  bool overlappable = false;
  std::vector<Tensor> operands;
};

// One group of the fused backward: its inputs and outputs are views of the full tensors. P is
// the group's rows of the retrieval weights for the tensor-core path (overwritten here by
// da = d(logits), from which the caller takes dmq and dmk for all groups at once), undefined for
// the cuBLAS path (which writes dmq and dmk). dks is written unless fold_k (k_state is k: its
// gradient is added into dk). tail: on entry what the kernel launched last left (GroupTail),
// released once this group's first kernel is launched; on return this group's.
// before_dkv (tensor-core path, may be empty) runs once the group's da is final, before dK/dV,
// and returns whether dK/dV may overlap the kernel it launched last (AttnBackward::finish).
void fused_bwd_group(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& meta_q, const Tensor& meta_k, const Tensor& q_state,
                     const Tensor& k_state, const Tensor& out, const Tensor& lse, const Tensor& P,
                     int64_t chunk_size, int64_t chunk_overlap, double scale, double meta_scale,
                     double state_scale, const TokenGrads& g, const Tensor& dmq, const Tensor& dmk,
                     const Tensor& dks, bool fold_k, GroupTail& tail,
                     const std::function<bool()>& before_dkv) {
  // Recompute the chunk states and the retrieval (cheap next to the attention). Two fp32 state
  // buffers in all: F (later overwritten by dF) and R (later by dR).
  // On the tensor-core path F and dR are split-bf16 words (the mixing's operand format).
  Tensor F = states_impl(k_state, v, chunk_size, 1.0, Tensor(), /*split=*/P.defined(),
                         /*overlap_previous=*/tail.overlappable);
  tail = GroupTail();
  // The weights' planes serve both of the group's wgmma products (S = P F, dF = P^T dS).
  Tensor planes = P.defined() ? weight_planes(P, q.scalar_type()) : Tensor();
  Tensor R = retrieve(F, P, planes, meta_q, meta_k, meta_scale, q.scalar_type());
  AttnBackward bwd(grad_out, q, k, v, q_state, R, out, lse, chunk_size, chunk_overlap, scale,
                   state_scale, g);
  Tensor dR = bwd.preprocess(/*dR_into_S=*/true, /*dR_split=*/P.defined(),
                              /*S_from_previous=*/planes.defined());
  R = Tensor();
  bool overlap_dkv = false;
  bool dkv_after_softmax = false;  // the softmax backward is the kernel before dK/dV
  if (P.defined()) {
    const int64_t C = P.size(1);
    auto [dP, splits] = mix_scores(dR, F, C);  // dP = dS F^T (j < c)
    bwd.dq_overlapping_previous();
    // dF = P^T dS, into F's buffer (dead after dP)
    mix_states(1, P, planes, dR, F, q.scalar_type());
    // da = meta_scale * P * (dP - rowsum(P * dP)) into P (its last use), overlapping dF on
    // Hopper: dF reads the planes and dR, and writes F, none of which this touches.
    const int64_t Cp = dP.size(3), rows = P.size(0) * C;
    const bool overlap = use_pdl();
    launch_kernel(masked_softmax_bwd_kernel<true, 4>, static_cast<unsigned>((rows + 7) / 8), 256, 0,
                  at::cuda::getCurrentCUDAStream(), overlap, P.data_ptr<float>(),
                  dP.data_ptr<float>(), P.data_ptr<float>(), rows, static_cast<int>(C),
                  static_cast<int>(Cp), splits, rows * Cp, static_cast<float>(meta_scale), overlap);
    planes = Tensor();  // freed only now: nothing is freed between two overlapping launches
    dR = Tensor();
    if (before_dkv) overlap_dkv = before_dkv();
    dkv_after_softmax = !before_dkv;
  } else {
    auto [gmq, gmk, dF] = block_retrieval_bwd(dR, meta_q, meta_k, F, meta_scale);
    dmq.copy_(gmq);
    dmk.copy_(gmk);
    F = dF;
  }
  // The chunk-states backward: dv += k_state dF (fp32 sum, one rounding); dks = v dF^T, or
  // dk += v dF^T. With k_state = k the tensor-core dK/dV does it from the k and v it holds.
  if (fold_k && bwd.fuses_states()) {
    bwd.finish(F, overlap_dkv, /*dF_from_previous=*/dkv_after_softmax);
    tail.overlappable = true;
    tail.operands = bwd.operands();
    tail.operands.push_back(F);
  } else {
    bwd.finish(Tensor(), overlap_dkv);
    states_bwd_into(F, k_state, v, chunk_size, fold_k ? g.dk : dks, fold_k, g.dv, true);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bsbr_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& meta_q, const Tensor& meta_k, const std::optional<Tensor>& q_state_,
    const std::optional<Tensor>& k_state_, const Tensor& out, const Tensor& lse, int64_t chunk_size,
    int64_t chunk_overlap, double scale, double meta_scale, double state_scale) {
  // An omitted state is q / k, and its gradient is written into dq / dk (no extra buffer).
  const bool fold_q = !q_state_.has_value(), fold_k = !k_state_.has_value();
  const Tensor& q_state = fold_q ? q : *q_state_;
  const Tensor& k_state = fold_k ? k : *k_state_;
  check_attn(q, k, v, q_state, chunk_size, chunk_overlap);
  check_token(k_state, "k_state", q);
  check_token(grad_out, "grad_out", q);
  check_token(out, "out", q);
  check_fp32(lse, "lse", q);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3), ds = q_state.size(3);
  const int64_t C = (n + chunk_size - 1) / chunk_size;
  const auto opts = q.options();
  Tensor dq = at::empty({b, h, n, d}, opts), dk = at::empty({b, h, n, d}, opts);
  Tensor dv = at::empty({b, h, n, d}, opts);
  Tensor dqs = fold_q ? at::empty({0}, opts) : at::empty({b, h, n, ds}, opts);
  Tensor dks = fold_k ? at::empty({0}, opts) : at::empty({b, h, n, ds}, opts);
  Tensor dmq = at::empty(meta_q.sizes(), meta_q.options());
  Tensor dmk = at::empty(meta_k.sizes(), meta_k.options());
  // The retrieval weights, once for all groups (C x C per head: small next to the states);
  // the groups turn them into the logits' gradient.
  const bool tc = use_tc_mix(q, meta_q);
  bool overlappable = false;
  const Tensor P = tc ? probs_padded(meta_q, meta_k, meta_scale, &overlappable) : Tensor();
  // P, once every group has turned it into da (times meta_scale): dmq = da mk, dmk = da^T mq.
  // The last group launches it before its dK/dV, which then overlaps it.
  auto meta_grads = [&]() {
    const Tensor mq = meta_q.contiguous(), mk = meta_k.contiguous();
    TORCH_INTERNAL_ASSERT(mk.scalar_type() == mq.scalar_type());
    dispatch_meta(mq.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      mix::launch_meta_grads<T>(P.data_ptr<float>(), static_cast<int>(P.size(2)),
                                reinterpret_cast<const T*>(mq.data_ptr()),
                                reinterpret_cast<const T*>(mk.data_ptr()),
                                reinterpret_cast<T*>(dmq.data_ptr()),
                                reinterpret_cast<T*>(dmk.data_ptr()), b * h, static_cast<int>(C),
                                static_cast<int>(mq.size(3)), at::cuda::getCurrentCUDAStream());
    });
    return true;
  };
  const std::vector<HeadGroup> groups = head_groups(b, h, C, ds * d);
  GroupTail tail{overlappable, {}};  // the first group's states may overlap P's kernel
  for (const HeadGroup& hg : groups) {
    const bool whole = hg.nb == b && hg.nh == h;  // one group: no views to make (host time)
    auto part = [&](const Tensor& t) {
      return whole ? t : t.narrow(0, hg.b0, hg.nb).narrow(1, hg.h0, hg.nh);
    };
    const TokenGrads g{part(dq), part(dk), part(dv), fold_q ? dqs : part(dqs), fold_q};
    const Tensor Pg = tc && !whole ? P.narrow(0, hg.b0 * h + hg.h0, hg.nb * hg.nh) : P;
    fused_bwd_group(part(grad_out), part(q), part(k), part(v), part(meta_q), part(meta_k),
                    part(q_state), part(k_state), part(out), part(lse), Pg, chunk_size,
                    chunk_overlap, scale, meta_scale, state_scale, g, part(dmq), part(dmk),
                    fold_k ? dks : part(dks), fold_k, tail,
                    tc && &hg == &groups.back() ? std::function<bool()>(meta_grads) : nullptr);
  }
  return {dq, dk, dv, dmq, dmk, dqs, dks};
}

}  // namespace
}  // namespace bsbr_cuda

TORCH_LIBRARY_IMPL(bsbr, CUDA, m) {
  m.impl("_chunk_states_fwd", &bsbr_cuda::chunk_states_fwd);
  m.impl("_chunk_states_bwd", &bsbr_cuda::chunk_states_bwd);
  m.impl("_block_retrieval_fwd", &bsbr_cuda::block_retrieval_fwd);
  m.impl("_block_retrieval_bwd", &bsbr_cuda::block_retrieval_bwd);
  m.impl("_chunk_attention_fwd", &bsbr_cuda::chunk_attention_fwd);
  m.impl("_chunk_attention_bwd", &bsbr_cuda::chunk_attention_bwd);
  m.impl("_bsbr_attention_fwd", &bsbr_cuda::bsbr_attention_fwd);
  m.impl("_bsbr_attention_bwd", &bsbr_cuda::bsbr_attention_bwd);
}
