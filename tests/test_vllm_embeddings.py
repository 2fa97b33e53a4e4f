"""Embeddings on `--engine vllm`: a worker runs its own vLLM (its CPU build, as in test_vllm.py) with the
pooling runner on the demo embedding model (all-MiniLM-L6-v2), and the official `openai` SDK's
embeddings match sentence-transformers' own `encode` of the same model, as on the built-in engine."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import psutil
import pytest
from openai import AsyncOpenAI

from tests.conftest import Proc, Stack, _free_port, registry, start_api, wait_for
from tests.test_vllm import INSTALL_AND_LOAD_SECONDS, VLLM_ARGS, _served, _vllm_processes, _worker

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]

MODEL = "vllm-minilm"
TEXTS = [
    "The capital of France is Paris.",
    "Paris is the capital and largest city of France.",
    "A dragon learns to cook a very long dinner.",
    "queues, workers and vectors",
]


@dataclass
class VllmEmbeddings:
    api_url: str
    worker: Proc
    port: int  # its vLLM's


@pytest.fixture(scope="module")
def embedding_model_dir() -> Path:
    from shared.settings import Settings
    from worker.model import fetch_embedding_model

    return fetch_embedding_model(Path(Settings().embedding_model_path))


@pytest.fixture(scope="module")
def reference(embedding_model_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_dir), device="cpu")


@pytest.fixture(scope="module")
def served(stack: Stack, embedding_model_dir: Path) -> Iterator[VllmEmbeddings]:
    port = _free_port()
    url, api = start_api(
        stack, INFERQ_AUTH="off", INFERQ_EXTRA_MODELS=json.dumps({MODEL: str(embedding_model_dir)})
    )
    worker = _worker(
        stack,
        MODEL,
        "--engine",
        "vllm",
        "--model",
        str(embedding_model_dir),
        "--served-name",
        MODEL,
        INFERQ_WORKER__VLLM_PORT=str(port),
        INFERQ_WORKER__VLLM_ARGS=VLLM_ARGS,
    )
    try:
        worker.start()
        wait_for(
            lambda: _served(stack, MODEL) == 1,
            INSTALL_AND_LOAD_SECONDS,
            "the vllm embedding worker",
            [worker],
        )
        yield VllmEmbeddings(url, worker, port)
    finally:
        worker.stop()
        api.stop()
        for p in _vllm_processes(port):  # only if the test that checks this failed before its end
            p.kill()


@pytest.fixture
async def oai(served: VllmEmbeddings) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{served.api_url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as c:
        yield c


def _cosines(got: list[list[float]], want: Any) -> np.ndarray[Any, Any]:
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(want, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # type: ignore[no-any-return]


async def test_vllm_embeddings_match_sentence_transformers(
    served: VllmEmbeddings, oai: AsyncOpenAI, stack: Stack, reference: Any
) -> None:
    # The worker's vLLM runs the pooling runner with the pooling the model's files declare.
    command = " ".join(_vllm_processes(served.port)[0].cmdline())
    assert "--runner pooling" in command and '"seq_pooling_type": "MEAN"' in command, command
    want = reference.encode(TEXTS)
    one = await oai.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert _cosines([one.data[0].embedding], want[:1]).min() >= 0.9999
    many = await oai.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == list(range(len(TEXTS)))
    assert _cosines([d.embedding for d in many.data], want).min() >= 0.9999
    # Normalised, as the model's Normalize module declares.
    assert np.allclose(np.linalg.norm(np.asarray([d.embedding for d in many.data]), axis=1), 1.0, atol=1e-5)
    tokens = [reference.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    by_ids = await oai.embeddings.create(model=MODEL, input=tokens)  # the SDK's default: base64
    assert _cosines([d.embedding for d in by_ids.data], want).min() >= 0.9999
    counted = sum(len(reference.tokenize([t])["input_ids"][0]) for t in TEXTS)
    assert many.usage.prompt_tokens == by_ids.usage.prompt_tokens == counted
    models = {m["id"]: m for m in (await oai.models.list()).model_dump()["data"]}
    caps = models[MODEL]["capabilities"]
    assert caps["engine"] == "vllm" and caps["embeddings"] is True and caps["generation"] is False
    assert caps["dimensions"] is False  # all-MiniLM-L6-v2 declares no truncate_dim
    error = await _refused(oai.embeddings.create(model=MODEL, input="fine", dimensions=128))
    assert error.param == "dimensions"

    def counted_by_heartbeat() -> bool:  # the registry entry is as of the worker's last heartbeat
        worker = next(w for w in registry(stack.servers.redis_url) if w["model"] == MODEL)
        return bool(worker["tokens"] >= 2 * counted and worker["steps"] >= 3)

    wait_for(counted_by_heartbeat, 30, "the worker's heartbeat to count the inputs", [served.worker])


async def _refused(call: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        await call
    return caught.value


async def test_chat_to_the_vllm_embedding_model_is_a_400_naming_its_kind(oai: AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    error = await _refused(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4))
    assert error.status_code == 400 and error.param == "model"
    assert "embedding model" in error.message and MODEL in error.message


def test_a_stopped_vllm_embedding_worker_leaves_no_vllm_running(served: VllmEmbeddings) -> None:
    servers = _vllm_processes(served.port)
    assert servers
    served.worker.stop()
    gone, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, "vLLM still runs after its worker stopped"
    deadline = time.monotonic() + 30
    while _vllm_processes(served.port):
        assert time.monotonic() < deadline, "a vLLM process of the worker still runs"
        time.sleep(0.2)
