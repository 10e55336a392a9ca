"""``LLM``: generate text while kvmem's pool holds every key and value (an ``Engine`` underneath)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from os import PathLike, fspath
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from transformers import PreTrainedTokenizerBase

from kvmem.compress.policy import Policy
from kvmem.engine.config import EngineConfig
from kvmem.engine.engine import Engine
from kvmem.engine.request import Request
from kvmem.engine.result import GenerationResult
from kvmem.engine.sampling import SamplingParams
from kvmem.engine.sequence import Sequence
from kvmem.kv.pool import KVPool
from kvmem.model.dtype import resolve_dtype
from kvmem.model.loader import LoadedModel, load_model
from kvmem.model.spec import ModelSpec
from kvmem.prefix.cache import PrefixCache

if TYPE_CHECKING:
    from kvmem.engine.chat import ChatSession

# called after each prefill step of a request with (prompt tokens computed, prompt tokens to compute)
PrefillProgress = Callable[[int, int], None]


class LLM:
    """A model plus a KV pool under a byte budget, and the engine that shares it among requests.

    ``model`` is an embedded name, a model folder, a ``.gguf`` file, or an already ``LoadedModel``.
    A request that could never fit raises ``KVBudgetError`` before anything is computed; the pool
    stays usable. ``generate`` takes one prompt or a list, run as one continuous batch.
    """

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        config: EngineConfig | None = None,
        *,
        device: str | None = None,
        **overrides: Any,
    ) -> None:
        """``config`` (default ``EngineConfig()``) with ``overrides`` by field name (``kv_budget=``,
        ``policy=``, ``max_num_seqs=``, …: ``EngineConfig``'s fields; another name raises
        ``TypeError`` naming them); ``model`` (default the config's) replaces its ``model``.
        ``device`` and the config's ``dtype`` apply to a model loaded by name or path; a
        ``LoadedModel`` is used in the dtype and on the device it has."""
        if isinstance(overrides.get("disk_cache"), PathLike):
            overrides["disk_cache"] = fspath(overrides["disk_cache"])
        if isinstance(model, str):
            overrides["model"] = model
        elif model is not None:
            overrides |= {"model": model.name, "dtype": str(model.spec.dtype).removeprefix("torch.")}
        base = EngineConfig() if config is None else config
        self.config = base.replace(**overrides)  # raises TypeError for a name that is no field
        model = self.config.model if model is None else model
        if isinstance(model, str):
            device = device or "cpu"
            self.loaded = load_model(model, resolve_dtype(self.config.dtype, device), device)
        else:
            self.loaded = model
        self.engine = Engine(self.loaded, self.config)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loaded.tokenizer

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec

    @property
    def pool(self) -> KVPool:
        return self.engine.pool

    @property
    def policy(self) -> Policy | None:
        return self.engine.policy

    @property
    def prefix(self) -> PrefixCache | None:
        return self.engine.prefix

    def new_sequence(self, cache_salt: str | None = None) -> Sequence:
        """An empty sequence of the LLM's policy, in its pool; with the prefix cache on,
        ``cache_salt`` (e.g. a tenant id) keeps its cached blocks apart from every other salt's."""
        return Sequence(self.loaded.model, self.pool, self.spec, self.policy, self.prefix, cache_salt)

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        return self.engine.encode(prompt)

    @overload
    def generate(
        self,
        prompt: str | Seq[int],
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_p: float = ...,
        top_k: int = ...,
        seed: int = ...,
        stop: Seq[str] | None = ...,
        cache_salt: str | None = ...,
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        prompt: list[str] | list[list[int]],
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_p: float = ...,
        top_k: int = ...,
        seed: int = ...,
        stop: Seq[str] | None = ...,
        cache_salt: str | None = ...,
    ) -> list[GenerationResult]: ...

    def generate(
        self,
        prompt: str | Seq[int] | list[str] | list[list[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Seq[str] | None = None,
        cache_salt: str | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Complete ``prompt`` (text, or token ids used as given), or each prompt of a list, all
        in one continuous batch (results in the order of the prompts)."""
        params = SamplingParams(temperature, top_p, top_k, seed)
        prompts: list[str | Seq[int]] = list(prompt) if _is_batch(prompt) else [prompt]  # type: ignore[arg-type, list-item]
        share = self._share(len(prompts))
        ids = []
        try:
            for one in prompts:
                request = self.engine.add_request(
                    one, max_new_tokens, params, stop or (), cache_salt=cache_salt, kv_budget=share
                )
                ids.append(request)
            results = {}
            for output in self.engine.run_until_done(ids):
                if output.error is not None:
                    raise output.error
                if output.result is not None:
                    results[output.request_id] = output.result
        finally:
            for request_id in ids:
                self.engine.abort(request_id)  # nothing left of them on an error
        ordered = [results[request_id] for request_id in ids]
        return ordered if _is_batch(prompt) else ordered[0]

    def _share(self, n: int) -> int | None:
        """Each request's byte share for an evicting or offloading policy: the budget split among
        the requests that run at once (``Engine.shared_bytes``)."""
        policy = self.policy
        if policy is None or not policy.takes_share:
            return None
        budget = self.engine.shared_bytes(policy)
        if budget is None:
            return None
        return budget // max(1, min(n, self.config.max_num_seqs))

    def stream(
        self,
        prompt: str | Seq[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Seq[str] | None = None,
        cache_salt: str | None = None,
        on_prefill: PrefillProgress | None = None,
    ) -> Iterator[str | GenerationResult]:
        """Yield text pieces as they are generated, then the ``GenerationResult`` last;
        ``on_prefill(done, total)`` after each prefill step."""
        params = SamplingParams(temperature, top_p, top_k, seed)
        request_id = self.engine.add_request(
            prompt, max_new_tokens, params, stop or (), cache_salt=cache_salt, kv_budget=self._share(1)
        )
        yield from self._follow(request_id, on_prefill)

    def run(
        self,
        sequence: Sequence,
        max_new_tokens: int,
        params: SamplingParams,
        stop: Seq[str],
        on_prefill: PrefillProgress | None = None,
    ) -> Iterator[str | GenerationResult]:
        """Compute the sequence's pending tokens, then decode; yield text pieces and the result.

        The sequence stays the caller's (a chat): the last generated token is appended to its
        ``token_ids`` but not computed, so a turn that follows prefills it with its own tokens.
        """
        request_id = self.engine.add_request(None, max_new_tokens, params, stop, sequence=sequence)
        yield from self._follow(request_id, on_prefill)

    def _follow(
        self, request_id: str, on_prefill: PrefillProgress | None = None
    ) -> Iterator[str | GenerationResult]:
        watch = None if on_prefill is None else _prefill_watch(self.engine.requests[request_id], on_prefill)
        try:
            for output in self.engine.run_until_done([request_id], watch):
                if output.error is not None:
                    raise output.error
                if output.text:
                    yield output.text
                if output.result is not None:
                    yield output.result
        finally:
            self.engine.abort(request_id)

    def chat(self, system: str | None = None, cache_salt: str | None = None) -> ChatSession:
        """A multi-turn conversation whose KV state persists between turns."""
        from kvmem.engine.chat import ChatSession

        return ChatSession(self, system, cache_salt)

    def load_chat(self, path: str | Path) -> ChatSession:
        """Resume a chat saved with ``ChatSession.save``; nothing is recomputed (``kvmem.tiers.session``)."""
        from kvmem.engine.chat import load_chat

        return load_chat(self, path)


def _prefill_watch(request: Request, on_prefill: PrefillProgress) -> Callable[[], None]:
    """Called after each step: ``on_prefill`` with how many of the request's pending tokens are
    computed (reused prefix blocks count), until its first token is out."""
    total, done = request.seq.num_pending, 0

    def after_step() -> None:
        nonlocal done
        if done < total:
            ready = request.generated or request.finished
            done = total if ready else max(done, total - request.seq.num_pending)
            on_prefill(done, total)

    return after_step


def _is_batch(prompt: object) -> bool:
    """A list of prompts (texts, or lists of token ids) rather than one prompt."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list, tuple))
