"""Claiming the jobs a queue poll found, in one Redis round trip.

arq's `Worker.start_jobs` claims each polled job on its own: WATCH its in-progress key, EXISTS, ZSCORE,
then MULTI/PSETEX/EXEC, four round trips a job, one job after another. And since arq leaves a job in
its queue until it ends, every poll finds again the jobs this worker is running and examines each of
them the same way (three or four round trips to learn that it is taken). For short jobs (an embedding
is a few milliseconds of model time) those round trips were a large part of the worker's own work.

`ClaimingWorker` claims them all in one Lua call with arq's own rules and keys: a job is taken when no
in-progress key exists for it and its queue score is due (not deferred, not already removed), by
setting that key for the worker's in-progress timeout; a script runs atomically, as arq's WATCH/MULTI
transaction does, so two workers never take one job. The jobs this worker already holds are left out
before the call. Each taken job then runs through arq's own `run_job`, as before.
"""

from __future__ import annotations

from typing import Any

from arq.utils import timestamp_ms
from arq.worker import Worker

from shared import keys

# KEYS: the queue, then one in-progress key per candidate; ARGV: now (ms), the in-progress timeout (ms),
# how many jobs may be taken, then the candidates' ids. Returns the taken jobs as id, score, id, score...
CLAIM = """
local now = tonumber(ARGV[1])
local room = tonumber(ARGV[3])
local taken = {}
for i = 2, #KEYS do
  if #taken >= 2 * room then break end
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local id = ARGV[i + 2]
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score and tonumber(score) <= now then
      redis.call('PSETEX', KEYS[i], ARGV[2], '1')
      taken[#taken + 1] = id
      taken[#taken + 1] = score
    end
  end
end
return taken
"""


class ClaimingWorker(Worker):
    """arq's Worker, with the jobs of a poll claimed in one round trip (see the module's docstring)."""

    _claim_script: Any = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        room = self.max_jobs - self.job_counter
        held = self.tasks
        candidates = [i for i in (j.decode() for j in job_ids) if i not in held]
        if room <= 0 or not candidates:
            return
        if self._claim_script is None:
            self._claim_script = self.pool.register_script(CLAIM)
        taken: list[bytes] = await self._claim_script(
            keys=[self.queue_name, *(keys.ARQ_IN_PROGRESS_PREFIX + i for i in candidates)],
            args=[timestamp_ms(), int(self.in_progress_timeout_s * 1000), room, *candidates],
        )
        for n in range(0, len(taken), 2):
            job_id, score = taken[n].decode(), int(float(taken[n + 1]))
            await self.sem.acquire()  # never waits: at most `room` jobs are taken
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
