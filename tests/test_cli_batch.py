"""`inferq batch`: the input-line wrapping on its own, then the command against the running stack."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferq.batch_cli import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    TERMINAL,
    BatchInputError,
    build_batch_input,
    parse_metadata,
)
from tests.conftest import REPO, Stack


def _model() -> str:
    return "m"


def _jsonl(*items: Any) -> str:
    return "".join((x if isinstance(x, str) and x.strip() == "" else json.dumps(x)) + "\n" for x in items)


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq.cli", "batch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_build_batch_input_wraps_bodies_into_chat_lines() -> None:
    text = _jsonl(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        "",
        {"custom_id": "mine", "messages": [{"role": "user", "content": "yo"}], "model": "other"},
    )
    got = build_batch_input(text, None, _model)
    assert got.endpoint == CHAT
    assert got.requests == [
        {
            "custom_id": "line-1",
            "method": "POST",
            "url": CHAT,
            "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "model": "m"},
        },
        {
            "custom_id": "mine",
            "method": "POST",
            "url": CHAT,
            "body": {"messages": [{"role": "user", "content": "yo"}], "model": "other"},
        },
    ]
    # Each request keeps its input line, so the server's line numbers are the input file's.
    assert got.numbers == [1, 3]
    assert got.jsonl().decode().split("\n") == [
        json.dumps(got.requests[0]),
        "",
        json.dumps(got.requests[1]),
        "",
    ]


def test_build_batch_input_numbers_custom_ids_by_file_line() -> None:
    text = _jsonl({"prompt": "a"}, " ", {"prompt": "b"})
    got = build_batch_input(text, None, _model)
    assert got.endpoint == COMPLETIONS
    assert [r["custom_id"] for r in got.requests] == ["line-1", "line-3"]
    assert got.requests[1]["body"] == {"prompt": "b", "model": "m"}


def test_build_batch_input_ends_lines_where_the_server_does() -> None:
    # U+2028 is allowed raw in a JSON string and ends no line; \r\n and a lone \r each end one.
    got = build_batch_input('"a\u2028b"\r\n\r"c"\n', None, _model)
    assert got.numbers == [1, 3]
    assert got.requests[0]["body"]["messages"][0]["content"] == "a\u2028b"
    assert got.jsonl().decode().split("\n")[0] == json.dumps(got.requests[0], ensure_ascii=False)


def test_build_batch_input_string_line_is_one_user_message() -> None:
    got = build_batch_input(_jsonl("hello"), None, _model)
    assert got.requests[0]["url"] == CHAT
    assert got.requests[0]["body"] == {"messages": [{"role": "user", "content": "hello"}], "model": "m"}
    # With the whole file going to /v1/completions, a string can only be the prompt.
    got = build_batch_input(_jsonl("hello"), COMPLETIONS, _model)
    assert got.requests[0]["body"] == {"prompt": "hello", "model": "m"}


def test_build_batch_input_picks_embeddings_or_responses_for_input_bodies() -> None:
    asked: list[str] = []

    def embeds(model: str) -> bool:
        asked.append(model)
        return model == "minilm"

    got = build_batch_input(_jsonl({"input": "x", "model": "minilm"}), None, _model, embeds)
    assert got.endpoint == EMBEDDINGS and got.requests[0]["body"] == {"input": "x", "model": "minilm"}
    assert (
        build_batch_input(_jsonl({"input": "x", "model": "chat"}), None, _model, embeds).endpoint == RESPONSES
    )
    assert asked == ["minilm", "chat"]
    # Fields only one endpoint has decide without asking which kind the model is.
    by_fields = build_batch_input(
        _jsonl({"input": "x", "instructions": "be brief"}, {"input": "y", "max_output_tokens": 4}),
        None,
        _model,
        embeds,
    )
    assert by_fields.endpoint == RESPONSES
    assert build_batch_input(
        _jsonl({"input": [1, 2], "encoding_format": "base64"}), None, _model
    ).endpoint == (EMBEDDINGS)
    assert asked == ["minilm", "chat"]
    strings = build_batch_input(_jsonl("some text"), EMBEDDINGS, _model)
    assert strings.requests[0]["body"] == {"input": "some text", "model": "m"}
    assert strings.requests[0]["url"] == EMBEDDINGS


def test_build_batch_input_endpoint_option_wins_over_body_shape() -> None:
    got = build_batch_input(_jsonl({"prompt": "x"}, {"messages": []}), CHAT, _model)
    assert got.endpoint == CHAT
    assert {r["url"] for r in got.requests} == {CHAT}


def test_build_batch_input_full_lines_pass_unchanged() -> None:
    full = {"custom_id": "a", "method": "POST", "url": CHAT, "body": {"messages": [], "temperature": 0}}
    got = build_batch_input(_jsonl(full, {"messages": []}), None, _model)
    assert got.requests[0] == full  # no model added, nothing changed
    assert got.requests[1]["custom_id"] == "line-2"


def test_build_batch_input_asks_for_the_model_once_and_only_when_needed() -> None:
    calls: list[int] = []

    def model() -> str:
        calls.append(1)
        return "m"

    full = {"custom_id": "a", "method": "POST", "url": CHAT, "body": {"model": "x", "messages": []}}
    build_batch_input(_jsonl(full, {"messages": [], "model": "y"}), None, model)
    assert calls == []
    build_batch_input(_jsonl({"messages": []}, {"messages": []}, "hi"), None, model)
    assert calls == [1]


def test_build_batch_input_rejects_mixed_urls() -> None:
    with pytest.raises(BatchInputError, match="line 2 goes to /v1/completions but line 1 goes to"):
        build_batch_input(_jsonl({"messages": []}, {"prompt": "x"}), None, _model)
    full = {"custom_id": "a", "method": "POST", "url": COMPLETIONS, "body": {"prompt": "x"}}
    with pytest.raises(BatchInputError, match="line 1 goes to /v1/completions but --endpoint goes to"):
        build_batch_input(_jsonl(full), CHAT, _model)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"messages": [}\n', "line 1: not valid JSON"),
        ("[1, 2]\n", "line 1: expected a JSON object or string, got list"),
        ('{"max_tokens": 3}\n', "line 1: a request body needs 'messages', 'prompt' or 'input'"),
        (
            '{"prompt": "a", "custom_id": "x"}\n{"prompt": "b", "custom_id": "x"}\n',
            "line 2: custom_id 'x' is already used on line 1",
        ),
        ("\n  \n", "no requests"),
    ],
)
def test_build_batch_input_rejects_bad_lines(text: str, message: str) -> None:
    with pytest.raises(BatchInputError, match=message.replace("[", r"\[")):
        build_batch_input(text, None, _model)


def test_parse_metadata_splits_key_value_pairs() -> None:
    assert parse_metadata(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_metadata(["novalue"])


def test_batch_cli_mixed_urls_exit_2_before_any_request(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(_jsonl({"messages": []}, {"prompt": "x"}))
    # Nothing listens on port 9: reaching the network would fail differently.
    done = _cli(
        str(path), "--out", str(tmp_path / "out.jsonl"), "--model", "m", "--url", "http://127.0.0.1:9"
    )
    assert done.returncode == 2, done.stderr
    assert "a batch has a single endpoint" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_batch_cli_needs_out_for_a_file(tmp_path: Path) -> None:
    done = _cli(str(tmp_path / "x.jsonl"))
    assert done.returncode == 2
    assert "--out" in done.stderr


PROMPTS: list[dict[str, Any]] = [
    {"custom_id": "france", "messages": [{"role": "user", "content": "Capital of France?"}]},
    {"messages": [{"role": "user", "content": "Say hi."}]},
    {"custom_id": "count", "messages": [{"role": "user", "content": "Count: 1, 2,"}]},
]


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(_jsonl(*({**p, "max_tokens": 8, "temperature": 0} for p in PROMPTS)))
    return path


def test_batch_cli_runs_a_file_and_writes_the_results(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    done = _cli(str(_prompts(tmp_path)), "--out", str(out), "--url", stack.base_url, "--metadata", "k=v")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith("batch_")
    assert "completed: 3 completed, 0 failed" in done.stdout
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 3
    assert sorted(r["custom_id"] for r in results) == ["count", "france", "line-2"]
    for r in results:
        assert r["error"] is None
        assert r["response"]["status_code"] == 200
        assert r["response"]["body"]["object"] == "chat.completion"
        assert r["response"]["body"]["usage"]["completion_tokens"] <= 8
    assert not out.with_suffix(".errors.jsonl").exists()


def _wait_batch(stack: Stack, batch_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch: dict[str, Any] = httpx.get(f"{stack.base_url}/v1/batches/{batch_id}", timeout=10).json()
        if batch["status"] in TERMINAL:
            return batch
        time.sleep(0.25)
    raise AssertionError(f"batch {batch_id} did not finish in {timeout}s")


def test_batch_cli_status_shows_a_batch(stack: Stack, tmp_path: Path) -> None:
    started = _cli(
        str(_prompts(tmp_path)), "--out", str(tmp_path / "o.jsonl"), "--url", stack.base_url, "--no-wait"
    )
    assert started.returncode == 0, started.stdout + started.stderr
    batch_id = started.stdout.strip()
    assert batch_id.startswith("batch_")
    assert f"inferq batch status {batch_id}" in started.stderr
    _wait_batch(stack, batch_id)

    shown = _cli("status", batch_id, "--url", stack.base_url)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert batch_id in shown.stdout
    assert "/v1/chat/completions" in shown.stdout
    assert "completed" in shown.stdout
    assert "3 total, 3 completed, 0 failed" in shown.stdout
    for row in ("created", "expires", "input file", "output file"):
        assert row in shown.stdout

    raw = _cli("status", batch_id, "--json", "--url", stack.base_url)
    assert raw.returncode == 0, raw.stderr
    batch = json.loads(raw.stdout)
    assert batch["id"] == batch_id and batch["object"] == "batch"
    assert batch["request_counts"]["total"] == 3

    missing = _cli("status", "batch_nope", "--url", stack.base_url)
    assert missing.returncode == 1
    assert "error 404" in missing.stderr


def test_batch_cli_refused_upload_prints_the_servers_message_and_exits_2(
    stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"custom_id": "a", "method": "POST", "url": CHAT, "body": {"messages": []}}
    # The CLI passes full lines as they are; the server refuses the method, naming the input's line.
    path.write_text(_jsonl(good, "", {**good, "custom_id": "b", "method": "GET"}))
    out = tmp_path / "out.jsonl"
    done = _cli(str(path), "--out", str(out), "--url", stack.base_url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error 400: bad.jsonl: line 3: method must be 'POST'" in done.stderr
    assert not done.stdout  # no batch was created
    assert not out.exists()


def test_batch_cli_cancel_stops_a_batch(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(
        _jsonl({"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000})
    )
    started = _cli(str(path), "--out", str(tmp_path / "o.jsonl"), "--url", stack.base_url, "--no-wait")
    assert started.returncode == 0, started.stderr
    batch_id = started.stdout.strip()

    cancelled = _cli("cancel", batch_id, "--url", stack.base_url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() in (f"{batch_id}: cancelling", f"{batch_id}: cancelled")
    assert _wait_batch(stack, batch_id)["status"] == "cancelled"

    again = _cli("cancel", batch_id, "--url", stack.base_url)
    assert again.returncode == 1
    assert "error 409" in again.stderr
