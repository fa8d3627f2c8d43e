"""Errors raised by the worker package.

Third-party exceptions (onnxruntime, tokenizers, NVML) are translated into these at the
boundary with ``raise ... from e`` so callers only need to know this small hierarchy.
"""

from __future__ import annotations

__all__ = ["EnergyUnavailableError", "EngineError", "EngineLoadError", "WorkerError"]


class WorkerError(Exception):
    """Base class of every error raised by ``workers``."""


class EngineError(WorkerError):
    """An inference engine could not do what was asked (closed, bad request, runtime failure)."""


class EngineLoadError(EngineError):
    """A model could not be loaded; the message names the offending file."""


class EnergyUnavailableError(WorkerError):
    """A hardware energy counter (NVML, RAPL) cannot be read."""
