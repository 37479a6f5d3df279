"""Builds the torch extension bsbr_ext._C (C++ always, CUDA when a toolkit is found).

Environment knobs (all optional):
  BSBR_CUDA=auto|0|1        compile the CUDA sources: auto (default) = when a CUDA toolkit is found.
  BSBR_HEAD_DIMS=32,64,128  CUDA head dims to instantiate (files cuda/instantiations/*_hdim{D}_*.cu).
  BSBR_DTYPES=fp16,bf16,fp32  CUDA dtypes to instantiate (files cuda/instantiations/*_{dtype}.cu).
  TORCH_CUDA_ARCH_LIST      CUDA archs; defaults to 9.0 (Hopper) here instead of every arch.
                            9.0 is built as 9.0a (sm_90a), which the wgmma kernels need.
  MAX_JOBS                  parallel compile jobs (ninja).
  BSBR_DEBUG=1              -O0 -g, for debugging.
"""

import glob
import os
import re

from setuptools import find_packages, setup
# torch locates the toolkit from `nvcc` on PATH before trying /usr/local/cuda; a wrapper script
# such as /usr/local/bin/nvcc would make it look for CUDA's headers and libraries in /usr/local.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
HEAD_DIMS = (32, 64, 128)
DTYPES = ("fp16", "bf16", "fp32")
INCLUDE_DIRS = [os.path.join(ROOT, "cpp"), os.path.join(ROOT, "cpp", "include")]


def env_list(name, default, allowed):
    values = [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]
    bad = [x for x in values if x not in {str(a) for a in allowed}]
    if bad:
        raise SystemExit(f"{name}: {bad} not in {list(allowed)}")
    return values


def want_cuda():
    mode = os.environ.get("BSBR_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit("BSBR_CUDA must be auto, 0 or 1")
    found = cpp_extension.CUDA_HOME is not None
    if mode == "1" and not found:
        raise SystemExit("BSBR_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    return found if mode == "auto" else mode == "1"


def hopper_arch_specific(arch):
    """9.0 -> 9.0a (and 9.0+PTX -> 9.0a+PTX); other archs unchanged."""
    return "9.0a" + arch[3:] if arch in ("9.0", "9.0+PTX") else arch


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    debug = os.environ.get("BSBR_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = rel(glob.glob(os.path.join(ROOT, "cpp", "**", "*.cpp"), recursive=True))
    # -fopenmp: at::parallel_for is inline and runs serially unless its OpenMP pragma is compiled.
    cxx = opt + ["-fvisibility=hidden", "-fopenmp"]
    defines = [("BSBR_TORCH_VERSION", torch.__version__)]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "bsbr_ext._C", sources, include_dirs=INCLUDE_DIRS,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], define_macros=defines,
        )

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    head_dims = env_list("BSBR_HEAD_DIMS", "32,64,128", HEAD_DIMS)
    dtypes = env_list("BSBR_DTYPES", "fp16,bf16,fp32", DTYPES)
    pattern = re.compile(r"_hdim(\d+)_(fp16|bf16|fp32)\.cu$")
    for path in glob.glob(os.path.join(ROOT, "cuda", "**", "*.cu"), recursive=True):
        m = pattern.search(path)
        if m is None or (m.group(1) in head_dims and m.group(2) in dtypes):
            sources.append(os.path.relpath(path, ROOT))
    # Hopper is built as sm_90a (its cubin runs on every compute capability 9.0 GPU): the
    # retrieval's wgmma kernels exist only there.
    archs = [hopper_arch_specific(a) for a in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].strip())]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    if any(a.startswith("9.0a") for a in archs):
        defines.append(("BSBR_WGMMA", None))
    defines += [("BSBR_WITH_CUDA", None), ("BSBR_CUDA_VERSION", torch.version.cuda or "unknown"),
                ("BSBR_CUDA_ARCHS", "_".join(a.replace(".", "").replace("+", "") for a in archs))]
    defines += [(f"BSBR_HDIM{d}", None) for d in head_dims]
    defines += [(f"BSBR_{t.upper()}", None) for t in dtypes]
    nvcc = opt + [
        "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    # torch's CUDA headers include cuSPARSE/cuBLAS headers; with pip's CUDA wheels they live in
    # site-packages/nvidia/cu*/include rather than in the toolkit.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    pip_cuda = [p for p in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(p)]
    return cpp_extension.CUDAExtension(
        "bsbr_ext._C", sorted(sources), include_dirs=INCLUDE_DIRS + [os.path.join(ROOT, "cuda")] + pip_cuda,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"], define_macros=defines,
    )


setup(
    name="bsbr_ext",
    version="0.1.0",
    description="Block Sparse Attention with Block Retrieval: CPU and CUDA kernels for PyTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
)
