"""Energy meters: estimate math, RAPL on a fake powercap tree, NVML with a fake pynvml, selection."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from workers.energy import (
    RAPL_ROOT,
    EnergyToken,
    EstimateEnergyMeter,
    NvmlEnergyMeter,
    RaplEnergyMeter,
    make_energy_meter,
)
from workers.errors import EnergyUnavailableError


def test_estimate_is_cpu_seconds_times_watts() -> None:
    meter = EstimateEnergyMeter(20.0)
    assert meter.source == "estimate"
    token = meter.start()
    assert meter.stop(token, 0.5) == pytest.approx(10.0)
    assert meter.stop(token, -1.0) == 0.0
    assert EstimateEnergyMeter().stop(token, 2.0) == pytest.approx(30.0)  # default 15 W per core
    with pytest.raises(ValueError):
        EstimateEnergyMeter(-1.0)


def _zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = 10_000) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(f"{label}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    pkg0 = _zone(tmp_path, "intel-rapl:0", "package-0", 9_000)
    pkg1 = _zone(tmp_path, "intel-rapl:1", "package-1", 100, max_uj=1_000_000)
    core = _zone(tmp_path, "intel-rapl:0:0", "core", 50)  # inside package-0: not counted again
    psys = _zone(tmp_path, "intel-rapl:2", "psys", 7)  # overlaps the packages: skipped
    meter = RaplEnergyMeter(tmp_path)
    assert meter.source == "rapl"
    assert meter.zones == (pkg0, pkg1)
    token = meter.start()
    assert token == EnergyToken((9_000, 100))
    (pkg0 / "energy_uj").write_text("500\n")  # wrapped: 9000 -> 10000 -> 0 -> 500 = 1500 uJ
    (pkg1 / "energy_uj").write_text("2100\n")  # 2000 uJ
    (core / "energy_uj").write_text("999999\n")
    (psys / "energy_uj").write_text("999999\n")
    assert meter.stop(token, cpu_s=123.0) == pytest.approx(3_500e-6)


def test_rapl_unreadable_or_absent(tmp_path: Path) -> None:
    with pytest.raises(EnergyUnavailableError):
        RaplEnergyMeter(tmp_path / "nothing-here")
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 1)
    (zone / "energy_uj").unlink()  # what non-root sees since Linux 5.10 is a permission error
    with pytest.raises(EnergyUnavailableError, match="energy_uj"):
        RaplEnergyMeter(tmp_path)
    assert make_energy_meter("cpu", 12.0, rapl_root=tmp_path).source == "estimate"


def test_make_energy_meter_prefers_rapl_when_readable(tmp_path: Path) -> None:
    _zone(tmp_path, "intel-rapl:0", "package-0", 1)
    assert make_energy_meter("cpu", rapl_root=tmp_path).source == "rapl"


class _FakeNvml(types.ModuleType):
    """Enough of pynvml for the meter: a counter in mJ that a test can move."""

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.energy_mj = 1_000
        self.inits = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return self.energy_mj


def test_nvml_meter_with_fake_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = make_energy_meter("cuda", gpu_index=1, rapl_root=tmp_path)
    assert isinstance(meter, NvmlEnergyMeter) and meter.source == "nvml" and meter.gpu_index == 1
    token = meter.start()
    fake.energy_mj += 2_500
    assert meter.stop(token, cpu_s=9.0) == pytest.approx(2.5)
    meter.close()
    meter.close()
    assert fake.inits == 0
    assert make_energy_meter("cpu", rapl_root=tmp_path).source == "estimate"  # NVML only for cuda


def test_nvml_failure_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(fail_init=True))
    assert make_energy_meter("cuda", 15.0, rapl_root=tmp_path).source == "estimate"
    _zone(tmp_path, "intel-rapl:0", "package-0", 1)
    assert make_energy_meter("cuda", 15.0, rapl_root=tmp_path).source == "rapl"


def test_this_machine_falls_back_to_estimate() -> None:
    try:
        RaplEnergyMeter(RAPL_ROOT)
    except EnergyUnavailableError:
        pass
    else:
        pytest.skip("this machine has readable RAPL counters")
    meter = make_energy_meter("cpu", 15.0)
    assert meter.source == "estimate"


def test_real_nvml_when_a_gpu_is_present() -> None:
    try:
        meter = NvmlEnergyMeter(0)
    except EnergyUnavailableError as e:
        pytest.skip(f"no usable NVML here: {e}")
    try:
        token = meter.start()
        assert token.counters[0] > 0
        assert meter.stop(token, 0.0) >= 0.0
    finally:
        meter.close()
