"""The client side of the SSE fan-out benchmark, run as its own process (its own event loop and CPU
time, apart from the publisher): one connection per job to `GET /v1/jobs/{id}/events`, each read to
its `done` event. For each `token` event, added latency = receive time - the publish time (wall clock,
`t` in the event's data) the publisher stamped.

    python -m bench.sse_client --url URL --ids FILE --out FILE

Prints `READY n` once every stream has received its first event, then `DONE` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import aio
from bench.rawhttp import Connection


async def follow(
    url: str, job_id: str, first: asyncio.Event, latencies: list[float], counts: dict[str, int]
) -> None:
    conn = Connection(url)
    event = ""
    try:
        async for status, line in conn.stream_lines("GET", f"/v1/jobs/{job_id}/events"):
            if status != 200:
                counts["http_errors"] += 1
                return
            if line.startswith(b"event:"):
                event = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                now = time.time()
                first.set()
                if event == "token":
                    data = json.loads(line[5:])
                    latencies.append((now - data["t"]) * 1000)
                    counts["tokens"] += 1
                elif event == "done":
                    counts["done"] += 1
                    return
    except (OSError, asyncio.IncompleteReadError) as exc:
        counts["errors"] += 1
        print(f"stream {job_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        await conn.close()


async def main_async(url: str, ids: list[str], out: Path, connect_parallel: int) -> None:
    latencies: list[float] = []
    counts = {"tokens": 0, "done": 0, "errors": 0, "http_errors": 0}
    firsts = [asyncio.Event() for _ in ids]
    gate = asyncio.Semaphore(connect_parallel)

    async def one(job_id: str, first: asyncio.Event) -> None:
        async with gate:  # open connections a batch at a time, as a crowd of browsers would
            task = asyncio.ensure_future(follow(url, job_id, first, latencies, counts))
            await asyncio.wait(
                [task, asyncio.ensure_future(first.wait())], return_when=asyncio.FIRST_COMPLETED
            )
        await task

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(j, f)) for j, f in zip(ids, firsts, strict=True)]
    await asyncio.gather(*(f.wait() for f in firsts))
    print(f"READY {len(ids)} {time.perf_counter() - t0:.2f}", flush=True)
    await asyncio.gather(*tasks)
    result: dict[str, Any] = {"streams": len(ids), **counts, "latencies_ms": latencies}
    out.write_text(json.dumps(result))
    print("DONE", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--ids", type=Path, required=True, help="One job id a line.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--connect-parallel", type=int, default=100)
    args = parser.parse_args()
    ids = [line.strip() for line in args.ids.read_text().splitlines() if line.strip()]
    aio.run(main_async(args.url, ids, args.out, args.connect_parallel))


if __name__ == "__main__":
    main()
