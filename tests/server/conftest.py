"""Fixtures of the server tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from inprocess import serving

from kvmem.model.loader import LoadedModel
from kvmem.server.loop import EngineLoop


@pytest.fixture(scope="module")
def server(llama: LoadedModel) -> Iterator[tuple[TestClient, EngineLoop]]:
    with serving(llama, kv_budget="1MiB", prefix_cache=True, prefill_chunk=64) as pair:
        yield pair
