import pytest
import torch

from kvmem.compress.packing import pack, packed_size, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 8, 33, 64])
def test_pack_unpack_round_trip_is_exact(bits: int, n: int) -> None:
    codes = torch.randint(0, 1 << bits, (3, 5, n), generator=torch.Generator().manual_seed(n + bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packed_size(n, bits))
    assert packed.nbytes == 3 * 5 * -(-n * bits // 8)  # dense: no bit wasted but the last byte's
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def test_bit_layout_is_little_endian_within_a_byte() -> None:
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]


@pytest.mark.parametrize(("codes", "bits"), [([4], 2), ([16], 4), ([-1], 8)])
def test_out_of_range_codes_are_refused(codes: list[int], bits: int) -> None:
    with pytest.raises(ValueError):
        pack(torch.tensor(codes), bits)


def test_unsupported_width() -> None:
    with pytest.raises(ValueError):
        pack(torch.zeros(4, dtype=torch.uint8), 3)
