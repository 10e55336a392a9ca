"""The name transformers gives a model's cache argument and output field.

transformers 5.x renamed ``past_key_values`` to ``cache`` (forward argument and output field); the
old name still works for a while but warns, and is removed in a later 5.x. kvmem supports the whole
``transformers>=5.0,<6`` range, so it asks the model which name it takes instead of hard-coding one.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from transformers import Cache


def _takes_cache(model: Any) -> bool:
    return "cache" in inspect.signature(model.forward).parameters


def cache_kwargs(model: Any, cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` for ``model(...)`` or ``model.generate(...)``, under the name it takes."""
    return {"cache" if _takes_cache(model) else "past_key_values": cache}


def output_cache(output: Any) -> Cache:
    """The cache a model's (or ``generate``'s) output returns, whichever name it carries."""
    names = {field.name for field in dataclasses.fields(output)}
    cache = getattr(output, "cache" if "cache" in names else "past_key_values")
    assert isinstance(cache, Cache), "the output of a call made with use_cache=True holds a cache"
    return cache
