"""Closed-form compensation (``--compensate``): refit each pruned block's output projection, no training.

After a plan removes input columns K̄ of o_proj (query-head dimensions) or down_proj (MLP channels), the
block's output on the calibration tokens, Y = X Wᵀ, is best reproduced from the kept columns K by

    W'_K = argmin ‖X_K W'_Kᵀ − X Wᵀ‖² + Σ_{i∈K} λ_i ‖W'_i − W_i‖²  =  (W G[:, K] + W_K Λ) (G[K, K] + Λ)⁻¹,

with G = XᵀX the Gram matrix of the projection's unpruned input summed over the calibration documents
(:mod:`cusprun.scores.stats`, written by ``score --stats``) and Λ = diag(λ_i). With ``per-input`` each kept
input's λ_i = ``ridge`` × G[i, i], its own energy on the calibration tokens: the ridge of the inputs scaled
to unit energy, so rescaling an input (and its column inversely) leaves the refit block output unchanged,
and a quiet channel is held no tighter, relative to what it contributes, than a loud one. ``mean`` (the rule
before) gives every input λ = ``ridge`` × the mean of diag(G[K, K]). ``auto`` (the default) takes per-input
where the statistics hold at least :data:`MIN_TOKENS_PER_INPUT` tokens per input of the widest refit
projection and mean below: per input trusts each input's own energy, which few tokens estimate poorly.
Measured on SmolLM2 (docs/experts.md, "Closed-form compensation"): with 4 and more tokens per input, per input had
the lower target perplexity in all 9 cells (2-8%); with 0.8 and 2.1 it was worse on target and general.

The ridge pulls the kept columns toward their original weights, not toward zero: λ → ∞ leaves the
uncompensated expert, λ → 0 the plain least-squares fit to a few thousand calibration tokens. Measured on
SmolLM2 (docs/experts.md, "Closed-form compensation"), the anchored ridge beats the zero-anchored one on target and
on general perplexity in every expert and ratio: a fit that may only move the weights as far as the
calibration tokens justify keeps what those tokens never exercised. Solved in float64 per layer; only the
kept columns change, so the compensated model's dense, sliced, stock and masked forms still agree exactly.
Llama, Mistral and Qwen2 have no bias on o_proj and down_proj, so there is no bias to refit. Adding one (a
FLAP-style mean correction, fitted jointly with the kept columns) was measured on SmolLM2 and gained nothing:
the kept inputs already reproduce nearly all of the removed ones' mean (docs/expert-quality.md, "What the numbers say").
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy

import torch

from ..core.neurons import tensor_name
from ..scores.stats import STAT_PROJECTIONS, gram_name

DEFAULT_RIDGE = 0.1
# λ_i = ridge · G[i, i], or one λ = ridge · mean(diag G[K, K]); auto: per-input on statistics of enough tokens
RIDGE_SCALES = ("auto", "per-input", "mean")
DEFAULT_RIDGE_SCALE = "auto"
# Calibration tokens per input of the widest refit projection below which build_expert says so. Measured on
# SmolLM2 (docs/experts.md, "Calibration size"): 3,200 tokens for down_proj's 1,536 inputs (2 per input) gave a clearly
# worse German expert than 12,800 (8 per input), on target and on general text alike.
MIN_TOKENS_PER_INPUT = 4


def refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float = DEFAULT_RIDGE,
          scale: str = "per-input") -> torch.Tensor:
    """weight [out, n], gram [n, n], keep bool [n] -> the refit weight [out, n] (float64): kept columns solved
    for, removed columns as they were (the plan zeroes them). ``scale``: ``per-input`` or ``mean`` (``auto`` is
    resolved by :func:`resolved_ridge_scale`, which needs the token count)."""
    kept = keep.to(weight.device).nonzero().flatten()
    g_k = gram.to(weight.device)[kept].double()  # [K, n]: rows sliced before widening, one float64 copy
    w = weight.to(torch.float64, copy=True)  # the refit weight, which refit_from_moments writes
    xy_k = g_k @ w.T  # [K, out] = G[K, :] Wᵀ
    g_kk = g_k[:, kept]
    del g_k
    return refit_from_moments(w, g_kk, xy_k, keep, ridge, scale)


def ridges(diagonal: torch.Tensor, ridge: float, scale: str) -> torch.Tensor:
    """diag(G[K, K]) [K] (float64) -> the kept inputs' λ [K]: ``ridge`` times each one's energy (``per-input``,
    floored at 1e-12 of the mean, so an input silent on every calibration token keeps its weights and the
    solve stays nonsingular) or their mean energy (``mean``)."""
    if scale not in RIDGE_SCALES[1:]:
        raise ValueError(f"ridge scale {scale!r}: expected one of {', '.join(RIDGE_SCALES[1:])}")
    mean = diagonal.mean().clamp_min(torch.finfo(torch.float64).tiny)
    return ridge * (diagonal.clamp_min(1e-12 * mean) if scale == "per-input" else mean.expand(len(diagonal)))


def refit_from_moments(weight: torch.Tensor, g_kk: torch.Tensor, xy_k: torch.Tensor, keep: torch.Tensor,
                       ridge: float = DEFAULT_RIDGE, scale: str = "per-input") -> torch.Tensor:
    """:func:`refit` from the kept inputs' moments alone, written into ``weight`` in place: ``g_kk`` = X_Kᵀ X_K
    [K, K] and ``xy_k`` = X_Kᵀ Y [K, out] (float64; Y = X Wᵀ the projection's output without bias, so ``xy_k``
    is G[K, :] Wᵀ), both consumed (the solve runs in their memory: a Cholesky factorization in place, as
    G[K, K] + Λ is positive definite). weight [out, n] (any dtype) -> ``weight``, its kept columns replaced by
    the float64 solution rounded once to its dtype, the others untouched.

    Needs K² + K·out floats where :func:`refit` needs n², and no float64 copy of the weight: the ridge term
    and the solution pass through it :data:`_ROWS` outputs at a time. Llama-3-70B's down_proj at 25%:
    5.1 GB, where a float64 copy of the weight and of the solution would add 3.3 GB to one layer's refit."""
    kept = keep.to(weight.device).nonzero().flatten()
    lam = ridges(g_kk.diagonal(), ridge, scale)
    for rows in _row_blocks(weight.shape[0]):  # xy_k += Λ W_Kᵀ: [K, out] = G[K, :] Wᵀ + Λ W_Kᵀ
        xy_k[:, rows].add_(weight[rows][:, kept].T.double().mul_(lam[:, None]))
    g_kk.diagonal().add_(lam)
    info = torch.empty((), dtype=torch.int32, device=g_kk.device)
    torch.linalg.cholesky_ex(g_kk, out=(g_kk, info))
    if info.item() != 0:
        raise ValueError("the refit's Gram matrix plus its ridge is not positive definite (statistics not finite?)")
    for rows in _row_blocks(weight.shape[0]):
        weight[rows.start:rows.stop, kept] = torch.cholesky_solve(xy_k[:, rows], g_kk).T.to(weight.dtype)
    return weight


# Outputs per block of refit_from_moments' passes over the weight: a [K, 1024] float64 block is 176 MB for
# Llama-3-70B's down_proj (K = 21,504 at 25%), small beside G[K, K]'s 3.7 GB, and 1024 columns keep the
# triangular solves on matrix-matrix kernels.
_ROWS = 1024


def _row_blocks(n: int) -> list[slice]:
    return [slice(start, min(start + _ROWS, n)) for start in range(0, n, _ROWS)]


def compensate(model, plan, grams: Mapping[str, torch.Tensor], ridge: float = DEFAULT_RIDGE,
               scale: str = DEFAULT_RIDGE_SCALE, tokens: int = 0, copy: bool = True):
    """A copy of ``model`` (``model`` itself with ``copy`` False) whose o_proj and down_proj are refit over
    the columns ``plan`` (a :class:`~cusprun.selection.algorithm.Selection` or keep masks) keeps; layers and
    projections that lose no column, or every column, are left as they are. ``ridge``: as in :func:`refit`;
    ``scale``: one of :data:`RIDGE_SCALES`, ``auto`` resolved from ``tokens``, the calibration tokens the
    ``grams`` sum over (:func:`resolved_ridge_scale`)."""
    plan = getattr(plan, "plan", plan)
    scale = resolved_ridge_scale(scale, tokens, refit_widths(plan, len(model.model.layers)))
    out = deepcopy(model) if copy else model
    with torch.no_grad():
        for index, proj, keep in _refit_targets(plan, len(out.model.layers)):
            linear = out.model.layers[index].get_submodule(proj)
            fitted = refit(linear.weight, grams[gram_name(index, proj)], keep, ridge, scale)
            linear.weight.copy_(fitted.to(linear.weight.dtype))
    return out


def _refit_targets(plan, layers: int):
    """(layer, projection, keep mask) of every output projection the refit changes: some but not all of its
    columns kept."""
    for index in range(layers):
        for proj in STAT_PROJECTIONS:
            keep = plan[tensor_name(index, proj, "cols")]
            if keep.any() and not keep.all():
                yield index, proj, keep


def refit_widths(plan, layers: int) -> dict[str, int]:
    """{projection: inputs} of the projections the refit changes in some layer, e.g. {"down_proj": 1536}."""
    plan = getattr(plan, "plan", plan)
    return {proj.rsplit(".", 1)[-1]: len(keep) for _, proj, keep in _refit_targets(plan, layers)}


def resolved_ridge_scale(scale: str, tokens: int, inputs: dict[str, int]) -> str:
    """``scale`` itself, or for ``auto``: ``per-input`` when ``tokens`` calibration tokens are at least
    :data:`MIN_TOKENS_PER_INPUT` per input of the widest refit projection (``inputs``: :func:`refit_widths`),
    ``mean`` when they are fewer or unknown (0)."""
    if scale not in RIDGE_SCALES:
        raise ValueError(f"ridge scale {scale!r}: expected one of {', '.join(RIDGE_SCALES)}")
    if scale != "auto":
        return scale
    widest = max(inputs.values(), default=0)
    return "per-input" if tokens and tokens >= MIN_TOKENS_PER_INPUT * widest else "mean"


def thin_statistics_note(tokens: int, inputs: dict[str, int]) -> str | None:
    """A one-line note when ``tokens`` calibration tokens (all corpora's, the Gram matrices' sum) are fewer than
    :data:`MIN_TOKENS_PER_INPUT` per input of the widest refit projection (``inputs``: :func:`refit_widths`);
    None otherwise, and where nothing is refit or the token count is unknown (0). The refit then fits few
    tokens per weight: it still runs (the ridge keeps it determined), but more documents, or longer ones, made
    better experts."""
    if not inputs or not tokens:
        return None
    name, width = max(inputs.items(), key=lambda item: item[1])
    if tokens >= MIN_TOKENS_PER_INPUT * width:
        return None
    return (f"warning: the compensation statistics hold {tokens} calibration tokens for {name}'s {width} inputs "
            f"({tokens / width:.1f} per input, fewer than {MIN_TOKENS_PER_INPUT}): the refit is better with more or "
            "longer documents (docs/experts.md, \"Calibration size\")")
