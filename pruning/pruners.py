"""The four pruners as plain functions on one weight matrix ([out, in], as ``weight_matrix`` gives it).

Every pruner removes an exact number of weights (``count``) from a layer:

- Score-based pruners (magnitude, Wanda, DaSS) rank scores inside comparison groups. Wanda and
  magnitude compare within each output row (``dim=1``); DaSS compares gate/up weights across
  intermediate channels within each input column (``dim=0``). An unstructured count is spread
  over the groups exactly: each gets ``count // groups``, the first ``count % groups`` one more.
- With an N:M pattern, ``nm=(N, M)``: in every run of M consecutive weights along ``dim`` the
  M - N lowest scores are pruned (at most N non-zeros per group); ``count == 0`` keeps the layer dense.
- SparseGPT reconstructs the remaining weights with the OBS update (see ``sparsegpt_prune``).

Scores are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.quantize import QuantConfig, QuantizedWeight, group_params, quantize_codes
from evosparse.search.allocation import split_proportional

PRUNER_NAMES = ("magnitude", "wanda", "sparsegpt", "dass")
INPUT_PRUNERS = ("wanda", "sparsegpt", "dass")  # those that read calibration inputs (activations)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂, with ``input_sq_norms[j]`` = Σ over calibration tokens of x_j²."""
    # Statistics may sit on the device while an offloaded block's weight is in host memory.
    return weight.detach().float().abs() * input_sq_norms.to(weight.device).float().clamp_min(0).sqrt().unsqueeze(0)


def dass_scores(weight: torch.Tensor, channel_sq_norms: torch.Tensor) -> torch.Tensor:
    """DaSS score of a gate/up weight [intermediate, d]: |W_ij| · ‖A_i‖₂^½.

    ``channel_sq_norms[i]`` = Σ over tokens of A_i², A being the down projection's input, so
    ‖A_i‖^½ = (Σ A_i²)^¼. Compare these scores along dim 0 (across channels in one input column).
    """
    return weight.detach().float().abs() * channel_sq_norms.to(weight.device).float().clamp_min(0).pow(0.25).unsqueeze(1)


def spread_counts(count: int, groups: int) -> torch.Tensor:
    """``count`` split over ``groups``: ``count // groups`` each, the first ``count % groups`` one more."""
    base, extra = divmod(count, groups)
    k = torch.full((groups,), base, dtype=torch.long)
    k[:extra] += 1
    return k


def _check_nm(size: int, nm: tuple[int, int], what: str) -> None:
    n, m = nm
    if not 0 < n < m:
        raise PruningConfigError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    if size % m:
        raise PruningConfigError(f"N:M pattern {n}:{m} needs {what} divisible by {m}, got {size}")


def keep_mask_from_scores(
    scores: torch.Tensor, count: int, nm: tuple[int, int] | None = None, dim: int = 1
) -> torch.Tensor:
    """Boolean keep mask (True = keep) that prunes the lowest scores.

    ``dim`` is the axis scores are compared along: 1 = within each row, 0 = within each column.
    Unstructured: exactly ``count`` weights pruned, spread evenly over the groups.
    N:M: the M - N lowest of every M consecutive entries along ``dim`` (``count`` 0 = dense).
    """
    if scores.dim() != 2 or dim not in (0, 1):
        raise ValueError("scores must be 2-D and dim 0 or 1")
    s = scores if dim == 1 else scores.t()  # rows = comparison groups
    rows, cols = s.shape
    if count < 0 or count > s.numel():
        raise PruningConfigError(f"cannot prune {count} of {s.numel()} weights")
    keep = torch.ones_like(s, dtype=torch.bool)
    if count == 0:
        return keep if dim == 1 else keep.t()
    if nm is not None:
        n, m = nm
        _check_nm(cols, nm, "the compared dimension")
        grouped = s.reshape(rows, cols // m, m)
        idx = torch.topk(grouped, m - n, dim=2, largest=False).indices
        keep = keep.reshape(rows, cols // m, m).scatter(2, idx, False).reshape(rows, cols)
    else:
        k = spread_counts(count, rows).to(s.device)
        order = torch.argsort(s, dim=1, stable=True)
        prune_sorted = torch.arange(cols, device=s.device).unsqueeze(0) < k.unsqueeze(1)
        keep = keep.scatter(1, order, ~prune_sorted)
    return keep if dim == 1 else keep.t()


@torch.no_grad()
def apply_mask(weight: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero the pruned entries of ``weight`` in place."""
    weight.mul_(keep.to(weight.dtype))


def nm_count(shape: tuple[int, int], nm: tuple[int, int]) -> int:
    """Number of weights an N:M pattern prunes in a matrix of this shape."""
    return shape[0] * shape[1] * (nm[1] - nm[0]) // nm[1]


def _inverse_hessian_chol(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after dampening; more dampening if H is still not positive definite."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # inputs that are always zero: any weight works, keep H invertible
    damp = percdamp * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for attempt in range(6):
        try:
            chol = torch.linalg.cholesky(h + damp * (10**attempt) * eye)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise PruningConfigError("SparseGPT: layer Hessian is not positive definite even after dampening")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    count: int,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): prune ``count`` weights, updating the rest to reconstruct W·X.

    ``hessian`` is H = 2XXᵀ / N (any positive scale works: dampening is relative to its mean
    diagonal). Columns are processed in blocks of ``blocksize`` with lazy batch updates. The mask
    of each block is chosen adaptively from w² / [H⁻¹]ᵢᵢ² over the whole block (all rows together),
    and the layer's ``count`` is split over the blocks by width, so the layer loses exactly
    ``count`` weights. With ``nm`` the M - N lowest of each M consecutive columns are pruned per row.
    Returns a new float32 tensor of the same shape; the input is left unchanged.
    """
    if count < 0 or count > weight.numel():
        raise PruningConfigError(f"cannot prune {count} of {weight.numel()} weights")
    if count == 0:  # nothing to prune: skip the Hessian inverse
        return weight.detach().float().clone(memory_format=torch.contiguous_format)
    return obs_prune_quantize(weight, hessian, count, nm, blocksize=blocksize, percdamp=percdamp)[0]


def _block_width(blocksize: int, unit: int) -> int:
    """A block width that is a multiple of ``unit`` (the N:M group and/or the quantization group)."""
    return max(unit, blocksize - blocksize % unit)


@torch.no_grad()
def _obs_columns(
    w: torch.Tensor,
    hinv: torch.Tensor,
    blocksize: int,
    group_counts: list[int] | None = None,
    nm: tuple[int, int] | None = None,
    pruned: torch.Tensor | None = None,
    quant: QuantConfig | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight | None:
    """The OBS column loop (blocks of ``blocksize`` columns, lazy batch updates), in place on the
    float32 ``w``; the one loop of ``obs_prune_quantize`` and ``sparsegpt_levels``.

    ``hinv`` is the upper Cholesky factor of H⁻¹. The OBS update of a row depends only on that row
    and on H⁻¹, so ``w`` may stack several matrices as equal row groups, one per entry of
    ``group_counts``: a group loses its count, split over the blocks by width, with each block's
    mask chosen from w² / [H⁻¹]ᵢᵢ² over the group's rows of the block. ``nm``: instead, the
    M - N lowest of each M consecutive columns are pruned per row as the loop reaches them.
    ``pruned``: a fixed mask (True = pruned) that the choices add to. ``quant``: kept weights are
    rounded onto their group's grid as their column is reached; returns the codes (else None).
    """
    rows, cols = w.shape
    group_rows = rows // len(group_counts) if group_counts else rows
    starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - s) for s in starts]
    # per_group[g][b]: how many weights row group g loses in column block b.
    per_group = [split_proportional(c, [group_rows * wd for wd in widths]) for c in group_counts or []]
    codes = torch.zeros((rows, cols), dtype=torch.float32, device=w.device) if quant is not None else None
    n_groups = cols // quant.group_size if quant is not None else 0
    scales = torch.ones((rows, n_groups), device=w.device)
    zeros = torch.zeros((rows, n_groups), device=w.device) if quant is not None and not quant.symmetric else None
    for b, (i1, width) in enumerate(zip(starts, widths, strict=True)):
        i2 = i1 + width
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv1)
        prune1 = pruned[:, i1:i2].clone() if pruned is not None else torch.zeros_like(w1, dtype=torch.bool)
        if nm is None and any(counts[b] > 0 for counts in per_group):
            score = w1**2 / diag.unsqueeze(0) ** 2
            for g, counts in enumerate(per_group):
                if counts[b] > 0:
                    lo, hi = g * group_rows, (g + 1) * group_rows
                    idx = torch.topk(score[lo:hi].flatten(), counts[b], largest=False).indices
                    prune1[lo:hi].view(-1)[idx] = True
        for i in range(width):
            col = w1[:, i]
            d = hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                score = w1[:, i : i + m] ** 2 / diag[i : i + m].unsqueeze(0) ** 2
                idx = torch.topk(score, m - nm[0], dim=1, largest=False).indices
                prune1.scatter_(1, i + idx, True)
            q = col.clone()
            q[prune1[:, i]] = 0
            if quant is not None:
                g = (i1 + i) // quant.group_size
                if (i1 + i) % quant.group_size == 0:
                    # Scales from the group's current (error-corrected) kept weights; later
                    # N:M choices inside the group are not known yet, so those weights count too.
                    grp = w1[:, i : i + quant.group_size] * ~prune1[:, i : i + quant.group_size]
                    scale, zero = group_params(grp, quant, scale_dtype)
                    scales[:, g] = scale
                    if zeros is not None:
                        zeros[:, g] = zero
                c = quantize_codes(q.unsqueeze(1), scale, zero, quant).squeeze(1)
                if zero is not None:
                    c = torch.where(prune1[:, i], zero, c)
                else:
                    c = torch.where(prune1[:, i], torch.zeros_like(c), c)
                codes[:, i1 + i] = c  # type: ignore[index]
                q = (c - (zero if zero is not None else 0.0)) * scale
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    if quant is None:
        return None
    return QuantizedWeight(
        q=codes.to(torch.int8),  # type: ignore[union-attr]
        scale=scales,
        zero=zeros.to(torch.int8) if zeros is not None else None,
        config=quant,
    )


@torch.no_grad()
def obs_prune_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    count: int,
    nm: tuple[int, int] | None = None,
    quant: QuantConfig | None = None,
    keep: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, QuantizedWeight | None]:
    """The OBS column loop shared by SparseGPT and GPTQ: prune and/or quantize with error feedback.

    - ``keep`` None: the mask is chosen here (SparseGPT, ``count`` / ``nm`` as in ``sparsegpt_prune``).
    - ``keep`` given: the mask is fixed (a Wanda/magnitude/DaSS mask) and ``count``/``nm`` are ignored;
      only the quantization error (and the pruned weights' error) is fed back.
    - ``quant``: every kept weight is rounded onto its group's grid as its column is reached
      (GPTQ, Frantar et al. 2023), group scales chosen from the group's current, already
      error-corrected weights when the loop enters the group. Pruned weights become exactly 0.

    Joint prune-and-quantize is the SparseGPT paper's recipe (50 % + 4 bit). Returns the float32
    weights (dequantized when quantizing) and the integer codes (None without ``quant``).
    """
    # On the Hessian's device: with offloaded blocks (pruning/offload.py) the weight is in host memory.
    w = weight.detach().to(hessian.device).float().clone(memory_format=torch.contiguous_format)  # Conv1D: transposed
    keep = keep.to(hessian.device) if keep is not None else None
    rows, cols = w.shape
    if keep is None and (count < 0 or count > w.numel()):
        raise PruningConfigError(f"cannot prune {count} of {w.numel()} weights")
    unit = 1
    if keep is None and nm is not None:
        _check_nm(cols, nm, "in_features")
        unit = nm[1]
    if quant is not None:
        quant.check_in_features("weight", cols)
        unit = math.lcm(unit, quant.group_size)
    blocksize = _block_width(blocksize, unit)
    hinv = _inverse_hessian_chol(hessian, percdamp)
    if keep is not None:
        pruned = ~keep.to(w.device, torch.bool)
        qw = _obs_columns(w, hinv, blocksize, pruned=pruned, quant=quant, scale_dtype=scale_dtype)
    elif nm is not None and count > 0:
        qw = _obs_columns(w, hinv, blocksize, nm=nm, quant=quant, scale_dtype=scale_dtype)
    else:
        qw = _obs_columns(w, hinv, blocksize, group_counts=[count], quant=quant, scale_dtype=scale_dtype)
    return w, qw


@torch.no_grad()
def sparsegpt_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    counts: list[int],
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SparseGPT at several counts of one layer in one pass; also returns diag of the H⁻¹ factor.

    The OBS update of a row depends only on that row and on H⁻¹, so the levels are stacked as
    rows of one [levels × out, in] matrix: H is factorised once and every column block is
    processed once for all of them (one Python loop, larger kernels). Each level picks its own
    mask per block from its own rows, with the layer's count split over the blocks as in
    ``sparsegpt_prune``, so level i equals ``sparsegpt_prune(weight, hessian, counts[i])`` up to
    float rounding (the kernels see other shapes). Unstructured only. The diagonal (per input
    column) is what a saliency w² / d² of a level's weights is measured with.
    """
    w0 = weight.detach().float()
    rows = w0.shape[0]
    for c in counts:
        if c < 0 or c > w0.numel():
            raise PruningConfigError(f"cannot prune {c} of {w0.numel()} weights")
    hinv = _inverse_hessian_chol(hessian, percdamp)
    w = w0.repeat(len(counts), 1)  # level i owns rows [i * rows, (i + 1) * rows)
    _obs_columns(w, hinv, blocksize, group_counts=counts)
    levels = [w0.clone() if c == 0 else w[i * rows : (i + 1) * rows].clone() for i, c in enumerate(counts)]
    return levels, torch.diag(hinv).clone()
