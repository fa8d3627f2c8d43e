"""The interface every inference engine of a worker implements.

A worker holds engines and calls ``generate`` from a dedicated thread (style pattern 11), never
from the event loop. Implementations must not be assumed re-entrant: one ``generate`` at a time
per engine instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Engine", "Generation"]


@dataclass(frozen=True, slots=True)
class Generation:
    """The result of one ``Engine.generate`` call.

    ``confidence`` is the mean probability of the generated tokens (0..1), 0.0 when none were
    generated; each engine documents at which temperature the probabilities are taken.
    ``finish_reason`` is ``"eos"`` (end-of-sequence token), ``"length"`` (``max_new_tokens`` or the
    model's context reached) or ``"stop"`` (one of the ``stop`` strings appeared; ``text`` is cut
    before it). ``cpu_s`` is the CPU time of the calling thread (``time.thread_time`` delta), the
    input of energy estimates.
    """

    text: str
    tokens_in: int
    tokens_out: int
    confidence: float
    inference_ms: float
    finish_reason: str
    cpu_s: float


@runtime_checkable
class Engine(Protocol):
    """A loaded model that turns a prompt into a ``Generation``."""

    name: str
    device: str  # the device actually used: "cpu" or "cuda"
    load_s: float  # wall seconds the load took

    @property
    def memory_bytes(self) -> int:
        """Memory the loaded model takes, as measured at load time."""
        ...

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Generation:
        """Continue ``prompt``; greedy when ``temperature == 0``."""
        ...

    def close(self) -> None:
        """Free the model; later ``generate`` calls raise ``EngineError``."""
        ...
