"""Competition strength: how much of a modality's competition-free concept a multimodal model keeps.

The mono-modal concept of modality m is a model of m trained alone (method ``unimodal``: the same
architecture with the other inputs muted). A ridge regression (α = 120 in the paper code) maps the
multimodal model's fused representation to the concept's representation on a held-out probe
split; on an evaluation split of N samples, with residuals R = Ŷ − Y and B = N·cov(Y) (the unbiased
covariance, as the paper code's ``torch.cov(Y.T) * N``: B = N/(N−1)·Y_cᵀY_c),

    d_m = trace(Rᵀ R B⁺) / rank(B)

a whitened 1 − R²: ≈ 0 when the concept is linearly recoverable from the fused representation,
≈ 1 when it is lost (predicting the mean gives (N−1)/N). The paper divides
by dim(Y); modbal divides by rank(B), which is the same when Y's covariance has full rank and
keeps constant columns (dead ReLU units, the muted modalities' constant features) from diluting
the score.

The maths are pure functions on tensors (:func:`ridge_fit`, :func:`ridge_predict`,
:func:`competition_strength`); :func:`extract_representations` collects representations from a
model over a loader; :func:`competition_scores` puts them together for every modality.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..model import eval_mode, mute_inputs

DEFAULT_ALPHA = 120.0


@dataclass
class RidgeFit:
    """A fitted ridge regression ``Ŷ = X @ weight + bias`` (intercept not penalized)."""

    weight: Tensor  # (D_x, D_y)
    bias: Tensor  # (D_y,)

    def predict(self, x: Tensor) -> Tensor:
        return ridge_predict(self, x)


def _as_2d(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach().to("cpu", torch.float64)
    else:
        t = torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: inputs may be read-only views
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (samples × features), got shape {tuple(t.shape)}")
    return t


def ridge_fit(x: Any, y: Any, alpha: float = DEFAULT_ALPHA) -> RidgeFit:
    """Ridge regression with an unpenalized intercept (as scikit-learn's ``Ridge``).

    Minimizes ``‖Y − X W − 1 bᵀ‖² + α‖W‖²`` by centring X and Y and solving
    ``(X_cᵀ X_c + α I) W = X_cᵀ Y_c``; ``b = ȳ − x̄ W``. Computed in float64.

    Args:
        x (array, N × D_x): inputs. y (array, N × D_y or N): targets.
        alpha (float): penalty on W (default: 120, the paper code's value). ``alpha=0`` is least
            squares (solved with a pseudo-inverse when X_cᵀ X_c is singular).

    >>> fit = ridge_fit(torch.randn(100, 5), torch.randn(100, 3), alpha=1.0)
    >>> fit.weight.shape, fit.bias.shape
    (torch.Size([5, 3]), torch.Size([3]))
    """
    if not alpha >= 0:
        raise ValueError(f"Invalid alpha: {alpha} (must be >= 0)")
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError(f"ridge_fit needs at least 2 samples, got {x.shape[0]}")
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    rhs = xc.T @ yc
    if alpha > 0:
        weight = torch.linalg.solve(gram, rhs)
    else:
        weight = torch.linalg.pinv(gram, hermitian=True) @ rhs
    return RidgeFit(weight, y_mean - x_mean @ weight)


def ridge_predict(fit: RidgeFit, x: Any) -> Tensor:
    """The fitted probe applied to ``x`` (N × D_x, the features it was fit on): N × D_y, float64."""
    x = _as_2d(x, "x")
    if x.shape[1] != fit.weight.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features, the fit expects {fit.weight.shape[0]}")
    return x @ fit.weight + fit.bias


def _whitening(y: Tensor, rtol: float) -> tuple[Tensor, int]:
    """B⁺ for B = N·cov(Y) = N/(N−1)·Y_cᵀ Y_c (unbiased covariance) and its rank, from one
    eigendecomposition."""
    n = y.shape[0]
    yc = y - y.mean(0)
    b = yc.T @ yc * (n / (n - 1))
    eigvals, eigvecs = torch.linalg.eigh(b)
    top = float(eigvals.max()) if eigvals.numel() else 0.0
    keep = eigvals > rtol * top if top > 0 else torch.zeros_like(eigvals, dtype=torch.bool)
    rank = int(keep.sum())
    inv = torch.where(keep, 1.0 / torch.where(keep, eigvals, torch.ones_like(eigvals)), torch.zeros_like(eigvals))
    return (eigvecs * inv) @ eigvecs.T, rank


def competition_strength(pred: Any, target: Any, rtol: float = 1e-10) -> float:
    """d = trace(Rᵀ R B⁺) / rank(B) with R = Ŷ − Y and B = N·cov(Y) (unbiased covariance, as the
    paper code) on the evaluation split.

    Args:
        pred (array, N × D): the probe's predictions Ŷ. target (array, N × D): the concept Y.
        rtol (float): eigenvalues of B below ``rtol`` × the largest count as zero (default: 1e-10).

    Returns:
        0 for a perfect prediction; (N−1)/N when Ŷ is the evaluation mean of Y; more when worse.
        NaN when Y is constant (rank 0: nothing to recover).
    """
    pred, target = _as_2d(pred, "pred"), _as_2d(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if target.shape[0] < 2:
        raise ValueError(f"competition_strength needs at least 2 evaluation samples, got {target.shape[0]}")
    b_pinv, rank = _whitening(target, rtol)
    if rank == 0:
        return float("nan")
    r = pred - target
    return float(torch.trace(r.T @ r @ b_pinv)) / rank


def probe_competition(fused_probe: Any, concept_probe: Any, fused_eval: Any, concept_eval: Any,
                      alpha: float = DEFAULT_ALPHA) -> float:
    """Fit the ridge probe on the probe split and score it on the evaluation split."""
    fit = ridge_fit(fused_probe, concept_probe, alpha)
    return competition_strength(ridge_predict(fit, fused_eval), concept_eval)


# -- representations from models -------------------------------------------------------------
def _to_device(inputs: Mapping[str, Tensor], device: torch.device | str | None) -> dict[str, Tensor]:
    return {m: x.to(device) if device is not None else x for m, x in inputs.items()}


@torch.no_grad()
def extract_representations(
    model: nn.Module, loader: Iterable, keep: Iterable[str] | None = None,
    device: torch.device | str | None = None,
    represent: Callable[[nn.Module, Mapping[str, Tensor]], Tensor] | None = None,
) -> Tensor:
    """``model.represent(inputs)`` over a loader of ``(inputs, label)`` batches, in eval mode.

    Args:
        model: a :class:`~modbal.MultimodalModel` (or anything with ``represent``).
        loader: yields ``({modality: tensor}, labels)``; not shuffled, so rows align across models.
        keep: modalities left as they are; the others are zeroed (``None``: keep all). The
            concept of m is read with ``keep=[m]``, as it was trained.
        device: where to run the model. represent: override of ``lambda model, x: model.represent(x)``.

    Returns:
        float64 tensor (N × D) on the CPU, flattened after the batch axis.
    """
    rows = []
    with eval_mode(model):
        for inputs, _ in loader:
            if keep is not None:
                inputs = mute_inputs(inputs, keep)
            inputs = _to_device(inputs, device)
            rep = represent(model, inputs) if represent is not None else model.represent(inputs)
            rows.append(rep.detach().flatten(1).to("cpu", torch.float64))
    if not rows:
        raise ValueError("the loader yielded no batches")
    return torch.cat(rows)


def competition_scores(
    model: nn.Module, concepts: Mapping[str, nn.Module], probe_loader: Iterable, eval_loader: Iterable,
    alpha: float = DEFAULT_ALPHA, device: torch.device | str | None = None,
) -> dict[str, float]:
    """d_m for each modality m of ``concepts`` (``{m: uni-modal concept model}``).

    The multimodal model's fused representation (all inputs) is the regressor; each concept's
    representation on inputs where only m is kept is the target. Probe fit on ``probe_loader``,
    score on ``eval_loader``; both must iterate in a fixed order.
    """
    return competition_scores_per_set(model, [concepts], probe_loader, eval_loader, alpha, device)[0]


def competition_scores_per_set(
    model: nn.Module, concept_sets: Sequence[Mapping[str, nn.Module]], probe_loader: Iterable,
    eval_loader: Iterable, alpha: float = DEFAULT_ALPHA, device: torch.device | str | None = None,
) -> list[dict[str, float]]:
    """:func:`competition_scores` for several sets of concepts (e.g. one per concept seed), with the
    fused representation extracted once."""
    fused_probe = extract_representations(model, probe_loader, device=device)
    fused_eval = extract_representations(model, eval_loader, device=device)
    results = []
    for concepts in concept_sets:
        scores = {}
        for m, concept in concepts.items():
            target_probe = extract_representations(concept, probe_loader, keep=[m], device=device)
            target_eval = extract_representations(concept, eval_loader, keep=[m], device=device)
            scores[m] = probe_competition(fused_probe, target_probe, fused_eval, target_eval, alpha)
        results.append(scores)
    return results
