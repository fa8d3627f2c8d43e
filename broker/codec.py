"""Wire formats: msgpack for internal messages, plain string fields at ingress and egress."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack
import msgspec

from broker.errors import DecodeError
from broker.messages import SCHEMA_VERSION, AnyMessage, Message

PAYLOAD_FIELD = b"m"
T = TypeVar("T", bound=Message)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[AnyMessage] = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> dict[Any, Any]:
    """Stream fields for one internal message."""
    return {PAYLOAD_FIELD: _encoder.encode(message)}


def decode(fields: Mapping[bytes, bytes], entry_id: str = "", stream: str = "") -> AnyMessage:
    """Decode an internal message; any problem raises :class:`DecodeError`."""
    raw = fields.get(PAYLOAD_FIELD)
    if raw is None:
        raise DecodeError("entry has no 'm' payload field", entry_id, stream)
    try:
        message = _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise DecodeError(f"bad message payload: {e}", entry_id, stream) from e
    if message.v != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema version {message.v}", entry_id, stream)
    return message


def decode_as(kind: type[T], fields: Mapping[bytes, bytes], entry_id: str = "", stream: str = "") -> T:
    """Decode and check the message is of ``kind``."""
    message = decode(fields, entry_id, stream)
    if not isinstance(message, kind):
        raise DecodeError(f"expected {kind.__name__}, got {type(message).__name__}", entry_id, stream)
    return message


def ingress_fields(fields: Mapping[bytes, bytes], entry_id: str = "", stream: str = "") -> dict[str, Any]:
    """Plain ingress fields as ``str -> value``: UTF-8 string fields, or one ``msgpack`` map field."""
    out: dict[str, Any] = {}
    packed = fields.get(b"msgpack")
    if packed is not None:
        try:
            data = msgpack.unpackb(packed, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises many unrelated types on garbage
            raise DecodeError(f"field 'msgpack' is not valid msgpack: {type(e).__name__}", entry_id, stream) from e
        if not isinstance(data, dict):
            raise DecodeError("field 'msgpack' must hold a map", entry_id, stream)
        out.update({str(k): v for k, v in data.items()})
    for key, value in fields.items():
        if key == b"msgpack":
            continue
        try:
            name = key.decode("utf-8")
            out[name] = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError(f"field {key[:64]!r} is not valid UTF-8", entry_id, stream) from e
    return out


def readable_fields(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    """The plain fields that are valid UTF-8, ignoring the rest: enough to address a rejection."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        try:
            out[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return out


def plain_fields(values: Mapping[str, Any]) -> dict[str, str]:
    """Egress: every value as a plain string (bools as 0/1, floats rounded, None as empty)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            out[key] = ""
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        elif isinstance(value, float):
            out[key] = f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
        else:
            out[key] = str(value)
    return out
