"""Which device a model runs on: ``resolve_device`` checks a name such as ``cpu``, ``cuda`` or
``cuda:1`` against what this machine and this PyTorch build have, before any weight is loaded."""

from __future__ import annotations

import torch

from kvmem.errors import KVMemError


class UnsupportedDeviceError(KVMemError, ValueError):
    """A device that is not a device name, or that this machine or PyTorch build does not have."""


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``name``; raises ``UnsupportedDeviceError`` for an unknown name or an
    accelerator that is not available here (``cuda`` without a GPU, ``cuda:3`` with one)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UnsupportedDeviceError(
            f"unknown device {str(name)!r}: use cpu, cuda or cuda:N (device= / --device)"
        ) from None
    if device.type == "cpu":
        return device
    # torch.cuda, torch.mps, torch.xpu, …: each accelerator's module says whether it is there
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None:
        raise UnsupportedDeviceError(f"device {str(name)!r} cannot run a model; use cpu or cuda")
    if not available():
        raise UnsupportedDeviceError(
            f"device {str(name)!r} is not available: this machine or PyTorch build has no "
            f"{device.type.upper()} device; use cpu (device= / --device)"
        )
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise UnsupportedDeviceError(
            f"device {str(name)!r} is not available: {count} {device.type} device(s) here "
            f"({device.type}:0 to {device.type}:{count - 1})"
        )
    return device
