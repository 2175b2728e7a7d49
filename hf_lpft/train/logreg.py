"""A linear probe fitted to convergence: multinomial logistic regression on frozen features.

Kumar et al. (ICLR 2022, arXiv 2202.10054, Section 3 and their code) train LP-FT's probe to convergence as
L2-regularised logistic regression on frozen features, with the regularisation strength chosen on held-out
data. This module is that solver, written with torch's L-BFGS (strong-Wolfe line search) in float64 so that
it warm-starts from the global model's head and needs no copy of the features outside torch. It minimises

    mean_i CE(W x_i + b, y_i) + (l2 / 2) ||W||_F^2        (the bias is not penalised),

which is scikit-learn's ``LogisticRegression(C=1 / (n * l2))`` objective with the lbfgs solver (tested).
Not an optimizer step of a training loop: a convex fit with its own stopping rule, so it lives beside
``loop.py`` rather than in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_FRACTION = 0.2


@dataclass
class LogRegFit:
    weight: torch.Tensor
    bias: torch.Tensor
    loss: float
    iterations: int


def objective(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean cross-entropy plus (l2 / 2) ||W||^2."""
    return nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_logreg(x: torch.Tensor, y: torch.Tensor, *, l2: float, init_weight: torch.Tensor, init_bias: torch.Tensor,
               max_iter: int = 1000, tol: float = 1e-10) -> LogRegFit:
    """Minimise :func:`objective` from (``init_weight``, ``init_bias``) with L-BFGS, in float64."""
    x64, y = x.detach().double(), y.detach().long()
    weight = init_weight.detach().double().clone().requires_grad_(True)
    bias = init_bias.detach().double().clone().requires_grad_(True)
    solver = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                               tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = objective(weight, bias, x64, y, l2)
        loss.backward()
        return loss
    solver.step(closure)
    iterations = solver.state[solver.param_groups[0]["params"][0]].get("n_iter", 0)
    with torch.no_grad():
        loss = float(objective(weight, bias, x64, y, l2))
    return LogRegFit(weight.detach(), bias.detach(), loss, int(iterations))


def holdout_split(n: int, *, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (fit, held-out) index split of ``n`` examples; at least one example on each side."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(max(1, round(fraction * n)), n - 1)
    return order[k:], order[:k]


def choose_l2(x: torch.Tensor, y: torch.Tensor, *, grid: tuple[float, ...], init_weight: torch.Tensor,
              init_bias: torch.Tensor, seed: int) -> tuple[float, dict[float, float]]:
    """The L2 strength of ``grid`` with the best held-out accuracy (ties: the stronger one), and all scores."""
    fit_idx, held = holdout_split(len(y), seed=seed)
    scores = {}
    for l2 in grid:
        f = fit_logreg(x[fit_idx], y[fit_idx], l2=l2, init_weight=init_weight, init_bias=init_bias)
        pred = (x[held].double() @ f.weight.T + f.bias).argmax(-1)
        scores[l2] = float((pred == y[held]).double().mean())
    best = max(scores.values())
    return max(l2 for l2, s in scores.items() if s == best), scores
