"""Quality measure of a model: perplexity over token windows (the search's KL fitness is pruning/fitness.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from evosparse.pruning.blockwise import model_device
from torch import nn


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch.to(model_device(model)), use_cache=False).logits.float()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of ``windows``."""
    total_nll = 0.0
    total_tokens = 0
    n = windows.shape[0]
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size]
        logits = _logits(model, batch)[:, :-1]
        targets = batch[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
        if progress is not None:
            progress(min(i + batch_size, n), n)
    mean = total_nll / max(total_tokens, 1)
    return math.exp(mean) if mean < 700 else float("inf")
