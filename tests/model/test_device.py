"""``resolve_device``: a typed error, before any weight is loaded, for a device this machine lacks."""

from __future__ import annotations

import pytest
import torch

from kvmem.engine.llm import LLM
from kvmem.model.device import UnsupportedDeviceError, resolve_device
from kvmem.model.loader import load_model


def test_cpu_is_always_there() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("name", "message"), [("banana", "unknown device 'banana'"), ("", "unknown device")])
def test_an_unknown_name_is_refused(name: str, message: str) -> None:
    with pytest.raises(UnsupportedDeviceError, match=message):
        resolve_device(name)


def test_a_missing_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnsupportedDeviceError, match="device 'cuda' is not available.*use cpu"):
        resolve_device("cuda")


def test_a_gpu_index_past_the_last_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UnsupportedDeviceError, match=r"1 cuda device\(s\) here \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:3")


def test_a_device_that_runs_no_model_is_refused() -> None:
    with pytest.raises(UnsupportedDeviceError, match="cannot run a model"):
        resolve_device("meta")


def test_llm_and_load_model_refuse_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnsupportedDeviceError):
        LLM("/no/such/model", device="cuda")  # refused before the (missing) model is looked for
    with pytest.raises(UnsupportedDeviceError):
        load_model("/no/such/model", device="banana")
