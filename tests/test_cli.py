"""The `inferq` console script as a user meets it: `inferq jobs` at common terminal widths, and `inferq api`
/ `inferq worker` started without what they need or with a bad setting, each saying so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import REPO, Servers, Stack
from tests.helpers import wait_job


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _bare_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A newcomer's shell: no INFERQ_* variable but the data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    return {**env, "INFERQ_DATA_DIR": str(data_dir), **extra}


async def test_cli_jobs_keeps_status_tokens_and_ttft_beside_a_long_output(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0, "max_tokens": 200}
    made = (await client.post("/v1/jobs", json=body)).json()
    job = await wait_job(client, made["id"])
    assert job["status"] == "succeeded" and len(job["output"]) > 160, job  # longer than the screen
    tokens, ttft = str(job["usage"]["completion_tokens"]), f"{job['timings']['ttft_ms']:.0f}"
    for columns in (160, 100):
        listed = _cli({**stack.api.env, "INFERQ_URL": stack.base_url, "COLUMNS": str(columns)}, "jobs")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert all(len(line) <= columns for line in lines), listed.stdout
        assert lines[0].split() == ["id", "status", "created", "UTC", "tokens", "ttft", "ms", "output"]
        (row,) = [line for line in lines if line.startswith(job["id"] + " ")]
        assert row.split()[1] == "succeeded" and row.split()[4:6] == [tokens, ttft], row
        shown = row[lines[0].index("output") :]  # cut to the screen, with an ellipsis
        assert shown.endswith("…") and job["output"].replace("\n", " ").startswith(shown[:-1]), (shown, job)


def test_cli_api_without_urls_names_both_variables_and_the_stack_file(tmp_path: Path) -> None:
    for command in ("api", "worker"):
        done = _cli(_bare_env(tmp_path), command, timeout=60)
        assert done.returncode == 2, (done.stdout, done.stderr)
        (line,) = done.stderr.strip().splitlines()  # one line, no traceback
        assert "INFERQ_REDIS_URL and INFERQ_DATABASE_URL are not set" in line, line
        assert str(tmp_path / "stack.json") in line and "inferq up" in line, line


def test_cli_api_with_an_empty_data_dir_names_the_model_dir_and_model_fetch(
    servers: Servers, tmp_path: Path
) -> None:
    urls = {"INFERQ_REDIS_URL": servers.redis_url, "INFERQ_DATABASE_URL": servers.database_url}
    for command in ("api", "worker"):
        done = _cli(_bare_env(tmp_path, **urls), command, timeout=60)
        assert done.returncode == 2, (done.stdout, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        missing = tmp_path / "models" / "SmolLM2-135M-Instruct"
        assert f"model directory {missing} does not exist: run `inferq model fetch`" in line, line
    # A directory named in INFERQ_MODEL__NAME: its path, and what to set.
    named = _cli(_bare_env(tmp_path, INFERQ_MODEL__NAME=str(tmp_path / "mine"), **urls), "api", timeout=60)
    assert named.returncode == 2 and f"model directory {tmp_path / 'mine'} does not exist" in named.stderr


def test_cli_a_bad_setting_is_one_line_naming_its_variable(tmp_path: Path) -> None:
    """A setting that does not validate stops `inferq api` / `inferq worker` before anything starts, with
    one line that names the variable and what is wrong, not pydantic's traceback."""
    cases = {
        "INFERQ_MODEL__DTYPE": ("wat", "Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        "INFERQ_WORKER__UPSTREAM_CAPABILITIES": ("nope,seed", "unknown capability 'nope'"),
        "INFERQ_MODEL__MAX_BATCH": ("0", "greater than or equal to 1"),
        "INFERQ_LIMITS": ("not json", "not valid JSON"),
    }
    for command in ("api", "worker"):
        for name, (value, said) in cases.items():
            done = _cli(_bare_env(tmp_path, **{name: value}), command, timeout=60)
            assert done.returncode == 2, (name, done.stdout, done.stderr)
            (line,) = done.stderr.strip().splitlines()  # one line, no traceback
            assert line.startswith(f"error: {name}: ") and said in line, line
