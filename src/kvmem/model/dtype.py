"""Which floating-point type the weights and the KV cache use: ``float32``, ``bfloat16`` or ``auto``.

``auto`` picks by what the hardware does fast, from measurements on this project's machines:

- on a CPU with native bfloat16 arithmetic (AMX or AVX512-BF16) bfloat16 prefills about 3x faster
  than float32 and halves the KV bytes; kvmem picks bfloat16 there, as vLLM's CPU build does;
- on a CPU without it (AVX2 only, e.g. the 2-core AMD EPYC machines CI runs on) bfloat16 matrix
  products are emulated: SmolLM2 prefilled 1k tokens in 14.4 s in bfloat16 against 2.2 s in
  float32 (decoding, bound by memory rather than arithmetic, went 15.8 -> 19.4 tokens/s), so
  float32 is the default there;
- on a GPU, bfloat16.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kvmem.errors import KVMemError
from kvmem.model.device import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHOICES = ("auto", *DTYPES)


class UnsupportedDtypeError(KVMemError, ValueError):
    """A dtype other than auto, float32 or bfloat16 was asked for."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for ``name`` (see the module docstring for ``auto``)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UnsupportedDtypeError(f"dtype {name} is not supported; use {', '.join(CHOICES)}")
        return name
    key = name.strip().lower()
    if key == "auto":
        on_cpu = resolve_device(device).type == "cpu"  # raises UnsupportedDeviceError
        return torch.bfloat16 if not on_cpu or cpu_has_native_bf16() else torch.float32
    if key not in DTYPES:
        raise UnsupportedDtypeError(f"unknown dtype {name!r}; use one of {', '.join(CHOICES)}")
    return DTYPES[key]


def explain_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> str:
    """What ``name`` resolves to and why, for people: ``"auto → float32 on this CPU (…)"``."""
    dtype = str(resolve_dtype(name, device)).replace("torch.", "")
    if isinstance(name, torch.dtype) or name.strip().lower() != "auto":
        return f"{dtype} (as asked)"
    if torch.device(device).type != "cpu":
        return f"auto → {dtype} on {device}"
    if cpu_has_native_bf16():
        return f"auto → {dtype} on this CPU (it computes bfloat16 natively: AMX or AVX512-BF16)"
    return f"auto → {dtype} on this CPU (no native bfloat16 arithmetic: AMX or AVX512-BF16)"
