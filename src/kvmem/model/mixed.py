"""A full-attention layer in two precisions: the important tokens, and the demoted ones at low bits.

Mixed precision (``kvmem.compress.mixed``) keeps the tokens an eviction would drop in a second,
low-precision store instead. ``high`` holds the important tokens as any layer does (full
precision, or the policy's quantizer); ``low`` holds the demoted ones quantized (KIVI 2-bit by
default: packed codes, counted by the pool). Attention sees ``low`` then ``high``: order among
past tokens does not matter (RoPE is applied before storage) and the newest tokens stay last.
"""

from __future__ import annotations

import torch

from kvmem.compress.quantizer import Quantizer
from kvmem.kv.pool import KVPool
from kvmem.model.cache import PagedLayer


class MixedLayer(PagedLayer):
    """One full-attention layer of one sequence, split into ``high`` and ``low`` precision.

    ``held`` counts the high-precision tokens (what a layer budget's capacity counts); ``low``
    may hold ``ratio`` times that capacity besides. The inherited block table stays empty.
    """

    def __init__(
        self,
        pool: KVPool,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layer_idx: int,
        quant: Quantizer | None,
        low_quant: Quantizer,
        low_share: float,
    ) -> None:
        super().__init__(pool, num_heads, head_dim, None, dtype, layer_idx, quant)
        self.high = PagedLayer(pool, num_heads, head_dim, None, dtype, layer_idx, quant)
        self.low = PagedLayer(pool, num_heads, head_dim, None, dtype, layer_idx, low_quant)
        # low-precision tokens per high-precision token, so that `low_share` of the bytes go low
        high_block = self.high.cost_of_blocks(2) - self.high.cost_of_blocks(1)
        low_block = self.low.cost_of_blocks(2) - self.low.cost_of_blocks(1)
        self.ratio = max(1, round(high_block / low_block * low_share / (1 - low_share)))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.high.lazy_initialization(key_states, value_states)
        self.low.lazy_initialization(key_states, value_states)

    @property
    def held(self) -> int:
        return self.high.held

    @property
    def num_low(self) -> int:
        return self.low.held

    @property
    def seq_length(self) -> int:
        return self.high.seq_length

    def check(self) -> None:
        assert not self.table.block_ids
        self.high.check()
        self.low.check()

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [H, q, D]
        self.high._append(k, v)

    def gather(self, last: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-precision tokens (dequantized), then high-precision ones: [1, H, T_low + T_high, D]."""
        assert last is None, "only sliding-window layers gather their last tokens"
        high_k, high_v = self.high.gather()
        if not self.low.held:
            return high_k, high_v
        low_k, low_v = self.low.gather()
        return torch.cat([low_k, high_k], dim=2), torch.cat([low_v, high_v], dim=2)

    def cost_of_blocks(self, n: int) -> int:
        """Most bytes with ``n`` high-precision blocks and ``ratio * n`` low ones (+ their residual)."""
        return 0 if n == 0 else self.high.cost_of_blocks(n) + self.low.cost_of_blocks(self.ratio * n + 1)

    def bytes_to_append(self, q: int) -> tuple[int, int]:
        before, after = self.high.bytes_to_append(q)
        return before + self.low.nbytes, after + self.low.nbytes

    def max_bytes_to_grow(self, n: int) -> int:
        return self.high.max_bytes_to_grow(n) + self.low.nbytes

    @property
    def nbytes(self) -> int:
        return self.high.nbytes + self.low.nbytes

    def compact(
        self,
        keep: torch.Tensor,
        kept_keys: torch.Tensor | None = None,
        kept_values: torch.Tensor | None = None,
    ) -> None:
        raise NotImplementedError("a mixed-precision layer demotes tokens instead (see demote)")

    @torch.inference_mode()
    def demote(self, keep: torch.Tensor, low_capacity: int) -> None:
        """Keep the high-precision slots ``keep`` ([H, k], ascending per head); move the others to
        ``low``, which then holds at most ``low_capacity`` tokens: its oldest full blocks go first,
        then, if still over, the demoted tokens that came last."""
        heads, held = keep.shape[0], self.high.held
        dropped = torch.ones((heads, held), dtype=torch.bool)
        dropped.scatter_(1, keep, False)
        demoted = dropped.nonzero()[:, 1].view(heads, -1)  # [H, d], ascending per head
        bs, n_low = self.low.table.block_size, self.low.held
        old_blocks = 0  # oldest low blocks to drop, all full
        while n_low - old_blocks * bs + demoted.shape[1] > low_capacity and (old_blocks + 1) * bs <= n_low:
            old_blocks += 1
        room = max(0, low_capacity - (n_low - old_blocks * bs))
        demoted = demoted[:, :room]
        high_k, high_v = self.high.gather()  # [1, H, T_high, D]
        index = demoted.unsqueeze(-1).expand(-1, -1, self.head_dim)
        moved_k, moved_v = high_k[0].gather(1, index), high_v[0].gather(1, index)  # [H, d, D]
        if self.attention is not None:  # gathered order afterwards: low kept, demoted, high kept
            low_att, high_att = self.attention[:, :n_low], self.attention[:, n_low:]
            self.attention = torch.cat(
                [low_att[:, old_blocks * bs :], high_att.gather(1, demoted), high_att.gather(1, keep)], dim=1
            )
        self.high.compact(keep)
        for _ in range(old_blocks):
            self.low.drop_block(0)
        self.low._append(moved_k, moved_v)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        t = self.low.held + self.high.held
        return t + query_length, self.seq_length - t

    def get_seq_length(self) -> int:
        return self.seq_length

    def copy_to(self, pool: KVPool) -> MixedLayer:
        new = super().copy_to(pool)
        assert isinstance(new, MixedLayer)
        new.high, new.low = self.high.copy_to(pool), self.low.copy_to(pool)
        return new

    def release(self) -> None:
        self.high.release()
        self.low.release()
        super().release()
