"""The connector's settings: what vLLM must be started with, refused up front with the fix."""

from __future__ import annotations

import pytest

from kvmem.integrations.vllm.settings import ConnectorConfigError, ConnectorSettings, identity, namespace
from kvmem.tiers.redis import InvalidRedisURLError

URL = {"redis_url": "redis://127.0.0.1:6379/0"}


def test_defaults_and_overrides() -> None:
    s = ConnectorSettings.parse(URL, "recompute", "sha256_cbor")
    assert (s.format, s.model_identity) == ("raw", None)
    t = ConnectorSettings.parse(
        {**URL, "format": "kivi4", "ttl_s": "60", "model_identity": "m"}, "recompute", "sha256_cbor"
    )
    assert (t.format, t.ttl_s, t.model_identity) == ("kivi4", 60.0, "m")


@pytest.mark.parametrize(
    ("extra", "policy", "algo", "message"),
    [
        ({}, "recompute", "sha256_cbor", 'needs "redis_url"'),
        (URL, "fail", "sha256_cbor", "kv_load_failure_policy"),
        (URL, "recompute", "sha256", "--prefix-caching-hash-algo sha256_cbor"),
        ({**URL, "format": "int3"}, "recompute", "sha256_cbor", "unknown block format"),
        ({**URL, "ttl_s": 0}, "recompute", "sha256_cbor", "must be positive"),
        ({**URL, "ttl_s": "soon"}, "recompute", "sha256_cbor", "are seconds"),
        ({**URL, "redis": "x"}, "recompute", "sha256_cbor", "unknown KVMemConnector settings"),
    ],
)
def test_what_cannot_work_is_refused_with_the_fix(extra: dict, policy: str, algo: str, message: str) -> None:
    with pytest.raises(ConnectorConfigError, match=message):
        ConnectorSettings.parse(extra, policy, algo)


def test_a_bad_url_is_refused() -> None:
    with pytest.raises(InvalidRedisURLError):
        ConnectorSettings.parse({"redis_url": "127.0.0.1:6379"}, "recompute", "sha256_cbor")


def test_every_part_of_the_identity_changes_the_namespace() -> None:
    base = ("m", "bfloat16", 30, 3, 64, 128, "raw")
    spaces = {namespace(identity(*base))}
    for i, other in enumerate(("n", "float32", 31, 4, 32, 64, "kivi8")):
        changed = list(base)
        changed[i] = other
        spaces.add(namespace(identity(*changed)))  # type: ignore[arg-type]
    assert len(spaces) == 8
