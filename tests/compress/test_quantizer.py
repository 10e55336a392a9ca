"""Every block format decodes a stack of blocks in one call exactly as it decodes each block alone."""

import pytest
import torch

from kvmem.compress.bfp import BlockFloat
from kvmem.compress.kivi import KIVI
from kvmem.compress.rotated import RotatedQuant
from kvmem.model.format import Quantizer

FORMATS = [
    KIVI(2),
    KIVI(4),
    KIVI(8),
    BlockFloat(4),
    BlockFloat(8),
    BlockFloat(4, reorder=False),
    RotatedQuant(3, 2),
    RotatedQuant(4, 4, "uniform"),
]


@pytest.mark.parametrize(
    "quant", FORMATS, ids=lambda q: f"{q.name}{'' if getattr(q, 'reorder', 1) else '-plain'}"
)
def test_stacked_blocks_decode_as_each_block_alone(quant: Quantizer) -> None:
    layout = quant.layout(heads=3, block_size=16, head_dim=32)
    g = torch.Generator().manual_seed(0)
    buffers = []
    for _ in range(4):  # [H, bs, D] blocks of different scales; one layout, as a layer has
        scale = float(torch.rand(1, generator=g)) * 10
        keys, values = torch.randn(3, 16, 32, generator=g) * scale, torch.randn(3, 16, 32, generator=g)
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
        quant.encode(keys, values, layout, buffer)
        buffers.append(buffer)
    keys, values = quant.decode(torch.stack(buffers), layout, torch.float32)  # [4, H, bs, D]
    assert keys.shape == values.shape == (4, 3, 16, 32)
    for i, buffer in enumerate(buffers):
        k, v = quant.decode(buffer, layout, torch.float32)
        assert torch.equal(keys[i], k) and torch.equal(values[i], v)
    assert not torch.equal(keys[0], keys[1])  # the blocks really differ
