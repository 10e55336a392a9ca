import pytest
import torch

from kvmem.compress.codebook import gaussian_mse, lloyd_max, nearest, uniform


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_levels_are_centroids_of_their_cells(bits: int) -> None:
    """Lloyd's optimality condition, checked by sampling: each level is the mean of the normal
    samples nearest to it (the table is computed, not copied; this would catch a wrong one)."""
    levels = lloyd_max(bits)
    assert levels.shape == (1 << bits,) and bool((levels[1:] > levels[:-1]).all())
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(bits))
    codes = nearest(x, levels).long()
    for i, level in enumerate(levels.tolist()):
        assert float(x[codes == i].mean()) == pytest.approx(level, abs=0.01)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_beats_the_best_uniform_grid_and_matches_sampled_error(bits: int) -> None:
    lm, un = lloyd_max(bits), uniform(bits)
    assert gaussian_mse(lm) <= gaussian_mse(un) + 1e-12
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(10 + bits))
    sampled = float(((x - lm[nearest(x, lm).long()]) ** 2).mean())
    assert sampled == pytest.approx(gaussian_mse(lm), rel=0.02)
    # a coarser or finer uniform step is worse than the chosen one
    step = float(un[1] - un[0])
    for factor in (0.9, 1.1):
        grid = un * factor
        assert gaussian_mse(grid) > gaussian_mse(un), (step, factor)


def test_nearest_picks_the_closest_level() -> None:
    levels = torch.tensor([-1.0, 0.0, 2.0])
    assert nearest(torch.tensor([-5.0, -0.6, -0.4, 0.9, 1.1, 9.0]), levels).tolist() == [0, 0, 1, 1, 2, 2]
