"""Decoding with CUDA graphs: captured decoding steps replayed token after token.

At small batch a decoding step is over a hundred tiny kernels, so launching them costs more than
running them. Every buffer a BSBR step touches is fixed (the cache's windows, retrieved states,
summaries and lengths are updated in place; each row's position comes from ``lengths`` on the
device), so a CUDA graph captured from one step replays the following ones. Two graphs are kept:
one for the steps that complete no chunk and one for the steps that complete a chunk in some row
(which also store the chunk's state and run the retrieval; which rows complete is decided on the
device). A graph is captured again when a buffer it uses was reallocated (the state buffers grow
by a quarter when full; ``BSBRCache.reserve`` avoids that).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .cache import BSBRCache
from .modules import BSBRModel

__all__ = ["CUDAGraphDecoder"]


class _CapturedStep:
    def __init__(self, graph: torch.cuda.CUDAGraph, ids: Tensor, out: Tensor, buffers: Tuple[int, ...]):
        self.graph, self.ids, self.out, self.buffers = graph, ids, out, buffers


class CUDAGraphDecoder:
    """``decoder(input_ids [b, 1])`` decodes one token per row from ``cache`` (in place), like
    ``model(input_ids, cache=cache)``, and returns ``head(hidden [b, 1, hidden_dim])`` (the
    hidden states when ``head`` is None).

    Bound to this model, cache and batch size. Each kind of step (completing a chunk or not) runs
    eagerly once, which warms its kernels up, and is captured the next time it comes.
    """

    def __init__(
        self, model: BSBRModel, cache: BSBRCache, head: Optional[Callable[[Tensor], Tensor]] = None
    ) -> None:
        if not cache.lengths.is_cuda:
            raise ValueError(f"CUDAGraphDecoder needs a cache on a CUDA device, got {cache.lengths.device}")
        self.model, self.cache, self.head = model, cache, head
        self.steps: Dict[bool, _CapturedStep] = {}  # keyed by "completes a chunk"
        self.warmed_up: Dict[bool, bool] = {}

    def _device_step(self, input_ids: Tensor, completes: bool) -> Tensor:
        hidden = self.model.decode_device_step(input_ids, self.cache, completes)
        return hidden if self.head is None else self.head(hidden)

    def _buffers(self) -> Tuple[int, ...]:
        return (self.cache.lengths.data_ptr(),) + tuple(
            t.data_ptr() for layer in self.cache.layers for t in layer.tensors()
        )

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Tensor:
        cache = self.cache
        if input_ids.shape != (cache.batch_size(), 1):
            raise ValueError(
                f"input_ids must have shape [batch={cache.batch_size()}, 1], got {list(input_ids.shape)}"
            )
        completes = cache.prepare_step()
        if not self.warmed_up.get(completes, False):
            self.warmed_up[completes] = True
            out = self._device_step(input_ids, completes)
        else:
            step = self.steps.get(completes)
            if step is None or step.buffers != self._buffers():
                ids = input_ids.clone()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step = _CapturedStep(graph, ids, self._device_step(ids, completes), self._buffers())
                self.steps[completes] = step
            else:
                step.ids.copy_(input_ids)
            step.graph.replay()
            out = step.out.clone()  # the next replay overwrites it
        cache.advance_host()
        return out
