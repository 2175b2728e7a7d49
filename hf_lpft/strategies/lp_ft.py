"""LP-FT: linear probing first, then full fine-tuning (Kumar et al., ICLR 2022, arXiv 2202.10054),
applied post hoc to each client's copy of the global model as in Chen et al., arXiv 2511.12695.

The head is not re-initialised: probing starts from the global model's head. The paper does not state
the LP/FT split of its 15 epochs; the default here is 5 probing + 10 fine-tuning epochs. Reason: the head
starts from the global head (already aligned with the features), so a few probing epochs suffice to
fit it to the client, and LP-FT keeps two thirds of FT's fine-tuning budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hf_lpft.config import ConfigError
from hf_lpft.strategies.base import ProbeConfig, Strategy, check_bn, check_probe, check_probe_budget, register_strategy
from hf_lpft.train.phase import Phase


@dataclass
class LPFTConfig(ProbeConfig):
    lp_epochs: int = field(default=5, metadata={"help": (
        "Probing epochs taken from the shared budget; the rest fine-tunes.")})
    lp_bn: str = field(default="frozen", metadata={"help": (
        "BatchNorm statistics while probing: frozen, train or reestimate (reset, then a cumulative average).")})
    ft_lr_factor: float = field(default=1.0, metadata={"help": (
        "Learning rate of the fine-tuning stage = pft.lr x this factor (Kumar et al. tune LP-FT's FT-stage lr "
        "separately, often 10x lower than FT's: 0.1).")})
    ft_bn: str = field(default="train", metadata={"help": (
        "BatchNorm statistics while fine-tuning: train, frozen or reestimate (reset, then a cumulative average).")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lp_epochs < 0:
            raise ConfigError(f"lp_ft.lp_epochs={self.lp_epochs!r} must be >= 0")
        check_bn("lp_ft.lp_bn", self.lp_bn)
        check_bn("lp_ft.ft_bn", self.ft_bn)
        check_probe("lp_ft", self.probe, self.probe_l2, self.lp_bn)
        if not (math.isfinite(self.ft_lr_factor) and self.ft_lr_factor > 0):
            raise ConfigError(f"lp_ft.ft_lr_factor={self.ft_lr_factor!r} must be a finite number > 0")


@register_strategy
class LPFT(Strategy):
    """Probe the head for ``lp_epochs``, then fine-tune everything for the rest of the budget."""

    name = "lp_ft"
    display_name = "LP-FT"
    export_kind = "full"
    description = "LP-FT: probe the head first (backbone frozen), then fine-tune all parameters."
    config_cls = LPFTConfig

    def phases(self) -> list[Phase]:
        lp = self.config.lp_epochs
        check_probe_budget("lp_ft", lp, self.budget.epochs)
        return [Phase("probe", "head", lp, self.budget.probe_lr, bn=self.config.lp_bn, solver=self.config.probe,
                      l2_grid=tuple(self.config.probe_l2 or ())),
                Phase("finetune", "all", self.budget.epochs - lp, self.budget.lr * self.config.ft_lr_factor,
                      bn=self.config.ft_bn)]
