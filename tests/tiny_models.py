"""Tiny randomly initialised models with a byte-level tokenizer, for fast tests without weights."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from kvmem.model.loader import LoadedModel
from kvmem.model.spec import ModelSpec

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>"]
VOCAB = 256 + len(SPECIALS)


def byte_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens plus a few specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.eos_token = "<|im_end|>" if chat else "<|endoftext|>"
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _seeded(cls: type[PreTrainedModel], config: object, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.generation_config.eos_token_id = None  # random models: never stop early by chance
    return model


def tiny_llama(seed: int = 0, context: int = 256) -> LoadedModel:
    """``seed`` picks the random weights: another seed is another model of the same shape;
    ``context``: its maximum positions."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
    )
    return _loaded("tiny-llama", _seeded(LlamaForCausalLM, config, seed), byte_tokenizer(chat=True))


def tiny_gemma(window: int = 8) -> LoadedModel:
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    return _loaded("tiny-gemma", _seeded(Gemma3ForCausalLM, config, 1), byte_tokenizer(chat=False))


def _loaded(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        spec=ModelSpec.from_config(model.config, torch.float32),
        has_chat_template=tokenizer.chat_template is not None,
    )


def save_folder(loaded: LoadedModel, path: Path) -> Path:
    """Write a tiny model as a Hugging Face folder (for CLI tests)."""
    loaded.model.save_pretrained(str(path))
    loaded.tokenizer.save_pretrained(str(path))
    return path
