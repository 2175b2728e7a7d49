"""THE only place that sets ``requires_grad`` and BatchNorm mode.

Keeping this in one function makes "which parameters trained" auditable: every phase logs its
trainable / total parameter counts from here.
"""

from __future__ import annotations

import logging
import re

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_lpft.train.phase import Phase

logger = logging.getLogger(__name__)


def head_module(model: nn.Module) -> nn.Module:
    """The SplitModel head inside ``model`` (which may be wrapped, e.g. by peft)."""
    from hf_lpft.models.backbone import SplitModel

    for module in model.modules():
        if isinstance(module, SplitModel):
            return module.head
    raise TypeError(f"{type(model).__name__} holds no SplitModel; cannot find the head")


def trainable_names(model: nn.Module, phase: Phase) -> set[str]:
    """Names of the parameters that ``phase`` trains."""
    if phase.trainable == "none":
        return set()
    head_ids = {id(p) for p in head_module(model).parameters()}
    names = set()
    for name, p in model.named_parameters():
        if phase.trainable == "all" or id(p) in head_ids:
            names.add(name)
        elif phase.trainable == "adapters_and_head" and "lora_" in name:
            names.add(name)
        elif phase.trainable == "patterns" and any(re.search(pat, name) for pat in phase.patterns):
            names.add(name)
    return names


_REPORTED: set[tuple] = set()


def apply_phase(model: nn.Module, phase: Phase) -> tuple[int, int]:
    """Set ``requires_grad`` for ``phase``; return (trainable, total) parameter counts."""
    names = trainable_names(model, phase)
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        total += p.numel()
        trainable += p.numel() if name in names else 0
    key = (phase.name, trainable, total, phase.bn)
    log = logger.debug if key in _REPORTED else logger.info  # say it once per kind of phase, not per client
    _REPORTED.add(key)
    log("phase %s: %d / %d parameters trainable (%.2f%%), BatchNorm %s",
        phase.name, trainable, total, 100.0 * trainable / max(total, 1), phase.bn)
    return trainable, total


def set_train_mode(model: nn.Module, bn: str) -> None:
    """Train mode, except BatchNorm layers stay in eval mode (statistics frozen) when ``bn == "frozen"``."""
    model.train()
    if bn == "frozen":
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


def set_statistics_mode(model: nn.Module) -> None:
    """Eval mode except BatchNorm layers (train mode): forward passes then update only the BatchNorm
    statistics, on activations as evaluation sees them (dropout / drop-path off)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.train()


def begin_bn_statistics(model: nn.Module, bn: str) -> dict[nn.Module, float | None]:
    """For ``bn == "reestimate"``: reset every BatchNorm layer's running statistics and switch it to a
    cumulative average (``momentum=None``); return the previous momenta for :func:`end_bn_statistics`."""
    saved: dict[nn.Module, float | None] = {}
    if bn != "reestimate":
        return saved
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            saved[module] = module.momentum
            module.reset_running_stats()
            module.momentum = None
    return saved


def end_bn_statistics(model: nn.Module, saved: dict[nn.Module, float | None]) -> None:
    """Restore the momenta saved by :func:`begin_bn_statistics` (later phases average as usual)."""
    for module, momentum in saved.items():
        module.momentum = momentum
