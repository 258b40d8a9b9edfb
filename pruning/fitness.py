"""The proxy fitness the search minimises: how far a level vector's pruned model drifts from the dense one.

``fitness(vector, tokens)`` applies the vector through the layer database and scores the first
``ceil(tokens / seq_len)`` calibration windows:

- ``kl``: mean over positions of KL(dense ‖ pruned) of the next-token distribution. The dense
  distribution is computed once; per position KL = Σ p log p − Σ p · logits + logsumexp(logits),
  so a candidate costs one log-sum-exp and one dot product over the vocabulary. When the dense
  probabilities of all windows would not fit in ``dense_memory_bytes`` only the top-k log-probs
  per position are kept plus the tail mass, and the KL is that of the (top-k + tail) coarse
  distributions (a lower bound of the full KL, exact when k = vocab).
- ``ppl``: perplexity of the pruned model on the windows.

Work is never repeated:

- Per-window scores are kept per vector, so a candidate re-scored on more tokens (the next
  selection stage) only runs the windows it has not seen yet, as one batch.
- Prefix reuse: the hidden states of the current parent (``set_parent``) entering every block
  are kept per window range. A child that first differs from the parent at block k starts from
  the parent's hidden state entering block k, skipping blocks 0..k-1.
- A candidate's own hidden states are kept for a while (``trace_memory_bytes``), so when it
  becomes the next parent its trace is already there.
- A process that did not score the new parent itself can take its trace from elsewhere
  (``trace_source``: worker/scoring.py fetches the one the parent's scorer published) instead of
  recomputing it; ``held_traces``, ``trace_to_bytes`` and ``trace_from_bytes`` are the other end.

Exactness: windows are always batched by range ``[lo, hi)`` and split into chunks of
``batch_windows`` from ``lo``, so a range reached through reuse runs exactly the same kernels on
exactly the same inputs as from scratch: the result is bit-identical. With ``window_bounds`` (the
window counts of the search's selection stages) the ranges are always cut at those bounds, so a
score is a pure function of (vector, tokens): any process holding the same model, data and
database computes the same bits, whatever it scored before. On a CPU ranges are also cut at
every window (``range_windows``), so a selection stage splits into (candidate, window) work items
that balance across processes; a single window loses nothing there (measured: a block forward
of 3 windows one at a time took 0.728 s against 0.747 s batched, 1 thread). That is what lets a search fan its
candidates out to several scoring processes (worker/scoring.py) and still equal the one-process
search exactly (on one device type, with the same torch thread count).

Fresh windows (``chunk_windows``): the windows are cut into fixed chunks of ``chunk_windows``
(the largest stage's count) and ``fitness(vector, tokens, chunk)`` reads the first windows of
chunk ``chunk`` instead of the first windows overall; ranges are cut at the bounds relative to
the chunk's start, so a chunk's scores are the same bits whoever computes them. Per-window
scores are kept by window id (absolute index), so nothing is ever scored twice.

The dense reference (``DenseReference``) is computed once from the dense model before the level
database touches any weight; a scoring process builds its own from the same windows.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from evosparse.pruning.blockwise import capture_block_inputs, head_logits, run_block
from evosparse.pruning.layers import BlockInfo, find_blocks
from evosparse.pruning.leveldb import LevelDB, Unit
from evosparse.search.levels import LevelSpace
from torch import nn

Range = tuple[int, int]
Trace = list[torch.Tensor]  # hidden entering each block, then the last block's output


class DenseReference:
    """The dense model's view of the fitness windows: block inputs and next-token distributions.

    Built once, from the dense weights, one window at a time. ``full``: the dense probabilities
    of every position are kept ([T, V] per window); otherwise only the top-k log-probs and the
    tail mass (when all windows' probabilities would exceed ``dense_memory_bytes``).
    """

    @torch.no_grad()
    def __init__(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        blocks: Sequence[BlockInfo] | None = None,
        topk: int = 256,
        dense_memory_bytes: int = 512 << 20,
        batch_windows: int = 4,
    ) -> None:
        self.tokens = tokens
        self.n_windows, self.seq_len = tokens.shape
        self.blocks = [b.module for b in (blocks if blocks is not None else find_blocks(model))]
        inputs = capture_block_inputs(model, tokens)
        self.inputs = inputs.hidden  # [n_windows, T, d]
        self.kwargs = inputs.kwargs
        self.full = True
        self.k = 0
        self.dense_p: list[torch.Tensor] = []  # full: probabilities [T, V]; top-k: log-probs [T, k]
        self.dense_negent: list[torch.Tensor] = []  # full: Σ_v p log p per position
        self.dense_idx: list[torch.Tensor] = []
        self.dense_tail: list[torch.Tensor] = []
        for w in range(self.n_windows):
            h = self.inputs[w : w + 1]
            for block in self.blocks:
                h = run_block(block, h, self.kwargs, batch_size=batch_windows)
            logp = torch.log_softmax(head_logits(model, h).float(), dim=-1)[0]  # [T, V]
            if w == 0:
                vocab = logp.shape[-1]
                self.full = self.n_windows * self.seq_len * vocab * 4 <= dense_memory_bytes or topk >= vocab
                self.k = vocab if self.full else topk
            if self.full:
                p = logp.exp()
                self.dense_p.append(p)
                self.dense_negent.append((p * logp).sum(-1))
            else:
                vals, idx = torch.topk(logp, self.k, dim=-1)
                self.dense_p.append(vals)
                self.dense_idx.append(idx)
                self.dense_tail.append(_log1mexp(torch.logsumexp(vals, dim=-1)))

    def nbytes(self) -> int:
        tensors = [self.inputs, *self.dense_p, *self.dense_negent, *self.dense_idx, *self.dense_tail]
        return sum(t.numel() * t.element_size() for t in tensors)


class ProxyFitness:
    def __init__(
        self,
        model: nn.Module,
        reference: DenseReference | torch.Tensor,
        db: LevelDB,
        units: list[Unit],
        space: LevelSpace,
        kind: str = "kl",
        topk: int = 256,
        dense_memory_bytes: int = 512 << 20,
        reuse_prefix: bool = True,
        batch_windows: int = 4,
        trace_memory_bytes: int = 1 << 30,
        window_bounds: Sequence[int] | None = None,
        chunk_windows: int | None = None,
        range_windows: int | None = None,
    ) -> None:
        """``reference``: a DenseReference, or calibration windows to build one from (the database is
        first restored to its lowest counts, dense with the default bounds). ``chunk_windows``: the
        width of the window chunks ``chunk`` counts in (default: all windows, one chunk).
        ``range_windows``: the most windows one range runs together (default: 1 on a CPU, where one
        window is already a large enough matrix product and single windows make the finest work items
        for scoring processes; unbounded elsewhere, where batching windows fills the device)."""
        if kind not in ("kl", "ppl"):
            raise ValueError(f"fitness must be 'kl' or 'ppl', got {kind!r}")
        if batch_windows < 1:
            raise ValueError("batch_windows must be at least 1")
        if not isinstance(reference, DenseReference):
            db.restore()
            reference = DenseReference(model, reference, db.blocks, topk, dense_memory_bytes, batch_windows)
        self.model = model
        self.db = db
        self.units = units
        self.space = space
        self.kind = kind
        self.reuse_prefix = reuse_prefix
        self.batch_windows = batch_windows
        self.trace_memory = trace_memory_bytes
        self.ref = reference
        self.tokens = reference.tokens
        self.n_windows, self.seq_len = reference.tokens.shape
        self.blocks = reference.blocks
        self.inputs = reference.inputs
        self.kwargs = reference.kwargs
        self.full = reference.full
        if chunk_windows is not None and not 1 <= chunk_windows <= self.n_windows:
            raise ValueError(f"chunk_windows must be in 1..{self.n_windows}, got {chunk_windows}")
        self.chunk_windows = chunk_windows or self.n_windows
        self.n_chunks = self.n_windows // self.chunk_windows
        self.bounds = sorted({self.windows_for(t) for t in window_bounds}) if window_bounds else []
        if range_windows is None:
            range_windows = 1 if self.inputs.device.type == "cpu" else self.chunk_windows
        if range_windows < 1:
            raise ValueError(f"range_windows must be at least 1, got {range_windows}")
        self.range_windows = range_windows
        self.unit_blocks = [u.block for u in units]
        self.window_scores: dict[tuple[int, ...], dict[int, float]] = {}  # vector -> {window id: score}
        self.parent: tuple[int, ...] | None = None
        self.parent_trace: dict[Range, Trace] = {}
        # Candidates' own traces per range, with the bytes they added, least recently scored first.
        self.recent: OrderedDict[tuple[int, ...], dict[Range, tuple[Trace, int]]] = OrderedDict()
        self._recent_bytes = 0
        self.blocks_run = 0  # window-blocks run, for the tests and the benchmark
        self.windows_scored = 0
        # Where a parent trace this process lacks may be found before recomputing it (None: recompute).
        self.trace_source: Callable[[tuple[int, ...], Range], Trace | None] | None = None
        self.traces_fetched = 0  # parent traces taken from trace_source / rebuilt here
        self.traces_rebuilt = 0

    # ------------------------------------------------------------------ helpers
    def windows_for(self, tokens: int) -> int:
        return max(1, min(self.chunk_windows, math.ceil(tokens / self.seq_len)))

    def _run_from(self, hidden: torch.Tensor, start: int, keep: Trace | None = None) -> torch.Tensor:
        h = hidden
        for b in range(start, len(self.blocks)):
            if keep is not None:
                keep.append(h)
            h = run_block(self.blocks[b], h, self.kwargs, batch_size=self.batch_windows)
            self.blocks_run += h.shape[0]
        if keep is not None:
            keep.append(h)
        return h

    def _apply(self, vector: Sequence[int]) -> None:
        self.db.apply(self.db.linear_counts(self.units, self.space.counts(vector)))

    def _first_diff_block(self, vector: tuple[int, ...]) -> int:
        if self.parent is None or not self.reuse_prefix:
            return 0
        diff = [self.unit_blocks[i] for i, (a, b) in enumerate(zip(vector, self.parent, strict=True)) if a != b]
        return min(diff) if diff else len(self.blocks)

    def _parent_trace(self, rng: Range) -> Trace:
        if rng not in self.parent_trace:
            assert self.parent is not None
            fetched = self.trace_source(self.parent, rng) if self.trace_source is not None else None
            if fetched is not None:
                self.parent_trace[rng] = fetched
                self.traces_fetched += 1
                return fetched
            self.traces_rebuilt += 1
            self._apply(self.parent)
            keep: Trace = []
            self._run_from(self.inputs[rng[0] : rng[1]], 0, keep)
            self.parent_trace[rng] = keep
        return self.parent_trace[rng]

    def _remember(self, vector: tuple[int, ...], rng: Range, trace: Trace, new_bytes: int) -> None:
        """Keep a candidate's trace (least recently scored dropped first) for when it becomes the parent."""
        entry = self.recent.setdefault(vector, {})
        entry[rng] = (trace, new_bytes)
        self.recent.move_to_end(vector)
        self._recent_bytes += new_bytes
        while self._recent_bytes > self.trace_memory and len(self.recent) > 1:
            _, old = self.recent.popitem(last=False)
            self._recent_bytes -= sum(nb for _, nb in old.values())

    def _score_range(self, vector: tuple[int, ...], lo: int, hi: int) -> list[float]:
        """Scores of windows lo..hi-1 for ``vector``, run as one range from the first block it changes."""
        rng = (lo, hi)
        start = self._first_diff_block(vector)
        base = self._parent_trace(rng) if start > 0 else None
        hidden = base[start] if base is not None else self.inputs[lo:hi]
        self._apply(vector)
        keep: Trace | None = [] if self.reuse_prefix else None
        out = self._run_from(hidden, start, keep)
        if keep is not None:
            new_bytes = sum(t.numel() * t.element_size() for t in keep[1:])  # keep[0] is an existing tensor
            self._remember(vector, rng, (base[:start] if base is not None else []) + keep, new_bytes)
        return self._score_windows(lo, out)

    def _score_windows(self, lo: int, hidden: torch.Tensor) -> list[float]:
        logits = head_logits(self.model, hidden).float()  # [b, T, V]
        scores = []  # 0-d tensors, read back once: one device round trip per range, not per window
        for i in range(logits.shape[0]):
            w = lo + i
            lg = logits[i]
            lse = _logsumexp_rows(lg)
            if self.kind == "ppl":
                tgt = self.tokens[w, 1:].to(lg.device)
                nll = lse[:-1] - lg[:-1].gather(1, tgt.unsqueeze(1)).squeeze(1)
                scores.append(nll.mean())
            elif self.full:
                cross = torch.einsum("tv,tv->t", self.ref.dense_p[w], lg)
                scores.append((self.ref.dense_negent[w] - cross + lse).mean())
            else:
                q = lg.gather(1, self.ref.dense_idx[w]) - lse.unsqueeze(1)  # log-probs of the dense top-k only
                q_tail = _log1mexp(torch.logsumexp(q, dim=-1))
                ref, p_tail = self.ref.dense_p[w], self.ref.dense_tail[w]
                kl = (ref.exp() * (ref - q)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
                scores.append(kl.mean())
            self.windows_scored += 1
        return torch.stack(scores).tolist()

    # ------------------------------------------------------------------ API
    def set_parent(self, vector: Sequence[int]) -> None:
        """Make ``vector`` the reference whose per-block hidden states children reuse."""
        vector = tuple(vector)
        if vector == self.parent:
            return
        adopted = self.recent.get(vector, {})
        self.parent = vector
        self.parent_trace = {rng: trace for rng, (trace, _) in adopted.items()}
        self.recent.clear()  # children of the old parent: none of them can be adopted any more
        self._recent_bytes = 0

    def held_traces(self, vector: Sequence[int]) -> dict[Range, Trace]:
        """The per-block hidden states this process holds for ``vector``, per window range."""
        vector = tuple(vector)
        if vector == self.parent:
            return dict(self.parent_trace)
        return {rng: trace for rng, (trace, _) in self.recent.get(vector, {}).items()}

    def cost(self, vector: Sequence[int], tokens: int, chunk: int = 0) -> int:
        """Window-blocks scoring ``vector`` on ``tokens`` of ``chunk`` would run from here (0: known)."""
        return sum(self.range_cost(vector, rng) for rng in self.pending_ranges(vector, tokens, chunk))

    def is_final(self, tokens: int) -> bool:
        """Whether ``tokens`` reach the last selection stage: its winner becomes the next parent."""
        return self.windows_for(tokens) >= (self.bounds[-1] if self.bounds else self.n_windows)

    def _ranges(self, done: int, n: int) -> list[Range]:
        """The window ranges that take a vector from ``done`` scored windows to ``n`` (relative to the
        chunk's start), cut at the stage bounds and every ``range_windows`` windows: the same cuts
        whoever computes them, so a range is a unit of work any process can take."""
        rw = self.range_windows
        cuts = sorted({b for b in self.bounds if done < b < n} | set(range((done // rw + 1) * rw, n, rw))) + [n]
        return list(zip([done, *cuts[:-1]], cuts, strict=True))

    def pending_ranges(self, vector: Sequence[int], tokens: int, chunk: int = 0) -> list[Range]:
        """The absolute window ranges scoring ``vector`` on ``tokens`` of ``chunk`` still has to run."""
        vector = tuple(vector)
        n, off = self.windows_for(tokens), chunk * self.chunk_windows
        done = self.window_scores.get(vector, {})
        have = 0
        while have < n and off + have in done:
            have += 1
        return [(off + lo, off + hi) for lo, hi in self._ranges(have, n)] if have < n else []

    def range_cost(self, vector: Sequence[int], rng: Range) -> int:
        """Window-blocks scoring ``rng`` of ``vector`` runs from here (parent prefix skipped)."""
        return (rng[1] - rng[0]) * (len(self.blocks) - self._first_diff_block(tuple(vector)))

    @torch.no_grad()
    def score_range(self, vector: Sequence[int], rng: Range) -> list[list[float]]:
        """Score one range of ``pending_ranges`` (a scoring process's work item); returns its
        [window id, score] pairs, which are also kept as known windows."""
        vector = tuple(vector)
        scores = self._score_range(vector, *rng)
        known = self.window_scores.setdefault(vector, {})
        known.update(zip(range(*rng), scores, strict=True))
        return [[w, known[w]] for w in range(*rng)]

    @torch.no_grad()
    def __call__(self, vector: Sequence[int], tokens: int, chunk: int = 0) -> float:
        vector = tuple(vector)
        if not 0 <= chunk < self.n_chunks:
            raise ValueError(f"chunk must be in 0..{self.n_chunks - 1}, got {chunk}")
        for rng in self.pending_ranges(vector, tokens, chunk):
            self.score_range(vector, rng)
        n, off = self.windows_for(tokens), chunk * self.chunk_windows
        done = self.window_scores[vector]
        mean = sum(done[off + i] for i in range(n)) / n
        return math.exp(mean) if self.kind == "ppl" else mean

    @torch.no_grad()
    def score_model(self) -> float:
        """The model as it stands (e.g. pruned by ``prune_model``, not through the database) on all windows."""
        scores: list[float] = []
        for lo in range(0, self.n_windows, self.batch_windows):
            hi = min(self.n_windows, lo + self.batch_windows)
            scores += self._score_windows(lo, self._run_from(self.inputs[lo:hi], 0))
        mean = sum(scores) / len(scores)
        return math.exp(mean) if self.kind == "ppl" else mean

    def score_many(self, vectors: Sequence[Sequence[int]], tokens: int, chunk: int = 0) -> list[float]:
        """Scores of a whole selection stage (here one after another; worker/scoring.py fans out)."""
        return [self(v, tokens, chunk) for v in vectors]

    def known_windows(self, vector: Sequence[int]) -> list[list[float]]:
        """Per-window scores already computed for ``vector``, as [window id, score] pairs."""
        return [[w, s] for w, s in sorted(self.window_scores.get(tuple(vector), {}).items())]

    def add_known_windows(self, vector: Sequence[int], scores: Sequence[Sequence[float]]) -> None:
        """Take per-window scores another process computed (same bits: the ranges are cut alike)."""
        known = self.window_scores.setdefault(tuple(vector), {})
        for w, s in scores:
            known.setdefault(int(w), float(s))


def trace_to_bytes(trace: Trace) -> bytes:
    """One trace as bytes (a JSON header, then the stacked hidden states): exact, any dtype."""
    stacked = torch.stack([t.detach() for t in trace]).cpu().contiguous()
    header = json.dumps({"dtype": str(stacked.dtype).removeprefix("torch."), "shape": list(stacked.shape)}).encode()
    return len(header).to_bytes(4, "little") + header + stacked.view(torch.uint8).numpy().tobytes()


def trace_from_bytes(data: bytes, device: torch.device | str = "cpu") -> Trace:
    """The inverse of ``trace_to_bytes``, on ``device``; the bits are those that were sent."""
    n = int.from_bytes(data[:4], "little")
    meta = json.loads(data[4 : 4 + n])
    with warnings.catch_warnings():  # read-only memory is fine: a trace is only ever read
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8, offset=4 + n)  # no copy of the (large) payload
    stacked = flat.view(getattr(torch, meta["dtype"])).reshape(meta["shape"]).to(device)
    return list(stacked.unbind(0))


def _logsumexp_rows(x: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """logsumexp over the last dim, a few rows at a time: each chunk stays in cache (3x faster on CPU)."""
    return torch.cat([torch.logsumexp(x[i : i + chunk], dim=-1) for i in range(0, x.shape[0], chunk)])


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable; clamped so an all-covering top-k gives a tiny tail, not -inf."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
