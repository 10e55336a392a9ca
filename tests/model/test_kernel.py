"""The compiled decode attention equals the PyTorch path (gather, decode, SDPA) on every kind of part."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from kvmem.compress.kivi import KIVI
from kvmem.compress.residual import RotatedTokens
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model import kernel
from kvmem.model.attention import sdpa
from kvmem.model.layers.blocks import BlockList
from kvmem.model.past import Past, decode_packed

H, G, D, BS = 2, 3, 32, 8

# with a compiler the operator must build: a failed build fails these tests instead of skipping them
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler: the PyTorch path is used"
)


def reference(q: torch.Tensor, nk: torch.Tensor, nv: torch.Tensor, pasts: list[Past]) -> torch.Tensor:
    """The PyTorch path for one query token per row: q [B, Hq, D] -> [B, Hq, D]."""
    decode_packed(pasts)
    out = []
    for i, past in enumerate(pasts):
        keys, values = nk[i].unsqueeze(1), nv[i].unsqueeze(1)  # [H, 1, D]
        if past.count:
            held_k, held_v = past.dense()
            keys, values = torch.cat([held_k, keys], 1), torch.cat([held_v, values], 1)
        out.append(sdpa(q[i].view(1, H * G, 1, D), keys[None], values[None], None, D**-0.5)[0, :, 0])
    return torch.stack(out)


def lists(
    dtype: torch.dtype,
    fmt: KIVI | None,
    lengths: list[int],
    keep: int | None,
    residual: RotatedTokens | None = None,
) -> list[BlockList]:
    pool = KVPool(PoolConfig(block_size=BS))
    made = []
    for n in lengths:
        blocks = BlockList(pool, H, D, dtype, fmt, keep, residual=residual)
        for start in range(0, n, 5):  # appended in pieces, as decoding does
            size = min(5, n - start)
            blocks.append(torch.randn(H, size, D).to(dtype), torch.randn(H, size, D).to(dtype))
        made.append(blocks)
    return made


@pytest.mark.parametrize(
    ("fmt", "residual"),
    [(None, None), (KIVI(4), None), (KIVI(2), None), (KIVI(8), None), (KIVI(4), RotatedTokens(8))],
    ids=["full", "kivi4", "kivi2", "kivi8", "kivi4+res8"],
)
@pytest.mark.parametrize("keep", [None, 13], ids=["all", "window"])
@pytest.mark.parametrize("parallel", [False, True], ids=["one-thread", "every-thread"])
def test_kernel_matches_the_pytorch_path(
    fmt: KIVI | None,
    residual: RotatedTokens | None,
    keep: int | None,
    parallel: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if parallel:  # every thread PyTorch has, however little the work (small work runs on one)
        monkeypatch.setattr(kernel, "PARALLEL_WORK", 1)
    torch.manual_seed(0)
    # 1100 slots: a row cut into several flash-decoding jobs, merged at the end
    blocks = lists(torch.float32, fmt, [0, 3, 8, 29, 70, 1100], keep, residual)
    b = len(blocks)
    q, nk, nv = torch.randn(b, H * G, D), torch.randn(b, H, D), torch.randn(b, H, D)
    pasts = [x.past(last=keep) for x in blocks]
    geometry = kernel.usable(pasts, q)
    assert geometry is not None
    got = kernel.decode(q, nk, nv, pasts, D**-0.5, geometry)
    expected = reference(q, nk, nv, [x.past(last=keep) for x in blocks])
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_dense_parts_in_front_as_offloading_and_mixed_layers_give_them() -> None:
    torch.manual_seed(1)
    (blocks,) = lists(torch.float32, KIVI(4), [37], None)
    fetched_k, fetched_v = torch.randn(H, 19, D), torch.randn(H, 19, D)
    q, nk, nv = torch.randn(1, H * G, D), torch.randn(1, H, D), torch.randn(1, H, D)
    past = blocks.past().prepend(fetched_k, fetched_v)
    got = kernel.decode(q, nk, nv, [past], D**-0.5, kernel.usable([past], q))  # type: ignore[arg-type]
    expected = reference(q, nk, nv, [blocks.past().prepend(fetched_k, fetched_v)])
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_bfloat16_rows_match_within_bfloat16_rounding() -> None:
    torch.manual_seed(2)
    blocks = lists(torch.bfloat16, None, [5, 40], None)
    q = torch.randn(2, H * G, D).to(torch.bfloat16)
    nk, nv = torch.randn(2, H, D).to(torch.bfloat16), torch.randn(2, H, D).to(torch.bfloat16)
    pasts = [x.past() for x in blocks]
    got = kernel.decode(q, nk, nv, pasts, D**-0.5, kernel.usable(pasts, q))  # type: ignore[arg-type]
    expected = reference(q.float(), nk.float(), nv.float(), [x.past() for x in blocks])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2e-2)


def test_what_it_cannot_read_takes_the_pytorch_path() -> None:
    (blocks,) = lists(torch.float32, None, [9], None)
    past = blocks.past()
    q = torch.randn(1, H * G, D)
    assert kernel.usable([past], q.to(torch.float16)) is None  # a dtype it has no code for
    past.valid = torch.ones(H, 9, dtype=torch.bool)  # per-head padding (AdaKV)
    assert kernel.usable([past], q) is None


def test_a_registered_operator_that_tracing_can_use() -> None:
    """``torch.ops.kvmem.paged_decode``: schema, fake (meta) implementation and AOT dispatch checked
    by PyTorch's own ``opcheck``."""
    torch.manual_seed(3)
    blocks = lists(torch.float32, KIVI(4), [21, 40], None)
    pasts = [x.past() for x in blocks]
    q, nk, nv = torch.randn(2, H * G, D), torch.randn(2, H, D), torch.randn(2, H, D)
    geometry = kernel.usable(pasts, q)
    assert geometry is not None
    rows, segments = kernel.tables(pasts)
    args = (q, nk, nv, rows, segments, list(geometry), D**-0.5, False)
    torch.library.opcheck(torch.ops.kvmem.paged_decode.default, args)
    expected = kernel.decode(q, nk, nv, pasts, D**-0.5, geometry)
    torch.testing.assert_close(torch.ops.kvmem.paged_decode(*args), expected, rtol=0, atol=0)
