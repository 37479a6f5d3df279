"""The module layer of SPEC §2: BSBRAttention, BSBRLayer, BSBRModel.

Padding (``attention_mask``, 1 = token, 0 = padding) is handled by *packing*: every row is permuted
so that its real tokens come first, in order, and its padding after them. In that packed layout the
operator's causality alone keeps padding from reaching any real token (local softmax, chunk states,
retrieval), chunking starts at each row's first real token, and positions count from there; so a
padded batch gives every sequence what it gets when run alone. Outputs are permuted back and
padding positions are set to exactly 0. Left and right padding (the documented cases) are a roll;
any other mask packs the real tokens the same way. No host synchronisation is involved.

Everything here is TorchScript-compatible: ``torch.jit.script(BSBRModel(...).eval())`` works.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import BSBRCache, BSBRLayerCache
from .functional import bsbr_attention, chunk_states, decode_attention, decode_retrieval

__all__ = ["BSBRAttention", "BSBRLayer", "BSBRModel"]


# ----------------------------------------------------------------------------------------------
# helpers (the argument checks run in __init__ only; the rest is scriptable)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_dropout(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"dropout must be a float in [0, 1], got {value!r}")


def packing_permutation(keep: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """For a boolean mask ``keep: [b, n]`` return ``(src, dest, packed_keep)``, all ``[b, n]``.

    ``packed[:, j] = x[:, src[:, j]]`` puts every row's real tokens first (in order) and its
    padding after them; ``x[:, i] = packed[:, dest[:, i]]`` undoes it; ``packed_keep`` is the mask
    in the packed layout (``j < number of real tokens``). For left padding this is a roll by the
    number of leading padding tokens; for right padding it is the identity.
    """
    n = keep.shape[1]
    keep_i = keep.to(torch.long)
    n_real = keep_i.sum(dim=1, keepdim=True)
    real_rank = keep_i.cumsum(dim=1) - 1
    pad_rank = (1 - keep_i).cumsum(dim=1) - 1 + n_real
    dest = torch.where(keep, real_rank, pad_rank)
    positions = torch.arange(n, device=keep.device).unsqueeze(0).expand_as(dest)
    src = torch.empty_like(dest).scatter_(1, dest, positions)
    packed_keep = positions < n_real
    return src, dest, packed_keep


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, j] = x[b, index[b, j]]`` for ``x: [b, n, e]`` and ``index: [b, n]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def sinusoidal_positions(positions: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Sinusoidal embeddings ``[..., dim]`` of integer positions of any size (no max length)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    half = (dim + 1) // 2
    freq = torch.exp(
        torch.arange(half, device=positions.device, dtype=acc) * (-math.log(10000.0) / half)
    )
    angles = positions.to(acc).unsqueeze(-1) * freq
    emb = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return emb[..., :dim].to(dtype)


# ----------------------------------------------------------------------------------------------
# attention


class BSBRAttention(nn.Module):
    """Multi-head BSBR attention (SPEC §2) on ``x: [b, n, hidden_dim]``.

    Args:
        hidden_dim: model width; must be divisible by ``num_heads``.
        num_heads: number of heads; head dim ``d = hidden_dim // num_heads``.
        chunk_size: block size ``B >= 1``.
        dropout: dropout on the attention output (before the output projection).
        compression_factor: ``f``; ``None`` or 1 = no state compression; ``f > 1`` must divide
            ``d`` and adds a learned ``P: d x d/f`` (shared by the heads) with
            ``q_state = q P``, ``k_state = k P``.
        chunk_overlap: ``0 <= w <= chunk_size`` tokens of the previous chunk in each local window.

    ``forward(x, attention_mask=None)`` returns ``[b, n, hidden_dim]``; with a mask
    (``[b, n]``, 1 = token, 0 = padding) outputs at padding positions are exactly 0.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        chunk_size: int,
        dropout: float = 0.0,
        compression_factor: Optional[int] = None,
        chunk_overlap: int = 0,
    ) -> None:
        super().__init__()
        _check_int("hidden_dim", hidden_dim, 1)
        _check_int("num_heads", num_heads, 1)
        if hidden_dim % num_heads != 0:
            raise ValueError(
                f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})"
            )
        _check_int("chunk_size", chunk_size, 1)
        _check_int("chunk_overlap", chunk_overlap, 0)
        if chunk_overlap > chunk_size:
            raise ValueError(
                f"chunk_overlap must satisfy 0 <= chunk_overlap <= chunk_size, "
                f"got chunk_overlap={chunk_overlap}, chunk_size={chunk_size}"
            )
        _check_dropout(dropout)
        head_dim = hidden_dim // num_heads
        if compression_factor is not None:
            _check_int("compression_factor", compression_factor, 1)
            if head_dim % compression_factor != 0:
                raise ValueError(
                    f"compression_factor ({compression_factor}) must divide the head dim "
                    f"hidden_dim // num_heads = {head_dim}"
                )

        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.meta_dim = head_dim  # per-head dim of the chunk retrieval queries/keys
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.compression_factor = 1 if compression_factor is None else compression_factor
        self.state_dim = head_dim // self.compression_factor

        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        # W_r (meta queries, from the previous chunk's summary) and W_h (meta keys).
        self.meta_query = nn.Linear(hidden_dim, num_heads * self.meta_dim, bias=False)
        self.meta_key = nn.Linear(hidden_dim, num_heads * self.meta_dim, bias=False)
        if self.compression_factor > 1:
            # P (stored transposed, d/f x d) with orthonormal columns at init: q_state is q
            # projected onto a learned subspace.
            self.state_proj = nn.Linear(head_dim, self.state_dim, bias=False)
            nn.init.orthogonal_(self.state_proj.weight)
        else:
            self.state_proj = None
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return (
            f"hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, "
            f"chunk_size={self.chunk_size}, chunk_overlap={self.chunk_overlap}, "
            f"compression_factor={self.compression_factor}"
        )

    # -- pieces (small so that a streaming cache can reuse them) ---------------------------------

    def split_heads(self, t: Tensor) -> Tensor:
        """``[b, n, heads * e] -> [b, heads, n, e]`` (contiguous)."""
        b, n, e = t.shape[0], t.shape[1], t.shape[2] // self.num_heads
        # clone, not .contiguous(): the copy is needed anyway unless n == 1, and .contiguous()
        # would make torch.export guard on n != 1 (here the chunk count, which may be 1).
        return t.view(b, n, self.num_heads, e).transpose(1, 2).clone(
            memory_format=torch.contiguous_format
        )

    def merge_heads(self, t: Tensor) -> Tensor:
        """``[b, heads, n, e] -> [b, n, heads * e]``."""
        b, n = t.shape[0], t.shape[2]
        return t.transpose(1, 2).reshape(b, n, -1)

    def project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Token queries, keys, values ``[b, h, n, d]``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def project_state(self, t: Tensor) -> Optional[Tensor]:
        """``t P`` (``[b, h, n, d/f]``) when compressing, else None (the op then uses ``t``)."""
        if self.state_proj is None:
            return None
        return self.state_proj(t)

    def chunk_sums(self, x: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Per-chunk sums of ``x`` over real tokens (``[b, C, hidden]``, fp32; fp64 for fp64) and
        the token counts (broadcastable to the sums)."""
        b, n, e = x.shape[0], x.shape[1], x.shape[2]
        size = self.chunk_size
        c = (n + size - 1) // size
        pad = c * size - n
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if mask is None:
            sums = F.pad(x, (0, 0, 0, pad)).view(b, c, size, e).sum(dim=2, dtype=acc)
            starts = torch.arange(c, device=x.device) * size
            counts = (n - starts).clamp(max=size).to(acc).view(1, c, 1)
        else:
            xm = torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))
            sums = F.pad(xm, (0, 0, 0, pad)).view(b, c, size, e).sum(dim=2, dtype=acc)
            counts = F.pad(mask.to(acc), (0, pad)).view(b, c, size).sum(dim=2).unsqueeze(-1)
        return sums, counts

    def chunk_summaries(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``xbar: [b, C, hidden]``, the mean of ``x`` over the real tokens of each chunk.

        ``mask`` (bool ``[b, n]``, True = token) excludes padding; a chunk without real tokens
        gets 0; the partial last chunk is averaged over the tokens it has.
        """
        sums, counts = self.chunk_sums(x, mask)
        return self.summaries_from(sums, counts, x.dtype)

    def summaries_from(self, sums: Tensor, counts: Tensor, dtype: torch.dtype) -> Tensor:
        """Chunk means from ``chunk_sums``; a chunk without real tokens gets 0."""
        return (sums / counts.clamp(min=1.0)).to(dtype)

    def meta_keys(self, xbar: Tensor) -> Tensor:
        """``meta_k[c] = W_h xbar_c``: ``[b, h, C, dm]``."""
        return self.split_heads(self.meta_key(xbar))

    def meta_queries_from(self, xbar_prev: Tensor) -> Tensor:
        """``W_r xbar``: the meta queries of the chunks that *follow* the summarised chunks."""
        return self.split_heads(self.meta_query(xbar_prev))

    def meta_queries(self, xbar: Tensor) -> Tensor:
        """``meta_q[c] = W_r xbar_{c-1}`` for ``c >= 1``, ``meta_q[0] = 0``: ``[b, h, C, dm]``."""
        # Project every chunk's summary, then shift by one chunk: projecting the (strided) slice
        # xbar[:, :-1] instead makes torch.export guard on batch != 1 and C - 1 != 1.
        mq = self.meta_queries_from(xbar)[:, :, :-1]
        return F.pad(mq, (0, 0, 1, 0))

    # -- forward ---------------------------------------------------------------------------------

    def packed_inputs(self, x: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x, q, k, v)`` of a packed batch with padding zeroed in ``x`` and ``v``."""
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))
        q, k, v = self.project_qkv(x)
        if mask is not None:
            v = torch.where(mask.view(mask.shape[0], 1, mask.shape[1], 1), v, torch.zeros_like(v))
        return x, q, k, v

    def output(self, heads_out: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Output projection of ``[b, h, n, d]``; 0 at padding positions."""
        out = self.out_proj(self.dropout(self.merge_heads(heads_out)))
        if mask is not None:
            out = torch.where(mask.unsqueeze(-1), out, torch.zeros_like(out))
        return out

    def forward_packed(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Forward on a packed batch: ``mask`` (bool ``[b, n]``) is True on a prefix of each row.

        Padding sits after every real token of its row, so causality alone keeps it away from
        real tokens' local softmax and retrieval. It is also zeroed on input, its values are
        zeroed (so chunk states ``k_state^T v`` sum over real tokens only), it is excluded from
        the summaries, and its outputs are 0.
        """
        return self.attend_packed(x, mask)[0]

    def attend_packed(
        self, x: Tensor, mask: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``forward_packed`` and what a streaming cache is built from:
        ``(out, k, v, k_state, chunk sums, chunk summaries, meta_k)``, with ``k_state`` = ``k``
        uncompressed."""
        x, q, k, v = self.packed_inputs(x, mask)
        sums, counts = self.chunk_sums(x, mask)
        xbar = self.summaries_from(sums, counts, x.dtype)
        meta_k = self.meta_keys(xbar)
        k_state = self.project_state(k)
        out = bsbr_attention(
            q,
            k,
            v,
            self.meta_queries(xbar),
            meta_k,
            self.chunk_size,
            self.chunk_overlap,
            None,
            None,
            None,
            self.project_state(q),
            k_state,
        )
        return self.output(out, mask), k, v, k if k_state is None else k_state, sums, xbar, meta_k

    # -- streaming (see bsbr_ext.cache; Python only, not part of the TorchScript surface) --------

    @torch.jit.unused
    def prefill(self, x: Tensor, mask: Optional[Tensor], lengths: Tensor):
        """``forward_packed`` that also returns this layer's :class:`BSBRLayerCache` for rows of
        ``lengths`` real tokens (``[b]`` int64, the packed prefix lengths)."""
        out, k, v, k_state, sums, xbar, meta_k = self.attend_packed(x, mask)
        with torch.no_grad():
            cache = self._build_cache(
                k.detach(), v.detach(), k_state.detach(), sums, xbar.detach(), meta_k.detach(), lengths
            )
        return out, cache

    def _build_cache(
        self, k: Tensor, v: Tensor, k_state: Tensor, sums: Tensor, xbar: Tensor, meta_k: Tensor,
        lengths: Tensor,
    ) -> BSBRLayerCache:
        b, h, n, d = k.shape
        size, w = self.chunk_size, self.chunk_overlap
        chunk = lengths // size  # the chunk each row's next token falls in
        # Window slot s holds token chunk*B - w + s while that token exists.
        tokens = chunk[:, None] * size - w + torch.arange(w + size, device=k.device)
        present = (tokens >= 0) & (tokens < lengths[:, None])
        index = tokens.clamp(0, n - 1).view(b, 1, w + size, 1)

        def window(t: Tensor) -> Tensor:
            got = t.gather(2, index.expand(b, h, w + size, d))
            return torch.where(present.view(b, 1, w + size, 1), got, torch.zeros_like(got))

        states = chunk_states(k_state, v, size)
        # The meta query of each row's current chunk comes from the summary of the chunk before.
        rows = torch.arange(b, device=k.device)
        prev = (chunk - 1).clamp(min=0)
        meta_q = self.meta_queries_from(xbar[rows, prev].unsqueeze(1))[:, :, 0]
        retrieved = decode_retrieval(meta_q, meta_k, states, chunk)
        # The running sum of the current chunk (0 when no token of it has arrived).
        current = sums[rows, chunk.clamp(max=sums.shape[1] - 1)]
        summary = torch.where((lengths % size != 0).unsqueeze(-1), current, torch.zeros_like(current))
        return BSBRLayerCache(
            window(k), window(v), states, meta_k, retrieved, summary.to(retrieved.dtype)
        )

    @torch.jit.unused
    def decode(self, x: Tensor, layer_cache: BSBRLayerCache, lengths: Tensor, completes: bool) -> Tensor:
        """One token per row (``x: [b, 1, hidden]``) at positions ``lengths``: its output
        ``[b, 1, hidden]``, updating ``layer_cache`` in place (the caller advances the lengths).
        ``completes``: whether this token completes a chunk in some row."""
        b = x.shape[0]
        size, w = self.chunk_size, self.chunk_overlap
        # [b, h, d] views of the one token's projections (no copies at batch 1).
        q, k, v = self.qkv(x).view(b, 3, self.num_heads, self.head_dim).unbind(1)
        q_state = self.project_state(q)
        lc = layer_cache
        out = decode_attention(
            q, k, v, lc.window_k, lc.window_v, lc.retrieved, lengths, size, w, q_state=q_state,
        )
        lc.summary += x[:, 0]
        if completes:
            self._complete_chunk(lc, lengths, x.dtype)
        return self.output(out.view(b, self.num_heads, 1, self.head_dim), None)

    def _complete_chunk(self, lc: BSBRLayerCache, lengths: Tensor, dtype: torch.dtype) -> None:
        """Store the state and meta key of each row's chunk that the current token completes,
        retrieve the next chunk's state, and move the overlap; rows whose chunk goes on keep
        theirs (what is written at their current chunk's index is overwritten before use)."""
        size, w = self.chunk_size, self.chunk_overlap
        done = lengths % size == size - 1
        chunk = lengths // size
        rows = torch.arange(lengths.shape[0], device=lengths.device)
        keys, values = lc.window_k[:, :, w:], lc.window_v[:, :, w:]
        k_state = self.project_state(keys)
        lc.states[rows, :, chunk] = chunk_states(keys if k_state is None else k_state, values, size)[:, :, 0]
        xbar = (lc.summary / size).to(dtype).unsqueeze(1)
        lc.meta_k[rows, :, chunk] = self.meta_keys(xbar)[:, :, 0]
        meta_q = self.meta_queries_from(xbar)[:, :, 0]
        retrieved = decode_retrieval(meta_q, lc.meta_k, lc.states, chunk + 1)
        # In place: a captured decoding step (bsbr_ext.decoding) reads these very buffers.
        done4 = done.view(-1, 1, 1, 1)
        lc.retrieved.copy_(torch.where(done4, retrieved, lc.retrieved))
        if w > 0:
            lc.window_k[:, :, :w] = torch.where(done4, lc.window_k[:, :, size:], lc.window_k[:, :, :w])
            lc.window_v[:, :, :w] = torch.where(done4, lc.window_v[:, :, size:], lc.window_v[:, :, :w])
        lc.summary.masked_fill_(done.unsqueeze(-1), 0.0)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"x must have shape [batch, seq_len, hidden_dim={self.hidden_dim}], "
                f"got {list(x.shape)}"
            )
        if attention_mask is None:
            return self.forward_packed(x, None)
        keep = _check_mask(attention_mask, x.shape[0], x.shape[1])
        src, dest, packed_keep = packing_permutation(keep)
        out = self.forward_packed(gather_tokens(x, src), packed_keep)
        return gather_tokens(out, dest)


def _check_mask(attention_mask: Tensor, b: int, n: int) -> Tensor:
    if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] != n:
        raise ValueError(
            f"attention_mask must have shape [batch, seq_len] = [{b}, {n}], "
            f"got {list(attention_mask.shape)}"
        )
    return attention_mask != 0


# ----------------------------------------------------------------------------------------------
# layer and model


class BSBRLayer(nn.Module):
    """Pre-norm residual block: ``x + drop(attn(norm1(x)))``, then ``x + drop(ffn(norm2(x)))``."""

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        chunk_size: int,
        ff_dim: int,
        dropout: float = 0.1,
        compression_factor: Optional[int] = None,
        chunk_overlap: int = 0,
    ) -> None:
        super().__init__()
        _check_int("ff_dim", ff_dim, 1)
        _check_dropout(dropout)
        self.attention = BSBRAttention(
            hidden_dim, num_heads, chunk_size, dropout, compression_factor, chunk_overlap
        )
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.ff = nn.Sequential(
            nn.Linear(hidden_dim, ff_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ff_dim, hidden_dim),
        )
        self.dropout = nn.Dropout(dropout)

    def feed_forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.ff(self.norm2(x)))

    def forward_packed(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Forward on a packed batch (see ``BSBRAttention.forward_packed``)."""
        x = x + self.dropout(self.attention.forward_packed(self.norm1(x), mask))
        return self.feed_forward(x)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), attention_mask))
        return self.feed_forward(x)

    @torch.jit.unused
    def prefill(self, x: Tensor, mask: Optional[Tensor], lengths: Tensor):
        """``forward_packed`` plus this layer's cache (see ``BSBRAttention.prefill``)."""
        out, layer_cache = self.attention.prefill(self.norm1(x), mask, lengths)
        return self.feed_forward(x + self.dropout(out)), layer_cache

    @torch.jit.unused
    def decode(self, x: Tensor, layer_cache: BSBRLayerCache, lengths: Tensor, completes: bool) -> Tensor:
        """One token per row (see ``BSBRAttention.decode``)."""
        x = x + self.dropout(self.attention.decode(self.norm1(x), layer_cache, lengths, completes))
        return self.feed_forward(x)


class BSBRModel(nn.Module):
    """Embedding, sinusoidal positions (any length), ``num_layers`` BSBR layers, final LayerNorm.

    ``forward(input_ids [b, n], attention_mask=None) -> [b, n, hidden_dim]`` hidden states.
    Positions count from each row's first real token; hidden states at padding positions are 0.
    ``use_checkpointing`` recomputes each layer in backward (training, eager mode only).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        chunk_size: int,
        ff_dim: int,
        dropout: float = 0.1,
        compression_factor: Optional[int] = None,
        chunk_overlap: int = 0,
        use_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_int("vocab_size", vocab_size, 1)
        _check_int("hidden_dim", hidden_dim, 1)
        _check_int("num_layers", num_layers, 1)
        _check_dropout(dropout)
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.use_checkpointing = bool(use_checkpointing)
        self.embedding = nn.Embedding(vocab_size, hidden_dim)
        # Unit-variance inputs: embedding * sqrt(hidden) ~ N(0, 1), like the sinusoids.
        nn.init.normal_(self.embedding.weight, std=hidden_dim**-0.5)
        self.embed_scale = math.sqrt(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            [
                BSBRLayer(
                    hidden_dim,
                    num_heads,
                    chunk_size,
                    ff_dim,
                    dropout,
                    compression_factor,
                    chunk_overlap,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden_dim)

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Token embedding plus sinusoidal position embedding (``positions`` broadcastable)."""
        x = self.embedding(input_ids) * self.embed_scale
        return self.dropout(x + sinusoidal_positions(positions, self.hidden_dim, x.dtype))

    def run_layers(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """All layers on a packed batch, with checkpointing when enabled and training."""
        if self.use_checkpointing and self.training and not torch.jit.is_scripting():
            return self._run_layers_checkpointed(x, mask)
        for layer in self.layers:
            x = layer.forward_packed(x, mask)
        return x

    @torch.jit.unused
    def _run_layers_checkpointed(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            x = checkpoint(layer.forward_packed, x, mask, use_reentrant=False)
        return x

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[BSBRCache] = None,
        use_cache: bool = False,
    ) -> Tensor:
        """Hidden states ``[b, n, hidden_dim]``; with ``use_cache=True`` or a ``cache``, the pair
        ``(hidden states, cache)``: a call without a cache is the prefill (any length, optional
        ``attention_mask``) and returns a new :class:`BSBRCache`; a call with one continues every
        row by ``n`` more real tokens and updates the cache in place."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape [batch, seq_len], got {list(input_ids.shape)}"
            )
        if cache is not None or use_cache:
            return self.forward_cached(input_ids, attention_mask, cache)
        x, mask, dest = self.embed_packed(input_ids, attention_mask)
        return self.unpack(self.run_layers(x, mask), mask, dest)

    def embed_packed(
        self, input_ids: Tensor, attention_mask: Optional[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(x, mask, dest)``: the embedded batch in the packed layout, its mask (True on each
        row's prefix of real tokens) and the permutation back (both None without a mask)."""
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device)
        if attention_mask is None:
            return self.embed(input_ids, positions), None, None
        keep = _check_mask(attention_mask, input_ids.shape[0], n)
        src, dest, mask = packing_permutation(keep)
        # Packed, every row's real tokens sit at positions 0, 1, ...: positions are plain arange.
        return self.embed(input_ids.gather(1, src), positions), mask, dest

    def unpack(self, x: Tensor, mask: Optional[Tensor], dest: Optional[Tensor]) -> Tensor:
        """Final norm, then padding set to 0 and the original token order restored."""
        x = self.norm(x)
        if mask is None or dest is None:
            return x
        return gather_tokens(torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x)), dest)

    # -- streaming -------------------------------------------------------------------------------

    @torch.jit.unused
    def forward_cached(
        self, input_ids: Tensor, attention_mask: Optional[Tensor], cache: Optional[BSBRCache]
    ):
        if cache is None:
            return self.prefill(input_ids, attention_mask)
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is taken by the prefill only (the call without a cache); "
                "with a cache every new token is real"
            )
        attn = self.layers[0].attention
        if (
            len(cache.layers) != len(self.layers)
            or cache.batch_size() != input_ids.shape[0]
            or (cache.chunk_size, cache.chunk_overlap) != (attn.chunk_size, attn.chunk_overlap)
        ):
            raise ValueError(
                f"cache does not fit this model and batch: {cache!r} vs {len(self.layers)} layers, "
                f"batch {input_ids.shape[0]}, chunk_size {attn.chunk_size}, "
                f"chunk_overlap {attn.chunk_overlap}"
            )
        steps = [self.decode_step(input_ids[:, i : i + 1], cache) for i in range(input_ids.shape[1])]
        return (steps[0] if len(steps) == 1 else torch.cat(steps, dim=1)), cache

    @torch.jit.unused
    def prefill(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None):
        """The parallel forward that also returns the cache of every row's real tokens."""
        b, n = input_ids.shape[0], input_ids.shape[1]
        if n == 0:
            raise ValueError("input_ids must hold at least one token to prefill a cache")
        x, mask, dest = self.embed_packed(input_ids, attention_mask)
        if mask is None:
            lengths = torch.full((b,), n, dtype=torch.long, device=input_ids.device)
            host_lengths = [n] * b
        else:
            lengths = mask.sum(dim=1)
            host_lengths = lengths.tolist()  # one sync: which later steps complete a chunk
            if min(host_lengths) == 0:
                raise ValueError("attention_mask must keep at least one token in every row")
        layer_caches = []
        for layer in self.layers:
            x, layer_cache = layer.prefill(x, mask, lengths)
            layer_caches.append(layer_cache)
        x = self.unpack(x, mask, dest)
        attn = self.layers[0].attention
        cache = BSBRCache(layer_caches, lengths, host_lengths, attn.chunk_size, attn.chunk_overlap)
        return x, cache

    @torch.jit.unused
    def decode_step(self, input_ids: Tensor, cache: BSBRCache) -> Tensor:
        """Hidden states ``[b, 1, hidden]`` of one new token per row (``input_ids: [b, 1]``)."""
        hidden = self.decode_device_step(input_ids, cache, cache.prepare_step())
        cache.advance_host()
        return hidden

    @torch.jit.unused
    def decode_device_step(self, input_ids: Tensor, cache: BSBRCache, completes: bool) -> Tensor:
        """The device work of ``decode_step``: no host sync and, on steps that complete no chunk,
        no allocation that outlives the step, so a CUDA graph can capture it."""
        x = self.embed(input_ids, cache.lengths.view(-1, 1))
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer.decode(x, layer_cache, cache.lengths, completes)
        cache.lengths += 1
        return self.norm(x)
