import torch

from kvmem.engine.sampling import SamplingParams, sample

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5])


def test_greedy_is_argmax() -> None:
    assert sample(LOGITS, SamplingParams(), None) == 1


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    for params in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=0.01)):
        picks = {sample(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(20)}
        assert picks == {1}


def test_top_k_restricts_choices() -> None:
    params = SamplingParams(temperature=5.0, top_k=2)
    picks = {sample(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks == {1, 2}


def test_top_p_keeps_the_nucleus() -> None:
    # probabilities at temperature 1: [0.09, 0.65, 0.24, 0.05]; top_p 0.8 keeps tokens 1 and 2
    params = SamplingParams(temperature=1.0, top_p=0.8)
    picks = {sample(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(300)}
    assert picks == {1, 2}
