"""One vLLM KV block (every layer's) as the tensors kvmem's tiers store, and back.

vLLM's CPU attention keeps each layer's KV cache as [num_blocks, kv_heads, block_size, 2 * head_dim];
per head, the block's memory is its keys ([block_size, head_dim]) then its values, so a block
viewed as [H, 2, bs, D] is (keys, values) — kvmem's own block shape with the first two axes swapped.

Formats (``BlockFormat``):
- ``raw``: the block as vLLM holds it (bfloat16 on CPU): loading it gives bit-identical KV, so
  greedy tokens are the same as computing it. The default.
- a block format of kvmem's registry whose layout keeps no per-layer state (``settings.FORMATS``:
  ``kivi8``, ``kivi4``, ``kivi2``, the rotated ones): every layer's keys and values in one packed
  ``uint8`` buffer — for SmolLM2's blocks (3 KV heads, 128 tokens, head dim 64) KIVI's are 0.5625,
  0.3125 and 0.1875 of the bf16 bytes, float16 scales and zero points included; lossy (see kvmem's
  KL gates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.formats import QUANTIZERS
from kvmem.integrations.vllm.settings import FORMATS, ConnectorConfigError
from kvmem.model.format import Layout, Quantizer


def block_view(block: torch.Tensor) -> torch.Tensor:
    """vLLM CPU block [H, bs, 2D] -> [H, 2, bs, D] (keys at [:, 0], values at [:, 1]); a view."""
    heads, bs, two_d = block.shape[-3:]
    return block.reshape(*block.shape[:-3], heads, 2, bs, two_d // 2)


@dataclass
class BlockFormat:
    name: str
    heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ConnectorConfigError(f"unknown block format {self.name!r}; one of {', '.join(FORMATS)}")
        self.quantizer: Quantizer | None = None
        self.layout: Layout | None = None
        if self.name != "raw":
            self.quantizer = QUANTIZERS[self.name]
            self.layout = self.quantizer.layout(self.heads, self.block_size, self.head_dim)

    def encode(self, layers: torch.Tensor) -> torch.Tensor:
        """Every layer's block [L, H, bs, 2D] -> what is stored (the same tensor, or uint8 [L, nbytes])."""
        if self.quantizer is None:
            return layers.contiguous()
        assert self.layout is not None
        kv = block_view(layers).float()  # [L, H, 2, bs, D]
        out = torch.empty(layers.shape[0], self.layout.nbytes, dtype=torch.uint8)
        self.quantizer.encode(kv[:, :, 0], kv[:, :, 1], self.layout, out)
        return out

    def decode(self, stored: torch.Tensor, num_layers: int) -> torch.Tensor | None:
        """What was stored -> [L, H, bs, 2D] in the cache's dtype; None if it has another shape."""
        shape = (num_layers, self.heads, self.block_size, 2 * self.head_dim)
        if self.quantizer is None:
            ok = tuple(stored.shape) == shape and stored.dtype == self.dtype
            return stored if ok else None
        assert self.layout is not None
        if stored.dtype != torch.uint8 or tuple(stored.shape) != (num_layers, self.layout.nbytes):
            return None
        keys, values = self.quantizer.decode(stored, self.layout, self.dtype)  # [L, H, bs, D] each
        return torch.stack([keys, values], dim=2).reshape(shape)
