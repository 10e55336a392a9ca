"""A model's identity: what must match for saved or shared KV state to be valid for it.

Keys and values depend on every weight, so the identity digests the configuration, the dtype and
a sample of every parameter (its name, shape and first and last elements) — cheap to compute
(milliseconds, no full pass over the weights) yet different for different checkpoints of one
architecture, including randomly initialised test models with different seeds.
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PreTrainedModel

_SAMPLE = 64  # elements read from each end of every parameter


def model_identity(model: PreTrainedModel) -> str:
    """A hex digest (32 characters) that changes when the model's weights or shape change."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where it was loaded from is not what it is
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]).to(torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]
