"""A small forward + backward of every CUDA op, for compute-sanitizer runs."""
import math
import os

import torch

import bsbr_ext._C  # noqa: F401
ops = torch.ops.bsbr
# The last two (no overlap, chunks of 128 / 32) run dQ, dK and dV in one kernel on Hopper, at
# d = 64 too (which by default runs the dK/dV and dQ kernels).
os.environ["BSBR_ATTN_DQKV"] = "1"
for dtype, d, n, B, w in [(torch.bfloat16, 64, 150, 48, 20), (torch.float32, 32, 77, 16, 16), (torch.float16, 128, 100, 64, 64),
                          (torch.bfloat16, 128, 300, 128, 0), (torch.float16, 64, 100, 32, 0)]:
    b, h, ds = 2, 2, d // 2
    C = (n + B - 1) // B
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
    qs, ks = (torch.randn(b, h, n, ds, device="cuda", dtype=dtype) for _ in range(2))
    mq, mk = (torch.randn(b, h, C, 16, device="cuda", dtype=dtype) for _ in range(2))
    sc, ms, ss = 1 / math.sqrt(d), 0.25, 1 / (B * math.sqrt(ds))
    try:
        out, lse = ops._bsbr_attention_fwd(q, k, v, mq, mk, qs, ks, B, w, sc, ms, ss)
    except (ValueError, TypeError) as e:  # dtype / head dim not compiled into this build
        if "not compiled" not in str(e):
            raise
        print(dtype, d, "skipped:", e)
        continue
    g = torch.randn_like(out)
    grads = ops._bsbr_attention_bwd(g, q, k, v, mq, mk, qs, ks, out, lse, B, w, sc, ms, ss)
    # States omitted (k_state = k): the chunk-states backward runs inside the dK/dV kernel.
    out2, lse2 = ops._bsbr_attention_fwd(q, k, v, mq, mk, None, None, B, w, sc, ms, ss)
    ops._bsbr_attention_bwd(g, q, k, v, mq, mk, None, None, out2, lse2, B, w, sc, ms, ss)
    # One head per group: each group's chunk states overlap the previous group's dK/dV on Hopper.
    os.environ["BSBR_GROUP_STATE_BYTES"] = "1"
    ops._bsbr_attention_bwd(g, q, k, v, mq, mk, None, None, out2, lse2, B, w, sc, ms, ss)
    del os.environ["BSBR_GROUP_STATE_BYTES"]
    st = ops._chunk_states_fwd(ks, v, B)
    ops._chunk_states_bwd(st, ks, v, B)
    torch.cuda.synchronize()
    print(dtype, d, "ok", out.float().abs().mean().item(), [x.float().abs().mean().item() for x in grads])

# The d = 128 forward is persistent: 426 tiles of 128 rows make each CTA (one per SM) walk
# several, with several chunks of 48 per tile.
for dtype in (torch.bfloat16, torch.float16):
    b, h, n, d, ds, B, w = 2, 3, 9000, 128, 24, 48, 20
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
    qs = torch.randn(b, h, n, ds, device="cuda", dtype=dtype)
    R = torch.randn(b, h, (n + B - 1) // B, ds, d, device="cuda")
    try:
        out, lse = ops._chunk_attention_fwd(q, k, v, qs, R, B, w, 1 / math.sqrt(d), 0.01)
        out2, _ = ops._chunk_attention_fwd(q, k, v, q, torch.randn(b, h, R.shape[2], d, d, device="cuda"), B, w, 1 / math.sqrt(d), 0.01)
    except (ValueError, TypeError) as e:
        if "not compiled" not in str(e):
            raise
        print(dtype, d, "skipped:", e)
        continue
    torch.cuda.synchronize()
    print(dtype, d, "persistent forward ok", out.float().abs().mean().item(), out2.float().abs().mean().item())

# Decode ops: one step per row at mixed positions (first chunk, chunk boundary, later chunk).
for dtype in (torch.bfloat16, torch.float32, torch.float16):
    b, h, d, ds, B, w, cap = 3, 2, 64, 32, 16, 5, 4
    q, k, v = (torch.randn(b, h, d, device="cuda", dtype=dtype) for _ in range(3))
    qs = torch.randn(b, h, ds, device="cuda", dtype=dtype)
    wk, wv = (torch.randn(b, h, w + B, d, device="cuda", dtype=dtype) for _ in range(2))
    ret = torch.randn(b, h, ds, d, device="cuda")
    pos = torch.tensor([3, B - 1, 2 * B + 7], device="cuda")
    o = ops.decode_attention(q, k, v, wk, wv, ret, pos, qs, chunk_size=B, chunk_overlap=w)
    mq = torch.randn(b, h, d, device="cuda", dtype=dtype)
    mk = torch.randn(b, h, cap, d, device="cuda", dtype=dtype)
    st = torch.randn(b, h, cap, ds, d, device="cuda")
    r = ops.decode_retrieval(mq, mk, st, torch.tensor([0, 2, cap], device="cuda"))
    torch.cuda.synchronize()
    print(dtype, "decode ok", o.float().abs().mean().item(), r.abs().mean().item())
