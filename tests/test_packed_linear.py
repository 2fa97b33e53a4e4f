"""Packed linear weights on CPU (worker/packed_linear.py): the same products as nn.Linear, the whole model's
logits as on plain weights, and packing only where oneDNN takes it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from shared.settings import ModelSettings
from worker.model import load_model
from worker.packed_linear import PackedLinear, can_pack, pack_for_cpu, pack_linear_layers

# bfloat16 products of 576-long rows: oneDNN's kernels sum in another order than the plain path's.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_gives_what_the_plain_layer_gives(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    plain = torch.nn.Linear(576, 192, bias=bias).to(dtype)
    packed = PackedLinear(plain, keep_weight=False)
    assert packed.weight is None  # the plain copy is dropped: the packed one replaces it
    for shape in [(1, 576), (16, 576), (1, 37, 576), (3, 5, 576)]:  # decode rows, a prefill, 3-D inputs
        x = torch.randn(*shape, dtype=dtype)
        want, got = plain(x), packed(x)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.allclose(got.float(), want.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)
        self.proj = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight  # tied, as many LM heads are

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.proj(self.embed(ids)))
        return out


def test_packing_a_model_keeps_a_tied_weight_and_its_outputs() -> None:
    torch.manual_seed(0)
    model = _Tied().eval()
    ids = torch.tensor([[1, 5, 99, 42]])
    want = model(ids)
    assert pack_linear_layers(model) == 2
    assert isinstance(model.head, PackedLinear) and isinstance(model.proj, PackedLinear)
    assert model.head.weight is model.embed.weight  # the embedding still reads it
    assert model.proj.weight is None
    assert torch.allclose(model(ids), want, atol=1e-5)


def test_packing_is_refused_where_onednn_does_not_take_it(caplog: pytest.LogCaptureFixture) -> None:
    half = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.float16).eval()
    assert can_pack(half) == (False, "oneDNN packing is for float32 and bfloat16, not float16")
    training = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert can_pack(training) == (False, "the model is in training mode")
    with caplog.at_level(logging.INFO, logger="worker.packed_linear"):
        pack_for_cpu(half)
    assert type(half[0]) is torch.nn.Linear
    assert "linear weights not packed: oneDNN packing is for float32 and bfloat16" in caplog.text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_demo_model_predicts_on_packed_weights_what_it_does_on_plain_ones(
    model_dir: Path, dtype: str
) -> None:
    plain, tok = load_model(str(model_dir), ModelSettings(dtype=dtype, pack_weights=False))
    packed, _ = load_model(str(model_dir), ModelSettings(dtype=dtype))
    assert isinstance(packed.lm_head, PackedLinear) and not isinstance(plain.lm_head, PackedLinear)
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 211  # 30 layers of 7, the LM head
    chat = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        want = plain(**ids).logits[0].float()
        got = packed(**ids).logits[0].float()
    # The next token at every position of the prompt is the same, and the logits close.
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max().item() < (1e-3 if dtype == "float32" else 0.5)
