"""One entry point for every benchmark: `python -m bench NAME [options]` (`python -m bench NAME -h`).

throughput  inferq vs `transformers serve --continuous-batching` vs a naive server, tokens/s and TTFT
submit      jobs/s one API process accepts (POST /v1/jobs) vs a bare FastAPI route, same client
sse         added latency of 1,000 concurrent SSE streams relayed by one API process
overhead    idle TTFT through inferq minus the same engine's TTFT in-process
startup     time to "inferq is up": cached starts, and (--fresh) a fresh clone
responses   background responses: create rate vs POST /v1/jobs, resume request to first event
waiting     200 clients waiting for their jobs: Prefer: wait vs polling every 50 ms vs SSE
events      token events/s of one Valkey core with the event script vs three shards; per-job costs
threads     the built-in engine's tokens/s by torch's thread count and waiting, cores free and one busy
decode-step one decode step of the built-in engine in parts: linear, attention, KV cache, sampling, Python
engines     engines through inferq side by side, alternating: streaming chat tokens/s at concurrency 16
structured  engine tokens/s at concurrency 16 with 0 %, 50 % and 100 % of requests JSON-schema constrained
tools       streaming chat tokens/s at concurrency 16 with 0 % and 100 % of requests carrying tools
embeddings  inputs embedded/s at concurrency 64 through inferq vs sentence-transformers in-process
scrape      /metrics scrapes and polls of queued jobs with 50,000 event streams in Redis, before and after
all         all of the above, then `chart`; results in bench/results.json
chart       bench/throughput.png from the throughput results
"""

from __future__ import annotations

import importlib
import sys

from bench.procs import terminate_on_sigterm

COMMANDS = {
    "throughput": "bench.peers",
    "submit": "bench.submit",
    "sse": "bench.sse",
    "overhead": "bench.overhead",
    "startup": "bench.startup",
    "responses": "bench.responses",
    "waiting": "bench.waiting",
    "structured": "bench.structured",
    "tools": "bench.tools",
    "engines": "bench.engines",
    "decode-step": "bench.decode_step",
    "threads": "bench.threads",
    "events": "bench.events",
    "scrape": "bench.scrape",
    "embeddings": "bench.embeddings",
    "all": "bench.run_all",
    "chart": "bench.chart",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown benchmark {argv[0]!r}; one of: {', '.join(COMMANDS)}")
            sys.exit(2)
        return
    terminate_on_sigterm()
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
