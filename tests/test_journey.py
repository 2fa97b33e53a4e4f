"""The product as a newcomer meets it: the README's own commands, the real console script, a fresh data
dir, a free port and no `INFERQ_*` URLs, so `inferq up` starts its embedded Valkey and PostgreSQL.

Each test drives subprocesses only (the `inferq` script, `bash`, `curl`, the OpenAI snippet) and checks
what a user would see: the banner, the printed answer, the job list, and that nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferq.leftovers import alive, read_record
from inferq.stack import BANNER_END
from tests.conftest import REPO, Servers, _env, _free_port, registry

README = (REPO / "README.md").read_text()
INFERQ = str(Path(sys.executable).with_name("inferq"))
BANNER = "inferq is up"
# Bounds for a cached start on a 2-core machine with other tests' processes around: generous, since a
# test that fails on a slow CI machine for no fault of the code teaches nothing. The goal (8 s) is
# measured in bench/RESULTS.md, not here.
BANNER_TIMEOUT = 120.0
GONE_AFTER_STOP = 15.0


def _user_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A newcomer's environment: nothing of inferq's set but the data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", COLUMNS="80", **extra)
    return env


def _data_dir(tmp_path: Path, model_dir: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    # The converted demo model is shared with the rest of the suite; everything else is this test's own.
    (data / "models").symlink_to(model_dir.parent, target_is_directory=True)
    return data


def _processes_on(data_dir: Path) -> list[int]:
    """Processes whose command line names the data dir (embedded PostgreSQL, the watchdog, ...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with_dir = str(data_dir)
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if with_dir in cmd and alive(int(entry.name), with_dir):
                found.append(int(entry.name))
    return found


@dataclass
class Up:
    """One `inferq up` (or `bash scripts/up.sh`) run, its output in a log file."""

    cmd: list[str]
    data_dir: Path
    port: int
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    seen: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float, after: int = 0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if text in self.output()[after:]:
                return time.monotonic() - t0
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"inferq up exited ({self.proc.returncode}):\n{self.output()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in {timeout:.0f}s:\n{self.output()[-4000:]}")

    def wait_for_banner(self, timeout: float) -> None:
        """The whole banner: it comes in several writes, and a read between them missed the /metrics URLs."""
        self.wait_for_line(BANNER_END, timeout)
        assert BANNER in self.output(), self.output()[-4000:]

    def remember(self) -> dict[str, Any]:
        """The run's record, and every pid it names, to check later that all of them are gone."""
        record = read_record(self.data_dir) or {}
        assert self.proc is not None
        self.seen |= {self.proc.pid, int(record.get("supervisor") or 0)}
        self.seen |= {int(p) for p in (record.get("servers") or {}).values()}
        self.seen |= {int(p) for p in (record.get("children") or {}).values()}
        self.seen |= set(_processes_on(self.data_dir))
        self.seen.discard(0)
        return record

    def interrupt(self) -> int:
        """Ctrl-C, as a user stops it; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=90)

    def leftovers(self) -> list[int]:
        return [p for p in self.seen | set(_processes_on(self.data_dir)) if _running(p)]

    def wait_all_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self.leftovers()
        assert not left, f"still running {timeout:.0f}s after the stop: {_describe(left)}"

    def kill_everything(self) -> None:
        for pid in self.leftovers():
            with contextlib.suppress(Exception):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "?"
        out.append(f"{pid}: {cmd}")
    return "; ".join(out)


@pytest.fixture
def up_factory(tmp_path: Path, model_dir: Path) -> Iterator[Any]:
    runs: list[Up] = []
    data_dir = _data_dir(tmp_path, model_dir)

    def make(*args: str, script: bool = False, port: int | None = None, **env: str) -> Up:
        port = port or _free_port()
        base = ["bash", "scripts/up.sh"] if script else [INFERQ, "up"]
        cmd = [*base, "--port", str(port), "--data-dir", str(data_dir), *args]
        run = Up(cmd, data_dir, port, tmp_path / f"up-{len(runs)}.log", _user_env(data_dir, **env))
        runs.append(run)
        run.start()
        return run

    yield make
    for run in runs:  # a failed test still leaves nothing behind
        if run.proc is not None and run.proc.poll() is None:
            run.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(Exception):
                run.proc.wait(timeout=60)
        run.kill_everything()


def _cli(
    up: Up, *args: str, key: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = dict(up.env, INFERQ_URL=up.url)
    if key:
        env["INFERQ_API_KEY"] = key
    return subprocess.run(
        [INFERQ, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# --- The README, run as written -------------------------------------------------------------------


def _blocks(section: str, lang: str) -> list[str]:
    """The ```lang code blocks of one `## section` of the README."""
    start = README.index(f"## {section}")
    end = README.find("\n## ", start + 1)
    text = README[start : end if end != -1 else None]
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _as_run_here(command: str, up: Up, job_id: str | None) -> str:
    # The README talks to the default port; this stack has one of its own.
    command = command.replace("localhost:8000", f"127.0.0.1:{up.port}")
    command = command.replace("http://127.0.0.1:8000", up.url)
    if job_id is not None:
        command = command.replace("JOB_ID", job_id)
    return command


def _run_readme_blocks(up: Up) -> None:
    quick = _commands(_blocks("Quickstart", "bash")[1])
    assert quick == [
        '.venv/bin/inferq submit "What is the capital of France?" --stream',
        ".venv/bin/inferq jobs",
    ], quick
    env = dict(up.env, INFERQ_URL=up.url)
    outputs = []
    for command in quick:
        done = subprocess.run(
            ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        outputs.append(done.stdout)
    assert "Paris" in outputs[0]
    job_id = outputs[0].split()[-1]
    assert job_id.startswith("job_") and job_id in outputs[1], outputs

    api = _commands(_blocks("Using the API", "bash")[0])
    assert api[0].startswith("curl -s localhost:8000/v1/jobs ") and sum("JOB_ID" in c for c in api) >= 4
    job: str | None = None
    for command in api:
        done = subprocess.run(
            ["bash", "-c", _as_run_here(command, up, job)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        if job is None:
            created = json.loads(done.stdout)
            assert created["status"] == "queued", created
            job = created["id"]
            _wait_finished(up, job)
        elif command.startswith("curl -N") and "Last-Event-ID" not in command:
            assert "event: done" in done.stdout and "Paris" in done.stdout, done.stdout
        elif "Last-Event-ID: 5" in command:
            ids = [int(x) for x in re.findall(r"^id: (\d+)", done.stdout, flags=re.M)]
            assert ids and min(ids) == 6, done.stdout
        elif command.endswith(f"/v1/jobs/{job}"):
            assert json.loads(done.stdout)["status"] == "succeeded", done.stdout
    assert job is not None

    (deadline,) = _commands(_blocks("Using the API", "bash")[1])  # ### Deadlines
    done = subprocess.run(
        ["bash", "-c", _as_run_here(deadline, up, None)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (deadline, done.stdout, done.stderr)
    timed = _wait_finished(up, json.loads(done.stdout)["id"])
    assert timed["cancel_at"] is not None and timed["timeout_seconds"] == 10, timed


def _wait_finished(up: Up, job_id: str, key: str | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{up.url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} did not finish")


def _run_openai_snippet(up: Up, tmp_path: Path) -> None:
    (snippet,) = _blocks("OpenAI-compatible API", "python")
    script = tmp_path / "snippet.py"
    script.write_text(_as_run_here(snippet, up, None))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=up.env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "SmolLM2-135M-Instruct", lines
    assert "Paris" in lines[1], lines
    assert "None" not in done.stdout, done.stdout
    assert re.fullmatch(r"\d+ tokens", lines[-1]), lines


def _run_responses_snippet(up: Up, tmp_path: Path) -> None:
    (snippet,) = _blocks("Responses API: durable background mode", "python")
    script = tmp_path / "responses.py"
    script.write_text(_as_run_here(snippet, up, None))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=up.env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("completed ") and "Paris" in lines[0], lines
    assert re.fullmatch(r"(completed|incomplete): \d+ tokens", lines[-1]), lines
    assert len(" ".join(lines[1:-1])) > 20, lines  # the story, streamed before and after the resume


def _readme_dir(tmp_path: Path) -> Path:
    """A folder to run README commands in that write files (prompts.jsonl, results.jsonl)."""
    here = tmp_path / "readme"
    here.mkdir(exist_ok=True)
    if not (here / ".venv").exists():
        (here / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    return here


def _run_readme_batch(up: Up, key: str, tmp_path: Path) -> None:
    here = _readme_dir(tmp_path)
    env = dict(up.env, INFERQ_URL=up.url, INFERQ_API_KEY=key)
    batch_id = None
    for command in _commands(_blocks("OpenAI-compatible API", "bash")[0]):
        if "BATCH_ID" in command:
            assert batch_id is not None
            command = command.replace("BATCH_ID", batch_id)
        done = subprocess.run(
            ["bash", "-c", command], cwd=here, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        if " batch prompts.jsonl" in command:
            batch_id = done.stdout.split()[0]
            assert batch_id.startswith("batch_"), done.stdout
        elif " batch status " in command:
            assert batch_id in done.stdout and re.search(r"status\s+completed", done.stdout), done.stdout
    results = [json.loads(line) for line in (here / "results.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["line-1", "line-2"]
    # The lines set no temperature: sampled answers, so only their shape is certain.
    for r in results:
        assert r["response"]["status_code"] == 200 and r["error"] is None, r
        assert r["response"]["body"]["choices"][0]["message"]["content"].strip(), r


def _run_readme_tenants(up: Up, tmp_path: Path) -> None:
    (block,) = _blocks("Tenants, API keys, limits", "bash")
    script = _as_run_here(block, up, None).replace("key_0123456789ab", "key_${KEY:3:12}")
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=_readme_dir(tmp_path),
        env=dict(up.env, INFERQ_URL=up.url),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert '"object":"list"' in done.stdout and "Paris" in done.stdout, done.stdout
    assert "acme" in done.stdout and "revoked" in (done.stdout + done.stderr), (done.stdout, done.stderr)


# --- The journeys ------------------------------------------------------------------------------------


def test_journey_quickstart_keys_stop_and_start_again(up_factory: Any, tmp_path: Path) -> None:
    # Command 1 of the Quickstart, as written (the install step finds everything installed).
    up: Up = up_factory(script=True)
    up.wait_for_banner(BANNER_TIMEOUT)
    stack_file = json.loads((up.data_dir / "stack.json").read_text())
    assert stack_file["api_url"] == up.url and stack_file["database_url"]
    banner = up.output()
    assert "auth: open" in banner and f"{up.url}/docs" in banner and "/metrics (worker 1)" in banner
    workers = httpx.get(f"{up.url}/v1/workers", timeout=10).json()["data"]
    assert len(workers) == 1 and workers[0]["metrics_url"], workers
    metrics = httpx.get(workers[0]["metrics_url"], timeout=10).text
    assert "inferq:time_to_first_token_seconds" in metrics
    up.remember()

    # The README's own commands and its OpenAI snippet, against this stack while it is open.
    _run_readme_blocks(up)
    _run_openai_snippet(up, tmp_path)
    _run_responses_snippet(up, tmp_path)
    open_jobs = {j["id"] for j in httpx.get(f"{up.url}/v1/jobs", timeout=10).json()["data"]}

    # A second shell that knows only the data dir makes the first key; from then on keys are required.
    made = _cli(up, "keys", "create", "--tenant", "default")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("iq_")
    # At once: no API process keeps an "open" answer once the first key exists.
    refused = httpx.get(f"{up.url}/v1/jobs", timeout=10)
    assert refused.status_code == 401 and "INFERQ_API_KEY" in refused.json()["error"]["message"]

    streamed = _cli(up, "submit", "What is the capital of France?", "--stream", key=key)
    assert streamed.returncode == 0 and "Paris" in streamed.stdout, (streamed.stdout, streamed.stderr)
    new_job = streamed.stdout.split()[-1]
    listed = _cli(up, "jobs", key=key)
    assert listed.returncode == 0, listed.stderr
    # Whole ids at 80 columns: the new job, and the ones made while open (tenant default).
    assert new_job in listed.stdout and open_jobs <= set(re.findall(r"job_[0-9a-f]+", listed.stdout))
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80
    # The README's batch and tenant commands, now that keys are required.
    _run_readme_batch(up, key, tmp_path)
    _run_readme_tenants(up, tmp_path)
    up.remember()

    # Ctrl-C: every process of the stack is gone, embedded servers included.
    assert up.interrupt() == 0
    up.wait_all_gone(GONE_AFTER_STOP)
    assert not (up.data_dir / "stack.json").exists() and not (up.data_dir / "run.json").exists()

    # Started again on the same data dir: the job and the key are still there.
    again: Up = up_factory(port=up.port)
    again.wait_for_banner(BANNER_TIMEOUT)
    assert "auth: API keys required" in again.output() and "INFERQ_API_KEY" in again.output()
    again.remember()
    job = httpx.get(f"{again.url}/v1/jobs/{new_job}", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert job.status_code == 200 and "Paris" in job.json()["output"]
    assert again.interrupt() == 0
    again.wait_all_gone(GONE_AFTER_STOP)


def test_journey_killed_up_leaves_nothing_and_the_next_run_says_what_it_stopped(up_factory: Any) -> None:
    up: Up = up_factory()
    up.wait_for_banner(BANNER_TIMEOUT)
    record = up.remember()
    assert record["servers"]["valkey"] and record["servers"]["postgres"]
    # Frozen first, so that its watchdog cannot help: what a power cut or an OOM kill leaves.
    watchdogs = [p for p in _processes_on(up.data_dir) if "inferq.leftovers" in _describe([p])]
    assert len(watchdogs) == 1
    os.kill(watchdogs[0], signal.SIGSTOP)
    assert up.proc is not None
    up.proc.kill()
    up.proc.wait()
    os.kill(watchdogs[0], signal.SIGKILL)
    valkey = int(record["servers"]["valkey"])
    assert _running(valkey)  # left behind, as a crash leaves it
    nxt: Up = up_factory()
    nxt.wait_for_banner(BANNER_TIMEOUT)
    said = nxt.output()
    assert "left processes running; stopped:" in said and f"Valkey (pid {valkey})" in said, said[:2000]
    assert not _running(valkey)
    nxt.remember()
    # A second `inferq up` on a data dir in use refuses, and on a port in use too, saying why.
    rival: Up = up_factory()
    assert rival.proc is not None and rival.proc.wait(timeout=60) == 1
    assert f"another `inferq up` (pid {nxt.proc.pid if nxt.proc else '?'}) is running" in rival.output()
    busy = subprocess.run(
        [INFERQ, "up", "--port", str(nxt.port), "--data-dir", str(nxt.data_dir.parent / "other")],
        cwd=REPO,
        env=_user_env(nxt.data_dir.parent / "other"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert busy.returncode == 1 and f"cannot serve on 127.0.0.1:{nxt.port}" in busy.stderr, busy.stderr
    assert nxt.interrupt() == 0
    nxt.wait_all_gone(GONE_AFTER_STOP)

    # And with the watchdog alive, a SIGKILL of `inferq up` alone leaves nothing either.
    third: Up = up_factory()
    third.wait_for_banner(BANNER_TIMEOUT)
    third.remember()
    assert third.proc is not None
    third.proc.kill()
    third.proc.wait()
    third.wait_all_gone(GONE_AFTER_STOP + 10)  # the workers drain first, then the servers stop


def test_journey_a_killed_worker_comes_back_and_its_job_still_succeeds(up_factory: Any) -> None:
    up: Up = up_factory("--workers", "2")
    up.wait_for_banner(BANNER_TIMEOUT * 1.5)
    body = {
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": 160,
        "temperature": 0,
    }
    job_id = httpx.post(f"{up.url}/v1/jobs", json=body, timeout=10).json()["id"]
    deadline = time.monotonic() + 60
    holder = None
    while holder is None and time.monotonic() < deadline:
        job = httpx.get(f"{up.url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] == "running" and job["worker_id"]:
            holder = int(job["worker_id"].split(":")[1])
        time.sleep(0.1)
    assert holder is not None, "the job never started"
    mark = len(up.output())
    os.kill(holder, signal.SIGKILL)
    up.wait_for_line("exited (killed by SIGKILL); starting it again", 30, after=mark)
    up.wait_for_line("is serving again", BANNER_TIMEOUT, after=mark)
    assert up.proc is not None and up.proc.poll() is None  # the stack stayed up
    done = _wait_finished(up, job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    pids = {int(w["pid"]) for w in httpx.get(f"{up.url}/v1/workers", timeout=10).json()["data"]}
    assert len(pids) == 2 and holder not in pids
    up.remember()
    assert up.interrupt() == 0
    up.wait_all_gone(GONE_AFTER_STOP)


def test_journey_a_worker_that_cannot_start_stops_the_stack_and_says_why(up_factory: Any) -> None:
    up: Up = up_factory(INFERQ_MODEL__NAME="/nonexistent/model")
    assert up.proc is not None
    up.wait_for_line("starting it again", BANNER_TIMEOUT)
    assert up.proc.wait(timeout=BANNER_TIMEOUT) == 1
    said = up.output()
    assert "exited 3 times in 5 minutes" in said and "stopping the stack" in said, said[-3000:]
    assert BANNER not in said
    up.remember()
    up.wait_all_gone(GONE_AFTER_STOP)


# --- A worker stopped at any moment of its start-up exits within its drain time -----------------------

DRAIN = 10.0
# moment -> (the log line that says the worker is there, extra seconds to wait after it)
_MOMENTS: dict[str, tuple[str | None, float]] = {
    "importing": (None, 0.3),  # before it has logged anything
    "loading the model": ("loading model", 0.0),
    "starting the engine": ("engine started; warming up", 0.0),
    "serving": ("ready: model", 0.0),
    "redis unreachable": (None, 2.0),  # connecting to a Redis that never answers
    "postgres unreachable": ("engine started; warming up", 3.0),  # checking the schema, no answer
}


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word: a server that hangs, or a partition."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("moment", list(_MOMENTS))
def test_worker_sigterm_at_any_moment_of_start_up_exits_within_drain_time(
    moment: str, servers: Servers, model_dir: Path, tmp_path: Path, stack: Any, silent_port: int
) -> None:
    # `stack`: the session's schema is migrated and its API runs; this worker joins it for a moment.
    env = _env(servers, model_dir, INFERQ_WORKER__DRAIN_SECONDS=str(DRAIN))
    if moment == "redis unreachable":
        env["INFERQ_REDIS_URL"] = f"redis://127.0.0.1:{silent_port}/0"
    if moment == "postgres unreachable":
        env["INFERQ_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{silent_port}/nothing"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [INFERQ, "worker", "--max-batch", "4"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        marker, extra = _MOMENTS[moment]
        deadline = time.monotonic() + 120
        while marker is not None and marker not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        time.sleep(extra)
        assert proc.poll() is None, f"exited before the signal:\n{log.read_text()}"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=DRAIN)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {DRAIN:.0f}s after SIGTERM ({moment}):\n{log.read_text()}"
            ) from None
        assert time.monotonic() - t0 < DRAIN
        if moment != "redis unreachable":
            assert all(int(w.get("pid") or 0) != proc.pid for w in registry(servers.redis_url))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
