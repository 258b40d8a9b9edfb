"""Integration on the real SmolLM2-135M: Wanda 50 % uniform through run_job, then reload the checkpoint."""

import math

import pytest
import torch
from evosparse.jobs.spec import JobSpec
from evosparse.worker.runner import run_job

pytestmark = pytest.mark.slow


def test_smollm2_wanda_50_uniform_reloads_and_loses_some_quality(tmp_path):
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.evaluate import perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # float32 on request, so the reloaded model reproduces the in-memory perplexity exactly
    spec = JobSpec(model="smollm2-135m", sparsity=0.5, pruner="wanda", allocation="uniform",
                   calib_windows=8, eval_windows=4, seq_len=128, export_dtype="float32")
    out = tmp_path / "smol-wanda50"
    report = run_job(spec, out)
    ppl = report["perplexity"]
    assert math.isfinite(ppl["pruned"]) and math.isfinite(ppl["dense"])
    assert ppl["dense"] < ppl["pruned"] < 10 * ppl["dense"]  # worse, but not destroyed
    assert abs(report["global_sparsity"] - 0.5) < 1e-6
    assert all(abs(f - 0.5) < 1e-3 for f in report["layer_sparsity"].values())
    assert len(report["layer_sparsity"]) == 30 * 7

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    windows = get_windows("pydoc", tokenizer, 4, 128, "eval")
    assert perplexity(reloaded, windows) == pytest.approx(ppl["pruned"], rel=1e-4)
    q = reloaded.model.layers[3].mlp.down_proj.weight
    assert abs(float((q == 0).float().mean()) - 0.5) < 1e-3


def test_smollm2_compressed_tensors_artifact_is_small_and_loads(tmp_path):
    """Default export: the source dtype (bfloat16) and, with 4-bit codes, the packed format."""
    from evosparse.pruning.layers import prunable_linears
    from transformers import AutoModelForCausalLM

    spec = JobSpec(model="smollm2-135m", sparsity=0.5, pruner="wanda", calib_windows=8, eval_windows=4,
                   seq_len=128, quantize={"bits": 4, "group_size": 64, "method": "rtn"}, format="compressed-tensors")
    out = tmp_path / "smol-w4"
    report = run_job(spec, out)
    assert report["dtype"] == "bfloat16" and report["format"] == "compressed-tensors"
    # 134.5 M parameters in bfloat16 would be ~257 MiB: the linears now take 4.25 bits a weight
    assert report["checkpoint_bytes"] < 0.45 * 134_515_008 * 2
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    with torch.no_grad():  # compressed-tensors unpacks the weights on the first forward pass
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    ws = [m.weight for m in prunable_linears(model).values()]
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert zeros == pytest.approx(report["global_sparsity"], abs=1e-12) and zeros >= 0.5
