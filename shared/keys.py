"""Redis key and channel names, laid out for Redis Cluster: every command or script that touches
several keys touches keys of one hash slot (the part of a key between its first `{` and `}`).

- Queue state, `{inferq}`: the queues of every model, their fair-queuing clocks and all of arq's keys
  (job records, in-progress locks, retries, results, the abort set). arq moves a job between these in
  MULTI/EXEC transactions, and arq's abort set is one key for all queues, so they share one tag.
- Per job, `{<job_id>}`: its event stream and cancel flag, spread over the cluster by job id. They carry
  nearly all of the traffic (one script call per generated token).
- Workers, `{workers}`: the registry entries and their index, read together (the index, then one MGET).

Two Redis roles: the queue's Redis (`INFERQ_REDIS_URL`: queue state, arq, workers, leases, limits, the
cancel broadcast) and the events Redis (`INFERQ_EVENTS__REDIS_URL`, by default the same one): per-job
streams, live channels and cancel flags, which may be spread over the shards of a Redis Cluster. On a
cluster a job's live channel is a sharded channel (`SPUBLISH`/`SSUBSCRIBE`) in its stream's slot.
"""

from __future__ import annotations

import arq.connections
import arq.constants
import arq.jobs
import arq.worker

CANCEL_CHANNEL = "inferq:cancel"
JOB_FUNCTION = "run_job"  # the arq function the API enqueues and the worker registers

QUEUE_TAG = "{inferq}"
ARQ_JOB_PREFIX = f"{QUEUE_TAG}:arq:job:"
ARQ_IN_PROGRESS_PREFIX = f"{QUEUE_TAG}:arq:in-progress:"

# arq names its keys with module constants and has no setting for them; these put them under the
# queues' tag, in every arq module that reads them (arq reads them at call time, so this holds for
# every process that imports this module, which the API and the worker both do before using arq).
_ARQ_KEYS = {
    "job_key_prefix": ARQ_JOB_PREFIX,
    "in_progress_key_prefix": ARQ_IN_PROGRESS_PREFIX,
    "retry_key_prefix": f"{QUEUE_TAG}:arq:retry:",
    "result_key_prefix": f"{QUEUE_TAG}:arq:result:",
    "abort_jobs_ss": f"{QUEUE_TAG}:arq:abort",
    "default_queue_name": f"{QUEUE_TAG}:arq:queue",
}
for _module in (arq.constants, arq.connections, arq.jobs, arq.worker):
    for _name, _value in _ARQ_KEYS.items():
        if hasattr(_module, _name):
            setattr(_module, _name, _value)


def events_stream(job_id: str) -> str:
    return f"inferq:{{{job_id}}}:events"


def live_channel(job_id: str) -> str:
    return f"inferq:{{{job_id}}}:live"


def relay_home(pid: int, hub: int) -> str:
    """A channel no one publishes to, that an API process's relay stays subscribed to so that its
    reader never idles on an empty subscription set."""
    return f"inferq:relay:{pid}:{hub}"


def cancel_flag(job_id: str) -> str:
    return f"inferq:{{{job_id}}}:cancel"


WORKER_PREFIX = "inferq:{workers}:"
# The registry's index: a sorted set of worker ids scored by when their entry expires (ms since the
# epoch), so that readers list the fleet in O(workers) instead of a SCAN of the keyspace. It is named
# outside WORKER_PREFIX so that an older reader's SCAN of that prefix never meets it.
WORKER_INDEX = "inferq:index:{workers}"


def lease(duty: str) -> str:
    """Who does a fleet-wide duty's ticks now (one API process at a time)."""
    return f"inferq:lease:{duty}"


def worker_key(worker_id: str) -> str:
    return WORKER_PREFIX + worker_id


def token_quota(key_id: str, day: str) -> str:
    """Tokens generated under an API key on one UTC day (YYYYMMDD); the worker adds each job's."""
    return f"inferq:quota:{key_id}:{day}"


def request_window(key_id: str, window: int) -> str:
    return f"inferq:rate:{key_id}:{window}"


def wake_channel(queue: str) -> str:
    """Published to on every enqueue: idle workers of the queue wake at once instead of polling."""
    return f"{queue}:wake"


def fair_clock(queue: str) -> str:
    """Per-tenant virtual start times of one queue (fair queuing between tenants)."""
    return f"{queue}:fair"


# The secret stream tokens are signed with when INFERQ_STREAM_TOKEN_SECRET is unset: made once by whichever
# API process needs it first (SET NX), then read by all, so a token minted by one replica works on another.
STREAM_TOKEN_SECRET = "inferq:stream-token-secret"
