"""Every benchmark in order (throughput, submit, sse, overhead), one JSON with all of them, then the chart.

python -m bench all [--json bench/results.json] [--chart bench/throughput.png] [--profile]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import chart, overhead, peers, sse, submit
from bench.machine import describe

ORDER: tuple[tuple[str, ModuleType], ...] = (
    ("throughput", peers),
    ("submit", submit),
    ("sse", sse),
    ("overhead", overhead),
)


def _defaults(module: ModuleType, log_dir: Path, profile: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args([])
    args.log_dir = log_dir
    if profile:
        args.profile = "inferq" if module is peers else True
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench all", description=__doc__)
    parser.add_argument("--json", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--chart", type=Path, default=Path("bench/throughput.png"))
    parser.add_argument("--log-dir", type=Path, default=Path("bench/out/logs"))
    parser.add_argument(
        "--only", default=",".join(name for name, _ in ORDER), help="Subset, comma-separated."
    )
    parser.add_argument("--profile", action="store_true", help="py-spy inferq's processes in each benchmark.")
    args = parser.parse_args(argv)
    wanted = {s for s in args.only.split(",") if s}
    results: dict[str, Any] = {"machine": describe()}
    if args.json.exists():  # keep what an earlier partial run measured
        results = {**json.loads(args.json.read_text()), "machine": results["machine"]}
    for name, module in ORDER:
        if name not in wanted:
            continue
        print(f"\n=== {name} ===", flush=True)
        results[name] = module.run(_defaults(module, args.log_dir, args.profile))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")  # after each, in case a later one fails
    if "throughput" in results:
        chart.draw(results, args.chart)
        print(f"\nchart: {args.chart}")
    print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
