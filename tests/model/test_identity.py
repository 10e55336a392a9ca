from __future__ import annotations

import torch

from kvmem.model.identity import model_identity
from tiny_models import tiny_llama


def test_identity_is_stable_and_tells_weights_apart() -> None:
    a, b = tiny_llama(), tiny_llama()
    assert model_identity(a.model) == model_identity(b.model) == a.identity
    with torch.no_grad():
        next(b.model.parameters()).reshape(-1)[0] += 1.0
    assert model_identity(b.model) != a.identity
