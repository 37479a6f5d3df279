"""BSBR in plain PyTorch: the ground truth for tests and the baseline for benchmarks.

Two forms of SPEC §1:
- the chunked form (`chunk_states`, `block_retrieval`, `chunk_attention`, `bsbr_attention`): what a
  competent user writes with batched matmuls and SDPA; linear memory in n;
- the dense form (`bsbr_attention_dense`): O(n^2) masks, used only to check the chunked form.

Chunk states and retrieved states are kept in fp32 (fp64 for fp64 inputs), like the kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "bsbr_attention",
    "bsbr_attention_dense",
    "block_retrieval",
    "chunk_attention",
    "chunk_states",
    "decode_attention",
    "decode_retrieval",
    "retrieval_weights",
    "resolve_scales",
]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_chunks(n: int, chunk_size: int) -> int:
    return (n + chunk_size - 1) // chunk_size


def resolve_scales(
    head_dim: int,
    meta_dim: int,
    state_dim: int,
    chunk_size: int,
    scale: Optional[float] = None,
    meta_scale: Optional[float] = None,
    state_scale: Optional[float] = None,
) -> tuple[float, float, float]:
    """SPEC §1 defaults: 1/sqrt(d), 1/sqrt(dm), 1/(B*sqrt(ds))."""
    return (
        1.0 / math.sqrt(head_dim) if scale is None else scale,
        1.0 / math.sqrt(meta_dim) if meta_scale is None else meta_scale,
        1.0 / (chunk_size * math.sqrt(state_dim)) if state_scale is None else state_scale,
    )


def _split_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[b, h, n, e] -> [b, h, C, chunk_size, e], zero-padding the partial last chunk.

    A view of x when chunk_size divides n (F.pad would copy even with nothing to add)."""
    b, h, n, e = x.shape
    c = num_chunks(n, chunk_size)
    if c * chunk_size != n:
        x = F.pad(x, (0, 0, 0, c * chunk_size - n))
    return x.unflatten(2, (c, chunk_size))


def chunk_states(k_state: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """F_j = k_state[j]^T v[j] for every chunk j: [b, h, C, ds, d] in the state dtype."""
    dt = state_dtype(v.dtype)
    ks = _split_chunks(k_state, chunk_size).to(dt)
    vs = _split_chunks(v, chunk_size).to(dt)
    return ks.transpose(-1, -2) @ vs


def retrieval_weights(
    meta_q: torch.Tensor, meta_k: torch.Tensor, meta_scale: Optional[float] = None
) -> torch.Tensor:
    """p[c, j] = softmax over j < c of meta_scale * <meta_q[c], meta_k[j]>; row 0 is all zero."""
    dt = state_dtype(meta_q.dtype)
    if meta_scale is None:
        meta_scale = 1.0 / math.sqrt(meta_q.shape[-1])
    c = meta_q.shape[-2]
    earlier = torch.ones(c, c, dtype=torch.bool, device=meta_q.device).tril(-1)
    logits = (meta_q.to(dt) @ meta_k.to(dt).transpose(-1, -2)) * meta_scale
    # A finite fill keeps row 0 (no earlier chunk) NaN-free in forward and backward; the final
    # masked_fill then removes it and every masked entry.
    logits = logits.masked_fill(~earlier, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1).masked_fill(~earlier, 0.0)


def block_retrieval(
    meta_q: torch.Tensor,
    meta_k: torch.Tensor,
    states: torch.Tensor,
    meta_scale: Optional[float] = None,
) -> torch.Tensor:
    """S_c = sum_{j<c} p[c, j] F_j: [b, h, C, ds, d] in the state dtype."""
    p = retrieval_weights(meta_q, meta_k, meta_scale)
    b, h, c, ds, d = states.shape
    return (p.to(states.dtype) @ states.reshape(b, h, c, ds * d)).view(b, h, c, ds, d)


def _local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    chunk_overlap: int,
    scale: float,
) -> torch.Tensor:
    """Causal softmax attention of each chunk over itself plus `chunk_overlap` earlier tokens."""
    b, h, n, d = q.shape
    bsz, w = chunk_size, chunk_overlap
    c = num_chunks(n, bsz)
    qc = _split_chunks(q, bsz).reshape(b, h * c, bsz, d)
    if w == 0:
        kc = _split_chunks(k, bsz).reshape(b, h * c, bsz, d)
        vc = _split_chunks(v, bsz).reshape(b, h * c, bsz, d)
        out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)
    else:
        # Window of chunk c: tokens [c*B - w, c*B + B), taken from k padded by w in front.
        pad = (0, 0, w, c * bsz - n)
        kc = F.pad(k, pad).unfold(2, bsz + w, bsz).transpose(-1, -2).reshape(b, h * c, bsz + w, d)
        vc = F.pad(v, pad).unfold(2, bsz + w, bsz).transpose(-1, -2).reshape(b, h * c, bsz + w, d)
        i = torch.arange(bsz, device=q.device).view(1, bsz, 1)
        j = torch.arange(bsz + w, device=q.device).view(1, 1, bsz + w)
        first = torch.arange(c, device=q.device).view(c, 1, 1) * bsz
        allowed = (j - w <= i) & (first - w + j >= 0)  # causal, and no key before token 0
        mask = allowed.repeat(h, 1, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)
    return out.reshape(b, h, c * bsz, d)[:, :, :n]


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_state: torch.Tensor,
    retrieved: torch.Tensor,
    chunk_size: int,
    chunk_overlap: int = 0,
    scale: Optional[float] = None,
    state_scale: Optional[float] = None,
) -> torch.Tensor:
    """o_t = state_scale * q_state[t] @ S_chunk(t) + local causal softmax attention."""
    b, h, n, d = q.shape
    ds = q_state.shape[-1]
    scale, _, state_scale = resolve_scales(d, 1, ds, chunk_size, scale, None, state_scale)
    local = _local_attention(q, k, v, chunk_size, chunk_overlap, scale)
    qs = _split_chunks(q_state, chunk_size).to(retrieved.dtype)
    long_range = (qs @ retrieved).view(b, h, -1, d)[:, :, :n] * state_scale
    return (local.to(retrieved.dtype) + long_range).to(q.dtype)


def bsbr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta_q: torch.Tensor,
    meta_k: torch.Tensor,
    chunk_size: int,
    chunk_overlap: int = 0,
    scale: Optional[float] = None,
    meta_scale: Optional[float] = None,
    state_scale: Optional[float] = None,
    q_state: Optional[torch.Tensor] = None,
    k_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Chunked BSBR: chunk states -> block retrieval -> chunk attention."""
    q_state = q if q_state is None else q_state
    k_state = k if k_state is None else k_state
    states = chunk_states(k_state, v, chunk_size)
    retrieved = block_retrieval(meta_q, meta_k, states, meta_scale)
    return chunk_attention(q, k, v, q_state, retrieved, chunk_size, chunk_overlap, scale, state_scale)


def bsbr_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta_q: torch.Tensor,
    meta_k: torch.Tensor,
    chunk_size: int,
    chunk_overlap: int = 0,
    scale: Optional[float] = None,
    meta_scale: Optional[float] = None,
    state_scale: Optional[float] = None,
    q_state: Optional[torch.Tensor] = None,
    k_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SPEC §1 dense ground truth, O(n^2): softmax(scale QK^T | L) V + (A ⊙ Q_s K_s^T) V."""
    q_state = q if q_state is None else q_state
    k_state = k if k_state is None else k_state
    n, d = q.shape[-2:]
    scale, meta_scale, state_scale = resolve_scales(
        d, meta_q.shape[-1], q_state.shape[-1], chunk_size, scale, meta_scale, state_scale
    )
    t = torch.arange(n, device=q.device)
    chunk = t // chunk_size
    u, tt = t.view(1, n), t.view(n, 1)
    window = (u <= tt) & (u >= chunk.view(n, 1) * chunk_size - chunk_overlap)
    logits = (q @ k.transpose(-1, -2)) * scale
    local = torch.softmax(logits.masked_fill(~window, float("-inf")), dim=-1) @ v

    p = retrieval_weights(meta_q, meta_k, meta_scale).to(q.dtype)
    a = p[..., chunk.view(n, 1), chunk.view(1, n)] * state_scale  # p[chunk(t), chunk(u)]
    a = a.masked_fill(~(chunk.view(1, n) < chunk.view(n, 1)), 0.0)
    long_range = (a * (q_state @ k_state.transpose(-1, -2))) @ v
    return local + long_range


# ----------------------------------------------------------------------------------------------
# streaming decode (the plain-PyTorch twins of torch.ops.bsbr.decode_attention / decode_retrieval)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    retrieved: torch.Tensor,
    position: torch.Tensor,
    chunk_size: int,
    chunk_overlap: int = 0,
    scale: Optional[float] = None,
    state_scale: Optional[float] = None,
    q_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One new token per row: writes ``k, v`` into slot ``w + t % B`` of the windows (in place),
    then returns ``o_t = state_scale * q_state @ S_c [c >= 1] + softmax(scale q . window) window_v``
    over the slots of ``W(t)``: ``[w, w + p]`` in the first chunk, ``[0, w + p]`` after it.

    Shapes: q, k, v ``[b, h, d]``; windows ``[b, h, w + B, d]``; retrieved ``[b, h, ds, d]``;
    position ``[b]`` (the index t of the new token in its row); q_state ``[b, h, ds]``.
    """
    w, size = chunk_overlap, chunk_size
    qs = q if q_state is None else q_state
    scale, _, state_scale = resolve_scales(q.shape[-1], 1, qs.shape[-1], size, scale, None, state_scale)
    acc = state_dtype(q.dtype)
    chunk, offset = position // size, position % size
    rows = torch.arange(q.shape[0], device=q.device)
    window_k[rows, :, w + offset] = k
    window_v[rows, :, w + offset] = v
    slots = torch.arange(w + size, device=q.device)
    lo = torch.where(chunk == 0, w, 0)
    valid = (slots >= lo[:, None]) & (slots <= (w + offset)[:, None])  # [b, w + B]
    scores = torch.einsum("bhd,bhsd->bhs", q.to(acc), window_k.to(acc)) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    local = torch.einsum("bhs,bhsd->bhd", scores.softmax(dim=-1), window_v.to(acc))
    state = torch.einsum("bhs,bhsd->bhd", qs.to(acc), retrieved.to(acc)) * state_scale
    state = torch.where((chunk >= 1)[:, None, None], state, torch.zeros_like(state))
    return (local + state).to(q.dtype)


def decode_retrieval(
    meta_q: torch.Tensor,
    meta_k: torch.Tensor,
    states: torch.Tensor,
    num_chunks: torch.Tensor,
    meta_scale: Optional[float] = None,
) -> torch.Tensor:
    """``S = sum_{j < num_chunks} softmax_j(meta_scale <meta_q, meta_k[j]>) states[j]`` per row
    (0 when num_chunks is 0): meta_q ``[b, h, dm]``, meta_k ``[b, h, cap, dm]``, states
    ``[b, h, cap, ds, d]``, num_chunks ``[b]``; returns ``[b, h, ds, d]`` in the states' dtype."""
    _, meta_scale, _ = resolve_scales(1, meta_q.shape[-1], 1, 1, None, meta_scale, None)
    acc = states.dtype
    logits = torch.einsum("bhm,bhjm->bhj", meta_q.to(acc), meta_k.to(acc)) * meta_scale
    valid = torch.arange(meta_k.shape[2], device=meta_k.device)[None, :] < num_chunks[:, None]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    # A row with no earlier chunk retrieves nothing (not NaN).
    weights = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)
    return torch.einsum("bhj,bhjsd->bhsd", weights, states)

