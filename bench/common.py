"""What the SmolLM2 quality benchmarks share: the model in float32 on the CPU and the pydoc windows.

Calibration on the first half of the text, evaluation on the second, never tuned on.
"""

from __future__ import annotations

import argparse

import torch


def setup(args: argparse.Namespace):  # noqa: ANN201 - (model, tokenizer, calib, eval windows)
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    calib = get_windows("pydoc", tok, args.calib_windows, 256, "calib", seed=0)
    evalw = get_windows("pydoc", tok, args.eval_windows, 256, "eval")
    return model, tok, calib, evalw
