"""In-process servers (FastAPI's TestClient, with the engine thread running)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient
from process import parse_metrics

from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel
from kvmem.server.app import ServeConfig, create_app
from kvmem.server.loop import EngineLoop
from kvmem.server.metrics import ServerMetrics


@contextmanager
def serving(
    loaded: LoadedModel, serve: dict[str, Any] | None = None, **llm: Any
) -> Iterator[tuple[TestClient, EngineLoop]]:
    """A server over ``LLM(loaded, **llm)`` with ``ServeConfig(**serve)``; yields the client and loop."""
    config = ServeConfig(model_name="tiny", **(serve or {}))
    engine = LLM(loaded, **llm).engine
    loop = EngineLoop(engine, ServerMetrics(), config.max_waiting)
    with TestClient(create_app(loaded, loop, config)) as client:
        yield client, loop


def metrics(client: TestClient) -> dict[str, float]:
    return parse_metrics(client.get("/metrics").text)
