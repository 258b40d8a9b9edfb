import json
import math

import pytest
import torch
from evosparse.pruning.evaluate import perplexity
from evosparse.pruning.export import export_checkpoint, measured_sparsity
from evosparse.pruning.layers import prunable_linears, weight_matrix
from evosparse.pruning.prune import prune_model
from evosparse.pruning.sensitivity import allocation_counts

from tests.conftest import make_tiny_gpt2, make_tiny_llama


def test_perplexity_is_exp_of_mean_token_nll_and_batch_independent(tiny_llama, tiny_tokens):
    with torch.no_grad():
        loss = tiny_llama(input_ids=tiny_tokens, labels=tiny_tokens).loss  # mean over all predicted tokens
    ppl1 = perplexity(tiny_llama, tiny_tokens, batch_size=1)
    ppl3 = perplexity(tiny_llama, tiny_tokens, batch_size=3)
    assert ppl1 == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert ppl3 == pytest.approx(ppl1, rel=1e-6)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2])
def test_exported_checkpoint_reloads_with_identical_logits(make, tiny_tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make()
    counts = allocation_counts(model, "uniform", 0.55)
    prune_model(model, tiny_tokens, "wanda", counts)
    report = export_checkpoint(model, None, tmp_path, {"pruner": "wanda"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = model(input_ids=tiny_tokens).logits
        b = reloaded(input_ids=tiny_tokens).logits
    assert torch.equal(a, b)
    # sparsity in the report is what the saved weights hold
    total = sum(weight_matrix(m).numel() for m in prunable_linears(model).values())
    assert report["global_sparsity"] == sum(counts.values()) / total
    assert report["layer_sparsity"] == {n: counts[n] / weight_matrix(m).numel()
                                        for n, m in prunable_linears(model).items()}
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["global_sparsity"] == report["global_sparsity"] and on_disk["pruner"] == "wanda"


def test_measured_sparsity_reads_the_files_not_the_model(tiny_llama, tmp_path):
    export_checkpoint(tiny_llama, None, tmp_path)
    names = list(prunable_linears(tiny_llama))
    with torch.no_grad():  # changing the live model afterwards must not change the measurement
        weight_matrix(prunable_linears(tiny_llama)[names[0]]).zero_()
    g, layer = measured_sparsity(tmp_path, names)
    assert g == 0.0 and layer[names[0]] == 0.0
