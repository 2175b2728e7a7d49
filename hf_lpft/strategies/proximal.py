"""Proximal FT: full fine-tuning plus a squared proximal penalty towards the global model (FedProx form).

Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695 (Table 2, "Proximal FT"); the term is FedProx's, Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020, arXiv 1812.06127:

    loss(θ) = CE(θ) + (mu / 2) · ||θ − θ_G||²

θ_G is a detached snapshot of the weights at the start of the phase (the global model: Proximal FT has
one phase and starts from θ_G), so the penalty's gradient is mu · (θ − θ_G) and pulls only θ.

Default ``mu = 0.01``: the paper does not state its strength; FedProx tunes mu over
{0.001, 0.01, 0.1, 1} and 0.01 is the value most of its follow-ups use for image models. It is
gentle on purpose: the summed squared distance over all weights grows quickly with model size, and a
large mu turns Proximal FT into "no fine-tuning". ``mu = 0`` is exactly FT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hf_lpft.config import ConfigError
from hf_lpft.strategies.base import Strategy, StrategyConfig, check_bn, register_strategy
from hf_lpft.train.phase import Phase


@dataclass
class ProximalConfig(StrategyConfig):
    mu: float = field(default=0.01, metadata={"help": (
        "Proximal strength: adds (mu/2)·||θ − θ_G||² to the loss (>= 0; 0 = plain FT).")})
    bn: str = field(default="train", metadata={"help": (
        "BatchNorm statistics during fine-tuning: train (updated) or frozen.")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mu >= 0:  # also rejects NaN
            raise ConfigError(f"proximal_ft.mu={self.mu!r} must be >= 0")
        check_bn("proximal_ft.bn", self.bn)


def proximal_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """(mu / 2) · Σ ||θ − θ_G||² over the parameters in ``params`` (``anchor`` holds detached θ_G).

    Raises:
        KeyError: A parameter has no snapshot (the anchor belongs to another model).
    """
    missing = set(params) - set(anchor)
    if missing:
        raise KeyError(f"no proximal anchor for parameters {sorted(missing)[:5]}")
    total = sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())
    return (mu / 2) * total


@register_strategy
class ProximalFT(Strategy):
    """Full fine-tuning with a squared L2 pull towards the weights the phase started from (θ_G)."""

    name = "proximal_ft"
    display_name = "Proximal FT"
    export_kind = "full"
    description = "Proximal FT: full fine-tuning + (mu/2)·||θ − θ_G||² towards the global model (FedProx term)."
    config_cls = ProximalConfig

    def __init__(self, config: ProximalConfig | None = None, *, budget=None):
        super().__init__(config, budget=budget)
        self._anchor: dict[str, torch.Tensor] | None = None

    def phases(self) -> list[Phase]:
        return [Phase("finetune", "all", self.budget.epochs, self.budget.lr, bn=self.config.bn)]

    def on_phase_start(self, model: nn.Module, phase: Phase, data) -> None:
        # A detached copy: the penalty must not backpropagate into (or move with) the anchor.
        self._anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def extra_loss(self, model: nn.Module, phase: Phase):
        if self.config.mu == 0:
            return None
        if self._anchor is None:
            raise RuntimeError("proximal_ft: no snapshot of θ_G; on_phase_start must run before training")
        # Frozen parameters cannot move, so their term is a constant 0; skip them.
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return proximal_term(params, self._anchor, self.config.mu)

    def finalize(self, models: list[nn.Module]) -> nn.Module:
        self._anchor = None  # the strategy serves every client: drop this client's snapshot
        return models[0]


__all__ = ["ProximalConfig", "ProximalFT", "proximal_term"]
