"""The child side of process-per-model isolation: one engine in its own process, driven over pipes.

Run as ``python -m workers.engine_host``. The parent writes length-prefixed msgpack frames to the
child's standard input and reads the answers from its standard output; anything the engine or its
libraries print goes to standard error. The first frame is ``load``; then ``generate`` frames, one at
a time. The child exits at end of input; the parent usually kills it, which returns all its memory.

Frames: a 4-byte big-endian length, then a msgpack map. Requests carry ``op``; answers carry ``ok``
and either the result or ``error`` (``kind`` names the exception class).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import struct
import sys
import traceback
from typing import IO, Any

import msgpack

__all__ = ["FrameError", "read_frame", "write_frame"]

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 2**20

log = logging.getLogger(__name__)


class FrameError(Exception):
    """The pipe closed, or carried something that is not a frame."""


def write_frame(stream: IO[bytes], payload: dict[str, Any]) -> None:
    """Write one frame and flush."""
    body = msgpack.packb(payload, use_bin_type=True)
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def read_frame(stream: IO[bytes]) -> dict[str, Any]:
    """Read one frame; ``FrameError`` at end of input or on a malformed frame."""
    header = _read_exactly(stream, _HEADER.size)
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        value = msgpack.unpackb(_read_exactly(stream, size), raw=False)
    except (ValueError, msgpack.exceptions.UnpackException) as e:
        raise FrameError(f"undecodable frame: {e}") from e
    if not isinstance(value, dict):
        raise FrameError(f"frame holds {type(value).__name__}, expected a map")
    return value


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise FrameError("pipe closed")
        data += chunk
    return data


def _load(request: dict[str, Any]) -> Any:
    """Build the engine the worker would have built in-process."""
    from broker.config import WorkerSettings
    from workers.fleet.spec import load_fleet

    fields = {f.name for f in dataclasses.fields(WorkerSettings)}
    raw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                           for k, v in request["settings"].items() if k in fields}
    ws = WorkerSettings(**raw)
    fleet = load_fleet(request["fleet"], require_model_files=False)
    card = next((c for c in fleet.models if c.name == request["model"]), None)
    if card is None:
        raise LookupError(f"model {request['model']!r} is not in fleet {fleet.root}")
    from workers.worker import load_engine_factory, onnx_engine_factory

    factory = load_engine_factory(ws.engine, ws) if ws.engine else onnx_engine_factory(ws)
    return factory(card, fleet)


def _error(e: BaseException) -> dict[str, Any]:
    return {"ok": False, "kind": type(e).__name__, "error": str(e) or type(e).__name__}


def serve(inp: IO[bytes], out: IO[bytes]) -> int:
    """Load, then answer ``generate`` frames until the input closes. Returns the exit code."""
    try:
        request = read_frame(inp)
        if request.get("op") != "load":
            raise FrameError(f"first frame must be load, got {request.get('op')!r}")
        engine = _load(request)
    except FrameError:
        return 1
    except Exception as e:
        log.debug("load failed: %s", traceback.format_exc())
        write_frame(out, _error(e))
        return 1
    write_frame(out, {"ok": True, "name": engine.name, "device": engine.device, "load_s": engine.load_s,
                      "memory_bytes": int(engine.memory_bytes), "pid": os.getpid()})
    while True:
        try:
            request = read_frame(inp)
        except FrameError:
            break
        if request.get("op") != "generate":
            write_frame(out, {"ok": False, "kind": "FrameError", "error": f"unknown op {request.get('op')!r}"})
            continue
        try:
            gen = engine.generate(request["prompt"], max_new_tokens=request["max_new_tokens"],
                                  temperature=request["temperature"], seed=request["seed"],
                                  stop=tuple(request["stop"]))
        except Exception as e:
            write_frame(out, _error(e))
            continue
        write_frame(out, {"ok": True, "gen": {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)}})
    engine.close()
    return 0


def main(argv: list[str]) -> int:
    """Frames on the original stdin/stdout; stray prints (ours or a library's) land on stderr.

    ``argv[0]``, if given, is the log level (the worker passes its own).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle; it then kills us
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=argv[0] if argv else "WARNING", stream=sys.stderr,
                        format="engine-host %(process)d %(levelname)s %(message)s")
    return serve(inp, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
