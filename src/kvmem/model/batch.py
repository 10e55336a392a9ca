"""One model forward over several sequences, each in its own ``KVMemCache``: a flattened batch.

The scheduled tokens of every sequence are laid end to end in one row (``input_ids`` [1, N]),
each with its own position, as transformers' own continuous batching does: the projections and
MLPs see no padding. ``ForwardBatch`` is the transformers ``Cache`` for that call; its
``update`` writes each sequence's new keys and values into the sequence's own layer (after
taking the layer's ``Past``: what the new queries may attend to, as views of pool blocks), and
kvmem's attention function (``kvmem.model.attention``) calls ``attend``:

- sequences computing one token (decoding) attend together in one SDPA call: each sequence's
  past blocks, its new token and padding are concatenated into a row of [B, H, T, D], in one
  ``torch.cat`` per layer, and a mask hides each row's padding and unfilled slots;
- a sequence computing several tokens (a prefill chunk) attends on its own, with a causal mask
  (and its sliding window), so a long chunk does not pad every decoding row to its length.

Quantized blocks are decoded inside the layer being computed (one decode for every quantized
block of the batch) and dropped after it: no second full-precision copy is kept. The gather is
a copy of each sequence's held keys and values per layer (what ``DynamicCache`` also copies with
``torch.cat`` at every step); a fused kernel reading blocks in place would avoid it.

The model gets a placeholder 4-D ``attention_mask``: transformers then skips building masks of
its own (which would be sized for one sequence), and kvmem's attention builds each row's.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvmem.model import kernel
from kvmem.model.attention import sdpa
from kvmem.model.cache import KVMemCache
from kvmem.model.cache_arg import cache_kwargs
from kvmem.model.past import Past, decode_packed


class Observer(Protocol):
    """Sees each layer's queries and the keys they attended to (compression scorers' statistics).

    ``needs_keys``: whether it reads the keys (gathering them is a copy of the layer's held keys)."""

    needs_keys: bool

    def observe(
        self,
        layer_idx: int,
        query: torch.Tensor,
        keys: torch.Tensor | None,
        scaling: float,
        valid: torch.Tensor | None,
    ) -> None:
        """query: [1, Hq, q, D]; keys: [1, H, T + q, D] (held then new; None unless ``needs_keys``);
        valid: [H, T + q] or None."""
        ...


class Row(NamedTuple):
    """One sequence's part of a forward: the tokens it computes, at positions after what it holds."""

    cache: KVMemCache
    tokens: list[int]
    observer: Observer | None = None
    all_logits: bool = False  # logits for every token (else only the last one's)


class ForwardBatch(Cache):
    """The transformers ``Cache`` of one forward over ``rows`` (see the module docstring)."""

    def __init__(self, rows: list[Row]) -> None:
        super().__init__(layers=[])
        self.rows = rows
        self.sizes = [len(row.tokens) for row in rows]
        self.starts = [0]
        for size in self.sizes[:-1]:
            self.starts.append(self.starts[-1] + size)
        self._pasts: dict[int, list[Past]] = {}
        self._masks: dict[tuple[tuple[int, int, int], ...], torch.Tensor] = {}
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return 0  # positions are given per token

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [1, H, N, D], the rows' new tokens end to end
        pasts = []
        for row, start, size in zip(self.rows, self.starts, self.sizes):
            layer = row.cache.kv_layers[layer_idx]
            layer.is_initialized = True
            pasts.append(layer.past())  # before writing: a sliding layer may drop what these queries see
            layer.write(key_states[0, :, start : start + size], value_states[0, :, start : start + size])
        self._pasts[layer_idx] = pasts
        return key_states, value_states

    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Each row's queries over its own past and new tokens: query [1, Hq, N, D] -> [1, N, Hq, D]."""
        pasts = self._pasts.pop(layer_idx)
        window = self.rows[0].cache.spec.windows[layer_idx]
        for b, (row, start, size) in enumerate(zip(self.rows, self.starts, self.sizes)):
            fetched = row.cache.kv_layers[layer_idx].retrieve(query[:, :, start : start + size])
            if fetched is not None:  # offloaded blocks chosen for these queries, all in their past
                pasts[b] = pasts[b].prepend(fetched[0][0], fetched[1][0])
        out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [N, Hq, D]
        single = [b for b, size in enumerate(self.sizes) if size == 1]
        geometry = kernel.usable([pasts[b] for b in single], query) if single else None
        if geometry is not None:  # blocks read in place by the compiled kernel
            index = self._index(single, query.device)
            q = query[0].index_select(1, index).transpose(0, 1)  # [B, Hq, D]
            new_k = key[0].index_select(1, index).transpose(0, 1)  # [B, H, D]
            new_v = value[0].index_select(1, index).transpose(0, 1)
            result = kernel.decode(q, new_k, new_v, [pasts[b] for b in single], scaling, geometry)
            out.index_copy_(0, index, result)
        elif single:
            decode_packed([pasts[b] for b in single])
            self._attend_single(single, pasts, query, key, value, scaling, out)
        for b, size in enumerate(self.sizes):
            if size > 1:
                decode_packed([pasts[b]])
                self._attend_chunk(b, pasts[b], query, key, value, scaling, window, out)
        for b, row in enumerate(self.rows):
            if row.observer is not None:
                self._observe(b, row.observer, layer_idx, pasts[b], query, key, scaling)
        return out.unsqueeze(0)

    def _attend_single(
        self,
        rows: list[int],
        pasts: list[Past],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        out: torch.Tensor,
    ) -> None:
        """Rows computing one token each, in one padded SDPA call."""
        heads, dim = key.shape[1], key.shape[3]
        slots = [pasts[b].lo + pasts[b].count for b in rows]  # the unfilled tail of a last block left out
        t = max(slots) + 1
        zeros = key.new_zeros(heads, t - min(slots) - 1, dim)  # the longest padding any row needs
        parts_k: list[torch.Tensor] = []
        parts_v: list[torch.Tensor] = []
        for b, n in zip(rows, slots):
            start = self.starts[b]
            parts_k += _held(pasts[b].keys, n)
            parts_v += _held(pasts[b].values, n)
            parts_k.append(key[0, :, start : start + 1])
            parts_v.append(value[0, :, start : start + 1])
            if t - n - 1:
                parts_k.append(zeros[:, : t - n - 1])
                parts_v.append(zeros[:, : t - n - 1])
        # [H, B*T, D] -> [B, H, T, D]: row b is sequence b's past, its new token, padding
        keys = torch.cat(parts_k, dim=1).view(heads, len(rows), t, dim).transpose(0, 1)
        values = torch.cat(parts_v, dim=1).view(heads, len(rows), t, dim).transpose(0, 1)
        attn_mask = self._single_mask(rows, pasts, slots, t, heads, query.shape[1] // heads, query.device)
        index = self._index(rows, query.device)
        q = query[0].index_select(1, index).transpose(0, 1).unsqueeze(2)  # [B, Hq, 1, D]
        result = sdpa(q, keys, values, attn_mask, scaling)  # [B, Hq, 1, D]
        out.index_copy_(0, index, result[:, :, 0])

    def _single_mask(
        self,
        rows: list[int],
        pasts: list[Past],
        slots: list[int],
        t: int,
        heads: int,
        groups: int,
        device: torch.device,
    ) -> torch.Tensor:
        """[B, 1 or Hq, 1, T] bool: each row's held slots and its new token. Layers whose rows hold
        the same slots (every full-attention layer of an uncompressed batch) share one mask."""
        shape = tuple((pasts[b].lo, pasts[b].count, n) for b, n in zip(rows, slots))
        ragged = any(pasts[b].valid is not None for b in rows)
        if not ragged and shape in self._masks:
            return self._masks[shape]
        lo = torch.tensor([lo for lo, _, _ in shape], device=device).view(-1, 1)
        count = torch.tensor([count for _, count, _ in shape], device=device).view(-1, 1)
        new = torch.tensor(slots, device=device).view(-1, 1)
        slot = torch.arange(t, device=device).view(1, t)
        mask = ((slot >= lo) & (slot < lo + count)) | (slot == new)  # [B, T]
        if not ragged:
            self._masks[shape] = mask.view(len(rows), 1, 1, t)
            return self._masks[shape]
        per_head = mask.unsqueeze(1).repeat(1, groups * heads, 1)  # [B, Hq, T]
        for i, b in enumerate(rows):
            valid = pasts[b].valid
            if valid is not None:  # query heads of a group share their KV head's padding
                per_head[i, :, : valid.shape[1]] &= valid.repeat_interleave(groups, dim=0)
        return per_head.unsqueeze(2)

    def _index(self, rows: list[int], device: torch.device) -> torch.Tensor:
        """Positions of ``rows``' tokens in the flattened batch (the same at every layer)."""
        key = tuple(rows)
        if key not in self._indices:
            self._indices[key] = torch.tensor([self.starts[b] for b in rows], device=device)
        return self._indices[key]

    def _attend_chunk(
        self,
        b: int,
        past: Past,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        window: int | None,
        out: torch.Tensor,
    ) -> None:
        """One row computing several tokens: causal among them, and within its window if any."""
        start, size = self.starts[b], self.sizes[b]
        new_k = key[0, :, start : start + size]
        new_v = value[0, :, start : start + size]
        held = past.lo + past.count
        keys = torch.cat([*_held(past.keys, held), new_k], dim=1)
        values = torch.cat([*_held(past.values, held), new_v], dim=1)
        n = keys.shape[1] - size  # slots before the new tokens
        device = query.device
        slot = torch.arange(n + size, device=device).view(1, -1)
        i = torch.arange(size, device=device).view(-1, 1)
        seen = (slot >= past.lo) & (slot < past.lo + past.count)
        new = (slot >= n) & (slot - n <= i)
        if window is not None:  # a query sees the last `window` positions, itself included
            seen = seen & (slot - past.lo > past.count + i - window)
            new = new & (i - (slot - n) < window)
        mask = seen | new  # [q, T]
        if past.valid is not None:
            groups = query.shape[1] // key.shape[1]
            valid = torch.ones((key.shape[1], n + size), dtype=torch.bool, device=device)
            valid[:, : past.valid.shape[1]] = past.valid
            attn_mask = (mask.unsqueeze(0) & valid.repeat_interleave(groups, dim=0).unsqueeze(1)).unsqueeze(0)
        else:
            attn_mask = mask.view(1, 1, size, n + size)
        q = query[:, :, start : start + size]  # [1, Hq, q, D]
        result = sdpa(q, keys.unsqueeze(0), values.unsqueeze(0), attn_mask, scaling)  # [1, Hq, q, D]
        out[start : start + size] = result[0].transpose(0, 1)

    def _observe(
        self,
        b: int,
        observer: Observer,
        layer_idx: int,
        past: Past,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
    ) -> None:
        start, size = self.starts[b], self.sizes[b]
        new_k = key[:, :, start : start + size]
        valid = None
        keys: torch.Tensor | None = None
        if not observer.needs_keys:
            pass
        elif past.count:
            held, _ = past.dense()  # [H, count, D]
            keys = torch.cat([held.unsqueeze(0), new_k], dim=2)
            if past.valid is not None:
                ones = torch.ones((key.shape[1], size), dtype=torch.bool, device=key.device)
                valid = torch.cat([past.valid[:, past.lo :], ones], dim=1)
        else:
            keys = new_k
        observer.observe(layer_idx, query[:, :, start : start + size], keys, scaling, valid)


def _held(parts: list[torch.Tensor | None], end: int) -> list[torch.Tensor]:
    """The parts [H, n_i, D] cut to the first ``end`` slots (views, decoded: no None left).

    Attention then reads a sequence's tokens followed directly by its new ones, as transformers
    lays them out: with the unfilled tail of the last block in between, masked, the result is the
    same in exact arithmetic but SDPA splits the keys elsewhere, and in bfloat16 its online softmax
    rounds differently (logits drifted by a few bfloat16 steps from transformers' in a decode).
    """
    held: list[torch.Tensor] = []
    for part in parts:
        assert part is not None, "decode_packed first"
        if end <= 0:
            break
        held.append(part if part.shape[1] <= end else part[:, :end])
        end -= part.shape[1]
    return held


def forward(model: PreTrainedModel, rows: list[Row]) -> list[torch.Tensor]:
    """One model forward over ``rows``; each row's logits (float32): [q, V] if it asked for all
    of them, else [V] for its last token. The rows' caches hold the new tokens afterwards."""
    device = rows[0].cache.device
    ids: list[int] = []
    positions: list[int] = []
    keep: list[int] = []
    for row in rows:
        past = row.cache.num_tokens
        first = len(ids)
        ids += row.tokens
        positions += range(past, past + len(row.tokens))
        keep += range(first, len(ids)) if row.all_logits else [len(ids) - 1]
    batch = ForwardBatch(rows)
    out = model(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device),  # [1, N]
        position_ids=torch.tensor([positions], dtype=torch.long, device=device),
        attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),  # placeholder, see above
        **cache_kwargs(model, batch),
        use_cache=True,
        logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
        kvmem_batch=batch,
    )
    logits = out.logits[0].float()  # [K, V]
    results, offset = [], 0
    for row in rows:
        n = len(row.tokens) if row.all_logits else 1
        part = logits[offset : offset + n]
        results.append(part if row.all_logits else part[0])
        offset += n
    return results
