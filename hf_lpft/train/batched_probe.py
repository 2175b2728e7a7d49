"""Probe the heads of all clients at once: one batched tensor operation instead of one loop per client.

A probing phase on cached features trains a linear head per client on a fixed feature matrix. The
heads of K clients are independent, so they can be stacked into ``W: (K, C, d)``, ``b: (K, C)`` and
trained with one ``baddbmm`` per step. The result equals per-client probing with :func:`train_phase`
(up to float summation order) because everything that defines a client's run is kept per client:

- the batch order: each client draws ``torch.randperm`` per epoch from its own generator, seeded as
  ``run_phase`` seeds it, exactly as :func:`hf_lpft.data.tensors.iterate_batches` does;
- the loss: each client's loss is the mean cross-entropy over its own batch (padding rows are masked),
  with loss flooding applied per client; the sum over clients has block-diagonal gradients;
- the optimizer: SGD with momentum / weight decay written out as ``torch.optim.SGD`` does it
  (``buf = m * buf + (g + wd * p)``; ``p -= lr * buf``), per client; a client whose epoch has fewer
  batches than the longest one is masked out of the extra steps (no parameter or momentum change);
- a non-finite loss stops that client only, with the error the loop would raise.

Only SGD is supported (AdamW's per-step bias correction could be batched too, but the pipeline default
and the paper use SGD); :func:`batch_blocker` says when batching is not equal to the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from hf_lpft.data.tensors import ClientData
from hf_lpft.train.freeze import apply_phase, head_module
from hf_lpft.train.loop import NonFiniteLossError, OptimSettings, cache_blocker, cached_features
from hf_lpft.train.phase import Phase


@dataclass
class ProbeResult:
    """One client's probed head (or the error that stopped it) and its phase record."""

    head_state: dict[str, torch.Tensor] | None
    record: dict
    error: str | None = None


def batch_blocker(model: nn.Module, phase: Phase, settings: OptimSettings) -> str | None:
    """Why ``phase`` cannot be probed batched and equal to the loop (None = it can)."""
    if phase.solver != "sgd":
        return f"the probe is fitted with the {phase.solver!r} solver, not SGD epochs"
    if settings.schedule != "constant":
        return f"schedule {settings.schedule!r} (batched probing implements a constant lr only)"
    if settings.optimizer != "sgd":
        return f"optimizer {settings.optimizer!r} (batched probing implements SGD only)"
    if phase.epochs == 0:
        return "the phase has no epochs"
    if not settings.cache_features:
        return "feature caching is switched off"
    if not hasattr(model, "features"):
        return f"{type(model).__name__} has no features() method"
    return cache_blocker(model, phase)


def _epoch_indices(sizes: list[int], generators: list[torch.Generator], batch_size: int):
    """Per client, this epoch's permutation cut into batches: padded (K, S, B) indices and mask."""
    k, steps = len(sizes), max(math.ceil(n / batch_size) for n in sizes)
    idx = torch.zeros(k, steps * batch_size, dtype=torch.long)
    mask = torch.zeros(k, steps * batch_size, dtype=torch.bool)
    for i, (n, g) in enumerate(zip(sizes, generators)):
        idx[i, :n] = torch.randperm(n, generator=g)  # the draw iterate_batches makes for this epoch
        mask[i, :n] = True
    return idx.view(k, steps, batch_size), mask.view(k, steps, batch_size)


def _sgd_step(params: list[torch.Tensor], bufs: list[torch.Tensor], active: torch.Tensor, *, lr: float,
              settings: OptimSettings) -> None:
    """torch.optim.SGD (no dampening, no Nesterov) on the active clients' slices only."""
    with torch.no_grad():
        for p, buf in zip(params, bufs):
            on = active.view(-1, *([1] * (p.dim() - 1)))
            d_p = p.grad if settings.weight_decay == 0 else p.grad.add(p, alpha=settings.weight_decay)
            if settings.momentum != 0:
                buf.copy_(torch.where(on, buf.mul(settings.momentum).add_(d_p), buf))
                d_p = buf
            p.copy_(torch.where(on, p - lr * d_p, p))
            p.grad = None


def train_heads(features: list[torch.Tensor], labels: list[torch.Tensor], weights: torch.Tensor, biases: torch.Tensor,
                *, epochs: int, lr: float, settings: OptimSettings, seeds: list[int],
                flood: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[list[float]], list[tuple[int, float] | None]]:
    """Train K linear heads together on fixed features.

    Args:
        features: Per client, its (n_k, d) head-input features, in the client's train order.
        labels: Per client, its (n_k,) int64 labels.
        weights: (K, C, d) initial head weights; biases: (K, C) initial biases (not modified).
        seeds: Per client, the seed ``train_phase`` would get (its batch-order generator).

    Returns:
        Trained (weights, biases), per-client mean loss per epoch, and per client None or the (epoch, loss)
        of its first non-finite loss (where the loop would raise).
    """
    k, d = len(features), weights.shape[-1]
    sizes = [int(y.numel()) for y in labels]
    n_max = max(sizes)
    feats = torch.zeros(k, n_max, d, dtype=features[0].dtype, device=weights.device)
    ys = torch.zeros(k, n_max, dtype=torch.long, device=weights.device)
    for i, (f, y) in enumerate(zip(features, labels)):
        feats[i, :len(y)], ys[i, :len(y)] = f, y
    w, b = weights.detach().clone().requires_grad_(True), biases.detach().clone().requires_grad_(True)
    bufs = [torch.zeros_like(w), torch.zeros_like(b)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    losses: list[list[float]] = [[] for _ in range(k)]
    errors: list[tuple[int, float] | None] = [None] * k
    alive = torch.ones(k, dtype=torch.bool)
    rows = torch.arange(k).view(k, 1)
    for epoch in range(epochs):
        idx, mask = _epoch_indices(sizes, generators, settings.batch_size)
        loss_sum = torch.zeros(k, dtype=torch.float64)
        for s in range(idx.shape[1]):
            xb, yb, m = feats[rows, idx[:, s]], ys[rows, idx[:, s]], mask[:, s].to(w.device)
            logits = torch.baddbmm(b.unsqueeze(1), xb, w.transpose(1, 2))
            per_row = nn.functional.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(k, -1)
            count = m.sum(1)
            loss = (per_row * m).sum(1) / count.clamp(min=1)
            value, has_batch = loss.detach().cpu().double(), (count > 0).cpu()
            bad = has_batch & alive & ~torch.isfinite(value)
            for i in torch.nonzero(bad).flatten().tolist():  # the loop raises here: this client stops
                errors[i] = (epoch, value[i].item())
            alive &= ~bad
            active = has_batch & alive
            loss_sum += torch.where(active, value * count.cpu(), 0.0)
            objective = loss if flood is None else (loss - flood).abs() + flood
            torch.where(active.to(w.device), objective, 0.0).sum().backward()
            _sgd_step([w, b], bufs, active.to(w.device), lr=lr, settings=settings)
        for i in range(k):
            if errors[i] is None:
                losses[i].append(loss_sum[i].item() / max(sizes[i], 1))
    return w.detach(), b.detach(), losses, errors


def probe_clients(model: nn.Module, phase: Phase, clients: list[ClientData], *, settings: OptimSettings,
                  seeds: list[int], device: torch.device | str = "cpu",
                  flood: float | None = None) -> list[ProbeResult]:
    """Run probing phase ``phase`` for every client at once, starting each from ``model``'s head.

    ``model`` is the (prepared) global model: its backbone gives every client's cached features, its
    head is every client's starting head. ``model`` itself is not changed except for ``requires_grad``.

    Raises:
        ValueError: if :func:`batch_blocker` finds the phase cannot be batched exactly.
    """
    blocker = batch_blocker(model, phase, settings)
    if blocker is not None:
        raise ValueError(f"phase {phase.name!r} cannot be probed batched: {blocker}")
    trainable, total = apply_phase(model, phase)
    start = time.perf_counter()
    feats = [cached_features(model, c.train_x, phase, batch_size=256, device=device) for c in clients]
    model.eval()
    head = head_module(model)
    k = len(clients)
    w0 = head.weight.detach().unsqueeze(0).expand(k, -1, -1)
    b0 = head.bias.detach().unsqueeze(0).expand(k, -1)
    w, b, losses, errors = train_heads(feats, [c.train_y.to(device) for c in clients], w0, b0, epochs=phase.epochs,
                                       lr=phase.lr, settings=settings, seeds=seeds, flood=flood)
    share = (time.perf_counter() - start) / max(k, 1)
    out = []
    for i, c in enumerate(clients):
        record = {"phase": phase.name, "trainable_params": trainable, "total_params": total,
                  "epoch_loss": losses[i], "seconds": share, "cached_features": True, "batched_probe": True}
        if errors[i] is not None:
            epoch, value = errors[i]
            out.append(ProbeResult(None, record, f"client {c.client_id}: loss is {value} in phase {phase.name!r}, "
                                                 f"epoch {epoch}; lower the learning rate"))
        else:
            out.append(ProbeResult({"weight": w[i].clone(), "bias": b[i].clone()}, record))
    return out


def load_probe(model: nn.Module, result: ProbeResult) -> dict:
    """Put a batched probing result into ``model``'s head; raise the loop's error for a failed client."""
    if result.error is not None:
        raise NonFiniteLossError(result.error)
    head = head_module(model)
    with torch.no_grad():
        head.weight.copy_(result.head_state["weight"])
        head.bias.copy_(result.head_state["bias"])
    model.eval()
    return dict(result.record)
