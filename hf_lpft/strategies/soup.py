"""Soup FT: several full fine-tuning runs from the global model, weight-averaged (model soups).

Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695 (Table 2, "Soup FT"); Wortsman et al., "Model soups: averaging weights of multiple
fine-tuned models improves accuracy without increasing inference time", ICML 2022, arXiv 2203.05482.

Every ingredient starts from the same global model θ_G and differs only in its data order:
``personalize`` derives one seed per (ingredient, phase). Starting all ingredients from one point is
what makes their average meaningful (they stay in one linearly connected basin).

Compute: the shared epoch budget applies to *each* ingredient (each is a full FT run of
``pft.epochs`` epochs), so Soup FT costs ``ingredients`` times FT. The paper does not state its
number of ingredients; the default is 3: averaging k runs shrinks the variance due to data order roughly as 1/k,
most of the gain comes from the first few ingredients, and 3 keeps the cost at three FT runs a client.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_lpft.config import ConfigError
from hf_lpft.strategies.base import Strategy, StrategyConfig, check_bn, register_strategy
from hf_lpft.train.averaging import load_average
from hf_lpft.train.loop import accuracy, derive_seed
from hf_lpft.train.phase import Phase

logger = logging.getLogger(__name__)


@dataclass
class SoupConfig(StrategyConfig):
    ingredients: int = field(default=3, metadata={"help": (
        "Number of FT runs (ingredients) averaged; each costs one full FT budget.")})
    greedy: bool = field(default=False, metadata={"help": (
        "Greedy soup (Wortsman et al. Recipe 1): add ingredients best-first while held-out accuracy does not fall. "
        "False = uniform soup.")})
    holdout_fraction: float = field(default=0.2, metadata={"help": (
        "Greedy soup only: share of the client's train split used to rank and select ingredients.")})
    bn: str = field(default="train", metadata={"help": (
        "BatchNorm statistics while fine-tuning each ingredient: train or frozen.")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ingredients < 1:
            raise ConfigError(f"soup_ft.ingredients={self.ingredients!r} must be >= 1")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"soup_ft.holdout_fraction={self.holdout_fraction!r} must be in (0, 1)")
        check_bn("soup_ft.bn", self.bn)


def holdout_split(data, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random share of the client's train split (at least one example), seeded by the client id."""
    n = data.n_train
    generator = torch.Generator().manual_seed(derive_seed("soup-holdout", data.client_id))
    idx = torch.randperm(n, generator=generator)[:max(1, math.ceil(fraction * n))]
    return data.train_x[idx], data.train_y[idx]


def greedy_soup(models: list[nn.Module], score) -> list[int]:
    """Indices of the ingredients kept by the greedy soup (Wortsman et al. 2022, Recipe 1).

    Ingredients are tried in decreasing order of their own score; one is kept when the soup with it
    scores at least as well as the soup without it (ties keep it: more averaging, same accuracy).
    """
    states = [m.state_dict() for m in models]
    probe = copy.deepcopy(models[0])  # scratch model: loading averages into an ingredient would overwrite it
    order = sorted(range(len(models)), key=lambda i: -score(load_average(probe, [states[i]])))
    kept = [order[0]]
    best = score(load_average(probe, [states[i] for i in kept]))
    for i in order[1:]:
        trial = score(load_average(probe, [states[j] for j in kept + [i]]))
        if trial >= best:
            kept, best = kept + [i], trial
    return sorted(kept)


@register_strategy
class SoupFT(Strategy):
    """Fine-tune ``ingredients`` copies of the global model, then average their weights.

    The uniform soup averages every ingredient; the greedy soup keeps a subset chosen on a held-out
    share of the client's train split. Averaging follows
    :func:`hf_lpft.train.averaging.average_state_dicts`: float tensors (including BatchNorm running
    statistics, as in FedAvg here) are averaged, integer buffers come from the first ingredient.

    Limitation of the greedy soup: strategies cannot change the data the training loop sees, so the
    held-out share is also part of every ingredient's training data. Ranking on seen examples favours
    the ingredient that fits them best; a truly held-out ranking needs a data-split hook in
    ``personalize``.
    """

    name = "soup_ft"
    display_name = "Soup FT"
    export_kind = "full"
    description = "Soup FT: several full fine-tuning runs (different data orders) weight-averaged."
    config_cls = SoupConfig

    def __init__(self, config: SoupConfig | None = None, *, budget=None):
        super().__init__(config, budget=budget)
        self._holdout: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def ingredients(self) -> int:
        return self.config.ingredients

    def phases(self) -> list[Phase]:
        return [Phase("finetune", "all", self.budget.epochs, self.budget.lr, bn=self.config.bn)]

    def on_phase_start(self, model: nn.Module, phase: Phase, data) -> None:
        # finalize() sees only the models, so keep the greedy soup's held-out examples now.
        if self.config.greedy:
            self._holdout = holdout_split(data, self.config.holdout_fraction)

    def finalize(self, models: list[nn.Module]) -> nn.Module:
        keep = list(range(len(models)))
        if self.config.greedy and len(models) > 1:
            keep = greedy_soup(models, self._score)
            logger.info("soup_ft: greedy soup keeps ingredients %s of %d", keep, len(models))
        states = [models[i].state_dict() for i in keep]
        return load_average(models[0], states)

    def _score(self, model: nn.Module) -> float:
        if self._holdout is None:
            raise RuntimeError("soup_ft.greedy needs the client's data: "
                               "run the phases (on_phase_start) before finalize")
        x, y = self._holdout
        return accuracy(model, x, y, device=next(model.parameters()).device)


__all__ = ["SoupConfig", "SoupFT", "greedy_soup", "holdout_split"]
