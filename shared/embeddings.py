"""Embedding models and their vectors, as both sides see them: what a sentence-transformers directory
declares (read from its files, no torch), and the compact form vectors are stored and sent in.

Vectors are kept as little-endian float32 bytes, one row per input, in `jobs.embedding`: 4 bytes a
dimension (1.5 KB for a 384-dimension vector, where JSON floats take ~8 KB), exact, and already what
OpenAI's `encoding_format: base64` sends, so that answer is a slice of the column, base64-encoded.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENDPOINT = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
FLOAT32 = 4

MODULE_TRANSFORMER = "sentence_transformers.models.Transformer"
MODULE_POOLING = "sentence_transformers.models.Pooling"
MODULE_NORMALIZE = "sentence_transformers.models.Normalize"
# Pooling modes, in the order the older config form (pooling_mode_* flags) concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

UNSUPPORTED_MODULE = "{path}: module {type} is not supported (only Transformer, Pooling and Normalize are)"
UNSUPPORTED_POOLING = "{path}: pooling mode {mode!r} is not supported (supported: {modes})"


class EmbeddingModelError(ValueError):
    """A sentence-transformers directory inferq cannot serve as it declares itself."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """What a sentence-transformers model directory declares: how to pool, whether to normalise, the
    longest input (tokens, special ones included) and the vector's size."""

    pooling: tuple[str, ...]
    normalize: bool
    max_seq_length: int
    dimensions: int  # of the vectors it returns by default
    native_dimensions: int  # before any truncate_dim
    shortening: bool  # trained to be shortened (a truncate_dim is declared): `dimensions` works
    transformer_path: str  # the Transformer module's folder, relative to the model directory


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _pooling_modes(config: dict[str, Any], where: Path) -> tuple[str, ...]:
    mode = config.get("pooling_mode")
    if mode is None:
        # The older form: one flag per mode, concatenated in sentence-transformers' fixed order.
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key))
        modes = modes or ("mean",)
    else:
        # The newer form: the modes in the order they are concatenated.
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    for m in modes:
        if m not in POOLING_MODES:
            raise EmbeddingModelError(
                UNSUPPORTED_POOLING.format(path=where, mode=m, modes=", ".join(POOLING_MODES))
            )
    if config.get("include_prompt") is False:
        raise EmbeddingModelError(f"{where}: pooling that leaves the prompt out is not supported")
    return modes


def read_spec(directory: str | Path) -> EmbeddingSpec | None:
    """The directory's embedding declaration; None when it is not a sentence-transformers model (no
    modules.json with a Pooling module), e.g. a chat model. Raises EmbeddingModelError for one that
    declares what inferq does not implement (a Dense layer, an unknown pooling mode)."""
    root = Path(directory)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _json(modules_file)
    types = [str(m.get("type", "")) for m in modules]
    if MODULE_POOLING not in types:
        return None
    pooling: tuple[str, ...] = ()
    normalize = False
    transformer_path = ""
    width = 0
    for module in modules:
        kind, path = str(module.get("type", "")), str(module.get("path", ""))
        if kind == MODULE_TRANSFORMER:
            transformer_path = path
        elif kind == MODULE_POOLING:
            config = _json(root / path / "config.json")
            pooling = _pooling_modes(config, root / path)
            width = int(config.get("word_embedding_dimension") or config.get("embedding_dimension") or 0)
        elif kind == MODULE_NORMALIZE:
            normalize = True
        else:
            raise EmbeddingModelError(UNSUPPORTED_MODULE.format(path=root, type=kind))
    model_dir = root / transformer_path
    bert_config = model_dir / "sentence_bert_config.json"
    st_config = _json(bert_config) if bert_config.is_file() else {}
    hf_config = _json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    width = width or int(hf_config.get("hidden_size") or 0)
    # Several modes are concatenated: the vector is that many times the hidden size.
    native = width * len(pooling)
    max_len = int(st_config.get("max_seq_length") or hf_config.get("max_position_embeddings") or 512)
    top = root / "config_sentence_transformers.json"
    truncate = _json(top).get("truncate_dim") if top.is_file() else None
    return EmbeddingSpec(
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_len,
        dimensions=int(truncate) if truncate else native,
        native_dimensions=native,
        shortening=truncate is not None,
        transformer_path=transformer_path,
    )


def input_count(request: dict[str, Any]) -> int:
    return len(request.get("input") or [])


def vector(blob: bytes, index: int, count: int) -> bytes:
    """The `index`th of `count` vectors stored in `blob` (float32 little-endian, row after row)."""
    size = len(blob) // count
    return blob[index * size : (index + 1) * size]


def as_floats(raw: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(raw) // FLOAT32}f", raw))


def as_base64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
