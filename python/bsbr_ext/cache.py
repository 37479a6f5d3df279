"""The streaming state of a BSBR model: what each layer keeps between decoding steps.

Both classes are TorchScript classes too (a scripted BSBRModel keeps its forward signature).

A long context costs a small, slowly growing state instead of a KV cache of every token. Per
layer and row, in the row's own (packed) token frame, where the row's first real token is
position 0 and its chunk ``c`` holds positions ``[c*B, (c+1)*B)``:

- ``states [b, h, capacity, ds, d]`` (fp32) and ``meta_k [b, h, capacity, dm]``: the completed
  chunks' states ``k_state^T v`` and meta keys; entries ``j < lengths // B`` are valid.
- ``retrieved [b, h, ds, d]`` (fp32): ``S_c`` of the current chunk, computed once when the chunk
  before it completes.
- ``window_k, window_v [b, h, w + B, d]``: slots ``[0, w)`` hold the last ``w`` tokens of the
  previous chunk (the overlap), slot ``w + p`` the current chunk's ``p``-th token.
- ``summary [b, hidden]`` (fp32): the sum of the layer's attention input over the current chunk's
  tokens; its mean is the chunk summary that gives the chunk's meta key and the next chunk's
  meta query.

Rows may sit at different positions (a left-padded prompt): ``lengths`` (``[b]`` int64, on the
model's device) counts each row's real tokens; ``host_lengths`` mirrors it on the host so that
the model knows without a device sync which steps complete a chunk.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

__all__ = ["BSBRCache", "BSBRLayerCache"]


def _append_zero_chunks(t: Tensor, extra: int) -> Tensor:
    shape = list(t.shape)
    shape[2] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=2)


class BSBRLayerCache:
    """One layer's streaming state (see the module docstring for the layout)."""

    def __init__(
        self,
        window_k: Tensor,
        window_v: Tensor,
        states: Tensor,
        meta_k: Tensor,
        retrieved: Tensor,
        summary: Tensor,
    ) -> None:
        self.window_k = window_k
        self.window_v = window_v
        self.states = states
        self.meta_k = meta_k
        self.retrieved = retrieved
        self.summary = summary

    def capacity(self) -> int:
        """How many chunk states fit before the buffers grow."""
        return self.states.shape[2]

    def reserve(self, num_chunks: int) -> None:
        """Grow ``states`` and ``meta_k`` to hold at least ``num_chunks`` chunks."""
        extra = num_chunks - self.capacity()
        if extra > 0:
            self.states = _append_zero_chunks(self.states, extra)
            self.meta_k = _append_zero_chunks(self.meta_k, extra)

    def tensors(self) -> List[Tensor]:
        return [self.window_k, self.window_v, self.states, self.meta_k, self.retrieved, self.summary]

    def nbytes(self) -> int:
        """Bytes held by this layer's buffers (allocated capacity, not only the used part)."""
        total = 0
        for t in self.tensors():
            total += t.numel() * t.element_size()
        return total


class BSBRCache:
    """The streaming state of a :class:`~bsbr_ext.BSBRModel`: one :class:`BSBRLayerCache` per
    layer plus each row's length. Returned by ``BSBRModel.forward(..., use_cache=True)`` and
    updated in place by later calls with ``cache=``."""

    def __init__(
        self,
        layers: List[BSBRLayerCache],
        lengths: Tensor,
        host_lengths: List[int],
        chunk_size: int,
        chunk_overlap: int,
    ) -> None:
        self.layers = layers
        self.lengths = lengths
        self.host_lengths = host_lengths
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap

    def batch_size(self) -> int:
        return len(self.host_lengths)

    def prepare_step(self) -> bool:
        """Whether the next token completes a chunk in some row (that step also stores the
        chunk's state and retrieves the next chunk's); if so, makes room for it. Every row writes
        at its current chunk's index on such a step, so room is made for the furthest row."""
        completes = False
        for n in self.host_lengths:
            if n % self.chunk_size == self.chunk_size - 1:
                completes = True
        if not completes:
            return False
        needed = max(self.host_lengths) // self.chunk_size + 1
        for layer in self.layers:
            if needed > layer.capacity():
                layer.reserve(max(needed, layer.capacity() + layer.capacity() // 4 + 1))
        return True

    def reserve(self, max_length: int) -> None:
        """Allocate room for ``max_length`` tokens per row now, so that decoding up to that length
        never reallocates (buffers otherwise grow by a quarter when full)."""
        for layer in self.layers:
            layer.reserve(max_length // self.chunk_size)

    def advance_host(self) -> None:
        """Count one more token in every row on the host (``lengths`` is advanced on the device
        by the decoding step itself)."""
        self.host_lengths = [n + 1 for n in self.host_lengths]

    def nbytes(self) -> int:
        """Bytes held by every layer's buffers."""
        total = 0
        for layer in self.layers:
            total += layer.nbytes()
        return total

    @torch.jit.unused
    def __repr__(self) -> str:
        return (
            f"BSBRCache(layers={len(self.layers)}, batch={self.batch_size()}, "
            f"lengths={self.host_lengths}, chunk_size={self.chunk_size}, "
            f"chunk_overlap={self.chunk_overlap}, nbytes={self.nbytes()})"
        )
