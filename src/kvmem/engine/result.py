"""What a generation returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationStats:
    """Measurements of one request. Bytes are the pool bytes the sequence held at its end.

    The pool holds tokens in whole blocks, so the full cache it is compared with is counted in
    whole blocks too (``kv_bytes_full``): a full cache's ``kv_ratio`` is at most 1.0 however short
    the prompt, where a token-exact figure would put a 4-token prompt in 64-token blocks at 16x.
    """

    prompt_tokens: int  # tokens of this request's input
    tokens_prefilled: int  # tokens the prefill computed (a chat turn computes only its new part)
    new_tokens: int
    kv_bytes: int  # physical bytes of the sequence's KV blocks
    kv_tokens: int  # tokens the cache holds, per layer on average (after eviction, sliding windows)
    kv_bytes_full: int  # a full cache (every layer, every token seen) in whole blocks of the pool's size
    prefill_s: float
    ttft_s: float
    decode_s: float
    decode_tokens_per_s: float
    tokens_reused: int = 0  # leading prompt tokens whose cached blocks were adopted, not computed
    tokens_from_disk: int = 0  # of those, tokens whose blocks were read back from the disk tier
    tokens_from_redis: int = 0  # of those, tokens whose blocks were read back from the Redis tier
    preemptions: int = 0  # times the engine swapped the request out to make room for older ones
    tokens_seen: int = 0  # tokens of the sequence the cache has seen (computed or adopted)

    @property
    def kv_ratio(self) -> float:
        """Bytes held as a fraction of a full cache's, both in whole blocks (1.0: nothing saved)."""
        return self.kv_bytes / self.kv_bytes_full if self.kv_bytes_full else 1.0


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # the generated tokens only
    finish_reason: str  # "eos", "stop", "length" (max_new_tokens or context)
    stats: GenerationStats

    def to_json(self) -> dict[str, Any]:
        """The documented JSON of ``kvmem generate --json``."""
        stats = asdict(self.stats)
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            **stats,
            "kv_ratio": self.stats.kv_ratio,
        }
