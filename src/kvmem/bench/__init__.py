"""``kvmem bench``: seeded, offline long-context tasks and their scorers.

Every task is a ``Task`` registered in ``TASKS``; ``task.generate(tokenizer, length, seed)`` gives an
``Example`` and ``task.make_context(...)`` a ``Context`` with several questions for multi-turn runs.
"""

from kvmem.bench.example import AnswerKind, Context, Example, Question
from kvmem.bench.registry import TASKS, UnknownTaskError, make_task
from kvmem.bench.scoring import answer_for_logprob, answer_tokens, score
from kvmem.bench.task import Task, TaskLengthError
from kvmem.bench.tokens import LengthFn, TokenCounter, Tokenizer

__all__ = [
    "TASKS",
    "AnswerKind",
    "Context",
    "Example",
    "LengthFn",
    "Question",
    "Task",
    "TaskLengthError",
    "TokenCounter",
    "Tokenizer",
    "UnknownTaskError",
    "answer_for_logprob",
    "answer_tokens",
    "make_task",
    "score",
]
