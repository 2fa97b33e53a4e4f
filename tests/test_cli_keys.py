"""`inferq keys` against the test database, and `--api-key` on the client commands against the running API.

Each test uses a tenant of its own whose keys are revoked at the end; the client commands talk to an API
of this module's own with auth on (the session's API runs with auth off).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from inferq.stack import _write_stack_file
from shared.db import create_engine
from tests.conftest import REPO, Stack, start_api

KEY = re.compile(r"iq_[0-9a-f]{12}_\S+")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _keys(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return _cli(stack.api.env, "keys", *args)


def _sql(stack: Stack, sql: str, **params: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        engine = create_engine(stack.servers.database_url, pool_size=1)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(sql), params)
                return [dict(r) for r in result.mappings()] if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def keyed_url(stack: Stack) -> Iterator[str]:
    """An API on the session's servers that requires keys."""
    url, api = start_api(stack, INFERQ_AUTH="on")
    try:
        yield url
    finally:
        api.stop()


@pytest.fixture
def tenant(stack: Stack) -> Iterator[str]:
    """A tenant of this test's own; its keys are revoked afterwards."""
    name = f"cli-test-{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        _sql(stack, "UPDATE api_keys SET revoked_at = now() WHERE tenant = :t AND revoked_at IS NULL", t=name)


def _create(stack: Stack, tenant: str, *args: str) -> tuple[str, str]:
    """Create a key; return it and its id."""
    done = _keys(stack, "create", "--tenant", tenant, *args)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert KEY.fullmatch(key), done.stdout
    return key, "key_" + key.split("_")[1]


def test_keys_create_prints_the_key_and_stores_only_its_hash(stack: Stack, tenant: str) -> None:
    done = _keys(stack, "create", "--tenant", tenant, "--name", "ci", "--rate", "30", "--token-quota", "5000")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and KEY.fullmatch(lines[0]), done.stdout
    key = lines[0]
    key_id = "key_" + key.split("_")[1]
    assert key not in done.stderr
    assert key_id in done.stderr and "not shown again" in done.stderr

    [row] = _sql(stack, "SELECT * FROM api_keys WHERE id = :id", id=key_id)
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    secret = key.split("_", 2)[2]
    assert not any(secret in str(value) for value in row.values())
    assert (row["tenant"], row["name"], row["rate_per_minute"], row["tokens_per_day"]) == (
        tenant,
        "ci",
        30,
        5000,
    )
    assert row["revoked_at"] is None


def test_keys_list_shows_ids_and_tenants_never_keys(stack: Stack, tenant: str) -> None:
    key, key_id = _create(stack, tenant, "--rate", "7")
    [row] = _sql(stack, "SELECT key_hash FROM api_keys WHERE id = :id", id=key_id)

    shown = _keys(stack, "list")
    assert shown.returncode == 0, shown.stderr
    assert key_id in shown.stdout and tenant in shown.stdout
    assert key not in shown.stdout and row["key_hash"] not in shown.stdout

    raw = _keys(stack, "list", "--json")
    assert raw.returncode == 0, raw.stderr
    [mine] = [k for k in json.loads(raw.stdout) if k["id"] == key_id]
    assert mine["tenant"] == tenant and mine["rate_per_minute"] == 7 and mine["revoked_at"] is None
    assert mine["admin"] is False
    assert "key_hash" not in mine and key not in raw.stdout and row["key_hash"] not in raw.stdout


def test_keys_revoke_marks_the_key_and_refuses_a_second_time(stack: Stack, tenant: str) -> None:
    _, key_id = _create(stack, tenant)
    done = _keys(stack, "revoke", key_id)
    assert done.returncode == 0, done.stderr
    assert f"revoked {key_id}" in done.stdout
    [row] = _sql(stack, "SELECT revoked_at FROM api_keys WHERE id = :id", id=key_id)
    assert row["revoked_at"] is not None

    active = json.loads(_keys(stack, "list", "--json").stdout)
    assert key_id not in [k["id"] for k in active]
    every = json.loads(_keys(stack, "list", "--all", "--json").stdout)
    [mine] = [k for k in every if k["id"] == key_id]
    assert mine["revoked_at"] is not None

    again = _keys(stack, "revoke", key_id)
    assert again.returncode == 1
    assert "already revoked" in again.stderr


def test_keys_create_admin_marks_the_key(stack: Stack, tenant: str) -> None:
    done = _keys(stack, "create", "--tenant", tenant, "--admin")
    assert done.returncode == 0, done.stderr
    assert "admin view of the fleet" in done.stderr
    key_id = "key_" + done.stdout.strip().split("_")[1]
    [row] = _sql(stack, "SELECT admin FROM api_keys WHERE id = :id", id=key_id)
    assert row["admin"] is True
    [mine] = [k for k in json.loads(_keys(stack, "list", "--json").stdout) if k["id"] == key_id]
    assert mine["admin"] is True


def test_keys_revoke_unknown_id_exits_1(stack: Stack) -> None:
    done = _keys(stack, "revoke", "key_000000000000")
    assert done.returncode == 1
    assert "no API key key_000000000000" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--tenant", ""],
        ["--tenant", "has space"],
        ["--tenant", "a/b"],
        ["--tenant", "x" * 65],
        ["--tenant", "ok", "--rate", "0"],
        ["--tenant", "ok", "--token-quota", "0"],
    ],
)
def test_keys_create_rejects_bad_input(stack: Stack, args: list[str]) -> None:
    before = _sql(stack, "SELECT count(*) AS n FROM api_keys")[0]["n"]
    done = _keys(stack, "create", *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert not done.stdout.strip()
    assert _sql(stack, "SELECT count(*) AS n FROM api_keys")[0]["n"] == before


def _env_without_db(stack: Stack, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in stack.api.env.items() if k != "INFERQ_DATABASE_URL"}
    return {**env, "INFERQ_DATA_DIR": str(data_dir)}


def test_keys_without_a_database_url_exit_2(stack: Stack, tmp_path: Path) -> None:
    done = _cli(_env_without_db(stack, tmp_path), "keys", "list")
    assert done.returncode == 2
    assert "INFERQ_DATABASE_URL" in done.stderr and "inferq up" in done.stderr


def test_keys_read_the_database_url_from_stack_json(stack: Stack, tmp_path: Path) -> None:
    urls = {"redis_url": "", "database_url": stack.servers.database_url, "api_url": stack.base_url}
    _write_stack_file(tmp_path / "stack.json", urls)
    done = _cli(_env_without_db(stack, tmp_path), "keys", "list", "--json")
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)


def test_stack_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    path.write_text("old")
    path.chmod(0o644)
    _write_stack_file(path, {"database_url": "postgresql://u:pw@h/db"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"database_url": "postgresql://u:pw@h/db"}
    assert os.listdir(tmp_path) == ["stack.json"]


def test_cli_api_key_option_authenticates_client_commands(
    stack: Stack, tenant: str, tmp_path: Path, keyed_url: str
) -> None:
    key, _ = _create(stack, tenant)
    url = ["--url", keyed_url]

    refused = _cli(stack.api.env, "jobs", *url)
    assert refused.returncode == 1
    assert "error 401" in refused.stdout and "an API key is required" in refused.stdout

    for args in (["jobs", *url, "--api-key", key], ["workers", *url, "--api-key", key]):
        done = _cli(stack.api.env, *args)
        assert done.returncode == 0, f"{args[0]}: {done.stdout}{done.stderr}"
    from_env = _cli({**stack.api.env, "INFERQ_API_KEY": key}, "jobs", *url)
    assert from_env.returncode == 0, from_env.stdout

    wrong = _cli(stack.api.env, "jobs", *url, "--api-key", key[:-2] + "xx")
    assert wrong.returncode == 1 and "error 401" in wrong.stdout
    assert key[:-2] not in wrong.stdout + wrong.stderr

    answered = _cli(stack.api.env, "submit", "Say hi.", "--max-tokens", "2", *url, "--api-key", key)
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert "job_" in answered.stdout

    # batch: the /v1/models lookup, the upload and the batch itself, then status and cancel.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}) + "\n")
    out = str(tmp_path / "o.jsonl")
    no_key = _cli(stack.api.env, "batch", str(prompts), "--out", out, *url, "--no-wait")
    assert no_key.returncode == 1 and "error 401" in no_key.stderr
    started = _cli(stack.api.env, "batch", str(prompts), "--out", out, *url, "--no-wait", "--api-key", key)
    assert started.returncode == 0, started.stderr
    batch_id = started.stdout.strip()
    for sub in ("status", "cancel"):
        denied = _cli(stack.api.env, "batch", sub, batch_id, *url)
        assert denied.returncode == 1 and "error 401" in denied.stderr
    shown = _cli(stack.api.env, "batch", "status", batch_id, *url, "--api-key", key)
    assert shown.returncode == 0 and batch_id in shown.stdout, shown.stderr
    cancelled = _cli(stack.api.env, "batch", "cancel", batch_id, *url, "--api-key", key)
    # The tiny batch may already be done, and a done batch cannot be cancelled (409): either way the key
    # got through.
    assert cancelled.returncode == 0 or "error 409" in cancelled.stderr, cancelled.stderr
