"""Finding the fleet a command should use."""

from __future__ import annotations

from pathlib import Path

from broker.config import Settings
from workers.fleet.spec import Fleet, load_fleet

DEFAULT_PROFILE = "demo"


def fleet_dir(settings: Settings, profile: str = DEFAULT_PROFILE) -> Path:
    """``paths.fleet`` when set; otherwise the cached fleet of ``profile`` (built on first use)."""
    if settings.paths.fleet:
        return Path(settings.paths.fleet).expanduser().resolve()
    from workers.fleet import build_fleet

    return Path(build_fleet(profile, Path(settings.paths.cache_dir).expanduser()))


def open_fleet(settings: Settings) -> Fleet:
    return load_fleet(fleet_dir(settings))
