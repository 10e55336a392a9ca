"""``BlockList`` with a residual format: the block being filled is bytes from its first token."""

from __future__ import annotations

import pytest
import torch

from kvmem.compress.residual import RotatedTokens
from kvmem.compress.rotated import RotatedQuant
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.layers.blocks import FULL, PACKED, PARTIAL, BlockList

H, D, BS = 2, 32, 8
FMT, RES = RotatedQuant(4, 2), RotatedTokens(8)


def make(keep: int | None = None, residual: RotatedTokens | None = RES) -> tuple[KVPool, BlockList]:
    pool = KVPool(PoolConfig(block_size=BS))
    return pool, BlockList(pool, H, D, torch.float32, FMT, keep, residual=residual)


def tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)


CHUNKS = [1, 3, 4, 13, 1, 1, 20, 7]  # single tokens, a block's remainder, several blocks at once


def test_no_full_precision_block_is_ever_held() -> None:
    pool, blocks = make()
    for i, n in enumerate(CHUNKS):
        before = blocks.held
        blocks.append(*tokens(n, i))
        blocks.check()
        kinds = [kind for _, kind in blocks.blocks()]
        assert FULL not in kinds and kinds[-1] == PARTIAL and set(kinds[:-1]) <= {PACKED}
        assert blocks.held == before + n
        assert blocks.nbytes == pool.bytes_used == pool.physical_nbytes()
        assert blocks.nbytes == (len(kinds) - 1) * blocks.layout.nbytes + blocks.residual_layout.nbytes
        assert blocks.nbytes <= blocks.cost_of_blocks(len(kinds))
        pool.check_integrity()
    # the residual costs its bits, not the model's dtype: 8.5 bits per element here (D = 32)
    assert blocks.residual_bytes * 8 / (2 * H * BS * D) == pytest.approx(8.5)
    assert blocks.residual_bytes < blocks.block_bytes / 3


def test_a_filled_residual_becomes_the_block_format_of_its_decoded_tokens() -> None:
    _, blocks = make()
    blocks.append(*tokens(3, 0))
    blocks.append(*tokens(BS - 3, 1))  # the residual is now full, still in its own format
    assert blocks.partial is not None and blocks.table.last_fill == BS
    decoded = RES.read(blocks.partial, blocks.residual_layout, torch.float32)
    expected = torch.empty(blocks.layout.nbytes, dtype=torch.uint8)
    FMT.encode(*decoded, blocks.layout, expected)
    blocks.append(*tokens(1, 2))  # the next token starts a new residual; the full one is encoded
    (first, kind), (_, last_kind) = blocks.blocks()
    assert (kind, last_kind) == (PACKED, PARTIAL)
    assert torch.equal(first, expected)


def test_read_back_close_to_what_was_written() -> None:
    _, with_res = make()
    _, without = make(residual=None)
    written_k, written_v = [], []
    for i, n in enumerate(CHUNKS):
        k, v = tokens(n, i)
        with_res.append(k, v)
        without.append(k, v)
        written_k.append(k)
        written_v.append(v)
    keys, values = torch.cat(written_k, 1), torch.cat(written_v, 1)
    got_k, got_v = with_res.dense()
    ref_k, _ = without.dense()
    fill = with_res.table.last_fill
    # the residual's tokens: 8-bit codes, far closer than the block format's
    assert float((got_k[:, -fill:] - keys[:, -fill:]).norm() / keys[:, -fill:].norm()) < 0.01
    assert float((got_v[:, -fill:] - values[:, -fill:]).norm() / values[:, -fill:].norm()) < 0.01
    # full blocks: the block format's error, whether or not their tokens passed through the residual
    err_res = float((got_k[:, :-fill] - keys[:, :-fill]).norm() / keys[:, :-fill].norm())
    err_ref = float((ref_k[:, :-fill] - keys[:, :-fill]).norm() / keys[:, :-fill].norm())
    assert err_res == pytest.approx(err_ref, rel=0.05)


def test_sliding_window_drops_blocks_and_keeps_the_partial_last() -> None:
    pool, blocks = make(keep=12)
    for i, n in enumerate(CHUNKS * 3):
        blocks.append(*tokens(n, i))
        blocks.check()
        assert blocks.held <= 12 + BS - 1
        past = blocks.past(last=12)
        assert past.count == min(12, blocks.length)
        assert blocks.nbytes == pool.bytes_used == pool.physical_nbytes()
    # everything past the window is gone, in one go too (a chunk longer than the window)
    blocks.append(*tokens(40, 99))
    blocks.check()
    assert blocks.partial is not None and blocks.held <= 12 + BS - 1


def test_copy_is_equal_and_independent() -> None:
    pool, blocks = make()
    blocks.append(*tokens(21, 0))
    copy = blocks.copy_to(pool)
    assert len(copy.blocks()) == len(blocks.blocks()) == 3
    for (a, kind_a), (b, kind_b) in zip(blocks.blocks(), copy.blocks()):
        assert kind_a == kind_b and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    before = [t.clone() for t, _ in blocks.blocks()]
    copy.append(*tokens(5, 1))
    assert all(torch.equal(a, t) for a, (t, _) in zip(before, blocks.blocks()))
    copy.check()
    blocks.release()
    copy.release()
    assert pool.bytes_used == 0 and blocks.partial is None


def test_compaction_re_stores_kept_tokens() -> None:
    pool, blocks = make()
    blocks.append(*tokens(29, 0))
    keys, _ = blocks.dense()
    keep = torch.tensor([[0, 1, 9, 17, 28], [2, 3, 4, 20, 27]])
    blocks.compact(keep)
    blocks.check()
    kept, _ = blocks.dense()
    assert kept.shape == (H, 5, D)
    for h in range(H):  # the kept tokens, now in the residual: within 8-bit error of what they were
        assert float((kept[h] - keys[h, keep[h]]).norm() / keys[h, keep[h]].norm()) < 0.01
    assert [kind for _, kind in blocks.blocks()] == [PARTIAL]
    assert blocks.nbytes == pool.bytes_used
