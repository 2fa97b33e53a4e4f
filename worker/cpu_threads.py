"""How many threads torch runs in a CPU worker: one for each of the worker's cores that other processes
leave free, re-read every second.

torch's OpenMP threads meet at a barrier after every parallel op (a decode step of the demo model has
about 450). A thread that spins while it waits for the others (libgomp spins ~300,000 times, and `inferq
worker` sets 200,000 unless told otherwise) starts the next op at once: on free cores the engine ran
about 260 tokens/s with two spinning threads, 165-177 with threads that sleep after 1,000 spins and
161-175 with one thread (`python -m bench threads`, bench/RESULTS.md). But when another process takes
one of the cores, a spinning thread waits for a partner that is not running, and the engine collapsed
to 12-33 tokens/s.

So the worker watches its cores: every `interval` seconds it reads how much CPU the other processes used
on the cores it may run on (`/proc/stat`'s busy time of those cores, less this process's own), and runs
one thread for each core they leave free. With others at a quarter of a core two spinning threads and
one thread were even; at half a core one thread was 1.5x faster. So a thread goes once the others use
`TAKEN` of a core and comes back after `RAMP_UP` windows in a row in which they used less than `FREE`.
The band between keeps the count still under the stack's own load: the API, Valkey and PostgreSQL of
`inferq up` use 0.05-0.2 of a core while tokens stream, in bursts. The count is set in the thread that
runs the model (a forward pre-hook), where OpenMP reads it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

SPINCOUNT = "200000"  # GOMP_SPINCOUNT `inferq worker` sets before torch loads, unless the user set it
TAKEN = 0.35  # a thread goes once other processes use this much of a core
FREE = 0.2  # and comes back once they use less than this of it, RAMP_UP windows in a row
RAMP_UP = 3
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest time is inside user)


def threads_for(others: float, cores: int, most: int, taken_at: float = TAKEN) -> int:
    """Threads to run when other processes use `others` cores of the `cores` this worker may run on, a
    core counting as taken once they use `taken_at` of it."""
    taken = max(0, math.ceil(others - taken_at))
    return max(1, min(most, cores - taken))


def busy_seconds(cpus: set[int], stat: str = "/proc/stat") -> float:
    """CPU time (s) spent busy on `cpus` since boot, by every process."""
    ticks = 0
    with open(stat) as f:
        for line in f:
            if not line.startswith("cpu"):
                break  # the cpu lines come first
            name, *fields = line.split()
            if name != "cpu" and int(name[3:]) in cpus:
                ticks += sum(int(fields[i]) for i in _BUSY_FIELDS)
    return ticks / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """Call `tick()` from the thread that runs the model, before each forward pass."""

    def __init__(
        self,
        most: int,
        cpus: set[int] | None = None,
        interval: float = 1.0,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        import torch  # here, not at the top: `inferq worker` reads SPINCOUNT before torch may load

        self._get_threads, self._set_threads = torch.get_num_threads, torch.set_num_threads
        self.cpus = cpus if cpus is not None else os.sched_getaffinity(0)
        self.most = max(1, most)
        self.interval = interval
        self.threads = self.most
        self.others = 0.0  # other processes' cores in the last window
        self._on_change = on_change
        self._room = 0  # windows in a row with room for more threads
        self._mark = self._read()
        if on_change is not None:
            on_change(self.threads)

    def _read(self) -> tuple[float, float, float]:
        return time.monotonic(), busy_seconds(self.cpus), time.process_time()

    def tick(self, *_: Any) -> None:
        if time.monotonic() - self._mark[0] >= self.interval:
            self._update()
        if self._get_threads() != self.threads:  # per thread in OpenMP: set where the model runs
            self._set_threads(self.threads)

    def _update(self) -> None:
        mark = self._read()
        wall, busy, own = (b - a for a, b in zip(self._mark, mark, strict=True))
        self._mark = mark
        self.others = max(0.0, busy - own) / wall
        cores = len(self.cpus)
        fewer = threads_for(self.others, cores, self.most, TAKEN)
        more = threads_for(self.others, cores, self.most, FREE)
        if fewer < self.threads:
            self._room = 0
            self._change(fewer)
        elif more > self.threads:
            self._room += 1
            if self._room >= RAMP_UP:
                self._room = 0
                self._change(more)
        else:
            self._room = 0

    def _change(self, threads: int) -> None:
        log.info(
            "torch threads %d -> %d: other processes use %.2f of this worker's %d cores",
            self.threads,
            threads,
            self.others,
            len(self.cpus),
        )
        self.threads = threads
        if self._on_change is not None:
            self._on_change(threads)


def govern(
    model: Any, most: int | None, on_change: Callable[[int], None] | None = None
) -> ThreadGovernor | None:
    """Run `model`'s forward passes under a ThreadGovernor (CPU models on Linux); None elsewhere."""
    import torch

    on_linux = hasattr(os, "sched_getaffinity") and os.path.exists("/proc/stat")
    if str(getattr(model, "device", "cpu")) != "cpu" or not on_linux:
        return None
    governor = ThreadGovernor(most or torch.get_num_threads(), on_change=on_change)
    if governor.most > 1:
        model.register_forward_pre_hook(governor.tick)
    return governor
