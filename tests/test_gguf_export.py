"""GGUF output (format gguf): llama tensor names, Q8_0 matrices with exact zeros, read back by gguf and transformers."""

import pytest
import torch
from evosparse.pruning.errors import PruningConfigError

# The loaded file and the in-memory model hold the same Q8_0 values in float32: only float noise remains.
LOGIT_ATOL = 1e-4


def _load_tiny(folder, tied: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if tied:  # SmolLM2's layout: the output head is the embedding
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_keeps_zeros_and_loads_in_transformers(tiny_llama_dir, tiny_tokens, tmp_path, tied):
    from evosparse.pruning.export import export_checkpoint
    from evosparse.pruning.gguf_export import GGUF_FILE, round_q8_0
    from evosparse.pruning.layers import prunable_linears
    from evosparse.pruning.prune import prune_model
    from evosparse.pruning.sensitivity import allocation_counts
    from gguf import GGMLQuantizationType, GGUFReader, quants
    from transformers import AutoModelForCausalLM

    model, tok = _load_tiny(tiny_llama_dir, tied)
    counts = allocation_counts(model, "uniform", 0.6)
    prune_model(model, tiny_tokens, "wanda", counts)
    pruned = {n: m.weight == 0 for n, m in prunable_linears(model).items()}
    round_q8_0(model)
    lin = prunable_linears(model)
    assert all(torch.all(lin[n].weight[mask] == 0) for n, mask in pruned.items())
    rep = export_checkpoint(model, tok, tmp_path / "g", {}, fmt="gguf")
    assert rep["format"] == "gguf" and not list((tmp_path / "g").glob("*.safetensors"))

    reader = GGUFReader(str(tmp_path / "g" / GGUF_FILE))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.3.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == GGMLQuantizationType.F32
    assert ("output.weight" in kinds) != tied  # a tied head is the embedding (llama.cpp's convention)
    # Zeros exact: every weight the pruner zeroed reads back 0 from the file; the measured sparsity is the report's.
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    values = quants.dequantize(down.data, down.tensor_type)
    assert torch.equal(torch.from_numpy(values.copy()) == 0, lin["model.layers.1.mlp.down_proj"].weight == 0)
    zeros = sum(int((m.weight == 0).sum()) for m in lin.values())
    total = sum(m.weight.numel() for m in lin.values())
    assert rep["global_sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    assert rep["global_sparsity"] >= sum(counts.values()) / total

    # transformers reads it back (its GGUF loader: the names and the q/k permutation undone)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    for name, m in prunable_linears(loaded).items():
        assert torch.equal(m.weight, lin[name].weight), name
    with torch.no_grad():
        diff = (loaded(tiny_tokens[:2]).logits - model(tiny_tokens[:2]).logits).abs().max().item()
    assert diff <= LOGIT_ATOL
    from transformers import AutoTokenizer

    text = "def prune(model):\n    return model"
    assert AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file=GGUF_FILE)(text).input_ids == tok(text).input_ids
    # a second rounding changes nothing: what was evaluated in memory is what the file holds
    before = {n: m.weight.clone() for n, m in lin.items()}
    round_q8_0(model)
    assert all(torch.equal(before[n], m.weight) for n, m in lin.items())


def test_gguf_refuses_what_it_cannot_write(tiny_gpt2, tmp_path):
    from evosparse.jobs.spec import JobSpec
    from evosparse.jobs.validation import SpecRejected, check_shapes
    from evosparse.pruning.export import export_checkpoint

    with pytest.raises(PruningConfigError, match="llama architecture"):
        export_checkpoint(tiny_gpt2, None, tmp_path / "x", {}, fmt="gguf")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="Q8_0"):
        JobSpec(sparsity=0.5, format="gguf", quantize={"bits": 8})
    tiny_gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SpecRejected, match="llama"):
        check_shapes(JobSpec(model=str(tmp_path / "gpt2"), sparsity=0.5, format="gguf"))
    check_shapes(JobSpec(sparsity=0.5, format="gguf"))  # the built-in SmolLM2 is a llama


def test_a_gguf_job_reports_the_file(tiny_llama_dir, tmp_path):
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning.export import count_zeros_in_checkpoint, folder_bytes
    from evosparse.worker.runner import run_job

    spec = JobSpec(model=str(tiny_llama_dir), sparsity=0.5, pruner="wanda", calib_windows=4, eval_windows=2,
                   seq_len=32, format="gguf")
    rep = run_job(spec, tmp_path / "out")
    assert rep["format"] == "gguf" and rep["checkpoint_bytes"] == folder_bytes(tmp_path / "out") > 0
    zeros = count_zeros_in_checkpoint(tmp_path / "out", [f"{n}.weight" for n in rep["layer_sparsity"]])
    assert rep["global_sparsity"] == pytest.approx(sum(z for z, _ in zeros.values()) / sum(n for _, n in zeros.values()),
                                                   abs=1e-12)
    assert rep["global_sparsity"] >= 0.5
    card = (tmp_path / "out" / "README.md").read_text()  # the model card says how to load this file
    assert 'from_pretrained(".", gguf_file="model.gguf")' in card
