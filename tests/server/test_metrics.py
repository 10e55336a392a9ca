"""``/metrics``' tier gauges: a disk tier that cannot be written and a Redis tier that cannot be
reached show as down, with their failures counted (and each is warned about once)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from process import parse_metrics

from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel
from kvmem.server.metrics import ServerMetrics
from kvmem.tiers import disk as disk_module

PROMPT = "The harbor town kept its lamps lit through the long winter nights, and the ferry ran at six."


def test_failing_tiers_are_down_in_metrics(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(path: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    llm = LLM(llama, block_size=4, disk_cache=tmp_path / "kv", redis_cache=url)
    metrics = ServerMetrics()
    metrics.observe_engine(llm.engine)
    m = parse_metrics(metrics.render().decode())
    assert m["kvmem_tier_up{tier=disk}"] == m["kvmem_tier_up{tier=redis}"] == 1
    monkeypatch.setattr(disk_module, "write_atomic", full)
    llm.generate(PROMPT, max_new_tokens=2)
    metrics.observe_engine(llm.engine)
    m = parse_metrics(metrics.render().decode())
    assert llm.prefix is not None and llm.prefix.disk is not None and llm.prefix.redis is not None
    written = llm.prefix.disk.stats.write_errors
    assert written > 1 and m["kvmem_tier_errors{tier=disk}"] == written
    assert m["kvmem_tier_up{tier=disk}"] == 0
    assert m["kvmem_tier_up{tier=redis}"] == 0 and m["kvmem_tier_errors{tier=redis}"] == 1  # then it rests
    warned = sorted(r.getMessage().split(" cannot")[0] for r in caplog.records if r.name == "kvmem.tiers")
    assert warned == [f"Redis cache {url}", f"disk cache {tmp_path / 'kv'}"]
