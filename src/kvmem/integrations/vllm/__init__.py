"""kvmem as vLLM's KV connector: ``KVMemConnector`` stores vLLM's full KV blocks in kvmem's Redis
tier and loads them back for later requests, in this or any other vLLM (or kvmem) process.

Start vLLM with::

    --prefix-caching-hash-algo sha256_cbor
    --kv-transfer-config '{"kv_connector": "KVMemConnector",
        "kv_connector_module_path": "kvmem.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"redis_url": "redis://127.0.0.1:6379/0"}}'

The connector class needs vLLM; ``plan`` and ``blocks`` (what to load and store, and the stored
form of a block) do not, so kvmem's tests check them without vLLM installed.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "KVMemConnector":  # vLLM's factory takes the class with getattr(module, name)
        from kvmem.integrations.vllm.connector import KVMemConnector

        return KVMemConnector
    raise AttributeError(name)
