"""A cache's KV state as plain tensors plus a JSON-able description, and back into a pool.

``snapshot`` reads a ``KVMemCache`` without changing it; ``restore`` fills an empty one, block
by block, in its own pool. Every block is stored as it is held: a full-precision block as its
keys and values, a quantized one as its ``uint8`` buffer (nothing is decoded or re-encoded), so
a restored cache is bit-identical to the saved one. Besides the blocks, what a policy reads on
later turns is kept too: each layer's recent queries, accumulated attention and softmax scale
(eviction scorers), a block format's per-layer state (``Layout.state``: BFP's key-channel permutation),
and measured layer shares (CAKE).

Every layer kind holds its blocks in named ``BlockList``s (``layer.parts()``: ``""`` for paged
and sliding layers, ``".h0"``… per head, ``".high"`` / ``".low"`` for mixed precision); each part
is saved under its name, the scorer state once per layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from kvmem.errors import CorruptCacheError, KVBudgetError, SessionMismatchError
from kvmem.kv.pool import block_nbytes
from kvmem.model.cache import KVMemCache
from kvmem.model.layers import BlockList, KVLayer
from kvmem.model.layers.blocks import FULL, PACKED, PARTIAL  # a block's kind in a part's ``blocks`` string

_STATE = ("recent_queries", "attention")  # scorer state kept on a layer (kvmem.compress.observe)


class Snapshot(NamedTuple):
    """``header``: JSON-able (layer kinds, table state, scales); ``tensors``: CPU, contiguous."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def snapshot(cache: KVMemCache) -> Snapshot:
    """The cache's blocks, table state and scorer state; the cache is not changed."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    if cache.store is not None:
        raise SessionMismatchError(
            "saving the state of the offload policy is not supported yet: its blocks live in a "
            "temporary folder of the running process"
        )
    for i, layer in enumerate(cache.kv_layers):
        states = {
            suffix: _snapshot_part(part, f"{i}{suffix}", tensors) for suffix, part in layer.parts().items()
        }
        for key in _STATE:
            value = getattr(layer, key)
            if value is not None:
                tensors[f"{i}.{key}"] = value.detach().cpu().contiguous().clone()
        layers.append(
            {
                "kind": layer.kind,
                "parts": states,
                "initialized": bool(layer.is_initialized),
                "scaling": layer.scaling,
            }
        )
    return Snapshot({"layers": layers, "layer_weights": cache.layer_weights}, tensors)


def _snapshot_part(part: BlockList, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    blocks = part.blocks()
    full = [block for block, kind in blocks if kind == FULL]  # each [2, H, bs, D]
    packed = [block for block, kind in blocks if kind == PACKED]  # each uint8 [nbytes]
    partial = [block for block, kind in blocks if kind == PARTIAL]  # the residual's uint8 [nbytes]
    if full:
        stacked = torch.stack(full).cpu()  # [n, 2, H, bs, D]; only the last block may be part-filled
        stacked[-1, :, :, part.table.last_fill :] = 0  # its unused slots hold no token: saved as zeros
        tensors[f"{name}.full"] = stacked
    if packed:
        tensors[f"{name}.packed"] = torch.stack(packed).cpu()  # [n, nbytes]
    if partial:  # its unwritten slots are zeros since allocation
        tensors[f"{name}.partial"] = torch.stack(partial).cpu()  # [1, nbytes]
    if part.layout is not None:  # the format's per-layer state (BFP: the permutation its first block chose)
        for key, value in part.layout.state().items():
            tensors[f"{name}.{key}"] = value.cpu().contiguous().clone()
    return {
        "start": part.table.start,
        "length": part.table.length,
        "blocks": "".join(kind for _, kind in blocks),
        "dtype": str(part.dtype).removeprefix("torch."),
    }


def bytes_needed(cache: KVMemCache, header: dict[str, Any]) -> int:
    """Pool bytes ``restore`` allocates for ``header`` into ``cache``'s layers."""
    total = 0
    for layer, state in zip(cache.kv_layers, header["layers"]):
        for suffix, part in layer.parts().items():
            blocks = state["parts"][suffix]["blocks"]
            full = block_nbytes(part.num_heads, part.head_dim, part.block_size, part.dtype)
            packed = 0 if part.layout is None else part.layout.nbytes
            partial = 0 if part.residual_layout is None else part.residual_layout.nbytes
            total += (
                blocks.count(FULL) * full + blocks.count(PACKED) * packed + blocks.count(PARTIAL) * partial
            )
    return total


def restore(
    cache: KVMemCache, header: dict[str, Any], tensors: dict[str, torch.Tensor], device: torch.device
) -> None:
    """Fill the empty ``cache`` from a snapshot, allocating its blocks in ``cache.pool``.

    Raises ``SessionMismatchError`` if the layers are of other kinds than the snapshot's,
    ``KVBudgetError`` (before allocating anything) if the pool cannot hold the blocks, and
    ``CorruptCacheError`` if the snapshot is inconsistent. On any error the cache holds nothing.
    """
    assert cache.nbytes == 0 and cache.num_tokens == 0, "restore into an empty cache"
    layers = header["layers"]
    kinds = [layer.kind for layer in cache.kv_layers]
    saved = [state["kind"] for state in layers]
    if saved != kinds:
        raise SessionMismatchError(
            f"the saved cache has layers {saved} but this model and policy make {kinds}"
        )
    needed, free = bytes_needed(cache, header), cache.pool.bytes_free
    if free is not None and needed > free:
        raise KVBudgetError(needed, free, cache.pool.budget, what="the saved session")
    try:
        for i, (layer, state) in enumerate(zip(cache.kv_layers, layers)):
            _restore_layer(layer, state, tensors, str(i), device)
        lengths = {layer.seq_length for layer in cache.kv_layers}
        if len(lengths) > 1:
            raise CorruptCacheError(f"the saved layers hold different sequence lengths {sorted(lengths)}")
        weights = header["layer_weights"]
        cache.layer_weights = None if weights is None else [float(w) for w in weights]
    except BaseException:
        cache.release()
        raise


def _restore_layer(
    layer: KVLayer, state: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, device: torch.device
) -> None:
    parts = layer.parts()
    if set(state["parts"]) != set(parts):
        raise CorruptCacheError(f"layer {name}: parts {sorted(state['parts'])}, expected {sorted(parts)}")
    for suffix, part in parts.items():
        _restore_part(part, state["parts"][suffix], tensors, f"{name}{suffix}", device)
    layer.is_initialized = bool(state["initialized"])
    layer.scaling = None if state["scaling"] is None else float(state["scaling"])
    for key in _STATE:
        value = tensors.get(f"{name}.{key}")
        setattr(layer, key, None if value is None else value.to(device))


def _restore_part(
    part: BlockList, state: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, device: torch.device
) -> None:
    dtype = getattr(torch, str(state["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCacheError(f"layer part {name}: unknown dtype {state['dtype']!r}")
    blocks, bs = str(state["blocks"]), part.table.block_size
    full = _blocks(tensors, f"{name}.full", blocks.count(FULL), (2, part.num_heads, bs, part.head_dim), dtype)
    nbytes = 0 if part.layout is None else part.layout.nbytes
    packed = _blocks(tensors, f"{name}.packed", blocks.count(PACKED), (nbytes,), torch.uint8)
    res_nbytes = 0 if part.residual_layout is None else part.residual_layout.nbytes
    partial = _blocks(tensors, f"{name}.partial", blocks.count(PARTIAL), (res_nbytes,), torch.uint8)
    start, length = int(state["start"]), int(state["length"])
    if not 0 <= start <= length or len(blocks) != -(-(length - start) // bs):
        raise CorruptCacheError(
            f"layer part {name}: {len(blocks)} blocks cannot hold tokens {start}..{length}"
        )
    misplaced = PARTIAL in blocks[:-1] or (PARTIAL in blocks and part.residual_layout is None)
    if (PACKED in blocks and part.layout is None) or misplaced or set(blocks) - {FULL, PACKED, PARTIAL}:
        raise CorruptCacheError(f"layer part {name}: block kinds {blocks!r} do not fit this layer")
    part.dtype, part.device = dtype, device
    sources = {FULL: iter(full), PACKED: iter(packed), PARTIAL: iter(partial)}
    for kind in blocks:  # each added to the table at once, so that release() frees it on error
        part.add_block(next(sources[kind]), kind)
    part.table.start, part.table.length = start, length
    # the layout's state: every other tensor named ``{name}.{key}`` (block kinds and scorer state aside)
    taken = {"full", "packed", "partial", *_STATE}
    keys = [n.removeprefix(f"{name}.") for n in tensors if n.startswith(f"{name}.")]
    state = {key: tensors[f"{name}.{key}"].to(device) for key in keys if key not in taken and "." not in key}
    if state:
        try:
            if part.layout is None:
                raise ValueError("its blocks are in the model's dtype")
            part.layout.load_state(state)
        except ValueError as exc:
            why = f"layer part {name}: format state {sorted(state)} does not fit: {exc}"
            raise CorruptCacheError(why) from exc


def _blocks(
    tensors: dict[str, torch.Tensor], name: str, count: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The stacked blocks ``name`` ([count, *shape] of ``dtype``), checked; empty when count is 0."""
    if count == 0:
        if name in tensors:
            raise CorruptCacheError(f"{name}: blocks saved that no table refers to")
        return torch.empty((0, *shape), dtype=dtype)
    found = tensors.get(name)
    if found is None or tuple(found.shape) != (count, *shape) or found.dtype != dtype:
        got = "nothing" if found is None else f"{tuple(found.shape)} {found.dtype}"
        raise CorruptCacheError(f"{name}: expected {count} blocks of {shape} {dtype}, found {got}")
    return found
