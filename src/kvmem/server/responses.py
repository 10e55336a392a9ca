"""A request's outputs turned into OpenAI's answers: one JSON body, or server-sent events.

Either way a request whose client goes away is aborted at once, so its blocks go back to the pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvmem.engine.request import RequestOutput
from kvmem.server import protocol as api
from kvmem.server.errors import request_failed
from kvmem.server.loop import EngineLoop, Handle

CLIENT_GONE = 499  # nginx's status for a client that closed the connection (nobody reads it)


@dataclass(frozen=True)
class Responder:
    loop: EngineLoop
    model: str

    async def answer(
        self, request: Request, handle: Handle, body: api.SamplingFields, chat: bool
    ) -> Response:
        if body.stream:
            events = self.events(handle, chat, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        texts, last = [], None
        try:
            while last is None or not last.finished:
                try:
                    last = await asyncio.wait_for(handle.outputs.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=CLIENT_GONE)
                    continue
                texts.append(last.text)
        finally:
            if last is None or not last.finished:
                self.loop.abort(handle.request_id)
        if last.result is None:
            return request_failed(last.error).response()
        usage, text = usage_of(last), "".join(texts)
        reason, created = api.finish_reason(last.result.finish_reason), int(time.time())
        out: api.BaseModel
        if chat:
            choice = api.ChatChoice(message=api.AssistantMessage(content=text), finish_reason=reason)
            out = api.ChatCompletionResponse(
                id=chat_id(handle), created=created, model=self.model, choices=[choice], usage=usage
            )
        else:
            choices = [api.CompletionChoice(text=text, finish_reason=reason)]
            out = api.CompletionResponse(
                id=handle.request_id, created=created, model=self.model, choices=choices, usage=usage
            )
        return JSONResponse(out.model_dump())

    async def events(self, handle: Handle, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the finish reason, usage if asked, [DONE]."""
        finished = False
        chunk = _Chunks(chat_id(handle) if chat else handle.request_id, self.model, chat, int(time.time()))
        try:
            if chat:
                yield chunk.text("", role="assistant")
            while not finished:
                output = await handle.outputs.get()
                finished = output.finished
                if output.error is not None:
                    yield sse(json.loads(bytes(request_failed(output.error).response().body)))
                    break
                reason = None if output.result is None else api.finish_reason(output.result.finish_reason)
                if output.text or reason is not None:
                    yield chunk.text(output.text, reason=reason)
                if output.result is not None and include_usage:
                    yield chunk.usage(usage_of(output))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server stops): free its blocks now
                self.loop.abort(handle.request_id)


@dataclass(frozen=True)
class _Chunks:
    id: str
    model: str
    chat: bool
    created: int

    def _head(self) -> dict[str, object]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def text(self, text: str, reason: str | None = None, role: str | None = None) -> str:
        if self.chat:
            delta = api.Delta(role="assistant" if role else None, content=text)
            choice = api.ChatChunkChoice(delta=delta, finish_reason=reason).model_dump(exclude_none=True)
            choice.setdefault("finish_reason", None)
        else:
            choice = api.CompletionChoice(text=text, finish_reason=reason).model_dump()
        return sse({**self._head(), "choices": [choice]})

    def usage(self, usage: api.Usage) -> str:
        return sse({**self._head(), "choices": [], "usage": usage.model_dump()})


def chat_id(handle: Handle) -> str:
    return f"chat{handle.request_id}"


def sse(data: dict[str, object]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def usage_of(output: RequestOutput) -> api.Usage:
    assert output.result is not None
    s = output.result.stats
    return api.Usage(
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.new_tokens,
        total_tokens=s.prompt_tokens + s.new_tokens,
        prompt_tokens_details=api.PromptTokensDetails(cached_tokens=s.tokens_reused),
    )
