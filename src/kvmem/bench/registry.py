"""Every benchmark task by name: the CLI, the benchmark and the tests find them here."""

from __future__ import annotations

from kvmem.bench.common_words import CommonWords
from kvmem.bench.kv_retrieval import KVRetrieval
from kvmem.bench.multikey import MultiKey
from kvmem.bench.multivalue import MultiValue
from kvmem.bench.passkey import Passkey
from kvmem.bench.realtext import RealText
from kvmem.bench.task import Task
from kvmem.bench.vartrack import VarTrack
from kvmem.errors import KVMemError

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (Passkey, MultiKey, MultiValue, KVRetrieval, VarTrack, CommonWords, RealText)
}


class UnknownTaskError(KVMemError, ValueError):
    """The task name is not registered."""


def make_task(name: str, **params: object) -> Task:
    """The task registered as ``name`` with its parameters (``make_task("passkey", depth=0.25)``)."""
    try:
        cls = TASKS[name.strip().lower()]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise UnknownTaskError(f"bad parameters for task {name!r}: {e}") from None
