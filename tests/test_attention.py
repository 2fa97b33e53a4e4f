"""Decode attention on CPU (worker/attention.py): each request's query against its own keys only gives
what transformers' packed SDPA path gives with its block mask, and other steps go to that path."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.attention import decode_attention


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def _packed(lengths: list[int], heads: int = 9, kv_heads: int = 3, dim: int = 64) -> dict[str, object]:
    """A decode step as continuous batching hands it over: one query per request, every request's keys
    one after the other, cumulative lengths, and the [1, 1, Q, K] additive mask over other requests."""
    generator = torch.Generator().manual_seed(sum(lengths))
    total = sum(lengths)
    query = torch.randn(1, heads, len(lengths), dim, generator=generator)
    # The cache hands keys over as a transposed view of a [K, kv_heads, d] tensor.
    key = torch.randn(total, kv_heads, dim, generator=generator).transpose(0, 1).unsqueeze(0)
    value = torch.randn(total, kv_heads, dim, generator=generator).transpose(0, 1).unsqueeze(0)
    cu_k = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    mask = torch.full((1, 1, len(lengths), total), torch.finfo(torch.float32).min)
    for b in range(len(lengths)):
        mask[0, 0, b, int(cu_k[b]) : int(cu_k[b + 1])] = 0.0
    return {
        "query": query,
        "key": key,
        "value": value,
        "attention_mask": mask,
        "cu_seq_lens_q": torch.arange(len(lengths) + 1, dtype=torch.int32),
        "cu_seq_lens_k": cu_k,
        "max_length_q": 1,
        "max_length_k": max(lengths),
    }


def test_decode_attention_matches_the_packed_sdpa_path_with_its_block_mask() -> None:
    step = _packed([5, 1, 17, 9, 33])
    expected, _ = sdpa_attention_forward(_Module(), scaling=0.125, **step)  # type: ignore[arg-type]
    got, weights = decode_attention(_Module(), scaling=0.125, **step)  # type: ignore[arg-type]
    assert weights is None
    assert got.shape == expected.shape == (1, 5, 9, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_in_bfloat16_stays_close_to_float32() -> None:
    step = _packed([12, 40, 3])
    reference, _ = sdpa_attention_forward(_Module(), scaling=0.125, **step)  # type: ignore[arg-type]
    low = {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in step.items()
    }
    got, _ = decode_attention(_Module(), scaling=0.125, **low)  # type: ignore[arg-type]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference, atol=3e-2, rtol=3e-2)


def test_decode_attention_leaves_prefill_steps_to_sdpa() -> None:
    """A step with a request of several query tokens (prefill) is transformers' own path, bit for bit."""
    step = _packed([4, 6])
    query = torch.randn(1, 9, 3, 64)
    cu_q = torch.tensor([0, 2, 3], dtype=torch.int32)
    mask = torch.zeros(1, 1, 3, 10)
    step.update(query=query, cu_seq_lens_q=cu_q, max_length_q=2, attention_mask=mask)
    expected, _ = sdpa_attention_forward(_Module(), scaling=0.125, **step)  # type: ignore[arg-type]
    got, _ = decode_attention(_Module(), scaling=0.125, **step)  # type: ignore[arg-type]
    assert torch.equal(got, expected)
