"""``EngineConfig``: one list of engine options, by name only, each with its help; ``LLM`` over it."""

import dataclasses
import string

import pytest

from kvmem.engine.config import FIELDS, EngineConfig, field_help
from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel


def test_every_field_has_help_that_names_only_fields() -> None:
    for spec in dataclasses.fields(EngineConfig):
        text = spec.metadata.get("help", "")
        assert len(text) > 10, f"{spec.name} has no help text"
        named = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        assert named <= set(FIELDS), f"{spec.name}'s help names {named - set(FIELDS)}"
        assert "{" not in field_help(spec.name)
    assert "--prefill-chunk" in field_help("exact_reuse", lambda name: "--" + name.replace("_", "-"))


def test_fields_are_given_by_name_only() -> None:
    with pytest.raises(TypeError):
        EngineConfig("tiny", "64KiB")  # type: ignore[misc]
    assert EngineConfig(model="tiny", kv_budget="64KiB").kv_budget == "64KiB"


def test_replace_validates_and_names_the_fields_for_an_unknown_one() -> None:
    config = EngineConfig(model="tiny")
    assert config.replace(max_num_seqs=4) == EngineConfig(model="tiny", max_num_seqs=4)
    with pytest.raises(TypeError, match="unknown engine option 'max_seqs'.*max_num_seqs"):
        config.replace(max_seqs=4)
    with pytest.raises(ValueError, match="block_size must be positive"):
        config.replace(block_size=0)


def test_llm_takes_a_config_and_overrides_by_name(llama: LoadedModel) -> None:
    config = EngineConfig(kv_budget="1MiB", block_size=4, prefill_chunk=8, max_num_seqs=4)
    llm = LLM(llama, config=config, max_num_seqs=2, prefix_cache=True)
    assert llm.config == config.replace(model=llama.name, dtype="float32", max_num_seqs=2, prefix_cache=True)
    assert llm.pool.block_size == 4 and llm.prefix is not None
    assert LLM(llama, config=config).config.max_num_seqs == 4  # the config as given
    assert LLM(llama, block_size=4).config == EngineConfig(model=llama.name, dtype="float32", block_size=4)


def test_llm_refuses_an_unknown_option_naming_the_valid_ones(llama: LoadedModel) -> None:
    with pytest.raises(TypeError, match="unknown engine option 'kv_bugdet'.*kv_budget"):
        LLM(llama, kv_bugdet="1MiB")


def test_threads_set_the_one_pool_of_the_process(llama: LoadedModel) -> None:
    import torch

    with pytest.raises(ValueError, match="threads"):
        EngineConfig(threads=0)
    before = torch.get_num_threads()
    try:
        LLM(llama, threads=1)
        assert torch.get_num_threads() == 1  # PyTorch's ops and kvmem's kernel alike
        LLM(llama)  # not given: left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
