"""BSBRForCausalLM: BSBRModel with a tied LM head, a next-token loss and cached generation."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import BSBRCache
from .decoding import CUDAGraphDecoder
from .modules import BSBRModel

__all__ = ["BSBRForCausalLM", "CausalLMOutput"]


class CausalLMOutput(NamedTuple):
    logits: Tensor  # [b, n, vocab_size]
    loss: Optional[Tensor]  # mean next-token cross-entropy when labels are given
    cache: Optional[BSBRCache]  # with use_cache=True or a cache


class BSBRForCausalLM(nn.Module):
    """:class:`BSBRModel` plus an LM head tied to the token embedding.

    Takes the arguments of :class:`BSBRModel`. ``forward(input_ids, labels=None,
    attention_mask=None, cache=None, use_cache=False)`` returns :class:`CausalLMOutput`; the loss
    predicts ``labels[:, t + 1]`` from position ``t`` (labels are usually ``input_ids``; -100 and
    padding positions are ignored). ``generate`` decodes from a cache, one token per step.
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int,
                 chunk_size: int, ff_dim: int, dropout: float = 0.1,
                 compression_factor: Optional[int] = None, chunk_overlap: int = 0,
                 use_checkpointing: bool = False) -> None:
        super().__init__()
        self.model = BSBRModel(vocab_size, hidden_dim, num_layers, num_heads, chunk_size, ff_dim,
                               dropout, compression_factor, chunk_overlap, use_checkpointing)

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.model.embedding.weight)

    def forward(
        self,
        input_ids: Tensor,
        labels: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[BSBRCache] = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        if use_cache or cache is not None:
            hidden, cache = self.model(input_ids, attention_mask, cache, True)
        else:
            hidden = self.model(input_ids, attention_mask)
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {list(input_ids.shape)}, "
                    f"got {list(labels.shape)}"
                )
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            # Low-precision logits are upcast for the log-softmax.
            shifted = logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits, loss, cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        cuda_graph: Optional[bool] = None,
    ) -> Tensor:
        """Prefill the prompt, then decode ``max_new_tokens`` tokens per row from the cache.

        Returns ``[b, n + new]``: the prompt (with its padding) followed by the new tokens.
        ``top_k=1`` (or ``temperature=0``) is greedy; otherwise tokens are sampled from
        ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely. Prompts may be
        left-padded (``attention_mask`` 0 = padding); each row gets the tokens it gets alone.
        After ``eos_token_id`` a row repeats it, and decoding stops once every row has it.
        ``cuda_graph`` (default: on for CUDA inputs) replays the decoding steps from a CUDA graph
        (:class:`~bsbr_ext.CUDAGraphDecoder`). Call ``eval()`` first: dropout is not switched off
        here.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        out = self(input_ids, attention_mask=attention_mask, use_cache=True)
        cache = out.cache
        # Each row's last real token predicts its first new token.
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device)
        if attention_mask is None:
            last = positions[-1:].expand(input_ids.shape[0])
        else:
            last = ((attention_mask != 0).long() * positions).argmax(dim=1)
        logits = out.logits[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        if cuda_graph is None:
            cuda_graph = input_ids.is_cuda
        decoder = None
        if cuda_graph:
            decoder = CUDAGraphDecoder(self.model, cache, head=lambda hidden: self.logits(hidden[:, -1]))
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = self._choose(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            new_tokens.append(token)
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            if decoder is not None:
                logits = decoder(token[:, None])
            else:
                logits = self(token[:, None], cache=cache).logits[:, -1]
        return torch.cat([input_ids] + [t[:, None].to(input_ids.dtype) for t in new_tokens], dim=1)

    @staticmethod
    def _choose(logits: Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> Tensor:
        if top_k == 1 or temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
