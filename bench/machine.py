"""What the benchmark ran on, and how busy the machine was meanwhile (it may be shared)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Coroutine
from importlib import metadata
from typing import Any, TypeVar

T = TypeVar("T")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "gpu": None,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


class CpuMeter:
    """Busy fraction of the whole machine (0..1, all cores) between start() and stop()."""

    def __init__(self) -> None:
        self._start = _cpu_times()

    def start(self) -> CpuMeter:
        self._start = _cpu_times()
        return self

    def busy(self) -> float:
        busy, total = _cpu_times()
        db, dt = busy - self._start[0], total - self._start[1]
        return round(db / dt, 3) if dt > 0 else 0.0


def foreign_busy(sample_s: float = 1.0) -> float:
    """Busy fraction of the machine over `sample_s` seconds: call while the benchmark itself is idle."""
    meter = CpuMeter().start()
    time.sleep(sample_s)
    return meter.busy()


def wait_for_quiet(max_busy: float, timeout: float, log: bool = True) -> float:
    """Wait (up to `timeout` s) until the machine is busier than `max_busy` no more; return the last sample.
    Other users of a shared machine otherwise take the benchmark's CPU."""
    deadline = time.monotonic() + timeout
    busy = foreign_busy()
    warned = False
    while busy > max_busy and time.monotonic() < deadline:
        if log and not warned:
            print(f"  machine {busy:.0%} busy with other work; waiting up to {timeout:.0f} s…", flush=True)
            warned = True
        busy = foreign_busy(2.0)
    return busy


class ProcessCpu:
    """CPU time (cores used, on average) of one process between start() and cores()."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self._t0 = time.perf_counter()
        self._c0 = self._cpu()

    def _cpu(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def start(self) -> ProcessCpu:
        self._t0, self._c0 = time.perf_counter(), self._cpu()
        return self

    def cores(self) -> float:
        dt = time.perf_counter() - self._t0
        return round((self._cpu() - self._c0) / dt, 2) if dt > 0 else 0.0


class CpuByProcess:
    """CPU cores used by every process between start() and cores(), grouped: the named pids, processes
    whose (or whose parent's) command line contains a marker (label -> substring, e.g. the embedded
    servers' data dir or port), this benchmark process, and "other" (anyone else's work on the machine)."""

    def __init__(self, named: dict[str, int] | None = None, markers: dict[str, str] | None = None) -> None:
        self.named = {pid: name for name, pid in (named or {}).items() if pid}
        self.markers = {**(markers or {}), "profiler": "py-spy record"}
        self._labels: dict[int, str] = {}
        self._t0 = time.perf_counter()
        self._c0: dict[int, tuple[str, float]] = {}

    def _label(self, proc: Any) -> str:
        if proc.pid in self.named:
            return self.named[proc.pid]
        if proc.pid == os.getpid():
            return "bench client"
        if proc.pid not in self._labels:
            self._labels[proc.pid] = self._marked(proc)
        return self._labels[proc.pid]

    def _marked(self, proc: Any) -> str:
        for p in (proc, proc.parent()):
            try:
                line = " ".join(p.cmdline()) if p is not None else ""
            except Exception:
                continue
            for label, marker in self.markers.items():
                if marker in line:
                    return label
        return "other"

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for p in psutil.process_iter(["cpu_times"]):
            t = p.info["cpu_times"]
            if t is not None:
                out[p.pid] = (self._label(p), float(t.user + t.system))
        return out

    def start(self) -> CpuByProcess:
        self._t0, self._c0 = time.perf_counter(), self._snapshot()
        return self

    def cores(self) -> dict[str, float]:
        dt = time.perf_counter() - self._t0
        used: dict[str, float] = {}
        for pid, (label, cpu) in self._snapshot().items():
            before = self._c0.get(pid, (label, 0.0))[1]  # processes born meanwhile count from 0
            used[label] = used.get(label, 0.0) + max(0.0, cpu - before)
        return {
            k: round(v / dt, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v / dt >= 0.005
        }


def stack_markers(redis_url: str, database_url: str) -> dict[str, str]:
    """Markers for CpuByProcess of an embedded stack: valkey by its port, postgres by its socket dir."""
    from urllib.parse import parse_qs, urlsplit

    port = urlsplit(redis_url).port
    host = parse_qs(urlsplit(database_url).query).get("host", [""])[0]
    markers = {"valkey": f":{port}"} if port else {}
    if host:
        markers["postgres"] = host
    return markers


class Contaminated(RuntimeError):
    """Other work took more CPU than allowed during a measurement, which was stopped early."""

    def __init__(self, other: float) -> None:
        super().__init__(f"other work used {other:.2f} cores")
        self.other = other


async def guarded(
    coro: Coroutine[Any, Any, T],
    named: dict[str, int],
    markers: dict[str, str],
    max_other: float,
    window: float = 3.0,
) -> T:
    """Run `coro`, but stop it and raise Contaminated as soon as other work uses more than `max_other`
    cores over a `window`-second span (a measurement it would spoil is not worth finishing)."""
    import asyncio

    async def watch() -> None:
        while True:
            meter = CpuByProcess(named, markers).start()
            await asyncio.sleep(window)
            other = meter.cores().get("other", 0.0)
            if other > max_other:
                raise Contaminated(other)

    task = asyncio.ensure_future(coro)
    dog = asyncio.ensure_future(watch())
    try:
        await asyncio.wait([task, dog], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, dog):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, dog, return_exceptions=True)
    if not task.cancelled() and task.exception() is None:
        return task.result()
    if dog.done() and not dog.cancelled() and isinstance(dog.exception(), Contaminated):
        raise dog.exception()  # type: ignore[misc]
    return task.result()  # re-raises the measurement's own exception


def run_clean(
    measure: Callable[[], T],
    other_cores: Callable[[T], float],
    *,
    max_other: float,
    retries: int,
    max_busy: float,
    quiet_timeout: float,
    max_stops: int = 30,
) -> tuple[T, dict[str, Any]]:
    """Wait for a quiet machine, then `measure`; if other work used more than `max_other` cores meanwhile
    (torch's two OpenMP threads slow down many times over when a third busy process shares two cores),
    measure again, up to `retries` more times. A measurement that raises Contaminated (stopped early,
    see `guarded`) does not count as a retry, up to `max_stops` times. Returns the last result and how
    clean it was."""
    attempt = stops = 0
    while True:
        attempt += 1
        wait_for_quiet(max_busy, quiet_timeout)
        try:
            result = measure()
        except Contaminated as exc:
            stops += 1
            attempt -= 1
            if stops > max_stops:
                raise RuntimeError(
                    f"the machine was never quiet enough ({stops} measurements stopped)"
                ) from exc
            print(f"  {exc}; stopped this measurement, will measure again", flush=True)
            continue
        other = other_cores(result)
        clean = other <= max_other
        if clean or attempt > retries:
            if not clean:
                print(f"  WARNING: other work used {other:.2f} cores during the measurement; kept anyway")
            info = {"attempts": attempt, "stopped_early": stops, "other_cores": other, "clean": clean}
            return result, info
        print(
            f"  other work used {other:.2f} cores meanwhile; measuring again ({attempt}/{retries})…",
            flush=True,
        )


def add_quiet_arguments(parser: Any) -> None:
    """The options of run_clean / wait_for_quiet, shared by every benchmark."""
    parser.add_argument(
        "--max-foreign-busy", type=float, default=0.15, help="Wait while the idle machine is busier (0-1)."
    )
    parser.add_argument(
        "--quiet-timeout", type=float, default=180.0, help="Longest wait for a quiet machine."
    )
    parser.add_argument(
        "--max-other-cores", type=float, default=0.15, help="Measure again if other work used more CPU."
    )
    parser.add_argument("--retries", type=int, default=2, help="Most measurements again.")


def clean_options(args: Any) -> dict[str, Any]:
    return {
        "max_other": args.max_other_cores,
        "retries": args.retries,
        "max_busy": args.max_foreign_busy,
        "quiet_timeout": args.quiet_timeout,
    }


def other_cores(result: dict[str, Any]) -> float:
    return float(result.get("cpu_cores_by_process", {}).get("other", 0.0))
