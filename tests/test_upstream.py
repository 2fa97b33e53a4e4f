"""The `openai-http` worker in front of a real OpenAI-compatible server nobody here wrote:
`transformers serve --continuous-batching`, on the demo model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, Stack, _free_port, live_workers, start_api, wait_for
from tests.helpers import FRANCE, STORY, iter_sse, submit, wait_job, wait_status

MODEL = "upstream-smol"


@dataclass
class Upstream:
    api_url: str
    worker: Proc


def _serve_command() -> list[str]:
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("transformers serve is not installed (pip install 'transformers[serving]')")
    return [exe, "serve"]


@pytest.fixture(scope="module")
def upstream(stack: Stack, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    port = _free_port()
    tmp = tmp_path_factory.mktemp("upstream")
    server = subprocess.Popen(
        [*_serve_command(), "--continuous-batching", "--device", "cpu", "--port", str(port), str(model_dir)],
        stdout=(tmp / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
        # Its /v1/models scans the Hugging Face cache and fails when there is none.
        env={**os.environ, "HF_HUB_CACHE": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    (tmp / "hf").mkdir()
    api: Proc | None = None
    worker: Proc | None = None
    try:

        def serving() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            assert server.poll() is None, "transformers serve exited"
            return False

        wait_for(serving, 180, "transformers serve", [])
        url, api = start_api(
            stack, INFERQ_AUTH="off", INFERQ_EXTRA_MODELS=json.dumps({MODEL: str(model_dir)})
        )
        env = {**stack.api.env, "INFERQ_MODEL__SERVED_NAME": MODEL}
        worker = Proc(
            [
                "worker",
                "--engine",
                "openai-http",
                "--upstream-url",
                f"http://127.0.0.1:{port}/v1",
                "--upstream-model",
                str(model_dir),
                "--max-batch",
                "8",
            ],
            env,
            stack.api.log_dir,
        )
        before = live_workers(stack.servers.redis_url)
        worker.start()
        wait_for(
            lambda: live_workers(stack.servers.redis_url) > before, 120, "the openai-http worker", [worker]
        )
        yield Upstream(url, worker)
    finally:
        for proc in (worker, api):
            if proc is not None:
                proc.stop()
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(15)
        if server.poll() is None:
            server.kill()


@pytest.fixture
async def uc(upstream: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.api_url, timeout=httpx.Timeout(60.0)) as c:
        yield c


def _pid(job: dict[str, object]) -> int:
    return int(str(job["worker_id"]).split(":")[1])


async def test_upstream_worker_completes_a_job(upstream: Upstream, uc: httpx.AsyncClient) -> None:
    job = await wait_job(
        uc, (await submit(uc, model=MODEL, messages=FRANCE, max_tokens=16, temperature=0))["id"]
    )
    assert job["status"] == "succeeded", job
    assert "Paris" in job["output"]
    assert _pid(job) == upstream.worker.popen.pid  # type: ignore[union-attr]
    assert 0 < job["usage"]["completion_tokens"] <= 16 and job["usage"]["prompt_tokens"] > 0
    prompt = await wait_job(
        uc, (await submit(uc, model=MODEL, prompt="The capital of France is", max_tokens=6))["id"]
    )
    assert prompt["status"] == "succeeded" and prompt["output"]


async def test_upstream_worker_streams_tokens_and_the_openai_route_works(uc: httpx.AsyncClient) -> None:
    created = await submit(uc, model=MODEL, messages=STORY, max_tokens=24, temperature=0)
    events = [e async for e in iter_sse(uc, created["id"])]
    assert [e.event for e in events].count("token") > 1 and events[-1].event == "done"
    streamed = "".join(e.data["text"] for e in events if e.event == "token")
    job = await wait_job(uc, created["id"])
    assert streamed == job["output"] and job["finish_reason"] == "length"
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 12, "temperature": 0, "stream": True}
    text = ""
    async with uc.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                choices = json.loads(line[5:])["choices"]
                if choices:
                    text += choices[0]["delta"].get("content") or ""
    assert "Paris" in text


async def test_upstream_worker_honours_cancel(uc: httpx.AsyncClient) -> None:
    created = await submit(uc, model=MODEL, messages=STORY, max_tokens=2000, temperature=0)
    await wait_status(uc, created["id"], "running")
    async for event in iter_sse(uc, created["id"]):
        if event.event == "token" and event.data["index"] >= 3:
            break
    resp = await uc.post(f"/v1/jobs/{created['id']}/cancel")
    assert resp.status_code in (200, 202)
    job = await wait_job(uc, created["id"], timeout=30)
    assert job["status"] == "cancelled" and job["finish_reason"] == "cancelled"
    assert 0 < job["usage"]["completion_tokens"] < 2000
    # The worker is free again: a new job still runs.
    after = await wait_job(uc, (await submit(uc, model=MODEL, messages=FRANCE, max_tokens=4))["id"])
    assert after["status"] == "succeeded"


async def test_upstream_model_refuses_at_submit_what_its_workers_would_drop(uc: httpx.AsyncClient) -> None:
    # The openai-http worker forwards neither n, logprobs, top_k nor response_format: each is a 400 that
    # names it (it used to be a 202, and a job that ran without it), on every route that makes a job.
    base = {"model": MODEL, "messages": FRANCE, "max_tokens": 4}
    for extra, param in (
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"top_k": 5}, "top_k"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
    ):
        for route in ("/v1/jobs", "/v1/chat/completions"):
            resp = await uc.post(route, json={**base, **extra})
            assert resp.status_code == 400, (route, extra, resp.text)
            error = resp.json()["error"]
            assert error["param"] == param and error["code"] == "unsupported_parameter", error
            assert f"{param} is not supported for model '{MODEL}'" in error["message"]
            assert "openai-http" in error["message"]
    # What it does forward still goes through.
    ok = await submit(uc, **base, seed=7, stop=["\n"], temperature=0)
    assert (await wait_job(uc, ok["id"]))["status"] == "succeeded"
    models = {m["id"]: m for m in (await uc.get("/v1/models")).json()["data"]}
    caps = models[MODEL]["capabilities"]
    assert caps["engine"] == "openai-http" and caps["seed"] and not caps["top_k"] and not caps["n"]
    # The session's transformers worker (a CPU one) honours them all.
    local = next(m for m in models.values() if m["capabilities"]["engine"] == "transformers")
    assert local["workers"] >= 1
    assert all(
        local["capabilities"][k] for k in ("n", "logprobs", "seed", "top_k", "structured_outputs", "tools")
    )


# An openai-http worker whose upstream is another inferq (OpenAI-compatible: /v1/chat/completions), whose
# built-in engine honours n and logprobs: what its operator declares is forwarded and mapped back.
DECLARED_MODEL = "declared-smol"
DECLARED = "n,logprobs,top_logprobs=3,seed,stop"


@pytest.fixture(scope="module")
def declared(stack: Stack, model_dir: Path) -> Iterator[str]:
    url, api = start_api(
        stack, INFERQ_AUTH="off", INFERQ_EXTRA_MODELS=json.dumps({DECLARED_MODEL: str(model_dir)})
    )
    env = {
        **stack.api.env,
        "INFERQ_MODEL__SERVED_NAME": DECLARED_MODEL,
        "INFERQ_WORKER__UPSTREAM_CAPABILITIES": DECLARED,
    }
    worker = Proc(
        [
            "worker",
            "--engine",
            "openai-http",
            "--upstream-url",
            f"{stack.base_url}/v1",
            "--upstream-model",
            stack.api.env["INFERQ_MODEL__SERVED_NAME"],
        ],
        env,
        stack.api.log_dir,
    )
    try:
        before = live_workers(stack.servers.redis_url)
        worker.start()
        wait_for(lambda: live_workers(stack.servers.redis_url) > before, 120, "the declared worker", [worker])
        yield url
    finally:
        worker.stop()
        api.stop()


async def test_upstream_capabilities_declared_are_forwarded_and_mapped_back(declared: str) -> None:
    async with httpx.AsyncClient(base_url=declared, timeout=httpx.Timeout(60.0)) as c:
        body = {"model": DECLARED_MODEL, "messages": FRANCE, "max_tokens": 6, "temperature": 1.0, "seed": 3}
        created = await submit(c, **body, n=2, logprobs=True, top_logprobs=2)
        events = [e async for e in iter_sse(c, created["id"])]
        job = await wait_job(c, created["id"])
        assert job["status"] == "succeeded", job
        choices = job["choices"]
        assert [ch["index"] for ch in choices] == [0, 1]
        for ch in choices:
            # Each output's text, streamed under its choice, with a logprob entry (2 alternatives) per token.
            streamed = [e.data for e in events if e.event == "token" and e.data.get("choice") == ch["index"]]
            assert "".join(d["text"] for d in streamed) == ch["text"] and ch["text"]
            entries = ch["logprobs"]
            assert entries and "".join(e["token"] for e in entries) == ch["text"]
            assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)
            assert [e for d in streamed for e in d["logprobs"]] == entries
        assert job["usage"]["completion_tokens"] >= 2
        # What is not declared, or over the declared limit, is refused at submit with the field named.
        for extra, param in (
            ({"top_k": 5}, "top_k"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"logprobs": True, "top_logprobs": 4}, "top_logprobs"),
        ):
            resp = await c.post("/v1/chat/completions", json={**body, **extra})
            assert resp.status_code == 400, (extra, resp.text)
            assert resp.json()["error"]["param"] == param, resp.text
        models = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
        caps = models[DECLARED_MODEL]["capabilities"]
        assert caps["engine"] == "openai-http" and caps["n"] and caps["logprobs"]
        assert caps["max_top_logprobs"] == 3 and not caps["top_k"] and not caps["structured_outputs"]


def test_upstream_capabilities_unknown_name_stops_the_worker_at_start(stack: Stack) -> None:
    env = {**stack.api.env, "INFERQ_WORKER__UPSTREAM_CAPABILITIES": "n,beam_search"}
    args = ["worker", "--engine", "openai-http", "--upstream-url", f"{stack.base_url}/v1"]
    worker = Proc(args, env, stack.api.log_dir)
    worker.start()
    try:
        assert worker.popen is not None
        assert worker.popen.wait(60) != 0
    finally:
        worker.stop()
    assert "unknown capability 'beam_search'" in worker.tail()
