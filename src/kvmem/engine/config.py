"""The engine's configuration, validated once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmem.compress.budget import KVBudget
from kvmem.compress.registry import make_policy
from kvmem.errors import InvalidBudgetError
from kvmem.kv.budget import parse_budget
from kvmem.kv.pool import DEFAULT_BLOCK_SIZE
from kvmem.model.dtype import resolve_dtype
from kvmem.model.registry import DEFAULT_MODEL
from kvmem.prefix.cache import PrefixSharingError, can_share
from kvmem.tiers.disk import check_folder
from kvmem.tiers.redis import DEFAULT_TTL_S, check_url

# how budget errors name the sizes other than the KV budget: the Python argument and the CLI option
DISK_CACHE_MAX = "disk cache size (disk_cache_max / --disk-cache-max)"
PEAK = "prompt peak (compress_after_prompt / --compress-after-prompt)"


def _option(default: Any, text: str) -> Any:
    """A field with its help text: the one description of the option, read by ``kvmem.engine.options``
    for every command line; ``{name}`` stands for another field (a flag there, the name here)."""
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How an engine runs, by field name only; each field's ``help`` says what it means
    (``field_help``; the same text is ``kvmem generate --help``'s). ``replace`` makes a changed copy."""

    model: str = _option(DEFAULT_MODEL, "embedded name, model folder or .gguf file")
    kv_budget: int | str | None = _option(
        None,
        "KV cache budget: bytes (64MiB, a hard cap), or with {policy} also a share of a full cache "
        "(25%) or tokens per layer (512tok); none: unlimited",
    )
    policy: str | None = _option(
        None,
        "compression policy that keeps the cache within {kv_budget} (see `kvmem policies`); "
        "none: a request that does not fit is refused",
    )
    block_size: int = _option(
        DEFAULT_BLOCK_SIZE,
        "tokens per KV block; a block format keeps its last, partly filled block at full precision, "
        "so a smaller block holds fewer full-precision tokens",
    )
    prefill_chunk: int = _option(
        512, "tokens per prefill forward, so a long prompt's activations stay bounded"
    )
    prefix_cache: bool = _option(
        False,
        "reuse the KV blocks of leading tokens already computed: completed blocks stay in the pool "
        "until it needs room (no policy or a quantizer alone)",
    )
    disk_cache: str | None = _option(
        None,
        "a folder where those blocks are also written, so a later process skips their prefill "
        "(turns {prefix_cache} on; see `kvmem cache`)",
    )
    disk_cache_max: int | str | None = _option(None, "size cap of the disk cache (2GiB); none: no cap")
    max_num_seqs: int = _option(
        16,
        "sequences running at once; a policy that evicts or offloads under a byte budget gives "
        "each request the budget / {max_num_seqs} unless the request brings its own",
    )
    max_batch_tokens: int = _option(1024, "tokens one forward computes at most (decodes and prefill chunks)")
    reserve_new_tokens: int | None = _option(
        None,
        "new tokens a request's admission sets aside: when the running requests outgrow the pool "
        "the newest is preempted (swapped to disk) and resumed later; none: all of them (never "
        "preempts, fewer at once)",
    )
    dtype: str = _option(
        "auto",
        "weights and KV cache: auto (bfloat16 where the CPU computes it natively, AMX or "
        "AVX512-BF16, or on a GPU; else float32; see kvmem.model.dtype), float32 or bfloat16",
    )
    threads: int | None = _option(
        None,
        "CPU threads for the model's matrix products and kvmem's attention: one pool for both "
        "(torch.set_num_threads, for the whole process); fewer than the cores leaves room for a "
        "neighbour; none: PyTorch's default, one per core",
    )
    compress_after_prompt: int | str | None = _option(
        None,
        "a peak of KV bytes (512MiB): run each prompt at full size within it, then compress it once "
        "to {kv_budget} with the whole prompt in view; the pool's hard cap is this peak, and a "
        "prompt whose full-size KV exceeds it is refused up front; needs an eviction policy. "
        "none: compress chunk by chunk, never above the budget",
    )
    redis_cache: str | None = _option(
        None,
        "also keep reusable blocks in a Redis server that other kvmem processes share "
        "(redis://127.0.0.1:6379/0): read after RAM, before disk; a slow or dead server is a miss "
        "(turns {prefix_cache} on)",
    )
    redis_ttl_s: float | None = _option(
        DEFAULT_TTL_S, "seconds a block stays in Redis unread (its maxmemory policy may evict sooner)"
    )
    exact_reuse: bool = _option(
        True,
        "reused cached prefixes end on a multiple of {prefill_chunk} (and of {block_size}), so the "
        "rest of the prompt is computed in the chunks a cold run that prefilled in whole chunks "
        "computed it in, and the output is that run's token for token (matrix kernels round "
        "differently for different chunk lengths: in bfloat16 on CPUs with AMX that changes greedy "
        "tokens); a prompt no longer than {prefill_chunk} reuses nothing. Off: every whole cached "
        "block is reused (up to {prefill_chunk} - 1 more tokens per request), tokens may differ",
    )

    def __post_init__(self) -> None:
        budget = KVBudget.parse(self.kv_budget)
        peak = parse_budget(self.compress_after_prompt, PEAK)  # raises InvalidBudgetError
        if self.compress_after_prompt is not None:
            if peak is None:
                raise InvalidBudgetError("compress_after_prompt needs a peak in bytes, such as 512MiB")
            if budget.bytes is not None and peak < budget.bytes:
                raise InvalidBudgetError(
                    f"compress_after_prompt's peak ({self.compress_after_prompt}) is below the KV budget "
                    f"({self.kv_budget}): the prompt runs at full size first, then is compressed to it"
                )
        if self.policy is None and (budget.fraction is not None or budget.tokens is not None):
            raise InvalidBudgetError(
                f"a KV budget of {self.kv_budget!r} needs a compression policy (--policy); "
                "without one give bytes, such as 64MiB"
            )
        policy = None if self.policy is None else make_policy(self.policy, budget)  # may raise
        if self.compress_after_prompt is not None and (policy is None or policy.scorer is None):
            raise InvalidBudgetError(
                "compress_after_prompt needs an eviction policy (snapkv, h2o, …): it compresses the "
                "prompt once it has run"
            )
        parse_budget(self.disk_cache_max, DISK_CACHE_MAX)  # raises InvalidBudgetError
        if self.disk_cache is not None:
            check_folder(self.disk_cache)  # raises DiskFolderError for a file
        if self.redis_cache is not None:
            check_url(self.redis_cache)  # raises InvalidRedisURLError
        if self.redis_ttl_s is not None and self.redis_ttl_s <= 0:
            raise ValueError(f"redis_ttl_s must be positive or None, got {self.redis_ttl_s}")
        if self.shares_prefixes and not can_share(policy):
            raise PrefixSharingError(
                f"prefix caching needs no policy or a quantizer alone (kivi4, bfp4, …), not {self.policy!r}: "
                "eviction rewrites each sequence's blocks"
            )
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be positive or None, got {self.threads}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {self.prefill_chunk}")
        if self.max_num_seqs <= 0 or self.max_batch_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_seqs ({self.max_num_seqs}) must be positive and max_batch_tokens "
                f"({self.max_batch_tokens}) at least as large: every running sequence decodes each step"
            )
        resolve_dtype(self.dtype)  # raises UnsupportedDtypeError
        if self.reserve_new_tokens is not None and self.reserve_new_tokens < 0:
            raise ValueError(f"reserve_new_tokens must be >= 0 or None, got {self.reserve_new_tokens}")

    @property
    def reuse_align(self) -> int:
        """Reused prefixes are a multiple of this many tokens (see ``exact_reuse``)."""
        return self.prefill_chunk if self.exact_reuse else 1

    @property
    def shares_prefixes(self) -> bool:
        return self.prefix_cache or self.disk_cache is not None or self.redis_cache is not None

    @property
    def disk_cache_bytes(self) -> int | None:
        return parse_budget(self.disk_cache_max, DISK_CACHE_MAX)

    @property
    def budget(self) -> KVBudget:
        return KVBudget.parse(self.kv_budget)

    @property
    def pool_budget(self) -> int | None:
        """The pool's hard cap: the prompt peak when compressing after the prompt, else the budget's bytes."""
        if self.compress_after_prompt is not None:
            return parse_budget(self.compress_after_prompt, PEAK)
        return self.budget.bytes

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with ``changes`` by field name, validated again; an unknown name raises ``TypeError``
        naming the fields."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(
                f"unknown engine option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"EngineConfig's fields are: {', '.join(FIELDS)}"
            )
        return dataclasses.replace(self, **changes)


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EngineConfig))


def field_help(name: str, refer: Callable[[str], str] = lambda other: other) -> str:
    """Field ``name``'s help text, the other fields it mentions written as ``refer(their name)``."""
    (spec,) = (f for f in dataclasses.fields(EngineConfig) if f.name == name)
    return str(spec.metadata["help"]).format_map({other: refer(other) for other in FIELDS})
