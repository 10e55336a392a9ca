"""What kvmem needs to know about a model's attention: layers, KV heads, windows, context."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

from kvmem.errors import KVMemError

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")


@dataclass(frozen=True)
class ModelSpec:
    """The KV-relevant shape of a decoder. ``windows[i]`` is layer i's sliding window (None: full)."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    windows: tuple[int | None, ...]
    max_context: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if len(self.windows) != self.num_layers:
            raise ValueError("one window entry per layer is required")

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values for one token over all layers, as a full cache holds them."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    def full_cache_bytes(self, tokens: int, block_size: int) -> int:
        """Bytes of a full cache of ``tokens`` tokens (every layer, every token) in whole blocks of
        ``block_size`` tokens, as kvmem's pool holds it: at most a block's slack a layer above the
        token-exact ``tokens * kv_bytes_per_token``."""
        return -(-tokens // block_size) * block_size * self.kv_bytes_per_token

    @property
    def num_sliding_layers(self) -> int:
        return sum(w is not None for w in self.windows)

    @classmethod
    def from_config(cls, config: PretrainedConfig, dtype: torch.dtype) -> ModelSpec:
        config = config.get_text_config(decoder=True)
        num_layers = int(config.num_hidden_layers)
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
        # The same reading of the config that transformers' own DynamicCache does.
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        windows: list[int | None] = []
        for layer_type, kwargs in zip(layer_types, layer_kwargs):
            if layer_type == "full_attention":
                windows.append(None)
            elif layer_type in _SLIDING_TYPES:
                windows.append(int(kwargs["sliding_window"]))
            else:
                raise KVMemError(f"unsupported attention layer type {layer_type!r} in {config.model_type}")
        return cls(
            model_type=str(config.model_type),
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            num_heads=num_heads,
            head_dim=head_dim,
            windows=tuple(windows),
            max_context=int(getattr(config, "max_position_embeddings", 0) or 0),
            dtype=dtype,
        )
