import torch

from kvmem.model.loader import LoadedModel


def test_llama_spec(llama: LoadedModel) -> None:
    spec = llama.spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 16)
    assert spec.windows == (None, None)
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_gemma_spec_reads_sliding_layers(gemma: LoadedModel) -> None:
    assert gemma.spec.windows == (8, 8, 8, None)
    assert gemma.spec.num_sliding_layers == 3
    assert gemma.spec.dtype == torch.float32
