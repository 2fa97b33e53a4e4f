"""bench/throughput.png: generated tokens/s and TTFT p50 vs concurrency for inferq and its two peers,
from the throughput results (bench/results.json from `python -m bench all`, or a `throughput --json`).

    python -m bench chart [--results bench/results.json] [--out bench/throughput.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

STYLE = {
    "inferq": {"color": "#1f77b4", "marker": "o"},
    "transformers-serve": {"color": "#ff7f0e", "marker": "s"},
    "naive": {"color": "#7f7f7f", "marker": "^"},
}


def _throughput_section(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("benchmark") == "throughput":
        return data
    if "throughput" in data:
        return dict(data["throughput"])
    raise ValueError("no throughput results in this file")


def draw(data: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = _throughput_section(data)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, sysres in tp["systems"].items():
        levels = sysres["levels"]
        xs = [lv["concurrency"] for lv in levels]
        style = STYLE.get(name, {})
        ax1.plot(xs, [lv["tokens_per_s"] for lv in levels], label=name, **style)
        ax2.plot(xs, [lv["ttft_ms"]["p50"] for lv in levels], label=name, **style)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(tp["concurrency"], [str(c) for c in tp["concurrency"]])
        ax.set_xlabel("concurrent streaming requests")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_ylabel("generated tokens/s")
    ax1.set_title("Throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("TTFT p50 (ms, log)")
    ax2.set_title("Time to first token")
    m = tp["machine"]
    fig.suptitle(
        f"{tp['model']}, greedy, {tp['max_tokens']} new tokens/request · {m['cores']}-core CPU, no GPU · "
        f"torch {m['torch']}, transformers {m['transformers']}",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench chart", description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/throughput.png"))
    args = parser.parse_args(argv)
    out = draw(json.loads(args.results.read_text()), args.out)
    print(f"chart: {out}")
    return out


if __name__ == "__main__":
    main()
