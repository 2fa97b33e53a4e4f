"""scripts/torch_source.sh, which tells scripts/bootstrap.sh where torch comes from: PyPI's CUDA build
with an NVIDIA GPU, PyTorch's CPU wheel index without one (when it answers), the default index when it
does not. Run as bootstrap runs it, with a PATH that has a working `nvidia-smi` or none."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, _free_port

SCRIPT = REPO / "scripts" / "torch_source.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# A machine whose driver lists GPUs says so whatever PATH holds: the no-GPU cases cannot run there.
DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")
needs_no_driver = pytest.mark.skipif(
    DRIVER_GPUS.exists() and any(DRIVER_GPUS.iterdir()), reason="this machine's NVIDIA driver lists GPUs"
)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH of bash, python3 and the tools the script uses, and no nvidia-smi."""
    here = tmp_path / "bin"
    here.mkdir()
    for tool in ("bash", "uname", "grep"):
        found = shutil.which(tool)
        assert found, tool
        (here / tool).symlink_to(found)
    # This interpreter itself: a `python3` on PATH may be a shim that needs more of PATH (pyenv).
    (here / "python3").symlink_to(sys.executable)
    return here


def _source(bin_dir: Path, **env: str) -> tuple[str, str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_TORCH")}
    t0 = time.monotonic()
    done = subprocess.run(
        [str(bin_dir / "bash"), str(SCRIPT)],
        env={**clean, "PATH": str(bin_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    index, why = done.stdout.strip().split(" ", 1)
    return index, why, time.monotonic() - t0


@pytest.fixture
def cpu_index(tmp_path: Path) -> Iterator[str]:
    """A CPU wheel index that answers (its /torch/ page), on loopback."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<html></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

    port = _free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), lambda *a: Quiet(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/"
    server.shutdown()
    server.server_close()


def test_bootstrap_torch_from_the_default_index_where_nvidia_smi_lists_a_gpu(bin_dir: Path) -> None:
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    index, why, _ = _source(bin_dir, INFERQ_TORCH_CPU_INDEX="http://127.0.0.1:9/")
    assert index == "-" and "NVIDIA GPU: the CUDA build" in why


@needs_no_driver
def test_bootstrap_torch_from_the_cpu_index_without_a_gpu(bin_dir: Path, cpu_index: str) -> None:
    # An nvidia-smi that finds no GPU (a driver package on a machine without the card) counts as none.
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    index, why, _ = _source(bin_dir, INFERQ_TORCH_CPU_INDEX=cpu_index)
    assert index == cpu_index and "CPU build" in why
    smi.unlink()
    assert _source(bin_dir, INFERQ_TORCH_CPU_INDEX=cpu_index)[0] == cpu_index


@needs_no_driver
def test_bootstrap_torch_falls_back_to_the_default_index_quickly_when_the_cpu_index_is_down(
    bin_dir: Path,
) -> None:
    closed = f"http://127.0.0.1:{_free_port()}/"  # nothing listens: refused at once
    index, why, seconds = _source(bin_dir, INFERQ_TORCH_CPU_INDEX=closed)
    assert index == "-" and f"{closed} did not answer" in why and seconds < 10
    # An address that drops packets: the probe gives up after its 5 s bound.
    index, why, seconds = _source(bin_dir, INFERQ_TORCH_CPU_INDEX="http://10.255.255.1:9/")
    assert index == "-" and seconds < 10, (why, seconds)


def test_bootstrap_torch_index_from_the_environment_wins(bin_dir: Path) -> None:
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    index, why, _ = _source(bin_dir, INFERQ_TORCH_INDEX=CPU_INDEX)
    assert (index, why) == (CPU_INDEX, "INFERQ_TORCH_INDEX")
