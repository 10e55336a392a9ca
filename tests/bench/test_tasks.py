"""One matrix over every registered task: seeding, length, prompt shape, gold placement, scoring."""

from __future__ import annotations

import pytest

from kvmem.bench import TASKS, TaskLengthError, UnknownTaskError, answer_for_logprob, make_task, score
from kvmem.bench.passkey import Passkey
from kvmem.bench.tokens import Tokenizer, length_fn

RETRIEVAL = [name for name in TASKS if name != "realtext"]
# the most a context may fall short of the target: one unit (a filler sentence, a JSON pair, ...)
SLACK = {"kv_retrieval": 4, "common_words": 2, "realtext": 1}


@pytest.fixture(params=sorted(TASKS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_same_seed_same_example_other_seed_other_example(name: str, words: Tokenizer) -> None:
    task = make_task(name)
    assert task.generate(words, 1500, seed=7) == task.generate(words, 1500, seed=7)
    assert task.make_context(words, 1500, seed=7) == task.make_context(words, 1500, seed=7)
    assert task.generate(words, 1500, seed=7).prompt != task.generate(words, 1500, seed=8).prompt


def test_no_global_random_state(name: str, words: Tokenizer) -> None:
    import random

    random.seed(1)
    first = make_task(name).generate(words, 1200, seed=3)
    random.seed(2)
    assert make_task(name).generate(words, 1200, seed=3) == first


@pytest.mark.parametrize("length", [1200, 4000])
def test_every_prompt_fits_and_is_close_to_the_length(name: str, words: Tokenizer, length: int) -> None:
    count = length_fn(words)
    for ex in make_task(name).make_context(words, length, seed=0).examples:
        assert ex.prompt == ex.context + ex.question
        assert count(ex.prompt) <= length
        assert count(ex.prompt) >= length - SLACK.get(name, 62)  # a filler sentence is at most 60 words
        assert ex.meta["seed"] == 0 and ex.meta["length"] == length and ex.task == name


def test_a_length_function_works_like_a_tokenizer(name: str) -> None:
    ex = make_task(name).generate(len, 6000, seed=1)  # characters as tokens
    assert 5000 <= len(ex.prompt) <= 6000


def test_too_short_a_length_is_a_typed_error(name: str, words: Tokenizer) -> None:
    with pytest.raises(TaskLengthError, match="too short"):
        make_task(name).generate(words, 0, seed=0)


def test_gold_answer_scores_one_and_is_what_the_bench_teacher_forces(name: str, words: Tokenizer) -> None:
    for ex in make_task(name).make_context(words, 1500, seed=4).examples:
        assert score(ex, ex.answer) == 1.0
        assert score(ex, ex.answer + "\nQuestion: more text 12345") == 1.0
        assert answer_for_logprob(ex) == ex.answer
        assert ex.answer.startswith((" ", "\n")) and not ex.prompt.endswith((" ", "\n"))


@pytest.mark.parametrize("name", RETRIEVAL)
def test_each_gold_item_sits_exactly_once_in_the_context(name: str, words: Tokenizer) -> None:
    context = make_task(name).make_context(words, 2000, seed=5)
    for ex in context.examples:
        assert ex.question not in ex.context
        for item in ex.gold:
            if name != "common_words":
                assert ex.context.count(item) == 1 or name == "vartrack", item
            assert item in ex.context


def test_registry_finds_every_task_by_name() -> None:
    assert set(TASKS) == {
        "passkey",
        "multikey",
        "multivalue",
        "kv_retrieval",
        "vartrack",
        "common_words",
        "realtext",
    }
    assert make_task(" PassKey ", depth=0.25) == Passkey(depth=0.25)
    with pytest.raises(UnknownTaskError, match="known tasks: passkey"):
        make_task("nope")
    with pytest.raises(UnknownTaskError, match="bad parameters"):
        make_task("passkey", width=3)
