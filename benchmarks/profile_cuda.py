"""Where the time of one fused forward + backward goes on CUDA: torch.profiler's kernel table
(device time per kernel) and the host time per call, for the issue-3 shapes.

    python benchmarks/profile_cuda.py --head-dim 64 --lengths 4k,64k

With --ncu the script instead runs, after warm-up, one forward and one forward+backward per
length between cudaProfilerStart/Stop, for Nsight Compute to read the hardware counters of
exactly those kernels; benchmarks/ncu_run.sh runs it under ncu with the sections and metrics
that benchmarks/ncu_summary.py tabulates:

    bash benchmarks/ncu_run.sh OUTDIR 64k "64 128"
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bsbr_ext


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--lengths", default="4k,64k")
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--cpu-rows", type=int, default=0,
                   help="also print this many rows sorted by self CPU time (host-bound cases)")
    p.add_argument("--ncu", action="store_true",
                   help="profile one fwd and one fwd+bwd per length for ncu (no torch profiler)")
    args = p.parse_args()
    for text in args.lengths.split(","):
        n = int(text.lower().replace("k", "")) * (1024 if "k" in text.lower() else 1)
        d, h, bsz = args.head_dim, args.heads, args.chunk_size
        c = (n + bsz - 1) // bsz
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        mq, mk = (torch.randn(1, h, c, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        g = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)

        def step():
            out = bsbr_ext.bsbr_attention(q, k, v, mq, mk, bsz)
            torch.autograd.grad(out, (q, k, v, mq, mk), g)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        if args.ncu:
            torch.cuda.cudart().cudaProfilerStart()
            with torch.no_grad():
                bsbr_ext.bsbr_attention(q, k, v, mq, mk, bsz)
            step()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            continue
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        host = (time.perf_counter() - t0) / 20
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 20
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n== n={n} d={d} h={h} B={bsz}: host time to issue one fwd+bwd {host * 1e3:.3f} ms, "
              f"wall per call {wall * 1e3:.3f} ms (5 profiled calls below)")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60))
        if args.cpu_rows:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.cpu_rows,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
