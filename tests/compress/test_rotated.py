import pytest
import torch

from kvmem.compress.bits import block_bits
from kvmem.compress.budget import KVBudget
from kvmem.compress.codebook import gaussian_mse, lloyd_max, uniform
from kvmem.compress.kivi import KIVI
from kvmem.compress.registry import find_quantizer, make_policy
from kvmem.compress.rotated import RotatedQuant, parse_rotated


def _round_trip(
    q: RotatedQuant, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = q.layout(keys.shape[-3], keys.shape[-2], keys.shape[-1])
    out = torch.empty(*keys.shape[:-3], layout.nbytes, dtype=torch.uint8)
    q.encode(keys, values, layout, out)
    return q.decode(out, layout, torch.float32)


@pytest.mark.parametrize(("kb", "vb"), [(2, 2), (3, 2), (4, 3), (8, 8)])
def test_gaussian_error_is_the_codebooks_error(kb: int, vb: int) -> None:
    """On Gaussian vectors (what rotation makes of a head's coordinates) the relative squared error
    is the Lloyd-Max codebook's own error on N(0, 1), up to the float16 scale's rounding."""
    g = torch.Generator().manual_seed(kb * 10 + vb)
    keys = torch.randn(4, 3, 64, 64, generator=g) + 3.0  # an offset the per-block mean removes
    values = torch.randn(4, 3, 64, 64, generator=g)
    k2, v2 = _round_trip(RotatedQuant(kb, vb), keys, values)
    k_err = float(((k2 - keys) ** 2).mean() / ((keys - keys.mean(-2, keepdim=True)) ** 2).mean())
    v_err = float(((v2 - values) ** 2).mean() / (values**2).mean())
    for err, bits in ((k_err, kb), (v_err, vb)):
        assert err <= gaussian_mse(lloyd_max(bits)) * 1.1 + 1e-5, (bits, err)


def test_outlier_channel_costs_rotated_codes_less_than_unrotated_ones() -> None:
    """Keys with one channel 20x the others: the rotated 4-bit format's error is far below that of a
    per-token 4-bit code on the raw channels (the outlier would set every token's scale)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 3, 64, 64, generator=g)
    keys[..., 7] *= 20
    values = torch.randn(1, 3, 64, 64, generator=g)
    values[..., 7] *= 20
    _, v2 = _round_trip(RotatedQuant(4, 4), keys, values)
    _, v_kivi = _round_trip(KIVI(4, group_size=64), keys, values)  # KIVI values: per token, no rotation
    small = [c for c in range(64) if c != 7]
    rotated_err = float(((v2 - values)[..., small] ** 2).mean())
    plain_err = float(((v_kivi - values)[..., small] ** 2).mean())
    assert rotated_err < plain_err / 2  # measured: 3.2x lower


def test_bytes_and_bits_per_element_count_every_part() -> None:
    q = RotatedQuant(3, 2)
    layout = q.layout(3, 64, 64)
    # key means (H*D float16) + key and value scales (H*bs float16 each) + 3- and 2-bit codes
    assert layout.nbytes == 2 * 3 * 64 + 2 * 2 * 3 * 64 + 3 * 64 * 64 * 3 // 8 + 3 * 64 * 64 * 2 // 8
    assert block_bits(q, 3, 64, 64) == pytest.approx(2.875)
    assert block_bits(KIVI(4), 3, 64, 64) == pytest.approx(5.0)  # 4-bit codes + float16 stats per 32


def test_codebook_variant_changes_levels_not_bytes() -> None:
    lloyd, flat = RotatedQuant(3, 3), RotatedQuant(3, 3, "uniform")
    assert lloyd.layout(3, 64, 64) == flat.layout(3, 64, 64)
    assert torch.equal(flat.levels(3), uniform(3)) and not torch.equal(lloyd.levels(3), flat.levels(3))


def test_names_parse_and_combine_with_an_eviction_method() -> None:
    assert parse_rotated("rotk3v2") == RotatedQuant(3, 2)
    assert parse_rotated("rot4") == RotatedQuant(4, 4)
    assert parse_rotated("rotuk4v2") == RotatedQuant(4, 2, "uniform")
    for bad in ("rot", "rotk3", "rot9", "rotk0v2", "rotate3", "rot34"):
        assert find_quantizer(bad) is None
    policy = make_policy("snapkv+rotk3v2", KVBudget.parse("25%"))
    assert policy.quant == RotatedQuant(3, 2)
    assert find_quantizer("rotk3v2") == RotatedQuant(3, 2)
