"""A CPU worker runs one torch thread per core other processes leave free (worker/cpu_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker import cpu_threads
from worker.cpu_threads import ThreadGovernor, busy_seconds, threads_for


@pytest.mark.parametrize(
    ("others", "cores", "most", "fewer", "more"),
    [
        (0.0, 2, 2, 2, 2),
        (0.15, 2, 2, 2, 2),  # the API and databases between steps: the cores count as free
        (0.3, 2, 2, 2, 1),  # in the band: two threads stay, one does not come back
        (0.5, 2, 2, 1, 1),  # from a third of a core on, one spinning thread would wait for the other
        (1.0, 2, 2, 1, 1),  # a busy process beside the worker
        (1.9, 2, 2, 1, 1),  # never fewer than one
        (0.0, 16, 8, 8, 8),  # never more than the worker may run
        (3.3, 16, 16, 13, 12),
    ],
)
def test_threads_for_the_cores_others_leave(
    others: float, cores: int, most: int, fewer: int, more: int
) -> None:
    assert threads_for(others, cores, most, cpu_threads.TAKEN) == fewer
    assert threads_for(others, cores, most, cpu_threads.FREE) == more


def test_busy_seconds_reads_the_workers_cores_only(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 0 30 900 0 0 0 0 0 0\n"
        "cpu0 100 0 10 500 7 1 2 3 0 0\n"  # busy: user nice system irq softirq steal = 116
        "cpu1 200 0 20 400 0 0 0 0 0 0\n"
        "intr 12345 0 0\n"
        "cpu9 1000000 0 0 0 0 0 0 0 0 0\n"  # not a cpu line's place: the cpu lines come first
    )
    hz = os.sysconf("SC_CLK_TCK")
    assert busy_seconds({0}, str(stat)) == pytest.approx(116 / hz)
    assert busy_seconds({0, 1}, str(stat)) == pytest.approx(336 / hz)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores"
)
@pytest.mark.usefixtures("torch_threads")
def test_a_busy_process_on_a_core_takes_a_thread_and_gives_it_back() -> None:
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    changes: list[int] = []
    governor = ThreadGovernor(2, cpus=cpus, interval=0.2, on_change=changes.append)
    governor.tick()
    assert torch.get_num_threads() == 2 and changes == [2]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {min(cpus)})
        start = _cpu_seconds(hog.pid)
        while _cpu_seconds(hog.pid) - start < 0.6:  # the busy process has had its core for a while
            time.sleep(0.05)
        governor._mark = governor._read()  # a window from here, while it runs
        while _cpu_seconds(hog.pid) - start < 1.0:
            time.sleep(0.05)
        governor.tick()
        assert governor.others > 0.75, governor.others
        assert governor.threads == 1 and changes == [2, 1]
        assert torch.get_num_threads() == 1  # set in the thread that ran the tick
    finally:
        hog.kill()
        hog.wait()
    # Free again: the thread comes back after RAMP_UP windows in a row with room, not before.
    trace: list[tuple[float, int]] = []  # (others, threads) after each window
    while governor.threads == 1 and len(trace) < 40:
        governor._mark = governor._read()
        time.sleep(0.25)
        governor.tick()
        trace.append((governor.others, governor.threads))
    free = [others < cpu_threads.FREE for others, _ in trace]
    came_back = next((i for i, (_, threads) in enumerate(trace) if threads == 2), None)
    if came_back is None:
        first_free_run = next((i for i in range(len(free)) if all(free[i : i + cpu_threads.RAMP_UP])), None)
        assert first_free_run is None or first_free_run + cpu_threads.RAMP_UP > len(free), trace
        pytest.skip(f"other processes kept a core busy for 10 s: {trace}")
    assert all(free[came_back + 1 - cpu_threads.RAMP_UP : came_back + 1]), trace
    assert came_back + 1 >= cpu_threads.RAMP_UP
    assert changes == [2, 1, 2] and torch.get_num_threads() == 2
