"""Run a strategy for one client: copy the global model, execute its phases through THE loop."""

from __future__ import annotations

from collections.abc import Callable

from accelerate import Accelerator
from torch import nn

from hf_lpft.data.tensors import ClientData
from hf_lpft.strategies.base import Strategy, fresh_copy
from hf_lpft.train.loop import OptimSettings, derive_seed, train_phase
from hf_lpft.train.phase import Phase

EpochCallback = Callable[[nn.Module, str, int, float], None]


def run_phase(strategy: Strategy, model: nn.Module, phase: Phase, data: ClientData, *, settings: OptimSettings,
              accelerator: Accelerator, seed: int, ingredient: int = 0,
              on_epoch_end: EpochCallback | None = None) -> dict:
    """One phase of ``strategy`` with all its hooks (phase start, extra loss, gradient hook, flooding)."""
    strategy.on_phase_start(model, phase, data)
    callback = None if on_epoch_end is None else (lambda e, loss: on_epoch_end(model, phase.name, e, loss))
    record = train_phase(model, phase, data, settings=settings, accelerator=accelerator,
                         seed=derive_seed(seed, ingredient, phase.name),
                         extra_loss=lambda m: strategy.extra_loss(m, phase),
                         grad_hook=strategy.grad_hook(model, phase), flood=strategy.config.flood,
                         on_epoch_end=callback)
    return {**record, "ingredient": ingredient}


def personalize(strategy: Strategy, global_model: nn.Module, data: ClientData, *, settings: OptimSettings,
                accelerator: Accelerator, seed: int,
                on_epoch_end: EpochCallback | None = None) -> tuple[nn.Module, list[dict]]:
    """Personalize a copy of ``global_model`` on ``data`` with ``strategy``.

    Args:
        seed: Already derived for (run seed, strategy, client); each ingredient and phase derives its own.
        on_epoch_end: Called as ``(model, phase_name, epoch, mean_loss)`` after every epoch.

    Returns:
        The personalized model (in eval mode) and one record per (ingredient, phase).
    """
    models, records = [], []
    for ingredient in range(strategy.ingredients):
        model = strategy.prepare(fresh_copy(global_model))
        for phase in strategy.phases():
            records.append(run_phase(strategy, model, phase, data, settings=settings, accelerator=accelerator,
                                     seed=seed, ingredient=ingredient, on_epoch_end=on_epoch_end))
        models.append(model)
    final = strategy.finalize(models)
    final.eval()
    return final, records
