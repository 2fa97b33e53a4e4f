"""Embeddings through the official `openai` SDK, served by an embedding worker (all-MiniLM-L6-v2, the
demo embedding model) beside the session's chat worker; sentence-transformers' own `encode` of the same
model is the reference. Batches of embedding and of Responses lines go through the Batch API."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI

from tests.conftest import REPO, Proc, Stack, _free_port, live_workers, registry, wait_for

EMBED = "all-MiniLM-L6-v2"
CHAT = "SmolLM2-135M-Instruct"
TEXTS = [
    "The capital of France is Paris.",
    "Paris is the capital and largest city of France.",
    "A dragon learns to cook a very long dinner.",
    "queues, workers and vectors",
]
FINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="session")
def embedding_model_dir() -> Path:
    from shared.settings import Settings
    from worker.model import fetch_embedding_model

    return fetch_embedding_model(Path(Settings().embedding_model_path))


@pytest.fixture(scope="module")
def reference(embedding_model_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_dir), device="cpu")


def _restart_api(stack: Stack, **env: str | None) -> None:
    """The stack's API again, with `env` changed: it holds the batch manager's lease, so it is the one
    that must know the embedding model (INFERQ_EXTRA_MODELS)."""
    stack.api.stop()
    for key, value in env.items():
        if value is None:
            stack.api.env.pop(key, None)
        else:
            stack.api.env[key] = value
    stack.api.start()

    def ready() -> bool:
        try:
            return httpx.get(f"{stack.base_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 120, "the API", [stack.api])


@pytest.fixture(scope="module")
def embedder(stack: Stack, embedding_model_dir: Path) -> Iterator[Proc]:
    before = stack.api.env.get("INFERQ_EXTRA_MODELS")
    _restart_api(stack, INFERQ_EXTRA_MODELS=json.dumps({EMBED: str(embedding_model_dir)}))
    # The stack pins its chat workers to float32 (tests/conftest.py); this one runs the default
    # (`auto`), whose vectors the tests below hold to sentence-transformers' float32 ones.
    env = {k: v for k, v in stack.api.env.items() if k != "INFERQ_MODEL__DTYPE"}
    worker = Proc(
        [
            "worker",
            "--model",
            str(embedding_model_dir),
            "--max-batch",
            "64",
            "--metrics-port",
            str(_free_port()),
        ],
        env,
        stack.api.log_dir,
    )
    live = live_workers(stack.servers.redis_url)
    worker.start()
    try:
        wait_for(lambda: live_workers(stack.servers.redis_url) > live, 120, "the embedding worker", [worker])
        yield worker
    finally:
        worker.stop()
        _restart_api(stack, INFERQ_EXTRA_MODELS=before)


@pytest.fixture
async def oai(stack: Stack, embedder: Proc) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        yield client


def _cosines(got: list[list[float]], want: Any) -> np.ndarray[Any, Any]:
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(want, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # type: ignore[no-any-return]


async def test_embeddings_match_sentence_transformers(oai: AsyncOpenAI, reference: Any) -> None:
    want = reference.encode(TEXTS)
    one = await oai.embeddings.create(model=EMBED, input=TEXTS[0], encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert _cosines([one.data[0].embedding], want[:1]).min() >= 0.9999
    many = await oai.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == list(range(len(TEXTS)))
    assert _cosines([d.embedding for d in many.data], want).min() >= 0.9999
    tokens = [reference.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    by_ids = await oai.embeddings.create(model=EMBED, input=tokens, encoding_format="float")
    assert _cosines([d.embedding for d in by_ids.data], want).min() >= 0.9999
    single_ids = await oai.embeddings.create(model=EMBED, input=tokens[2], encoding_format="float")
    assert _cosines([single_ids.data[0].embedding], want[2:3]).min() >= 0.9999
    # The tokens the model read, [CLS] and [SEP] included, as sentence-transformers tokenizes them.
    counted = sum(len(reference.tokenize([t])["input_ids"][0]) for t in TEXTS)
    assert many.usage.prompt_tokens == many.usage.total_tokens == counted
    assert by_ids.usage.prompt_tokens == counted
    # The SDK's default asks for base64 and decodes it itself.
    default = await oai.embeddings.create(model=EMBED, input=TEXTS)
    assert _cosines([d.embedding for d in default.data], want).min() >= 0.9999


async def test_embeddings_base64_decodes_to_the_same_floats(oai: AsyncOpenAI, stack: Stack) -> None:
    floats = await oai.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        resp = await client.post(
            "/v1/embeddings", json={"model": EMBED, "input": TEXTS, "encoding_format": "base64"}
        )
    assert resp.status_code == 200, resp.text
    for item, expected in zip(resp.json()["data"], floats.data, strict=True):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.asarray(expected.embedding, dtype=np.float32).tolist()


async def test_embeddings_are_jobs(oai: AsyncOpenAI, stack: Stack) -> None:
    raw = await oai.embeddings.with_raw_response.create(
        model=EMBED, input=["a job like any other"], extra_headers={"Idempotency-Key": "emb-1"}
    )
    job_id = raw.headers["x-inferq-job-id"]
    again = await oai.embeddings.with_raw_response.create(
        model=EMBED, input=["a job like any other"], extra_headers={"Idempotency-Key": "emb-1"}
    )
    assert again.headers["x-inferq-job-id"] == job_id
    assert again.parse().data[0].embedding == raw.parse().data[0].embedding
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "succeeded" and job["model"] == EMBED
        assert job["request"]["endpoint"] == "/v1/embeddings"
        assert job["usage"]["prompt_tokens"] == raw.parse().usage.prompt_tokens > 0
        assert str(job["worker_id"]).endswith(":cpu")
        models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    caps = models[EMBED]["capabilities"]
    assert caps["embeddings"] is True and caps["generation"] is False
    assert models[CHAT]["capabilities"]["embeddings"] is False
    worker = next(w for w in registry(stack.servers.redis_url) if w["model"] == EMBED)
    assert worker["tokens"] > 0 and worker["steps"] > 0


async def _refused(call: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        await call
    return caught.value


async def test_embeddings_bad_inputs_are_400s_naming_the_field(oai: AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": [1, "mixed"]}, "input"),
        ({"input": "word " * 300}, "input"),  # over the model's 256 tokens
        ({"input": [[101, 10**6]]}, "input"),  # not a token of its vocabulary
        ({"input": "fine", "dimensions": 128}, "dimensions"),  # not trained to be shortened
        ({"input": "fine", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "fine", "model": CHAT}, "model"),  # a chat model asked for embeddings
        ({"input": "fine", "model": "no-such-model"}, "model"),
    ]
    for fields, param in cases:
        body = {"model": EMBED, **fields}
        error = await _refused(oai.embeddings.create(**body))
        assert error.status_code == 400 and error.param == param, (fields, error.body)
    error = await _refused(oai.embeddings.create(model=EMBED, input="x", extra_body={"unknown": 1}))
    assert error.param == "unknown"
    too_long = await _refused(oai.embeddings.create(model=EMBED, input=["ok", "word " * 300]))
    assert "input[1] is 302 tokens" in too_long.message and "at most 256" in too_long.message


async def test_chat_to_an_embedding_model_is_a_400_naming_model(oai: AsyncOpenAI, stack: Stack) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    error = await _refused(oai.chat.completions.create(model=EMBED, messages=messages, max_tokens=4))
    assert error.param == "model" and "embedding model" in error.message
    error = await _refused(oai.completions.create(model=EMBED, prompt="hi", max_tokens=4))
    assert error.param == "model"
    error = await _refused(oai.responses.create(model=EMBED, input="hi"))
    assert error.param == "model"
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        resp = await client.post("/v1/jobs", json={"model": EMBED, "prompt": "hi"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"


async def test_readme_embeddings_snippet_runs(stack: Stack, embedder: Proc, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Embeddings") :]
    (snippet,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 1)], flags=re.S)
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("http://127.0.0.1:8000", stack.base_url))
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    count, size, tokens = done.stdout.split()
    assert (count, size) == ("2", "384") and int(tokens) > 4


def _line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


async def _run_batch(oai: AsyncOpenAI, lines: list[str], endpoint: Any, timeout: float) -> Any:
    data = ("\n".join(lines) + "\n").encode()
    file = await oai.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await oai.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")
    deadline = time.monotonic() + timeout
    t0 = last = time.monotonic()
    while batch.status not in FINAL:
        if time.monotonic() - last > 10:
            last = time.monotonic()
            print(f"{last - t0:.0f}s {batch.status} {batch.request_counts}", flush=True)
        assert time.monotonic() < deadline, f"batch {batch.id} stayed {batch.status}: {batch.request_counts}"
        await asyncio.sleep(0.5)
        batch = await oai.batches.retrieve(batch.id)
    return batch


async def _output(oai: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await oai.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


@pytest.mark.timeout(900)
async def test_batch_of_10000_embedding_lines(oai: AsyncOpenAI, reference: Any) -> None:
    n = 10_000
    texts = {f"e{i}": f"item {i} of the corpus" for i in range(n)}
    lines = [
        _line(cid, "/v1/embeddings", {"model": EMBED, "input": text, "encoding_format": "base64"})
        for cid, text in texts.items()
    ]
    t0 = time.monotonic()
    batch = await _run_batch(oai, lines, "/v1/embeddings", timeout=600)
    seconds = time.monotonic() - t0
    print(f"\n10,000 embedding lines: {seconds:.1f}s ({n / seconds:.0f} lines/s)")
    assert batch.status == "completed", batch
    assert batch.request_counts.total == n and batch.request_counts.completed == n
    assert batch.error_file_id is None
    out = {line["custom_id"]: line for line in await _output(oai, batch.output_file_id)}
    assert set(out) == set(texts)
    vectors = {}
    for cid, line in out.items():
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "list"
        vectors[cid] = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
        assert vectors[cid].shape == (384,)
    sample = [f"e{i}" for i in (0, 1, 4999, 9999)]
    want = reference.encode([texts[c] for c in sample])
    assert _cosines([vectors[c].tolist() for c in sample], want).min() >= 0.9999


async def test_batch_of_embeddings_refuses_bad_lines_into_the_error_file(oai: AsyncOpenAI) -> None:
    lines = [
        _line("good", "/v1/embeddings", {"model": EMBED, "input": ["a", "b"], "encoding_format": "float"}),
        _line("empty", "/v1/embeddings", {"model": EMBED, "input": ""}),
        _line("chat", "/v1/embeddings", {"model": CHAT, "input": "x"}),
    ]
    batch = await _run_batch(oai, lines, "/v1/embeddings", timeout=120)
    assert batch.status == "completed" and batch.request_counts.completed == 1
    good = (await _output(oai, batch.output_file_id))[0]
    assert good["custom_id"] == "good" and len(good["response"]["body"]["data"]) == 2
    assert len(good["response"]["body"]["data"][1]["embedding"]) == 384
    errors = {e["custom_id"]: e["response"]["body"]["error"] for e in await _output(oai, batch.error_file_id)}
    assert errors["empty"]["param"] == "input" and errors["chat"]["param"] == "model"


async def test_batch_of_responses_lines_completes(oai: AsyncOpenAI) -> None:
    lines = [
        _line(f"r{i}", "/v1/responses", {"model": CHAT, "input": q, "max_output_tokens": 8, "temperature": 0})
        for i, q in enumerate(["What is the capital of France?", "Say hello.", "Count to three."])
    ]
    lines.append(_line("bad", "/v1/responses", {"model": CHAT, "input": "x", "stream": True}))
    batch = await _run_batch(oai, lines, "/v1/responses", timeout=300)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 4 and batch.request_counts.completed == 3
    out = {line["custom_id"]: line for line in await _output(oai, batch.output_file_id)}
    assert set(out) == {"r0", "r1", "r2"}
    for line in out.values():
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "response"
        assert body["status"] in ("completed", "incomplete") and body["output"][0]["content"][0]["text"]
        assert body["id"].startswith("resp")
    assert "Paris" in out["r0"]["response"]["body"]["output"][0]["content"][0]["text"]
    errors = await _output(oai, batch.error_file_id)
    assert errors[0]["custom_id"] == "bad" and errors[0]["response"]["body"]["error"]["param"] == "stream"
