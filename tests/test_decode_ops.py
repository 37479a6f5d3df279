"""The streaming-decode ops (decode_attention, decode_retrieval) against bsbr_ext.reference, on
CPU and CUDA: mixed positions in one batch (first chunk, later chunks, chunk boundaries), the
in-place window writes, num_chunks from 0 to capacity (and clamped beyond), opcheck, bad inputs.

Tolerances. The truth is the reference run in fp64 on the very inputs the kernel gets (already
rounded to the kernel's dtype), so input rounding plays no part. fp32: both compute in fp32 ->
relative error ~1e-6, checked at 1e-5. fp16/bf16: the kernel (like the reference in that dtype)
computes in fp32 and rounds the output once to the input dtype, so its error is at most about one
unit roundoff of the output dtype (2^-8 bf16, 2^-11 fp16); checked as <= 2x the error of the
reference run in the same dtype plus a small floor, and below that unit roundoff. decode_retrieval
returns fp32 whatever the dtype of meta_q/meta_k: 1e-5 for every dtype.
"""

from __future__ import annotations

import pytest
import torch

from bsbr_ext import functional as fn
from bsbr_ext import reference as ref

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"bsbr::{op}", key)


def device_marks(device: str):
    """CPU cases skip (with a reason) until the CPU decode kernels are built in; CUDA cases skip
    without a GPU."""
    if device == "cuda":
        return [cuda_only]
    return [pytest.mark.skipif(
        not (_has_kernel("_decode_attention", "CPU") and _has_kernel("_decode_retrieval", "CPU")),
        reason="CPU decode kernels (cpp/cpu/decode_cpu.cpp) are not in this build")]


def device_param(device: str):
    return pytest.param(device, marks=device_marks(device), id=device)


DEVICES = [device_param("cpu"), device_param("cuda")]
# Validation runs in the public op, before any device kernel: CPU cases need no CPU kernel.
BAD_DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only, id="cuda")]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8,
                 torch.float64: 2.0**-53}


def rel_err(x, truth):
    return ((x.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-30)).item()


def check_close(out, out_ref_same_dtype, truth, dtype):
    err = rel_err(out, truth)
    if dtype in (torch.float32, torch.float64):
        assert err <= (1e-5 if dtype == torch.float32 else 1e-12), err
    else:
        ref_err = rel_err(out_ref_same_dtype, truth)
        floor = {torch.bfloat16: 2e-4, torch.float16: 5e-5}[dtype]
        assert err <= 2 * ref_err + floor, (err, ref_err)
        assert err <= UNIT_ROUNDOFF[dtype], err


# ---- decode_attention -------------------------------------------------------------------------


def positions_for(b, chunk, seed):
    """b positions mixing the first chunk (incl. t = 0 and its last token), chunk boundaries
    (p = 0 of a later chunk) and mid/last tokens of later chunks."""
    base = [0, chunk, chunk - 1, 3 * chunk + chunk // 2, 2 * chunk, 5 * chunk + chunk - 1,
            chunk // 3, 7 * chunk + 1]
    if b <= len(base):
        return base[:b]
    gen = torch.Generator().manual_seed(seed)
    return base + torch.randint(0, 20 * chunk, (b - len(base),), generator=gen).tolist()


def make_decode_inputs(b, h, d, ds, chunk, overlap, dtype, device, positions=None, seed=0,
                       q_state=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    slots = overlap + chunk
    pos = positions if positions is not None else positions_for(b, chunk, seed)
    position = torch.tensor(pos, dtype=torch.int64, device=device)
    q, k, v = rnd(b, h, d), rnd(b, h, d), rnd(b, h, d)
    window_k, window_v = rnd(b, h, slots, d), rnd(b, h, slots, d)
    # Slots outside a row's window W(t) (and the slot about to be written) hold large garbage:
    # a kernel reading them gives a visibly wrong answer.
    for r, t in enumerate(pos):
        c, p = t // chunk, t % chunk
        lo = overlap if c == 0 else 0
        bad = [u for u in range(slots) if u < lo or u >= overlap + p]
        window_k[r, :, bad] = 30.0
        window_v[r, :, bad] = 1000.0
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    retrieved = rnd(b, h, ds, d, dt=state_dtype)
    qs = rnd(b, h, ds) if q_state else None
    return q, k, v, window_k, window_v, retrieved, position, qs


def run_attention(impl, xs, chunk, overlap, scale=None, state_scale=None, cast=None):
    q, k, v, wk, wv, retrieved, position, qs = xs
    wk, wv = wk.clone(), wv.clone()
    args = [q, k, v, wk, wv, retrieved]
    if cast is not None:
        args = [a.to(cast) for a in args]
        wk, wv = args[3], args[4]
        qs = None if qs is None else qs.to(cast)
    out = impl(*args, position, chunk, overlap, scale=scale, state_scale=state_scale, q_state=qs)
    return out, wk, wv


# (b, h, d, ds, chunk, overlap) per device.
ATTN_CASES = {
    "cpu": [
        (4, 3, 5, 5, 16, 0),       # odd d
        (5, 2, 7, 3, 16, 7),       # odd d, ds < d, partial overlap
        (6, 2, 8, 8, 33, 33),      # odd chunk, overlap == B
        (3, 1, 4, 6, 1, 1),        # B == 1, ds > d
        (8, 2, 64, 32, 128, 40),
        (4, 2, 32, 32, 128, 128),
    ],
    "cuda": [
        (4, 3, 32, 32, 16, 0),
        (5, 2, 64, 16, 16, 7),
        (8, 4, 64, 64, 128, 0),
        (8, 2, 64, 64, 128, 40),
        (6, 2, 128, 128, 128, 128),
        (4, 2, 128, 64, 33, 33),    # odd chunk size
        (3, 2, 5, 3, 16, 5),        # odd d: scalar loads
        (4, 2, 36, 24, 256, 256),   # 512 window slots; d not a multiple of 8 (scalar for fp16/bf16)
    ],
}


def case_params(table, names):
    """pytest params (device, case, dtype) of every case of ``table`` in each device's dtypes; the
    id spells the case's fields with ``names``."""
    dtypes = {"cpu": [torch.float32, torch.float64, torch.bfloat16],
              "cuda": [torch.float32, torch.bfloat16, torch.float16]}
    return [pytest.param(device, case, dtype, marks=device_marks(device),
                         id=f"{device}-" + "".join(f"{k}{v}" for k, v in zip(names, case))
                            + f"-{str(dtype).split('.')[-1]}")
            for device in ("cpu", "cuda") for case in table[device] for dtype in dtypes[device]]


ATTN_PARAMS = case_params(ATTN_CASES, ["b", "h", "d", "ds", "B", "w"])


@pytest.mark.parametrize("device,case,dtype", ATTN_PARAMS)
def test_decode_attention_matches_reference(device, case, dtype):
    b, h, d, ds, chunk, overlap = case
    xs = make_decode_inputs(b, h, d, ds, chunk, overlap, dtype, device)
    # state_scale=0.5 makes the long-range term as large as the local one.
    for state_scale in (None, 0.5):
        out, wk, wv = run_attention(fn.decode_attention, xs, chunk, overlap, state_scale=state_scale)
        out_ref, wk_ref, wv_ref = run_attention(ref.decode_attention, xs, chunk, overlap,
                                                state_scale=state_scale)
        truth, _, _ = run_attention(ref.decode_attention, xs, chunk, overlap,
                                    state_scale=state_scale, cast=torch.float64)
        assert out.dtype == dtype and out.shape == (b, h, d)
        assert torch.isfinite(out).all()
        check_close(out, out_ref, truth, dtype)
        # In-place writes: exactly slot w + t % B of every row changed, to the new k / v.
        assert torch.equal(wk, wk_ref) and torch.equal(wv, wv_ref)
        q, k, v, wk0, wv0, _, position, _ = xs
        for r, t in enumerate(position.tolist()):
            slot = overlap + t % chunk
            assert torch.equal(wk[r, :, slot], k[r]) and torch.equal(wv[r, :, slot], v[r])
            others = [u for u in range(overlap + chunk) if u != slot]
            assert torch.equal(wk[r, :, others], wk0[r, :, others])
            assert torch.equal(wv[r, :, others], wv0[r, :, others])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_defaults_and_explicit_scale(device):
    """q_state omitted (q is used, ds = d) and an explicit scale."""
    b, h, d, chunk, overlap = 4, 2, 32, 16, 4
    xs = make_decode_inputs(b, h, d, d, chunk, overlap, torch.float32, device, q_state=False)
    for scale in (None, 0.3):
        out, _, _ = run_attention(fn.decode_attention, xs, chunk, overlap, scale=scale)
        truth, _, _ = run_attention(ref.decode_attention, xs, chunk, overlap, scale=scale,
                                    cast=torch.float64)
        assert rel_err(out, truth) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_streams_like_the_full_op(device):
    """Decoding a sequence token by token (windows rolled as python/bsbr_ext/cache.py does) gives
    the outputs of the full bsbr_attention, whose retrieved states come from chunk_states and
    block_retrieval of the tokens so far."""
    torch.manual_seed(0)
    b, h, n, d, chunk, overlap = 1, 2, 40, 16, 8, 3
    dtype = torch.float32
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=device) for _ in range(3))
    C = -(-n // chunk)
    meta_q, meta_k = (torch.randn(b, h, C, 8, dtype=dtype, device=device) for _ in range(2))
    full = ref.bsbr_attention(q.double(), k.double(), v.double(), meta_q.double(), meta_k.double(),
                              chunk, overlap)
    states = ref.chunk_states(k, v, chunk)  # [b, h, C, d, d] fp32
    retrieved_all = ref.block_retrieval(meta_q, meta_k, states)
    wk = torch.zeros(b, h, overlap + chunk, d, dtype=dtype, device=device)
    wv = torch.zeros_like(wk)
    for t in range(n):
        c, p = t // chunk, t % chunk
        if p == 0 and c > 0 and overlap > 0:  # roll: the last w tokens of the previous chunk
            wk[:, :, :overlap] = wk[:, :, chunk:chunk + overlap].clone()
            wv[:, :, :overlap] = wv[:, :, chunk:chunk + overlap].clone()
        position = torch.full((b,), t, dtype=torch.int64, device=device)
        o = fn.decode_attention(q[:, :, t], k[:, :, t], v[:, :, t], wk, wv, retrieved_all[:, :, c],
                                position, chunk, overlap)
        assert rel_err(o, full[:, :, t]) <= 1e-5, t


@cuda_only
def test_decode_attention_noncontiguous_cuda():
    """The public op makes strided inputs contiguous; the result equals the contiguous one."""
    b, h, d, chunk, overlap = 3, 2, 64, 16, 4
    xs = make_decode_inputs(b, h, d, d, chunk, overlap, torch.bfloat16, "cuda")
    q, k, v, wk, wv, retrieved, position, qs = xs
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    out1 = fn.decode_attention(q, k, v, wk.clone(), wv.clone(), retrieved, position, chunk, overlap,
                               q_state=qs)
    out2 = fn.decode_attention(qt, k, v, wk.clone(), wv.clone(), retrieved, position, chunk, overlap,
                               q_state=qs)
    assert torch.equal(out1, out2)


# ---- decode_retrieval -------------------------------------------------------------------------


def make_retrieval_inputs(b, h, cap, dm, ds, d, dtype, device, num_chunks, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    meta_q = rnd(b, h, dm, scale=spread)
    meta_k = rnd(b, h, cap, dm)
    states = rnd(b, h, cap, ds, d, dt=state_dtype)
    nc = torch.tensor(num_chunks, dtype=torch.int64, device=device)
    return meta_q, meta_k, states, nc


# (b, h, cap, dm, ds, d, num_chunks per row) per device; num_chunks 0, 1, cap, mid, < 0, > cap.
RETR_CASES = {
    "cpu": [
        (4, 3, 9, 5, 3, 7, [0, 9, 4, 1]),
        (6, 2, 17, 8, 8, 8, [17, 0, -3, 40, 16, 2]),
        (2, 1, 1, 3, 5, 5, [1, 0]),
        (3, 2, 64, 16, 32, 64, [64, 33, 0]),
    ],
    "cuda": [
        (4, 3, 9, 5, 3, 7, [0, 9, 4, 1]),           # odd dm, ds*d % 4 != 0: scalar loads
        (6, 2, 17, 8, 8, 8, [17, 0, -3, 40, 16, 2]),
        (2, 4, 64, 64, 64, 64, [64, 37]),
        (3, 2, 130, 32, 32, 128, [130, 0, 129]),
        (2, 2, 1500, 64, 16, 64, [1500, 1025]),     # more than one block of 1024 weights
        (1, 1, 1024, 256, 8, 32, [1024]),           # dm = 256
    ],
}


RETR_PARAMS = case_params(RETR_CASES, ["b", "h", "cap", "dm", "ds", "d"])


@pytest.mark.parametrize("device,case,dtype", RETR_PARAMS)
def test_decode_retrieval_matches_reference(device, case, dtype):
    b, h, cap, dm, ds, d, num_chunks = case
    # spread 3: peaked softmax weights (logit ranges of tens), so the max-subtraction matters.
    for spread in (1.0, 3.0):
        meta_q, meta_k, states, nc = make_retrieval_inputs(b, h, cap, dm, ds, d, dtype, device,
                                                           num_chunks, spread=spread)
        out = fn.decode_retrieval(meta_q, meta_k, states, nc)
        truth = ref.decode_retrieval(meta_q.double(), meta_k.double(), states.double(), nc)
        assert out.dtype == states.dtype and out.shape == (b, h, ds, d)
        assert torch.isfinite(out).all()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for r, n in enumerate(num_chunks):
            if n <= 0:
                assert torch.equal(out[r], torch.zeros_like(out[r]))  # exactly 0, never NaN
            else:
                assert rel_err(out[r], truth[r]) <= tol, (r, rel_err(out[r], truth[r]))
        ms = 0.7
        out = fn.decode_retrieval(meta_q, meta_k, states, nc, meta_scale=ms)
        truth = ref.decode_retrieval(meta_q.double(), meta_k.double(), states.double(), nc,
                                     meta_scale=ms)
        assert rel_err(out, truth) <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_decode_retrieval_matches_block_retrieval(device):
    """Row c of block_retrieval equals decode_retrieval with num_chunks = c."""
    b, h, C, dm, ds, d = 2, 2, 6, 8, 4, 8
    meta_q, meta_k, states, _ = make_retrieval_inputs(b, h, C, dm, ds, d, torch.float32, device,
                                                      [0] * b)
    full_q = torch.randn(b, h, C, dm, device=device)
    full = fn.block_retrieval(full_q, meta_k, states)
    for c in range(C):
        nc = torch.full((b,), c, dtype=torch.int64, device=device)
        out = fn.decode_retrieval(full_q[:, :, c].contiguous(), meta_k, states, nc)
        torch.testing.assert_close(out, full[:, :, c], rtol=1e-5, atol=1e-6)


@cuda_only
def test_decode_retrieval_deterministic_cuda():
    meta_q, meta_k, states, nc = make_retrieval_inputs(2, 16, 1024, 64, 64, 64, torch.bfloat16,
                                                       "cuda", [1024, 700])
    a = fn.decode_retrieval(meta_q, meta_k, states, nc)
    b = fn.decode_retrieval(meta_q, meta_k, states, nc)
    assert torch.equal(a, b)


# ---- opcheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_decode_attention(device, dtype):
    b, h, d, chunk, overlap = 3, 2, 16, 16, 4
    q, k, v, wk, wv, retrieved, position, qs = make_decode_inputs(b, h, d, 8, chunk, overlap,
                                                                  dtype, device)
    torch.library.opcheck(torch.ops.bsbr.decode_attention.default,
                          (q, k, v, wk, wv, retrieved, position, qs),
                          {"chunk_size": chunk, "chunk_overlap": overlap})
    torch.library.opcheck(torch.ops.bsbr.decode_attention.default,
                          (q, k, v, wk, wv, torch.randn(b, h, d, d, dtype=retrieved.dtype, device=device),
                           position, None),
                          {"chunk_size": chunk, "chunk_overlap": overlap, "scale": 0.2,
                           "state_scale": 0.5})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_decode_retrieval(device, dtype):
    args = make_retrieval_inputs(3, 2, 7, 8, 4, 8, dtype, device, [0, 7, 3])
    torch.library.opcheck(torch.ops.bsbr.decode_retrieval.default, args, {})
    torch.library.opcheck(torch.ops.bsbr.decode_retrieval.default, args, {"meta_scale": 0.5})


# ---- bad inputs -------------------------------------------------------------------------------


def _attn_args(device, dtype=torch.float32, d=16, ds=8, chunk=16, overlap=4):
    q, k, v, wk, wv, retrieved, position, qs = make_decode_inputs(2, 2, d, ds, chunk, overlap,
                                                                  dtype, device)
    return dict(q=q, k=k, v=v, window_k=wk, window_v=wv, retrieved=retrieved, position=position,
                q_state=qs, chunk_size=chunk, chunk_overlap=overlap)


def _call_attention(a):
    return fn.decode_attention(a["q"], a["k"], a["v"], a["window_k"], a["window_v"], a["retrieved"],
                               a["position"], a["chunk_size"], a["chunk_overlap"],
                               q_state=a["q_state"])


# (id, argument replaced, new value, exception, message pattern)
ATTN_BAD = [
    ("q_rank", "q", lambda a: a["q"][:, :, None], ValueError, "q must be a 3-D"),
    ("k_shape", "k", lambda a: a["k"][:, :, :-1], ValueError, "k must have shape .* with the shape of q"),
    ("v_dtype", "v", lambda a: a["v"].double(), TypeError, "v must have the same dtype as q"),
    ("window_k_shape", "window_k", lambda a: a["window_k"][:, :, :-1], ValueError, "window_k"),
    ("window_v_shape", "window_v", lambda a: a["window_v"][:, :, :, :-1], ValueError, "window_v"),
    ("window_k_strided", "window_k", lambda a: a["window_k"].transpose(0, 1).contiguous().transpose(0, 1),
     ValueError, "window_k must be contiguous"),
    ("retrieved_dtype", "retrieved", lambda a: a["retrieved"].half(), TypeError, "retrieved"),
    ("retrieved_shape", "retrieved", lambda a: a["retrieved"][:, :, 1:], ValueError, "retrieved"),
    ("position_dtype", "position", lambda a: a["position"].int(), TypeError, "position"),
    ("position_shape", "position", lambda a: a["position"][:1], ValueError, "position"),
    ("q_state_shape", "q_state", lambda a: a["q_state"][:1], ValueError, "q_state"),
]


@pytest.mark.parametrize("device", BAD_DEVICES)
@pytest.mark.parametrize("name,key,mutate,exc,match", ATTN_BAD, ids=[x[0] for x in ATTN_BAD])
def test_decode_attention_bad_inputs(device, name, key, mutate, exc, match):
    a = _attn_args(device)
    a[key] = mutate(a)
    with pytest.raises(exc, match=match):
        _call_attention(a)


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_decode_attention_bad_chunking(device):
    a = _attn_args(device)
    a["chunk_overlap"] = 20
    with pytest.raises(ValueError, match="chunk_overlap"):
        _call_attention(a)
    a = _attn_args(device)
    a["chunk_size"] = 0
    with pytest.raises(ValueError, match="chunk_size"):
        _call_attention(a)


RETR_BAD = [
    ("meta_q", lambda x: (x[0][:, :, None], x[1], x[2], x[3]), ValueError, "meta_q"),
    ("meta_k", lambda x: (x[0], x[1][..., :-1], x[2], x[3]), ValueError, "meta_k"),
    ("meta_k_dtype", lambda x: (x[0], x[1].half(), x[2], x[3]), TypeError, "meta_k"),
    ("states", lambda x: (x[0], x[1], x[2][:, :, :-1], x[3]), ValueError, "states"),
    ("states_dtype", lambda x: (x[0], x[1], x[2].half(), x[3]), TypeError, "states"),
    ("num_chunks", lambda x: (x[0], x[1], x[2], x[3].float()), TypeError, "num_chunks"),
    ("num_chunks_shape", lambda x: (x[0], x[1], x[2], x[3][:1]), ValueError, "num_chunks"),
]


@pytest.mark.parametrize("device", BAD_DEVICES)
@pytest.mark.parametrize("name,mutate,exc,match", RETR_BAD, ids=[x[0] for x in RETR_BAD])
def test_decode_retrieval_bad_inputs(device, name, mutate, exc, match):
    x = make_retrieval_inputs(2, 2, 5, 8, 4, 8, torch.float32, device, [3, 0])
    with pytest.raises(exc, match=match):
        fn.decode_retrieval(*mutate(x))


@cuda_only
def test_decode_cuda_limits():
    # Beyond the CUDA kernels' limits: clear errors naming the limit.
    a = _attn_args("cuda", d=264, ds=8)
    with pytest.raises(ValueError, match="head dim d .* <= 256"):
        _call_attention(a)
    a = _attn_args("cuda", d=16, ds=300)
    with pytest.raises(ValueError, match="state dim ds .* <= 256"):
        _call_attention(a)
    a = _attn_args("cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*CUDA does not support"):
        _call_attention(a)
    x = make_retrieval_inputs(2, 2, 5, 300, 4, 8, torch.float32, "cuda", [3, 0])
    with pytest.raises(ValueError, match="meta dim dm .* <= 256"):
        fn.decode_retrieval(*x)
    x = make_retrieval_inputs(2, 2, 5, 8, 4, 8, torch.float64, "cuda", [3, 0])
    with pytest.raises(TypeError, match="float64.*CUDA does not support"):
        fn.decode_retrieval(*x)
    # Mixed devices: the public op names the argument.
    a = _attn_args("cuda")
    a["position"] = a["position"].cpu()
    with pytest.raises(ValueError, match="position"):
        _call_attention(a)
