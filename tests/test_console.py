"""The web console and browsers as clients: stream tokens and CORS over HTTP, then the console and a page
on another origin in headless Chromium (Playwright), against an API process of their own with auth on."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from api.http.errors import (
    MISSING_KEY,
    STREAM_TOKEN_EXPIRED,
    STREAM_TOKEN_INVALID,
    STREAM_TOKEN_OPEN,
    STREAM_TOKEN_OTHER_JOB,
    STREAM_TOKEN_REVOKED,
)
from api.streams.tokens import sign
from shared import keys
from shared.apikeys import hash_key, key_id_of, new_key
from shared.browser import STREAM_TOKEN_PARAM, STREAM_TOKEN_PATH, UI_PATH
from shared.models import ApiKey, new_key_id
from shared.settings import Settings
from tests.conftest import REPO, Proc, Stack, _free_port, start_api
from tests.helpers import FRANCE, STORY, read_sse, submit, wait_job, wait_status

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("INFERQ_TEST_ARTIFACTS", REPO / "test-artifacts")) / "console"
README_SCREENSHOT = REPO / "docs" / "img" / "console-overview.png"
MODEL = "SmolLM2-135M-Instruct"
ORIGIN_PORT = _free_port()  # the other origin's page; the API under test lets it in (CORS)
ORIGIN = f"http://127.0.0.1:{ORIGIN_PORT}"
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Console:
    url: str
    api: Proc
    db: AsyncEngine
    made: list[str] = field(default_factory=list)

    async def key(self, tenant: str, rate_per_minute: int | None = None, admin: bool = False) -> str:
        key_id = new_key_id()
        key = new_key(key_id)
        async with self.db.begin() as conn:
            await conn.execute(
                ApiKey.__table__.insert().values(
                    id=key_id,
                    tenant=tenant,
                    key_hash=hash_key(key),
                    rate_per_minute=rate_per_minute,
                    admin=admin,
                )
            )
        self.made.append(key_id)
        return key

    def client(self, key: str | None, base: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=base or self.url, headers=headers, timeout=httpx.Timeout(30.0))


async def _revoke(db: AsyncEngine, key_ids: list[str]) -> None:
    async with db.begin() as conn:
        await conn.execute(update(ApiKey).where(ApiKey.id.in_(key_ids)).values(revoked_at=func.now()))


@pytest.fixture(scope="module")
def console(stack: Stack) -> Iterator[Console]:
    url, api = start_api(
        stack,
        INFERQ_AUTH="on",
        INFERQ_AUTH_CACHE_SECONDS="0.5",
        INFERQ_CORS_ORIGINS=ORIGIN,
    )
    db = create_async_engine(stack.servers.database_url, poolclass=NullPool)  # used from several loops
    c = Console(url, api, db)
    try:
        yield c
    finally:
        api.stop()
        if c.made:
            asyncio.run(_revoke(db, c.made))
        asyncio.run(db.dispose())


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    return error


# --- over HTTP -------------------------------------------------------------------------------------


async def test_events_need_no_token_with_auth_off_and_cors_is_off_by_default(
    client: httpx.AsyncClient,
) -> None:
    # The session's API: auth off, no INFERQ_CORS_ORIGINS.
    job = await submit(client, messages=FRANCE, max_tokens=8, temperature=0)
    events = await read_sse(client, job["id"], params={STREAM_TOKEN_PARAM: "not-a-token"})  # ignored
    assert events[-1].event == "done"
    assert (
        "".join(e.data["text"] for e in events if e.event == "token")
        == (await wait_job(client, job["id"]))["output"]
    )
    resp = await client.post(f"/v1/jobs/{job['id']}/{STREAM_TOKEN_PATH}")
    assert resp.status_code == 200 and resp.json()["url"].startswith(f"/v1/jobs/{job['id']}/events?token=")
    resp = await client.get("/v1/jobs", headers={"Origin": ORIGIN})
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
    page = await client.get(f"{UI_PATH}/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert (await client.get(f"{UI_PATH}/config.json")).json()["auth_required"] is False


async def test_console_asks_for_no_key_while_auth_is_off(
    stack: Stack, tab: Callable[..., Awaitable[Tab]]
) -> None:
    # The session's API runs with auth off.
    t = await tab()
    await t.page.goto(f"{stack.base_url}{UI_PATH}/#/jobs")
    await t.page.locator("#jobs-table tbody tr").first.wait_for()
    assert await t.page.locator("#auth-state").text_content() == "auth off"
    assert await t.page.locator("#key-dialog").is_hidden()
    assert await t.page.locator("#key-button").is_hidden()


def test_cors_origins_read_as_commas_or_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERQ_CORS_ORIGINS", raising=False)
    assert Settings().cors_origins == []  # off by default
    monkeypatch.setenv("INFERQ_CORS_ORIGINS", " http://a.test:1, https://b.test ,")
    assert Settings().cors_origins == ["http://a.test:1", "https://b.test"]
    monkeypatch.setenv("INFERQ_CORS_ORIGINS", '["https://c.test"]')
    assert Settings().cors_origins == ["https://c.test"]


def _gauge(text: str, name: str, labels: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(f"{name}{{{labels}}} "))
    return float(line.rsplit(" ", 1)[1])


async def test_stats_give_the_figures_of_metrics_as_json(client: httpx.AsyncClient, stack: Stack) -> None:
    # A job that holds a slot while both are read: running 1, a slot fewer.
    job = await submit(client, messages=STORY, max_tokens=3000, temperature=0)
    await wait_status(client, job["id"], "running")
    try:
        deadline = time.monotonic() + 10
        while not any(job["id"] in w["jobs"] for w in (await client.get("/v1/workers")).json()["data"]):
            assert time.monotonic() < deadline, "the worker's heartbeat never listed the job"
            await asyncio.sleep(0.2)  # the registry is as fresh as the last heartbeat
        stats = (await client.get("/v1/stats")).json()
        text = (await client.get("/metrics")).text
    finally:
        await client.post(f"/v1/jobs/{job['id']}/cancel")
    (model,) = [m for m in stats["models"] if m["model"] == MODEL]
    capacity = sum(w["capacity"] for w in (await client.get("/v1/workers")).json()["data"])
    assert model["workers"] == 1 and model["capacity"] == capacity and model["running"] >= 1
    assert model["free_slots"] == _gauge(text, "inferq:fleet_free_slots", f'model_name="{MODEL}"') < capacity
    assert model["running"] == _gauge(text, "inferq:num_requests_running", f'model_name="{MODEL}"')
    for lane in ("interactive", "batch"):
        labels = f'model_name="{MODEL}",queue="{lane}"'
        assert model["waiting"][lane] == _gauge(text, "inferq:num_requests_waiting", labels)
    assert abs(stats["time"] - time.time()) < 60
    assert (await wait_job(client, job["id"]))["status"] == "cancelled"


async def test_stream_token_counts_against_its_key_and_ends_with_it(console: Console, stack: Stack) -> None:
    key = await console.key("console-limited", rate_per_minute=4)
    if time.time() % 60 > 40:  # the limit's window is the UTC minute: run all five requests inside one
        await asyncio.sleep(60 - time.time() % 60)
    async with console.client(key) as c, console.client(None) as anon:
        job = await submit(c, messages=FRANCE, max_tokens=4, temperature=0)  # request 1 of the window
        minted = await c.post(f"/v1/jobs/{job['id']}/{STREAM_TOKEN_PATH}")  # 2
        assert minted.status_code == 200, minted.text
        token = minted.json()["token"]
        for _ in range(2):  # 3 and 4: a reconnecting EventSource is a client like any other
            events = await read_sse(anon, job["id"], params={STREAM_TOKEN_PARAM: token})
            assert events[-1].event == "done"
        over = _error(await anon.get(f"/v1/jobs/{job['id']}/events", params={STREAM_TOKEN_PARAM: token}), 429)
        assert over["code"] == "rate_limit_exceeded"
        await _revoke(console.db, [key_id_of(key)])
        await asyncio.sleep(1.0)  # the API trusts what it read about keys for 0.5 s here
        gone = _error(await anon.get(f"/v1/jobs/{job['id']}/events", params={STREAM_TOKEN_PARAM: token}), 401)
        assert gone["message"] == STREAM_TOKEN_REVOKED


async def test_stream_token_opens_only_its_job_until_it_expires(console: Console, stack: Stack) -> None:
    key_a, key_b = await console.key("console-a"), await console.key("console-b")
    async with console.client(key_a) as a, console.client(key_b) as b, console.client(None) as anon:
        job = await submit(a, messages=FRANCE, max_tokens=8, temperature=0)
        other = await submit(a, messages=FRANCE, max_tokens=4, temperature=0)
        theirs = await submit(b, messages=FRANCE, max_tokens=4, temperature=0)
        minted = await a.post(f"/v1/jobs/{job['id']}/{STREAM_TOKEN_PATH}")
        assert minted.status_code == 200, minted.text
        grant = minted.json()
        token = grant["token"]
        assert time.time() < grant["expires_at"] <= time.time() + 301
        assert key_a not in token and key_a not in grant["url"]

        # The token alone opens the job's stream: the history, ending with done.
        events = await read_sse(anon, job["id"], params={STREAM_TOKEN_PARAM: token})
        assert [e.event for e in events][-1] == "done"
        finished = await wait_job(a, job["id"])
        assert "".join(e.data["text"] for e in events if e.event == "token") == finished["output"]
        # ... and resumes with Last-Event-ID like any client.
        resumed = await read_sse(
            anon, job["id"], params={STREAM_TOKEN_PARAM: token}, headers={"Last-Event-ID": str(events[1].id)}
        )
        assert [e.id for e in resumed] == [e.id for e in events[2:]]

        async def refused(job_id: str, value: str, status: int = 401) -> dict[str, Any]:
            return _error(
                await anon.get(f"/v1/jobs/{job_id}/events", params={STREAM_TOKEN_PARAM: value}), status
            )

        assert (await refused(other["id"], token))["message"] == STREAM_TOKEN_OTHER_JOB
        assert (await refused(theirs["id"], token))["message"] == STREAM_TOKEN_OTHER_JOB
        version, payload, mac = token.split(".")
        flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
        for bad in (
            f"{version}.{flipped}.{mac}",
            f"{version}.{payload}.{mac[:-2]}xx",
            "v2." + payload + "." + mac,
        ):
            error = await refused(job["id"], bad)
            assert error["message"] == STREAM_TOKEN_INVALID and error["type"] == "authentication_error"
        for garbage in ("", "x", "v1..", "v1.!!.!!"):
            assert (await refused(job["id"], garbage))["code"] in ("invalid_stream_token", "invalid_api_key")
        assert (await refused(job["id"], key_a))["message"] == STREAM_TOKEN_INVALID  # never the key in a URL
        # A token for another job, re-signed claims and all, is still not this job's.
        redis = AsyncRedis.from_url(stack.servers.redis_url)
        try:
            secret = await redis.get(keys.STREAM_TOKEN_SECRET)
        finally:
            await redis.aclose()
        assert secret, "the API keeps its shared secret in Redis when none is configured"
        expired = sign(secret, job["id"], "console-a", int(time.time()) - 1)
        assert (await refused(job["id"], expired))["message"] == STREAM_TOKEN_EXPIRED.format(job_id=job["id"])
        alive = sign(secret, job["id"], "console-a", int(time.time()) + 60)
        assert (
            await anon.get(f"/v1/jobs/{job['id']}", params={STREAM_TOKEN_PARAM: alive})
        ).status_code == 401
        # Tenant B can neither get a token for A's job nor read it with a token claiming B's tenant.
        assert (
            _error(await b.post(f"/v1/jobs/{job['id']}/{STREAM_TOKEN_PATH}"), 404)["type"]
            == "not_found_error"
        )
        forged = sign(secret, job["id"], "console-b", int(time.time()) + 60, key_id_of(key_b))
        assert (await refused(job["id"], forged, 404))["type"] == "not_found_error"
        # A token that names no key was made while the API was open; it is not honoured once keys are.
        unkeyed = sign(secret, job["id"], "console-a", int(time.time()) + 60)
        assert (await refused(job["id"], unkeyed))["message"] == STREAM_TOKEN_OPEN
        assert (
            _error(await anon.post(f"/v1/jobs/{job['id']}/{STREAM_TOKEN_PATH}"), 401)["message"]
            == MISSING_KEY
        )
        assert _error(await anon.get(f"/v1/jobs/{job['id']}/events"), 401)["message"] == MISSING_KEY

        # Every API process shares the secret: another replica (auth on) opens the stream with a token
        # this one minted.
        other_url, other_api = await asyncio.to_thread(start_api, stack, INFERQ_AUTH="on")
        try:
            async with console.client(None, other_url) as other_replica:
                assert (await other_replica.get("/v1/jobs")).status_code == 401
                replayed = await read_sse(other_replica, job["id"], params={STREAM_TOKEN_PARAM: token})
                assert [e.id for e in replayed] == [e.id for e in events]
        finally:
            await asyncio.to_thread(other_api.stop)


async def test_cors_preflight_and_headers_for_the_allowed_origin_only(console: Console) -> None:
    async with console.client(await console.key("console-a")) as a:
        preflight = await a.options(
            "/v1/jobs",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= set(
            allowed.split(", ")
        )
        resp = await a.post(
            "/v1/jobs", json={"messages": FRANCE, "max_tokens": 2}, headers={"Origin": ORIGIN}
        )
        assert resp.status_code == 202 and resp.headers["access-control-allow-origin"] == ORIGIN
        exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
        assert {"retry-after", "x-request-id", "location"} <= exposed
        unauthorized = await httpx.AsyncClient(base_url=console.url).get(
            "/v1/jobs", headers={"Origin": ORIGIN}
        )
        assert (
            unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN
        )
        stranger = await a.get("/v1/jobs", headers={"Origin": "http://127.0.0.1:9"})
        assert "access-control-allow-origin" not in stranger.headers
        await wait_job(a, resp.json()["id"])


# --- in Chromium -----------------------------------------------------------------------------------


def _need_chromium() -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); CI installs it")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    _need_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Tab:
    page: Any
    problems: list[str]

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def tab(browser: Any) -> AsyncIterator[Callable[..., Awaitable[Tab]]]:
    """New pages (each in a context of its own); none may log an error or throw, checked at the end."""
    contexts: list[Any] = []
    tabs: list[Tab] = []

    async def open_tab(key: str | None = None) -> Tab:
        context = await browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
        contexts.append(context)
        if key is not None:  # as if entered in the key dialog earlier in this tab
            await context.add_init_script(f"sessionStorage.setItem('inferq.apiKey', {json.dumps(key)})")
        page = await context.new_page()
        t = Tab(page, [])
        page.on("console", lambda m: t.problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: t.problems.append(f"pageerror: {e}"))
        tabs.append(t)
        return t

    yield open_tab
    for context in contexts:
        await context.close()
    assert [p for t in tabs for p in t.problems] == []


async def test_console_playground_streams_and_the_job_succeeds_in_the_table(
    console: Console, tab: Callable[..., Awaitable[Tab]]
) -> None:
    key = await console.key("console-a")
    async with console.client(key) as a:  # enough jobs for two pages of two in the jobs table
        for _ in range(2):
            await submit(a, prompt="Hi", max_tokens=2)
    t = await tab()
    page = t.page
    await page.goto(f"{console.url}{UI_PATH}")
    assert page.url == f"{console.url}{UI_PATH}/"
    await page.locator("#key-dialog").wait_for(state="visible")
    await page.fill("#key-input", key)
    await page.click("#key-form button[type=submit]")
    await page.locator(f'#view tr[data-model="{MODEL}"]').wait_for()
    assert await page.evaluate("sessionStorage.getItem('inferq.apiKey')") == key
    assert await page.locator("#auth-state").text_content() == "key set"

    await page.goto(f"{console.url}{UI_PATH}/#/playground")
    await page.locator(f'#pg-model option[value="{MODEL}"]').wait_for(state="attached")
    await page.fill("#pg-input", "Write a short poem about the sea.")
    await page.fill("#pg-max-tokens", "32")
    await page.fill("#pg-temperature", "0")
    # Every change of the output as tokens arrive: more than one means it streamed, not arrived whole.
    await page.evaluate(
        """() => { window.seen = []; new MutationObserver(() => window.seen.push(
             document.getElementById('pg-output').textContent)).observe(
             document.getElementById('pg-output'), {childList: true}); }"""
    )
    await page.click("#pg-run")
    await page.locator("#pg-result").wait_for(timeout=90_000)
    seen: list[str] = await page.evaluate("window.seen.filter(s => s.length)")
    final = await page.locator("#pg-output").text_content()
    job_id = await page.locator("#pg-job").text_content()
    assert len(seen) >= 3, seen
    assert all(final.startswith(s) for s in seen) and seen[-1] == final
    result = await page.locator("#pg-result").text_content()
    assert "queue" in result and "TTFT" in result
    await t.shot("playground")
    async with console.client(key) as a:
        job = await wait_job(a, job_id)
    assert job["status"] == "succeeded" and job["output"] == final

    await page.goto(f"{console.url}{UI_PATH}/#/jobs")
    row = page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')
    await row.locator('[data-status="succeeded"]').wait_for()
    await t.shot("jobs")
    await page.select_option("#status-filter", "failed")
    await row.wait_for(state="detached")
    await page.select_option("#status-filter", "succeeded")
    await row.wait_for()
    # Pages of two, through the API's cursor: older ones, then back to the newest.
    await page.goto(f"{console.url}{UI_PATH}/#/jobs/limit=2")
    rows = page.locator("#jobs-table tbody tr[data-job-id]")
    await page.locator("#page-info", has_text="page 1").wait_for()
    first = await rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)")
    await page.click("#next-page")
    await page.locator("#page-info", has_text="page 2").wait_for()
    second = await rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)")
    assert len(first) == 2 and second and not set(first) & set(second)
    await page.click("#prev-page")
    await page.locator("#page-info", has_text="page 1").wait_for()
    assert await rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)") == first

    await row.locator("a").first.click()
    await page.locator("#stream-state[data-ended]").wait_for()
    assert await page.locator("#job-output").text_content() == final  # the replayed stream
    await page.locator('#job-status [data-status="succeeded"]').wait_for()
    assert await page.locator("#cancel-job").is_hidden()
    await t.shot("job")

    # The overview, with some samples in its charts, for the README too.
    await page.goto(f"{console.url}{UI_PATH}/#/overview")
    await page.locator(f'#view tr[data-model="{MODEL}"]').wait_for()
    await page.wait_for_timeout(5000)  # a few samples in the charts
    assert await page.locator("svg.chart path.line").count() == 3
    shot = await t.shot("overview")
    if os.environ.get("INFERQ_UPDATE_SCREENSHOT"):
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)


async def test_console_overview_shows_a_tenant_its_view_of_the_fleet_and_an_admin_all(
    console: Console, tab: Callable[..., Awaitable[Tab]]
) -> None:
    tenant_key, admin_key = await console.key("console-a"), await console.key("console-ops", admin=True)
    seen = {}
    for name, key in (("tenant", tenant_key), ("full", admin_key)):
        t = await tab(key)
        await t.page.goto(f"{console.url}{UI_PATH}/#/overview")
        note = t.page.locator(f'#fleet-view[data-view="{name}"]')
        await note.wait_for()
        headers = note.locator("xpath=following-sibling::table[1]//th")
        seen[name] = (await note.text_content(), await headers.all_text_contents())
    assert seen["tenant"][0].startswith("Tenant view") and "host" not in seen["tenant"][1]
    assert seen["full"][0].startswith("Full view") and "host" in seen["full"][1]


async def test_console_cancels_a_running_job_from_its_page(
    console: Console, tab: Callable[..., Awaitable[Tab]]
) -> None:
    key = await console.key("console-a")
    async with console.client(key) as a:
        job = await submit(a, messages=STORY, max_tokens=3000, temperature=0)
        await wait_status(a, job["id"], "running")
        t = await tab(key)
        await t.page.goto(f"{console.url}{UI_PATH}/#/job/{job['id']}")
        await t.page.locator('#job-status [data-status="running"]').wait_for()
        await t.page.wait_for_function("() => document.getElementById('job-output').textContent.length > 20")
        await t.page.click("#cancel-job")
        await t.page.locator('#job-status [data-status="cancelled"]').wait_for(timeout=30_000)
        await t.page.locator("#stream-state[data-ended]").wait_for(timeout=30_000)
        assert await t.page.locator("#cancel-job").is_hidden()
        assert (await wait_job(a, job["id"]))["status"] == "cancelled"


async def test_console_resumes_a_dropped_stream_without_losing_or_doubling_a_token(
    console: Console, tab: Callable[..., Awaitable[Tab]]
) -> None:
    key = await console.key("console-a")
    # The console, loaded through a proxy that ends its first event stream after three tokens.
    loop = Loopback(api_port=int(console.url.rsplit(":", 1)[1]))
    proxy = await asyncio.start_server(loop.proxy, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    try:
        async with console.client(key) as a:
            job = await submit(a, messages=STORY, max_tokens=24, temperature=0)
            await wait_status(a, job["id"], "running")
            t = await tab(key)
            await t.page.goto(f"{base}{UI_PATH}/#/job/{job['id']}")
            await t.page.locator("#stream-state[data-ended]").wait_for(timeout=90_000)
            finished = await wait_job(a, job["id"])
        assert await t.page.locator("#job-output").text_content() == finished["output"]
    finally:
        proxy.close()
        await proxy.wait_closed()
    streams = [r for r in loop.requests if "/events" in r["line"]]
    assert loop.cut and len(streams) == 2, streams
    assert "last-event-id" not in streams[0] and int(streams[1]["last-event-id"]) >= 4  # status + 3 tokens


async def test_console_batch_progress_reaches_100_percent(
    console: Console, tab: Callable[..., Awaitable[Tab]]
) -> None:
    key = await console.key("console-a")
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Count to {i}."}],
                "max_tokens": 8,
            },
        }
        for i in range(3)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    async with console.client(key) as a:
        upload = await a.post(
            "/v1/files", files={"file": ("in.jsonl", io.BytesIO(data))}, data={"purpose": "batch"}
        )
        assert upload.status_code == 200, upload.text
        body = {
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        batch = (await a.post("/v1/batches", json=body)).json()
        t = await tab(key)
        await t.page.goto(f"{console.url}{UI_PATH}/#/batches")
        row = t.page.locator(f'#batches-table tr[data-batch-id="{batch["id"]}"]')
        await row.wait_for()
        await row.locator('[role=progressbar][aria-valuenow="100"]').wait_for(timeout=120_000)
        await t.page.locator(
            f'#batches-table tr[data-batch-id="{batch["id"]}"][data-status="completed"]'
        ).wait_for(timeout=60_000)
        await t.shot("batches")
        async with t.page.expect_download() as download:
            await row.locator("a.file").first.click()
        saved = await (await download.value).path()
        outputs = [json.loads(x) for x in Path(saved).read_text().splitlines()]
        assert sorted(o["custom_id"] for o in outputs) == [f"line-{i}" for i in range(3)]


# --- a page on another origin ----------------------------------------------------------------------

OTHER_ORIGIN_PAGE = """<!doctype html><html><body><pre id="log"></pre><script>
const q = new URLSearchParams(location.search);
const api = q.get("api"), proxy = q.get("proxy"), key = q.get("key");
const auth = {Authorization: "Bearer " + key};
async function submit(maxTokens) {
  const body = {messages: [{role: "user", content: "Tell me about the moon."}], max_tokens: maxTokens,
                temperature: 0};
  const resp = await fetch(api + "/v1/jobs", {
    method: "POST", headers: {...auth, "Content-Type": "application/json"}, body: JSON.stringify(body)});
  return {job: await resp.json(), location: resp.headers.get("Location"),
          requestId: resp.headers.get("X-Request-ID")};
}
async function viaFetch(jobId) {
  const resp = await fetch(api + "/v1/jobs/" + jobId + "/events", {headers: auth});
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "", events = [];
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    text += value;
    const blocks = text.split(/\\r?\\n\\r?\\n/);
    text = blocks.pop();
    for (const block of blocks) {
      const ev = {};
      for (const line of block.split(/\\r?\\n/)) {
        const i = line.indexOf(":");
        if (i > 0) ev[line.slice(0, i)] = line.slice(i + 1).trim();
      }
      if (ev.event) events.push(ev);
    }
  }
  return events;
}
function viaEventSource(url) {
  return new Promise((resolve) => {
    const es = new EventSource(url), events = [];
    let opens = 0;
    es.onopen = () => { opens += 1; };
    const take = (name) => es.addEventListener(name, (e) => {
      if (e.data === undefined) return;  // the connection's own error event, not the stream's
      events.push({id: e.lastEventId, event: name, data: JSON.parse(e.data)});
      if (name === "done" || name === "error") { es.close(); resolve({events, opens}); }
    });
    ["status", "token", "done", "error"].forEach(take);
  });
}
window.result = (async () => {
  const first = await submit(8);
  const fetched = await viaFetch(first.job.id);
  const second = await submit(24);
  const grant = await (await fetch(api + "/v1/jobs/" + second.job.id + "/stream_token",
                                   {method: "POST", headers: auth})).json();
  const streamed = await viaEventSource(proxy + grant.url);
  return {first, fetched, second: second.job.id, streamed};
})();
</script></body></html>"""


@dataclass
class Loopback:
    """A page server (the other origin) and an HTTP proxy in front of the API that cuts the first stream of
    events short after a few tokens, ending it cleanly, as a server restart or an idle timeout would."""

    api_port: int
    cut_after_tokens: int = 3
    requests: list[dict[str, str]] = field(default_factory=list)
    cut: bool = False

    async def page(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            await reader.readuntil(b"\r\n\r\n")
            body = OTHER_ORIGIN_PAGE.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()

    async def proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.api_port)
        with contextlib.closing(writer), contextlib.closing(up_writer):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)
            }
            self.requests.append({"line": request_line, **headers})
            kept = [h for h in header_lines if h and not h.lower().startswith("connection:")]
            up_writer.write(
                ("\r\n".join([request_line, *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1")
            )
            await up_writer.drain()
            response_head = await up_reader.readuntil(b"\r\n\r\n")
            writer.write(response_head)
            cutting = "/events" in request_line and not self.cut and b"chunked" in response_head.lower()
            tokens = 0
            while True:
                if cutting:
                    size_line = await up_reader.readline()
                    size = int(size_line.split(b";")[0], 16)
                    chunk = await up_reader.readexactly(size + 2)
                    writer.write(size_line + chunk)
                    tokens += chunk.count(b"event: token")
                    if size == 0:
                        break
                    if tokens >= self.cut_after_tokens:
                        self.cut = True
                        writer.write(b"0\r\n\r\n")  # a clean end of the response, mid-stream
                        break
                else:
                    data = await up_reader.read(65536)
                    if not data:
                        break
                    writer.write(data)
                await writer.drain()
            await writer.drain()


async def test_a_page_on_another_origin_streams_through_cors_and_a_native_eventsource(
    console: Console, tab: Callable[..., Awaitable[Tab]]
) -> None:
    key = await console.key("console-a")
    loop = Loopback(api_port=int(console.url.rsplit(":", 1)[1]))
    page_server = await asyncio.start_server(loop.page, "127.0.0.1", ORIGIN_PORT)
    proxy_server = await asyncio.start_server(loop.proxy, "127.0.0.1", 0)
    proxy_port = proxy_server.sockets[0].getsockname()[1]
    try:
        t = await tab()
        query = httpx.QueryParams(api=console.url, proxy=f"http://127.0.0.1:{proxy_port}", key=key)
        await t.page.goto(f"{ORIGIN}/?{query}")
        result = await asyncio.wait_for(t.page.evaluate("window.result"), 120)
    finally:
        for server in (page_server, proxy_server):
            server.close()
            await server.wait_closed()
    first = result["first"]
    # Through CORS with fetch: the exposed headers are readable, and the stream came whole.
    assert first["location"] == f"/v1/jobs/{first['job']['id']}" and first["requestId"]
    fetched = result["fetched"]
    assert fetched[-1]["event"] == "done"
    async with console.client(key) as a:
        done_first = await wait_job(a, first["job"]["id"])
        done_second = await wait_job(a, result["second"])
    assert (
        "".join(json.loads(e["data"])["text"] for e in fetched if e["event"] == "token")
        == done_first["output"]
    )

    # The native EventSource: cut after three tokens, it reconnected by itself with Last-Event-ID and got
    # the rest, each token once.
    streamed = result["streamed"]
    events = streamed["events"]
    assert loop.cut and streamed["opens"] >= 2
    streams = [r for r in loop.requests if "/events" in r["line"]]
    assert len(streams) >= 2 and all(f"{STREAM_TOKEN_PARAM}=" in r["line"] for r in streams)
    assert all(key not in r["line"] for r in loop.requests)  # the key never went into a URL
    assert all(r.get("origin") == ORIGIN for r in streams)
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(set(ids)), ids
    cut_at = next(
        i
        for i, e in enumerate(events)
        if e["event"] == "token"
        and sum(1 for x in events[: i + 1] if x["event"] == "token") == loop.cut_after_tokens
    )
    assert streams[1].get("last-event-id") == events[cut_at]["id"]
    tokens = [e["data"] for e in events if e["event"] == "token"]
    assert [tok["index"] for tok in tokens] == list(range(len(tokens)))
    assert "".join(tok["text"] for tok in tokens) == done_second["output"]
    assert events[-1]["event"] == "done"
