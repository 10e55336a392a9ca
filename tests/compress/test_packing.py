import pytest
import torch

from kvmem.compress.packing import pack, packed_size, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 3, 8, 33, 64])
def test_pack_unpack_round_trip_is_exact(bits: int, n: int) -> None:
    codes = torch.randint(0, 1 << bits, (3, 5, n), generator=torch.Generator().manual_seed(n + bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packed_size(n, bits))
    if 8 % bits == 0:
        assert packed.nbytes == 3 * 5 * -(-n * bits // 8)  # dense: no bit wasted but the last byte's
    else:
        assert packed.nbytes == 3 * 5 * -(-n // 8) * bits  # eight codes in ``bits`` bytes
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def test_bit_layout_is_little_endian_within_a_byte() -> None:
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]


@pytest.mark.parametrize(("codes", "bits"), [([4], 2), ([16], 4), ([-1], 8)])
def test_out_of_range_codes_are_refused(codes: list[int], bits: int) -> None:
    with pytest.raises(ValueError):
        pack(torch.tensor(codes), bits)


def test_three_bit_codes_form_one_little_endian_word_per_eight() -> None:
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    word = sum(c << (3 * i) for i, c in enumerate(codes.tolist()))
    assert pack(codes, 3).tolist() == [word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF]


@pytest.mark.parametrize("bits", [0, 9])
def test_unsupported_width(bits: int) -> None:
    with pytest.raises(ValueError):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
