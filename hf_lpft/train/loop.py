"""THE training loop: one phase, one client. The only place that steps an optimizer.

Strategies declare phases and optional hooks (an extra loss term, a gradient mask); this loop executes
them with ``accelerate`` for device placement and backward.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from hf_lpft.config import ConfigError
from hf_lpft.data.tensors import ClientData, iterate_batches
from hf_lpft.train.freeze import (
    apply_phase,
    begin_bn_statistics,
    end_bn_statistics,
    head_module,
    set_statistics_mode,
    set_train_mode,
)
from hf_lpft.train.logreg import DEFAULT_L2_GRID, choose_l2, fit_logreg
from hf_lpft.train.optim import OptimSettings, make_optimizer, make_scheduler
from hf_lpft.train.phase import Phase

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. (seed, strategy, client_id): independent of processing order."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# Phases with at least this many optimizer steps show a progress bar (step, epoch, loss) on the main process.
PROGRESS_MIN_STEPS = 200


def show_progress(accelerator: Accelerator, steps: int) -> bool:
    """A per-step bar for long phases, on the main process of an interactive terminal; ``HF_LPFT_PROGRESS=1``
    forces it on (e.g. in a log file), ``0`` off. Tests and pipes stay quiet."""
    wanted = os.environ.get("HF_LPFT_PROGRESS", "")
    if wanted in ("0", "1"):
        return wanted == "1" and accelerator.is_main_process
    return accelerator.is_main_process and steps >= PROGRESS_MIN_STEPS and sys.stderr.isatty()


def prepared_optimizer(optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> torch.optim.Optimizer:
    """With fp16 (``accelerator.scaler`` set) the optimizer accelerate prepares: it unscales the gradients,
    skips steps with inf/NaN gradients and updates the GradScaler. Otherwise the optimizer itself."""
    if accelerator.scaler is None:
        return optimizer
    return accelerator.prepare_optimizer(optimizer, device_placement=False)


def release_optimizer(optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> None:
    """Forget a prepared optimizer (accelerate keeps every prepared one; a run prepares one per phase)."""
    if optimizer in accelerator._optimizers:
        accelerator._optimizers.remove(optimizer)


LossHook = Callable[[nn.Module], torch.Tensor | None]
GradHook = Callable[[nn.Module], None]


def flooded(loss: torch.Tensor, flood: float | None) -> torch.Tensor:
    """Loss flooding (Ishida et al. 2020): |loss - b| + b, i.e. gradient ascent below the flood level b."""
    return loss if flood is None else (loss - flood).abs() + flood


def _stochastic(module: nn.Module) -> str | None:
    """Name of the first module whose train-mode output is random (dropout, drop-path), else None."""
    for name, m in module.named_modules():
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if p:
            return name or type(m).__name__
    return None


def cache_blocker(model: nn.Module, phase: Phase) -> str | None:
    """Why the backbone's features cannot be cached for ``phase`` (None = they can).

    Caching is exact only when the backbone is frozen and deterministic: a head-only phase, BatchNorm
    statistics frozen (in train mode they would change with every batch), no active dropout / drop-path.
    Inputs are pre-decoded tensors without augmentation, so the input pipeline is deterministic.
    """
    if phase.trainable != "head":
        return f"phase trains {phase.trainable!r}, not the head only"
    if phase.bn != "frozen":
        return "BatchNorm statistics are in train mode"
    stochastic = _stochastic(model)
    return f"module {stochastic!r} is stochastic in train mode" if stochastic else None


@torch.no_grad()
def cached_features(model: nn.Module, x: torch.Tensor, phase: Phase, *, batch_size: int, device) -> torch.Tensor:
    """Head-input features of all of ``x``, computed once in the phase's train mode."""
    set_train_mode(model, phase.bn)
    feats = [model.features(xb) for xb, _ in iterate_batches(x, torch.zeros(len(x)), batch_size=batch_size,
                                                               shuffle=False, device=device)]
    return torch.cat(feats)


def training_inputs(model: nn.Module, phase: Phase, data: ClientData, *, settings: OptimSettings,
                    accelerator: Accelerator) -> tuple[torch.Tensor, nn.Module]:
    """(inputs, module to train): the backbone's features computed once and the head, when the backbone is
    frozen and deterministic (``cache_blocker`` says why not otherwise), else the raw inputs and the model."""
    blocker = cache_blocker(model, phase) if settings.cache_features else "feature caching is switched off"
    if blocker is None and hasattr(model, "features"):
        with accelerator.autocast():  # the backbone runs in the run's precision, cached or not
            inputs = cached_features(model, data.train_x, phase, batch_size=256, device=accelerator.device).float()
        return inputs, head_module(model)
    if phase.trainable == "head":
        logger.info("phase %s: probing without feature cache (%s)", phase.name, blocker)
    return data.train_x, model


def _batch(forward: nn.Module, xb: torch.Tensor, yb: torch.Tensor, *, data: ClientData, phase: Phase, epoch: int,
           accelerator: Accelerator, flood: float | None, step, scheduler) -> float:
    """One optimizer step on a batch; returns its plain cross-entropy (a non-finite one stops the run)."""
    with accelerator.autocast():  # accelerate's mixed precision (bf16 / fp16); a no-op in fp32
        try:
            loss = nn.functional.cross_entropy(forward(xb).float(), yb)
        except ValueError as err:  # BatchNorm in train mode cannot normalise a batch of one example
            if len(yb) != 1 or "Expected more than 1 value per channel" not in str(err):
                raise
            raise ConfigError(f"client {data.client_id}: its {data.n_train} training examples leave a last batch of "
                              f"1 example, which cannot train the model's BatchNorm (phase {phase.name!r}); choose a "
                              "batch size that leaves more than 1 example over (or divides the count), or give the "
                              "client more examples") from None
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"client {data.client_id}: loss is {value} in phase "
                                 f"{phase.name!r}, epoch {epoch}; lower the learning rate")
    step(flooded(loss, flood))
    if scheduler is not None:
        scheduler.step()
    return value


def train_phase(model: nn.Module, phase: Phase, data: ClientData, *, settings: OptimSettings,
                accelerator: Accelerator, seed: int, extra_loss: LossHook | None = None,
                grad_hook: GradHook | None = None, flood: float | None = None,
                post_step: GradHook | None = None, on_epoch_end: Callable[[int, float], None] | None = None) -> dict:
    """Train ``model`` for ``phase.epochs`` epochs on ``data``'s train split.

    Returns:
        A record with the phase name, trainable/total parameter counts, mean loss per epoch and seconds.
    """
    trainable, total = apply_phase(model, phase)
    record = {"phase": phase.name, "trainable_params": trainable, "total_params": total,
              "epoch_loss": [], "seconds": 0.0}
    if phase.epochs == 0 or (trainable == 0 and phase.bn == "frozen"):
        return record
    if phase.solver == "logreg":
        record.update(probe_to_convergence(model, phase, data, batch_size=settings.batch_size, seed=seed,
                                           device=accelerator.device, on_epoch_end=on_epoch_end))
        return record
    momenta = begin_bn_statistics(model, phase.bn)
    if trainable == 0:  # nothing to optimise: no optimizer, so no weight decay or momentum touches a weight
        record.update(statistics_passes(model, phase, data, batch_size=settings.batch_size, seed=seed,
                                        device=accelerator.device, on_epoch_end=on_epoch_end))
        end_bn_statistics(model, momenta)
        return record
    params = [p for p in model.parameters() if p.requires_grad]
    raw = make_optimizer(params, phase.lr, settings)  # new for every phase: no state leaks between stages
    scheduler = make_scheduler(raw, settings, phase.epochs * math.ceil(len(data.train_y) / settings.batch_size))
    optimizer = prepared_optimizer(raw, accelerator)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    inputs, forward = training_inputs(model, phase, data, settings=settings, accelerator=accelerator)
    record["cached_features"] = forward is not model
    steps = phase.epochs * math.ceil(data.n_train / settings.batch_size)
    bar = tqdm(total=steps, desc=f"{data.client_id}/{phase.name}", leave=False,
               disable=not show_progress(accelerator, steps))
    step = functools.partial(_step, model, optimizer=optimizer, accelerator=accelerator, extra_loss=extra_loss,
                             grad_hook=grad_hook, post_step=post_step)
    try:
        for epoch in range(phase.epochs):
            set_train_mode(model, phase.bn)
            loss_sum, n_seen = 0.0, 0
            for xb, yb in iterate_batches(inputs, data.train_y, batch_size=settings.batch_size,
                                          generator=generator, device=accelerator.device):
                value = _batch(forward, xb, yb, data=data, phase=phase, epoch=epoch, accelerator=accelerator,
                               flood=flood, step=step, scheduler=scheduler)
                loss_sum, n_seen = loss_sum + value * len(yb), n_seen + len(yb)
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{value:.4f}", refresh=False)
            record["epoch_loss"].append(loss_sum / max(n_seen, 1))
            if on_epoch_end is not None:
                on_epoch_end(epoch, record["epoch_loss"][-1])
    finally:
        bar.close()
        release_optimizer(optimizer, accelerator)
    record["seconds"] = time.perf_counter() - start
    end_bn_statistics(model, momenta)
    model.eval()
    return record


def probe_to_convergence(model: nn.Module, phase: Phase, data: ClientData, *, batch_size: int, seed: int, device,
                         on_epoch_end: Callable[[int, float], None] | None = None) -> dict:
    """A ``logreg`` phase: the head fitted to convergence on the backbone's eval-mode features (Kumar et al.,
    arXiv 2202.10054), L2 strength chosen on held-out training data, warm-started from the current head."""
    start = time.perf_counter()
    if phase.bn == "reestimate":  # the client's own statistics first (one cumulative pass), then frozen
        momenta = begin_bn_statistics(model, "reestimate")
        statistics_passes(model, phase, data, batch_size=batch_size, seed=seed, device=device, epochs=1)
        end_bn_statistics(model, momenta)
    model.eval()  # deterministic features: BatchNorm statistics frozen, dropout off
    with torch.no_grad():
        feats = torch.cat([model.features(xb) for xb, _ in iterate_batches(
            data.train_x, data.train_y, batch_size=256, shuffle=False, device=device)])
    head = head_module(model)
    y = data.train_y.to(feats.device)
    grid = phase.l2_grid or DEFAULT_L2_GRID
    l2, scores = choose_l2(feats, y, grid=grid, init_weight=head.weight, init_bias=head.bias, seed=seed)
    fit = fit_logreg(feats, y, l2=l2, init_weight=head.weight, init_bias=head.bias)
    with torch.no_grad():
        head.weight.copy_(fit.weight.to(head.weight.dtype))
        head.bias.copy_(fit.bias.to(head.bias.dtype))
        loss = nn.functional.cross_entropy(head(feats), y).item()
    for epoch in range(phase.epochs if on_epoch_end is not None else 0):
        on_epoch_end(epoch, loss)  # after the fact: the budget's probing epochs, all holding the converged head
    return {"epoch_loss": [loss], "seconds": time.perf_counter() - start, "cached_features": True,
            "solver": "logreg", "l2": l2, "heldout_accuracy": {str(k): v for k, v in scores.items()},
            "iterations": fit.iterations}


def _step(model: nn.Module, objective: torch.Tensor, optimizer: torch.optim.Optimizer, accelerator: Accelerator,
          extra_loss: LossHook | None, grad_hook: GradHook | None, post_step: GradHook | None) -> None:
    """One optimizer step on ``objective`` (+ the strategy's extra loss term), with its gradient hooks."""
    if extra_loss is not None and (extra := extra_loss(model)) is not None:
        objective = objective + extra
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(objective)  # with fp16: scaled, and the prepared optimizer unscales
    if grad_hook is not None:
        grad_hook(model)
    optimizer.step()
    if post_step is not None:
        post_step(model)


@torch.no_grad()
def statistics_passes(model: nn.Module, phase: Phase, data: ClientData, *, batch_size: int, seed: int, device,
                      on_epoch_end: Callable[[int, float], None] | None = None, epochs: int | None = None) -> dict:
    """A phase that trains no parameter: ``phase.epochs`` forward passes over ``data``'s train split
    without gradients, BatchNorm layers in train mode, so only their running statistics change."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(phase.epochs if epochs is None else epochs):
        set_statistics_mode(model)
        for xb, _ in iterate_batches(data.train_x, data.train_y, batch_size=batch_size, generator=generator,
                                     device=device):
            model(xb)
        if on_epoch_end is not None:
            on_epoch_end(epoch, float("nan"))  # no loss is computed
    model.eval()
    return {"seconds": time.perf_counter() - start, "statistics_passes": phase.epochs}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits for all of ``x`` in eval mode."""
    model.eval()
    outs = [model(xb) for xb, _ in iterate_batches(x, torch.zeros(len(x)), batch_size=batch_size,
                                                   shuffle=False, device=device)]
    return torch.cat(outs).cpu() if outs else torch.empty(0)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on (x, y)."""
    if len(y) == 0:
        return float("nan")
    return (predict(model, x, batch_size=batch_size, device=device).argmax(-1) == y).float().mean().item()
