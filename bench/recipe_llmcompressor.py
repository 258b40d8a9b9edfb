"""Re-apply an evosparse recipe.yaml with llm-compressor's own ``oneshot`` and compare the sparsity it reaches.

llm-compressor is not an evosparse dependency (its releases pin older transformers and
compressed-tensors), so this runs against a side copy of it installed without dependencies:

    pip install --no-deps --target /tmp/llmc llmcompressor==0.14.0.1 auto-round==0.15.1 loguru
    PYTHONPATH=/tmp/llmc python bench/recipe_llmcompressor.py SOURCE_MODEL_DIR EVOSPARSE_OUTPUT_DIR

It calibrates on 16 × 64 tokens of the pydoc text and prints, over every linear of the report,
the largest difference between the fraction of zeros llm-compressor left and the report's figure.
"""

from __future__ import annotations

import json
import sys

import torch


def main(source: str, out: str) -> None:
    from datasets import Dataset
    from evosparse.pruning.data import pydoc_text
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = tok(pydoc_text()[:200_000])["input_ids"]
    rows = [{"input_ids": ids[i:i + 64], "attention_mask": [1] * 64} for i in range(0, 64 * 16, 64)]
    oneshot(model=model, recipe=f"{out}/recipe.yaml", dataset=Dataset.from_list(rows), num_calibration_samples=16,
            max_seq_length=64)
    report = json.loads(open(f"{out}/report.json").read())
    worst = max(abs(float((model.get_submodule(n).weight == 0).float().mean()) - s)
                for n, s in report["layer_sparsity"].items())
    print(f"linears {len(report['layer_sparsity'])}; max |llm-compressor sparsity - report| = {worst:.5f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
