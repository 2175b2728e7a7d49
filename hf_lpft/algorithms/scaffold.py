"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
arXiv 1910.06378), Algorithm 1 with option II for the client control variate.

Server state c and each client's c_i (one tensor per model parameter, zeros at the start). Client i, from the
global weights x, takes K local steps on  g_i(y) − c_i + c  (here: the loss plus Σ <y, c − c_i>, whose gradient
is exactly c − c_i, so it passes through accelerate's gradient scaling as the loss does), reaching y_i, then

    c_i+ = c_i − c + (x − y_i) / (K · lr)          (option II; K = its optimizer steps, lr = the round's lr)

and sends Δy_i = y_i − x (its weights) and Δc_i = c_i+ − c_i. The server, over the round's sampled clients S
of N:

    x ← x + lr_g · mean_S(Δy_i),     c ← c + (|S| / N) · mean_S(Δc_i) = c + Σ_S Δc_i / N.

Choices the paper leaves open, recorded as options: the mean over clients is uniform as in the paper
(``weighting: uniform``) or example-weighted like FedAvg (``examples``); lr_g = ``server_lr`` (1 by default:
then x becomes the mean of the y_i). Control variates cover the parameters only (BatchNorm running statistics
are averaged, as in FedAvg). With momentum or weight decay in the local optimizer (``fedavg.momentum``,
``fedavg.weight_decay``) option II still reads (x − y_i)/(K·lr) as the client's mean corrected gradient, as
common implementations do; the paper's analysis is for plain SGD (``--fedavg.momentum 0``). With momentum β
that overstates the gradient by up to 1/(1 − β): at the recipes' 0.9 SCAFFOLD diverged on digits5 with
Dirichlet(0.1) label skew, so use momentum 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hf_lpft.algorithms.base import AlgorithmConfig, GeneralFL, LossHook, WeightedSums, register_algorithm
from hf_lpft.config import ConfigError

WEIGHTINGS = ("uniform", "examples")


@dataclass
class ScaffoldConfig(AlgorithmConfig):
    server_lr: float = field(default=1.0, metadata={"help": "Global step size lr_g: x <- x + lr_g * mean(Δy)."})
    weighting: str = field(default="uniform", metadata={"help": (
        "Mean over the round's clients of Δy: uniform (the paper) or examples (weighted by train size, as FedAvg).")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.server_lr > 0:
            raise ConfigError(f"fedavg.fl_strategy_args.server_lr={self.server_lr!r} must be > 0")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"fedavg.fl_strategy_args.weighting={self.weighting!r} is not allowed; choose one of "
                              f"{list(WEIGHTINGS)}")


def correction(params: dict[str, torch.Tensor], c: dict, c_i: dict) -> dict[str, torch.Tensor]:
    """c − c_i per parameter (a missing control variate is zero), on each parameter's device and dtype."""
    out = {}
    for n, p in params.items():
        d = c[n].double() if n in c else torch.zeros(p.shape, dtype=torch.float64)
        if n in c_i:
            d = d - c_i[n].double()
        out[n] = d.to(device=p.device, dtype=p.dtype)
    return out


def corrected_objective(corr: dict[str, torch.Tensor]) -> LossHook:
    """The loss term Σ <p, c − c_i> over the trainable parameters: its gradient adds c − c_i to g_i."""
    return lambda m: sum((p * corr[n]).sum() for n, p in m.named_parameters() if p.requires_grad)


def new_control_variate(x: dict, y: dict, c: dict, c_i: dict, *, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Option II: c_i+ = c_i − c + (x − y_i) / (K · lr), per parameter of ``x``, in float64 on the CPU."""
    def cpu(d: dict, n: str) -> torch.Tensor:
        return d[n].detach().double().cpu() if n in d else torch.zeros((), dtype=torch.float64)
    return {n: cpu(c_i, n) - cpu(c, n) + (cpu(x, n) - cpu(y, n)) / (steps * lr) for n in x}


def server_step(x: dict, mean_y: dict, lr_g: float) -> dict:
    """x + lr_g · (mean(y_i) − x) for float tensors (cast back to x's dtype); other tensors from ``mean_y``."""
    return {k: (x[k].double() + lr_g * (mean_y[k].to(x[k].device) - x[k].double())).to(x[k].dtype)
            if x[k].is_floating_point() else mean_y[k] for k in x}


def server_control(c: dict, delta_sums: dict, n_clients: int) -> dict[str, torch.Tensor]:
    """c + Σ_S Δc_i / N (= c + |S|/N · mean_S Δc_i), float32."""
    return {n: ((c[n].double() if n in c else 0.0) + s.double() / n_clients).float() for n, s in delta_sums.items()}


@register_algorithm
class Scaffold(GeneralFL):
    name = "scaffold"
    display_name = "SCAFFOLD"
    description = ("Control variates c, c_i correct every local step by c − c_i; option II update "
                   "(Karimireddy et al. 2020).")
    config_cls = ScaffoldConfig
    stateful = True

    def local_objective(self, model: nn.Module, *, server_state: dict, client_state: dict) -> LossHook | None:
        if not server_state and not client_state:  # c = c_i = 0 (first round): no correction
            return None
        return corrected_objective(correction(dict(model.named_parameters()), server_state, client_state))

    def client_result(self, *, start: dict, trained: dict, server_state: dict, client_state: dict, steps: int,
                      lr: float) -> tuple[dict, dict]:
        c_new = new_control_variate(start, trained, server_state, client_state, steps=steps, lr=lr)
        delta = {n: (v - client_state[n].double() if n in client_state else v).float() for n, v in c_new.items()}
        return delta, {n: v.float() for n, v in c_new.items()}

    def upload_template(self, model: nn.Module) -> dict:
        return {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in model.named_parameters()}

    def client_weight(self, n_train: int) -> float:
        return 1.0 if self.config.weighting == "uniform" else float(n_train)

    def aggregate(self, global_state: dict, weights: WeightedSums, uploads: dict, server_state: dict, *,
                  n_sampled: int, n_clients: int) -> tuple[dict, dict]:
        return (server_step(global_state, weights.mean64(), self.config.server_lr),
                server_control(server_state, uploads, n_clients))
