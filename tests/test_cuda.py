"""CUDA kernels of the internal bsbr ops against the plain-PyTorch reference (SPEC §4).

Truth is the reference run in float64 on the GPU, from the very inputs the kernel saw. A kernel
passes when its error against the truth is at most 2x the error of the same reference run in the
kernel's dtype, plus a small floor. Correctness only: no timing here.
"""

from __future__ import annotations

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

import bsbr_ext._C  # noqa: E402,F401
from bsbr_ext import reference as ref  # noqa: E402

if not torch._C._dispatch_has_kernel_for_dispatch_key("bsbr::_chunk_attention_fwd", "CUDA"):
    pytest.skip("bsbr_ext was built without CUDA kernels", allow_module_level=True)

ops = torch.ops.bsbr
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [32, 64, 128]
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-4, torch.float16: 5e-5}

# (b, h, n, chunk_size, overlap): odd n, partial last chunk, n < B, overlap 0 / partial / = B,
# chunk sizes that are and are not multiples of the kernels' 64-row tiles.
CONFIGS = [
    (2, 3, 200, 64, 0),
    (2, 2, 200, 64, 17),
    (1, 2, 131, 32, 32),
    (2, 1, 50, 64, 0),
    (1, 3, 77, 16, 16),
    (2, 2, 150, 48, 20),
    (1, 2, 300, 256, 100),
    (2, 2, 300, 128, 0),  # dQ, dK and dV in one kernel on Hopper: a CTA per chunk, a partial last
    (1, 3, 131, 32, 0),   # and several chunks per 64-row CTA (attn_dqkv_kernel)
]


_COMPILED: dict = {}


def compiled(dtype: torch.dtype, d: int) -> bool:
    """Whether this build has the kernels of (dtype, d) (setup.py's BSBR_DTYPES / BSBR_HEAD_DIMS)."""
    if (dtype, d) not in _COMPILED:
        x = torch.zeros(1, 1, 16, d, device=DEV, dtype=dtype)
        try:
            ops._chunk_states_fwd(x, x, 16)
            _COMPILED[(dtype, d)] = True
        except (ValueError, TypeError) as e:
            if "not compiled" not in str(e):
                raise
            _COMPILED[(dtype, d)] = False
    return _COMPILED[(dtype, d)]


def skip_unless_compiled(dtype: torch.dtype, d: int) -> None:
    if not compiled(dtype, d):
        pytest.skip(f"{dtype} d={d} is not compiled into this build (BSBR_DTYPES / BSBR_HEAD_DIMS)")


@pytest.fixture(autouse=True)
def _skip_uncompiled(request):
    """Tests with a dtype parameter and a d parameter (default 64); tests that fix another head
    dim call skip_unless_compiled themselves."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    dtype = params.get("dtype")
    if dtype is None or request.node.originalname == "test_block_retrieval":  # cuBLAS only
        return
    skip_unless_compiled(dtype, params.get("d", 64))


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    t = truth.double()
    return ((x.double() - t).norm() / t.norm().clamp_min(1e-30)).item()


def check(name: str, got: torch.Tensor, truth: torch.Tensor, lowp: torch.Tensor) -> None:
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    ek, er = rel_err(got, truth), rel_err(lowp, truth)
    floor = FLOOR[lowp.dtype if lowp.dtype in FLOOR else torch.float32]
    if got.dtype in FLOOR:
        floor = max(floor, FLOOR[got.dtype])
    assert ek <= 2 * er + floor, f"{name}: kernel error {ek:.3e} > 2 x reference error {er:.3e} + {floor:.0e}"


def scales(d, dm, ds, chunk):
    return 1.0 / math.sqrt(d), 1.0 / math.sqrt(dm), 1.0 / (chunk * math.sqrt(ds))


def token(b, h, n, e, dtype, gen):
    return torch.randn(b, h, n, e, generator=gen, device=DEV).to(dtype)


def qkv(b, h, n, d, dtype, gen, strided=False):
    if strided:  # slices of a fused projection [b, n, 3, h, d]: stride(n) = 3*h*d, no copy
        x = torch.randn(b, n, 3, h, d, generator=gen, device=DEV).to(dtype)
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        return q, k, v
    return tuple(token(b, h, n, d, dtype, gen) for _ in range(3))


def lse_truth(q, k, chunk, overlap, scale):
    n = q.shape[-2]
    t = torch.arange(n, device=q.device)
    lo = (t // chunk * chunk - overlap).clamp_min(0)
    u = t.view(1, n)
    window = (u <= t.view(n, 1)) & (u >= lo.view(n, 1))
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.logsumexp(logits.masked_fill(~window, float("-inf")), dim=-1)


def grads(fn, inputs, grad_out):
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out)


# ----------------------------------------------------------------------------- chunk states


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("cfg", CONFIGS[:5])
def test_chunk_states(dtype, d, cfg):
    b, h, n, chunk, _ = cfg
    gen = torch.Generator(device=DEV).manual_seed(1)
    ds = max(8, d // 4)
    ks, v = token(b, h, n, ds, dtype, gen), token(b, h, n, d, dtype, gen)
    got = ops._chunk_states_fwd(ks, v, chunk)
    truth = ref.chunk_states(ks.double(), v.double(), chunk)
    check("states", got, truth, ref.chunk_states(ks, v, chunk))
    assert got.dtype == torch.float32

    g = torch.randn(truth.shape, generator=gen, device=DEV)
    gks, gv = ops._chunk_states_bwd(g, ks, v, chunk)
    _, (tks, tv) = grads(lambda a, c: ref.chunk_states(a, c, chunk), [ks.double(), v.double()], g.double())
    _, (lks, lv) = grads(lambda a, c: ref.chunk_states(a, c, chunk), [ks, v], g)
    check("grad_k_state", gks, tks, lks)
    check("grad_v", gv, tv, lv)
    assert gks.dtype == dtype and gv.dtype == dtype


# ----------------------------------------------------------------------------- block retrieval


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 7, 40, 261])  # 261: the triangular-blocked products
@pytest.mark.parametrize("dm", [16, 72])
def test_block_retrieval(dtype, C, dm):
    b, h, ds, d = 2, 3, 16, 32
    gen = torch.Generator(device=DEV).manual_seed(2)
    mq = torch.randn(b, h, C, dm, generator=gen, device=DEV).to(dtype)
    mk = torch.randn(b, h, C, dm, generator=gen, device=DEV).to(dtype)
    states = torch.randn(b, h, C, ds, d, generator=gen, device=DEV)
    ms = 1.0 / math.sqrt(dm)
    got = ops._block_retrieval_fwd(mq, mk, states, ms)
    f = lambda a, bb, s: ref.block_retrieval(a, bb, s, ms)  # noqa: E731
    truth = f(mq.double(), mk.double(), states.double())
    check("retrieved", got, truth, f(mq, mk, states))
    assert torch.all(got[:, :, 0] == 0), "S_0 must be exactly zero"

    g = torch.randn(truth.shape, generator=gen, device=DEV)
    gmq, gmk, gF = ops._block_retrieval_bwd(g, mq, mk, states, ms)
    _, (tq, tk, tF) = grads(f, [mq.double(), mk.double(), states.double()], g.double())
    _, (lq, lk, lF) = grads(f, [mq, mk, states], g)
    if C > 1:
        check("grad_meta_q", gmq, tq, lq)
        check("grad_meta_k", gmk, tk, lk)
    check("grad_states", gF, tF, lF)
    assert torch.isfinite(gmq).all() and torch.isfinite(gmk).all()
    assert gmq.dtype == dtype and gF.dtype == torch.float32


# ----------------------------------------------------------------------------- chunk attention


def attn_inputs(b, h, n, d, ds, chunk, dtype, gen, strided=False, dm=24):
    q, k, v = qkv(b, h, n, d, dtype, gen, strided)
    qs = token(b, h, n, ds, dtype, gen)
    ks = token(b, h, n, ds, dtype, gen)
    C = (n + chunk - 1) // chunk
    mq = torch.randn(b, h, C, dm, generator=gen, device=DEV).to(dtype)
    mk = torch.randn(b, h, C, dm, generator=gen, device=DEV).to(dtype)
    # Realistic retrieved states (a convex mix of chunk states), fp32 as the op takes them.
    R = ref.block_retrieval(mq.double(), mk.double(), ref.chunk_states(ks.double(), v.double(), chunk)).float()
    return q, k, v, qs, ks, mq, mk, R


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_chunk_attention(dtype, d, cfg):
    b, h, n, chunk, w = cfg
    ds = d // 2 if d != 64 else 24  # ds < d, and one case not a multiple of 16
    gen = torch.Generator(device=DEV).manual_seed(3)
    q, k, v, qs, _, _, _, R = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    scale, _, ss = scales(d, 1, ds, chunk)
    out, lse = ops._chunk_attention_fwd(q, k, v, qs, R, chunk, w, scale, ss)
    f = lambda a, bb, c, e, r: ref.chunk_attention(a, bb, c, e, r, chunk, w, scale, ss)  # noqa: E731
    truth = f(q.double(), k.double(), v.double(), qs.double(), R.double())
    check("out", out, truth, f(q, k, v, qs, R))
    assert out.dtype == dtype and lse.dtype == torch.float32
    lt = lse_truth(q, k, chunk, w, scale)
    assert (lse.double() - lt).abs().max().item() <= 2e-5 * max(1.0, lt.abs().max().item())

    g = torch.randn(out.shape, generator=gen, device=DEV).to(dtype)
    got = ops._chunk_attention_bwd(g, q, k, v, qs, R, out, lse, chunk, w, scale, ss)
    _, tg = grads(f, [q.double(), k.double(), v.double(), qs.double(), R.double()], g.double())
    _, lg = grads(f, [q, k, v, qs, R], g)
    for name, a, t, l_ in zip(["grad_q", "grad_k", "grad_v", "grad_q_state", "grad_retrieved"], got, tg, lg):
        check(name, a, t, l_)
    assert got[4].dtype == torch.float32 and got[0].dtype == dtype


# ----------------------------------------------------------------------------- fused op


def fused_ref(q, k, v, mq, mk, qs, ks, chunk, w, scale, ms, ss):
    return ref.bsbr_attention(q, k, v, mq, mk, chunk, w, scale, ms, ss, q_state=qs, k_state=ks)


FUSED_GRADS = ["grad_q", "grad_k", "grad_v", "grad_meta_q", "grad_meta_k", "grad_q_state", "grad_k_state"]


def check_fused(ins, dtype, gen, chunk, w, scale, ms, ss, grad_ins=None):
    """The fused op's forward and backward on ``ins = [q, k, v, mq, mk, qs, ks]`` against the
    fp64 truth (SPEC §4 tolerance); gradients are taken w.r.t. ``grad_ins`` (default ``ins``).
    ``qs, ks = None, None`` (omitted states) expects grad_q / grad_k to include the state path
    and empty grad_q_state / grad_k_state. Returns ``(out, lse, grad_out, grads)``."""
    out, lse = ops._bsbr_attention_fwd(*ins, chunk, w, scale, ms, ss)
    f = lambda *a: fused_ref(*a, chunk, w, scale, ms, ss)  # noqa: E731
    double = lambda xs: [None if x is None else x.double() for x in xs]  # noqa: E731
    check("out", out, f(*double(ins)), f(*ins))
    g = torch.randn(out.shape, generator=gen, device=DEV).to(dtype)
    got = ops._bsbr_attention_bwd(g, *ins, out, lse, chunk, w, scale, ms, ss)
    grad_ins = ins if grad_ins is None else grad_ins
    omitted = grad_ins[5] is None
    if omitted:
        grad_ins = grad_ins[:5]
        f = lambda *a: fused_ref(*a, None, None, chunk, w, scale, ms, ss)  # noqa: E731
        assert got[5].shape == (0,) and got[6].shape == (0,), "omitted states get empty gradients"
    _, tg = grads(f, double(grad_ins), g.double())
    _, lg = grads(f, grad_ins, g)
    for name, a, t, l_ in zip(FUSED_GRADS, got, tg, lg):
        check(name, a, t, l_)
    return out, lse, g, got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[5]])
@pytest.mark.parametrize("state", ["separate", "shared", "omitted"])
def test_bsbr_attention_fused(dtype, d, cfg, state):
    b, h, n, chunk, w = cfg
    gen = torch.Generator(device=DEV).manual_seed(4)
    ds = d // 4 if state == "separate" else d
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    if state == "shared":  # q, k passed again as the states: separate gradients
        qs, ks = q, k
    if state == "omitted":  # what the public op passes when no state is given: folded gradients
        qs, ks = None, None
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)
    # Shared: grads w.r.t. distinct leaves, so the reference sees separate tensors.
    grad_ins = [q, k, v, mq, mk, q.clone(), k.clone()] if state == "shared" else None
    _, _, _, got = check_fused([q, k, v, mq, mk, qs, ks], dtype, gen, chunk, w, scale, ms, ss, grad_ins)
    for a in got:
        for x in (q, k, v, mq, mk, qs, ks):
            assert x is None or a.numel() == 0 or a.data_ptr() != x.data_ptr(), \
                "outputs must never alias inputs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", ["head ranges", "batch elements"])
@pytest.mark.parametrize("state", ["separate", "omitted"])
def test_bsbr_attention_fused_head_groups(dtype, groups, state, monkeypatch):
    """The fused backward runs its state pipeline on groups of heads once the states pass a
    memory budget; BSBR_GROUP_STATE_BYTES shrinks the budget so that small problems take that
    path: one head per group, or two whole batch elements per group. SPEC check against the
    fp64 truth, and the token gradients equal the one-group run: bit for bit on the tensor-core
    path (our kernels see each head alone); to fp32 rounding on the fp32 path, where cuBLAS may
    pick another algorithm for another batch count."""
    b, h, n, d, chunk, w = 3, 3, 150, 64, 32, 5
    ds = 16 if state == "separate" else d
    gen = torch.Generator(device=DEV).manual_seed(15)
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    if state == "omitted":
        qs, ks = None, None
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)
    ins = [q, k, v, mq, mk, qs, ks]
    out, lse = ops._bsbr_attention_fwd(*ins, chunk, w, scale, ms, ss)
    g = torch.randn(out.shape, generator=gen, device=DEV).to(dtype)
    whole = ops._bsbr_attention_bwd(g, *ins, out, lse, chunk, w, scale, ms, ss)
    per_head = math.ceil(n / chunk) * ds * d * 4
    monkeypatch.setenv("BSBR_GROUP_STATE_BYTES", str(per_head if groups == "head ranges" else 2 * h * per_head))
    check_fused(ins, dtype, gen, chunk, w, scale, ms, ss)
    grouped = ops._bsbr_attention_bwd(g, *ins, out, lse, chunk, w, scale, ms, ss)
    for name, a, c in zip(FUSED_GRADS, grouped, whole):
        if dtype == torch.float32:
            assert rel_err(a, c) < 1e-5, f"{name}: grouped backward differs from one group"
        elif "meta" not in name:  # dP's split-K count follows the group size
            assert torch.equal(a, c), f"{name}: grouped backward differs from one group"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,ds", [(64, 16), (64, 64), (128, 8), (64, None), (128, None)])
def test_bsbr_attention_fused_many_chunks(dtype, d, ds):
    """Enough chunks for several (partial) tiles of the tensor-core retrieval products, with and
    without split-K in dP = dS F^T; checked against the fp64 truth and against the cuBLAS fp32
    retrieval path (BSBR_MIX_FP32=1). ds = None omits the states (q_state = q, k_state = k): the
    dK/dV kernel then adds the chunk-states backward itself, over 4 chunks per 64-row tile."""
    b, h, chunk, w = 1, 2, 16, 5
    n = chunk * 150 - 5  # C = 150 chunks, partial last chunk
    gen = torch.Generator(device=DEV).manual_seed(14)
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, ds or d, chunk, dtype, gen)
    if ds is None:
        qs, ks = None, None
    mq, mk = mq * 2, mk * 2  # peakier retrieval weights
    scale, ms, ss = scales(d, mq.shape[-1], ds or d, chunk)
    ss = ss * 8  # make the long-range term a visible part of the output
    out, lse, g, got = check_fused([q, k, v, mq, mk, qs, ks], dtype, gen, chunk, w, scale, ms, ss)

    def fused_with(name, value):
        with pytest.MonkeyPatch.context() as env:
            env.setenv(name, value)
            o, _ = ops._bsbr_attention_fwd(q, k, v, mq, mk, qs, ks, chunk, w, scale, ms, ss)
            return o, ops._bsbr_attention_bwd(g, q, k, v, mq, mk, qs, ks, out, lse, chunk, w, scale, ms, ss)

    out32, got32 = fused_with("BSBR_MIX_FP32", "1")
    # The mma.sync mixing, which GPUs without sm_90a code run; on Hopper the default above is
    # the wgmma mixing (same products, fp32 sums in another order).
    out_ms, got_ms = fused_with("BSBR_MIX_WGMMA", "0")
    # Same inputs, retrieval in true fp32: the outputs differ by at most a rounding of the dtype.
    for name, a, c, m in zip(["out"] + FUSED_GRADS, (out, *got), (out32, *got32), (out_ms, *got_ms)):
        err = rel_err(a, c)
        assert err < 1e-2, f"{name}: tensor-core retrieval differs from fp32 retrieval by {err:.3e}"
        err = rel_err(m, c)
        assert err < 1e-2, f"{name}: mma.sync retrieval differs from fp32 retrieval by {err:.3e}"


def test_retrieval_mixing_on_wgmma(monkeypatch):
    """On a compute capability 9.0 GPU the fused op's S = P F, dF = P^T dS and dP = dS F^T run on
    the wgmma kernels (the build compiles Hopper as sm_90a), and on mma.sync with
    BSBR_MIX_WGMMA=0."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma mixing runs on compute capability 9.0 only")
    assert "90a" in bsbr_ext._C.build_info()["cuda_archs"], "Hopper builds must include sm_90a"
    b, h, n, d, chunk, dtype = 1, 2, 16 * 40, 64, 16, torch.bfloat16
    skip_unless_compiled(dtype, d)
    gen = torch.Generator(device=DEV).manual_seed(18)
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, d, chunk, dtype, gen)
    scale, ms, ss = scales(d, mq.shape[-1], d, chunk)

    def mixing_kernels():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out, lse = ops._bsbr_attention_fwd(q, k, v, mq, mk, qs, ks, chunk, 0, scale, ms, ss)
            ops._bsbr_attention_bwd(out, q, k, v, mq, mk, qs, ks, out, lse, chunk, 0, scale, ms, ss)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "kernel" in e.name]
        return [x for x in names if "mix::" in x], sum("p_planes_kernel" in x for x in names)

    names, regroupings = mixing_kernels()
    assert sum("mix_t_wgmma_kernel" in x for x in names) == 3, names  # S twice (fwd, bwd), dF once
    assert sum("scores_wgmma_kernel" in x for x in names) == 1, names
    # The forward's weights kernel writes the wgmma planes itself; only the backward, which also
    # needs P's split words, regroups words into planes (one head group here).
    assert regroupings == 1
    monkeypatch.setenv("BSBR_MIX_WGMMA", "0")
    names, regroupings = mixing_kernels()
    assert names and not any("wgmma" in x for x in names), names
    assert regroupings == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixing_cta_order(dtype, monkeypatch):
    """The wgmma mixing (S = P F, dF = P^T dS) numbers its CTAs either x tiles fastest or, on
    launches of 4 waves or more, in groups of 16 x tiles (BSBR_MIX_GROUP_X=1 forces the groups,
    0 forbids them). The grouped order against the fp64 truth, then bitwise against the other:
    each CTA computes the same tile either way. X = ds * d = 2560 is 20 x tiles (one full group
    and a partial one) and C = 300 three column tiles, the last partial."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma mixing runs on compute capability 9.0 only")
    b, h, n, d, ds, chunk = 1, 2, 16 * 300 - 5, 64, 40, 16
    gen = torch.Generator(device=DEV).manual_seed(32)
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    ins = [q, k, v, mq, mk, qs, ks]
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)
    monkeypatch.setenv("BSBR_MIX_GROUP_X", "1")
    out, lse, g, grouped = check_fused(ins, dtype, gen, chunk, 0, scale, ms, ss)
    monkeypatch.setenv("BSBR_MIX_GROUP_X", "0")
    out0, lse0 = ops._bsbr_attention_fwd(*ins, chunk, 0, scale, ms, ss)
    plain = ops._bsbr_attention_bwd(g, *ins, out0, lse0, chunk, 0, scale, ms, ss)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    for name, a, c in zip(FUSED_GRADS, grouped, plain):
        assert torch.equal(a, c), f"{name}: the two CTA orders differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4], CONFIGS[6], (2, 3, 9000, 48, 20)])
@pytest.mark.parametrize("state", ["separate", "q"])
def test_attention_on_wgmma(dtype, d, cfg, state, monkeypatch):
    """On a compute capability 9.0 GPU the attention forward, dQ and dK/dV kernels at d = 64 / 128
    run on wgmma (attn_wgmma.cuh), on mma.sync with BSBR_ATTN_WGMMA=0. Both are checked against the fp64 truth by the tests above (whichever the
    GPU runs); here they must also agree with each other to a rounding of the dtype, for chunks
    narrower than the 64-row tile (B = 16: several chunks per tile), overlap, q_state = q (read
    from the Q tile) and a separate q_state with ds < d. At d = 128 the forward's CTA is two
    warpgroups (128 rows): n = 300 with B = 256 leaves the last CTA's second warpgroup no rows.
    The d = 128 forward is persistent (one CTA per SM walks tiles blockIdx.x, + gridDim.x, ...,
    its S_c copies streaming through two buffers): n = 9000 with 6 heads is 426 tiles of 128
    rows, 3 or 4 per CTA on a GPU of 132 SMs, each meeting 3 or 4 chunks of 48."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma attention runs on compute capability 9.0 only")
    b, h, n, chunk, w = cfg
    ds = 24 if state == "separate" else d
    gen = torch.Generator(device=DEV).manual_seed(19)
    q, k, v, qs, _, _, _, R = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    if state == "q":
        qs = q
    scale, _, ss = scales(d, 1, ds, chunk)
    ss = ss * 8  # make the long-range term a visible part of the output
    g = torch.randn(q.shape, generator=gen, device=DEV).to(dtype)

    def run():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out, lse = ops._chunk_attention_fwd(q, k, v, qs, R, chunk, w, scale, ss)
            dq, dk, dv = ops._chunk_attention_bwd(g, q, k, v, qs, R, out, lse, chunk, w, scale, ss)[:3]
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "attn_" in e.name and "_kernel" in e.name]
        return [out, lse, dq, dk, dv], names

    got, names = run()
    on_wgmma = {x.split("attn_")[1].split("_kernel")[0] for x in names if "wg::" in x}
    assert len(names) == 3 and on_wgmma == {"fwd", "dq", "dkv"}, names
    monkeypatch.setenv("BSBR_ATTN_WGMMA", "0")
    want, names = run()
    assert len(names) == 3 and not any("wg::" in x for x in names), names
    for name, a, b_ in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        if name == "lse":
            assert (a - b_).abs().max().item() <= 1e-5 * max(1.0, b_.abs().max().item())
        else:
            assert rel_err(a, b_) < 1e-2, f"wgmma and mma.sync {name} differ by {rel_err(a, b_):.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4], CONFIGS[6]])
def test_fused_dkv_on_wgmma(dtype, d, cfg, monkeypatch):
    """The fused backward with the states omitted (k_state = k) adds the chunk-states backward
    (dF) inside the dK/dV kernel; on a compute capability 9.0 GPU that is the wgmma kernel, whose
    gradients must agree with the mma.sync kernel's (d = 128: two 64-row slabs of dF)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma attention runs on compute capability 9.0 only")
    b, h, n, chunk, w = cfg
    skip_unless_compiled(dtype, d)
    gen = torch.Generator(device=DEV).manual_seed(23)
    q, k, v, _, _, mq, mk, _ = attn_inputs(b, h, n, d, d, chunk, dtype, gen)
    scale, ms, ss = scales(d, mq.shape[-1], d, chunk)
    ins = [q, k, v, mq, mk, None, None]
    out, lse = ops._bsbr_attention_fwd(*ins, chunk, w, scale, ms, ss * 8)
    g = torch.randn(out.shape, generator=gen, device=DEV).to(dtype)

    def run():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            grads = ops._bsbr_attention_bwd(g, *ins, out, lse, chunk, w, scale, ms, ss * 8)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "attn_dkv_kernel" in e.name]
        return grads, names

    got, names = run()
    assert names and all("wg::" in x for x in names), names
    monkeypatch.setenv("BSBR_ATTN_WGMMA", "0")
    want, names = run()
    assert names and not any("wg::" in x for x in names), names
    for name, a, b_ in zip(FUSED_GRADS[:5], got, want):
        assert rel_err(a, b_) < 1e-2, f"wgmma and mma.sync {name} differ by {rel_err(a, b_):.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3], CONFIGS[7], CONFIGS[8], (1, 2, 77, 16, 0)])
@pytest.mark.parametrize("state", ["separate", "q", "omitted"])
def test_dqkv_on_wgmma(dtype, d, cfg, state, monkeypatch):
    """Without overlap and with chunks of 128 or dividing 64, no query's window leaves a 128- or
    64-row tile, and on a compute capability 9.0 GPU one kernel computes dQ, dK and dV
    (attn_dqkv_kernel; by default at d = 128 only, BSBR_ATTN_DQKV=1 everywhere); BSBR_ATTN_DQKV=0
    runs the dK/dV and dQ kernels instead. dK and dV are the same products in the same order, so
    they must be bitwise equal; dQ reads dS from the transposed products and agrees to a rounding. "omitted" is the fused op with k_state = k, whose
    chunk-states backward the kernel adds to dk and dv."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma attention runs on compute capability 9.0 only")
    b, h, n, chunk, w = cfg
    ds = 24 if state == "separate" else d
    gen = torch.Generator(device=DEV).manual_seed(29)
    q, k, v, qs, _, mq, mk, R = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)
    ss = ss * 8  # make the long-range term a visible part of the output
    if state == "omitted":
        out, lse = ops._bsbr_attention_fwd(q, k, v, mq, mk, None, None, chunk, w, scale, ms, ss)
        bwd = lambda g: ops._bsbr_attention_bwd(g, q, k, v, mq, mk, None, None, out, lse, chunk, w, scale, ms, ss)  # noqa: E731
    else:
        qs = q if state == "q" else qs
        out, lse = ops._chunk_attention_fwd(q, k, v, qs, R, chunk, w, scale, ss)
        bwd = lambda g: ops._chunk_attention_bwd(g, q, k, v, qs, R, out, lse, chunk, w, scale, ss)  # noqa: E731
    g = torch.randn(out.shape, generator=gen, device=DEV).to(dtype)

    def run():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            grads = bwd(g)
            torch.cuda.synchronize()
        names = [e.name.split("attn_")[1].split("_kernel")[0] for e in prof.events()
                 if "wg::attn_" in e.name and "_kernel" in e.name]
        return grads, names

    monkeypatch.delenv("BSBR_ATTN_DQKV", raising=False)
    _, names = run()
    assert sorted(names) == (["dqkv"] if d == 128 else ["dkv", "dq"]), f"default at d={d}: {names}"
    monkeypatch.setenv("BSBR_ATTN_DQKV", "1")
    got, names = run()
    assert names == ["dqkv"], names
    monkeypatch.setenv("BSBR_ATTN_DQKV", "0")
    want, names = run()
    assert sorted(names) == ["dkv", "dq"], names
    assert rel_err(got[0], want[0]) < 1e-2, f"grad_q differs by {rel_err(got[0], want[0]):.3e}"
    for i, (a, c) in enumerate(zip(got[1:], want[1:]), start=1):
        assert torch.equal(a, c), f"gradient {i} differs from the two kernels'"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state", ["separate", "omitted"])
def test_bsbr_attention_fused_long_rows(dtype, state):
    """C = 600 chunks: rows of the retrieval weights longer than the 512 columns that the
    softmax backward keeps in registers (its second pass), and many row tiles of the meta
    gradients."""
    b, h, d, chunk, w = 1, 2, 32, 16, 0
    skip_unless_compiled(dtype, d)
    ds = 16 if state == "separate" else d
    n = chunk * 600 - 7
    gen = torch.Generator(device=DEV).manual_seed(17)
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    if state == "omitted":
        qs, ks = None, None
    mq, mk = mq * 2, mk * 2  # peakier retrieval weights
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)
    check_fused([q, k, v, mq, mk, qs, ks], dtype, gen, chunk, w, scale, ms, ss * 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dm", [8, 64, 128, 200, 256, 12, 264])
def test_bsbr_attention_fused_meta_dims(dtype, dm):
    """The retrieval weights of the tensor-core path come from one kernel compiled for padded
    meta dims 32 / 64 / 128 / 256 (dm % 8 == 0, dm <= 256; 12 and 264 take the cuBLAS-logits
    fallback); 70 chunks make two row blocks, the second with a partial tile."""
    b, h, d, ds, chunk, w = 1, 2, 32, 16, 16, 3
    skip_unless_compiled(dtype, d)
    n = chunk * 70 - 3
    gen = torch.Generator(device=DEV).manual_seed(16)
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, ds, chunk, dtype, gen, dm=dm)
    mq, mk = mq * 2, mk * 2  # peakier retrieval weights
    scale, ms, ss = scales(d, dm, ds, chunk)
    check_fused([q, k, v, mq, mk, qs, ks], dtype, gen, chunk, w, scale, ms, ss * 8)


# ----------------------------------------------------------------------------- layout & determinism


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(dtype):
    b, h, n, d, chunk, w = 2, 3, 190, 64, 64, 10
    ds = 32
    gen = torch.Generator(device=DEV).manual_seed(5)
    q, k, v, qs, ks, mq, mk, R = attn_inputs(b, h, n, d, ds, chunk, dtype, gen, strided=True)
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    o1, l1 = ops._chunk_attention_fwd(q, k, v, qs, R, chunk, w, scale, ss)
    o2, l2 = ops._chunk_attention_fwd(qc, kc, vc, qs, R, chunk, w, scale, ss)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    g = torch.randn(o1.shape, generator=gen, device=DEV).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    g1 = ops._chunk_attention_bwd(g, q, k, v, qs, R, o1, l1, chunk, w, scale, ss)
    g2 = ops._chunk_attention_bwd(g.contiguous(), qc, kc, vc, qs, R, o2, l2, chunk, w, scale, ss)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)
    f1 = ops._bsbr_attention_fwd(q, k, v, mq, mk, qs, ks, chunk, w, scale, ms, ss)
    f2 = ops._bsbr_attention_fwd(qc, kc, vc, mq, mk, qs, ks, chunk, w, scale, ms, ss)
    assert torch.equal(f1[0], f2[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous_views_at_odd_offsets(dtype):
    """Contiguous token tensors whose first element is not 16-byte aligned (a view at an odd
    offset into a buffer) are copied once into an aligned buffer before the 16-byte loads of the
    tensor-core kernels (contiguous() alone returns such a view unchanged): every op gives the
    results of aligned copies, bit for bit."""
    b, h, n, d, chunk, w, ds = 1, 2, 200, 64, 64, 10, 32
    gen = torch.Generator(device=DEV).manual_seed(41)
    q, k, v, qs, ks, mq, mk, R = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    g = token(b, h, n, d, dtype, gen)

    def at_odd_offset(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    aligned = (q, k, v, qs, ks, g)
    odd = tuple(at_odd_offset(t) for t in aligned)
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)

    def run(q, k, v, qs, ks, g):
        F = ops._chunk_states_fwd(ks, v, chunk)
        o, lse = ops._chunk_attention_fwd(q, k, v, qs, R, chunk, w, scale, ss)
        grads = ops._chunk_attention_bwd(g, q, k, v, qs, R, o, lse, chunk, w, scale, ss)
        fo, flse = ops._bsbr_attention_fwd(q, k, v, mq, mk, qs, ks, chunk, w, scale, ms, ss)
        fgrads = ops._bsbr_attention_bwd(g, q, k, v, mq, mk, qs, ks, fo, flse, chunk, w, scale, ms, ss)
        return (F, o, lse, *grads, fo, flse, *fgrads)

    for i, (a, c) in enumerate(zip(run(*odd), run(*aligned))):
        assert torch.equal(a, c), f"output {i} differs for inputs at an odd offset"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("w", [0, 37])  # 0: attn_dqkv_kernel on Hopper (forced at d = 64)
def test_backward_deterministic(dtype, d, w, monkeypatch):
    monkeypatch.setenv("BSBR_ATTN_DQKV", "1")
    b, h, n, chunk = 2, 4, 1000, 128
    ds = d // 2
    gen = torch.Generator(device=DEV).manual_seed(6)
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, ds, chunk, dtype, gen)
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)
    out, lse = ops._bsbr_attention_fwd(q, k, v, mq, mk, qs, ks, chunk, w, scale, ms, ss)
    g = torch.randn(out.shape, generator=gen, device=DEV).to(dtype)
    runs = [ops._bsbr_attention_bwd(g, q, k, v, mq, mk, qs, ks, out, lse, chunk, w, scale, ms, ss) for _ in range(3)]
    for r in runs[1:]:
        for a, c in zip(runs[0], r):
            assert torch.equal(a, c), "backward is not bitwise deterministic"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("meta_contiguous", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_overlapped_launches(dtype, meta_contiguous, groups, d, monkeypatch):
    """Independent kernels overlap on Hopper (programmatic dependent launch; BSBR_PDL=0 launches
    them one after the other): the chunk states beside the retrieval weights, dQ beside dP (d = 64;
    at d = 128 dQ is part of the dQ/dK/dV kernel), the softmax backward beside dF, the last head
    group's dK/dV beside the meta gradients, and each later head group's chunk states beside the
    group before's dK/dV; and kernels that wait inside for what the one before writes: the
    attention forward and the backward preprocess beside S = P F (they wait for S), dK/dV beside
    the softmax backward (it waits for dF, the kernel before that one's). Forward and gradients
    are bitwise those of the serial launches, eagerly and replayed from a CUDA graph, with one,
    two or four head groups.
    Meta tensors that are not contiguous are copied first, and the states kernel must then not
    overlap (the copies are freed before it runs); that case must agree as well."""
    b, h, n, chunk, w, dm = 1, 4, 16384 + 77, 128, 0, 64
    gen = torch.Generator(device=DEV).manual_seed(31)
    C = (n + chunk - 1) // chunk
    if groups > 1:  # the backward's head groups: a budget of F for h / groups heads
        monkeypatch.setenv("BSBR_GROUP_STATE_BYTES", str(h // groups * C * d * d * 4))
    q, k, v, g = (token(b, h, n, d, dtype, gen) for _ in range(4))
    if meta_contiguous:
        mq, mk = (torch.randn(b, h, C, dm, generator=gen, device=DEV).to(dtype) for _ in range(2))
    else:
        mq, mk = (torch.randn(b, C, h, dm, generator=gen, device=DEV).to(dtype).transpose(1, 2) for _ in range(2))
    scale, ms, ss = scales(d, dm, d, chunk)
    args = (chunk, w, scale, ms, ss)

    def run(q, k, v, mq, mk, g):
        out, lse = ops._bsbr_attention_fwd(q, k, v, mq, mk, None, None, *args)
        return (out, lse) + tuple(ops._bsbr_attention_bwd(g, q, k, v, mq, mk, None, None, out, lse, *args)[:5])

    inputs = (q, k, v, mq, mk, g)
    monkeypatch.setenv("BSBR_PDL", "0")
    serial = run(*inputs)
    monkeypatch.delenv("BSBR_PDL")
    names = ("out", "lse") + tuple(FUSED_GRADS[:5])
    for _ in range(3):
        for name, a, c in zip(names, serial, run(*inputs)):
            assert torch.equal(a, c), f"{name} differs when the states kernel overlaps the weights'"

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(*inputs)  # warm-up off the capture (allocator pools, kernel attributes)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(*inputs)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for name, a, c in zip(names, serial, captured):
            assert torch.equal(a, c), f"{name} differs when replayed from a CUDA graph"


def test_tensors_over_2_31_elements():
    """64-bit offsets: q, k, v with more than 2^31 elements (b = 1, h = 2^15 + 1, n = 1024,
    d = 64, bf16; about 45 GiB at the peak). Every element of the last head lies past 2^31; its
    output and gradients (fused op, states omitted: the chunk-states backward inside dK/dV) must
    match the same op run on that head alone."""
    dtype, d, n, chunk, w, dm = torch.bfloat16, 64, 1024, 128, 16, 16
    skip_unless_compiled(dtype, d)
    torch.cuda.empty_cache()  # blocks cached by earlier tests count as used
    if torch.cuda.mem_get_info()[0] < 60 * 2**30:
        pytest.skip("needs 60 GiB of free GPU memory")
    h = 2**31 // (n * d) + 1
    C = n // chunk
    gen = torch.Generator(device=DEV).manual_seed(29)
    q, k, v, g = (torch.randn(1, h, n, d, generator=gen, device=DEV, dtype=dtype) for _ in range(4))
    assert q.numel() > 2**31
    mq, mk = (torch.randn(1, h, C, dm, generator=gen, device=DEV, dtype=dtype) for _ in range(2))
    scale, ms, ss = scales(d, dm, d, chunk)
    args = (chunk, w, scale, ms, ss)
    out, lse = ops._bsbr_attention_fwd(q, k, v, mq, mk, None, None, *args)
    grads = ops._bsbr_attention_bwd(g, q, k, v, mq, mk, None, None, out, lse, *args)[:5]
    last = [x[:, -1:].clone() for x in (q, k, v, mq, mk, g)]
    del q, k, v, mq, mk
    out_1, lse_1 = ops._bsbr_attention_fwd(*last[:5], None, None, *args)
    grads_1 = ops._bsbr_attention_bwd(last[5], *last[:5], None, None, out_1, lse_1, *args)[:5]
    assert rel_err(out[:, -1:], out_1) < 1e-3
    assert (lse[:, -1:] - lse_1).abs().max().item() < 1e-4
    for name, a, b_ in zip(FUSED_GRADS[:5], grads, grads_1):
        assert rel_err(a[:, -1:], b_) < 1e-3, f"{name} of the head past 2^31 differs: {rel_err(a[:, -1:], b_):.3e}"
    del out, lse, grads, g
    torch.cuda.empty_cache()


def test_causality():
    b, h, n, d, chunk, w = 1, 2, 300, 64, 64, 16
    skip_unless_compiled(torch.bfloat16, d)
    gen = torch.Generator(device=DEV).manual_seed(7)
    q, k, v, qs, ks, mq, mk, _ = attn_inputs(b, h, n, d, d, chunk, torch.bfloat16, gen)
    scale, ms, ss = scales(d, mq.shape[-1], d, chunk)
    # meta_q[c] must not depend on chunk c's tokens for causality: keep it fixed.
    out1, _ = ops._bsbr_attention_fwd(q, k, v, mq, mk, qs, ks, chunk, w, scale, ms, ss)
    t = 201
    k2, v2, ks2 = k.clone(), v.clone(), ks.clone()
    k2[:, :, t] += 1
    v2[:, :, t] -= 1
    ks2[:, :, t] *= 2
    out2, _ = ops._bsbr_attention_fwd(q, k2, v2, mq, mk, qs, ks2, chunk, w, scale, ms, ss)
    assert torch.equal(out1[:, :, :t], out2[:, :, :t])


# ----------------------------------------------------------------------------- errors


def small(dtype=torch.bfloat16, d=64, ds=None, n=40, chunk=16):
    """Inputs for the error tests; the checks before the one a test expects pass only for a
    compiled dtype and head dim."""
    skip_unless_compiled(dtype, d)
    gen = torch.Generator(device=DEV).manual_seed(8)
    q, k, v, qs, ks, mq, mk, R = attn_inputs(1, 1, n, d, ds or d, chunk, dtype, gen)
    return q, k, v, qs, R


def test_error_head_dim():
    gen = torch.Generator(device=DEV).manual_seed(9)
    q = token(1, 1, 40, 48, torch.bfloat16, gen)
    R = torch.zeros(1, 1, 3, 48, 48, device=DEV)
    with pytest.raises(ValueError, match="head dim"):
        ops._chunk_attention_fwd(q, q, q, q, R, 16, 0, 0.1, 0.1)
    with pytest.raises(ValueError, match="head dim"):
        ops._chunk_states_fwd(q, q, 16)


def test_error_chunk_size():
    q, k, v, qs, R = small(chunk=16)
    for bad in (24, 8, 512):
        with pytest.raises(ValueError, match="chunk_size"):
            ops._chunk_attention_fwd(q, k, v, qs, R, bad, 0, 0.1, 0.1)


def test_error_state_dim():
    q, k, v, _, _ = small()
    gen = torch.Generator(device=DEV).manual_seed(10)
    qs = token(1, 1, 40, 12, torch.bfloat16, gen)
    R = torch.zeros(1, 1, 3, 12, 64, device=DEV)
    with pytest.raises(ValueError, match="state dim"):
        ops._chunk_attention_fwd(q, k, v, qs, R, 16, 0, 0.1, 0.1)


def test_error_dtype():
    q, k, v, qs, R = small()
    with pytest.raises(TypeError, match="float64"):
        ops._chunk_attention_fwd(q.double(), k.double(), v.double(), qs.double(), R.double(), 16, 0, 0.1, 0.1)
    with pytest.raises(TypeError, match="float32"):
        ops._chunk_attention_fwd(q, k, v, qs, R.half(), 16, 0, 0.1, 0.1)


def test_error_devices():
    q, k, v, qs, R = small()
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops._chunk_attention_fwd(q, k.cpu(), v, qs, R, 16, 0, 0.1, 0.1)


# ----------------------------------------------------------------------------- public op, opcheck


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_bsbr_attention(dtype):
    b, h, n, d, chunk, w = 2, 2, 170, 64, 32, 8
    gen = torch.Generator(device=DEV).manual_seed(11)
    q, k, v, _, _, mq, mk, _ = attn_inputs(b, h, n, d, d, chunk, dtype, gen)
    ins = [x.detach().requires_grad_(True) for x in (q, k, v, mq, mk)]
    out = ops.bsbr_attention(*ins, chunk_size=chunk, chunk_overlap=w)
    g = torch.randn(out.shape, generator=gen, device=DEV).to(dtype)
    got = torch.autograd.grad(out, ins, g)
    f = lambda *a: ref.bsbr_attention(*a, chunk_size=chunk, chunk_overlap=w)  # noqa: E731
    truth, tg = grads(f, [x.double() for x in (q, k, v, mq, mk)], g.double())
    lowp, lg = grads(f, [q, k, v, mq, mk], g)
    check("out", out, truth, lowp)
    for name, a, t, l_ in zip(["q", "k", "v", "meta_q", "meta_k"], got, tg, lg):
        check("grad_" + name, a, t, l_)


def test_opcheck_internal_ops():
    b, h, n, d, ds, chunk, w = 1, 2, 70, 64, 16, 32, 5
    skip_unless_compiled(torch.float32, d)
    gen = torch.Generator(device=DEV).manual_seed(12)
    q, k, v, qs, ks, mq, mk, R = attn_inputs(b, h, n, d, ds, chunk, torch.float32, gen)
    scale, ms, ss = scales(d, mq.shape[-1], ds, chunk)
    states = ops._chunk_states_fwd(ks, v, chunk)
    out, lse = ops._chunk_attention_fwd(q, k, v, qs, R, chunk, w, scale, ss)
    g = torch.randn_like(out)
    cases = [
        (ops._chunk_states_fwd, (ks, v, chunk)),
        (ops._chunk_states_bwd, (torch.randn_like(states), ks, v, chunk)),
        (ops._block_retrieval_fwd, (mq, mk, states, ms)),
        (ops._block_retrieval_bwd, (torch.randn_like(states), mq, mk, states, ms)),
        (ops._chunk_attention_fwd, (q, k, v, qs, R, chunk, w, scale, ss)),
        (ops._chunk_attention_bwd, (g, q, k, v, qs, R, out, lse, chunk, w, scale, ss)),
        (ops._bsbr_attention_fwd, (q, k, v, mq, mk, qs, ks, chunk, w, scale, ms, ss)),
        (ops._bsbr_attention_bwd, (g, q, k, v, mq, mk, qs, ks, out, lse, chunk, w, scale, ms, ss)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:Synchronization debug mode:UserWarning")
def test_public_op_opcheck_and_no_host_sync(dtype):
    b, h, n, d, chunk, w = 1, 2, 70, 64, 32, 5
    gen = torch.Generator(device=DEV).manual_seed(13)
    q, k, v, _, _, mq, mk, _ = attn_inputs(b, h, n, d, d, chunk, dtype, gen)
    ins = [x.detach().requires_grad_(True) for x in (q, k, v, mq, mk)]
    torch.library.opcheck(ops.bsbr_attention.default, (*ins, None, None),
                          dict(chunk_size=chunk, chunk_overlap=w))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        out = ops.bsbr_attention(*ins, chunk_size=chunk, chunk_overlap=w)
        torch.autograd.grad(out, ins, torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
