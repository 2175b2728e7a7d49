"""BN-adapt: re-estimate BatchNorm running statistics on the client's data; no weight changes.

A reference row, not a method of the paper: it separates how much of fine-tuning's Local gain (and its
feature distortion) comes from BatchNorm statistics alone. The idea is AdaBN (Li et al., "Revisiting
Batch Normalization For Practical Domain Adaptation", arXiv 1603.04779); in federated learning FedBN
(Li et al., ICLR 2021, arXiv 2102.07623) keeps BatchNorm local for the same reason. Its Global drop is the
"BN statistics" part of each method's drop (``global_drop_bn``; the regime map in benchmarks/README.md).

The single phase trains no parameter (``trainable="none"``: no optimizer, so no weight decay or momentum
touches a weight) and runs forward passes without gradients; ``bn="reestimate"`` resets the running
statistics and accumulates a cumulative average over every batch (``momentum=None``). For backbones
without BatchNorm (LayerNorm / GroupNorm) the strategy is the global model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_lpft.config import ConfigError
from hf_lpft.strategies.base import Strategy, StrategyConfig, register_strategy
from hf_lpft.train.phase import Phase

BN_ADAPT_MODES = ("reestimate", "train")


@dataclass
class BNAdaptConfig(StrategyConfig):
    passes: int = field(default=1, metadata={"help": (
        "Passes over the client's training data. With the cumulative average more passes only re-average the same "
        "data in other batches; the pass costs forward compute only, not the training budget.")})
    bn: str = field(default="reestimate", metadata={"help": (
        "reestimate (reset, then cumulative average: the client's own statistics) or train (exponential average with "
        "the layer's momentum, starting from the global statistics).")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.passes < 1:
            raise ConfigError(f"bn_adapt.passes={self.passes!r} must be >= 1")
        if self.bn not in BN_ADAPT_MODES:
            raise ConfigError(f"bn_adapt.bn={self.bn!r} is not allowed; choose one of {list(BN_ADAPT_MODES)}")


@register_strategy
class BNAdapt(Strategy):
    """Only BatchNorm running statistics change: re-estimated on the client's training split."""

    name = "bn_adapt"
    display_name = "BN-adapt"
    export_kind = "full"
    description = "BN-adapt: re-estimate BatchNorm statistics on the client's data; no weight update (reference)."
    config_cls = BNAdaptConfig

    def phases(self) -> list[Phase]:
        # lr is required by Phase but unused: a phase that trains nothing makes no optimizer.
        return [Phase("bn_statistics", "none", self.config.passes, self.budget.lr, bn=self.config.bn)]
