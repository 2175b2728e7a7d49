"""Weight averaging of models with the same architecture: a pure function on state dicts.

Model soups (Wortsman et al. 2022, arXiv 2203.05482) and Local Superior Soups (Chen et al. 2024,
arXiv 2410.23660) both end in a weighted average of parameters. It lives here, below ``strategies``,
so strategies can use it without importing ``federated`` (which sits above them in the layer order).
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
    total = sum(weights)
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.detach().clone()
            continue
        acc = sum(w * s[key].detach().double() for s, w in zip(states, weights) if w > 0)
        out[key] = (acc / total).to(first.dtype)
    return out


@torch.no_grad()
def load_average(model: torch.nn.Module, states: Sequence[dict], weights: Sequence[float] | None = None) -> torch.nn.Module:
    """Load the average of ``states`` into ``model`` (in place) and return it."""
    model.load_state_dict(average_state_dicts(states, weights))
    return model
