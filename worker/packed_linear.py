"""CPU workers: every linear layer's weight laid out once for oneDNN.

`F.linear` hands oneDNN the plain [out, in] weight on every call, and oneDNN re-lays it out for its
kernels each time. `torch.ops.mkldnn._reorder_linear_weight` does that once, at load, and
`torch.ops.mkldnn._linear_pointwise` multiplies on the packed copy (what torch.compile's CPU backend
does with frozen weights). Measured in the engine on the demo model, bfloat16, 16 requests: the LM head
3.8 against 7.1 ms a call; through the stack 1.01x to 1.45x faster, median 1.21x (bench/RESULTS.md).

The packing must run in a thread that is not the event loop's: OpenMP keeps a team of threads for each
thread that runs parallel torch work, and once the loop's thread has a team of its own, the engine
thread's team no longer spins between ops on a 2-core machine but sleeps, and the engine runs slower
than with plain weights (how earlier measurements of packed weights went). `load_model` runs it, in
the worker's loading thread.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# The rows oneDNN lays the weights out for: a decode step of 16 requests. Measured with packed
# layouts for 16 and 64 rows, the 16-row layout was as fast or faster at 1 to 300 rows.
PACK_FOR_ROWS = 16
PACKED_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(torch.nn.Linear):
    """An nn.Linear computed on a oneDNN-packed copy of its weight. A weight another module shares (a
    tied LM head and its input embeddings) is kept for that module; the others are dropped."""

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
        bias = None if self.bias is None else self.bias.detach()
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(rows, self.packed, bias, "none", [None], "")
        return out.view(*x.shape[:-1], self.out_features)


def can_pack(model: torch.nn.Module) -> tuple[bool, str]:
    """(whether `model`'s linear layers can be packed, why not)."""
    first = next(model.parameters())
    if first.device.type != "cpu":
        return False, f"the model is on {first.device}"
    if first.dtype not in PACKED_DTYPES:
        dtype = str(first.dtype).removeprefix("torch.")
        return False, f"oneDNN packing is for float32 and bfloat16, not {dtype}"
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False, "this torch has no oneDNN"
    if model.training:
        return False, "the model is in training mode"
    return True, ""


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear (all packed before any is replaced, so a
    failure leaves the model as it was); how many were replaced."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    with torch.no_grad():
        replacements = [
            (parent, name, PackedLinear(child, keep_weight=owners.get(id(child.weight), 0) > 1))
            for parent in model.modules()
            for name, child in parent.named_children()
            if type(child) is torch.nn.Linear
        ]
    for parent, name, packed in replacements:
        setattr(parent, name, packed)
    return len(replacements)


def pack_for_cpu(model: Any) -> None:
    """Pack `model`'s linear layers where it can be done, logging what was done and why."""
    ok, why = can_pack(model)
    if not ok:
        log.info("linear weights not packed: %s", why)
        return
    try:
        count = pack_linear_layers(model)
    except RuntimeError as exc:  # a layer oneDNN does not take: the plain layers still serve
        log.warning("linear weights not packed: %s", exc)
        return
    log.info("%d linear layers packed for oneDNN", count)
