"""The name transformers gives a model's cache argument and output field.

transformers 5.x renamed ``past_key_values`` to ``cache`` (forward argument and output field); the
old name still works for a while but warns, and is removed in a later 5.x. kvmem supports the whole
``transformers>=5.0,<6`` range, so it asks the model which name it takes instead of hard-coding one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from transformers import Cache


@functools.cache
def _cache_name(model_class: type) -> str:
    # read once per class: inspect.signature costs ~60 us, and this runs at every decode step
    forward = model_class.forward  # type: ignore[attr-defined]
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` for ``model(...)`` or ``model.generate(...)``, under the name it takes."""
    model_class: type = type(model)
    return {_cache_name(model_class): cache}


def output_cache(output: Any) -> Cache:
    """The cache a model's (or ``generate``'s) output returns, whichever name it carries."""
    names = {field.name for field in dataclasses.fields(output)}
    cache = getattr(output, "cache" if "cache" in names else "past_key_values")
    assert isinstance(cache, Cache), "the output of a call made with use_cache=True holds a cache"
    return cache
