"""The OpenAI API's request and response bodies, as ``kvmem serve`` reads and writes them.

Requests take the fields the ``openai`` client sends for completions and chat completions, plus
kvmem's own: ``kv_policy`` (a compression policy for this request), ``kv_budget`` (its byte share
of the pool), ``cache_salt`` (vLLM's name: requests with another salt never share cached blocks)
and vLLM's ``ignore_eos`` and ``top_k``. Unknown fields are ignored, as vLLM and OpenAI do;
fields kvmem does not implement (``n`` > 1, ``logprobs``, ``echo``, ``best_of``, ``suffix``,
tools, images) are refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    logprobs: bool | int | None = None
    kv_policy: str | None = Field(None, max_length=200)
    kv_budget: str | int | None = None
    cache_salt: str | None = Field(None, max_length=1000)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> SamplingFields:
        if self.n != 1:
            raise ValueError("only n=1 is supported")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # a list once validated

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is text or token ids (one prompt: ``n`` and batches
    of prompts are not supported). Without ``max_tokens``, 16 new tokens, as OpenAI's default."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: object) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("one prompt per request (send a list of prompts as separate requests)")
            value = value[0]
        if isinstance(value, list) and (not value or any(t < 0 for t in value)):
            raise ValueError("a prompt of token ids must be non-empty and non-negative")
        if isinstance(value, str) and not value:
            raise ValueError("the prompt is empty")
        return value  # type: ignore[return-value]

    @property
    def one_prompt(self) -> str | list[int]:
        return self.prompt  # type: ignore[return-value]  # one prompt once validated

    @model_validator(mode="after")
    def _plain(self) -> CompletionRequest:
        if self.echo or (self.best_of or 1) > 1 or self.suffix:
            raise ValueError("echo, best_of and suffix are not supported")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``. Without a limit (``max_completion_tokens`` or
    ``max_tokens``) the answer may run to the end of the context, as far as the KV budget could
    ever hold it."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[object] | None = None

    @model_validator(mode="after")
    def _no_tools(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvmem"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


def finish_reason(reason: str) -> str:
    """kvmem's finish reasons in OpenAI's words (``eos`` and a stop string are both ``stop``)."""
    return "length" if reason == "length" else "stop"
