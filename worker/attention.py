"""Decode attention for continuous batching on CPU that does only each request's own work.

transformers' continuous batching packs every request of a step into one sequence. With `sdpa` it
reads all the requests' keys and values out of the paged cache into one [1, kv_heads, K, d] tensor
(K: the sum of their lengths), builds a [1, 1, Q, K] additive mask, copies the key/value heads once per
query head they serve (`repeat_kv`, grouped-query attention) and attends every query against all K
keys. In a decode step of B requests that is B times the useful work, on B times the copied keys.

`decode_attention` takes over the steps in which every request brings one query token (the engine's
decode steps: `max_length_q == 1`): each request's query attends to its own keys only, with the
query heads that share a key/value head folded into one [B, kv_heads, heads_per_kv, d] batch, so no
head is copied and no mask over other requests' keys is built. Any other call (prefill, a step that
mixes prefill and decode, a model outside continuous batching) goes to transformers' own SDPA path.

`install()` puts it in place of the `sdpa` attention function of this process (the worker runs one
model; nothing else in it uses attention). It is for CPU workers: on a GPU the same path would run,
but it is not measured there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, Q, d]
    key: torch.Tensor,  # [1, kv_heads, K, d]: every request's keys, one after the other
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    cu_k = kwargs.get("cu_seq_lens_k")
    if (
        kwargs.get("max_length_q") != 1
        or not isinstance(cu_k, torch.Tensor)
        or query.size(0) != 1
        or dropout != 0.0
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    requests = cu_k.numel() - 1
    heads, q_len, dim = query.shape[1], query.shape[2], query.shape[3]
    kv_heads = key.shape[1]
    if q_len != requests:  # padded queries (static shapes): not a step this path knows
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    longest = int(kwargs.get("max_length_k") or key.shape[2])
    starts = cu_k[:-1].to(torch.int64)
    lengths = cu_k[1:].to(torch.int64) - starts
    positions = torch.arange(longest, dtype=torch.int64)
    # Request b's j-th key is key[:, :, starts[b] + j] for j < lengths[b]; the rest of its row is padding
    # (clamped to a real position and masked out).
    index = (starts.unsqueeze(1) + positions).clamp_(max=key.shape[2] - 1).view(-1)
    valid = (positions < lengths.unsqueeze(1)).view(requests, 1, 1, longest)
    # The cache returns keys as a transposed view of a [K, kv_heads, d] tensor: gather rows of that.
    k = key[0].transpose(0, 1).index_select(0, index).view(requests, longest, kv_heads, dim).transpose(1, 2)
    v = value[0].transpose(0, 1).index_select(0, index).view(requests, longest, kv_heads, dim).transpose(1, 2)
    # Query head h reads key/value head h // (heads / kv_heads), as repeat_kv lays them out.
    q = query[0].transpose(0, 1).reshape(requests, kv_heads, heads // kv_heads, dim)
    out = scaled_dot_product_attention(q, k, v, attn_mask=valid, scale=scaling)
    return out.reshape(1, requests, heads, dim), None


def install() -> None:
    """Route this process's `sdpa` attention through `decode_attention` (idempotent)."""
    if ALL_ATTENTION_FUNCTIONS.get("sdpa") is not decode_attention:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = decode_attention
