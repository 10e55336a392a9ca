"""``sliding-<format>``: sliding-window layers at their own block format (precision by layer)."""

import pytest

from kvmem.compress.budget import KVBudget
from kvmem.compress.registry import UnknownPolicyError, find_quantizer, make_policy
from kvmem.engine.llm import LLM
from kvmem.model.layers import UnsupportedLayerError
from kvmem.model.loader import LoadedModel


def test_names_round_trip_and_bad_ones_are_refused() -> None:
    policy = make_policy("rotk4v2+sliding-rotk3v2+res8", KVBudget.parse(None))
    assert policy.sliding == find_quantizer("rotk3v2") and policy.quant == find_quantizer("rotk4v2")
    assert make_policy(policy.name, KVBudget.parse(None)) == policy
    assert make_policy("sliding-rot2", KVBudget.parse(None)).quant is None
    with pytest.raises(UnknownPolicyError, match="names no block format"):
        make_policy("rotk4v2+sliding-kivi3", KVBudget.parse(None))
    with pytest.raises(UnknownPolicyError, match="at most one"):
        make_policy("sliding-rot2+sliding-rot3", KVBudget.parse(None))


def test_each_kind_of_layer_gets_its_format(gemma: LoadedModel) -> None:
    llm = LLM(gemma, block_size=4, policy="rotk4v2+sliding-rot2+res8")
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 120))
    seq.prefill(32)
    kinds = {(layer.window is not None, part.fmt.name if part.fmt else None, part.residual is not None)
             for layer in seq.cache.kv_layers for part in layer.parts().values()}  # fmt: skip
    assert kinds == {(True, "rot2", True), (False, "rotk4v2", True)}
    assert seq.cache.nbytes == llm.pool.bytes_used == llm.pool.physical_nbytes()
    # the sliding layers hold fewer bytes than in the policy's own format, the others as many
    uniform = LLM(gemma, block_size=4, policy="rotk4v2+res8")
    other = uniform.new_sequence()
    other.token_ids = list(seq.token_ids)
    other.prefill(32)
    for mine, theirs in zip(seq.cache.kv_layers, other.cache.kv_layers):
        if mine.window is None:
            assert mine.nbytes == theirs.nbytes
        else:
            assert mine.nbytes < theirs.nbytes
    seq.release()
    other.release()


def test_a_model_without_sliding_layers_is_refused(llama: LoadedModel) -> None:
    with pytest.raises(UnsupportedLayerError, match="has none"):
        LLM(llama, policy="rotk4v2+sliding-rot2").generate(list(range(3, 20)), max_new_tokens=2)
