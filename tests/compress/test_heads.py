"""AdaKV's selection: the layer's budget across heads, a floor per head, never padding."""

import torch

from kvmem.compress.heads import AdaKV


def test_budget_goes_to_the_best_scores_of_the_whole_layer_with_a_floor_per_head() -> None:
    scores = torch.tensor(
        [
            [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5],  # a spread head
            [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2],  # a concentrated head
        ]
    )
    chosen = AdaKV(floor=0.2).select(scores, None, keep=5)
    assert int(chosen.sum()) == 10
    assert chosen[1].tolist() == [False] * 9 + [True]  # only its floor: 0.2 * 5 = 1 token
    assert chosen[0].tolist() == [True] * 9 + [False]
    uniform = AdaKV(floor=1.0).select(scores, None, keep=5)
    assert uniform.sum(dim=1).tolist() == [5, 5]


def test_padding_is_never_chosen_and_small_layers_keep_everything() -> None:
    scores = torch.tensor([[5.0, 5.0, 1.0, 2.0], [0.0, 0.0, 3.0, 3.0]])
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    chosen = AdaKV().select(scores, valid, keep=4)  # 8 asked, 6 valid
    assert (chosen == valid).all()
    some = AdaKV().select(scores, valid, keep=2)
    assert int(some.sum()) == 4 and not bool((some & ~valid).any())
    # a floor of 1 each (slot 3 and one of head 1's 3.0), then the best two left: 3.0 and 1.0
    assert some.tolist() == [[False, False, True, True], [False, False, True, True]]
