#!/usr/bin/env python
"""BSBR attention benchmark: our kernels vs the plain-PyTorch reference (eager and compiled) vs
full causal SDPA, side by side in one run. Median time, spread and peak extra memory.

Defaults follow the project's issues:
  --device cpu   (issue 2): fp32, b=1, h=4, d=64, chunk 128, n = 1k, 4k, 16k;
                 impls bsbr, reference, sdpa (add `compiled` with --impls if wanted).
  --device cuda  (issue 3): bf16, b=1, h=16, chunk 128, d in {64, 128}, n in {1k, 4k, 16k, 64k};
                 impls bsbr, reference, compiled, sdpa.

Examples:
  python benchmarks/bench_attention.py --device cpu --markdown
  python benchmarks/bench_attention.py --device cuda --json out/bench_cuda.json --markdown
  python benchmarks/bench_attention.py --device cpu --lengths 1k,4k --modes fwd --impls bsbr,sdpa

Method: see benchmarks/README.md (timing and memory helpers live in bsbr_ext._bench).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bsbr_ext import _bench as B

DEFAULTS = {
    "cpu": dict(dtype="fp32", heads=4, head_dim=[64], lengths=[1024, 4096, 16384],
                impls=["bsbr", "reference", "sdpa"]),
    "cuda": dict(dtype="bf16", heads=16, head_dim=[64, 128], lengths=[1024, 4096, 16384, 65536],
                 impls=["bsbr", "reference", "compiled", "sdpa"]),
}


def int_list(s: str) -> list[int]:
    """'1k,4k,16384' -> [1024, 4096, 16384]."""
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if not x:
            continue
        mult = 1
        if x.endswith("k"):
            x, mult = x[:-1], 1024
        elif x.endswith("m"):
            x, mult = x[:-1], 1024 * 1024
        out.append(int(x) * mult)
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def str_list(allowed):
    def parse(s: str) -> list[str]:
        vals = [x.strip() for x in s.split(",") if x.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{bad or s!r}: choose from {','.join(allowed)}")
        return vals
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="fp32 | bf16 | fp16 | fp64 (default: fp32 cpu, bf16 cuda)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help="default: 4 cpu, 16 cuda")
    p.add_argument("--head-dim", type=int_list, help="list, default: 64 cpu, 64,128 cuda")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--chunk-overlap", type=int, default=0)
    p.add_argument("--lengths", type=int_list,
                   help="list, e.g. 1k,4k,16k (default: 1k,4k,16k cpu; 1k,4k,16k,64k cuda)")
    p.add_argument("--modes", type=str_list(B.MODES), default=list(B.MODES),
                   help="fwd,fwdbwd (default both)")
    p.add_argument("--impls", type=str_list(B.IMPLS),
                   help="subset of bsbr,reference,compiled,sdpa "
                        "(default: bsbr,reference,sdpa cpu; all four cuda)")
    p.add_argument("--json", metavar="PATH", help="write environment, config and every result")
    p.add_argument("--markdown", action="store_true", help="also print markdown tables")
    p.add_argument("--budget", type=float,
                   help="seconds of timed calls per impl and case (default 3 cpu, 1 cuda)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-bw", type=float, metavar="TB/S",
                   help="card bandwidth for the %% column (default: datasheet by card name)")
    p.add_argument("--no-copy-bw", action="store_true",
                   help="CUDA: skip measuring device-to-device copy bandwidth")
    args = p.parse_args(argv)
    d = DEFAULTS[args.device]
    args.dtype = args.dtype or d["dtype"]
    B.parse_dtype(args.dtype)
    args.heads = args.heads or d["heads"]
    args.head_dim = args.head_dim or d["head_dim"]
    args.lengths = args.lengths or d["lengths"]
    args.impls = args.impls or d["impls"]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = B.environment()
    print(f"torch {env['torch']}, python {env['python']}, {env['cpu']}, "
          f"{env['cpu_threads']} CPU threads")
    print(f"bsbr_ext.build_info(): {env['build_info']}")
    peak_bw = copy_bw = None
    if args.device == "cuda":
        bw, src = B.card_bandwidth()
        peak_bw = args.peak_bw * 1e12 if args.peak_bw else bw
        env["card_bandwidth"] = {"bytes_per_s": peak_bw,
                                 "source": "--peak-bw" if args.peak_bw else src}
        print(f"card: {env['cuda_device']} (CUDA {env['cuda_runtime']}); bandwidth for the % "
              f"column: {peak_bw / 1e12:.2f} TB/s ({env['card_bandwidth']['source']})"
              if peak_bw else f"card: {env['cuda_device']}; bandwidth unknown (use --peak-bw)")
        if not args.no_copy_bw:
            copy_bw = B.measure_copy_bandwidth()
            env["copy_bandwidth_bytes_per_s"] = copy_bw
            print(f"measured device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    cases = [B.Case(impl=i, mode=m, device=args.device, dtype=args.dtype, b=args.batch,
                    h=args.heads, n=n, d=d, chunk=args.chunk_size, overlap=args.chunk_overlap)
             for d in args.head_dim for n in args.lengths for m in args.modes for i in args.impls]
    config = dict(vars(args))

    def save(results, partial):
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"env": env, "config": config, "partial": partial,
                           "results": results}, f, indent=1, default=str)
            os.replace(tmp, args.json)

    print(f"{len(cases)} cases:")
    results = B.run_cases(cases, seed=args.seed, budget_s=args.budget, threads=args.threads,
                          measure_memory=not args.no_memory, peak_bw=peak_bw, copy_bw=copy_bw,
                          log=lambda s: print(s, flush=True),
                          progress=lambda rs: save(rs, True))
    title = (f"{args.device}" + (f" ({env['cuda_device']})" if args.device == "cuda" else
                                 f" ({env['cpu']}, {env['cpu_threads']} thread(s))")
             + f", {args.dtype}, b={args.batch}, h={args.heads}, chunk {args.chunk_size}"
             + (f", overlap {args.chunk_overlap}" if args.chunk_overlap else ""))
    print()
    print(title)
    print("time = median ms; MiB = peak extra memory of one call; X/bsbr = X time / bsbr time")
    print(B.text_table(results, args.impls))
    if args.markdown:
        print()
        print(f"**{title}**, torch {env['torch']}")
        print()
        print(B.markdown_tables(results, args.impls))
    if args.json:
        save(results, False)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
