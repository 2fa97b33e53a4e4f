"""`POST /v1/files`: a batch input file is read and checked at upload, as OpenAI checks one; a file that
is not batch JSONL is a 400 naming the file and its first bad lines, and is not stored."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from api.batches.validation import LINE_TOO_LONG, BatchFileReader
from shared.settings import BatchSettings

CHAT = "/v1/chat/completions"
MB = 1_000_000


def _line(custom_id: str, url: str = CHAT, **extra: Any) -> dict[str, Any]:
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def _jsonl(*lines: Any) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


async def _upload(client: httpx.AsyncClient, name: str, content: bytes) -> httpx.Response:
    return await client.post(
        "/v1/files", files={"file": (name, content, "application/jsonl")}, data={"purpose": "batch"}
    )


async def _refusal(client: httpx.AsyncClient, name: str, content: bytes) -> dict[str, Any]:
    before = {f["id"] for f in (await client.get("/v1/files", params={"limit": 10_000})).json()["data"]}
    resp = await _upload(client, name, content)
    assert resp.status_code == 400, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["param"] == "file"
    assert error["message"].startswith(f"{name}: ")
    after = {f["id"] for f in (await client.get("/v1/files", params={"limit": 10_000})).json()["data"]}
    assert after == before, "a refused file is not stored"
    return error


async def test_upload_refuses_a_file_with_no_line_break(client: httpx.AsyncClient) -> None:
    content = b'{"custom_id": "a", "method": "POST", "body": {"prompt": "' + b"x" * (30 * MB)
    error = await _refusal(client, "big.jsonl", content)
    limit = BatchSettings().max_line_bytes  # the stack runs with the default
    assert error["message"] == "big.jsonl: line 1: " + LINE_TOO_LONG.format(limit=limit)
    assert "longer than 2000000 bytes" in error["message"]
    assert error["code"] == "line_too_long"


async def test_upload_names_the_one_bad_line_among_good_ones(client: httpx.AsyncClient) -> None:
    content = _jsonl(_line("a"), _line("b"), "", '{"custom_id": "d", "method": "POST"', _line("e"))
    error = await _refusal(client, "batch.jsonl", content)
    assert error["message"] == "batch.jsonl: line 4: the line is not valid JSON"
    assert error["code"] == "invalid_json"


async def test_upload_names_a_duplicate_custom_id(client: httpx.AsyncClient) -> None:
    error = await _refusal(client, "dup.jsonl", _jsonl(_line("a"), _line("b"), _line("a")))
    assert error["message"] == "dup.jsonl: line 3: custom_id 'a' is also on line 1"
    assert error["code"] == "duplicate_custom_id"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file holds no requests"),
        (b" \n\r\n\n", "the file holds no requests"),
        (_jsonl(_line("a")) + b'{"custom_id": "\xff"}\n', "line 2: the line is not UTF-8 text"),
        (_jsonl([_line("a")]), "line 1: each line must be a JSON object"),
        (_jsonl({**_line("a"), "custom_id": 7}), "line 1: custom_id must be a string of 1 to 512 characters"),
        (_jsonl({**_line("a"), "method": "GET"}), "line 1: method must be 'POST'"),
        (
            _jsonl(_line("a", "/v1/images/generations")),
            "line 1: url must be one of: /v1/chat/completions, /v1/completions, /v1/embeddings, "
            "/v1/responses",
        ),
        (
            _jsonl(_line("a"), _line("b", "/v1/completions")),
            "line 2: url must be '/v1/chat/completions' as on line 1: a batch has one endpoint",
        ),
        (_jsonl({**_line("a"), "body": "hi"}), "line 1: body must be a JSON object"),
        (_jsonl({k: v for k, v in _line("a").items() if k != "body"}), "line 1: body must be a JSON object"),
        (
            _jsonl({k: v for k, v in _line("a").items() if k != "url"}),
            "line 1: url must be one of: /v1/chat/completions, /v1/completions, /v1/embeddings, "
            "/v1/responses",
        ),
    ],
)
async def test_upload_refuses_lines_without_the_batch_line_shape(
    client: httpx.AsyncClient, content: bytes, problem: str
) -> None:
    error = await _refusal(client, "in.jsonl", content)
    assert error["message"] == f"in.jsonl: {problem}"


async def test_upload_names_the_first_bad_lines_and_counts_the_rest(client: httpx.AsyncClient) -> None:
    content = _jsonl(_line("ok"), *["nope"] * 8)
    error = await _refusal(client, "many.jsonl", content)
    named = "; ".join(f"line {n}: the line is not valid JSON" for n in range(2, 7))
    assert error["message"] == f"many.jsonl: {named}; and 3 more bad lines"


async def test_upload_of_a_valid_file_is_processed(client: httpx.AsyncClient) -> None:
    # CRLF endings, a blank line, and U+2028 inside a string (JSON allows it raw; it ends no line).
    second = json.dumps({**_line("b"), "body": {"prompt": "one\u2028two"}}, ensure_ascii=False)
    content = (json.dumps(_line("a")) + "\r\n\r\n" + second).encode()
    resp = await _upload(client, "good.jsonl", content)
    assert resp.status_code == 200, resp.text
    file = resp.json()
    assert (file["status"], file["status_details"], file["bytes"]) == ("processed", None, len(content))
    assert (await client.get(f"/v1/files/{file['id']}")).json()["status"] == "processed"
    assert (await client.get(f"/v1/files/{file['id']}/content")).content == content
    assert (await client.delete(f"/v1/files/{file['id']}")).status_code == 200


# The reader on its own: the limits and the line ends, where a stack would only be slower.


def _read(content: bytes, chunk: int, **limits: int) -> BatchFileReader:
    reader = BatchFileReader(BatchSettings(**limits))
    for i in range(0, len(content), chunk):
        reader.feed(content[i : i + chunk])
        if reader.stopped:
            break
    reader.close()
    return reader


def test_reader_refuses_a_long_line_before_it_ends() -> None:
    reader = BatchFileReader(BatchSettings(max_line_bytes=4096))
    reader.feed(_jsonl(_line("a")))
    reader.feed(b'{"custom_id": "b", "body": "' + b"x" * 3000)
    assert not reader.stopped
    reader.feed(b"x" * 3000)  # the line is not over, and not read further: nothing is parsed
    assert reader.stopped
    assert [(e.line, e.code) for e in reader.errors] == [(2, "line_too_long")]


def test_reader_stops_past_the_line_limit() -> None:
    reader = _read(_jsonl(*(_line(str(i)) for i in range(5))), 64, max_lines=3)
    assert [(e.line, e.code) for e in reader.errors] == [(4, "too_many_requests")]
    assert reader.errors[0].message == "a batch file holds at most 3 requests"


@pytest.mark.parametrize("chunk", [1, 2, 7, 4096])
def test_reader_numbers_lines_whatever_the_chunks(chunk: int) -> None:
    # \r\n split across chunks is one line end; a lone \r is one too, as bytes.splitlines has it.
    content = json.dumps(_line("a")).encode() + b"\r\n\r" + b"{bad\n" + json.dumps(_line("a")).encode()
    reader = _read(content, chunk)
    assert reader.count == 3
    assert [(e.line, e.code) for e in reader.errors] == [(3, "invalid_json"), (4, "duplicate_custom_id")]
