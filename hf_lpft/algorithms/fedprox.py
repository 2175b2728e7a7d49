"""FedProx (Li et al. 2020, arXiv 1812.06127): FedAvg plus (mu/2)·||w − w_global||² in every client's local loss.

The anchor w_global is a detached copy of the weights the client starts from, so the term's gradient is
mu · (w − w_global) and pulls only w. Aggregation is FedAvg's. The option keeps Flower's name and default
(``proximal_mu``, 0.0: then FedProx is FedAvg), so configs written for Flower's FedProx run unchanged, now
on either engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from hf_lpft.algorithms.base import AlgorithmConfig, GeneralFL, LossHook, register_algorithm
from hf_lpft.config import ConfigError


@dataclass
class FedProxConfig(AlgorithmConfig):
    proximal_mu: float = field(default=0.0, metadata={"help": "Proximal strength mu >= 0 (0 = FedAvg)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.proximal_mu >= 0:
            raise ConfigError(f"fedavg.fl_strategy_args.proximal_mu={self.proximal_mu!r} must be >= 0")


@register_algorithm
class FedProx(GeneralFL):
    name = "fedprox"
    display_name = "FedProx"
    description = "FedAvg with a proximal term (mu/2)·||w − w_global||² in the local loss (Li et al. 2020)."
    config_cls = FedProxConfig

    def local_objective(self, model: nn.Module, *, server_state: dict, client_state: dict) -> LossHook | None:
        mu = self.config.proximal_mu
        if mu <= 0:
            return None
        from hf_lpft.strategies.proximal import proximal_term  # the strategies package pulls in peft: only here

        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}  # detached: the term must not move it
        return lambda m: proximal_term({n: p for n, p in m.named_parameters() if p.requires_grad}, anchor, mu)
