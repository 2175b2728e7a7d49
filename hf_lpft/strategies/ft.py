"""FT: full fine-tuning of every parameter with cross-entropy (the paper's baseline, Table 2).

Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_lpft.strategies.base import Strategy, StrategyConfig, check_bn, register_strategy
from hf_lpft.train.phase import Phase


@dataclass
class FTConfig(StrategyConfig):
    bn: str = field(default="train", metadata={"help": (
        "BatchNorm statistics during fine-tuning: train (updated, exponential average), frozen (kept from the global "
        "model) or reestimate (reset, then a cumulative average over the phase).")})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bn("ft.bn", self.bn)


@register_strategy
class FT(Strategy):
    """Full fine-tuning from the global model: all parameters, all epochs."""

    name = "ft"
    display_name = "FT"
    export_kind = "full"
    description = "Full fine-tuning: every parameter trains for the whole budget."
    config_cls = FTConfig

    def phases(self) -> list[Phase]:
        return [Phase("finetune", "all", self.budget.epochs, self.budget.lr, bn=self.config.bn)]
