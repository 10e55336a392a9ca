"""kvmem: a memory system for LLM inference — the KV cache in a paged pool under a byte budget."""

from kvmem.demo import document as demo_document
from kvmem.engine.chat import ChatSession, load_chat, save_session
from kvmem.engine.config import EngineConfig
from kvmem.engine.llm import LLM
from kvmem.engine.result import GenerationResult, GenerationStats
from kvmem.errors import (
    CorruptCacheError,
    InvalidBudgetError,
    KVBudgetError,
    KVMemError,
    ModelNotFoundError,
    PromptTooLongError,
    SessionMismatchError,
    SessionNotFoundError,
)
from kvmem.kv.budget import parse_budget
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.cache import KVMemCache
from kvmem.model.loader import LoadedModel, load_model
from kvmem.model.registry import DEFAULT_MODEL, embedded_names

__all__ = [
    "DEFAULT_MODEL",
    "LLM",
    "ChatSession",
    "CorruptCacheError",
    "EngineConfig",
    "GenerationResult",
    "GenerationStats",
    "InvalidBudgetError",
    "KVBudgetError",
    "KVMemCache",
    "KVMemError",
    "KVPool",
    "LoadedModel",
    "ModelNotFoundError",
    "PoolConfig",
    "PromptTooLongError",
    "SessionMismatchError",
    "SessionNotFoundError",
    "demo_document",
    "embedded_names",
    "load_chat",
    "load_model",
    "parse_budget",
    "save_session",
]
__version__ = "0.1.0"
