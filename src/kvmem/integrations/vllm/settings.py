"""The connector's settings, checked before anything starts: the parts of ``--kv-transfer-config``
and of vLLM's own options it depends on, each refused with the fix in the message. No vLLM needed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from kvmem.compress.bits import REFERENCE_GEOMETRY
from kvmem.compress.formats import QUANTIZERS
from kvmem.errors import KVMemError
from kvmem.tiers.redis import DEFAULT_TIMEOUT_S, DEFAULT_TTL_S, check_url


def _one_layout_fits_all(name: str) -> bool:
    """The connector encodes every layer of a block with one layout: formats that record per-layer
    state on it (BFP's channel permutation) are left out."""
    return not QUANTIZERS[name].layout(*REFERENCE_GEOMETRY).layer_state


# "raw", then the registered block formats, most bits first
FORMATS = (
    "raw",
    *sorted(filter(_one_layout_fits_all, QUANTIZERS), key=lambda name: -QUANTIZERS[name].bits),
)
KNOWN = {"redis_url", "format", "ttl_s", "timeout_s", "model_identity"}


class ConnectorConfigError(KVMemError, ValueError):
    """The connector's settings (or vLLM's) cannot work together: the message says how to fix them."""


@dataclass(frozen=True)
class ConnectorSettings:
    redis_url: str
    format: str = "raw"
    ttl_s: float = DEFAULT_TTL_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    model_identity: str | None = None  # None: vLLM's --model argument

    @classmethod
    def parse(
        cls, extra: Mapping[str, object], load_failure_policy: str, hash_algo: str
    ) -> ConnectorSettings:
        """From ``kv_connector_extra_config``, ``kv_load_failure_policy`` and
        ``--prefix-caching-hash-algo``; raises ``ConnectorConfigError``."""
        unknown = sorted(set(extra) - KNOWN)
        if unknown:
            raise ConnectorConfigError(
                f"unknown KVMemConnector settings {unknown} in kv_connector_extra_config; "
                f"known: {sorted(KNOWN)}"
            )
        url = extra.get("redis_url")
        if not url:
            raise ConnectorConfigError(
                'KVMemConnector needs "redis_url" in kv_connector_extra_config, e.g. redis://127.0.0.1:6379/0'
            )
        if load_failure_policy != "recompute":
            raise ConnectorConfigError(
                'KVMemConnector needs "kv_load_failure_policy": "recompute" in --kv-transfer-config: a '
                "block that is missing or fails its checksum is then recomputed, not a failed request"
            )
        if hash_algo != "sha256_cbor":
            raise ConnectorConfigError(
                "KVMemConnector keys blocks by vLLM's block hashes and needs the portable ones: start vLLM "
                f"with --prefix-caching-hash-algo sha256_cbor (it is {hash_algo!r})"
            )
        fmt = str(extra.get("format", "raw"))
        if fmt not in FORMATS:
            raise ConnectorConfigError(f"unknown block format {fmt!r}; one of {', '.join(FORMATS)}")
        try:
            ttl = float(str(extra.get("ttl_s", DEFAULT_TTL_S)))
            timeout = float(str(extra.get("timeout_s", DEFAULT_TIMEOUT_S)))
        except (TypeError, ValueError) as exc:
            raise ConnectorConfigError(f"ttl_s and timeout_s are seconds: {exc}") from exc
        if ttl <= 0 or timeout <= 0:
            raise ConnectorConfigError(f"ttl_s and timeout_s must be positive, got {ttl} and {timeout}")
        identity = extra.get("model_identity")
        return cls(check_url(str(url)), fmt, ttl, timeout, None if identity is None else str(identity))


def identity(model: str, dtype: str, layers: int, kv_heads: int, head_dim: int, block: int, fmt: str) -> str:
    """What names the model's blocks: in every stored header, and digested into the key namespace."""
    return "|".join(
        [
            model,
            dtype,
            f"layers={layers}",
            f"kv_heads={kv_heads}",
            f"head_dim={head_dim}",
            f"block={block}",
            f"format={fmt}",
        ]
    )


def namespace(identity: str) -> str:
    """The Redis key prefix of one identity: other models' blocks never share (or overwrite) its keys."""
    return f"kvmem:vllm:{hashlib.sha256(identity.encode()).hexdigest()[:16]}:"


# vLLM's own options the connector needs next to --kv-transfer-config
VLLM_OPTIONS = ("--prefix-caching-hash-algo", "sha256_cbor", "--enable-prompt-tokens-details")


def transfer_config(redis_url: str, **extra: object) -> str:
    """The ``--kv-transfer-config`` JSON that loads kvmem's connector on ``redis_url``."""
    return json.dumps(
        {
            "kv_connector": "KVMemConnector",
            "kv_connector_module_path": "kvmem.integrations.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"redis_url": redis_url, **extra},
        }
    )
