"""Decode attention compiled for the CPU, reading each sequence's KV blocks where they lie.

PyTorch has no attention over paged blocks on the CPU (its SDPA needs each sequence's keys in one
tensor, so they would be gathered, a copy of every held byte per layer and step), and a quantized
block would have to be decoded into yet another full-precision copy first. vLLM and llama.cpp
ship their own kernels for this; kvmem ships ``paged_attention.cpp``: one query token per
sequence, online softmax over the sequence's blocks in place, KIVI blocks decoded on the fly, so
attention reads the bytes the pool holds and nothing else.

It is a PyTorch operator, ``torch.ops.kvmem.paged_decode`` (registered with ``TORCH_LIBRARY``, a
fake implementation for tracing beside it), built on first use with ``torch.utils.cpp_extension``
and the system's C++ compiler (``c++`` or ``$CXX``; under a minute, once) into kvmem's cache folder,
named by a hash of the source (and its path), the flags, this CPU and this torch. It runs on
PyTorch's own thread pool (``torch.set_num_threads`` governs both). Where it cannot be had (no
compiler, another device than the CPU, a block format it does not read, per-head padding) attention
takes the PyTorch path: gather, then SDPA. ``KVMEM_KERNEL=0`` turns it off.

Simplification: the operator reads blocks at the addresses in its ``segments`` table, not from
tensor arguments, so it is called eagerly with the blocks alive (a compiled graph may call it, but
must not cache its inputs across steps).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kvmem.model.loader import cache_dir
from kvmem.model.past import PACKED, Past

SOURCE = Path(__file__).with_name("paged_attention.cpp")
# no -ffast-math: it would link code that changes the whole process's floating-point mode
FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")
_DTYPES = (torch.float32, torch.bfloat16)
# Multiply-adds that make a second thread worth waking: a parallel region waits for every thread it
# starts, and on a busy machine that is a wait for a time slice (milliseconds), not microseconds.
PARALLEL_WORK = 1 << 17
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
def library() -> bool:
    """Whether ``torch.ops.kvmem.paged_decode`` is there, building it if needed (see the module)."""
    if os.environ.get("KVMEM_KERNEL", "1") == "0":
        return False
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False
    from torch.utils import cpp_extension  # its import is slow; only here

    key = hashlib.sha256(
        SOURCE.read_bytes()
        + " ".join(FLAGS).encode()
        + compiler.encode()
        + _cpu_signature().encode()
        + torch.__version__.encode()
        + str(SOURCE).encode()  # ninja's build file names the source: one build folder per checkout
    ).hexdigest()[:16]
    folder = cache_dir() / "kernels" / f"paged-attention-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            cpp_extension.load(
                name=f"kvmem_paged_attention_{key}",
                sources=[str(SOURCE)],
                extra_cflags=list(FLAGS),
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
    except (OSError, RuntimeError, ImportError) as exc:  # no ninja, a compiler error, a bad .so
        warnings.warn(
            f"kvmem: compiled attention unavailable, using PyTorch's ({str(exc)[-400:]})", stacklevel=2
        )
        return False
    _register_fake()
    return True


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """``cpp_extension`` runs ``ninja`` from ``PATH``: where only the ``ninja`` wheel has it (a virtual
    environment not activated), its folder is put on ``PATH`` for the build."""
    before = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _register_fake() -> None:
    """What the operator returns, for tracing (``torch.compile``, meta tensors): a tensor like ``q``."""
    try:
        torch.library.register_fake("kvmem::paged_decode")(_fake)
    except RuntimeError:  # already registered in this process
        pass


def _fake(
    q: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    rows: torch.Tensor,
    segments: torch.Tensor,
    geometry: list[int],
    scale: float,
    parallel: bool,
) -> torch.Tensor:
    return torch.empty_like(q)


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
    if not library():
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
    assert library()
    _, hq, d = query.shape
    rows, segments = tables(pasts)
    work = 2 * hq * d * sum(past.count + 1 for past in pasts)  # multiply-adds: logits and values
    parallel = torch.get_num_threads() > 1 and work >= 2 * PARALLEL_WORK
    return torch.ops.kvmem.paged_decode(  # [B, Hq, D]
        query.contiguous(),
        new_keys.contiguous(),
        new_values.contiguous(),
        rows,
        segments,
        list(geometry),
        scaling,
        parallel,
    )


def tables(pasts: Sequence[Past]) -> tuple[torch.Tensor, torch.Tensor]:
    """The operator's ``rows`` [B, 4] (first segment, end segment, lo, count) and ``segments`` [S, 5]
    (``Past.refs``: kind, key address or packed buffer, value address, slots, head stride)."""
    rows: list[tuple[int, int, int, int]] = []
    segments: list[tuple[int, int, int, int, int]] = []
    for past in pasts:
        rows.append((len(segments), len(segments) + len(past.refs), past.lo, past.count))
        segments += past.refs
    return (
        torch.tensor(rows, dtype=torch.int64),
        torch.tensor(segments or [(PACKED, 0, 0, 0, 0)], dtype=torch.int64),
    )
