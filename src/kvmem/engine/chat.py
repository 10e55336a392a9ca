"""Multi-turn chat whose KV state persists: each turn prefills only its own new tokens, and a
conversation saved to a session file (``kvmem.tiers.session``) resumes without recomputing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmem.engine.result import GenerationResult
from kvmem.engine.sampling import SamplingParams
from kvmem.tiers.session import Conversation, SessionOrigin, open_session, restore_session, write_session

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator
    from pathlib import Path

    from transformers import PreTrainedTokenizerBase

    from kvmem.engine.llm import LLM, PrefillProgress

PLAIN_STOP = "\nUser:"


class ChatSession:
    """A conversation held in one sequence of the LLM's pool.

    A turn renders the whole conversation (the tokenizer's chat template, or a plain
    ``User: … / Assistant:`` format for base models without one), and feeds the model only the
    text after what the sequence already holds. Call ``close`` (or use ``with``) to free its blocks.
    """

    def __init__(self, llm: LLM, system: str | None = None, cache_salt: str | None = None) -> None:
        self.llm = llm
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.cache_salt = cache_salt  # the tenant's prefix-cache salt; a saved session keeps it
        self.sequence = llm.new_sequence(cache_salt)
        self.turns = 0

    @property
    def kv_bytes(self) -> int:
        return self.sequence.cache.nbytes

    def send(self, message: str, max_new_tokens: int = 256, **sampling: float | int) -> GenerationResult:
        result = None
        for event in self.stream(message, max_new_tokens, None, **sampling):
            if isinstance(event, GenerationResult):
                result = event
        assert result is not None
        return result

    def stream(
        self,
        message: str,
        max_new_tokens: int = 256,
        on_prefill: PrefillProgress | None = None,
        **sampling: float | int,
    ) -> Iterator[str | GenerationResult]:
        """One turn: its text pieces, then its ``GenerationResult``; ``on_prefill(done, total)``
        after each prefill step of the turn's new tokens."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": message})
        full = self.render(self.messages, add_generation_prompt=True)
        held = str(
            self.llm.tokenizer.decode(
                self.sequence.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )
        # Normally the conversation so far is exactly what the sequence holds; if the template
        # rewrites earlier turns, append this turn as the template frames it.
        new_text = full[len(held) :] if full.startswith(held) else full[len(self.render(before, False)) :]
        new_ids = self.llm.tokenizer(new_text, add_special_tokens=False)["input_ids"]
        held_tokens = len(self.sequence.token_ids)
        self.sequence.token_ids.extend(int(t) for t in new_ids)
        params = SamplingParams(**sampling)  # type: ignore[arg-type]
        stop = () if self.has_template else (PLAIN_STOP,)
        result = None
        try:
            for event in self.llm.run(self.sequence, max_new_tokens, params, stop, on_prefill):
                if isinstance(event, GenerationResult):
                    result = event
                yield event
        except BaseException:
            # A turn refused before computing anything (budget, context) leaves the session as it
            # was, so the conversation can go on; one that failed midway cannot be rolled back.
            self.messages = before
            if self.sequence.num_cached <= held_tokens:
                del self.sequence.token_ids[held_tokens:]
            raise
        assert result is not None
        self.messages.append({"role": "assistant", "content": result.text})
        self.turns += 1

    @property
    def has_template(self) -> bool:
        return self.llm.loaded.has_chat_template

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return render_chat(self.llm.tokenizer, self.has_template, messages, add_generation_prompt)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the conversation and its KV state to ``path``, atomically (``kvmem.tiers.session``);
        ``kvmem.load_chat(llm, path)`` resumes it without recomputing anything."""
        return save_session(self, path)

    def close(self) -> None:
        self.sequence.release()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_session(session: ChatSession, path: str | os.PathLike[str]) -> Path:
    """Write ``session`` (conversation and KV state) to ``path`` atomically; return the path."""
    conversation = Conversation(
        session.messages, session.sequence.token_ids, session.turns, session.cache_salt
    )
    return write_session(path, session_origin(session.llm), conversation, session.sequence.cache)


def load_chat(llm: LLM, path: str | os.PathLike[str]) -> ChatSession:
    """A new ``ChatSession`` of ``llm`` holding the saved conversation; its blocks are allocated in
    ``llm.pool``. Raises ``SessionNotFoundError``, ``CorruptCacheError``, ``SessionMismatchError``
    or ``KVBudgetError``; on any of them the pool holds what it held before."""
    saved = open_session(path, session_origin(llm))
    conversation = saved.conversation
    session = ChatSession(llm, cache_salt=conversation.cache_salt)
    try:
        session.messages, session.turns = conversation.messages, conversation.turns
        session.sequence.token_ids = conversation.token_ids
        restore_session(saved, session.sequence.cache, llm.loaded.model.device)
    except BaseException:
        session.close()
        raise
    return session


def session_origin(llm: LLM) -> SessionOrigin:
    """What ``llm`` makes KV state with, as a session file records it (the policy in canonical
    form: ``kivi4+snapkv`` and ``snapkv+kivi4`` are one policy)."""
    budget = llm.config.kv_budget
    return SessionOrigin(
        model=llm.config.model,
        identity=llm.loaded.identity,
        policy=None if llm.policy is None else llm.policy.name,
        kv_budget=None if budget is None else str(budget),
        block_size=llm.pool.block_size,
        dtype=str(llm.spec.dtype).removeprefix("torch."),
    )


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    has_template: bool,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
) -> str:
    """The conversation as the model reads it: the tokenizer's chat template, or for a base model
    without one the plain format (stop generating at ``PLAIN_STOP``)."""
    if not messages:
        return ""
    if has_template:
        return str(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )
    # The plain format starts with the BOS token as text, as a tokenizer adds it to a prompt.
    bos = tokenizer.bos_token if tokenizer("", add_special_tokens=True)["input_ids"][:1] else ""
    return (bos or "") + render_plain(messages, add_generation_prompt)


def render_plain(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """A plain completion format for base models that have no chat template."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n")
        elif m["role"] == "user":
            parts.append(f"User: {m['content']}\n")
        else:
            parts.append(f"Assistant:{m['content']}\n")
    text = "".join(parts)
    return text + "Assistant:" if add_generation_prompt else text
