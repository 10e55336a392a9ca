"""``KVMemConnector``: vLLM's KV connector (``KVConnectorBase_V1``) backed by kvmem's Redis tier.

Keys are vLLM's own block hashes (``--prefix-caching-hash-algo sha256_cbor``: portable across
processes and versions; the request's ``cache_salt`` is hashed into its first block, so tenants
never share a block), under a namespace that digests the model, dtype, geometry, block size and
stored format. Every value carries ``blockcodec``'s header (format, key, sha256, model identity)
and is verified on every load: a missing, damaged or foreign block is reported to vLLM
(``get_block_ids_with_load_errors``), which recomputes it — never wrong KV, never a failed request
(the connector refuses to start unless ``kv_load_failure_policy`` is ``recompute``).

Scheduler side (``plan.Planner``): matched tokens are the leading run of full blocks past vLLM's
own prefix-cache hits that Redis holds (one pipelined EXISTS); loads and the blocks that become
full in a step go to the worker as the step's metadata. Worker side: loads are read (pipelined)
and copied into vLLM's blocks in ``start_load_kv``, before the forward; stores are read from
vLLM's KV cache after the forward, in ``wait_for_save``, and written in one pipeline. Both are
synchronous: a block stored is in Redis before the step's outputs are returned.

Settings (``kv_connector_extra_config``): ``redis_url`` (required), ``format`` (``raw``, the
default: bit-identical; or ``kivi8`` / ``kivi4`` / ``kivi2``), ``ttl_s``, ``timeout_s``,
``model_identity`` (what names the model in keys and headers; default vLLM's model argument —
set the same value on servers that load the same weights from different paths).

Simplifications: vLLM's CPU KV layout only ([num_blocks, kv_heads, block_size, 2 * head_dim]); one
KV cache group (no hybrid allocator); no pipelining of loads with layers (``wait_for_layer_load``
returns at once because everything was loaded before the forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from kvmem.integrations.vllm.blocks import BlockFormat
from kvmem.integrations.vllm.plan import BlockRef, Planner, ScheduledCached, ScheduledNew, StepPlan
from kvmem.integrations.vllm.settings import ConnectorConfigError, ConnectorSettings, identity, namespace
from kvmem.tiers.redis import RedisTier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger("vllm.kvmem")  # under vLLM's logger: its handlers and level


class KVMemMetadata(KVConnectorMetadata):
    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KVMemConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        settings = ConnectorSettings.parse(
            dict(transfer.kv_connector_extra_config or {}),
            transfer.kv_load_failure_policy,
            vllm_config.cache_config.prefix_caching_hash_algo,
        )
        model = vllm_config.model_config
        self.block_size = vllm_config.cache_config.block_size
        self.format = BlockFormat(
            settings.format,
            model.get_num_kv_heads(vllm_config.parallel_config),
            self.block_size,
            model.get_head_size(),
            model.dtype,
        )
        self.identity = identity(
            settings.model_identity or str(model.model),
            str(model.dtype).removeprefix("torch."),
            model.get_num_layers(vllm_config.parallel_config),
            self.format.heads,
            self.format.head_dim,
            self.block_size,
            self.format.name,
        )
        self.tier = RedisTier(
            settings.redis_url, settings.ttl_s, settings.timeout_s, namespace=namespace(self.identity)
        )
        self.expect = {"model": self.identity}
        self.planner = Planner(self.block_size, self.tier.contains_many)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self._load_errors: set[int] = set()
        logger.info("KVMemConnector (%s) on %s: %s", role.name, settings.redis_url, self.identity)

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        n = self.planner.match(
            request.request_id, request.block_hashes, request.num_prompt_tokens, num_computed_tokens
        )
        if n:
            logger.info("kvmem: %d tokens of %s in Redis", n, request.request_id)
        return n, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.planner.allocated(request.request_id, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        sched = scheduler_output.num_scheduled_tokens
        new = [
            ScheduledNew(r.req_id, list(r.block_ids[0]), r.num_computed_tokens, sched.get(r.req_id, 0))
            for r in scheduler_output.scheduled_new_reqs
        ]
        c = scheduler_output.scheduled_cached_reqs
        cached = [
            ScheduledCached(
                req_id,
                None if c.new_block_ids[i] is None else list(c.new_block_ids[i][0]),
                req_id in c.resumed_req_ids,
                c.num_computed_tokens[i],
                sched.get(req_id, 0),
            )
            for i, req_id in enumerate(c.req_ids)
        ]
        return KVMemMetadata(self.planner.step(new, cached))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.planner.finished(request.request_id)
        return False, None  # stores are written within the step: the blocks can be freed now

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        expected = (self.format.heads, self.block_size, 2 * self.format.head_dim)
        for name, cache in kv_caches.items():
            if cache.dim() != 4 or tuple(cache.shape[1:]) != expected:
                raise ConnectorConfigError(
                    f"KVMemConnector supports vLLM's CPU KV layout [blocks, {expected[0]}, {expected[1]}, "
                    f"{expected[2]}]; layer {name} has {tuple(cache.shape)}"
                )
        self.kv_caches = dict(kv_caches)
        self.format.dtype = next(iter(kv_caches.values())).dtype

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVMemMetadata)
        return meta.plan

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        layers = list(self.kv_caches.values())
        for req_id, refs in self._plan().loads.items():
            found = self.tier.get_many([r.key for r in refs], self.expect)
            ok = 0
            for ref, block in zip(refs, found):
                kv = (
                    None
                    if block is None
                    else self.format.decode(block[0].get("kv", torch.empty(0)), len(layers))
                )
                if kv is None:
                    self._load_errors.add(ref.block_id)  # vLLM recomputes from here
                    continue
                for layer, cache in zip(kv, layers):
                    cache[ref.block_id].copy_(layer)
                ok += 1
            logger.info(
                "kvmem: loaded %d of %d blocks of %s from Redis (%d failed: recomputed)",
                ok,
                len(refs),
                req_id,
                len(refs) - ok,
            )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # everything was loaded in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # blocks are read once the forward has written every layer (wait_for_save)

    def wait_for_save(self) -> None:
        stores: list[BlockRef] = self._plan().stores
        if not stores or not self.kv_caches:
            return
        layers = list(self.kv_caches.values())
        blocks = []
        for ref in stores:
            kv = torch.stack([cache[ref.block_id] for cache in layers])  # [L, H, bs, 2D]
            meta = {"model": self.identity, "depth": str(ref.depth)}
            blocks.append((ref.key, {"kv": self.format.encode(kv)}, meta))
        self.tier.put_many(blocks)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self.tier.close()
