"""Weight averaging of models with the same architecture: pure functions on state dicts.

FedAvg (McMahan et al. 2017; the general-FL step of arXiv 2511.12695 that every PFT method starts from), model
soups (Wortsman et al. 2022, arXiv 2203.05482) and Local Superior Soups (Chen et al. 2024, arXiv 2410.23660)
all end in a weighted average of parameters; this is its one implementation. Floating-point tensors are
summed as weighted float64 sums (``accumulate``) and divided once (``finish``), so memory does not grow with
the number of models and FedAvg can all-reduce the sums across processes; other tensors (e.g. BatchNorm's
``num_batches_tracked``) come from the first model, because an average of counters means nothing. It lives
here, below ``strategies`` and ``federated``, so both use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check(states: Sequence[dict], weights: Sequence[float]) -> None:
    if not states:
        raise ValueError("need at least one state dict to average; got none")
    if len(weights) != len(states):
        raise ValueError(f"need one weight per state dict; got {len(states)} states, {len(weights)} weights")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights={list(weights)!r} must be >= 0 with a positive sum")
    keys = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            raise ValueError(f"state dict {i} has different keys from state dict 0: "
                             f"{sorted(set(state) ^ keys)[:5]}")


def accumulate(acc: dict | None, state: dict, weight: float) -> dict:
    """Add ``weight * state`` to the running float64 sums ``acc`` (None to start); keep the first non-float tensor."""
    if acc is None:
        return {k: v.detach().double() * weight if v.is_floating_point() else v.detach().clone()
                for k, v in state.items()}
    for k, v in state.items():
        if v.is_floating_point():
            acc[k] += v.detach().double() * weight
    return acc


def finish(acc: dict, total_weight: float, like: dict) -> dict:
    """Divide the sums by the total weight and cast back to the dtypes of ``like``."""
    return {k: (v / total_weight).to(like[k].dtype) if like[k].is_floating_point() else v
            for k, v in acc.items()}


def average_state_dicts(states: Sequence[dict], weights: Sequence[float] | None = None) -> dict:
    """Weighted average of state dicts (uniform when ``weights`` is None).

    Floating-point tensors (weights, biases, BatchNorm running statistics) are averaged in float64 and
    cast back to their dtype, so averaging identical tensors returns them bit for bit. Other tensors
    (e.g. BatchNorm's integer ``num_batches_tracked``) come from the first state dict: an average of
    counters means nothing.

    Raises:
        ValueError: if there are no states, the weights do not match them or are not a valid
            (non-negative, positive-sum) weighting, or the state dicts have different keys.
    """
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    _check(states, weights)
    acc = None
    for state, weight in zip(states, weights):
        if weight > 0:
            acc = accumulate(acc, state, weight)
    averaged = finish(acc, sum(weights), states[0])
    return {k: v if states[0][k].is_floating_point() else states[0][k].detach().clone() for k, v in averaged.items()}


@torch.no_grad()
def load_average(model: torch.nn.Module, states: Sequence[dict],
                 weights: Sequence[float] | None = None) -> torch.nn.Module:
    """Load the average of ``states`` into ``model`` (in place) and return it."""
    model.load_state_dict(average_state_dicts(states, weights))
    return model
