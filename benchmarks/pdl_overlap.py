"""Do the overlapped launches overlap? (docs/cuda_notes.md, "Independent kernels overlapped on the
one stream"). Three fused forward+backward calls at 64k, bf16, b=1, h=16, chunk 128, d = 64 and
128, under the torch profiler, with BSBR_PDL=0 and by default: for each adjacent pair of kernels
(retrieval weights -> chunk states, dP -> dQ, meta gradients -> the last group's dK/dV or
dQ/dK/dV), how long the first ran past the second's start,
and the sum of kernel times against the span from the first start to the last end.
Run from the repository root after an in-place build: PYTHONPATH=python python3 benchmarks/pdl_overlap.py
"""
import math
import os

import torch
import bsbr_ext._C  # noqa
from torch.profiler import profile, ProfilerActivity
ops = torch.ops.bsbr
for d in (64, 128):
    b, h, n, B, dm = 1, 16, 65536, 128, d
    C = n // B
    q, k, v, g = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    mq, mk = (torch.randn(b, h, C, dm, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a = (B, 0, 1 / math.sqrt(d), 1 / math.sqrt(dm), 1 / (B * math.sqrt(d)))
    def step():
        out, lse = ops._bsbr_attention_fwd(q, k, v, mq, mk, None, None, *a)
        ops._bsbr_attention_bwd(g, q, k, v, mq, mk, None, None, out, lse, *a)
    for pdl in ("0", "1"):
        os.environ["BSBR_PDL"] = pdl
        step(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3): step()
            torch.cuda.synchronize()
        ev = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                    key=lambda e: e.time_range.start)
        pairs = {"meta_probs->states_fwd": 0, "scores->attn_dq": 0, "meta_grads->attn_dkv": 0,
                 "meta_grads->attn_dqkv": 0}
        ov = {k_: 0.0 for k_ in pairs}
        for x, y in zip(ev, ev[1:]):
            for key in pairs:
                p0, p1 = key.split("->")
                if p0 in x.name and p1 in y.name:
                    pairs[key] += 1
                    ov[key] += max(0.0, x.time_range.end - y.time_range.start)
        gpu = sum(e.time_range.end - e.time_range.start for e in ev) / 3
        span = (ev[-1].time_range.end - ev[0].time_range.start) / 3
        print(f"d={d} BSBR_PDL={pdl}: adjacent pairs {pairs}, overlap us per pair "
              f"{ {k_: round(ov[k_] / max(1, pairs[k_]), 1) for k_ in ov} }, kernel sum {gpu:.0f} us, span {span:.0f} us per fwd+bwd")
