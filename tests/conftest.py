"""Shared fixtures: tiny randomly initialised Llama (GLU) and GPT-2 models built in code (seconds)."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model


def make_tiny_gpt2(seed: int = 0, layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=layers, n_head=4)
    model = GPT2LMHeadModel(config).eval()
    model.config.use_cache = False
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture
def tiny_tokens():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 256, (8, 32), generator=g)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved as a Hugging Face folder (built once per test session)."""
    from evosparse.pruning.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
