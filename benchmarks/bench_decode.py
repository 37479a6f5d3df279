"""Per-token decoding latency and cache size: BSBR (BSBRCache) vs a KV-cache transformer (issue 4).

Both models have the same size (default: hidden 1024, 16 heads, 8 layers, FFN 4096, pre-norm) and
decode one token per step at batch 1. The transformer keeps a KV cache of every token (static
buffers, ``scaled_dot_product_attention`` over the filled part); BSBR keeps the completed chunks'
states (fp32), their meta keys and the current chunk's window (chunk 128).

For each context length L the caches are first filled to L - steps/2 tokens (minus the warm-up
steps, which for BSBR include steps that complete a chunk, so that the graph of such a step is
captured before the timed window), then ``steps`` tokens are decoded one
by one and each step is timed alone (wall clock, synchronised; on CUDA the
synchronisation is what a sampling loop pays anyway). The window of steps straddles token L-1,
which completes a chunk for L a multiple of the chunk size: the slowest BSBR step is that one.
Reported per model: the median step, the slowest step, and the cache bytes per layer at L.

Caches are filled either by a real prefill (``--fill prefill``, default on CUDA) or with random
contents of the right shapes (``--fill random``, default on CPU: a 128k-token prefill takes far
too long on a small CPU and the decode step's cost does not depend on the values).

Modes: ``eager`` (every kernel launched from Python) and, on CUDA, ``graph`` (one CUDA graph per
step: ``bsbr_ext.CUDAGraphDecoder`` for BSBR, a captured step over the full static cache with a
position mask for the transformer), which removes the launch overhead that dominates small-batch
decoding. Compare like with like.

    python benchmarks/bench_decode.py --device cuda --json out/decode.json --markdown
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import bsbr_ext
from bsbr_ext import BSBRCache, BSBRLayerCache, BSBRModel
from bsbr_ext.modules import sinusoidal_positions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EAGER_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# ----------------------------------------------------------------------------------------------
# the baseline: a standard pre-norm transformer decoding with a KV cache


class KVLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ff_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, ff_dim), nn.GELU(), nn.Linear(ff_dim, hidden))

    def project(self, x):
        """``q, k, v [b, heads, n, head_dim]`` of ``x [b, n, hidden]``."""
        b, n = x.shape[0], x.shape[1]
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def finish(self, x, attn):
        """Output projection and residual, then the feed-forward block."""
        x = x + self.out_proj(attn.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return x + self.ff(self.norm2(x))

    def prefill(self, x, k_cache, v_cache):
        q, k, v = self.project(x)
        k_cache[:, :, : x.shape[1]], v_cache[:, :, : x.shape[1]] = k, v
        return self.finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def decode(self, x, k_cache, v_cache, position, valid):
        """One token (x: [b, 1, hidden]) at ``position`` (int, eager) or with a ``valid`` mask
        over the whole static cache (graph mode; ``position`` is then a device tensor)."""
        q, k, v = self.project(x)
        if valid is None:
            k_cache[:, :, position : position + 1] = k
            v_cache[:, :, position : position + 1] = v
            # Flash / memory-efficient kernels only: the cuDNN backend builds a new plan for every
            # new length, which made each eager step cost tens of ms (H100, torch 2.11).
            with sdpa_kernel(EAGER_SDPA_BACKENDS):
                attn = F.scaled_dot_product_attention(
                    q, k_cache[:, :, : position + 1], v_cache[:, :, : position + 1]
                )
        else:  # static shapes: write at the device-side position, attend under a mask
            k_cache.index_copy_(2, position, k)
            v_cache.index_copy_(2, position, v)
            attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid)
        return self.finish(x, attn)


class KVTransformer(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, ff_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(KVLayer(hidden, heads, ff_dim) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def caches(self, batch, capacity, device, dtype):
        layer = self.layers[0]
        shape = (batch, layer.heads, capacity, layer.head_dim)
        return [(torch.zeros(shape, device=device, dtype=dtype),
                 torch.zeros(shape, device=device, dtype=dtype)) for _ in self.layers]

    def embed(self, ids, positions):
        weight = self.embedding.weight
        return self.embedding(ids) + sinusoidal_positions(positions, weight.shape[1], weight.dtype)

    def prefill(self, ids, caches):
        x = self.embed(ids, torch.arange(ids.shape[1], device=ids.device))
        for layer, (kc, vc) in zip(self.layers, caches):
            x = layer.prefill(x, kc, vc)

    def decode(self, ids, caches, position, valid=None, position_tensor=None):
        """Eager: ``position`` (int). Graph mode: ``valid`` mask and ``position_tensor``."""
        pos = position_tensor if valid is not None else torch.tensor([position], device=ids.device)
        x = self.embed(ids, pos.view(1, 1))
        for layer, (kc, vc) in zip(self.layers, caches):
            x = layer.decode(x, kc, vc, position if valid is None else position_tensor, valid)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# filling caches


def random_bsbr_cache(model: BSBRModel, batch: int, length: int, capacity_tokens: int, device, dtype):
    attn = model.layers[0].attention
    h, d, ds, dm = attn.num_heads, attn.head_dim, attn.state_dim, attn.meta_dim
    size, w = attn.chunk_size, attn.chunk_overlap
    cap = capacity_tokens // size
    sdt = torch.float32

    def layer_cache():
        return BSBRLayerCache(
            window_k=torch.randn(batch, h, w + size, d, device=device, dtype=dtype),
            window_v=torch.randn(batch, h, w + size, d, device=device, dtype=dtype),
            states=torch.randn(batch, h, cap, ds, d, device=device, dtype=sdt),
            meta_k=torch.randn(batch, h, cap, dm, device=device, dtype=dtype),
            retrieved=torch.randn(batch, h, ds, d, device=device, dtype=sdt),
            summary=torch.randn(batch, model.hidden_dim, device=device, dtype=sdt),
        )

    lengths = torch.full((batch,), length, dtype=torch.long, device=device)
    return BSBRCache([layer_cache() for _ in model.layers], lengths, [length] * batch, size, w)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps, device):
    """Each step timed alone, synchronised; returns seconds per step."""
    out = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summarise(times, chunk_size, start):
    ms = [t * 1e3 for t in times]
    slowest = max(range(len(ms)), key=ms.__getitem__)
    return {
        "median_ms": statistics.median(ms),
        "max_ms": ms[slowest],
        "slowest_token_index": start + slowest,
        "slowest_completes_chunk": (start + slowest) % chunk_size == chunk_size - 1,
        "steps": len(ms),
    }


# ----------------------------------------------------------------------------------------------
# one context length


@torch.no_grad()
def bench_bsbr(model, length, steps, warmup, fill, mode, device, dtype, vocab):
    size = model.layers[0].attention.chunk_size
    start = length - steps // 2
    total = start + steps
    # Warm-up steps come first (so from a slightly shorter context) and include steps that
    # complete a chunk, so that the timed window sees both kinds of step warm: one for eager
    # mode, two in graph mode (the first runs eagerly, the second captures).
    last_completion = start - 1 - (start - size) % size - (size if mode == "graph" else 0)
    begin = max(1, min(start - warmup, last_completion - 1))
    warmup = start - begin
    if fill == "prefill":
        ids = torch.randint(0, vocab, (1, begin), device=device)
        _, cache = model(ids, use_cache=True)
    else:
        cache = random_bsbr_cache(model, 1, begin, total, device, dtype)
    cache.reserve(total)
    tokens = torch.randint(0, vocab, (warmup + steps, 1, 1), device=device)
    if mode == "graph":
        decoder = bsbr_ext.CUDAGraphDecoder(model, cache)
        run = decoder
    else:
        def run(ids):
            return model(ids, cache=cache)[0]
    for i in range(warmup):
        run(tokens[i])
    times = time_steps(lambda i: run(tokens[warmup + i]), steps, device)
    layer_bytes = exact_cache_bytes(model, length, device, dtype)
    return summarise(times, size, start), layer_bytes


def exact_cache_bytes(model, length, device, dtype):
    """Bytes per layer of a BSBR cache holding exactly ``length`` tokens (capacity = the completed
    chunks), measured on real tensors."""
    cache = random_bsbr_cache(model, 1, length, length, torch.device("meta"), dtype)
    return cache.layers[0].nbytes()


@torch.no_grad()
def bench_kv(model, length, steps, warmup, fill, mode, device, dtype, vocab):
    start = length - steps // 2
    begin = start - warmup
    capacity = start + steps
    caches = model.caches(1, capacity, device, dtype)
    if fill == "prefill":
        model.prefill(torch.randint(0, vocab, (1, begin), device=device), caches)
    else:
        for kc, vc in caches:
            kc[:, :, :begin].normal_()
            vc[:, :, :begin].normal_()
    tokens = torch.randint(0, vocab, (warmup + steps, 1, 1), device=device)
    if mode == "graph":
        position = torch.tensor([begin], device=device)
        slots = torch.arange(capacity, device=device)
        static_ids = tokens[0].clone()

        def device_step():
            valid = (slots <= position).view(1, 1, 1, capacity)
            out = model.decode(static_ids, caches, None, valid=valid, position_tensor=position)
            position.add_(1)
            return out

        device_step()  # warm-up (eager) before the capture
        graph = torch.cuda.CUDAGraph()
        position.fill_(begin + 1)
        with torch.cuda.graph(graph):
            device_step()

        def run(i):
            static_ids.copy_(tokens[i])
            graph.replay()

        for i in range(1, warmup):
            run(i)
        if warmup == 0:
            raise ValueError("graph mode needs warmup >= 1")
    else:
        def run(i):
            model.decode(tokens[i], caches, begin + i)

        for i in range(warmup):
            run(i)
    times = time_steps(lambda i: run(warmup + i), steps, device)
    layer = model.layers[0]
    kv_bytes = 2 * length * layer.heads * layer.head_dim * torch.tensor([], dtype=dtype).element_size()
    return summarise(times, 1 << 62, start), kv_bytes


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16 (CUDA default) or fp32 (CPU default)")
    p.add_argument("--contexts", default="1024,8192,32768,131072")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ff-dim", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=None, help="timed steps per context (CUDA 64, CPU 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (CUDA 8, CPU 2)")
    p.add_argument("--fill", choices=["prefill", "random"], default=None)
    p.add_argument("--modes", default=None, help="eager,graph (CUDA default) or eager (CPU)")
    p.add_argument("--compression", default="1,4", help="BSBR compression factors to run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    steps = args.steps or (64 if cuda else 8)
    warmup = args.warmup if args.warmup is not None else (8 if cuda else 2)
    fill = args.fill or ("prefill" if cuda else "random")
    modes = (args.modes or ("eager,graph" if cuda else "eager")).split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    factors = [int(f) for f in args.compression.split(",")]
    torch.manual_seed(0)

    card = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"# decode benchmark on {card}; torch {torch.__version__}; {dtype}; hidden {args.hidden}, "
          f"{args.heads} heads, {args.layers} layers, chunk {args.chunk}; fill={fill}; "
          f"{steps} timed steps after {warmup} warm-up", flush=True)
    results = []
    models = {}
    for factor in factors:
        models[f"bsbr_f{factor}"] = lambda factor=factor: BSBRModel(
            args.vocab, args.hidden, args.layers, args.heads, args.chunk, args.ff_dim, dropout=0.0,
            compression_factor=None if factor == 1 else factor).to(device, dtype).eval()
    models["kv_sdpa"] = lambda: KVTransformer(args.vocab, args.hidden, args.layers, args.heads,
                                              args.ff_dim).to(device, dtype).eval()
    for name, make in models.items():
        model = make()
        bench = bench_kv if name == "kv_sdpa" else bench_bsbr
        for mode in modes:
            for length in contexts:
                try:
                    stats, layer_bytes = bench(model, length, steps, warmup, fill, mode, device, dtype, args.vocab)
                except torch.OutOfMemoryError as e:  # report, keep going
                    print(f"{name} {mode} {length}: out of memory ({e})", flush=True)
                    continue
                row = dict(model=name, mode=mode, context=length, cache_bytes_per_layer=layer_bytes, **stats)
                results.append(row)
                print(json.dumps(row), flush=True)
                if cuda:
                    torch.cuda.empty_cache()
        del model
    if args.markdown:
        print(markdown(results, contexts, modes, factors, card, dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=card, torch=torch.__version__, dtype=str(dtype), args=vars(args),
                           results=results), f, indent=1)


def markdown(results, contexts, modes, factors, card, dtype):
    def get(model, mode, ctx):
        for r in results:
            if (r["model"], r["mode"], r["context"]) == (model, mode, ctx):
                return r
        return None

    lines = [f"\nDecode, {card}, {dtype}, batch 1 (median / slowest step in ms; cache MiB per layer)\n"]
    head = "| mode | context | " + " | ".join(
        [f"BSBR f={f} median / slowest" for f in factors] + ["KV-cache median / slowest"]
        + [f"KV / BSBR f={factors[0]} median"] + [f"cache MiB: BSBR f={f}" for f in factors]
        + ["cache MiB: KV"] + [f"KV / BSBR f={f} cache" for f in factors]) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    mib = 2.0**20
    growth = []
    for mode in modes:
        for ctx in contexts:
            kv = get("kv_sdpa", mode, ctx)
            ours = [get(f"bsbr_f{f}", mode, ctx) for f in factors]
            cells = [mode, f"{ctx // 1024}k"]
            cells += [f"{o['median_ms']:.3f} / {o['max_ms']:.3f}" if o else "-" for o in ours]
            cells += [f"{kv['median_ms']:.3f} / {kv['max_ms']:.3f}" if kv else "-"]
            cells += [f"{kv['median_ms'] / ours[0]['median_ms']:.2f}x" if kv and ours[0] else "-"]
            cells += [f"{o['cache_bytes_per_layer'] / mib:.1f}" if o else "-" for o in ours]
            cells += [f"{kv['cache_bytes_per_layer'] / mib:.1f}" if kv else "-"]
            cells += [f"{kv['cache_bytes_per_layer'] / o['cache_bytes_per_layer']:.2f}x" if kv and o else "-"
                      for o in ours]
            lines.append("| " + " | ".join(cells) + " |")
        first = [get(f"bsbr_f{factors[0]}", mode, c) for c in (contexts[0], contexts[-1])]
        if all(first):
            growth.append(f"{mode}: BSBR f={factors[0]} median growth {contexts[0] // 1024}k -> "
                          f"{contexts[-1] // 1024}k: {first[1]['median_ms'] / first[0]['median_ms']:.2f}x")
    return "\n".join(lines + [""] + growth)


if __name__ == "__main__":
    sys.exit(main())
