"""The HTTP side of ``kvmem serve``: FastAPI routes in OpenAI's shape over one ``EngineLoop``.

Every error a client can cause is a 4xx in OpenAI's error shape (``kvmem.server.errors``): 400
for a bad body (FastAPI's 422 is answered as 400, as OpenAI does), a budget it could never fit, a
prompt too long or an unknown policy; 401 without the API key; 404 for another model's name; 413
for a body over the size limit; 429 with ``Retry-After`` when the queue is full; 503 while
draining. A client that disconnects aborts its request (``kvmem.server.responses``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvmem.engine.chat import PLAIN_STOP, render_chat
from kvmem.engine.sampling import SamplingParams
from kvmem.errors import KVMemError
from kvmem.model.loader import LoadedModel
from kvmem.server import protocol as api
from kvmem.server.errors import APIError, error_code, error_response, invalid_body
from kvmem.server.limits import BodyLimit
from kvmem.server.loop import DrainingError, EngineLoop, Handle, QueueFullError, Submission, refusal_reason
from kvmem.server.responses import Responder

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class ServeConfig:
    """``api_keys``: if any, every ``/v1`` request must bring one (``Authorization: Bearer``).
    ``isolate_tenants``: each key's requests get a cache salt derived from the key, so one
    tenant never adopts another's cached blocks. ``drain_timeout_s``: how long a shutdown lets
    running requests finish."""

    model_name: str
    api_keys: tuple[str, ...] = ()
    isolate_tenants: bool = False
    max_waiting: int = 64
    max_body_bytes: int = 4 * 2**20
    drain_timeout_s: float = 30.0


def create_app(loaded: LoadedModel, loop: EngineLoop, config: ServeConfig) -> FastAPI:
    metrics = loop.metrics
    context = loaded.spec.max_context
    started = int(time.time())
    responder = Responder(loop, config.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.start(asyncio.get_running_loop())
        yield
        await run_in_threadpool(loop.drain, config.drain_timeout_s)

    app = FastAPI(title="kvmem", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    def refuse(status: int, message: str, kind: str, reason: str, code: str | None = None) -> APIError:
        metrics.refused.labels(reason).inc()
        return APIError(status, message, kind, code)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.refused.labels("invalid").inc()
        invalid = invalid_body(exc.errors(), exc.body)
        return error_response(400, invalid.message, "invalid_request_error", None, invalid.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            return error_response(400, f"request body is not valid JSON: {exc.__cause__}", kind)
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    def tenant(request: Request) -> str | None:
        """The API key's tenant salt (None without isolation); 401 without a valid key."""
        if not config.api_keys:
            return None
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
            raise refuse(
                401, "missing or invalid API key", "authentication_error", "unauthorized", "invalid_api_key"
            )
        return hashlib.sha256(key.encode()).hexdigest()[:16] if config.isolate_tenants else None

    # --- plain routes
    @app.get("/health")
    async def health() -> Response:
        if loop.draining:
            return error_response(503, "draining", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=api.ModelList)
    async def models(_: str | None = Depends(tenant)) -> api.ModelList:
        return api.ModelList(data=[api.ModelCard(id=config.model_name, created=started)])

    # --- completions
    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            message = f"the model {name!r} does not exist; this server has {config.model_name!r}"
            raise APIError(404, message, "not_found_error", "model_not_found")

    def submission(
        body: api.SamplingFields, prompt: list[int], limit: int | None, stop: list[str], salt: str | None
    ) -> Submission:
        if context and (len(prompt) >= context or len(prompt) + (limit or 0) > context):
            asked = f" and {limit} for the completion" if limit else ""
            message = (
                f"this model's maximum context length is {context} tokens; this request asks for "
                f"{len(prompt)} in the prompt{asked}"
            )
            raise refuse(400, message, "invalid_request_error", "prompt_too_long", "context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        seed = body.seed if body.seed is not None else random.getrandbits(63)
        params = SamplingParams(temperature, body.top_p or 1.0, body.top_k or 0, seed)
        cache_salt = body.cache_salt if salt is None else f"{salt}/{body.cache_salt or ''}"
        policy = None if body.kv_policy is None else body.kv_policy.strip()
        if policy in ("none", "full"):
            policy = ""
        return Submission(
            prompt, limit, params, tuple(stop), policy, cache_salt, body.kv_budget, body.ignore_eos
        )

    async def start(sub: Submission) -> Handle:
        try:
            return await loop.submit(sub)
        except QueueFullError as exc:
            metrics.refused.labels("queue_full").inc()
            retry = {"Retry-After": str(exc.retry_after_s)}
            raise APIError(429, str(exc), "rate_limit_error", "queue_full", **retry) from exc
        except DrainingError as exc:
            metrics.refused.labels("draining").inc()
            raise APIError(503, str(exc), "server_error", "draining") from exc
        except (KVMemError, ValueError) as exc:
            raise refuse(
                400, str(exc), "invalid_request_error", refusal_reason(exc), error_code(exc)
            ) from exc

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: api.CompletionRequest, request: Request, salt: str | None = Depends(tenant)
    ) -> Response:
        check_model(body.model)
        ids = await run_in_threadpool(prompt_ids, loaded, body.one_prompt)
        limit = body.max_tokens or COMPLETION_DEFAULT_TOKENS
        handle = await start(submission(body, ids, limit, body.stops, salt))
        return await responder.answer(request, handle, body, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: api.ChatCompletionRequest, request: Request, salt: str | None = Depends(tenant)
    ) -> Response:
        check_model(body.model)
        messages = [{"role": _role(m.role), "content": m.text} for m in body.messages]
        ids = await run_in_threadpool(chat_ids, loaded, messages)
        stop = body.stops + ([] if loaded.has_chat_template else [PLAIN_STOP])
        handle = await start(submission(body, ids, body.limit, stop, salt))
        return await responder.answer(request, handle, body, chat=True)

    return app


def _role(role: str) -> str:
    return "system" if role == "developer" else role  # OpenAI's newer name for the system role


def prompt_ids(loaded: LoadedModel, prompt: str | list[int]) -> list[int]:
    """A completion's prompt as token ids: text tokenized as ``LLM.generate`` does, ids checked."""
    if isinstance(prompt, str):
        return list(loaded.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    vocab = loaded.model.config.vocab_size
    if any(t >= vocab for t in prompt):
        raise APIError(400, f"token ids must be below the vocabulary size {vocab}", "invalid_request_error")
    return list(prompt)


def chat_ids(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    """The conversation as the model reads it (its chat template, or kvmem's plain format)."""
    text = render_chat(loaded.tokenizer, loaded.has_chat_template, messages, add_generation_prompt=True)
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
