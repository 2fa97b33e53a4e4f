"""Cheaper top-k / top-p for continuous batching on CPU.

transformers' per-request processors sort the whole vocabulary twice per step (once for top-k,
once for top-p), which on a CPU costs as much as a good part of the forward pass. These keep the
same results but take `torch.topk` of only the largest k requested, and skip top-p for a batch in
which no request asked for it. They read per-request values, so they cause a host sync: CPU only.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)


class FastTopK(ContinuousBatchingTopKLogitsWarper):
    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        vocab = scores.size(-1)
        top_k = tensor_arg[: scores.size(0)].to(torch.int64)
        active = top_k < vocab
        if not bool(active.any()):
            return scores
        k_max = int(top_k[active].max())
        values = torch.topk(scores, k_max, dim=-1).values
        thresholds = values.gather(-1, (top_k.clamp(max=k_max) - 1).unsqueeze(-1))
        thresholds = torch.where(active.unsqueeze(-1), thresholds, torch.full_like(thresholds, -float("inf")))
        return scores.masked_fill(scores < thresholds, self.filter_value)


class FastTopP(ContinuousBatchingTopPLogitsWarper):
    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        if not bool((top_p < 1.0).any()):
            return scores
        result: torch.Tensor = super().__call__(scores, tensor_arg)
        return result


def use_fast_processors(processor_list: Any) -> None:
    """Swap transformers' top-k/top-p processors for the cheaper ones, in place."""
    for i, proc in enumerate(processor_list.logits_processor):
        for slow, fast in (
            (ContinuousBatchingTopKLogitsWarper, FastTopK),
            (ContinuousBatchingTopPLogitsWarper, FastTopP),
        ):
            if type(proc) is slow:
                proc.__class__ = fast
                processor_list.logits_processor[i] = proc
