"""Prometheus metrics (API and worker), request ids end to end, and JSON log lines."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx

from tests.conftest import Stack, start_api
from tests.helpers import FRANCE, submit, wait_job

MODEL = "SmolLM2-135M-Instruct"


def _samples(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric in Prometheus text format."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{.*\}})?\s+(\S+)", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def _worker_metrics(stack: Stack) -> str:
    port = stack.worker.args[stack.worker.args.index("--metrics-port") + 1]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


async def test_metrics_api_counts_requests_and_reports_the_fleet(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    job = await submit(client, messages=FRANCE, max_tokens=4, temperature=0)
    await wait_job(client, job["id"])
    resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    requests = _samples(text, "inferq:http_requests_total")
    assert any('route="/v1/jobs"' in k and 'status="202"' in k and 'method="POST"' in k for k in requests)
    assert any('route="/v1/jobs/{job_id}"' in k for k in requests)
    assert _samples(text, "inferq:workers_alive") == {f'{{model_name="{MODEL}"}}': 1.0}
    waiting = _samples(text, "inferq:num_requests_waiting")
    assert f'{{model_name="{MODEL}",queue="interactive"}}' in waiting
    assert f'{{model_name="{MODEL}",queue="batch"}}' in waiting
    assert _samples(text, "inferq:num_requests_running")
    assert "inferq:http_request_duration_seconds_bucket" in text


async def test_metrics_worker_reports_latencies_and_tokens(client: httpx.AsyncClient, stack: Stack) -> None:
    before = _samples(_worker_metrics(stack), "inferq:generation_tokens_total")
    job = await wait_job(client, (await submit(client, messages=FRANCE, max_tokens=6, temperature=0))["id"])
    text = _worker_metrics(stack)
    label = f'{{model_name="{MODEL}"}}'
    generated = _samples(text, "inferq:generation_tokens_total")[label] - before.get(label, 0.0)
    assert generated == job["usage"]["completion_tokens"]
    for name in (
        "inferq:time_to_first_token_seconds_count",
        "inferq:inter_token_latency_seconds_count",
        "inferq:e2e_request_latency_seconds_count",
        "inferq:request_queue_time_seconds_count",
        "inferq:engine_batch_size_count",
        "inferq:prompt_tokens_total",
    ):
        assert _samples(text, name)[label] >= 1, name
    reasons = _samples(text, "inferq:request_success_total")
    assert any('finished_reason="length"' in k or 'finished_reason="stop"' in k for k in reasons)
    assert 'le="0.025"' in text  # buckets sized for token latencies
    # A CPU worker runs one torch thread per core that other processes leave free (worker/cpu_threads.py).
    assert 1 <= _samples(text, "inferq:engine_cpu_threads")[label] <= len(os.sched_getaffinity(0))


async def test_request_id_travels_to_the_job_the_worker_log_and_errors(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    rid = f"trace-{time.time_ns()}"
    resp = await client.post(
        "/v1/jobs", json={"messages": FRANCE, "max_tokens": 3}, headers={"x-request-id": rid}
    )
    assert resp.status_code == 202 and resp.headers["x-request-id"] == rid
    job = await wait_job(client, resp.json()["id"])
    assert job["request_id"] == rid
    bad = await client.post("/v1/jobs", json={"messages": []}, headers={"x-request-id": rid + "-bad"})
    assert bad.status_code == 400 and bad.json()["error"]["request_id"] == rid + "-bad"
    generated = (await client.get("/v1/jobs/job_nope")).headers["x-request-id"]
    assert generated.startswith("req_")
    assert stack.worker.log is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [
            line for line in Path(stack.worker.log).read_text().splitlines() if f"request_id={rid}" in line
        ]
        if any("job ended" in line for line in lines):
            break
        time.sleep(0.2)
    assert any(f"job_id={job['id']}" in line and "job started" in line for line in lines), lines
    assert any("job ended" in line for line in lines), lines


def test_logs_json_lines_carry_ids(stack: Stack) -> None:
    url, api = start_api(stack, INFERQ_LOG_FORMAT="json")
    try:
        httpx.get(f"{url}/v1/jobs", headers={"x-request-id": "json-req-1"}, timeout=10)
        time.sleep(0.5)
    finally:
        api.stop()
    assert api.log is not None
    records = []
    for line in Path(api.log).read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert records, "no JSON log lines"
    for record in records:
        assert {"timestamp", "level", "event", "logger", "request_id", "job_id", "worker_id"} <= record.keys()
    assert any(r["request_id"] == "json-req-1" and "/v1/jobs" in r["event"] for r in records)


async def test_grafana_dashboard_uses_only_exported_metrics(client: httpx.AsyncClient, stack: Stack) -> None:
    await wait_job(client, (await submit(client, messages=FRANCE, max_tokens=2))["id"])
    exported = (await client.get("/metrics")).text + _worker_metrics(stack)
    names = set()
    for line in exported.splitlines():
        if line.startswith("# TYPE inferq:"):  # declared, even with no sample yet (a labelled counter)
            _, _, name, kind = line.split()
            names |= (
                {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
            )
    dashboard = json.loads(
        (Path(__file__).parent.parent / "deploy/grafana/inferq-dashboard.json").read_text()
    )
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"inferq:[a-z0-9_:]+", target["expr"])
    }
    assert used and used <= names, sorted(used - names)
