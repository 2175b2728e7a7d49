"""Optimizer and learning-rate schedule from settings: the one route from a config section to an optimizer.

The FedAvg local optimizer and every PFT stage are built here, fresh each time: a new optimizer (and so new
momentum / Adam moments) per client, per FedAvg round and per PFT phase, so no state leaks between clients
or stages. Chen et al. (arXiv 2511.12695) do not state their optimizer; the likely lineage of their Digit5
code (Local Superior Soups) trains with Adam at lr 5e-4, so Adam is offered beside SGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer settings shared by all phases of a run (the lr comes from the phase).

    Args:
        optimizer: ``sgd`` (with ``momentum``), ``adam`` (L2 ``weight_decay`` added to the gradient, as
            ``torch.optim.Adam`` does) or ``adamw`` (decoupled weight decay).
        schedule: ``constant`` or ``cosine`` (annealed to 0 over the steps of one phase; FedAvg anneals the
            local lr over rounds instead, see :func:`round_lr`).
        cache_features: Probe on cached backbone features when that is exact.
    """

    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    cache_features: bool = True
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not allowed; choose one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not allowed; choose one of {list(SCHEDULES)}")


def settings_from(section, *, cache_features: bool | None = None) -> OptimSettings:
    """The optimizer settings of a config section (``cfg.fedavg`` or ``cfg.pft``): the only place they are read."""
    cache = getattr(section, "cache_features", True) if cache_features is None else cache_features
    return OptimSettings(section.optimizer, section.momentum, section.weight_decay, section.batch_size,
                         cache_features=cache, schedule=getattr(section, "schedule", "constant"))


def make_optimizer(params: list[nn.Parameter], lr: float, settings: OptimSettings) -> torch.optim.Optimizer:
    """A new optimizer over ``params`` (never reused: its state starts empty)."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)


def cosine_factor(step: int, total: int) -> float:
    """0.5 (1 + cos(pi step / total)): 1 at step 0, 0 at ``total`` (Loshchilov & Hutter 2017, no restarts)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def make_scheduler(optimizer: torch.optim.Optimizer, settings: OptimSettings,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step schedule of one phase (None = constant lr)."""
    if settings.schedule == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total_steps))


def round_lr(lr: float, settings: OptimSettings, *, rnd: int, rounds: int) -> float:
    """FedAvg's local lr in round ``rnd`` (0-based): constant, or cosine-annealed over the rounds."""
    return lr if settings.schedule == "constant" else lr * cosine_factor(rnd, rounds)
