"""``EngineConfig``'s fields as command-line options, so every command spells them alike.

``kvmem generate / chat / demo / info``, ``serve`` and ``bench`` add the fields they take with
``add_options`` and read them back by name with ``values``; a flag's help is its field's help text
(``EngineConfig`` holds the one description), its default the dataclass's unless a command says
otherwise. ``FLAGS`` is only how each field is spelled: a flag name and what argparse needs.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvmem.engine.config import FIELDS, EngineConfig, field_help
from kvmem.model.dtype import CHOICES as DTYPE_CHOICES
from kvmem.tiers.cli import default_dir

BARE = "default"  # what a flag with an optional value holds when given bare (``--disk-cache``)


@dataclass(frozen=True)
class Flag:
    """How one ``EngineConfig`` field is spelled on the command line.

    ``extra``: what argparse needs beyond the flag, dest, default and help (type, action, …);
    ``parse``: the parsed value → the field's value; ``note``: what the flag adds to the field's
    help (how it spells None, what it means given bare); ``negates``: a ``store_false`` flag that
    turns a field that is on by default off.
    """

    flag: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    parse: Callable[[Any], Any] | None = None
    note: Callable[[], str] | str = ""

    @property
    def negates(self) -> bool:
        return self.extra.get("action") == "store_false"


def _disk_folder(value: str | None) -> str | None:
    """``--disk-cache``'s folder: given bare, the default one."""
    return str(default_dir()) if value == BARE else value


def _none_below_zero(value: int | None) -> int | None:
    return None if value is None or value < 0 else value


FLAGS: dict[str, Flag] = {
    "model": Flag("--model"),
    "kv_budget": Flag("--kv-budget"),
    "policy": Flag("--policy"),
    "block_size": Flag("--block-size", {"type": int}),
    "prefill_chunk": Flag("--prefill-chunk", {"type": int}),
    "compress_after_prompt": Flag("--compress-after-prompt", {"metavar": "PEAK"}),
    "dtype": Flag("--dtype", {"choices": DTYPE_CHOICES}),
    "threads": Flag("--threads", {"type": int}),
    "prefix_cache": Flag("--prefix-cache", {"action": "store_true"}),
    "disk_cache": Flag(
        "--disk-cache",
        {"nargs": "?", "const": BARE, "metavar": "DIR"},
        _disk_folder,
        lambda: f"given bare: {default_dir()}",
    ),
    "disk_cache_max": Flag("--disk-cache-max", {"metavar": "SIZE"}),
    "exact_reuse": Flag("--reuse-whole-blocks", {"action": "store_false"}),
    "redis_cache": Flag("--redis-cache", {"metavar": "URL"}),
    "redis_ttl_s": Flag("--redis-ttl", {"type": float, "metavar": "SECONDS"}),
    "max_num_seqs": Flag("--max-num-seqs", {"type": int}),
    "max_batch_tokens": Flag("--max-batch-tokens", {"type": int}),
    "reserve_new_tokens": Flag("--reserve-new-tokens", {"type": int}, _none_below_zero, "-1: none"),
}

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


def flag_help(name: str, default: Any = None) -> str:
    """What ``--help`` says of field ``name``'s flag: the field's help, other fields named by their flags."""
    spec = FLAGS[name]
    text = field_help(name, lambda other: FLAGS[other].flag if other in FLAGS else other)
    if spec.negates:
        return f"turn {name} off; {name} (the default): {text}"
    notes = [spec.note() if callable(spec.note) else spec.note]
    if default is not None and not isinstance(default, bool):
        notes.append(f"default {default}")
    notes = [note for note in notes if note]
    return text + (f" ({'; '.join(notes)})" if notes else "")


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Iterable[str],
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add the flags of the fields ``names``, each with dest = its field name; ``defaults``: a
    command's own default for some of them (else the dataclass's)."""
    defaults = defaults or {}
    for name in names:
        spec = FLAGS[name]
        default = defaults.get(name, _DEFAULTS[name])
        parser.add_argument(
            spec.flag,
            dest=name,
            default=default,
            help=flag_help(name, default).replace("%", "%%"),  # argparse formats help with %
            **spec.extra,
        )


def values(args: argparse.Namespace, names: Iterable[str] = FIELDS) -> dict[str, Any]:
    """The fields among ``names`` that the parser added, by name, as ``EngineConfig`` takes them."""
    found = {}
    for name in names:
        if name in FLAGS and hasattr(args, name):
            value = getattr(args, name)
            parse = FLAGS[name].parse
            found[name] = value if parse is None else parse(value)
    return found
