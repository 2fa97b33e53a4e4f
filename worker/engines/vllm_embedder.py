"""An embedding model served by vLLM's pooling runner (`inferq worker --engine vllm --model <a
sentence-transformers directory>`): the worker's own vLLM server (worker/engines/vllm_server.py) runs the
forward passes, and the embedding job runner (worker/embedding_jobs.py) drives it as it drives the
built-in embedder.

Inputs are tokenized here, by the built-in embedder's own `token_ids` (so both engines count, wrap and
refuse an input alike), and sent to vLLM as token ids; vLLM's scheduler batches the inputs of every job
the worker holds. vLLM is started with the pooling the directory declares (read by shared/embeddings.py,
passed explicitly rather than left to vLLM's own reading), float32 on a CPU, and shortening to
`dimensions` is the built-in embedder's `shorten` on vLLM's full vector: the vectors are the built-in
engine's, whichever engine a worker runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from shared.capabilities import Capabilities, embedding_engine
from shared.embeddings import EmbeddingSpec
from shared.settings import ModelSettings, Settings
from worker.embedder import Embedder
from worker.engines.base import EngineUnavailable
from worker.engines.vllm_server import VllmError, VllmServer

log = logging.getLogger(__name__)

# sentence-transformers' pooling modes and vLLM's names for them (vLLM 0.32 pools one way: CLS, MEAN
# or LAST; a model that concatenates modes, or pools another way, runs on the built-in engine).
_VLLM_POOLING = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST"}
NOT_POOLABLE = (
    "vllm: {model} pools its vectors as {modes}, which vLLM's pooling does not do (it does one of "
    "{supported}); serve it with --engine transformers"
)
# vLLM's answer to a request it refused: the job fails with vLLM's own message.
REFUSED = "vllm: /v1/embeddings answered {status}: {message}"


def vllm_pooling(spec: EmbeddingSpec, model: str) -> str:
    """vLLM's pooling type for the directory's declared pooling; VllmError when vLLM has none like it."""
    if len(spec.pooling) != 1 or spec.pooling[0] not in _VLLM_POOLING:
        raise VllmError(
            NOT_POOLABLE.format(model=model, modes="+".join(spec.pooling), supported=", ".join(_VLLM_POOLING))
        )
    return _VLLM_POOLING[spec.pooling[0]]


def vllm_dtype(settings: ModelSettings) -> str:
    """float32 on a CPU (vLLM's CPU build would otherwise run a float32 model wholly in bfloat16, which
    costs visible cosine similarity; it has no mode like the built-in embedder's, bfloat16 linear layers
    only), float16 on a GPU as the built-in embedder (worker/embedder.py `embedding_precision`)."""
    if settings.dtype != "auto":
        return settings.dtype
    return "float16" if settings.device.startswith("cuda") else "float32"


def pooling_args(spec: EmbeddingSpec, settings: ModelSettings, model: str) -> list[str]:
    """The vLLM arguments that make it embed as the directory declares."""
    pooler = {"seq_pooling_type": vllm_pooling(spec, model), "use_activation": spec.normalize}
    return [
        "--runner",
        "pooling",
        "--pooler-config",
        json.dumps(pooler),
        "--dtype",
        vllm_dtype(settings),
        "--max-model-len",
        str(spec.max_seq_length),
    ]


class VllmEmbedder(Embedder):
    """The built-in embedder's interface (token_ids, embed, shorten, stats, capabilities) over vLLM's
    /v1/embeddings. Its forward passes are vLLM's, so none of the built-in batching runs here."""

    name = "vllm"

    def __init__(
        self, server: VllmServer, tokenizer: Any, spec: EmbeddingSpec, settings: ModelSettings, timeout: float
    ) -> None:
        super().__init__(None, tokenizer, spec, settings)
        self.server = server
        self.supervised = True
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))

    @property
    def healthy(self) -> bool:
        return self._healthy and not self.server.gave_up

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._healthy = value

    def capabilities(self) -> Capabilities:
        # Shortening is this worker's own (`shorten`), as on the built-in engine: `dimensions` is
        # honoured exactly where the model declares a truncate_dim, whatever vLLM makes of the model.
        return embedding_engine(shortening=self.spec.shortening, engine="vllm")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def warmup(self) -> None:
        """Start vLLM (install on first use, load, wait for its health), then embed one input."""
        await self.server.start()
        await self.embed([self.token_ids("warm up", 0)])

    def stop(self) -> None:
        """Called from a thread at shutdown: vLLM stops (its whole process group), the client closes."""
        self.server.stop()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.client.aclose(), loop).result(3)
        super().stop()

    async def embed(self, rows: list[list[int]]) -> np.ndarray[Any, Any]:
        """The vectors of `rows` (token ids, special tokens included), one row each, float32, as vLLM's
        pooling returns them (normalised where the model declares it)."""
        await self.server.wait_serving()
        if self.server.gave_up:
            raise EngineUnavailable("vllm server gave up")
        body = {
            "model": self.server.served_name,
            "input": rows,
            "encoding_format": "base64",
            "embed_dtype": "float32",
            "endianness": "little",
        }
        self.stats.active += 1
        try:
            resp = await self.client.post(f"{self.server.url}/embeddings", json=body)
        except httpx.TransportError as exc:
            # The server died (its supervisor restarts it): the job goes back to the queue.
            raise EngineUnavailable(f"vllm server lost ({type(exc).__name__})") from exc
        finally:
            self.stats.active -= 1
        if resp.status_code != 200:
            raise RuntimeError(REFUSED.format(status=resp.status_code, message=_message(resp)))
        data = sorted(resp.json()["data"], key=lambda d: int(d["index"]))
        vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
        self._count(rows)
        return vectors.astype(np.float32, copy=False)


def _message(resp: httpx.Response) -> str:
    with contextlib.suppress(Exception):
        return str(resp.json()["error"]["message"])
    return resp.text[:300]


async def start_vllm_embedder(ctx: dict[str, Any], settings: Settings, spec: EmbeddingSpec) -> VllmEmbedder:
    """The worker's vLLM, started with the pooling runner on the directory's Transformer module, and the
    embedder in front of it."""
    from transformers import AutoTokenizer

    from worker import metrics
    from worker.model import _quiet_transformers

    w = settings.worker
    root = Path(settings.require_model_dir())
    where = str(root / spec.transformer_path)
    name = w.upstream_model or settings.served_model_name
    args = pooling_args(spec, settings.model, str(root))
    _quiet_transformers()
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, where)
    server = VllmServer(
        model_dir=where,
        served_name=name,
        data_dir=settings.data_dir,
        device=settings.model.device,
        port=w.vllm_port,
        args=[*args, *w.vllm_args],  # the operator's own come last: they win
        start_seconds=w.vllm_start_seconds,
    )
    engine = VllmEmbedder(server, tokenizer, spec, settings.model, w.job_timeout)
    ctx["engine"] = engine  # from here on, a stop at any moment stops its server too
    engine.start()
    await engine.warmup()
    engine.step_observer = metrics.batch_size.labels(settings.served_model_name).observe
    log.info(
        "embedding model %s served by vLLM on %s: %s pooling%s, %d dimensions, inputs up to %d tokens",
        settings.served_model_name,
        server.url,
        "+".join(spec.pooling),
        ", normalised" if spec.normalize else "",
        spec.dimensions,
        spec.max_seq_length,
    )
    return engine
