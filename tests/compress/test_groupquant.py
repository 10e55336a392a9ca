import pytest
import torch

from kvmem.compress.groupquant import dequantize, quantize
from kvmem.compress.packing import packed_size


def keys_like(seed: int, shape: tuple[int, ...] = (2, 3, 50, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 5] *= 20  # an outlier channel, as keys have
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("group_size", "dim"), [(32, -2), (32, -1), (16, -1), (64, 2)])
def test_error_within_half_a_step_and_shape_restored(bits: int, group_size: int, dim: int) -> None:
    x = keys_like(bits)
    q = quantize(x, bits, group_size, dim)
    y = dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    # the bound, element by element: half of the element's group scale (plus float32 rounding)
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    step = q.scale.float().expand(*q.scale.shape[:-1], group_size).reshape(*moved.shape[:-1], -1)[..., :n]
    err = (y - x).abs().movedim(dim, -1)
    assert bool((err <= step / 2 + 1e-5 * x.abs().max()).all())


def test_more_bits_less_error() -> None:
    x = keys_like(0)
    errors = [(dequantize(quantize(x, b, 32, -2)) - x).abs().mean().item() for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nbytes_counts_codes_and_stats(bits: int) -> None:
    x = keys_like(1, (1, 2, 64, 64))
    q = quantize(x, bits, 32, dim=-2)
    groups = 1 * 2 * 64 * (64 // 32)
    assert q.packed.dtype == torch.uint8
    assert q.nbytes == groups * packed_size(32, bits) + groups * 2 * 2  # float16 scale and zero
    assert q.nbytes == x.nbytes * (bits + 1) // 32  # bits per element, plus 1 for the stats


def test_constant_groups_are_exact() -> None:
    x = torch.full((4, 40), 3.25)
    assert torch.equal(dequantize(quantize(x, 2, 8)), x)


def test_large_values_fall_back_to_float32_stats() -> None:
    x = torch.tensor([[-1e5, 0.0, 1e5, 7.0]])
    q = quantize(x, 8, 4)
    assert q.scale.dtype == torch.float32
    assert (dequantize(q) - x).abs().max() <= q.scale.max() / 2 + 1e-2
