"""LP: linear probing, only the classifier head trains on frozen features (Table 2 of the paper).

Chen et al., arXiv 2511.12695; Kumar et al., ICLR 2022, arXiv 2202.10054.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_lpft.strategies.base import ProbeConfig, Strategy, check_bn, check_probe, register_strategy
from hf_lpft.train.phase import Phase


@dataclass
class LPConfig(ProbeConfig):
    bn: str = field(default="frozen", metadata={"help": (
        "BatchNorm statistics while probing: frozen (a true linear probe), train or reestimate (reset, then a "
        "cumulative average: LP on the client's own statistics).")})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bn("lp.bn", self.bn)
        check_probe("lp", self.probe, self.probe_l2, self.bn)


@register_strategy
class LP(Strategy):
    """Linear probing: the head starts from the global head and trains alone; the backbone is frozen."""

    name = "lp"
    display_name = "LP"
    export_kind = "full"
    description = "Linear probing: only the head trains; backbone and its BatchNorm statistics frozen."
    config_cls = LPConfig

    def phases(self) -> list[Phase]:
        return [Phase("probe", "head", self.budget.epochs, self.budget.probe_lr, bn=self.config.bn,
                      solver=self.config.probe, l2_grid=tuple(self.config.probe_l2 or ()))]
