"""Decoding with CUDA graphs: one captured graph replays every step that completes no chunk.

At small batch a decoding step is a few hundred tiny kernels, so launching them costs more than
running them. BSBR's step touches fixed buffers (the cache's windows and retrieved states, updated
in place), so one CUDA graph captured from a step that completes no chunk replays every such
step; the steps that complete a chunk (one in ``chunk_size``; they also run the retrieval and may
grow the state buffers) run eagerly.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .cache import BSBRCache
from .modules import BSBRModel

__all__ = ["CUDAGraphDecoder"]


class CUDAGraphDecoder:
    """``decoder(input_ids [b, 1])`` decodes one token per row from ``cache`` (in place), like
    ``model(input_ids, cache=cache)``, and returns ``head(hidden [b, 1, hidden_dim])`` (the
    hidden states when ``head`` is None).

    The graph is bound to this model, cache and batch size. It is captured on the second step
    that completes no chunk (the first runs eagerly and warms every kernel up).
    """

    def __init__(
        self, model: BSBRModel, cache: BSBRCache, head: Optional[Callable[[Tensor], Tensor]] = None
    ) -> None:
        if not cache.lengths.is_cuda:
            raise ValueError(f"CUDAGraphDecoder needs a cache on a CUDA device, got {cache.lengths.device}")
        self.model, self.cache, self.head = model, cache, head
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warmed_up = False
        self.static_ids: Optional[Tensor] = None
        self.static_out: Optional[Tensor] = None

    def _device_step(self, input_ids: Tensor) -> Tensor:
        hidden = self.model.decode_device_step(input_ids, self.cache)
        return hidden if self.head is None else self.head(hidden)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Tensor:
        cache = self.cache
        if input_ids.shape != (cache.batch_size(), 1):
            raise ValueError(
                f"input_ids must have shape [batch={cache.batch_size()}, 1], got {list(input_ids.shape)}"
            )
        completes = cache.next_token_completes_chunk()
        if completes or not self.warmed_up:
            if completes:
                cache.grow_for_next_chunk()
            else:
                self.warmed_up = True
            out = self._device_step(input_ids)
        else:
            if self.graph is None:
                self.static_ids = input_ids.clone()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.static_out = self._device_step(self.static_ids)
            else:
                self.static_ids.copy_(input_ids)
            self.graph.replay()
            out = self.static_out.clone()  # the next replay overwrites static_out
        cache.advance_host()
        return out
