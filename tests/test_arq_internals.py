"""The parts of arq that are not its public API and that inferq relies on, checked for their shape so that
an arq upgrade fails here, by name, instead of somewhere inside a running worker.

pyproject.toml pins arq to the minor version these were read from; raising the pin means reading
arq/worker.py again against this list.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import secrets
from collections.abc import Callable
from typing import Any

import arq.connections
import arq.constants
import arq.jobs
import arq.worker
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

from shared import keys
from tests.conftest import Servers

WORKER = "worker/main.py (InferqWorker)"

# Methods of arq.worker.Worker that InferqWorker overrides or calls: parameters after self, whether async.
METHODS: dict[str, tuple[list[str], bool, str]] = {
    "_poll_iteration": (
        [],
        True,
        "overrides it (wake-ups, busy polling) and calls it on itself and the batch lane",
    ),
    "handle_sig": (["signum"], False, "overrides it to cancel the batch lane's jobs"),
    "handle_sig_wait_for_completion": (["signum"], False, "overrides it to drain both lanes"),
    "close": ([], True, "overrides it so that an unreachable Redis still runs on_shutdown"),
    "start_jobs": (
        ["job_ids"],
        True,
        "overrides it: worker/queue_claims.py",
    ),
    "run_job": (["job_id", "score"], True, "runs each job its claim took"),
    "_release_sem_dec_counter_on_complete": ([], False, "frees a claimed job's slot when it ends"),
}

# Attributes Worker.__init__ sets that InferqWorker reads or writes, and their types.
ATTRIBUTES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "job_counter": (int, "counts the running jobs of each lane to size the batch lane"),
    "sem": (asyncio.Semaphore, "takes a slot for each job its claim took"),
    "in_progress_timeout_s": ((int, float), "sets a claimed job's in-progress key for this long"),
    "queue_name": (str, "claims the jobs of this queue"),
    "max_jobs": (int, "resizes the batch lane before each poll"),
    "allow_pick_jobs": (bool, "gates the batch lane and stops both lanes on drain"),
    "tasks": (dict, "awaits and cancels the held jobs of both lanes"),
    "functions": (dict, "gives the batch lane the same job functions"),
    "ctx": (dict, "shares its context (the wake event) with the batch lane"),
    "job_timeout_s": ((int, float), "gives the batch lane the same job timeout"),
    "health_check_interval": ((int, float), "gives the batch lane the same health-check interval"),
    "health_check_key": (str, "deletes it in close()"),
    "_job_completion_wait": (int, "bounds the drain by it"),
    "loop": (asyncio.AbstractEventLoop, "schedules the drain on it"),
    "_pool": (type(None), "tells from it whether close() has already run"),
    "on_shutdown": (type(None), "calls it from its own close()"),
}

# Constructor parameters that build_worker and the batch lane pass.
INIT_PARAMETERS = [
    "functions", "queue_name", "redis_settings", "redis_pool", "max_jobs", "poll_delay", "job_timeout",
    "keep_result", "on_startup", "on_shutdown", "ctx", "burst", "handle_signals", "job_completion_wait",
    "health_check_interval",
]  # fmt: skip

# Behaviour read from arq's source: (method, code that must appear in it, why inferq needs it).
SOURCE: list[tuple[Callable[..., Any], str, str]] = [
    (
        Worker.start_jobs,
        "pipe.psetex(in_progress_key, int(self.in_progress_timeout_s * 1000), b'1')",
        "worker/queue_claims.py claims a job as arq does: its in-progress key, for in_progress_timeout_s",
    ),
    (
        Worker.start_jobs,
        "if ongoing_exists or not score or score > timestamp_ms():",
        "worker/queue_claims.py leaves a job as arq does: held elsewhere, gone, or deferred",
    ),
    (
        Worker.start_jobs,
        "in_progress_key = in_progress_key_prefix + job_id",
        "worker/queue_claims.py names a job's in-progress key as arq does",
    ),
    (
        Worker._poll_iteration,
        "if self.allow_pick_jobs:",
        "the batch lane picks jobs only while allow_pick_jobs is set",
    ),
    (Worker.main, "await self._poll_iteration()", "the overridden _poll_iteration drives the poll loop"),
    (Worker.run, "self.close()", "the overridden close() runs at the end of run()"),
    (
        Worker.__init__,
        "self.handle_sig_wait_for_completion",
        "SIGTERM with job_completion_wait reaches the drain override",
    ),
]


def test_arq_worker_methods_keep_their_signatures() -> None:
    for name, (parameters, is_async, why) in METHODS.items():
        where = f"{WORKER} {why}: arq.worker.Worker.{name}"
        method = getattr(Worker, name, None)
        assert callable(method), f"{where} is gone"
        assert list(inspect.signature(method).parameters)[1:] == parameters, (
            f"{where} now takes {inspect.signature(method)}, not (self, {', '.join(parameters)})"
        )
        assert inspect.iscoroutinefunction(method) == is_async, (
            f"{where} is no longer {'async' if is_async else 'sync'}"
        )
    assert isinstance(inspect.getattr_static(Worker, "pool"), property), (
        f"{WORKER} reads Worker.pool, no longer a property"
    )
    accepted = inspect.signature(Worker.__init__).parameters
    missing = [p for p in INIT_PARAMETERS if p not in accepted]
    assert not missing, f"{WORKER} builds its workers with {missing}, which arq.worker.Worker no longer takes"


def test_arq_worker_reads_what_inferq_sets_at_call_time() -> None:
    for method, code, why in SOURCE:
        assert code in inspect.getsource(method), (
            f"{WORKER} relies on {method.__qualname__} containing {code!r} ({why}); arq changed it"
        )


async def test_arq_worker_sets_the_attributes_inferq_uses(servers: Servers) -> None:
    async def noop(ctx: dict[str, Any]) -> None:
        pass

    worker = Worker(
        functions=[noop],
        queue_name=f"test:arq-shape:{secrets.token_hex(4)}",
        redis_settings=RedisSettings.from_dsn(servers.redis_url),
        burst=True,
        handle_signals=False,
    )
    for name, (kind, why) in ATTRIBUTES.items():
        where = f"{WORKER} {why}: arq.worker.Worker().{name}"
        assert hasattr(worker, name), f"{where} is no longer set by Worker.__init__"
        assert isinstance(getattr(worker, name), kind), (
            f"{where} is now {type(getattr(worker, name)).__name__}"
        )
    assert all(isinstance(f, arq.worker.Function) for f in worker.functions.values()), (
        f"{WORKER} passes Worker.functions' values (arq.worker.Function) to the batch lane; they changed type"
    )


async def test_arq_worker_runs_both_lanes_of_the_inferq_worker(servers: Servers) -> None:
    """The subclass, end to end on arq: a burst run takes one interactive and one batch job."""
    from worker.main import InferqWorker

    async def record(ctx: dict[str, Any], lane: str) -> None:
        ctx["ran"].append(lane)

    queue = f"test:arq-lanes:{secrets.token_hex(4)}"
    pool: ArqRedis = await create_pool(RedisSettings.from_dsn(servers.redis_url))
    worker = InferqWorker(
        functions=[arq.worker.func(record, name="record")],
        queue_name=queue,
        redis_pool=pool,
        burst=True,
        handle_signals=False,
        poll_delay=0,
        max_jobs=2,
        keep_result=0,
        ctx={"wake": asyncio.Event(), "ran": []},
    )
    worker.batch_queue, worker.batch_capacity, worker.poll_fallback = f"{queue}:batch", 2, 0.01
    try:
        assert await pool.enqueue_job("record", "interactive", _queue_name=queue) is not None
        assert await pool.enqueue_job("record", "batch", _queue_name=worker.batch_queue) is not None
        await worker.main()
        await worker.close()
        assert sorted(worker.ctx["ran"]) == ["batch", "interactive"], (
            f"{WORKER} on this arq ran {worker.ctx['ran']}"
        )
    finally:
        await pool.delete(queue, worker.batch_queue)
        await pool.aclose()


def test_arq_key_names_are_module_globals_that_shared_keys_can_replace() -> None:
    for name, ours in keys._ARQ_KEYS.items():
        assert hasattr(arq.constants, name), (
            f"shared/keys.py puts arq's keys under the queues' tag by replacing arq.constants.{name},"
            " which is gone"
        )
        for module in (arq.connections, arq.jobs, arq.worker):
            if re.search(rf"\b{name}\b", inspect.getsource(module)):
                assert getattr(module, name, None) == ours, (
                    f"shared/keys.py: {module.__name__} uses {name} but not as a module global it can replace"
                )


def test_arq_serialize_job_keeps_the_signature_the_enqueue_script_uses() -> None:
    parameters = list(inspect.signature(arq.jobs.serialize_job).parameters)
    assert parameters[:5] == ["function_name", "args", "kwargs", "job_try", "enqueue_time_ms"], (
        f"api/jobs/enqueue.py writes arq's job record with arq.jobs.serialize_job,"
        f" which now takes {parameters}"
    )
