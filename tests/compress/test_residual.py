"""The residual format: tokens written slot by slot, read back within their bits, bytes counted."""

import pytest
import torch

from kvmem.compress.bits import block_bits
from kvmem.compress.budget import KVBudget
from kvmem.compress.registry import UnknownPolicyError, make_policy
from kvmem.compress.residual import RotatedTokens, parse_residual

H, BS, D = 3, 16, 64


def gaussian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(H, n, D, generator=g)
    x[:, :, 5] *= 20  # an outlier channel, as keys have
    return x


@pytest.mark.parametrize("bits", [8, 4])
def test_slots_written_in_pieces_read_back_within_the_codes_error(bits: int) -> None:
    fmt = RotatedTokens(bits)
    layout = fmt.layout(H, BS, D)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    keys, values = gaussian(11, 1), gaussian(11, 2)
    start = 0
    for n in (1, 3, 7):  # slots 0..10 in three writes
        fmt.write(keys[:, start : start + n], values[:, start : start + n], layout, buffer, start)
        start += n
    k, v = fmt.read(buffer, layout, torch.float32)  # [H, BS, D]
    assert k.shape == v.shape == (H, BS, D)
    # symmetric codes on each vector's own scale: at most half a step per rotated coordinate, a
    # step being the vector's largest coordinate (<= its norm, which rotation keeps) over ``top``
    step = keys.norm(dim=-1).amax() / fmt.top
    assert float((k[:, :11] - keys).norm(dim=-1).amax()) <= step * D**0.5 / 2
    rel = float((k[:, :11] - keys).norm() / keys.norm())
    assert rel < (0.01 if bits == 8 else 0.15)
    assert torch.equal(k[:, 11:], torch.zeros(H, BS - 11, D))  # never written: zeros
    assert torch.equal(v[:, 11:], torch.zeros(H, BS - 11, D))


def test_a_write_touches_only_its_slots() -> None:
    fmt = RotatedTokens(8)
    layout = fmt.layout(H, BS, D)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    fmt.write(gaussian(4), gaussian(4, 1), layout, buffer, 0)
    before = fmt.read(buffer, layout, torch.float32)
    fmt.write(gaussian(2, 5), gaussian(2, 6), layout, buffer, 4)
    after = fmt.read(buffer, layout, torch.float32)
    for old, new in zip(before, after):
        assert torch.equal(old[:, :4], new[:, :4])
        assert not torch.equal(old[:, 4:6], new[:, 4:6])
    with pytest.raises(AssertionError):
        fmt.write(gaussian(2), gaussian(2), layout, buffer, BS - 1)


def test_bytes_and_bits_per_element() -> None:
    fmt = RotatedTokens(8)
    layout = fmt.layout(3, 64, 64)
    # codes: 8 bits per element; one float16 scale per vector of 64: 0.25 bits more
    assert layout.nbytes == 2 * 3 * 64 * 64 + 2 * 2 * 3 * 64
    assert block_bits(fmt, 3, 64, 64) == pytest.approx(8.25)
    assert block_bits(RotatedTokens(4), 3, 64, 64) == pytest.approx(4.25)


def test_names() -> None:
    assert parse_residual("res8") == RotatedTokens(8)
    assert parse_residual("res4") == RotatedTokens(4)
    for bad in ("res3", "res9", "res", "rot8", "res8x"):
        assert parse_residual(bad) is None
    with pytest.raises(ValueError, match="residual bits"):
        RotatedTokens(2)
    policy = make_policy("snapkv+mixed-rot2+rotk4v2+res8", KVBudget.parse("1MiB"))
    assert policy.residual == RotatedTokens(8)
    assert policy.name == "snapkv+mixed-rot2+rotk4v2+res8"
    assert make_policy(policy.name, KVBudget.parse("1MiB")) == policy
    with pytest.raises(UnknownPolicyError, match="needs|add one"):
        make_policy("res8", KVBudget.parse(None))
    with pytest.raises(UnknownPolicyError, match="add one"):
        make_policy("snapkv+res8", KVBudget.parse("1MiB"))
    with pytest.raises(UnknownPolicyError, match="at most one"):
        make_policy("kivi4+res8+res4", KVBudget.parse(None))
