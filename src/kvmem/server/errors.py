"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, and which status
each of kvmem's errors gets."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from fastapi.responses import JSONResponse

from kvmem.errors import KVBudgetError, KVMemError, PromptTooLongError
from kvmem.server import protocol as api
from kvmem.server.loop import DrainingError, QueueFullError


class APIError(Exception):
    """An error answered as ``status`` with OpenAI's body; ``headers`` go with it (Retry-After)."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None, **headers: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers

    def response(self) -> JSONResponse:
        response = error_response(self.status, self.message, self.kind, self.code)
        response.headers.update(self.headers)
        return response


def error_response(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    body = api.ErrorResponse(error=api.ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def error_code(error: BaseException | None) -> str | None:
    if isinstance(error, KVBudgetError):
        return "kv_budget_exceeded"
    if isinstance(error, PromptTooLongError):
        return "context_length_exceeded"
    return None


def request_failed(error: BaseException | None) -> APIError:
    """A request the engine ended without a result: the client's doing (400), cut by a shutdown
    (503) or the server's fault (500)."""
    if isinstance(error, DrainingError):
        return APIError(503, str(error), "server_error", "draining")
    if isinstance(error, KVMemError) and not isinstance(error, QueueFullError):
        return APIError(400, str(error), "invalid_request_error", error_code(error))
    return APIError(500, f"the request failed: {error}", "server_error")


class Invalid(NamedTuple):
    """A body that failed validation, as OpenAI says it: a message and the field at fault."""

    message: str
    param: str | None


def invalid_body(errors: Sequence[Mapping[str, Any]], body: object) -> Invalid:
    """FastAPI's validation ``errors`` of a request ``body``: every error in the message, the first
    one's field as ``param`` (None for the body as a whole, or a body that is not JSON)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # FastAPI's loc is ("body", <character offset>)
        position, reason = first["loc"][-1], first.get("ctx", {}).get("error", "JSON decode error")
        where = json.JSONDecodeError(reason, body, position) if isinstance(body, str) else reason
        return Invalid(f"request body is not valid JSON: {where}", None)
    if isinstance(first.get("input"), bytes):  # FastAPI parses JSON only if the content type says so
        return Invalid("request body must be a JSON object sent as 'Content-Type: application/json'", None)
    fields = [".".join(str(p) for p in e.get("loc", ())[1:]) for e in errors]
    message = "; ".join(f"{field or 'request body'}: {e.get('msg')}" for field, e in zip(fields, errors))
    return Invalid(message[:2000] or "invalid request", fields[0] if fields and fields[0] else None)
