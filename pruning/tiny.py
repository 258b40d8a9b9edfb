"""A tiny random Llama saved as a real Hugging Face folder (model + tokenizer), built offline in seconds.

For the test suite and the service benchmark (bench/bench_api.py), which need a model that loads
through ``pruning.loading.load_model`` exactly as a real checkpoint does, without a download.
The tokenizer is a byte-level BPE trained in code on the pydoc text. Its weights are random: it
measures the machinery, not pruning quality.
"""

from __future__ import annotations

from pathlib import Path

import torch
from evosparse.pruning.data import pydoc_text


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = pydoc_text()
    bpe.train_from_iterator([text[i : i + 2000] for i in range(0, 200_000, 2000)], vocab_size=vocab_size,
                            min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def save_tiny_llama(folder: str | Path, seed: int = 0, layers: int = 4) -> Path:
    """A 4-block Llama (GLU MLP) with a trained byte-level tokenizer, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
