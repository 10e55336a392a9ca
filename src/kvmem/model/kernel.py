"""Decode attention compiled for the CPU, reading each sequence's KV blocks where they lie.

PyTorch has no attention over paged blocks on the CPU (its SDPA needs each sequence's keys in one
tensor, so they would be gathered, a copy of every held byte per layer and step), and a quantized
block would have to be decoded into yet another full-precision copy first. vLLM and llama.cpp
ship their own kernels for this; kvmem ships ``paged_attention.cpp``: one query token per
sequence, online softmax over the sequence's blocks in place, KIVI blocks decoded on the fly, so
attention reads the bytes the pool holds and nothing else.

It is compiled on first use with the system's C++ compiler (``g++`` or ``$CXX``; about a second)
into kvmem's cache folder, named by a hash of the source, the flags and this CPU, and loaded with
``ctypes``. Where that is not possible (no compiler, another device than the CPU, a block format
it does not read, per-head padding) attention takes the PyTorch path: gather, then SDPA.
``KVMEM_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kvmem.model.loader import cache_dir
from kvmem.model.past import PACKED, Past

SOURCE = Path(__file__).with_name("paged_attention.cpp")
# no -ffast-math: it would link code that changes the whole process's floating-point mode
FLAGS: tuple[str, ...] = ("-std=c++17", "-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math")
FLAGS += ("-fopenmp", "-shared", "-fPIC")
ABI_VERSION = 2
_DTYPES = {torch.float32: "kvmem_decode_f32", torch.bfloat16: "kvmem_decode_bf16"}
_switched_off = False


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Attention takes the PyTorch path inside this block (to compare the two)."""
    global _switched_off
    before, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = before


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return next((line for line in text.splitlines() if line.startswith("flags")), platform.machine())


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it if needed; None where it cannot be had (see the module)."""
    if os.environ.get("KVMEM_KERNEL", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + compiler.encode() + _cpu_signature().encode())
    path = cache_dir() / "kernels" / f"paged-attention-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = Path(tmp) / path.name
                command = [compiler, *FLAGS, str(SOURCE), "-o", str(built)]
                subprocess.run(command, check=True, capture_output=True, timeout=300)
                os.replace(built, path)  # atomic: concurrent builders leave one valid file
        lib = ctypes.CDLL(str(path))
        if lib.kvmem_abi_version() != ABI_VERSION:
            raise OSError(f"{path} is of another version")
    except (OSError, subprocess.SubprocessError) as exc:
        detail: object = exc
        if isinstance(exc, subprocess.CalledProcessError):
            detail = exc.stderr.decode(errors="replace")[-400:]
        warnings.warn(f"kvmem: compiled attention unavailable, using PyTorch's ({detail})", stacklevel=2)
        return None
    pointer = ctypes.c_void_p
    for name in _DTYPES.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int] * 4 + [ctypes.c_float] + [pointer] * 6 + [ctypes.c_int, pointer]
        fn.restype = ctypes.c_int
    return lib


def usable(pasts: Sequence[Past], query: torch.Tensor) -> tuple[int, ...] | None:
    """The block geometry to pass (``Layout.kernel_geometry``; zeros when no block is quantized) if
    the kernel can serve these pasts for ``query``; None when attention must take the PyTorch path."""
    if _switched_off or query.device.type != "cpu" or query.dtype not in _DTYPES:
        return None
    geometry: tuple[int, ...] | None = None
    for past in pasts:
        if past.valid is not None:
            return None
        if past.packed:
            found = past.layout.kernel_geometry  # None: a format the kernel does not read
            if found is None or (geometry is not None and found != geometry):
                return None
            geometry = found
    if library() is None:
        return None
    return (0, 0, 0, 1, 1) if geometry is None else geometry


def decode(
    query: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    pasts: Sequence[Past],
    scaling: float,
    geometry: tuple[int, ...],
) -> torch.Tensor:
    """Attention of one query token per sequence over its past and its new token.

    query: [B, Hq, D]; new_keys, new_values: [B, H, D] -> [B, Hq, D]. The pasts must keep their
    tensors alive for the call (they do: a ``Past`` holds its parts).
    """
    lib = library()
    assert lib is not None
    b, hq, d = query.shape
    heads = new_keys.shape[1]
    rows: list[tuple[int, int, int, int]] = []
    segments: list[tuple[int, int, int, int, int]] = []
    for past in pasts:
        rows.append((len(segments), len(segments) + len(past.refs), past.lo, past.count))
        segments += past.refs
    row_table = torch.tensor(rows, dtype=torch.int64)  # [B, 4]
    seg_table = torch.tensor(segments or [(PACKED, 0, 0, 0, 0)], dtype=torch.int64)  # [S, 5]
    block_geometry = (ctypes.c_int * 5)(*geometry)
    q, nk, nv = query.contiguous(), new_keys.contiguous(), new_values.contiguous()
    out = torch.empty_like(q)
    fn = getattr(lib, _DTYPES[query.dtype])
    fn(
        b,
        heads,
        hq // heads,
        d,
        scaling,
        q.data_ptr(),
        nk.data_ptr(),
        nv.data_ptr(),
        row_table.data_ptr(),
        seg_table.data_ptr(),
        block_geometry,
        torch.get_num_threads(),
        out.data_ptr(),
    )
    return out
