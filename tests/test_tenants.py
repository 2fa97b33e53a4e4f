"""API keys, tenant isolation, per-key limits, idempotency, admission control and fairness, on an API
process of their own (auth on) that shares the session's servers and worker."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from shared.apikeys import hash_key, key_id_of, matches, new_key
from shared.models import ApiKey, Job, new_key_id
from tests.conftest import Proc, Stack, start_api
from tests.helpers import FRANCE, STORY, wait_job

SECRET_PROMPT = "Describe the zebra-violet-unicorn-4242 in one word."
ADMIN_KEY = "admin-" + "k3y" * 12  # INFERQ_ADMIN_KEY of this module's API


@dataclass
class Secure:
    url: str
    api: Proc
    db: AsyncEngine

    async def key(self, tenant: str, **limits: Any) -> str:  # limits: also admin=True
        key_id = new_key_id()
        key = new_key(key_id)
        async with self.db.begin() as conn:
            await conn.execute(
                ApiKey.__table__.insert().values(id=key_id, tenant=tenant, key_hash=hash_key(key), **limits)
            )
        return key

    def client(self, key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0))


async def _revoke_all(db: AsyncEngine) -> None:
    async with db.begin() as conn:
        await conn.execute(update(ApiKey).where(ApiKey.revoked_at.is_(None)).values(revoked_at=func.now()))


@pytest.fixture(scope="module")
def secure(stack: Stack) -> Iterator[Secure]:
    url, api = start_api(
        stack,
        INFERQ_AUTH="on",
        INFERQ_AUTH_CACHE_SECONDS="0.5",
        INFERQ_RATE_WINDOW_SECONDS="3",
        INFERQ_MAX_QUEUE_SECONDS="100000",  # the fairness test queues 500 jobs; admission is tested apart
        INFERQ_ADMIN_KEY=ADMIN_KEY,
    )
    db = create_async_engine(stack.servers.database_url, poolclass=NullPool)  # used from several loops
    try:
        yield Secure(url, api, db)
    finally:
        api.stop()
        asyncio.run(_revoke_all(db))
        asyncio.run(db.dispose())


@pytest.fixture
async def tenants(secure: Secure) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with secure.client(await secure.key("team-a")) as a, secure.client(await secure.key("team-b")) as b:
        yield a, b


def test_apikeys_are_stored_as_hashes_and_checked_by_id() -> None:
    key_id = new_key_id()
    key = new_key(key_id)
    assert re.fullmatch(r"iq_[0-9a-f]{12}_\S{40,}", key)
    assert key_id_of(key) == key_id
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest() and key not in hash_key(key)
    assert matches(key, hash_key(key)) and not matches(key + "x", hash_key(key))
    for bad in ("", "iq_", "sk-abc", "iq_zzzzzzzzzzzz_secret", "iq_0123456789ab", f"{key_id}_x"):
        assert key_id_of(bad) is None


async def test_auth_requires_a_valid_key(secure: Secure) -> None:
    async with secure.client(None) as anon:
        resp = await anon.get("/v1/jobs")
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
        assert "Authorization: Bearer" in resp.json()["error"]["message"]
        assert (await anon.get("/healthz")).status_code == 200
        assert (await anon.get("/readyz")).status_code == 200
        assert (await anon.get("/openapi.json")).status_code == 200
    forged = new_key(new_key_id())
    for key in ("not-a-key", forged, (await secure.key("team-a"))[:-2] + "xx"):
        async with secure.client(key) as bad:
            resp = await bad.post("/v1/jobs", json={"messages": FRANCE})
            assert resp.status_code == 401, key
            assert resp.json()["error"]["code"] == "invalid_api_key"
    revoked = await secure.key("team-a")
    async with secure.client(revoked) as c:
        assert (await c.get("/v1/jobs")).status_code == 200
        async with secure.db.begin() as conn:
            await conn.execute(
                update(ApiKey).where(ApiKey.id == key_id_of(revoked)).values(revoked_at=func.now())
            )
        await asyncio.sleep(0.8)  # the API trusts what it read for auth_cache_seconds
        assert (await c.get("/v1/jobs")).status_code == 401


async def test_tenant_sees_nothing_of_another_tenant(
    tenants: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    a, b = tenants
    job = (await a.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 4, "temperature": 0})).json()
    line = b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}\n'  # noqa: E501
    file = (
        await a.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(line))}, data={"purpose": "batch"})
    ).json()
    batch = (
        await a.post(
            "/v1/batches",
            json={
                "input_file_id": file["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
    ).json()
    assert (await wait_job(a, job["id"]))["status"] == "succeeded"
    for path in (
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        f"/v1/files/{file['id']}",
        f"/v1/files/{file['id']}/content",
        f"/v1/batches/{batch['id']}",
    ):
        resp = await b.get(path)
        assert resp.status_code == 404, path
        assert resp.json()["error"]["type"] == "not_found_error"
        assert (await a.get(path)).status_code == 200, path
    assert (await b.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 404
    assert (await b.delete(f"/v1/jobs/{job['id']}")).status_code == 404  # nor remove it
    assert (await b.post(f"/v1/batches/{batch['id']}/cancel")).status_code == 404
    # B cannot build a batch on A's file either.
    resp = await b.post(
        "/v1/batches",
        json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_file_id"
    for path, ident in (("/v1/jobs", job["id"]), ("/v1/files", file["id"]), ("/v1/batches", batch["id"])):
        assert ident in {x["id"] for x in (await a.get(path, params={"limit": 100})).json()["data"]}
        assert ident not in {x["id"] for x in (await b.get(path, params={"limit": 100})).json()["data"]}


async def test_workers_show_a_tenant_its_own_jobs_only_and_an_admin_everything(
    secure: Secure, tenants: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    alpha, beta = tenants
    job = (await alpha.post("/v1/jobs", json={"messages": STORY, "max_tokens": 3000})).json()
    try:
        async with (
            secure.client(await secure.key("ops", admin=True)) as admin,
            secure.client(ADMIN_KEY) as env_admin,
        ):
            # The registry is as fresh as the last heartbeat: wait until the admin view lists the job.
            deadline = time.monotonic() + 60
            while True:
                full = (await admin.get("/v1/workers")).json()
                if any(job["id"] in w["jobs"] for w in full["data"]):
                    break
                assert time.monotonic() < deadline, "no worker ever listed the running job"
                await asyncio.sleep(0.2)
            assert full["view"] == "full"
            assert all(w["host"] and w["pid"] and ":" in w["id"] for w in full["data"])
            assert (await env_admin.get("/v1/workers")).json()["view"] == "full"

            seen_by_beta = (await beta.get("/v1/workers")).json()
            seen_by_alpha = (await alpha.get("/v1/workers")).json()
        text = str(seen_by_beta)
        assert seen_by_beta["view"] == "tenant" and job["id"] not in text
        for w in seen_by_beta["data"]:
            assert w["host"] is None and w["pid"] is None and w["metrics_url"] is None
            assert w["id"].startswith("wrk_") and not any(f["id"] in text for f in full["data"])
        # The load stays visible: the job counts in `running`, it is just not named.
        assert sum(w["running"] for w in seen_by_beta["data"]) >= 1
        assert any(job["id"] in w["jobs"] for w in seen_by_alpha["data"])
    finally:
        await alpha.post(f"/v1/jobs/{job['id']}/cancel")


async def test_tenant_cannot_reach_another_tenants_response(
    tenants: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    a, b = tenants
    body = {"model": "SmolLM2-135M-Instruct", "input": "Hi", "max_output_tokens": 4, "temperature": 0}
    created = (await a.post("/v1/responses", json=body)).json()
    rid = created["id"]
    assert created["status"] in ("completed", "incomplete"), created
    for method, path in (
        ("GET", f"/v1/responses/{rid}"),
        ("GET", f"/v1/responses/{rid}?stream=true"),
        ("GET", f"/v1/responses/{rid}/input_items"),
        ("POST", f"/v1/responses/{rid}/cancel"),
        ("DELETE", f"/v1/responses/{rid}"),
    ):
        resp = await b.request(method, path)
        assert resp.status_code == 404, (method, path, resp.text)
        assert resp.json()["error"]["message"] == f"no response with id '{rid}'"
    resp = await b.post("/v1/responses", json={**body, "previous_response_id": rid})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "previous_response_id"
    assert (await a.get(f"/v1/responses/{rid}")).json()["output"][0]["content"][0]["text"]  # still A's


async def test_rate_limit_answers_429_then_lets_requests_through_after_the_window(secure: Secure) -> None:
    async with secure.client(await secure.key("team-r", rate_per_minute=3)) as c:
        # Start at the beginning of a 3 s window, so that the three requests share it.
        await asyncio.sleep(3 - time.time() % 3 + 0.05)
        remaining = []
        for _ in range(3):
            resp = await c.get("/v1/jobs")
            assert resp.status_code == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(resp.headers["x-ratelimit-remaining-requests"])
        assert remaining == ["2", "1", "0"]
        resp = await c.get("/v1/jobs")
        assert resp.status_code == 429
        assert resp.json()["error"]["type"] == "rate_limit_error"
        retry = int(resp.headers["Retry-After"])
        assert 1 <= retry <= 3
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert re.fullmatch(r"\d+s", resp.headers["x-ratelimit-reset-requests"])
        await asyncio.sleep(retry)
        assert (await c.get("/v1/jobs")).status_code == 200


async def test_token_quota_exhausted_answers_429(secure: Secure) -> None:
    async with secure.client(await secure.key("team-q", tokens_per_day=6)) as c:
        first = await c.post("/v1/jobs", json={"messages": STORY, "max_tokens": 8, "temperature": 0})
        assert first.status_code == 202
        assert first.headers["x-ratelimit-limit-tokens"] == "6"
        assert first.headers["x-ratelimit-remaining-tokens"] == "6"
        assert (await wait_job(c, first.json()["id"]))["usage"]["completion_tokens"] == 8
        resp = await c.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 4})
        assert resp.status_code == 429
        assert resp.json()["error"]["code"] == "token_quota_exceeded"
        assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
        assert int(resp.headers["Retry-After"]) <= 86_400
        chat = await c.post(
            "/v1/chat/completions",
            json={"model": "SmolLM2-135M-Instruct", "messages": FRANCE, "max_tokens": 2},
        )
        assert chat.status_code == 429


async def test_idempotency_key_replays_the_first_response(secure: Secure) -> None:
    body = {"messages": FRANCE, "max_tokens": 3, "temperature": 0, "metadata": {"n": 1}}
    headers = {"Idempotency-Key": "order-42"}
    async with (
        secure.client(await secure.key("team-i")) as c,
        secure.client(await secure.key("team-j")) as other,
    ):
        first = await c.post("/v1/jobs", json=body, headers=headers)
        again = await c.post("/v1/jobs", json=dict(reversed(body.items())), headers=headers)
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        async with secure.db.connect() as conn:
            rows = await conn.scalar(
                select(func.count()).select_from(Job).where(Job.id == first.json()["id"])
            )
            tenant_rows = await conn.scalar(
                select(func.count()).select_from(Job).where(Job.tenant == "team-i")
            )
        assert rows == 1 and tenant_rows == 1
        clash = await c.post("/v1/jobs", json={**body, "max_tokens": 4}, headers=headers)
        assert clash.status_code == 409 and clash.json()["error"]["param"] == "Idempotency-Key"
        # Keys are per tenant: the same key is new for another tenant.
        theirs = await other.post("/v1/jobs", json=body, headers=headers)
        assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
        # OpenAI routes too: the replay returns the same completion.
        chat = {"model": "SmolLM2-135M-Instruct", "messages": FRANCE, "max_tokens": 3, "temperature": 0}
        one = await c.post("/v1/chat/completions", json=chat, headers={"Idempotency-Key": "chat-1"})
        two = await c.post("/v1/chat/completions", json=chat, headers={"Idempotency-Key": "chat-1"})
        assert one.status_code == two.status_code == 200 and one.json() == two.json()
        assert one.headers["x-inferq-job-id"] == two.headers["x-inferq-job-id"]
        # A refused request does not use the key up.
        bad = await c.post("/v1/jobs", json={"messages": []}, headers={"Idempotency-Key": "fix-me"})
        good = await c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "fix-me"})
        assert bad.status_code == 400 and good.status_code == 202


async def _flood(c: httpx.AsyncClient, n: int, max_tokens: int) -> list[httpx.Response]:
    body = {"messages": STORY, "max_tokens": max_tokens}
    return list(await asyncio.gather(*(c.post("/v1/jobs", json=body) for _ in range(n))))


async def _cancel_all(c: httpx.AsyncClient, responses: list[httpx.Response]) -> None:
    ids = [r.json()["id"] for r in responses if r.status_code == 202]
    await asyncio.gather(*(c.post(f"/v1/jobs/{i}/cancel") for i in ids))


async def test_admission_control_refuses_work_past_the_queue_limit(stack: Stack, secure: Secure) -> None:
    url, api = start_api(stack, INFERQ_AUTH="off", INFERQ_MAX_QUEUE_SECONDS="5")
    responses: list[httpx.Response] = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            warm = await c.post("/v1/jobs", json={"messages": STORY, "max_tokens": 32, "temperature": 0})
            assert warm.status_code == 202, warm.text
            await wait_job(c, warm.json()["id"])
            await asyncio.sleep(1.5)  # a heartbeat carries the measured rate
            # 16 run at once; the rest queue, far more than 5 s of work at this machine's rate.
            responses = await _flood(c, 48, 100)
            codes = [r.status_code for r in responses]
            assert set(codes) <= {202, 429} and codes.count(202) >= 16, codes
            refused = [r for r in responses if r.status_code == 429]
            assert refused, "the backlog never went over the limit"
            assert refused[0].json()["error"]["code"] == "queue_full"
            assert int(refused[0].headers["Retry-After"]) >= 1
            await _cancel_all(c, responses)
    finally:
        api.stop()


async def test_queued_job_shows_its_position_and_eta(secure: Secure) -> None:
    async with secure.client(await secure.key("team-p")) as c:
        responses = await _flood(c, 40, 100)
        try:
            assert all(r.status_code == 202 for r in responses)
            await asyncio.sleep(1)
            waiting = (await c.get("/v1/jobs", params={"status": "queued", "limit": 100})).json()["data"]
            assert len(waiting) >= 10
            queued = [(await c.get(f"/v1/jobs/{j['id']}")).json() for j in reversed(waiting[:10])]
            positions = [j["queue_position"] for j in queued if j["status"] == "queued"]
            etas = [j["eta_seconds"] for j in queued if j["status"] == "queued"]
            assert (
                positions == sorted(positions) and len(set(positions)) == len(positions) and positions[0] >= 1
            )
            assert etas == sorted(etas) and etas[-1] > 0
        finally:
            await _cancel_all(c, responses)


async def test_fairness_one_tenants_backlog_does_not_starve_another(secure: Secure) -> None:
    async with (
        secure.client(await secure.key("team-big")) as big,
        secure.client(await secure.key("team-one")) as one,
    ):
        sem = asyncio.Semaphore(16)

        async def post() -> str:
            async with sem:
                resp = await big.post(
                    "/v1/jobs", json={"messages": FRANCE, "max_tokens": 1, "temperature": 0}
                )
                assert resp.status_code == 202, resp.text
                return str(resp.json()["id"])

        flood = await asyncio.gather(*(post() for _ in range(500)))
        single = (await one.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 1})).json()["id"]
        async with secure.db.connect() as conn:
            waiting = await conn.scalar(
                select(func.count()).select_from(Job).where(Job.id.in_(flood), Job.started_at.is_(None))
            )
        assert waiting is not None and waiting >= 200, "the flood should still be queued"
        mine = await wait_job(one, single, timeout=120)
        assert mine["status"] == "succeeded"
        started = datetime.fromisoformat(mine["started_at"])
        async with secure.db.connect() as conn:
            after = await conn.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.id.in_(flood), (Job.started_at.is_(None)) | (Job.started_at > started))
            )
        # At most the jobs already being admitted when the single job arrived may go before it.
        assert after is not None and after >= waiting - 32, f"{after} of {waiting} waiting started after it"
        async with secure.db.begin() as conn:  # leave no backlog behind for the next tests
            await conn.execute(
                text(
                    "UPDATE jobs SET status = 'cancelled', finished_at = now() "
                    "WHERE status = 'queued' AND tenant = 'team-big'"
                )
            )


async def test_logs_hold_no_key_and_no_prompt(secure: Secure, stack: Stack) -> None:
    key = await secure.key("team-log")
    async with secure.client(key) as c:
        job = (
            await c.post(
                "/v1/jobs", json={"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 4}
            )
        ).json()
        await wait_job(c, job["id"])
        stream = await c.post(
            "/v1/chat/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": SECRET_PROMPT}],
                "max_tokens": 2,
            },
        )
        assert stream.status_code == 200
    await asyncio.sleep(0.5)
    for log in (secure.api.log, stack.worker.log):
        assert log is not None
        content = Path(log).read_text(errors="replace")
        assert job["id"] in content or log == secure.api.log
        assert "zebra-violet-unicorn" not in content, log
        assert key not in content and key.split("_", 2)[-1] not in content, log
