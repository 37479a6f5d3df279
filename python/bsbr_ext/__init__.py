"""bsbr_ext: Block Sparse Attention with Block Retrieval for PyTorch (CPU and CUDA kernels)."""

import torch  # noqa: F401  (loads libtorch before the extension that links it)

from . import _C, functional, reference
from .cache import BSBRCache, BSBRLayerCache
from .causal_lm import BSBRForCausalLM, CausalLMOutput
from .decoding import CUDAGraphDecoder
from .functional import bsbr_attention, block_retrieval, chunk_attention, chunk_states
from .modules import BSBRAttention, BSBRLayer, BSBRModel

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build contains: torch version built against, CUDA compiled in, archs, head dims."""
    return dict(_C.build_info())


__all__ = [
    "BSBRAttention",
    "BSBRCache",
    "BSBRForCausalLM",
    "BSBRLayer",
    "BSBRLayerCache",
    "BSBRModel",
    "CUDAGraphDecoder",
    "CausalLMOutput",
    "block_retrieval",
    "bsbr_attention",
    "build_info",
    "chunk_attention",
    "chunk_states",
    "functional",
    "reference",
]
