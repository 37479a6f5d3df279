"""Export a BSBRModel for the C++ programs in examples/cpp (see docs/deploying.md).

    python examples/export_model.py --out-dir /tmp/bsbr_model [--torchscript] [--aoti]

writes into --out-dir:
    model.pt        TorchScript (torch.jit.script(model.eval()).save)       with --torchscript
    model.pt2       AOTInductor package (torch.export with a dynamic
                    sequence length, then aoti_compile_and_package)          with --aoti
    ids.pt          token ids [batch, seq_len] (torch.save), for the C++ programs
    expected.pt     the eager Python output on ids.pt (torch.save)
(no flag: both). Then e.g. ``bsbr_torchscript model.pt ids.pt out.pt`` and compare out.pt with
expected.pt.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bsbr_ext import BSBRModel

# Small by default so that CPU compilation stays quick; the route does not depend on the size.
CONFIG = dict(vocab_size=50, hidden_dim=32, num_layers=2, num_heads=4, chunk_size=8, ff_dim=64,
              dropout=0.0, compression_factor=2, chunk_overlap=2)


def build_model(seed: int = 0) -> BSBRModel:
    torch.manual_seed(seed)
    return BSBRModel(**CONFIG).eval()


def export_program(model: torch.nn.Module, example_len: int = 37, max_len: int = 4096):
    """torch.export with a dynamic batch and sequence length (any n in [2, max_len], not only
    multiples of the chunk size)."""
    ids = torch.randint(0, CONFIG["vocab_size"], (2, example_len))
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq_len", min=2, max=max_len)
    # backed_size_oblivious: trace as if no dynamic size were 1, so that sizes that may be 1 at
    # run time (batch, the chunk count ceil(n / chunk_size)) get general code rather than a
    # guard "!= 1" that would shrink the range.
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(model, (ids,), dynamic_shapes=({0: batch, 1: seq},))


def save_torchscript(model: torch.nn.Module, path: str) -> None:
    torch.jit.script(model).save(path)


def save_aoti(model: torch.nn.Module, path: str) -> str:
    exported = export_program(model)
    return torch._inductor.aoti_compile_and_package(exported, package_path=path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--torchscript", action="store_true")
    parser.add_argument("--aoti", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=53)
    args = parser.parse_args()
    both = not (args.torchscript or args.aoti)
    os.makedirs(args.out_dir, exist_ok=True)

    model = build_model()
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
    torch.save(ids, os.path.join(args.out_dir, "ids.pt"))
    torch.save(expected, os.path.join(args.out_dir, "expected.pt"))
    if args.torchscript or both:
        save_torchscript(model, os.path.join(args.out_dir, "model.pt"))
        print("wrote", os.path.join(args.out_dir, "model.pt"))
    if args.aoti or both:
        start = time.perf_counter()
        path = save_aoti(model, os.path.join(args.out_dir, "model.pt2"))
        print(f"wrote {path} (export + AOTInductor compile: {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
