"""Energy of one inference call: NVML on NVIDIA GPUs, RAPL on CPUs, else an estimate.

Use ``token = meter.start()`` before the call and ``joules = meter.stop(token, cpu_s)`` after it.
Hardware counters measure the whole device (NVML: the GPU; RAPL: the CPU packages), so calls that
overlap on one device each see the energy of all of them; a caller wanting per-call attribution
must split the joules itself (for example by tokens). Only the estimate is per call by
construction: CPU seconds of the calling thread times a fixed power per core.

A counter that fails mid-run makes ``start``/``stop`` raise ``EnergyUnavailableError``.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import EnergyUnavailableError

__all__ = [
    "DEFAULT_WATTS_PER_CORE",
    "EnergyMeter",
    "EnergyToken",
    "EstimateEnergyMeter",
    "NvmlEnergyMeter",
    "RaplEnergyMeter",
    "make_energy_meter",
]

log = logging.getLogger(__name__)

DEFAULT_WATTS_PER_CORE = 15.0
RAPL_ROOT = Path("/sys/class/powercap")
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # top-level zones only: sub-zones are inside them


@dataclass(frozen=True, slots=True)
class EnergyToken:
    """Counter readings taken by ``EnergyMeter.start`` (raw units of the meter)."""

    counters: tuple[int, ...] = ()


class EnergyMeter(ABC):
    """Measures the energy of one call; ``source`` says how ("nvml", "rapl" or "estimate")."""

    source: str

    @abstractmethod
    def start(self) -> EnergyToken:
        """Read the counters at the start of a call."""

    @abstractmethod
    def stop(self, token: EnergyToken, cpu_s: float) -> float:
        """Joules spent since ``token`` was taken; ``cpu_s`` is used by estimates only."""

    def close(self) -> None:
        """Release what the meter holds (NVML handle); idempotent."""
        return None


class EstimateEnergyMeter(EnergyMeter):
    """Joules = CPU seconds x ``watts_per_core``: an estimate, labelled "estimate"."""

    source = "estimate"

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> None:
        if not watts_per_core >= 0.0:
            raise ValueError(f"watts_per_core must be >= 0, got {watts_per_core}")
        self.watts_per_core = watts_per_core

    def start(self) -> EnergyToken:
        return EnergyToken()

    def stop(self, token: EnergyToken, cpu_s: float) -> float:
        return max(cpu_s, 0.0) * self.watts_per_core


class RaplEnergyMeter(EnergyMeter):
    """CPU package energy from Linux powercap (``intel-rapl:N/energy_uj``, also on AMD).

    Sums the top-level package zones (sub-zones such as core/dram are parts of them, psys zones
    overlap them and are skipped). A counter that wrapped between start and stop is corrected with
    the zone's ``max_energy_range_uj``. Counts every process on the packages, not just ours.
    ``root`` is the powercap directory (a parameter so tests can use a fake one).
    """

    source = "rapl"

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        zones = []
        for zone in sorted(Path(root).glob("intel-rapl:*")):
            if not _PACKAGE_ZONE.match(zone.name):
                continue
            name = _read_text(zone / "name")
            if name is not None and not name.startswith("package"):
                continue
            zones.append(zone)
        if not zones:
            raise EnergyUnavailableError(f"no RAPL package zones under {root}")
        self.zones: tuple[Path, ...] = tuple(zones)
        self._ranges = tuple(_read_uj(z / "max_energy_range_uj") for z in zones)
        self.start()  # raises EnergyUnavailableError when energy_uj is unreadable (non-root)

    def start(self) -> EnergyToken:
        return EnergyToken(tuple(_read_uj(z / "energy_uj") for z in self.zones))

    def stop(self, token: EnergyToken, cpu_s: float) -> float:
        total_uj = 0
        for before, after, span in zip(token.counters, self.start().counters, self._ranges, strict=True):
            delta = after - before
            if delta < 0:  # wrapped around once
                delta += span
            total_uj += delta
        return total_uj / 1e6


class NvmlEnergyMeter(EnergyMeter):
    """GPU energy from NVML's ``nvmlDeviceGetTotalEnergyConsumption`` (mJ, Volta and newer).

    The counter is the whole GPU's: concurrent calls on one GPU (and other processes on it) all
    land in each call's reading. The counter updates at the driver's pace, so very short calls may
    read 0 J.
    """

    source = "nvml"

    def __init__(self, gpu_index: int = 0) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise EnergyUnavailableError("pynvml (nvidia-ml-py) is not installed") from e
        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except Exception as e:
            raise EnergyUnavailableError(f"NVML init failed: {e}") from e
        self._open = True
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
            self.gpu_index = gpu_index
            self.start()
        except Exception as e:
            self.close()
            raise EnergyUnavailableError(f"NVML energy counter of GPU {gpu_index} unreadable: {e}") from e

    def start(self) -> EnergyToken:
        try:
            return EnergyToken((int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)),))
        except Exception as e:
            raise EnergyUnavailableError(f"NVML energy read failed: {e}") from e

    def stop(self, token: EnergyToken, cpu_s: float) -> float:
        return max(self.start().counters[0] - token.counters[0], 0) / 1e3

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as e:
                log.debug("nvmlShutdown failed: %s", e)


def make_energy_meter(
    device: str,
    watts_per_core: float = DEFAULT_WATTS_PER_CORE,
    gpu_index: int = 0,
    *,
    rapl_root: Path = RAPL_ROOT,
) -> EnergyMeter:
    """NVML when ``device`` is "cuda" and NVML works, else RAPL when readable, else the estimate."""
    if device == "cuda":
        try:
            return NvmlEnergyMeter(gpu_index)
        except EnergyUnavailableError as e:
            log.info("energy: NVML unavailable (%s), trying RAPL", e)
    try:
        return RaplEnergyMeter(rapl_root)
    except EnergyUnavailableError as e:
        log.info("energy: RAPL unavailable (%s); using estimate at %.1f W/core", e, watts_per_core)
    return EstimateEnergyMeter(watts_per_core)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return None


def _read_uj(path: Path) -> int:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as e:
        raise EnergyUnavailableError(f"cannot read {path}: {e}") from e
