"""Errors the gateway answers with, in OpenAI's error JSON shape."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class ApiError(Exception):
    """An HTTP error with OpenAI's ``{"error": {message, type, param, code}}`` body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, calm: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.calm = calm
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": {"message": self.message, "type": self.type, "param": self.param,
                                         "code": self.code}}
        if self.calm is not None:
            out["calm"] = self.calm
        return out

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def unknown_model(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist", "invalid_request_error", "model_not_found", "model")


def overloaded(limit: int) -> ApiError:
    return ApiError(429, f"The gateway has {limit} requests in flight, its limit; retry shortly",
                    "rate_limit_error", "overloaded", headers={"Retry-After": "1"})


def no_workers() -> ApiError:
    return ApiError(503, "No CALM worker is alive right now", "service_unavailable", "no_workers",
                    headers={"Retry-After": "5"})


def timed_out(timeout_s: float, query_id: str) -> ApiError:
    return ApiError(504, f"No reply for query {query_id} within {timeout_s:g}s", "timeout", "timeout")


def unauthorized() -> ApiError:
    return ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')",
                    "invalid_request_error", "invalid_api_key")


_HTTP_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error"}


def from_http(exc: web.HTTPException) -> ApiError:
    """An aiohttp HTTP exception (unknown route, wrong method, body too large) in OpenAI's shape."""
    return ApiError(exc.status, exc.reason if exc.text is None or exc.text.startswith(f"{exc.status}:") else exc.text,
                    _HTTP_TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error"),
                    code=None)
