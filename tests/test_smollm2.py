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

    spec = JobSpec(model="smollm2-135m", sparsity=0.5, pruner="wanda", allocation="uniform",
                   calib_windows=8, eval_windows=4, seq_len=128)
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
