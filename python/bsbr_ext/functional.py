"""Functional BSBR ops: thin, TorchScript-scriptable wrappers over ``torch.ops.bsbr``.

Shapes (SPEC §1): q, k, v ``[b, h, n, d]``; meta_q, meta_k ``[b, h, ceil(n / chunk_size), dm]``;
q_state, k_state ``[b, h, n, ds]`` (both or neither; default q and k). Chunk states and retrieved
states are ``[b, h, C, ds, d]`` in fp32 (fp64 for fp64 inputs). All functions are differentiable;
inputs are validated in C++ and bad ones raise ValueError/TypeError naming the argument and rule.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the extension registers torch.ops.bsbr)

__all__ = [
    "bsbr_attention",
    "block_retrieval",
    "chunk_attention",
    "chunk_states",
    "decode_attention",
    "decode_retrieval",
]


def bsbr_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta_q: Tensor,
    meta_k: Tensor,
    chunk_size: int,
    chunk_overlap: int = 0,
    scale: Optional[float] = None,
    meta_scale: Optional[float] = None,
    state_scale: Optional[float] = None,
    q_state: Optional[Tensor] = None,
    k_state: Optional[Tensor] = None,
) -> Tensor:
    """Block Sparse Attention with Block Retrieval (fused): local causal softmax attention
    within each chunk (plus ``chunk_overlap`` earlier tokens) and a chunk-level softmax that
    retrieves a mix of earlier chunks' states ``k_state^T v``. Memory is linear in n.

    Defaults: ``scale = 1/sqrt(d)``, ``meta_scale = 1/sqrt(dm)``,
    ``state_scale = 1/(chunk_size*sqrt(ds))``.
    """
    return torch.ops.bsbr.bsbr_attention(
        q, k, v, meta_q, meta_k, q_state, k_state,
        chunk_size=chunk_size, chunk_overlap=chunk_overlap,
        scale=scale, meta_scale=meta_scale, state_scale=state_scale,
    )


def chunk_states(k_state: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    """Per-chunk states ``F_j = k_state[j]^T v[j]``: ``[b, h, C, ds, d]``."""
    return torch.ops.bsbr.chunk_states(k_state, v, chunk_size)


def block_retrieval(
    meta_q: Tensor, meta_k: Tensor, states: Tensor, meta_scale: Optional[float] = None
) -> Tensor:
    """Retrieved states ``S_c = sum_{j<c} softmax_j(meta_scale <meta_q[c], meta_k[j]>) F_j``;
    ``S_0 = 0``."""
    return torch.ops.bsbr.block_retrieval(meta_q, meta_k, states, meta_scale)


def chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_state: Tensor,
    retrieved: Tensor,
    chunk_size: int,
    chunk_overlap: int = 0,
    scale: Optional[float] = None,
    state_scale: Optional[float] = None,
) -> Tensor:
    """``o_t = state_scale * q_state[t] @ S_chunk(t)`` plus local causal softmax attention."""
    return torch.ops.bsbr.chunk_attention(
        q, k, v, q_state, retrieved,
        chunk_size=chunk_size, chunk_overlap=chunk_overlap, scale=scale, state_scale=state_scale,
    )


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_k: Tensor,
    window_v: Tensor,
    retrieved: Tensor,
    position: Tensor,
    chunk_size: int,
    chunk_overlap: int = 0,
    scale: Optional[float] = None,
    state_scale: Optional[float] = None,
    q_state: Optional[Tensor] = None,
) -> Tensor:
    """One decoding step (inference only): writes the new token's ``k, v`` (``[b, h, d]``) into
    slot ``chunk_overlap + position % chunk_size`` of ``window_k/window_v``
    (``[b, h, chunk_overlap + chunk_size, d]``, in place) and returns its output ``[b, h, d]``:
    the long-range term ``state_scale * q_state @ retrieved`` (``retrieved``: ``[b, h, ds, d]``
    fp32, skipped in a row's first chunk) plus causal softmax attention over the row's window.
    ``position``: ``[b]`` int64, the index of the new token in each row."""
    return torch.ops.bsbr.decode_attention(
        q, k, v, window_k, window_v, retrieved, position, q_state,
        chunk_size=chunk_size, chunk_overlap=chunk_overlap, scale=scale, state_scale=state_scale,
    )


def decode_retrieval(
    meta_q: Tensor,
    meta_k: Tensor,
    states: Tensor,
    num_chunks: Tensor,
    meta_scale: Optional[float] = None,
) -> Tensor:
    """The retrieved state of one chunk per row (inference only):
    ``sum_{j < num_chunks} softmax_j(meta_scale <meta_q, meta_k[j]>) states[j]``, 0 when
    ``num_chunks`` is 0. meta_q ``[b, h, dm]``, meta_k ``[b, h, cap, dm]``, states
    ``[b, h, cap, ds, d]`` (fp32), num_chunks ``[b]`` int64; returns ``[b, h, ds, d]``."""
    return torch.ops.bsbr.decode_retrieval(meta_q, meta_k, states, num_chunks, meta_scale=meta_scale)

