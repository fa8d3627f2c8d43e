"""Runtime overrides (``calm config set``): settings that running actors pick up without a restart."""

from __future__ import annotations

import logging
from typing import Any

from broker.config import Settings
from broker.runtime import ProcessRuntime

log = logging.getLogger(__name__)


class Tuning:
    """Reads the KB's runtime-config hash and yields new settings when the watched sections change."""

    def __init__(self, rt: ProcessRuntime, sections: tuple[str, ...]) -> None:
        self.rt = rt
        self.prefixes = tuple(f"{s}.".encode() for s in sections)
        self._seen: dict[str, str] = {}

    async def poll(self) -> Settings | None:
        """New settings when the overrides changed (and are valid), else None."""
        raw: Any = await self.rt.client.hgetall(self.rt.names.runtime_config)
        overrides = {k.decode(): v.decode() for k, v in raw.items() if k.startswith(self.prefixes)}
        if overrides == self._seen:
            return None
        self._seen = overrides
        try:
            settings = self.rt.settings.replace(overrides)
        except ValueError as e:
            log.error("%s: ignoring runtime config %s: %s", self.rt.role, overrides, e)
            return None
        log.info("%s: runtime config now %s", self.rt.role, overrides or "defaults")
        return settings
