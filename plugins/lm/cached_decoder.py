"""A Hugging Face causal LM's decoder stack run incrementally over its KV cache (``HFCausalLM``'s decoder).

What is assumed of the model (a ``transformers`` ``PreTrainedModel`` causal LM, e.g. ``Qwen2ForCausalLM``):
``model.base_model`` is the decoder stack; called with ``input_ids``, a 2D ``attention_mask`` covering past and
new tokens, ``position_ids``, ``use_cache=True`` and the cache from its previous output (keyword ``cache``, or
``past_key_values`` on older releases), it returns ``last_hidden_state`` (after the final norm) and the cache.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from tarkit.cpu_linear import use_cpu_linears
from tarkit.interfaces import IncrementalDecoder


class HFCachedDecoder(IncrementalDecoder):
    """The base model run a token at a time, with positions that ignore left padding.

    A left-padded row's first real token sits at position 0, as it would alone: prefill positions are
    ``cumsum(mask) - 1`` (pads clamped to 0; they are masked out anyway), and each later token takes its row's
    next position, so the rotary phases of a row do not depend on how much padding the batch gave it. The 2D
    mask grows by one column of ones per step; the model turns it into the causal + padding mask.
    """

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor) -> None:
        # Decoding runs its linears on a few rows (guidance doubles a batch of 1 or 2): see tarkit.cpu_linear.
        self.base = use_cpu_linears(base_model(model))
        self.cache_kwarg = cache_keyword(self.base)
        self.mask = attention_mask.long()
        self.next_position = self.mask.sum(dim=-1)  # [R]: real tokens seen so far
        self.cache: Any = None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = (self.mask.cumsum(dim=-1) - 1).clamp(min=0)
        return self._forward(input_ids, positions)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        positions = self.next_position.unsqueeze(1)
        self.next_position = self.next_position + 1
        return self._forward(token_ids.unsqueeze(1), positions)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        output = self.base(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        self.cache = output[self.cache_kwarg]
        return output.last_hidden_state[:, -1]


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack under the LM head (``Qwen2ForCausalLM.model``)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} has no base_model under its LM head: pass a *ForCausalLM model")
    return base


def cache_keyword(base: nn.Module) -> str:
    """transformers 5 renamed the KV cache argument ``past_key_values`` to ``cache``; accept either."""
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
