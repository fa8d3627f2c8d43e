"""Validation of ingress queries against the public contract."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from broker.config import IngressSettings
from broker.errors import ValidationError
from broker.messages import Query
from broker.names import Names

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MODEL_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
KNOWN_FIELDS = frozenset(
    {"prompt", "id", "reply_to", "max_new_tokens", "temperature", "model", "slo_latency_ms", "slo_energy_j",
     "min_quality"}
)


def entry_ms(entry_id: str) -> float:
    """The wall-clock milliseconds encoded in a stream entry id."""
    head, _, _ = entry_id.partition("-")
    try:
        return float(head)
    except ValueError:
        return 0.0


def reply_stream(values: Mapping[str, Any], names: Names) -> str | None:
    """The valid ``reply_to`` of a query, or None when it is missing a valid one."""
    reply_to = values.get("reply_to", names.replies)
    if isinstance(reply_to, str) and names.replies_allowed(reply_to) and len(reply_to) <= 256:
        return reply_to
    return None


def query_id(values: Mapping[str, Any], entry_id: str) -> str:
    """The client id when it is valid, else the entry id (used to label rejections too)."""
    raw = values.get("id")
    if isinstance(raw, str) and ID_PATTERN.match(raw):
        return raw
    return entry_id


def parse_query(values: Mapping[str, Any], entry_id: str, names: Names, limits: IngressSettings) -> Query:
    """Build a :class:`Query` from decoded ingress fields or raise :class:`ValidationError` saying why."""
    prompt = values.get("prompt")
    if prompt is None:
        raise ValidationError("missing field 'prompt'")
    if not isinstance(prompt, str):
        raise ValidationError("field 'prompt' must be a string")
    if not prompt.strip():
        raise ValidationError("field 'prompt' is empty")
    size = len(prompt.encode("utf-8"))
    if size > limits.max_prompt_bytes:
        raise ValidationError(f"prompt is {size} bytes, over the limit of {limits.max_prompt_bytes}")
    raw_id = values.get("id")
    if raw_id is not None and not (isinstance(raw_id, str) and ID_PATTERN.match(raw_id)):
        raise ValidationError("field 'id' must be 1-128 characters of [A-Za-z0-9._:-]")
    if "reply_to" in values and reply_stream(values, names) is None:
        raise ValidationError(f"field 'reply_to' must name a stream starting with {names.replies!r}")
    model_raw = values.get("model", "auto")
    if not isinstance(model_raw, str) or not (model_raw in ("auto", "") or MODEL_PATTERN.match(model_raw)):
        raise ValidationError("field 'model' must be 'auto' or a model name")
    return Query(
        id=query_id(values, entry_id),
        entry_id=entry_id,
        prompt=prompt,
        reply_to=reply_stream(values, names) or names.replies,
        max_new_tokens=_int(values, "max_new_tokens", limits.default_max_new_tokens, 1, limits.max_new_tokens_limit),
        temperature=_float(values, "temperature", 0.0, 0.0, 2.0) or 0.0,
        model=None if model_raw in ("auto", "calm", "") else model_raw,
        slo_latency_ms=_float(values, "slo_latency_ms", None, 0.0, 3.6e6),
        slo_energy_j=_float(values, "slo_energy_j", None, 0.0, 1e9),
        min_quality=_float(values, "min_quality", None, 0.0, 1.0),
        arrived_ms=entry_ms(entry_id),
    )


def _int(values: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    raw = values.get(key)
    if raw is None or raw == "":
        return default
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        number = int(raw)
    except (TypeError, ValueError):
        raise ValidationError(f"field '{key}' must be an integer in {lo}..{hi}") from None
    if not lo <= number <= hi:
        raise ValidationError(f"field '{key}' must be an integer in {lo}..{hi}, got {number}")
    return number


def _float(values: Mapping[str, Any], key: str, default: float | None, lo: float, hi: float) -> float | None:
    raw = values.get(key)
    if raw is None or raw == "":
        return default
    try:
        if isinstance(raw, bool):
            raise ValueError
        number = float(raw)
    except (TypeError, ValueError):
        raise ValidationError(f"field '{key}' must be a number in {lo:g}..{hi:g}") from None
    if not lo <= number <= hi:  # also rejects NaN
        raise ValidationError(f"field '{key}' must be a number in {lo:g}..{hi:g}, got {raw}")
    return number
