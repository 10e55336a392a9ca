"""``PerHeadLayer``: a full-attention layer whose KV heads hold different numbers of tokens.

AdaKV gives each head of a layer its own share of the layer's budget, so after eviction the
heads keep different numbers of tokens. Masking the dropped slots would save nothing: here each
head has a block list of its own, so a head that keeps fewer tokens holds fewer blocks, and the
pool counts only those.

Attention sees the heads gathered into one transient tensor, padded at the front to the longest
head: [H, T, D]. Front padding keeps every head's newest tokens in the last slots, so the causal
part of the mask is the same for all heads; ``valid`` marks the padding, which attention and the
scorers mask out.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch

from kvmem.kv.pool import KVPool
from kvmem.model.layers.base import Kept, KVLayer, LayerParams
from kvmem.model.layers.blocks import BlockList
from kvmem.model.past import Past, dense_ref


class PerHeadLayer(KVLayer):
    """One full-attention layer of one sequence; head ``h`` lives in ``self.heads[h]``."""

    kind: ClassVar[str] = "perhead"

    def __init__(self, params: LayerParams) -> None:
        assert params.window is None, "per-head budgets are for full-attention layers"
        super().__init__(params)
        p = params
        self.heads = [
            BlockList(p.pool, 1, p.head_dim, p.dtype, p.fmt, None, self.device, residual=p.residual)
            for _ in range(p.num_heads)
        ]

    def parts(self) -> dict[str, BlockList]:
        return {f".h{h}": head for h, head in enumerate(self.heads)}

    @property
    def lengths(self) -> list[int]:
        """Tokens held by each head."""
        return [head.held for head in self.heads]

    @property
    def held(self) -> int:
        """Tokens held per head on average, rounded up (what a layer budget counts)."""
        return -(-sum(self.lengths) // self.num_heads)

    @property
    def seq_length(self) -> int:
        return self.heads[0].length

    def valid(self) -> torch.Tensor:
        lengths = torch.tensor(self.lengths, device=self.device)
        t = int(lengths.max())
        return torch.arange(t, device=self.device).view(1, t) >= (t - lengths).view(-1, 1)  # [H, T]

    def check(self) -> None:
        super().check()
        assert all(head.length == self.seq_length for head in self.heads)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [H, q, D]
        for h, head in enumerate(self.heads):
            head.append(k[h : h + 1], v[h : h + 1])

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every head, padded with zeros at the front: [H, T, D] each."""
        parts = [head.dense() for head in self.heads]  # each [1, T_h, D]
        t = max(k.shape[1] for k, _ in parts)
        shape = (self.num_heads, t, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for h, (k, v) in enumerate(parts):
            n = k.shape[1]
            keys[h, t - n :] = k[0]
            values[h, t - n :] = v[0]
        return keys, values

    def past(self) -> Past:
        if not self.seq_length:
            return Past.empty(self.dtype)
        keys, values = self.gather()
        valid, refs = self.valid(), [dense_ref(keys, values)]
        return Past([keys], [values], 0, keys.shape[1], self.dtype, valid=valid, refs=refs)

    def scoring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        keys, values = self.gather()
        return keys, values, self.attention, self.valid()

    def cost_of_blocks(self, n: int) -> int:
        """Most bytes the layer holds with at most ``n * block_size`` tokens per head on average.

        Heads of ``k_h`` tokens need ``sum(ceil(k_h / bs))`` blocks, at most ``n * H + H - 1``
        when ``sum(k_h) <= n * H * bs``: each head may leave one block partly filled.
        """
        if n == 0:
            return 0
        one = self.heads[0]
        per_block = one.cost_of_blocks(2) - one.cost_of_blocks(1)
        extra = one.cost_of_blocks(1) - per_block  # e.g. the full-precision residual of KIVI
        heads = self.num_heads
        return (n * heads + heads - 1) * per_block + heads * extra

    def bytes_to_append(self, q: int) -> tuple[int, int]:
        sizes = [head.bytes_to_append(q) for head in self.heads]
        return sum(before for before, _ in sizes), sum(after for _, after in sizes)

    def max_bytes_to_grow(self, n: int) -> int:
        return sum(head.max_bytes_to_grow(n) for head in self.heads)

    def evict(self, kept: Kept) -> None:
        """Keep the gathered slots ``chosen`` ([H, k], ascending per head; padding never chosen)."""
        if kept.keys is not None or kept.values is not None:
            raise NotImplementedError("merging into a per-head layer is not supported")
        mask = torch.zeros(self.valid().shape, dtype=torch.bool, device=self.device)
        mask.scatter_(1, kept.chosen, True)
        self.keep_mask(mask)

    @torch.inference_mode()
    def keep_mask(self, mask: torch.Tensor) -> None:
        """Keep, in each head, the gathered slots where ``mask`` ([H, T] bool) is True."""
        valid = self.valid()
        assert mask.shape == valid.shape and not bool((mask & ~valid).any()), "padding chosen"
        t = valid.shape[1]
        kept = [mask[h].nonzero().flatten() for h in range(self.num_heads)]  # gathered slots
        for head, slots in zip(self.heads, kept):
            offset = t - head.held  # slot of the head's first token
            head.compact((slots - offset).view(1, -1))
        if self.attention is not None:  # re-pad the accumulated attention to the new layout
            new_t = max(len(slots) for slots in kept)
            attention = self.attention.new_zeros(self.num_heads, new_t)
            for h, slots in enumerate(kept):
                attention[h, new_t - len(slots) :] = self.attention[h, slots]
            self.attention = attention

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        t = max(self.lengths)
        return t + query_length, self.seq_length - t

    def copy_to(self, pool: KVPool) -> PerHeadLayer:
        new = copy.copy(self)
        new.pool = pool
        new.heads = [head.copy_to(pool) for head in self.heads]
        self._copy_state(new)
        return new
