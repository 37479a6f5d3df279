"""The ops on CPU (SPEC §4): chain of trust dense -> chunked reference -> CPU kernels, forward and
every gradient, at odd sizes; causality; opcheck; gradcheck; bad inputs; tracing surfaces."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import bsbr_ext
from bsbr_ext import functional as fn
from bsbr_ext import reference as ref

NAMES = ("q", "k", "v", "meta_q", "meta_k", "q_state", "k_state")

# (b, h, n, d, ds, dm, chunk_size, overlap): n not a multiple of B, n < B, n == B, B == 1, odd d,
# ds < d, overlap 0 / partial / == B.
CASES = [
    (2, 3, 37, 5, 5, 6, 8, 0),
    (2, 2, 37, 5, 3, 4, 8, 3),
    (1, 2, 5, 4, 4, 4, 8, 2),
    (2, 1, 16, 7, 7, 3, 16, 16),
    (1, 1, 33, 3, 3, 2, 1, 1),
    (1, 2, 150, 64, 32, 16, 48, 20),
    (2, 2, 300, 32, 8, 8, 64, 64),
]
CASE_IDS = [f"b{b}h{h}n{n}d{d}ds{ds}B{c}w{w}" for b, h, n, d, ds, dm, c, w in CASES]


def make_inputs(b, h, n, d, ds, dm, chunk, dtype=torch.float64, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    c = math.ceil(n / chunk)
    shapes = [(b, h, n, d)] * 3 + [(b, h, c, dm)] * 2 + [(b, h, n, ds)] * 2
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for s in shapes]


def outputs_and_grads(f, xs, seed=1):
    out = f(*xs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, xs, grad_out.to(out.dtype), allow_unused=True)
    return out, grads


def attention(impl, chunk, overlap, **kw):
    def f(q, k, v, mq, mk, qs, ks):
        return impl(q, k, v, mq, mk, chunk, overlap, q_state=qs, k_state=ks, **kw)
    return f


def rel_err(x, truth):
    return ((x.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-30)).item()


# ---- chain of trust -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunked_reference_matches_dense(case):
    b, h, n, d, ds, dm, chunk, w = case
    xs = make_inputs(b, h, n, d, ds, dm, chunk)
    out_d, g_d = outputs_and_grads(attention(ref.bsbr_attention_dense, chunk, w), xs)
    out_c, g_c = outputs_and_grads(attention(ref.bsbr_attention, chunk, w), xs)
    torch.testing.assert_close(out_c, out_d, rtol=1e-10, atol=1e-10)
    for name, a, e in zip(NAMES, g_c, g_d):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_matches_reference_fp64(case):
    b, h, n, d, ds, dm, chunk, w = case
    xs = make_inputs(b, h, n, d, ds, dm, chunk)
    kw = dict(scale=0.3, meta_scale=0.7, state_scale=0.05)
    out_r, g_r = outputs_and_grads(attention(ref.bsbr_attention, chunk, w, **kw), xs)
    out_k, g_k = outputs_and_grads(attention(fn.bsbr_attention, chunk, w, **kw), xs)
    torch.testing.assert_close(out_k, out_r, rtol=1e-10, atol=1e-10)
    for name, a, e in zip(NAMES, g_k, g_r):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[4:], ids=CASE_IDS[4:])
def test_kernel_low_precision_error_budget(case, dtype):
    """Error vs the fp64 truth at most 2x (plus a floor) that of the reference in the same dtype."""
    b, h, n, d, ds, dm, chunk, w = case
    xs64 = make_inputs(b, h, n, d, ds, dm, chunk)
    xs = [x.detach().to(dtype).requires_grad_() for x in xs64]
    xs_truth = [x.detach().double().requires_grad_() for x in xs]  # the inputs the kernel saw
    out_t, g_t = outputs_and_grads(attention(ref.bsbr_attention_dense, chunk, w), xs_truth)
    out_r, g_r = outputs_and_grads(attention(ref.bsbr_attention, chunk, w), xs)
    out_k, g_k = outputs_and_grads(attention(fn.bsbr_attention, chunk, w), xs)
    assert out_k.dtype == dtype
    floor = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 2e-4}[dtype]
    for name, k_, r_, t_ in zip(("out",) + NAMES, (out_k,) + g_k, (out_r,) + g_r, (out_t,) + g_t):
        ek, er = rel_err(k_, t_), rel_err(r_, t_)
        assert ek <= 2 * er + floor, f"{name}: kernel {ek:.2e} vs reference {er:.2e}"


def test_default_state_tensors_are_q_and_k():
    xs = make_inputs(2, 2, 45, 8, 8, 4, 16)
    q, k, v, mq, mk, _, _ = xs
    out, grads = outputs_and_grads(lambda *a: fn.bsbr_attention(*a, 16, 4), [q, k, v, mq, mk])
    out_r, grads_r = outputs_and_grads(lambda *a: ref.bsbr_attention_dense(*a, 16, 4), [q, k, v, mq, mk])
    torch.testing.assert_close(out, out_r)
    for a, e in zip(grads, grads_r):
        torch.testing.assert_close(a, e)


# ---- the three stages -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_stages_match_reference(case):
    b, h, n, d, ds, dm, chunk, w = case
    q, k, v, mq, mk, qs, ks = make_inputs(b, h, n, d, ds, dm, chunk)
    stage_inputs = {
        "chunk_states": ((ks, v), lambda m, a, b_: m.chunk_states(a, b_, chunk)),
        "block_retrieval": ((mq, mk, ref.chunk_states(ks, v, chunk).detach().requires_grad_()),
                            lambda m, a, b_, c: m.block_retrieval(a, b_, c, 0.6)),
        "chunk_attention": ((q, k, v, qs, torch.randn(b, h, math.ceil(n / chunk), ds, d,
                                                      dtype=torch.float64, requires_grad=True)),
                            lambda m, *a: m.chunk_attention(*a, chunk, w, 0.4, 0.1)),
    }
    for name, (inputs, call) in stage_inputs.items():
        out_r, g_r = outputs_and_grads(lambda *a: call(ref, *a), list(inputs))
        out_k, g_k = outputs_and_grads(lambda *a: call(fn, *a), list(inputs))
        torch.testing.assert_close(out_k, out_r, rtol=1e-10, atol=1e-10, msg=name)
        for i, (a, e) in enumerate(zip(g_k, g_r)):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"{name} grad {i}")


def test_first_chunk_and_short_sequence_are_plain_causal_attention():
    q, k, v, mq, mk, _, _ = make_inputs(2, 3, 40, 16, 16, 8, 64, requires_grad=False)
    out = fn.bsbr_attention(q, k, v, mq, mk, 64, 0)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, plain)
    q, k, v, mq, mk, _, _ = make_inputs(1, 2, 100, 16, 16, 8, 32, requires_grad=False)
    out = fn.bsbr_attention(q, k, v, mq, mk, 32, 32)
    plain = torch.nn.functional.scaled_dot_product_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32],
                                                             is_causal=True)
    torch.testing.assert_close(out[:, :, :32], plain)


def test_retrieval_of_first_chunk_is_zero_and_finite():
    _, _, v, mq, mk, _, ks = make_inputs(1, 2, 64, 8, 8, 4, 16, requires_grad=False)
    mq[..., 0, :] = float("inf")  # meta_q[0] is never used
    retrieved = fn.block_retrieval(mq, mk, fn.chunk_states(ks, v, 16))
    assert torch.isfinite(retrieved).all()
    assert (retrieved[:, :, 0] == 0).all()


# ---- causality, determinism ---------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [0, 5, 16])
def test_causality_bitwise(overlap):
    b, h, n, d, chunk = 2, 2, 70, 16, 16
    xs = make_inputs(b, h, n, d, d, 8, chunk, dtype=torch.float32, requires_grad=False)
    base = fn.bsbr_attention(*xs[:5], chunk, overlap, q_state=xs[5], k_state=xs[6])
    for t in (0, 15, 16, 33, 69):
        moved = [x.clone() for x in xs]
        for i in (0, 1, 2, 5, 6):  # every per-token input at position t
            moved[i][:, :, t] += 10.0
        out = fn.bsbr_attention(*moved[:5], chunk, overlap, q_state=moved[5], k_state=moved[6])
        assert torch.equal(out[:, :, :t], base[:, :, :t]), f"outputs before {t} changed"
        assert not torch.equal(out[:, :, t], base[:, :, t])


def test_backward_is_deterministic():
    xs = make_inputs(2, 2, 200, 32, 16, 8, 32, dtype=torch.float32)
    _, g1 = outputs_and_grads(attention(fn.bsbr_attention, 32, 7), xs)
    _, g2 = outputs_and_grads(attention(fn.bsbr_attention, 32, 7), xs)
    for a, b_ in zip(g1, g2):
        assert torch.equal(a, b_)


def test_strided_views():
    b, h, n, d, chunk = 2, 3, 50, 8, 16
    x = torch.randn(b, n, 3, h, d, dtype=torch.float64)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    mq, mk = torch.randn(2, b, h, 4, 8, dtype=torch.float64).unbind(0)
    out = fn.bsbr_attention(q, k, v, mq, mk, chunk, 3)
    torch.testing.assert_close(out, ref.bsbr_attention(q.contiguous(), k.contiguous(), v.contiguous(), mq, mk,
                                                       chunk, 3))


def test_empty_batch_and_inference_mode():
    xs = make_inputs(0, 2, 20, 8, 8, 4, 8, requires_grad=False)
    assert fn.bsbr_attention(*xs[:5], 8).shape == (0, 2, 20, 8)
    xs = make_inputs(1, 2, 20, 8, 8, 4, 8, requires_grad=False)
    with torch.inference_mode():
        out = fn.bsbr_attention(*xs[:5], 8, 2)
    torch.testing.assert_close(out, ref.bsbr_attention(*xs[:5], 8, 2))


# ---- operator checks ---------------------------------------------------------------------------


def _op_samples():
    q, k, v, mq, mk, qs, ks = make_inputs(2, 2, 37, 8, 4, 6, 16, dtype=torch.float64)
    states = ref.chunk_states(ks, v, 16).detach().requires_grad_()
    retrieved = ref.block_retrieval(mq, mk, states).detach().requires_grad_()
    scales = (0.3, 0.5, 0.05)
    with torch.no_grad():
        out, lse = torch.ops.bsbr._chunk_attention_fwd(q, k, v, qs, retrieved, 16, 5, 0.3, 0.05)
    g = torch.randn_like(out)
    return [
        (torch.ops.bsbr.bsbr_attention.default, (q, k, v, mq, mk, qs, ks),
         dict(chunk_size=16, chunk_overlap=5)),
        (torch.ops.bsbr.bsbr_attention.default, (q, k, v, mq, mk, None, None), dict(chunk_size=16)),
        (torch.ops.bsbr.chunk_states.default, (ks, v, 16), {}),
        (torch.ops.bsbr.block_retrieval.default, (mq, mk, states, None), {}),
        (torch.ops.bsbr.chunk_attention.default, (q, k, v, qs, retrieved), dict(chunk_size=16, chunk_overlap=5)),
        (torch.ops.bsbr._bsbr_attention_fwd.default, (q, k, v, mq, mk, qs, ks, 16, 5, *scales), {}),
        (torch.ops.bsbr._bsbr_attention_bwd.default, (g, q, k, v, mq, mk, qs, ks, out, lse, 16, 5, *scales), {}),
        (torch.ops.bsbr._bsbr_attention_fwd.default, (q, k, v, mq, mk, None, None, 16, 5, *scales), {}),
        (torch.ops.bsbr._bsbr_attention_bwd.default,
         (g, q, k, v, mq, mk, None, None, out, lse, 16, 5, *scales), {}),
        (torch.ops.bsbr._chunk_states_fwd.default, (ks, v, 16), {}),
        (torch.ops.bsbr._chunk_states_bwd.default, (torch.randn_like(states), ks, v, 16), {}),
        (torch.ops.bsbr._block_retrieval_fwd.default, (mq, mk, states, 0.5), {}),
        (torch.ops.bsbr._block_retrieval_bwd.default, (torch.randn_like(states), mq, mk, states, 0.5), {}),
        (torch.ops.bsbr._chunk_attention_fwd.default, (q, k, v, qs, retrieved, 16, 5, 0.3, 0.05), {}),
        (torch.ops.bsbr._chunk_attention_bwd.default, (g, q, k, v, qs, retrieved, out, lse, 16, 5, 0.3, 0.05), {}),
    ]


def test_fused_backward_folds_omitted_states():
    """q_state / k_state None: the internal fused ops use q / k, and the backward adds the state
    path's gradients into grad_q / grad_k (what autograd sums for q_state=q, k_state=k) and
    returns grad_q_state / grad_k_state empty."""
    q, k, v, mq, mk, _, _ = make_inputs(2, 3, 45, 8, 8, 6, 16, requires_grad=False)
    args = (16, 5, 0.3, 0.5, 0.05)
    out, lse = torch.ops.bsbr._bsbr_attention_fwd(q, k, v, mq, mk, None, None, *args)
    out_given, _ = torch.ops.bsbr._bsbr_attention_fwd(q, k, v, mq, mk, q, k, *args)
    torch.testing.assert_close(out, out_given, rtol=0, atol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    folded = torch.ops.bsbr._bsbr_attention_bwd(g, q, k, v, mq, mk, None, None, out, lse, *args)
    given = torch.ops.bsbr._bsbr_attention_bwd(g, q, k, v, mq, mk, q, k, out, lse, *args)
    torch.testing.assert_close(folded[0], given[0] + given[5])
    torch.testing.assert_close(folded[1], given[1] + given[6])
    for a, b in zip(folded[2:5], given[2:5]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert folded[5].shape == (0,) and folded[6].shape == (0,)


@pytest.mark.parametrize("index", range(15))
def test_opcheck(index):
    op, args, kwargs = _op_samples()[index]
    if op.name().startswith("bsbr::_"):  # internal ops are not differentiable themselves
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args, kwargs)


def test_double_backward_raises():
    xs = make_inputs(1, 1, 20, 4, 4, 4, 8)
    out = fn.bsbr_attention(*xs[:5], 8)
    (gq,) = torch.autograd.grad(out.sum(), xs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        gq.sum().backward()


def test_gradcheck_fp64():
    q, k, v, mq, mk, qs, ks = make_inputs(1, 2, 11, 3, 2, 2, 4)
    assert torch.autograd.gradcheck(
        lambda *a: fn.bsbr_attention(*a[:5], 4, 2, q_state=a[5], k_state=a[6]), (q, k, v, mq, mk, qs, ks))
    assert torch.autograd.gradcheck(lambda a, b_: fn.chunk_states(a, b_, 4), (ks, v))
    states = ref.chunk_states(ks, v, 4).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b_, c: fn.block_retrieval(a, b_, c), (mq, mk, states))
    retrieved = ref.block_retrieval(mq, mk, states).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fn.chunk_attention(*a, 4, 3), (q, k, v, qs, retrieved))


# ---- bad inputs ---------------------------------------------------------------------------------


def _bad_calls():
    q, k, v, mq, mk, qs, ks = make_inputs(1, 2, 20, 8, 4, 4, 8, requires_grad=False)
    f = fn.bsbr_attention
    return [
        ("rank", lambda: f(q[0], k, v, mq, mk, 8), ValueError, "q must be a 4-D tensor"),
        ("k shape", lambda: f(q, k[:, :, :10], v, mq, mk, 8), ValueError, "k must have shape"),
        ("v dtype", lambda: f(q, k, v.float(), mq, mk, 8), TypeError, "v must have the same dtype as q"),
        ("integer", lambda: f(q.long(), k, v, mq, mk, 8), TypeError, "q must be a floating-point tensor"),
        ("meta chunks", lambda: f(q, k, v, mq[:, :, :2], mk, 8), ValueError, "meta_q must have shape"),
        ("meta dims", lambda: f(q, k, v, mq, mk[..., :3], 8), ValueError, "meta_q and meta_k must have the same"),
        ("chunk 0", lambda: f(q, k, v, mq, mk, 0), ValueError, "chunk_size must be >= 1"),
        ("overlap", lambda: f(q, k, v, mq, mk, 8, 9), ValueError, "chunk_overlap must be in [0, chunk_size=8]"),
        ("negative overlap", lambda: f(q, k, v, mq, mk, 8, -1), ValueError, "chunk_overlap must be in"),
        ("state alone", lambda: f(q, k, v, mq, mk, 8, q_state=qs), ValueError, "q_state and k_state must be given"),
        ("state seq", lambda: f(q, k, v, mq, mk, 8, q_state=qs[:, :, :5], k_state=ks), ValueError,
         "q_state must have shape"),
        ("state dims", lambda: f(q, k, v, mq, mk, 8, q_state=qs, k_state=ks[..., :3]), ValueError,
         "q_state and k_state must have the same state_dim"),
        ("device", lambda: f(q, k.to("meta"), v, mq, mk, 8), ValueError, "k must be on the same device as q"),
        ("states dtype", lambda: fn.block_retrieval(mq, mk, torch.zeros(1, 2, 3, 4, 8)), TypeError,
         "states must be Double"),
        ("retrieved shape", lambda: fn.chunk_attention(q, k, v, qs, torch.zeros(1, 2, 3, 8, 8, dtype=torch.float64), 8),
         ValueError, "retrieved must have [state_dim, head_dim]"),
        ("chunk_states v", lambda: fn.chunk_states(ks, v[:, :1], 8), ValueError, "v must have shape"),
    ]


@pytest.mark.parametrize("index", range(16))
def test_bad_input_raises_clear_error(index):
    name, call, exc, message = _bad_calls()[index]
    with pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


# ---- surfaces ----------------------------------------------------------------------------------


def test_torchscript_function():
    @torch.jit.script
    def scripted(q, k, v, mq, mk):
        return fn.bsbr_attention(q, k, v, mq, mk, 8, 2)

    xs = make_inputs(1, 2, 20, 8, 8, 4, 8, requires_grad=False)
    torch.testing.assert_close(scripted(*xs[:5]), fn.bsbr_attention(*xs[:5], 8, 2))


def test_compile_fullgraph_forward_backward():
    xs = make_inputs(1, 2, 40, 8, 8, 4, 16, dtype=torch.float32)
    f = attention(fn.bsbr_attention, 16, 4)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    out_e, g_e = outputs_and_grads(f, xs)
    out_c, g_c = outputs_and_grads(compiled, xs)
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e)


def test_export_with_dynamic_sequence_length():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v, mq, mk):
            return fn.bsbr_attention(q, k, v, mq, mk, 8, 2)

    xs = make_inputs(1, 2, 40, 8, 8, 4, 8, dtype=torch.float32, requires_grad=False)
    chunks = torch.export.Dim("chunks", min=2, max=64)
    n = 8 * chunks
    spec = ({2: n}, {2: n}, {2: n}, {2: chunks}, {2: chunks})
    exported = torch.export.export(Attn(), tuple(xs[:5]), dynamic_shapes=spec)
    ys = make_inputs(1, 2, 64, 8, 8, 4, 8, dtype=torch.float32, seed=3, requires_grad=False)
    torch.testing.assert_close(exported.module()(*ys[:5]), fn.bsbr_attention(*ys[:5], 8, 2))


def test_build_info():
    info = bsbr_ext.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    assert info["cpu_isa"] in ("avx512", "avx2", "base")


def _cpu_isa_under(cap: str) -> subprocess.CompletedProcess:
    code = "import bsbr_ext; print(bsbr_ext.build_info()['cpu_isa'])"
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, BSBR_CPU_ISA=cap),
                          capture_output=True, text=True)


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_kernels_at_lower_cpu_isa_levels(isa):
    """The CPU kernels are compiled once per ISA level and the best level this CPU runs is used;
    BSBR_CPU_ISA caps it, so the lower levels' kernels are checked here too: the fp64 and
    low-precision kernel tests and the decode ops, in a process that runs them at `isa`."""
    probe = _cpu_isa_under(isa)
    assert probe.returncode == 0, probe.stderr[-2000:]
    level = probe.stdout.strip()
    if level != isa:
        pytest.skip(f"this CPU cannot run the {isa} kernels (best level: {level})")
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         os.path.join(tests, "test_ops.py"), os.path.join(tests, "test_decode_ops.py"),
         "-k", "kernel_matches_reference_fp64 or low_precision_error_budget or "
               "(decode and matches_reference and cpu)"],
        env=dict(os.environ, BSBR_CPU_ISA=isa), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_cpu_isa_cap_rejects_unknown_level():
    run = _cpu_isa_under("sse9")
    assert run.returncode != 0
    assert "BSBR_CPU_ISA must be base, avx2 or avx512, got 'sse9'" in run.stderr
