"""cache_kwargs / output_cache: the cache goes in and comes out under the name the model uses."""

import warnings

import torch
from transformers import DynamicCache

from kvmem.model.cache_arg import cache_kwargs, output_cache
from kvmem.model.loader import LoadedModel

IDS = torch.arange(1, 9)[None]  # [1, 8]


def test_forward_takes_the_cache_without_a_deprecation(tiny: LoadedModel) -> None:
    cache = DynamicCache(config=tiny.model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the old name warns where the new one exists
        with torch.inference_mode():
            out = tiny.model(input_ids=IDS, use_cache=True, **cache_kwargs(tiny.model, cache))
    assert output_cache(out) is cache
    assert cache.get_seq_length() == IDS.shape[1]


def test_generate_returns_the_cache_it_was_given(tiny: LoadedModel) -> None:
    cache = DynamicCache(config=tiny.model.config)
    out = tiny.model.generate(  # type: ignore[operator]
        IDS,
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
        **cache_kwargs(tiny.model, cache),
    )
    assert output_cache(out) is cache
    assert cache.get_seq_length() == IDS.shape[1] + 2  # the last new token is never fed back
