"""OpenAI request bodies to CALM queries, and CALM replies to OpenAI response bodies (pure functions).

Chat messages become one prompt: a conversation of a single user message is sent as that message's
text, unchanged; anything longer is sent as a ``role: content`` transcript ending in ``assistant:``.
The worker then applies the chosen model's ``prompt_template`` to that prompt, as for any query.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.config import IngressSettings
from broker.errors import ValidationError
from broker.ingress import ID_PATTERN, parse_query
from broker.names import Names
from calm.gateway.errors import ApiError, bad_request

AUTO_MODELS = ("calm", "auto")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "response_format")
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "id": "Idempotency-Key"}
_FLOAT_FIELDS = ("latency_ms", "route_ms", "queue_ms", "inference_ms", "energy_j", "confidence")
_INT_FIELDS = ("tokens_in", "tokens_out", "attempts")
_BOOL_FIELDS = ("cached", "slo_met")


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """What one OpenAI request asks CALM for: one query per prompt, with shared parameters."""

    kind: str  # "chat" | "text"
    model: str  # as requested: "calm"/"auto" or a model name
    prompts: tuple[str, ...]
    fields: dict[str, str] = field(default_factory=dict)  # ingress fields shared by every prompt
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()

    @property
    def pinned(self) -> str | None:
        return None if self.model in AUTO_MODELS else self.model


def render_chat(messages: Any) -> str:
    """The prompt for a list of chat messages (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", "messages")
        turns.append((str(role), _text_content(message.get("content"), i)))
    if turns[-1][0] != "user":
        raise bad_request("the last message must come from the user", "messages")
    if len(turns) == 1:
        return turns[0][1]
    return "\n".join(f"{role}: {text}" for role, text in turns) + "\nassistant:"


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{index}].content must be a string or an array of text parts", "messages")


def parse_request(kind: str, body: Any, query_id: str, names: Names, limits: IngressSettings) -> QueryRequest:
    """Validate an OpenAI body (``kind`` "chat" or "text") against the OpenAI shape and CALM's ingress rules."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", "model")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], False):
            raise bad_request(f"'{name}' is not supported by CALM", name, "unsupported_parameter")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise bad_request("only n=1 is supported", "n", "unsupported_parameter")
    if kind == "chat":
        prompts: tuple[str, ...] = (render_chat(body.get("messages")),)
    else:
        prompts = _text_prompts(body.get("prompt"))
    fields: dict[str, str] = {"model": "auto" if model in AUTO_MODELS else model}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        fields["max_new_tokens"] = _number_text(max_tokens, "max_tokens")
    for name in ("temperature", "slo_latency_ms", "slo_energy_j", "min_quality"):
        if body.get(name) is not None:
            fields[name] = _number_text(body[name], name)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    request = QueryRequest(kind=kind, model=model, prompts=prompts, fields=fields, stream=stream,
                           include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
                           stop=_stop(body.get("stop")))
    for i, prompt in enumerate(prompts):
        try:  # the same rules the monitor applies at ingress, so a bad request never leaves the gateway
            parse_query({**fields, "prompt": prompt, "id": sub_id(query_id, i, len(prompts))}, "0-0", names, limits)
        except ValidationError as e:
            key = str(e).split("'")[1] if str(e).count("'") >= 2 else ""
            param = _PARAM_NAMES.get(key, "messages" if kind == "chat" else "prompt")
            raise bad_request(str(e), param) from None
        except UnicodeEncodeError:  # JSON may carry a lone surrogate (\ud800), which is not text
            param = "messages" if kind == "chat" else "prompt"
            raise bad_request("the prompt is not valid Unicode (it holds a lone surrogate)", param) from None
    return request


def _text_prompts(prompt: Any) -> tuple[str, ...]:
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > 64:
            raise bad_request("at most 64 prompts per request", "prompt")
        return tuple(prompt)
    raise bad_request("'prompt' must be a string or a non-empty array of strings", "prompt")


def _number_text(value: Any, param: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{param}' must be a number", param)
    return repr(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return tuple(s for s in value if s)
    raise bad_request("'stop' must be a string or an array of at most 4 strings", "stop")


def query_id_from(header: str | None, generated: str) -> str:
    """The query id: the ``Idempotency-Key`` header when given (and valid), else ``generated``."""
    if header is None:
        return generated
    if not ID_PATTERN.match(header) or len(header) > 120:
        raise bad_request("Idempotency-Key must be 1-120 characters of [A-Za-z0-9._:-]", "Idempotency-Key")
    return header


def sub_id(query_id: str, index: int, count: int) -> str:
    """The query id of prompt ``index`` of ``count`` (a batch of completions prompts)."""
    return query_id if count == 1 else f"{query_id}:{index}"


# -- replies -------------------------------------------------------------------------
def calm_object(reply: Mapping[str, str]) -> dict[str, Any]:
    """The reply fields with numbers as numbers and flags as booleans."""
    out: dict[str, Any] = {}
    for key, value in reply.items():
        if key == "received_ms":
            continue
        if key in _FLOAT_FIELDS:
            out[key] = _to(float, value)
        elif key in _INT_FIELDS:
            out[key] = _to(int, value)
        elif key in _BOOL_FIELDS:
            out[key] = value in ("1", "true", "True")
        else:
            out[key] = value
    return out


def _to(kind: type, value: str) -> Any:
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def reply_error(reply: Mapping[str, str], pinned: str | None) -> ApiError | None:
    """The HTTP error for a reply that is not ``ok`` (None when it is)."""
    status = reply.get("status")
    if status == "ok":
        return None
    reason = reply.get("error") or "unknown error"
    calm = calm_object(reply)
    if status == "rejected":
        if reason.startswith("overloaded"):  # the planner shed it: every eligible model's queue is full
            return ApiError(429, reason, "rate_limit_error", "overloaded", None, calm, {"Retry-After": "1"})
        if pinned and "model" in reason and ("unknown" in reason or "not registered" in reason):
            return ApiError(404, reason, "invalid_request_error", "model_not_found", "model", calm)
        return ApiError(400, reason, "invalid_request_error", "rejected", None, calm)
    return ApiError(500, reason, "server_error", "calm_error", None, calm)


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` cut at the first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def finish_reason(reply: Mapping[str, str], stopped: bool) -> str:
    if stopped:
        return "stop"
    return "length" if reply.get("finish_reason") == "length" else "stop"


def usage(replies: Sequence[Mapping[str, str]]) -> dict[str, int]:
    prompt = sum(_to(int, r.get("tokens_in", "0")) or 0 for r in replies)
    completion = sum(_to(int, r.get("tokens_out", "0")) or 0 for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(query_id: str, reply: Mapping[str, str], stop: tuple[str, ...]) -> dict[str, Any]:
    text, stopped = apply_stop(reply.get("text", ""), stop)
    return {
        "id": f"chatcmpl-{query_id}", "object": "chat.completion", "created": int(time.time()),
        "model": reply.get("model", ""), "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason(reply, stopped)}],
        "usage": usage([reply]), "calm": calm_object(reply),
    }


def chat_chunks(query_id: str, reply: Mapping[str, str], stop: tuple[str, ...],
                include_usage: bool) -> list[dict[str, Any]]:
    """The stream for one whole reply: the role and full text in one delta, then the finish chunk."""
    text, stopped = apply_stop(reply.get("text", ""), stop)
    base = {"id": f"chatcmpl-{query_id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": reply.get("model", ""), "system_fingerprint": None}
    chunks: list[dict[str, Any]] = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": None,
                              "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                              "finish_reason": finish_reason(reply, stopped)}], "calm": calm_object(reply)},
    ]
    if include_usage:
        chunks.append({**base, "choices": [], "usage": usage([reply])})
    return chunks


def text_completion(query_id: str, replies: Sequence[Mapping[str, str]], stop: tuple[str, ...]) -> dict[str, Any]:
    choices = []
    for i, reply in enumerate(replies):
        text, stopped = apply_stop(reply.get("text", ""), stop)
        choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason(reply, stopped)})
    models = sorted({r.get("model", "") for r in replies})
    return {
        "id": f"cmpl-{query_id}", "object": "text_completion", "created": int(time.time()),
        "model": ",".join(models), "system_fingerprint": None, "choices": choices, "usage": usage(replies),
        "calm": calm_object(replies[0]) if len(replies) == 1 else [calm_object(r) for r in replies],
    }


def text_chunks(query_id: str, replies: Sequence[Mapping[str, str]], stop: tuple[str, ...],
                include_usage: bool) -> list[dict[str, Any]]:
    base = {"id": f"cmpl-{query_id}", "object": "text_completion", "created": int(time.time())}
    chunks: list[dict[str, Any]] = []
    for i, reply in enumerate(replies):
        text, stopped = apply_stop(reply.get("text", ""), stop)
        chunks.append({**base, "model": reply.get("model", ""), "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason(reply, stopped)}],
            "calm": calm_object(reply)})
    if include_usage:
        chunks.append({**base, "model": replies[0].get("model", ""), "choices": [], "usage": usage(replies)})
    return chunks


def model_entry(name: str, created: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "calm"}
    if extra:
        entry["calm"] = dict(extra)
    return entry
