"""Webhooks as a receiver meets them: a job's own webhook and a tenant's endpoints (managed with the
official `openai` SDK), every delivery verified with the `standardwebhooks` package and OpenAI-shape
events unwrapped by `client.webhooks.unwrap()`; retries through refused connections, 503 with
Retry-After and 410; the SSRF guard. Receivers listen on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from standardwebhooks import Webhook

from api.webhooks import ssrf
from shared.settings import Settings, WebhookSettings
from tests.conftest import REPO, Stack, _free_port, start_api
from tests.helpers import FRANCE, wait_job

MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: str

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """An HTTP receiver on loopback: records every POST and answers from `answers` (then 200)."""

    port: int = field(default_factory=_free_port)
    got: list[Delivery] = field(default_factory=list)
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                receiver.got.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    async def wait(self, n: int, timeout: float = 60) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            assert time.monotonic() < deadline, f"{len(self.got)} of {n} deliveries arrived: {self.got}"
            await asyncio.sleep(0.05)
        return self.got


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


@pytest.fixture
async def oai(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    await client.close()


@pytest.fixture
async def endpoints(oai: AsyncOpenAI) -> AsyncIterator[list[str]]:
    made: list[str] = []
    yield made
    for endpoint_id in made:
        await oai.webhooks.delete(endpoint_id)


async def _tenant_secret(client: httpx.AsyncClient) -> str:
    resp = await client.post("/v1/webhook_secret")
    assert resp.status_code in (200, 201), resp.text  # 201: made now; 200: the tenant's, unchanged
    secret: str = resp.json()["secret"]
    assert secret.startswith("whsec_")
    return secret


async def test_webhooks_job_webhook_start_and_completed_signed_per_standard_webhooks(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    secret = await _tenant_secret(client)
    body = {"messages": FRANCE, "max_tokens": 16, "temperature": 0, "webhook": receiver.url}
    job = (
        await client.post("/v1/jobs", json={**body, "webhook_events_filter": ["start", "completed"]})
    ).json()
    got = await receiver.wait(2)
    assert [d.payload["type"] for d in got] == ["start", "completed"]
    for delivery in got:
        verified = Webhook(secret).verify(delivery.body, delivery.headers)  # raises if not signed by it
        assert verified["id"] == job["id"]
    done = got[1].payload
    assert done["status"] == "succeeded" and "Paris" in done["output"] and done["usage"]["total_tokens"] > 0
    assert len({d.headers["webhook-id"] for d in got}) == 2

    shown = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert [(w["event_type"], w["status"]) for w in shown["webhooks"]] == [
        ("start", "delivered"),
        ("completed", "delivered"),
    ]
    assert {w["id"] for w in shown["webhooks"]} == {d.headers["webhook-id"] for d in got}

    # The default filter is `completed` only.
    other = (await client.post("/v1/jobs", json=body)).json()
    await wait_job(client, other["id"])
    (third,) = (await receiver.wait(3))[2:]
    assert third.payload["type"] == "completed" and third.payload["id"] == other["id"]


def _secret_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq.cli", "webhooks", "secret", *args],
        cwd=REPO,
        env={**stack.api.env, "INFERQ_URL": stack.base_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_webhooks_tenant_secret_is_shown_again_and_rotated_only_when_asked(
    stack: Stack, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    first, again = [await asyncio.to_thread(_secret_cli, stack) for _ in range(2)]
    assert first.returncode == 0 and again.returncode == 0, (first.stderr, again.stderr)
    secret = first.stdout.strip()
    assert secret.startswith("whsec_") and again.stdout.strip() == secret  # asking again changes nothing
    shown = await client.get("/v1/webhook_secret")
    assert shown.status_code == 200 and shown.json()["secret"] == secret, shown.text
    posted = await client.post("/v1/webhook_secret")
    assert posted.status_code == 200 and posted.json()["secret"] == secret, posted.text

    rotated = await asyncio.to_thread(_secret_cli, stack, "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("whsec_") and new != secret and "old one too until" in rotated.stderr
    now = (await client.get("/v1/webhook_secret")).json()
    assert now["secret"] == new and now["previous_valid_until"] > time.time(), now
    assert (await asyncio.to_thread(_secret_cli, stack)).stdout.strip() == new
    # For a while both sign, so a receiver that still has the old one keeps working.
    body = {"messages": FRANCE, "max_tokens": 2, "webhook": receiver.url}
    assert (await client.post("/v1/jobs", json=body)).status_code == 202
    (delivery,) = await receiver.wait(1)
    for key in (secret, new):
        Webhook(key).verify(delivery.body, delivery.headers)


async def test_webhooks_endpoints_managed_by_the_sdk_receive_openai_events_unwrapped_by_it(
    oai: AsyncOpenAI, client: httpx.AsyncClient, receiver: Receiver, endpoints: list[str]
) -> None:
    made = await oai.webhooks.create(
        url=receiver.url,
        event_types=["response.completed", "response.incomplete", "batch.completed"],
        name="test receiver",
    )
    endpoints.append(made.id)
    assert made.signing_secret.startswith("whsec_") and made.name == "test receiver"
    listed = [e.id async for e in oai.webhooks.list()]
    assert made.id in listed
    fetched = await oai.webhooks.retrieve(made.id)
    assert fetched.url == receiver.url and not getattr(fetched, "signing_secret", None)  # shown once

    response = await oai.responses.create(model=MODEL, input=FRANCE[0]["content"], max_output_tokens=64)
    (delivery,) = await receiver.wait(1)
    event = oai.webhooks.unwrap(delivery.body, delivery.headers, secret=made.signing_secret)
    assert event.type == f"response.{response.status}" and event.data.id == response.id
    Webhook(made.signing_secret).verify(delivery.body, delivery.headers)

    # Rotation: for a while both secrets sign, so a receiver that still has the old one keeps working.
    rotated = await oai.webhooks.rotate_secret(made.id)
    assert rotated.signing_secret != made.signing_secret
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
    line["body"] = {"model": MODEL, "messages": FRANCE, "max_tokens": 4}  # type: ignore[assignment]
    upload = await client.post(
        "/v1/files",
        files={"file": ("in.jsonl", io.BytesIO(json.dumps(line).encode()))},
        data={"purpose": "batch"},
    )
    batch = (
        await client.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
    ).json()
    second = (await receiver.wait(2, timeout=120))[1]
    assert len(second.headers["webhook-signature"].split()) == 2
    for secret in (made.signing_secret, rotated.signing_secret):
        event = oai.webhooks.unwrap(second.body, second.headers, secret=secret)
        assert event.type == "batch.completed" and event.data.id == batch["id"]

    deliveries = (await client.get(f"/v1/webhook_endpoints/{made.id}/deliveries")).json()["data"]
    assert [(d["event_type"], d["status"], d["attempts"]) for d in deliveries] == [
        ("batch.completed", "delivered", 1),
        (f"response.{response.status}", "delivered", 1),
    ]


async def test_webhooks_retried_through_refusals_and_503_with_the_same_webhook_id(
    client: httpx.AsyncClient, endpoints: list[str], oai: AsyncOpenAI
) -> None:
    receiver = Receiver()  # not listening yet: connections are refused
    made = await oai.webhooks.create(url=receiver.url, event_types=["job.completed"], name="flaky")
    endpoints.append(made.id)
    job = (await client.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 4})).json()
    await wait_job(client, job["id"])
    await asyncio.sleep(20)
    receiver.answers = [(503, {"Retry-After": "2"})]
    receiver.start()
    try:
        got = await receiver.wait(2, timeout=60)
    finally:
        receiver.stop()
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"]
    assert got[0].headers["webhook-timestamp"] <= got[1].headers["webhook-timestamp"]
    for delivery in got:
        event = oai.webhooks.unwrap(delivery.body, delivery.headers, secret=made.signing_secret)
        assert event.type == "job.completed"  # type: ignore[comparison-overlap]
        assert event.data.id == job["id"]
    (row,) = (await client.get(f"/v1/webhook_endpoints/{made.id}/deliveries")).json()["data"]
    assert row["status"] == "delivered" and row["attempts"] >= 4, row  # refused, refused…, 503, 200
    metrics = (await client.get("/metrics")).text
    assert 'inferq:webhook_deliveries_total{outcome="retried"}' in metrics


async def test_webhooks_410_disables_the_endpoint(
    client: httpx.AsyncClient, receiver: Receiver, endpoints: list[str], oai: AsyncOpenAI
) -> None:
    made = await oai.webhooks.create(url=receiver.url, event_types=["job.completed"], name="gone")
    endpoints.append(made.id)
    receiver.answers = [(410, {})]
    job = (await client.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 4})).json()
    await receiver.wait(1)
    deadline = time.monotonic() + 10
    while (shown := (await client.get(f"/v1/webhook_endpoints/{made.id}")).json())["status"] != "disabled":
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.1)
    assert "410" in shown["disabled_reason"]
    (row,) = (await client.get(f"/v1/webhook_endpoints/{made.id}/deliveries")).json()["data"]
    assert row["status"] == "failed" and row["subject_id"] == job["id"]
    # Disabled: later events are not queued for it; enabled again, they are.
    await wait_job(
        client, (await client.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 2})).json()["id"]
    )
    assert len((await client.get(f"/v1/webhook_endpoints/{made.id}/deliveries")).json()["data"]) == 1
    assert (await client.post(f"/v1/webhook_endpoints/{made.id}", json={"enabled": True})).json()[
        "status"
    ] == "enabled"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost:9/hook", "loopback"),  # a name that resolves to loopback
        ("http://10.0.0.1/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[::1]:9/hook", "loopback"),
        ("ftp://example.com/x", "http:// or https://"),
    ],
)
def test_webhooks_ssrf_guard_refuses_before_any_connection(url: str, why: str) -> None:
    """No connection is made: addresses are checked (names resolved, from /etc/hosts here) first."""
    with pytest.raises(ssrf.UnsafeUrl, match=why):
        asyncio.run(ssrf.target(url, WebhookSettings(allow_private=False)))


@pytest.fixture(scope="module")
def guarded(stack: Stack) -> Iterator[str]:
    """An API that allows no private receivers and sends nothing itself (the check is at submit)."""
    url, api = start_api(stack, INFERQ_WEBHOOKS__ALLOW_PRIVATE="false", INFERQ_WEBHOOKS__DISPATCH="false")
    try:
        yield url
    finally:
        api.stop()


async def test_webhooks_ssrf_refusals_are_400s_naming_the_field(
    guarded: str, client: httpx.AsyncClient
) -> None:
    await _tenant_secret(client)
    async with httpx.AsyncClient(base_url=guarded, timeout=30) as api:
        for url in (
            "http://127.0.0.1:9/",
            "http://localhost:9/",
            "http://10.0.0.1/",
            "http://169.254.169.254/",
        ):
            resp = await api.post("/v1/jobs", json={"messages": FRANCE, "webhook": url})
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert (
                error["param"] == "webhook"
                and error["code"] == "unsafe_url"
                and "refused" in error["message"]
            )
            resp = await api.post(
                "/v1/webhook_endpoints", json={"url": url, "event_types": ["job.completed"]}
            )
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "url", resp.text
    # Metadata addresses stay refused where private receivers are allowed; and this session allows
    # only loopback (tests/conftest.py), so a public address is refused too, before any connection.
    resp = await client.post("/v1/jobs", json={"messages": FRANCE, "webhook": "http://93.184.215.14/"})
    assert resp.status_code == 400 and "allow_only" in resp.json()["error"]["message"]
    resp = await client.post("/v1/jobs", json={"messages": FRANCE, "webhook": "http://169.254.169.254/"})
    assert resp.status_code == 400 and "metadata" in resp.json()["error"]["message"]


# Every spelling of a refused address, and what its refusal says (allow_private off): IPv4 in the
# forms inet_aton reads, and IPv6 forms judged as the IPv4 address they carry.
HINT = " (set INFERQ_WEBHOOKS__ALLOW_PRIVATE=true to allow private receivers)"
LOOPBACK = "127.0.0.1 is a loopback address" + HINT
REFUSED_SPELLINGS = [
    ("http://[::ffff:127.0.0.1]:9/", "::ffff:7f00:1 carries 127.0.0.1, a loopback address" + HINT),
    ("http://[::ffff:7f00:1]:9/", "::ffff:7f00:1 carries 127.0.0.1, a loopback address" + HINT),
    ("http://[::FFFF:7F00:1]/", "::ffff:7f00:1 carries 127.0.0.1, a loopback address" + HINT),
    ("http://[::ffff:10.0.0.1]/", "::ffff:a00:1 carries 10.0.0.1, a private address" + HINT),
    (
        "http://[::ffff:169.254.169.254]/",
        "::ffff:a9fe:a9fe carries 169.254.169.254, a cloud metadata address",
    ),
    ("http://[::ffff:169.254.1.1]/", "::ffff:a9fe:101 carries 169.254.1.1, a link-local address"),
    ("http://[::ffff:0.0.0.0]/", "::ffff:0:0 carries 0.0.0.0, an unspecified address"),
    ("http://[::127.0.0.1]/", "::7f00:1 carries 127.0.0.1, a loopback address" + HINT),  # IPv4-compatible
    ("http://[::10.0.0.1]/", "::a00:1 carries 10.0.0.1, a private address" + HINT),
    ("http://[64:ff9b::7f00:1]/", "64:ff9b::7f00:1 carries 127.0.0.1, a loopback address" + HINT),  # NAT64
    ("http://[64:ff9b::a00:1]/", "64:ff9b::a00:1 carries 10.0.0.1, a private address" + HINT),
    ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::a9fe:a9fe carries 169.254.169.254, a cloud metadata address"),
    ("http://[64:ff9b:1::a00:1]/", "64:ff9b:1::a00:1 is a private address" + HINT),  # local-use NAT64
    (
        "http://[64:ff9b:1:a9fe:a9:fe00::]/",
        "64:ff9b:1:a9fe:a9:fe00:: carries 169.254.169.254, a cloud metadata address",
    ),
    ("http://[2002:7f00:1::]/", "2002:7f00:1:: carries 127.0.0.1, a loopback address" + HINT),  # 6to4
    ("http://[2002:a9fe:a9fe::1]/", "2002:a9fe:a9fe::1 carries 169.254.169.254, a cloud metadata address"),
    # Teredo: server 8.8.8.8, client 127.0.0.1 (stored inverted); then server 169.254.169.254.
    (
        "http://[2001:0:808:808::80ff:fffe]/",
        "2001:0:808:808::80ff:fffe carries 127.0.0.1, a loopback address" + HINT,
    ),
    (
        "http://[2001:0:a9fe:a9fe::f7f7:f7f7]/",
        "2001:0:a9fe:a9fe::f7f7:f7f7 carries 169.254.169.254, a cloud metadata address",
    ),
    ("http://[::]:9/", ":: is an unspecified address"),
    ("http://0.0.0.0:9/", "0.0.0.0 is an unspecified address"),
    ("http://[::1]/", "::1 is a loopback address" + HINT),
    ("http://[fd00:ec2::254]/", "fd00:ec2::254 is a cloud metadata address"),
    ("http://[fe80::1%25eth0]/", "fe80::1 is a link-local address"),
    ("http://2130706433/", LOOPBACK),  # decimal
    ("http://0177.0.0.1/", LOOPBACK),  # octal
    ("http://0x7f.0.0.1/", LOOPBACK),  # hex
    ("http://0X7F.0.0.1/", LOOPBACK),
    ("http://0x7f000001/", LOOPBACK),
    ("http://127.1/", LOOPBACK),  # short
    ("http://127.0.0.1./", LOOPBACK),  # a trailing dot
    ("http://0xa9.0376.0xa9fe/", "169.254.169.254 is a cloud metadata address"),
    ("http://012.1/", "10.0.0.1 is a private address" + HINT),
    ("http://224.0.0.1/", "224.0.0.1 is a multicast address"),
    ("http://100.64.0.1/", "100.64.0.1 is a reserved address"),  # carrier-grade NAT
    ("http://localhost./", "localhost. is a loopback name" + HINT),
    ("http://LOCALHOST/", "localhost is a loopback name" + HINT),
    ("http://api.localhost/", "api.localhost is a loopback name" + HINT),
    # Numbers that are no IPv4 address: refused rather than left to a resolver to read.
    ("http://1.2.3.256/", "1.2.3.256 is not a valid IPv4 address"),
    ("http://4294967296/", "4294967296 is not a valid IPv4 address"),
    ("http://1.2.3.4.5/", "1.2.3.4.5 is not a valid IPv4 address"),
]


@pytest.mark.parametrize(("url", "message"), REFUSED_SPELLINGS)
def test_webhooks_ssrf_guard_refuses_every_spelling_at_delivery(url: str, message: str) -> None:
    """`target()` is what the dispatcher calls before each try: no address, no connection."""
    with pytest.raises(ssrf.UnsafeUrl) as refused:
        asyncio.run(ssrf.target(url, WebhookSettings(allow_private=False)))
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://[::ffff:8.8.8.8]/", "::ffff:808:808"),  # judged as 8.8.8.8: not all IPv6 is refused
        ("http://[64:ff9b::808:808]/", "64:ff9b::808:808"),
        ("http://[2002:808:808::1]/", "2002:808:808::1"),
        ("http://[2001:0:808:808::f7f7:f7f7]/", "2001:0:808:808::f7f7:f7f7"),  # Teredo, both ends public
        ("http://0x08080808/", "8.8.8.8"),
        ("http://010.0.0.1/", "8.0.0.1"),  # octal, as inet_aton and so the resolver read it: not 10.0.0.1
        ("http://8.8.8.8./", "8.8.8.8"),
    ],
)
def test_webhooks_ssrf_guard_judges_public_addresses_in_any_spelling_as_public(
    url: str, address: str
) -> None:
    got = asyncio.run(ssrf.target(url, WebhookSettings(allow_private=False)))
    assert got.address == address  # the very address delivery connects to


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0X7F.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("example.com", None),
        ("example.com.", None),
        ("1.2.3.4x", None),  # a name, however odd: the resolver's answer is what gets checked
    ],
)
def test_webhooks_ssrf_ip_literals_are_read_here_not_by_the_resolver(host: str, address: str | None) -> None:
    assert ssrf.ip_literal(host) == address


def test_webhooks_ssrf_allow_private_judges_the_ipv4_an_address_carries() -> None:
    policy = WebhookSettings(allow_private=True)
    for url in (
        "http://[::ffff:127.0.0.1]/",
        "http://[64:ff9b::a00:1]/",
        "http://[2002:7f00:1::]/",
        "http://[64:ff9b:1::a00:1]/",
        "http://0x7f000001/",
    ):
        asyncio.run(ssrf.target(url, policy))  # allowed: what they carry would be
    for url, message in REFUSED_SPELLINGS:
        if not message.endswith(HINT) and "not a valid" not in message:  # never allowed
            with pytest.raises(ssrf.UnsafeUrl) as refused:
                asyncio.run(ssrf.target(url, policy))
            assert str(refused.value) == message
    # allow_only is met by an address as written or by every IPv4 address it carries.
    policy = WebhookSettings(allow_private=True, allow_only=["127.0.0.0/8"])
    assert asyncio.run(ssrf.target("http://[::ffff:127.0.0.1]/", policy)).address == "::ffff:7f00:1"
    with pytest.raises(ssrf.UnsafeUrl, match=r"^::ffff:a00:1 is outside webhooks.allow_only$"):
        asyncio.run(ssrf.target("http://[::ffff:10.0.0.1]/", policy))


def test_webhooks_ssrf_hint_names_the_setting_that_allows_private_receivers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, value = HINT.removeprefix(" (set ").split(" ")[0].split("=")
    monkeypatch.delenv(name, raising=False)
    assert Settings().webhooks.allow_private is False
    monkeypatch.setenv(name, value)
    assert Settings().webhooks.allow_private is True


async def test_webhooks_ssrf_every_spelling_refused_at_submit(
    guarded: str, client: httpx.AsyncClient
) -> None:
    """Through the API that allows no private receivers: a job's webhook, a new endpoint and a
    changed endpoint URL, each a 400 `unsafe_url` that says why."""
    await _tenant_secret(client)
    made = await client.post(
        "/v1/webhook_endpoints", json={"url": "http://127.0.0.1:9/", "event_types": ["batch.failed"]}
    )
    assert made.status_code == 200, made.text
    endpoint = made.json()["id"]
    try:
        async with httpx.AsyncClient(base_url=guarded, timeout=30) as api:
            for url, message in REFUSED_SPELLINGS:
                for path, body, param in (
                    ("/v1/jobs", {"messages": FRANCE, "webhook": url}, "webhook"),
                    ("/v1/webhook_endpoints", {"url": url, "event_types": ["job.completed"]}, "url"),
                    (f"/v1/webhook_endpoints/{endpoint}", {"url": url}, "url"),
                ):
                    resp = await api.post(path, json=body)
                    assert resp.status_code == 400, (path, url, resp.text)
                    assert resp.json()["error"] == {
                        **resp.json()["error"],
                        "param": param,
                        "code": "unsafe_url",
                        "message": f"{param} is refused: {message}",
                    }
            # A public address in IPv4-mapped form is judged as public: only this session's
            # allow_only (loopback) stands in its way.
            resp = await api.post(
                "/v1/jobs", json={"messages": FRANCE, "webhook": "http://[::ffff:8.8.8.8]/"}
            )
            assert resp.status_code == 400
            assert (
                resp.json()["error"]["message"]
                == "webhook is refused: ::ffff:808:808 is outside webhooks.allow_only"
            )
    finally:
        assert (await client.delete(f"/v1/webhook_endpoints/{endpoint}")).status_code == 200


async def test_webhooks_ssrf_mapped_loopback_receiver_is_judged_as_loopback_and_delivered_to(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """Where loopback receivers are allowed (this session, allow_only 127.0.0.0/8), one written in
    IPv4-mapped form is one: accepted, and delivered to at the address the guard checked."""
    await _tenant_secret(client)
    url = f"http://[::ffff:127.0.0.1]:{receiver.port}/hook"
    job = (await client.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 2, "webhook": url})).json()
    (delivery,) = await receiver.wait(1)
    assert (
        delivery.payload["id"] == job["id"]
        and delivery.headers["host"] == f"[::ffff:127.0.0.1]:{receiver.port}"
    )


async def test_webhooks_ssrf_dispatcher_refuses_a_stored_url_without_connecting(
    stack: Stack, client: httpx.AsyncClient, receiver: Receiver, oai: AsyncOpenAI, endpoints: list[str]
) -> None:
    """A URL stored before the guard refused its spelling (written here straight into the table) is
    refused at delivery: 0.0.0.0 would reach this loopback receiver, and nothing arrives."""
    urls = {
        f"http://0.0.0.0:{receiver.port}/hook": "0.0.0.0 is an unspecified address",
        f"http://[::ffff:0.0.0.0]:{receiver.port}/hook": "::ffff:0:0 carries 0.0.0.0, an unspecified address",
    }
    made: dict[str, str] = {}
    engine = create_async_engine(stack.servers.database_url)
    try:
        for url, message in urls.items():
            endpoint = await oai.webhooks.create(url=receiver.url, event_types=["job.completed"], name=url)
            endpoints.append(endpoint.id)
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE webhook_endpoints SET url = :url WHERE id = :id"),
                    {"url": url, "id": endpoint.id},
                )
            made[endpoint.id] = message
    finally:
        await engine.dispose()
    job = (await client.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 2})).json()
    await wait_job(client, job["id"])
    for endpoint_id, message in made.items():
        deadline = time.monotonic() + 30
        while not (
            rows := (await client.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries")).json()["data"]
        ) or (rows[0]["status"] == "pending"):
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.1)
        (row,) = rows
        assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 1, f"refused: {message}")
    assert receiver.got == []


async def test_webhooks_bad_requests(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/webhook_endpoints", json={"url": "http://127.0.0.1:9/", "event_types": ["job.exploded"]}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "event_types"
    assert "unknown event type 'job.exploded'" in resp.json()["error"]["message"]
    resp = await client.post(
        "/v1/jobs",
        json={"messages": FRANCE, "webhook": "http://127.0.0.1:9/", "webhook_events_filter": ["logs"]},
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"].startswith("webhook_events_filter")
    assert (await client.get("/v1/webhook_endpoints/we_nope")).status_code == 404


async def test_webhooks_readme_commands_run_as_written(stack: Stack, receiver: Receiver) -> None:
    """The README's Webhooks block, with this stack's URL and a loopback receiver for example.com."""
    from tests.test_journey import _blocks, _commands

    commands = _commands(_blocks("Webhooks", "bash")[0])
    assert [c.split()[2] for c in commands if c.startswith(".venv/bin/inferq")] == [
        "secret",
        "create",
        "list",
        "deliveries",
        "rotate",
        "delete",
    ]
    env = {**stack.api.env, "INFERQ_URL": stack.base_url}
    endpoint = secret = job_id = None
    for command in commands:
        command = command.replace("https://example.com/hook", receiver.url)
        command = command.replace("localhost:8000", stack.base_url.removeprefix("http://"))
        if endpoint is not None:
            command = command.replace("ENDPOINT_ID", endpoint)
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        out = done.stdout.split()
        if " webhooks secret" in command:
            secret = out[0]
        elif command.startswith("curl"):
            job_id = json.loads(done.stdout)["id"]
            got = await receiver.wait(2)  # start, completed
            assert [Webhook(str(secret)).verify(d.body, d.headers)["type"] for d in got] == [
                "start",
                "completed",
            ]
        elif " webhooks create" in command:
            endpoint, endpoint_secret = out[0], out[1]
            assert endpoint.startswith("we_") and endpoint_secret.startswith("whsec_")
            job = (
                await asyncio.to_thread(
                    httpx.post, f"{stack.base_url}/v1/jobs", json={"messages": FRANCE, "max_tokens": 2}
                )
            ).json()
            (third,) = (await receiver.wait(3))[2:]
            assert Webhook(endpoint_secret).verify(third.body, third.headers)["data"]["id"] == job["id"]
        elif " webhooks list" in command:
            assert endpoint in done.stdout and "enabled" in done.stdout
        elif " webhooks deliveries" in command:
            assert "job.completed" in done.stdout and "delivered" in done.stdout
        elif " webhooks rotate" in command:
            assert out[0].startswith("whsec_")
        elif " webhooks delete" in command:
            assert f"deleted {endpoint}" in done.stdout
    assert job_id is not None


async def test_webhooks_output_events_are_throttled_and_never_retried(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await _tenant_secret(client)
    receiver.answers = [(500, {})]  # the first output delivery fails: it is not tried again
    body = {
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
        "temperature": 0,
        "max_tokens": 160,
        "webhook": receiver.url,
        "webhook_events_filter": ["output", "completed"],
    }
    job = (await client.post("/v1/jobs", json=body)).json()
    done = await wait_job(client, job["id"])
    deadline = time.monotonic() + 30
    while not any(d.payload["type"] == "completed" for d in receiver.got):
        assert time.monotonic() < deadline, receiver.got
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.5)  # two retry intervals of the test schedule: a retried delivery would be back
    outputs = [d.payload for d in receiver.got if d.payload["type"] == "output"]
    running = (
        datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])
    ).total_seconds()
    # Throttled: one per 0.5 s of generation at most, and there were some.
    assert 2 <= len(outputs) <= running / 0.5 + 2, (len(outputs), running)
    lengths = [len(o["output"]) for o in outputs]
    assert lengths == sorted(lengths) and lengths[0] > 0
    for o in outputs:  # each the job as it stood, its text so far a prefix of the final output
        assert o["id"] == job["id"] and done["output"].startswith(o["output"])
    assert len({d.headers["webhook-id"] for d in receiver.got}) == len(receiver.got)  # none sent twice
    completed = [d for d in receiver.got if d.payload["type"] == "completed"]
    assert len(completed) == 1 and completed[0].payload["output"] == done["output"]
    shown = (await client.get(f"/v1/jobs/{job['id']}")).json()["webhooks"]
    tried = [(w["event_type"], w["status"], w["attempts"]) for w in shown if w["event_type"] == "output"]
    assert tried[0] == ("output", "failed", 1) and all(t[2] == 1 for t in tried), tried
