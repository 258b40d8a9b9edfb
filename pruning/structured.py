"""Structured pruning: whole attention heads (with their KV group) and MLP channels removed.

Each Llama-style block holds two kinds of depth-2 units (Li, Lei, Dong 2024, arXiv:2407.19126):

- an attention *KV group*: the K/V rows of one key-value head, the Q rows of the query heads
  that share it, and the matching O columns. Removing whole groups keeps every layer's
  ``num_key_value_groups`` (query heads per KV head) unchanged, so transformers' Llama attention
  runs the smaller layer as it is: only the Linear shapes change;
- an MLP *channel*: row i of gate and up, column i of down.

A unit's contribution to its module's output is additive: the output is Σ_u W2[:, u] · x_u
with x_u the unit's activation (the input of o_proj / down_proj). Pruners:

- ``goa`` (greedy output approximation) removes units one step at a time, each time the unit
  whose removal raises the module's output error least *after* the second layer is re-fitted
  to the kept units by least squares on the calibration activations: with G = XᵀX the Gram
  matrix of o_proj's / down_proj's input and B the re-fitted second layer on the kept set S,
  removing columns Q costs tr(B_Q [(G_SS)⁻¹]_QQ⁻¹ B_Qᵀ) (the OBS formula for a column set), and
  B and (G_SS)⁻¹ are downdated after each removal. The kept units' second layer is then
  W2' = W2 G[:, K] (G_KK + λI)⁻¹ (1 % ridge for conditioning). Attention is pruned and rebuilt
  first; the block is then re-run so the MLP is ranked and rebuilt on the inputs the pruned
  attention produces (the two steps of the reconstruction). Without reconstruction
  (``reconstruct_second=False``, an ablation) units are ranked by their own output contribution
  ‖X_u W2[:, u]ᵀ‖²_F = tr(W2_u G_uu W2_uᵀ), the error of removing that unit alone.
- ``magnitude`` ranks units by the L2 norm of all their weights (no data, no reconstruction):
  the baseline.

How a block's parameter budget is split: attention loses ``floor(s · groups)`` KV groups (s the
block's fraction), never all of them, and MLP channels make up the rest, to the nearest channel.
So attention is never pruned harder than the block as a whole, and a budget is met to within
half a channel's parameters per block (the granularity of the structure). A budget that would
need every KV group of a block removed is refused with a clear error.

Pruning is block-sequential (each block calibrated on the outputs of the already pruned ones)
and physical: the Linear modules shrink. ``Structure`` records which units each block kept, so
the model can be exported small (``pruning/structured_export.py``) or padded back to its dense
shapes with zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from evosparse.pruning.blockwise import capture_block_inputs, run_block
from evosparse.pruning.errors import CancelledError, PruningConfigError
from evosparse.pruning.layers import BlockInfo, find_blocks
from torch import nn

STRUCTURED_PRUNERS = ("goa", "magnitude")
RIDGE = 0.01  # λ = RIDGE × mean diagonal of G_KK, as SparseGPT's dampening
GREEDY_STEPS = 64  # MLP channels leave in steps of channels // GREEDY_STEPS (see greedy_removal_order)


@dataclass
class BlockUnits:
    """Handles and sizes of one Llama-style block's structured units."""

    index: int
    name: str
    attn: nn.Module
    mlp: nn.Module
    head_dim: int
    n_rep: int  # query heads per KV head
    groups: int  # KV groups (heads) currently in the layer
    channels: int  # MLP channels currently in the layer
    d_model: int

    @property
    def group_params(self) -> int:
        """Weights of one KV group: n_rep Q rows + K row + V row (head_dim each) + O columns."""
        return (2 * self.n_rep + 2) * self.head_dim * self.d_model

    @property
    def channel_params(self) -> int:
        return 3 * self.d_model

    @property
    def params(self) -> int:
        return self.groups * self.group_params + self.channels * self.channel_params


def block_units(info: BlockInfo) -> BlockUnits:
    """The block's units; a clear error for architectures structured pruning does not cover."""
    attn = getattr(info.module, "self_attn", None)
    mlp = getattr(info.module, "mlp", None)
    if attn is None or info.glu is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise PruningConfigError(
            "structured pruning supports Llama-style blocks (self_attn.q/k/v/o_proj and a gate/up/down MLP); "
            f"block {info.name} is not one"
        )
    head_dim = int(attn.head_dim)
    n_rep = int(attn.num_key_value_groups)
    groups = attn.k_proj.weight.shape[0] // head_dim
    return BlockUnits(
        index=info.index, name=info.name, attn=attn, mlp=mlp, head_dim=head_dim, n_rep=n_rep, groups=groups,
        channels=mlp.down_proj.weight.shape[1], d_model=attn.o_proj.weight.shape[0],
    )


def plan_widths(units: BlockUnits, count: int) -> tuple[int, int]:
    """(KV groups removed, MLP channels removed) for a budget of ``count`` weights in this block."""
    if count <= 0:
        return 0, 0
    frac = count / units.params
    g = min(math.floor(frac * units.groups + 1e-9), units.groups - 1)
    while g < units.groups:
        c = max(0, round((count - g * units.group_params) / units.channel_params))
        if c <= units.channels - 1:  # keep at least one channel
            return g, c
        g += 1
    raise PruningConfigError(
        f"{units.name}: removing {count} of {units.params} weights ({frac:.1%}) would remove every attention "
        f"head of the layer; structured sparsity can go at most to "
        f"{max_fraction(units):.1%} here (one KV group and one MLP channel kept)"
    )


def max_fraction(units: BlockUnits) -> float:
    """The largest fraction of this block structured pruning can remove (one group, one channel kept)."""
    return ((units.groups - 1) * units.group_params + (units.channels - 1) * units.channel_params) / units.params


# ---------------------------------------------------------------------------------------- scores
def group_columns(units: BlockUnits, group: int) -> torch.Tensor:
    """The o_proj input columns (= q_proj output rows) of one KV group's query heads."""
    width = units.n_rep * units.head_dim
    return torch.arange(group * width, (group + 1) * width)


def kv_rows(units: BlockUnits, group: int) -> torch.Tensor:
    return torch.arange(group * units.head_dim, (group + 1) * units.head_dim)


def output_scores(w2: torch.Tensor, gram: torch.Tensor, unit_cols: list[torch.Tensor]) -> torch.Tensor:
    """‖X_u W2[:, u]ᵀ‖²_F per unit: the output change of removing unit u alone (Σ over tokens)."""
    w = w2.float()
    out = []
    for cols in unit_cols:
        wu = w[:, cols]
        out.append(torch.einsum("oi,ij,oj->", wu, gram[cols][:, cols], wu))
    return torch.stack(out)


def channel_output_scores(down: torch.Tensor, gram_diag: torch.Tensor) -> torch.Tensor:
    """Per MLP channel: Σ_t a_i² · ‖down[:, i]‖² (the one-column case of ``output_scores``)."""
    return gram_diag.float() * down.float().pow(2).sum(0)


def group_norm_scores(units: BlockUnits) -> torch.Tensor:
    a = units.attn
    out = []
    for g in range(units.groups):
        cols, rows = group_columns(units, g), kv_rows(units, g)
        sq = (a.q_proj.weight[cols].float().pow(2).sum() + a.k_proj.weight[rows].float().pow(2).sum()
              + a.v_proj.weight[rows].float().pow(2).sum() + a.o_proj.weight[:, cols].float().pow(2).sum())
        out.append(sq.sqrt())
    return torch.stack(out)


def channel_norm_scores(units: BlockUnits) -> torch.Tensor:
    m = units.mlp
    sq = m.gate_proj.weight.float().pow(2).sum(1) + m.up_proj.weight.float().pow(2).sum(1)
    return (sq + m.down_proj.weight.float().pow(2).sum(0)).sqrt()


def _damped_inverse(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    g = gram.float()
    diag = torch.diagonal(g)
    lam = ridge * float(diag.mean()) if bool((diag > 0).any()) else 1.0
    return torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))


@torch.no_grad()
def greedy_removal_order(w2: torch.Tensor, gram: torch.Tensor, unit_cols: list[torch.Tensor] | None,
                         n_remove: int, ridge: float = RIDGE) -> list[int]:
    """Units in the order greedy output approximation removes them, reconstruction taken into account.

    With the kept columns S least-squares optimal (B = the reconstructed W2 on S), removing a set of
    columns Q raises the output error by tr(B_Q [(G_SS)⁻¹]_QQ⁻¹ B_Qᵀ) (the OBS formula, a column set at
    a time). Each step removes the unit with the smallest rise, then downdates B and (G_SS)⁻¹ by that
    removal, so later choices see the reconstruction of the earlier ones. ``unit_cols`` None means
    one column per unit; those are removed ``n_units // GREEDY_STEPS`` at a time (the lowest rises
    of the step, in order), which keeps the cost to about GREEDY_STEPS downdates of (G_SS)⁻¹ per
    layer. The step size depends only on the layer, so the order is nested: its first k entries
    are what a run asked for k removals returns, for every k (the level database relies on it).
    """
    ginv = _damped_inverse(gram, ridge)
    b = w2.float().clone()
    n_units = b.shape[1] if unit_cols is None else len(unit_cols)
    alive = torch.ones(n_units, dtype=torch.bool)
    order: list[int] = []
    batch = max(1, n_units // GREEDY_STEPS) if unit_cols is None else 1
    n_remove = min(n_remove, n_units)
    while len(order) < n_remove:
        if unit_cols is None:  # single columns: all scores in one vectorised step
            score = b.pow(2).sum(0) / torch.diagonal(ginv).clamp_min(1e-30)
            score[~alive] = float("inf")
            take = min(batch, n_remove - len(order))
            picked = torch.argsort(score, stable=True)[:take]
            cols = picked
            js = [int(j) for j in picked]
        else:
            best, j = float("inf"), -1
            for u in range(n_units):
                if not alive[u]:
                    continue
                q = unit_cols[u]
                bq = b[:, q]
                rise = float(torch.einsum("oi,ij,oj->", bq, torch.linalg.inv(ginv[q][:, q]), bq))
                if rise < best:
                    best, j = rise, u
            cols = unit_cols[j]
            js = [j]
        m_inv = torch.linalg.inv(ginv[cols][:, cols])
        rows = ginv[cols]  # [|Q|, n]
        b -= b[:, cols] @ m_inv @ rows
        ginv -= rows.t() @ m_inv @ rows
        b[:, cols] = 0
        ginv[cols] = 0
        ginv[:, cols] = 0
        ginv[cols, cols] = 1.0  # removed columns: decoupled, never chosen again
        alive[js] = False
        order.extend(js)
    return order


def keep_after_removing(n_units: int, removed: list[int]) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([u for u in range(n_units) if u not in gone], dtype=torch.long)


def keep_top(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted indices of the units kept when the ``remove`` lowest scores go (stable ties)."""
    order = torch.argsort(scores, stable=True)
    return torch.sort(order[remove:]).values


@torch.no_grad()
def reconstruct(w2: torch.Tensor, gram: torch.Tensor, keep_cols: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Least-squares second layer on the kept input columns: W2 G[:, K] (G_KK + λI)⁻¹, float32 [out, |K|]."""
    g = gram.float()
    gkk = g[keep_cols][:, keep_cols]
    diag = torch.diagonal(gkk)
    dead = diag <= 0
    lam = ridge * float(diag.mean()) if bool((~dead).any()) else 1.0
    gkk = gkk + lam * torch.eye(gkk.shape[0], dtype=g.dtype, device=g.device)
    rhs = g[keep_cols] @ w2.float().t()  # [|K|, out]
    sol = torch.linalg.solve(gkk, rhs)
    return sol.t().contiguous()


# ---------------------------------------------------------------------------------------- shrink
def _shrink_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None) -> None:
    """Keep ``rows`` (output features) / ``cols`` (input features) of a Linear, in place."""
    w = lin.weight.data
    if rows is not None:
        w = w[rows.to(w.device)]
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[rows.to(w.device)].clone(), requires_grad=False)
    if cols is not None:
        w = w[:, cols.to(w.device)]
    if weight is not None:
        w = weight.to(dtype=lin.weight.dtype, device=lin.weight.device)
    lin.weight = nn.Parameter(w.contiguous().clone(), requires_grad=False)
    lin.out_features, lin.in_features = lin.weight.shape


def shrink_attention(units: BlockUnits, keep_groups: torch.Tensor, o_weight: torch.Tensor | None = None) -> None:
    a = units.attn
    q_rows = torch.cat([group_columns(units, int(g)) for g in keep_groups])
    kv = torch.cat([kv_rows(units, int(g)) for g in keep_groups])
    _shrink_linear(a.q_proj, rows=q_rows)
    _shrink_linear(a.k_proj, rows=kv)
    _shrink_linear(a.v_proj, rows=kv)
    _shrink_linear(a.o_proj, cols=q_rows, weight=o_weight)
    units.groups = len(keep_groups)


def shrink_mlp(units: BlockUnits, keep_channels: torch.Tensor, down_weight: torch.Tensor | None = None) -> None:
    m = units.mlp
    _shrink_linear(m.gate_proj, rows=keep_channels)
    _shrink_linear(m.up_proj, rows=keep_channels)
    _shrink_linear(m.down_proj, cols=keep_channels, weight=down_weight)
    units.channels = len(keep_channels)


# ---------------------------------------------------------------------------------------- record
@dataclass
class BlockStructure:
    """What one block kept, as indices into its dense units, and its dense sizes."""

    kept_groups: list[int]
    kept_channels: list[int]
    dense_groups: int
    dense_channels: int
    n_rep: int
    head_dim: int

    @property
    def heads(self) -> int:
        return len(self.kept_groups) * self.n_rep

    @property
    def kv_heads(self) -> int:
        return len(self.kept_groups)

    @property
    def intermediate_size(self) -> int:
        return len(self.kept_channels)


@dataclass
class Structure:
    """Per-block kept units of a structured-pruned model (what the exporter and the report need)."""

    blocks: list[BlockStructure] = field(default_factory=list)
    pruner: str = ""
    reconstruct: bool = True

    @property
    def uniform(self) -> bool:
        first = self.blocks[0]
        return all(b.kv_heads == first.kv_heads and b.intermediate_size == first.intermediate_size
                   for b in self.blocks)

    def widths(self) -> list[dict[str, int]]:
        return [{"num_attention_heads": b.heads, "num_key_value_heads": b.kv_heads,
                 "intermediate_size": b.intermediate_size} for b in self.blocks]

    def to_json(self) -> dict[str, Any]:
        return {"pruner": self.pruner, "reconstruct": self.reconstruct, "uniform": self.uniform,
                "layers": [dict(w, kept_kv_groups=b.kept_groups, kept_channels=b.kept_channels)
                           for w, b in zip(self.widths(), self.blocks, strict=True)]}


# ---------------------------------------------------------------------------------------- pruning
def block_budgets(blocks: list[BlockInfo], counts: dict[str, int]) -> list[int]:
    """Per-block weights to remove: the per-linear counts (any allocation's) summed per block."""
    known = {n for b in blocks for n in b.linears}
    unknown = sorted(set(counts) - known)
    if unknown:
        raise PruningConfigError(f"counts name layers the model does not have: {unknown[:3]}")
    return [sum(counts.get(n, 0) for n in b.linears) for b in blocks]


def check_structured(model: nn.Module, counts: dict[str, int]) -> list[tuple[int, int]]:
    """Validate a structured budget before any weight is touched; returns (groups, channels) removed per block."""
    blocks = find_blocks(model)
    return [plan_widths(block_units(b), c) for b, c in zip(blocks, block_budgets(blocks, counts), strict=True)]


def gram_hook(store: dict[str, torch.Tensor], key: str):
    def hook(_m: nn.Module, args: tuple, _out: Any) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if key in store:
            store[key].addmm_(x.t(), x)
        else:
            store[key] = x.t() @ x
    return hook


@torch.no_grad()
def input_gram(block: nn.Module, linear: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int = 8
               ) -> torch.Tensor:
    """G = XᵀX of ``linear``'s input while ``block`` runs on ``hidden`` (float32)."""
    store: dict[str, torch.Tensor] = {}
    handle = linear.register_forward_hook(gram_hook(store, "g"))
    try:
        run_block(block, hidden, kwargs, batch_size=batch_size)
    finally:
        handle.remove()
    return store["g"]


def attention_keep(units: BlockUnits, remove: int, pruner: str, gram: torch.Tensor | None,
                   greedy: bool = True) -> torch.Tensor:
    """KV groups kept: by norm (magnitude), greedy output approximation, or single-unit output scores."""
    if pruner == "magnitude":
        return keep_top(group_norm_scores(units), remove)
    assert gram is not None
    cols = [group_columns(units, g) for g in range(units.groups)]
    if greedy:
        return keep_after_removing(units.groups, greedy_removal_order(units.attn.o_proj.weight, gram, cols, remove))
    return keep_top(output_scores(units.attn.o_proj.weight, gram, cols), remove)


def mlp_keep(units: BlockUnits, remove: int, pruner: str, gram: torch.Tensor | None,
             greedy: bool = True) -> torch.Tensor:
    if pruner == "magnitude":
        return keep_top(channel_norm_scores(units), remove)
    assert gram is not None
    if greedy:
        return keep_after_removing(units.channels, greedy_removal_order(units.mlp.down_proj.weight, gram, None, remove))
    return keep_top(channel_output_scores(units.mlp.down_proj.weight, torch.diagonal(gram)), remove)


@torch.no_grad()
def prune_block_structured(
    info: BlockInfo, hidden: torch.Tensor | None, kwargs: dict, pruner: str, widths: tuple[int, int],
    reconstruct_second: bool = True, batch_size: int = 8,
) -> BlockStructure:
    """Remove ``widths`` = (KV groups, channels) from one block in place; returns what it kept."""
    units = block_units(info)
    dense_groups, dense_channels = units.groups, units.channels
    g_remove, c_remove = widths
    data = pruner == "goa"
    keep_g = torch.arange(units.groups)
    if g_remove:
        gram = input_gram(info.module, units.attn.o_proj, hidden, kwargs, batch_size) if data else None
        keep_g = attention_keep(units, g_remove, pruner, gram, greedy=reconstruct_second)
        o_new = None
        if data and reconstruct_second:
            cols = torch.cat([group_columns(units, int(g)) for g in keep_g])
            o_new = reconstruct(units.attn.o_proj.weight, gram, cols)
        shrink_attention(units, keep_g, o_new)
        del gram
    keep_c = torch.arange(units.channels)
    if c_remove:
        # Re-run with the pruned attention: the MLP is ranked and rebuilt on the inputs it will see.
        gram = input_gram(info.module, units.mlp.down_proj, hidden, kwargs, batch_size) if data else None
        keep_c = mlp_keep(units, c_remove, pruner, gram, greedy=reconstruct_second)
        d_new = reconstruct(units.mlp.down_proj.weight, gram, keep_c) if data and reconstruct_second else None
        shrink_mlp(units, keep_c, d_new)
        del gram
    return BlockStructure(kept_groups=[int(g) for g in keep_g], kept_channels=[int(c) for c in keep_c],
                          dense_groups=dense_groups, dense_channels=dense_channels, n_rep=units.n_rep,
                          head_dim=units.head_dim)


@torch.no_grad()
def prune_structured(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    pruner: str,
    counts: dict[str, int],
    nm: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    batch_size: int = 8,
    reconstruct_second: bool = True,
) -> Structure:
    """Structured-prune ``model`` in place, block by block; same call shape as ``prune_model``.

    ``counts`` are per-linear weight counts from any allocation; they are summed per block into
    the block's budget. The returned ``Structure`` is also kept on ``model.evosparse_structure``.
    """
    if nm is not None:
        raise PruningConfigError("structured pruning removes whole heads and channels; it cannot take an N:M pattern")
    if pruner not in STRUCTURED_PRUNERS:
        raise PruningConfigError(f"pattern 'structured' needs pruner {' or '.join(STRUCTURED_PRUNERS)}, got {pruner!r}")
    if getattr(model, "evosparse_structure", None) is not None:
        raise PruningConfigError("this model is already structured-pruned")
    blocks = find_blocks(model)
    plans = check_structured(model, counts)  # every block's plan is valid before anything changes
    structure = Structure(pruner=pruner, reconstruct=reconstruct_second and pruner == "goa")
    hidden, kwargs = None, {}
    if pruner == "goa":
        inputs = capture_block_inputs(model, calib_tokens)
        hidden, kwargs = inputs.hidden, inputs.kwargs
    for info, plan in zip(blocks, plans, strict=True):
        if should_cancel is not None and should_cancel():
            raise CancelledError("job cancelled")
        structure.blocks.append(
            prune_block_structured(info, hidden, kwargs, pruner, plan, reconstruct_second, batch_size))
        if hidden is not None:
            hidden = run_block(info.module, hidden, kwargs, batch_size=batch_size)
        if progress is not None:
            progress(info.index + 1, len(blocks))
    model.evosparse_structure = structure
    return structure


def structured_parameters(model: nn.Module) -> int:
    """Weights of every block linear as the model holds them now."""
    return sum(m.weight.numel() for b in find_blocks(model) for m in b.linears.values())
