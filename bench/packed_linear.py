"""An experiment of `python -m bench decode-step --pack-weights`: linear layers whose weights are laid
out once for oneDNN (`mkldnn._reorder_linear_weight`) and multiplied on that layout
(`mkldnn._linear_pointwise`), instead of `F.linear` handing the plain weight to the BLAS on every call.
Not in the worker: measured alone the layers are faster, but through the stack the engine was not
(bench/RESULTS.md, "On a CPU without AVX-512 or bfloat16").
"""

from __future__ import annotations

import torch

PACK_FOR_ROWS = 16  # the rows oneDNN lays the weights out for: a decode step of 16 requests


class PackedLinear(torch.nn.Linear):
    """An nn.Linear computed on a oneDNN-packed copy of its weight (still an nn.Linear to the bench's
    hooks). A weight another module shares (a tied LM head) is kept; the others are dropped."""

    def __init__(self, linear: torch.nn.Linear, *, keep_weight: bool) -> None:
        torch.nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_FOR_ROWS)
        if keep_weight:
            self.weight = linear.weight
        else:
            self.register_parameter("weight", None)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            rows, self.packed, self.bias, "none", [None], ""
        )
        return out.view(*x.shape[:-1], self.out_features)


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear (all packed before any is replaced)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    replacements = [
        (parent, name, PackedLinear(child, keep_weight=owners.get(id(child.weight), 0) > 1))
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    for parent, name, packed in replacements:
        setattr(parent, name, packed)
    return len(replacements)
