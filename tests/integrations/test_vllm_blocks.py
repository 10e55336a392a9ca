"""A vLLM CPU block as stored: the (keys, values) split of its layout, raw round trips that are
exact, quantized ones in real bytes, and blocks of another shape refused."""

from __future__ import annotations

import pytest
import torch

from kvmem.integrations.vllm.blocks import BlockFormat, block_view
from kvmem.integrations.vllm.settings import FORMATS, ConnectorConfigError

L, H, BS, D = 3, 2, 16, 8


def cpu_block(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What vLLM's CPU attention writes: per head, bs x D keys then bs x D values, seen as [H, bs, 2D]."""
    return torch.cat([keys, values], dim=-2).reshape(*keys.shape[:-2], BS, 2 * D)


def test_block_view_splits_keys_from_values_as_vllms_cpu_attention_does() -> None:
    keys, values = torch.randn(L, H, BS, D), torch.randn(L, H, BS, D)
    block = cpu_block(keys, values)
    # vLLM reads it as [H, 2*bs, D] chunked in two along the token axis
    as_vllm = block.view(L, H, 2 * BS, D).chunk(2, dim=2)
    assert torch.equal(as_vllm[0], keys) and torch.equal(as_vllm[1], values)
    view = block_view(block)
    assert torch.equal(view[:, :, 0], keys) and torch.equal(view[:, :, 1], values)


def test_raw_is_exact_and_a_block_of_another_shape_is_refused() -> None:
    fmt = BlockFormat("raw", H, BS, D, torch.bfloat16)
    block = torch.randn(L, H, BS, 2 * D).to(torch.bfloat16)
    stored = fmt.encode(block)
    decoded = fmt.decode(stored, L)
    assert decoded is not None and torch.equal(decoded, block)
    assert fmt.decode(stored[:, :1], L) is None
    assert fmt.decode(stored.float(), L) is None
    assert fmt.decode(stored, L + 1) is None


@pytest.mark.parametrize(("name", "share", "tol"), [("kivi8", 0.5625, 0.02), ("kivi4", 0.3125, 0.3)])
def test_quantized_blocks_are_real_bytes_and_close(name: str, share: float, tol: float) -> None:
    h, bs, d = 3, 128, 64  # SmolLM2's blocks in vLLM
    fmt = BlockFormat(name, h, bs, d, torch.bfloat16)
    keys, values = torch.randn(L, h, bs, d), torch.randn(L, h, bs, d)
    block = torch.cat([keys, values], dim=-2).reshape(L, h, bs, 2 * d).to(torch.bfloat16)
    stored = fmt.encode(block)
    assert stored.dtype == torch.uint8
    assert stored.numel() == share * block.numel() * block.element_size()  # scales included
    decoded = fmt.decode(stored, L)
    assert decoded is not None and decoded.dtype == torch.bfloat16 and decoded.shape == block.shape
    err = (decoded.float() - block.float()).abs().max().item()
    assert 0 < err <= tol * block.float().abs().max().item()
    assert fmt.decode(stored[:, :-1], L) is None


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ConnectorConfigError, match="raw, kivi8"):
        BlockFormat("int3", H, BS, D, torch.bfloat16)


@pytest.mark.parametrize("name", FORMATS[1:])
def test_every_connector_format_round_trips_a_block(name: str) -> None:
    """The connector's formats come from kvmem's registry: each decodes every layer's block back."""
    fmt = BlockFormat(name, 2, 32, 16, torch.bfloat16)
    layers = torch.randn(3, 2, 32, 32).to(torch.bfloat16)  # [L, H, bs, 2D]
    decoded = fmt.decode(fmt.encode(layers), 3)
    assert decoded is not None and decoded.shape == layers.shape and decoded.dtype == torch.bfloat16
    error = (decoded.float() - layers.float()).norm() / layers.float().norm()
    assert error < 0.8


def test_formats_whose_layout_holds_layer_state_are_left_out() -> None:
    assert {"kivi8", "kivi4", "kivi2"} <= set(FORMATS) and "bfp4" not in FORMATS
