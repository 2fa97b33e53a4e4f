"""Auth fails closed: in `auto`, the first key closes every API process at once, and revoking (or
deleting) every key leaves the API closed, never open. On a database of this module's own, which no
other test has put a key in, served by two API processes (no worker: nothing here needs a job to run)."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from api.http.errors import INVALID_KEY, MISSING_KEY, STREAM_TOKEN_OPEN
from api.tenancy import keystore
from api.tenancy.keystore import KeyStore
from inferq.keycounts import CLOSED_NOTE, KeyCounts, auth_line
from shared.browser import STREAM_TOKEN_PARAM, STREAM_TOKEN_PATH, UI_PATH
from shared.settings import Settings
from tests.conftest import REPO, Proc, Stack, _admin, start_api

# Three API processes start in this module (two in its fixture, one with auth off): minutes on a loaded
# two-core machine.
pytestmark = pytest.mark.timeout(900)

JOB = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
KEY_PREFIX = "iq_"


def _redis_db(url: str, db: int) -> str:
    parts = url.split("?")[0].rstrip("/")
    head, _, last = parts.rpartition("/")
    base = head if last.isdigit() and head.count("/") >= 2 else parts
    return f"{base}/{db}"


@dataclass
class Fresh:
    env: dict[str, str]
    database_url: str
    urls: list[str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "inferq.cli", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def sql(self, sql: str) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            engine = create_async_engine(self.database_url)
            try:
                async with engine.begin() as conn:
                    result = await conn.execute(text(sql))
                    return [dict(r) for r in result.mappings()] if result.returns_rows else []
            finally:
                await engine.dispose()

        return asyncio.run(run())


@pytest.fixture(scope="module")
def fresh(stack: Stack) -> Iterator[Fresh]:
    name = f"inferq_auth_{secrets.token_hex(4)}"
    server = stack.servers.database_url
    asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
    database_url = make_url(server).set(database=name).render_as_string(hide_password=False)
    # A Redis database of its own too: the session's worker must not see this module's jobs.
    redis_url = _redis_db(stack.servers.redis_url, 11)
    env = {
        **stack.api.env,
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_AUTH": "auto",
    }
    assert "INFERQ_AUTH_CACHE_SECONDS" not in env  # the default (5 s): no window may depend on it
    migrated = subprocess.run(
        [sys.executable, "-m", "inferq.cli", "migrate"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert migrated.returncode == 0, migrated.stderr
    apis: list[Proc] = []
    urls: list[str] = []
    try:
        for _ in range(2):
            url, api = start_api(stack, **env)
            apis.append(api)
            urls.append(url)
        yield Fresh(env, database_url, urls)
    finally:
        for api in apis:
            api.stop()
        import redis as redis_sync

        redis_sync.Redis.from_url(redis_url).flushdb()
        asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _status(url: str, method: str = "GET", key: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{url}/v1/jobs", headers=headers, timeout=10, **kw)


def _message(resp: httpx.Response) -> str:
    message: str = resp.json()["error"]["message"]
    return message


def test_auth_auto_closes_with_the_first_key_and_stays_closed_after_the_last_is_revoked(
    fresh: Fresh, stack: Stack
) -> None:
    # Open while no key was ever made: anyone submits and lists (work of tenant `default`), and may
    # mint a stream token for a job.
    for url in fresh.urls:
        assert _status(url).status_code == 200
    opened = _status(fresh.urls[0], "POST", json=JOB)
    assert opened.status_code == 202, opened.text
    job_id = opened.json()["id"]
    minted = httpx.post(f"{fresh.urls[0]}/v1/jobs/{job_id}/{STREAM_TOKEN_PATH}", timeout=10)
    assert minted.status_code == 200, minted.text
    open_token = minted.json()["token"]
    assert httpx.get(f"{fresh.urls[1]}{UI_PATH}/config.json").json()["auth_required"] is False

    created = fresh.cli("keys", "create", "--tenant", "alpha")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith(KEY_PREFIX)
    key_id = "key_" + key.split("_")[1]

    # No window: the very next anonymous request, on either process, is refused.
    for url in fresh.urls:
        for method, body in (("POST", JOB), ("GET", None)):
            resp = _status(url, method, json=body)
            assert resp.status_code == 401, f"{method} {url}: {resp.status_code} {resp.text}"
            assert _message(resp) == MISSING_KEY
    # A stream token minted while the API was open does not outlive it.
    refused = httpx.get(
        f"{fresh.urls[1]}/v1/jobs/{job_id}/events", params={STREAM_TOKEN_PARAM: open_token}, timeout=10
    )
    assert refused.status_code == 401 and _message(refused) == STREAM_TOKEN_OPEN

    submitted = _status(fresh.urls[0], "POST", key, json=JOB)
    assert submitted.status_code == 202, submitted.text
    listed = _status(fresh.urls[1], key=key).json()["data"]
    assert [j["id"] for j in listed] == [submitted.json()["id"]]

    revoked = fresh.cli("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert "that was the last active key" in revoked.stderr and "401" in revoked.stderr
    listed_keys = fresh.cli("keys", "list")
    assert "no active API keys" in listed_keys.stdout

    # Once each process has seen the revocation (its key cache, 5 s by default), the key is refused,
    # and so is everyone without one: the API is closed, not open.
    for url in fresh.urls:
        deadline = time.monotonic() + 30
        while (resp := _status(url, key=key)).status_code != 401:
            assert time.monotonic() < deadline, f"{url} still accepts the revoked key"
            time.sleep(0.25)
        assert _message(resp) == INVALID_KEY
        for method, body in (("GET", None), ("POST", JOB)):
            anon = _status(url, method, json=body)
            assert anon.status_code == 401, f"anonymous {method} on a closed API: {anon.text}"
    assert httpx.get(f"{fresh.urls[0]}{UI_PATH}/config.json").json()["auth_required"] is True

    # Deleting the key rows by hand does not reopen it either: auth_state remembers keys existed.
    fresh.sql("DELETE FROM api_keys")
    assert fresh.sql("SELECT count(*) AS n FROM auth_state") == [{"n": 1}]
    for url in fresh.urls:
        assert _status(url).status_code == 401

    # Only an explicit INFERQ_AUTH=off opens an API that has had keys.
    url, api = start_api(stack, **{**fresh.env, "INFERQ_AUTH": "off"})
    try:
        assert _status(url).status_code == 200
    finally:
        api.stop()


def test_auth_line_says_closed_and_warns_loudly_when_off_with_keys() -> None:
    never = KeyCounts(active=0, ever=False)
    closed = KeyCounts(active=0, ever=True)
    some = KeyCounts(active=2, ever=True)
    assert auth_line("auto", never).startswith("auth: open (no API key has been created")
    assert auth_line("auto", closed).startswith("auth: closed") and CLOSED_NOTE in auth_line("auto", closed)
    assert auth_line("auto", some).startswith("auth: API keys required")
    assert auth_line("auto", never, admin_key=True).startswith("auth: API keys required")
    assert auth_line("on", never).startswith("auth: API keys required, and none exists yet")
    assert auth_line("off", never) == "auth: open (INFERQ_AUTH=off)"
    loud = auth_line("off", some)
    assert loud.startswith("auth: OFF") and "every tenant's jobs" in loud and "2 active" in loud
    # Unreadable counts never print "open" in auto.
    assert auth_line("auto", None).startswith("auth: API keys required")


async def test_keystore_remembers_unknown_ids_in_a_bounded_lru(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_async_engine(stack.servers.database_url)
    queries: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    monkeypatch.setattr(keystore, "MAX_CACHED_KEYS", 3)
    try:
        store = KeyStore(Settings(auth="on", auth_cache_seconds=60), async_sessionmaker(engine))
        ids = [f"key_{secrets.token_hex(6)}" for _ in range(4)]
        for key_id in ids[:3]:
            assert await store.lookup(key_id) is None
        assert len(queries) == 3
        assert await store.lookup(ids[0]) is None  # remembered: no second read
        assert len(queries) == 3
        assert await store.lookup(ids[3]) is None  # a fourth pushes out the least recently used only
        assert len(queries) == 4
        for key_id in (ids[0], ids[2], ids[3]):
            assert await store.lookup(key_id) is None
        assert len(queries) == 4, "a recently used entry was dropped"
        assert await store.lookup(ids[1]) is None  # the one evicted
        assert len(queries) == 5
    finally:
        await engine.dispose()
