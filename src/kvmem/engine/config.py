"""The engine's configuration, validated once."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class EngineConfig:
    """``kv_budget``: bytes (int), a size string (``"64MiB"``) or None for unlimited.

    ``prefill_chunk``: tokens per prefill forward, so a long prompt's activations stay bounded.
    ``prefix_cache``: keep completed blocks for reuse by later requests with the same leading
    tokens (they stay in the pool until it needs room); no policy or a quantizer alone.
    ``disk_cache``: a folder where those blocks are also written, so a later process reuses them
    (turns ``prefix_cache`` on); ``disk_cache_max``: its size cap (``"2GiB"``; None: no cap).
    ``redis_cache``: a Redis URL (``redis://127.0.0.1:6379/0``) whose server every process pointing
    at it shares: the tier after RAM and before disk (turns ``prefix_cache`` on); ``redis_ttl_s``:
    how long a block stays there unread (Redis's own ``maxmemory`` policy evicts before that).
    ``exact_reuse``: a cached prefix is reused up to a multiple of ``prefill_chunk`` (and of
    ``block_size``) only, so the rest of the prompt is computed in the chunks a cold run that
    prefilled in whole ``prefill_chunk`` chunks (a request alone, or with room in its steps)
    computed it in, and the output is that cold run's token for token (matrix kernels round
    differently for different chunk lengths: in bfloat16 on CPUs with AMX that changes greedy
    tokens). A prompt no longer than ``prefill_chunk`` reuses nothing; keep ``prefill_chunk`` a
    multiple of ``block_size``, or reuse points are their least common multiple. False: every whole
    cached block is reused (up to ``prefill_chunk - 1`` more tokens per request), tokens may differ.
    ``max_num_seqs``: sequences running at once; a policy that evicts or offloads under a byte
    budget gives each request ``budget / max_num_seqs`` unless the request brings its own.
    ``max_batch_tokens``: tokens one forward computes at most (decodes and prefill chunks).
    ``reserve_new_tokens``: how many of a request's new tokens its admission sets aside (None:
    all of them, so nothing is ever preempted; a number admits more at once and preempts, by
    swapping to disk, when the running requests outgrow the pool).
    ``dtype``: of the weights and the KV cache, ``auto`` (see ``kvmem.model.dtype``), ``float32``
    or ``bfloat16``.
    ``compress_after_prompt``: bytes (or ``"512MiB"``) — run each prompt at full size within this
    transient peak, then compress it once to ``kv_budget`` with the whole prompt in view, instead of
    chunk by chunk under the budget (the default, where the peak matters). The pool's hard cap is
    this peak; a prompt whose full-size KV exceeds it is refused up front. Needs an eviction policy.
    """

    model: str = DEFAULT_MODEL
    kv_budget: int | str | None = None
    policy: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    prefill_chunk: int = 512
    prefix_cache: bool = False
    disk_cache: str | None = None
    disk_cache_max: int | str | None = None
    max_num_seqs: int = 16
    max_batch_tokens: int = 1024
    reserve_new_tokens: int | None = None
    dtype: str = "auto"
    compress_after_prompt: int | str | None = None
    redis_cache: str | None = None
    redis_ttl_s: float | None = DEFAULT_TTL_S
    exact_reuse: bool = True

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
