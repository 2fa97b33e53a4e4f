"""dtype `auto`: bfloat16 where the device runs it natively, float32 elsewhere, with the reason logged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from shared.settings import ModelSettings
from worker.model import load_model, resolve_dtype


def _cpu_has_native_bf16() -> bool:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    flags = lines[0].split(":", 1)[1].split() if lines else []
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_dtype_named_is_taken_as_given() -> None:
    assert resolve_dtype("float32", "cpu")[0] is torch.float32
    assert resolve_dtype("bfloat16", "cpu")[0] is torch.bfloat16
    assert resolve_dtype("float16", "cuda:0") == (torch.float16, "dtype float16 as configured")


def test_dtype_auto_on_this_cpu_follows_its_bf16_flags() -> None:
    dtype, why = resolve_dtype("auto", "cpu")
    if _cpu_has_native_bf16():
        assert dtype is torch.bfloat16 and "natively" in why
    else:
        assert dtype is torch.float32 and "no native bfloat16" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_dtype_auto_for_cuda_without_a_gpu_is_float32() -> None:
    assert resolve_dtype("auto", "cuda:0")[0] is torch.float32


def test_dtype_load_logs_which_and_why(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="worker.model"):
        model, _ = load_model(str(model_dir), ModelSettings(dtype="auto"))
    expected, why = resolve_dtype("auto", "cpu")
    assert model.dtype is expected
    assert f"model dtype {str(expected).removeprefix('torch.')} ({why})" in caplog.text
