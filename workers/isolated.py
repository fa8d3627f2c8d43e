"""Process-per-model isolation: an ``Engine`` whose model lives in a child process of its own.

Runtimes keep memory after a session is dropped (allocator arenas, CUDA contexts and caches), so an
in-process eviction may return little to the operating system. With ``worker.isolation = "process"``
each loaded model runs in ``python -m workers.engine_host``; generation requests are forwarded over
its pipes, and closing the engine kills the child, which returns every page it held. The memory
reported for such an engine is the child's private memory (USS: pages no other process shares),
measured after the load and again just before the kill; on CUDA the device memory the load took is
added.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO

from broker.config import WorkerSettings
from workers.engine_api import Engine, Generation
from workers.engine_host import FrameError, read_frame, write_frame
from workers.errors import EngineError, EngineLoadError
from workers.fleet.spec import Fleet, ModelCard

__all__ = ["IsolatedEngine", "isolated_engine_factory", "private_bytes"]

log = logging.getLogger(__name__)
KILL_WAIT_S = 10.0


def private_bytes(pid: int) -> int:
    """Memory only process ``pid`` holds (private clean + dirty pages, Linux); 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    total_kb = 0
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("Private_Clean", "Private_Dirty"):
            total_kb += int(rest.split()[0])
    return total_kb * 1024


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class IsolatedEngine:
    """A model served by a child process; implements ``workers.engine_api.Engine``.

    Not re-entrant, like the engine it wraps: a lock serialises ``generate`` and ``close``. When the
    child dies, the request in hand and every later one raise ``EngineError`` naming the cause, and
    ``died`` turns true so the worker can report the model unloaded.
    """

    def __init__(self, proc: subprocess.Popen[bytes], *, name: str, device: str, load_s: float,
                 memory_bytes: int, device_bytes: int) -> None:
        """Wrap a child that has loaded its model; use ``IsolatedEngine.start`` instead."""
        self.name = name
        self.device = device
        self.load_s = load_s
        self.pid = proc.pid
        self.freed_bytes = 0  # measured just before the child was killed (0 while open or if it had died)
        self._proc: subprocess.Popen[bytes] | None = proc
        self._memory_bytes = memory_bytes
        self._device_bytes = device_bytes
        self._lock = threading.Lock()

    @classmethod
    def start(cls, card: ModelCard, fleet: Fleet, settings: WorkerSettings, log_level: str = "WARNING"
              ) -> IsolatedEngine:
        """Spawn a child, have it load ``card`` as the worker would in-process, and wait for it.

        Raises ``EngineLoadError`` with the child's reason when the load fails or the child dies.
        """
        proc = subprocess.Popen([sys.executable, "-m", "workers.engine_host", log_level],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        stdin, stdout = _pipes(proc)
        try:
            write_frame(stdin, {"op": "load", "fleet": str(fleet.root), "model": card.name,
                                "settings": dataclasses.asdict(settings)})
            answer = read_frame(stdout)
        except (FrameError, OSError) as e:
            code = _reap(proc)
            raise EngineLoadError(f"{card.name}: engine process {proc.pid} died while loading "
                                  f"({_exit_reason(code)})") from e
        if not answer.get("ok"):
            _reap(proc)
            raise EngineLoadError(f"{card.name}: {answer.get('error', 'load failed')}")
        device = str(answer["device"])
        device_bytes = int(answer["memory_bytes"]) if device == "cuda" else 0
        host = private_bytes(proc.pid) or int(answer["memory_bytes"])
        log.info("%s loaded in engine process %d (%.1f MB private)", card.name, proc.pid, host / 2**20)
        return cls(proc, name=card.name, device=device, load_s=float(answer["load_s"]),
                   memory_bytes=host + device_bytes, device_bytes=device_bytes)

    @property
    def memory_bytes(self) -> int:
        """The child's private memory after the load (plus the device memory the load took on CUDA)."""
        return self._memory_bytes

    @property
    def died(self) -> bool:
        """True when the child exited without ``close`` asking it to."""
        proc = self._proc
        return proc is not None and proc.poll() is not None

    def generate(self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 stop: Sequence[str] = ()) -> Generation:
        """Forward one request to the child; ``EngineError`` when it fails there or the child is gone."""
        with self._lock:
            proc = self._proc
            if proc is None:
                raise EngineError(f"engine {self.name!r} is closed")
            stdin, stdout = _pipes(proc)
            try:
                write_frame(stdin, {"op": "generate", "prompt": prompt, "max_new_tokens": max_new_tokens,
                                    "temperature": temperature, "seed": seed, "stop": list(stop)})
                answer = read_frame(stdout)
            except (FrameError, OSError) as e:
                code = _reap(proc, kill=False)
                raise EngineError(f"{self.name}: engine process {proc.pid} died ({_exit_reason(code)}); "
                                  "the model must be loaded again") from e
        if not answer.get("ok"):
            raise EngineError(f"{self.name}: {answer.get('kind', 'Error')}: {answer.get('error', '')}")
        return Generation(**answer["gen"])

    def close(self) -> None:
        """Measure the child's memory, kill it, and reap it (waiting for a running ``generate``); idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            alive = proc.poll() is None
            self.freed_bytes = private_bytes(proc.pid) + self._device_bytes if alive else 0
            code = _reap(proc)
            log.info("closed %s: engine process %d %s, %.1f MB returned", self.name, proc.pid,
                     _exit_reason(code), self.freed_bytes / 2**20)

    def __repr__(self) -> str:
        state = "closed" if self._proc is None else ("dead" if self.died else "open")
        return f"IsolatedEngine(name={self.name!r}, pid={self.pid}, {state})"


def _pipes(proc: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes]]:
    assert proc.stdin is not None and proc.stdout is not None
    return proc.stdin, proc.stdout


def _reap(proc: subprocess.Popen[bytes], kill: bool = True) -> int | None:
    """Kill (if asked) and wait for ``proc``, close its pipes; its exit code (None if it would not die)."""
    if kill and proc.poll() is None:
        proc.kill()
    code: int | None
    try:
        code = proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.poll()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
    return code


def isolated_engine_factory(settings: WorkerSettings, log_level: str = "WARNING"
                            ) -> Callable[[ModelCard, Fleet], Engine]:
    """Engines that each run in a child process, built there as ``settings`` say (built-in or ``engine``)."""

    def load(card: ModelCard, fleet: Fleet) -> Engine:
        return IsolatedEngine.start(card, fleet, settings, log_level)

    return load
