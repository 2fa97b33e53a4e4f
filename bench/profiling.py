"""Sampling profiles of a server process under load (py-spy), and a top-functions summary of them."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def recording(pid: int, out: Path, *, rate: int = 100, gil: bool = False) -> Iterator[Path]:
    """Sample `pid` with py-spy for the duration of the block, into `out` (collapsed stacks, "raw")."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [exe, "record", "--nonblocking", "--function", "-r", str(rate), "-f", "raw", "-o", str(out)]
    args += ["-p", str(pid)]
    if gil:
        args.append("--gil")
    log = out.with_suffix(".log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def recording_all(pids: dict[str, int], log_dir: Path, tag: str) -> Iterator[dict[str, Path]]:
    """Record every named process (name -> pid; none when empty) into log_dir/profile-TAG-NAME.txt."""
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(recording(pid, log_dir / f"profile-{tag}-{name}.txt"))
            for name, pid in pids.items()
            if pid
        }


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip().rpartition(" ")
    return [f for f in stack.split(";") if f], int(count)


def _where(frame: str) -> str:
    """'func (pkg/mod.py:12)' -> 'pkg/mod.py' (py-spy already shortens paths to the package)."""
    _, _, where = frame.partition(" (")
    return where.rstrip(")").rpartition(":")[0] or where


# inferq's own code: the inclusive list names only these frames (the framework's are in every stack).
_PROJECT = ("api/", "shared/", "worker/", "bench/")
# uvloop runs the loop in C: a sample whose innermost Python frame is the loop's entry point is time in
# uvloop itself (polling, socket I/O, callback dispatch) or waiting for I/O; py-spy cannot tell which.
_LOOP_LEAF = "Runner.run (asyncio/runners.py"


def _package(frame: str) -> str:
    where = _where(frame)
    head = where.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in where or where.endswith(".py") else where


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Samples; the share in uvloop's C loop; self time by package and by function; inclusive time of
    inferq's own functions; all as % of all samples."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = loop = 0
    if raw.exists():
        for line in raw.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            frames, count = _frames(line)
            if not frames:
                continue
            total += count
            leaf = frames[-1]
            if leaf.startswith(_LOOP_LEAF):
                loop += count
                continue
            self_time[leaf] += count
            packages[_package(leaf)] += count
            for f in set(frames):
                if _where(f).startswith(_PROJECT):
                    inclusive[f] += count

    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return (
            [{"function": f, "pct": round(100 * n / total, 1)} for f, n in c.most_common(top)]
            if total
            else []
        )

    return {
        "file": str(raw),
        "samples": total,
        "uvloop_or_idle_pct": round(100 * loop / total, 1) if total else 0.0,
        "top_self": share(self_time),
        "top_inclusive": share(inclusive),
        "self_by_package": share(packages),
    }


def print_summary(title: str, summary: dict[str, Any], top: int = 10) -> None:
    print(f"\nprofile: {title} ({summary['samples']} samples, {summary['file']})")
    print(f"  {summary['uvloop_or_idle_pct']:.1f}% in uvloop's C loop (I/O, dispatch) or waiting")
    for key, label in (
        ("self_by_package", "self time by package"),
        ("top_self", "self time"),
        ("top_inclusive", "inclusive, inferq code"),
    ):
        print(f"  {label}:")
        for row in summary[key][:top]:
            print(f"    {row['pct']:5.1f}%  {row['function']}")
