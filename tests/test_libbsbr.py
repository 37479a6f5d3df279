"""libbsbr (the CMake-built C++ library): it configures and builds against the installed torch,
and loading it alone registers torch.ops.bsbr with working kernels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


@pytest.fixture(scope="module")
def libbsbr(tmp_path_factory):
    build = tmp_path_factory.mktemp("libbsbr")
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], check=True,
                   capture_output=True, text=True)
    return os.path.join(build, "libbsbr.so")


def test_loading_libbsbr_registers_working_ops(libbsbr):
    # A fresh interpreter without bsbr_ext: the ops must come from the library alone.
    script = textwrap.dedent(f"""
        import importlib.util, torch
        torch.ops.load_library({libbsbr!r})
        spec = importlib.util.spec_from_file_location("ref", {os.path.join(ROOT, "python", "bsbr_ext", "reference.py")!r})
        ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 3, 45, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        mq, mk = (torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        out = torch.ops.bsbr.bsbr_attention(q, k, v, mq, mk, chunk_size=16, chunk_overlap=3)
        truth = ref.bsbr_attention_dense(q, k, v, mq, mk, 16, 3)
        torch.testing.assert_close(out, truth)
        for a, b in zip(torch.autograd.grad(out.sum(), (q, mk)), torch.autograd.grad(truth.sum(), (q, mk))):
            torch.testing.assert_close(a, b)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
