"""Sparse FT: fine-tune only the weights with the highest SNIP connection sensitivity; the rest stay θ_G.

Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695 (Table 2, "Sparse FT"); the sensitivity is SNIP's, Lee, Ajanthan and Torr, "SNIP:
Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019, arXiv 1810.02340:

    s_j = |g_j · θ_j|,   g = ∂ CE(θ_G; client data) / ∂θ

computed once at the start of the phase on the client's own training data (the first ``snip_examples``
of a fixed, client-seeded shuffle), in eval mode, so computing it changes nothing in the model (no
BatchNorm statistics update, no dropout). The entries with the lowest scores are *masked*:
``sparsity`` is the share of all parameter entries (backbone and head, every trainable tensor: the
phase trains ``all``) whose updates are masked.

Masked weights stay bit-identical: their gradients are zeroed before each step (so momentum / Adam
moments never build up for them) and, because weight decay would still move them, their values are
restored from the snapshot after each step. BatchNorm running statistics are buffers, not weights:
with ``bn=train`` they adapt as in FT.

Top-k scope. ``global`` (default) ranks all entries of the model together, as SNIP does: layers whose
weights matter more for this client's loss keep more of their entries, and a tensor may be masked
entirely. ``per_tensor`` keeps the same share in every tensor, so every layer adapts a little. The
masked share is exactly ``round(sparsity · N)`` with global scope and the sum of the per-tensor
roundings with per-tensor scope.

Default ``sparsity = 0.9`` (10 % of the entries update): the paper does not state its rate (Figure 2
sweeps several); sparse fine-tuning methods commonly update a few to ten per cent of the weights,
and 0.9 keeps enough capacity for the Local accuracy of FT on small backbones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from hf_lpft.config import ConfigError
from hf_lpft.data.tensors import iterate_batches
from hf_lpft.strategies.base import Strategy, StrategyConfig, check_bn, register_strategy
from hf_lpft.train.loop import derive_seed
from hf_lpft.train.phase import Phase

SCOPES = ("global", "per_tensor")


@dataclass
class SparseConfig(StrategyConfig):
    sparsity: float = field(default=0.9, metadata={"help": (
        "Share of weight entries whose updates are masked, in [0, 1) (0 = FT).")})
    scope: str = field(default="global", metadata={"help": (
        "Top-k over all entries together (global, as SNIP) or within each tensor (per_tensor).")})
    snip_examples: int = field(default=256, metadata={"help": (
        "Client training examples used for the SNIP scores (a few batches).")})
    snip_batch_size: int = field(default=64, metadata={"help": "Batch size for the SNIP gradient."})
    bn: str = field(default="train", metadata={"help": (
        "BatchNorm statistics during fine-tuning: train (updated) or frozen.")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparse_ft.sparsity={self.sparsity!r} must be in [0, 1)")
        if self.scope not in SCOPES:
            raise ConfigError(f"sparse_ft.scope={self.scope!r} is not allowed; choose one of {list(SCOPES)}")
        for name in ("snip_examples", "snip_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sparse_ft.{name}={getattr(self, name)!r} must be >= 1")
        check_bn("sparse_ft.bn", self.bn)


def snip_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int) -> dict[str, torch.Tensor]:
    """|g ⊙ θ| per parameter, g the gradient of the mean cross-entropy over (x, y), in eval mode.

    Gradients go to detached copies of the parameters (``functional_call``), so the model's
    ``requires_grad`` flags, ``.grad`` fields and BatchNorm statistics are left as they were.
    """
    model.eval()
    device = next(model.parameters()).device
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for xb, yb in iterate_batches(x, y, batch_size=batch_size, shuffle=False, device=device):
        loss = nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb, reduction="sum") / len(y)
        for (n, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                grads[n] += g
    return {n: (grads[n] * params[n].detach()).abs() for n in params}


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` largest entries of the flat tensor ``scores``."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        keep[torch.topk(scores.flatten(), n_keep, sorted=False).indices] = True
    return keep


def snip_mask(scores: dict[str, torch.Tensor], sparsity: float, *, scope: str = "global") -> dict[str, torch.Tensor]:
    """Boolean masks (True = may update) keeping the highest scores; ``round(sparsity · N)`` entries masked.

    Args:
        scores: Non-negative sensitivity per parameter entry.
        sparsity: Share of entries to mask, in [0, 1).
        scope: ``global`` ranks all entries together; ``per_tensor`` masks the share within each tensor.
    """
    if scope == "per_tensor":
        return {n: _keep_top(s, s.numel() - round(sparsity * s.numel())).view_as(s) for n, s in scores.items()}
    if scope != "global":
        raise ValueError(f"scope={scope!r} is not allowed; choose one of {list(SCOPES)}")
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_top(flat, flat.numel() - round(sparsity * flat.numel()))
    return {n: k.view_as(s) for (n, s), k in zip(scores.items(), keep.split([s.numel() for s in scores.values()]))}


def snip_subset(data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of a fixed shuffle of the client's train split (seeded by the client id)."""
    generator = torch.Generator().manual_seed(derive_seed("snip", data.client_id))
    idx = torch.randperm(data.n_train, generator=generator)[:n]
    return data.train_x[idx], data.train_y[idx]


@register_strategy
class SparseFT(Strategy):
    """Fine-tune the SNIP-selected share ``1 - sparsity`` of the weights; every other entry stays θ_G."""

    name = "sparse_ft"
    display_name = "Sparse FT"
    export_kind = "full"
    description = "Sparse FT: only the weights with the highest SNIP sensitivity |g·θ| on the client's data update."
    config_cls = SparseConfig

    def __init__(self, config: SparseConfig | None = None, *, budget=None):
        super().__init__(config, budget=budget)
        self._keep: dict[str, torch.Tensor] | None = None
        self._start: dict[str, torch.Tensor] | None = None

    def phases(self) -> list[Phase]:
        return [Phase("finetune", "all", self.budget.epochs, self.budget.lr, bn=self.config.bn)]

    def on_phase_start(self, model: nn.Module, phase: Phase, data) -> None:
        x, y = snip_subset(data, self.config.snip_examples)
        scores = snip_scores(model, x, y, batch_size=self.config.snip_batch_size)
        self._keep = snip_mask(scores, self.config.sparsity, scope=self.config.scope)
        self._start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def _pairs(self, model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        """(parameter, keep mask, start value) for every parameter with masked entries."""
        if self._keep is None:
            raise RuntimeError("sparse_ft: no mask; on_phase_start must run before training")
        return [(p, self._keep[n], self._start[n]) for n, p in model.named_parameters() if not self._keep[n].all()]

    def grad_hook(self, model: nn.Module, phase: Phase):
        pairs = self._pairs(model)

        def mask_gradients(_: nn.Module) -> None:
            for p, keep, _start in pairs:
                if p.grad is not None:
                    p.grad.mul_(keep)
        return mask_gradients

    def post_step(self, model: nn.Module, phase: Phase):
        pairs = self._pairs(model)

        @torch.no_grad()
        def restore_masked(_: nn.Module) -> None:
            # Weight decay (SGD's coupled or AdamW's decoupled) moves weights even with a zero gradient.
            for p, keep, start in pairs:
                p.copy_(torch.where(keep, p, start))
        return restore_masked

    def frozen_entries(self, model: nn.Module, phase: Phase) -> dict[str, torch.Tensor] | None:
        return None if self._keep is None else {n: ~k for n, k in self._keep.items()}

    def finalize(self, models: list[nn.Module]) -> nn.Module:
        self._keep = self._start = None  # the strategy serves every client: drop this client's state
        return models[0]


__all__ = ["SparseConfig", "SparseFT", "snip_mask", "snip_scores"]
