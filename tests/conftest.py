"""Shared fixtures: tiny random models (fast) and the embedded real models (session-scoped)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from kvmem.model.loader import LoadedModel, load_model
from tiny_models import tiny_gemma, tiny_llama


@pytest.fixture(scope="session")
def llama() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="session")
def gemma() -> LoadedModel:
    return tiny_gemma()


@pytest.fixture(scope="session", params=["llama", "gemma"])
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> LoadedModel:
    return load_model("gemma3-270m")


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def real(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(request.param)


REAL_FIXTURES = {"smollm2", "gemma3", "real"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that take an embedded real model get the ``real`` marker (``make test-fast`` skips them)."""
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from kvmem.bench.redis_server import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_session) -> str:  # type: ignore[no-untyped-def]
    """A real Redis on 127.0.0.1, emptied for each test."""
    redis_session.flush()
    return str(redis_session.url)
