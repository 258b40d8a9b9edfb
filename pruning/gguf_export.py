"""GGUF output for llama.cpp: the llama architecture, Q8_0 matrices, float32 norms (``format: gguf``).

Names and layout are the ones transformers reads back with ``from_pretrained(dir, gguf_file=...)``
(how evosparse loads GGUF input, ``pruning.loading``): the tensor names come from the ``gguf``
package's own HF-to-GGUF map (``gguf.get_tensor_name_map``, which transformers inverts to read),
and q_proj / k_proj rows are permuted as llama.cpp's convert_hf_to_gguf.py does (transformers
undoes it on load). A tied output head is left out (llama.cpp then uses ``token_embd``).

Q8_0 (blocks of 32 weights, one float16 scale, codes round(w / scale)) keeps a pruned weight
exactly 0, so the sparsity read back from the file is the pruned model's. ``round_q8_0`` gives
the in-memory model the same rounding before it is evaluated, so the report's perplexity is the
file's. Vectors (norms) are written float32, as llama.cpp writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from evosparse.pruning.errors import PruningConfigError
from torch import nn

GGUF_FILE = "model.gguf"
BLOCK = 32  # Q8_0 block size (weights sharing one scale)


def check_gguf_model(model: nn.Module) -> None:
    """The writer knows llama's tensor layout only; refuse any other architecture before pruning."""
    model_type = getattr(model.config, "model_type", None)
    if model_type != "llama":
        raise PruningConfigError(f"format 'gguf' writes the llama architecture (SmolLM2, Llama, ...); this model is "
                                 f"{model_type!r}: use format 'dense' or 'compressed-tensors'")


def _q8_0_matrix(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[1] % BLOCK == 0


def q8_0_round_trip(w: torch.Tensor) -> torch.Tensor:
    """``w`` quantized to Q8_0 and back (the gguf package's own quantizer), in ``w``'s dtype."""
    from gguf import GGMLQuantizationType, quants

    data = w.detach().float().cpu().numpy()
    back = quants.dequantize(quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(back)).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def round_q8_0(model: nn.Module) -> None:
    """Every matrix the GGUF stores as Q8_0, rounded in place as the file will hold it."""
    for _, p in model.named_parameters():
        if _q8_0_matrix(p):
            p.copy_(q8_0_round_trip(p).to(p.device))


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute); transformers reverses it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's 'gpt2' model (tokens, types, merges, special ids)."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        return  # other tokenizer models are not written; llama.cpp users convert them with its own script
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(max(vocab_size, len(vocab))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added
                         else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id)):
        if token_id is not None:
            setter(int(token_id))


@torch.no_grad()
def write_gguf(model: nn.Module, tokenizer: Any, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a LlamaForCausalLM) as one GGUF file; returns its path."""
    from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, LlamaFileType, get_tensor_name_map, quants

    check_gguf_model(model)
    cfg = model.config
    path = Path(path)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(str(getattr(cfg, "_name_or_path", "") or "evosparse"))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    for key, value in (metadata or {}).items():  # what produced the file (as the safetensors headers carry)
        writer.add_string(f"evosparse.{key}", value)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise PruningConfigError(f"format 'gguf': no llama tensor name for {hf_name}")
        data = t.detach().float().cpu().numpy()
        if base.endswith("self_attn.q_proj"):
            data = _permute(data, cfg.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            data = _permute(data, cfg.num_key_value_heads)
        if _q8_0_matrix(t):
            # uint8 rows of 34-byte blocks; the writer derives the element shape from them
            writer.add_tensor(f"{name}.{suffix}", quants.quantize(data, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_zero_counts(path: str | Path, hf_names: list[str]) -> dict[str, tuple[int, int]]:
    """{hf tensor name: (zeros, numel)} read back from a GGUF file (Q8_0 dequantized by the gguf package)."""
    from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map, quants

    reader = GGUFReader(str(path))
    blocks = reader.fields["llama.block_count"]
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, int(blocks.parts[blocks.data[0]][0]))
    wanted = {}
    for hf in hf_names:
        base, _, suffix = hf.rpartition(".")
        wanted[f"{names.get_name(base)}.{suffix}"] = hf
    found: dict[str, tuple[int, int]] = {}
    for tensor in reader.tensors:
        if tensor.name in wanted:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
            found[wanted[tensor.name]] = (int((values == 0).sum()), int(values.size))
    missing = set(hf_names) - set(found)
    if missing:
        raise ValueError(f"GGUF file lacks tensors {sorted(missing)[:3]}")
    return found
