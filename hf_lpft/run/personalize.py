"""Run a strategy for one client: copy the global model, execute its phases through THE loop."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn

from hf_lpft.data.tensors import ClientData
from hf_lpft.strategies.base import Strategy, fresh_copy
from hf_lpft.train.batched_probe import ProbeResult, batch_blocker, load_probe, probe_clients
from hf_lpft.train.freeze import apply_phase
from hf_lpft.train.loop import OptimSettings, derive_seed, train_phase
from hf_lpft.train.phase import Phase

logger = logging.getLogger(__name__)

# Hooks a strategy may override; batched probing runs none of them, so it needs all at their defaults.
PHASE_HOOKS = ("on_phase_start", "extra_loss", "grad_hook", "post_step")

EpochCallback = Callable[[nn.Module, str, int, float], None]


def run_phase(strategy: Strategy, model: nn.Module, phase: Phase, data: ClientData, *, settings: OptimSettings,
              accelerator: Accelerator, seed: int, ingredient: int = 0,
              on_epoch_end: EpochCallback | None = None) -> dict:
    """One phase of ``strategy`` with all its hooks (phase start, extra loss, gradient hook, post-step, flooding)."""
    strategy.on_phase_start(model, phase, data)
    callback = None if on_epoch_end is None else (lambda e, loss: on_epoch_end(model, phase.name, e, loss))
    record = train_phase(model, phase, data, settings=settings, accelerator=accelerator,
                         seed=phase_seed(seed, ingredient, phase),
                         extra_loss=lambda m: strategy.extra_loss(m, phase),
                         grad_hook=strategy.grad_hook(model, phase), flood=strategy.config.flood,
                         post_step=strategy.post_step(model, phase),
                         on_epoch_end=callback)
    return {**record, "ingredient": ingredient}


def phase_seed(seed: int, ingredient: int, phase: Phase) -> int:
    """The batch-order seed of one phase of one ingredient, from the (run seed, strategy, client) seed."""
    return derive_seed(seed, ingredient, phase.name)


def batched_probe_blocker(strategy: Strategy, model: nn.Module, settings: OptimSettings) -> str | None:
    """Why ``strategy``'s first phase cannot be probed for all clients at once (None = it can)."""
    if strategy.ingredients != 1:
        return f"it runs {strategy.ingredients} ingredients"
    overridden = [h for h in PHASE_HOOKS if getattr(type(strategy), h, None) is not getattr(Strategy, h, None)]
    if overridden:
        return f"it overrides the hook(s) {overridden}"
    return batch_blocker(model, strategy.phases()[0], settings)


def probe_all_clients(strategy: Strategy, global_model: nn.Module, clients: list[ClientData], *,
                      settings: OptimSettings, accelerator: Accelerator, seeds: list[int]) -> list[ProbeResult] | None:
    """The first (probing) phase of ``strategy`` for every client at once, or None (logged) when batching
    would not equal the loop. ``seeds`` are the per-client seeds :func:`personalize` gets."""
    with torch.random.fork_rng(devices=[]):  # prepare may draw random numbers (LoRA init): keep the stream
        model = strategy.prepare(fresh_copy(global_model))
    blocker = batched_probe_blocker(strategy, model, settings)
    if blocker is not None:
        logger.info("%s: probing client by client, not batched (%s)", strategy.name, blocker)
        return None
    phase = strategy.phases()[0]
    return probe_clients(model, phase, clients, settings=settings, seeds=[phase_seed(s, 0, phase) for s in seeds],
                         device=accelerator.device, flood=strategy.config.flood)


def personalize(strategy: Strategy, global_model: nn.Module, data: ClientData, *, settings: OptimSettings,
                accelerator: Accelerator, seed: int,
                on_epoch_end: EpochCallback | None = None,
                probed: ProbeResult | None = None) -> tuple[nn.Module, list[dict]]:
    """Personalize a copy of ``global_model`` on ``data`` with ``strategy``.

    Args:
        seed: Already derived for (run seed, strategy, client); each ingredient and phase derives its own.
        on_epoch_end: Called as ``(model, phase_name, epoch, mean_loss)`` after every epoch.
        probed: This client's result of :func:`probe_all_clients`: it replaces the first phase (whose hooks
            are all defaults). ``on_epoch_end`` is then called for its epochs after the fact, with the
            final probed head in the model (so do not combine it with per-epoch evaluation).

    Returns:
        The personalized model (in eval mode) and one record per (ingredient, phase).
    """
    models, records = [], []
    for ingredient in range(strategy.ingredients):
        model = strategy.prepare(fresh_copy(global_model))
        for k, phase in enumerate(strategy.phases()):
            if probed is not None and ingredient == 0 and k == 0:
                apply_phase(model, phase)  # leave requires_grad as the loop would
                records.append({**load_probe(model, probed), "ingredient": 0})
                for epoch, loss in enumerate(records[-1]["epoch_loss"] if on_epoch_end else []):
                    on_epoch_end(model, phase.name, epoch, loss)  # after the fact: the model holds the final head
                continue
            records.append(run_phase(strategy, model, phase, data, settings=settings, accelerator=accelerator,
                                     seed=seed, ingredient=ingredient, on_epoch_end=on_epoch_end))
        models.append(model)
    final = strategy.finalize(models)
    final.eval()
    return final, records
