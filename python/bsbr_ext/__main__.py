"""`python -m bsbr_ext`: the project's main job.

1. Prints bsbr_ext.build_info() and the environment.
2. Checks the kernels (bsbr_ext.functional.bsbr_attention) against the fp64 dense form of
   SPEC §1 on every device here (CPU always, CUDA when available): the output and the gradients
   w.r.t. q, k, v, meta_q, meta_k (and q_state, k_state where given) at odd sizes. A tensor
   passes when the kernel's max abs error against the fp64 truth is at most
   2 x (the plain PyTorch chunked reference's error in the same dtype) + floor x max|truth|,
   and nothing is NaN/inf (SPEC §4). Exits 1 on any FAIL.
   Streaming: a left-padded batch decoded token by token from a BSBRCache (prefill, then one
   token per step across several chunk boundaries) against the parallel forward of each sequence
   alone, and a greedy BSBRForCausalLM.generate of the batch against each row alone.
3. Prints a short table of median time and peak extra memory for the kernels, the plain
   PyTorch reference and scaled_dot_product_attention(is_causal=True) at a few lengths
   (timing helpers: bsbr_ext._bench; full benchmark: benchmarks/bench_attention.py).

Options: --no-check, --no-bench, --device cpu|cuda|all (default all available),
--threads N.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from bsbr_ext import _bench as B

# Relative floor (x max|truth|) added to 2 x the reference's error, by dtype.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (dtype, b, h, n, d, chunk, overlap, state dim or None): odd sizes, partial last chunk, n < B,
# overlap, compressed states, batch and heads > 1.
CPU_CHECKS = [
    (torch.float32, 2, 3, 333, 33, 64, 0, None),   # odd d, partial last chunk
    (torch.float32, 1, 2, 200, 32, 48, 16, 8),     # overlap, compressed states ds = d/4
    (torch.float32, 1, 2, 40, 16, 64, 0, None),    # n < B: plain causal attention
    (torch.bfloat16, 2, 2, 300, 64, 128, 32, None),
]
CUDA_CHECKS = [
    (torch.bfloat16, 2, 3, 333, 64, 64, 0, None),
    (torch.float16, 1, 2, 1000, 128, 128, 32, 32),
    (torch.float32, 1, 2, 50, 32, 64, 0, None),    # n < B
    (torch.bfloat16, 1, 2, 777, 32, 16, 16, None),
]

BENCH = {
    "cpu": dict(dtype="fp32", b=1, h=4, d=64, chunk=128, lengths=(1024, 4096), budget=0.5),
    "cuda": dict(dtype="bf16", b=1, h=16, d=64, chunk=128, lengths=(4096, 16384), budget=0.3),
}
BENCH_IMPLS = ("bsbr", "reference", "sdpa")


def _err(x: torch.Tensor, truth: torch.Tensor) -> float:
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    return (x - truth).abs().max().item()


def check_case(device: str, spec: tuple, seed: int) -> tuple[bool, list[str]]:
    """Kernel vs fp64 dense truth, with the chunked reference in the same dtype as the yardstick."""
    from bsbr_ext import functional, reference

    dtype, b, h, n, d, chunk, overlap, ds = spec
    c = (n + chunk - 1) // chunk
    g = torch.Generator().manual_seed(seed)
    names = ["q", "k", "v", "meta_q", "meta_k"] + (["q_state", "k_state"] if ds else [])
    shapes = [(b, h, n, d)] * 3 + [(b, h, c, d)] * 2 + ([(b, h, n, ds)] * 2 if ds else [])
    master = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    grad_out = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)

    def run(fn, dev, dt):
        xs = [m.to(dev, dt).requires_grad_(True) for m in master]
        kw = dict(chunk_size=chunk, chunk_overlap=overlap)
        if ds:
            kw.update(q_state=xs[5], k_state=xs[6])
        out = fn(*xs[:5], **kw)
        grads = torch.autograd.grad(out, xs, grad_out.to(dev, out.dtype), allow_unused=True)
        return [out] + [gr if gr is not None else torch.zeros_like(x) for gr, x in zip(grads, xs)]

    truth = [t.detach() for t in run(reference.bsbr_attention_dense, "cpu", torch.float64)]
    ref = run(reference.bsbr_attention, device, dtype)
    ours = run(functional.bsbr_attention, device, dtype)
    ok = True
    rows = []
    for name, t, r, o in zip(["out"] + ["d" + x for x in names], truth, ref, ours):
        scale = t.abs().max().item()
        e_ours, e_ref = _err(o, t), _err(r, t)
        tol = 2 * e_ref + FLOOR[dtype] * max(scale, 1e-30)
        passed = e_ours <= tol
        ok &= passed
        rows.append(f"{name}={e_ours:.1e}" + ("" if passed else
                                              f" (FAIL: ref {e_ref:.1e}, tol {tol:.1e})"))
    return ok, rows


def check_device(device: str) -> bool:
    checks = CPU_CHECKS if device == "cpu" else CUDA_CHECKS
    print(f"\n== correctness on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + ": max abs error vs fp64 dense truth (out and gradients)")
    all_ok = True
    for i, spec in enumerate(checks):
        dtype, b, h, n, d, chunk, overlap, ds = spec
        label = (f"{B.dtype_name(dtype)} b={b} h={h} n={n} d={d} B={chunk} w={overlap}"
                 + (f" ds={ds}" if ds else ""))
        try:
            ok, rows = check_case(device, spec, seed=1000 + i)
            detail = ", ".join(rows)
        except Exception as e:
            ok, detail = False, f"raised {type(e).__name__}: {str(e).strip()[:300]}"
        all_ok &= ok
        print(f"  {'PASS' if ok else 'FAIL'}  {label}: {detail}")
    return all_ok


def check_streaming(device: str) -> bool:
    """Prefill + token-by-token decoding == the parallel forward (fp32, left padding, overlap,
    compression); batched greedy generation == each row alone."""
    from bsbr_ext import BSBRForCausalLM

    torch.manual_seed(7)
    lm = BSBRForCausalLM(97, 128, 2, 2, 16, 128, dropout=0.0, compression_factor=2,
                         chunk_overlap=5).to(device).eval()  # head dim 64
    lengths, steps = [37, 20], 40
    n = max(lengths)
    seqs = [torch.randint(0, 97, (length + steps,), device=device) for length in lengths]
    ids = torch.zeros(2, n, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, length in enumerate(lengths):
        ids[r, n - length:] = seqs[r][:length]
        mask[r, n - length:] = 1
    with torch.no_grad():
        _, cache = lm.model(ids, attention_mask=mask, use_cache=True)
        new = torch.stack([s[length:] for s, length in zip(seqs, lengths)])
        stepped = torch.cat([lm.model(new[:, i:i + 1], cache=cache)[0] for i in range(steps)], 1)
        err = max((stepped[r] - lm.model(seqs[r][None])[0, length:]).abs().max().item()
                  for r, length in enumerate(lengths))
    ok_stream = err <= 1e-4
    batched = lm.generate(ids, attention_mask=mask, max_new_tokens=24, top_k=1)
    ok_generate = all(
        torch.equal(batched[r, n:], lm.generate(seqs[r][None, :length], max_new_tokens=24, top_k=1)[0, length:])
        for r, length in enumerate(lengths))
    print(f"\n== streaming on {device}: prefill + {steps} decode steps vs parallel forward "
          f"(fp32, left padding, chunk 16, overlap 5, compression 2)")
    print(f"  {'PASS' if ok_stream else 'FAIL'}  max abs error {err:.1e} (tol 1e-4)")
    print(f"  {'PASS' if ok_generate else 'FAIL'}  batched left-padded greedy generate == each row alone")
    return ok_stream and ok_generate


def bench_device(device: str, threads) -> bool:
    cfg = BENCH[device]
    cases = [B.Case(impl=i, mode=m, device=device, dtype=cfg["dtype"], b=cfg["b"], h=cfg["h"],
                    n=n, d=cfg["d"], chunk=cfg["chunk"])
             for n in cfg["lengths"] for m in B.MODES for i in BENCH_IMPLS]
    where = torch.cuda.get_device_name() if device == "cuda" else \
        f"{B.environment()['cpu']}, {torch.get_num_threads()} thread(s)"
    print(f"\n== speed on {device} ({where}): {cfg['dtype']}, b={cfg['b']}, h={cfg['h']}, "
          f"d={cfg['d']}, chunk {cfg['chunk']}")
    results = B.run_cases(cases, budget_s=cfg["budget"], threads=threads, log=lambda s: None)
    print("time = median ms over repeated calls after warm-up; MiB = peak extra memory of one call;"
          " X/bsbr = X time / bsbr time (> 1: the kernels are faster)")
    print(B.text_table(results, BENCH_IMPLS))
    return all(r["status"] == "ok" for r in results if r["impl"] == B.OURS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bsbr_ext", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-bench", action="store_true", help="skip the speed table")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    env = B.environment()
    print("bsbr_ext build info:")
    info = env["build_info"]
    if isinstance(info, dict):
        for k, v in info.items():
            print(f"  {k}: {v}")
    else:
        print(f"  {info}")
    print(f"runtime: torch {env['torch']}, python {env['python']}, CPU {env['cpu']} "
          f"({env['cpu_threads']} thread(s)), CUDA "
          + (f"{env['cuda_runtime']} on {env['cuda_device']}" if torch.cuda.is_available()
             else "not available"))

    why = B.impl_unavailable(B.OURS, "cpu")
    if why:
        print(f"FAIL: the kernels cannot be used: {why}")
        return 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [d for d in devices if d == args.device]
        if not devices:
            print(f"FAIL: device {args.device} is not available here")
            return 1
    skipped = []
    if "cuda" in devices and B.impl_unavailable(B.OURS, "cuda"):
        skipped.append(f"cuda: {B.impl_unavailable(B.OURS, 'cuda')}")
        devices.remove("cuda")

    ok = True
    if not args.no_check:
        for dev in devices:
            ok &= check_device(dev)
            ok &= check_streaming(dev)
    if not args.no_bench:
        for dev in devices:
            if not bench_device(dev, args.threads):
                print(f"FAIL: the kernels did not run in the {dev} speed table (see notes)")
                ok = False
    for s in skipped:
        print(f"SKIPPED {s}")
    print(f"\n{'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
