"""Deployment routes (issue 5): libbsbr built and installed with CMake, its C++ API (ctest), the
TorchScript and AOTInductor C++ programs in examples/cpp built against the INSTALLED library,
torch.compile(fullgraph=True) of BSBRModel, and torch.export with a dynamic sequence length.

One CMake build + install of libbsbr (and one build of the examples) is shared by the module.
CMake tests skip when cmake or a C++ compiler is missing, or when torch is a CUDA build and no
CUDA toolkit is found (Torch's own CMake config needs nvcc then). Set BSBR_DEPLOY_KEEP=DIR to
build in DIR (kept) instead of a temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

import bsbr_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.dirname(os.path.abspath(bsbr_ext.__file__))


def _load_example_module():
    spec = importlib.util.spec_from_file_location(
        "bsbr_export_model", os.path.join(ROOT, "examples", "export_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_model = _load_example_module()


def _cmake_skip_reason():
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if shutil.which("c++") is None and shutil.which("g++") is None and "CXX" not in os.environ:
        return "no C++ compiler"
    if torch.version.cuda is not None:
        from torch.utils import cpp_extension
        if cpp_extension.CUDA_HOME is None:
            return "torch is a CUDA build and no CUDA toolkit (nvcc) was found: Torch's CMake config needs one"
    return None


needs_cmake = pytest.mark.skipif(_cmake_skip_reason() is not None, reason=str(_cmake_skip_reason()))


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"command failed ({result.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def _generator_args():
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def _jobs():
    return os.environ.get("MAX_JOBS", str(min(os.cpu_count() or 2, 8)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    keep = os.environ.get("BSBR_DEPLOY_KEEP")
    if keep:
        os.makedirs(keep, exist_ok=True)
        return keep
    return str(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def libbsbr(workdir):
    """libbsbr configured (with the C++ tests), built and installed once for the module."""
    reason = _cmake_skip_reason()
    if reason:
        pytest.skip(reason)
    build, prefix = os.path.join(workdir, "build"), os.path.join(workdir, "install")
    start = time.perf_counter()
    _run(["cmake", "-S", ROOT, "-B", build, *_generator_args(), "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DCMAKE_INSTALL_PREFIX={prefix}",
          "-DBSBR_BUILD_TESTS=ON"])
    _run(["cmake", "--build", build, "-j", _jobs()])
    _run(["cmake", "--install", build])
    print(f"libbsbr configure+build+install: {time.perf_counter() - start:.1f} s")
    return SimpleNamespace(build=build, prefix=prefix,
                           library=os.path.join(prefix, "lib", "libbsbr.so"))


@pytest.fixture(scope="module")
def examples(libbsbr, workdir):
    """examples/cpp configured against the INSTALLED libbsbr only (find_package(bsbr) through
    CMAKE_PREFIX_PATH = the install prefix; Torch comes from the package config). Linked with
    --as-needed first, as on distributions that default to it: bsbr::bsbr must still keep
    libbsbr (which the programs never call) so that the ops are registered."""
    build = os.path.join(workdir, "examples")
    _run(["cmake", "-S", os.path.join(ROOT, "examples", "cpp"), "-B", build, *_generator_args(),
          "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={libbsbr.prefix}",
          "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed"])
    _run(["cmake", "--build", build, "-j", _jobs()])
    return SimpleNamespace(torchscript=os.path.join(build, "bsbr_torchscript"),
                           aoti=os.path.join(build, "bsbr_aoti"))


def _model_and_ids(batch=2, seq_len=53, seed=1):
    model = export_model.build_model()
    ids = torch.randint(0, export_model.CONFIG["vocab_size"], (batch, seq_len),
                        generator=torch.Generator().manual_seed(seed))
    return model, ids


# ---- libbsbr: install, C++ API, registration -------------------------------------------------


@needs_cmake
def test_install_layout(libbsbr):
    for rel in ("lib/libbsbr.so", "include/bsbr/bsbr.h", "lib/cmake/bsbr/bsbrConfig.cmake",
                "lib/cmake/bsbr/bsbrConfigVersion.cmake", "lib/cmake/bsbr/bsbrTargets.cmake"):
        assert os.path.exists(os.path.join(libbsbr.prefix, rel)), rel


@needs_cmake
def test_cpp_api_ctest(libbsbr):
    # tests/cpp/test_api.cpp: bsbr::bsbr_attention and the stages against a dense ATen computation.
    result = _run(["ctest", "--output-on-failure"], cwd=libbsbr.build)
    assert "100% tests passed" in result.stdout


@needs_cmake
def test_loading_libbsbr_registers_working_ops(libbsbr):
    # A fresh interpreter without bsbr_ext: the ops come from the installed library alone.
    script = textwrap.dedent(f"""
        import importlib.util, torch
        torch.ops.load_library({libbsbr.library!r})
        spec = importlib.util.spec_from_file_location("ref", {os.path.join(PACKAGE_DIR, "reference.py")!r})
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
    result = _run([sys.executable, "-c", script])
    assert result.stdout.strip() == "ok"


@needs_cmake
def test_linking_keeps_libbsbr_without_calls(examples):
    # The example programs call nothing from libbsbr and were linked with --as-needed first.
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not installed")
    for program in (examples.torchscript, examples.aoti):
        dynamic = _run([readelf, "-d", program]).stdout
        assert "[libbsbr.so]" in dynamic, f"{program} does not link libbsbr.so:\n{dynamic}"


# ---- TorchScript from C++ ------------------------------------------------------------------------


@needs_cmake
def test_torchscript_model_runs_from_cpp(examples, tmp_path):
    model, ids = _model_and_ids(batch=2, seq_len=53)
    with torch.no_grad():
        expected = model(ids)
    model_path, ids_path, out_path = (str(tmp_path / f) for f in ("model.pt", "ids.pt", "out.pt"))
    export_model.save_torchscript(model, model_path)
    torch.save(ids, ids_path)
    result = _run([examples.torchscript, model_path, ids_path, out_path])
    assert "output shape [2, 53, 32]" in result.stdout
    torch.testing.assert_close(torch.load(out_path), expected)


# ---- torch.compile -------------------------------------------------------------------------------


def _outputs_and_grads(fn, model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = fn(ids, mask)
    (out.float().pow(2).mean() + out.float().sum() * 1e-3).backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padding"])
def test_compile_fullgraph_model_forward_backward(padded):
    # fullgraph=True raises on any graph break; aot_eager traces forward and backward through
    # AOTAutograd (the ops' Meta kernels and the C++ autograd) without inductor's C++ codegen.
    torch._dynamo.reset()
    model, ids = _model_and_ids(batch=2, seq_len=45)
    model.train()  # dropout=0 in the example config, so train mode is deterministic
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :13] = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    out_c, grads_c = _outputs_and_grads(compiled, model, ids, mask)
    out_e, grads_e = _outputs_and_grads(model, model, ids, mask)
    torch.testing.assert_close(out_c, out_e)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], msg=name)
    # A second length reuses the dynamic graph (no recompilation needed to be correct).
    ids2 = torch.randint(0, export_model.CONFIG["vocab_size"], (2, 70))
    out_c2, _ = _outputs_and_grads(compiled, model, ids2, None)
    out_e2, _ = _outputs_and_grads(model, model, ids2, None)
    torch.testing.assert_close(out_c2, out_e2)


def test_compile_inductor_forward_backward():
    # One small inductor run (CPU C++ codegen), forward and backward.
    torch._dynamo.reset()
    model, ids = _model_and_ids(batch=2, seq_len=29)
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out_c, grads_c = _outputs_and_grads(compiled, model, ids, None)
    out_e, grads_e = _outputs_and_grads(model, model, ids, None)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-4, msg=name)


# ---- torch.export and AOTInductor -----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported():
    model = export_model.build_model()
    return model, export_model.export_program(model)


def test_export_dynamic_sequence_length(exported):
    model, program = exported
    ranges = {str(r) for r in program.range_constraints.values()}
    assert "VR[2, 4096]" in ranges and "VR[1, 1024]" in ranges, ranges
    module = program.module()
    # Lengths below, at and above the chunk size (8), a single sequence, partial chunks.
    for batch, n in [(1, 2), (2, 5), (1, 8), (2, 9), (3, 16), (2, 17), (1, 37), (2, 100)]:
        ids = torch.randint(0, export_model.CONFIG["vocab_size"], (batch, n))
        with torch.no_grad():
            torch.testing.assert_close(module(ids), model(ids), msg=f"batch={batch} n={n}")


@pytest.fixture(scope="module")
def aoti_package(exported, workdir):
    model, program = exported
    path = os.path.join(workdir, "model.pt2")
    start = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(program, package_path=path)
    print(f"AOTInductor compile+package: {time.perf_counter() - start:.1f} s")
    return model, path


def test_aoti_package_runs_in_python(aoti_package):
    model, path = aoti_package
    runner = torch._inductor.aoti_load_package(path)
    for batch, n in [(1, 5), (2, 53)]:
        ids = torch.randint(0, export_model.CONFIG["vocab_size"], (batch, n))
        with torch.no_grad():
            torch.testing.assert_close(runner(ids), model(ids), rtol=1e-4, atol=1e-4)


@needs_cmake
def test_aoti_package_runs_from_cpp(aoti_package, examples, tmp_path):
    model, path = aoti_package
    for batch, n in [(2, 53), (1, 6)]:
        ids = torch.randint(0, export_model.CONFIG["vocab_size"], (batch, n),
                            generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            expected = model(ids)
        ids_path, out_path = str(tmp_path / f"ids{n}.pt"), str(tmp_path / f"out{n}.pt")
        torch.save(ids, ids_path)
        result = _run([examples.aoti, path, ids_path, out_path])
        assert f"output shape [{batch}, {n}, 32]" in result.stdout
        torch.testing.assert_close(torch.load(out_path), expected, rtol=1e-4, atol=1e-4)
