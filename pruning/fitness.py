"""The proxy fitness the search minimises: how far a level vector's pruned model drifts from the dense one.

``fitness(vector, tokens)`` applies the vector through the layer database and scores the first
``ceil(tokens / seq_len)`` calibration windows:

- ``kl``: mean over positions of KL(dense ‖ pruned) of the next-token distribution. The dense
  log-probs are computed once; when all of them would not fit in ``dense_memory_bytes`` only the
  top-k log-probs per position are kept plus the tail mass, and the KL is that of the
  (top-k + tail) coarse distributions (a lower bound of the full KL, exact when k = vocab).
- ``ppl``: perplexity of the pruned model on the windows.

Prefix reuse: the hidden states of the current parent (``set_parent``) entering every block
are kept per window. A child that first differs from the parent at block k starts from the
parent's hidden state entering block k, skipping blocks 0..k-1. Windows are always run one at a
time, so a state reached through reuse is bit-identical to one computed from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pruning.blockwise import capture_block_inputs, head_logits, run_block
from pruning.leveldb import LevelDB, Unit
from search.levels import LevelSpace


class ProxyFitness:
    def __init__(
        self,
        model: nn.Module,
        calib_tokens: torch.Tensor,
        db: LevelDB,
        units: list[Unit],
        space: LevelSpace,
        kind: str = "kl",
        topk: int = 256,
        dense_memory_bytes: int = 512 << 20,
        reuse_prefix: bool = True,
    ) -> None:
        if kind not in ("kl", "ppl"):
            raise ValueError(f"fitness must be 'kl' or 'ppl', got {kind!r}")
        self.model = model
        self.db = db
        self.units = units
        self.space = space
        self.kind = kind
        self.reuse_prefix = reuse_prefix
        self.tokens = calib_tokens
        self.n_windows, self.seq_len = calib_tokens.shape
        self.blocks = [b.module for b in db.blocks]
        db.restore()
        inputs = capture_block_inputs(model, calib_tokens)
        self.inputs = [inputs.hidden[i : i + 1].clone() for i in range(self.n_windows)]
        self.kwargs = inputs.kwargs
        self.unit_blocks = [u.block for u in units]
        self.parent: tuple[int, ...] | None = None
        self.trace: dict[int, list[torch.Tensor]] = {}  # window -> parent hidden entering each block + final
        self.blocks_run = 0  # counters for the benchmark
        self.windows_scored = 0
        # Dense reference, computed once per window.
        vocab = None
        self.full = True
        self.dense_lp: list[torch.Tensor] = []
        self.dense_idx: list[torch.Tensor] = []
        self.dense_tail: list[torch.Tensor] = []
        for w in range(self.n_windows):
            h = self._run_from(self.inputs[w], 0)
            logp = torch.log_softmax(head_logits(model, h).float(), dim=-1)[0]  # [T, V]
            if vocab is None:
                vocab = logp.shape[-1]
                self.full = self.n_windows * self.seq_len * vocab * 4 <= dense_memory_bytes or topk >= vocab
                self.k = vocab if self.full else topk
            if self.full:
                self.dense_lp.append(logp)
            else:
                vals, idx = torch.topk(logp, self.k, dim=-1)
                self.dense_lp.append(vals)
                self.dense_idx.append(idx)
                self.dense_tail.append(_log1mexp(torch.logsumexp(vals, dim=-1)))
        self.blocks_run = 0

    # ------------------------------------------------------------------ helpers
    def windows_for(self, tokens: int) -> int:
        return max(1, min(self.n_windows, math.ceil(tokens / self.seq_len)))

    def _run_from(self, hidden: torch.Tensor, start: int, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        h = hidden
        for b in range(start, len(self.blocks)):
            if keep is not None:
                keep.append(h)
            h = run_block(self.blocks[b], h, self.kwargs, batch_size=1)
            self.blocks_run += 1
        if keep is not None:
            keep.append(h)
        return h

    def _apply(self, vector: Sequence[int]) -> None:
        self.db.apply(self.db.linear_counts(self.units, self.space.counts(vector)))

    def _first_diff_block(self, vector: Sequence[int]) -> int:
        if self.parent is None or not self.reuse_prefix:
            return 0
        diff = [self.unit_blocks[i] for i, (a, b) in enumerate(zip(vector, self.parent, strict=True)) if a != b]
        return min(diff) if diff else len(self.blocks)

    def _score_window(self, w: int, hidden: torch.Tensor) -> float:
        logp = torch.log_softmax(head_logits(self.model, hidden).float(), dim=-1)[0]  # [T, V]
        self.windows_scored += 1
        if self.kind == "ppl":
            tgt = self.tokens[w, 1:].to(logp.device)
            return float(-logp[:-1].gather(1, tgt.unsqueeze(1)).mean())
        ref = self.dense_lp[w]
        if self.full:
            return float((ref.exp() * (ref - logp)).sum(-1).mean())
        q = logp.gather(1, self.dense_idx[w])
        q_tail = _log1mexp(torch.logsumexp(q, dim=-1))
        p_tail = self.dense_tail[w]
        kl = (ref.exp() * (ref - q)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
        return float(kl.mean())

    # ------------------------------------------------------------------ API
    def set_parent(self, vector: Sequence[int]) -> None:
        """Make ``vector`` the reference whose per-block hidden states children reuse."""
        vector = tuple(vector)
        if vector != self.parent:
            self.parent = vector
            self.trace = {}

    def _ensure_trace(self, windows: int) -> None:
        missing = [w for w in range(windows) if w not in self.trace]
        if not missing or self.parent is None:
            return
        self._apply(self.parent)
        for w in missing:
            keep: list[torch.Tensor] = []
            self._run_from(self.inputs[w], 0, keep)
            self.trace[w] = keep

    @torch.no_grad()
    def __call__(self, vector: Sequence[int], tokens: int) -> float:
        n = self.windows_for(tokens)
        start = self._first_diff_block(vector)
        if start > 0:
            self._ensure_trace(n)
        self._apply(vector)
        total = 0.0
        for w in range(n):
            h = self.trace[w][start] if start > 0 else self.inputs[w]
            total += self._score_window(w, self._run_from(h, start))
        mean = total / n
        return math.exp(mean) if self.kind == "ppl" else mean


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable; clamped so an all-covering top-k gives a tiny tail, not -inf."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
