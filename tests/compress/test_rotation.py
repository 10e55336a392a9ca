import pytest
import torch

from kvmem.compress.rotation import rotate, rotations, unrotate


@pytest.mark.parametrize("head_dim", [64, 256, 48])  # Hadamard sizes, and a random orthogonal one
def test_rotations_are_orthogonal_seeded_and_differ_per_head(head_dim: int) -> None:
    m = rotations(0, 3, head_dim)
    assert m.shape == (3, head_dim, head_dim)
    eye = torch.eye(head_dim).expand(3, -1, -1)
    assert torch.allclose(m @ m.transpose(-1, -2), eye, atol=1e-5)
    assert torch.equal(m, rotations(0, 3, head_dim))  # a pure function of the seed
    assert not torch.equal(m, rotations(1, 3, head_dim))
    assert not torch.equal(m[0], m[1])


def test_rotation_round_trips_and_spreads_an_outlier_channel() -> None:
    x = torch.randn(2, 3, 16, 64, generator=torch.Generator().manual_seed(0))
    x[..., 5] *= 50  # one outlier channel, as keys have
    m = rotations(0, 3, 64)
    y = rotate(x, m)
    assert torch.allclose(unrotate(y, m), x, atol=1e-3)
    peak = lambda t: float((t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
    assert peak(y) < peak(x) / 2  # the outlier is spread over every channel
