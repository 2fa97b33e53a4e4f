"""Time to "inferq is up": a cached start (`inferq up` on a data dir whose model is converted and
whose servers have run before), and a fresh clone (`bash scripts/up.sh` in a new clone with an empty
home: venv, install, model download and conversion, then the stack).

    python -m bench startup --runs 5            # cached starts
    python -m bench startup --fresh             # one fresh clone as well (minutes; needs the network)

Each start is timed from the moment the process is spawned to the banner line, and stopped with
Ctrl-C (SIGINT) before the next one.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import machine
from bench.harness import demo_model
from bench.stats import write_json

REPO = Path(__file__).resolve().parent.parent
BANNER = "inferq is up"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env["PYTHONUNBUFFERED"] = "1"
    if home is not None:
        env["HOME"] = str(home)
        env.pop("PIP_CACHE_DIR", None)
    return env


def _time_to_banner(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[float, str]:
    with tempfile.TemporaryFile() as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            while True:
                out.seek(0)
                text = out.read().decode(errors="replace")
                if BANNER in text:
                    elapsed = time.monotonic() - t0
                    break
                if proc.poll() is not None or time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"no banner ({proc.returncode}):\n{text[-3000:]}")
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return elapsed, text


def _steps(text: str) -> dict[str, float]:
    """The `✓ step (N.Ns)` lines `inferq up` prints."""
    return {m[1]: float(m[2]) for m in re.finditer(r"✓ (.+?) \((\d+\.\d)s\)", text)}


def cached(runs: int) -> dict[str, Any]:
    model = demo_model()
    with tempfile.TemporaryDirectory(prefix="inferq-startup-") as tmp:
        data = Path(tmp)
        (data / "models").symlink_to(model.parent, target_is_directory=True)
        cmd = [str(Path(sys.executable).with_name("inferq")), "up", "--data-dir", str(data)]
        # The first start initialises the PostgreSQL cluster and migrates: not a cached start.
        first, _ = _time_to_banner([*cmd, "--port", str(_port())], REPO, _env(), 300)
        times, steps = [], []
        for _ in range(runs):
            seconds, text = _time_to_banner([*cmd, "--port", str(_port())], REPO, _env(), 300)
            times.append(seconds)
            steps.append(_steps(text))
    return {
        "first_start_s": round(first, 2),
        "cached_start_s": [round(t, 2) for t in times],
        "cached_start_median_s": round(statistics.median(times), 2),
        "steps_of_median_run": steps[times.index(sorted(times)[len(times) // 2])],
    }


def fresh() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inferq-fresh-") as tmp:
        clone, home = Path(tmp) / "inferq", Path(tmp) / "home"
        home.mkdir()
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        seconds, text = _time_to_banner(
            ["bash", "scripts/up.sh", "--port", str(_port())], clone, _env(home), 900
        )
    installs = [int(m) for m in re.findall(r"done in (\d+)s", text)]
    return {
        "fresh_clone_to_banner_s": round(seconds, 1),
        "pip_steps_s": installs,
        "steps": _steps(text),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench startup", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="also time one fresh clone")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": machine.describe(), "cached": cached(args.runs)}
    print(f"cached start → banner: {result['cached']}")
    if args.fresh:
        result["fresh"] = fresh()
        print(f"fresh clone → banner: {result['fresh']}")
    if args.json:
        write_json(args.json, {"startup": result})
