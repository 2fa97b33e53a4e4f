"""The floor for the submit benchmark: a bare FastAPI app whose only route answers "hello", served by
uvicorn as `inferq api` serves the API (same event loop and HTTP parser, one process).

    python -m bench.hello_server --port 8000
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.post("/hello")
async def hello_post() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/hello")
async def hello_get() -> dict[str, str]:
    return {"hello": "world"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
