"""Logging set-up for CALM processes: plain text or JSON lines, with the query id when a line has one."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, process role, message and any extra fields."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3), "level": record.levelname, "logger": record.name, "role": self.role,
            "pid": record.process, "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class Text(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)-7s {role}[%(process)d] %(name)s: %(message)s")
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        query_id = getattr(record, "query_id", None)
        return f"{line} [query_id={query_id}]" if query_id else line


def setup(role: str, level: str = "INFO", json_lines: bool = False) -> None:
    """Configure the root logger on stderr (stdout is kept for machine-readable output)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(role) if json_lines else Text(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncio",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
